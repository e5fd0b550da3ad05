// collm_load_bench: open-loop load against a real collmd process, per co-serving scenario.
//
// For each scenario (inference-only, guarded, unguarded, training-only) it writes a YAML config,
// spawns collmd on free loopback ports, sends requests at their arrival times (Poisson at --rate,
// or an Azure LLM trace replay) over gRPC, and reports goodput (requests/s meeting both the TTFT
// and TPOT SLOs), SLO attainment, TTFT/TPOT percentiles and training progress from GetStats.
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
  double duration = 20, rate = 2, speedup = 1, slo_ttft_ms = 0, slo_tpot_ms = 0, slo_multiple = 5;
  double training_share = 0.5;
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
  v1::InferenceService::Stub* stub() { return stub_.get(); }
  v1::GetStatsResponse Stats() {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::GetStatsResponse s;
    grpc::Status st = stub_->GetStats(&ctx, v1::GetStatsRequest(), &s);
    if (!st.ok()) Die("GetStats: " + st.error_message());
    return s;
  }
  const std::string& log() const { return server_->process().log_path(); }

 private:
  std::unique_ptr<collm::testing::ServerProcess> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::InferenceService::Stub> stub_;
};

std::string WriteConfig(const Options& o, const Scenario& sc, const std::string& dir,
                        double ttft_ms, double tpot_ms) {
  std::ostringstream y;
  y << "model: \"" << o.model << "\"\n"
    << "runtime:\n  threads: " << o.threads << "\n"
    << "engine:\n"
    << "  training_share: " << (sc.training ? o.training_share : 0.0) << "\n"
    << "  slo_guard: " << (sc.slo_guard ? "true" : "false") << "\n"
    << "  slo:\n    default:\n"
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

struct ScenarioResult {
  json j;
  std::vector<std::string> row;
};

ScenarioResult RunScenario(const Options& o, const Scenario& sc,
                           const std::vector<Arrival>& arrivals, int vocab, double slo_ttft_s,
                           double slo_tpot_s) {
  const std::string dir = o.workdir + "/" + sc.name;
  fs::create_directories(dir);
  std::cerr << "[" << sc.name << "] starting collmd (" << dir << ")\n";
  Daemon d(o, dir, WriteConfig(o, sc, dir, slo_ttft_s * 1e3, slo_tpot_s * 1e3));
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
  app.add_option("--threads", o.threads, "runtime.threads for collmd (0 = torch default)")
      ->capture_default_str();
  app.add_option("--workdir", o.workdir, "configs and logs (default: a fresh temp dir)");
  app.add_option("--json", o.json_path, "also write JSON here");
  int saturation_probes = 6;
  double saturation_attainment = 0.9;
  app.add_flag("--find-saturation", find_saturation,
               "Poisson only: search the inference-only rate where SLO attainment falls below "
               "--saturation-attainment, then run the scenarios at 50% of it (overrides --rate)");
  app.add_option("--saturation-probes", saturation_probes, "inference-only runs in the search")
      ->capture_default_str();
  app.add_option("--saturation-attainment", saturation_attainment,
                 "attainment that counts as sustained")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (find_saturation && !o.trace.empty())
    Die("--find-saturation needs Poisson arrivals (no --trace)");
  if (o.duration <= 0 || o.rate <= 0 || o.speedup <= 0)
    Die("--duration, --rate, --speedup must be > 0");
  if (o.max_prompt < 2 || o.max_output < 1) Die("--max-prompt >= 2 and --max-output >= 1");
  if (!fs::exists(o.collmd)) Die("no collmd at " + o.collmd + " (--collmd)");
  if (o.model.empty()) Die("no model: pass --model DIR or set COLLM_MODELS_DIR");
  if (!fs::exists(o.model + "/config.json")) Die("no model at " + o.model + " (--model)");
  if (o.data.empty()) Die("no training data: pass --data JSONL or set COLLM_DATA_DIR");
  if (o.workdir.empty()) {
    char tmpl[] = "/tmp/collm_load_bench.XXXXXX";
    if (!mkdtemp(tmpl)) Die("mkdtemp");
    o.workdir = tmpl;
  }
  o.collmd = fs::absolute(o.collmd).string();
  o.model = fs::absolute(o.model).string();
  o.data = fs::absolute(o.data).string();

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
    Daemon d(o, dir, WriteConfig(o, cal, dir, 0, 0));
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

  // Saturation: double the rate while inference-only sustains the attainment, then bisect.
  json saturation = nullptr;
  if (find_saturation) {
    double lo = 0, hi = 0, r = o.rate;
    json probes = json::array();
    for (int i = 0; i < saturation_probes; ++i) {
      Options po = o;
      po.rate = r;
      ScenarioResult pr =
          RunScenario(po, {"saturation-probe-" + std::to_string(i), false, true, true},
                      PoissonArrivals(po), vocab, o.slo_ttft_ms / 1e3, o.slo_tpot_ms / 1e3);
      const double att =
          pr.j["slo_attainment"].is_null() ? 0.0 : pr.j["slo_attainment"].get<double>();
      std::cout << "saturation probe " << i << ": rate " << Fmt("%.2f", r) << " req/s, attainment "
                << Fmt("%.1f%%", att * 100) << "\n";
      probes.push_back({{"rate", r}, {"slo_attainment", att}});
      if (att >= saturation_attainment) {
        lo = r;
        r = hi > 0 ? (lo + hi) / 2 : r * 2;
      } else {
        hi = r;
        r = (lo + hi) / 2;
      }
    }
    if (lo <= 0) Die("inference-only missed the attainment even at " + Fmt("%.3f", hi) + " req/s");
    o.rate = lo / 2;
    arrivals = PoissonArrivals(o);
    std::cout << "saturation: " << Fmt("%.2f", lo) << " req/s sustained (upper bound "
              << (hi > 0 ? Fmt("%.2f", hi) : std::string("not found"))
              << "); scenarios run at 50% = " << Fmt("%.2f", o.rate) << " req/s ("
              << arrivals.size() << " requests)\n";
    load_desc += "; --find-saturation replaced the rate with " + Fmt("%.2f", o.rate) + " req/s";
    saturation = {{"sustained_rate", lo},
                  {"failing_rate", hi > 0 ? json(hi) : json(nullptr)},
                  {"attainment_threshold", saturation_attainment},
                  {"probes", probes},
                  {"rate_used", o.rate}};
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
    else
      Die("unknown scenario " + name);
    results.push_back(
        RunScenario(o, sc, arrivals, vocab, o.slo_ttft_ms / 1e3, o.slo_tpot_ms / 1e3));
  }

  std::vector<std::vector<std::string>> rows = {{"scenario", "sent", "ok", "failed", "goodput/s",
                                                 "SLO att", "TTFT p50", "TTFT p99", "TPOT p50",
                                                 "TPOT p99", "train steps/s", "held-out loss"}};
  for (const auto& r : results) rows.push_back(r.row);
  std::cout << "\n";
  PrintTable(rows);
  std::cout
      << "   (latencies in ms; goodput = requests meeting both SLOs / " << o.duration
      << " s; train steps/s over the send window; loss = GetStats live_held_out_loss at the end)\n";
  if (!o.trace.empty()) std::cout << "   NOTE: trace lengths were clamped (see above).\n";

  if (!o.json_path.empty()) {
    json j = {{"load", load_desc},
              {"requests", arrivals.size()},
              {"duration_s", o.duration},
              {"rate", o.trace.empty() ? json(o.rate) : json(nullptr)},
              {"trace", o.trace},
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
              {"scenarios", json::array()}};
    for (const auto& r : results) j["scenarios"].push_back(r.j);
    std::ofstream(o.json_path) << j.dump(2) << "\n";
    std::cout << "wrote " << o.json_path << "\n";
  }
  return 0;
}
