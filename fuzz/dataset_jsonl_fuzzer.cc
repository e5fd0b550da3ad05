// A training dataset file (JSON Lines or a JSON array of records): load it as collmd does, with
// the tokenizer from $COLLM_FUZZ_TOKENIZER (scripts/fuzz.sh points it at a tokenizer.model) or,
// without one, a tiny tokenizer trained once at start.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>

#include "collm/engine/dataset.h"
#include "collm/runtime/tokenizer.h"

namespace {

const collm::runtime::Tokenizer& TheTokenizer() {
  static const std::unique_ptr<collm::runtime::Tokenizer> tokenizer = [] {
    std::string path;
    if (const char* env = std::getenv("COLLM_FUZZ_TOKENIZER")) path = env;
    if (path.empty()) {
      path = "/tmp/collm-fuzz-tokenizer-" + std::to_string(::getpid()) + ".model";
      if (!collm::runtime::TrainTinyTokenizer(path, 96).ok()) std::abort();
    }
    auto t = collm::runtime::Tokenizer::Load(path);
    if (!t.ok()) std::abort();
    return std::move(*t);
  }();
  return *tokenizer;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const collm::runtime::Tokenizer& tokenizer = TheTokenizer();
  // Dataset::Load reads a path; /dev/shm keeps the per-input file off the disk.
  static const std::string path = "/dev/shm/collm-fuzz-dataset-" + std::to_string(::getpid());
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  }
  collm::engine::DatasetOptions options;
  options.max_length = 64;
  options.format.messages_field = "messages";
  collm::engine::LoadReport report;
  (void)collm::engine::Dataset::Load(path, tokenizer, options, &report);
  return 0;
}
