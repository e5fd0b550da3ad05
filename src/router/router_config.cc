#include "collm/router/router_config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "collm/common/status.h"
#include "collm/config/shared_sections.h"
#include "collm/config/yaml_reader.h"

namespace collm::router {
namespace {

using config::InvalidValue;
using config::Section;

absl::Status IntIn(const Section& s, const std::string& key, int64_t min, int64_t max,
                   int64_t* out) {
  COLLM_RETURN_IF_ERROR(s.Int(key, out));
  if (*out < min || *out > max) {
    return InvalidValue(s.PathOf(key),
                        max == std::numeric_limits<int64_t>::max()
                            ? absl::StrCat("must be >= ", min, ", got ", *out)
                            : absl::StrCat("must be in [", min, ", ", max, "], got ", *out));
  }
  return absl::OkStatus();
}

// host:port with a port in [0, 65535] (0 only where the router listens).
absl::Status CheckAddress(const std::string& path, const std::string& address) {
  const size_t colon = address.rfind(':');
  if (address.empty() || colon == std::string::npos || colon == 0 || colon + 1 == address.size()) {
    return InvalidValue(path, absl::StrCat("must be host:port, got '", address, "'"));
  }
  const std::string port = address.substr(colon + 1);
  if (!std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; }) ||
      port.size() > 5 || std::stoi(port) > 65535) {
    return InvalidValue(path, absl::StrCat("has a bad port in '", address, "'"));
  }
  return absl::OkStatus();
}

