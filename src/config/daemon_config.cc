#include "collm/config/daemon_config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "collm/common/status.h"
#include "collm/runtime/lora_weights.h"

namespace collm::config {
namespace {

namespace fs = std::filesystem;

std::string JoinPath(const std::string& path, const std::string& key) {
  return path.empty() ? key : absl::StrCat(path, ".", key);
}

absl::Status Invalid(const std::string& path, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(path, " ", what));
}

// How a node that has the wrong shape reads in an error message.
std::string Describe(const YAML::Node& node) {
  if (!node.IsDefined() || node.IsNull()) return "null";
  if (node.IsMap()) return "a map";
  if (node.IsSequence()) return "a list";
  return absl::StrCat("'", node.Scalar(), "'");
}

size_t EditDistance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

// ${VAR} and ${VAR:-default} (default also when VAR is set but empty, as in sh); "$${" is a
// literal "${". An unset variable without a default is an error rather than "", so a missing
// COLLM_MODEL is reported instead of becoming an empty (or relative) path.
absl::StatusOr<std::string> ExpandEnv(const std::string& text, const std::string& path) {
  std::string out;
  size_t i = 0;
  while (i < text.size()) {
    if (text.compare(i, 3, "$${") == 0) {
      out += "${";
      i += 3;
      continue;
    }
    if (text.compare(i, 2, "${") != 0) {
      out += text[i++];
      continue;
    }
    const size_t close = text.find('}', i + 2);
    if (close == std::string::npos) {
      return Invalid(path, absl::StrCat("has an unterminated ${ in '", text, "'"));
    }
    const std::string inner = text.substr(i + 2, close - i - 2);
    const size_t sep = inner.find(":-");
    const std::string name = inner.substr(0, sep);
    const bool valid_name = !name.empty() &&
                            !absl::ascii_isdigit(static_cast<unsigned char>(name[0])) &&
                            std::all_of(name.begin(), name.end(), [](char c) {
                              return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '_';
                            });
    if (!valid_name) {
      return Invalid(path, absl::StrCat("has a bad variable reference '${", inner,
                                        "}' (expected ${NAME} or ${NAME:-default})"));
    }
    const char* value = std::getenv(name.c_str());
    if (value != nullptr && *value != '\0') {
      out += value;
    } else if (sep != std::string::npos) {
      out += inner.substr(sep + 2);
    } else {
      return Invalid(path, absl::StrCat("refers to environment variable ", name,
                                        ", which is not set (write ${", name,
                                        ":-default} to give a default)"));
    }
    i = close + 1;
  }
  return out;
}

// "~" or "~/..." -> $HOME; then relative paths are taken against base_dir.
absl::StatusOr<std::string> ResolvePath(const std::string& value, const std::string& path,
                                        const std::string& base_dir) {
  if (value.empty()) return value;
  std::string p = value;
  if (p == "~" || absl::StartsWith(p, "~/")) {
    const char* home = std::getenv("HOME");
    if (home == nullptr || *home == '\0') {
      return Invalid(path, absl::StrCat("starts with ~ but HOME is not set, got '", value, "'"));
    }
    p = std::string(home) + p.substr(1);
  }
  fs::path resolved(p);
  if (resolved.is_relative() && !base_dir.empty()) resolved = fs::path(base_dir) / resolved;
  std::string out = resolved.lexically_normal().string();
  if (out.size() > 1 && out.back() == '/') out.pop_back();
  return out;
}

// Integers or strings with a unit: "512MiB", "2 GiB", "1.5GB", "4096".
absl::StatusOr<int64_t> ParseBytes(const std::string& text, const std::string& path) {
  static const std::pair<const char*, double> kUnits[] = {
      {"", 1},      {"b", 1},        {"kb", 1e3},     {"mb", 1e6},     {"gb", 1e9},
      {"tb", 1e12}, {"kib", 0x1p10}, {"mib", 0x1p20}, {"gib", 0x1p30}, {"tib", 0x1p40}};
  const std::string s(absl::StripAsciiWhitespace(text));
  size_t split = 0;
  while (split < s.size() &&
         (absl::ascii_isdigit(static_cast<unsigned char>(s[split])) || s[split] == '.')) {
    ++split;
  }
  const std::string number = s.substr(0, split);
  const std::string unit =
      absl::AsciiStrToLower(absl::StripAsciiWhitespace(absl::string_view(s).substr(split)));
  auto bad = [&] {
    return Invalid(path, absl::StrCat("must be a byte size (an integer, or a number with a unit: "
                                      "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), got '",
                                      text, "'"));
  };
  double value = 0;
  if (number.empty() || !absl::SimpleAtod(number, &value)) return bad();
  for (const auto& [name, scale] : kUnits) {
    if (unit != name) continue;
    const double bytes = value * scale;
    if (!(bytes < 0x1p63)) return Invalid(path, absl::StrCat("is too large, got '", text, "'"));
    return static_cast<int64_t>(std::llround(bytes));
  }
  return bad();
}

// One YAML map of the schema. Opening it rejects unknown and duplicate keys; the typed readers
// leave their output untouched when the key is absent, so struct defaults stand.
class Section {
 public:
  static absl::StatusOr<Section> Open(YAML::Node node, std::string path,
                                      std::vector<std::string> known, std::string base_dir) {
    if (node.IsDefined() && !node.IsNull() && !node.IsMap()) {
      return absl::InvalidArgumentError(
          path.empty()
              ? absl::StrCat("the configuration must be a map of keys, got ", Describe(node))
              : absl::StrCat(path, " must be a map, got ", Describe(node)));
    }
    Section s(std::move(node), std::move(path), std::move(known), std::move(base_dir));
    COLLM_RETURN_IF_ERROR(s.CheckKeys());
    return s;
  }

