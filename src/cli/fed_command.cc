// collmctl fed: the operator's console for collm-aggregator.
#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "collm/cli/commands.h"
#include "collm/common/file_io.h"
#include "collm/federation/adapter_stream.h"
#include "collm/federation/state_store.h"
#include "collm/v1/federation.grpc.pb.h"
#include "proto_json.h"

namespace collm::cli {
namespace {

std::string ReadFile(const std::string& path, std::string* error) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    *error = absl::StrCat("cannot read ", path);
    return "";
  }
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string Time(int64_t unix_ms) {
  if (unix_ms <= 0) return "-";
  const std::time_t t = static_cast<std::time_t>(unix_ms / 1000);
  std::tm tm{};
  localtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%H:%M:%S", &tm);
  return buf;
}

// Explains a failed call in operator terms; returns the exit code.
int Report(const grpc::Status& s, const FedArgs& args, std::ostream& err) {
  switch (s.error_code()) {
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      err << "collmctl: cannot reach the aggregator at " << args.aggregator << ": "
          << s.error_message() << "\n";
      break;
    case grpc::StatusCode::UNAUTHENTICATED:
    case grpc::StatusCode::PERMISSION_DENIED:
      err << "collmctl: the aggregator refused the call: " << s.error_message()
          << " (pass --token or set COLLM_ADMIN_TOKEN)\n";
      break;
    default:
      err << "collmctl: " << s.error_message() << "\n";
  }
  return 1;
}

void PrintStatus(const v1::FederationStatus& s, std::ostream& out) {
  out << "state            " << s.state() << "\n"
      << "current round    " << s.current_round() << "\n"
      << "global version   " << s.global_version() << "\n"
      << "rounds completed " << s.rounds_completed() << " of "
      << (s.policy().rounds() == 0 ? std::string("unlimited") : absl::StrCat(s.policy().rounds()))
      << "\n"
      << "devices          " << s.devices_online() << " online / " << s.devices_total() << "\n"
      << "updates          " << s.updates_accepted() << " accepted, " << s.updates_rejected()
      << " rejected (" << s.late_updates() << " late)\n"
      << "policy           strategy=" << s.policy().strategy()
      << " local_steps=" << s.policy().local_steps() << " lr=" << s.policy().lr()
      << " min_clients=" << s.policy().min_clients() << " max_clients=" << s.policy().max_clients()
      << " quorum=" << s.policy().quorum() << " deadline_s=" << s.policy().deadline_s()
      << " server_optimizer=" << s.policy().server_optimizer() << "\n";
}

void PrintRound(const v1::RoundInfo& r, std::ostream& out) {
  out << "round            " << r.round() << "\n"
      << "state            " << r.state() << "\n"
      << "strategy         " << r.strategy() << "\n"
      << "versions         " << r.base_version() << " -> "
      << (r.result_version() ? absl::StrCat(r.result_version()) : std::string("-")) << "\n"
      << "started          " << Time(r.started_unix_ms()) << "  deadline "
      << Time(r.deadline_unix_ms()) << "  finished " << Time(r.finished_unix_ms()) << "\n"
      << "participants     " << absl::StrJoin(r.participants(), ", ") << "\n"
      << "mean train loss  " << r.mean_train_loss() << "\n"
      << "note             " << r.note() << "\n";
  out << std::left << std::setw(20) << "DEVICE" << std::setw(10) << "SAMPLES" << std::setw(12)
      << "TRAIN_LOSS" << std::setw(12) << "DELTA_NORM"
      << "RECEIVED\n";
  for (const auto& u : r.updates()) {
    out << std::left << std::setw(20) << u.device_id() << std::setw(10) << u.num_samples()
        << std::setw(12) << u.train_loss() << std::setw(12) << u.delta_norm()
        << Time(u.received_unix_ms()) << "\n";
  }
  for (const auto& why : r.rejected()) out << "rejected: " << why << "\n";
  if (r.decisions_size() == 0) return;
  // The slow timescale's plan: every device online at the opening, chosen or not, and why.
  out << "\ncoordination     " << r.coordination_policy() << "\n";
  out << std::left << std::setw(20) << "DEVICE" << std::setw(8) << "CHOSEN" << std::setw(8)
      << "BUDGET" << std::setw(9) << "CEILING" << std::setw(11) << "FORECAST" << std::setw(7)
      << "UTIL" << std::setw(10) << "SLO_QUEUE" << std::setw(8) << "DEBT" << std::setw(7) << "GAIN"
      << std::setw(9) << "SCORE"
      << "REASON\n";
  for (const auto& d : r.decisions()) {
    out << std::left << std::setw(20) << d.device_id() << std::setw(8)
        << (d.chosen() ? "yes" : "no") << std::setw(8) << d.budget_steps() << std::setw(9)
        << absl::StrFormat("%.2f", d.share_ceiling()) << std::setw(11)
        << absl::StrFormat("%.3g/s", d.forecast_arrival_rate()) << std::setw(7)
        << absl::StrFormat("%.2f", d.forecast_utilization()) << std::setw(10)
        << absl::StrFormat("%.3g", d.slo_queue()) << std::setw(8)
        << absl::StrFormat("%.3g", d.quality_debt()) << std::setw(7)
        << absl::StrFormat("%.2f", d.expected_gain()) << std::setw(9)
        << absl::StrFormat("%.3g", d.score()) << d.reason() << "\n";
  }
}

std::string WatchLine(const v1::FederationStatus& s) {
  return absl::StrCat(
      "[", s.state(), "] round ", s.current_round(), "  global v", s.global_version(), "  done ",
      s.rounds_completed(), "/",
      s.policy().rounds() == 0 ? std::string("-") : absl::StrCat(s.policy().rounds()), "  devices ",
      s.devices_online(), "/", s.devices_total(), "  updates ", s.updates_accepted(), " ok / ",
      s.updates_rejected(), " rejected");
}

// What every verb talks through: the admin stub and the call metadata (token, deadline).
struct Connection {
  std::unique_ptr<v1::FederationAdminService::Stub> stub;
  std::string token;
  double timeout_s = 10;

