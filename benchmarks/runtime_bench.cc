// collm_runtime_bench: a scenario benchmark of LlamaModel::Forward, in the manner of LevelDB's
// db_bench. For each model shape (an HF config.json in the shapes directory) it builds random
// weights in memory and measures batch-1 decode against the bare GEMV floor and against the
// machine's read bandwidth (a STREAM-like probe in the same run), the SmallGemm linear path
// against the libtorch one (same run, same weights), batched decode throughput against batch 1,
// prefill throughput against batch-1 decode, and resident memory against the weight bytes. Every
// metric is printed next to its baseline measured in the same run;
// `--json PATH` writes the same numbers as JSON. See benchmarks/README.md.
//
// Each model runs in a fresh child process (this binary re-executed with the hidden
// `--one-model NAME`) so that its peak RSS is its own.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "bench_util.h"
#include "collm/runtime/device.h"
#include "collm/runtime/kv_cache.h"
#include "collm/runtime/llama_model.h"
#include "collm/runtime/model_config.h"
#include "collm/runtime/small_gemm.h"
#include "nlohmann/json.hpp"

namespace collm::runtime {
namespace {

using json = nlohmann::json;
using Clock = bench::Clock;

// The shared driver flags (bench::DriverFlags) plus this benchmark's scenarios.
struct BenchFlags : bench::DriverFlags {
  std::string dtype = "f32";
  std::string batches = "1,4,16,64";
  int64_t prompt = 512;
  int64_t decode_context = 128;
  int64_t batch_prompt = 64;
  std::string weights = "f32";  // Base formats compared in the weights scenario (first = baseline).
};

using bench::CpuModel;
using bench::Die;
using bench::Fmt;
using bench::LoadedBlas;
using bench::MaxRssBytes;
using bench::Mb;
using bench::OrDie;
using bench::Seconds;
using bench::SplitCsv;
using bench::Stats;
using bench::VmRssBytes;

std::vector<Stats> Measure(const std::vector<std::function<void()>>& fns,
                           const std::function<void()>& reset, const BenchFlags& flags,
                           int warmup = 2) {
  return bench::Measure(fns, reset, flags.timing(), warmup);
}

// ---------------------------------------------------------------------------------------------
// Memory bandwidth

// Read bandwidth in GB/s, STREAM-like: the best of `rounds` sums over a buffer far larger than the
// last-level cache, on `threads` threads (1, or torch's intra-op threads via at::parallel_for).
double ReadBandwidthGbps(int threads, int rounds = 5) {
  constexpr int64_t kBytes = int64_t{512} << 20;  // 16x a 32 MiB L3.
  static std::vector<float> buffer(kBytes / sizeof(float), 1.0f);
  const float* p = buffer.data();
  const int64_t n = static_cast<int64_t>(buffer.size());
  // 32 independent lanes, so the adds are not latency-bound and the loop waits only on memory.
  auto sum = [p](int64_t b, int64_t e) {
    constexpr int kLanes = 32;
    float acc[kLanes] = {};
    int64_t i = b;
    for (; i + kLanes <= e; i += kLanes) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) acc[l] += p[i + l];
    }
    float total = 0.f;
    for (; i < e; ++i) total += p[i];
    for (float v : acc) total += v;
    return total;
  };
  double best = 0;
  volatile float sink = 0;
  for (int r = 0; r < rounds; ++r) {
    const auto t0 = Clock::now();
    if (threads == 1) {
      sink = sink + sum(0, n);
    } else {
      std::vector<float> partial(at::get_num_threads() * 64, 0.f);
      at::parallel_for(0, n, n / at::get_num_threads(), [&](int64_t b, int64_t e) {
        partial[at::get_thread_num() * 64] += sum(b, e);
      });
      for (float v : partial) sink = sink + v;
    }
    best = std::max(best, kBytes / (Seconds(t0, Clock::now()) * 1e9));
  }
  return best;
}

// Runs `fn` with the runtime's linear layers on SmallGemm (`small`) or on libtorch only.
void WithSmallGemm(bool small, const std::function<void()>& fn) {
  SetSmallGemmMaxRows(small ? kSmallGemmDefaultMaxRows : 0);
  fn();
  SetSmallGemmMaxRows(kSmallGemmDefaultMaxRows);
}

// ---------------------------------------------------------------------------------------------
// Model construction

