// Helpers shared by the scenario benchmarks (collm_runtime_bench, collm_lora_bench,
// collm_aggregation_bench): process facts (RSS, CPU, BLAS), interleaved median timing, random
// HF-named weights, the per-model driver (shared flags, one child process per model), the result
// table and the JSON report. Not a library for anything but benchmarks/.
#ifndef COLLM_BENCHMARKS_BENCH_UTIL_H_
#define COLLM_BENCHMARKS_BENCH_UTIL_H_

#include <ATen/core/TensorBody.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "collm/runtime/model_config.h"
#include "nlohmann/json.hpp"

namespace CLI {
class App;
}  // namespace CLI

namespace collm::bench {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

// Prints "PROGRAM: what" to stderr and exits with status 1.
[[noreturn]] void Die(const std::string& what);

template <typename T>
T OrDie(absl::StatusOr<T> v, const std::string& what) {
  if (!v.ok()) Die(what + ": " + v.status().ToString());
  return *std::move(v);
}
void OrDie(const absl::Status& s, const std::string& what);

std::vector<std::string> SplitCsv(const std::string& s);
// Comma-separated positive integers; Die()s naming `flag` on anything else.
std::vector<int64_t> ParsePositiveCsv(const std::string& s, const std::string& flag);
std::string Fmt(const char* format, double v);
std::string Mb(double bytes);  // "12.3 MB" (1e6 bytes).

// ---- Process facts
int64_t VmRssBytes();   // Current resident set (/proc/self/status VmRSS).
int64_t MaxRssBytes();  // Peak resident set so far (getrusage ru_maxrss).
// The BLAS libraries mapped into this process (with OpenBLAS's config and thread count).
std::string LoadedBlas();
std::string CpuModel();
long CoresOnline();

// ---- Timing
struct Stats {
  double median_ms = 0, min_ms = 0, max_ms = 0, mean_ms = 0;
  int iters = 0;
  json ToJson() const;
};
// REQUIRES: !ms.empty().
Stats Summarize(std::vector<double> ms);
double Seconds(Clock::time_point a, Clock::time_point b);

struct TimingOptions {
  int iters = 30;         // Most timed rounds.
  double min_time = 2.0;  // Stop once this many seconds were timed (always >= 3 rounds).
};

// Times each of `fns` in turn, interleaved (so a neighbour's load on the shared cores hits all
// of them alike), after `warmup` untimed rounds, until `opt.iters` rounds or `opt.min_time`
// seconds of timing, but at least 3 rounds. `reset` (may be empty) runs untimed after every call.
std::vector<Stats> Measure(const std::vector<std::function<void()>>& fns,
                           const std::function<void()>& reset, const TimingOptions& opt,
                           int warmup = 2);

// ---- Models
// HF-named random weights for `c`: N(0, 0.02) matrices, unit norms. Call under NoGradGuard.
std::map<std::string, at::Tensor> RandomWeights(const runtime::ModelConfig& c);

// ---- Driver
// $COLLM_MODELS_DIR/shapes, or "" when the variable is unset (then --shapes is required): the
// default of every --shapes flag.
std::string DefaultShapesDir();
// Dies with what to pass when `shapes` is empty (no --shapes and no COLLM_MODELS_DIR).
void RequireShapesDir(const std::string& shapes);

// The flags of a per-model driver (collm_runtime_bench, collm_lora_bench); a driver's own flags
// struct derives from it and adds its scenario's flags.
struct DriverFlags {
  std::string shapes = DefaultShapesDir();        // Directory of HF config.json shapes (NAME.json).
  std::string models = "stories15M,stories110M";  // Comma-separated shape names.
  int threads = 0;                                // Torch intra-op threads; 0 = torch's default.
  int iters = 30;                                 // Most timed iterations per measurement.
  double min_time = 2.0;   // Stop a measurement once this many seconds were timed (>= 3 iters).
  std::string json_path;   // Also write the results as JSON here ("" = no).
  bool quick = false;      // Few iterations, for smoke tests.
  std::string one_model;   // Hidden: run only this model in this process.
  std::string child_json;  // Hidden: where a child writes its model's JSON.

  TimingOptions timing() const { return {iters, min_time}; }
  // shapes, models, threads, iters, min_time_s, quick: the "flags" of the JSON report.
  json ToJson() const;
};

// Registers --shapes, --models (described by `models_help`), --threads, --iters, --min-time,
// --json, --quick and the hidden --one-model / --child-json on `app`.
void AddDriverFlags(CLI::App& app, DriverFlags& flags, const std::string& models_help);
// After parsing: --quick caps --iters at 5 and --min-time at 0.3 s; Die()s when --iters < 1.
void FinishDriverFlags(DriverFlags& flags);

// Re-executes this binary with its own arguments plus `--one-model NAME --child-json PATH` and
// returns the JSON the child wrote there, or {"model", "error"} when it failed.
json RunChild(const std::string& name, int argc, char** argv);

struct ModelRuns {
  json results = json::array();  // One object per model, in --models order.
  double total_s = 0;
  bool failed = false;  // Some model's child failed (its entry has "error").
};
// The per-model dispatch. In a child (--one-model NAME) it writes `run_one(NAME)` to --child-json
// and exits 0. In the parent it prints `banner` and a line saying how runs compare, runs every
// --models entry in a fresh child (RunChild) so each model's peak RSS is its own, prints a
// failed one, and returns them all.
ModelRuns RunEachModel(const DriverFlags& flags, int argc, char** argv, const std::string& banner,
                       const std::function<json(const std::string&)>& run_one);

// Writes {"benchmark", "machine", "flags", "total_seconds", results_key: results} to `path` and
// says so on stdout; nothing when `path` is empty. Die()s when it cannot write.
void WriteJsonReport(const std::string& path, const std::string& benchmark, const json& flags,
                     double total_s, const std::string& results_key, const json& results);

// Prints rows (the first is the header) as left-aligned columns indented by three spaces; a
// one-cell row is a section title printed as is, outside the columns.
void PrintTable(const std::vector<std::vector<std::string>>& rows);

}  // namespace collm::bench

#endif  // COLLM_BENCHMARKS_BENCH_UTIL_H_
