// collmctl demo: the main job's driver. Client load and held-out evaluation both go through the
// daemon's public gRPC Generate, so the accuracy shown is the adapter users are actually served.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "collm/cli/commands.h"
#include "collm/v1/inference.grpc.pb.h"
#include "nlohmann/json.hpp"

namespace collm::cli {
namespace {

using Clock = std::chrono::steady_clock;

struct Record {
  std::string prompt, completion;
};

struct Reply {
  bool ok = false;
  std::string text, error;
  int64_t adapter_version = 0;
  double ttft = 0, tpot = 0;
};

Reply Generate(v1::InferenceService::Stub* stub, const std::string& prompt,
               const std::string& adapter, int max_tokens, bool greedy, uint64_t seed) {
  v1::GenerateRequest req;
  req.set_prompt(prompt);
  req.set_adapter(adapter);
  req.mutable_sampling()->set_max_tokens(max_tokens);
  req.mutable_sampling()->set_seed(seed);
  if (greedy) req.mutable_sampling()->set_temperature(0);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse msg;
  Reply r;
  while (reader->Read(&msg)) {
    r.text += msg.text();
    if (msg.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
      r.adapter_version = msg.adapter_version();
      r.ttft = msg.ttft_seconds();
      r.tpot = msg.tpot_seconds();
    }
  }
  const grpc::Status s = reader->Finish();
  r.ok = s.ok();
  r.error = s.error_message();
  return r;
}

// Exact match after trimming whitespace: the completion is short and the model may stop at
// EOS or run on; only the first line of the reply counts.
bool ExactMatch(std::string reply, const std::string& want) {
  reply = reply.substr(0, reply.find('\n'));
  auto trim = [](std::string s) {
    const auto b = s.find_first_not_of(" \t");
    if (b == std::string::npos) return std::string();
    return s.substr(b, s.find_last_not_of(" \t") - b + 1);
  };
  return trim(reply) == trim(want);
}

double P50(std::vector<double> v) {
  if (v.empty()) return 0;
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

struct Eval {
  double t = 0;
  int64_t adapter_version = 0;
  int correct = 0, n = 0;
};

}  // namespace

int RunDemo(const DemoArgs& args, std::ostream& out, std::ostream& err) {
  if (args.duration_s <= 0 || args.eval_every_s <= 0 || args.eval_examples < 1 ||
      args.clients < 0 || args.max_tokens < 1) {
    err << "collmctl: --duration and --eval-every must be > 0, --eval-examples and --max-tokens "
           ">= 1, --clients >= 0\n";
    return 2;
  }
  std::vector<Record> heldout;
  {
    std::ifstream f(args.heldout);
    if (!f) {
      err << "collmctl: cannot read --heldout " << args.heldout << "\n";
      return 2;
    }
    std::string line;
    for (int n = 1; std::getline(f, line); ++n) {
      if (line.empty()) continue;
      const auto j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.is_object() || !j.contains("prompt") ||
          !j.contains("completion") || !j["prompt"].is_string() || !j["completion"].is_string()) {
        err << "collmctl: " << args.heldout << ":" << n
            << ": not a {\"prompt\": string, \"completion\": string} record\n";
        return 2;
      }
      heldout.push_back({j["prompt"], j["completion"]});
    }
  }
  if (heldout.empty()) {
    err << "collmctl: --heldout " << args.heldout << " has no records\n";
    return 2;
  }
  auto channel = grpc::CreateChannel(args.daemon, grpc::InsecureChannelCredentials());
  if (!channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10))) {
    err << "collmctl: cannot reach collmd at " << args.daemon << "\n";
    return 1;
  }
  auto stub = v1::InferenceService::NewStub(channel);

  std::mutex mu;
  std::vector<double> ttft, tpot;
  int64_t client_errors = 0;
  std::string last_error;
  std::atomic<bool> stop{false};
  const auto start = Clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(Clock::now() - start).count(); };

  // Clients ask held-out-style prompts with sampling on, as users would; serving never trains
  // on what it serves (only SubmitFeedback does), so this load cannot leak the held-out split.
  std::vector<std::thread> clients;
  for (int c = 0; c < args.clients; ++c) {
    clients.emplace_back([&, c] {
      for (uint64_t i = 0; !stop; ++i) {
        const Record& r = heldout[(c * 7919 + i) % heldout.size()];
        Reply rep = Generate(stub.get(), r.prompt, args.adapter, args.max_tokens, false, i);
        std::lock_guard<std::mutex> lock(mu);
        if (rep.ok) {
          ttft.push_back(rep.ttft);
          if (rep.tpot > 0) tpot.push_back(rep.tpot);
        } else {
          ++client_errors;
          last_error = rep.error;
          std::this_thread::sleep_for(std::chrono::milliseconds(200));
        }
      }
    });
  }

  std::vector<Eval> evals;
  v1::GetStatsResponse stats;
  const int n_eval = std::min<int>(args.eval_examples, heldout.size());
  auto evaluate = [&] {
    Eval e;
    e.t = elapsed();
    for (int i = 0; i < n_eval; ++i) {
      Reply rep = Generate(stub.get(), heldout[i].prompt, args.adapter, args.max_tokens, true, 0);
      if (!rep.ok) {
        std::lock_guard<std::mutex> lock(mu);
        last_error = rep.error;
        continue;
      }
      e.adapter_version = std::max(e.adapter_version, rep.adapter_version);
      e.correct += ExactMatch(rep.text, heldout[i].completion);
      ++e.n;
    }
    evals.push_back(e);
  };
  auto refresh_stats = [&] {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::GetStatsResponse s;
    if (stub->GetStats(&ctx, v1::GetStatsRequest(), &s).ok()) stats = s;
  };
  auto pct = [](const Eval& e) { return e.n > 0 ? 100.0 * e.correct / e.n : 0.0; };
  auto status_line = [&] {
    std::lock_guard<std::mutex> lock(mu);
    char line[320];
    const double slo = stats.completed() > 0 ? 100.0 * stats.slo_met() / stats.completed() : 0.0;
    std::snprintf(line, sizeof line,
                  "[%5.1fs] served %lld  ttft p50 %.0f ms  tpot p50 %.1f ms  slo %.0f%%  "
                  "train steps %lld  published %lld  held-out EM %.0f%% (v%lld)",
                  elapsed(), static_cast<long long>(stats.completed()), 1000 * P50(ttft),
                  1000 * P50(tpot), slo, static_cast<long long>(stats.train_optimizer_steps()),
                  static_cast<long long>(stats.published_versions()),
                  evals.empty() ? 0.0 : pct(evals.back()),
                  static_cast<long long>(evals.empty() ? 0 : evals.back().adapter_version));
    err << (args.live ? "\r\033[K" : "") << line << (args.live ? "" : "\n") << std::flush;
  };

  evaluate();
  double next_eval = evals.back().t + args.eval_every_s;
  while (elapsed() < args.duration_s) {
    refresh_stats();
    status_line();
    if (elapsed() >= next_eval) {
      evaluate();
      next_eval = elapsed() + args.eval_every_s;
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
    }
  }
  stop = true;
  for (auto& t : clients) t.join();
  evaluate();
  refresh_stats();
  status_line();
  if (args.live) err << "\n";

  const bool any_eval =
      std::any_of(evals.begin(), evals.end(), [](const Eval& e) { return e.n > 0; });
  out << "\nheld-out exact match of the served adapter '" << args.adapter << "' (" << n_eval
      << " examples, greedy, through gRPC Generate)\n";
  char row[200];
  std::snprintf(row, sizeof row, "%8s %8s %10s\n", "time_s", "version", "exact_match");
  out << row;
  for (const Eval& e : evals) {
    std::snprintf(row, sizeof row, "%8.1f %8lld %9.1f%%\n", e.t,
                  static_cast<long long>(e.adapter_version), pct(e));
    out << row;
  }
  std::lock_guard<std::mutex> lock(mu);
  const double slo = stats.completed() > 0 ? 100.0 * stats.slo_met() / stats.completed() : 0.0;
  out << "\nSUMMARY\n";
  auto kv = [&](const char* k, const std::string& v) {
    std::snprintf(row, sizeof row, "%-24s %s\n", k, v.c_str());
    out << row;
  };
  auto f1 = [](double v) {
    char b[32];
    std::snprintf(b, sizeof b, "%.1f", v);
    return std::string(b);
  };
  kv("wall_s", f1(elapsed()));
  kv("requests_served", std::to_string(stats.completed()));
  kv("client_errors", std::to_string(client_errors));
  kv("ttft_p50_ms", f1(1000 * P50(ttft)));
  kv("tpot_p50_ms", f1(1000 * P50(tpot)));
  kv("slo_attainment_pct", f1(slo));
  kv("train_steps", std::to_string(stats.train_optimizer_steps()));
  kv("published_versions", std::to_string(stats.published_versions()));
  kv("heldout_em_start_pct", f1(pct(evals.front())));
  kv("heldout_em_end_pct", f1(pct(evals.back())));
  if (!any_eval) {
    err << "collmctl: every evaluation request failed: " << last_error << "\n";
    return 1;
  }
  return 0;
}