// The GEMVs of one batch-1 decode step, over tensors shaped like the model's fused weights (the
// model's own are private): per layer w_qkv, w_o, w_gate_up, w_down, then the lm_head.
class GemvFloor {
 public:
  GemvFloor(const ModelConfig& c, c10::ScalarType dtype) {
    const int64_t d = c.hidden_size, ff = c.intermediate_size;
    const int64_t q = c.q_size(), kv = c.kv_size();
    const auto opt = at::TensorOptions().dtype(dtype);
    auto add = [&](int64_t rows, int64_t cols) {
      Op op;
      op.w = at::randn({rows, cols}).mul_(0.02).to(dtype);
      op.x = at::randn({cols}, opt);
      op.y = at::empty({rows}, opt);
      bytes_ += op.w.nbytes();
      ops_.push_back(std::move(op));
    };
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      add(q + 2 * kv, d);
      add(d, q);
      add(2 * ff, d);
      add(d, ff);
    }
    add(c.vocab_size, d);
  }
  void Run() {
    for (Op& op : ops_) at::mv_out(op.y, op.w, op.x);
  }
  int64_t bytes() const { return bytes_; }

 private:
  struct Op {
    at::Tensor w, x, y;
  };
  std::vector<Op> ops_;
  int64_t bytes_ = 0;
};

// ---------------------------------------------------------------------------------------------
// One model

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
  std::unique_ptr<KvCache> MakeCache(int64_t blocks) {
    return OrDie(KvCache::Create(config_, {kBlock, blocks, 0}, model_->runtime()), "KvCache");
  }
  // Runs a prompt of `n` tokens for each of `seqs`, at most kPrefillChunk tokens per Forward.
  void Prefill(KvCache& cache, std::vector<SequenceKv>& seqs, int64_t n);
  // One decode step: one new token for each of `seqs` in one Forward.
  void DecodeStep(KvCache& cache, std::vector<SequenceKv>& seqs);

  json BenchDecodeVsGemv();
  json BenchBatches(double* b1_tokens_per_s);
  json BenchPrefill(double b1_tokens_per_s);
  json BenchWeights();

  static constexpr int64_t kBlock = 16;
  static constexpr int64_t kPrefillChunk = 512;

  const BenchFlags& flags_;
  std::string name_;
  std::mt19937 rng_;
  ModelConfig config_;
  std::shared_ptr<const LlamaModel> model_;
  std::vector<std::vector<std::string>> rows_;  // metric, value, baseline, ratio, target.
  double bandwidth_gbps_ = 0;     // Read bandwidth on torch's threads, measured in this run.
  double bandwidth_1t_gbps_ = 0;  // The same on one thread.
};

void ModelBench::Prefill(KvCache& cache, std::vector<SequenceKv>& seqs, int64_t n) {
  const int64_t per_call = std::max<int64_t>(1, kPrefillChunk / n);
  for (size_t s0 = 0; s0 < seqs.size(); s0 += per_call) {
    StepBatch batch;
    for (size_t s = s0; s < std::min(seqs.size(), s0 + per_call); ++s) {
      OrDie(cache.Reserve(seqs[s], seqs[s].length + n), "Reserve");
      const auto t = Tokens(n);
      batch.tokens.insert(batch.tokens.end(), t.begin(), t.end());
      batch.sequences.push_back({&seqs[s], n, false});
    }
    OrDie(model_->Forward(batch, cache), "prefill Forward");
  }
}

void ModelBench::DecodeStep(KvCache& cache, std::vector<SequenceKv>& seqs) {
  StepBatch batch;
  batch.tokens = Tokens(static_cast<int64_t>(seqs.size()));
  for (SequenceKv& s : seqs) {
    OrDie(cache.Reserve(s, s.length + 1), "Reserve");
    batch.sequences.push_back({&s, 1, false});
  }
  OrDie(model_->Forward(batch, cache), "decode Forward");
}

