// HF config.json text: parse; an accepted config must round-trip through ToJson.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "collm/runtime/model_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto config =
      collm::runtime::ModelConfig::FromJson(std::string(reinterpret_cast<const char*>(data), size));
  if (!config.ok()) return 0;
  if (!collm::runtime::ModelConfig::FromJson(config->ToJson()).ok()) std::abort();
  return 0;
}
