// SLO-aware admission: predicts when a queued request would get its first token from the
// engine's step-cost model (the prefill tokens queued ahead of it, the decode rows of the running
// batch), so that requests that can no longer make their TTFT objective stop taking capacity from
// those that can. Pure policy: plain structs in, verdicts out, time passed in as nanoseconds; no
// I/O, no threads, no tensors. The engine asks it at Submit and at every step boundary.
#ifndef COLLM_COORDINATION_ADMISSION_H_
#define COLLM_COORDINATION_ADMISSION_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace collm::coordination {

// What happens to a request predicted to miss its TTFT objective.
enum class AdmissionMode {
  kNone,          // Nothing: first come, first served (the default).
  kReject,        // Refused at Submit (RESOURCE_EXHAUSTED); once accepted, a request that falls
                  // behind is deprioritised, never dropped.
  kDeprioritize,  // Accepted, but queued behind every request that can still make its objective.
};

// "none", "reject" or "deprioritize"; InvalidArgument naming `key` otherwise.
absl::StatusOr<AdmissionMode> ParseAdmissionMode(const std::string& key, const std::string& value);
const char* AdmissionModeName(AdmissionMode mode);

// Seconds an engine step takes, learned from the steps that ran: a step that carries prefill
// runs up to the step-token budget, so the model is the EWMA (weight 0.2 on the newest) of
// steps at or above half the budget; decode-only steps are learned apart. Not thread-safe.
class StepCostModel {
 public:
  // REQUIRES: max_step_tokens > 0.
  explicit StepCostModel(int64_t max_step_tokens) : max_step_tokens_(max_step_tokens) {}
  void RecordStep(double seconds, int64_t tokens);
  // Replaces the measurements (tests): a full step and a decode-only step.
  void SetEstimates(double full_step_seconds, double decode_step_seconds);
  // A step at the token budget; falls back to the decode-only cost (0 = nothing measured).
  double full_step_seconds() const { return full_ > 0 ? full_ : decode_; }
  double decode_step_seconds() const { return decode_ > 0 ? decode_ : full_; }
  int64_t max_step_tokens() const { return max_step_tokens_; }
  // Engine seconds one request of `prompt_tokens` and `generated_tokens` costs serving alone, at
  // the measured costs: its prompt at a prefill step's cost per token (full steps over the tokens
  // they carried), its output at a decode step's cost over the rows decode steps carried (the
  // batch it shared them with). 0 when a cost is missing. Unlike max_running x one step's cost,
  // this does not assume every step is a full batch: at light load the measured decode batch is
  // small, so the estimate is conservative, and it grows as batches do.
  double ServingSecondsPerRequest(double prompt_tokens, double generated_tokens) const;
  // 1 / ServingSecondsPerRequest (requests/s serving alone); 0 = unknown.
  double ServingCapacityRps(double prompt_tokens, double generated_tokens) const;
  double full_step_tokens() const { return full_tokens_; }      // EWMA; 0 = not measured.
  double decode_step_tokens() const { return decode_tokens_; }  // EWMA rows; 0 = not measured.

 private:
  int64_t max_step_tokens_;
  double full_ = 0;           // 0 = not measured.
  double decode_ = 0;         // 0 = not measured.
  double full_tokens_ = 0;    // Tokens of the full steps measured (EWMA).
  double decode_tokens_ = 0;  // Tokens (decode rows) of the decode-only steps measured (EWMA).
};

// The engine's load as admission sees it.
struct AdmissionLoad {
  int64_t running = 0;               // Sequences in the running batch (one decode row each).
  int64_t running_prefill_left = 0;  // Prompt tokens of running sequences not yet prefilled.
  int64_t max_running = 0;           // The running batch's capacity; > 0.
};

// One queued (or arriving) request.
struct QueuedRequest {
  double ttft_ms = 0;  // Its class's TTFT objective; 0 = none (never shed).
  int64_t submit_nanos = 0;
  int64_t prompt_tokens = 0;  // Tokens to prefill before its first token.
};

// Not thread-safe: the engine calls it under its queue lock.
class AdmissionController {
 public:
  // REQUIRES: max_step_tokens > 0; safety >= 1.
  AdmissionController(AdmissionMode mode, int64_t max_step_tokens, double safety = 1.0);

  AdmissionMode mode() const { return mode_; }
  StepCostModel& costs() { return costs_; }
  const StepCostModel& costs() const { return costs_; }

  // Predicted seconds from `now_nanos` until `request`'s first token, when `prefill_ahead`
  // prompt tokens (queued ahead of it, plus the running batch's unprefilled ones) go first: the
  // steps that take, each carrying the step budget minus one decode row per running sequence,
  // times a full step's cost. 0 while no step cost has been measured (admission then admits).
  double PredictSecondsToFirstToken(const QueuedRequest& request, int64_t prefill_ahead,
                                    const AdmissionLoad& load) const;
  // Predicted TTFT (queueing so far included), in seconds.
  double PredictTtftSeconds(const QueuedRequest& request, int64_t prefill_ahead,
                            const AdmissionLoad& load, int64_t now_nanos) const;
  // Whether `request` is predicted to miss its objective (never for one without an objective,
  // nor in mode kNone, nor before a step cost is known).
  bool WillMiss(const QueuedRequest& request, int64_t prefill_ahead, const AdmissionLoad& load,
                int64_t now_nanos) const;

  // Walks `queue` in order (requests that can still make their objective first, as the engine
  // keeps it) and returns the indices of those predicted to miss: each one's prediction counts
  // only the prompt tokens of requests ahead of it that are kept in front. Empty in mode kNone.
  std::vector<size_t> FindHopeless(const std::vector<QueuedRequest>& queue,
                                   const AdmissionLoad& load, int64_t now_nanos) const;

 private:
  AdmissionMode mode_;
  double safety_;
  StepCostModel costs_;
};

}  // namespace collm::coordination

#endif  // COLLM_COORDINATION_ADMISSION_H_
