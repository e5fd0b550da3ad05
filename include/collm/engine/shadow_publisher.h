// Publishes the shadow adapter into the registry as a new live version: on demand or every N
// optimizer steps, optionally gated on held-out quality (publish only when the candidate's held-out
// loss beats the live version's by a margin; otherwise training just continues, and the stats say
// why).
#ifndef COLLM_ENGINE_SHADOW_PUBLISHER_H_
#define COLLM_ENGINE_SHADOW_PUBLISHER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "collm/engine/dataset.h"
#include "collm/engine/peft_trainer.h"
#include "collm/lora/adapter_registry.h"

namespace collm::engine {

struct PublishOptions {
  int64_t every_steps = 0;       // Due every N optimizer steps; 0 = only when asked.
  bool quality_gate = false;     // Require a held-out improvement over the live version.
  double min_improvement = 0.0;  // Nats of held-out loss the candidate must gain; >= 0.
};

struct PublishStats {
  int64_t attempts = 0;
  int64_t published = 0;
  int64_t rejected = 0;      // Refused by the quality gate.
  int64_t live_version = 0;  // 0 = none published yet.
  double live_loss = -1;     // Held-out loss of the live version (base model before).
  double last_candidate_loss = -1;
  std::string last_decision;  // Human-readable reason of the last attempt.
};

// Owned by the engine thread; not thread-safe. The registry is thread-safe and outlives it.
class ShadowPublisher {
 public:
  ShadowPublisher(std::shared_ptr<const runtime::LlamaModel> model, lora::AdapterRegistry& registry,
                  std::string adapter_name, PublishOptions options,
                  std::vector<TrainingExample> held_out);

  bool Due(int64_t optimizer_step) const;
  // Evaluates the shadow (when gated) and publishes it unless the gate refuses. Returns whether a
  // new version went live. `source` is recorded with the version ("" = "shadow step N").
  absl::StatusOr<bool> Consider(const PeftTrainer& trainer, const std::string& source = "");
  const PublishStats& stats() const { return stats_; }
  // The held-out examples the gate evaluates on (may be empty).
  const std::vector<TrainingExample>& held_out() const { return held_out_; }

  // The same decision in slices, so the engine can schedule the held-out evaluation like training
  // (under the SLO guard) instead of stalling or competing with inference: BeginConsider copies
  // the shadow (training goes on), EvaluateSome forwards the next `examples` held-out examples,
  // and Poll applies the gate and publishes once all are done. BeginConsider returns false (and
  // does nothing) while one is pending.
  bool BeginConsider(const PeftTrainer& trainer);
  bool evaluating() const;  // Pending with held-out examples left to evaluate.
  absl::Status EvaluateSome(int64_t examples);
  // nullopt while nothing is ready (`wait`: evaluates what is left first); otherwise what
  // Consider would have returned.
  std::optional<absl::StatusOr<bool>> Poll(bool wait = false);
  bool pending() const { return pending_ != nullptr; }
  ~ShadowPublisher();  // Waits for a pending evaluation.

 private:
  struct Losses {
    double candidate = -1;  // -1 = not evaluated (no held-out set).
    double live = -1;       // -1 = not needed (no gate).
  };
  absl::StatusOr<Losses> Evaluate(const lora::LoraAdapter& candidate) const;
  // `source` is recorded with the version ("" = "shadow step N").
  absl::StatusOr<bool> Decide(const lora::LoraAdapter& candidate, int64_t step,
                              const absl::StatusOr<Losses>& losses, const std::string& source = "");
  absl::StatusOr<double> LiveLoss() const;
  struct Pending;
  std::unique_ptr<Pending> pending_;

  std::shared_ptr<const runtime::LlamaModel> model_;
  lora::AdapterRegistry& registry_;
  const std::string name_;
  const PublishOptions options_;
  const std::vector<TrainingExample> held_out_;
  PublishStats stats_;
};

}  // namespace collm::engine

#endif  // COLLM_ENGINE_SHADOW_PUBLISHER_H_
