// collm_aggregation_bench: server-side LoRA aggregation cost, in the manner of LevelDB's db_bench.
// For each adapter configuration (a model shape from the shapes directory and a LoRA rank) it
// builds a random global adapter and synthetic client updates in memory (global + N(0, 0.01²)
// noise on every factor) and measures, for 10, 100 and 1000 updates:
//   1. the time of federation::Aggregate for FedAvg (FedIT) and for exact LoRA aggregation
//      (validation of every update included, as the aggregator runs it), timed interleaved;
//   2. the peak resident memory each adds while it runs (VmHWM reset through
//      /proc/self/clear_refs, so each measurement has its own peak), next to the bytes of the
//      updates themselves;
//   3. the bytes one device moves per round: the serialized PEFT blob of the global adapter
//      (down) and of its update (up), next to the raw f32 parameter bytes.
// Ratios use baselines measured in the same run: exact over FedAvg, time per update at N over
// time per update at the smallest N, peak memory over the updates' bytes. `--json PATH` writes
// the same numbers as JSON. See benchmarks/README.md.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <malloc.h>

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "bench_util.h"
#include "collm/federation/aggregation.h"
#include "collm/lora/lora_adapter.h"
#include "collm/lora/peft_io.h"

namespace collm::bench {
namespace {

using federation::Combine;

struct BenchFlags {
  std::string shapes;
  std::string configs = "stories15M:8,stories15M:16,stories110M:8";
  std::string updates = "10,100,1000";
  std::string targets = "q_proj,v_proj";
  int threads = 0;
  int iters = 3;
  double min_time = 2.0;
  std::string json_path;
  bool quick = false;
};

// Peak RSS since the last ResetPeakRss() (VmHWM), or -1 where the kernel does not support it.
int64_t PeakRssBytes() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  }
  return -1;
}

// Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS.
bool ResetPeakRss() {
  std::ofstream f("/proc/self/clear_refs");
  f << "5";
  f.flush();
  return static_cast<bool>(f);
}

lora::LoraAdapter RandomAdapter(const runtime::ModelConfig& model, const lora::LoraConfig& config,
                                uint64_t seed) {
  lora::LoraAdapter a =
      OrDie(lora::LoraAdapter::Create(model, config, seed), "LoraAdapter::Create");
  for (auto& layer : a.factors.layers) {
    for (auto& f : layer) {
      if (f.b.defined()) f.b = at::randn(f.b.sizes()) * 0.01;
    }
  }
  return a;
}

int64_t BlobBytes(const lora::LoraAdapter& a) {
  lora::PeftBlob blob = OrDie(lora::SerializePeftAdapter(a), "SerializePeftAdapter");
  return static_cast<int64_t>(blob.safetensors.size() + blob.config_json.size());
}

