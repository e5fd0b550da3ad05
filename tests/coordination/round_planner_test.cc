#include "collm/coordination/round_planner.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

namespace collm::coordination {
namespace {

// A device that trained before (step cost known) and serves up to 10 req/s.
DeviceLoad Measured(const std::string& id, double rate, double attainment = 1.0) {
  DeviceLoad d;
  d.device_id = id;
  d.arrival_rate_short = rate;
  d.arrival_rate_long = rate;
  d.slo_attainment = attainment;
  d.serving_capacity_rps = 10;
  d.optimizer_step_seconds = 1;
  d.loss_reduction_per_step = 0.01;
  return d;
}

RoundLimits Limits(int64_t min_clients, int64_t max_clients = 0) {
  RoundLimits l;
  l.min_clients = min_clients;
  l.max_clients = max_clients;
  l.local_steps = 20;
  l.deadline_s = 60;
  l.training_share = 0.5;
  l.delivery_s = 5;
  l.seed = 7;
  return l;
}

const DeviceDecision& Of(const RoundPlan& plan, const std::string& id) {
  auto it = std::find_if(plan.decisions.begin(), plan.decisions.end(),
                         [&](const DeviceDecision& d) { return d.device_id == id; });
  EXPECT_NE(it, plan.decisions.end()) << id;
  return *it;
}

TEST(RoundPlannerTest, ParsesPolicyNamesAndNamesTheChoicesOtherwise) {
  EXPECT_EQ(*ParseRoundPolicy("uniform"), RoundPolicy::kUniform);
  EXPECT_EQ(*ParseRoundPolicy("drift_plus_penalty"), RoundPolicy::kDriftPlusPenalty);
  auto bad = ParseRoundPolicy("greedy");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("uniform or drift_plus_penalty"), std::string::npos);
}

TEST(RoundPlannerTest, ValidationNamesTheKey) {
  RoundPlannerOptions o;
  o.v = -1;
  EXPECT_NE(ValidateRoundPlannerOptions(o).message().find("coordination.V"), std::string::npos);
  o = {};
  o.max_utilization = 0;
  EXPECT_NE(ValidateRoundPlannerOptions(o).message().find("coordination.max_utilization"),
            std::string::npos);
  o = {};
  o.deadline_slack = 0.5;
  EXPECT_NE(ValidateRoundPlannerOptions(o).message().find("coordination.deadline_slack"),
            std::string::npos);
  EXPECT_TRUE(ValidateRoundPlannerOptions(RoundPlannerOptions{}).ok());
}

TEST(RoundPlannerTest, IdleDevicesAreChosenAndBusyOnesLeftOut) {
  RoundPlanner planner(RoundPlannerOptions{});
  // b is at 90% of its capacity: above max_utilization 0.8, no training room.
  RoundPlan plan =
      planner.Plan({Measured("a", 0), Measured("b", 9), Measured("c", 0.5)}, Limits(1));
  EXPECT_EQ(plan.policy, RoundPolicy::kDriftPlusPenalty);
  EXPECT_FALSE(plan.fallback);
  EXPECT_EQ(plan.Participants(), (std::vector<std::string>{"a", "c"}));
  EXPECT_EQ(Of(plan, "a").budget_steps, 20);
  EXPECT_DOUBLE_EQ(Of(plan, "a").share_ceiling, 1.0);
  EXPECT_FALSE(Of(plan, "b").chosen);
  EXPECT_EQ(Of(plan, "b").budget_steps, 0);
  EXPECT_NEAR(Of(plan, "b").forecast_utilization, 0.9, 1e-9);
  EXPECT_NE(Of(plan, "b").reason.find("min_budget_steps"), std::string::npos)
      << Of(plan, "b").reason;
  for (const auto& d : plan.decisions) EXPECT_FALSE(d.reason.empty()) << d.device_id;
}

TEST(RoundPlannerTest, BudgetsShrinkWithForecastLoad) {
  RoundPlannerOptions o;
  o.v = 10;  // Gain dominates: every device is chosen, with the budget its load leaves.
  RoundPlanner planner(o);
  RoundLimits limits = Limits(1);
  limits.local_steps = 100;  // Large enough that the deadline, not the policy, bounds budgets.
  RoundPlan plan = planner.Plan(
      {Measured("idle", 0), Measured("light", 2), Measured("medium", 4), Measured("heavy", 6)},
      limits);
  const int64_t idle = Of(plan, "idle").budget_steps;
  const int64_t light = Of(plan, "light").budget_steps;
  const int64_t medium = Of(plan, "medium").budget_steps;
  const int64_t heavy = Of(plan, "heavy").budget_steps;
  EXPECT_EQ(idle, 55);  // (60 s deadline - 5 s delivery) at share 1 and 1 s per step.
  EXPECT_GT(idle, light);
  EXPECT_GT(light, medium);
  EXPECT_GT(medium, heavy);
  EXPECT_GT(heavy, 0);
  EXPECT_GT(Of(plan, "light").share_ceiling, Of(plan, "heavy").share_ceiling);
}

TEST(RoundPlannerTest, ARisingTrendIsForecastAndShrinksTheBudget) {
  RoundPlanner planner(RoundPlannerOptions{});
  DeviceLoad steady = Measured("steady", 2);
  DeviceLoad rising = Measured("rising", 2);
  rising.arrival_trend = 0.1;  // +0.1 req/s per second: 5 req/s by mid-round.
  RoundLimits limits = Limits(1);
  limits.local_steps = 100;
  RoundPlan plan = planner.Plan({steady, rising}, limits);
  EXPECT_NEAR(Of(plan, "rising").forecast_arrival_rate, 5.0, 1e-9);
  EXPECT_LT(Of(plan, "rising").budget_steps, Of(plan, "steady").budget_steps);
}

TEST(RoundPlannerTest, ADeviceWithGrowingSloDeficitIsLeftOut) {
  RoundPlanner planner(RoundPlannerOptions{});
  bool left_out = false;
  double last_queue = 0;
  for (int round = 0; round < 20 && !left_out; ++round) {
    RoundPlan plan = planner.Plan(
        {Measured("good", 1), Measured("missing", 1, /*attainment=*/0.5), Measured("ok", 1)},
        Limits(2));
    const DeviceDecision& bad = Of(plan, "missing");
    EXPECT_GT(bad.slo_queue, last_queue);  // The deficit accumulates round after round.
    last_queue = bad.slo_queue;
    EXPECT_TRUE(Of(plan, "good").chosen);
    EXPECT_TRUE(Of(plan, "ok").chosen);
    if (!bad.chosen) {
      left_out = true;
      EXPECT_NE(bad.reason.find("SLO queue"), std::string::npos) << bad.reason;
      EXPECT_LT(bad.score, 0);
    }
  }
  EXPECT_TRUE(left_out);
  EXPECT_GT(planner.slo_queue("missing"), 0);
  EXPECT_EQ(planner.slo_queue("good"), 0);
}

TEST(RoundPlannerTest, MinClientsIsRespectedEvenWhenNoDeviceHasRoom) {
  RoundPlanner planner(RoundPlannerOptions{});
  RoundPlan plan =
      planner.Plan({Measured("a", 9.5), Measured("b", 9), Measured("c", 9.9)}, Limits(2));
  ASSERT_EQ(plan.Participants().size(), 2u);
  // The two with the most room (b, then a) are the ones forced in, at the minimum budget.
  EXPECT_EQ(plan.Participants(), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(Of(plan, "b").budget_steps, 1);
  EXPECT_NE(Of(plan, "b").reason.find("min_clients"), std::string::npos);
  EXPECT_FALSE(Of(plan, "c").chosen);
}

TEST(RoundPlannerTest, MaxClientsKeepsTheBestScores) {
  RoundPlanner planner(RoundPlannerOptions{});
  RoundPlan plan = planner.Plan(
      {Measured("a", 3), Measured("b", 0), Measured("c", 1), Measured("d", 6)}, Limits(1, 2));
  EXPECT_EQ(plan.Participants(), (std::vector<std::string>{"b", "c"}));
  EXPECT_NE(Of(plan, "a").reason.find("max_clients"), std::string::npos) << Of(plan, "a").reason;
}

TEST(RoundPlannerTest, FallsBackToUniformWithoutEstimates) {
  RoundPlanner planner(RoundPlannerOptions{});
  DeviceLoad a, b, c;
  a.device_id = "a";
  b.device_id = "b";
  c.device_id = "c";
  RoundPlan plan = planner.Plan({a, b, c}, Limits(2));
  EXPECT_EQ(plan.policy, RoundPolicy::kUniform);
  EXPECT_TRUE(plan.fallback);
  EXPECT_EQ(plan.Participants().size(), 3u);  // max_clients 0 = all, as uniform does.
  for (const auto& d : plan.decisions) {
    EXPECT_EQ(d.budget_steps, 20);
    EXPECT_DOUBLE_EQ(d.share_ceiling, 0.5);
    EXPECT_NE(d.reason.find("fallback"), std::string::npos);
  }
}

TEST(RoundPlannerTest, AnUnmeasuredDeviceTrainsThePolicyBudgetToBeMeasured) {
  RoundPlanner planner(RoundPlannerOptions{});
  DeviceLoad fresh;
  fresh.device_id = "fresh";
  RoundPlan plan = planner.Plan({Measured("old", 9), fresh}, Limits(1));
  EXPECT_FALSE(plan.fallback);
  EXPECT_TRUE(Of(plan, "fresh").chosen);
  EXPECT_EQ(Of(plan, "fresh").budget_steps, 20);
  EXPECT_NE(Of(plan, "fresh").reason.find("no load estimates"), std::string::npos);
}

TEST(RoundPlannerTest, UniformMatchesTheSeededShuffleAndMaxClients) {
  RoundPlannerOptions o;
  o.policy = RoundPolicy::kUniform;
  RoundPlanner planner(o);
  RoundPlan first =
      planner.Plan({Measured("a", 0), Measured("b", 9), Measured("c", 0)}, Limits(1, 2));
  RoundPlan again =
      RoundPlanner(o).Plan({Measured("c", 0), Measured("b", 9), Measured("a", 0)}, Limits(1, 2));
  EXPECT_EQ(first.policy, RoundPolicy::kUniform);
  EXPECT_EQ(first.Participants().size(), 2u);
  EXPECT_EQ(first.Participants(), again.Participants());  // Input order does not matter.
  for (const auto& d : first.decisions) {
    if (d.chosen) {
      EXPECT_EQ(d.budget_steps, 20);
    }
  }
}

TEST(RoundPlannerTest, QualityDebtGrowsWhileLeftOutAndClearsWithAFullBudget) {
  RoundPlanner planner(RoundPlannerOptions{});
  planner.Plan({Measured("a", 0), Measured("busy", 9.5)}, Limits(1));
  planner.Plan({Measured("a", 0), Measured("busy", 9.5)}, Limits(1));
  EXPECT_DOUBLE_EQ(planner.quality_debt("busy"), 2.0);
  EXPECT_DOUBLE_EQ(planner.quality_debt("a"), 0.0);
  planner.RestoreQueues("busy", 3.0, 4.0);
  EXPECT_DOUBLE_EQ(planner.slo_queue("busy"), 3.0);
  RoundPlan plan = planner.Plan({Measured("a", 0), Measured("busy", 0)}, Limits(1));
  EXPECT_TRUE(Of(plan, "busy").chosen);
  EXPECT_DOUBLE_EQ(Of(plan, "busy").quality_debt, 0.0);
}

TEST(RoundPlannerTest, DeadlineSlackShortensTheRoundToWhatTheSlowestChosenNeeds) {
  RoundPlannerOptions o;
  o.deadline_slack = 1.5;
  RoundPlanner planner(o);
  RoundPlan plan = planner.Plan({Measured("a", 0), Measured("b", 0)}, Limits(1));
  // 20 steps x 1 s at share 1, plus 5 s delivery = 25 s; x 1.5.
  EXPECT_DOUBLE_EQ(plan.deadline_s, 37.5);
}

}  // namespace
}  // namespace collm::coordination
