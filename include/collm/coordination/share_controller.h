// The per-step training-share controller (fast timescale): inside the share ceiling the slow
// timescale set (a round's ceiling during a task, engine.training_share otherwise), it sets the
// share the co-execution policy aims for at every engine step from measured slack:
//   - load surge: when the device's own arrival rate (1 s decayed) jumps past the forecast the
//     ceiling was planned for, training yields at once (share 0) and stays yielded while the
//     surge lasts, plus a hold time;
//   - SLO headroom: the tightest queued or running request's remaining slack as a fraction of its
//     objective scales the share between headroom_zero (no training) and headroom_full (the whole
//     ceiling);
//   - the share falls at once and climbs back at most ceiling / recover_seconds per second, so a
//     lull between bursts does not hand the engine back to training in one step.
// The SLO guard (CoExecutionPolicy) stays the hard safety: this decides how much, the guard
// whether the next piece of work fits. Pure policy: plain structs in, a decision out, time from an
// injected Clock; no I/O, no threads.
#ifndef COLLM_COORDINATION_SHARE_CONTROLLER_H_
#define COLLM_COORDINATION_SHARE_CONTROLLER_H_

#include <cstdint>

#include "absl/status/status.h"
#include "collm/common/clock.h"

namespace collm::coordination {

struct ShareControllerOptions {
  bool enabled = true;  // false = the share is the ceiling at every step (no fast control).
  // A surge: the 1 s arrival rate is above surge_factor x the forecast AND at least
  // surge_min_rps above it (so a handful of requests on an idle device is not a surge).
  double surge_factor = 2.0;     // > 1.
  double surge_min_rps = 2.0;    // >= 0.
  double surge_hold_ms = 500;    // Stay yielded this long after the surge ends; >= 0.
  double headroom_full = 0.5;    // SLO headroom at or above which the whole ceiling is used; <= 1.
  double headroom_zero = 0.1;    // At or below which no training is wanted; < headroom_full.
  double recover_seconds = 1.0;  // From 0 back to the ceiling at the fastest; >= 0 (0 = at once).
};

// InvalidArgument naming the field as configured ("engine.share_controller.<field>").
absl::Status ValidateShareControllerOptions(const ShareControllerOptions& options);

// What the controller sees at a step boundary.
struct ShareSignals {
  double ceiling = 0;        // The slow timescale's share ceiling, in [0, 1].
  double slo_headroom = 1;   // CoExecutionPolicy::SloHeadroom: min over requests of slack /
                             // objective (<= 1; 1 = no request with an objective).
  double arrival_rate = 0;   // Requests/s now, decayed over ~1 s (LoadRates::ShortRate).
  double forecast_rate = 0;  // Requests/s the ceiling was planned for (>= 0).
};

struct ShareDecision {
  enum class Reason {
    kCeiling,     // The whole ceiling.
    kSurge,       // Yielded: load jumped past the forecast (or the hold after one).
    kHeadroom,    // Scaled down by the SLO headroom.
    kRecovering,  // Climbing back toward the ceiling after a yield or a cut.
  };
  double share = 0;  // In [0, ceiling].
  Reason reason = Reason::kCeiling;
  bool surge_started = false;  // This step began a surge (counted as a yield).
};

const char* ShareReasonName(ShareDecision::Reason reason);

// Not thread-safe: owned by the engine thread.
class ShareController {
 public:
  // REQUIRES: ValidateShareControllerOptions(options).ok().
  ShareController(const ShareControllerOptions& options, Clock& clock);

  // The share for the next step, at the current clock time.
  ShareDecision Update(const ShareSignals& signals);

  // Whether `arrival_rate` is a surge over `forecast_rate` under these options.
  bool IsSurge(double arrival_rate, double forecast_rate) const;
  const ShareControllerOptions& options() const { return options_; }

 private:
  ShareControllerOptions options_;
  Clock* clock_;
  bool surging_ = false;
  int64_t surge_end_nanos_ = 0;  // When the last surge ended (the hold runs from here).
  double last_share_ = -1;       // < 0 = no decision yet.
  int64_t last_nanos_ = 0;
  ShareDecision::Reason last_reason_ = ShareDecision::Reason::kCeiling;
};

}  // namespace collm::coordination

#endif  // COLLM_COORDINATION_SHARE_CONTROLLER_H_
