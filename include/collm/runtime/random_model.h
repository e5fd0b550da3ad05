// Writes a Llama checkpoint with random weights in the Hugging Face layout (config.json,
// model.safetensors, optionally tokenizer.model). Used by tests, benchmarks (real shapes, random
// values) and the offline default of `collmctl generate`, so nothing needs downloading.
#ifndef COLLM_RUNTIME_RANDOM_MODEL_H_
#define COLLM_RUNTIME_RANDOM_MODEL_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "collm/runtime/model_config.h"
#include "collm/runtime/safetensors.h"

namespace collm::runtime {

struct RandomModelOptions {
  ModelConfig config;                     // Shapes to write.
  StoredDType dtype = StoredDType::kF32;  // Stored element type.
  uint64_t seed = 0;                      // Same seed -> byte-identical files.
  float init_std = 0.05f;                 // Normal std of projection weights; norms are ~1.
  bool write_tokenizer = true;            // Train and write tokenizer.model (vocab must be
                                          // in [300, 2000]).
  bool write_untied_lm_head = false;      // Also store lm_head.weight when tied (as HF does
                                          // for some checkpoints).
};

// The tiny shape used by unit tests and the offline demo: 2 layers, hidden 64, 4 query heads
// sharing 2 KV heads (GQA), SwiGLU 176, vocab 512, context 256, tied embeddings.
ModelConfig TinyLlamaConfig();

// Creates `dir` if needed and writes the checkpoint there.
absl::Status WriteRandomModel(const std::string& dir, const RandomModelOptions& options);

}  // namespace collm::runtime

#endif  // COLLM_RUNTIME_RANDOM_MODEL_H_
