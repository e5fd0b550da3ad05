#include "collm/config/aggregator_config.h"

#include <yaml-cpp/yaml.h>

#include <filesystem>
#include <limits>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "collm/common/status.h"
#include "collm/config/shared_sections.h"
#include "collm/config/yaml_reader.h"

namespace collm::config {
namespace {

namespace fs = std::filesystem;

// An integer key that must be >= `min` ("tick_ms must be >= 1, got 0").
template <typename T>
absl::Status IntAtLeast(const Section& s, const std::string& key, int64_t min, T* out) {
  int64_t v = static_cast<int64_t>(*out);
  COLLM_RETURN_IF_ERROR(s.Int(key, &v));
  if (v < min) return InvalidValue(s.PathOf(key), absl::StrCat("must be >= ", min, ", got ", v));
  *out = static_cast<T>(v);
  return absl::OkStatus();
}

// A byte-size key (units allowed, as in collmd.yaml) that must be >= `min`.
absl::Status BytesAtLeast(const Section& s, const std::string& key, int64_t min, int64_t* out) {
  COLLM_RETURN_IF_ERROR(s.Bytes(key, out));
  if (*out < min) {
    return InvalidValue(s.PathOf(key), absl::StrCat("must be >= ", min, ", got ", *out));
  }
  return absl::OkStatus();
}

// Only the keys given are set on `p`, so the round manager's defaults fill the rest.
absl::Status ParsePolicy(const Section& root, v1::FederationPolicy* p) {
  COLLM_ASSIGN_OR_RETURN(
      Section s,
      root.Sub("policy", {"rounds", "local_steps", "lr", "min_clients", "max_clients", "quorum",
                          "deadline_s", "strategy", "server_optimizer", "server_lr", "prox_mu",
                          "clip_norm", "max_update_norm", "trim_ratio", "training_share"}));
  int64_t i = 0;
  double d = 0;
  std::string str;
#define COLLM_POLICY_INT(name, min)                       \
  if (s.Has(#name)) {                                     \
    COLLM_RETURN_IF_ERROR(IntAtLeast(s, #name, min, &i)); \
    p->set_##name(i);                                     \
  }
#define COLLM_POLICY_DOUBLE(name)               \
  if (s.Has(#name)) {                           \
    COLLM_RETURN_IF_ERROR(s.Double(#name, &d)); \
    p->set_##name(d);                           \
  }
#define COLLM_POLICY_STRING(name)                 \
  if (s.Has(#name)) {                             \
    COLLM_RETURN_IF_ERROR(s.String(#name, &str)); \
    p->set_##name(str);                           \
  }
  COLLM_POLICY_INT(rounds, 0)
  COLLM_POLICY_INT(local_steps, 1)
  COLLM_POLICY_DOUBLE(lr)
  COLLM_POLICY_INT(min_clients, 1)
  COLLM_POLICY_INT(max_clients, 0)
  COLLM_POLICY_INT(quorum, 0)
  COLLM_POLICY_DOUBLE(deadline_s)
  COLLM_POLICY_STRING(strategy)
  COLLM_POLICY_STRING(server_optimizer)
  COLLM_POLICY_DOUBLE(server_lr)
  COLLM_POLICY_DOUBLE(prox_mu)
  COLLM_POLICY_DOUBLE(clip_norm)
  COLLM_POLICY_DOUBLE(max_update_norm)
  COLLM_POLICY_DOUBLE(trim_ratio)
  COLLM_POLICY_DOUBLE(training_share)
#undef COLLM_POLICY_INT
#undef COLLM_POLICY_DOUBLE
#undef COLLM_POLICY_STRING
  return federation::ValidatePolicy(*p);
}

absl::Status ParseCoordination(const Section& root, coordination::RoundPlannerOptions& o) {
  COLLM_ASSIGN_OR_RETURN(
      Section s, root.Sub("coordination", {"policy", "V", "slo_target", "max_utilization",
                                           "max_share", "min_budget_steps", "deadline_slack"}));
  if (s.Has("policy")) {
    std::string name;
    COLLM_RETURN_IF_ERROR(s.String("policy", &name));
    auto policy = coordination::ParseRoundPolicy(name);
    if (!policy.ok())
      return InvalidValue(s.PathOf("policy"), std::string(policy.status().message()));
    o.policy = *policy;
  }
  COLLM_RETURN_IF_ERROR(s.Double("V", &o.v));
  COLLM_RETURN_IF_ERROR(s.Double("slo_target", &o.slo_target));
  COLLM_RETURN_IF_ERROR(s.Double("max_utilization", &o.max_utilization));
  COLLM_RETURN_IF_ERROR(s.Double("max_share", &o.max_share));
  COLLM_RETURN_IF_ERROR(s.Int("min_budget_steps", &o.min_budget_steps));
  COLLM_RETURN_IF_ERROR(s.Double("deadline_slack", &o.deadline_slack));
  return coordination::ValidateRoundPlannerOptions(o);
}

absl::Status ParseTls(const Section& root, AggregatorTlsConfig& tls) {
  COLLM_ASSIGN_OR_RETURN(
      Section s,
      root.Sub("tls", {"cert", "key", "client_ca", "require_client_cert", "device_id_from_cert"}));
  COLLM_RETURN_IF_ERROR(s.Path("cert", &tls.cert));
  COLLM_RETURN_IF_ERROR(s.Path("key", &tls.key));
  COLLM_RETURN_IF_ERROR(s.Path("client_ca", &tls.client_ca));
  COLLM_RETURN_IF_ERROR(s.Bool("require_client_cert", &tls.require_client_cert));
  COLLM_RETURN_IF_ERROR(s.Bool("device_id_from_cert", &tls.device_id_from_cert));
  if (tls.cert.empty() != tls.key.empty()) return InvalidValue("tls", "needs both cert and key");
  if (tls.require_client_cert && tls.client_ca.empty()) {
    return InvalidValue("tls.require_client_cert", "needs tls.client_ca");
  }
  if (tls.require_client_cert && tls.cert.empty()) {
    return InvalidValue("tls.require_client_cert", "needs tls.cert and tls.key");
  }
  return absl::OkStatus();
}

absl::StatusOr<AggregatorConfig> Parse(const YAML::Node& doc, const std::string& base_dir) {
  COLLM_ASSIGN_OR_RETURN(
      Section top,
      Section::Open(doc, "",
                    {"server", "state_dir", "model_config", "initial_adapter", "lora", "seed",
                     "heartbeat_interval_ms", "offline_after_missed", "max_update_bytes", "tick_ms",
                     "auto_start", "policy", "tls", "admin_token", "admin_token_file", "logging",
                     "shutdown_grace_seconds", "coordination", "metrics_address"},
                    base_dir));
  AggregatorConfig c;
  COLLM_ASSIGN_OR_RETURN(Section server, top.Sub("server", {"address", "max_message_bytes"}));
  COLLM_RETURN_IF_ERROR(server.String("address", &c.address));
  COLLM_RETURN_IF_ERROR(BytesAtLeast(server, "max_message_bytes", 4096, &c.max_message_bytes));
  if (c.max_message_bytes > std::numeric_limits<int32_t>::max()) {
    // gRPC takes message limits as int.
    return InvalidValue(server.PathOf("max_message_bytes"),
                        absl::StrCat("must be < 2GiB, got ", c.max_message_bytes));
  }
  COLLM_RETURN_IF_ERROR(top.Path("state_dir", &c.state_dir));
  if (c.state_dir.empty()) return InvalidValue("state_dir", "is required");
  COLLM_RETURN_IF_ERROR(top.Path("model_config", &c.model_config));
  if (c.model_config.empty()) {
    return InvalidValue("model_config", "is required (the base model's config.json)");
  }
  std::error_code ec;
  if (fs::is_directory(c.model_config, ec)) c.model_config += "/config.json";
  COLLM_RETURN_IF_ERROR(top.Path("initial_adapter", &c.initial_adapter));
  COLLM_RETURN_IF_ERROR(ParseLora(top, c.lora));
  COLLM_RETURN_IF_ERROR(top.Uint("seed", &c.seed));
  COLLM_RETURN_IF_ERROR(IntAtLeast(top, "heartbeat_interval_ms", 1, &c.heartbeat_interval_ms));
  COLLM_RETURN_IF_ERROR(IntAtLeast(top, "offline_after_missed", 1, &c.offline_after_missed));
  COLLM_RETURN_IF_ERROR(BytesAtLeast(top, "max_update_bytes", 1, &c.max_update_bytes));
  COLLM_RETURN_IF_ERROR(IntAtLeast(top, "tick_ms", 1, &c.tick_ms));
  COLLM_RETURN_IF_ERROR(top.Bool("auto_start", &c.auto_start));
  COLLM_RETURN_IF_ERROR(top.Double("shutdown_grace_seconds", &c.shutdown_grace_seconds));
  if (c.shutdown_grace_seconds < 0) {
    return InvalidValue("shutdown_grace_seconds",
                        absl::StrCat("must be >= 0, got ", c.shutdown_grace_seconds));
  }
  COLLM_RETURN_IF_ERROR(ParsePolicy(top, &c.policy));
  COLLM_RETURN_IF_ERROR(ParseTls(top, c.tls));
  COLLM_RETURN_IF_ERROR(ParseCoordination(top, c.coordination));
  COLLM_RETURN_IF_ERROR(top.String("metrics_address", &c.metrics_address));
  COLLM_RETURN_IF_ERROR(top.String("admin_token", &c.admin_token));
  COLLM_RETURN_IF_ERROR(top.Path("admin_token_file", &c.admin_token_file));
  if (!c.admin_token.empty() && !c.admin_token_file.empty()) {
    return InvalidValue("admin_token_file", "and admin_token are exclusive");
  }
  COLLM_RETURN_IF_ERROR(ParseLogging(top, c.logging));
  return c;
}

}  // namespace

absl::StatusOr<AggregatorConfig> AggregatorConfig::FromYaml(const std::string& yaml,
                                                            const std::string& base_dir) {
  COLLM_ASSIGN_OR_RETURN(YAML::Node doc, LoadYaml(yaml));
  try {
    return Parse(doc, base_dir);
  } catch (const YAML::Exception& e) {
    // Reading a well-formed tree should not throw; report rather than crash if it does.
    return absl::InvalidArgumentError(absl::StrCat("could not read YAML: ", e.what()));
  }
}

absl::StatusOr<AggregatorConfig> AggregatorConfig::FromFile(const std::string& path) {
  COLLM_ASSIGN_OR_RETURN(ConfigFileText file, ReadConfigFile(path));
  auto c = FromYaml(file.text, file.base_dir);
  if (!c.ok()) return Annotate(c.status(), path);
  return c;
}

}  // namespace collm::config
