#include "collm/config/yaml_reader.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <system_error>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "collm/common/status.h"

namespace collm::config {
namespace {

namespace fs = std::filesystem;

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

}  // namespace

std::string JoinKeyPath(const std::string& path, const std::string& key) {
  return path.empty() ? key : absl::StrCat(path, ".", key);
}

absl::Status InvalidValue(const std::string& key_path, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(key_path, " ", what));
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
      return InvalidValue(path, absl::StrCat("has an unterminated ${ in '", text, "'"));
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
      return InvalidValue(path, absl::StrCat("has a bad variable reference '${", inner,
                                             "}' (expected ${NAME} or ${NAME:-default})"));
    }
    const char* value = std::getenv(name.c_str());
    if (value != nullptr && *value != '\0') {
      out += value;
    } else if (sep != std::string::npos) {
      out += inner.substr(sep + 2);
    } else {
      return InvalidValue(path, absl::StrCat("refers to environment variable ", name,
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
      return InvalidValue(path,
                          absl::StrCat("starts with ~ but HOME is not set, got '", value, "'"));
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
    return InvalidValue(path,
                        absl::StrCat("must be a byte size (an integer, or a number with a unit: "
                                     "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), got '",
                                     text, "'"));
  };
  double value = 0;
  if (number.empty() || !absl::SimpleAtod(number, &value)) return bad();
  for (const auto& [name, scale] : kUnits) {
    if (unit != name) continue;
    const double bytes = value * scale;
    if (!(bytes < 0x1p63))
      return InvalidValue(path, absl::StrCat("is too large, got '", text, "'"));
    return static_cast<int64_t>(std::llround(bytes));
  }
  return bad();
}

absl::StatusOr<YAML::Node> LoadYaml(const std::string& text) {
  try {
    return YAML::Load(text);
  } catch (const YAML::ParserException& e) {
    // Marks are 0-based; editors count from 1.
    return absl::InvalidArgumentError(absl::StrCat("line ", e.mark.line + 1, ", column ",
                                                   e.mark.column + 1, ": invalid YAML: ", e.msg));
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("invalid YAML: ", e.what()));
  }
}

absl::StatusOr<ConfigFileText> ReadConfigFile(const std::string& path) {
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
  // Absolute, so a process's paths do not depend on its working directory.
  return ConfigFileText{text.str(), fs::absolute(fs::path(path), ec).parent_path().string()};
}

namespace {

// A scalar, with environment variables expanded.
absl::StatusOr<std::string> ScalarAt(const YAML::Node& node, const std::string& path,
                                     absl::string_view expected) {
  if (!node.IsScalar()) {
    return InvalidValue(path, absl::StrCat("must be ", expected, ", got ", Describe(node)));
  }
  return ExpandEnv(node.Scalar(), path);
}

// Strings: null (an empty value) reads as "".
absl::StatusOr<std::string> StringAt(const YAML::Node& node, const std::string& path) {
  if (node.IsNull()) return std::string();
  return ScalarAt(node, path, "a string");
}

}  // namespace

absl::StatusOr<Section> Section::Open(YAML::Node node, std::string path,
                                      std::vector<std::string> known, std::string base_dir) {
  if (node.IsDefined() && !node.IsNull() && !node.IsMap()) {
    return absl::InvalidArgumentError(
        path.empty() ? absl::StrCat("the configuration must be a map of keys, got ", Describe(node))
                     : absl::StrCat(path, " must be a map, got ", Describe(node)));
  }
  Section s(std::move(node), std::move(path), std::move(known), std::move(base_dir));
  COLLM_RETURN_IF_ERROR(s.CheckKeys());
  return s;
}

bool Section::Has(const std::string& key) const { return IsMap() && node_[key].IsDefined(); }

YAML::Node Section::Get(const std::string& key) const {
  return IsMap() ? node_[key] : YAML::Node();
}

std::vector<std::pair<std::string, YAML::Node>> Section::Entries() const {
  std::vector<std::pair<std::string, YAML::Node>> out;
  if (!IsMap()) return out;
  for (const auto& kv : node_) out.emplace_back(kv.first.Scalar(), kv.second);
  return out;
}

absl::StatusOr<Section> Section::Sub(const std::string& key, std::vector<std::string> known) const {
  return Open(Get(key), PathOf(key), std::move(known), base_dir_);
}

absl::Status Section::String(const std::string& key, std::string* out) const {
  if (!Has(key)) return absl::OkStatus();
  COLLM_ASSIGN_OR_RETURN(*out, StringAt(Get(key), PathOf(key)));
  return absl::OkStatus();
}

absl::Status Section::Path(const std::string& key, std::string* out) const {
  if (!Has(key)) return absl::OkStatus();
  COLLM_ASSIGN_OR_RETURN(std::string s, StringAt(Get(key), PathOf(key)));
  COLLM_ASSIGN_OR_RETURN(*out, ResolvePath(s, PathOf(key), base_dir_));
  return absl::OkStatus();
}

