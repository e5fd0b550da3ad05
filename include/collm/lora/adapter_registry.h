// Named adapters served by the decoder, each an immutable versioned snapshot. Publishing builds a
// new snapshot off to the side and swaps one pointer; a request pins the snapshot it started with
// (a shared_ptr), so in-flight requests keep their version and nothing ever blocks on a publish.
#ifndef COLLM_LORA_ADAPTER_REGISTRY_H_
#define COLLM_LORA_ADAPTER_REGISTRY_H_

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "collm/common/clock.h"
#include "collm/lora/lora_adapter.h"
#include "collm/runtime/device.h"
#include "collm/runtime/lora_weights.h"
#include "collm/runtime/model_config.h"

namespace collm::lora {

// One published adapter version. Immutable; shared by the registry and every request pinning it.
struct AdapterSnapshot {
  std::string name;
  int64_t version = 0;           // 1, 2, ... per name; never reused.
  LoraAdapter adapter;           // CPU f32 factors (for saving, aggregation, rollback).
  runtime::LoraWeights weights;  // Decoder layout on the model's device and dtype.
  std::string source;            // Where it came from ("peft:/dir", "shadow step 120").
  double held_out_loss = -1;     // < 0: unknown.
  int64_t published_nanos = 0;   // Clock time of the publish.
};

struct AdapterInfo {
  std::string name;
  int64_t version = 0;
  int64_t previous_versions = 0;  // Versions kept for rollback.
  int rank = 0;
  std::string source;
  double held_out_loss = -1;
};

// Thread-safe.
class AdapterRegistry {
 public:
  // `keep_versions`: versions per name kept for rollback (>= 1, the current one included).
  AdapterRegistry(const runtime::ModelConfig& model, const runtime::ResolvedRuntime& runtime,
                  Clock& clock = Clock::Real(), int keep_versions = 4);

  // Validates `adapter` against the model and publishes it as the newest version of `name`
  // (creating the name). The copy and device upload happen before the lock; the swap is O(1).
  absl::StatusOr<std::shared_ptr<const AdapterSnapshot>> Publish(const std::string& name,
                                                                 const LoraAdapter& adapter,
                                                                 const std::string& source,
                                                                 double held_out_loss = -1);
  // Reads a PEFT adapter directory and publishes it as the newest version of `name` (source
  // "peft:DIR"). A bad directory changes nothing and names the file and tensor at fault.
  absl::StatusOr<std::shared_ptr<const AdapterSnapshot>> LoadPeft(const std::string& name,
                                                                  const std::string& dir);
  // The current version; NotFound naming the adapter.
  absl::StatusOr<std::shared_ptr<const AdapterSnapshot>> Get(const std::string& name) const;
  // A specific kept version; NotFound when the name or version is not (or no longer) kept.
  absl::StatusOr<std::shared_ptr<const AdapterSnapshot>> GetVersion(const std::string& name,
                                                                    int64_t version) const;
  // Makes the previous version current again (the rolled-back version is dropped).
  // FailedPrecondition when there is no previous version.
  absl::StatusOr<std::shared_ptr<const AdapterSnapshot>> Rollback(const std::string& name);
  // Removes the name; requests pinning its snapshots keep them until they finish.
  absl::Status Unload(const std::string& name);
  std::vector<AdapterInfo> List() const;
  // Total publishes so far (all names): cheap change detection for the engine.
  int64_t generation() const;

 private:
  const runtime::ModelConfig model_;
  const runtime::ResolvedRuntime runtime_;
  Clock& clock_;
  const int keep_versions_;
  mutable std::mutex mu_;
  struct Entry {
    std::deque<std::shared_ptr<const AdapterSnapshot>> versions;  // Oldest first; back = current.
    int64_t next_version = 1;
  };
  std::map<std::string, Entry> entries_;  // Guarded by mu_.
  int64_t generation_ = 0;                // Guarded by mu_.
};

}  // namespace collm::lora

#endif  // COLLM_LORA_ADAPTER_REGISTRY_H_
