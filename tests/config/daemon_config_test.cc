#include "collm/config/daemon_config.h"

#include <yaml-cpp/yaml.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "config/config_test_util.h"
#include "gtest/gtest.h"
#include "testing/test_env.h"

namespace collm::config {
namespace {

namespace fs = std::filesystem;

::testing::AssertionResult FullyMatches(const char* text_expr, const char* regex_expr,
                                        const std::string& text, const std::string& regex) {
  if (std::regex_match(text, std::regex(regex))) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << text_expr << " = \"" << text << "\"\n does not match "
                                       << regex_expr << " = \"" << regex << "\"";
}

const std::string kConfigsDir = std::string(COLLM_SOURCE_DIR) + "/configs";
const std::string kDefaultConfig = kConfigsDir + "/collmd.yaml";
const std::string kTrainConfig = kConfigsDir + "/collmd-train.yaml";

absl::StatusOr<DaemonConfig> Parse(const std::string& yaml, const std::string& base_dir = "/cfg") {
  return DaemonConfig::FromYaml(yaml, base_dir);
}

// The error message for `yaml`, which must fail with InvalidArgument.
std::string ErrorOf(const std::string& yaml) {
  absl::StatusOr<DaemonConfig> c = Parse(yaml);
  EXPECT_FALSE(c.ok()) << "expected an error for:\n" << yaml;
  if (c.ok()) return "";
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
  return std::string(c.status().message());
}

std::string WithModel(const std::string& rest) { return "model: /m\n" + rest; }

// --- The shipped files ---------------------------------------------------------------------------

TEST(DaemonConfigTest, ShippedDefaultConfigGivesTheDocumentedDefaults) {
  ScopedEnv model("COLLM_MODEL", std::nullopt);
  ScopedEnv home("HOME", "/home/tester");
  absl::StatusOr<DaemonConfig> c = DaemonConfig::FromFile(kDefaultConfig);
  ASSERT_TRUE(c.ok()) << c.status();
  const DaemonConfig d;  // The structs' defaults, which the file's comments document.

  EXPECT_EQ(c->model_dir, "/home/tester/.cache/collm/tiny-random");
  EXPECT_EQ(c->runtime.device, d.runtime.device);
  EXPECT_EQ(c->runtime.dtype, d.runtime.dtype);
  EXPECT_EQ(c->runtime.num_threads, d.runtime.num_threads);

  const engine::EngineOptions& e = c->engine;
  EXPECT_EQ(e.max_step_tokens, d.engine.max_step_tokens);
  EXPECT_EQ(e.max_running, d.engine.max_running);
  EXPECT_EQ(e.max_queued, d.engine.max_queued);
  EXPECT_EQ(e.default_adapter, d.engine.default_adapter);
  EXPECT_EQ(e.training_share, d.engine.training_share);
  EXPECT_EQ(e.slo_guard, d.engine.slo_guard);
  EXPECT_EQ(e.guard_safety, d.engine.guard_safety);
  EXPECT_EQ(e.kv_cache.block_size, d.engine.kv_cache.block_size);
  EXPECT_EQ(e.kv_cache.num_blocks, d.engine.kv_cache.num_blocks);
  EXPECT_EQ(e.kv_cache.max_bytes, d.engine.kv_cache.max_bytes);
  EXPECT_EQ(e.default_slo.ttft_ms, d.engine.default_slo.ttft_ms);
  EXPECT_EQ(e.default_slo.tpot_ms, d.engine.default_slo.tpot_ms);
  // Classes default to none; the file shows two as examples.
  ASSERT_EQ(e.slo_classes.size(), 2u);
  EXPECT_EQ(e.slo_classes.at("interactive").ttft_ms, 500);
  EXPECT_EQ(e.slo_classes.at("interactive").tpot_ms, 100);
  EXPECT_EQ(e.slo_classes.at("batch").ttft_ms, 0);

  const runtime::SamplingParams& s = c->default_sampling;
  EXPECT_EQ(s.temperature, d.default_sampling.temperature);
  EXPECT_EQ(s.top_k, d.default_sampling.top_k);
  EXPECT_EQ(s.top_p, d.default_sampling.top_p);
  EXPECT_EQ(s.min_p, d.default_sampling.min_p);
  EXPECT_EQ(s.repetition_penalty, d.default_sampling.repetition_penalty);
  EXPECT_EQ(s.seed, d.default_sampling.seed);
  EXPECT_EQ(s.max_tokens, d.default_sampling.max_tokens);
  EXPECT_EQ(s.stop, d.default_sampling.stop);

  EXPECT_TRUE(c->adapters.empty());

  const TrainingConfig& t = c->training;
  EXPECT_FALSE(t.enabled);
  EXPECT_TRUE(t.data.empty());
  const engine::DatasetOptions& ds = t.dataset;
  EXPECT_EQ(ds.format.prompt_field, d.training.dataset.format.prompt_field);
  EXPECT_EQ(ds.format.completion_field, d.training.dataset.format.completion_field);
  EXPECT_EQ(ds.format.input_field, d.training.dataset.format.input_field);
  EXPECT_EQ(ds.format.text_field, d.training.dataset.format.text_field);
  EXPECT_EQ(ds.format.messages_field, d.training.dataset.format.messages_field);
  EXPECT_EQ(ds.format.prompt_template, d.training.dataset.format.prompt_template);
  EXPECT_EQ(ds.format.user_prefix, d.training.dataset.format.user_prefix);
  EXPECT_EQ(ds.format.assistant_prefix, d.training.dataset.format.assistant_prefix);
  EXPECT_EQ(ds.format.system_prefix, d.training.dataset.format.system_prefix);
  EXPECT_EQ(ds.format.turn_end, d.training.dataset.format.turn_end);
  EXPECT_EQ(ds.max_length, d.training.dataset.max_length);
  EXPECT_EQ(ds.add_bos, d.training.dataset.add_bos);
  EXPECT_EQ(ds.add_eos, d.training.dataset.add_eos);
  EXPECT_EQ(ds.held_out_fraction, d.training.dataset.held_out_fraction);
  EXPECT_EQ(ds.seed, d.training.dataset.seed);
  EXPECT_EQ(ds.max_examples, d.training.dataset.max_examples);
  EXPECT_EQ(t.lora.rank, d.training.lora.rank);
  EXPECT_EQ(t.lora.alpha, d.training.lora.alpha);
  EXPECT_EQ(t.lora.dropout, d.training.lora.dropout);
  EXPECT_EQ(t.lora.use_rslora, d.training.lora.use_rslora);
  EXPECT_EQ(t.lora.targets, d.training.lora.targets);
  EXPECT_EQ(t.adapter_name, d.training.adapter_name);
  EXPECT_EQ(t.init_adapter, d.training.init_adapter);
  EXPECT_EQ(t.trainer.lr, d.training.trainer.lr);
  EXPECT_EQ(t.trainer.schedule, d.training.trainer.schedule);
  EXPECT_EQ(t.trainer.warmup_steps, d.training.trainer.warmup_steps);
  EXPECT_EQ(t.trainer.total_steps, d.training.trainer.total_steps);
  EXPECT_EQ(t.trainer.min_lr_ratio, d.training.trainer.min_lr_ratio);
  EXPECT_EQ(t.trainer.max_grad_norm, d.training.trainer.max_grad_norm);
  EXPECT_EQ(t.trainer.micro_batch_size, d.training.trainer.micro_batch_size);
  EXPECT_EQ(t.trainer.grad_accum_steps, d.training.trainer.grad_accum_steps);
  EXPECT_EQ(t.trainer.seed, d.training.trainer.seed);
  EXPECT_EQ(t.trainer.adamw.weight_decay, d.training.trainer.adamw.weight_decay);
  EXPECT_EQ(t.publish.every_steps, d.training.publish.every_steps);
  EXPECT_EQ(t.publish.quality_gate, d.training.publish.quality_gate);
  EXPECT_EQ(t.publish.min_improvement, d.training.publish.min_improvement);
  EXPECT_EQ(t.checkpoint_dir, d.training.checkpoint_dir);
  EXPECT_EQ(t.checkpoint_every_steps, d.training.checkpoint_every_steps);
  EXPECT_EQ(t.feedback_capacity, d.training.feedback_capacity);

  EXPECT_EQ(c->server.address, d.server.address);
  EXPECT_EQ(c->server.max_message_bytes, d.server.max_message_bytes);
  EXPECT_EQ(c->metrics.enabled, d.metrics.enabled);
  EXPECT_EQ(c->metrics.address, d.metrics.address);
  EXPECT_EQ(c->logging.level, d.logging.level);
  EXPECT_EQ(c->logging.json, d.logging.json);
  EXPECT_EQ(c->shutdown_grace_seconds, d.shutdown_grace_seconds);
}

TEST(DaemonConfigTest, ShippedDefaultConfigTakesTheModelFromTheEnvironment) {
  ScopedEnv model("COLLM_MODEL", "/models/llama");
  absl::StatusOr<DaemonConfig> c = DaemonConfig::FromFile(kDefaultConfig);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_dir, "/models/llama");
}

TEST(DaemonConfigTest, ShippedTrainConfigTrainsOnGsm8k) {
  {
    // The shipped config depends on nothing beside the checkout: without the variables it is an
    // error naming the missing one.
    ScopedEnv models("COLLM_MODELS_DIR", std::nullopt);
    ScopedEnv data("COLLM_DATA_DIR", "/srv/data");
    absl::StatusOr<DaemonConfig> c = DaemonConfig::FromFile(kTrainConfig);
    ASSERT_FALSE(c.ok());
    EXPECT_NE(c.status().message().find("COLLM_MODELS_DIR"), std::string::npos) << c.status();
  }
  ScopedEnv models("COLLM_MODELS_DIR", "/srv/models");
  ScopedEnv data("COLLM_DATA_DIR", "/srv/data");
  absl::StatusOr<DaemonConfig> c = DaemonConfig::FromFile(kTrainConfig);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_dir, "/srv/models/stories260K-hf");
  ASSERT_EQ(c->training.data.size(), 1u);
  EXPECT_EQ(c->training.data[0], "/srv/data/finetune/gsm8k/train.jsonl");
  const TrainingConfig& t = c->training;
  EXPECT_TRUE(t.enabled);
  EXPECT_EQ(t.dataset.format.prompt_field, "question");
  EXPECT_EQ(t.dataset.format.completion_field, "answer");
  EXPECT_EQ(t.dataset.format.prompt_template, "Question: {prompt}\nAnswer: ");
  EXPECT_EQ(t.lora.targets.size(), 7u);  // all-linear
  EXPECT_EQ(t.trainer.schedule, engine::LrSchedule::kCosine);
  EXPECT_GT(t.publish.every_steps, 0);
  EXPECT_GT(c->engine.training_share, 0);
}

