#include "collm/coordination/share_controller.h"

#include <cmath>
#include <limits>
#include <string>

#include "collm/coordination/co_execution_policy.h"
#include "gtest/gtest.h"

namespace collm::coordination {
namespace {

using Reason = ShareDecision::Reason;

ShareSignals Calm(double ceiling) {
  ShareSignals s;
  s.ceiling = ceiling;
  s.slo_headroom = 1;
  s.arrival_rate = 1;
  s.forecast_rate = 1;
  return s;
}

TEST(ShareControllerTest, CalmLoadGetsTheWholeCeilingAndNeverMore) {
  FakeClock clock(1'000'000'000);
  ShareController c(ShareControllerOptions{}, clock);
  ShareDecision d = c.Update(Calm(0.4));
  EXPECT_DOUBLE_EQ(d.share, 0.4);
  EXPECT_EQ(d.reason, Reason::kCeiling);
  ShareSignals above = Calm(1.5);  // A ceiling above 1 is clamped.
  EXPECT_DOUBLE_EQ(c.Update(above).share, 1.0);
  EXPECT_DOUBLE_EQ(c.Update(Calm(0)).share, 0.0);
}

TEST(ShareControllerTest, ASurgePastTheForecastYieldsAtOnceThenHoldsThenRecoversGradually) {
  FakeClock clock(1'000'000'000);
  ShareControllerOptions o;  // surge x2 and +2 req/s, hold 500 ms, recover over 1 s.
  ShareController c(o, clock);
  ShareSignals s = Calm(0.6);
  s.forecast_rate = 3;
  EXPECT_DOUBLE_EQ(c.Update(s).share, 0.6);
  // 6 req/s: twice the forecast but the +2 margin is met only above 5; 6.5 is a surge.
  s.arrival_rate = 6;
  EXPECT_DOUBLE_EQ(c.Update(s).share, 0.6) << "6 <= 2 x 3: not a surge";
  s.arrival_rate = 6.5;
  ShareDecision d = c.Update(s);
  EXPECT_DOUBLE_EQ(d.share, 0) << "training yields in the same step";
  EXPECT_EQ(d.reason, Reason::kSurge);
  EXPECT_TRUE(d.surge_started);
  clock.AdvanceSeconds(0.1);
  d = c.Update(s);
  EXPECT_DOUBLE_EQ(d.share, 0);
  EXPECT_FALSE(d.surge_started) << "one surge counts once";
  // The surge ends; the hold keeps training off for 500 ms.
  s.arrival_rate = 3;
  clock.AdvanceSeconds(0.1);
  EXPECT_DOUBLE_EQ(c.Update(s).share, 0);
  clock.AdvanceSeconds(0.4);
  d = c.Update(s);
  EXPECT_DOUBLE_EQ(d.share, 0) << "still within the hold";
  EXPECT_EQ(d.reason, Reason::kSurge);
  // After the hold, at most ceiling / recover_seconds per second back.
  clock.AdvanceSeconds(0.25);
  d = c.Update(s);
  EXPECT_NEAR(d.share, 0.6 * 0.25, 1e-9);
  EXPECT_EQ(d.reason, Reason::kRecovering);
  clock.AdvanceSeconds(0.5);
  EXPECT_NEAR(c.Update(s).share, 0.6 * 0.75, 1e-9);
  clock.AdvanceSeconds(0.5);
  d = c.Update(s);
  EXPECT_DOUBLE_EQ(d.share, 0.6);
  EXPECT_EQ(d.reason, Reason::kCeiling);
}

TEST(ShareControllerTest, AFewRequestsOnAnIdleDeviceAreNotASurge) {
  FakeClock clock;
  ShareController c(ShareControllerOptions{}, clock);
  ShareSignals s = Calm(0.5);
  s.forecast_rate = 0;
  s.arrival_rate = 1.9;  // Below surge_min_rps above a forecast of 0.
  EXPECT_DOUBLE_EQ(c.Update(s).share, 0.5);
  s.arrival_rate = 2;
  EXPECT_DOUBLE_EQ(c.Update(s).share, 0);
  EXPECT_TRUE(c.IsSurge(2, 0));
  EXPECT_FALSE(c.IsSurge(2, 1));  // Not above twice the forecast.
}

TEST(ShareControllerTest, SloHeadroomScalesTheShareBetweenZeroAndFull) {
  FakeClock clock;
  ShareControllerOptions o;
  o.recover_seconds = 0;  // No ramp: the mapping alone.
  ShareController c(o, clock);
  ShareSignals s = Calm(0.8);
  s.slo_headroom = 0.5;  // headroom_full
  EXPECT_DOUBLE_EQ(c.Update(s).share, 0.8);
  s.slo_headroom = 0.3;  // Halfway between headroom_zero 0.1 and headroom_full 0.5.
  ShareDecision d = c.Update(s);
  EXPECT_NEAR(d.share, 0.4, 1e-12);
  EXPECT_EQ(d.reason, Reason::kHeadroom);
  s.slo_headroom = 0.1;
  EXPECT_DOUBLE_EQ(c.Update(s).share, 0);
  s.slo_headroom = -2;  // A request already late.
  EXPECT_DOUBLE_EQ(c.Update(s).share, 0);
  s.slo_headroom = 1;
  EXPECT_DOUBLE_EQ(c.Update(s).share, 0.8);
}

TEST(ShareControllerTest, ACutRecoversAtTheRampButARaisedCeilingAppliesAtOnce) {
  FakeClock clock;
  ShareController c(ShareControllerOptions{}, clock);  // recover over 1 s
  ShareSignals s = Calm(0.2);
  EXPECT_DOUBLE_EQ(c.Update(s).share, 0.2);
  s.ceiling = 0.9;  // A new round's ceiling: no reason to ramp into it.
  EXPECT_DOUBLE_EQ(c.Update(s).share, 0.9);
  s.slo_headroom = 0;  // Cut to 0 at once ...
  EXPECT_DOUBLE_EQ(c.Update(s).share, 0);
  s.slo_headroom = 1;  // ... and back at 0.9 per second.
  clock.AdvanceSeconds(0.5);
  EXPECT_NEAR(c.Update(s).share, 0.45, 1e-9);
}

TEST(ShareControllerTest, DisabledUsesTheCeilingWhateverTheSignals) {
  FakeClock clock;
  ShareControllerOptions o;
  o.enabled = false;
  ShareController c(o, clock);
  ShareSignals s = Calm(0.7);
  s.arrival_rate = 1000;
  s.slo_headroom = -1;
  const ShareDecision d = c.Update(s);
  EXPECT_DOUBLE_EQ(d.share, 0.7);
  EXPECT_FALSE(d.surge_started);
}

TEST(ShareControllerTest, OptionsOutOfRangeNameTheirField) {
  auto field_of = [](ShareControllerOptions o) {
    return std::string(ValidateShareControllerOptions(o).message());
  };
  EXPECT_TRUE(ValidateShareControllerOptions(ShareControllerOptions{}).ok());
  ShareControllerOptions o;
  o.surge_factor = 1;
  EXPECT_NE(field_of(o).find("engine.share_controller.surge_factor"), std::string::npos);
  o = {};
  o.surge_min_rps = std::nan("");
  EXPECT_NE(field_of(o).find("surge_min_rps"), std::string::npos);
  o = {};
  o.surge_hold_ms = -1;
  EXPECT_NE(field_of(o).find("surge_hold_ms"), std::string::npos);
  o = {};
  o.headroom_full = 1.5;
  EXPECT_NE(field_of(o).find("headroom_full"), std::string::npos);
  o = {};
  o.headroom_zero = 0.5;  // Not below headroom_full.
  EXPECT_NE(field_of(o).find("headroom_zero"), std::string::npos);
  o = {};
  o.recover_seconds = std::numeric_limits<double>::infinity();
  EXPECT_NE(field_of(o).find("recover_seconds"), std::string::npos);
}

TEST(ShareControllerTest, HeadroomComesFromTheTightestRequestsSlackOverItsObjective) {
  FakeClock clock(10'000'000'000);
  CoExecutionOptions co;
  co.training_share = 1;
  CoExecutionPolicy policy(co, 1, clock);
  policy.mutable_costs().SetEstimates(0.010, 0.001);
  ServingSnapshot serving;
  serving.idle = false;
  EXPECT_DOUBLE_EQ(policy.SloHeadroom(serving, clock.NowNanos()), 1) << "no objective: all room";
  // Waiting 100 ms of a 500 ms TTFT, one 10 ms step to go: (0.5 - 0.1 - 0.01) / 0.5.
  RequestTiming waiting;
  waiting.slo.ttft_ms = 500;
  waiting.submit_nanos = clock.NowNanos() - 100'000'000;
  serving.requests.push_back(waiting);
  EXPECT_NEAR(policy.SloHeadroom(serving, clock.NowNanos()), 0.78, 1e-9);
  // Decoding at 50 ms TPOT, 4 tokens in 190 ms: (0.2 - 0.19 - 0.01) / 0.05 = 0, the tightest.
  RequestTiming decoding;
  decoding.slo.tpot_ms = 50;
  decoding.first_token_nanos = clock.NowNanos() - 190'000'000;
  decoding.generated = 4;
  serving.requests.push_back(decoding);
  EXPECT_NEAR(policy.SloHeadroom(serving, clock.NowNanos()), 0, 1e-9);
  EXPECT_NEAR(policy.SloSlack(serving, clock.NowNanos()), 0, 1e-9);
}

}  // namespace
}  // namespace collm::coordination
