// collm-router: one collm.v1.InferenceService endpoint in front of several collmd replicas. Polls
// each replica's load (GetStats), routes every Generate by the configured policy (slack by
// default: predicted time to first token, training replicas count as slower), ejects unhealthy
// replicas and re-admits them, retries a request once elsewhere before its first token, and
// exposes Prometheus /metrics and, with http.enabled, the OpenAI-compatible HTTP API over the same
// routing path (router_completion_backend.h). SIGTERM/SIGINT: stop accepting, let in-flight streams
// finish within shutdown_grace_seconds, exit.
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "CLI/CLI.hpp"
#include "collm/common/clock.h"
#include "collm/common/logging.h"
#include "collm/common/shutdown_signals.h"
#include "collm/coordination/routing_policy.h"
#include "collm/router/replica_pool.h"
#include "collm/router/router_completion_backend.h"
#include "collm/router/router_config.h"
#include "collm/router/router_service.h"
#include "collm/serving/grpc_server.h"
#include "collm/serving/metrics_http_server.h"
#include "collm/serving/openai_http_server.h"
#include "collm/telemetry/metrics.h"

namespace {

int Fail(const absl::Status& s, int code = 1) {
  COLLM_LOG_ERROR("{}", std::string(s.message()));
  std::cerr << "collm-router: " << s.message() << "\n";
  return code;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"collm-router: route collm.v1.InferenceService requests across collmd replicas"};
  std::string config_path, ports_file;
  app.add_option("--config,-c", config_path, "YAML config (see configs/router.yaml)")->required();
  app.add_option("--ports-file", ports_file,
                 "Write 'grpc=PORT metrics=PORT [http=PORT]' here once serving (for port 0)");
  CLI11_PARSE(app, argc, argv);

  // Before any thread starts, so only signals.Wait() below receives SIGTERM/SIGINT.
  const collm::ShutdownSignals signals;

  auto cfg = collm::router::RouterConfig::FromFile(config_path);
  if (!cfg.ok()) {
    std::cerr << "collm-router: " << cfg.status().message() << "\n";
    return 2;
  }
  if (auto s = collm::InitLogging(cfg->logging); !s.ok()) return Fail(s, 2);

  collm::telemetry::MetricsRegistry metrics;
  collm::router::ReplicaPoolOptions pool_options;
  pool_options.replicas = cfg->replicas;
  pool_options.policy = cfg->policy;
  pool_options.slack = cfg->slack;
  pool_options.ejection = cfg->ejection;
  pool_options.seed = cfg->seed;
  pool_options.poll_interval_ms = cfg->poll_interval_ms;
  pool_options.poll_timeout_ms = cfg->poll_timeout_ms;
  pool_options.max_message_bytes = cfg->max_message_bytes;
  auto pool = collm::router::ReplicaPool::Create(pool_options, collm::Clock::Real(), &metrics);
  if (!pool.ok()) return Fail(pool.status(), 2);
  (*pool)->Start();
  // Routing on a first report beats routing blind; a replica that is down only delays this.
  (*pool)->WaitForFirstPoll(cfg->poll_timeout_ms + 100);

  collm::router::RouterServiceOptions service_options;
  service_options.max_outstanding = cfg->max_outstanding;
  service_options.retry_before_first_token = cfg->retry_before_first_token;
  auto service = std::make_unique<collm::router::RouterService>(**pool, service_options, metrics);

  std::unique_ptr<collm::serving::MetricsHttpServer> metrics_server;
  if (cfg->metrics_enabled) {
    auto m = collm::serving::MetricsHttpServer::Start(cfg->metrics_address, metrics);
    if (!m.ok()) return Fail(m.status());
    metrics_server = std::move(*m);
  }

  collm::serving::GrpcServerOptions server_options;
  server_options.address = cfg->address;
  server_options.max_message_bytes = cfg->max_message_bytes;
  auto server = collm::serving::GrpcServer::Start(server_options, {service.get()});
  if (!server.ok()) return Fail(server.status());
  (*server)->SetServing(true);
  COLLM_LOG_INFO("router on port {}: {} replicas, policy {}", (*server)->port(),
                 cfg->replicas.size(), collm::coordination::RoutingPolicyName(cfg->policy));
  // The OpenAI API: each request is a Generate on this server, through an in-process channel.
  std::unique_ptr<collm::router::RouterCompletionBackend> openai_backend;
  std::unique_ptr<collm::serving::OpenAiHttpServer> openai_server;
  if (cfg->http.enabled) {
    const auto& h = cfg->http;
    const std::string base_id = h.served_model_name.empty() ? "collm" : h.served_model_name;
    openai_backend = std::make_unique<collm::router::RouterCompletionBackend>(
        (*server)->InProcessChannel(), **pool, base_id);
    auto started = collm::serving::OpenAiHttpServer::Start(collm::config::OpenAiHttpOptionsFrom(h),
                                                           *openai_backend);
    if (!started.ok()) return Fail(started.status());
    openai_server = std::move(*started);
    COLLM_LOG_INFO("OpenAI API on port {} (base model '{}', {})", openai_server->port(), base_id,
                   h.api_keys.empty() ? "no API keys" : "API keys required");
  }
  if (!ports_file.empty()) {
    const std::string tmp = ports_file + ".tmp";
    {
      std::ofstream out(tmp);
      out << "grpc=" << (*server)->port()
          << " metrics=" << (metrics_server ? metrics_server->port() : 0);
      if (openai_server) out << " http=" << openai_server->port();
      out << "\n";
    }
    std::filesystem::rename(tmp, ports_file);
  }

  // Health follows the replicas: NOT_SERVING while none is admitted, so whatever balances several
  // routers skips one that cannot serve.
  std::mutex health_mu;
  std::condition_variable health_cv;
  bool stopping = false;
  std::thread health([&] {
    bool serving = true;
    std::unique_lock<std::mutex> lock(health_mu);
    while (!stopping) {
      bool any = false;
      for (const collm::router::ReplicaStatus& r : (*pool)->Status()) any = any || r.admitted;
      if (any != serving) {
        serving = any;
        (*server)->SetServing(serving);
        COLLM_LOG_INFO("health: {}", serving ? "SERVING" : "NOT_SERVING (no replica admitted)");
      }
      health_cv.wait_for(lock, std::chrono::milliseconds(cfg->poll_interval_ms),
                         [&] { return stopping; });
    }
  });

  const int sig = signals.Wait();
  {
    std::lock_guard<std::mutex> lock(health_mu);
    stopping = true;
  }
  health_cv.notify_all();
  health.join();
  COLLM_LOG_INFO("signal {}: draining {} streams for up to {} s", sig, service->in_flight(),
                 cfg->shutdown_grace_seconds);
  (*server)->SetServing(false);
  if (openai_backend) openai_backend->SetDraining();  // /health says 503; new requests too.
  service->StopAccepting();
  const bool drained = service->WaitForIdle(cfg->shutdown_grace_seconds);
  if (!drained) COLLM_LOG_WARN("{} streams still in flight; cancelling", service->in_flight());
  // Shutdown cancels what is left; the relays then finish their calls and end.
  (*server)->Shutdown(drained ? 1.0 : 0.0);
  // Its streams ended with their Generate calls; then no handler uses the backend.
  if (openai_server) openai_server->Stop();
  openai_backend.reset();
  service.reset();  // Waits for the relay threads.
  (*pool)->Stop();
  if (metrics_server) metrics_server->Stop();
  COLLM_LOG_INFO("stopped");
  return 0;
}
