// collmctl health | stats | adapters: the operator's verbs against a running collmd (gRPC
// InferenceService and grpc.health.v1).
#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>

#include "absl/strings/str_cat.h"
#include "collm/cli/commands.h"
#include "collm/v1/inference.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "proto_json.h"

namespace collm::cli {
namespace {

std::shared_ptr<grpc::Channel> Channel(const DeviceArgs& args) {
  return grpc::CreateChannel(args.address, grpc::InsecureChannelCredentials());
}

void SetDeadline(grpc::ClientContext& ctx, const DeviceArgs& args) {
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(static_cast<int64_t>(args.timeout_s * 1000)));
}

int Report(const grpc::Status& s, const DeviceArgs& args, std::ostream& err) {
  if (s.error_code() == grpc::StatusCode::UNAVAILABLE ||
      s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
    err << "collmctl: cannot reach collmd at " << args.address << ": " << s.error_message() << "\n";
  } else {
    err << "collmctl: " << s.error_message() << "\n";
  }
  return 1;
}

std::string Loss(double loss) {
  if (loss < 0) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.4f", loss);
  return buf;
}

void PrintAdapter(const v1::AdapterInfo& a, std::ostream& out) {
  char line[256];
  std::snprintf(line, sizeof line, "%-20s %8lld %6d %9lld %10s  %s\n", a.name().c_str(),
                static_cast<long long>(a.version()), a.rank(),
                static_cast<long long>(a.previous_versions()), Loss(a.held_out_loss()).c_str(),
                a.source().c_str());
  out << line;
}

void PrintAdapterHeader(std::ostream& out) {
  char line[256];
  std::snprintf(line, sizeof line, "%-20s %8s %6s %9s %10s  %s\n", "NAME", "VERSION", "RANK",
                "ROLLBACKS", "HELD-OUT", "SOURCE");
  out << line;
}

}  // namespace

int RunHealth(const DeviceArgs& args, std::ostream& out, std::ostream& err) {
  auto stub = grpc::health::v1::Health::NewStub(Channel(args));
  grpc::ClientContext ctx;
  SetDeadline(ctx, args);
  grpc::health::v1::HealthCheckRequest req;
  req.set_service(args.service);
  grpc::health::v1::HealthCheckResponse res;
  const grpc::Status s = stub->Check(&ctx, req, &res);
  if (!s.ok()) {
    Report(s, args, err);
    return 1;
  }
  const bool serving = res.status() == grpc::health::v1::HealthCheckResponse::SERVING;
  out << (serving ? "SERVING"
                  : grpc::health::v1::HealthCheckResponse::ServingStatus_Name(res.status()))
      << "\n";
  return serving ? 0 : 1;
}

int RunStats(const DeviceArgs& args, std::ostream& out, std::ostream& err) {
  auto stub = v1::InferenceService::NewStub(Channel(args));
  grpc::ClientContext ctx;
  SetDeadline(ctx, args);
  v1::GetStatsResponse s;
  const grpc::Status status = stub->GetStats(&ctx, v1::GetStatsRequest(), &s);
  if (!status.ok()) return Report(status, args, err);
  if (args.json) {
    out << Json(s) << "\n";
    return 0;
  }
  auto row = [&out](const char* name, const std::string& value) {
    char line[160];
    std::snprintf(line, sizeof line, "%-24s %s\n", name, value.c_str());
    out << line;
  };
  row("queued", std::to_string(s.queued()));
  row("running", std::to_string(s.running()));
  row("completed", std::to_string(s.completed()));
  row("cancelled", std::to_string(s.cancelled()));
  row("expired", std::to_string(s.expired()));
  row("rejected (queue full)", std::to_string(s.rejected_queue_full()));
  row("slo met", s.completed() > 0
                     ? absl::StrCat(s.slo_met(), " (",
                                    static_cast<int>(100.0 * s.slo_met() / s.completed()), "%)")
                     : std::to_string(s.slo_met()));
  row("generated tokens", std::to_string(s.generated_tokens()));
  row("kv blocks", absl::StrCat(s.kv_blocks_used(), " / ", s.kv_blocks_total()));
  row("train optimizer steps", std::to_string(s.train_optimizer_steps()));
  row("train loss", s.train_optimizer_steps() > 0 ? Loss(s.train_loss()) : "-");
  char share[32];
  std::snprintf(share, sizeof share, "%.1f%%", 100.0 * s.train_time_share());
  row("train time share", share);
  row("published versions", std::to_string(s.published_versions()));
  row("live held-out loss", Loss(s.live_held_out_loss()));
  row("last publish decision", s.last_publish_decision().empty() ? "-" : s.last_publish_decision());
  return 0;
}