// Every key of the schema, as documented in configs/collmd.yaml. "*" stands for a user-chosen
// name (an SLO class).
const std::set<std::string> kDocumentedKeys = {
    "model",
    "runtime.device",
    "runtime.dtype",
    "runtime.threads",
    "runtime.weights",
    "engine.max_step_tokens",
    "engine.share_controller.enabled",
    "engine.share_controller.headroom_full",
    "engine.share_controller.headroom_zero",
    "engine.share_controller.recover_seconds",
    "engine.share_controller.surge_factor",
    "engine.share_controller.surge_hold_ms",
    "engine.share_controller.surge_min_rps",
    "engine.max_running",
    "engine.max_queued",
    "engine.default_adapter",
    "engine.training_share",
    "engine.slo_guard",
    "engine.guard_safety",
    "engine.guard_idle_risk",
    "engine.max_phase_ms",
    "engine.admission",
    "engine.kv_cache.block_size",
    "engine.kv_cache.num_blocks",
    "engine.kv_cache.max_bytes",
    "engine.slo.default.ttft_ms",
    "engine.slo.default.tpot_ms",
    "engine.slo.classes.*.ttft_ms",
    "engine.slo.classes.*.tpot_ms",
    "sampling.temperature",
    "sampling.top_k",
    "sampling.top_p",
    "sampling.min_p",
    "sampling.repetition_penalty",
    "sampling.seed",
    "sampling.max_tokens",
    "sampling.stop",
    "adapters",
    "training.enabled",
    "training.data",
    "training.dataset.prompt_field",
    "training.dataset.completion_field",
    "training.dataset.input_field",
    "training.dataset.text_field",
    "training.dataset.messages_field",
    "training.dataset.prompt_template",
    "training.dataset.user_prefix",
    "training.dataset.assistant_prefix",
    "training.dataset.system_prefix",
    "training.dataset.turn_end",
    "training.dataset.max_length",
    "training.dataset.add_bos",
    "training.dataset.add_eos",
    "training.dataset.held_out_fraction",
    "training.dataset.seed",
    "training.dataset.max_examples",
    "training.lora.rank",
    "training.lora.alpha",
    "training.lora.dropout",
    "training.lora.use_rslora",
    "training.lora.targets",
    "training.adapter_name",
    "training.init_adapter",
    "training.trainer.lr",
    "training.trainer.schedule",
    "training.trainer.warmup_steps",
    "training.trainer.total_steps",
    "training.trainer.min_lr_ratio",
    "training.trainer.max_grad_norm",
    "training.trainer.micro_batch_size",
    "training.trainer.grad_accum_steps",
    "training.trainer.seed",
    "training.trainer.weight_decay",
    "training.trainer.head_chunk_rows",
    "training.publish.every_steps",
    "training.publish.quality_gate",
    "training.publish.min_improvement",
    "training.checkpoint_dir",
    "training.checkpoint_every_steps",
    "training.feedback_capacity",
    "federation.enabled",
    "federation.aggregator",
    "federation.device_id",
    "federation.tls.enabled",
    "federation.tls.ca",
    "federation.tls.cert",
    "federation.tls.key",
    "federation.tls.server_name",
    "federation.heartbeat_seconds",
    "federation.backoff.initial_seconds",
    "federation.backoff.max_seconds",
    "federation.rpc_timeout_seconds",
    "federation.upload_chunk_bytes",
    "federation.install_global",
    "federation.task_training_share",
    "federation.follow_aggregator_share",
    "server.address",
    "server.max_message_bytes",
    "server.adapter_roots",
    "server.admin_token",
    "server.admin_token_file",
    "metrics.enabled",
    "metrics.address",
    "http.enabled",
    "http.address",
    "http.api_keys",
    "http.chat_template",
    "http.served_model_name",
    "http.threads",
    "http.max_body_bytes",
    "logging.level",
    "logging.json",
    "shutdown_grace_seconds",
};

