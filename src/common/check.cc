#include "collm/common/check.h"

#include <cstdio>
#include <cstdlib>

namespace collm::internal {

void CheckFailed(const char* file, int line, const char* expr, const char* msg) {
  std::fprintf(stderr, "COLLM_CHECK failed at %s:%d: %s %s\n", file, line, expr, msg);
  std::fflush(stderr);
  std::abort();
}

}  // namespace collm::internal
