// collm_load_bench: open-loop load against a real collmd process, per co-serving scenario.
//
// For each scenario (inference-only, guarded, unguarded, training-only) it writes a YAML config,
// spawns collmd on free loopback ports, sends requests at their arrival times (Poisson at --rate,
// or an Azure LLM trace replay) over gRPC, and reports goodput (requests/s meeting both the TTFT
// and TPOT SLOs), SLO attainment, TTFT/TPOT percentiles and training progress from GetStats.
// With --target ADDR it starts nothing and sends the same load to a running InferenceService
// (a collm-router in front of replicas, or a collmd), as the one scenario "target".
// No torch: it only talks to the daemon. See benchmarks/README.md.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "collm/v1/inference.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "testing/process.h"

namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;
namespace v1 = collm::v1;
namespace fs = std::filesystem;

[[noreturn]] void Die(const std::string& what) {
  std::cerr << "collm_load_bench: " << what << "\n";
  std::exit(1);
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
  if (!out) Die("cannot write " + path);
}

std::string EnvOr(const char* var, const std::string& suffix, const std::string& fallback) {
  const char* v = std::getenv(var);
  return (v && *v) ? std::string(v) + suffix : fallback;
}

double Secs(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Nearest-rank percentile; NaN when empty.
double Pct(std::vector<double> v, double p) {
  if (v.empty()) return std::nan("");
  std::sort(v.begin(), v.end());
  size_t k = static_cast<size_t>(std::ceil(p / 100.0 * v.size()));
  if (k == 0) k = 1;
  return v[std::min(k, v.size()) - 1];
}

std::string Fmt(const char* f, double v) {
  if (std::isnan(v)) return "-";
  char buf[64];
  snprintf(buf, sizeof(buf), f, v);
  return buf;
}

// ---- The daemon

struct Scenario {
  std::string name;
  bool training = false;
  bool slo_guard = true;
  bool requests = true;
};

struct Options {
  std::string collmd, model, data, trace, json_path, scenarios, workdir;
  std::string target;  // host:port of a running InferenceService; "" = start collmd per scenario.
  double duration = 20, rate = 2, speedup = 1, slo_ttft_ms = 0, slo_tpot_ms = 0, slo_multiple = 5;
  double training_share = 0.5;
  std::string admission = "none";  // engine.admission (the saturation search always uses none).
  double max_phase_ms = 0;         // engine.max_phase_ms.
  int max_prompt = 256, max_output = 64, prompt_len = 64, output_len = 32, threads = 0;
  int publish_every = 5, calib_requests = 5, max_examples = 400;
  uint64_t seed = 42;
};

// collmd for one scenario (testing/process.h: log file, ports file, SIGTERM then SIGKILL after
// 15 s when destroyed), with an inference stub on its gRPC port.
class Daemon {
 public:
  Daemon(const Options& o, const std::string& dir, const std::string& config) {
    collm::testing::ServerProcess::Options server;
    server.binary = o.collmd;
    server.config = config;
    server.dir = dir;
    server.name = "collmd";
    server.stop_grace = std::chrono::seconds(15);
    auto started = collm::testing::ServerProcess::Start(std::move(server));
    if (!started.ok()) Die(std::string(started.status().message()));
    server_ = *std::move(started);
    grpc::ChannelArguments ch;
    ch.SetMaxReceiveMessageSize(64 << 20);
    channel_ =
        grpc::CreateCustomChannel(server_->address(), grpc::InsecureChannelCredentials(), ch);
    stub_ = v1::InferenceService::NewStub(channel_);
  }
  // A running InferenceService at `address` (--target): nothing is started or stopped.
  explicit Daemon(const std::string& address) {
    grpc::ChannelArguments ch;
    ch.SetMaxReceiveMessageSize(64 << 20);
    channel_ = grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), ch);
    stub_ = v1::InferenceService::NewStub(channel_);
  }
  v1::InferenceService::Stub* stub() { return stub_.get(); }
  v1::GetStatsResponse Stats() {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::GetStatsResponse s;
    grpc::Status st = stub_->GetStats(&ctx, v1::GetStatsRequest(), &s);
    if (!st.ok()) Die("GetStats: " + st.error_message());
    return s;
  }
  std::string log() const { return server_ ? server_->process().log_path() : std::string(); }

 private:
  std::unique_ptr<collm::testing::ServerProcess> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::InferenceService::Stub> stub_;
};

