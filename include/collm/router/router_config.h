// collm-router's configuration: YAML (configs/router.yaml documents every key), read with the same
// rules as collmd.yaml (collm/config/yaml_reader.h: ${VAR} expansion, unknown keys with
// suggestions). Bad values are InvalidArgument naming the key path ("poll_interval_ms must be in
// [1, 100], got 500"; "replicas[1] '127.0.0.1:5001' is listed twice").
#ifndef COLLM_ROUTER_ROUTER_CONFIG_H_
#define COLLM_ROUTER_ROUTER_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "collm/common/logging.h"
#include "collm/config/shared_sections.h"
#include "collm/coordination/replica_health.h"
#include "collm/coordination/routing_policy.h"

namespace collm::router {

struct RouterConfig {
  std::string address = "127.0.0.1:50050";  // gRPC listen address; port 0 = pick a free one.
  int64_t max_message_bytes = 64 << 20;     // Per gRPC message, both directions.
  bool metrics_enabled = true;
  std::string metrics_address = "127.0.0.1:9500";  // Prometheus /metrics; port 0 = free port.
  std::vector<std::string> replicas;               // Required: collmd gRPC addresses, host:port.
  coordination::RoutingPolicyKind policy = coordination::RoutingPolicyKind::kSlack;
  coordination::SlackOptions slack;
  coordination::EjectionOptions ejection;
  uint64_t seed = 0;              // The slack policy's random choice between the best two.
  int64_t poll_interval_ms = 50;  // GetStats of every replica this often; [1, 100].
  int64_t poll_timeout_ms = 500;  // A poll slower than this counts as a failure; >= 1.
  int64_t max_outstanding = 256;  // Generate calls in flight through the router; more are refused.
  bool retry_before_first_token = true;  // Retry once elsewhere when no token was streamed yet.
  // The OpenAI-compatible HTTP API in front of the replicas (the same http: keys as collmd's;
  // chat_template must stay empty: each replica renders chats with its own model's template).
  config::HttpConfig http;
  LoggingOptions logging;
  double shutdown_grace_seconds = 10;  // SIGTERM: how long in-flight streams may finish.

  // ${VAR} / ${VAR:-default} / $${ expand in every value. Byte sizes take units (64MiB).
  static absl::StatusOr<RouterConfig> FromYaml(const std::string& yaml);
  // FromYaml on the file's text; errors prefixed with "PATH: ". NotFound when it does not exist.
  static absl::StatusOr<RouterConfig> FromFile(const std::string& path);
};

}  // namespace collm::router

#endif  // COLLM_ROUTER_ROUTER_CONFIG_H_
