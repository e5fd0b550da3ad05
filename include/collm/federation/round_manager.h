// The aggregator's federation logic: device registry, policy, control state and rounds.
//
// Rounds. While running, Tick() opens a round once at least policy.min_clients devices are online:
// it samples up to max_clients of them (all when 0) as participants, fixes base_version = the
// current global version and deadline = now + deadline_s. Participants get their RoundTask in
// heartbeat replies. A round closes
//   - early, on quorum: accepted updates >= (quorum > 0 ? min(quorum, participants) :
//   participants);
//   - at the deadline: it aggregates when accepted >= max(1, ceil(min_clients / 2)) (the "deadline
//     quorum"), else it fails (global unchanged) and the next Tick opens a new round.
// So a silent or dropped device never stalls a round beyond its deadline. Aggregation makes global
// version base_version + 1, persisted before the round is marked done. Updates for a round that is
// closed are rejected as late and counted; any rejection is counted per device and in the status.
// Policy changes apply from the next round (the open round keeps its deadline and strategy).
// Pause stops opening rounds (the open one still completes); the federation is "finished" once
// policy.rounds rounds are done (0 = run until paused).
//
// Participants, budgets and share ceilings come from the coordination::RoundPlanner
// (options.planner: uniform or drift_plus_penalty over the devices' load reports); each round
// keeps the planner's decision for every online device (RoundInfo.decisions, persisted with the
// round, logged), and a participant's task carries its own budget and share ceiling. After a
// restart the planner's virtual queues resume from the last round's decisions.
//
// Devices are online while their last call is within offline_after_missed heartbeat intervals.
// Sessions live in memory only: after a restart heartbeats answer reregister = true, and a device
// that re-registers keeps its place (and pending task) in the open round.
//
// Time comes from the Clock, which must count from the Unix epoch (deadlines travel to devices as
// Unix milliseconds and persist across restarts); tests use a FakeClock started at a Unix time.
// Thread-safe. Tick() may run aggregation (tensor work) without holding the lock, so callers never
// wait on it except other Tick() calls.
#ifndef COLLM_FEDERATION_ROUND_MANAGER_H_
#define COLLM_FEDERATION_ROUND_MANAGER_H_

#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "collm/common/clock.h"
#include "collm/coordination/round_planner.h"
#include "collm/federation/aggregation.h"
#include "collm/federation/state_store.h"
#include "collm/lora/lora_adapter.h"
#include "collm/lora/peft_io.h"
#include "collm/runtime/model_config.h"
#include "collm/telemetry/metrics.h"
#include "collm/v1/federation.pb.h"

namespace collm::federation {

struct RoundManagerOptions {
  runtime::ModelConfig model;     // Base model shape (its config.json is all that is needed).
  std::string model_fingerprint;  // Devices must present this; "" = ModelFingerprint(model).
  int64_t heartbeat_interval_ms = 5000;  // Told to devices at registration.
  int64_t offline_after_missed = 3;      // Heartbeat intervals without a call -> offline.
  v1::FederationPolicy policy;           // Starting policy: unset fields take DefaultPolicy()'s;
                                         // a policy persisted in the state dir wins.
  bool auto_start = false;               // Start running on a fresh state dir (else idle).
  uint64_t seed = 0;                     // Participant sampling (mixed with the round number).
  coordination::RoundPlannerOptions planner;  // Who trains, how much (configs: coordination:).
  // Prometheus metrics (rounds, participants, updates by outcome and reason, aggregation time,
  // virtual queues and per-device decisions); borrowed, must outlive the manager; null = none.
  telemetry::MetricsRegistry* metrics = nullptr;
};

// Built-in defaults (every field set).
v1::FederationPolicy DefaultPolicy();
// Checks every set field: InvalidArgument naming it ("policy.lr must be > 0, got -1").
absl::Status ValidatePolicy(const v1::FederationPolicy& policy);

// The aggregator's single source of truth: devices, policy, control state, rounds and global
// versions (rules at the top of this file), persisted through a StateStore. Owned by
// collm-aggregator's main (one per process); the gRPC services borrow it by reference. Borrows the
// Clock and the StateStore, which must outlive it. Thread-safe: every method may be called from
// any thread; Tick() runs aggregation outside the lock, and concurrent Tick() calls serialize.
class RoundManager {
 public:
  // Loads the state in `store` (borrowed, outlives the manager) or, when it is empty, starts a
  // fresh federation whose global version 1 is `initial`. Errors: a bad policy, a corrupt state
  // dir (naming the file), an initial adapter that does not fit `options.model`.
  static absl::StatusOr<std::unique_ptr<RoundManager>> Create(const RoundManagerOptions& options,
                                                              Clock& clock, StateStore* store,
                                                              const lora::LoraAdapter& initial);