json ModelBench::BenchDecodeVsGemv() {
  const int64_t ctx = std::min(flags_.decode_context, config_.max_position_embeddings - 1);
  auto cache = MakeCache((ctx + 1 + kBlock - 1) / kBlock);
  std::vector<SequenceKv> seqs(1);
  Prefill(*cache, seqs, ctx);
  GemvFloor gemv(config_, model_->runtime().dtype);
  auto stats = Measure(
      {[&] { WithSmallGemm(true, [&] { DecodeStep(*cache, seqs); }); },
       [&] { WithSmallGemm(false, [&] { DecodeStep(*cache, seqs); }); }, [&] { gemv.Run(); }},
      [&] { cache->Truncate(seqs[0], ctx); }, flags_, /*warmup=*/3);
  const Stats& step = stats[0];
  const Stats& old_step = stats[1];
  const Stats& floor = stats[2];
  const double gbps_step = gemv.bytes() / (step.median_ms * 1e6);
  const double gbps_old = gemv.bytes() / (old_step.median_ms * 1e6);
  const double gbps_gemv = gemv.bytes() / (floor.median_ms * 1e6);
  const double ratio = step.median_ms / floor.median_ms;
  const double target = name_ == "stories110M" ? 1.3 : name_ == "stories15M" ? 2.0 : 0.0;
  rows_.push_back({"decode b=1 ctx=" + std::to_string(ctx) + " ms/step",
                   Fmt("%.2f ms", step.median_ms) + Fmt(" (%.1f GB/s)", gbps_step),
                   "GEMVs only " + Fmt("%.2f ms", floor.median_ms) + Fmt(" (%.1f GB/s)", gbps_gemv),
                   Fmt("%.2f", ratio), target > 0 ? Fmt("<= %.1f", target) : "-",
                   target > 0 ? (ratio <= target ? "ok" : "MISS") : ""});
  rows_.push_back({"decode b=1 SmallGemm vs libtorch",
                   Fmt("%.2f ms", step.median_ms) + Fmt(" (%.1f GB/s)", gbps_step),
                   "libtorch " + Fmt("%.2f ms", old_step.median_ms) + Fmt(" (%.1f GB/s)", gbps_old),
                   Fmt("%.2fx", old_step.median_ms / step.median_ms), "-", ""});
  const double frac = gbps_step / bandwidth_gbps_;
  const bool bw_target = name_ == "stories110M";
  rows_.push_back(
      {"decode b=1 weight bytes/s / read bw", Fmt("%.1f GB/s", gbps_step),
       Fmt("read bw %.1f GB/s", bandwidth_gbps_) + Fmt(" (1 thread %.1f)", bandwidth_1t_gbps_),
       Fmt("%.2f", frac), bw_target ? ">= 0.90" : "-",
       bw_target ? (frac >= 0.9 ? "ok" : "MISS") : ""});
  return {{"context", ctx},
          {"step", step.ToJson()},
          {"step_libtorch_linear", old_step.ToJson()},
          {"gemv_floor", floor.ToJson()},
          {"weight_bytes_streamed", gemv.bytes()},
          {"step_gb_per_s", gbps_step},
          {"step_libtorch_linear_gb_per_s", gbps_old},
          {"gemv_gb_per_s", gbps_gemv},
          {"read_bandwidth_gb_per_s", bandwidth_gbps_},
          {"read_bandwidth_1thread_gb_per_s", bandwidth_1t_gbps_},
          {"step_fraction_of_read_bandwidth", frac},
          {"ratio_step_over_gemv", ratio},
          {"target_ratio_max", target > 0 ? json(target) : json(nullptr)}};
}

