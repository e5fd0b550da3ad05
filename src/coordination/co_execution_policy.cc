#include "collm/coordination/co_execution_policy.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"

namespace collm::coordination {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

}  // namespace

absl::Status ValidateCoExecutionOptions(const CoExecutionOptions& o) {
  // Written as !(ok) so NaN fails every check.
  if (!(o.training_share >= 0 && o.training_share <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("engine.training_share must be in [0, 1], got ", o.training_share));
  }
  if (!(o.guard_safety >= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("engine.guard_safety must be >= 1, got ", o.guard_safety));
  }
  if (!(o.guard_idle_risk >= 0 && o.guard_idle_risk <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("engine.guard_idle_risk must be in [0, 1], got ", o.guard_idle_risk));
  }
  return absl::OkStatus();
}

CoExecutionPolicy::CoExecutionPolicy(const CoExecutionOptions& options, int64_t num_phases,
                                     Clock& clock)
    : options_(options), clock_(&clock), costs_(num_phases) {}

double CoExecutionPolicy::SloSlack(const ServingSnapshot& serving, int64_t now) const {
  const double infer = costs_.infer_step_seconds();
  double slack = kInf;
  for (const RequestTiming& r : serving.requests) {
    if (r.first_token_nanos == 0) {
      if (r.slo.ttft_ms > 0) {
        slack = std::min(
            slack, r.slo.ttft_ms * 1e-3 - static_cast<double>(now - r.submit_nanos) * 1e-9 - infer);
      }
    } else if (r.slo.tpot_ms > 0) {
      // The next token arrives after the training delay plus one inference step.
      slack = std::min(slack, r.slo.tpot_ms * 1e-3 * static_cast<double>(r.generated) -
                                  static_cast<double>(now - r.first_token_nanos) * 1e-9 - infer);
    }
  }
  return slack;
}

double CoExecutionPolicy::IdleBudget() const {
  // A request arriving now waits for the phase in flight, then for its first (prefill) step.
  const double ttft_ms = options_.tightest_ttft_ms > 0 ? options_.tightest_ttft_ms : kInf;
  return ttft_ms * 1e-3 - costs_.infer_step_seconds();
}

void CoExecutionPolicy::RecordIteration(double infer_seconds, double train_seconds) {
  busy_infer_ = 0.9 * busy_infer_ + 0.1 * infer_seconds;
  busy_train_ = 0.9 * busy_train_ + 0.1 * train_seconds;
}

double CoExecutionPolicy::train_time_share() const {
  const double total = busy_infer_ + busy_train_;
  return total > 0 ? busy_train_ / total : 0;
}

CoExecutionDecision CoExecutionPolicy::Decide(const ServingSnapshot& serving,
                                              const TrainerSnapshot& trainer) const {
  using Action = CoExecutionDecision::Action;
  CoExecutionDecision d;
  if (!training_wanted()) return d;
  const bool idle = serving.idle;
  // Idle time always trains; while serving, only below the target share.
  if (!idle) {
    const double total = busy_infer_ + busy_train_;
    if (total > 0 && busy_train_ / total >= options_.training_share) return d;
  }
  d.continue_after = idle || !options_.slo_guard;
  const double safety = options_.guard_safety;
  // The time the next piece of work may take: when serving, the slack of the tightest request;
  // when idle, what a request arriving right now could absorb (it waits for at most one phase).
  double budget = kInf;
  if (options_.slo_guard) budget = idle ? IdleBudget() : SloSlack(serving, clock_->NowNanos());
  // Whether work of `seconds` may run now: it fits the budget, or (idle) even one example's work
  // is longer than an arrival could wait but arrivals are rare enough that the expected share of
  // requests it delays stays within guard_idle_risk.
  auto allowed = [&](double seconds) {
    if (safety * seconds <= budget) return true;
    if (!idle || options_.guard_idle_risk <= 0) return false;
    return serving.arrival_rate * safety * seconds <= options_.guard_idle_risk;
  };

  if (trainer.evaluating) {
    // A publish's held-out evaluation: forward-only work, scheduled like a training phase.
    const double per_example = costs_.eval_seconds_per_example();
    int64_t n = kMaxEvalSliceExamples;
    if (std::isfinite(budget)) {
      if (per_example <= 0) {
        n = idle ? 1 : 0;  // Cost unknown: measure it with one example, and only when idle.
      } else {
        n = std::min<int64_t>(n, static_cast<int64_t>(std::floor(budget / (safety * per_example))));
        if (n < 1 && allowed(per_example)) n = 1;
      }
    }
    if (n < 1) {
      d.action = Action::kBlocked;
      return d;
    }
    d.action = Action::kEvaluate;
    d.eval_examples = n;
    return d;
  }

  const double worst = costs_.WorstPhaseSecondsPerToken();
  if (!trainer.micro_step_active) {
    // Size the micro-step (in padded tokens: phase costs grow with them) so that its costliest
    // phase fits the budget.
    d.action = Action::kBeginMicroStep;
    d.max_tokens = kInf;
    if (std::isfinite(budget)) {
      if (worst <= 0) {
        d.max_tokens = idle ? -1 : 0;  // Cost unknown: measure it with one example, only idle.
      } else {
        d.max_tokens = budget / (safety * worst);
      }
    }
    if (idle && options_.guard_idle_risk > 0 && worst > 0) {
      // Not even one example may fit what an arrival could wait: then as many tokens as keep the
      // expected share of delayed arrivals within the risk.
      const double per_token_risk = serving.arrival_rate * safety * worst;
      d.has_fallback = true;
      d.fallback_max_tokens =
          per_token_risk <= 0 ? kInf : options_.guard_idle_risk / per_token_risk;
    }
    return d;
  }

  const bool go =
      !std::isfinite(budget) || allowed(costs_.PhaseSecondsPerToken(trainer.next_phase) *
                                        static_cast<double>(trainer.micro_step_tokens));
  d.action = go ? Action::kRunPhase : Action::kBlocked;
  return d;
}

}  // namespace collm::coordination