std::string WriteConfig(const Options& o, const Scenario& sc, const std::string& dir,
                        double ttft_ms, double tpot_ms) {
  // Written only when set, so the benchmark also drives a collmd that predates these keys.
  std::string engine_extra;
  if (o.admission != "none") engine_extra += "  admission: " + o.admission + "\n";
  if (o.max_phase_ms > 0) engine_extra += "  max_phase_ms: " + Fmt("%g", o.max_phase_ms) + "\n";
  std::ostringstream y;
  y << "model: \"" << o.model << "\"\n"
    << "runtime:\n  threads: " << o.threads << "\n"
    << "engine:\n"
    << "  training_share: " << (sc.training ? o.training_share : 0.0) << "\n"
    << "  slo_guard: " << (sc.slo_guard ? "true" : "false") << "\n"
    << engine_extra << "  slo:\n    default:\n"
    << "      ttft_ms: " << ttft_ms << "\n"
    << "      tpot_ms: " << tpot_ms << "\n"
    << "training:\n"
    << "  enabled: " << (sc.training ? "true" : "false") << "\n";
  if (sc.training) {
    y << "  data: [\"" << o.data << "\"]\n"
      << "  dataset:\n    prompt_field: question\n    completion_field: answer\n"
      << "    max_examples: " << o.max_examples << "\n"
      << "  publish:\n    every_steps: " << o.publish_every << "\n";
  }
  y << "server:\n  address: 127.0.0.1:0\n"
    << "metrics:\n  address: 127.0.0.1:0\n"
    << "logging:\n  level: warn\n"
    << "shutdown_grace_seconds: 2\n";
  const std::string path = dir + "/collmd.yaml";
  WriteFile(path, y.str());
  return path;
}

// ---- Requests

struct Arrival {
  double at_s;  // Offset from the start of the scenario.
  int prompt_len, output_len;
};

struct Result {
  bool ok = false;
  std::string error;
  double ttft_s = std::nan(""), tpot_s = std::nan(""), e2e_s = std::nan("");
  int tokens = 0;
};

std::vector<int32_t> SyntheticPrompt(int len, int vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> tok(3, std::max(4, vocab - 1));  // Skip unk/bos/eos.
  std::vector<int32_t> ids(len);
  ids[0] = 1;  // BOS.
  for (int i = 1; i < len; ++i) ids[i] = tok(rng);
  return ids;
}

Result RunOne(v1::InferenceService::Stub* stub, const Arrival& a, int vocab, uint64_t seed,
              double deadline_s) {
  v1::GenerateRequest req;
  for (int32_t id : SyntheticPrompt(a.prompt_len, vocab, seed))
    req.mutable_prompt_tokens()->add_ids(id);
  req.mutable_sampling()->set_temperature(0);
  req.mutable_sampling()->set_max_tokens(a.output_len);
  req.mutable_sampling()->set_ignore_eos(true);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(static_cast<int64_t>(deadline_s * 1000)));
  Result r;
  const auto t0 = Clock::now();
  Clock::time_point first, last;
  int first_tokens = 0;
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse msg;
  while (reader->Read(&msg)) {
    if (msg.token_ids_size() == 0) continue;
    const auto now = Clock::now();
    if (r.tokens == 0) {
      first = now;
      first_tokens = msg.token_ids_size();
    }
    last = now;
    r.tokens += msg.token_ids_size();
  }
  grpc::Status st = reader->Finish();
  const auto end = Clock::now();
  r.e2e_s = Secs(t0, end);
  r.ok = st.ok() && r.tokens > 0;
  if (!st.ok()) r.error = std::to_string(st.error_code()) + ": " + st.error_message();
  if (r.tokens > 0) {
    r.ttft_s = Secs(t0, first);
    const int after = r.tokens - first_tokens;
    r.tpot_s = after > 0 ? Secs(first, last) / after : 0.0;
  }
  return r;
}

// ---- Arrivals

std::vector<Arrival> PoissonArrivals(const Options& o) {
  std::mt19937_64 rng(o.seed);
  std::exponential_distribution<double> gap(o.rate);
  std::vector<Arrival> out;
  for (double t = gap(rng); t < o.duration; t += gap(rng)) {
    out.push_back({t, std::min(o.prompt_len, o.max_prompt), std::min(o.output_len, o.max_output)});
  }
  return out;
}

// Days since 1970-01-01 (Howard Hinnant's days_from_civil).
int64_t DaysFromCivil(int64_t y, unsigned m, unsigned d) {
  y -= m <= 2;
  const int64_t era = (y >= 0 ? y : y - 399) / 400;
  const unsigned yoe = static_cast<unsigned>(y - era * 400);
  const unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
  const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + static_cast<int64_t>(doe) - 719468;
}

// Azure LLM inference trace 2023: TIMESTAMP (YYYY-MM-DD HH:MM:SS.fffffff), ContextTokens,
// GeneratedTokens. Takes the first duration*speedup seconds of trace time, compressed by speedup.
std::vector<Arrival> TraceArrivals(const Options& o, int* clamped_prompts, int* clamped_outputs) {
  std::ifstream in(o.trace);
  if (!in) Die("cannot read trace " + o.trace);
  std::string line;
  std::getline(in, line);  // Header.
  std::vector<Arrival> out;
  double t_first = -1;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    int Y, M, D, h, m, ctx_tokens, gen_tokens;
    double s;
    if (sscanf(line.c_str(), "%d-%d-%d %d:%d:%lf,%d,%d", &Y, &M, &D, &h, &m, &s, &ctx_tokens,
               &gen_tokens) != 8) {
      Die("bad trace line: " + line);
    }
    const double t = DaysFromCivil(Y, M, D) * 86400.0 + h * 3600.0 + m * 60.0 + s;
    if (t_first < 0) t_first = t;
    const double at = (t - t_first) / o.speedup;
    if (at >= o.duration) break;
    const int p = std::max(2, std::min(ctx_tokens, o.max_prompt));
    const int g = std::max(1, std::min(gen_tokens, o.max_output));
    *clamped_prompts += ctx_tokens > o.max_prompt;
    *clamped_outputs += gen_tokens > o.max_output;
    out.push_back({at, p, g});
  }
  return out;
}

