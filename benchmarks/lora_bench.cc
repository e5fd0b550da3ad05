// collm_lora_bench: a scenario benchmark of LoRA on the Llama decoder, in the manner of LevelDB's
// db_bench. For each model shape (an HF config.json in the shapes directory) it builds random
// weights in memory and measures, each next to a baseline measured in the same run:
//   1. the decode-step overhead of unmerged LoRA adapters (ranks 8/16/64, all seven projections)
//      over the base model, at batch 1 and 16;
//   2. a batch of 16 mixing 4 adapters (contiguous groups and interleaved) over one adapter;
//   3. PEFT training throughput (PeftTrainer::MicroStep) over inference-only prefill of the same
//      sequences, and the resident memory training adds over inference;
//   4. AdapterRegistry::Publish latency, and a decode step that runs while another thread
//      publishes over one that does not.
// `--json PATH` writes the same numbers as JSON. See benchmarks/README.md.
//
// Each model runs in a fresh child process (this binary re-executed with the hidden
// `--one-model NAME`) so that its peak RSS is its own.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "bench_util.h"
#include "collm/engine/dataset.h"
#include "collm/engine/peft_trainer.h"
#include "collm/lora/adapter_registry.h"
#include "collm/lora/lora_adapter.h"
#include "collm/lora/lora_config.h"
#include "collm/lora/shadow_adapter.h"
#include "collm/runtime/device.h"
#include "collm/runtime/kv_cache.h"
#include "collm/runtime/llama_model.h"
#include "collm/runtime/lora_weights.h"
#include "collm/runtime/model_config.h"
#include "nlohmann/json.hpp"

namespace collm::bench {
namespace {

using runtime::KvCache;
using runtime::LlamaModel;
using runtime::LoraTarget;
using runtime::LoraWeights;
using runtime::ModelConfig;
using runtime::SequenceKv;
using runtime::StepBatch;

// The shared driver flags (DriverFlags) plus this benchmark's scenarios.
struct BenchFlags : DriverFlags {
  std::string ranks = "8,16,64";  // Adapter ranks for the decode-overhead scenario.
  std::string batches = "1,16";   // Decode batch sizes for the decode-overhead scenario.
  int64_t context = 64;           // Cached positions per sequence before each decode step.
  int64_t train_length = 128;     // Tokens per synthetic training example (second half targets).
  int64_t micro_batch = 4;        // Examples per PEFT micro-batch.
  int64_t train_steps = 4;        // Untimed PEFT steps before the memory reading.
};

const std::vector<LoraTarget> kAllTargets = {LoraTarget::kQ,   LoraTarget::kK,    LoraTarget::kV,
                                             LoraTarget::kO,   LoraTarget::kGate, LoraTarget::kUp,
                                             LoraTarget::kDown};
const std::vector<LoraTarget> kAttentionTargets = {LoraTarget::kQ, LoraTarget::kK, LoraTarget::kV,
                                                   LoraTarget::kO};

constexpr int64_t kBlock = 16;
constexpr int64_t kPrefillChunk = 512;
constexpr int kMixRank = 16;
constexpr int64_t kMixBatch = 16;
constexpr int kMixAdapters = 4;
constexpr int kTrainRank = 16;
constexpr int kPublishRank = 16;
constexpr int64_t kPublishBatch = 16;

std::string Ratio(double v) { return Fmt("%.3f", v); }

// A verdict cell: "ok", "MISS", or "" without a target.
std::string Verdict(bool has_target, bool met) { return has_target ? (met ? "ok" : "MISS") : ""; }

// B sequences, each with `context` cached positions; Reset() truncates them back after a step.
struct DecodeFixture {
  std::unique_ptr<KvCache> cache;
  std::vector<SequenceKv> seqs;
  int64_t context = 0;
  void Reset() {
    for (SequenceKv& kv : seqs) cache->Truncate(kv, context);
  }
};

class ModelBench {
 public:
  ModelBench(const BenchFlags& flags, const std::string& name)
      : flags_(flags), name_(name), rng_(1234) {}

