// collmctl demo: the main job's driver. Client load and held-out evaluation both go through the
// daemon's public gRPC Generate, so the accuracy shown is the adapter users are actually served;
// the held-out loss comes from the daemon's ScoreCompletions on the same examples. The first
// evaluation is of the base model alone (GenerateRequest.base_model), so the table starts from
// the untrained model. Federated (--aggregator, --device): load and evaluation go through the
// collm-router at --daemon, the rounds are started once the base is measured, and each device's
// served global version is read from its GetStats.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "collm/cli/commands.h"
#include "collm/v1/federation.grpc.pb.h"
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

// `base_model`: the base model alone (adapter ignored), the evaluation's untrained baseline.
Reply Generate(v1::InferenceService::Stub* stub, const std::string& prompt,
               const std::string& adapter, bool base_model, int max_tokens, bool greedy,
               uint64_t seed) {
  v1::GenerateRequest req;
  req.set_prompt(prompt);
  if (base_model) {
    req.set_base_model(true);
  } else {
    req.set_adapter(adapter);
  }
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
  bool base = false;            // The base model alone (the first evaluation).
  int64_t adapter_version = 0;  // Newest version that answered (router: any replica's).
  int64_t global_version = 0;   // Federated: the oldest global version the devices served.
  int correct = 0, n = 0;
  double loss = -1;  // Mean per-token held-out loss (ScoreCompletions); < 0 = not measured.
};

// The served global version in a device's stats: federated installs are recorded as
// "global vN" (the adapter's source); 0 when `adapter` is not a global version there.
int64_t ServedGlobalVersion(const v1::GetStatsResponse& stats, const std::string& adapter) {
  for (const auto& a : stats.adapters()) {
    if (a.name() != adapter) continue;
    const std::string prefix = "global v";
    if (a.source().rfind(prefix, 0) == 0) return std::atoll(a.source().c_str() + prefix.size());
  }
  return 0;
}

// Adds the counters the demo shows (a router sums its replicas the same way).
void AddStats(const v1::GetStatsResponse& s, v1::GetStatsResponse* sum) {
  sum->set_completed(sum->completed() + s.completed());
  sum->set_slo_met(sum->slo_met() + s.slo_met());
  sum->set_train_optimizer_steps(sum->train_optimizer_steps() + s.train_optimizer_steps());
  sum->set_published_versions(sum->published_versions() + s.published_versions());
}

std::string Fixed(double v, int digits) {
  char b[32];
  std::snprintf(b, sizeof b, "%.*f", digits, v);
  return b;
}

// What the status line and the table call the served model of an evaluation.
std::string Served(const Eval& e, bool federated) {
  if (e.base) return "base";
  if (federated) return "global v" + std::to_string(e.global_version);
  return "v" + std::to_string(e.adapter_version);
}

}  // namespace

