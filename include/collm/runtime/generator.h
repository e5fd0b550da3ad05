// Runs a set of prompts to completion on one model: batched prefill, then batched decode where
// each sequence leaves the batch as soon as it finishes. The local (non-daemon) generation path of
// `collmctl generate`, tests and benchmarks; the daemon's engine does continuous batching instead.
#ifndef COLLM_RUNTIME_GENERATOR_H_
#define COLLM_RUNTIME_GENERATOR_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "collm/common/clock.h"
#include "collm/runtime/kv_cache.h"
#include "collm/runtime/llama_model.h"
#include "collm/runtime/lora_weights.h"
#include "collm/runtime/sampler.h"
#include "collm/runtime/tokenizer.h"

namespace collm::runtime {

struct GenerationRequest {
  std::vector<int32_t> prompt;  // Token ids, BOS included if wanted. Non-empty.
  SamplingParams params;
  // Unmerged LoRA adapter to serve with; null = base model. Must outlive Generate().
  const LoraWeights* adapter = nullptr;
};

enum class FinishReason { kLength, kEos, kStop };
const char* FinishReasonName(FinishReason reason);  // "length", "eos", "stop".

struct GenerationResult {
  std::vector<int32_t> tokens;  // Generated ids (no EOS; up to the stop string's token).
  std::string text;             // Their text, cut before a stop string. Empty without tokenizer.
  FinishReason finish_reason = FinishReason::kLength;
  double ttft_seconds = 0;  // From Generate() start to this request's first token.
  double total_seconds = 0;
};

struct GeneratorOptions {
  KvCacheOptions kv_cache;      // num_blocks 0 = sized for the requests.
  int64_t prefill_chunk = 512;  // Max prompt tokens per step (long prompts are chunked).
  ForwardOptions forward;
};

// Not thread-safe; the model is shared read-only.
class Generator {
 public:
  // `tokenizer` may be null: then results carry no text and stop strings are not supported.
  Generator(std::shared_ptr<const LlamaModel> model, const Tokenizer* tokenizer,
            GeneratorOptions options = {}, Clock& clock = Clock::Real());

  // Called with each request's new text as it is produced (never part of a stop string).
  using TextCallback = std::function<void(size_t request_index, const std::string& delta)>;

  // InvalidArgument for an empty or too-long prompt, an invalid SamplingParams (naming the
  // field), or stop strings without a tokenizer. Generation stops at EOS (unless ignore_eos), a
  // stop string, max_tokens, or the end of the context (finish reason "length").
  absl::StatusOr<std::vector<GenerationResult>> Generate(
      const std::vector<GenerationRequest>& requests, const TextCallback& on_text = {});

 private:
  std::shared_ptr<const LlamaModel> model_;
  const Tokenizer* tokenizer_;
  GeneratorOptions options_;
  Clock& clock_;
};

}  // namespace collm::runtime

#endif  // COLLM_RUNTIME_GENERATOR_H_
