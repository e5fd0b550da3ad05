// Named crash points for fault-injection tests: with COLLM_CRASH_AT=<name>[:<nth>] in the
// environment, the process SIGKILLs itself the nth time (default 1) execution reaches
// CrashPoint(<name>), the way a power cut or kill -9 would stop it there. Compiled into every
// build; when the variable is unset a crash point costs one predictable branch.
//
// Names (docs/reliability.md lists where each one sits):
//   upload_chunk          the aggregator received a data chunk of an UploadUpdate stream
//   update_accepted       an update passed validation, nothing of it persisted yet
//   update_stored         its adapter files are written, round.json does not list it yet
//   update_recorded       round.json lists it, the upload is not yet answered
//   aggregating           a round's aggregate is computed, nothing of it written
//   global_written        the new global version's files are written, the round not yet closed
//   round_closed          round.json says done, status.json still has the old version
//   rename/<file name>    inside an atomic file write: the temporary file is complete and
//                         fsynced, not yet renamed over <file name> (e.g. rename/status.json)
#ifndef COLLM_COMMON_CRASH_POINT_H_
#define COLLM_COMMON_CRASH_POINT_H_

#include "absl/strings/string_view.h"

namespace collm {
namespace crash_point_internal {
// True when COLLM_CRASH_AT was set at start-up (read once, before main).
extern const bool kArmed;
void Reached(absl::string_view name, absl::string_view detail);
}  // namespace crash_point_internal

// Crashes here when COLLM_CRASH_AT names `name` (or "<name>/<detail>" when `detail` is not
// empty) and this is its nth hit. Thread-safe.
inline void CrashPoint(absl::string_view name, absl::string_view detail = {}) {
  if (__builtin_expect(crash_point_internal::kArmed, 0))
    crash_point_internal::Reached(name, detail);
}

}  // namespace collm

#endif  // COLLM_COMMON_CRASH_POINT_H_
