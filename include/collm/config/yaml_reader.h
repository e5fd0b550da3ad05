// The one YAML reader behind every collm config file (collmd.yaml, aggregator.yaml, and the
// router's to come), so the same text means the same thing in each:
// - Every scalar expands ${VAR} and ${VAR:-default} (the default also when VAR is set but empty, as
//   in sh); an unset VAR without a default is an error naming the key; "$${" is a literal "${".
// - Paths expand a leading "~" / "~/" to $HOME (an error when HOME is unset) and, when relative,
//   resolve against the config file's directory.
// - A section (YAML map) has a fixed key set: an unknown key is an error naming its full path, the
//   keys it could be, and the closest one ("engine.max_step_tokenz: unknown key (known: ...); did
//   you mean max_step_tokens?"); duplicate keys are errors too.
// - Bad values are InvalidArgument naming the full key path ("policy.lr must be a finite number,
//   got 'x'"). Booleans are true/false/yes/no/on/off (any case); numbers must be finite.
#ifndef COLLM_CONFIG_YAML_READER_H_
#define COLLM_CONFIG_YAML_READER_H_

#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace collm::config {

// "a.b" from ("a", "b"); "b" from ("", "b").
std::string JoinKeyPath(const std::string& path, const std::string& key);

// InvalidArgument "<key_path> <what>".
absl::Status InvalidValue(const std::string& key_path, absl::string_view what);

// ${VAR} / ${VAR:-default} / $${ expansion of one value; errors name `key_path`.
absl::StatusOr<std::string> ExpandEnv(const std::string& text, const std::string& key_path);

// "~" / "~/..." -> $HOME, then a relative path is taken against `base_dir` ("" = leave it
// relative); the result is lexically normal without a trailing '/'. "" stays "".
absl::StatusOr<std::string> ResolvePath(const std::string& value, const std::string& key_path,
                                        const std::string& base_dir);

// Integers or numbers with a unit: "512MiB", "2 GiB", "1.5GB", "4096".
absl::StatusOr<int64_t> ParseBytes(const std::string& text, const std::string& key_path);

// Parses YAML text; syntax errors read "line L, column C: invalid YAML: ..." (1-based).
absl::StatusOr<YAML::Node> LoadYaml(const std::string& text);

// A config file's text and the absolute directory its relative paths resolve against.
// NotFound when the file does not exist; InvalidArgument when it is not a regular file. Errors name
// the path.
struct ConfigFileText {
  std::string text;
  std::string base_dir;
};
absl::StatusOr<ConfigFileText> ReadConfigFile(const std::string& path);

// One YAML map of a config schema. Opening it rejects unknown and duplicate keys; the typed
// readers leave their output untouched when the key is absent, so struct defaults stand. A value
// written as null (`key:`) reads as "" for strings and is an error for numbers and booleans.
// A value type: copies share the underlying YAML tree. Not thread-safe (yaml-cpp nodes are not).
class Section {
 public:
  // `path` is the section's key path ("" for the document); `known` its keys (empty = any key,
  // for maps whose keys the user names, such as adapters); relative paths resolve against
  // `base_dir`.
  static absl::StatusOr<Section> Open(YAML::Node node, std::string path,
                                      std::vector<std::string> known, std::string base_dir);

  const std::string& path() const { return path_; }
  std::string PathOf(const std::string& key) const { return JoinKeyPath(path_, key); }
  bool Has(const std::string& key) const;
  YAML::Node Get(const std::string& key) const;

  // Names and values of a map whose keys are the user's (adapters, SLO classes).
  std::vector<std::pair<std::string, YAML::Node>> Entries() const;

  // The sub-section at `key` (absent or null = empty).
  absl::StatusOr<Section> Sub(const std::string& key, std::vector<std::string> known) const;

  absl::Status String(const std::string& key, std::string* out) const;
  absl::Status Path(const std::string& key, std::string* out) const;
  // A list of strings (each a path when `paths`); null = an empty list.
  absl::Status StringList(const std::string& key, std::vector<std::string>* out,
                          bool paths = false) const;
  absl::Status Int(const std::string& key, int64_t* out) const;
  absl::Status Int(const std::string& key, int* out) const;
  absl::Status Uint(const std::string& key, uint64_t* out) const;
  absl::Status Double(const std::string& key, double* out) const;
  absl::Status Float(const std::string& key, float* out) const;
  absl::Status Bool(const std::string& key, bool* out) const;
  absl::Status Bytes(const std::string& key, int64_t* out) const;

  // One of `allowed` (given as {spelling, value} pairs); anything else is an error naming the key
  // and the allowed spellings ("federation.install_global must be one of shadow, shadow_and_live,
  // got 'x'").
  template <typename E>
  absl::Status Enum(const std::string& key, const std::vector<std::pair<std::string, E>>& allowed,
                    E* out) const {
    if (!Has(key)) return absl::OkStatus();
    std::vector<std::string> names;
    for (const auto& [name, value] : allowed) names.push_back(name);
    absl::StatusOr<size_t> index = EnumIndex(key, names);
    if (!index.ok()) return index.status();
    *out = allowed[*index].second;
    return absl::OkStatus();
  }

 private:
  Section(YAML::Node node, std::string path, std::vector<std::string> known, std::string base_dir)
      : node_(std::move(node)),
        path_(std::move(path)),
        known_(std::move(known)),
        base_dir_(std::move(base_dir)) {}

  bool IsMap() const { return node_.IsDefined() && node_.IsMap(); }
  absl::Status CheckKeys() const;
  absl::StatusOr<size_t> EnumIndex(const std::string& key,
                                   const std::vector<std::string>& names) const;

  YAML::Node node_;
  std::string path_;
  std::vector<std::string> known_;  // Empty: any key (user-named entries).
  std::string base_dir_;
};

}  // namespace collm::config

#endif  // COLLM_CONFIG_YAML_READER_H_
