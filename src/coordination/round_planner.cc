#include "collm/coordination/round_planner.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "collm/coordination/load_rates.h"

namespace collm::coordination {
namespace {

absl::Status Bad(const std::string& key, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("coordination.", key, " ", what));
}

bool HasEstimates(const DeviceLoad& d, double forecast) {
  return d.optimizer_step_seconds > 0 && (forecast <= 0 || d.serving_capacity_rps > 0);
}

double Forecast(const DeviceLoad& d, double horizon_s) {
  return ForecastArrivalRate(d.arrival_rate_short, d.arrival_rate_long, d.arrival_trend, horizon_s);
}

}  // namespace

absl::StatusOr<RoundPolicy> ParseRoundPolicy(const std::string& name) {
  if (name == "uniform") return RoundPolicy::kUniform;
  if (name == "drift_plus_penalty") return RoundPolicy::kDriftPlusPenalty;
  return absl::InvalidArgumentError(
      absl::StrCat("must be uniform or drift_plus_penalty, got '", name, "'"));
}

std::string RoundPolicyName(RoundPolicy policy) {
  return policy == RoundPolicy::kUniform ? "uniform" : "drift_plus_penalty";
}

absl::Status ValidateRoundPlannerOptions(const RoundPlannerOptions& o) {
  if (!(std::isfinite(o.v) && o.v >= 0)) return Bad("V", absl::StrCat("must be >= 0, got ", o.v));
  if (!(o.slo_target > 0 && o.slo_target <= 1)) {
    return Bad("slo_target", absl::StrCat("must be in (0, 1], got ", o.slo_target));
  }
  if (!(o.max_utilization > 0 && o.max_utilization <= 1)) {
    return Bad("max_utilization", absl::StrCat("must be in (0, 1], got ", o.max_utilization));
  }
  if (!(o.max_share > 0 && o.max_share <= 1)) {
    return Bad("max_share", absl::StrCat("must be in (0, 1], got ", o.max_share));
  }
  if (o.min_budget_steps < 1) {
    return Bad("min_budget_steps", absl::StrCat("must be >= 1, got ", o.min_budget_steps));
  }
  if (!(std::isfinite(o.deadline_slack) && (o.deadline_slack == 0 || o.deadline_slack >= 1))) {
    return Bad("deadline_slack",
               absl::StrCat("must be 0 (policy deadline) or >= 1, got ", o.deadline_slack));
  }
  return absl::OkStatus();
}

std::vector<std::string> RoundPlan::Participants() const {
  std::vector<std::string> out;
  for (const auto& d : decisions) {
    if (d.chosen) out.push_back(d.device_id);
  }
  std::sort(out.begin(), out.end());
  return out;
}

void RoundPlanner::RestoreQueues(const std::string& device_id, double slo_queue,
                                 double quality_debt) {
  queues_[device_id] = Queues{std::max(0.0, slo_queue), std::max(0.0, quality_debt)};
}

double RoundPlanner::slo_queue(const std::string& device_id) const {
  auto it = queues_.find(device_id);
  return it == queues_.end() ? 0 : it->second.slo;
}

double RoundPlanner::quality_debt(const std::string& device_id) const {
  auto it = queues_.find(device_id);
  return it == queues_.end() ? 0 : it->second.debt;
}

RoundPlan RoundPlanner::PlanUniform(const std::vector<DeviceLoad>& devices,
                                    const RoundLimits& limits, const std::string& why) {
  std::vector<std::string> ids;
  for (const auto& d : devices) ids.push_back(d.device_id);
  std::mt19937_64 rng(limits.seed);
  std::shuffle(ids.begin(), ids.end(), rng);
  if (limits.max_clients > 0 && static_cast<int64_t>(ids.size()) > limits.max_clients) {
    ids.resize(limits.max_clients);
  }
  RoundPlan plan;
  plan.policy = RoundPolicy::kUniform;
  plan.deadline_s = limits.deadline_s;
  for (const auto& d : devices) {
    DeviceDecision dd;
    dd.device_id = d.device_id;
    dd.chosen = std::find(ids.begin(), ids.end(), d.device_id) != ids.end();
    dd.forecast_arrival_rate = Forecast(d, limits.deadline_s);
    if (d.serving_capacity_rps > 0)
      dd.forecast_utilization = dd.forecast_arrival_rate / d.serving_capacity_rps;
    if (dd.chosen) {
      dd.budget_steps = limits.local_steps;
      dd.share_ceiling = limits.training_share;
      dd.expected_gain = 1;
      dd.reason = absl::StrCat(why, "sampled uniformly");
    } else {
      dd.reason = absl::StrCat(why, "not sampled (max_clients ", limits.max_clients, ")");
    }
    Queues& q = queues_[d.device_id];
    q.slo = std::max(0.0, q.slo + options_.slo_target - d.slo_attainment);
    q.debt = (q.debt + 1) * (dd.chosen ? 0.0 : 1.0);
    dd.slo_queue = q.slo;
    dd.quality_debt = q.debt;
    plan.decisions.push_back(std::move(dd));
  }
  return plan;
}

