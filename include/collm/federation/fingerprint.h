// Digests shared by the aggregator and the devices: the sha256 that guards every adapter transfer
// and the model fingerprint that keeps devices with another base model out of a federation.
#ifndef COLLM_FEDERATION_FINGERPRINT_H_
#define COLLM_FEDERATION_FINGERPRINT_H_

#include <string>

#include "absl/strings/string_view.h"
#include "collm/runtime/model_config.h"

namespace collm::federation {

// Lower-case hex sha256 of `bytes`.
std::string Sha256Hex(absl::string_view bytes);

// Lower-case hex sha256 of model.ToJson(): the canonical config.json, so two copies of the same
// base (whitespace, key order, informative keys) fingerprint alike and any shape change differs.
// Both sides compute it from the parsed config; DeviceCapabilities.model_fingerprint carries it.
std::string ModelFingerprint(const runtime::ModelConfig& model);

}  // namespace collm::federation

#endif  // COLLM_FEDERATION_FINGERPRINT_H_
