// The slow-timescale controller: at each round's opening, the aggregator asks it which online
// devices train, how many optimizer steps each (its budget), under which training-share ceiling,
// and by when (the deadline). Pure policy: plain structs in, a plan out; no I/O, no threads, no
// clock (a round's horizon is its deadline, given in seconds).
//
// Policies:
//   uniform             today's baseline: a seeded shuffle, up to max_clients, everyone gets the
//                       policy's local_steps and training_share.
//   drift_plus_penalty  (default) Lyapunov drift-plus-penalty over two virtual queues per device:
//     SLO queue     Q <- max(0, Q + slo_target - attainment)   (grows while it misses its SLO)
//     quality debt  Z <- (Z + 1) * (1 - budget / local_steps if chosen else 1)
//                   (grows every round its data is not trained on; a full budget clears it)
//   For each device, from its *forecast* load over the round (the larger of the long-window rate
//   and the short-window rate extrapolated along the trend to mid-round):
//     utilization u = forecast / serving capacity
//     ceiling c     = min(max_share, 1 - u / max_utilization), >= 0
//     budget b      = min(local_steps, floor(c * (deadline - delivery) / optimizer step seconds))
//     gain g        = b / local_steps * loss reduction per step / the best one reported
//     risk r        = c * (u / max_utilization + 1 - attainment)
//     score         = V * g + Z * b / local_steps - (1 + Q) * r
//   Devices whose budget is below min_budget_steps are left out; the rest are taken by score
//   while it is positive (up to max_clients), and then by score (best infeasible last, at
//   min_budget_steps) until min_clients are chosen. A device without load estimates (it never
//   trained, so its step cost is unknown) is chosen with the uniform budget to measure it; when
//   no device has estimates, the whole round is planned uniformly (the fallback).
// Every device gets a decision with its numbers and a reason, chosen or not.
#ifndef COLLM_COORDINATION_ROUND_PLANNER_H_
#define COLLM_COORDINATION_ROUND_PLANNER_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace collm::coordination {

enum class RoundPolicy { kUniform, kDriftPlusPenalty };
// "uniform" | "drift_plus_penalty"; InvalidArgument naming the choices otherwise.
absl::StatusOr<RoundPolicy> ParseRoundPolicy(const std::string& name);
std::string RoundPolicyName(RoundPolicy policy);

struct RoundPlannerOptions {
  RoundPolicy policy = RoundPolicy::kDriftPlusPenalty;
  double v = 1.0;                // Trade-off weight V on expected quality gain vs SLO risk; >= 0.
  double slo_target = 0.95;      // Attainment the SLO queue aims at, (0, 1].
  double max_utilization = 0.8;  // Forecast serving utilization that leaves no training room,
                                 // (0, 1].
  double max_share = 1.0;        // Largest training-share ceiling handed out, (0, 1].
  int64_t min_budget_steps = 1;  // Budgets below this leave the device out; >= 1.
  double deadline_slack = 0;     // > 0: the deadline shrinks to this many times what the slowest
                                 // chosen device needs (never beyond the policy's); 0 = policy
                                 // deadline; else >= 1.
};

// InvalidArgument naming the key as configured ("coordination.V must be >= 0, got -1").
absl::Status ValidateRoundPlannerOptions(const RoundPlannerOptions& options);

// What the aggregator knows about one online device (from its last heartbeat). 0 = unknown for
// the estimates.
struct DeviceLoad {
  std::string device_id;
  double arrival_rate_short = 0;       // Requests/s over ~1 s.
  double arrival_rate_long = 0;        // Requests/s over ~30 s.
  double arrival_trend = 0;            // Requests/s per second.
  double slo_attainment = 1;           // [0, 1] over a recent window.
  double serving_capacity_rps = 0;     // Requests/s it sustains serving only; 0 = unknown.
  double optimizer_step_seconds = 0;   // One optimizer step training alone; 0 = unknown.
  double loss_reduction_per_step = 0;  // Last task's quality gain per step; <= 0 = unknown.
  int64_t new_local_samples = 0;
};

// The round's policy limits (federation policy) and context.
struct RoundLimits {
  int64_t min_clients = 1;      // >= 1; REQUIRES: at least this many devices are given.
  int64_t max_clients = 0;      // 0 = no limit.
  int64_t local_steps = 1;      // Largest budget (the policy's); >= 1.
  double deadline_s = 300;      // The policy's deadline; > 0.
  double training_share = 0.5;  // The policy's share (uniform tasks).
  double delivery_s = 0;        // Until a device sees its task (a heartbeat interval).
  uint64_t seed = 0;            // Uniform sampling.
};

struct DeviceDecision {
  std::string device_id;
  bool chosen = false;
  int64_t budget_steps = 0;
  double share_ceiling = 0;
  double forecast_arrival_rate = 0;
  double forecast_utilization = 0;
  double slo_queue = 0;     // After this round's update.
  double quality_debt = 0;  // After this round's update.
  double expected_gain = 0;
  double score = 0;  // 0 for an unmeasured device (chosen first, to be measured).
  std::string reason;
};

struct RoundPlan {
  RoundPolicy policy = RoundPolicy::kUniform;  // What decided (uniform also on fallback).
  bool fallback = false;                       // drift_plus_penalty fell back to uniform.
  double deadline_s = 0;
  std::vector<DeviceDecision> decisions;          // One per device given, in device_id order.
  std::vector<std::string> Participants() const;  // Chosen ids, sorted.
};

// Holds the virtual queues between rounds. Not thread-safe: the round manager calls it under
// its lock.
class RoundPlanner {
 public:
  // REQUIRES: ValidateRoundPlannerOptions(options).ok().
  explicit RoundPlanner(const RoundPlannerOptions& options) : options_(options) {}

  // Plans one round and advances the queues of the devices given. REQUIRES: devices.size() >=
  // limits.min_clients, unique ids.
  RoundPlan Plan(std::vector<DeviceLoad> devices, const RoundLimits& limits);

  // Queues restored from a persisted round (after a restart).
  void RestoreQueues(const std::string& device_id, double slo_queue, double quality_debt);
  double slo_queue(const std::string& device_id) const;
  double quality_debt(const std::string& device_id) const;
  const RoundPlannerOptions& options() const { return options_; }
  void set_options(const RoundPlannerOptions& options) { options_ = options; }

 private:
  struct Queues {
    double slo = 0;
    double debt = 0;
  };
  RoundPlan PlanUniform(const std::vector<DeviceLoad>& devices, const RoundLimits& limits,
                        const std::string& why);

  RoundPlannerOptions options_;
  std::map<std::string, Queues> queues_;
};

}  // namespace collm::coordination

#endif  // COLLM_COORDINATION_ROUND_PLANNER_H_