RoundPlan RoundPlanner::Plan(std::vector<DeviceLoad> devices, const RoundLimits& limits) {
  std::sort(devices.begin(), devices.end(),
            [](const DeviceLoad& a, const DeviceLoad& b) { return a.device_id < b.device_id; });
  if (options_.policy == RoundPolicy::kUniform) return PlanUniform(devices, limits, "");
  const double horizon = limits.deadline_s;
  int64_t with_estimates = 0;
  for (const auto& d : devices) with_estimates += HasEstimates(d, Forecast(d, horizon)) ? 1 : 0;
  if (with_estimates == 0) {
    RoundPlan plan =
        PlanUniform(devices, limits, "fallback (no device reported load estimates yet): ");
    plan.fallback = true;
    return plan;
  }

  const double local_steps = static_cast<double>(limits.local_steps);
  const double train_window = std::max(0.0, horizon - limits.delivery_s);
  double best_gain_per_step = 0;
  for (const auto& d : devices)
    best_gain_per_step = std::max(best_gain_per_step, d.loss_reduction_per_step);

  struct Candidate {
    size_t index;  // Into plan.decisions.
    bool feasible;
    bool measured;
  };
  RoundPlan plan;
  plan.policy = RoundPolicy::kDriftPlusPenalty;
  std::vector<Candidate> candidates;
  std::vector<double> need_s(devices.size(), 0);
  for (size_t i = 0; i < devices.size(); ++i) {
    const DeviceLoad& d = devices[i];
    DeviceDecision dd;
    dd.device_id = d.device_id;
    Queues& q = queues_[d.device_id];
    q.slo = std::max(0.0, q.slo + options_.slo_target - d.slo_attainment);
    dd.slo_queue = q.slo;
    dd.quality_debt = q.debt;  // Advanced once the choice is made.
    dd.forecast_arrival_rate = Forecast(d, horizon);
    const bool measured = HasEstimates(d, dd.forecast_arrival_rate);
    bool feasible = true;
    if (!measured) {
      // Exploration: its step cost is only measured by training, so it trains the policy's
      // budget once; uniform's numbers, because there is nothing better to go on.
      dd.budget_steps = limits.local_steps;
      dd.share_ceiling = std::min(limits.training_share, options_.max_share);
      dd.expected_gain = 1;
      dd.score = std::numeric_limits<double>::infinity();
      dd.reason = "no load estimates yet (step cost unmeasured): policy budget to measure it";
    } else {
      const double u =
          dd.forecast_arrival_rate > 0 ? dd.forecast_arrival_rate / d.serving_capacity_rps : 0;
      dd.forecast_utilization = u;
      dd.share_ceiling = std::clamp(1.0 - u / options_.max_utilization, 0.0, options_.max_share);
      const double fits = std::floor(dd.share_ceiling * train_window / d.optimizer_step_seconds);
      dd.budget_steps = static_cast<int64_t>(std::min(local_steps, std::max(0.0, fits)));
      const double gain_ratio =
          best_gain_per_step > 0
              ? (d.loss_reduction_per_step > 0 ? d.loss_reduction_per_step : best_gain_per_step) /
                    best_gain_per_step
              : 1.0;
      const double fraction = static_cast<double>(dd.budget_steps) / local_steps;
      dd.expected_gain = fraction * gain_ratio;
      const double risk =
          dd.share_ceiling * (u / options_.max_utilization + (1.0 - d.slo_attainment));
      // The risk always counts; a device's SLO queue amplifies it, so one that keeps missing
      // its objective is left out once its queue outweighs what its data is worth.
      dd.score = options_.v * dd.expected_gain + q.debt * fraction - (1.0 + q.slo) * risk;
      if (dd.budget_steps < options_.min_budget_steps) {
        feasible = false;
        dd.reason = absl::StrFormat(
            "forecast load %.3g req/s (utilization %.2f) leaves room for %d step(s) before the "
            "deadline, below min_budget_steps %d",
            dd.forecast_arrival_rate, u, dd.budget_steps, options_.min_budget_steps);
      }
      if (dd.share_ceiling > 0) {
        need_s[i] = limits.delivery_s + static_cast<double>(dd.budget_steps) *
                                            d.optimizer_step_seconds / dd.share_ceiling;
      }
    }
    candidates.push_back({plan.decisions.size(), feasible, measured});
    plan.decisions.push_back(std::move(dd));
  }
  // Best first: unmeasured devices (score infinity), then by score; infeasible ones last.
  std::stable_sort(candidates.begin(), candidates.end(),
                   [&](const Candidate& a, const Candidate& b) {
                     if (a.feasible != b.feasible) return a.feasible;
                     const DeviceDecision& da = plan.decisions[a.index];
                     const DeviceDecision& db = plan.decisions[b.index];
                     if (da.score != db.score) return da.score > db.score;
                     return da.forecast_utilization < db.forecast_utilization;
                   });
  const int64_t max_clients =
      limits.max_clients > 0 ? limits.max_clients : static_cast<int64_t>(devices.size());
  int64_t chosen = 0;
  for (const Candidate& c : candidates) {
    DeviceDecision& dd = plan.decisions[c.index];
    if (chosen >= max_clients) {
      dd.reason = c.feasible ? absl::StrFormat("score %.3g ranks below the max_clients %d best",
                                               dd.score, limits.max_clients)
                             : absl::StrCat("left out: ", dd.reason);
      continue;
    }
    if (c.feasible && dd.score > 0) {
      dd.chosen = true;
      if (c.measured) {
        dd.reason = absl::StrFormat(
            "score %.3g > 0: gain %.2f at forecast utilization %.2f outweighs SLO queue %.3g",
            dd.score, dd.expected_gain, dd.forecast_utilization, dd.slo_queue);
      }
      ++chosen;
    } else if (chosen < limits.min_clients) {
      dd.chosen = true;
      if (!c.feasible) {
        dd.reason = absl::StrCat("needed for min_clients ", limits.min_clients,
                                 " although its budget does not fit: ", dd.reason);
        dd.budget_steps = options_.min_budget_steps;
        dd.share_ceiling = std::max(dd.share_ceiling, 0.05);
        dd.expected_gain =
            static_cast<double>(dd.budget_steps) / local_steps;  // Gain ratio unknown here: 1.
      } else {
        dd.reason = absl::StrFormat("needed for min_clients %d although its score %.3g <= 0",
                                    limits.min_clients, dd.score);
      }
      ++chosen;
    } else if (c.feasible) {
      dd.reason = absl::StrFormat(
          "left out: score %.3g <= 0 ((1 + SLO queue %.3g) x risk outweighs gain %.2f)", dd.score,
          dd.slo_queue, dd.expected_gain);
    }
  }
  double deadline = limits.deadline_s;
  if (options_.deadline_slack > 0) {
    double need = 0;
    bool all_measured = true;
    for (const Candidate& c : candidates) {
      if (!plan.decisions[c.index].chosen) continue;
      all_measured = all_measured && c.measured && need_s[c.index] > 0;
      need = std::max(need, need_s[c.index]);
    }
    if (all_measured && need > 0) deadline = std::min(deadline, options_.deadline_slack * need);
  }
  plan.deadline_s = deadline;
  for (auto& dd : plan.decisions) {
    if (!dd.chosen) {
      dd.budget_steps = 0;
      dd.expected_gain = 0;
    }
    Queues& q = queues_[dd.device_id];
    const double served = dd.chosen ? static_cast<double>(dd.budget_steps) / local_steps : 0;
    q.debt = (q.debt + 1) * (1 - std::min(1.0, served));
    dd.quality_debt = q.debt;
    if (!std::isfinite(dd.score)) dd.score = 0;  // Unmeasured: JSON has no infinity.
  }
  return plan;
}

}  // namespace collm::coordination
