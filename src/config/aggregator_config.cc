#include "collm/config/aggregator_config.h"

#include <yaml-cpp/yaml.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "collm/common/status.h"
#include "collm/runtime/lora_weights.h"

namespace collm::config {
namespace {

namespace fs = std::filesystem;

absl::Status Invalid(const std::string& path, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(path, " ", what));
}

// ${VAR} and ${VAR:-default}; an unset VAR without a default is an error naming it.
absl::StatusOr<std::string> ExpandEnv(const std::string& text, const std::string& path) {
  std::string out;
  size_t i = 0;
  while (i < text.size()) {
    if (text.compare(i, 2, "${") != 0) {
      out += text[i++];
      continue;
    }
    const size_t close = text.find('}', i + 2);
    if (close == std::string::npos) return Invalid(path, "has an unterminated ${");
    const std::string inner = text.substr(i + 2, close - i - 2);
    const size_t sep = inner.find(":-");
    const std::string name = inner.substr(0, sep);
    const char* value = std::getenv(name.c_str());
    if (value != nullptr && *value != '\0') {
      out += value;
    } else if (sep != std::string::npos) {
      out += inner.substr(sep + 2);
    } else {
      return Invalid(path,
                     absl::StrCat("refers to environment variable ", name, ", which is not set"));
    }
    i = close + 1;
  }
  return out;
}

// A YAML map with a fixed key set; typed readers leave outputs untouched for absent keys.
class Map {
 public:
  static absl::StatusOr<Map> Open(const YAML::Node& node, const std::string& path,
                                  const std::set<std::string>& known, const std::string& base) {
    if (node.IsDefined() && !node.IsNull() && !node.IsMap()) {
      return absl::InvalidArgumentError(path.empty() ? "the configuration must be a map of keys"
                                                     : absl::StrCat(path, " must be a map"));
    }
    if (node.IsMap()) {
      for (const auto& kv : node) {
        const std::string key = kv.first.Scalar();
        if (known.count(key) == 0) {
          return absl::InvalidArgumentError(absl::StrCat(
              Join(path, key), ": unknown key (known: ", absl::StrJoin(known, ", "), ")"));
        }
      }
    }
    return Map(node, path, base);
  }
  std::string PathOf(const std::string& key) const { return Join(path_, key); }
  // yaml-cpp returns an "invalid" node for a missing key that throws on most uses: map it to
  // an undefined one.
  YAML::Node Get(const std::string& key) const {
    if (!node_.IsMap()) return YAML::Node(YAML::NodeType::Undefined);
    const YAML::Node n = static_cast<const YAML::Node&>(node_)[key];
    return n.IsDefined() ? n : YAML::Node(YAML::NodeType::Undefined);
  }
  bool Has(const std::string& key) const { return Get(key).IsDefined() && !Get(key).IsNull(); }

  absl::StatusOr<std::string> Scalar(const std::string& key) const {
    const YAML::Node n = Get(key);
    if (!n.IsScalar()) return Invalid(PathOf(key), "must be a scalar value");
    return ExpandEnv(n.Scalar(), PathOf(key));
  }
  absl::Status String(const std::string& key, std::string* out) const {
    if (!Has(key)) return absl::OkStatus();
    COLLM_ASSIGN_OR_RETURN(*out, Scalar(key));
    return absl::OkStatus();
  }
  absl::Status Path(const std::string& key, std::string* out) const {
    if (!Has(key)) return absl::OkStatus();
    COLLM_ASSIGN_OR_RETURN(std::string p, Scalar(key));
    if (p.rfind("~/", 0) == 0 && std::getenv("HOME") != nullptr)
      p = std::getenv("HOME") + p.substr(1);
    if (!p.empty() && fs::path(p).is_relative() && !base_.empty())
      p = (fs::path(base_) / p).string();
    *out = p.empty() ? p : fs::path(p).lexically_normal().string();
    return absl::OkStatus();
  }
  template <typename T>
  absl::Status Int(const std::string& key, T* out, int64_t min) const {
    if (!Has(key)) return absl::OkStatus();
    COLLM_ASSIGN_OR_RETURN(std::string s, Scalar(key));
    int64_t v = 0;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(s), &v)) {
      return Invalid(PathOf(key), absl::StrCat("must be an integer, got '", s, "'"));
    }
    if (v < min) return Invalid(PathOf(key), absl::StrCat("must be >= ", min, ", got ", v));
    *out = static_cast<T>(v);
    return absl::OkStatus();
  }
  absl::Status Double(const std::string& key, double* out) const {
    if (!Has(key)) return absl::OkStatus();
    COLLM_ASSIGN_OR_RETURN(std::string s, Scalar(key));
    if (!absl::SimpleAtod(absl::StripAsciiWhitespace(s), out)) {
      return Invalid(PathOf(key), absl::StrCat("must be a number, got '", s, "'"));
    }
    return absl::OkStatus();
  }
  absl::Status Bool(const std::string& key, bool* out) const {
    if (!Has(key)) return absl::OkStatus();
    COLLM_ASSIGN_OR_RETURN(std::string s, Scalar(key));
    if (s == "true" || s == "yes" || s == "on") {
      *out = true;
    } else if (s == "false" || s == "no" || s == "off") {
      *out = false;
    } else {
      return Invalid(PathOf(key), absl::StrCat("must be true or false, got '", s, "'"));
    }
    return absl::OkStatus();
  }

 private:
  Map(YAML::Node node, std::string path, std::string base)
      : node_(std::move(node)), path_(std::move(path)), base_(std::move(base)) {}
  static std::string Join(const std::string& path, const std::string& key) {
    return path.empty() ? key : absl::StrCat(path, ".", key);
  }
  YAML::Node node_;
  std::string path_, base_;
};