json RunConfig(const BenchFlags& flags, const std::string& shape, int rank,
               const std::vector<int64_t>& counts) {
  const std::string path = flags.shapes + "/" + shape + ".json";
  const runtime::ModelConfig model = OrDie(runtime::ModelConfig::FromFile(path), "reading " + path);
  lora::LoraConfig config;
  config.rank = rank;
  config.alpha = 2.0 * rank;
  config.targets.clear();
  for (const std::string& t : SplitCsv(flags.targets)) {
    config.targets.push_back(OrDie(runtime::ParseLoraTarget(t), "--targets"));
  }
  at::NoGradGuard no_grad;
  at::manual_seed(1);
  const lora::LoraAdapter global = RandomAdapter(model, config, 1);
  const int64_t params = global.num_parameters();
  const int64_t max_n = *std::max_element(counts.begin(), counts.end());

  const auto gen0 = Clock::now();
  std::vector<federation::ClientUpdate> all(static_cast<size_t>(max_n));
  for (int64_t i = 0; i < max_n; ++i) {
    auto& u = all[static_cast<size_t>(i)];
    u.device_id = "dev-" + std::to_string(i);
    u.num_samples = 1 + i % 50;
    u.train_loss = 1.0;
    u.adapter = global.Clone();
    for (auto& layer : u.adapter.factors.layers) {
      for (auto& f : layer) {
        if (!f.a.defined()) continue;
        f.a.add_(at::randn(f.a.sizes()) * 0.01);
        f.b.add_(at::randn(f.b.sizes()) * 0.01);
      }
    }
  }
  const double gen_s = Seconds(gen0, Clock::now());

  const int64_t down = BlobBytes(global), up = BlobBytes(all[0].adapter);
  const std::string title = shape + " rank " + std::to_string(rank) + " (" + flags.targets + ", " +
                            Fmt("%.0f", static_cast<double>(params) / 1e3) + "k params)";
  std::printf("\n== %s: %lld updates generated in %.1f s\n", title.c_str(),
              static_cast<long long>(max_n), gen_s);
  std::vector<std::vector<std::string>> rows = {
      {"updates", "fedavg ms", "exact ms", "exact/fedavg", "fedavg ms/upd (x smallest)",
       "exact ms/upd (x smallest)", "fedavg +peak", "exact +peak", "updates' bytes",
       "exact peak/updates"}};
  json points = json::array();
  double fedavg_per_update0 = 0, exact_per_update0 = 0;
  for (int64_t n : counts) {
    const std::vector<federation::ClientUpdate> updates(all.begin(), all.begin() + n);
    federation::AggregationOptions fedavg, exact;
    fedavg.combine = Combine::kFedAvg;
    exact.combine = Combine::kExact;
    auto run = [&](const federation::AggregationOptions& o) {
      auto r = federation::Aggregate(model, global, updates, o, nullptr);
      if (!r.ok()) Die("Aggregate: " + r.status().ToString());
    };
    // Peak memory first, one run each, from a freshly reset high-water mark.
    int64_t peak[2] = {-1, -1};
    const federation::AggregationOptions* opts[2] = {&fedavg, &exact};
    for (int s = 0; s < 2; ++s) {
      const int64_t before = VmRssBytes();
      if (ResetPeakRss()) {
        run(*opts[s]);
        const int64_t hwm = PeakRssBytes();
        if (hwm >= 0) peak[s] = std::max<int64_t>(0, hwm - before);
      }
    }
    // The memory runs above warmed both paths up. Rounds alternate between the strategies (so
    // load from neighbours on the shared cores hits both alike) until --iters rounds, or until
    // --min-time seconds once one round is done: a 1000-update exact round on stories110M takes
    // tens of seconds, and bench_util's Measure insists on three.
    std::vector<double> ms[2];
    const auto timing0 = Clock::now();
    for (int i = 0; i < flags.iters; ++i) {
      if (i > 0 && Seconds(timing0, Clock::now()) >= flags.min_time) break;
      for (int s = 0; s < 2; ++s) {
        const auto a = Clock::now();
        run(*opts[s]);
        ms[s].push_back(Seconds(a, Clock::now()) * 1e3);
      }
    }
    const std::vector<Stats> t = {Summarize(ms[0]), Summarize(ms[1])};
    const double f_ms = t[0].median_ms, e_ms = t[1].median_ms;
    const double f_per = f_ms / static_cast<double>(n), e_per = e_ms / static_cast<double>(n);
    if (fedavg_per_update0 == 0) {
      fedavg_per_update0 = f_per;
      exact_per_update0 = e_per;
    }
    const double update_bytes = static_cast<double>(n) * static_cast<double>(params) * 4.0;
    rows.push_back(
        {std::to_string(n), Fmt("%.1f", f_ms), Fmt("%.1f", e_ms), Fmt("%.2f", e_ms / f_ms),
         Fmt("%.3f", f_per) + " (" + Fmt("%.2f", f_per / fedavg_per_update0) + ")",
         Fmt("%.3f", e_per) + " (" + Fmt("%.2f", e_per / exact_per_update0) + ")",
         peak[0] >= 0 ? Mb(static_cast<double>(peak[0])) : "n/a",
         peak[1] >= 0 ? Mb(static_cast<double>(peak[1])) : "n/a", Mb(update_bytes),
         peak[1] >= 0 ? Fmt("%.3f", static_cast<double>(peak[1]) / update_bytes) : "n/a"});
    points.push_back({{"updates", n},
                      {"fedavg", t[0].ToJson()},
                      {"exact", t[1].ToJson()},
                      {"ratio_exact_over_fedavg", e_ms / f_ms},
                      {"fedavg_ms_per_update", f_per},
                      {"exact_ms_per_update", e_per},
                      {"ratio_fedavg_per_update_vs_smallest", f_per / fedavg_per_update0},
                      {"ratio_exact_per_update_vs_smallest", e_per / exact_per_update0},
                      {"fedavg_peak_rss_delta_bytes", peak[0]},
                      {"exact_peak_rss_delta_bytes", peak[1]},
                      {"updates_bytes", update_bytes},
                      {"ratio_exact_peak_over_updates_bytes",
                       peak[1] >= 0 ? static_cast<double>(peak[1]) / update_bytes : -1.0}});
  }
  PrintTable(rows);
  const double raw = static_cast<double>(params) * 4.0;
  PrintTable({{"bytes per round per device", "PEFT blob", "raw f32 params", "blob/raw"},
              {"down (global)", Mb(static_cast<double>(down)), Mb(raw),
               Fmt("%.4f", static_cast<double>(down) / raw)},
              {"up (update)", Mb(static_cast<double>(up)), Mb(raw),
               Fmt("%.4f", static_cast<double>(up) / raw)},
              {"total", Mb(static_cast<double>(down + up)), Mb(2 * raw),
               Fmt("%.4f", static_cast<double>(down + up) / (2 * raw))}});
  return {{"shape", shape},
          {"rank", rank},
          {"targets", SplitCsv(flags.targets)},
          {"parameters", params},
          {"generate_seconds", gen_s},
          {"points", points},
          {"bytes_per_round_per_device",
           {{"down_bytes", down},
            {"up_bytes", up},
            {"total_bytes", down + up},
            {"raw_f32_param_bytes", raw}}}};
}