  const std::string& path() const { return path_; }
  std::string PathOf(const std::string& key) const { return JoinPath(path_, key); }
  bool Has(const std::string& key) const { return IsMap() && node_[key].IsDefined(); }
  YAML::Node Get(const std::string& key) const { return IsMap() ? node_[key] : YAML::Node(); }

  // Names and values of a map whose keys are the user's (adapters, SLO classes).
  std::vector<std::pair<std::string, YAML::Node>> Entries() const {
    std::vector<std::pair<std::string, YAML::Node>> out;
    if (!IsMap()) return out;
    for (const auto& kv : node_) out.emplace_back(kv.first.Scalar(), kv.second);
    return out;
  }

  absl::StatusOr<Section> Sub(const std::string& key, std::vector<std::string> known) const {
    return Open(Get(key), PathOf(key), std::move(known), base_dir_);
  }

  absl::Status String(const std::string& key, std::string* out) const {
    if (!Has(key)) return absl::OkStatus();
    COLLM_ASSIGN_OR_RETURN(*out, StringAt(Get(key), PathOf(key)));
    return absl::OkStatus();
  }

  absl::Status Path(const std::string& key, std::string* out) const {
    if (!Has(key)) return absl::OkStatus();
    COLLM_ASSIGN_OR_RETURN(std::string s, StringAt(Get(key), PathOf(key)));
    COLLM_ASSIGN_OR_RETURN(*out, ResolvePath(s, PathOf(key), base_dir_));
    return absl::OkStatus();
  }

  absl::Status StringList(const std::string& key, std::vector<std::string>* out,
                          bool paths = false) const {
    if (!Has(key)) return absl::OkStatus();
    const YAML::Node list = Get(key);
    const std::string path = PathOf(key);
    out->clear();
    if (list.IsNull()) return absl::OkStatus();
    if (!list.IsSequence()) {
      return Invalid(path, absl::StrCat("must be a list of strings, got ", Describe(list)));
    }
    for (size_t i = 0; i < list.size(); ++i) {
      const std::string item_path = absl::StrCat(path, "[", i, "]");
      COLLM_ASSIGN_OR_RETURN(std::string s, StringAt(list[i], item_path));
      if (paths) {
        COLLM_ASSIGN_OR_RETURN(s, ResolvePath(s, item_path, base_dir_));
      }
      out->push_back(std::move(s));
    }
    return absl::OkStatus();
  }

  absl::Status Int(const std::string& key, int64_t* out) const {
    if (!Has(key)) return absl::OkStatus();
    COLLM_ASSIGN_OR_RETURN(std::string s, ScalarAt(Get(key), PathOf(key), "an integer"));
    if (!absl::SimpleAtoi(s, out)) {
      return Invalid(PathOf(key), absl::StrCat("must be an integer, got '", s, "'"));
    }
    return absl::OkStatus();
  }

  absl::Status Int(const std::string& key, int* out) const {
    int64_t v = *out;
    COLLM_RETURN_IF_ERROR(Int(key, &v));
    if (v < std::numeric_limits<int>::min() || v > std::numeric_limits<int>::max()) {
      return Invalid(PathOf(key), absl::StrCat("is out of range, got ", v));
    }
    *out = static_cast<int>(v);
    return absl::OkStatus();
  }

  absl::Status Uint(const std::string& key, uint64_t* out) const {
    if (!Has(key)) return absl::OkStatus();
    COLLM_ASSIGN_OR_RETURN(std::string s, ScalarAt(Get(key), PathOf(key), "an integer >= 0"));
    if (absl::StartsWith(absl::StripAsciiWhitespace(s), "-") || !absl::SimpleAtoi(s, out)) {
      return Invalid(PathOf(key), absl::StrCat("must be an integer >= 0, got '", s, "'"));
    }
    return absl::OkStatus();
  }

  absl::Status Double(const std::string& key, double* out) const {
    if (!Has(key)) return absl::OkStatus();
    COLLM_ASSIGN_OR_RETURN(std::string s, ScalarAt(Get(key), PathOf(key), "a number"));
    double v = 0;
    if (!absl::SimpleAtod(s, &v) || !std::isfinite(v)) {
      return Invalid(PathOf(key), absl::StrCat("must be a finite number, got '", s, "'"));
    }
    *out = v;
    return absl::OkStatus();
  }

  absl::Status Float(const std::string& key, float* out) const {
    double v = *out;
    COLLM_RETURN_IF_ERROR(Double(key, &v));
    *out = static_cast<float>(v);
    return absl::OkStatus();
  }

  absl::Status Bool(const std::string& key, bool* out) const {
    if (!Has(key)) return absl::OkStatus();
    COLLM_ASSIGN_OR_RETURN(std::string s, ScalarAt(Get(key), PathOf(key), "true or false"));
    const std::string lower = absl::AsciiStrToLower(absl::StripAsciiWhitespace(s));
    if (lower == "true" || lower == "yes" || lower == "on") {
      *out = true;
    } else if (lower == "false" || lower == "no" || lower == "off") {
      *out = false;
    } else {
      return Invalid(PathOf(key), absl::StrCat("must be true or false, got '", s, "'"));
    }
    return absl::OkStatus();
  }

