#include "collm/coordination/admission.h"

#include "gtest/gtest.h"

namespace collm::coordination {
namespace {

constexpr int64_t kMs = 1'000'000;

QueuedRequest Request(double ttft_ms, int64_t submit_nanos, int64_t prompt) {
  QueuedRequest r;
  r.ttft_ms = ttft_ms;
  r.submit_nanos = submit_nanos;
  r.prompt_tokens = prompt;
  return r;
}

AdmissionLoad Load(int64_t running, int64_t prefill_left = 0) {
  AdmissionLoad l;
  l.running = running;
  l.running_prefill_left = prefill_left;
  l.max_running = 32;
  return l;
}

TEST(AdmissionTest, ParsesModesAndNamesTheKey) {
  EXPECT_EQ(ParseAdmissionMode("k", "none").value(), AdmissionMode::kNone);
  EXPECT_EQ(ParseAdmissionMode("k", "reject").value(), AdmissionMode::kReject);
  EXPECT_EQ(ParseAdmissionMode("k", "deprioritize").value(), AdmissionMode::kDeprioritize);
  const auto bad = ParseAdmissionMode("engine.admission", "drop");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().message(),
            "engine.admission must be one of none, reject, deprioritize, got 'drop'");
  EXPECT_STREQ(AdmissionModeName(AdmissionMode::kDeprioritize), "deprioritize");
}

TEST(AdmissionTest, StepCostsAreLearnedApartForFullAndDecodeSteps) {
  StepCostModel m(100);
  EXPECT_EQ(m.full_step_seconds(), 0);
  m.RecordStep(0.002, 4);                          // Decode-only.
  EXPECT_DOUBLE_EQ(m.full_step_seconds(), 0.002);  // Falls back until a full step is seen.
  m.RecordStep(0.010, 100);
  EXPECT_DOUBLE_EQ(m.full_step_seconds(), 0.010);
  m.RecordStep(0.020, 60);  // Half the budget or more counts as full: 0.8 * 10 + 0.2 * 20 ms.
  EXPECT_NEAR(m.full_step_seconds(), 0.012, 1e-12);
  EXPECT_DOUBLE_EQ(m.decode_step_seconds(), 0.002);
  m.RecordStep(0, 10);  // Nonsense samples are ignored.
  m.RecordStep(0.5, 0);
  EXPECT_NEAR(m.full_step_seconds(), 0.012, 1e-12);
}

TEST(AdmissionTest, ServingCapacityComesFromTheMeasuredStepCostsNotAFullBatchEveryStep) {
  StepCostModel m(256);
  EXPECT_EQ(m.ServingCapacityRps(64, 32), 0) << "nothing measured: unknown";
  m.RecordStep(0.050, 256);  // A full prefill step: 50 ms for 256 tokens.
  m.RecordStep(0.004, 2);    // Decode steps carrying 2 rows: 4 ms each.
  // 64 prompt tokens at 0.05 / 256 s each + 32 output tokens at 0.004 / 2 s each.
  const double per_request = 64 * 0.050 / 256 + 32 * 0.004 / 2;
  EXPECT_NEAR(m.ServingSecondsPerRequest(64, 32), per_request, 1e-12);
  EXPECT_NEAR(m.ServingCapacityRps(64, 32), 1 / per_request, 1e-9);
  // What max_running (32) x one step per token would have claimed: far more.
  EXPECT_LT(m.ServingCapacityRps(64, 32), 32 / ((1 + 32) * 0.004) / 4);
  // Bigger decode batches at the same step cost: more capacity (the batch is measured).
  StepCostModel wide(256);
  wide.RecordStep(0.050, 256);
  wide.RecordStep(0.004, 16);
  EXPECT_GT(wide.ServingCapacityRps(64, 32), 2 * m.ServingCapacityRps(64, 32));
  // Only decode steps measured: prompts are costed at the decode step per budget.
  StepCostModel decode_only(256);
  decode_only.RecordStep(0.004, 1);
  EXPECT_NEAR(decode_only.ServingSecondsPerRequest(10, 10), 10 * 0.004 / 256 + 10 * 0.004, 1e-12);
}

TEST(AdmissionTest, PredictionCountsPrefillAheadAndDecodeRows) {
  AdmissionController a(AdmissionMode::kReject, 100);
  a.costs().SetEstimates(0.010, 0.002);
  // Alone: its 64 prompt tokens fit one step.
  EXPECT_NEAR(a.PredictSecondsToFirstToken(Request(50, 0, 64), 0, Load(0)), 0.010, 1e-12);
  // 300 tokens ahead + 64 own, 100 per step: 4 steps.
  EXPECT_NEAR(a.PredictSecondsToFirstToken(Request(50, 0, 64), 300, Load(0)), 0.040, 1e-12);
  // 20 running sequences take a decode row each: 80 prefill tokens per step, 5 steps; plus the
  // running batch's unprefilled 36 tokens: 400 / 80 = 5 steps still.
  EXPECT_NEAR(a.PredictSecondsToFirstToken(Request(50, 0, 64), 300, Load(20)), 0.050, 1e-12);
  EXPECT_NEAR(a.PredictSecondsToFirstToken(Request(50, 0, 64), 300, Load(20, 36)), 0.050, 1e-12);
  EXPECT_NEAR(a.PredictSecondsToFirstToken(Request(50, 0, 64), 300, Load(20, 37)), 0.060, 1e-12);
  // Time already spent queued counts toward the TTFT.
  EXPECT_NEAR(a.PredictTtftSeconds(Request(50, 0, 64), 0, Load(0), 30 * kMs), 0.040, 1e-12);
}

TEST(AdmissionTest, SafetyScalesThePrediction) {
  AdmissionController a(AdmissionMode::kReject, 100, 1.5);
  a.costs().SetEstimates(0.010, 0.002);
  EXPECT_NEAR(a.PredictSecondsToFirstToken(Request(50, 0, 64), 100, Load(0)), 0.030, 1e-12);
}

TEST(AdmissionTest, MissesOnlyWithAnObjectiveAModeAndAMeasuredCost) {
  AdmissionController none(AdmissionMode::kNone, 100);
  none.costs().SetEstimates(0.010, 0.002);
  EXPECT_FALSE(none.WillMiss(Request(5, 0, 64), 10000, Load(0), 0));

  AdmissionController a(AdmissionMode::kReject, 100);
  EXPECT_FALSE(a.WillMiss(Request(5, 0, 64), 10000, Load(0), 0));  // No cost measured yet.
  a.costs().SetEstimates(0.010, 0.002);
  EXPECT_TRUE(a.WillMiss(Request(5, 0, 64), 10000, Load(0), 0));
  EXPECT_FALSE(a.WillMiss(Request(0, 0, 64), 10000, Load(0), 0));  // No objective: never shed.
  // 50 ms objective: 4 steps (40 ms) make it, 6 do not.
  EXPECT_FALSE(a.WillMiss(Request(50, 0, 64), 300, Load(0), 0));
  EXPECT_TRUE(a.WillMiss(Request(50, 0, 64), 500, Load(0), 0));
  // The same request after waiting 20 ms: 40 ms more would be too late.
  EXPECT_TRUE(a.WillMiss(Request(50, 0, 64), 300, Load(0), 20 * kMs));
}

TEST(AdmissionTest, HopelessRequestsNoLongerDelayThoseBehindThem) {
  AdmissionController a(AdmissionMode::kDeprioritize, 100);
  a.costs().SetEstimates(0.010, 0.002);
  const int64_t now = 100 * kMs;
  std::vector<QueuedRequest> queue = {
      Request(200, now, 100),            // 1 step: fine.
      Request(50, now - 45 * kMs, 100),  // Waited 45 ms, 2 steps more: hopeless.
      Request(0, now - 90 * kMs, 100),   // No objective: kept, never shed.
      Request(35, now, 100),  // Behind 200 kept tokens: 3 steps = 30 ms, makes it, because
                              // the hopeless one's tokens no longer count.
      Request(25, now, 100),  // 4 steps = 40 ms: hopeless.
  };
  EXPECT_EQ(a.FindHopeless(queue, Load(0), now), (std::vector<size_t>{1, 4}));
  AdmissionController off(AdmissionMode::kNone, 100);
  off.costs().SetEstimates(0.010, 0.002);
  EXPECT_TRUE(off.FindHopeless(queue, Load(0), now).empty());
}

}  // namespace
}  // namespace collm::coordination
