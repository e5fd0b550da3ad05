// Request arrival-rate estimate for the co-execution controller: an EWMA of the gaps between
// arrivals that decays once traffic stops.
#ifndef COLLM_COORDINATION_ARRIVAL_RATE_H_
#define COLLM_COORDINATION_ARRIVAL_RATE_H_

#include <cstdint>

namespace collm::coordination {

// Not thread-safe: the owner serializes Record and Rate (the engine under its queue mutex).
class ArrivalRateEstimator {
 public:
  // One arrival at `now_nanos` (monotonic, as from a Clock).
  void Record(int64_t now_nanos);
  // Requests/s at `now_nanos`: 1 / the smoothed gap, or 1 / the time since the last arrival when
  // that is already longer (so the rate decays when traffic stops). 0 before any arrival;
  // infinity after arrivals with no time between them.
  double Rate(int64_t now_nanos) const;
  double mean_gap_seconds() const { return interarrival_; }  // 0 = fewer than two arrivals.

 private:
  double interarrival_ = 0;  // EWMA seconds between arrivals (weight 0.1 on the newest gap).
  int64_t last_nanos_ = 0;   // 0 = no arrival yet.
};

}  // namespace collm::coordination

#endif  // COLLM_COORDINATION_ARRIVAL_RATE_H_
