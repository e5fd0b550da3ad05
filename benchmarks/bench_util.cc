#include "bench_util.h"

#include <ATen/ATen.h>
#include <dlfcn.h>
#include <errno.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <set>
#include <sstream>

#include "CLI/CLI.hpp"

namespace collm::bench {

void Die(const std::string& what) {
  std::cerr << program_invocation_short_name << ": " << what << "\n";
  std::exit(1);
}

void OrDie(const absl::Status& s, const std::string& what) {
  if (!s.ok()) Die(what + ": " + s.ToString());
}

std::vector<std::string> SplitCsv(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

std::vector<int64_t> ParsePositiveCsv(const std::string& s, const std::string& flag) {
  std::vector<int64_t> out;
  for (const std::string& item : SplitCsv(s)) {
    if (item.find_first_not_of("0123456789") != std::string::npos || std::stoll(item) < 1) {
      Die(flag + " must be positive integers, got '" + item + "'");
    }
    out.push_back(std::stoll(item));
  }
  return out;
}

std::string Fmt(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), format, v);
  return buf;
}

std::string Mb(double bytes) { return Fmt("%.1f MB", bytes / 1e6); }

int64_t VmRssBytes() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  }
  return -1;
}

int64_t MaxRssBytes() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<int64_t>(ru.ru_maxrss) * 1024;  // kB on Linux.
}

std::string LoadedBlas() {
  std::ifstream f("/proc/self/maps");
  std::string line;
  std::set<std::string> libs;
  while (std::getline(f, line)) {
    const size_t slash = line.find('/');
    if (slash == std::string::npos) continue;
    const std::string path = line.substr(slash);
    const std::string base = path.substr(path.rfind('/') + 1);
    if (base.find("blas") != std::string::npos || base.find("mkl") != std::string::npos) {
      libs.insert(path);
    }
  }
  std::string out;
  for (const std::string& l : libs) out += (out.empty() ? "" : ", ") + l;
  using IntFn = int (*)();
  using StrFn = char* (*)();
  if (auto cfg = reinterpret_cast<StrFn>(dlsym(RTLD_DEFAULT, "openblas_get_config"))) {
    out += std::string(" [") + cfg();
    if (auto n = reinterpret_cast<IntFn>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"))) {
      out += ", " + std::to_string(n()) + " threads";
    }
    out += "]";
  }
  return out.empty() ? "unknown" : out;
}

std::string CpuModel() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown";
}

long CoresOnline() { return sysconf(_SC_NPROCESSORS_ONLN); }

json Stats::ToJson() const {
  return {{"median_ms", median_ms},
          {"min_ms", min_ms},
          {"max_ms", max_ms},
          {"mean_ms", mean_ms},
          {"iters", iters}};
}

Stats Summarize(std::vector<double> ms) {
  Stats s;
  std::sort(ms.begin(), ms.end());
  s.iters = static_cast<int>(ms.size());
  const size_t n = ms.size();
  s.median_ms = n % 2 ? ms[n / 2] : 0.5 * (ms[n / 2 - 1] + ms[n / 2]);
  s.min_ms = ms.front();
  s.max_ms = ms.back();
  double sum = 0;
  for (double v : ms) sum += v;
  s.mean_ms = sum / n;
  return s;
}

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

std::vector<Stats> Measure(const std::vector<std::function<void()>>& fns,
                           const std::function<void()>& reset, const TimingOptions& opt,
                           int warmup) {
  for (int w = 0; w < warmup; ++w) {
    for (const auto& fn : fns) {
      fn();
      if (reset) reset();
    }
  }
  std::vector<std::vector<double>> ms(fns.size());
  double timed = 0;
  for (int it = 0; it < opt.iters && (it < 3 || timed < opt.min_time); ++it) {
    for (size_t i = 0; i < fns.size(); ++i) {
      const auto t0 = Clock::now();
      fns[i]();
      const auto t1 = Clock::now();
      if (reset) reset();
      ms[i].push_back(1e3 * Seconds(t0, t1));
      timed += Seconds(t0, t1);
    }
  }
  std::vector<Stats> out;
  for (auto& m : ms) out.push_back(Summarize(std::move(m)));
  return out;
}

