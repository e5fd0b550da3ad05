// The fast-timescale co-execution controller: decides, at each engine step boundary, whether the
// engine runs a training phase (or a slice of a publish's held-out evaluation) next, and how large
// it may be, from a snapshot of serving and the costs it has learned. Pure policy: plain structs
// in, a decision out, time from an injected Clock; no I/O, no threads, no tensors. The engine owns
// one instance, feeds it measurements and acts on its decisions.
#ifndef COLLM_COORDINATION_CO_EXECUTION_POLICY_H_
#define COLLM_COORDINATION_CO_EXECUTION_POLICY_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "collm/common/clock.h"
#include "collm/coordination/arrival_rate.h"
#include "collm/coordination/phase_costs.h"

namespace collm::coordination {

// Latency objectives of one request class; 0 = no objective.
struct SloTarget {
  double ttft_ms = 0;  // Time to first token, queueing included.
  double tpot_ms = 0;  // Mean time per output token after the first.
};

struct CoExecutionOptions {
  double training_share = 0.0;  // Target share of busy engine time spent training, in [0, 1].
                                // Idle time is always used for training when > 0.
  bool slo_guard = true;        // Start a phase only if no queued or running request would then
                                // miss its TTFT/TPOT objective, given the learned step costs.
  double guard_safety = 1.2;    // Multiplier on predicted costs in the guard; >= 1.
  // When even one example's phase exceeds what an arriving request could wait, idle training
  // still runs if the expected share of arrivals it delays (arrival rate x phase time) is at most
  // this, in [0, 1]. Without it a daemon whose SLO is tighter than a phase would never train.
  double guard_idle_risk = 0.02;
  double tightest_ttft_ms = 0;  // Tightest TTFT objective of any request class; 0 = none. Bounds
                                // what a phase may take while idle.
  // Bound on the predicted cost of any one training phase (ms), guard or not, busy or idle: the
  // micro-step's padded tokens are sized so its costliest per-token phase fits, the head phase
  // is split into row chunks that fit. A micro-step of which not even one example fits never
  // starts (counted as blocked). >= 0; 0 = no bound. Default 0.
  double max_phase_ms = 0;
};

// InvalidArgument naming the field ("engine.<field>", as configured) for options out of range.
absl::Status ValidateCoExecutionOptions(const CoExecutionOptions& options);

// One queued or running request, as the guard sees it.
struct RequestTiming {
  SloTarget slo;
  int64_t submit_nanos = 0;
  int64_t first_token_nanos = 0;  // 0 = no token yet (always for queued requests).
  int64_t generated = 0;          // Output tokens so far.
};

// Serving at a step boundary, taken by the engine.
struct ServingSnapshot {
  bool idle = true;                     // No request is queued or running.
  std::vector<RequestTiming> requests;  // Queued and running requests (may omit those without
                                        // an objective).
  double arrival_rate = 0;              // Requests/s (ArrivalRateEstimator::Rate at the boundary).
};

// The trainer at a step boundary.
struct TrainerSnapshot {
  bool evaluating = false;         // A publish's held-out evaluation is waiting for slices.
  bool micro_step_active = false;  // A micro-step is in flight: its next phase is `next_phase`.
  int64_t next_phase = 0;          // REQUIRES: in [0, num_phases) when micro_step_active.
  int64_t micro_step_tokens = 0;   // Padded input tokens of the micro-step in flight.
  int64_t head_rows_left = 0;      // > 0: the next phase is the head, with this many target rows.
};

struct CoExecutionDecision {
  enum class Action {
    kStop,            // Nothing more this iteration (share reached, no training wanted).
    kBlocked,         // The SLO guard refuses the next piece of work (counted as blocked).
    kEvaluate,        // Run `eval_examples` held-out examples of the pending publish.
    kBeginMicroStep,  // Start a micro-step within `max_tokens`, then run its first phase.
    kRunPhase,        // Run the next phase of the micro-step in flight.
  };
  Action action = Action::kStop;
  int64_t eval_examples = 0;  // kEvaluate: > 0.
  // kBeginMicroStep: padded input tokens at most; < 0 = exactly one example, whatever its size;
  // infinity = no limit.
  double max_tokens = 0;
  // kBeginMicroStep: when not even one example fits `max_tokens`, retry within
  // `fallback_max_tokens` (idle only, bounded by guard_idle_risk); false = no retry.
  bool has_fallback = false;
  double fallback_max_tokens = 0;
  // kRunPhase at the head phase: target rows to run at most; 0 = all that are left.
  int64_t max_head_rows = 0;
  // Whether to ask again after this piece of work in the same iteration (idle, or no guard);
  // a finished micro-step always ends the iteration.
  bool continue_after = false;
};

// Not thread-safe: owned by the engine thread.
class CoExecutionPolicy {
 public:
  static constexpr int64_t kMaxEvalSliceExamples = 8;  // Held-out examples per slice at most.