  // Device calls. Errors are InvalidArgument / FailedPrecondition naming what is wrong.
  absl::StatusOr<v1::RegisterResponse> Register(const v1::RegisterRequest& request,
                                                const std::string& peer);
  absl::StatusOr<v1::HeartbeatResponse> Heartbeat(const v1::HeartbeatRequest& request,
                                                  const std::string& peer);
  // FailedPrecondition when `session` is not `device_id`'s current one.
  absl::Status CheckSession(const std::string& device_id, const std::string& session) const;
  // Validates, persists and counts an uploaded update (the transport already checked size and
  // sha256). OK = accepted; any error is also recorded as a rejection. Idempotent: the same
  // bytes (sha256) re-sent by a device whose update is already recorded are acknowledged again
  // and not counted twice (the answer to the first upload may have been lost in a crash).
  absl::Status SubmitUpdate(const v1::UpdateHeader& header, const lora::PeftBlob& blob);
  // Counts a rejection found before SubmitUpdate (transport: bad sha256, size, stream order).
  // `kind` is the bounded label of collm_fed_updates_total{outcome="rejected"} (e.g. "transport").
  void RecordRejection(const std::string& device_id, int64_t round, const std::string& reason,
                       const std::string& kind = "transport");
  // Global adapter `version` (0 = newest) as PEFT bytes. NotFound for an unknown version.
  absl::StatusOr<std::pair<int64_t, lora::PeftBlob>> GetGlobal(int64_t version) const;

  // Admin.
  v1::FederationStatus Status() const;
  std::vector<v1::DeviceInfo> Devices() const;
  std::vector<v1::RoundInfo> Rounds(int64_t limit) const;  // Newest first; 0 = all.
  absl::StatusOr<v1::RoundInfo> Round(int64_t round) const;
  absl::StatusOr<v1::FederationStatus> Start();
  absl::StatusOr<v1::FederationStatus> Pause();
  absl::StatusOr<v1::FederationStatus> Resume();
  absl::StatusOr<v1::FederationStatus> SetPolicy(const v1::FederationPolicy& changes);

  // Advances rounds: closes a round on quorum or deadline (aggregating), opens the next one.
  void Tick();
  // Blocks until the change counter differs from `seen`, `timeout_ms` passes (real time) or
  // Shutdown(); returns the counter. Every observable change increments it.
  int64_t WaitForChange(int64_t seen, int64_t timeout_ms) const;
  int64_t change_count() const;
  // Writes everything (devices' last state included) and wakes waiters. Idempotent.
  absl::Status Shutdown();
  bool shut_down() const;

 private:
  struct Device {
    v1::DeviceInfo info;
    std::string session;  // "" until registered; persisted in the state dir's sessions.json.
    int64_t last_seen_ns = 0;
  };

  RoundManager(const RoundManagerOptions& options, Clock& clock, StateStore* store);
  int64_t NowMs() const { return clock_.NowNanos() / 1000000; }
  bool Online(const Device& d) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  v1::RoundInfo* OpenRound() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);  // Collecting round or null.
  v1::RoundInfo* FindRound(int64_t round) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  v1::FederationStatus StatusLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  v1::DeviceInfo DeviceInfoLocked(const Device& d) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status SaveDevicesLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status SaveStatusLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status SaveSessionsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ChangedLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // `kind`: a bounded reason class for the metrics (late, not_participant, duplicate, ...).
  void RejectLocked(const std::string& device_id, int64_t round, const std::string& reason,
                    const std::string& kind) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ExportDecisionsLocked(const v1::RoundInfo& round) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CountUpdate(const std::string& outcome, const std::string& reason) const;
  void CountRound(const std::string& outcome) const;
  AggregationOptions OptionsLocked(const v1::RoundInfo& round) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void MaybeOpenRoundLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int64_t DeadlineQuorumLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const RoundManagerOptions options_;
  Clock& clock_;
  StateStore* const store_;
  std::mutex tick_mu_;  // Serializes Tick() (aggregation runs outside mu_).

  mutable std::mutex mu_;
  mutable std::condition_variable changed_;
  int64_t changes_ ABSL_GUARDED_BY(mu_) = 0;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
  v1::FederationStatus status_ ABSL_GUARDED_BY(mu_);  // Counters, state, round, version.
  v1::FederationPolicy policy_ ABSL_GUARDED_BY(mu_);  // Every field set.
  std::map<std::string, Device> devices_ ABSL_GUARDED_BY(mu_);
  std::vector<v1::RoundInfo> rounds_ ABSL_GUARDED_BY(mu_);  // Ascending; last is the newest.
  // Accepted updates of the open round, by device.
  std::map<std::string, ClientUpdate> updates_ ABSL_GUARDED_BY(mu_);
  // sha256 of each recorded update's uploaded bytes, by (round, device): a re-send is recognized.
  std::map<std::pair<int64_t, std::string>, std::string> update_sha256_ ABSL_GUARDED_BY(mu_);
  lora::LoraAdapter global_ ABSL_GUARDED_BY(mu_);  // Immutable once published; replaced whole.
  ServerOptimizerState optimizer_;                 // Only Tick() (under tick_mu_) touches it.
  coordination::RoundPlanner planner_ ABSL_GUARDED_BY(mu_);
};

}  // namespace collm::federation

#endif  // COLLM_FEDERATION_ROUND_MANAGER_H_
