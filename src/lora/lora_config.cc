#include "collm/lora/lora_config.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "collm/common/status.h"

namespace collm::lora {

using runtime::LoraTarget;
using Json = nlohmann::json;

namespace {

constexpr int kMaxRank = 4096;

absl::Status KeyError(absl::string_view key, absl::string_view what, const Json& value) {
  return absl::InvalidArgumentError(
      absl::StrCat("adapter_config \"", key, "\" ", what, ", got ", value.dump()));
}

// A JSON value PEFT writes for a feature that is switched off.
bool IsOffValue(const Json& v) {
  return v.is_null() || (v.is_boolean() && !v.get<bool>()) ||
         ((v.is_object() || v.is_array() || v.is_string()) && v.empty());
}

absl::StatusOr<LoraTarget> ParseTargetName(const Json& v) {
  if (!v.is_string()) return KeyError("target_modules", "entries must be strings", v);
  auto target = runtime::ParseLoraTarget(v.get<std::string>());
  if (!target.ok()) return Annotate(target.status(), "adapter_config \"target_modules\"");
  return *target;
}

// PEFT treats a string target_modules as a regular expression matched against full module paths;
// collm only honours the strings whose meaning does not depend on the regex engine.
absl::StatusOr<std::vector<LoraTarget>> ParseTargets(const Json& v) {
  std::vector<LoraTarget> targets;
  if (v.is_string()) {
    const std::string s = v.get<std::string>();
    if (s == "all-linear") {
      // PEFT expands it to every linear layer except the output head; for Llama these seven.
      for (int t = 0; t < runtime::kNumLoraTargets; ++t) {
        targets.push_back(static_cast<LoraTarget>(t));
      }
      return targets;
    }
    if (!runtime::ParseLoraTarget(s).ok()) {
      return KeyError("target_modules",
                      "as a string must be one module name (q_proj, k_proj, v_proj, o_proj, "
                      "gate_proj, up_proj, down_proj) or \"all-linear\"; regular expressions are "
                      "not supported",
                      v);
    }
    targets.push_back(*runtime::ParseLoraTarget(s));
    return targets;
  }
  if (!v.is_array()) return KeyError("target_modules", "must be a list of module names", v);
  for (const Json& item : v) {
    COLLM_ASSIGN_OR_RETURN(LoraTarget t, ParseTargetName(item));
    if (std::find(targets.begin(), targets.end(), t) != targets.end()) {
      return KeyError("target_modules", "must not list a module twice", v);
    }
    targets.push_back(t);
  }
  if (targets.empty()) return KeyError("target_modules", "must not be empty", v);
  return targets;
}

}  // namespace

double LoraConfig::scale() const {
  return use_rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / rank;
}

absl::Status LoraConfig::Validate() const {
  if (rank <= 0)
    return absl::InvalidArgumentError(absl::StrCat("lora.rank must be > 0, got ", rank));
  if (rank > kMaxRank) {
    return absl::InvalidArgumentError(
        absl::StrCat("lora.rank must be <= ", kMaxRank, ", got ", rank));
  }
  if (!std::isfinite(alpha) || alpha <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("lora.alpha must be finite and > 0, got ", alpha));
  }
  if (!(dropout >= 0 && dropout < 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("lora.dropout must be in [0, 1), got ", dropout));
  }
  if (targets.empty()) return absl::InvalidArgumentError("lora.targets must not be empty");
  std::set<int> seen;
  for (LoraTarget t : targets) {
    const int i = static_cast<int>(t);
    if (i < 0 || i >= runtime::kNumLoraTargets) {
      return absl::InvalidArgumentError(absl::StrCat("lora.targets has an invalid module ", i));
    }
    if (!seen.insert(i).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("lora.targets lists ", runtime::LoraTargetName(t), " twice"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<LoraConfig> LoraConfig::FromPeftJson(absl::string_view json_text) {
  const Json j =
      Json::parse(json_text.begin(), json_text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError("adapter_config is not valid JSON");
  if (!j.is_object()) return absl::InvalidArgumentError("adapter_config must be a JSON object");

  // PEFT's defaults for keys an older or hand-written config may omit.
  LoraConfig c;
  c.rank = 8;
  c.alpha = 8;
  c.dropout = 0.0;
  c.targets = {LoraTarget::kQ, LoraTarget::kV};  // PEFT's default for Llama.

  // Keys that only affect initialization, bookkeeping or the PEFT runtime, never the adapter's
  // function once trained.
  static const std::set<std::string> kHarmless = {
      "task_type",      "inference_mode",    "init_lora_weights", "revision",   "auto_mapping",
      "layers_pattern", "loftq_config",      "megatron_core",     "eva_config", "corda_config",
      "runtime_config", "qalora_group_size", "peft_version"};
  for (const auto& [key, v] : j.items()) {
    if (key == "peft_type") {
      if (v != "LORA") return KeyError(key, "must be \"LORA\"", v);
    } else if (key == "r") {
      if (!v.is_number_integer() || v.get<int64_t>() <= 0 || v.get<int64_t>() > kMaxRank) {
        return KeyError(key, absl::StrCat("must be an integer in [1, ", kMaxRank, "]"), v);
      }
      c.rank = static_cast<int>(v.get<int64_t>());
    } else if (key == "lora_alpha") {
      if (!v.is_number() || !(v.get<double>() > 0) || !std::isfinite(v.get<double>())) {
        return KeyError(key, "must be a finite number > 0", v);
      }
      c.alpha = v.get<double>();
    } else if (key == "lora_dropout") {
      if (!v.is_number() || !(v.get<double>() >= 0 && v.get<double>() < 1)) {
        return KeyError(key, "must be a number in [0, 1)", v);
      }
      c.dropout = v.get<double>();
    } else if (key == "target_modules") {
      COLLM_ASSIGN_OR_RETURN(c.targets, ParseTargets(v));
    } else if (key == "use_rslora") {
      if (!v.is_boolean()) return KeyError(key, "must be a boolean", v);
      c.use_rslora = v.get<bool>();
    } else if (key == "base_model_name_or_path") {
      if (v.is_string()) {
        c.base_model_name_or_path = v.get<std::string>();
      } else if (!v.is_null()) {
        return KeyError(key, "must be a string", v);
      }
    } else if (key == "bias") {
      if (v != "none") return KeyError(key, "must be \"none\" (collm adapters have no biases)", v);
    } else if (key == "fan_in_fan_out") {
      if (v != false)
        return KeyError(key, "must be false (Conv1D-style weights are unsupported)", v);
    } else if (key == "rank_pattern" || key == "alpha_pattern") {
      if (!v.is_null() && !(v.is_object() && v.empty())) {
        return KeyError(key, "must be empty (per-module rank and alpha are unsupported)", v);
      }
    } else if (key == "use_dora") {
      if (v != false) return KeyError(key, "must be false (DoRA is unsupported)", v);
    } else if (key == "modules_to_save") {
      if (!v.is_null() && !(v.is_array() && v.empty())) {
        return KeyError(key, "must be null (fully trained extra modules are unsupported)", v);
      }
    } else if (key == "layers_to_transform") {
      if (!v.is_null()) {
        return KeyError(key, "must be null (adapters cover every layer in collm)", v);
      }
    } else if (kHarmless.count(key) != 0) {
      continue;
    } else if (!IsOffValue(v)) {
      // Newer PEFT versions add switches (lora_bias, layer_replication, exclude_modules, ...) that
      // are off by default; one that is on changes the adapter in a way collm does not know.
      return KeyError(key, "is not supported by collm unless null, false or empty", v);
    }
  }
  COLLM_RETURN_IF_ERROR(c.Validate());
  return c;
}

std::string LoraConfig::ToPeftJson() const {
  Json j;
  j["peft_type"] = "LORA";
  j["task_type"] = "CAUSAL_LM";
  j["r"] = rank;
  if (std::nearbyint(alpha) == alpha && std::abs(alpha) < 1e15) {
    j["lora_alpha"] = static_cast<int64_t>(alpha);
  } else {
    j["lora_alpha"] = alpha;
  }
  j["lora_dropout"] = dropout;
  Json modules = Json::array();
  for (LoraTarget t : targets) modules.push_back(runtime::LoraTargetName(t));
  j["target_modules"] = modules;
  j["use_rslora"] = use_rslora;
  j["bias"] = "none";
  j["fan_in_fan_out"] = false;
  j["inference_mode"] = true;
  j["base_model_name_or_path"] = base_model_name_or_path;
  j["modules_to_save"] = nullptr;
  j["init_lora_weights"] = true;
  j["layers_to_transform"] = nullptr;
  j["layers_pattern"] = nullptr;
  j["revision"] = nullptr;
  j["rank_pattern"] = Json::object();
  j["alpha_pattern"] = Json::object();
  j["use_dora"] = false;
  // Sorted keys and 2-space indent, as PEFT's save_pretrained writes.
  return j.dump(2) + "\n";
}

}  // namespace collm::lora
