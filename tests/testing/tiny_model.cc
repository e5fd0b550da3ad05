#include "testing/tiny_model.h"

#include "gtest/gtest.h"
#include "testing/test_env.h"

namespace collm::testing {

std::string WriteModelToTempDir(const runtime::RandomModelOptions& options) {
  std::string dir = MakeTempDir("collm-model");
  absl::Status status = runtime::WriteRandomModel(dir, options);
  if (!status.ok()) ADD_FAILURE() << "WriteRandomModel: " << status;
  return dir;
}

const std::string& TinyModelDir() {
  static const std::string* dir = [] {
    runtime::RandomModelOptions options;
    options.config = runtime::TinyLlamaConfig();
    options.seed = 1234;
    return new std::string(WriteModelToTempDir(options));
  }();
  return *dir;
}

}  // namespace collm::testing