json ModelBench::BenchBatches(double* b1_tokens_per_s) {
  const int64_t ctx = std::min(flags_.batch_prompt, config_.max_position_embeddings - 1);
  json out = json::array();
  double base = 0, old_base = 0;
  for (const std::string& b : SplitCsv(flags_.batches)) {
    const int64_t batch = std::stoll(b);
    const int64_t per_seq = (ctx + 1 + kBlock - 1) / kBlock;
    auto cache = MakeCache(batch * per_seq);
    std::vector<SequenceKv> seqs(batch);
    Prefill(*cache, seqs, ctx);
    const std::vector<Stats> st = Measure(
        {[&] { WithSmallGemm(true, [&] { DecodeStep(*cache, seqs); }); },
         [&] { WithSmallGemm(false, [&] { DecodeStep(*cache, seqs); }); }},
        [&] {
          for (SequenceKv& kv : seqs) cache->Truncate(kv, ctx);
        },
        flags_);
    const Stats& s = st[0];
    const double tps = batch / (s.median_ms / 1e3);
    const double old_tps = batch / (st[1].median_ms / 1e3);
    if (base == 0) base = batch == 1 ? tps : 0;
    if (old_base == 0) old_base = batch == 1 ? old_tps : 0;
    const double ratio = base > 0 ? tps / base : 0;
    const double old_ratio = old_base > 0 ? old_tps / old_base : 0;
    const bool has_target = batch == 16 && base > 0;
    rows_.push_back({"decode b=" + std::to_string(batch) + " ctx=" + std::to_string(ctx) + " tok/s",
                     Fmt("%.1f tok/s", tps) + Fmt(" (%.1f ms/step)", s.median_ms),
                     base > 0 ? Fmt("b=1 %.1f tok/s", base) : "(no b=1 run)",
                     base > 0 ? Fmt("%.2fx", ratio) : "-", has_target ? ">= 8x" : "-",
                     has_target ? (ratio >= 8 ? "ok" : "MISS") : ""});
    rows_.push_back({"  same, libtorch linear",
                     Fmt("%.1f tok/s", old_tps) + Fmt(" (%.1f ms/step)", st[1].median_ms),
                     old_base > 0 ? Fmt("b=1 %.1f tok/s", old_base) : "(no b=1 run)",
                     old_base > 0 ? Fmt("%.2fx", old_ratio) : "-", "-",
                     Fmt("SmallGemm %.2fx", tps / old_tps)});
    out.push_back(
        {{"batch", batch},
         {"context", ctx},
         {"step", s.ToJson()},
         {"tokens_per_s", tps},
         {"ratio_vs_batch1", base > 0 ? json(ratio) : json(nullptr)},
         {"step_libtorch_linear", st[1].ToJson()},
         {"tokens_per_s_libtorch_linear", old_tps},
         {"ratio_vs_batch1_libtorch_linear", old_base > 0 ? json(old_ratio) : json(nullptr)},
         {"speedup_small_gemm_over_libtorch", tps / old_tps}});
  }
  *b1_tokens_per_s = base;
  return out;
}

json ModelBench::BenchPrefill(double b1_tokens_per_s) {
  const int64_t n = std::min(flags_.prompt, config_.max_position_embeddings);
  const bool capped = n < flags_.prompt;
  auto cache = MakeCache((n + kBlock - 1) / kBlock);
  std::vector<SequenceKv> seqs(1);
  OrDie(cache->Reserve(seqs[0], n), "Reserve");
  const std::vector<int32_t> tokens = Tokens(n);
  auto prefill = [&] {
    StepBatch batch;
    batch.tokens = tokens;
    batch.sequences.push_back({&seqs[0], n, false});
    OrDie(model_->Forward(batch, *cache), "prefill Forward");
  };
  const Stats s = Measure(
      {prefill}, [&] { cache->Truncate(seqs[0], 0); }, flags_, /*warmup=*/1)[0];
  const double tps = n / (s.median_ms / 1e3);
  const double ratio = b1_tokens_per_s > 0 ? tps / b1_tokens_per_s : 0;
  rows_.push_back(
      {"prefill " + std::to_string(n) + " tok" + (capped ? " (capped: max ctx)" : "") + " tok/s",
       Fmt("%.1f tok/s", tps) + Fmt(" (%.0f ms)", s.median_ms),
       b1_tokens_per_s > 0 ? Fmt("decode b=1 %.1f tok/s", b1_tokens_per_s) : "(no b=1 run)",
       b1_tokens_per_s > 0 ? Fmt("%.1fx", ratio) : "-", ">= 20x",
       b1_tokens_per_s > 0 ? (ratio >= 20 ? "ok" : "MISS") : ""});
  return {{"tokens", n},
          {"requested_tokens", flags_.prompt},
          {"capped_at_max_position_embeddings", capped},
          {"forward", s.ToJson()},
          {"tokens_per_s", tps},
          {"ratio_vs_decode_batch1", b1_tokens_per_s > 0 ? json(ratio) : json(nullptr)}};
}

