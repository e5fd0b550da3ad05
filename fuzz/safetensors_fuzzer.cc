// safetensors bytes from an untrusted file (a model or adapter a user points collmd at, an
// update a device uploads): parse, then read and convert every tensor small enough to hold.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "collm/runtime/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = collm::runtime::SafetensorsFile::FromBytes(
      std::string(reinterpret_cast<const char*>(data), size), "fuzz.safetensors");
  if (!file.ok()) return 0;
  std::vector<float> out;
  for (const std::string& name : (*file)->TensorNames()) {
    auto view = (*file)->Get(name);
    if (!view.ok()) continue;
    int64_t numel = 1;
    for (int64_t d : view->shape) numel *= d;
    if (numel < 0 || numel > (int64_t{1} << 20)) continue;
    out.resize(static_cast<size_t>(numel));
    collm::runtime::ConvertToFloat32(*view, out.data());
  }
  return 0;
}