// Leaf key paths of `node`; maps of user-chosen names are walked with "*" (SLO classes) or kept
// as one leaf (adapters).
void CollectKeys(const YAML::Node& node, const std::string& path, std::set<std::string>& out) {
  if (!node.IsMap() || path == "adapters") {
    out.insert(path);
    return;
  }
  for (const auto& kv : node) {
    const std::string key = path == "engine.slo.classes" ? "*" : kv.first.Scalar();
    CollectKeys(kv.second, path.empty() ? key : path + "." + key, out);
  }
}

TEST(DaemonConfigTest, ShippedDefaultConfigSpellsOutEveryKey) {
  std::set<std::string> keys;
  CollectKeys(YAML::LoadFile(kDefaultConfig), "", keys);
  EXPECT_EQ(keys, kDocumentedKeys);
}

// The parser's own key list for a section, read from its unknown-key error.
std::set<std::string> ParserKeys(const std::string& section) {
  std::string yaml = "zz_not_a_key: 1\n";
  std::string indent;
  const std::vector<std::string> parts = absl::StrSplit(section, '.', absl::SkipEmpty());
  std::string nested;
  for (const std::string& part : parts) {
    nested += indent + part + ":\n";
    indent += "  ";
  }
  if (!section.empty()) yaml = nested + indent + "zz_not_a_key: 1\n";
  const std::string message = ErrorOf(WithModel(yaml));
  const size_t open = message.find("(known: ");
  const size_t close = message.find(')', open);
  if (open == std::string::npos || close == std::string::npos) {
    ADD_FAILURE() << "no key list in: " << message;
    return {};
  }
  const std::string list = message.substr(open + 8, close - open - 8);
  std::set<std::string> out;
  for (absl::string_view k : absl::StrSplit(list, ", ")) out.insert(std::string(k));
  return out;
}

TEST(DaemonConfigTest, ParserAcceptsExactlyTheDocumentedKeys) {
  // Map sections of the schema -> their keys, from the documented list: "engine.kv_cache.x" puts
  // "engine" in "", "kv_cache" in "engine" and "x" in "engine.kv_cache".
  std::map<std::string, std::set<std::string>> sections;
  for (const std::string& key : kDocumentedKeys) {
    const std::vector<std::string> parts = absl::StrSplit(key, '.');
    std::string section;
    for (const std::string& part : parts) {
      if (part == "*") break;  // User-named entries: checked separately.
      sections[section].insert(part);
      section = section.empty() ? part : section + "." + part;
    }
  }
  ASSERT_TRUE(sections.count("engine.slo.default"));
  for (const auto& [section, keys] : sections) {
    EXPECT_EQ(ParserKeys(section), keys) << "section '" << section << "'";
  }
}

TEST(DaemonConfigTest, ShippedConfigsCommentEveryKey) {
  for (const std::string& file : {kDefaultConfig}) {
    std::istringstream in(testing::ReadFileOrDie(file));
    std::string line, previous;
    int number = 0;
    while (std::getline(in, line)) {
      ++number;
      const std::string trimmed(absl::StripLeadingAsciiWhitespace(line));
      const bool is_key = !trimmed.empty() && trimmed[0] != '#' && trimmed[0] != '-' &&
                          absl::StrContains(trimmed, ":");
      if (is_key) {
        const bool commented = absl::StrContains(line, " # ") ||
                               absl::StartsWith(absl::StripLeadingAsciiWhitespace(previous), "#");
        EXPECT_TRUE(commented) << file << ":" << number << ": key without a comment: " << line;
      }
      EXPECT_LE(line.size(), 100u) << file << ":" << number;
      previous = line;
    }
  }
}

// --- Unknown keys, types, ranges
// ------------------------------------------------------------------

TEST(DaemonConfigTest, UnknownKeysAreNamedWithTheirFullPath) {
  EXPECT_PRED_FORMAT2(Contains,
                      ErrorOf(WithModel("server:\n  admin_token: t\n  admin_token_file: f\n")),
                      "server.admin_token_file and server.admin_token are exclusive");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel("server:\n  adapter_roots: [\"\"]\n")),
                      "server.adapter_roots[0]");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel("modle: x\n")),
                      "modle: unknown key (known: model, ");
  const std::string engine = ErrorOf(WithModel("engine:\n  max_step_tokenz: 5\n"));
  EXPECT_PRED_FORMAT2(Contains, engine,
                      "engine.max_step_tokenz: unknown key (known: max_step_tokens, ");
  EXPECT_PRED_FORMAT2(Contains, engine, "did you mean max_step_tokens?");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel("engine:\n  kv_cache:\n    blocks: 5\n")),
                      "engine.kv_cache.blocks: unknown key");
  EXPECT_PRED_FORMAT2(Contains,
                      ErrorOf(WithModel("engine:\n  slo:\n    classes:\n      fast: {ttft: 5}\n")),
                      "engine.slo.classes.fast.ttft: unknown key (known: ttft_ms, tpot_ms)");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel("training:\n  lora:\n    rnak: 4\n")),
                      "training.lora.rnak: unknown key");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel("training:\n  trainer:\n    beta1: 0.9\n")),
                      "training.trainer.beta1: unknown key");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel("engine:\n  max_running: 1\n  max_running: 2\n")),
                      "engine.max_running: duplicate key");
}