std::map<std::string, at::Tensor> RandomWeights(const runtime::ModelConfig& c) {
  const int64_t d = c.hidden_size, ff = c.intermediate_size, v = c.vocab_size;
  const int64_t q = c.q_size(), kv = c.kv_size();
  std::map<std::string, at::Tensor> t;
  auto mat = [](std::vector<int64_t> shape) { return at::randn(shape).mul_(0.02); };
  t["model.embed_tokens.weight"] = mat({v, d});
  t["model.norm.weight"] = at::ones({d});
  if (!c.tie_word_embeddings) t["lm_head.weight"] = mat({v, d});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    t[p + "input_layernorm.weight"] = at::ones({d});
    t[p + "post_attention_layernorm.weight"] = at::ones({d});
    t[p + "self_attn.q_proj.weight"] = mat({q, d});
    t[p + "self_attn.k_proj.weight"] = mat({kv, d});
    t[p + "self_attn.v_proj.weight"] = mat({kv, d});
    t[p + "self_attn.o_proj.weight"] = mat({d, q});
    if (c.qkv_bias) {
      t[p + "self_attn.q_proj.bias"] = mat({q});
      t[p + "self_attn.k_proj.bias"] = mat({kv});
      t[p + "self_attn.v_proj.bias"] = mat({kv});
    }
    if (c.o_bias) t[p + "self_attn.o_proj.bias"] = mat({d});
    t[p + "mlp.gate_proj.weight"] = mat({ff, d});
    t[p + "mlp.up_proj.weight"] = mat({ff, d});
    t[p + "mlp.down_proj.weight"] = mat({d, ff});
  }
  return t;
}

std::string DefaultShapesDir() {
  const char* models_dir = std::getenv("COLLM_MODELS_DIR");
  return (models_dir && *models_dir) ? std::string(models_dir) + "/shapes" : "";
}

json DriverFlags::ToJson() const {
  return {{"shapes", shapes}, {"models", SplitCsv(models)}, {"threads", threads},
          {"iters", iters},   {"min_time_s", min_time},     {"quick", quick}};
}

void AddDriverFlags(CLI::App& app, DriverFlags& flags, const std::string& models_help) {
  app.add_option("--shapes", flags.shapes, "Directory of HF config.json shapes (NAME.json)")
      ->capture_default_str();
  app.add_option("--models", flags.models, models_help)->capture_default_str();
  app.add_option("--threads", flags.threads, "Torch intra-op threads (0 = torch's default)")
      ->capture_default_str();
  app.add_option("--iters", flags.iters, "Most timed iterations per measurement")
      ->capture_default_str();
  app.add_option("--min-time", flags.min_time,
                 "Stop timing a measurement after this many seconds (at least 3 iterations)")
      ->capture_default_str();
  app.add_option("--json", flags.json_path, "Also write the results as JSON to this path");
  app.add_flag("--quick", flags.quick, "Few iterations, for smoke tests");
  app.add_option("--one-model", flags.one_model)->group("");
  app.add_option("--child-json", flags.child_json)->group("");
}

void FinishDriverFlags(DriverFlags& flags) {
  if (flags.quick) {
    flags.iters = std::min(flags.iters, 5);
    flags.min_time = std::min(flags.min_time, 0.3);
  }
  if (flags.iters < 1) Die("--iters must be >= 1");
  RequireShapesDir(flags.shapes);
}

void RequireShapesDir(const std::string& shapes) {
  if (shapes.empty()) {
    Die("no shapes directory: pass --shapes DIR (NAME.json shape configs) or set COLLM_MODELS_DIR "
        "(its shapes/ is used)");
  }
}

