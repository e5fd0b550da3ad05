// The architecture of a Llama-family checkpoint, parsed from Hugging Face `config.json`.
#ifndef COLLM_RUNTIME_MODEL_CONFIG_H_
#define COLLM_RUNTIME_MODEL_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace collm::runtime {

// RoPE frequency scaling ("rope_scaling" in config.json).
struct RopeScaling {
  std::string type;  // "" (none), "linear" or "llama3".
  double factor = 1.0;
  // llama3 only:
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

// Supported: model_type llama (Llama 2/3, TinyLlama), mistral (full attention: the context is
// capped at sliding_window so the window never applies) and qwen2 (q/k/v bias). Plain value type.
struct ModelConfig {
  std::string model_type = "llama";
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // GQA: divides num_attention_heads.
  int64_t head_dim = 0;             // Defaults to hidden_size / num_attention_heads.
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 2048;  // Context length the runtime allows.
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;  // q/k/v projections have biases (Qwen2; Llama's attention_bias).
  bool o_bias = false;    // o projection has a bias (Llama's attention_bias).
  int32_t bos_token_id = 1;
  std::vector<int32_t> eos_token_ids = {2};
  std::string torch_dtype = "float32";  // As stored; informative only.

  int64_t q_size() const { return num_attention_heads * head_dim; }
  int64_t kv_size() const { return num_key_value_heads * head_dim; }

  // Parses config.json text. Unknown architectures, missing sizes, non-positive or inconsistent
  // values and unsupported features (sliding window smaller than the context is capped, MoE,
  // unknown rope_scaling) give InvalidArgument naming the key.
  static absl::StatusOr<ModelConfig> FromJson(absl::string_view json_text);
  static absl::StatusOr<ModelConfig> FromFile(const std::string& path);

  // Re-checks the invariants FromJson enforces (for configs built in code).
  absl::Status Validate() const;
  // Serializes as an HF config.json (round-trips through FromJson).
  std::string ToJson() const;
};

}  // namespace collm::runtime

#endif  // COLLM_RUNTIME_MODEL_CONFIG_H_
