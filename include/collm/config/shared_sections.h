// Sections that read the same in every collm config file (lora:, logging:, http:), so
// collmd.yaml, aggregator.yaml and router.yaml cannot drift apart on them.
#ifndef COLLM_CONFIG_SHARED_SECTIONS_H_
#define COLLM_CONFIG_SHARED_SECTIONS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "collm/common/logging.h"
#include "collm/config/yaml_reader.h"
#include "collm/lora/lora_config.h"
#include "collm/serving/openai_http_server.h"

namespace collm::config {

// The OpenAI-compatible HTTP API (serving/openai_http_server.h) of collmd and collm-router, off
// unless enabled.
struct HttpConfig {
  bool enabled = false;
  std::string address = "127.0.0.1:8000";  // host:port; port 0 = pick a free one (logged).
  std::vector<std::string> api_keys;       // Bearer keys; empty = open. Empty entries (an unset
                                           // ${VAR:-}) are dropped.
  std::string chat_template;               // Family name overriding tokenizer_config.json's
                                           // chat_template ("" = recognise it).
  std::string served_model_name;           // The base model's id ("" = the model dir's name;
                                           // collm-router: "collm").
  int64_t threads = 32;                    // Concurrent connections (a stream holds one).
  int64_t max_body_bytes = 4 << 20;        // Larger request bodies get 413.
};

// `parent`.lora: rank, alpha, dropout, use_rslora, targets (a list, or "all-linear"); validated.
absl::Status ParseLora(const Section& parent, lora::LoraConfig& out);

// `parent`.logging: level (trace ... off) and json.
absl::Status ParseLogging(const Section& parent, LoggingOptions& out);

// `parent`.http: enabled, address, api_keys, chat_template (a family name), served_model_name,
// threads, max_body_bytes; validated.
absl::Status ParseHttp(const Section& parent, HttpConfig& out);
// The server options `http:` sets (address, keys, threads, body limit); the rest of HttpConfig
// (template, model name) is for the backend each binary builds.
serving::OpenAiHttpOptions OpenAiHttpOptionsFrom(const HttpConfig& http);
// A bearer secret given inline (`token`) or in a file (`token_file`, read now, surrounding
// whitespace dropped). InvalidArgument naming `file_key` when the file cannot be read or is empty.
absl::StatusOr<std::string> ResolveToken(const std::string& token, const std::string& token_file,
                                         absl::string_view file_key);

// Prefixes a module's own Validate() message with where its struct sits in the file: the message
// names the field, possibly after the module's own prefix ("lora.rank ...").
absl::Status Prefixed(const absl::Status& status, absl::string_view own_prefix,
                      absl::string_view path);

}  // namespace collm::config

#endif  // COLLM_CONFIG_SHARED_SECTIONS_H_
