#include "collm/coordination/co_execution_policy.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"

namespace collm::coordination {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
// Target rows of a head phase whose per-row cost is not yet measured.
constexpr int64_t kHeadProbeRows = 4;

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
  if (!(o.max_phase_ms >= 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("engine.max_phase_ms must be >= 0, got ", o.max_phase_ms));
  }
  return absl::OkStatus();
}

CoExecutionPolicy::CoExecutionPolicy(const CoExecutionOptions& options, int64_t num_phases,
                                     Clock& clock)
    : options_(options), clock_(&clock), costs_(num_phases) {}

template <typename Visit>
void CoExecutionPolicy::ForEachSlack(const ServingSnapshot& serving, int64_t now,
                                     Visit&& visit) const {
  const double infer = costs_.infer_step_seconds();
  for (const RequestTiming& r : serving.requests) {
    if (r.first_token_nanos == 0) {
      if (r.slo.ttft_ms > 0) {
        visit(r.slo.ttft_ms * 1e-3 - static_cast<double>(now - r.submit_nanos) * 1e-9 - infer,
              r.slo.ttft_ms * 1e-3);
      }
    } else if (r.slo.tpot_ms > 0) {
      // The next token arrives after the training delay plus one inference step.
      visit(r.slo.tpot_ms * 1e-3 * static_cast<double>(r.generated) -
                static_cast<double>(now - r.first_token_nanos) * 1e-9 - infer,
            r.slo.tpot_ms * 1e-3);
    }
  }
}

double CoExecutionPolicy::SloSlack(const ServingSnapshot& serving, int64_t now) const {
  double slack = kInf;
  ForEachSlack(serving, now, [&](double s, double /*objective*/) { slack = std::min(slack, s); });
  return slack;
}

double CoExecutionPolicy::SloHeadroom(const ServingSnapshot& serving, int64_t now) const {
  double headroom = 1;
  ForEachSlack(serving, now,
               [&](double s, double objective) { headroom = std::min(headroom, s / objective); });
  return headroom;
}

double CoExecutionPolicy::IdleBudget() const {
  // A request arriving now waits for the phase in flight, then for its first (prefill) step.
  const double ttft_ms = options_.tightest_ttft_ms > 0 ? options_.tightest_ttft_ms : kInf;
  return ttft_ms * 1e-3 - costs_.infer_step_seconds();
}

double CoExecutionPolicy::PhaseBound() const {
  return options_.max_phase_ms > 0 ? options_.max_phase_ms * 1e-3 : kInf;
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

  // max_phase_ms bounds the predicted cost itself (no safety factor), whatever the guard says;
  // it is applied on top of the budget and no idle-risk fallback may exceed it.
  const double bound = PhaseBound();
  const double worst = costs_.WorstPhaseSecondsPerToken();
  if (!trainer.micro_step_active) {
    // Size the micro-step (in padded tokens: phase costs grow with them) so that its costliest
    // per-token phase fits the budget. The head phase is bounded apart, by its row chunks.
    d.action = Action::kBeginMicroStep;
    d.max_tokens = kInf;
    const double bound_tokens = worst > 0 ? bound / worst : kInf;
    if (std::isfinite(budget) || std::isfinite(bound)) {
      if (worst <= 0) {
        // Cost unknown: measure it with one example, only idle (or without the guard).
        d.max_tokens = idle || !std::isfinite(budget) ? -1 : 0;
      } else {
        d.max_tokens = std::min(budget / (safety * worst), bound_tokens);
      }
    }
    if (idle && options_.guard_idle_risk > 0 && worst > 0) {
      // Not even one example may fit what an arrival could wait: then as many tokens as keep the
      // expected share of delayed arrivals within the risk.
      const double per_token_risk = serving.arrival_rate * safety * worst;
      d.has_fallback = true;
      d.fallback_max_tokens = std::min(
          per_token_risk <= 0 ? kInf : options_.guard_idle_risk / per_token_risk, bound_tokens);
    }
    return d;
  }

  if (trainer.head_rows_left > 0) {
    // The head phase in row chunks: as many target rows as fit both the budget and the bound.
    d.action = Action::kRunPhase;
    const double limit = std::min(budget / safety, bound);
    if (!std::isfinite(limit)) return d;  // max_head_rows = 0: all rows at once.
    const double per_row = costs_.head_seconds_per_row();
    if (per_row <= 0) {
      // Unknown cost (the first micro-step, begun idle): measure it on a few rows; one row is
      // ~1 ms of full-vocabulary GEMMs at stories15M's size.
      d.max_head_rows = kHeadProbeRows;
      return d;
    }
    const int64_t rows = static_cast<int64_t>(
        std::min<double>(static_cast<double>(trainer.head_rows_left), std::floor(limit / per_row)));
    if (rows >= 1) {
      d.max_head_rows = rows;
    } else if (per_row <= bound && allowed(per_row)) {
      d.max_head_rows = 1;
    } else {
      d.action = Action::kBlocked;
    }
    return d;
  }

  const double phase_seconds = costs_.PhaseSecondsPerToken(trainer.next_phase) *
                               static_cast<double>(trainer.micro_step_tokens);
  // A micro-step sized before its costs were known may hold a phase over the bound; the bound
  // still holds for every micro-step begun after the first measurement.
  const bool go = !std::isfinite(budget) || allowed(phase_seconds);
  d.action = go ? Action::kRunPhase : Action::kBlocked;
  return d;
}

}  // namespace collm::coordination
