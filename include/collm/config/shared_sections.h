// Sections that read the same in every collm config file (lora:, logging:), so collmd.yaml and
// aggregator.yaml (and the router's config to come) cannot drift apart on them.
#ifndef COLLM_CONFIG_SHARED_SECTIONS_H_
#define COLLM_CONFIG_SHARED_SECTIONS_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "collm/common/logging.h"
#include "collm/config/yaml_reader.h"
#include "collm/lora/lora_config.h"

namespace collm::config {

// `parent`.lora: rank, alpha, dropout, use_rslora, targets (a list, or "all-linear"); validated.
absl::Status ParseLora(const Section& parent, lora::LoraConfig& out);

// `parent`.logging: level (trace ... off) and json.
absl::Status ParseLogging(const Section& parent, LoggingOptions& out);

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