// ---- Scenarios

// The Wilson score interval (95%) of a proportion good / n: what an attainment measured on n
// requests can be trusted to.
struct Interval {
  double lo = 0, hi = 1;
};
Interval Wilson(int good, int n) {
  if (n <= 0) return {};
  const double z = 1.959964, p = static_cast<double>(good) / n, z2n = z * z / n;
  const double center = (p + z2n / 2) / (1 + z2n);
  const double half = z * std::sqrt(p * (1 - p) / n + z2n / (4.0 * n)) / (1 + z2n);
  return {std::max(0.0, center - half), std::min(1.0, center + half)};
}
std::string IntervalText(const Interval& i) {
  return "[" + Fmt("%.1f", i.lo * 100) + ", " + Fmt("%.1f", i.hi * 100) + "]%";
}

// Comma-separated positive numbers in ascending order; dies naming `flag` otherwise.
std::vector<double> ParseFractions(const std::string& csv, const std::string& flag) {
  std::vector<double> out;
  std::stringstream ss(csv);
  for (std::string item; std::getline(ss, item, ',');) {
    char* end = nullptr;
    const double v = std::strtod(item.c_str(), &end);
    if (item.empty() || end == item.c_str() || *end != '\0' || !(v > 0) ||
        (!out.empty() && v <= out.back())) {
      Die(flag + " must be ascending positive numbers, got '" + csv + "'");
    }
    out.push_back(v);
  }
  if (out.empty()) Die(flag + " must not be empty");
  return out;
}

// Poisson options whose duration gives about `min_requests` arrivals at o.rate (never shorter
// than o.duration), so every attainment stands on enough requests.
Options WithEnoughRequests(Options o, int min_requests) {
  o.duration = std::max(o.duration, static_cast<double>(min_requests) / o.rate);
  return o;
}

struct ScenarioResult {
  json j;
  std::vector<std::string> row;
};