absl::Status Section::StringList(const std::string& key, std::vector<std::string>* out,
                                 bool paths) const {
  if (!Has(key)) return absl::OkStatus();
  const YAML::Node list = Get(key);
  const std::string path = PathOf(key);
  out->clear();
  if (list.IsNull()) return absl::OkStatus();
  if (!list.IsSequence()) {
    return InvalidValue(path, absl::StrCat("must be a list of strings, got ", Describe(list)));
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

absl::Status Section::Int(const std::string& key, int64_t* out) const {
  if (!Has(key)) return absl::OkStatus();
  COLLM_ASSIGN_OR_RETURN(std::string s, ScalarAt(Get(key), PathOf(key), "an integer"));
  int64_t v = 0;  // SimpleAtoi writes on failure too; a bad value leaves *out as it was.
  if (!absl::SimpleAtoi(s, &v)) {
    return InvalidValue(PathOf(key), absl::StrCat("must be an integer, got '", s, "'"));
  }
  *out = v;
  return absl::OkStatus();
}

absl::Status Section::Int(const std::string& key, int* out) const {
  int64_t v = *out;
  COLLM_RETURN_IF_ERROR(Int(key, &v));
  if (v < std::numeric_limits<int>::min() || v > std::numeric_limits<int>::max()) {
    return InvalidValue(PathOf(key), absl::StrCat("is out of range, got ", v));
  }
  *out = static_cast<int>(v);
  return absl::OkStatus();
}

absl::Status Section::Uint(const std::string& key, uint64_t* out) const {
  if (!Has(key)) return absl::OkStatus();
  COLLM_ASSIGN_OR_RETURN(std::string s, ScalarAt(Get(key), PathOf(key), "an integer >= 0"));
  uint64_t v = 0;
  if (absl::StartsWith(absl::StripAsciiWhitespace(s), "-") || !absl::SimpleAtoi(s, &v)) {
    return InvalidValue(PathOf(key), absl::StrCat("must be an integer >= 0, got '", s, "'"));
  }
  *out = v;
  return absl::OkStatus();
}

absl::Status Section::Double(const std::string& key, double* out) const {
  if (!Has(key)) return absl::OkStatus();
  COLLM_ASSIGN_OR_RETURN(std::string s, ScalarAt(Get(key), PathOf(key), "a number"));
  double v = 0;
  if (!absl::SimpleAtod(s, &v) || !std::isfinite(v)) {
    return InvalidValue(PathOf(key), absl::StrCat("must be a finite number, got '", s, "'"));
  }
  *out = v;
  return absl::OkStatus();
}

absl::Status Section::Float(const std::string& key, float* out) const {
  double v = *out;
  COLLM_RETURN_IF_ERROR(Double(key, &v));
  *out = static_cast<float>(v);
  return absl::OkStatus();
}

absl::Status Section::Bool(const std::string& key, bool* out) const {
  if (!Has(key)) return absl::OkStatus();
  COLLM_ASSIGN_OR_RETURN(std::string s, ScalarAt(Get(key), PathOf(key), "true or false"));
  const std::string lower = absl::AsciiStrToLower(absl::StripAsciiWhitespace(s));
  if (lower == "true" || lower == "yes" || lower == "on") {
    *out = true;
  } else if (lower == "false" || lower == "no" || lower == "off") {
    *out = false;
  } else {
    return InvalidValue(PathOf(key), absl::StrCat("must be true or false, got '", s, "'"));
  }
  return absl::OkStatus();
}

absl::Status Section::Bytes(const std::string& key, int64_t* out) const {
  if (!Has(key)) return absl::OkStatus();
  COLLM_ASSIGN_OR_RETURN(std::string s, ScalarAt(Get(key), PathOf(key), "a byte size"));
  COLLM_ASSIGN_OR_RETURN(*out, ParseBytes(s, PathOf(key)));
  return absl::OkStatus();
}

absl::StatusOr<size_t> Section::EnumIndex(const std::string& key,
                                          const std::vector<std::string>& names) const {
  COLLM_ASSIGN_OR_RETURN(std::string s, StringAt(Get(key), PathOf(key)));
  for (size_t i = 0; i < names.size(); ++i) {
    if (s == names[i]) return i;
  }
  return InvalidValue(
      PathOf(key), absl::StrCat("must be one of ", absl::StrJoin(names, ", "), ", got '", s, "'"));
}

absl::Status Section::CheckKeys() const {
  if (!IsMap()) return absl::OkStatus();
  std::set<std::string> seen;
  for (const auto& kv : node_) {
    if (!kv.first.IsScalar()) {
      return absl::InvalidArgumentError(absl::StrCat(path_.empty() ? "the configuration" : path_,
                                                     " has a key that is not a string"));
    }
    const std::string key = kv.first.Scalar();
    const std::string key_path = JoinKeyPath(path_, key);
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

}  // namespace collm::config