int RunDemo(const DemoArgs& args, std::ostream& out, std::ostream& err) {
  if (args.duration_s <= 0 || args.eval_every_s <= 0 || args.eval_examples < 1 ||
      args.clients < 0 || args.max_tokens < 1) {
    err << "collmctl: --duration and --eval-every must be > 0, --eval-examples and --max-tokens "
           ">= 1, --clients >= 0\n";
    return 2;
  }
  if (!args.aggregator.empty() && args.devices.empty()) {
    err << "collmctl: --aggregator needs the devices behind the router (--device ADDR, one per "
           "device)\n";
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
  auto connect = [&](const std::string& address,
                     const char* what) -> std::shared_ptr<grpc::Channel> {
    auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
    if (!channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10))) {
      err << "collmctl: cannot reach " << what << " at " << address << "\n";
      return nullptr;
    }
    return channel;
  };
  auto channel = connect(args.daemon, args.devices.empty() ? "collmd" : "collm-router");
  if (channel == nullptr) return 1;
  auto stub = v1::InferenceService::NewStub(channel);
  // Where stats and held-out losses come from: each device, or the one daemon.
  std::vector<std::unique_ptr<v1::InferenceService::Stub>> devices;
  for (const std::string& address : args.devices) {
    auto c = connect(address, "collmd");
    if (c == nullptr) return 1;
    devices.push_back(v1::InferenceService::NewStub(c));
  }
  std::vector<v1::InferenceService::Stub*> scored;
  if (devices.empty()) scored.push_back(stub.get());
  for (const auto& d : devices) scored.push_back(d.get());
  const bool federated = !args.aggregator.empty();
  std::unique_ptr<v1::FederationAdminService::Stub> admin;
  std::string token = args.token;
  if (federated) {
    auto c = connect(args.aggregator, "collm-aggregator");
    if (c == nullptr) return 1;
    admin = v1::FederationAdminService::NewStub(c);
    if (token.empty()) {
      if (const char* env = std::getenv("COLLM_ADMIN_TOKEN")) token = env;
    }
  }
  auto admin_context = [&](grpc::ClientContext* ctx) {
    ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    if (!token.empty()) ctx->AddMetadata("authorization", "Bearer " + token);
  };

  // A router that has not yet polled every device would route all load to the first one.
  if (!devices.empty()) {
    int64_t device_kv = 0;
    for (const auto& d : devices) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
      v1::GetStatsResponse s;
      if (d->GetStats(&ctx, v1::GetStatsRequest(), &s).ok()) device_kv += s.kv_blocks_total();
    }
    const auto give_up = Clock::now() + std::chrono::seconds(10);
    for (;;) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
      v1::GetStatsResponse s;
      const bool ok = stub->GetStats(&ctx, v1::GetStatsRequest(), &s).ok();
      if (ok && s.kv_blocks_total() >= device_kv) break;
      if (Clock::now() > give_up) {
        err << "collmctl: the router at " << args.daemon
            << " does not report every --device after 10 s; going on\n";
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }

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
        Reply rep = Generate(stub.get(), r.prompt, args.adapter, false, args.max_tokens, false, i);
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
  v1::GetStatsResponse stats;           // Summed over `scored`.
  std::vector<int64_t> device_globals;  // Federated: each device's served global version.
  v1::FederationStatus fed;
  int64_t participants = 0;  // Of fed.current_round.
  std::string fed_error;
  const int n_eval = std::min<int>(args.eval_examples, heldout.size());
  v1::ScoreCompletionsRequest score_request;
  for (int i = 0; i < n_eval; ++i) {
    auto* e = score_request.add_examples();
    e->set_prompt(heldout[i].prompt);
    e->set_completion(heldout[i].completion);
  }
  auto refresh_stats = [&] {
    v1::GetStatsResponse sum;
    std::vector<int64_t> globals;
    for (v1::InferenceService::Stub* s : scored) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
      v1::GetStatsResponse one;
      if (!s->GetStats(&ctx, v1::GetStatsRequest(), &one).ok()) return;  // Keep the last.
      AddStats(one, &sum);
      globals.push_back(ServedGlobalVersion(one, args.adapter));
    }
    std::lock_guard<std::mutex> lock(mu);
    stats = sum;
    device_globals = globals;
  };
  auto refresh_federation = [&] {
    if (!federated) return;
    grpc::ClientContext ctx;
    admin_context(&ctx);
    v1::FederationStatus st;
    const grpc::Status s = admin->GetStatus(&ctx, v1::GetStatusRequest(), &st);
    if (!s.ok()) {
      fed_error = s.error_message();
      return;
    }
    fed = st;
    if (st.current_round() > 0) {
      grpc::ClientContext rctx;
      admin_context(&rctx);
      v1::GetRoundRequest req;
      req.set_round(st.current_round());
      v1::RoundInfo round;
      if (admin->GetRound(&rctx, req, &round).ok()) participants = round.participants_size();
    }
  };
  auto evaluate = [&](bool base) {
    Eval e;
    e.t = elapsed();
    e.base = base;
    for (int i = 0; i < n_eval; ++i) {
      Reply rep =
          Generate(stub.get(), heldout[i].prompt, args.adapter, base, args.max_tokens, true, 0);
      if (!rep.ok) {
        std::lock_guard<std::mutex> lock(mu);
        last_error = rep.error;
        continue;
      }
      e.adapter_version = std::max(e.adapter_version, rep.adapter_version);
      e.correct += ExactMatch(rep.text, heldout[i].completion);
      ++e.n;
    }
    // The loss of what each device serves now, on the same examples; the mean over devices.
    if (base) {
      score_request.set_base_model(true);
      score_request.clear_adapter();
    } else {
      score_request.set_base_model(false);
      score_request.set_adapter(args.adapter);
    }
    double loss_sum = 0;
    int losses = 0;
    for (v1::InferenceService::Stub* s : scored) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
      v1::ScoreCompletionsResponse r;
      const grpc::Status st = s->ScoreCompletions(&ctx, score_request, &r);
      if (!st.ok()) {
        std::lock_guard<std::mutex> lock(mu);
        last_error = "ScoreCompletions: " + st.error_message();
        continue;
      }
      loss_sum += r.loss();
      ++losses;
      e.adapter_version = std::max(e.adapter_version, r.adapter_version());
    }
    if (losses > 0) e.loss = loss_sum / losses;
    refresh_stats();
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!device_globals.empty())
        e.global_version = *std::min_element(device_globals.begin(), device_globals.end());
    }
    evals.push_back(e);
  };
  auto pct = [](const Eval& e) { return e.n > 0 ? 100.0 * e.correct / e.n : 0.0; };
  auto loss_text = [](const Eval& e) { return e.loss >= 0 ? Fixed(e.loss, 3) : "n/a"; };
  auto status_line = [&] {
    std::lock_guard<std::mutex> lock(mu);
    std::string line =
        "[" + Fixed(elapsed(), 1) + "s] served " + std::to_string(stats.completed()) +
        "  ttft p50 " + Fixed(1000 * P50(ttft), 0) + " ms  tpot p50 " + Fixed(1000 * P50(tpot), 1) +
        " ms  slo " +
        Fixed(stats.completed() > 0 ? 100.0 * stats.slo_met() / stats.completed() : 0.0, 0) +
        "%  train steps " + std::to_string(stats.train_optimizer_steps());
    if (federated) {
      line += "  round " + std::to_string(fed.current_round()) + " (" +
              std::to_string(participants) + " devices, " + std::to_string(fed.rounds_completed()) +
              " done) global v" + std::to_string(fed.global_version()) + " served";
      for (size_t i = 0; i < device_globals.size(); ++i)
        line += (i == 0 ? " v" : "/v") + std::to_string(device_globals[i]);
    } else {
      line += "  published " + std::to_string(stats.published_versions());
    }
    if (!evals.empty()) {
      const Eval& e = evals.back();
      line += "  held-out EM " + Fixed(pct(e), 0) + "% loss " + loss_text(e) + " (" +
              Served(e, federated) + ")";
    }
    err << (args.live ? "\r\033[K" : "") << line << (args.live ? "" : "\n") << std::flush;
  };

  // The untrained baseline first; federated rounds start only once it is measured.
  evaluate(true);
  if (federated) {
    grpc::ClientContext ctx;
    admin_context(&ctx);
    v1::FederationStatus st;
    const grpc::Status s = admin->Start(&ctx, v1::ControlRequest(), &st);
    if (!s.ok()) {
      err << "collmctl: starting the federated rounds at " << args.aggregator
          << " failed: " << s.error_message() << "\n";
    }
  }
  double next_eval = elapsed() + args.eval_every_s;
  while (elapsed() < args.duration_s) {
    refresh_stats();
    refresh_federation();
    status_line();
    if (elapsed() >= next_eval) {
      evaluate(false);
      next_eval = elapsed() + args.eval_every_s;
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
    }
  }
  stop = true;
  for (auto& t : clients) t.join();
  evaluate(false);
  refresh_stats();
  refresh_federation();
  status_line();
  if (args.live) err << "\n";

  const bool any_eval =
      std::any_of(evals.begin(), evals.end(), [](const Eval& e) { return e.n > 0; });
  out << "\nheld-out exact match and loss of the served adapter '" << args.adapter << "' ("
      << n_eval << " examples; greedy through gRPC Generate"
      << (federated ? " via collm-router" : "")
      << "; loss = mean per-token cross-entropy of the completions, ScoreCompletions"
      << (federated ? ", mean over the devices" : "") << ")\n";
  char row[200];
  std::snprintf(row, sizeof row, "%8s %12s %12s %13s\n", "time_s", "served", "exact_match",
                "heldout_loss");
  out << row;
  for (const Eval& e : evals) {
    std::snprintf(row, sizeof row, "%8.1f %12s %11.1f%% %13s\n", e.t, Served(e, federated).c_str(),
                  pct(e), loss_text(e).c_str());
    out << row;
  }
  std::lock_guard<std::mutex> lock(mu);
  const double slo = stats.completed() > 0 ? 100.0 * stats.slo_met() / stats.completed() : 0.0;
  out << "\nSUMMARY\n";
  auto kv = [&](const std::string& k, const std::string& v) {
    std::snprintf(row, sizeof row, "%-24s %s\n", k.c_str(), v.c_str());
    out << row;
  };
  kv("wall_s", Fixed(elapsed(), 1));
  kv("requests_served", std::to_string(stats.completed()));
  kv("client_errors", std::to_string(client_errors));
  kv("ttft_p50_ms", Fixed(1000 * P50(ttft), 1));
  kv("tpot_p50_ms", Fixed(1000 * P50(tpot), 1));
  kv("slo_attainment_pct", Fixed(slo, 1));
  kv("train_steps", std::to_string(stats.train_optimizer_steps()));
  kv("published_versions", std::to_string(stats.published_versions()));
  if (federated) {
    kv("rounds_completed", std::to_string(fed.rounds_completed()));
    kv("global_version", std::to_string(fed.global_version()));
    for (size_t i = 0; i < device_globals.size(); ++i)
      kv("device" + std::to_string(i + 1) + "_global_version", std::to_string(device_globals[i]));
  }
  kv("heldout_em_start_pct", Fixed(pct(evals.front()), 1));
  kv("heldout_em_end_pct", Fixed(pct(evals.back()), 1));
  kv("heldout_loss_start", Fixed(evals.front().loss, 4));  // -1 = not measured.
  kv("heldout_loss_end", Fixed(evals.back().loss, 4));
  if (!any_eval) {
    err << "collmctl: every evaluation request failed: " << last_error << "\n";
    return 1;
  }
  if (federated && !fed_error.empty() && fed.state().empty()) {
    err << "collmctl: the aggregator's status was never read: " << fed_error << "\n";
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
  cmd->add_option("--device", args.devices,
                  "Federated: a collmd behind the router at --daemon (repeat per device)");
  cmd->add_option("--aggregator", args.aggregator,
                  "Federated: collm-aggregator host:port; its rounds start after the base "
                  "evaluation");
  cmd->add_option("--token", args.token, "Aggregator admin token (default: $COLLM_ADMIN_TOKEN)");
  cmd->callback([&]() { exit_code = RunDemo(args, std::cout, std::cerr); });
}

}  // namespace collm::cli
