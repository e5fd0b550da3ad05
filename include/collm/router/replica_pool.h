// The replicas behind collm-router: one gRPC channel each, their load reports (GetStats polled
// every poll_interval_ms), the router's own in-flight counts, health (ejection / re-admission,
// coordination/replica_health.h) and the routing decision (coordination/routing_policy.h).
#ifndef COLLM_ROUTER_REPLICA_POOL_H_
#define COLLM_ROUTER_REPLICA_POOL_H_

#include <grpcpp/grpcpp.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "collm/common/clock.h"
#include "collm/coordination/replica_health.h"
#include "collm/coordination/routing_policy.h"
#include "collm/telemetry/metrics.h"
#include "collm/v1/inference.grpc.pb.h"

namespace collm::router {

struct ReplicaPoolOptions {
  std::vector<std::string> replicas;  // host:port of each collmd; non-empty.
  coordination::RoutingPolicyKind policy = coordination::RoutingPolicyKind::kSlack;
  coordination::SlackOptions slack;
  coordination::EjectionOptions ejection;
  uint64_t seed = 0;
  int64_t poll_interval_ms = 50;
  int64_t poll_timeout_ms = 500;
  int64_t max_message_bytes = 64 << 20;
};

// How a request sent to a replica ended, for its health and the counters.
enum class ReplicaOutcome {
  kOk,           // Served (or failed for the request's own reasons: bad input, deadline, cancel).
  kUnavailable,  // The replica could not be reached or refused to serve: counts toward ejection.
};

// One replica as the router sees it now, for the aggregated GetStats and tests.
struct ReplicaStatus {
  std::string address;
  bool admitted = true;
  bool load_known = false;
  int64_t outstanding = 0;
  collm::v1::GetStatsResponse last_report;  // Valid when load_known.
};

// Thread-safe. Owns the channels and a poller thread (Start/Stop). Must outlive every Lease's use
// of its stub.
class ReplicaPool {
 public:
  // InvalidArgument naming the option for bad slack/ejection options or an empty replica list.
  // `metrics` (borrowed, may be null) receives the per-replica series.
  static absl::StatusOr<std::unique_ptr<ReplicaPool>> Create(ReplicaPoolOptions options,
                                                             Clock& clock,
                                                             telemetry::MetricsRegistry* metrics);
  ~ReplicaPool();

  // Starts polling every replica; the first round is sent at once.
  void Start();
  // Stops polling and waits for polls in flight. Idempotent.
  void Stop();
  // Blocks until every replica has answered or failed one poll, or `timeout_ms` passed.
  void WaitForFirstPoll(int64_t timeout_ms);

  // A replica chosen for one request; hand it back with Release exactly once.
  struct Lease {
    int index = -1;
    std::string address;
    collm::v1::InferenceService::Stub* stub = nullptr;  // Owned by the pool.
  };
  // Routes `request` (skipping `exclude`, a retry's failed replicas) and counts it as outstanding
  // there. Unavailable naming why each replica cannot serve when none can.
  absl::StatusOr<Lease> Acquire(const coordination::RouteRequest& request,
                                const std::vector<int>& exclude = {});
  void Release(const Lease& lease, ReplicaOutcome outcome);

  // An admitted replica for calls that need no load balance (Tokenize), in turn; skips
  // `exclude`. Does not count as outstanding.
  absl::StatusOr<Lease> AnyAdmitted(const std::vector<int>& exclude = {});

  std::vector<ReplicaStatus> Status() const;
  int size() const { return static_cast<int>(replicas_.size()); }

 private:
  struct Replica {
    std::string address;
    std::unique_ptr<collm::v1::InferenceService::Stub> stub;
    coordination::ReplicaHealth health;
    coordination::ReplicaView view;
    collm::v1::GetStatsResponse last_report;
    // Prompt tokens routed here, with when: those sent after a report's poll started are not in
    // that report yet.
    std::deque<std::pair<int64_t, int64_t>> sent;
    bool poll_in_flight = false;
    bool polled_once = false;
    telemetry::Counter* routed = nullptr;
    telemetry::Counter* ejections = nullptr;
    telemetry::Gauge* admitted_gauge = nullptr;
    telemetry::Gauge* outstanding_gauge = nullptr;
    telemetry::Gauge* predicted_ttft = nullptr;
  };

  ReplicaPool(ReplicaPoolOptions options, Clock& clock, telemetry::MetricsRegistry* metrics);
  void PollLoop();
  void PollOne(int index) ABSL_LOCKS_EXCLUDED(mu_);
  void OnReport(int index, int64_t poll_start, const grpc::Status& status,
                const collm::v1::GetStatsResponse& report);
  // Health bookkeeping with logs and metrics.
  void RecordFailure(Replica& r, const std::string& why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RecordSuccess(Replica& r) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void UpdateUnreported(Replica& r, int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const ReplicaPoolOptions options_;
  Clock& clock_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Replica> replicas_ ABSL_GUARDED_BY(mu_);     // Fixed size after Create.
  std::vector<std::string> names_;                         // Fixed after Create.
  std::vector<collm::v1::InferenceService::Stub*> stubs_;  // Fixed after Create; owned above.
  coordination::RoutingPolicy policy_ ABSL_GUARDED_BY(mu_);
  size_t any_cursor_ ABSL_GUARDED_BY(mu_) = 0;
  int polls_in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread poller_;
};

}  // namespace collm::router

#endif  // COLLM_ROUTER_REPLICA_POOL_H_
