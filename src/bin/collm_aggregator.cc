// collm-aggregator: the federation's server. Devices (collmd) connect out to it; operators use
// collmctl fed. Runs rounds (see federation/round_manager.h), persists everything in its state dir
// and resumes from it after a restart; SIGTERM/SIGINT persist and exit.

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include "CLI/CLI.hpp"
#include "absl/strings/ascii.h"
#include "collm/common/clock.h"
#include "collm/common/logging.h"
#include "collm/common/shutdown_signals.h"
#include "collm/config/aggregator_config.h"
#include "collm/config/shared_sections.h"
#include "collm/federation/fingerprint.h"
#include "collm/federation/round_manager.h"
#include "collm/federation/state_store.h"
#include "collm/lora/peft_io.h"
#include "collm/serving/federation_service.h"
#include "collm/serving/grpc_server.h"
#include "collm/serving/metrics_http_server.h"
#include "collm/telemetry/metrics.h"

namespace {

// Deadlines go to devices as Unix milliseconds and persist across restarts, so the round manager
// needs wall-clock time (Clock::Real() is steady, with an arbitrary epoch).
class UnixClock final : public collm::Clock {
 public:
  int64_t NowNanos() const override {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
  }
};

int Fail(const absl::Status& s, int code = 1) {
  COLLM_LOG_ERROR("{}", std::string(s.message()));
  std::cerr << "collm-aggregator: " << s.message() << "\n";
  return code;
}

absl::StatusOr<std::string> ReadText(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(what, ": cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"collm-aggregator: federated LoRA rounds for collm devices"};
  std::string config_path, ports_file;
  app.add_option("--config,-c", config_path, "YAML config (see configs/aggregator.yaml)")
      ->required();
  app.add_option("--ports-file", ports_file, "Write 'grpc=PORT' here once serving (for port 0)");
  CLI11_PARSE(app, argc, argv);

  // Before any thread starts, so only signals.Wait() below receives SIGTERM/SIGINT.
  const collm::ShutdownSignals signals;

  auto cfg = collm::config::AggregatorConfig::FromFile(config_path);
  if (!cfg.ok()) {
    std::cerr << "collm-aggregator: " << cfg.status().message() << "\n";
    return 2;
  }
  if (auto s = collm::InitLogging(cfg->logging); !s.ok()) return Fail(s, 2);
  auto token =
      collm::config::ResolveToken(cfg->admin_token, cfg->admin_token_file, "admin_token_file");
  if (!token.ok()) return Fail(token.status(), 2);
  const std::string admin_token = *token;
  if (admin_token.empty()) {
    COLLM_LOG_WARN("no admin_token: admin calls are not authenticated");
  }

  auto model = collm::runtime::ModelConfig::FromFile(cfg->model_config);
  if (!model.ok()) return Fail(model.status(), 2);
  auto initial = cfg->initial_adapter.empty()
                     ? collm::lora::LoraAdapter::Create(*model, cfg->lora, cfg->seed)
                     : collm::lora::ReadPeftAdapter(cfg->initial_adapter, *model);
  if (!initial.ok()) return Fail(initial.status(), 2);
  auto store = collm::federation::StateStore::Open(cfg->state_dir);
  if (!store.ok()) return Fail(store.status());

  collm::federation::RoundManagerOptions options;
  options.model = *model;
  options.heartbeat_interval_ms = cfg->heartbeat_interval_ms;
  options.offline_after_missed = cfg->offline_after_missed;
  options.policy = cfg->policy;
  options.auto_start = cfg->auto_start;
  options.seed = cfg->seed;
  options.planner = cfg->coordination;
  collm::telemetry::MetricsRegistry metrics;
  options.metrics = &metrics;
  UnixClock clock;
  auto manager = collm::federation::RoundManager::Create(options, clock, store->get(), *initial);
  if (!manager.ok()) return Fail(manager.status());

  collm::serving::FederationServiceOptions service_options;
  service_options.admin_token = admin_token;
  service_options.device_id_from_cert =
      cfg->tls.require_client_cert && cfg->tls.device_id_from_cert;
  service_options.max_update_bytes = cfg->max_update_bytes;
  service_options.chunk_bytes = std::min<int64_t>(1 << 20, cfg->max_message_bytes / 2);
  collm::serving::FederationServiceImpl device_service(**manager, service_options);
  collm::serving::FederationAdminServiceImpl admin_service(**manager, service_options);

  collm::serving::GrpcServerOptions server_options;
  server_options.address = cfg->address;
  server_options.max_message_bytes = cfg->max_message_bytes;
  if (cfg->tls.enabled()) {
    auto cert = ReadText(cfg->tls.cert, "tls.cert");
    auto key = ReadText(cfg->tls.key, "tls.key");
    if (!cert.ok()) return Fail(cert.status(), 2);
    if (!key.ok()) return Fail(key.status(), 2);
    grpc::SslServerCredentialsOptions ssl(
        cfg->tls.require_client_cert
            ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
            : (cfg->tls.client_ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                          : GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY));
    if (!cfg->tls.client_ca.empty()) {
      auto ca = ReadText(cfg->tls.client_ca, "tls.client_ca");
      if (!ca.ok()) return Fail(ca.status(), 2);
      ssl.pem_root_certs = *ca;
    }
    ssl.pem_key_cert_pairs.push_back({*key, *cert});
    server_options.credentials = grpc::SslServerCredentials(ssl);
  }
  auto server =
      collm::serving::GrpcServer::Start(server_options, {&device_service, &admin_service});
  if (!server.ok()) return Fail(server.status());
  (*server)->SetServing(true);
  COLLM_LOG_INFO(
      "aggregator on port {} ({}), state {}, model fingerprint {}", (*server)->port(),
      cfg->tls.enabled() ? (cfg->tls.require_client_cert ? "mutual TLS" : "TLS") : "plaintext",
      cfg->state_dir, collm::federation::ModelFingerprint(*model));
  std::unique_ptr<collm::serving::MetricsHttpServer> metrics_server;
  if (!cfg->metrics_address.empty()) {
    // Status counters are copied into gauges at each scrape; rounds, updates and decisions are
    // recorded by the round manager as they happen.
    auto started = collm::serving::MetricsHttpServer::Start(cfg->metrics_address, metrics, [&] {
      const collm::v1::FederationStatus st = (*manager)->Status();
      metrics.GetGauge("collm_fed_global_version", "Newest global adapter version")
          ->Set(static_cast<double>(st.global_version()));
      metrics.GetGauge("collm_fed_devices_online", "Devices online")
          ->Set(static_cast<double>(st.devices_online()));
      metrics.GetGauge("collm_fed_devices_total", "Devices known")
          ->Set(static_cast<double>(st.devices_total()));
      metrics.GetGauge("collm_fed_rounds_completed", "Rounds aggregated")
          ->Set(static_cast<double>(st.rounds_completed()));
    });
    if (!started.ok()) return Fail(started.status());
    metrics_server = std::move(*started);
    COLLM_LOG_INFO("metrics on http://{}/metrics (port {})", cfg->metrics_address,
                   metrics_server->port());
  }
  if (!ports_file.empty()) {
    const std::string tmp = ports_file + ".tmp";
    std::ofstream(tmp) << "grpc=" << (*server)->port()
                       << (metrics_server ? " metrics=" + std::to_string(metrics_server->port())
                                          : std::string())
                       << "\n";
    std::filesystem::rename(tmp, ports_file);
  }

  // Rounds advance on every change (an accepted update may complete a quorum) and at least every
  // tick_ms (deadlines, devices going offline).
  std::atomic<bool> stop{false};
  std::thread ticker([&] {
    int64_t seen = -1;
    while (!stop.load()) {
      (*manager)->Tick();
      seen = (*manager)->WaitForChange(seen, cfg->tick_ms);
    }
  });

  const int sig = signals.Wait();
  COLLM_LOG_INFO("signal {}: persisting and stopping", sig);
  stop.store(true);
  (*server)->SetServing(false);
  const absl::Status persisted = (*manager)->Shutdown();  // Also ends WatchRounds streams.
  ticker.join();
  (*server)->Shutdown(cfg->shutdown_grace_seconds);
  if (metrics_server) metrics_server->Stop();
  if (!persisted.ok()) return Fail(persisted);
  COLLM_LOG_INFO("stopped");
  return 0;
}
