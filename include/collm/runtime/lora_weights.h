// What the decoder needs to add unmerged LoRA deltas, y = x W^T + s (x A^T) B^T, laid out for its
// fused projections. The lora module builds these from PEFT adapters and the shadow adapter; the
// runtime only applies them, so it never depends on the lora module.
#ifndef COLLM_RUNTIME_LORA_WEIGHTS_H_
#define COLLM_RUNTIME_LORA_WEIGHTS_H_

#include <ATen/core/TensorBody.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "collm/runtime/model_config.h"

namespace collm::runtime {

// The seven Llama linear layers LoRA can target, in fused order (q, k, v | o | gate, up | down).
enum class LoraTarget : int { kQ = 0, kK, kV, kO, kGate, kUp, kDown };
inline constexpr int kNumLoraTargets = 7;
// PEFT spelling: "q_proj", "k_proj", ..., "down_proj".
const char* LoraTargetName(LoraTarget target);
absl::StatusOr<LoraTarget> ParseLoraTarget(const std::string& name);
// Input and output width of the base projection `target` in `config`.
int64_t LoraTargetIn(const ModelConfig& config, LoraTarget target);
int64_t LoraTargetOut(const ModelConfig& config, LoraTarget target);

// One fused projection's adapter: a = stacked A matrices [R, in]; b = block-diagonal scaled B
// matrices [out, R] (the scale s = alpha/r or alpha/sqrt(r) is folded into b). Undefined tensors
// mean the projection has no adapter.
struct LoraProjection {
  at::Tensor a;
  at::Tensor b;
  bool defined() const { return a.defined(); }
};

struct LoraLayer {
  LoraProjection qkv, o, gate_up, down;
};

// A complete adapter in decoder layout. Immutable once built when shared for inference.
struct LoraWeights {
  std::vector<LoraLayer> layers;
};

// Per layer and target: A [r, in] and B [out, r] (undefined = target not adapted) plus the scale.
struct LoraFactors {
  struct Factor {
    at::Tensor a, b;
  };
  std::vector<std::array<Factor, kNumLoraTargets>> layers;
  double scale = 1.0;
};

// Fuses per-target factors into the decoder layout. Differentiable (autograd flows to the
// factors), so training uses it too. InvalidArgument naming layer and target on a shape mismatch.
absl::StatusOr<LoraWeights> FuseLora(const ModelConfig& config, const LoraFactors& factors);

}  // namespace collm::runtime

#endif  // COLLM_RUNTIME_LORA_WEIGHTS_H_