void AddDemoCommand(CLI::App& app, DemoArgs& args, int& exit_code) {
  CLI::App* cmd = app.add_subcommand(
      "demo", "Drive load at a collmd and watch the served adapter's held-out accuracy");
  cmd->add_option("--daemon", args.daemon, "collmd gRPC host:port")->capture_default_str();
  cmd->add_option("--heldout", args.heldout, "heldout.jsonl from `collmctl task make`")->required();
  cmd->add_option("--adapter", args.adapter, "Served adapter to evaluate")->capture_default_str();
  cmd->add_option("--duration", args.duration_s, "Seconds of load")->capture_default_str();
  cmd->add_option("--eval-every", args.eval_every_s, "Seconds between evaluations")
      ->capture_default_str();
  cmd->add_option("--eval-examples", args.eval_examples, "Held-out examples per evaluation")
      ->capture_default_str();
  cmd->add_option("--clients", args.clients, "Concurrent client streams")->capture_default_str();
  cmd->add_option("--max-tokens", args.max_tokens, "Tokens per request")->capture_default_str();
  cmd->add_flag("!--no-live", args.live, "One status line per update instead of refreshing");
  cmd->callback([&]() { exit_code = RunDemo(args, std::cout, std::cerr); });
}

}  // namespace collm::cli
