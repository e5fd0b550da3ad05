// The aggregator's state directory. Every write is crash-safe (temporary file in the same
// directory, fsync, rename, fsync the directory), so after a kill -9 a reader finds each file
// either old or new, never torn; stray "*.tmp.*" files from an interrupted write are ignored.
//
// Layout under `dir`:
//   status.json                    FederationStatus (control state, counters, current round,
//                                  global version); the policy lives apart in policy.json
//   policy.json                    FederationPolicy
//   devices.json                   ListDevicesResponse (registry)
//   sessions.json                  DeviceSessions: the session each device registered with, so
//                                  a restart does not void an update trained under it
//   rounds/<N>/round.json          RoundInfo: participants, accepted updates' metadata,
//                                  rejections, state
//   rounds/<N>/updates/<device>/   the accepted update's adapter, PEFT format, and upload.sha256
//                                  (of the uploaded bytes); written before round.json lists it,
//                                  so a listed update always has its files
//   globals/v<V>/                  every global adapter version, PEFT format, and with FedAdam /
//                                  FedYogi server_optimizer.safetensors: the moments after the
//                                  round that produced it ("m/<tensor>", "v/<tensor>"), so a
//                                  round aggregated again after a kill starts from the same ones
//
// The commit point of an accepted update is round.json listing it; of a closed round, round.json
// saying "done" with its result version. status.json's counters are rebuilt from the round log at
// Load, so a kill between the two writes neither loses nor double-counts anything.
#ifndef COLLM_FEDERATION_STATE_STORE_H_
#define COLLM_FEDERATION_STATE_STORE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "collm/federation/aggregation.h"
#include "collm/lora/lora_adapter.h"
#include "collm/runtime/model_config.h"
#include "collm/v1/federation.pb.h"

namespace collm::federation {

// Everything Load() rebuilds.
struct FederationState {
  v1::FederationStatus status;  // Without policy.
  v1::FederationPolicy policy;
  std::vector<v1::DeviceInfo> devices;
  std::map<std::string, std::string> sessions;  // By device id.
  std::vector<v1::RoundInfo> rounds;            // Ascending by round number.
  // Adapters of the accepted updates of rounds still "collecting", by round and device.
  std::map<int64_t, std::map<std::string, lora::LoraAdapter>> open_updates;
  // sha256 of every listed update's uploaded bytes (where stored), by round and device.
  std::map<std::pair<int64_t, std::string>, std::string> update_sha256;
  lora::LoraAdapter global;  // Version status.global_version().
  ServerOptimizerState optimizer;
};

// Not thread-safe: the round manager serializes calls.
class StateStore {
 public:
  // Creates `dir` (and parents) when missing. Internal naming the path when it cannot.
  static absl::StatusOr<std::unique_ptr<StateStore>> Open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  // True when no state has been saved yet (no status.json).
  bool Empty() const;

  // Reads the whole state for a base model of shape `model`. A corrupt or partial file is
  // DataLoss naming it (unparsable JSON, a round listing an update whose files are missing, a
  // missing global version); REQUIRES: !Empty(). The status' current round, rounds completed,
  // updates accepted and global version are reconciled with the round log.
  absl::StatusOr<FederationState> Load(const runtime::ModelConfig& model) const;

  absl::Status SaveStatus(const v1::FederationStatus& status);  // Policy field is not written.
  absl::Status SavePolicy(const v1::FederationPolicy& policy);
  absl::Status SaveDevices(const std::vector<v1::DeviceInfo>& devices);
  absl::Status SaveSessions(const std::map<std::string, std::string>& session_by_device);
  absl::Status SaveRound(const v1::RoundInfo& round);
  // `sha256`: of the bytes the device uploaded, so a re-send of them is recognized.
  absl::Status SaveUpdate(int64_t round, const std::string& device_id,
                          const lora::LoraAdapter& adapter, const std::string& sha256);
  absl::Status SaveGlobal(int64_t version, const lora::LoraAdapter& adapter);
  // The server optimizer's moments after the round that produced global version `version`.
  absl::Status SaveOptimizer(int64_t version, const ServerOptimizerState& state);

  // PEFT directory of global version `version` (may not exist).
  std::string GlobalDir(int64_t version) const;
  absl::StatusOr<lora::LoraAdapter> ReadGlobal(int64_t version,
                                               const runtime::ModelConfig& model) const;

 private:
  explicit StateStore(std::string dir) : dir_(std::move(dir)) {}
  void ReconcileWithRounds(FederationState* state) const;
  std::string dir_;
};

}  // namespace collm::federation

#endif  // COLLM_FEDERATION_STATE_STORE_H_
