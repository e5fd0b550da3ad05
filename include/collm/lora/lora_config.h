// LoRA hyper-parameters, as in Hugging Face PEFT's LoraConfig (adapter_config.json).
#ifndef COLLM_LORA_LORA_CONFIG_H_
#define COLLM_LORA_LORA_CONFIG_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "collm/runtime/lora_weights.h"

namespace collm::lora {

struct LoraConfig {
  int rank = 8;             // r; > 0.
  double alpha = 16;        // lora_alpha; > 0.
  double dropout = 0.05;    // lora_dropout on the adapter input during training; in [0, 1).
  bool use_rslora = false;  // Scale alpha/sqrt(r) (rsLoRA) instead of alpha/r.
  std::vector<runtime::LoraTarget> targets = {runtime::LoraTarget::kQ, runtime::LoraTarget::kV};
  std::string base_model_name_or_path;  // Informative, written to adapter_config.json.

  double scale() const;
  // InvalidArgument naming the field ("lora.rank must be > 0, got 0").
  absl::Status Validate() const;

  // PEFT adapter_config.json. Parsing rejects what collm cannot honour (peft_type other than
  // LORA, bias other than "none", fan_in_fan_out, per-module rank/alpha patterns, DoRA, unknown
  // target modules) with an error naming the key.
  // target_modules is a list of module names or a string naming one module or "all-linear" (all
  // seven); other strings are PEFT regexes and are rejected. Keys absent take PEFT's defaults
  // (r 8, lora_alpha 8, lora_dropout 0, q_proj/v_proj). Init-only and bookkeeping keys (task_type,
  // init_lora_weights, loftq_config, ...) are ignored; any other key must be null, false or empty.
  static absl::StatusOr<LoraConfig> FromPeftJson(absl::string_view json_text);
  std::string ToPeftJson() const;
};

}  // namespace collm::lora

#endif  // COLLM_LORA_LORA_CONFIG_H_