int RunAdapters(const DeviceArgs& args, const std::string& verb, std::ostream& out,
                std::ostream& err) {
  auto stub = v1::InferenceService::NewStub(Channel(args));
  grpc::ClientContext ctx;
  SetDeadline(ctx, args);
  std::string token = args.token;
  if (token.empty()) {
    if (const char* env = std::getenv("COLLM_ADMIN_TOKEN")) token = env;
  }
  if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
  if (verb == "list") {
    v1::ListAdaptersResponse res;
    const grpc::Status s = stub->ListAdapters(&ctx, v1::ListAdaptersRequest(), &res);
    if (!s.ok()) return Report(s, args, err);
    if (args.json) {
      out << Json(res) << "\n";
      return 0;
    }
    if (res.adapters().empty()) {
      out << "no adapters (requests are served by the base model)\n";
      return 0;
    }
    PrintAdapterHeader(out);
    for (const auto& a : res.adapters()) PrintAdapter(a, out);
    return 0;
  }
  if (verb == "load") {
    if (args.name.empty() || args.path.empty()) {
      err << "collmctl: adapters load needs NAME and PEFT_DIR\n";
      return 2;
    }
    v1::LoadAdapterRequest req;
    req.set_name(args.name);
    req.set_path(args.path);
    v1::LoadAdapterResponse res;
    const grpc::Status s = stub->LoadAdapter(&ctx, req, &res);
    if (!s.ok()) return Report(s, args, err);
    if (args.json) {
      out << Json(res.adapter()) << "\n";
      return 0;
    }
    out << "loaded " << res.adapter().name() << " v" << res.adapter().version() << " from "
        << args.path << "\n";
    return 0;
  }
  if (verb == "unload") {
    if (args.name.empty()) {
      err << "collmctl: adapters unload needs NAME\n";
      return 2;
    }
    v1::UnloadAdapterRequest req;
    req.set_name(args.name);
    v1::UnloadAdapterResponse res;
    const grpc::Status s = stub->UnloadAdapter(&ctx, req, &res);
    if (!s.ok()) return Report(s, args, err);
    if (!args.json) out << "unloaded " << args.name << "\n";
    return 0;
  }
  err << "collmctl: unknown adapters command '" << verb << "' (known: list, load, unload)\n";
  return 2;
}

void AddDeviceCommands(CLI::App& app, DeviceArgs& args, int& exit_code) {
  auto common = [&args](CLI::App* cmd) {
    cmd->add_option("--timeout", args.timeout_s, "Seconds per call")->capture_default_str();
  };
  CLI::App* health = app.add_subcommand(
      "health", "gRPC health of a collmd: prints SERVING and exits 0, else exits 1 (HEALTHCHECK)");
  health->add_option("ADDR", args.address, "collmd gRPC address host:port")->required();
  health->add_option("--service", args.service, "Service name to check (\"\" = the server)");
  common(health);
  health->callback([&] { exit_code = RunHealth(args, std::cout, std::cerr); });

  CLI::App* stats = app.add_subcommand("stats", "Serving and training counters of a collmd");
  stats->add_option("ADDR,--daemon,-d", args.address, "collmd gRPC address host:port")
      ->capture_default_str();
  stats->add_flag("--json", args.json, "Print JSON instead of a table");
  common(stats);
  stats->callback([&] { exit_code = RunStats(args, std::cout, std::cerr); });

  CLI::App* adapters = app.add_subcommand("adapters", "List, load and unload a collmd's adapters");
  adapters->require_subcommand(1);
  adapters->fallthrough();
  adapters->add_option("--daemon,-d", args.address, "collmd gRPC address host:port")
      ->capture_default_str();
  adapters->add_flag("--json", args.json, "Print JSON instead of a table");
  adapters->add_option("--token", args.token,
                       "collmd's server.admin_token, for load and unload (default: "
                       "$COLLM_ADMIN_TOKEN)");
  common(adapters);
  adapters->add_subcommand("list", "Adapters with version, rank, held-out loss, source")
      ->callback([&] { exit_code = RunAdapters(args, "list", std::cout, std::cerr); });
  CLI::App* load = adapters->add_subcommand("load",
                                            "Load a PEFT adapter dir (on the daemon's "
                                            "machine) under NAME (a new version if taken)");
  load->add_option("NAME", args.name, "Adapter name")->required();
  load->add_option("PEFT_DIR", args.path, "PEFT directory on the daemon's machine")->required();
  load->callback([&] { exit_code = RunAdapters(args, "load", std::cout, std::cerr); });
  CLI::App* unload = adapters->add_subcommand("unload", "Unload adapter NAME");
  unload->add_option("NAME", args.name, "Adapter name")->required();
  unload->callback([&] { exit_code = RunAdapters(args, "unload", std::cout, std::cerr); });
}

}  // namespace collm::cli
