// Prometheus scrape endpoint: GET /metrics over HTTP (text format 0.0.4), plus GET /healthz.
#ifndef COLLM_SERVING_METRICS_HTTP_SERVER_H_
#define COLLM_SERVING_METRICS_HTTP_SERVER_H_

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "collm/telemetry/metrics.h"

namespace httplib {
class Server;
}

namespace collm::serving {

// Thread-safe. Serves from its own thread until Stop() or destruction.
class MetricsHttpServer {
 public:
  // `address` is "host:port" (port 0 picks a free one). `refresh`, if set, runs before each
  // scrape (to copy gauges from stats snapshots). `metrics` must outlive the server.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const std::string& address, telemetry::MetricsRegistry& metrics,
      std::function<void()> refresh = {});
  ~MetricsHttpServer();
  int port() const { return port_; }
  void Stop();

 private:
  MetricsHttpServer() = default;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  int port_ = 0;
};

}  // namespace collm::serving

#endif  // COLLM_SERVING_METRICS_HTTP_SERVER_H_
