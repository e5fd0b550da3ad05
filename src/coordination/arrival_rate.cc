#include "collm/coordination/arrival_rate.h"

#include <algorithm>
#include <limits>

namespace collm::coordination {

void ArrivalRateEstimator::Record(int64_t now_nanos) {
  if (last_nanos_ > 0) {
    const double gap = static_cast<double>(now_nanos - last_nanos_) * 1e-9;
    interarrival_ = interarrival_ == 0 ? gap : 0.9 * interarrival_ + 0.1 * gap;
  }
  last_nanos_ = now_nanos;
}

double ArrivalRateEstimator::Rate(int64_t now_nanos) const {
  if (last_nanos_ == 0) return 0;
  const double since = static_cast<double>(now_nanos - last_nanos_) * 1e-9;
  const double gap = std::max(interarrival_, since);
  return gap > 0 ? 1.0 / gap : std::numeric_limits<double>::infinity();
}

}  // namespace collm::coordination
