// Learned costs of the work the engine interleaves: one inference step, each training phase (per
// padded input token: phase costs grow with the micro-step's tokens), a whole micro-step, and one
// held-out example of a publish's evaluation, and one target row of the head phase. EWMAs with
// weight 0.2 on the newest measurement; the first measurement replaces "unknown" (0).
#ifndef COLLM_COORDINATION_PHASE_COSTS_H_
#define COLLM_COORDINATION_PHASE_COSTS_H_

#include <cstdint>
#include <vector>

namespace collm::coordination {

// Not thread-safe: owned by the co-execution policy (the engine thread).
class PhaseCosts {
 public:
  explicit PhaseCosts(int64_t num_phases = 0) { Reset(num_phases); }
  // Forgets every phase cost and sizes for `num_phases`; the inference cost is kept.
  void Reset(int64_t num_phases);

  void RecordInferenceStep(double seconds);
  // REQUIRES: phase in [0, num_phases()). `tokens` < 1 counts as 1.
  void RecordPhase(int64_t phase, double seconds, int64_t tokens);
  // The head phase (LM head + loss on target rows) is costed per target row, apart from the
  // per-token phases: its cost follows the targets, not the padded tokens. REQUIRES: rows > 0.
  void RecordHeadRows(double seconds, int64_t rows);
  void RecordMicroStep(double seconds);
  // REQUIRES: examples > 0.
  void RecordEvaluation(double seconds, int64_t examples);
  // Replaces the measurements (tests with a FakeClock): every phase alike (the head per target
  // row at the per-token cost).
  void SetEstimates(double infer_step_seconds, double phase_seconds_per_token);

  int64_t num_phases() const { return static_cast<int64_t>(phase_.size()); }
  double infer_step_seconds() const { return infer_; }       // 0 = not measured.
  double micro_step_seconds() const { return micro_step_; }  // 0 = not measured.
  double eval_seconds_per_example() const { return eval_; }  // 0 = not measured.
  double head_seconds_per_row() const { return head_; }      // 0 = not measured.
  // Predicted seconds per padded input token of `phase`: its own estimate, else the costliest
  // phase measured so far (0 = nothing measured). REQUIRES: phase in [0, num_phases()).
  double PhaseSecondsPerToken(int64_t phase) const;
  // The costliest phase per token (0 = nothing measured or no phases).
  double WorstPhaseSecondsPerToken() const;

 private:
  double infer_ = 0;
  double micro_step_ = 0;
  double eval_ = 0;
  double head_ = 0;
  std::vector<double> phase_;  // 0 = unknown.
};

}  // namespace collm::coordination

#endif  // COLLM_COORDINATION_PHASE_COSTS_H_
