#include "collm/config/daemon_config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "collm/common/status.h"
#include "collm/config/shared_sections.h"
#include "collm/config/yaml_reader.h"
#include "collm/runtime/lora_weights.h"

namespace collm::config {
namespace {

namespace fs = std::filesystem;

absl::Status CheckPositive(const std::string& path, int64_t value) {
  if (value > 0) return absl::OkStatus();
  return InvalidValue(path, absl::StrCat("must be > 0, got ", value));
}

absl::Status CheckNonNegative(const std::string& path, double value) {
  if (value >= 0) return absl::OkStatus();
  return InvalidValue(path, absl::StrCat("must be >= 0, got ", value));
}

absl::Status CheckNonEmpty(const std::string& path, const std::string& value) {
  if (!value.empty()) return absl::OkStatus();
  return InvalidValue(path, "must not be empty");
}

absl::Status ParseRuntime(const Section& root, runtime::RuntimeOptions& out) {
  COLLM_ASSIGN_OR_RETURN(Section s, root.Sub("runtime", {"device", "dtype", "threads", "weights"}));
  COLLM_RETURN_IF_ERROR(s.String("device", &out.device));
  COLLM_RETURN_IF_ERROR(s.String("dtype", &out.dtype));
  COLLM_RETURN_IF_ERROR(s.Int("threads", &out.num_threads));
  COLLM_RETURN_IF_ERROR(s.String("weights", &out.weights));
  // The device is checked against this build of libtorch at startup (ResolveRuntime); here only
  // its spelling.
  const std::string& d = out.device;
  bool device_ok = d == "cpu" || d == "cuda";
  if (absl::StartsWith(d, "cuda:")) {
    int index = 0;
    device_ok = absl::SimpleAtoi(d.substr(5), &index) && index >= 0;
  }
  if (!device_ok) {
    return InvalidValue(s.PathOf("device"),
                        absl::StrCat("must be cpu, cuda or cuda:N, got '", d, "'"));
  }
  const std::string& t = out.dtype;
  if (t != "auto" && t != "f32" && t != "bf16" && t != "f16") {
    return InvalidValue(s.PathOf("dtype"),
                        absl::StrCat("must be auto, f32, bf16 or f16, got '", t, "'"));
  }
  const std::string& w = out.weights;
  if (w != "f32" && w != "int8" && w != "int4") {
    return InvalidValue(s.PathOf("weights"),
                        absl::StrCat("must be f32, int8 or int4, got '", w, "'"));
  }
  if (w != "f32" && (d != "cpu" || (t != "auto" && t != "f32"))) {
    return InvalidValue(s.PathOf("weights"),
                        absl::StrCat(w,
                                     " needs device cpu and dtype auto or f32 (the quantized "
                                     "kernels are CPU-only; CUDA keeps bf16)"));
  }
  if (out.num_threads < 0) {
    return InvalidValue(s.PathOf("threads"), absl::StrCat("must be >= 0, got ", out.num_threads));
  }
  return absl::OkStatus();
}

absl::Status ParseSlo(const Section& parent, const std::string& key, engine::SloTarget& out) {
  COLLM_ASSIGN_OR_RETURN(Section s, parent.Sub(key, {"ttft_ms", "tpot_ms"}));
  COLLM_RETURN_IF_ERROR(s.Double("ttft_ms", &out.ttft_ms));
  COLLM_RETURN_IF_ERROR(s.Double("tpot_ms", &out.tpot_ms));
  COLLM_RETURN_IF_ERROR(CheckNonNegative(s.PathOf("ttft_ms"), out.ttft_ms));
  return CheckNonNegative(s.PathOf("tpot_ms"), out.tpot_ms);
}

absl::Status ParseEngine(const Section& root, engine::EngineOptions& out) {
  COLLM_ASSIGN_OR_RETURN(
      Section s,
      root.Sub("engine", {"max_step_tokens", "max_running", "max_queued", "kv_cache",
                          "default_adapter", "slo", "training_share", "slo_guard", "guard_safety",
                          "guard_idle_risk", "max_phase_ms", "admission", "share_controller"}));
  COLLM_RETURN_IF_ERROR(s.Int("max_step_tokens", &out.max_step_tokens));
  COLLM_RETURN_IF_ERROR(s.Int("max_running", &out.max_running));
  COLLM_RETURN_IF_ERROR(s.Int("max_queued", &out.max_queued));
  COLLM_RETURN_IF_ERROR(s.String("default_adapter", &out.default_adapter));
  COLLM_RETURN_IF_ERROR(s.Double("training_share", &out.training_share));
  COLLM_RETURN_IF_ERROR(s.Bool("slo_guard", &out.slo_guard));
  COLLM_RETURN_IF_ERROR(s.Double("guard_safety", &out.guard_safety));
  COLLM_RETURN_IF_ERROR(s.Double("guard_idle_risk", &out.guard_idle_risk));
  COLLM_RETURN_IF_ERROR(s.Double("max_phase_ms", &out.max_phase_ms));
  COLLM_RETURN_IF_ERROR(s.Enum("admission",
                               {{"none", coordination::AdmissionMode::kNone},
                                {"reject", coordination::AdmissionMode::kReject},
                                {"deprioritize", coordination::AdmissionMode::kDeprioritize}},
                               &out.admission));
  COLLM_RETURN_IF_ERROR(CheckPositive(s.PathOf("max_step_tokens"), out.max_step_tokens));
  COLLM_RETURN_IF_ERROR(CheckPositive(s.PathOf("max_running"), out.max_running));
  COLLM_RETURN_IF_ERROR(CheckPositive(s.PathOf("max_queued"), out.max_queued));
  if (!(out.training_share >= 0 && out.training_share <= 1)) {
    return InvalidValue(s.PathOf("training_share"),
                        absl::StrCat("must be in [0, 1], got ", out.training_share));
  }
  if (!(out.guard_safety >= 1)) {
    return InvalidValue(s.PathOf("guard_safety"),
                        absl::StrCat("must be >= 1, got ", out.guard_safety));
  }
  if (!(out.guard_idle_risk >= 0 && out.guard_idle_risk <= 1)) {
    return InvalidValue(s.PathOf("guard_idle_risk"),
                        absl::StrCat("must be in [0, 1], got ", out.guard_idle_risk));
  }
  if (!(out.max_phase_ms >= 0) || !std::isfinite(out.max_phase_ms)) {
    return InvalidValue(s.PathOf("max_phase_ms"),
                        absl::StrCat("must be a finite number >= 0, got ", out.max_phase_ms));
  }

  COLLM_ASSIGN_OR_RETURN(
      Section sc,
      s.Sub("share_controller", {"enabled", "surge_factor", "surge_min_rps", "surge_hold_ms",
                                 "headroom_full", "headroom_zero", "recover_seconds"}));
  coordination::ShareControllerOptions& share = out.share_controller;
  // Off unless the config asks (configs/collmd.yaml says why): during a task a surge is judged
  // against the forecast at the task's start, so steady load that began just before a task would
  // stop its training for the whole task.
  share.enabled = false;
  COLLM_RETURN_IF_ERROR(sc.Bool("enabled", &share.enabled));
  COLLM_RETURN_IF_ERROR(sc.Double("surge_factor", &share.surge_factor));
  COLLM_RETURN_IF_ERROR(sc.Double("surge_min_rps", &share.surge_min_rps));
  COLLM_RETURN_IF_ERROR(sc.Double("surge_hold_ms", &share.surge_hold_ms));
  COLLM_RETURN_IF_ERROR(sc.Double("headroom_full", &share.headroom_full));
  COLLM_RETURN_IF_ERROR(sc.Double("headroom_zero", &share.headroom_zero));
  COLLM_RETURN_IF_ERROR(sc.Double("recover_seconds", &share.recover_seconds));
  COLLM_RETURN_IF_ERROR(coordination::ValidateShareControllerOptions(share));

  COLLM_ASSIGN_OR_RETURN(Section kv, s.Sub("kv_cache", {"block_size", "num_blocks", "max_bytes"}));
  runtime::KvCacheOptions& cache = out.kv_cache;
  COLLM_RETURN_IF_ERROR(kv.Int("block_size", &cache.block_size));
  COLLM_RETURN_IF_ERROR(kv.Int("num_blocks", &cache.num_blocks));
  COLLM_RETURN_IF_ERROR(kv.Bytes("max_bytes", &cache.max_bytes));
  COLLM_RETURN_IF_ERROR(CheckPositive(kv.PathOf("block_size"), cache.block_size));
  if (cache.num_blocks < 0) {
    return InvalidValue(kv.PathOf("num_blocks"),
                        absl::StrCat("must be >= 0, got ", cache.num_blocks));
  }
  if (cache.num_blocks > std::numeric_limits<int32_t>::max()) {
    return InvalidValue(kv.PathOf("num_blocks"),
                        absl::StrCat("is too large, got ", cache.num_blocks));
  }
  if (cache.num_blocks == 0)
    COLLM_RETURN_IF_ERROR(CheckPositive(kv.PathOf("max_bytes"), cache.max_bytes));

  COLLM_ASSIGN_OR_RETURN(Section slo, s.Sub("slo", {"default", "classes"}));
  COLLM_RETURN_IF_ERROR(ParseSlo(slo, "default", out.default_slo));
  COLLM_ASSIGN_OR_RETURN(Section classes, slo.Sub("classes", {}));
  out.slo_classes.clear();
  for (const auto& [name, node] : classes.Entries()) {
    COLLM_RETURN_IF_ERROR(CheckNonEmpty(classes.path() + " class name", name));
    COLLM_RETURN_IF_ERROR(ParseSlo(classes, name, out.slo_classes[name]));
  }
  return absl::OkStatus();
}

absl::Status ParseSampling(const Section& root, runtime::SamplingParams& out) {
  COLLM_ASSIGN_OR_RETURN(
      Section s, root.Sub("sampling", {"temperature", "top_k", "top_p", "min_p",
                                       "repetition_penalty", "seed", "max_tokens", "stop"}));
  COLLM_RETURN_IF_ERROR(s.Float("temperature", &out.temperature));
  COLLM_RETURN_IF_ERROR(s.Int("top_k", &out.top_k));
  COLLM_RETURN_IF_ERROR(s.Float("top_p", &out.top_p));
  COLLM_RETURN_IF_ERROR(s.Float("min_p", &out.min_p));
  COLLM_RETURN_IF_ERROR(s.Float("repetition_penalty", &out.repetition_penalty));
  COLLM_RETURN_IF_ERROR(s.Uint("seed", &out.seed));
  COLLM_RETURN_IF_ERROR(s.Int("max_tokens", &out.max_tokens));
  COLLM_RETURN_IF_ERROR(s.StringList("stop", &out.stop));
  for (size_t i = 0; i < out.stop.size(); ++i) {
    COLLM_RETURN_IF_ERROR(CheckNonEmpty(absl::StrCat(s.PathOf("stop"), "[", i, "]"), out.stop[i]));
  }
  return Prefixed(out.Validate(), "", "sampling");
}

absl::Status ParseAdapters(const Section& root, std::map<std::string, std::string>& out) {
  COLLM_ASSIGN_OR_RETURN(Section s, root.Sub("adapters", {}));
  out.clear();
  for (const auto& [name, node] : s.Entries()) {
    COLLM_RETURN_IF_ERROR(CheckNonEmpty("adapters: an adapter name", name));
    std::string dir;
    COLLM_RETURN_IF_ERROR(s.Path(name, &dir));
    COLLM_RETURN_IF_ERROR(CheckNonEmpty(s.PathOf(name), dir));
    out[name] = dir;
  }
  return absl::OkStatus();
}

absl::Status ParseDataset(const Section& training, engine::DatasetOptions& out) {
  COLLM_ASSIGN_OR_RETURN(
      Section s,
      training.Sub("dataset", {"prompt_field", "completion_field", "input_field", "text_field",
                               "messages_field", "prompt_template", "user_prefix",
                               "assistant_prefix", "system_prefix", "turn_end", "max_length",
                               "add_bos", "add_eos", "held_out_fraction", "seed", "max_examples"}));
  engine::DatasetFormat& f = out.format;
  COLLM_RETURN_IF_ERROR(s.String("prompt_field", &f.prompt_field));
  COLLM_RETURN_IF_ERROR(s.String("completion_field", &f.completion_field));
  COLLM_RETURN_IF_ERROR(s.String("input_field", &f.input_field));
  COLLM_RETURN_IF_ERROR(s.String("text_field", &f.text_field));
  COLLM_RETURN_IF_ERROR(s.String("messages_field", &f.messages_field));
  COLLM_RETURN_IF_ERROR(s.String("prompt_template", &f.prompt_template));
  COLLM_RETURN_IF_ERROR(s.String("user_prefix", &f.user_prefix));
  COLLM_RETURN_IF_ERROR(s.String("assistant_prefix", &f.assistant_prefix));
  COLLM_RETURN_IF_ERROR(s.String("system_prefix", &f.system_prefix));
  COLLM_RETURN_IF_ERROR(s.String("turn_end", &f.turn_end));
  COLLM_RETURN_IF_ERROR(s.Int("max_length", &out.max_length));
  COLLM_RETURN_IF_ERROR(s.Bool("add_bos", &out.add_bos));
  COLLM_RETURN_IF_ERROR(s.Bool("add_eos", &out.add_eos));
  COLLM_RETURN_IF_ERROR(s.Double("held_out_fraction", &out.held_out_fraction));
  COLLM_RETURN_IF_ERROR(s.Uint("seed", &out.seed));
  COLLM_RETURN_IF_ERROR(s.Int("max_examples", &out.max_examples));
  // The same rules as the dataset loader's, reported at load time instead of at first use.
  if (!absl::StrContains(f.prompt_template, "{prompt}")) {
    return InvalidValue(s.PathOf("prompt_template"),
                        absl::StrCat("must contain {prompt}, got '", f.prompt_template, "'"));
  }
  if (out.max_length < 2) {
    return InvalidValue(s.PathOf("max_length"), absl::StrCat("must be >= 2, got ", out.max_length));
  }
  if (!(out.held_out_fraction >= 0 && out.held_out_fraction < 1)) {
    return InvalidValue(s.PathOf("held_out_fraction"),
                        absl::StrCat("must be in [0, 1), got ", out.held_out_fraction));
  }
  if (out.max_examples < 0) {
    return InvalidValue(s.PathOf("max_examples"),
                        absl::StrCat("must be >= 0, got ", out.max_examples));
  }
  return absl::OkStatus();
}

absl::Status ParseTrainer(const Section& training, engine::TrainerOptions& out) {
  COLLM_ASSIGN_OR_RETURN(
      Section s,
      training.Sub("trainer", {"lr", "schedule", "warmup_steps", "total_steps", "min_lr_ratio",
                               "max_grad_norm", "micro_batch_size", "grad_accum_steps", "seed",
                               "weight_decay", "head_chunk_rows"}));
  COLLM_RETURN_IF_ERROR(s.Double("lr", &out.lr));
  COLLM_RETURN_IF_ERROR(
      s.Enum("schedule",
             {{"constant", engine::LrSchedule::kConstant}, {"cosine", engine::LrSchedule::kCosine}},
             &out.schedule));
  COLLM_RETURN_IF_ERROR(s.Int("warmup_steps", &out.warmup_steps));
  COLLM_RETURN_IF_ERROR(s.Int("total_steps", &out.total_steps));
  COLLM_RETURN_IF_ERROR(s.Double("min_lr_ratio", &out.min_lr_ratio));
  COLLM_RETURN_IF_ERROR(s.Double("max_grad_norm", &out.max_grad_norm));
  COLLM_RETURN_IF_ERROR(s.Int("micro_batch_size", &out.micro_batch_size));
  COLLM_RETURN_IF_ERROR(s.Int("grad_accum_steps", &out.grad_accum_steps));
  COLLM_RETURN_IF_ERROR(s.Uint("seed", &out.seed));
  COLLM_RETURN_IF_ERROR(s.Double("weight_decay", &out.adamw.weight_decay));
  COLLM_RETURN_IF_ERROR(s.Int("head_chunk_rows", &out.head_chunk_rows));
  // Checked here because Validate() would name it by its struct path (adamw.weight_decay).
  COLLM_RETURN_IF_ERROR(CheckNonNegative(s.PathOf("weight_decay"), out.adamw.weight_decay));
  if (out.total_steps < 0) {
    return InvalidValue(s.PathOf("total_steps"),
                        absl::StrCat("must be >= 0, got ", out.total_steps));
  }
  return Prefixed(out.Validate(), "training.", s.path());
}

absl::Status ParsePublish(const Section& training, engine::PublishOptions& out) {
  COLLM_ASSIGN_OR_RETURN(
      Section s, training.Sub("publish", {"every_steps", "quality_gate", "min_improvement"}));
  COLLM_RETURN_IF_ERROR(s.Int("every_steps", &out.every_steps));
  COLLM_RETURN_IF_ERROR(s.Bool("quality_gate", &out.quality_gate));
  COLLM_RETURN_IF_ERROR(s.Double("min_improvement", &out.min_improvement));
  if (out.every_steps < 0) {
    return InvalidValue(s.PathOf("every_steps"),
                        absl::StrCat("must be >= 0, got ", out.every_steps));
  }
  return CheckNonNegative(s.PathOf("min_improvement"), out.min_improvement);
}

absl::Status ParseTraining(const Section& root, TrainingConfig& out) {
  COLLM_ASSIGN_OR_RETURN(
      Section s, root.Sub("training", {"enabled", "data", "dataset", "lora", "adapter_name",
                                       "init_adapter", "trainer", "publish", "checkpoint_dir",
                                       "checkpoint_every_steps", "feedback_capacity"}));
  COLLM_RETURN_IF_ERROR(s.Bool("enabled", &out.enabled));
  COLLM_RETURN_IF_ERROR(s.StringList("data", &out.data, /*paths=*/true));
  for (size_t i = 0; i < out.data.size(); ++i) {
    COLLM_RETURN_IF_ERROR(CheckNonEmpty(absl::StrCat(s.PathOf("data"), "[", i, "]"), out.data[i]));
  }
  COLLM_RETURN_IF_ERROR(ParseDataset(s, out.dataset));
  COLLM_RETURN_IF_ERROR(ParseLora(s, out.lora));
  COLLM_RETURN_IF_ERROR(s.String("adapter_name", &out.adapter_name));
  COLLM_RETURN_IF_ERROR(CheckNonEmpty(s.PathOf("adapter_name"), out.adapter_name));
  COLLM_RETURN_IF_ERROR(s.Path("init_adapter", &out.init_adapter));
  COLLM_RETURN_IF_ERROR(ParseTrainer(s, out.trainer));
  COLLM_RETURN_IF_ERROR(ParsePublish(s, out.publish));
  COLLM_RETURN_IF_ERROR(s.Path("checkpoint_dir", &out.checkpoint_dir));
  COLLM_RETURN_IF_ERROR(s.Int("checkpoint_every_steps", &out.checkpoint_every_steps));
  COLLM_RETURN_IF_ERROR(s.Int("feedback_capacity", &out.feedback_capacity));
  if (out.checkpoint_every_steps < 0) {
    return InvalidValue(s.PathOf("checkpoint_every_steps"),
                        absl::StrCat("must be >= 0, got ", out.checkpoint_every_steps));
  }
  if (out.feedback_capacity < 0) {
    return InvalidValue(s.PathOf("feedback_capacity"),
                        absl::StrCat("must be >= 0, got ", out.feedback_capacity));
  }
  // Empty data is feedback-only training (examples arrive through SubmitFeedback), which needs
  // somewhere to buffer them.
  if (out.enabled && out.data.empty() && out.feedback_capacity == 0) {
    return InvalidValue(
        s.PathOf("enabled"),
        "is true but there is nothing to train on: training.data is empty (feedback-only) "
        "and training.feedback_capacity is 0");
  }
  return absl::OkStatus();
}

absl::Status CheckFileExists(const std::string& path, const std::string& file) {
  std::error_code ec;
  if (file.empty() || fs::is_regular_file(file, ec)) return absl::OkStatus();
  return InvalidValue(path, absl::StrCat("must name a readable file, got '", file, "'"));
}

absl::Status ParseFederation(const Section& root, const TrainingConfig& training,
                             FederationConfig& out) {
  COLLM_ASSIGN_OR_RETURN(
      Section s,
      root.Sub("federation", {"enabled", "aggregator", "device_id", "tls", "heartbeat_seconds",
                              "backoff", "rpc_timeout_seconds", "upload_chunk_bytes",
                              "install_global", "task_training_share", "follow_aggregator_share"}));
  COLLM_RETURN_IF_ERROR(s.Bool("enabled", &out.enabled));
  COLLM_RETURN_IF_ERROR(s.String("aggregator", &out.aggregator));
  COLLM_RETURN_IF_ERROR(s.String("device_id", &out.device_id));
  COLLM_ASSIGN_OR_RETURN(Section tls,
                         s.Sub("tls", {"enabled", "ca", "cert", "key", "server_name"}));
  COLLM_RETURN_IF_ERROR(tls.Bool("enabled", &out.tls.enabled));
  COLLM_RETURN_IF_ERROR(tls.Path("ca", &out.tls.ca));
  COLLM_RETURN_IF_ERROR(tls.Path("cert", &out.tls.cert));
  COLLM_RETURN_IF_ERROR(tls.Path("key", &out.tls.key));
  COLLM_RETURN_IF_ERROR(tls.String("server_name", &out.tls.server_name));
  COLLM_RETURN_IF_ERROR(s.Double("heartbeat_seconds", &out.heartbeat_seconds));
  COLLM_ASSIGN_OR_RETURN(Section backoff, s.Sub("backoff", {"initial_seconds", "max_seconds"}));
  COLLM_RETURN_IF_ERROR(backoff.Double("initial_seconds", &out.backoff_initial_seconds));
  COLLM_RETURN_IF_ERROR(backoff.Double("max_seconds", &out.backoff_max_seconds));
  COLLM_RETURN_IF_ERROR(s.Double("rpc_timeout_seconds", &out.rpc_timeout_seconds));
  COLLM_RETURN_IF_ERROR(s.Bytes("upload_chunk_bytes", &out.upload_chunk_bytes));
  COLLM_RETURN_IF_ERROR(s.Enum("install_global",
                               {{"shadow", federation::InstallGlobal::kShadow},
                                {"shadow_and_live", federation::InstallGlobal::kShadowAndLive}},
                               &out.install_global));
  COLLM_RETURN_IF_ERROR(s.Double("task_training_share", &out.task_training_share));
  COLLM_RETURN_IF_ERROR(s.Bool("follow_aggregator_share", &out.follow_aggregator_share));

  auto positive = [&](const Section& sec, const std::string& key, double v) {
    return v > 0 ? absl::OkStatus()
                 : InvalidValue(sec.PathOf(key), absl::StrCat("must be > 0, got ", v));
  };
  COLLM_RETURN_IF_ERROR(positive(s, "heartbeat_seconds", out.heartbeat_seconds));
  COLLM_RETURN_IF_ERROR(positive(backoff, "initial_seconds", out.backoff_initial_seconds));
  if (!(out.backoff_max_seconds >= out.backoff_initial_seconds)) {
    return InvalidValue(
        backoff.PathOf("max_seconds"),
        absl::StrCat("must be >= ", backoff.PathOf("initial_seconds"), " (",
                     out.backoff_initial_seconds, "), got ", out.backoff_max_seconds));
  }
  COLLM_RETURN_IF_ERROR(positive(s, "rpc_timeout_seconds", out.rpc_timeout_seconds));
  if (out.upload_chunk_bytes <= 0 || out.upload_chunk_bytes > (int64_t{64} << 20)) {
    return InvalidValue(s.PathOf("upload_chunk_bytes"),
                        absl::StrCat("must be in (0, 64MiB], got ", out.upload_chunk_bytes));
  }
  if (!(out.task_training_share > 0 && out.task_training_share <= 1)) {
    return InvalidValue(s.PathOf("task_training_share"),
                        absl::StrCat("must be in (0, 1], got ", out.task_training_share));
  }
  if (out.tls.cert.empty() != out.tls.key.empty()) {
    const bool no_cert = out.tls.cert.empty();
    return InvalidValue(tls.PathOf(no_cert ? "key" : "cert"),
                        absl::StrCat("is set but ", tls.PathOf(no_cert ? "cert" : "key"),
                                     " is not: mutual TLS needs both"));
  }
  if (!out.tls.enabled && (!out.tls.ca.empty() || !out.tls.cert.empty())) {
    return InvalidValue(tls.PathOf("enabled"),
                        "is false but tls.ca/tls.cert are set: set enabled: true to use them");
  }
  COLLM_RETURN_IF_ERROR(CheckFileExists(tls.PathOf("ca"), out.tls.ca));
  COLLM_RETURN_IF_ERROR(CheckFileExists(tls.PathOf("cert"), out.tls.cert));
  COLLM_RETURN_IF_ERROR(CheckFileExists(tls.PathOf("key"), out.tls.key));
  if (!out.enabled) return absl::OkStatus();
  COLLM_RETURN_IF_ERROR(CheckNonEmpty(s.PathOf("aggregator"), out.aggregator));
  COLLM_RETURN_IF_ERROR(CheckNonEmpty(s.PathOf("device_id"), out.device_id));
  const bool id_ok = out.device_id.size() <= 64 &&
                     std::all_of(out.device_id.begin(), out.device_id.end(), [](char c) {
                       return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' ||
                              c == '_' || c == '-';
                     });
  if (!id_ok) {
    return InvalidValue(
        s.PathOf("device_id"),
        absl::StrCat("must be 1-64 characters of [A-Za-z0-9._-], got '", out.device_id, "'"));
  }
  if (!training.enabled) {
    return InvalidValue(
        s.PathOf("enabled"),
        "is true but training.enabled is false: federation trains the shadow adapter");
  }
  return absl::OkStatus();
}

absl::Status ParseServer(const Section& root, ServerConfig& out) {
  COLLM_ASSIGN_OR_RETURN(
      Section s, root.Sub("server", {"address", "max_message_bytes", "adapter_roots", "admin_token",
                                     "admin_token_file"}));
  COLLM_RETURN_IF_ERROR(s.String("address", &out.address));
  COLLM_RETURN_IF_ERROR(s.Bytes("max_message_bytes", &out.max_message_bytes));
  COLLM_RETURN_IF_ERROR(s.StringList("adapter_roots", &out.adapter_roots, /*paths=*/true));
  for (size_t i = 0; i < out.adapter_roots.size(); ++i) {
    COLLM_RETURN_IF_ERROR(
        CheckNonEmpty(absl::StrCat(s.PathOf("adapter_roots"), "[", i, "]"), out.adapter_roots[i]));
  }
  COLLM_RETURN_IF_ERROR(s.String("admin_token", &out.admin_token));
  COLLM_RETURN_IF_ERROR(s.Path("admin_token_file", &out.admin_token_file));
  if (!out.admin_token.empty() && !out.admin_token_file.empty()) {
    return InvalidValue(s.PathOf("admin_token_file"), "and server.admin_token are exclusive");
  }
  COLLM_RETURN_IF_ERROR(CheckNonEmpty(s.PathOf("address"), out.address));
  COLLM_RETURN_IF_ERROR(CheckPositive(s.PathOf("max_message_bytes"), out.max_message_bytes));
  if (out.max_message_bytes > std::numeric_limits<int32_t>::max()) {
    // gRPC takes message limits as int.
    return InvalidValue(s.PathOf("max_message_bytes"),
                        absl::StrCat("must be < 2GiB, got ", out.max_message_bytes));
  }
  return absl::OkStatus();
}

absl::Status ParseMetrics(const Section& root, MetricsConfig& out) {
  COLLM_ASSIGN_OR_RETURN(Section s, root.Sub("metrics", {"enabled", "address"}));
  COLLM_RETURN_IF_ERROR(s.Bool("enabled", &out.enabled));
  COLLM_RETURN_IF_ERROR(s.String("address", &out.address));
  return CheckNonEmpty(s.PathOf("address"), out.address);
}

absl::StatusOr<DaemonConfig> Parse(const YAML::Node& doc, const std::string& base_dir) {
  COLLM_ASSIGN_OR_RETURN(
      Section root,
      Section::Open(doc, "",
                    {"model", "runtime", "engine", "sampling", "adapters", "training", "federation",
                     "server", "metrics", "logging", "shutdown_grace_seconds", "http"},
                    base_dir));
  DaemonConfig config;
  if (!root.Has("model"))
    return absl::InvalidArgumentError("model is required (a model directory)");
  COLLM_RETURN_IF_ERROR(root.Path("model", &config.model_dir));
  COLLM_RETURN_IF_ERROR(CheckNonEmpty("model", config.model_dir));
  COLLM_RETURN_IF_ERROR(ParseRuntime(root, config.runtime));
  COLLM_RETURN_IF_ERROR(ParseEngine(root, config.engine));
  COLLM_RETURN_IF_ERROR(ParseSampling(root, config.default_sampling));
  COLLM_RETURN_IF_ERROR(ParseAdapters(root, config.adapters));
  COLLM_RETURN_IF_ERROR(ParseTraining(root, config.training));
  COLLM_RETURN_IF_ERROR(ParseFederation(root, config.training, config.federation));
  COLLM_RETURN_IF_ERROR(ParseServer(root, config.server));
  COLLM_RETURN_IF_ERROR(ParseMetrics(root, config.metrics));
  COLLM_RETURN_IF_ERROR(ParseHttp(root, config.http));
  COLLM_RETURN_IF_ERROR(ParseLogging(root, config.logging));
  COLLM_RETURN_IF_ERROR(root.Double("shutdown_grace_seconds", &config.shutdown_grace_seconds));
  COLLM_RETURN_IF_ERROR(CheckNonNegative("shutdown_grace_seconds", config.shutdown_grace_seconds));
  return config;
}

absl::StatusOr<DaemonConfig> ParseText(const std::string& yaml, const std::string& base_dir) {
  COLLM_ASSIGN_OR_RETURN(YAML::Node doc, LoadYaml(yaml));
  try {
    return Parse(doc, base_dir);
  } catch (const YAML::Exception& e) {
    // Reading a well-formed tree should not throw; report rather than crash if it does.
    return absl::InvalidArgumentError(absl::StrCat("could not read YAML: ", e.what()));
  }
}

}  // namespace

absl::StatusOr<DaemonConfig> DaemonConfig::FromYaml(const std::string& yaml,
                                                    const std::string& base_dir) {
  return ParseText(yaml, base_dir);
}

absl::StatusOr<DaemonConfig> DaemonConfig::FromFile(const std::string& path) {
  COLLM_ASSIGN_OR_RETURN(ConfigFileText file, ReadConfigFile(path));
  absl::StatusOr<DaemonConfig> config = ParseText(file.text, file.base_dir);
  if (!config.ok()) return Annotate(config.status(), path);
  return config;
}

}  // namespace collm::config
