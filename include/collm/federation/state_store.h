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
//   rounds/<N>/updates/<device>/   the accepted update's adapter, PEFT format; written before
//                                  round.json lists it, so a listed update always has its files
//   globals/v<V>/                  every global adapter version, PEFT format
//   server_optimizer.safetensors   FedAdam/FedYogi moments ("m/<tensor>", "v/<tensor>")
#ifndef COLLM_FEDERATION_STATE_STORE_H_
#define COLLM_FEDERATION_STATE_STORE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
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
  // missing global version); REQUIRES: !Empty().
  absl::StatusOr<FederationState> Load(const runtime::ModelConfig& model) const;

  absl::Status SaveStatus(const v1::FederationStatus& status);  // Policy field is not written.
  absl::Status SavePolicy(const v1::FederationPolicy& policy);
  absl::Status SaveDevices(const std::vector<v1::DeviceInfo>& devices);
  absl::Status SaveSessions(const std::map<std::string, std::string>& session_by_device);
  absl::Status SaveRound(const v1::RoundInfo& round);
  absl::Status SaveUpdate(int64_t round, const std::string& device_id,
                          const lora::LoraAdapter& adapter);
  absl::Status SaveGlobal(int64_t version, const lora::LoraAdapter& adapter);
  absl::Status SaveOptimizer(const ServerOptimizerState& state);

  // PEFT directory of global version `version` (may not exist).
  std::string GlobalDir(int64_t version) const;
  absl::StatusOr<lora::LoraAdapter> ReadGlobal(int64_t version,
                                               const runtime::ModelConfig& model) const;

 private:
  explicit StateStore(std::string dir) : dir_(std::move(dir)) {}
  std::string dir_;
};

}  // namespace collm::federation

#endif  // COLLM_FEDERATION_STATE_STORE_H_