json ModelBench::Run() {
  const std::string path = flags_.shapes + "/" + name_ + ".json";
  config_ = OrDie(ModelConfig::FromFile(path), "reading " + path);
  RuntimeOptions ro;
  ro.dtype = flags_.dtype;
  ro.num_threads = flags_.threads;
  const ResolvedRuntime runtime = OrDie(ResolveRuntime(ro), "runtime");
  at::manual_seed(0);

  const int64_t rss_before = VmRssBytes();
  const auto t0 = Clock::now();
  {
    // NoGradGuard as in LlamaModel::Load; the map is freed right after so RSS counts the model.
    at::NoGradGuard no_grad;
    std::map<std::string, at::Tensor> tensors = bench::RandomWeights(config_);
    model_ = OrDie(LlamaModel::FromTensors(config_, std::move(tensors), runtime, "random:" + name_),
                   "FromTensors");
  }
  const double load_s = Seconds(t0, Clock::now());
  const int64_t rss_loaded = VmRssBytes();
  const int64_t peak_loaded = MaxRssBytes();
  const int64_t params = model_->parameter_bytes();

  std::printf(
      "\n== %s: d=%ld ff=%ld layers=%ld heads=%ld/%ld vocab=%ld ctx=%ld tied=%d, %s, "
      "%.1f MB weights (random, built in %.1f s)\n",
      name_.c_str(), static_cast<long>(config_.hidden_size),
      static_cast<long>(config_.intermediate_size), static_cast<long>(config_.num_hidden_layers),
      static_cast<long>(config_.num_attention_heads),
      static_cast<long>(config_.num_key_value_heads), static_cast<long>(config_.vocab_size),
      static_cast<long>(config_.max_position_embeddings), config_.tie_word_embeddings,
      DTypeName(runtime.dtype).c_str(), params / 1e6, load_s);
  std::printf("   torch intra-op threads %d, inter-op %d; fused CPU kernels %s; BLAS %s\n",
              at::get_num_threads(), at::get_num_interop_threads(),
              model_->uses_fused_cpu_kernels() ? "yes" : "no", LoadedBlas().c_str());
  std::fflush(stdout);

  json out = {{"model", name_},
              {"shape_file", path},
              {"dtype", DTypeName(runtime.dtype)},
              {"parameter_bytes", params},
              {"build_seconds", load_s},
              {"torch_threads", at::get_num_threads()},
              {"fused_cpu_kernels", model_->uses_fused_cpu_kernels()}};
  bandwidth_1t_gbps_ = ReadBandwidthGbps(1);
  bandwidth_gbps_ = ReadBandwidthGbps(at::get_num_threads());
  std::printf(
      "   read bandwidth %.1f GB/s on %d threads, %.1f GB/s on 1; SmallGemm %s, <= %ld rows\n",
      bandwidth_gbps_, at::get_num_threads(), bandwidth_1t_gbps_,
      SmallGemmHasAvx2() ? "avx2/fma" : "portable", static_cast<long>(SmallGemmMaxRows()));
  {
    c10::InferenceMode guard;
    out["decode_vs_gemv"] = BenchDecodeVsGemv();
    double b1 = 0;
    out["decode_batches"] = BenchBatches(&b1);
    out["prefill"] = BenchPrefill(b1);
    if (flags_.weights != "f32") out["weights"] = BenchWeights();
  }
  const int64_t peak_end = MaxRssBytes();
  rows_.push_back({"RSS after load (VmRSS)", Mb(rss_loaded),
                   "weights " + Mb(params) + " + " + Mb(rss_before) + " before load",
                   Fmt("%.2f", static_cast<double>(rss_loaded - rss_before) / params), "-", ""});
  // Ratios are of the growth over the RSS before load (the torch libraries), so small models are
  // not dominated by it; the raw numbers are in the value column and the JSON.
  rows_.push_back({"peak RSS during load (maxrss)", Mb(peak_loaded),
                   "weights " + Mb(params) + " + " + Mb(rss_before) + " before load",
                   Fmt("%.2f", static_cast<double>(peak_loaded - rss_before) / params), "-", ""});
  rows_.push_back({"peak RSS end (+GEMV copy, KV)", Mb(peak_end),
                   "weights " + Mb(params) + " + " + Mb(rss_before) + " before load",
                   Fmt("%.2f", static_cast<double>(peak_end - rss_before) / params), "-", ""});
  out["memory"] = {
      {"rss_before_load_bytes", rss_before},
      {"rss_after_load_bytes", rss_loaded},
      {"peak_rss_after_load_bytes", peak_loaded},
      {"peak_rss_end_bytes", peak_end},
      {"ratio_rss_growth_over_params", static_cast<double>(rss_loaded - rss_before) / params},
      {"ratio_peak_load_growth_over_params",
       static_cast<double>(peak_loaded - rss_before) / params},
      {"ratio_peak_end_growth_over_params", static_cast<double>(peak_end - rss_before) / params}};

  std::vector<std::vector<std::string>> table = {
      {"metric", "value", "baseline (same run)", "ratio", "target", ""}};
  table.insert(table.end(), rows_.begin(), rows_.end());
  bench::PrintTable(table);
  return out;
}