TEST(DaemonConfigTest, WrongTypesAreNamed) {
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel("engine:\n  max_running: abc\n")),
                      "engine.max_running must be an integer, got 'abc'");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel("engine:\n  max_running: 2.5\n")),
                      "engine.max_running must be an integer, got '2.5'");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel("engine: [1, 2]\n")),
                      "engine must be a map, got a list");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel("runtime:\n  threads: {a: 1}\n")),
                      "runtime.threads must be an integer, got a map");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel("engine:\n  slo_guard: maybe\n")),
                      "engine.slo_guard must be true or false, got 'maybe'");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel("sampling:\n  temperature: hot\n")),
                      "sampling.temperature must be a finite number, got 'hot'");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel("sampling:\n  seed: -1\n")),
                      "sampling.seed must be an integer >= 0, got '-1'");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel("sampling:\n  stop: END\n")),
                      "sampling.stop must be a list of strings, got 'END'");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel("training:\n  data: [a.jsonl, [b]]\n")),
                      "training.data[1] must be a string, got a list");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel("engine:\n  max_queued:\n")),
                      "engine.max_queued must be an integer, got null");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel("runtime:\n  threads: 99999999999\n")),
                      "runtime.threads is out of range");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf("- model\n"), "must be a map of keys, got a list");
}

TEST(DaemonConfigTest, OutOfRangeValuesAreNamed) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"engine:\n  training_share: 1.5\n", "engine.training_share must be in [0, 1], got 1.5"},
      {"engine:\n  max_step_tokens: 0\n", "engine.max_step_tokens must be > 0, got 0"},
      {"engine:\n  max_running: -1\n", "engine.max_running must be > 0, got -1"},
      {"engine:\n  max_queued: 0\n", "engine.max_queued must be > 0, got 0"},
      {"engine:\n  guard_safety: 0.5\n", "engine.guard_safety must be >= 1, got 0.5"},
      {"engine:\n  guard_idle_risk: 2\n", "engine.guard_idle_risk must be in [0, 1], got 2"},
      {"engine:\n  max_phase_ms: -5\n", "engine.max_phase_ms must be a finite number >= 0"},
      {"engine:\n  admission: drop\n",
       "engine.admission must be one of none, reject, deprioritize, got 'drop'"},
      {"engine:\n  kv_cache: {block_size: 0}\n", "engine.kv_cache.block_size must be > 0, got 0"},
      {"engine:\n  kv_cache: {num_blocks: -2}\n", "engine.kv_cache.num_blocks must be >= 0"},
      {"engine:\n  slo: {default: {ttft_ms: -1}}\n", "engine.slo.default.ttft_ms must be >= 0"},
      {"engine:\n  slo: {classes: {x: {tpot_ms: -1}}}\n",
       "engine.slo.classes.x.tpot_ms must be >= 0"},
      {"runtime:\n  threads: -1\n", "runtime.threads must be >= 0, got -1"},
      {"runtime:\n  device: tpu\n", "runtime.device must be cpu, cuda or cuda:N, got 'tpu'"},
      {"runtime:\n  dtype: f8\n", "runtime.dtype must be auto, f32, bf16 or f16, got 'f8'"},
      {"runtime:\n  weights: q4_k\n", "runtime.weights must be f32, int8 or int4, got 'q4_k'"},
      {"runtime:\n  weights: int8\n  device: cuda\n",
       "runtime.weights int8 needs device cpu and dtype auto or f32"},
      {"sampling:\n  top_p: 1.5\n", "sampling.top_p must be in (0, 1], got 1.5"},
      {"sampling:\n  temperature: -1\n", "sampling.temperature must be a finite number >= 0"},
      {"sampling:\n  max_tokens: 0\n", "sampling.max_tokens must be > 0, got 0"},
      {"sampling:\n  stop: ['']\n", "sampling.stop[0] must not be empty"},
      {"training:\n  lora: {rank: 0}\n", "training.lora.rank must be > 0, got 0"},
      {"training:\n  lora: {dropout: 1}\n", "training.lora.dropout must be in [0, 1), got 1"},
      {"training:\n  lora: {targets: []}\n", "training.lora.targets must not be empty"},
      {"training:\n  lora: {targets: [q_proj, qkv]}\n",
       "training.lora.targets[1]: unknown LoRA target module 'qkv'"},
      {"training:\n  lora: {targets: [q_proj, q_proj]}\n",
       "training.lora.targets lists q_proj twice"},
      {"training:\n  trainer: {lr: 0}\n", "training.trainer.lr must be > 0, got 0"},
      {"training:\n  trainer: {schedule: linear}\n",
       "training.trainer.schedule must be one of constant, cosine, got 'linear'"},
      {"training:\n  trainer: {schedule: cosine}\n",
       "training.trainer.total_steps must be > 0 for cosine"},
      {"training:\n  trainer: {micro_batch_size: 0}\n",
       "training.trainer.micro_batch_size must be > 0, got 0"},
      {"training:\n  trainer: {weight_decay: -0.1}\n",
       "training.trainer.weight_decay must be >= 0, got -0.1"},
      {"training:\n  trainer: {head_chunk_rows: 0}\n",
       "training.trainer.head_chunk_rows must be > 0, got 0"},
      {"training:\n  dataset: {held_out_fraction: 1}\n",
       "training.dataset.held_out_fraction must be in [0, 1), got 1"},
      {"training:\n  dataset: {max_length: 1}\n",
       "training.dataset.max_length must be >= 2, got 1"},
      {"training:\n  dataset: {prompt_template: 'Q: '}\n",
       "training.dataset.prompt_template must contain {prompt}"},
      {"training:\n  publish: {min_improvement: -1}\n",
       "training.publish.min_improvement must be >= 0, got -1"},
      {"training:\n  publish: {every_steps: -1}\n", "training.publish.every_steps must be >= 0"},
      {"training:\n  adapter_name: ''\n", "training.adapter_name must not be empty"},
      {"training:\n  checkpoint_every_steps: -5\n",
       "training.checkpoint_every_steps must be >= 0, got -5"},
      {"training:\n  feedback_capacity: -1\n", "training.feedback_capacity must be >= 0, got -1"},
      {"server:\n  address: ''\n", "server.address must not be empty"},
      {"server:\n  max_message_bytes: 4GiB\n", "server.max_message_bytes must be < 2GiB"},
      {"metrics:\n  address: ''\n", "metrics.address must not be empty"},
      {"logging:\n  level: loud\n",
       "logging.level must be one of trace, debug, info, warn, "
       "error, critical, off, got 'loud'"},
      {"shutdown_grace_seconds: -1\n", "shutdown_grace_seconds must be >= 0, got -1"},
      {"adapters:\n  math: ''\n", "adapters.math must not be empty"},
  };
  for (const auto& [yaml, expected] : cases) {
    EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel(yaml)), expected) << yaml;
  }
}

TEST(DaemonConfigTest, ModelIsRequired) {
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(""), "model is required");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf("engine: {}\n"), "model is required");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf("model: ''\n"), "model must not be empty");
}

TEST(DaemonConfigTest, MinimalConfigTakesDefaultsAndEmptySectionsAreFine) {
  absl::StatusOr<DaemonConfig> c = Parse("model: /m\nengine:\nadapters:\ntraining: {}\n");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_dir, "/m");
  EXPECT_EQ(c->engine.max_step_tokens, 256);
  EXPECT_TRUE(c->adapters.empty());
  EXPECT_EQ(c->training.adapter_name, "live");
  EXPECT_EQ(c->server.address, "127.0.0.1:50051");
}

