#include "collm/coordination/share_controller.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace collm::coordination {
namespace {

absl::Status Bad(const char* field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("engine.share_controller.", field, " ", what));
}

}  // namespace

absl::Status ValidateShareControllerOptions(const ShareControllerOptions& o) {
  // Written as !(ok) so NaN fails every check.
  if (!(o.surge_factor > 1 && std::isfinite(o.surge_factor))) {
    return Bad("surge_factor", absl::StrCat("must be a finite number > 1, got ", o.surge_factor));
  }
  if (!(o.surge_min_rps >= 0 && std::isfinite(o.surge_min_rps))) {
    return Bad("surge_min_rps",
               absl::StrCat("must be a finite number >= 0, got ", o.surge_min_rps));
  }
  if (!(o.surge_hold_ms >= 0 && std::isfinite(o.surge_hold_ms))) {
    return Bad("surge_hold_ms",
               absl::StrCat("must be a finite number >= 0, got ", o.surge_hold_ms));
  }
  if (!(o.headroom_full > 0 && o.headroom_full <= 1)) {
    return Bad("headroom_full", absl::StrCat("must be in (0, 1], got ", o.headroom_full));
  }
  if (!(o.headroom_zero >= 0 && o.headroom_zero < o.headroom_full)) {
    return Bad("headroom_zero", absl::StrCat("must be in [0, headroom_full = ", o.headroom_full,
                                             "), got ", o.headroom_zero));
  }
  if (!(o.recover_seconds >= 0 && std::isfinite(o.recover_seconds))) {
    return Bad("recover_seconds",
               absl::StrCat("must be a finite number >= 0, got ", o.recover_seconds));
  }
  return absl::OkStatus();
}

const char* ShareReasonName(ShareDecision::Reason reason) {
  switch (reason) {
    case ShareDecision::Reason::kCeiling:
      return "ceiling";
    case ShareDecision::Reason::kSurge:
      return "surge";
    case ShareDecision::Reason::kHeadroom:
      return "slo_headroom";
    case ShareDecision::Reason::kRecovering:
      return "recovering";
  }
  return "ceiling";
}

ShareController::ShareController(const ShareControllerOptions& options, Clock& clock)
    : options_(options), clock_(&clock) {}

bool ShareController::IsSurge(double arrival_rate, double forecast_rate) const {
  const double forecast = std::max(0.0, forecast_rate);
  return arrival_rate > options_.surge_factor * forecast &&
         arrival_rate - forecast >= options_.surge_min_rps;
}

ShareDecision ShareController::Update(const ShareSignals& s) {
  const int64_t now = clock_->NowNanos();
  const double ceiling = std::clamp(s.ceiling, 0.0, 1.0);
  ShareDecision d;
  if (!options_.enabled) {
    d.share = ceiling;
    last_share_ = ceiling;
    last_nanos_ = now;
    return d;
  }
  // Surge: yield at once; the hold starts when the rate falls back under the threshold.
  const bool surge_now = IsSurge(s.arrival_rate, s.forecast_rate);
  if (surge_now) {
    d.surge_started = !surging_;
    surging_ = true;
  } else if (surging_) {
    surging_ = false;
    surge_end_nanos_ = now;
  }
  const bool holding = !surging_ && surge_end_nanos_ > 0 &&
                       static_cast<double>(now - surge_end_nanos_) * 1e-6 < options_.surge_hold_ms;
  double target = ceiling;
  if (surging_ || holding) {
    target = 0;
    d.reason = ShareDecision::Reason::kSurge;
  } else if (s.slo_headroom < options_.headroom_full) {
    const double f = (s.slo_headroom - options_.headroom_zero) /
                     (options_.headroom_full - options_.headroom_zero);
    target = ceiling * std::clamp(f, 0.0, 1.0);
    d.reason = ShareDecision::Reason::kHeadroom;
  }
  // Down at once, up at a bounded rate.
  double share = target;
  // A ceiling raised by the slow timescale applies at once; only a yield or a cut recovers slowly.
  if (last_share_ >= 0 && target > last_share_ && options_.recover_seconds > 0 &&
      last_reason_ != ShareDecision::Reason::kCeiling) {
    const double dt = static_cast<double>(std::max<int64_t>(0, now - last_nanos_)) * 1e-9;
    const double rise = ceiling * dt / options_.recover_seconds;
    if (last_share_ + rise < target) {
      share = last_share_ + rise;
      d.reason = ShareDecision::Reason::kRecovering;
    }
  }
  d.share = std::clamp(share, 0.0, ceiling);
  last_share_ = d.share;
  last_reason_ = d.reason;
  last_nanos_ = now;
  return d;
}

}  // namespace collm::coordination