absl::Status ReadPolicy(const Map& m, v1::FederationPolicy* p) {
  int64_t i = 0;
  double d = 0;
  std::string s;
#define COLLM_POLICY_INT(name, min)               \
  if (m.Has(#name)) {                             \
    COLLM_RETURN_IF_ERROR(m.Int(#name, &i, min)); \
    p->set_##name(i);                             \
  }
#define COLLM_POLICY_DOUBLE(name)               \
  if (m.Has(#name)) {                           \
    COLLM_RETURN_IF_ERROR(m.Double(#name, &d)); \
    p->set_##name(d);                           \
  }
  COLLM_POLICY_INT(rounds, 0)
  COLLM_POLICY_INT(local_steps, 1)
  COLLM_POLICY_DOUBLE(lr)
  COLLM_POLICY_INT(min_clients, 1)
  COLLM_POLICY_INT(max_clients, 0)
  COLLM_POLICY_INT(quorum, 0)
  COLLM_POLICY_DOUBLE(deadline_s)
  if (m.Has("strategy")) {
    COLLM_RETURN_IF_ERROR(m.String("strategy", &s));
    p->set_strategy(s);
  }
  if (m.Has("server_optimizer")) {
    COLLM_RETURN_IF_ERROR(m.String("server_optimizer", &s));
    p->set_server_optimizer(s);
  }
  COLLM_POLICY_DOUBLE(server_lr)
  COLLM_POLICY_DOUBLE(prox_mu)
  COLLM_POLICY_DOUBLE(clip_norm)
  COLLM_POLICY_DOUBLE(max_update_norm)
  COLLM_POLICY_DOUBLE(trim_ratio)
  COLLM_POLICY_DOUBLE(training_share)
#undef COLLM_POLICY_INT
#undef COLLM_POLICY_DOUBLE
  return federation::ValidatePolicy(*p);
}

}  // namespace

absl::StatusOr<AggregatorConfig> AggregatorConfig::FromYaml(const std::string& yaml,
                                                            const std::string& base_dir) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("YAML syntax error at line ", e.mark.line + 1,
                                                   ", column ", e.mark.column + 1, ": ", e.msg));
  }
  AggregatorConfig c;
  COLLM_ASSIGN_OR_RETURN(
      Map top, Map::Open(root, "",
                         {"server", "state_dir", "model_config", "initial_adapter", "lora", "seed",
                          "heartbeat_interval_ms", "offline_after_missed", "max_update_bytes",
                          "tick_ms", "auto_start", "policy", "tls", "admin_token",
                          "admin_token_file", "logging", "shutdown_grace_seconds"},
                         base_dir));
  COLLM_ASSIGN_OR_RETURN(Map server, Map::Open(top.Get("server"), "server",
                                               {"address", "max_message_bytes"}, base_dir));
  COLLM_RETURN_IF_ERROR(server.String("address", &c.address));
  COLLM_RETURN_IF_ERROR(server.Int("max_message_bytes", &c.max_message_bytes, 4096));
  COLLM_RETURN_IF_ERROR(top.Path("state_dir", &c.state_dir));
  if (c.state_dir.empty()) return Invalid("state_dir", "is required");
  COLLM_RETURN_IF_ERROR(top.Path("model_config", &c.model_config));
  if (c.model_config.empty())
    return Invalid("model_config", "is required (the base model's config.json)");
  if (fs::is_directory(c.model_config)) c.model_config += "/config.json";
  COLLM_RETURN_IF_ERROR(top.Path("initial_adapter", &c.initial_adapter));
  COLLM_ASSIGN_OR_RETURN(
      Map lora, Map::Open(top.Get("lora"), "lora",
                          {"rank", "alpha", "dropout", "use_rslora", "targets"}, base_dir));
  COLLM_RETURN_IF_ERROR(lora.Int("rank", &c.lora.rank, 1));
  COLLM_RETURN_IF_ERROR(lora.Double("alpha", &c.lora.alpha));
  COLLM_RETURN_IF_ERROR(lora.Double("dropout", &c.lora.dropout));
  COLLM_RETURN_IF_ERROR(lora.Bool("use_rslora", &c.lora.use_rslora));
  if (lora.Has("targets")) {
    const YAML::Node t = lora.Get("targets");
    if (!t.IsSequence()) return Invalid("lora.targets", "must be a list of module names");
    c.lora.targets.clear();
    for (const auto& item : t) {
      auto target = runtime::ParseLoraTarget(item.Scalar());
      if (!target.ok()) return Invalid("lora.targets", std::string(target.status().message()));
      c.lora.targets.push_back(*target);
    }
  }
  if (auto s = c.lora.Validate(); !s.ok()) return s;
  COLLM_RETURN_IF_ERROR(top.Int("seed", &c.seed, 0));
  COLLM_RETURN_IF_ERROR(top.Int("heartbeat_interval_ms", &c.heartbeat_interval_ms, 1));
  COLLM_RETURN_IF_ERROR(top.Int("offline_after_missed", &c.offline_after_missed, 1));
  COLLM_RETURN_IF_ERROR(top.Int("max_update_bytes", &c.max_update_bytes, 1));
  COLLM_RETURN_IF_ERROR(top.Int("tick_ms", &c.tick_ms, 1));
  COLLM_RETURN_IF_ERROR(top.Bool("auto_start", &c.auto_start));
  COLLM_RETURN_IF_ERROR(top.Double("shutdown_grace_seconds", &c.shutdown_grace_seconds));
  COLLM_ASSIGN_OR_RETURN(
      Map policy, Map::Open(top.Get("policy"), "policy",
                            {"rounds", "local_steps", "lr", "min_clients", "max_clients", "quorum",
                             "deadline_s", "strategy", "server_optimizer", "server_lr", "prox_mu",
                             "clip_norm", "max_update_norm", "trim_ratio", "training_share"},
                            base_dir));
  COLLM_RETURN_IF_ERROR(ReadPolicy(policy, &c.policy));
  COLLM_ASSIGN_OR_RETURN(
      Map tls, Map::Open(top.Get("tls"), "tls",
                         {"cert", "key", "client_ca", "require_client_cert", "device_id_from_cert"},
                         base_dir));
  COLLM_RETURN_IF_ERROR(tls.Path("cert", &c.tls.cert));
  COLLM_RETURN_IF_ERROR(tls.Path("key", &c.tls.key));
  COLLM_RETURN_IF_ERROR(tls.Path("client_ca", &c.tls.client_ca));
  COLLM_RETURN_IF_ERROR(tls.Bool("require_client_cert", &c.tls.require_client_cert));
  COLLM_RETURN_IF_ERROR(tls.Bool("device_id_from_cert", &c.tls.device_id_from_cert));
  if (c.tls.cert.empty() != c.tls.key.empty()) return Invalid("tls", "needs both cert and key");
  if (c.tls.require_client_cert && c.tls.client_ca.empty()) {
    return Invalid("tls.require_client_cert", "needs tls.client_ca");
  }
  if (c.tls.require_client_cert && c.tls.cert.empty()) {
    return Invalid("tls.require_client_cert", "needs tls.cert and tls.key");
  }
  COLLM_RETURN_IF_ERROR(top.String("admin_token", &c.admin_token));
  COLLM_RETURN_IF_ERROR(top.Path("admin_token_file", &c.admin_token_file));
  if (!c.admin_token.empty() && !c.admin_token_file.empty()) {
    return Invalid("admin_token_file", "and admin_token are exclusive");
  }
  COLLM_ASSIGN_OR_RETURN(Map logging,
                         Map::Open(top.Get("logging"), "logging", {"level", "json"}, base_dir));
  COLLM_RETURN_IF_ERROR(logging.String("level", &c.logging.level));
  COLLM_RETURN_IF_ERROR(logging.Bool("json", &c.logging.json));
  return c;
}

absl::StatusOr<AggregatorConfig> AggregatorConfig::FromFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot read the config file"));
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string base = fs::absolute(path).parent_path().string();
  auto c = FromYaml(ss.str(), base);
  if (!c.ok()) return Annotate(c.status(), path);
  return c;
}

}  // namespace collm::config
