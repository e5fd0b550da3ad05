// PEFT training of the shadow adapter on the frozen base model: micro-batches with gradient
// accumulation, loss on target (completion) tokens only, AdamW with gradient clipping, warmup +
// constant or cosine learning-rate schedule. Seeded: the same seed, data and options give the same
// losses, also across a checkpoint and resume.
#ifndef COLLM_ENGINE_PEFT_TRAINER_H_
#define COLLM_ENGINE_PEFT_TRAINER_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "collm/engine/dataset.h"
#include "collm/engine/lr_schedule.h"
#include "collm/lora/shadow_adapter.h"
#include "collm/runtime/llama_model.h"

namespace collm::engine {

struct TrainerOptions {
  double lr = 2e-4;                             // Peak learning rate; > 0.
  LrSchedule schedule = LrSchedule::kConstant;  // After warmup. Default constant.
  int64_t warmup_steps = 0;      // Linear warmup from 0 over this many optimizer steps.
  int64_t total_steps = 0;       // Cosine horizon (optimizer steps); > 0 for kCosine.
  double min_lr_ratio = 0.1;     // Cosine floor as a fraction of lr.
  double max_grad_norm = 1.0;    // Global-norm clipping; <= 0 = off.
  int64_t micro_batch_size = 4;  // Examples per forward/backward.
  int64_t grad_accum_steps = 1;  // Micro-batches per optimizer step.
  uint64_t seed = 0;             // Data order and dropout.
  // The optimizer: betas in [0, 1) (default 0.9, 0.999), eps > 0 (1e-8) and decoupled weight
  // decay >= 0 (0 = none; collmd.yaml's training.trainer.weight_decay, collmctl --weight-decay).
  lora::AdamWOptions adamw;
  // FedProx (Li et al. 2020): while a proximal anchor is set (PeftTrainer::SetProximalAnchor), the
  // loss adds prox_mu / 2 * Σ ‖w − w_anchor‖² over all LoRA factors, keeping local training near
  // the round's global adapter on non-IID data. >= 0; 0 = off (the step is then bit-identical to
  // training without it).
  double prox_mu = 0;
  // The LM head and cross-entropy run only on target (completion) positions, this many rows at a
  // time, each chunk's backward right after its forward: the full-vocabulary logits held at once
  // are bounded by head_chunk_rows x vocab floats, whatever the micro-batch. > 0; default 128
  // (collmd.yaml's training.trainer.head_chunk_rows).
  int64_t head_chunk_rows = 128;

  absl::Status Validate() const;  // InvalidArgument naming the field.
};

struct StepStats {
  int64_t step = 0;      // Optimizer steps done (after this one).
  double loss = 0;       // Mean token loss over the step's micro-batches.
  double lr = 0;         // Learning rate used.
  double grad_norm = 0;  // Before clipping.
  int64_t tokens = 0;    // Tokens forwarded.
  int64_t target_tokens = 0;
};

// Draws examples in a seeded shuffled order, epoch after epoch. Its cursor is saved in
// checkpoints so a resumed run sees the same data. Not thread-safe.
class ExampleSampler {
 public:
  ExampleSampler(const std::vector<TrainingExample>* examples, uint64_t seed);
  std::vector<const TrainingExample*> Next(int64_t n);
  std::map<std::string, std::string> State() const;
  absl::Status Restore(const std::map<std::string, std::string>& state);

 private:
  void Shuffle();
  const std::vector<TrainingExample>* examples_;
  uint64_t seed_;
  int64_t epoch_ = 0;
  int64_t position_ = 0;
  std::vector<size_t> order_;
};

// Mean token loss (over target tokens) of `model` with `adapter` (null = base) on `examples`,
// no gradients. InvalidArgument when no example has a target.
absl::StatusOr<double> EvaluateLoss(const runtime::LlamaModel& model,
                                    const runtime::LoraWeights* adapter,
                                    const std::vector<TrainingExample>& examples,
                                    int64_t batch_size = 8);

// Summed token loss and target count over `examples` (for evaluating in slices).
struct LossSum {
  double sum = 0;
  int64_t targets = 0;
};
absl::StatusOr<LossSum> EvaluateLossSum(const runtime::LlamaModel& model,
                                        const runtime::LoraWeights* adapter,
                                        const std::vector<const TrainingExample*>& examples,
                                        int64_t batch_size = 8);

// Owned by one thread (the engine thread).
class PeftTrainer {
 public:
  static absl::StatusOr<std::unique_ptr<PeftTrainer>> Create(
      std::shared_ptr<const runtime::LlamaModel> model, std::unique_ptr<lora::ShadowAdapter> shadow,
      const TrainerOptions& options);
  ~PeftTrainer();

