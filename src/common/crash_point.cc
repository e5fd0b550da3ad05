#include "collm/common/crash_point.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace collm::crash_point_internal {
namespace {

struct Target {
  std::string name;  // Without the ":<nth>" suffix.
  int64_t nth = 1;
};

// Parsed once; "name:nth" splits at the last ':' when what follows is a positive number, so names
// themselves may contain ':'.
const Target& TheTarget() {
  static const Target target = [] {
    Target t;
    const char* env = std::getenv("COLLM_CRASH_AT");
    t.name = env == nullptr ? "" : env;
    if (const size_t colon = t.name.rfind(':'); colon != std::string::npos) {
      int64_t n = 0;
      if (absl::SimpleAtoi(t.name.substr(colon + 1), &n) && n > 0) {
        t.nth = n;
        t.name.resize(colon);
      }
    }
    return t;
  }();
  return target;
}

std::atomic<int64_t> g_hits{0};

}  // namespace

const bool kArmed = [] {
  const char* env = std::getenv("COLLM_CRASH_AT");
  return env != nullptr && *env != '\0';
}();

void Reached(absl::string_view name, absl::string_view detail) {
  const Target& target = TheTarget();
  const bool match = detail.empty()
                         ? name == target.name
                         : target.name.size() == name.size() + 1 + detail.size() &&
                               absl::string_view(target.name).substr(0, name.size()) == name &&
                               target.name[name.size()] == '/' &&
                               absl::string_view(target.name).substr(name.size() + 1) == detail;
  if (!match) return;
  const int64_t hit = g_hits.fetch_add(1) + 1;
  if (hit != target.nth) return;
  // Straight to stderr (no logger buffering), then the signal nobody can catch.
  const std::string line = absl::StrCat("COLLM_CRASH_AT: crash point ", target.name, " hit ", hit,
                                        " time(s): killing the process with SIGKILL\n");
  (void)!::write(2, line.data(), line.size());
  ::raise(SIGKILL);
  ::_exit(137);  // Not reached.
}

}  // namespace collm::crash_point_internal
