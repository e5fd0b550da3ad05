#include "collm/coordination/phase_costs.h"

#include <algorithm>

namespace collm::coordination {
namespace {

void Smooth(double& estimate, double sample) {
  estimate = estimate == 0 ? sample : 0.8 * estimate + 0.2 * sample;
}

}  // namespace

void PhaseCosts::Reset(int64_t num_phases) {
  phase_.assign(static_cast<size_t>(std::max<int64_t>(0, num_phases)), 0.0);
  head_ = 0;
}

void PhaseCosts::RecordInferenceStep(double seconds) { Smooth(infer_, seconds); }

void PhaseCosts::RecordPhase(int64_t phase, double seconds, int64_t tokens) {
  Smooth(phase_[static_cast<size_t>(phase)],
         seconds / static_cast<double>(std::max<int64_t>(1, tokens)));
}

void PhaseCosts::RecordHeadRows(double seconds, int64_t rows) {
  Smooth(head_, seconds / static_cast<double>(rows));
}

void PhaseCosts::RecordMicroStep(double seconds) { Smooth(micro_step_, seconds); }

void PhaseCosts::RecordEvaluation(double seconds, int64_t examples) {
  Smooth(eval_, seconds / static_cast<double>(examples));
}

void PhaseCosts::SetEstimates(double infer_step_seconds, double phase_seconds_per_token) {
  infer_ = infer_step_seconds;
  std::fill(phase_.begin(), phase_.end(), phase_seconds_per_token);
  head_ = phase_seconds_per_token;  // Per target row, as the head is costed.
}

double PhaseCosts::PhaseSecondsPerToken(int64_t phase) const {
  const double c = phase_[static_cast<size_t>(phase)];
  return c > 0 ? c : WorstPhaseSecondsPerToken();
}

double PhaseCosts::WorstPhaseSecondsPerToken() const {
  if (phase_.empty()) return 0;
  return *std::max_element(phase_.begin(), phase_.end());
}

}  // namespace collm::coordination
