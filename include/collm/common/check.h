// COLLM_CHECK: aborts on states that are impossible if the code is correct. Never use it for
// untrusted input (files, requests, configs): those return absl::Status.
#ifndef COLLM_COMMON_CHECK_H_
#define COLLM_COMMON_CHECK_H_

namespace collm::internal {
[[noreturn]] void CheckFailed(const char* file, int line, const char* expr, const char* msg);
}  // namespace collm::internal

#define COLLM_CHECK(cond)                                                       \
  do {                                                                          \
    if (!(cond)) ::collm::internal::CheckFailed(__FILE__, __LINE__, #cond, ""); \
  } while (0)

#define COLLM_CHECK_MSG(cond, msg)                                               \
  do {                                                                           \
    if (!(cond)) ::collm::internal::CheckFailed(__FILE__, __LINE__, #cond, msg); \
  } while (0)

#endif  // COLLM_COMMON_CHECK_H_
