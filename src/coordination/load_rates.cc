#include "collm/coordination/load_rates.h"

#include <algorithm>
#include <cmath>

namespace collm::coordination {

double ForecastArrivalRate(double short_rate, double long_rate, double trend, double horizon_s) {
  const double extrapolated = short_rate + trend * horizon_s / 2;
  return std::max({0.0, long_rate, extrapolated});
}

void DecayingRate::Record(int64_t now_nanos) {
  value_ = Rate(now_nanos) + 1.0 / tau_;
  last_nanos_ = std::max(now_nanos, last_nanos_);
}

double DecayingRate::Rate(int64_t now_nanos) const {
  if (last_nanos_ == 0) return 0;
  const double dt = static_cast<double>(std::max<int64_t>(0, now_nanos - last_nanos_)) * 1e-9;
  return value_ * std::exp(-dt / tau_);
}

}  // namespace collm::coordination