TEST(DaemonConfigTest, ByteSizesTakeUnits) {
  auto bytes = [](const std::string& value) -> absl::StatusOr<int64_t> {
    absl::StatusOr<DaemonConfig> c =
        Parse(WithModel("engine:\n  kv_cache:\n    max_bytes: " + value + "\n"));
    if (!c.ok()) return c.status();
    return c->engine.kv_cache.max_bytes;
  };
  EXPECT_EQ(*bytes("4096"), 4096);
  EXPECT_EQ(*bytes("512MiB"), int64_t{512} << 20);
  EXPECT_EQ(*bytes("2GiB"), int64_t{2} << 30);
  EXPECT_EQ(*bytes("2 gib"), int64_t{2} << 30);
  EXPECT_EQ(*bytes("1.5GB"), 1500000000);
  EXPECT_EQ(*bytes("64KB"), 64000);
  EXPECT_EQ(*bytes("100B"), 100);
  EXPECT_PRED_FORMAT2(Contains, std::string(bytes("12 parsecs").status().message()),
                      "engine.kv_cache.max_bytes must be a byte size");
  EXPECT_FALSE(bytes("MiB").ok());
  EXPECT_FALSE(bytes("-5").ok());
  EXPECT_PRED_FORMAT2(Contains, std::string(bytes("0").status().message()),
                      "engine.kv_cache.max_bytes must be > 0, got 0");
  // A fixed pool does not need the memory bound.
  EXPECT_TRUE(Parse(WithModel("engine: {kv_cache: {num_blocks: 64, max_bytes: 0}}\n")).ok());
}

TEST(DaemonConfigTest, ParsesEveryField) {
  absl::StatusOr<DaemonConfig> c = Parse(R"(
model: m
runtime: {device: "cuda:1", dtype: bf16, threads: 3}
engine:
  max_step_tokens: 64
  max_running: 4
  max_queued: 9
  default_adapter: math
  training_share: 0.25
  slo_guard: false
  guard_safety: 1.5
  kv_cache: {block_size: 8, num_blocks: 100, max_bytes: 1MiB}
  slo:
    default: {ttft_ms: 250, tpot_ms: 50}
    classes: {fast: {ttft_ms: 100}}
sampling: {temperature: 0, top_k: 40, top_p: 0.95, min_p: 0.05, repetition_penalty: 1.1,
           seed: 18446744073709551615, max_tokens: 7, stop: ["\n\n", END]}
adapters: {math: adapters/math, code: /abs/code}
training:
  enabled: yes
  data: [a.jsonl, /abs/b.jsonl]
  dataset: {prompt_field: question, completion_field: answer, input_field: "", text_field: t,
            messages_field: msgs, prompt_template: "Q: {prompt}\nA: ", user_prefix: "U: ",
            assistant_prefix: "A: ", system_prefix: "S: ", turn_end: "|", max_length: 64,
            add_bos: false, add_eos: false, held_out_fraction: 0, seed: 5, max_examples: 10}
  lora: {rank: 4, alpha: 8, dropout: 0, use_rslora: true, targets: [o_proj, down_proj]}
  adapter_name: shadow
  init_adapter: adapters/start
  trainer: {lr: 1e-3, schedule: cosine, warmup_steps: 2, total_steps: 10, min_lr_ratio: 0,
            max_grad_norm: 0, micro_batch_size: 2, grad_accum_steps: 3, seed: 4, weight_decay: 0.01}
  publish: {every_steps: 5, quality_gate: true, min_improvement: 0.01}
  checkpoint_dir: ckpt/
  checkpoint_every_steps: 50
  feedback_capacity: 0
server: {address: "0.0.0.0:0", max_message_bytes: 1024}
metrics: {enabled: false, address: "[::1]:0"}
logging: {level: debug, json: true}
shutdown_grace_seconds: 2.5
)",
                                         "/etc/collm");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_dir, "/etc/collm/m");
  EXPECT_EQ(c->runtime.device, "cuda:1");
  EXPECT_EQ(c->runtime.dtype, "bf16");
  EXPECT_EQ(c->runtime.num_threads, 3);
  EXPECT_EQ(c->engine.max_step_tokens, 64);
  EXPECT_EQ(c->engine.max_running, 4);
  EXPECT_EQ(c->engine.max_queued, 9);
  EXPECT_EQ(c->engine.default_adapter, "math");
  EXPECT_EQ(c->engine.training_share, 0.25);
  EXPECT_FALSE(c->engine.slo_guard);
  EXPECT_EQ(c->engine.guard_safety, 1.5);
  EXPECT_EQ(c->engine.kv_cache.block_size, 8);
  EXPECT_EQ(c->engine.kv_cache.num_blocks, 100);
  EXPECT_EQ(c->engine.kv_cache.max_bytes, 1 << 20);
  EXPECT_EQ(c->engine.default_slo.ttft_ms, 250);
  EXPECT_EQ(c->engine.default_slo.tpot_ms, 50);
  EXPECT_EQ(c->engine.slo_classes.at("fast").ttft_ms, 100);
  EXPECT_EQ(c->engine.slo_classes.at("fast").tpot_ms, 0);
  EXPECT_EQ(c->default_sampling.temperature, 0);
  EXPECT_EQ(c->default_sampling.top_k, 40);
  EXPECT_FLOAT_EQ(c->default_sampling.top_p, 0.95f);
  EXPECT_FLOAT_EQ(c->default_sampling.min_p, 0.05f);
  EXPECT_FLOAT_EQ(c->default_sampling.repetition_penalty, 1.1f);
  EXPECT_EQ(c->default_sampling.seed, 18446744073709551615ull);
  EXPECT_EQ(c->default_sampling.max_tokens, 7);
  EXPECT_EQ(c->default_sampling.stop, (std::vector<std::string>{"\n\n", "END"}));
  EXPECT_EQ(c->adapters, (std::map<std::string, std::string>{{"math", "/etc/collm/adapters/math"},
                                                             {"code", "/abs/code"}}));
  const TrainingConfig& t = c->training;
  EXPECT_TRUE(t.enabled);
  EXPECT_EQ(t.data, (std::vector<std::string>{"/etc/collm/a.jsonl", "/abs/b.jsonl"}));
  EXPECT_EQ(t.dataset.format.prompt_field, "question");
  EXPECT_EQ(t.dataset.format.completion_field, "answer");
  EXPECT_EQ(t.dataset.format.input_field, "");
  EXPECT_EQ(t.dataset.format.text_field, "t");
  EXPECT_EQ(t.dataset.format.messages_field, "msgs");
  EXPECT_EQ(t.dataset.format.prompt_template, "Q: {prompt}\nA: ");
  EXPECT_EQ(t.dataset.format.user_prefix, "U: ");
  EXPECT_EQ(t.dataset.format.assistant_prefix, "A: ");
  EXPECT_EQ(t.dataset.format.system_prefix, "S: ");
  EXPECT_EQ(t.dataset.format.turn_end, "|");
  EXPECT_EQ(t.dataset.max_length, 64);
  EXPECT_FALSE(t.dataset.add_bos);
  EXPECT_FALSE(t.dataset.add_eos);
  EXPECT_EQ(t.dataset.held_out_fraction, 0);
  EXPECT_EQ(t.dataset.seed, 5u);
  EXPECT_EQ(t.dataset.max_examples, 10);
  EXPECT_EQ(t.lora.rank, 4);
  EXPECT_EQ(t.lora.alpha, 8);
  EXPECT_EQ(t.lora.dropout, 0);
  EXPECT_TRUE(t.lora.use_rslora);
  EXPECT_EQ(t.lora.targets, (std::vector<runtime::LoraTarget>{runtime::LoraTarget::kO,
                                                              runtime::LoraTarget::kDown}));
  EXPECT_EQ(t.adapter_name, "shadow");
  EXPECT_EQ(t.init_adapter, "/etc/collm/adapters/start");
  EXPECT_EQ(t.trainer.lr, 1e-3);
  EXPECT_EQ(t.trainer.schedule, engine::LrSchedule::kCosine);
  EXPECT_EQ(t.trainer.warmup_steps, 2);
  EXPECT_EQ(t.trainer.total_steps, 10);
  EXPECT_EQ(t.trainer.min_lr_ratio, 0);
  EXPECT_EQ(t.trainer.max_grad_norm, 0);
  EXPECT_EQ(t.trainer.micro_batch_size, 2);
  EXPECT_EQ(t.trainer.grad_accum_steps, 3);
  EXPECT_EQ(t.trainer.seed, 4u);
  EXPECT_EQ(t.trainer.adamw.weight_decay, 0.01);
  EXPECT_EQ(t.publish.every_steps, 5);
  EXPECT_TRUE(t.publish.quality_gate);
  EXPECT_EQ(t.publish.min_improvement, 0.01);
  EXPECT_EQ(t.checkpoint_dir, "/etc/collm/ckpt");
  EXPECT_EQ(t.checkpoint_every_steps, 50);
  EXPECT_EQ(t.feedback_capacity, 0);
  EXPECT_EQ(c->server.address, "0.0.0.0:0");
  EXPECT_EQ(c->server.max_message_bytes, 1024);
  EXPECT_FALSE(c->metrics.enabled);
  EXPECT_EQ(c->metrics.address, "[::1]:0");
  EXPECT_EQ(c->logging.level, "debug");
  EXPECT_TRUE(c->logging.json);
  EXPECT_EQ(c->shutdown_grace_seconds, 2.5);
}

