// Arrival-rate signals for the load report: the request rate exponentially decayed over a short
// (~1 s) and a long (~30 s) window, and the trend between them. Unlike ArrivalRateEstimator
// (which smooths gaps between arrivals, for the fast-timescale guard), these are time-decayed
// counts: each arrival adds 1/tau and the sum decays as exp(-dt/tau), so a burst shows in the
// short rate within a second and an hour of quiet reads as 0, at any traffic level.
#ifndef COLLM_COORDINATION_LOAD_RATES_H_
#define COLLM_COORDINATION_LOAD_RATES_H_

#include <cstdint>

namespace collm::coordination {

// The arrival rate to plan a horizon of `horizon_s` seconds with: rising load (the short rate
// along its trend) is extrapolated to mid-horizon; falling load is not trusted until the long
// window agrees, so a lull does not hand out training room the next burst cannot afford. The
// aggregator's round planner and collmd's share controller both forecast with it.
double ForecastArrivalRate(double short_rate, double long_rate, double trend, double horizon_s);

// One exponentially decayed event rate with time constant `tau_seconds`.
// Not thread-safe: the owner serializes calls. Times are monotonic nanos (from a Clock).
class DecayingRate {
 public:
  // REQUIRES: tau_seconds > 0.
  explicit DecayingRate(double tau_seconds) : tau_(tau_seconds) {}
  void Record(int64_t now_nanos);
  // Events/s at `now_nanos` (0 before any event). Times before the last event count as it.
  double Rate(int64_t now_nanos) const;

 private:
  double tau_;
  double value_ = 0;        // Rate at last_nanos_.
  int64_t last_nanos_ = 0;  // 0 = no event yet.
};

// The short and long arrival rates and their trend. Not thread-safe (the engine holds it under
// its queue mutex, where Submit records arrivals).
class LoadRates {
 public:
  static constexpr double kShortTauSeconds = 1;
  static constexpr double kLongTauSeconds = 30;

  void RecordArrival(int64_t now_nanos) {
    short_.Record(now_nanos);
    long_.Record(now_nanos);
  }
  double ShortRate(int64_t now_nanos) const { return short_.Rate(now_nanos); }
  double LongRate(int64_t now_nanos) const { return long_.Rate(now_nanos); }
  // Requests/s per second. A decayed rate lags a linear ramp by its tau, so the slope is the
  // difference of the two rates over the difference of their lags.
  double Trend(int64_t now_nanos) const {
    return (ShortRate(now_nanos) - LongRate(now_nanos)) / (kLongTauSeconds - kShortTauSeconds);
  }
  double Forecast(int64_t now_nanos, double horizon_s) const {
    return ForecastArrivalRate(ShortRate(now_nanos), LongRate(now_nanos), Trend(now_nanos),
                               horizon_s);
  }

 private:
  DecayingRate short_{kShortTauSeconds};
  DecayingRate long_{kLongTauSeconds};
};

}  // namespace collm::coordination

#endif  // COLLM_COORDINATION_LOAD_RATES_H_