ScenarioResult RunScenario(const Options& o, const Scenario& sc,
                           const std::vector<Arrival>& arrivals, int vocab, double slo_ttft_s,
                           double slo_tpot_s) {
  const std::string dir = o.workdir + "/" + sc.name;
  fs::create_directories(dir);
  std::unique_ptr<Daemon> daemon;
  if (o.target.empty()) {
    std::cerr << "[" << sc.name << "] starting collmd (" << dir << ")\n";
    daemon = std::make_unique<Daemon>(o, dir,
                                      WriteConfig(o, sc, dir, slo_ttft_s * 1e3, slo_tpot_s * 1e3));
  } else {
    std::cerr << "[" << sc.name << "] sending to " << o.target << "\n";
    daemon = std::make_unique<Daemon>(o.target);
  }
  Daemon& d = *daemon;
  const auto s0 = d.Stats();
  std::vector<Result> results(sc.requests ? arrivals.size() : 0);
  const auto t0 = Clock::now();
  std::vector<std::thread> threads;
  if (sc.requests) {
    threads.reserve(arrivals.size());
    for (size_t i = 0; i < arrivals.size(); ++i) {
      threads.emplace_back([&, i] {
        std::this_thread::sleep_until(t0 + std::chrono::duration_cast<Clock::duration>(
                                               std::chrono::duration<double>(arrivals[i].at_s)));
        results[i] = RunOne(d.stub(), arrivals[i], vocab, o.seed * 1000003 + i, o.duration + 120);
      });
    }
  }
  std::this_thread::sleep_until(
      t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.duration)));
  const auto s1 = d.Stats();  // Training progress over exactly the send window.
  const double window = Secs(t0, Clock::now());
  for (auto& t : threads) t.join();
  const double drained = Secs(t0, Clock::now());
  const auto s2 = d.Stats();

  int ok = 0, failed = 0, good = 0;
  std::vector<double> ttft, tpot, e2e;
  std::string first_error;
  for (const Result& r : results) {
    if (!r.ok) {
      ++failed;
      if (first_error.empty()) first_error = r.error;
      continue;
    }
    ++ok;
    ttft.push_back(r.ttft_s * 1e3);
    tpot.push_back(r.tpot_s * 1e3);
    e2e.push_back(r.e2e_s * 1e3);
    good += r.ttft_s <= slo_ttft_s && r.tpot_s <= slo_tpot_s;
  }
  const int sent = static_cast<int>(results.size());
  const double goodput = good / o.duration;
  const double attainment = sent > 0 ? static_cast<double>(good) / sent : std::nan("");
  const int64_t steps = s1.train_optimizer_steps() - s0.train_optimizer_steps();
  const double steps_per_s = steps / window;
  const double loss = s2.live_held_out_loss();

  ScenarioResult out;
  out.j = {{"scenario", sc.name},
           {"training", sc.training},
           {"slo_guard", sc.slo_guard},
           {"sent", sent},
           {"ok", ok},
           {"failed", failed},
           {"good", good},
           {"goodput_rps", goodput},
           {"slo_attainment", sent > 0 ? json(attainment) : json(nullptr)},
           {"slo_attainment_ci95",
            sent > 0 ? json({Wilson(good, sent).lo, Wilson(good, sent).hi}) : json(nullptr)},
           {"ttft_ms", {{"p50", Pct(ttft, 50)}, {"p99", Pct(ttft, 99)}}},
           {"tpot_ms", {{"p50", Pct(tpot, 50)}, {"p99", Pct(tpot, 99)}}},
           {"e2e_ms", {{"p50", Pct(e2e, 50)}, {"p99", Pct(e2e, 99)}}},
           {"window_s", window},
           {"drained_s", drained},
           {"train_optimizer_steps", steps},
           {"train_steps_per_s", steps_per_s},
           {"train_time_share", s1.train_time_share()},
           {"live_held_out_loss", loss},
           {"published_versions", s2.published_versions()},
           {"daemon_completed", s2.completed() - s0.completed()},
           {"daemon_slo_met", s2.slo_met() - s0.slo_met()},
           {"daemon_rejected_queue_full", s2.rejected_queue_full() - s0.rejected_queue_full()},
           {"first_error", first_error},
           {"collmd_log", d.log()}};
  if (!first_error.empty()) std::cerr << "[" << sc.name << "] first error: " << first_error << "\n";
  out.row = {sc.name,
             std::to_string(sent),
             std::to_string(ok),
             std::to_string(failed),
             Fmt("%.2f", goodput),
             sent > 0 ? Fmt("%.1f%%", attainment * 100) : "-",
             sent > 0 ? IntervalText(Wilson(good, sent)) : "-",
             Fmt("%.1f", Pct(ttft, 50)),
             Fmt("%.1f", Pct(ttft, 99)),
             Fmt("%.2f", Pct(tpot, 50)),
             Fmt("%.2f", Pct(tpot, 99)),
             Fmt("%.2f", steps_per_s),
             sc.training && loss >= 0 ? Fmt("%.4f", loss) : "-"};
  return out;
}

