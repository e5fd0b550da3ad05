// Ejection and re-admission of one replica behind a router (collm-router; see routing_policy.h).
#ifndef COLLM_COORDINATION_REPLICA_HEALTH_H_
#define COLLM_COORDINATION_REPLICA_HEALTH_H_

#include <cstdint>

#include "absl/status/status.h"

namespace collm::coordination {

// Ejection and re-admission of one replica, from the outcomes of its health probes (load polls)
// and of requests sent to it. `failures_to_eject` consecutive failures eject it for a backoff
// that starts at `base_backoff_ms` and doubles with every ejection in a row up to
// `max_backoff_ms`; once the backoff has passed, the next success re-admits it (a failure
// ejects it again, for longer). Any success while admitted resets the failure count.
// Thread-compatible; time in nanoseconds from the caller's clock.
struct EjectionOptions {
  int64_t failures_to_eject = 3;   // >= 1.
  int64_t base_backoff_ms = 1000;  // >= 1.
  int64_t max_backoff_ms = 30000;  // >= base_backoff_ms.
};
absl::Status ValidateEjectionOptions(const EjectionOptions& options);

class ReplicaHealth {
 public:
  explicit ReplicaHealth(EjectionOptions options = {}) : options_(options) {}

  // Returns true when this failure ejected the replica.
  bool RecordFailure(int64_t now_nanos);
  // Returns true when this success re-admitted the replica.
  bool RecordSuccess(int64_t now_nanos);

  bool admitted() const { return admitted_; }
  // An ejected replica's backoff has passed: the next probe decides.
  bool ProbeDue(int64_t now_nanos) const { return !admitted_ && now_nanos >= retry_at_nanos_; }
  int64_t ejections() const { return ejections_; }
  int64_t consecutive_failures() const { return consecutive_failures_; }

 private:
  EjectionOptions options_;
  bool admitted_ = true;
  int64_t consecutive_failures_ = 0;
  int64_t ejections_in_a_row_ = 0;
  int64_t ejections_ = 0;
  int64_t retry_at_nanos_ = 0;
};

}  // namespace collm::coordination

#endif  // COLLM_COORDINATION_REPLICA_HEALTH_H_