ModelRuns RunEachModel(const DriverFlags& flags, int argc, char** argv, const std::string& banner,
                       const std::function<json(const std::string&)>& run_one) {
  if (!flags.one_model.empty()) {
    const json result = run_one(flags.one_model);
    if (!flags.child_json.empty()) {
      std::ofstream f(flags.child_json);
      f << result.dump(2);
      if (!f) Die("cannot write " + flags.child_json);
    }
    std::fflush(stdout);
    std::exit(0);
  }
  std::printf("%s\n", banner.c_str());
  std::printf(
      "each model runs in a fresh process; ratios compare against the baseline column, "
      "measured in the same run\n");
  const auto t0 = Clock::now();
  ModelRuns runs;
  for (const std::string& name : SplitCsv(flags.models)) {
    json r = RunChild(name, argc, argv);
    if (r.contains("error")) {
      std::printf("\n== %s: FAILED (%s)\n", name.c_str(), r["error"].get<std::string>().c_str());
      runs.failed = true;
    }
    runs.results.push_back(std::move(r));
  }
  runs.total_s = Seconds(t0, Clock::now());
  return runs;
}

void WriteJsonReport(const std::string& path, const std::string& benchmark, const json& flags,
                     double total_s, const std::string& results_key, const json& results) {
  if (path.empty()) return;
  const json doc = {{"benchmark", benchmark},
                    {"machine", {{"cpu", CpuModel()}, {"cores_online", CoresOnline()}}},
                    {"flags", flags},
                    {"total_seconds", total_s},
                    {results_key, results}};
  std::ofstream f(path);
  f << doc.dump(2) << "\n";
  if (!f) Die("cannot write " + path);
  std::printf("wrote %s\n", path.c_str());
}

json RunChild(const std::string& name, int argc, char** argv) {
  const std::string prefix = std::string("/tmp/") + program_invocation_short_name + "_XXXXXX";
  std::vector<char> tmpl(prefix.begin(), prefix.end());
  tmpl.push_back('\0');
  const int fd = mkstemp(tmpl.data());
  if (fd < 0) Die("mkstemp failed");
  close(fd);
  const std::string child_json = tmpl.data();
  std::vector<std::string> args(argv, argv + argc);
  args.insert(args.end(), {"--one-model", name, "--child-json", child_json});
  std::vector<char*> cargs;
  for (std::string& a : args) cargs.push_back(a.data());
  cargs.push_back(nullptr);

  std::fflush(stdout);
  const pid_t pid = fork();
  if (pid < 0) Die("fork failed");
  if (pid == 0) {
    execv("/proc/self/exe", cargs.data());
    std::perror("execv /proc/self/exe");
    _exit(127);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  json out;
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
    std::ifstream f(child_json);
    out = json::parse(f, nullptr, /*allow_exceptions=*/false);
    if (out.is_discarded()) out = {{"model", name}, {"error", "child wrote no JSON"}};
  } else {
    out = {{"model", name}, {"error", "child exited with status " + std::to_string(status)}};
  }
  std::remove(child_json.c_str());
  return out;
}

void PrintTable(const std::vector<std::vector<std::string>>& rows) {
  size_t cols = 0;
  for (const auto& r : rows) cols = std::max(cols, r.size());
  std::vector<size_t> width(cols, 0);
  for (const auto& r : rows) {
    if (r.size() == 1) continue;
    for (size_t i = 0; i < r.size(); ++i) width[i] = std::max(width[i], r[i].size());
  }
  for (const auto& r : rows) {
    if (r.size() == 1) {
      std::printf("   %s\n", r[0].c_str());
      continue;
    }
    std::string line = "   ";
    for (size_t i = 0; i < r.size(); ++i) {
      line += r[i] + std::string(width[i] - r[i].size() + 2, ' ');
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    std::printf("%s\n", line.c_str());
  }
  std::fflush(stdout);
}

}  // namespace collm::bench