absl::StatusOr<RouterConfig> Parse(const YAML::Node& doc) {
  COLLM_ASSIGN_OR_RETURN(
      Section top,
      Section::Open(doc, "",
                    {"server", "metrics", "replicas", "policy", "seed", "poll_interval_ms",
                     "poll_timeout_ms", "max_outstanding", "retry_before_first_token", "slack",
                     "ejection", "http", "logging", "shutdown_grace_seconds"},
                    /*base_dir=*/""));
  RouterConfig c;
  COLLM_ASSIGN_OR_RETURN(Section server, top.Sub("server", {"address", "max_message_bytes"}));
  COLLM_RETURN_IF_ERROR(server.String("address", &c.address));
  COLLM_RETURN_IF_ERROR(CheckAddress(server.PathOf("address"), c.address));
  COLLM_RETURN_IF_ERROR(server.Bytes("max_message_bytes", &c.max_message_bytes));
  if (c.max_message_bytes < 4096 || c.max_message_bytes > std::numeric_limits<int32_t>::max()) {
    return InvalidValue(server.PathOf("max_message_bytes"),
                        absl::StrCat("must be in [4096, 2GiB), got ", c.max_message_bytes));
  }

  COLLM_ASSIGN_OR_RETURN(Section metrics, top.Sub("metrics", {"enabled", "address"}));
  COLLM_RETURN_IF_ERROR(metrics.Bool("enabled", &c.metrics_enabled));
  COLLM_RETURN_IF_ERROR(metrics.String("address", &c.metrics_address));
  if (c.metrics_enabled) {
    COLLM_RETURN_IF_ERROR(CheckAddress(metrics.PathOf("address"), c.metrics_address));
  }

  if (!top.Has("replicas")) return InvalidValue("replicas", "is required (collmd addresses)");
  COLLM_RETURN_IF_ERROR(top.StringList("replicas", &c.replicas));
  if (c.replicas.empty()) return InvalidValue("replicas", "must list at least one replica");
  for (size_t i = 0; i < c.replicas.size(); ++i) {
    const std::string path = absl::StrCat("replicas[", i, "]");
    COLLM_RETURN_IF_ERROR(CheckAddress(path, c.replicas[i]));
    if (c.replicas[i].substr(c.replicas[i].rfind(':') + 1) == "0") {
      return InvalidValue(path, absl::StrCat("needs a real port, got '", c.replicas[i], "'"));
    }
    for (size_t j = 0; j < i; ++j) {
      if (c.replicas[j] == c.replicas[i]) {
        return InvalidValue(path, absl::StrCat("'", c.replicas[i], "' is listed twice"));
      }
    }
  }

  COLLM_RETURN_IF_ERROR(top.Enum<coordination::RoutingPolicyKind>(
      "policy",
      {{"slack", coordination::RoutingPolicyKind::kSlack},
       {"round_robin", coordination::RoutingPolicyKind::kRoundRobin},
       {"least_outstanding", coordination::RoutingPolicyKind::kLeastOutstanding}},
      &c.policy));
  COLLM_RETURN_IF_ERROR(top.Uint("seed", &c.seed));
  COLLM_RETURN_IF_ERROR(IntIn(top, "poll_interval_ms", 1, 100, &c.poll_interval_ms));
  COLLM_RETURN_IF_ERROR(
      IntIn(top, "poll_timeout_ms", 1, std::numeric_limits<int64_t>::max(), &c.poll_timeout_ms));
  COLLM_RETURN_IF_ERROR(
      IntIn(top, "max_outstanding", 1, std::numeric_limits<int64_t>::max(), &c.max_outstanding));
  COLLM_RETURN_IF_ERROR(top.Bool("retry_before_first_token", &c.retry_before_first_token));

  COLLM_ASSIGN_OR_RETURN(Section slack,
                         top.Sub("slack", {"default_seconds_per_token", "decode_weight_tokens",
                                           "tie_margin", "min_speed", "low_kv_penalty_seconds",
                                           "low_kv_fraction", "per_replica_cost"}));
  COLLM_RETURN_IF_ERROR(
      slack.Double("default_seconds_per_token", &c.slack.default_seconds_per_token));
  COLLM_RETURN_IF_ERROR(slack.Double("decode_weight_tokens", &c.slack.decode_weight_tokens));
  COLLM_RETURN_IF_ERROR(slack.Double("tie_margin", &c.slack.tie_margin));
  COLLM_RETURN_IF_ERROR(slack.Double("min_speed", &c.slack.min_speed));
  COLLM_RETURN_IF_ERROR(slack.Double("low_kv_penalty_seconds", &c.slack.low_kv_penalty_seconds));
  COLLM_RETURN_IF_ERROR(slack.Double("low_kv_fraction", &c.slack.low_kv_fraction));
  COLLM_RETURN_IF_ERROR(slack.Bool("per_replica_cost", &c.slack.per_replica_cost));
  COLLM_RETURN_IF_ERROR(coordination::ValidateSlackOptions(c.slack));

  COLLM_ASSIGN_OR_RETURN(
      Section ejection,
      top.Sub("ejection", {"failures_to_eject", "base_backoff_ms", "max_backoff_ms"}));
  COLLM_RETURN_IF_ERROR(ejection.Int("failures_to_eject", &c.ejection.failures_to_eject));
  COLLM_RETURN_IF_ERROR(ejection.Int("base_backoff_ms", &c.ejection.base_backoff_ms));
  COLLM_RETURN_IF_ERROR(ejection.Int("max_backoff_ms", &c.ejection.max_backoff_ms));
  COLLM_RETURN_IF_ERROR(coordination::ValidateEjectionOptions(c.ejection));

  COLLM_RETURN_IF_ERROR(config::ParseHttp(top, c.http));
  if (c.http.enabled) COLLM_RETURN_IF_ERROR(CheckAddress("http.address", c.http.address));
  if (!c.http.chat_template.empty()) {
    return InvalidValue("http.chat_template",
                        "is not used by collm-router (each replica renders chats with its own "
                        "model's template; set it in the replicas' configs), got '" +
                            c.http.chat_template + "'");
  }
  COLLM_RETURN_IF_ERROR(config::ParseLogging(top, c.logging));
  COLLM_RETURN_IF_ERROR(top.Double("shutdown_grace_seconds", &c.shutdown_grace_seconds));
  if (c.shutdown_grace_seconds < 0) {
    return InvalidValue("shutdown_grace_seconds",
                        absl::StrCat("must be >= 0, got ", c.shutdown_grace_seconds));
  }
  return c;
}

}  // namespace

absl::StatusOr<RouterConfig> RouterConfig::FromYaml(const std::string& yaml) {
  COLLM_ASSIGN_OR_RETURN(YAML::Node doc, config::LoadYaml(yaml));
  try {
    return Parse(doc);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("could not read YAML: ", e.what()));
  }
}

absl::StatusOr<RouterConfig> RouterConfig::FromFile(const std::string& path) {
  COLLM_ASSIGN_OR_RETURN(config::ConfigFileText file, config::ReadConfigFile(path));
  auto c = FromYaml(file.text);
  if (!c.ok()) return Annotate(c.status(), path);
  return c;
}

}  // namespace collm::router