  absl::Status Bytes(const std::string& key, int64_t* out) const {
    if (!Has(key)) return absl::OkStatus();
    COLLM_ASSIGN_OR_RETURN(std::string s, ScalarAt(Get(key), PathOf(key), "a byte size"));
    COLLM_ASSIGN_OR_RETURN(*out, ParseBytes(s, PathOf(key)));
    return absl::OkStatus();
  }

 private:
  Section(YAML::Node node, std::string path, std::vector<std::string> known, std::string base_dir)
      : node_(std::move(node)),
        path_(std::move(path)),
        known_(std::move(known)),
        base_dir_(std::move(base_dir)) {}

  bool IsMap() const { return node_.IsDefined() && node_.IsMap(); }

  absl::Status CheckKeys() const {
    if (!IsMap()) return absl::OkStatus();
    std::set<std::string> seen;
    for (const auto& kv : node_) {
      if (!kv.first.IsScalar()) {
        return absl::InvalidArgumentError(absl::StrCat(path_.empty() ? "the configuration" : path_,
                                                       " has a key that is not a string"));
      }
      const std::string key = kv.first.Scalar();
      const std::string key_path = JoinPath(path_, key);
      if (!seen.insert(key).second) {
        return absl::InvalidArgumentError(absl::StrCat(key_path, ": duplicate key"));
      }
      if (known_.empty() || std::find(known_.begin(), known_.end(), key) != known_.end()) continue;
      std::string message =
          absl::StrCat(key_path, ": unknown key (known: ", absl::StrJoin(known_, ", "), ")");
      const std::string* best = nullptr;
      size_t best_distance = 3;  // Suggest only close misspellings.
      for (const std::string& k : known_) {
        const size_t d = EditDistance(key, k);
        if (d < best_distance) best_distance = d, best = &k;
      }
      if (best != nullptr) absl::StrAppend(&message, "; did you mean ", *best, "?");
      return absl::InvalidArgumentError(message);
    }
    return absl::OkStatus();
  }

  // A scalar, with environment variables expanded.
  static absl::StatusOr<std::string> ScalarAt(const YAML::Node& node, const std::string& path,
                                              absl::string_view expected) {
    if (!node.IsScalar()) {
      return Invalid(path, absl::StrCat("must be ", expected, ", got ", Describe(node)));
    }
    return ExpandEnv(node.Scalar(), path);
  }

  // Strings: null (an empty value) reads as "".
  static absl::StatusOr<std::string> StringAt(const YAML::Node& node, const std::string& path) {
    if (node.IsNull()) return std::string();
    return ScalarAt(node, path, "a string");
  }

