#include "collm/coordination/co_execution_policy.h"

#include <cmath>

#include "gtest/gtest.h"

namespace collm::coordination {
namespace {

using Action = CoExecutionDecision::Action;
constexpr int64_t kMs = 1'000'000;

CoExecutionOptions Options(double share) {
  CoExecutionOptions o;
  o.training_share = share;
  o.guard_safety = 1.0;  // Predicted costs as measured: the arithmetic below stays exact.
  o.guard_idle_risk = 0;
  return o;
}

// One request waiting for its first token, with a TTFT objective.
ServingSnapshot Waiting(double ttft_ms, int64_t submit_nanos) {
  ServingSnapshot s;
  s.idle = false;
  RequestTiming r;
  r.slo.ttft_ms = ttft_ms;
  r.submit_nanos = submit_nanos;
  s.requests.push_back(r);
  return s;
}

TrainerSnapshot InFlight(int64_t phase, int64_t tokens) {
  TrainerSnapshot t;
  t.micro_step_active = true;
  t.next_phase = phase;
  t.micro_step_tokens = tokens;
  return t;
}

TEST(CoExecutionPolicyTest, NoShareNoTraining) {
  FakeClock clock;
  CoExecutionPolicy p(Options(0), 4, clock);
  EXPECT_FALSE(p.training_wanted());
  EXPECT_EQ(p.Decide(ServingSnapshot{}, TrainerSnapshot{}).action, Action::kStop);
}

TEST(CoExecutionPolicyTest, IdleTrainsWithoutLimitWhenNoObjective) {
  FakeClock clock;
  CoExecutionPolicy p(Options(0.1), 4, clock);
  const CoExecutionDecision d = p.Decide(ServingSnapshot{}, TrainerSnapshot{});
  EXPECT_EQ(d.action, Action::kBeginMicroStep);
  EXPECT_TRUE(std::isinf(d.max_tokens));
  EXPECT_TRUE(d.continue_after);  // Idle: phases until a request arrives.
}

TEST(CoExecutionPolicyTest, IdleWithUnknownCostsMeasuresWithOneExample) {
  FakeClock clock;
  CoExecutionOptions o = Options(0.1);
  o.tightest_ttft_ms = 50;
  CoExecutionPolicy p(o, 4, clock);
  EXPECT_EQ(p.Decide(ServingSnapshot{}, TrainerSnapshot{}).max_tokens, -1);
}

TEST(CoExecutionPolicyTest, SlackSizesTheMicroStepByTheCostliestPhase) {
  FakeClock clock(1000 * kMs);
  CoExecutionPolicy p(Options(1.0), 2, clock);
  p.RecordInferenceStep(0.010);
  p.RecordPhase(0, 0.008, 8);  // 1 ms per token.
  p.RecordPhase(1, 0.016, 8);  // 2 ms per token: the costliest.
  // Submitted 40 ms ago with a 100 ms TTFT: 100 - 40 - 10 (one inference step) = 50 ms of slack.
  const ServingSnapshot s = Waiting(100, 960 * kMs);
  EXPECT_NEAR(p.SloSlack(s, clock.NowNanos()), 0.050, 1e-12);
  const CoExecutionDecision d = p.Decide(s, TrainerSnapshot{});
  EXPECT_EQ(d.action, Action::kBeginMicroStep);
  EXPECT_NEAR(d.max_tokens, 25, 1e-9);  // 50 ms / 2 ms per token.
  EXPECT_FALSE(d.continue_after);       // Serving: one phase between inference steps.
  EXPECT_FALSE(d.has_fallback);
}

TEST(CoExecutionPolicyTest, TooLittleSlackBlocksThePhaseAndTimeShrinksIt) {
  FakeClock clock(1000 * kMs);
  CoExecutionPolicy p(Options(1.0), 2, clock);
  p.mutable_costs().SetEstimates(0.010, 0.001);  // 8-token phase: 8 ms.
  const ServingSnapshot s = Waiting(100, 1000 * kMs);
  EXPECT_EQ(p.Decide(s, InFlight(1, 8)).action, Action::kRunPhase);  // 90 ms of slack.
  clock.AdvanceNanos(85 * kMs);                                      // 5 ms left.
  EXPECT_EQ(p.Decide(s, InFlight(1, 8)).action, Action::kBlocked);
  // Without the guard the same moment trains, and whole micro-steps at a time.
  CoExecutionOptions o = Options(1.0);
  o.slo_guard = false;
  CoExecutionPolicy unguarded(o, 2, clock);
  const CoExecutionDecision d = unguarded.Decide(s, InFlight(1, 8));
  EXPECT_EQ(d.action, Action::kRunPhase);
  EXPECT_TRUE(d.continue_after);
}

TEST(CoExecutionPolicyTest, TpotObjectiveCountsTokensAlreadyDue) {
  FakeClock clock(1000 * kMs);
  CoExecutionPolicy p(Options(1.0), 1, clock);
  p.RecordInferenceStep(0.005);
  ServingSnapshot s;
  s.idle = false;
  RequestTiming r;
  r.slo.tpot_ms = 20;
  r.submit_nanos = 800 * kMs;
  r.first_token_nanos = 900 * kMs;
  r.generated = 6;  // Budget 6 x 20 ms = 120 ms since the first token; 100 ms used, 5 ms step.
  s.requests.push_back(r);
  EXPECT_NEAR(p.SloSlack(s, clock.NowNanos()), 0.015, 1e-12);
}

TEST(CoExecutionPolicyTest, ServingStopsAtTheShareButIdleAlwaysTrains) {
  FakeClock clock;
  CoExecutionPolicy p(Options(0.25), 1, clock);
  p.RecordIteration(/*infer_seconds=*/1.0, /*train_seconds=*/1.0);
  EXPECT_NEAR(p.train_time_share(), 0.5, 1e-12);
  ServingSnapshot busy;
  busy.idle = false;  // No objectives: only the share limits.
  EXPECT_EQ(p.Decide(busy, TrainerSnapshot{}).action, Action::kStop);
  EXPECT_EQ(p.Decide(ServingSnapshot{}, TrainerSnapshot{}).action, Action::kBeginMicroStep);
  for (int i = 0; i < 30; ++i) p.RecordIteration(1.0, 0.0);  // Training share decays.
  EXPECT_LT(p.train_time_share(), 0.25);
  EXPECT_EQ(p.Decide(busy, TrainerSnapshot{}).action, Action::kBeginMicroStep);
}

TEST(CoExecutionPolicyTest, IdleRiskAllowsAPhaseLongerThanAnArrivalCouldWait) {
  FakeClock clock;
  CoExecutionOptions o = Options(0.1);
  o.tightest_ttft_ms = 20;  // Idle budget: 20 ms - 10 ms inference = 10 ms.
  o.guard_idle_risk = 0.05;
  CoExecutionPolicy p(o, 1, clock);
  p.mutable_costs().SetEstimates(0.010, 0.005);  // 8-token phase: 40 ms > 10 ms.
  ServingSnapshot rare;
  rare.arrival_rate = 0.1;  // 0.1/s x 40 ms = 0.4% of arrivals delayed.
  EXPECT_EQ(p.Decide(rare, InFlight(0, 8)).action, Action::kRunPhase);
  ServingSnapshot frequent;
  frequent.arrival_rate = 10;  // 40% delayed.
  EXPECT_EQ(p.Decide(frequent, InFlight(0, 8)).action, Action::kBlocked);
  // Starting a micro-step: 2 tokens fit the budget; the fallback allows
  // 0.05 / (0.1/s x 5 ms) = 100 tokens.
  const CoExecutionDecision d = p.Decide(rare, TrainerSnapshot{});
  EXPECT_EQ(d.action, Action::kBeginMicroStep);
  EXPECT_NEAR(d.max_tokens, 2, 1e-9);
  ASSERT_TRUE(d.has_fallback);
  EXPECT_NEAR(d.fallback_max_tokens, 100, 1e-6);
}

TEST(CoExecutionPolicyTest, EvaluationSlicesFitTheSlack) {
  FakeClock clock(1000 * kMs);
  CoExecutionPolicy p(Options(1.0), 1, clock);
  TrainerSnapshot evaluating;
  evaluating.evaluating = true;
  const ServingSnapshot s = Waiting(100, 1000 * kMs);  // 100 ms of slack (no inference cost yet).
  // Cost unknown: never measured while serving.
  EXPECT_EQ(p.Decide(s, evaluating).action, Action::kBlocked);
  EXPECT_EQ(p.Decide(ServingSnapshot{}, evaluating).eval_examples,
            CoExecutionPolicy::kMaxEvalSliceExamples);  // Idle, no objective: a whole slice.
  p.RecordEvaluation(0.090, 3);                         // 30 ms per example.
  const CoExecutionDecision d = p.Decide(s, evaluating);
  EXPECT_EQ(d.action, Action::kEvaluate);
  EXPECT_EQ(d.eval_examples, 3);
}

TEST(CoExecutionPolicyTest, OptionsOutOfRangeNameTheField) {
  CoExecutionOptions o;
  o.training_share = 1.5;
  EXPECT_NE(ValidateCoExecutionOptions(o).message().find("engine.training_share"),
            std::string::npos);
  o = CoExecutionOptions{};
  o.guard_safety = 0.5;
  EXPECT_NE(ValidateCoExecutionOptions(o).message().find("engine.guard_safety"), std::string::npos);
  o = CoExecutionOptions{};
  o.guard_idle_risk = std::nan("");
  EXPECT_NE(ValidateCoExecutionOptions(o).message().find("engine.guard_idle_risk"),
            std::string::npos);
  EXPECT_TRUE(ValidateCoExecutionOptions(CoExecutionOptions{}).ok());
}

}  // namespace
}  // namespace collm::coordination