  // Unary calls get the --timeout deadline; streams run until they end or are cancelled.
  std::unique_ptr<grpc::ClientContext> Context(bool streaming) const {
    auto ctx = std::make_unique<grpc::ClientContext>();
    if (!token.empty()) ctx->AddMetadata("authorization", "Bearer " + token);
    if (!streaming) {
      ctx->set_deadline(std::chrono::system_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
    }
    return ctx;
  }
};

// Builds the channel from the TLS flags; exit code 2 (message on `err`) for bad flags.
std::optional<Connection> Connect(const FedArgs& args, std::ostream& err) {
  std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
  if (!args.tls_ca.empty() || !args.tls_cert.empty() || !args.tls_key.empty()) {
    if (args.tls_cert.empty() != args.tls_key.empty()) {
      err << "collmctl: --tls-cert and --tls-key go together\n";
      return std::nullopt;
    }
    grpc::SslCredentialsOptions ssl;
    std::string error;
    if (!args.tls_ca.empty()) ssl.pem_root_certs = ReadFile(args.tls_ca, &error);
    if (!args.tls_cert.empty()) ssl.pem_cert_chain = ReadFile(args.tls_cert, &error);
    if (!args.tls_key.empty()) ssl.pem_private_key = ReadFile(args.tls_key, &error);
    if (!error.empty()) {
      err << "collmctl: " << error << "\n";
      return std::nullopt;
    }
    creds = grpc::SslCredentials(ssl);
  }
  grpc::ChannelArguments channel_args;
  channel_args.SetMaxReceiveMessageSize(64 << 20);
  Connection conn;
  conn.stub = v1::FederationAdminService::NewStub(
      grpc::CreateCustomChannel(args.aggregator, creds, channel_args));
  conn.token = args.token;
  if (conn.token.empty()) {
    if (const char* env = std::getenv("COLLM_ADMIN_TOKEN")) conn.token = env;
  }
  conn.timeout_s = args.timeout_s;
  return conn;
}

// The verbs that answer with the federation status (status, start, pause, resume, policy set).
using StatusCall =
    std::function<grpc::Status(const Connection&, grpc::ClientContext*, v1::FederationStatus*)>;
int PrintStatusReply(const Connection& conn, const FedArgs& args, std::ostream& out,
                     std::ostream& err, const StatusCall& call) {
  v1::FederationStatus status;
  auto ctx = conn.Context(false);
  if (grpc::Status s = call(conn, ctx.get(), &status); !s.ok()) return Report(s, args, err);
  if (args.json) {
    out << Json(status) << "\n";
  } else {
    PrintStatus(status, out);
  }
  return 0;
}

int RunStatus(const Connection& conn, const FedArgs& args, std::ostream& out, std::ostream& err) {
  return PrintStatusReply(conn, args, out, err, [](const Connection& c, auto* ctx, auto* status) {
    return c.stub->GetStatus(ctx, v1::GetStatusRequest(), status);
  });
}

int RunStart(const Connection& conn, const FedArgs& args, std::ostream& out, std::ostream& err) {
  return PrintStatusReply(conn, args, out, err, [](const Connection& c, auto* ctx, auto* status) {
    return c.stub->Start(ctx, v1::ControlRequest(), status);
  });
}

int RunPause(const Connection& conn, const FedArgs& args, std::ostream& out, std::ostream& err) {
  return PrintStatusReply(conn, args, out, err, [](const Connection& c, auto* ctx, auto* status) {
    return c.stub->Pause(ctx, v1::ControlRequest(), status);
  });
}

int RunResume(const Connection& conn, const FedArgs& args, std::ostream& out, std::ostream& err) {
  return PrintStatusReply(conn, args, out, err, [](const Connection& c, auto* ctx, auto* status) {
    return c.stub->Resume(ctx, v1::ControlRequest(), status);
  });
}

int RunPolicySet(const Connection& conn, const FedArgs& args, std::ostream& out,
                 std::ostream& err) {
  v1::SetPolicyRequest req;
  auto* p = req.mutable_policy();
  if (args.rounds) p->set_rounds(*args.rounds);
  if (args.local_steps) p->set_local_steps(*args.local_steps);
  if (args.lr) p->set_lr(*args.lr);
  if (args.min_clients) p->set_min_clients(*args.min_clients);
  if (args.max_clients) p->set_max_clients(*args.max_clients);
  if (args.quorum) p->set_quorum(*args.quorum);
  if (args.deadline_s) p->set_deadline_s(*args.deadline_s);
  if (args.strategy) p->set_strategy(*args.strategy);
  if (args.server_optimizer) p->set_server_optimizer(*args.server_optimizer);
  if (args.server_lr) p->set_server_lr(*args.server_lr);
  if (args.prox_mu) p->set_prox_mu(*args.prox_mu);
  if (args.clip_norm) p->set_clip_norm(*args.clip_norm);
  if (args.max_update_norm) p->set_max_update_norm(*args.max_update_norm);
  if (args.trim_ratio) p->set_trim_ratio(*args.trim_ratio);
  if (args.training_share) p->set_training_share(*args.training_share);
  if (p->ByteSizeLong() == 0) {
    err << "collmctl: policy set needs at least one of --rounds, --local-steps, --lr, "
           "--min-clients, --max-clients, --quorum, --deadline, --strategy, ...\n";
    return 2;
  }
  return PrintStatusReply(conn, args, out, err,
                          [&req](const Connection& c, auto* ctx, auto* status) {
                            return c.stub->SetPolicy(ctx, req, status);
                          });
}

int RunDevices(const Connection& conn, const FedArgs& args, std::ostream& out, std::ostream& err) {
  v1::ListDevicesResponse resp;
  auto ctx = conn.Context(false);
  if (grpc::Status s = conn.stub->ListDevices(ctx.get(), v1::ListDevicesRequest(), &resp);
      !s.ok()) {
    return Report(s, args, err);
  }
  if (args.json) {
    out << Json(resp) << "\n";
    return 0;
  }
  out << std::left << std::setw(20) << "DEVICE" << std::setw(10) << "STATE" << std::setw(8)
      << "ROUNDS" << std::setw(10) << "REJECTED" << std::setw(10) << "SAMPLES" << std::setw(10)
      << "LIVE_V"
      << "LAST_SEEN\n";
  for (const auto& d : resp.devices()) {
    out << std::left << std::setw(20) << d.device_id() << std::setw(10) << d.state() << std::setw(8)
        << d.rounds_participated() << std::setw(10) << d.updates_rejected() << std::setw(10)
        << d.capabilities().local_samples() << std::setw(10) << d.telemetry().live_version()
        << Time(d.last_seen_unix_ms()) << "\n";
  }
  return 0;
}

int RunRounds(const Connection& conn, const FedArgs& args, std::ostream& out, std::ostream& err) {
  v1::ListRoundsRequest req;
  req.set_limit(args.limit);
  v1::ListRoundsResponse resp;
  auto ctx = conn.Context(false);
  if (grpc::Status s = conn.stub->ListRounds(ctx.get(), req, &resp); !s.ok())
    return Report(s, args, err);
  if (args.json) {
    out << Json(resp) << "\n";
    return 0;
  }
  out << std::left << std::setw(7) << "ROUND" << std::setw(12) << "STATE" << std::setw(10)
      << "VERSIONS" << std::setw(9) << "UPDATES" << std::setw(10) << "REJECTED" << std::setw(12)
      << "TRAIN_LOSS"
      << "NOTE\n";
  for (const auto& r : resp.rounds()) {
    out << std::left << std::setw(7) << r.round() << std::setw(12) << r.state() << std::setw(10)
        << absl::StrCat(r.base_version(), "->",
                        r.result_version() ? absl::StrCat(r.result_version()) : std::string("-"))
        << std::setw(9) << absl::StrCat(r.updates_size(), "/", r.participants_size())
        << std::setw(10) << r.rejected_size() << std::setw(12) << r.mean_train_loss() << r.note()
        << "\n";
  }
  return 0;
}

int RunRoundShow(const Connection& conn, const FedArgs& args, std::ostream& out,
                 std::ostream& err) {
  v1::GetRoundRequest req;
  req.set_round(args.round);
  v1::RoundInfo round;
  auto ctx = conn.Context(false);
  if (grpc::Status s = conn.stub->GetRound(ctx.get(), req, &round); !s.ok())
    return Report(s, args, err);
  if (args.json) {
    out << Json(round) << "\n";
  } else {
    PrintRound(round, out);
  }
  return 0;
}

int RunAdapterPull(const Connection& conn, const FedArgs& args, std::ostream& out,
                   std::ostream& err) {
  if (args.out_dir.empty()) {
    err << "collmctl: adapter pull needs --out DIR\n";
    return 2;
  }
  v1::PullAdapterRequest req;
  req.set_version(args.version);
  auto ctx = conn.Context(true);
  auto reader = conn.stub->PullAdapter(ctx.get(), req);
  v1::AdapterChunk chunk;
  federation::AdapterChunkReader stream("PullAdapter", federation::kMaxReceivedAdapterBytes);
  absl::Status bad;
  while (bad.ok() && reader->Read(&chunk)) bad = stream.Add(chunk);
  if (!bad.ok()) ctx->TryCancel();
  if (grpc::Status s = reader->Finish(); !s.ok() && bad.ok()) return Report(s, args, err);
  const v1::AdapterBlobHeader header = stream.header();
  absl::StatusOr<lora::PeftBlob> blob =
      bad.ok() ? std::move(stream).Finish() : absl::StatusOr<lora::PeftBlob>(bad);
  if (!blob.ok()) {
    err << "collmctl: the adapter arrived incomplete or corrupt: " << blob.status().message()
        << "\n";
    return 1;
  }
  const std::string& payload = blob->safetensors;
  std::error_code ec;
  std::filesystem::create_directories(args.out_dir, ec);
  absl::Status s = WriteFileAtomically(args.out_dir + "/adapter_model.safetensors", payload);
  if (s.ok()) s = WriteFileAtomically(args.out_dir + "/adapter_config.json", header.config_json());
  if (!s.ok()) {
    err << "collmctl: " << s.message() << "\n";
    return 1;
  }
  if (args.json) {
    out << "{\"version\": " << header.version() << ", \"dir\": \"" << args.out_dir
        << "\", \"bytes\": " << payload.size() << ", \"sha256\": \"" << header.sha256() << "\"}\n";
  } else {
    out << "global version " << header.version() << " -> " << args.out_dir << " (" << payload.size()
        << " bytes, sha256 " << header.sha256() << ")\n";
  }
  return 0;
}

int RunRoundsWatch(const Connection& conn, const FedArgs& args, std::ostream& out,
                   std::ostream& err) {
  auto ctx = conn.Context(true);
  auto reader = conn.stub->WatchRounds(ctx.get(), v1::WatchRequest());
  // On a terminal the line is redrawn in place; piped, one line per change.
  const bool tty = &out == &std::cout && ::isatty(STDOUT_FILENO);
  v1::FederationStatus status;
  bool finished = false;
  while (reader->Read(&status)) {
    if (args.json) {
      std::string line;
      google::protobuf::util::JsonPrintOptions o;
      o.preserve_proto_field_names = true;
      (void)google::protobuf::util::MessageToJsonString(status, &line, o);
      out << line << "\n";
    } else if (tty) {
      out << "\r\033[K" << WatchLine(status) << std::flush;
    } else {
      out << WatchLine(status) << "\n";
    }
    out.flush();
    if (status.state() == "finished") {
      finished = true;
      ctx->TryCancel();
      break;
    }
  }
  if (tty) out << "\n";
  grpc::Status s = reader->Finish();
  if (finished || s.ok()) return 0;
  return Report(s, args, err);
}

// Every fed verb: its name (words separated by spaces), what it does (collmctl's help text), and
// its handler.
struct FedVerb {
  const char* name;
  const char* usage;
  int (*run)(const Connection&, const FedArgs&, std::ostream& out, std::ostream& err);
};

constexpr FedVerb kFedVerbs[] = {
    {"status", "Federation state, counters and policy", RunStatus},
    {"devices", "Registered devices", RunDevices},
    {"start", "Start running rounds", RunStart},
    {"pause", "Open no new rounds (the open one completes)", RunPause},
    {"resume", "Resume a paused federation", RunResume},
    {"rounds", "Round log, newest first (rounds watch: live)", RunRounds},
    {"rounds watch", "Live progress until finished or Ctrl-C", RunRoundsWatch},
    {"round show",
     "Participants, updates, rejections and per-device coordination decisions of round N",
     RunRoundShow},
    {"policy set", "Set the given fields (from the next round)", RunPolicySet},
    {"adapter pull", "Download a global version in PEFT format", RunAdapterPull},
};

const FedVerb* FindVerb(const std::string& name) {
  for (const FedVerb& v : kFedVerbs) {
    if (name == v.name) return &v;
  }
  return nullptr;
}

std::string KnownVerbs() {
  std::vector<std::string> names;
  for (const FedVerb& v : kFedVerbs) names.push_back(v.name);
  return absl::StrJoin(names, ", ");
}

// The help text of a verb in the table (AddFedCommand wires the CLI tree from these).
std::string Usage(const std::string& name) {
  const FedVerb* v = FindVerb(name);
  return v != nullptr ? v->usage : "";
}

}  // namespace

int RunFed(const FedArgs& args, const std::string& verb, std::ostream& out, std::ostream& err) {
  const FedVerb* v = FindVerb(verb);
  if (v == nullptr) {
    err << "collmctl: unknown fed command '" << verb << "' (known: " << KnownVerbs() << ")\n";
    return 2;
  }
  std::optional<Connection> conn = Connect(args, err);
  if (!conn.has_value()) return 2;
  return v->run(*conn, args, out, err);
}

void AddFedCommand(CLI::App& app, FedArgs& args, int& exit_code) {
  CLI::App* fed = app.add_subcommand("fed", "Operate a collm-aggregator (federated rounds)");
  fed->require_subcommand(1);
  // Lets the shared flags (--json, --token, ...) also follow the verb: `fed status --json`.
  fed->fallthrough();
  fed->add_option("--aggregator,-a", args.aggregator, "Aggregator address host:port")
      ->capture_default_str();
  fed->add_option("--token", args.token, "Admin token (default: $COLLM_ADMIN_TOKEN)");
  fed->add_option("--tls-ca", args.tls_ca, "PEM CA that signed the aggregator's certificate");
  fed->add_option("--tls-cert", args.tls_cert, "PEM client certificate (mutual TLS)");
  fed->add_option("--tls-key", args.tls_key, "PEM client key (mutual TLS)");
  fed->add_flag("--json", args.json, "Print JSON instead of tables");
  fed->add_option("--timeout", args.timeout_s, "Seconds per call")->capture_default_str();
  auto run = [&args, &exit_code](const std::string& verb) {
    return [&args, &exit_code, verb] { exit_code = RunFed(args, verb, std::cout, std::cerr); };
  };
  for (const char* verb : {"status", "devices", "start", "pause", "resume"}) {
    fed->add_subcommand(verb, Usage(verb))->callback(run(verb));
  }
  CLI::App* rounds = fed->add_subcommand("rounds", Usage("rounds"));
  rounds->add_option("--limit", args.limit, "Newest N rounds (0 = all)");
  CLI::App* watch = rounds->add_subcommand("watch", Usage("rounds watch"));
  watch->callback(run("rounds watch"));
  rounds->final_callback([&args, &exit_code, watch] {
    if (!watch->parsed()) exit_code = RunFed(args, "rounds", std::cout, std::cerr);
  });
  CLI::App* round = fed->add_subcommand("round", "One round");
  round->require_subcommand(1);
  CLI::App* show = round->add_subcommand("show", Usage("round show"));
  show->add_option("N", args.round, "Round number")->required();
  show->callback(run("round show"));
  CLI::App* policy = fed->add_subcommand("policy", "Change the policy");
  policy->require_subcommand(1);
  CLI::App* set = policy->add_subcommand("set", Usage("policy set"));
  set->add_option("--rounds", args.rounds, "Rounds in total (0 = until paused)");
  set->add_option("--local-steps", args.local_steps, "Local optimizer steps per round");
  set->add_option("--lr", args.lr, "Local learning rate");
  set->add_option("--min-clients", args.min_clients, "Participants per round, at least");
  set->add_option("--max-clients", args.max_clients, "Participants per round, at most (0 = all)");
  set->add_option("--quorum", args.quorum, "Updates that close a round early (0 = all)");
  set->add_option("--deadline", args.deadline_s, "Round deadline, seconds");
  set->add_option("--strategy", args.strategy, "fedavg | fedit | exact | trimmed_mean | median");
  set->add_option("--server-optimizer", args.server_optimizer, "none | fedadam | fedyogi");
  set->add_option("--server-lr", args.server_lr, "FedAdam/FedYogi step size");
  set->add_option("--prox-mu", args.prox_mu, "FedProx coefficient");
  set->add_option("--clip-norm", args.clip_norm, "Clip update deltas to this L2 norm (0 = off)");
  set->add_option("--max-update-norm", args.max_update_norm, "Reject larger deltas (0 = off)");
  set->add_option("--trim-ratio", args.trim_ratio, "trimmed_mean share per end");
  set->add_option("--training-share", args.training_share, "Engine share for training, [0, 1]");
  set->callback(run("policy set"));
  CLI::App* adapter = fed->add_subcommand("adapter", "Global adapter versions");
  adapter->require_subcommand(1);
  CLI::App* pull = adapter->add_subcommand("pull", Usage("adapter pull"));
  pull->add_option("VERSION", args.version, "Global version (0 = newest)")->required();
  pull->add_option("--out,-o", args.out_dir, "Output directory")->required();
  pull->callback(run("adapter pull"));
}

}  // namespace collm::cli