void PrintTable(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> w;
  for (const auto& r : rows) {
    if (w.size() < r.size()) w.resize(r.size(), 0);
    for (size_t i = 0; i < r.size(); ++i) w[i] = std::max(w[i], r[i].size());
  }
  for (const auto& r : rows) {
    std::cout << "   ";
    for (size_t i = 0; i < r.size(); ++i) {
      std::cout << r[i] << std::string(w[i] - r[i].size() + 2, ' ');
    }
    std::cout << "\n";
  }
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  o.collmd = "build/src/collmd";
  o.model = EnvOr("COLLM_MODELS_DIR", "/stories260K-hf", "");
  o.data = EnvOr("COLLM_DATA_DIR", "/finetune/gsm8k/train.jsonl", "");
  o.scenarios = "inference-only,guarded,unguarded,training-only";
  bool find_saturation = false;
  CLI::App app{
      "collm_load_bench: open-loop load (Poisson or Azure trace) against collmd per co-serving "
      "scenario"};
  app.add_option("--collmd", o.collmd, "collmd binary")->capture_default_str();
  app.add_option("--target", o.target,
                 "host:port of a running InferenceService (e.g. collm-router) to load instead of "
                 "starting collmd; runs the one scenario 'target'");
  app.add_option("--model", o.model, "HF model directory")->capture_default_str();
  app.add_option("--data", o.data, "training JSONL (question/answer fields)")
      ->capture_default_str();
  app.add_option("--scenarios", o.scenarios, "comma-separated scenarios")->capture_default_str();
  app.add_option("--duration", o.duration, "seconds of arrivals per scenario")
      ->capture_default_str();
  app.add_option("--rate", o.rate, "Poisson arrival rate (req/s), without --trace")
      ->capture_default_str();
  app.add_option("--seed", o.seed, "arrival and prompt seed")->capture_default_str();
  app.add_option("--prompt-len", o.prompt_len, "Poisson: prompt tokens")->capture_default_str();
  app.add_option("--output-len", o.output_len, "Poisson: output tokens")->capture_default_str();
  app.add_option("--trace", o.trace, "Azure LLM trace CSV to replay instead of Poisson");
  app.add_option("--speedup", o.speedup, "trace time compression factor")->capture_default_str();
  app.add_option("--max-prompt", o.max_prompt, "clamp prompt lengths")->capture_default_str();
  app.add_option("--max-output", o.max_output, "clamp output lengths")->capture_default_str();
  app.add_option("--slo-ttft-ms", o.slo_ttft_ms, "TTFT SLO (ms); 0 = multiple of unloaded");
  app.add_option("--slo-tpot-ms", o.slo_tpot_ms, "TPOT SLO (ms); 0 = multiple of unloaded");
  app.add_option("--slo-multiple", o.slo_multiple, "SLO = this x unloaded latency when not given")
      ->capture_default_str();
  app.add_option("--training-share", o.training_share, "engine.training_share when training")
      ->capture_default_str();
  app.add_option("--publish-every", o.publish_every, "training.publish.every_steps")
      ->capture_default_str();
  app.add_option("--max-examples", o.max_examples,
                 "training.dataset.max_examples (10% are held out and evaluated at each publish)")
      ->capture_default_str();
  app.add_option("--admission", o.admission,
                 "engine.admission for the scenarios: none, reject or deprioritize")
      ->capture_default_str();
  app.add_option("--max-phase-ms", o.max_phase_ms, "engine.max_phase_ms (0 = no bound)")
      ->capture_default_str();
  app.add_option("--threads", o.threads, "runtime.threads for collmd (0 = torch default)")
      ->capture_default_str();
  app.add_option("--workdir", o.workdir, "configs and logs (default: a fresh temp dir)");
  app.add_option("--json", o.json_path, "also write JSON here");
  int saturation_probes = 6, saturation_bisect = 3, min_requests = 200;
  double saturation_attainment = 0.9;
  std::string sweep_fractions = "0.5,0.75,1,1.25,1.5", load_fractions = "0.5";
  app.add_flag("--find-saturation", find_saturation,
               "Poisson only: find the highest inference-only rate that keeps "
               "--saturation-attainment (search from --rate, verified by a sweep), then run the "
               "scenarios at --load-fractions of it (overrides --rate)");
  app.add_option("--saturation-probes", saturation_probes,
                 "doubling probes of the search (from --rate) before it gives up on finding a "
                 "failing rate")
      ->capture_default_str();
  app.add_option("--saturation-bisect", saturation_bisect,
                 "bisection probes between the last holding and the first failing rate")
      ->capture_default_str();
  app.add_option("--saturation-attainment", saturation_attainment,
                 "attainment that counts as sustained")
      ->capture_default_str();
  app.add_option("--sweep-fractions", sweep_fractions,
                 "the verifying sweep: fractions of the searched rate, ascending")
      ->capture_default_str();
  app.add_option("--load-fractions", load_fractions,
                 "with --find-saturation: fractions of the saturation rate to run the scenarios at")
      ->capture_default_str();
  app.add_option("--min-requests", min_requests,
                 "Poisson: each probe and scenario runs long enough for about this many requests "
                 "(never shorter than --duration)")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (o.admission != "none" && o.admission != "reject" && o.admission != "deprioritize")
    Die("--admission must be none, reject or deprioritize, got '" + o.admission + "'");
  if (!(o.max_phase_ms >= 0)) Die("--max-phase-ms must be >= 0");
  if (saturation_probes < 1 || saturation_bisect < 0 || min_requests < 1)
    Die("--saturation-probes >= 1, --saturation-bisect >= 0, --min-requests >= 1");
  if (!(saturation_attainment > 0 && saturation_attainment <= 1))
    Die("--saturation-attainment must be in (0, 1]");

  if (find_saturation && !o.trace.empty())
    Die("--find-saturation needs Poisson arrivals (no --trace)");
  if (o.duration <= 0 || o.rate <= 0 || o.speedup <= 0)
    Die("--duration, --rate, --speedup must be > 0");
  if (o.max_prompt < 2 || o.max_output < 1) Die("--max-prompt >= 2 and --max-output >= 1");
  if (!o.target.empty()) {
    // The target's own configuration decides training and SLO handling; only the load is ours.
    if (find_saturation) Die("--find-saturation starts its own daemons; not with --target");
    o.scenarios = "target";
  }
  if (o.target.empty() && !fs::exists(o.collmd)) Die("no collmd at " + o.collmd + " (--collmd)");
  if (o.model.empty()) Die("no model: pass --model DIR or set COLLM_MODELS_DIR");
  if (!fs::exists(o.model + "/config.json")) Die("no model at " + o.model + " (--model)");
  if (o.target.empty() && o.data.empty())
    Die("no training data: pass --data JSONL or set COLLM_DATA_DIR");
  if (o.workdir.empty()) {
    char tmpl[] = "/tmp/collm_load_bench.XXXXXX";
    if (!mkdtemp(tmpl)) Die("mkdtemp");
    o.workdir = tmpl;
  }
  o.collmd = fs::absolute(o.collmd).string();
  o.model = fs::absolute(o.model).string();
  if (!o.data.empty()) o.data = fs::absolute(o.data).string();

  const json model_cfg = json::parse(ReadFile(o.model + "/config.json"));
  const int vocab = model_cfg.value("vocab_size", 32000);
  const int max_pos = model_cfg.value("max_position_embeddings", 2048);
  if (o.max_prompt + o.max_output > max_pos) {
    Die("--max-prompt + --max-output exceeds the model's context " + std::to_string(max_pos));
  }

  // Arrivals, identical for every scenario.
  int clamped_p = 0, clamped_o = 0;
  std::vector<Arrival> arrivals =
      o.trace.empty() ? PoissonArrivals(o) : TraceArrivals(o, &clamped_p, &clamped_o);
  std::string load_desc;
  if (o.trace.empty()) {
    load_desc = "Poisson " + Fmt("%.2f", o.rate) + " req/s, seed " + std::to_string(o.seed) +
                ", prompt " + std::to_string(std::min(o.prompt_len, o.max_prompt)) + " / output " +
                std::to_string(std::min(o.output_len, o.max_output)) + " tokens";
  } else {
    load_desc = "trace " + fs::path(o.trace).filename().string() + ", first " +
                Fmt("%.1f", o.duration * o.speedup) + " s at " + Fmt("%.1fx", o.speedup) +
                " speedup; lengths CLAMPED to prompt <= " + std::to_string(o.max_prompt) + " (" +
                std::to_string(clamped_p) + " clamped), output <= " + std::to_string(o.max_output) +
                " (" + std::to_string(clamped_o) + " clamped)";
  }
  std::cout << "collm_load_bench: " << arrivals.size() << " requests over " << o.duration << " s ("
            << load_desc << ")\n";

  // SLOs: given, or a multiple of the unloaded latency measured on an inference-only daemon.
  double unloaded_ttft_ms = std::nan(""), unloaded_tpot_ms = std::nan("");
  if (o.slo_ttft_ms <= 0 || o.slo_tpot_ms <= 0) {
    const std::string dir = o.workdir + "/calibrate";
    fs::create_directories(dir);
    Scenario cal{"calibrate", false, true, true};
    // With --target, unloaded latency is measured through it (router hop included).
    std::unique_ptr<Daemon> daemon =
        o.target.empty() ? std::make_unique<Daemon>(o, dir, WriteConfig(o, cal, dir, 0, 0))
                         : std::make_unique<Daemon>(o.target);
    Daemon& d = *daemon;
    int p = std::min(o.prompt_len, o.max_prompt), g = std::min(o.output_len, o.max_output);
    if (!o.trace.empty() && !arrivals.empty()) {  // Median lengths of the replayed window.
      std::vector<double> ps, gs;
      for (const auto& a : arrivals) ps.push_back(a.prompt_len), gs.push_back(a.output_len);
      p = static_cast<int>(Pct(ps, 50));
      g = std::max(2, static_cast<int>(Pct(gs, 50)));
    }
    std::vector<double> ttft, tpot;
    for (int i = 0; i <= o.calib_requests; ++i) {  // The first is warmup.
      Result r = RunOne(d.stub(), {0, p, std::max(2, g)}, vocab, 7 + i, 120);
      if (!r.ok) Die("calibration request failed: " + r.error + "; log " + d.log());
      if (i == 0) continue;
      ttft.push_back(r.ttft_s * 1e3);
      tpot.push_back(r.tpot_s * 1e3);
    }
    unloaded_ttft_ms = Pct(ttft, 50);
    unloaded_tpot_ms = Pct(tpot, 50);
    if (o.slo_ttft_ms <= 0) o.slo_ttft_ms = o.slo_multiple * unloaded_ttft_ms;
    if (o.slo_tpot_ms <= 0) o.slo_tpot_ms = o.slo_multiple * unloaded_tpot_ms;
    std::cout << "unloaded latency (median of " << o.calib_requests
              << " sequential requests, prompt " << p << ", output " << std::max(2, g) << "): TTFT "
              << Fmt("%.2f", unloaded_ttft_ms) << " ms, TPOT " << Fmt("%.3f", unloaded_tpot_ms)
              << " ms\n";
  }
  auto multiple = [](double slo, double unloaded) {
    return std::isnan(unloaded) ? std::string("given") : Fmt("%.1fx", slo / unloaded) + " unloaded";
  };
  std::cout << "SLO: TTFT <= " << Fmt("%.2f", o.slo_ttft_ms) << " ms ("
            << multiple(o.slo_ttft_ms, unloaded_ttft_ms)
            << "), TPOT <= " << Fmt("%.3f", o.slo_tpot_ms) << " ms ("
            << multiple(o.slo_tpot_ms, unloaded_tpot_ms) << ")\n";

  // Saturation: the highest rate at which inference-only keeps the attainment target. Searched
  // (double the rate while it holds, then bisect), then verified by a plain sweep around it; every
  // probe sends at least --min-requests requests and prints the Wilson interval of its attainment.
  json saturation = nullptr;
  double saturation_rate = 0;
  if (find_saturation) {
    auto probe = [&](const std::string& name, double rate) {
      Options po = o;
      po.rate = rate;
      po.admission = "none";  // Saturation is the engine's own, without shedding.
      po = WithEnoughRequests(po, min_requests);
      ScenarioResult pr = RunScenario(po, {name, false, true, true}, PoissonArrivals(po), vocab,
                                      o.slo_ttft_ms / 1e3, o.slo_tpot_ms / 1e3);
      const int sent = pr.j["sent"].get<int>(), good = pr.j["good"].get<int>();
      const double att = sent > 0 ? static_cast<double>(good) / sent : 0.0;
      const Interval ci = Wilson(good, sent);
      json j = {{"rate", rate},
                {"sent", sent},
                {"good", good},
                {"slo_attainment", att},
                {"slo_attainment_ci95", {ci.lo, ci.hi}},
                {"goodput_rps", pr.j["goodput_rps"]}};
      std::cout << name << ": rate " << Fmt("%.2f", rate) << " req/s, " << sent
                << " requests, attainment " << Fmt("%.1f%%", att * 100) << " (95% CI "
                << IntervalText(ci) << ")\n";
      return j;
    };
    double lo = 0, hi = 0, r = o.rate;
    json search = json::array();
    // Doubling (or halving, when --rate already fails) until a holding and a failing rate are
    // known, then bisection between them.
    for (int probes = 0, bisected = 0;; ++probes) {
      const bool bracketed = lo > 0 && hi > 0;
      if (bracketed ? bisected >= saturation_bisect : probes >= saturation_probes) break;
      json j = probe("saturation-search-" + std::to_string(probes), r);
      search.push_back(j);
      if (j["slo_attainment"].get<double>() >= saturation_attainment) {
        lo = r;
      } else {
        hi = r;
      }
      if (bracketed) ++bisected;
      r = lo > 0 && hi > 0 ? (lo + hi) / 2 : (hi > 0 ? hi / 2 : lo * 2);
    }
    if (lo <= 0) Die("inference-only missed the attainment even at " + Fmt("%.3f", hi) + " req/s");
    // The plain sweep: fixed fractions of the searched rate, each run on its own.
    json sweep = json::array();
    std::vector<std::vector<std::string>> sweep_rows = {
        {"x searched", "rate", "sent", "SLO att", "att 95% CI", "goodput/s", "holds"}};
    double sweep_sustained = 0;
    bool below_all_hold = true;
    for (double f : ParseFractions(sweep_fractions, "--sweep-fractions")) {
      json j = probe("saturation-sweep-" + Fmt("%.2f", f), lo * f);
      const bool holds = j["slo_attainment"].get<double>() >= saturation_attainment;
      if (holds && below_all_hold) sweep_sustained = lo * f;
      if (!holds) below_all_hold = false;
      j["fraction_of_searched"] = f;
      j["holds"] = holds;
      const auto ci = j["slo_attainment_ci95"];
      sweep_rows.push_back({Fmt("%.2f", f), Fmt("%.2f", lo * f),
                            std::to_string(j["sent"].get<int>()),
                            Fmt("%.1f%%", j["slo_attainment"].get<double>() * 100),
                            IntervalText({ci[0].get<double>(), ci[1].get<double>()}),
                            Fmt("%.2f", j["goodput_rps"].get<double>()), holds ? "yes" : "no"});
      sweep.push_back(j);
    }
    std::cout << "\nsaturation sweep (inference-only, target attainment "
              << Fmt("%.0f%%", saturation_attainment * 100) << "):\n";
    PrintTable(sweep_rows);
    // The sweep is the plain measurement: where it disagrees with the search, it wins.
    const bool verified = sweep_sustained > 0 && std::abs(sweep_sustained - lo) <= 1e-9 * lo;
    saturation_rate = sweep_sustained > 0 ? sweep_sustained : lo;
    // Without a failing rate, in the search or at the sweep's top, the true saturation is higher.
    const bool lower_bound = hi <= 0 || (below_all_hold && sweep_sustained > 0);
    std::cout << "saturation: search " << Fmt("%.2f", lo) << " req/s (first failing "
              << (hi > 0 ? Fmt("%.2f", hi) : std::string("not found")) << "), sweep "
              << (sweep_sustained > 0 ? Fmt("%.2f", sweep_sustained) : std::string("none holds"))
              << " req/s: " << (verified ? "verified" : "NOT verified, using the sweep's rate")
              << "; saturation = " << Fmt("%.2f", saturation_rate) << " req/s"
              << (lower_bound ? " (a LOWER BOUND: no failing rate was found)" : "") << "\n";
    saturation = {{"rate", saturation_rate},
                  {"searched_rate", lo},
                  {"failing_rate", hi > 0 ? json(hi) : json(nullptr)},
                  {"verified_by_sweep", verified},
                  {"lower_bound", lower_bound},
                  {"attainment_threshold", saturation_attainment},
                  {"min_requests", min_requests},
                  {"search", search},
                  {"sweep", sweep}};
  }
  // The scenarios run at each load fraction of the saturation rate (or once at --rate).
  std::vector<double> fractions = {0};
  if (find_saturation) fractions = ParseFractions(load_fractions, "--load-fractions");
  const std::string base_desc =
      find_saturation ? "Poisson, seed " + std::to_string(o.seed) + ", prompt " +
                            std::to_string(std::min(o.prompt_len, o.max_prompt)) + " / output " +
                            std::to_string(std::min(o.output_len, o.max_output)) + " tokens"
                      : load_desc;
  const double base_duration = o.duration;
  json loads = json::array();
  std::vector<std::vector<std::string>> rows = {
      {"load", "scenario", "sent", "ok", "failed", "goodput/s", "SLO att", "att 95% CI", "TTFT p50",
       "TTFT p99", "TPOT p50", "TPOT p99", "train steps/s", "held-out loss"}};
  for (const double fraction : fractions) {
    std::string load_name = o.trace.empty() ? Fmt("%.2f req/s", o.rate) : std::string("trace");
    if (find_saturation) {
      o.rate = saturation_rate * fraction;
      o.duration = base_duration;
      o = WithEnoughRequests(o, min_requests);
      arrivals = PoissonArrivals(o);
      load_name = Fmt("%.0f%% sat", fraction * 100);
      load_desc = base_desc + "; " + load_name + " = " + Fmt("%.2f", o.rate) + " req/s of " +
                  Fmt("%.2f", saturation_rate) + " req/s saturation, " +
                  std::to_string(arrivals.size()) + " requests over " + Fmt("%.1f", o.duration) +
                  " s";
      std::cout << "\nscenarios at " << load_desc << "\n";
    }
    std::vector<ScenarioResult> results;
    for (const std::string& name : [&] {
           std::vector<std::string> v;
           std::stringstream ss(o.scenarios);
           for (std::string s; std::getline(ss, s, ',');)
             if (!s.empty()) v.push_back(s);
           return v;
         }()) {
      Scenario sc{name};
      if (name == "inference-only")
        sc = {name, false, true, true};
      else if (name == "guarded")
        sc = {name, true, true, true};
      else if (name == "unguarded")
        sc = {name, true, false, true};
      else if (name == "training-only")
        sc = {name, true, true, false};
      else if (name == "target" && !o.target.empty())
        sc = {name, false, true, true};  // Whatever the target does; requests are sent.
      else
        Die("unknown scenario " + name);
      if (find_saturation) sc.name = Fmt("%.0f", fraction * 100) + "pct-" + name;
      results.push_back(
          RunScenario(o, sc, arrivals, vocab, o.slo_ttft_ms / 1e3, o.slo_tpot_ms / 1e3));
    }
    json load = {{"load", load_desc},
                 {"fraction_of_saturation", find_saturation ? json(fraction) : json(nullptr)},
                 {"rate", o.trace.empty() ? json(o.rate) : json(nullptr)},
                 {"requests", arrivals.size()},
                 {"duration_s", o.duration},
                 {"scenarios", json::array()}};
    for (auto& r : results) {
      r.row.insert(r.row.begin(), load_name);
      rows.push_back(r.row);
      load["scenarios"].push_back(r.j);
    }
    loads.push_back(load);
  }
  std::cout << "\n";
  PrintTable(rows);
  std::cout << "   (latencies in ms; goodput = requests meeting both SLOs / the send window; "
               "att 95% CI = Wilson interval of the attainment; train steps/s over the send "
               "window; loss = GetStats live_held_out_loss at the end)\n";
  if (!o.trace.empty()) std::cout << "   NOTE: trace lengths were clamped (see above).\n";

  if (!o.json_path.empty()) {
    json j = {{"trace", o.trace},
              {"speedup", o.speedup},
              {"saturation", saturation},
              {"lengths_clamped", !o.trace.empty()},
              {"max_prompt", o.max_prompt},
              {"max_output", o.max_output},
              {"clamped_prompts", clamped_p},
              {"clamped_outputs", clamped_o},
              {"model", o.model},
              {"training_share", o.training_share},
              {"slo",
               {{"ttft_ms", o.slo_ttft_ms},
                {"tpot_ms", o.slo_tpot_ms},
                {"unloaded_ttft_ms",
                 std::isnan(unloaded_ttft_ms) ? json(nullptr) : json(unloaded_ttft_ms)},
                {"unloaded_tpot_ms",
                 std::isnan(unloaded_tpot_ms) ? json(nullptr) : json(unloaded_tpot_ms)},
                {"multiple", std::isnan(unloaded_ttft_ms) ? json(nullptr) : json(o.slo_multiple)}}},
              {"loads", loads}};
    std::ofstream(o.json_path) << j.dump(2) << "\n";
    std::cout << "wrote " << o.json_path << "\n";
  }
  return 0;
}
