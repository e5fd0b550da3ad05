#include "collm/config/shared_sections.h"

#include <algorithm>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "collm/common/status.h"
#include "collm/runtime/lora_weights.h"
#include "collm/serving/chat_template.h"

namespace collm::config {

namespace {

absl::Status CheckPositive(const std::string& path, int64_t value) {
  if (value > 0) return absl::OkStatus();
  return InvalidValue(path, absl::StrCat("must be > 0, got ", value));
}

}  // namespace

absl::StatusOr<std::string> ResolveToken(const std::string& token, const std::string& token_file,
                                         absl::string_view file_key) {
  if (token_file.empty()) return token;
  std::ifstream in(token_file, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat(file_key, ": cannot read ", token_file));
  std::stringstream text;
  text << in.rdbuf();
  std::string secret(absl::StripAsciiWhitespace(text.str()));
  if (secret.empty())
    return absl::InvalidArgumentError(absl::StrCat(file_key, ": ", token_file, " is empty"));
  return secret;
}

// Prefixes a module's own Validate() message with where its struct sits in the file: the message
// names the field, possibly after the module's own prefix ("lora.rank ...").
absl::Status Prefixed(const absl::Status& status, absl::string_view own_prefix,
                      absl::string_view path) {
  if (status.ok()) return status;
  absl::string_view message = status.message();
  absl::ConsumePrefix(&message, own_prefix);
  return absl::Status(status.code(), absl::StrCat(path, ".", message));
}

absl::Status ParseLora(const Section& training, lora::LoraConfig& out) {
  COLLM_ASSIGN_OR_RETURN(
      Section s, training.Sub("lora", {"rank", "alpha", "dropout", "use_rslora", "targets"}));
  COLLM_RETURN_IF_ERROR(s.Int("rank", &out.rank));
  COLLM_RETURN_IF_ERROR(s.Double("alpha", &out.alpha));
  COLLM_RETURN_IF_ERROR(s.Double("dropout", &out.dropout));
  COLLM_RETURN_IF_ERROR(s.Bool("use_rslora", &out.use_rslora));
  if (s.Has("targets")) {
    const std::string path = s.PathOf("targets");
    std::vector<std::string> names;
    const YAML::Node node = s.Get("targets");
    if (node.IsScalar() && node.Scalar() == "all-linear") {
      for (int i = 0; i < runtime::kNumLoraTargets; ++i) {
        names.push_back(runtime::LoraTargetName(static_cast<runtime::LoraTarget>(i)));
      }
    } else {
      COLLM_RETURN_IF_ERROR(s.StringList("targets", &names));
    }
    out.targets.clear();
    for (size_t i = 0; i < names.size(); ++i) {
      absl::StatusOr<runtime::LoraTarget> target = runtime::ParseLoraTarget(names[i]);
      if (!target.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, "[", i, "]: ", target.status().message()));
      }
      out.targets.push_back(*target);
    }
  }
  return Prefixed(out.Validate(), "lora.", s.path());
}

absl::Status ParseLogging(const Section& root, LoggingOptions& out) {
  COLLM_ASSIGN_OR_RETURN(Section s, root.Sub("logging", {"level", "json"}));
  COLLM_RETURN_IF_ERROR(s.String("level", &out.level));
  COLLM_RETURN_IF_ERROR(s.Bool("json", &out.json));
  static const char* const kLevels[] = {"trace", "debug",    "info", "warn",
                                        "error", "critical", "off"};
  if (std::find(std::begin(kLevels), std::end(kLevels), out.level) == std::end(kLevels)) {
    return InvalidValue(
        s.PathOf("level"),
        absl::StrCat("must be one of ", absl::StrJoin(kLevels, ", "), ", got '", out.level, "'"));
  }
  return absl::OkStatus();
}

absl::Status ParseHttp(const Section& root, HttpConfig& out) {
  COLLM_ASSIGN_OR_RETURN(Section s,
                         root.Sub("http", {"enabled", "address", "api_keys", "chat_template",
                                           "served_model_name", "threads", "max_body_bytes"}));
  COLLM_RETURN_IF_ERROR(s.Bool("enabled", &out.enabled));
  COLLM_RETURN_IF_ERROR(s.String("address", &out.address));
  if (out.address.empty()) return InvalidValue(s.PathOf("address"), "must not be empty");
  COLLM_RETURN_IF_ERROR(s.StringList("api_keys", &out.api_keys));
  out.api_keys.erase(std::remove(out.api_keys.begin(), out.api_keys.end(), std::string()),
                     out.api_keys.end());
  COLLM_RETURN_IF_ERROR(s.String("chat_template", &out.chat_template));
  if (!out.chat_template.empty()) {
    if (auto family = serving::ParseChatFamily(out.chat_template); !family.ok())
      return InvalidValue(s.PathOf("chat_template"), family.status().message());
  }
  COLLM_RETURN_IF_ERROR(s.String("served_model_name", &out.served_model_name));
  COLLM_RETURN_IF_ERROR(s.Int("threads", &out.threads));
  COLLM_RETURN_IF_ERROR(CheckPositive(s.PathOf("threads"), out.threads));
  COLLM_RETURN_IF_ERROR(s.Bytes("max_body_bytes", &out.max_body_bytes));
  COLLM_RETURN_IF_ERROR(CheckPositive(s.PathOf("max_body_bytes"), out.max_body_bytes));
  return absl::OkStatus();
}

serving::OpenAiHttpOptions OpenAiHttpOptionsFrom(const HttpConfig& http) {
  serving::OpenAiHttpOptions o;
  o.address = http.address;
  o.api_keys = http.api_keys;
  o.threads = static_cast<int>(http.threads);
  o.max_body_bytes = http.max_body_bytes;
  return o;
}

}  // namespace collm::config