// --- Training without data
// ------------------------------------------------------------------------

TEST(DaemonConfigTest, TrainingWithoutDataIsFeedbackOnly) {
  absl::StatusOr<DaemonConfig> c = Parse(WithModel("training: {enabled: true}\n"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->training.data.empty());
  EXPECT_GT(c->training.feedback_capacity, 0);
  EXPECT_PRED_FORMAT2(Contains,
                      ErrorOf(WithModel("training: {enabled: true, feedback_capacity: 0}\n")),
                      "training.enabled is true but there is nothing to train on");
  // Disabled training is not checked for data.
  EXPECT_TRUE(Parse(WithModel("training: {enabled: false, feedback_capacity: 0}\n")).ok());
}

// --- Environment variables, ~, relative paths
// -----------------------------------------------------

TEST(DaemonConfigTest, ExpandsEnvironmentVariables) {
  ScopedEnv x("COLLM_TEST_X", "abc");
  ScopedEnv empty("COLLM_TEST_EMPTY", "");
  ScopedEnv unset("COLLM_TEST_UNSET", std::nullopt);
  ScopedEnv threads("COLLM_TEST_THREADS", "6");
  absl::StatusOr<DaemonConfig> c = Parse(R"(
model: /m/${COLLM_TEST_X}/${COLLM_TEST_UNSET:-dflt}/${COLLM_TEST_EMPTY:-e}/${COLLM_TEST_X:-no}
runtime:
  threads: ${COLLM_TEST_THREADS:-1}
server:
  address: ${COLLM_TEST_UNSET:-127.0.0.1:7000}
logging:
  level: "${COLLM_TEST_UNSET:-}debug"
sampling:
  stop: ["$${COLLM_TEST_X}", "cost $5"]
)");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_dir, "/m/abc/dflt/e/abc");
  EXPECT_EQ(c->runtime.num_threads, 6);
  EXPECT_EQ(c->server.address, "127.0.0.1:7000");
  EXPECT_EQ(c->logging.level, "debug");
  EXPECT_EQ(c->default_sampling.stop, (std::vector<std::string>{"${COLLM_TEST_X}", "cost $5"}));

  EXPECT_PRED_FORMAT2(Contains, ErrorOf("model: ${COLLM_TEST_UNSET}/m\n"),
                      "model refers to environment variable COLLM_TEST_UNSET, which is not set");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel("server: {address: \"${COLLM_TEST_X\"}\n")),
                      "server.address has an unterminated ${");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel("server: {address: \"${1X}\"}\n")),
                      "server.address has a bad variable reference '${1X}'");
  // Expansion happens before typing: a variable that is not a number is a type error.
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel("runtime: {threads: \"${COLLM_TEST_X}\"}\n")),
                      "runtime.threads must be an integer, got 'abc'");
}

TEST(DaemonConfigTest, ExpandsHomeInPaths) {
  ScopedEnv home("HOME", "/home/tester");
  absl::StatusOr<DaemonConfig> c = Parse(
      "model: ~/models/m\nadapters: {a: ~/ad}\ntraining:\n  data: [~/d.jsonl]\n"
      "  checkpoint_dir: \"~\"\n  dataset: {prompt_template: \"~/{prompt}\"}\n",
      "/etc/collm");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_dir, "/home/tester/models/m");
  EXPECT_EQ(c->adapters.at("a"), "/home/tester/ad");
  EXPECT_EQ(c->training.data[0], "/home/tester/d.jsonl");
  EXPECT_EQ(c->training.checkpoint_dir, "/home/tester");
  // Only paths are paths.
  EXPECT_EQ(c->training.dataset.format.prompt_template, "~/{prompt}");
  // "~user" is not expanded: it is a relative name.
  c = Parse("model: ~other/m\n", "/etc/collm");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_dir, "/etc/collm/~other/m");
}

