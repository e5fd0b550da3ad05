#include "collm/engine/sequence.h"

namespace collm::engine {

absl::Status Sequence::DropReason(int64_t now, bool force_cancel, bool queued) const {
  if (cancelled) return absl::CancelledError("request cancelled");
  if (force_cancel) {
    return absl::CancelledError(queued ? "engine shut down before the request ran"
                                       : "engine shut down during the request");
  }
  if (request.deadline_nanos > 0 && now >= request.deadline_nanos) {
    return absl::DeadlineExceededError(queued ? "deadline expired while queued"
                                              : "deadline expired");
  }
  return absl::OkStatus();
}

RequestResult Sequence::Finish(const absl::Status& status, runtime::FinishReason reason,
                               int64_t now) {
  if (detok && status.ok()) {
    std::string tail = stops->stopped() ? "" : stops->Push(detok->Finish());
    if (!stops->stopped()) tail += stops->Finish();
    if (!tail.empty() && sink) sink->OnDelta(tail, {});
  }
  RequestResult r;
  r.status = status;
  r.finish_reason = reason;
  r.prompt_tokens = prompt_size();
  r.completion_tokens = generated;
  if (pin) {
    r.adapter = pin->name;
    r.adapter_version = pin->version;
  }
  r.e2e_seconds = static_cast<double>(now - submit_nanos) * 1e-9;
  if (first_token_nanos > 0) {
    r.ttft_seconds = static_cast<double>(first_token_nanos - submit_nanos) * 1e-9;
    if (generated > 1) {
      r.tpot_seconds = static_cast<double>(last_token_nanos - first_token_nanos) * 1e-9 /
                       static_cast<double>(generated - 1);
    }
  }
  r.slo_met = r.status.ok() && first_token_nanos > 0 &&
              (slo.ttft_ms <= 0 || r.ttft_seconds * 1e3 <= slo.ttft_ms) &&
              (slo.tpot_ms <= 0 || r.tpot_seconds * 1e3 <= slo.tpot_ms);
  return r;
}

}  // namespace collm::engine