  json Run();

 private:
  std::vector<int32_t> Tokens(int64_t n) {
    std::uniform_int_distribution<int32_t> dist(3, static_cast<int32_t>(config_.vocab_size - 1));
    std::vector<int32_t> t(n);
    for (auto& x : t) x = dist(rng_);
    return t;
  }
  int64_t Context() const { return std::min(flags_.context, config_.max_position_embeddings - 1); }
  // `batch` sequences with Context() cached positions each (prefilled by the base model).
  DecodeFixture MakeFixture(int64_t batch);
  // One decode step: one new token for each sequence; adapters[i] (null = base) for sequence i,
  // or the base model for all when `adapters` is empty.
  void DecodeStep(DecodeFixture& f, const std::vector<const LoraWeights*>& adapters);
  // LoraAdapter::Create, then B filled with N(0, 0.02) (a fresh PEFT adapter has B = 0).
  lora::LoraAdapter MakeAdapter(int rank, const std::vector<LoraTarget>& targets, uint64_t seed);
  LoraWeights ToWeights(const lora::LoraAdapter& a) {
    return OrDie(a.ToWeights(config_, runtime_), "ToWeights");
  }
  void Section(const std::string& title) { rows_.push_back({title}); }

  json BenchDecodeOverhead();
  json BenchMixedAdapters();
  json BenchTraining();
  json BenchPublish();