  YAML::Node node_;
  std::string path_;
  std::vector<std::string> known_;  // Empty: any key (user-named entries).
  std::string base_dir_;
};

// Prefixes a module's own Validate() message with where its struct sits in the file: the message
// names the field, possibly after the module's own prefix ("lora.rank ...").
absl::Status Prefixed(const absl::Status& status, absl::string_view own_prefix,
                      absl::string_view path) {
  if (status.ok()) return status;
  absl::string_view message = status.message();
  absl::ConsumePrefix(&message, own_prefix);
  return absl::Status(status.code(), absl::StrCat(path, ".", message));
}

absl::Status CheckPositive(const std::string& path, int64_t value) {
  if (value > 0) return absl::OkStatus();
  return Invalid(path, absl::StrCat("must be > 0, got ", value));
}

absl::Status CheckNonNegative(const std::string& path, double value) {
  if (value >= 0) return absl::OkStatus();
  return Invalid(path, absl::StrCat("must be >= 0, got ", value));
}

absl::Status CheckNonEmpty(const std::string& path, const std::string& value) {
  if (!value.empty()) return absl::OkStatus();
  return Invalid(path, "must not be empty");
}

absl::Status ParseRuntime(const Section& root, runtime::RuntimeOptions& out) {
  COLLM_ASSIGN_OR_RETURN(Section s, root.Sub("runtime", {"device", "dtype", "threads"}));
  COLLM_RETURN_IF_ERROR(s.String("device", &out.device));
  COLLM_RETURN_IF_ERROR(s.String("dtype", &out.dtype));
  COLLM_RETURN_IF_ERROR(s.Int("threads", &out.num_threads));
  // The device is checked against this build of libtorch at startup (ResolveRuntime); here only
  // its spelling.
  const std::string& d = out.device;
  bool device_ok = d == "cpu" || d == "cuda";
  if (absl::StartsWith(d, "cuda:")) {
    int index = 0;
    device_ok = absl::SimpleAtoi(d.substr(5), &index) && index >= 0;
  }
  if (!device_ok) {
    return Invalid(s.PathOf("device"), absl::StrCat("must be cpu, cuda or cuda:N, got '", d, "'"));
  }
  const std::string& t = out.dtype;
  if (t != "auto" && t != "f32" && t != "bf16" && t != "f16") {
    return Invalid(s.PathOf("dtype"),
                   absl::StrCat("must be auto, f32, bf16 or f16, got '", t, "'"));
  }
  if (out.num_threads < 0) {
    return Invalid(s.PathOf("threads"), absl::StrCat("must be >= 0, got ", out.num_threads));
  }
  return absl::OkStatus();
}

absl::Status ParseSlo(const Section& parent, const std::string& key, engine::SloTarget& out) {
  COLLM_ASSIGN_OR_RETURN(Section s, parent.Sub(key, {"ttft_ms", "tpot_ms"}));
  COLLM_RETURN_IF_ERROR(s.Double("ttft_ms", &out.ttft_ms));
  COLLM_RETURN_IF_ERROR(s.Double("tpot_ms", &out.tpot_ms));
  COLLM_RETURN_IF_ERROR(CheckNonNegative(s.PathOf("ttft_ms"), out.ttft_ms));
  return CheckNonNegative(s.PathOf("tpot_ms"), out.tpot_ms);
}

absl::Status ParseEngine(const Section& root, engine::EngineOptions& out) {
  COLLM_ASSIGN_OR_RETURN(
      Section s, root.Sub("engine", {"max_step_tokens", "max_running", "max_queued", "kv_cache",
                                     "default_adapter", "slo", "training_share", "slo_guard",
                                     "guard_safety", "guard_idle_risk"}));
  COLLM_RETURN_IF_ERROR(s.Int("max_step_tokens", &out.max_step_tokens));
  COLLM_RETURN_IF_ERROR(s.Int("max_running", &out.max_running));
  COLLM_RETURN_IF_ERROR(s.Int("max_queued", &out.max_queued));
  COLLM_RETURN_IF_ERROR(s.String("default_adapter", &out.default_adapter));
  COLLM_RETURN_IF_ERROR(s.Double("training_share", &out.training_share));
  COLLM_RETURN_IF_ERROR(s.Bool("slo_guard", &out.slo_guard));
  COLLM_RETURN_IF_ERROR(s.Double("guard_safety", &out.guard_safety));
  COLLM_RETURN_IF_ERROR(s.Double("guard_idle_risk", &out.guard_idle_risk));
  COLLM_RETURN_IF_ERROR(CheckPositive(s.PathOf("max_step_tokens"), out.max_step_tokens));
  COLLM_RETURN_IF_ERROR(CheckPositive(s.PathOf("max_running"), out.max_running));
  COLLM_RETURN_IF_ERROR(CheckPositive(s.PathOf("max_queued"), out.max_queued));
  if (!(out.training_share >= 0 && out.training_share <= 1)) {
    return Invalid(s.PathOf("training_share"),
                   absl::StrCat("must be in [0, 1], got ", out.training_share));
  }
  if (!(out.guard_safety >= 1)) {
    return Invalid(s.PathOf("guard_safety"), absl::StrCat("must be >= 1, got ", out.guard_safety));
  }
  if (!(out.guard_idle_risk >= 0 && out.guard_idle_risk <= 1)) {
    return Invalid(s.PathOf("guard_idle_risk"),
                   absl::StrCat("must be in [0, 1], got ", out.guard_idle_risk));
  }

  COLLM_ASSIGN_OR_RETURN(Section kv, s.Sub("kv_cache", {"block_size", "num_blocks", "max_bytes"}));
  runtime::KvCacheOptions& cache = out.kv_cache;
  COLLM_RETURN_IF_ERROR(kv.Int("block_size", &cache.block_size));
  COLLM_RETURN_IF_ERROR(kv.Int("num_blocks", &cache.num_blocks));
  COLLM_RETURN_IF_ERROR(kv.Bytes("max_bytes", &cache.max_bytes));
  COLLM_RETURN_IF_ERROR(CheckPositive(kv.PathOf("block_size"), cache.block_size));
  if (cache.num_blocks < 0) {
    return Invalid(kv.PathOf("num_blocks"), absl::StrCat("must be >= 0, got ", cache.num_blocks));
  }
  if (cache.num_blocks > std::numeric_limits<int32_t>::max()) {
    return Invalid(kv.PathOf("num_blocks"), absl::StrCat("is too large, got ", cache.num_blocks));
  }
  if (cache.num_blocks == 0)
    COLLM_RETURN_IF_ERROR(CheckPositive(kv.PathOf("max_bytes"), cache.max_bytes));

  COLLM_ASSIGN_OR_RETURN(Section slo, s.Sub("slo", {"default", "classes"}));
  COLLM_RETURN_IF_ERROR(ParseSlo(slo, "default", out.default_slo));
  COLLM_ASSIGN_OR_RETURN(Section classes, slo.Sub("classes", {}));
  out.slo_classes.clear();
  for (const auto& [name, node] : classes.Entries()) {
    COLLM_RETURN_IF_ERROR(CheckNonEmpty(classes.path() + " class name", name));
    COLLM_RETURN_IF_ERROR(ParseSlo(classes, name, out.slo_classes[name]));
  }
  return absl::OkStatus();
}

absl::Status ParseSampling(const Section& root, runtime::SamplingParams& out) {
  COLLM_ASSIGN_OR_RETURN(
      Section s, root.Sub("sampling", {"temperature", "top_k", "top_p", "min_p",
                                       "repetition_penalty", "seed", "max_tokens", "stop"}));
  COLLM_RETURN_IF_ERROR(s.Float("temperature", &out.temperature));
  COLLM_RETURN_IF_ERROR(s.Int("top_k", &out.top_k));
  COLLM_RETURN_IF_ERROR(s.Float("top_p", &out.top_p));
  COLLM_RETURN_IF_ERROR(s.Float("min_p", &out.min_p));
  COLLM_RETURN_IF_ERROR(s.Float("repetition_penalty", &out.repetition_penalty));
  COLLM_RETURN_IF_ERROR(s.Uint("seed", &out.seed));
  COLLM_RETURN_IF_ERROR(s.Int("max_tokens", &out.max_tokens));
  COLLM_RETURN_IF_ERROR(s.StringList("stop", &out.stop));
  for (size_t i = 0; i < out.stop.size(); ++i) {
    COLLM_RETURN_IF_ERROR(CheckNonEmpty(absl::StrCat(s.PathOf("stop"), "[", i, "]"), out.stop[i]));
  }
  return Prefixed(out.Validate(), "", "sampling");
}

absl::Status ParseAdapters(const Section& root, std::map<std::string, std::string>& out) {
  COLLM_ASSIGN_OR_RETURN(Section s, root.Sub("adapters", {}));
  out.clear();
  for (const auto& [name, node] : s.Entries()) {
    COLLM_RETURN_IF_ERROR(CheckNonEmpty("adapters: an adapter name", name));
    std::string dir;
    COLLM_RETURN_IF_ERROR(s.Path(name, &dir));
    COLLM_RETURN_IF_ERROR(CheckNonEmpty(s.PathOf(name), dir));
    out[name] = dir;
  }
  return absl::OkStatus();
}

absl::Status ParseDataset(const Section& training, engine::DatasetOptions& out) {
  COLLM_ASSIGN_OR_RETURN(
      Section s,
      training.Sub("dataset", {"prompt_field", "completion_field", "input_field", "text_field",
                               "messages_field", "prompt_template", "user_prefix",
                               "assistant_prefix", "system_prefix", "turn_end", "max_length",
                               "add_bos", "add_eos", "held_out_fraction", "seed", "max_examples"}));
  engine::DatasetFormat& f = out.format;
  COLLM_RETURN_IF_ERROR(s.String("prompt_field", &f.prompt_field));
  COLLM_RETURN_IF_ERROR(s.String("completion_field", &f.completion_field));
  COLLM_RETURN_IF_ERROR(s.String("input_field", &f.input_field));
  COLLM_RETURN_IF_ERROR(s.String("text_field", &f.text_field));
  COLLM_RETURN_IF_ERROR(s.String("messages_field", &f.messages_field));
  COLLM_RETURN_IF_ERROR(s.String("prompt_template", &f.prompt_template));
  COLLM_RETURN_IF_ERROR(s.String("user_prefix", &f.user_prefix));
  COLLM_RETURN_IF_ERROR(s.String("assistant_prefix", &f.assistant_prefix));
  COLLM_RETURN_IF_ERROR(s.String("system_prefix", &f.system_prefix));
  COLLM_RETURN_IF_ERROR(s.String("turn_end", &f.turn_end));
  COLLM_RETURN_IF_ERROR(s.Int("max_length", &out.max_length));
  COLLM_RETURN_IF_ERROR(s.Bool("add_bos", &out.add_bos));
  COLLM_RETURN_IF_ERROR(s.Bool("add_eos", &out.add_eos));
  COLLM_RETURN_IF_ERROR(s.Double("held_out_fraction", &out.held_out_fraction));
  COLLM_RETURN_IF_ERROR(s.Uint("seed", &out.seed));
  COLLM_RETURN_IF_ERROR(s.Int("max_examples", &out.max_examples));
  // The same rules as the dataset loader's, reported at load time instead of at first use.
  if (!absl::StrContains(f.prompt_template, "{prompt}")) {
    return Invalid(s.PathOf("prompt_template"),
                   absl::StrCat("must contain {prompt}, got '", f.prompt_template, "'"));
  }
  if (out.max_length < 2) {
    return Invalid(s.PathOf("max_length"), absl::StrCat("must be >= 2, got ", out.max_length));
  }
  if (!(out.held_out_fraction >= 0 && out.held_out_fraction < 1)) {
    return Invalid(s.PathOf("held_out_fraction"),
                   absl::StrCat("must be in [0, 1), got ", out.held_out_fraction));
  }
  if (out.max_examples < 0) {
    return Invalid(s.PathOf("max_examples"), absl::StrCat("must be >= 0, got ", out.max_examples));
  }
  return absl::OkStatus();
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

absl::Status ParseTrainer(const Section& training, engine::TrainerOptions& out) {
  COLLM_ASSIGN_OR_RETURN(
      Section s, training.Sub("trainer", {"lr", "schedule", "warmup_steps", "total_steps",
                                          "min_lr_ratio", "max_grad_norm", "micro_batch_size",
                                          "grad_accum_steps", "seed", "weight_decay"}));
  COLLM_RETURN_IF_ERROR(s.Double("lr", &out.lr));
  COLLM_RETURN_IF_ERROR(s.String("schedule", &out.schedule));
  COLLM_RETURN_IF_ERROR(s.Int("warmup_steps", &out.warmup_steps));
  COLLM_RETURN_IF_ERROR(s.Int("total_steps", &out.total_steps));
  COLLM_RETURN_IF_ERROR(s.Double("min_lr_ratio", &out.min_lr_ratio));
  COLLM_RETURN_IF_ERROR(s.Double("max_grad_norm", &out.max_grad_norm));
  COLLM_RETURN_IF_ERROR(s.Int("micro_batch_size", &out.micro_batch_size));
  COLLM_RETURN_IF_ERROR(s.Int("grad_accum_steps", &out.grad_accum_steps));
  COLLM_RETURN_IF_ERROR(s.Uint("seed", &out.seed));
  COLLM_RETURN_IF_ERROR(s.Double("weight_decay", &out.adamw.weight_decay));
  // Checked here because Validate() would name it by its struct path (adamw.weight_decay).
  COLLM_RETURN_IF_ERROR(CheckNonNegative(s.PathOf("weight_decay"), out.adamw.weight_decay));
  if (out.total_steps < 0) {
    return Invalid(s.PathOf("total_steps"), absl::StrCat("must be >= 0, got ", out.total_steps));
  }
  return Prefixed(out.Validate(), "training.", s.path());
}

absl::Status ParsePublish(const Section& training, engine::PublishOptions& out) {
  COLLM_ASSIGN_OR_RETURN(
      Section s, training.Sub("publish", {"every_steps", "quality_gate", "min_improvement"}));
  COLLM_RETURN_IF_ERROR(s.Int("every_steps", &out.every_steps));
  COLLM_RETURN_IF_ERROR(s.Bool("quality_gate", &out.quality_gate));
  COLLM_RETURN_IF_ERROR(s.Double("min_improvement", &out.min_improvement));
  if (out.every_steps < 0) {
    return Invalid(s.PathOf("every_steps"), absl::StrCat("must be >= 0, got ", out.every_steps));
  }
  return CheckNonNegative(s.PathOf("min_improvement"), out.min_improvement);
}

absl::Status ParseTraining(const Section& root, TrainingConfig& out) {
  COLLM_ASSIGN_OR_RETURN(
      Section s, root.Sub("training", {"enabled", "data", "dataset", "lora", "adapter_name",
                                       "init_adapter", "trainer", "publish", "checkpoint_dir",
                                       "checkpoint_every_steps", "feedback_capacity"}));
  COLLM_RETURN_IF_ERROR(s.Bool("enabled", &out.enabled));
  COLLM_RETURN_IF_ERROR(s.StringList("data", &out.data, /*paths=*/true));
  for (size_t i = 0; i < out.data.size(); ++i) {
    COLLM_RETURN_IF_ERROR(CheckNonEmpty(absl::StrCat(s.PathOf("data"), "[", i, "]"), out.data[i]));
  }
  COLLM_RETURN_IF_ERROR(ParseDataset(s, out.dataset));
  COLLM_RETURN_IF_ERROR(ParseLora(s, out.lora));
  COLLM_RETURN_IF_ERROR(s.String("adapter_name", &out.adapter_name));
  COLLM_RETURN_IF_ERROR(CheckNonEmpty(s.PathOf("adapter_name"), out.adapter_name));
  COLLM_RETURN_IF_ERROR(s.Path("init_adapter", &out.init_adapter));
  COLLM_RETURN_IF_ERROR(ParseTrainer(s, out.trainer));
  COLLM_RETURN_IF_ERROR(ParsePublish(s, out.publish));
  COLLM_RETURN_IF_ERROR(s.Path("checkpoint_dir", &out.checkpoint_dir));
  COLLM_RETURN_IF_ERROR(s.Int("checkpoint_every_steps", &out.checkpoint_every_steps));
  COLLM_RETURN_IF_ERROR(s.Int("feedback_capacity", &out.feedback_capacity));
  if (out.checkpoint_every_steps < 0) {
    return Invalid(s.PathOf("checkpoint_every_steps"),
                   absl::StrCat("must be >= 0, got ", out.checkpoint_every_steps));
  }
  if (out.feedback_capacity < 0) {
    return Invalid(s.PathOf("feedback_capacity"),
                   absl::StrCat("must be >= 0, got ", out.feedback_capacity));
  }
  // Empty data is feedback-only training (examples arrive through SubmitFeedback), which needs
  // somewhere to buffer them.
  if (out.enabled && out.data.empty() && out.feedback_capacity == 0) {
    return Invalid(
        s.PathOf("enabled"),
        "is true but there is nothing to train on: training.data is empty (feedback-only) "
        "and training.feedback_capacity is 0");
  }
  return absl::OkStatus();
}

absl::Status CheckFileExists(const std::string& path, const std::string& file) {
  std::error_code ec;
  if (file.empty() || fs::is_regular_file(file, ec)) return absl::OkStatus();
  return Invalid(path, absl::StrCat("must name a readable file, got '", file, "'"));
}

absl::Status ParseFederation(const Section& root, const TrainingConfig& training,
                             FederationConfig& out) {
  COLLM_ASSIGN_OR_RETURN(
      Section s,
      root.Sub("federation", {"enabled", "aggregator", "device_id", "tls", "heartbeat_seconds",
                              "backoff", "rpc_timeout_seconds", "upload_chunk_bytes",
                              "install_global", "task_training_share"}));
  COLLM_RETURN_IF_ERROR(s.Bool("enabled", &out.enabled));
  COLLM_RETURN_IF_ERROR(s.String("aggregator", &out.aggregator));
  COLLM_RETURN_IF_ERROR(s.String("device_id", &out.device_id));
  COLLM_ASSIGN_OR_RETURN(Section tls,
                         s.Sub("tls", {"enabled", "ca", "cert", "key", "server_name"}));
  COLLM_RETURN_IF_ERROR(tls.Bool("enabled", &out.tls.enabled));
  COLLM_RETURN_IF_ERROR(tls.Path("ca", &out.tls.ca));
  COLLM_RETURN_IF_ERROR(tls.Path("cert", &out.tls.cert));
  COLLM_RETURN_IF_ERROR(tls.Path("key", &out.tls.key));
  COLLM_RETURN_IF_ERROR(tls.String("server_name", &out.tls.server_name));
  COLLM_RETURN_IF_ERROR(s.Double("heartbeat_seconds", &out.heartbeat_seconds));
  COLLM_ASSIGN_OR_RETURN(Section backoff, s.Sub("backoff", {"initial_seconds", "max_seconds"}));
  COLLM_RETURN_IF_ERROR(backoff.Double("initial_seconds", &out.backoff_initial_seconds));
  COLLM_RETURN_IF_ERROR(backoff.Double("max_seconds", &out.backoff_max_seconds));
  COLLM_RETURN_IF_ERROR(s.Double("rpc_timeout_seconds", &out.rpc_timeout_seconds));
  COLLM_RETURN_IF_ERROR(s.Bytes("upload_chunk_bytes", &out.upload_chunk_bytes));
  COLLM_RETURN_IF_ERROR(s.String("install_global", &out.install_global));
  COLLM_RETURN_IF_ERROR(s.Double("task_training_share", &out.task_training_share));

  auto positive = [&](const Section& sec, const std::string& key, double v) {
    return v > 0 ? absl::OkStatus()
                 : Invalid(sec.PathOf(key), absl::StrCat("must be > 0, got ", v));
  };
  COLLM_RETURN_IF_ERROR(positive(s, "heartbeat_seconds", out.heartbeat_seconds));
  COLLM_RETURN_IF_ERROR(positive(backoff, "initial_seconds", out.backoff_initial_seconds));
  if (!(out.backoff_max_seconds >= out.backoff_initial_seconds)) {
    return Invalid(backoff.PathOf("max_seconds"),
                   absl::StrCat("must be >= ", backoff.PathOf("initial_seconds"), " (",
                                out.backoff_initial_seconds, "), got ", out.backoff_max_seconds));
  }
  COLLM_RETURN_IF_ERROR(positive(s, "rpc_timeout_seconds", out.rpc_timeout_seconds));
  if (out.upload_chunk_bytes <= 0 || out.upload_chunk_bytes > (int64_t{64} << 20)) {
    return Invalid(s.PathOf("upload_chunk_bytes"),
                   absl::StrCat("must be in (0, 64MiB], got ", out.upload_chunk_bytes));
  }
  if (out.install_global != "shadow" && out.install_global != "shadow_and_live") {
    return Invalid(
        s.PathOf("install_global"),
        absl::StrCat("must be shadow or shadow_and_live, got '", out.install_global, "'"));
  }
  if (!(out.task_training_share > 0 && out.task_training_share <= 1)) {
    return Invalid(s.PathOf("task_training_share"),
                   absl::StrCat("must be in (0, 1], got ", out.task_training_share));
  }
  if (out.tls.cert.empty() != out.tls.key.empty()) {
    const bool no_cert = out.tls.cert.empty();
    return Invalid(tls.PathOf(no_cert ? "key" : "cert"),
                   absl::StrCat("is set but ", tls.PathOf(no_cert ? "cert" : "key"),
                                " is not: mutual TLS needs both"));
  }
  if (!out.tls.enabled && (!out.tls.ca.empty() || !out.tls.cert.empty())) {
    return Invalid(tls.PathOf("enabled"),
                   "is false but tls.ca/tls.cert are set: set enabled: true to use them");
  }
  COLLM_RETURN_IF_ERROR(CheckFileExists(tls.PathOf("ca"), out.tls.ca));
  COLLM_RETURN_IF_ERROR(CheckFileExists(tls.PathOf("cert"), out.tls.cert));
  COLLM_RETURN_IF_ERROR(CheckFileExists(tls.PathOf("key"), out.tls.key));
  if (!out.enabled) return absl::OkStatus();
  COLLM_RETURN_IF_ERROR(CheckNonEmpty(s.PathOf("aggregator"), out.aggregator));
  COLLM_RETURN_IF_ERROR(CheckNonEmpty(s.PathOf("device_id"), out.device_id));
  const bool id_ok = out.device_id.size() <= 64 &&
                     std::all_of(out.device_id.begin(), out.device_id.end(), [](char c) {
                       return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' ||
                              c == '_' || c == '-';
                     });
  if (!id_ok) {
    return Invalid(
        s.PathOf("device_id"),
        absl::StrCat("must be 1-64 characters of [A-Za-z0-9._-], got '", out.device_id, "'"));
  }
  if (!training.enabled) {
    return Invalid(s.PathOf("enabled"),
                   "is true but training.enabled is false: federation trains the shadow adapter");
  }
  return absl::OkStatus();
}

absl::Status ParseServer(const Section& root, ServerConfig& out) {
  COLLM_ASSIGN_OR_RETURN(Section s, root.Sub("server", {"address", "max_message_bytes"}));
  COLLM_RETURN_IF_ERROR(s.String("address", &out.address));
  COLLM_RETURN_IF_ERROR(s.Bytes("max_message_bytes", &out.max_message_bytes));
  COLLM_RETURN_IF_ERROR(CheckNonEmpty(s.PathOf("address"), out.address));
  COLLM_RETURN_IF_ERROR(CheckPositive(s.PathOf("max_message_bytes"), out.max_message_bytes));
  if (out.max_message_bytes > std::numeric_limits<int32_t>::max()) {
    // gRPC takes message limits as int.
    return Invalid(s.PathOf("max_message_bytes"),
                   absl::StrCat("must be < 2GiB, got ", out.max_message_bytes));
  }
  return absl::OkStatus();
}

absl::Status ParseMetrics(const Section& root, MetricsConfig& out) {
  COLLM_ASSIGN_OR_RETURN(Section s, root.Sub("metrics", {"enabled", "address"}));
  COLLM_RETURN_IF_ERROR(s.Bool("enabled", &out.enabled));
  COLLM_RETURN_IF_ERROR(s.String("address", &out.address));
  return CheckNonEmpty(s.PathOf("address"), out.address);
}

absl::Status ParseLogging(const Section& root, LoggingOptions& out) {
  COLLM_ASSIGN_OR_RETURN(Section s, root.Sub("logging", {"level", "json"}));
  COLLM_RETURN_IF_ERROR(s.String("level", &out.level));
  COLLM_RETURN_IF_ERROR(s.Bool("json", &out.json));
  static const char* const kLevels[] = {"trace", "debug",    "info", "warn",
                                        "error", "critical", "off"};
  if (std::find(std::begin(kLevels), std::end(kLevels), out.level) == std::end(kLevels)) {
    return Invalid(s.PathOf("level"), absl::StrCat("must be one of ", absl::StrJoin(kLevels, ", "),
                                                   ", got '", out.level, "'"));
  }
  return absl::OkStatus();
}

absl::StatusOr<DaemonConfig> Parse(const YAML::Node& doc, const std::string& base_dir) {
  COLLM_ASSIGN_OR_RETURN(
      Section root,
      Section::Open(doc, "",
                    {"model", "runtime", "engine", "sampling", "adapters", "training", "federation",
                     "server", "metrics", "logging", "shutdown_grace_seconds"},
                    base_dir));
  DaemonConfig config;
  if (!root.Has("model"))
    return absl::InvalidArgumentError("model is required (a model directory)");
  COLLM_RETURN_IF_ERROR(root.Path("model", &config.model_dir));
  COLLM_RETURN_IF_ERROR(CheckNonEmpty("model", config.model_dir));
  COLLM_RETURN_IF_ERROR(ParseRuntime(root, config.runtime));
  COLLM_RETURN_IF_ERROR(ParseEngine(root, config.engine));
  COLLM_RETURN_IF_ERROR(ParseSampling(root, config.default_sampling));
  COLLM_RETURN_IF_ERROR(ParseAdapters(root, config.adapters));
  COLLM_RETURN_IF_ERROR(ParseTraining(root, config.training));
  COLLM_RETURN_IF_ERROR(ParseFederation(root, config.training, config.federation));
  COLLM_RETURN_IF_ERROR(ParseServer(root, config.server));
  COLLM_RETURN_IF_ERROR(ParseMetrics(root, config.metrics));
  COLLM_RETURN_IF_ERROR(ParseLogging(root, config.logging));
  COLLM_RETURN_IF_ERROR(root.Double("shutdown_grace_seconds", &config.shutdown_grace_seconds));
  COLLM_RETURN_IF_ERROR(CheckNonNegative("shutdown_grace_seconds", config.shutdown_grace_seconds));
  return config;
}

absl::StatusOr<DaemonConfig> ParseText(const std::string& yaml, const std::string& base_dir) {
  YAML::Node doc;
  try {
    doc = YAML::Load(yaml);
  } catch (const YAML::ParserException& e) {
    // Marks are 0-based; editors count from 1.
    return absl::InvalidArgumentError(absl::StrCat("line ", e.mark.line + 1, ", column ",
                                                   e.mark.column + 1, ": invalid YAML: ", e.msg));
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("invalid YAML: ", e.what()));
  }
  try {
    return Parse(doc, base_dir);
  } catch (const YAML::Exception& e) {
    // Reading a well-formed tree should not throw; report rather than crash if it does.
    return absl::InvalidArgumentError(absl::StrCat("could not read YAML: ", e.what()));
  }
}

}  // namespace

absl::StatusOr<DaemonConfig> DaemonConfig::FromYaml(const std::string& yaml,
                                                    const std::string& base_dir) {
  return ParseText(yaml, base_dir);
}

absl::StatusOr<DaemonConfig> DaemonConfig::FromFile(const std::string& path) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) {
    if (fs::exists(path, ec)) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
    }
    return absl::NotFoundError(absl::StrCat("config file not found: ", path));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in.is_open()) return absl::NotFoundError(absl::StrCat("cannot open config file: ", path));
  std::stringstream text;
  text << in.rdbuf();
  // Absolute, so the daemon's paths do not depend on its working directory.
  const std::string base_dir = fs::absolute(fs::path(path), ec).parent_path().string();
  absl::StatusOr<DaemonConfig> config = ParseText(text.str(), base_dir);
  if (!config.ok()) {
    return absl::Status(config.status().code(),
                        absl::StrCat(path, ": ", config.status().message()));
  }
  return config;
}

}  // namespace collm::config
