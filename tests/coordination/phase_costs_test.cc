#include "collm/coordination/phase_costs.h"

#include "gtest/gtest.h"

namespace collm::coordination {
namespace {

TEST(PhaseCostsTest, FirstMeasurementIsTakenThenSmoothed) {
  PhaseCosts c(2);
  c.RecordInferenceStep(0.010);
  EXPECT_DOUBLE_EQ(c.infer_step_seconds(), 0.010);
  c.RecordInferenceStep(0.020);  // 0.8 * 10 ms + 0.2 * 20 ms.
  EXPECT_NEAR(c.infer_step_seconds(), 0.012, 1e-12);
}

TEST(PhaseCostsTest, PhasesAreLearnedPerPaddedToken) {
  PhaseCosts c(3);
  c.RecordPhase(1, 0.8, 8);  // 0.1 s per token.
  EXPECT_DOUBLE_EQ(c.PhaseSecondsPerToken(1), 0.1);
  c.RecordPhase(1, 1.6, 8);  // 0.8 * 0.1 + 0.2 * 0.2.
  EXPECT_NEAR(c.PhaseSecondsPerToken(1), 0.12, 1e-12);
  c.RecordPhase(2, 0.5, 0);  // No tokens counts as one.
  EXPECT_DOUBLE_EQ(c.PhaseSecondsPerToken(2), 0.5);
}

TEST(PhaseCostsTest, UnmeasuredPhaseIsPredictedAsTheCostliestMeasured) {
  PhaseCosts c(3);
  EXPECT_EQ(c.PhaseSecondsPerToken(0), 0);
  EXPECT_EQ(c.WorstPhaseSecondsPerToken(), 0);
  c.RecordPhase(0, 0.2, 1);
  c.RecordPhase(1, 0.5, 1);
  EXPECT_DOUBLE_EQ(c.PhaseSecondsPerToken(2), 0.5);
  EXPECT_DOUBLE_EQ(c.PhaseSecondsPerToken(0), 0.2);
  EXPECT_DOUBLE_EQ(c.WorstPhaseSecondsPerToken(), 0.5);
}

TEST(PhaseCostsTest, EvaluationIsPerExampleAndResetForgetsPhasesOnly) {
  PhaseCosts c(1);
  c.RecordEvaluation(0.9, 3);
  EXPECT_DOUBLE_EQ(c.eval_seconds_per_example(), 0.3);
  c.RecordInferenceStep(0.01);
  c.RecordPhase(0, 1, 1);
  c.Reset(4);
  EXPECT_EQ(c.num_phases(), 4);
  EXPECT_EQ(c.WorstPhaseSecondsPerToken(), 0);
  EXPECT_DOUBLE_EQ(c.infer_step_seconds(), 0.01);
}

TEST(PhaseCostsTest, SetEstimatesFillsEveryPhase) {
  PhaseCosts c(3);
  c.SetEstimates(0.002, 0.05);
  EXPECT_DOUBLE_EQ(c.infer_step_seconds(), 0.002);
  for (int64_t p = 0; p < 3; ++p) EXPECT_DOUBLE_EQ(c.PhaseSecondsPerToken(p), 0.05);
}

}  // namespace
}  // namespace collm::coordination

namespace collm::coordination {
namespace {

TEST(PhaseCostsTest, HeadIsCostedPerTargetRowApartFromThePerTokenPhases) {
  PhaseCosts c(3);
  c.RecordPhase(0, 0.001, 10);
  c.RecordHeadRows(0.010, 10);
  EXPECT_DOUBLE_EQ(c.head_seconds_per_row(), 0.001);
  EXPECT_DOUBLE_EQ(c.WorstPhaseSecondsPerToken(), 0.0001);  // The head does not count here.
  c.Reset(3);
  EXPECT_EQ(c.head_seconds_per_row(), 0);
}

}  // namespace
}  // namespace collm::coordination
