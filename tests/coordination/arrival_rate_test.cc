#include "collm/coordination/arrival_rate.h"

#include <cmath>

#include "gtest/gtest.h"

namespace collm::coordination {
namespace {

constexpr int64_t kSecond = 1'000'000'000;

TEST(ArrivalRateTest, ZeroBeforeAnyArrival) {
  ArrivalRateEstimator r;
  EXPECT_EQ(r.Rate(5 * kSecond), 0);
}

TEST(ArrivalRateTest, SteadyArrivalsGiveTheirRate) {
  ArrivalRateEstimator r;
  for (int i = 1; i <= 20; ++i) r.Record(i * kSecond / 4);  // 4 per second.
  EXPECT_NEAR(r.Rate(5 * kSecond), 4.0, 1e-9);
  EXPECT_NEAR(r.mean_gap_seconds(), 0.25, 1e-9);
}

TEST(ArrivalRateTest, SmoothsANewGapWithWeightOneTenth) {
  ArrivalRateEstimator r;
  r.Record(1 * kSecond);
  r.Record(2 * kSecond);  // First gap: 1 s, taken as is.
  r.Record(4 * kSecond);  // 0.9 * 1 + 0.1 * 2.
  EXPECT_NEAR(r.mean_gap_seconds(), 1.1, 1e-9);
}

TEST(ArrivalRateTest, DecaysWhenTrafficStops) {
  ArrivalRateEstimator r;
  for (int i = 1; i <= 10; ++i) r.Record(i * kSecond / 10);  // 10 per second.
  EXPECT_NEAR(r.Rate(1 * kSecond), 10.0, 1e-6);
  // 4 s of silence: the rate is at most one per 4 s, whatever the smoothed gap says.
  EXPECT_NEAR(r.Rate(5 * kSecond), 0.25, 1e-9);
}

TEST(ArrivalRateTest, SimultaneousArrivalsAreInfinite) {
  ArrivalRateEstimator r;
  r.Record(kSecond);
  r.Record(kSecond);
  EXPECT_TRUE(std::isinf(r.Rate(kSecond)));
}

}  // namespace
}  // namespace collm::coordination
