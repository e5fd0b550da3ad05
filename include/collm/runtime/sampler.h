// Per-request token sampling on CPU float logits: repetition penalty, temperature, top-k, top-p,
// min-p, seeded RNG; and stop-string detection on the streamed text.
#ifndef COLLM_RUNTIME_SAMPLER_H_
#define COLLM_RUNTIME_SAMPLER_H_

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace collm::runtime {

struct SamplingParams {
  float temperature = 1.0f;         // 0 = greedy (argmax). Must be >= 0.
  int top_k = 0;                    // Keep the k most likely tokens; 0 = off. Must be >= 0.
  float top_p = 1.0f;               // Nucleus mass in (0, 1]; 1 = off.
  float min_p = 0.0f;               // Drop tokens with p < min_p * p_max; in [0, 1); 0 = off.
  float repetition_penalty = 1.0f;  // HF/CTRL rule on tokens already in context; > 0; 1 = off.
  uint64_t seed = 0;                // Same seed + same logits -> same tokens.
  int max_tokens = 128;             // Generated tokens at most; > 0.
  std::vector<std::string> stop;    // Generation ends before the first occurrence of any.
  bool ignore_eos = false;          // Keep going past EOS (benchmarks force output lengths).

  // InvalidArgument naming the field and value ("top_p must be in (0, 1], got 1.5").
  absl::Status Validate() const;
};

// Samples one token at a time for one request. Not thread-safe; one per request.
class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);

  // Picks the next token from `logits` (the model's raw output for the last position; modified in
  // place). `context` holds the prompt and the tokens generated so far (for the repetition
  // penalty). REQUIRES: logits non-empty.
  int32_t Sample(absl::Span<float> logits, absl::Span<const int32_t> context);

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> scratch_;
};

// Watches streamed text for stop strings. Holds back any tail of the text that could still be the
// start of a stop string, so a client never sees part of a stop string. Not thread-safe.
class StopStringMatcher {
 public:
  explicit StopStringMatcher(std::vector<std::string> stop);

  // Appends `delta`; returns the text safe to emit now. After a stop string is found, stopped()
  // is true and the returned text ends right before it; later calls return "".
  std::string Push(const std::string& delta);
  // Returns the held-back text at the end of generation (never part of a found stop string).
  std::string Finish();
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stop_;
  std::string pending_;
  bool stopped_ = false;
};

}  // namespace collm::runtime

#endif  // COLLM_RUNTIME_SAMPLER_H_