// Decode at batch 1 and 16 and prefill for every --weights format, all models built from the
// same random weights in this process and measured interleaved (ratios from one run). Bytes per
// token are the matrices one decode step streams (every projection and the head) in that format;
// the bound is the read bandwidth measured in this run divided by them.
json ModelBench::BenchWeights() {
  const std::vector<std::string> names = SplitCsv(flags_.weights);
  const std::shared_ptr<const LlamaModel> f32_model = model_;
  std::vector<std::shared_ptr<const LlamaModel>> models;
  std::vector<int64_t> rss_growth;
  for (const std::string& w : names) {
    RuntimeOptions ro;
    ro.dtype = flags_.dtype;
    ro.num_threads = flags_.threads;
    ro.weights = w;
    const ResolvedRuntime runtime = OrDie(ResolveRuntime(ro), "runtime");
    const int64_t before = VmRssBytes();
    {
      at::NoGradGuard no_grad;
      at::manual_seed(0);  // The weights Run() built the f32 model from.
      models.push_back(OrDie(
          LlamaModel::FromTensors(config_, bench::RandomWeights(config_), runtime, "random:" + w),
          "FromTensors " + w));
    }
    rss_growth.push_back(VmRssBytes() - before);
  }
  const ModelConfig& c = config_;
  const double streamed_params = static_cast<double>(
      c.num_hidden_layers * ((c.q_size() + 2 * c.kv_size()) * c.hidden_size +
                             c.hidden_size * c.q_size() + 3 * c.intermediate_size * c.hidden_size) +
      c.vocab_size * c.hidden_size);
  auto bytes_per_weight = [](WeightFormat f) {
    return f == WeightFormat::kF32 ? 4.0 : f == WeightFormat::kInt8 ? 1.125 : 0.625;
  };

  // One scenario over all formats: `batch` sequences of `ctx` cached tokens, one decode step.
  auto decode = [&](int64_t batch, int64_t ctx) {
    std::vector<std::unique_ptr<KvCache>> caches;
    std::vector<std::vector<SequenceKv>> seqs(models.size(), std::vector<SequenceKv>(batch));
    std::vector<std::function<void()>> fns;
    for (size_t i = 0; i < models.size(); ++i) {
      model_ = models[i];
      caches.push_back(MakeCache(batch * ((ctx + 1 + kBlock - 1) / kBlock)));
      Prefill(*caches[i], seqs[i], ctx);
      fns.push_back([&, i] {
        model_ = models[i];
        DecodeStep(*caches[i], seqs[i]);
      });
    }
    return Measure(
        fns,
        [&] {
          for (size_t i = 0; i < models.size(); ++i)
            for (SequenceKv& kv : seqs[i]) caches[i]->Truncate(kv, ctx);
        },
        flags_);
  };
  const int64_t ctx = std::min(flags_.decode_context, c.max_position_embeddings - 1);
  const std::vector<Stats> b1 = decode(1, ctx);
  const std::vector<Stats> b16 = decode(16, std::min(flags_.batch_prompt, ctx));
  const int64_t n = std::min(flags_.prompt, c.max_position_embeddings);
  std::vector<Stats> pre;
  {
    std::vector<std::unique_ptr<KvCache>> caches;
    std::vector<SequenceKv> seqs(models.size());
    std::vector<std::function<void()>> fns;
    const std::vector<int32_t> tokens = Tokens(n);
    for (size_t i = 0; i < models.size(); ++i) {
      model_ = models[i];
      caches.push_back(MakeCache((n + kBlock - 1) / kBlock));
      OrDie(caches[i]->Reserve(seqs[i], n), "Reserve");
      fns.push_back([&, i] {
        StepBatch batch;
        batch.tokens = tokens;
        batch.sequences.push_back({&seqs[i], n, false});
        OrDie(models[i]->Forward(batch, *caches[i]), "prefill Forward");
      });
    }
    pre = Measure(
        fns,
        [&] {
          for (size_t i = 0; i < models.size(); ++i) caches[i]->Truncate(seqs[i], 0);
        },
        flags_, /*warmup=*/1);
  }
  model_ = f32_model;

  json out = json::array();
  auto tps = [](const Stats& s, int64_t tokens) { return tokens / (s.median_ms / 1e3); };
  const double base_b1 = tps(b1[0], 1), base_b16 = tps(b16[0], 16), base_pre = tps(pre[0], n);
  for (size_t i = 0; i < models.size(); ++i) {
    const WeightFormat f = models[i]->runtime().weights;
    const std::string w = WeightFormatName(f);
    const double bytes = streamed_params * bytes_per_weight(f);
    const double gbps = bytes / (b1[i].median_ms * 1e6);
    const double bound_tps = bandwidth_gbps_ * 1e9 / bytes;
    const double r1 = tps(b1[i], 1) / base_b1;
    // Issue 15's targets, on stories110M, against f32 measured in this run.
    const bool targeted = name_ == "stories110M" && f != WeightFormat::kF32;
    const double want = f == WeightFormat::kInt8 ? 1.7 : 2.5;
    rows_.push_back({"weights " + w + " decode b=1 tok/s",
                     Fmt("%.1f tok/s", tps(b1[i], 1)) + Fmt(" (%.1f GB/s)", gbps),
                     names[0] + Fmt(" %.1f tok/s", base_b1), Fmt("%.2fx", r1),
                     targeted ? Fmt(">= %.1fx", want) : "-",
                     targeted ? (r1 >= want ? "ok" : "MISS") : ""});
    const double frac = tps(b1[i], 1) / bound_tps;
    rows_.push_back({"  " + w + " b=1 vs bandwidth bound", Fmt("%.1f MB/token", bytes / 1e6),
                     Fmt("bound %.1f tok/s", bound_tps) + Fmt(" (%.1f GB/s)", bandwidth_gbps_),
                     Fmt("%.2f", frac), targeted && f == WeightFormat::kInt8 ? ">= 0.85" : "-",
                     targeted && f == WeightFormat::kInt8 ? (frac >= 0.85 ? "ok" : "MISS") : ""});
    rows_.push_back({"  " + w + " decode b=16 tok/s", Fmt("%.1f tok/s", tps(b16[i], 16)),
                     names[0] + Fmt(" %.1f tok/s", base_b16),
                     Fmt("%.2fx", tps(b16[i], 16) / base_b16), "-", ""});
    rows_.push_back({"  " + w + " prefill " + std::to_string(n) + " tok/s",
                     Fmt("%.1f tok/s", tps(pre[i], n)), names[0] + Fmt(" %.1f tok/s", base_pre),
                     Fmt("%.2fx", tps(pre[i], n) / base_pre), "-", ""});
    rows_.push_back({"  " + w + " RSS growth at build", Mb(rss_growth[i]),
                     "weights " + Mb(models[i]->parameter_bytes()),
                     Fmt("%.2f", static_cast<double>(rss_growth[i]) /
                                     static_cast<double>(models[i]->parameter_bytes())),
                     "-", ""});
    out.push_back({{"weights", w},
                   {"parameter_bytes", models[i]->parameter_bytes()},
                   {"rss_growth_bytes", rss_growth[i]},
                   {"bytes_per_token", bytes},
                   {"decode_b1", b1[i].ToJson()},
                   {"decode_b1_tokens_per_s", tps(b1[i], 1)},
                   {"decode_b1_bandwidth_bound_tokens_per_s", bound_tps},
                   {"decode_b1_fraction_of_bound", frac},
                   {"decode_b16", b16[i].ToJson()},
                   {"decode_b16_tokens_per_s", tps(b16[i], 16)},
                   {"prefill", pre[i].ToJson()},
                   {"prefill_tokens", n},
                   {"prefill_tokens_per_s", tps(pre[i], n)},
                   {"decode_b1_ratio_vs_first", r1}});
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Driver

int Main(int argc, char** argv) {
  BenchFlags flags;
  CLI::App app{"collm_runtime_bench: LlamaModel decode/prefill/memory scenarios on random weights"};
  bench::AddDriverFlags(app, flags,
                        "Comma-separated shape names, e.g. stories15M,stories110M,tinyllama-1.1B");
  app.add_option("--dtype", flags.dtype, "Compute dtype: f32, bf16, f16")->capture_default_str();
  app.add_option("--batches", flags.batches, "Decode batch sizes; the first should be 1")
      ->capture_default_str();
  app.add_option("--prompt", flags.prompt, "Prefill prompt length (capped at the model's context)")
      ->capture_default_str();
  app.add_option("--decode-context", flags.decode_context,
                 "Cached positions for the batch-1 decode vs GEMV scenario")
      ->capture_default_str();
  app.add_option("--batch-prompt", flags.batch_prompt,
                 "Prompt tokens prefilled per sequence before batched decode")
      ->capture_default_str();
  app.add_option("--weights", flags.weights,
                 "Base weight formats to compare (f32,int8,int4; the first is the baseline): "
                 "decode b=1/16, bytes/token vs bandwidth, prefill, RSS")
      ->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  bench::FinishDriverFlags(flags);
  for (const std::string& b : SplitCsv(flags.batches)) {
    if (b.find_first_not_of("0123456789") != std::string::npos || std::stoll(b) < 1) {
      Die("--batches must be positive integers, got '" + b + "'");
    }
  }
  for (const std::string& w : SplitCsv(flags.weights)) {
    if (!ParseWeightFormat(w).ok()) Die("--weights takes f32, int8, int4; got '" + w + "'");
  }
  if (flags.prompt < 1 || flags.decode_context < 1 || flags.batch_prompt < 1) {
    Die("--prompt, --decode-context and --batch-prompt must be >= 1");
  }

  const bench::ModelRuns runs = bench::RunEachModel(
      flags, argc, argv,
      "collm_runtime_bench: " + CpuModel() + ", " + std::to_string(bench::CoresOnline()) +
          " cores online, dtype " + flags.dtype + ", iters <= " + std::to_string(flags.iters) +
          ", min-time " + Fmt("%.1f", flags.min_time) + " s" + (flags.quick ? " (quick)" : ""),
      [&flags](const std::string& name) { return ModelBench(flags, name).Run(); });
  const json& results = runs.results;
  const double total_s = runs.total_s;

  std::printf("\nsummary (%.0f s)\n", total_s);
  std::printf("   %-16s %14s %14s %9s %12s %12s %9s %10s\n", "model", "b1 step/gemv", "b1 tok/s",
              "b16/b1", "prefill tok/s", "prefill/b1", "RSS/wts", "peak/wts");
  for (const json& r : results) {
    if (r.contains("error")) continue;
    auto get = [](const json& j, double fallback = 0) {
      return j.is_number() ? j.get<double>() : fallback;
    };
    double b1 = 0, b16 = 0;
    for (const json& b : r["decode_batches"]) {
      if (b["batch"] == 1) b1 = get(b["tokens_per_s"]);
      if (b["batch"] == 16) b16 = get(b["tokens_per_s"]);
    }
    std::printf(
        "   %-16s %14.2f %14.1f %9s %12.1f %12s %9.2f %10.2f\n",
        r["model"].get<std::string>().c_str(), get(r["decode_vs_gemv"]["ratio_step_over_gemv"]), b1,
        b1 > 0 && b16 > 0 ? Fmt("%.2fx", b16 / b1).c_str() : "-", get(r["prefill"]["tokens_per_s"]),
        get(r["prefill"]["ratio_vs_decode_batch1"]) > 0
            ? Fmt("%.1fx", get(r["prefill"]["ratio_vs_decode_batch1"])).c_str()
            : "-",
        get(r["memory"]["ratio_rss_growth_over_params"]),
        get(r["memory"]["ratio_peak_load_growth_over_params"]));
  }

  json flags_json = flags.ToJson();
  flags_json.update({{"dtype", flags.dtype},
                     {"batches", SplitCsv(flags.batches)},
                     {"prompt", flags.prompt},
                     {"decode_context", flags.decode_context},
                     {"batch_prompt", flags.batch_prompt},
                     {"weights", SplitCsv(flags.weights)}});
  bench::WriteJsonReport(flags.json_path, "collm_runtime_bench", flags_json, total_s, "models",
                         results);
  return runs.failed ? 1 : 0;
}

}  // namespace
}  // namespace collm::runtime

int main(int argc, char** argv) { return collm::runtime::Main(argc, argv); }
