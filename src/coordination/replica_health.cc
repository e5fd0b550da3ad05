#include "collm/coordination/replica_health.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace collm::coordination {

absl::Status ValidateEjectionOptions(const EjectionOptions& o) {
  if (o.failures_to_eject < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("ejection.failures_to_eject must be >= 1, got ", o.failures_to_eject));
  }
  if (o.base_backoff_ms < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("ejection.base_backoff_ms must be >= 1, got ", o.base_backoff_ms));
  }
  if (o.max_backoff_ms < o.base_backoff_ms) {
    return absl::InvalidArgumentError(
        absl::StrCat("ejection.max_backoff_ms must be >= ejection.base_backoff_ms (",
                     o.base_backoff_ms, "), got ", o.max_backoff_ms));
  }
  return absl::OkStatus();
}

bool ReplicaHealth::RecordFailure(int64_t now_nanos) {
  if (!admitted_) {
    // A failed probe after the backoff: eject again, for longer. Failures during the backoff
    // (requests that were already in flight) do not extend it.
    if (now_nanos < retry_at_nanos_) return false;
  } else if (++consecutive_failures_ < options_.failures_to_eject) {
    return false;
  }
  const bool newly = admitted_;
  admitted_ = false;
  if (newly) ++ejections_;
  // Doubling backoff, capped; the shift is bounded so it cannot overflow.
  const int64_t shift = std::min<int64_t>(ejections_in_a_row_, 20);
  const int64_t backoff_ms = std::min(options_.max_backoff_ms, options_.base_backoff_ms << shift);
  ++ejections_in_a_row_;
  retry_at_nanos_ = now_nanos + backoff_ms * 1000000;
  return newly;
}

bool ReplicaHealth::RecordSuccess(int64_t now_nanos) {
  if (admitted_) {
    consecutive_failures_ = 0;
    ejections_in_a_row_ = 0;
    return false;
  }
  if (now_nanos < retry_at_nanos_) return false;  // Still backing off: a stale in-flight answer.
  admitted_ = true;
  consecutive_failures_ = 0;
  // ejections_in_a_row_ stays until a success while admitted, so a flapping replica backs off
  // longer each time it fails right after re-admission.
  return true;
}

}  // namespace collm::coordination