int Main(int argc, char** argv) {
  BenchFlags flags;
  flags.shapes = DefaultShapesDir();
  CLI::App app{
      "collm_aggregation_bench: FedAvg vs exact LoRA aggregation time and memory, and "
      "bytes per round, on synthetic updates"};
  app.add_option("--shapes", flags.shapes, "Directory of HF config.json shapes (NAME.json)")
      ->capture_default_str();
  app.add_option("--configs", flags.configs, "Comma-separated SHAPE:RANK adapter configurations")
      ->capture_default_str();
  app.add_option("--updates", flags.updates,
                 "Comma-separated update counts; the first is the "
                 "per-update baseline")
      ->capture_default_str();
  app.add_option("--targets", flags.targets, "LoRA target modules")->capture_default_str();
  app.add_option("--threads", flags.threads, "Torch intra-op threads (0 = torch's default)")
      ->capture_default_str();
  app.add_option("--iters", flags.iters, "Most timed rounds per measurement")
      ->capture_default_str();
  app.add_option("--min-time", flags.min_time,
                 "Stop timing a measurement after this many seconds (at least one round)")
      ->capture_default_str();
  app.add_option("--json", flags.json_path, "Also write the results as JSON to this path");
  app.add_flag("--quick", flags.quick, "Small counts and one configuration, for smoke tests");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  RequireShapesDir(flags.shapes);
  if (flags.quick) {
    flags.configs = "stories15M:8";
    flags.updates = "2,10";
    flags.min_time = 0.1;
  }
  if (flags.iters < 1) Die("--iters must be >= 1");
  if (flags.threads > 0) at::set_num_threads(flags.threads);
  // Large blocks always come from (and go back to) mmap, so freed aggregation buffers leave the
  // resident set and each peak-memory reading starts from the same floor.
  mallopt(M_MMAP_THRESHOLD, 256 * 1024);
  mallopt(M_TRIM_THRESHOLD, 1024 * 1024);
  const std::vector<int64_t> counts = ParsePositiveCsv(flags.updates, "--updates");

  std::printf("collm_aggregation_bench: %s, %ld cores online, torch threads %d, iters <= %d\n",
              CpuModel().c_str(), CoresOnline(), at::get_num_threads(), flags.iters);
  std::printf(
      "times are medians of Aggregate() (validation included); +peak = peak RSS added "
      "while aggregating\n");
  const auto t0 = Clock::now();
  json results = json::array();
  for (const std::string& c : SplitCsv(flags.configs)) {
    const size_t colon = c.find(':');
    if (colon == std::string::npos) Die("--configs entry '" + c + "' is not SHAPE:RANK");
    const auto rank = ParsePositiveCsv(c.substr(colon + 1), "--configs rank");
    results.push_back(RunConfig(flags, c.substr(0, colon), static_cast<int>(rank.at(0)), counts));
  }
  const double total_s = Seconds(t0, Clock::now());
  std::printf("\ntotal %.0f s\n", total_s);
  WriteJsonReport(flags.json_path, "collm_aggregation_bench",
                  {{"shapes", flags.shapes},
                   {"configs", SplitCsv(flags.configs)},
                   {"updates", counts},
                   {"targets", SplitCsv(flags.targets)},
                   {"threads", flags.threads},
                   {"iters", flags.iters},
                   {"min_time_s", flags.min_time},
                   {"quick", flags.quick}},
                  total_s, "configs", results);
  return 0;
}

}  // namespace
}  // namespace collm::bench

int main(int argc, char** argv) { return collm::bench::Main(argc, argv); }
