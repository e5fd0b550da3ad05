// Where tests find real data and scratch space.
//
// Real weights and data come from $COLLM_MODELS_DIR / $COLLM_DATA_DIR (set by .ci/run to
// ../shared/models and ../shared/data). A test that needs them skips with a clear message when the
// variable is unset (a user's fresh clone) and FAILS when it is set but the file is missing.
#ifndef COLLM_TESTING_TEST_ENV_H_
#define COLLM_TESTING_TEST_ENV_H_

#include <string>

#include "gtest/gtest.h"

namespace collm::testing {

// A fresh, empty directory under the system temp dir, removed when the process exits.
std::string MakeTempDir(const std::string& prefix = "collm-test");

// Reads a whole file; fails the test (ADD_FAILURE) and returns "" when it cannot.
std::string ReadFileOrDie(const std::string& path);
void WriteFileOrDie(const std::string& path, const std::string& contents);

// Resolves `relative` under the directory named by `env_var`. Returns "" and sets *skip_reason when
// the variable is unset; returns "" and sets *error when it is set but the path does not exist.
std::string ResolveSharedPath(const char* env_var, const std::string& relative,
                              std::string* skip_reason, std::string* error);

}  // namespace collm::testing

// Declares `std::string var` = $COLLM_MODELS_DIR/relative, skipping or failing as described above.
#define COLLM_REQUIRE_SHARED(var, env_var, relative)                                         \
  std::string var;                                                                           \
  do {                                                                                       \
    std::string collm_skip_, collm_err_;                                                     \
    var = ::collm::testing::ResolveSharedPath(env_var, relative, &collm_skip_, &collm_err_); \
    if (!collm_err_.empty()) FAIL() << collm_err_;                                           \
    if (!collm_skip_.empty()) GTEST_SKIP() << collm_skip_;                                   \
  } while (0)

#define COLLM_REQUIRE_MODEL_FILE(var, relative) \
  COLLM_REQUIRE_SHARED(var, "COLLM_MODELS_DIR", relative)
#define COLLM_REQUIRE_DATA_FILE(var, relative) COLLM_REQUIRE_SHARED(var, "COLLM_DATA_DIR", relative)

#endif  // COLLM_TESTING_TEST_ENV_H_
