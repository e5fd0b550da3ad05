// Helpers shared by the config tests.
#ifndef COLLM_TESTS_CONFIG_CONFIG_TEST_UTIL_H_
#define COLLM_TESTS_CONFIG_CONFIG_TEST_UTIL_H_

#include <cstdlib>
#include <optional>
#include <string>
#include <utility>

#include "absl/strings/match.h"
#include "gtest/gtest.h"

namespace collm::config {

// EXPECT_PRED_FORMAT2(Contains, text, part).
inline ::testing::AssertionResult Contains(const char* text_expr, const char* part_expr,
                                           const std::string& text, const std::string& part) {
  if (absl::StrContains(text, part)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << text_expr << " = \"" << text << "\"\n does not contain "
                                       << part_expr << " = \"" << part << "\"";
}

// Sets (or unsets, with nullopt) an environment variable for one scope.
class ScopedEnv {
 public:
  ScopedEnv(std::string name, std::optional<std::string> value) : name_(std::move(name)) {
    if (const char* old = std::getenv(name_.c_str())) old_ = old;
    if (value) {
      setenv(name_.c_str(), value->c_str(), 1);
    } else {
      unsetenv(name_.c_str());
    }
  }
  ~ScopedEnv() {
    if (old_) {
      setenv(name_.c_str(), old_->c_str(), 1);
    } else {
      unsetenv(name_.c_str());
    }
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_;
  std::optional<std::string> old_;
};

}  // namespace collm::config

#endif  // COLLM_TESTS_CONFIG_CONFIG_TEST_UTIL_H_