TEST(DaemonConfigTest, RelativePathsResolveAgainstTheConfigDirectory) {
  absl::StatusOr<DaemonConfig> c = Parse(R"(
model: ../models/m
adapters: {rel: ./a/b/, abs: /x/y}
training:
  data: [data/train.jsonl, /data/other.jsonl]
  init_adapter: adapters/init
  checkpoint_dir: ckpt
)",
                                         "/etc/collm");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_dir, "/etc/models/m");
  EXPECT_EQ(c->adapters.at("rel"), "/etc/collm/a/b");
  EXPECT_EQ(c->adapters.at("abs"), "/x/y");
  EXPECT_EQ(c->training.data,
            (std::vector<std::string>{"/etc/collm/data/train.jsonl", "/data/other.jsonl"}));
  EXPECT_EQ(c->training.init_adapter, "/etc/collm/adapters/init");
  EXPECT_EQ(c->training.checkpoint_dir, "/etc/collm/ckpt");

  // Empty optional paths stay empty (= none), not the config directory.
  c = Parse("model: m\ntraining: {init_adapter: '', checkpoint_dir: ''}\n", "/etc/collm");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->training.init_adapter, "");
  EXPECT_EQ(c->training.checkpoint_dir, "");
  // Without a base directory, relative paths stay relative.
  c = Parse("model: models/m\n", "");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_dir, "models/m");
}

// --- Files
// ----------------------------------------------------------------------------------------

TEST(DaemonConfigTest, FromFileResolvesAgainstTheFilesDirectory) {
  const std::string dir = testing::MakeTempDir("collm-config");
  const std::string path = dir + "/collmd.yaml";
  testing::WriteFileOrDie(path, "model: models/m\ntraining: {data: [../d.jsonl]}\n");
  absl::StatusOr<DaemonConfig> c = DaemonConfig::FromFile(path);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_dir, (fs::path(dir) / "models/m").lexically_normal().string());
  EXPECT_EQ(c->training.data[0], (fs::path(dir).parent_path() / "d.jsonl").string());
}

TEST(DaemonConfigTest, FromFileErrorsNameTheFile) {
  const std::string dir = testing::MakeTempDir("collm-config");
  const std::string path = dir + "/bad.yaml";
  testing::WriteFileOrDie(path, "model: m\nengine:\n  max_running: 0\n");
  absl::StatusOr<DaemonConfig> c = DaemonConfig::FromFile(path);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_PRED_FORMAT2(Contains, std::string(c.status().message()),
                      path + ": engine.max_running must be > 0, got 0");
}

TEST(DaemonConfigTest, SyntaxErrorsGiveLineAndColumn) {
  const std::string dir = testing::MakeTempDir("collm-config");
  const std::string path = dir + "/broken.yaml";
  // Line 3 opens a flow list that is never closed.
  testing::WriteFileOrDie(path, "model: m\nengine:\n  max_running: [1, 2\nserver: {}\n");
  absl::StatusOr<DaemonConfig> c = DaemonConfig::FromFile(path);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string message(c.status().message());
  EXPECT_PRED_FORMAT2(Contains, message, path + ": line ");
  EXPECT_PRED_FORMAT2(FullyMatches, message, ".*: line [0-9]+, column [0-9]+: invalid YAML: .+");

  // A tab used for indentation, on line 2, column 1 (reported 1-based).
  c = DaemonConfig::FromYaml("model: m\n\tengine: {}\n", "");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_PRED_FORMAT2(Contains, std::string(c.status().message()),
                      "line 2, column 1: invalid YAML: ");
}

TEST(DaemonConfigTest, MissingFileIsNotFound) {
  const std::string path = testing::MakeTempDir("collm-config") + "/nope.yaml";
  absl::StatusOr<DaemonConfig> c = DaemonConfig::FromFile(path);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_PRED_FORMAT2(Contains, std::string(c.status().message()), path);
}

// --- federation ---------------------------------------------------------------------------------

const std::string kFederatedConfig = kConfigsDir + "/collmd-federated.yaml";
const char kTrainingOn[] = "model: /m\ntraining:\n  enabled: true\n  data: [d.jsonl]\n";

TEST(DaemonConfigTest, FederationDefaultsAreOffAndDocumented) {
  absl::StatusOr<DaemonConfig> c = Parse("model: /m\n");
  ASSERT_TRUE(c.ok()) << c.status();
  const FederationConfig& f = c->federation;
  EXPECT_FALSE(f.enabled);
  EXPECT_FALSE(f.tls.enabled);
  EXPECT_EQ(f.heartbeat_seconds, 5);
  EXPECT_EQ(f.backoff_initial_seconds, 0.5);
  EXPECT_EQ(f.backoff_max_seconds, 30);
  EXPECT_EQ(f.upload_chunk_bytes, 1 << 20);
  EXPECT_EQ(f.install_global, federation::InstallGlobal::kShadowAndLive);
}

TEST(DaemonConfigTest, ParsesTheFederationSection) {
  const std::string dir = testing::MakeTempDir("collm-fed-config");
  for (const char* f : {"ca.pem", "dev.pem", "dev.key"})
    testing::WriteFileOrDie(dir + "/" + f, "x");
  absl::StatusOr<DaemonConfig> c = DaemonConfig::FromYaml(std::string(kTrainingOn) + R"(
federation:
  enabled: true
  aggregator: agg.lan:50061
  device_id: edge-7.a_b
  tls: {enabled: true, ca: ca.pem, cert: dev.pem, key: dev.key, server_name: aggregator}
  heartbeat_seconds: 2.5
  backoff: {initial_seconds: 0.1, max_seconds: 4}
  rpc_timeout_seconds: 12
  upload_chunk_bytes: 256KiB
  install_global: shadow
  task_training_share: 0.75
)",
                                                          dir);
  ASSERT_TRUE(c.ok()) << c.status();
  const FederationConfig& f = c->federation;
  EXPECT_TRUE(f.enabled);
  EXPECT_EQ(f.aggregator, "agg.lan:50061");
  EXPECT_EQ(f.device_id, "edge-7.a_b");
  EXPECT_TRUE(f.tls.enabled);
  EXPECT_EQ(f.tls.ca, dir + "/ca.pem");
  EXPECT_EQ(f.tls.cert, dir + "/dev.pem");
  EXPECT_EQ(f.tls.key, dir + "/dev.key");
  EXPECT_EQ(f.tls.server_name, "aggregator");
  EXPECT_EQ(f.heartbeat_seconds, 2.5);
  EXPECT_EQ(f.backoff_initial_seconds, 0.1);
  EXPECT_EQ(f.backoff_max_seconds, 4);
  EXPECT_EQ(f.rpc_timeout_seconds, 12);
  EXPECT_EQ(f.upload_chunk_bytes, 256 << 10);
  EXPECT_EQ(f.install_global, federation::InstallGlobal::kShadow);
  EXPECT_EQ(f.task_training_share, 0.75);
}

