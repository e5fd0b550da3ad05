#include "collm/coordination/admission.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace collm::coordination {
namespace {

void Smooth(double& estimate, double sample) {
  estimate = estimate == 0 ? sample : 0.8 * estimate + 0.2 * sample;
}

}  // namespace

absl::StatusOr<AdmissionMode> ParseAdmissionMode(const std::string& key, const std::string& value) {
  if (value == "none") return AdmissionMode::kNone;
  if (value == "reject") return AdmissionMode::kReject;
  if (value == "deprioritize") return AdmissionMode::kDeprioritize;
  return absl::InvalidArgumentError(
      absl::StrCat(key, " must be one of none, reject, deprioritize, got '", value, "'"));
}

const char* AdmissionModeName(AdmissionMode mode) {
  switch (mode) {
    case AdmissionMode::kNone:
      return "none";
    case AdmissionMode::kReject:
      return "reject";
    case AdmissionMode::kDeprioritize:
      return "deprioritize";
  }
  return "none";
}

void StepCostModel::RecordStep(double seconds, int64_t tokens) {
  if (!(seconds > 0) || tokens <= 0) return;
  // Half the budget or more: a step that prefilled; the cost of a step grows with its tokens, so
  // counting such steps as full ones errs on the side of a longer prediction.
  const bool full = 2 * tokens >= max_step_tokens_;
  Smooth(full ? full_ : decode_, seconds);
  Smooth(full ? full_tokens_ : decode_tokens_, static_cast<double>(tokens));
}

void StepCostModel::SetEstimates(double full_step_seconds, double decode_step_seconds) {
  full_ = full_step_seconds;
  decode_ = decode_step_seconds;
  full_tokens_ = static_cast<double>(max_step_tokens_);
  decode_tokens_ = 1;
}

double StepCostModel::ServingSecondsPerRequest(double prompt_tokens,
                                               double generated_tokens) const {
  // A missing kind of step is costed like the other one, with its own tokens per step.
  const double full = full_step_seconds(), decode = decode_step_seconds();
  if (full <= 0 || decode <= 0) return 0;
  const double full_tokens =
      full_tokens_ > 0 ? full_tokens_ : static_cast<double>(max_step_tokens_);
  const double decode_rows = std::max(1.0, decode_tokens_);
  return std::max(0.0, prompt_tokens) * full / full_tokens +
         std::max(0.0, generated_tokens) * decode / decode_rows;
}

double StepCostModel::ServingCapacityRps(double prompt_tokens, double generated_tokens) const {
  const double seconds = ServingSecondsPerRequest(prompt_tokens, generated_tokens);
  return seconds > 0 ? 1.0 / seconds : 0;
}

AdmissionController::AdmissionController(AdmissionMode mode, int64_t max_step_tokens, double safety)
    : mode_(mode), safety_(safety), costs_(max_step_tokens) {}

double AdmissionController::PredictSecondsToFirstToken(const QueuedRequest& request,
                                                       int64_t prefill_ahead,
                                                       const AdmissionLoad& load) const {
  const double step = costs_.full_step_seconds();
  if (step <= 0) return 0;
  // Decode rows go first in every step (PlanStep); prefill gets what is left of the budget. The
  // request's own first token comes with the step that prefills its last prompt token.
  const int64_t decode_rows = std::min(load.running, costs_.max_step_tokens() - 1);
  const int64_t per_step = std::max<int64_t>(1, costs_.max_step_tokens() - decode_rows);
  const int64_t tokens = std::max<int64_t>(0, prefill_ahead) + load.running_prefill_left +
                         std::max<int64_t>(1, request.prompt_tokens);
  const double steps = std::ceil(static_cast<double>(tokens) / static_cast<double>(per_step));
  return safety_ * steps * step;
}

double AdmissionController::PredictTtftSeconds(const QueuedRequest& request, int64_t prefill_ahead,
                                               const AdmissionLoad& load, int64_t now_nanos) const {
  const double waited = static_cast<double>(now_nanos - request.submit_nanos) * 1e-9;
  return std::max(0.0, waited) + PredictSecondsToFirstToken(request, prefill_ahead, load);
}

bool AdmissionController::WillMiss(const QueuedRequest& request, int64_t prefill_ahead,
                                   const AdmissionLoad& load, int64_t now_nanos) const {
  if (mode_ == AdmissionMode::kNone || request.ttft_ms <= 0) return false;
  if (costs_.full_step_seconds() <= 0) return false;  // Nothing measured: nothing to predict.
  return PredictTtftSeconds(request, prefill_ahead, load, now_nanos) > request.ttft_ms * 1e-3;
}

std::vector<size_t> AdmissionController::FindHopeless(const std::vector<QueuedRequest>& queue,
                                                      const AdmissionLoad& load,
                                                      int64_t now_nanos) const {
  std::vector<size_t> hopeless;
  if (mode_ == AdmissionMode::kNone) return hopeless;
  int64_t ahead = 0;  // Prompt tokens of the requests kept in front so far.
  for (size_t i = 0; i < queue.size(); ++i) {
    if (WillMiss(queue[i], ahead, load, now_nanos)) {
      hopeless.push_back(i);  // Moves behind: its tokens no longer delay those after it.
    } else {
      ahead += queue[i].prompt_tokens;
    }
  }
  return hopeless;
}

}  // namespace collm::coordination
