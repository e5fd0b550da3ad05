#include "collm/coordination/load_rates.h"

#include <gtest/gtest.h>

#include <cmath>

#include "collm/common/clock.h"

namespace collm::coordination {
namespace {

constexpr int64_t kStart = 1'000'000'000;

TEST(DecayingRateTest, ZeroBeforeAnyEvent) {
  DecayingRate r(1.0);
  EXPECT_EQ(r.Rate(kStart), 0);
}

TEST(DecayingRateTest, SteadyTrafficReadsAsItsRate) {
  FakeClock clock(kStart);
  DecayingRate r(1.0);
  for (int i = 0; i < 200; ++i) {  // 20 req/s for 10 s.
    r.Record(clock.NowNanos());
    clock.AdvanceSeconds(0.05);
  }
  EXPECT_NEAR(r.Rate(clock.NowNanos()), 20.0, 1.0);
}

TEST(DecayingRateTest, DecaysByItsTimeConstantWhenTrafficStops) {
  FakeClock clock(kStart);
  DecayingRate r(2.0);
  for (int i = 0; i < 400; ++i) {
    r.Record(clock.NowNanos());
    clock.AdvanceSeconds(0.1);
  }
  const double before = r.Rate(clock.NowNanos());
  clock.AdvanceSeconds(2.0);
  EXPECT_NEAR(r.Rate(clock.NowNanos()), before * std::exp(-1.0), 1e-9);
}

TEST(LoadRatesTest, ABurstShowsInTheShortRateAndTheTrendFirst) {
  FakeClock clock(kStart);
  LoadRates rates;
  for (int i = 0; i < 60; ++i) {  // 1 req/s for a minute.
    rates.RecordArrival(clock.NowNanos());
    clock.AdvanceSeconds(1.0);
  }
  EXPECT_NEAR(rates.Trend(clock.NowNanos()), 0.0, 0.05);
  for (int i = 0; i < 100; ++i) {  // Then 50 req/s for 2 s.
    rates.RecordArrival(clock.NowNanos());
    clock.AdvanceSeconds(0.02);
  }
  const int64_t now = clock.NowNanos();
  EXPECT_GT(rates.ShortRate(now), 30.0);
  EXPECT_LT(rates.LongRate(now), 10.0);
  EXPECT_GT(rates.Trend(now), 0.5);
}

}  // namespace
}  // namespace collm::coordination