  // REQUIRES: ValidateCoExecutionOptions(options).ok(); `num_phases` >= 0 (0 = no training).
  CoExecutionPolicy(const CoExecutionOptions& options, int64_t num_phases, Clock& clock);

  // Whether training is wanted at all (a share > 0).
  bool training_wanted() const { return options_.training_share > 0; }
  double training_share() const { return options_.training_share; }
  // REQUIRES: share in [0, 1].
  void set_training_share(double share) { options_.training_share = share; }
  // Resizes the phase-cost model (when training is enabled after construction).
  void set_num_phases(int64_t num_phases) { costs_.Reset(num_phases); }

  // The next piece of work, at the current clock time.
  CoExecutionDecision Decide(const ServingSnapshot& serving, const TrainerSnapshot& trainer) const;

  // Seconds of delay the tightest objective among `serving.requests` can absorb before the next
  // token (infinity when none has an objective), at `now_nanos`.
  double SloSlack(const ServingSnapshot& serving, int64_t now_nanos) const;
  // The same slack as a fraction of each request's own objective (its TTFT before the first
  // token, one TPOT after), the tightest one, at most 1 (1 when none has an objective); < 0 when
  // a request is already late. The share controller scales training by it.
  double SloHeadroom(const ServingSnapshot& serving, int64_t now_nanos) const;
  // Seconds a phase may take while idle: the tightest TTFT objective minus a prefill step.
  double IdleBudget() const;
  // Seconds any one phase may be predicted to take (max_phase_ms; infinity = no bound).
  double PhaseBound() const;

  // Measurements, fed by the engine after the work ran.
  void RecordInferenceStep(double seconds) { costs_.RecordInferenceStep(seconds); }
  void RecordPhase(int64_t phase, double seconds, int64_t tokens) {
    costs_.RecordPhase(phase, seconds, tokens);
  }
  void RecordHeadRows(double seconds, int64_t rows) { costs_.RecordHeadRows(seconds, rows); }
  void RecordMicroStep(double seconds) { costs_.RecordMicroStep(seconds); }
  void RecordEvaluation(double seconds, int64_t examples) {
    costs_.RecordEvaluation(seconds, examples);
  }
  // One loop iteration that did work: its inference and training seconds (busy-time shares,
  // smoothed over the last ~10 such iterations).
  void RecordIteration(double infer_seconds, double train_seconds);
  // Measured share of busy time spent training (EWMA), in [0, 1].
  double train_time_share() const;

  const PhaseCosts& costs() const { return costs_; }
  PhaseCosts& mutable_costs() { return costs_; }  // Tests set estimates directly.

 private:
  // Calls visit(slack_seconds, objective_seconds) for each request with an objective.
  template <typename Visit>
  void ForEachSlack(const ServingSnapshot& serving, int64_t now_nanos, Visit&& visit) const;

  CoExecutionOptions options_;
  Clock* clock_;
  PhaseCosts costs_;
  double busy_infer_ = 0;  // EWMA of inference seconds per loop iteration.
  double busy_train_ = 0;  // EWMA of training seconds per loop iteration.
};

}  // namespace collm::coordination

#endif  // COLLM_COORDINATION_CO_EXECUTION_POLICY_H_
