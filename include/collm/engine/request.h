// What a client hands the engine (EngineRequest, RequestSink) and what it gets back
// (RequestResult), plus the one validation both the engine and the serving layer apply to a
// request before it is queued.
#ifndef COLLM_ENGINE_REQUEST_H_
#define COLLM_ENGINE_REQUEST_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "collm/coordination/co_execution_policy.h"
#include "collm/runtime/generator.h"
#include "collm/runtime/sampler.h"

namespace collm::engine {

// Latency objectives of one request class (the co-execution policy guards them).
using SloTarget = coordination::SloTarget;

struct EngineRequest {
  std::vector<int32_t> prompt;  // Token ids (BOS included if wanted); non-empty.
  runtime::SamplingParams params;
  std::string adapter;         // Registry name; "" = options.default_adapter.
  bool base_model = false;     // No adapter at all, even with a default_adapter; adapter "".
  std::string slo_class;       // "" = options.default_slo.
  int64_t deadline_nanos = 0;  // Engine clock time after which the request is dropped; 0 = none.
};

struct RequestResult {
  absl::Status status;  // OK, Cancelled, DeadlineExceeded, or Internal.
  runtime::FinishReason finish_reason = runtime::FinishReason::kLength;
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  std::string adapter;  // "" = base model.
  int64_t adapter_version = 0;
  double ttft_seconds = 0;  // Submit to first token.
  double tpot_seconds = 0;  // Mean between output tokens after the first.
  double e2e_seconds = 0;
  bool slo_met = false;  // TTFT and TPOT within the request's SLO.
};

// Receives one request's output, on the engine thread: implementations must not block.
class RequestSink {
 public:
  virtual ~RequestSink() = default;
  // New text (never part of a stop string; may be empty when a token completes no character)
  // and the ids that produced it.
  virtual void OnDelta(const std::string& text, const std::vector<int32_t>& ids) = 0;
  // Called exactly once, last.
  virtual void OnFinish(const RequestResult& result) = 0;
};

// What a request is checked against (Engine::request_limits()).
struct RequestLimits {
  int64_t vocab_size = 0;      // Prompt ids must lie in [0, vocab_size).
  int64_t context_size = 0;    // Prompts must be shorter (room for one generated token).
  bool has_tokenizer = false;  // Stop strings need one.
};

// The prompt and sampling checks of a request, in this order: the prompt is non-empty, shorter
// than the context, and every id is inside the vocabulary; every stop string is non-empty and
// stop strings have a tokenizer; the sampling parameters are in range
// (runtime::SamplingParams::Validate). InvalidArgument naming the field, e.g.
// "<prompt_field>[3] = 70000 is outside the vocabulary [0, 32000)" or
// "sampling.top_p must be in (0, 1], got 2". `prompt_field` names the prompt as the caller's
// client knows it (the serving layer passes "prompt_tokens.ids").
absl::Status ValidateRequest(const EngineRequest& request, const RequestLimits& limits,
                             absl::string_view prompt_field = "prompt");

}  // namespace collm::engine

#endif  // COLLM_ENGINE_REQUEST_H_