namespace collm::coordination {
namespace {

// max_phase_ms bounds every phase's predicted cost, by construction, from the learned costs.
CoExecutionOptions Bounded(double max_phase_ms) {
  CoExecutionOptions o = Options(1.0);
  o.max_phase_ms = max_phase_ms;
  return o;
}

TrainerSnapshot AtHead(int64_t phase, int64_t tokens, int64_t rows_left) {
  TrainerSnapshot t = InFlight(phase, tokens);
  t.head_rows_left = rows_left;
  return t;
}

TEST(CoExecutionPolicyTest, PhaseBoundSizesTheMicroStepFromTheCostliestPerTokenPhase) {
  FakeClock clock;
  CoExecutionPolicy p(Bounded(5), 3, clock);
  p.RecordPhase(0, 0.001, 10);  // 0.1 ms per token.
  p.RecordPhase(2, 0.004, 20);  // 0.2 ms per token: the costliest.
  p.RecordHeadRows(0.010, 10);  // 1 ms per target row: bounded by its chunks, not by tokens.
  const CoExecutionDecision idle = p.Decide(ServingSnapshot{}, TrainerSnapshot{});
  EXPECT_EQ(idle.action, Action::kBeginMicroStep);
  EXPECT_NEAR(idle.max_tokens, 25, 1e-9);  // 5 ms / 0.2 ms: every phase predicted <= 5 ms.
  // Busy with slack larger than the bound: the bound still holds.
  const CoExecutionDecision busy = p.Decide(Waiting(1000, clock.NowNanos()), TrainerSnapshot{});
  EXPECT_EQ(busy.action, Action::kBeginMicroStep);
  EXPECT_NEAR(busy.max_tokens, 25, 1e-9);
  // Busy with less slack than the bound: the slack decides (10 ms TTFT - 0 step cost ... 2 ms).
  clock.AdvanceNanos(8 * kMs);
  const CoExecutionDecision tight = p.Decide(Waiting(10, 0), TrainerSnapshot{});
  EXPECT_NEAR(tight.max_tokens, 10, 1e-9);  // 2 ms / 0.2 ms.
}

TEST(CoExecutionPolicyTest, PhaseBoundHoldsWithoutTheGuardAndCapsTheIdleRiskFallback) {
  FakeClock clock;
  CoExecutionOptions o = Bounded(5);
  o.slo_guard = false;
  CoExecutionPolicy unguarded(o, 2, clock);
  unguarded.RecordPhase(1, 0.001, 1);  // 1 ms per token.
  EXPECT_NEAR(unguarded.Decide(ServingSnapshot{}, TrainerSnapshot{}).max_tokens, 5, 1e-9);
  EXPECT_NEAR(unguarded.Decide(Waiting(1, 0), TrainerSnapshot{}).max_tokens, 5, 1e-9);

  CoExecutionOptions risky = Bounded(5);
  risky.guard_idle_risk = 0.5;
  risky.tightest_ttft_ms = 1;  // An arrival could wait 1 ms: the fallback would allow more.
  CoExecutionPolicy p(risky, 2, clock);
  p.RecordPhase(1, 0.001, 1);
  ServingSnapshot idle;
  idle.arrival_rate = 0.001;  // Rare arrivals: risk alone would allow 500 000 tokens.
  const CoExecutionDecision d = p.Decide(idle, TrainerSnapshot{});
  ASSERT_TRUE(d.has_fallback);
  EXPECT_NEAR(d.fallback_max_tokens, 5, 1e-9);
}

TEST(CoExecutionPolicyTest, PhaseBoundWithUnknownCostsMeasuresWithOneExample) {
  FakeClock clock;
  CoExecutionPolicy p(Bounded(5), 3, clock);
  EXPECT_EQ(p.Decide(ServingSnapshot{}, TrainerSnapshot{}).max_tokens, -1);
}

TEST(CoExecutionPolicyTest, HeadPhaseRunsInRowChunksThatFitTheBound) {
  FakeClock clock;
  CoExecutionPolicy p(Bounded(5.5), 3, clock);
  p.RecordPhase(0, 0.001, 10);
  // Unknown head cost: a small probe.
  CoExecutionDecision d = p.Decide(ServingSnapshot{}, AtHead(1, 10, 40));
  EXPECT_EQ(d.action, Action::kRunPhase);
  EXPECT_GT(d.max_head_rows, 0);
  EXPECT_LE(d.max_head_rows, 8);
  p.RecordHeadRows(0.004, 4);  // 1 ms per row.
  d = p.Decide(ServingSnapshot{}, AtHead(1, 10, 40));
  EXPECT_EQ(d.action, Action::kRunPhase);
  EXPECT_EQ(d.max_head_rows, 5);  // 5 rows x 1 ms <= 5.5 ms.
  d = p.Decide(ServingSnapshot{}, AtHead(1, 10, 3));
  EXPECT_EQ(d.max_head_rows, 3);  // Fewer left than fit.
  // One row costlier than the bound: never run.
  p.mutable_costs().Reset(3);
  p.RecordHeadRows(0.008, 1);
  EXPECT_EQ(p.Decide(ServingSnapshot{}, AtHead(1, 10, 3)).action, Action::kBlocked);
}

TEST(CoExecutionPolicyTest, HeadPhaseWithoutBoundOrObjectiveRunsWhole) {
  FakeClock clock;
  CoExecutionPolicy p(Options(1.0), 3, clock);
  p.RecordHeadRows(0.004, 4);
  const CoExecutionDecision d = p.Decide(ServingSnapshot{}, AtHead(1, 10, 40));
  EXPECT_EQ(d.action, Action::kRunPhase);
  EXPECT_EQ(d.max_head_rows, 0);
}

TEST(CoExecutionPolicyTest, NegativePhaseBoundIsRejected) {
  CoExecutionOptions o = Options(0.5);
  o.max_phase_ms = -1;
  const absl::Status s = ValidateCoExecutionOptions(o);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message()).find("engine.max_phase_ms"), std::string::npos);
}

}  // namespace
}  // namespace collm::coordination
