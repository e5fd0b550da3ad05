// A LoRA adapter's parameters: per layer and target module, A [r, in] and B [out, r].
#ifndef COLLM_LORA_LORA_ADAPTER_H_
#define COLLM_LORA_LORA_ADAPTER_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "collm/lora/lora_config.h"
#include "collm/runtime/device.h"
#include "collm/runtime/lora_weights.h"
#include "collm/runtime/model_config.h"

namespace collm::lora {

// Plain value type (tensors are shared on copy: use Clone() for an independent copy). Not
// thread-safe for mutation.
struct LoraAdapter {
  LoraConfig config;
  // factors.layers[l][target] = {A, B}; undefined for modules not in config.targets.
  // factors.scale = config.scale().
  runtime::LoraFactors factors;

  // PEFT initialization: A ~ kaiming-uniform (bound 1/sqrt(in)), B = 0, so a fresh adapter does
  // not change the model. Deterministic in `seed`. f32 on CPU.
  static absl::StatusOr<LoraAdapter> Create(const runtime::ModelConfig& model,
                                            const LoraConfig& config, uint64_t seed);

  // Deep copy (detached, no grad).
  LoraAdapter Clone() const;
  // Checks every factor against `model` and config (shapes, rank, finite values). Errors name the
  // layer and module.
  absl::Status Validate(const runtime::ModelConfig& model) const;
  // Decoder layout on `rt`'s device and dtype, for inference.
  absl::StatusOr<runtime::LoraWeights> ToWeights(const runtime::ModelConfig& model,
                                                 const runtime::ResolvedRuntime& rt) const;
  int64_t num_parameters() const;
};

}  // namespace collm::lora

#endif  // COLLM_LORA_LORA_ADAPTER_H_
