#include "collm/common/clock.h"

#include "gtest/gtest.h"

namespace collm {
namespace {

TEST(ClockTest, FakeClockMovesOnlyWhenAdvanced) {
  FakeClock clock(100);
  EXPECT_EQ(clock.NowNanos(), 100);
  clock.AdvanceNanos(50);
  EXPECT_EQ(clock.NowNanos(), 150);
  clock.AdvanceSeconds(1.5);
  EXPECT_EQ(clock.NowNanos(), 150 + 1'500'000'000);
}

TEST(ClockTest, RealClockIsMonotonic) {
  int64_t a = Clock::Real().NowNanos();
  int64_t b = Clock::Real().NowNanos();
  EXPECT_LE(a, b);
}

}  // namespace
}  // namespace collm
