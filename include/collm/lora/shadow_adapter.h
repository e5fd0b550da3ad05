// The shadow adapter: the trainable copy of an adapter — parameters with gradients plus AdamW
// state — kept apart from every published (live) snapshot. PEFT steps update it; Snapshot() copies
// it for publishing. Only LoRA parameters exist here: the base model has no gradients and no
// optimizer state.
#ifndef COLLM_LORA_SHADOW_ADAPTER_H_
#define COLLM_LORA_SHADOW_ADAPTER_H_

#include <ATen/core/TensorBody.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "collm/lora/lora_adapter.h"
#include "collm/runtime/lora_weights.h"
#include "collm/runtime/model_config.h"

namespace collm::lora {

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;  // Decoupled (AdamW) weight decay.
};

// Owned by one thread (the engine thread); not thread-safe.
class ShadowAdapter {
 public:
  // Starts from a copy of `initial` (f32, CPU) with fresh optimizer state.
  static absl::StatusOr<std::unique_ptr<ShadowAdapter>> Create(const LoraAdapter& initial,
                                                               const AdamWOptions& options);

  // Trainable factors (requires_grad); pass to runtime::FuseLora for a differentiable forward.
  const runtime::LoraFactors& factors() const { return adapter_.factors; }
  const LoraConfig& config() const { return adapter_.config; }
  // Clears accumulated gradients.
  void ZeroGrad();
  // Clips the global gradient norm to `max_grad_norm` (<= 0: no clipping), applies one AdamW step
  // with learning rate `lr`, clears gradients. Returns the norm before clipping. Parameters
  // without a gradient are left alone.
  double Step(double lr, double max_grad_norm);
  // Optimizer steps taken so far.
  int64_t step() const { return step_; }

  // A detached deep copy of the parameters, for publishing.
  LoraAdapter Snapshot() const;
  // Replaces the parameters with `adapter` (same targets and rank), e.g. a new global version
  // from federation; optimizer moments are reset when `reset_optimizer`.
  absl::Status Load(const LoraAdapter& adapter, bool reset_optimizer);

  // Writes `dir` (created): the adapter in PEFT format plus optimizer.safetensors holding the
  // AdamW moments and the step, and `metadata` (e.g. the trainer's data cursor). Crash-safe: each
  // file is written atomically.
  absl::Status SaveCheckpoint(const std::string& dir,
                              const std::map<std::string, std::string>& metadata) const;
  // Reads a checkpoint written by SaveCheckpoint; `metadata` receives what was saved.
  static absl::StatusOr<std::unique_ptr<ShadowAdapter>> LoadCheckpoint(
      const std::string& dir, const runtime::ModelConfig& model, const AdamWOptions& options,
      std::map<std::string, std::string>* metadata);

 private:
  ShadowAdapter() = default;
  std::vector<at::Tensor*> Parameters();

  LoraAdapter adapter_;
  AdamWOptions options_;
  int64_t step_ = 0;
  // Moments per parameter, in Parameters() order.
  std::vector<at::Tensor> exp_avg_;
  std::vector<at::Tensor> exp_avg_sq_;
};

}  // namespace collm::lora

#endif  // COLLM_LORA_SHADOW_ADAPTER_H_