  const BenchFlags& flags_;
  std::string name_;
  std::mt19937 rng_;
  ModelConfig config_;
  runtime::ResolvedRuntime runtime_;
  std::shared_ptr<const LlamaModel> model_;
  int64_t rss_before_load_ = 0;
  std::vector<std::vector<std::string>> rows_;  // metric, value, baseline, ratio, target, verdict.
};

DecodeFixture ModelBench::MakeFixture(int64_t batch) {
  DecodeFixture f;
  f.context = Context();
  const int64_t per_seq = (f.context + 1 + kBlock - 1) / kBlock;
  f.cache = OrDie(KvCache::Create(config_, {kBlock, batch * per_seq, 0}, runtime_), "KvCache");
  f.seqs.resize(batch);
  const int64_t n = f.context;
  const int64_t per_call = std::max<int64_t>(1, kPrefillChunk / n);
  for (size_t s0 = 0; s0 < f.seqs.size(); s0 += per_call) {
    StepBatch step;
    for (size_t s = s0; s < std::min(f.seqs.size(), s0 + per_call); ++s) {
      OrDie(f.cache->Reserve(f.seqs[s], n + 1), "Reserve");
      const auto t = Tokens(n);
      step.tokens.insert(step.tokens.end(), t.begin(), t.end());
      step.sequences.push_back({&f.seqs[s], n, false, nullptr});
    }
    OrDie(model_->Forward(step, *f.cache), "prefill Forward");
  }
  return f;
}

void ModelBench::DecodeStep(DecodeFixture& f, const std::vector<const LoraWeights*>& adapters) {
  StepBatch step;
  step.tokens = Tokens(static_cast<int64_t>(f.seqs.size()));
  for (size_t i = 0; i < f.seqs.size(); ++i) {
    step.sequences.push_back({&f.seqs[i], 1, false, adapters.empty() ? nullptr : adapters[i]});
  }
  OrDie(model_->Forward(step, *f.cache), "decode Forward");
}

lora::LoraAdapter ModelBench::MakeAdapter(int rank, const std::vector<LoraTarget>& targets,
                                          uint64_t seed) {
  lora::LoraConfig c;
  c.rank = rank;
  c.alpha = 2.0 * rank;
  c.targets = targets;
  lora::LoraAdapter a = OrDie(lora::LoraAdapter::Create(config_, c, seed), "LoraAdapter::Create");
  at::NoGradGuard no_grad;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed + 1);
  for (auto& layer : a.factors.layers) {
    for (auto& f : layer) {
      if (f.b.defined()) f.b.normal_(0.0, 0.02, gen);
    }
  }
  return a;
}

// ---------------------------------------------------------------------------------------------
// 1. Unmerged-LoRA decode overhead

json ModelBench::BenchDecodeOverhead() {
  c10::InferenceMode guard;
  const std::vector<int64_t> ranks = ParsePositiveCsv(flags_.ranks, "--ranks");
  std::vector<LoraWeights> weights;
  json adapters = json::array();
  for (size_t i = 0; i < ranks.size(); ++i) {
    const lora::LoraAdapter a = MakeAdapter(static_cast<int>(ranks[i]), kAllTargets, 100 + i);
    weights.push_back(ToWeights(a));
    adapters.push_back({{"rank", ranks[i]}, {"parameter_bytes", a.num_parameters() * 4}});
  }
  Section("[1] unmerged LoRA decode, all 7 projections, ctx " + std::to_string(Context()));
  json out = {{"context", Context()},
              {"targets", "all seven"},
              {"adapters", adapters},
              {"batches", json::array()}};
  for (const int64_t batch : ParsePositiveCsv(flags_.batches, "--batches")) {
    DecodeFixture f = MakeFixture(batch);
    std::vector<std::function<void()>> fns = {[&] { DecodeStep(f, {}); }};
    for (const LoraWeights& w : weights) {
      fns.push_back(
          [&f, &w, this] { DecodeStep(f, std::vector<const LoraWeights*>(f.seqs.size(), &w)); });
    }
    const std::vector<Stats> s = Measure(
        fns, [&] { f.Reset(); }, flags_.timing(), 3);
    const Stats& base = s[0];
    json per_rank = json::array();
    for (size_t i = 0; i < ranks.size(); ++i) {
      const Stats& st = s[i + 1];
      const double ratio = st.median_ms / base.median_ms;
      const bool has_target = ranks[i] == 16 && batch == 16;
      rows_.push_back(
          {"decode b=" + std::to_string(batch) + " r=" + std::to_string(ranks[i]) + " ms/step",
           Fmt("%.2f ms", st.median_ms) + Fmt(" (%.1f tok/s)", batch / (st.median_ms / 1e3)),
           Fmt("base %.2f ms", base.median_ms), Ratio(ratio), has_target ? "<= 1.15" : "-",
           Verdict(has_target, ratio <= 1.15)});
      per_rank.push_back({{"rank", ranks[i]},
                          {"step", st.ToJson()},
                          {"ratio_vs_base", ratio},
                          {"target_ratio_max", has_target ? json(1.15) : json(nullptr)}});
    }
    out["batches"].push_back({{"batch", batch}, {"base_step", base.ToJson()}, {"ranks", per_rank}});
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// 2. A batch mixing adapters

json ModelBench::BenchMixedAdapters() {
  c10::InferenceMode guard;
  std::vector<LoraWeights> weights;
  for (int i = 0; i < kMixAdapters; ++i) {
    weights.push_back(ToWeights(MakeAdapter(kMixRank, kAllTargets, 200 + i)));
  }
  std::vector<const LoraWeights*> single, contiguous, interleaved;
  for (int64_t i = 0; i < kMixBatch; ++i) {
    single.push_back(&weights[0]);
    contiguous.push_back(&weights[i / (kMixBatch / kMixAdapters)]);
    interleaved.push_back(&weights[i % kMixAdapters]);
  }
  DecodeFixture f = MakeFixture(kMixBatch);
  const std::vector<Stats> s = Measure(
      {[&] { DecodeStep(f, {}); }, [&] { DecodeStep(f, single); },
       [&] { DecodeStep(f, contiguous); }, [&] { DecodeStep(f, interleaved); }},
      [&] { f.Reset(); }, flags_.timing(), 3);
  const double r_single = s[1].median_ms / s[0].median_ms;
  const double r_contig = s[2].median_ms / s[1].median_ms;
  const double r_inter = s[3].median_ms / s[1].median_ms;
  const std::string b = "b=" + std::to_string(kMixBatch);
  Section("[2] " + b + " mixing " + std::to_string(kMixAdapters) + " adapters (r=" +
          std::to_string(kMixRank) + ", all 7), ctx " + std::to_string(Context()));
  rows_.push_back({b + " one adapter ms/step", Fmt("%.2f ms", s[1].median_ms),
                   Fmt("base %.2f ms", s[0].median_ms), Ratio(r_single), "-", ""});
  rows_.push_back({b + " 4 adapters, contiguous groups", Fmt("%.2f ms", s[2].median_ms),
                   Fmt("one adapter %.2f ms", s[1].median_ms), Ratio(r_contig), "<= 1.10",
                   Verdict(true, r_contig <= 1.10)});
  rows_.push_back({b + " 4 adapters, interleaved", Fmt("%.2f ms", s[3].median_ms),
                   Fmt("one adapter %.2f ms", s[1].median_ms), Ratio(r_inter), "-", ""});
  return {{"batch", kMixBatch},
          {"adapters", kMixAdapters},
          {"rank", kMixRank},
          {"context", Context()},
          {"base_step", s[0].ToJson()},
          {"one_adapter_step", s[1].ToJson()},
          {"contiguous_step", s[2].ToJson()},
          {"interleaved_step", s[3].ToJson()},
          {"ratio_one_adapter_vs_base", r_single},
          {"ratio_contiguous_vs_one_adapter", r_contig},
          {"ratio_interleaved_vs_one_adapter", r_inter},
          {"target_ratio_contiguous_max", 1.10}};
}

// ---------------------------------------------------------------------------------------------
// 3. PEFT training throughput and memory

json ModelBench::BenchTraining() {
  const int64_t len = std::min(flags_.train_length, config_.max_position_embeddings);
  const int64_t mb = flags_.micro_batch;
  const int64_t num_batches = 4;
  std::vector<engine::TrainingExample> examples(mb * num_batches);
  for (engine::TrainingExample& e : examples) {
    e.tokens = Tokens(len);
    e.loss_mask.assign(len, 0);
    std::fill(e.loss_mask.begin() + len / 2, e.loss_mask.end(), 1);
  }
  auto micro_batch = [&](int64_t i) {
    std::vector<const engine::TrainingExample*> batch;
    for (int64_t j = 0; j < mb; ++j) batch.push_back(&examples[(i % num_batches) * mb + j]);
    return batch;
  };
  // The inference reference forwards the same sequences with the same (rank, targets) adapter.
  const lora::LoraAdapter initial = MakeAdapter(kTrainRank, kAttentionTargets, 300);
  const LoraWeights inference_weights = ToWeights(initial);
  std::vector<at::Tensor> token_batches;
  for (int64_t i = 0; i < num_batches; ++i) {
    at::Tensor t = at::empty({mb, len}, at::kLong);
    auto acc = t.accessor<int64_t, 2>();
    for (int64_t j = 0; j < mb; ++j) {
      for (int64_t k = 0; k < len; ++k) acc[j][k] = examples[i * mb + j].tokens[k];
    }
    token_batches.push_back(t);
  }
  int64_t prefill_i = 0;
  auto prefill = [&] {
    c10::InferenceMode guard;
    OrDie(model_->DenseLogits(token_batches[prefill_i++ % num_batches], &inference_weights),
          "DenseLogits");
  };

  // Inference-only memory: the model, a prefill of one micro-batch and a decode step.
  prefill();
  {
    c10::InferenceMode guard;
    DecodeFixture f = MakeFixture(1);
    DecodeStep(f, {&inference_weights});
  }
  const int64_t rss_inference = VmRssBytes();
  const int64_t peak_inference = MaxRssBytes();

  auto shadow = OrDie(lora::ShadowAdapter::Create(initial, {}), "ShadowAdapter::Create");
  engine::TrainerOptions topt;
  topt.micro_batch_size = mb;
  topt.grad_accum_steps = 1;
  auto trainer =
      OrDie(engine::PeftTrainer::Create(model_, std::move(shadow), topt), "PeftTrainer::Create");
  int64_t train_i = 0;
  json losses = json::array();
  auto train_step = [&] {
    auto stats = OrDie(trainer->MicroStep(micro_batch(train_i++)), "MicroStep");
    if (stats && losses.size() < 64) losses.push_back(stats->loss);
  };
  for (int64_t i = 0; i < flags_.train_steps; ++i) train_step();
  const int64_t rss_train = VmRssBytes();
  const int64_t peak_train = MaxRssBytes();

  const std::vector<Stats> s = Measure({prefill, train_step}, {}, flags_.timing(), 1);
  const double tokens = static_cast<double>(mb * len);
  const double prefill_tps = tokens / (s[0].median_ms / 1e3);
  const double train_tps = tokens / (s[1].median_ms / 1e3);
  const double params = static_cast<double>(model_->parameter_bytes());
  const double extra_rss = static_cast<double>(rss_train - rss_inference);
  const double extra_peak = static_cast<double>(peak_train - peak_inference);

  Section("[3] PEFT: micro-batch " + std::to_string(mb) + " x " + std::to_string(len) +
          " tok (2nd half targets), r=" + std::to_string(kTrainRank) + " q,k,v,o, AdamW");
  rows_.push_back(
      {"PEFT MicroStep tok/s",
       Fmt("%.0f tok/s", train_tps) + Fmt(" (%.0f ms/step)", s[1].median_ms),
       Fmt("inference prefill %.0f tok/s", prefill_tps) + Fmt(" (%.0f ms)", s[0].median_ms),
       Ratio(train_tps / prefill_tps), "-", ""});
  rows_.push_back({"RSS after " + std::to_string(flags_.train_steps) + " steps (VmRSS)",
                   Mb(rss_train) + " (" + (extra_rss >= 0 ? "+" : "") + Mb(extra_rss) + ")",
                   "inference-only " + Mb(rss_inference), Ratio(extra_rss / params) + " x wts", "-",
                   ""});
  rows_.push_back({"peak RSS training (maxrss)", Mb(peak_train) + " (+" + Mb(extra_peak) + ")",
                   "inference-only " + Mb(peak_inference), Ratio(extra_peak / params) + " x wts",
                   "-", ""});
  return {{"tokens_per_example", len},
          {"micro_batch", mb},
          {"rank", kTrainRank},
          {"targets", "q,k,v,o"},
          {"lora_dropout", initial.config.dropout},
          {"adapter_parameters", initial.num_parameters()},
          {"prefill", s[0].ToJson()},
          {"micro_step", s[1].ToJson()},
          {"prefill_tokens_per_s", prefill_tps},
          {"train_tokens_per_s", train_tps},
          {"ratio_train_over_prefill", train_tps / prefill_tps},
          {"losses", losses},
          {"memory",
           {{"untimed_steps_before_reading", flags_.train_steps},
            {"rss_inference_bytes", rss_inference},
            {"peak_rss_inference_bytes", peak_inference},
            {"rss_after_training_bytes", rss_train},
            {"peak_rss_after_training_bytes", peak_train},
            {"extra_rss_bytes", rss_train - rss_inference},
            {"extra_peak_rss_bytes", peak_train - peak_inference},
            {"ratio_extra_rss_over_params", extra_rss / params},
            {"ratio_extra_peak_over_params", extra_peak / params}}}};
}

// ---------------------------------------------------------------------------------------------
// 4. Publish latency and the decode step it overlaps

json ModelBench::BenchPublish() {
  // Publishes run outside InferenceMode, as they do from a trainer or a service thread.
  lora::AdapterRegistry registry(config_, runtime_);
  const lora::LoraAdapter adapter = MakeAdapter(kPublishRank, kAllTargets, 400);
  auto publish = [&] { OrDie(registry.Publish("bench", adapter, "lora_bench"), "Publish"); };
  const Stats idle = Measure({publish}, {}, flags_.timing(), 1)[0];

  // Each step pins the current snapshot at its start, as the engine does at a step boundary.
  DecodeFixture f = [&] {
    c10::InferenceMode guard;
    return MakeFixture(kPublishBatch);
  }();
  auto step = [&] {
    c10::InferenceMode guard;
    auto snap = OrDie(registry.Get("bench"), "Get");
    DecodeStep(f, std::vector<const LoraWeights*>(f.seqs.size(), &snap->weights));
  };
  // Interleaved like Measure: a plain step, then a step while another thread publishes. The
  // timer starts once the publishing thread runs; the publish's own duration is kept too.
  std::vector<double> plain_ms, during_ms, concurrent_publish_ms;
  int overlapped = 0;
  double timed = 0;
  const int warmup = 2;
  for (int it = 0; it < flags_.iters + warmup && (it < 3 + warmup || timed < flags_.min_time);
       ++it) {
    auto t0 = Clock::now();
    step();
    auto t1 = Clock::now();
    f.Reset();
    const double plain = 1e3 * Seconds(t0, t1);

    std::atomic<bool> started{false};
    Clock::time_point p0, p1;
    std::thread publisher([&] {
      p0 = Clock::now();
      started.store(true);
      publish();
      p1 = Clock::now();
    });
    while (!started.load()) std::this_thread::yield();
    t0 = Clock::now();
    step();
    t1 = Clock::now();
    publisher.join();
    f.Reset();
    if (it < warmup) continue;
    plain_ms.push_back(plain);
    during_ms.push_back(1e3 * Seconds(t0, t1));
    concurrent_publish_ms.push_back(1e3 * Seconds(p0, p1));
    if (p1 > t0) ++overlapped;
    timed += Seconds(t0, t1) + plain / 1e3;
  }
  const Stats plain = Summarize(plain_ms);
  const Stats during = Summarize(during_ms);
  const Stats concurrent = Summarize(concurrent_publish_ms);
  const double ratio = during.median_ms / plain.median_ms;
  const double params = static_cast<double>(adapter.num_parameters()) * 4;

  Section("[4] publish r=" + std::to_string(kPublishRank) + " all 7 (" + Mb(params) +
          " f32) via AdapterRegistry");
  rows_.push_back({"Publish (copy+validate+upload+swap)", Fmt("%.2f ms", idle.median_ms),
                   Fmt("b=%.0f decode step ", kPublishBatch) + Fmt("%.2f ms", plain.median_ms),
                   Ratio(idle.median_ms / plain.median_ms), "-", ""});
  rows_.push_back({"Publish on a thread during a step", Fmt("%.2f ms", concurrent.median_ms),
                   Fmt("idle publish %.2f ms", idle.median_ms),
                   Ratio(concurrent.median_ms / idle.median_ms), "-", ""});
  rows_.push_back({"decode b=" + std::to_string(kPublishBatch) + " step during a publish",
                   Fmt("%.2f ms", during.median_ms) +
                       Fmt(" (overlap %.0f%%)", 100.0 * overlapped / during.iters),
                   Fmt("step without %.2f ms", plain.median_ms), Ratio(ratio), "-", ""});
  return {{"rank", kPublishRank},
          {"targets", "all seven"},
          {"adapter_bytes", params},
          {"publish_idle", idle.ToJson()},
          {"publish_concurrent", concurrent.ToJson()},
          {"ratio_publish_over_step", idle.median_ms / plain.median_ms},
          {"batch", kPublishBatch},
          {"context", Context()},
          {"step_without_publish", plain.ToJson()},
          {"step_during_publish", during.ToJson()},
          {"steps_overlapped_by_publish", overlapped},
          {"ratio_step_during_over_without", ratio}};
}

// ---------------------------------------------------------------------------------------------
// One model

json ModelBench::Run() {
  const std::string path = flags_.shapes + "/" + name_ + ".json";
  config_ = OrDie(ModelConfig::FromFile(path), "reading " + path);
  runtime::RuntimeOptions ro;
  ro.num_threads = flags_.threads;
  runtime_ = OrDie(runtime::ResolveRuntime(ro), "runtime");
  at::manual_seed(0);

  rss_before_load_ = VmRssBytes();
  const auto t0 = Clock::now();
  {
    at::NoGradGuard no_grad;
    std::map<std::string, at::Tensor> tensors = RandomWeights(config_);
    model_ =
        OrDie(LlamaModel::FromTensors(config_, std::move(tensors), runtime_, "random:" + name_),
              "FromTensors");
  }
  const double load_s = Seconds(t0, Clock::now());
  const int64_t params = model_->parameter_bytes();

  std::printf(
      "\n== %s: d=%ld ff=%ld layers=%ld heads=%ld/%ld vocab=%ld ctx=%ld, %s, "
      "%.1f MB weights (random, built in %.1f s)\n",
      name_.c_str(), static_cast<long>(config_.hidden_size),
      static_cast<long>(config_.intermediate_size), static_cast<long>(config_.num_hidden_layers),
      static_cast<long>(config_.num_attention_heads),
      static_cast<long>(config_.num_key_value_heads), static_cast<long>(config_.vocab_size),
      static_cast<long>(config_.max_position_embeddings),
      runtime::DTypeName(runtime_.dtype).c_str(), params / 1e6, load_s);
  std::printf("   torch intra-op threads %d, inter-op %d; fused CPU kernels %s; BLAS %s\n",
              at::get_num_threads(), at::get_num_interop_threads(),
              model_->uses_fused_cpu_kernels() ? "yes" : "no", LoadedBlas().c_str());
  std::fflush(stdout);

  json out = {{"model", name_},
              {"shape_file", path},
              {"dtype", runtime::DTypeName(runtime_.dtype)},
              {"parameter_bytes", params},
              {"build_seconds", load_s},
              {"torch_threads", at::get_num_threads()},
              {"rss_before_load_bytes", rss_before_load_}};
  // Training runs first so that its memory reading compares against an inference-only process
  // (the decode scenarios' KV caches and adapters would otherwise raise the inference peak).
  std::vector<std::vector<std::string>> rows_by_section[4];
  out["peft_training"] = BenchTraining();
  rows_by_section[2] = std::move(rows_);
  rows_.clear();
  out["decode_overhead"] = BenchDecodeOverhead();
  rows_by_section[0] = std::move(rows_);
  rows_.clear();
  out["mixed_adapters"] = BenchMixedAdapters();
  rows_by_section[1] = std::move(rows_);
  rows_.clear();
  out["publish"] = BenchPublish();
  rows_by_section[3] = std::move(rows_);
  rows_.clear();
  out["peak_rss_end_bytes"] = MaxRssBytes();

  std::vector<std::vector<std::string>> table = {
      {"metric", "value", "baseline (same run)", "ratio", "target", ""}};
  for (auto& section : rows_by_section) table.insert(table.end(), section.begin(), section.end());
  PrintTable(table);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Driver

double Get(const json& j, double fallback = 0) {
  return j.is_number() ? j.get<double>() : fallback;
}

void PrintSummary(const json& results, double total_s) {
  std::printf("\nsummary (%.0f s)\n", total_s);
  std::vector<std::vector<std::string>> t = {{"model", "r16 b16 /base", "mix4 contig", "mix4 inter",
                                              "train tok/s", "train/prefill", "train +peak MB",
                                              "+peak/wts", "publish ms", "step w/ publish"}};
  for (const json& r : results) {
    if (r.contains("error")) continue;
    double r16b16 = 0;
    for (const json& b : r["decode_overhead"]["batches"]) {
      for (const json& k : b["ranks"]) {
        if (b["batch"] == 16 && k["rank"] == 16) r16b16 = Get(k["ratio_vs_base"]);
      }
    }
    const json& m = r["mixed_adapters"];
    const json& p = r["peft_training"];
    const json& u = r["publish"];
    t.push_back({r["model"].get<std::string>(), r16b16 > 0 ? Fmt("%.3f", r16b16) : "-",
                 Fmt("%.3f", Get(m["ratio_contiguous_vs_one_adapter"])),
                 Fmt("%.3f", Get(m["ratio_interleaved_vs_one_adapter"])),
                 Fmt("%.0f", Get(p["train_tokens_per_s"])),
                 Fmt("%.3f", Get(p["ratio_train_over_prefill"])),
                 Fmt("%.1f", Get(p["memory"]["extra_peak_rss_bytes"]) / 1e6),
                 Fmt("%.3f", Get(p["memory"]["ratio_extra_peak_over_params"])),
                 Fmt("%.2f", Get(u["publish_idle"]["median_ms"])),
                 Fmt("%.3f", Get(u["ratio_step_during_over_without"]))});
  }
  PrintTable(t);
}

int Main(int argc, char** argv) {
  BenchFlags flags;
  CLI::App app{
      "collm_lora_bench: LoRA decode overhead, mixed adapters, PEFT training and "
      "publish latency on random weights"};
  AddDriverFlags(app, flags, "Comma-separated shape names");
  app.add_option("--ranks", flags.ranks, "Adapter ranks for the decode-overhead scenario")
      ->capture_default_str();
  app.add_option("--batches", flags.batches, "Decode batch sizes for the decode-overhead scenario")
      ->capture_default_str();
  app.add_option("--context", flags.context, "Cached positions per sequence before decode steps")
      ->capture_default_str();
  app.add_option("--train-length", flags.train_length,
                 "Tokens per synthetic PEFT example (capped at the model's context)")
      ->capture_default_str();
  app.add_option("--micro-batch", flags.micro_batch, "Examples per PEFT micro-batch")
      ->capture_default_str();
  app.add_option("--train-steps", flags.train_steps,
                 "Untimed PEFT steps before the training memory reading")
      ->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  FinishDriverFlags(flags);
  if (flags.quick) flags.train_steps = std::min<int64_t>(flags.train_steps, 2);
  ParsePositiveCsv(flags.ranks, "--ranks");
  ParsePositiveCsv(flags.batches, "--batches");
  if (flags.context < 1 || flags.train_length < 2 || flags.micro_batch < 1 ||
      flags.train_steps < 1) {
    Die("--context, --micro-batch and --train-steps must be >= 1, --train-length >= 2");
  }

  const ModelRuns runs =
      RunEachModel(flags, argc, argv,
                   "collm_lora_bench: " + CpuModel() + ", " + std::to_string(CoresOnline()) +
                       " cores online, iters <= " + std::to_string(flags.iters) + ", min-time " +
                       Fmt("%.1f", flags.min_time) + " s" + (flags.quick ? " (quick)" : ""),
                   [&flags](const std::string& name) { return ModelBench(flags, name).Run(); });
  PrintSummary(runs.results, runs.total_s);

  json flags_json = flags.ToJson();
  flags_json.update({{"ranks", ParsePositiveCsv(flags.ranks, "--ranks")},
                     {"batches", ParsePositiveCsv(flags.batches, "--batches")},
                     {"context", flags.context},
                     {"train_length", flags.train_length},
                     {"micro_batch", flags.micro_batch},
                     {"train_steps", flags.train_steps}});
  WriteJsonReport(flags.json_path, "collm_lora_bench", flags_json, runs.total_s, "models",
                  runs.results);
  return runs.failed ? 1 : 0;
}

}  // namespace
}  // namespace collm::bench

int main(int argc, char** argv) { return collm::bench::Main(argc, argv); }
