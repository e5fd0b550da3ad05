// One request inside the engine, from submit to finish: what it asked for, where its KV lives,
// how far it got, and its sampler, detokenizer and stop matcher. Created by Engine::Submit, owned
// by the engine's queue and then its running batch; touched only by the engine thread once queued.
#ifndef COLLM_ENGINE_SEQUENCE_H_
#define COLLM_ENGINE_SEQUENCE_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "collm/engine/request.h"
#include "collm/lora/adapter_registry.h"
#include "collm/runtime/kv_cache.h"
#include "collm/runtime/sampler.h"
#include "collm/runtime/tokenizer.h"

namespace collm::engine {

struct Sequence {
  uint64_t id = 0;
  EngineRequest request;
  std::shared_ptr<RequestSink> sink;
  std::shared_ptr<const lora::AdapterSnapshot> pin;  // Null = base model.
  SloTarget slo;
  runtime::SequenceKv kv;
  std::vector<int32_t> context;  // Prompt + generated, for the repetition penalty.
  int64_t prefilled = 0;
  int64_t limit = 0;  // Generated tokens at most (max_tokens capped by the context).
  int64_t generated = 0;
  std::optional<runtime::Sampler> sampler;
  std::optional<runtime::IncrementalDetokenizer> detok;
  std::optional<runtime::StopStringMatcher> stops;
  int64_t submit_nanos = 0, first_token_nanos = 0, last_token_nanos = 0;
  bool cancelled = false;
  // SLO-aware admission predicted it to miss its TTFT objective: it waits behind every queued
  // request that can still make its own (it is still served, never dropped).
  bool deprioritized = false;
  std::optional<runtime::FinishReason> finished;  // Set when EOS or a stop string ended it.

  int64_t prompt_size() const { return static_cast<int64_t>(request.prompt.size()); }
  bool decoding() const { return prefilled == prompt_size(); }

  // Why the sequence must leave now, or OK to keep it: cancelled, `force_cancel` (the shutdown
  // grace is over), or past its deadline at `now_nanos`. `queued` picks the wording.
  absl::Status DropReason(int64_t now_nanos, bool force_cancel, bool queued) const;
  // The result to report when it finishes at `now_nanos` with `status` and `reason`. On OK,
  // first flushes what the detokenizer and stop matcher still hold to the sink.
  RequestResult Finish(const absl::Status& status, runtime::FinishReason reason, int64_t now_nanos);
};

}  // namespace collm::engine

#endif  // COLLM_ENGINE_SEQUENCE_H_