  // Forward + backward of one micro-batch, accumulating gradients. Once grad_accum_steps
  // micro-batches have accumulated it applies the optimizer step and returns its stats.
  absl::StatusOr<std::optional<StepStats>> MicroStep(
      const std::vector<const TrainingExample*>& batch);

  // The same micro-step, preemptible: BeginMicroStep prepares it, each AdvanceMicroStep runs one
  // phase — the forward of one decoder layer, the head + loss, or the backward of one layer
  // (2 * layers + 1 phases) — so the engine can serve inference between phases and a request
  // never waits for more than one phase. MicroStep == Begin + Advance until finished; the phased
  // backward (one layer at a time, through detached layer boundaries) computes the same gradients.
  // The head phase (index = layers) covers the target rows only and may itself be split: with
  // max_head_rows > 0 one call runs at most that many target rows of it (head + loss + their
  // backward) and next_phase() stays at the head until head_rows_left() is 0.
  struct PhaseResult {
    bool finished = false;          // The micro-step is complete (no phase left).
    std::optional<StepStats> step;  // Set when finishing it applied an optimizer step.
  };
  // FailedPrecondition while another micro-step is in flight; InvalidArgument for an empty batch
  // or one without targets.
  absl::Status BeginMicroStep(const std::vector<const TrainingExample*>& batch);
  absl::StatusOr<PhaseResult> AdvanceMicroStep(int64_t max_head_rows = 0);
  bool micro_step_active() const { return run_ != nullptr; }
  int64_t micro_step_examples() const;  // Examples of the micro-step in flight (0 = none).
  int64_t micro_step_tokens() const;    // Its padded input tokens (examples x length).
  int64_t next_phase() const;           // Index of the phase AdvanceMicroStep runs next.
  int64_t num_phases() const;           // Phases per micro-step: 2 * layers + 1.
  int64_t head_phase() const;           // Index of the head phase (= layers).
  int64_t head_rows_left() const;       // Target rows the head phase has still to run (0 = none).
  // Drops the micro-step in flight (its gradients never reach the parameters).
  void AbortMicroStep();
  // A whole optimizer step: grad_accum_steps micro-batches drawn from `sampler`.
  absl::StatusOr<StepStats> Step(ExampleSampler& sampler);
  // Mean token loss of the current shadow adapter.
  absl::StatusOr<double> Evaluate(const std::vector<TrainingExample>& examples) const;

  // Anchors the FedProx term to `global` (typically the round's global adapter, just loaded into
  // the shadow): keeps a detached copy of its factors. InvalidArgument when its targets or factor
  // shapes differ from the shadow's. Takes effect only when options().prox_mu > 0.
  absl::Status SetProximalAnchor(const lora::LoraAdapter& global);
  void ClearProximalAnchor() { anchor_.layers.clear(); }
  bool has_proximal_anchor() const { return !anchor_.layers.empty(); }

  double LearningRate(int64_t step) const;  // For optimizer step `step` (1-based).
  lora::ShadowAdapter& shadow() { return *shadow_; }
  const lora::ShadowAdapter& shadow() const { return *shadow_; }
  const TrainerOptions& options() const { return options_; }
  // Changes the peak learning rate from the next optimizer step on (a federated task's lr).
  // REQUIRES: lr > 0.
  void set_lr(double lr) { options_.lr = lr; }
  void set_prox_mu(double mu) { options_.prox_mu = mu; }
  int64_t micro_steps() const { return micro_steps_; }

  // Drops gradients accumulated since the last optimizer step and any micro-step in flight (e.g. at
  // shutdown, so a checkpoint can be taken at a step boundary).
  void DiscardPartialStep();
  // Checkpoint = shadow adapter + optimizer state + `extra` (e.g. sampler cursor) + counters.
  absl::Status SaveCheckpoint(const std::string& dir,
                              const std::map<std::string, std::string>& extra) const;
  static absl::StatusOr<std::unique_ptr<PeftTrainer>> Resume(
      std::shared_ptr<const runtime::LlamaModel> model, const std::string& dir,
      const TrainerOptions& options, std::map<std::string, std::string>* extra);

 private:
  PeftTrainer();
  struct Run;

  std::shared_ptr<const runtime::LlamaModel> model_;
  std::unique_ptr<lora::ShadowAdapter> shadow_;
  TrainerOptions options_;
  runtime::LoraFactors anchor_;  // FedProx anchor (CPU f32, no grad); empty layers = none.
  int64_t micro_steps_ = 0;      // Micro-batches run so far (drives dropout seeds).
  int64_t accumulated_ = 0;      // Micro-batches since the last optimizer step.
  double accum_loss_ = 0;
  int64_t accum_tokens_ = 0, accum_targets_ = 0;
  std::unique_ptr<Run> run_;  // The phased micro-step in flight, if any.
};

}  // namespace collm::engine

#endif  // COLLM_ENGINE_PEFT_TRAINER_H_