TEST(DaemonConfigTest, FederationErrorsNameTheKey) {
  const std::string on = std::string(kTrainingOn) + "federation:\n  enabled: true\n";
  const std::string ready = on + "  aggregator: a:1\n  device_id: d1\n";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {on + "  device_id: d1\n", "federation.aggregator must not be empty"},
      {on + "  aggregator: a:1\n", "federation.device_id must not be empty"},
      {ready.substr(0, ready.size() - 3) + "has space\n",
       "federation.device_id must be 1-64 characters of [A-Za-z0-9._-], got 'has space'"},
      {ready + "  heartbeat_seconds: 0\n", "federation.heartbeat_seconds must be > 0, got 0"},
      {ready + "  backoff: {initial_seconds: 2, max_seconds: 1}\n",
       "federation.backoff.max_seconds must be >= federation.backoff.initial_seconds (2), got 1"},
      {ready + "  backoff: {initial_seconds: 0}\n",
       "federation.backoff.initial_seconds must be > 0, got 0"},
      {ready + "  upload_chunk_bytes: 0\n", "federation.upload_chunk_bytes must be in (0, 64MiB]"},
      {ready + "  upload_chunk_bytes: 1GiB\n",
       "federation.upload_chunk_bytes must be in (0, 64MiB]"},
      {ready + "  install_global: live\n",
       "federation.install_global must be one of shadow, shadow_and_live, got 'live'"},
      {ready + "  task_training_share: 0\n", "federation.task_training_share must be in (0, 1]"},
      {ready + "  tls: {enabled: true, cert: /etc/hostname}\n",
       "federation.tls.cert is set but federation.tls.key is not: mutual TLS needs both"},
      {ready + "  tls: {ca: /etc/hostname}\n", "federation.tls.enabled is false but"},
      {ready + "  tls: {enabled: true, ca: /no/such/ca.pem}\n",
       "federation.tls.ca must name a readable file, got '/no/such/ca.pem'"},
      {ready + "  backof: {}\n", "federation.backof: unknown key"},
      {ready + "  tls: {enable: true}\n", "federation.tls.enable: unknown key"},
      {"model: /m\nfederation: {enabled: true, aggregator: a:1, device_id: d}\n",
       "federation.enabled is true but training.enabled is false"},
  };
  for (const auto& [yaml, expected] : cases) {
    EXPECT_PRED_FORMAT2(Contains, ErrorOf(yaml), expected) << yaml;
  }
}

TEST(DaemonConfigTest, ShippedFederatedConfigJoinsAnAggregator) {
  ScopedEnv id("COLLM_DEVICE_ID", "edge-3");
  ScopedEnv agg("COLLM_AGGREGATOR", "10.0.0.5:50061");
  ScopedEnv models("COLLM_MODELS_DIR", "/srv/models");
  ScopedEnv data("COLLM_DATA_DIR", "/srv/data");
  absl::StatusOr<DaemonConfig> c = DaemonConfig::FromFile(kFederatedConfig);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->federation.enabled);
  EXPECT_EQ(c->federation.device_id, "edge-3");
  EXPECT_EQ(c->federation.aggregator, "10.0.0.5:50061");
  EXPECT_FALSE(c->federation.tls.enabled);
  EXPECT_TRUE(c->training.enabled);
  EXPECT_EQ(c->training.publish.every_steps, 0) << "local steps must not go live on their own";
  EXPECT_TRUE(c->training.publish.quality_gate);
  EXPECT_EQ(c->engine.training_share, 0);
}

// --- http: the OpenAI-compatible API -----------------------------------------------------------

TEST(DaemonConfigTest, HttpSectionIsOffByDefaultAndParsesEveryKey) {
  absl::StatusOr<DaemonConfig> plain = Parse("model: /m\n");
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_FALSE(plain->http.enabled);
  EXPECT_EQ(plain->http.address, "127.0.0.1:8000");
  EXPECT_TRUE(plain->http.api_keys.empty());
  ScopedEnv key("COLLM_TEST_API_KEY", "from-env");
  absl::StatusOr<DaemonConfig> c = Parse(R"(model: /m
http:
  enabled: true
  address: 0.0.0.0:0
  api_keys: [k1, "${COLLM_TEST_API_KEY}", "${COLLM_TEST_UNSET_KEY:-}"]
  chat_template: zephyr
  served_model_name: tiny-chat
  threads: 4
  max_body_bytes: 1MiB
)");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->http.enabled);
  EXPECT_EQ(c->http.address, "0.0.0.0:0");
  EXPECT_EQ(c->http.api_keys, (std::vector<std::string>{"k1", "from-env"}));
  EXPECT_EQ(c->http.chat_template, "zephyr");
  EXPECT_EQ(c->http.served_model_name, "tiny-chat");
  EXPECT_EQ(c->http.threads, 4);
  EXPECT_EQ(c->http.max_body_bytes, 1 << 20);
  // What the OpenAI server is started with, in collmd and collm-router alike.
  const serving::OpenAiHttpOptions o = OpenAiHttpOptionsFrom(c->http);
  EXPECT_EQ(o.address, "0.0.0.0:0");
  EXPECT_EQ(o.api_keys, c->http.api_keys);
  EXPECT_EQ(o.threads, 4);
  EXPECT_EQ(o.max_body_bytes, 1 << 20);
}

TEST(DaemonConfigTest, HttpSectionErrorsNameTheKey) {
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel("http:\n  chat_template: vicuna\n")),
                      "http.chat_template");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel("http:\n  chat_template: vicuna\n")),
                      "llama2, llama3, chatml, qwen, mistral, zephyr");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel("http:\n  threads: 0\n")), "http.threads");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel("http:\n  address: ''\n")), "http.address");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel("http:\n  api_keys: 5\n")), "http.api_keys");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf(WithModel("http:\n  enable: true\n")),
                      "http.enable: unknown key");
}

// Issue 10: the phase bound, the head's row chunks and SLO-aware admission.
TEST(DaemonConfigTest, ParsesPhaseBoundHeadChunksAndAdmission) {
  absl::StatusOr<DaemonConfig> d = Parse(WithModel(""));
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->engine.max_phase_ms, 0);
  EXPECT_EQ(d->engine.admission, coordination::AdmissionMode::kNone);
  EXPECT_EQ(d->training.trainer.head_chunk_rows, 128);
  absl::StatusOr<DaemonConfig> c =
      Parse(WithModel("engine: {max_phase_ms: 5, admission: deprioritize}\n"
                      "training: {trainer: {head_chunk_rows: 32}}\n"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->engine.max_phase_ms, 5);
  EXPECT_EQ(c->engine.admission, coordination::AdmissionMode::kDeprioritize);
  EXPECT_EQ(c->training.trainer.head_chunk_rows, 32);
  c = Parse(WithModel("engine: {admission: reject}\n"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->engine.admission, coordination::AdmissionMode::kReject);
}

}  // namespace
}  // namespace collm::config
