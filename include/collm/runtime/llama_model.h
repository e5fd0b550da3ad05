// The Llama-family decoder (Llama 2/3, TinyLlama, Mistral, Qwen2) on libtorch: RMSNorm, RoPE in
// the HF rotate-half convention, grouped-query attention over a paged KV cache, SwiGLU MLP.
//
// One step runs a batch of sequences of different lengths together: the new tokens of all
// sequences are flattened into one [T, hidden] activation so every projection is one GEMM (or one
// GEMV at T == 1, which streams weights ~2x faster than a 1-row GEMM on CPU); only attention is
// per sequence. Prefill, chunked prefill and decode are the same call.
#ifndef COLLM_RUNTIME_LLAMA_MODEL_H_
#define COLLM_RUNTIME_LLAMA_MODEL_H_

#include <ATen/core/TensorBody.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "collm/runtime/device.h"
#include "collm/runtime/kv_cache.h"
#include "collm/runtime/lora_weights.h"
#include "collm/runtime/model_config.h"
#include "collm/runtime/weight_matrix.h"

namespace collm::runtime {

// One sequence's share of a step: `num_tokens` new tokens, taken in order from StepBatch::tokens,
// at positions kv->length ... kv->length + num_tokens - 1.
struct SequenceStep {
  SequenceKv* kv = nullptr;
  int64_t num_tokens = 0;
  bool all_logits = false;  // Logits for every new token (scoring); else only the last one.
  // Unmerged LoRA adapter for this sequence's tokens; null = base model. Sequences sharing an
  // adapter are grouped into one delta GEMM pair per projection (best when they are adjacent).
  // Must stay alive for the call.
  const LoraWeights* adapter = nullptr;
};

struct StepBatch {
  std::vector<int32_t> tokens;
  std::vector<SequenceStep> sequences;
};

struct ForwardOptions {
  // Use the plain torch-op implementation even where the fused CPU kernels apply. The two must
  // agree; tests compare them, and non-CPU or non-f32 runtimes always use the torch ops.
  bool force_reference = false;
};

// The decoder weights, converted to the runtime's device and dtype at load. Immutable after
// construction and shared as shared_ptr<const LlamaModel>; Forward is const and thread-compatible
// (concurrent calls must use distinct KV caches and sequences).
class LlamaModel {
 public:
  // Loads a Hugging Face model directory: config.json plus model.safetensors or
  // model.safetensors.index.json. Errors name the file and tensor (missing tensor, wrong shape,
  // corrupt file).
  static absl::StatusOr<std::shared_ptr<const LlamaModel>> Load(const std::string& dir,
                                                                const RuntimeOptions& options);

  // Builds a model from HF-named tensors (any float dtype, any device); `source` names where they
  // came from in error messages. Used by Load and by benchmarks that make random weights in memory.
  // Takes the map by value and releases each layer's tensors once they are fused, so a caller
  // that moves its map in peaks at about one model plus one layer.
  static absl::StatusOr<std::shared_ptr<const LlamaModel>> FromTensors(
      const ModelConfig& config, std::map<std::string, at::Tensor> tensors,
      const ResolvedRuntime& runtime, const std::string& source);

  const ModelConfig& config() const { return config_; }
  const ResolvedRuntime& runtime() const { return runtime_; }
  // Bytes of weights held (tied embeddings counted once).
  int64_t parameter_bytes() const;

  // Runs one step: appends the new tokens' keys/values to each sequence's cache, advances
  // kv->length, and returns float32 CPU logits with one row per sequence (its last new token), or
  // one row per new token for sequences with all_logits, in sequence order.
  // Invalid batches (token ids outside the vocabulary, counts that don't add up, positions past
  // the context, caches not Reserve()d) give InvalidArgument and change nothing.
  absl::StatusOr<at::Tensor> Forward(const StepBatch& batch, KvCache& cache,
                                     const ForwardOptions& options = {}) const;

  // Whether Forward uses the fused CPU kernels (CPU, f32) by default.
  bool uses_fused_cpu_kernels() const;

  // Dense causal forward over a [batch, length] int64 token tensor (right-padded rows are fine:
  // padding only follows real tokens), for training and evaluation. Returns float32 logits
  // [batch, length, vocab] on the model's device. Autograd flows into `adapter`'s tensors (when
  // they require grad); the base weights are constants. `lora_dropout` applies to the adapter's
  // input only and only when `training`.
  absl::StatusOr<at::Tensor> DenseLogits(const at::Tensor& tokens, const LoraWeights* adapter,
                                         double lora_dropout = 0.0, bool training = false) const;

  // DenseLogits in stages, so a caller (the co-execution scheduler) can run other work between
  // layers and backpropagate one layer at a time: DenseBegin validates and embeds, DenseLayer runs
  // decoder layer `layer` on the hidden state [batch, length, hidden], DenseHead gives the f32
  // logits. DenseLogits == DenseHead(DenseLayer(...DenseBegin...)).
  struct DenseContext {
    at::Tensor cos, sin, mask;  // RoPE tables and the causal mask for this length.
    at::Tensor hidden;          // Embeddings after DenseBegin.
  };
  absl::StatusOr<DenseContext> DenseBegin(const at::Tensor& tokens) const;
  absl::StatusOr<at::Tensor> DenseLayer(const DenseContext& ctx, int64_t layer,
                                        const at::Tensor& hidden, const LoraWeights* adapter,
                                        double lora_dropout, bool training) const;
  absl::StatusOr<at::Tensor> DenseHead(const at::Tensor& hidden) const;

  // The base weight of one projection, [out, in] (a view into the fused storage, or a dequantized
  // f32 copy when runtime.weights is int8/int4). For merging adapters in tests and tools.
  at::Tensor BaseWeight(int64_t layer, LoraTarget target) const;

 private:
  struct Layer {
    at::Tensor attn_norm;    // [hidden]
    WeightMatrix w_qkv;      // [q + 2 kv, hidden]: q_proj, k_proj, v_proj stacked.
    at::Tensor b_qkv;        // [q + 2 kv] or undefined.
    WeightMatrix w_o;        // [hidden, q]
    at::Tensor b_o;          // [hidden] or undefined.
    at::Tensor ffn_norm;     // [hidden]
    WeightMatrix w_gate_up;  // [2 * intermediate, hidden]: gate_proj, up_proj stacked.
    WeightMatrix w_down;     // [hidden, intermediate]
  };
  struct StepPlan;
  struct AdapterGroup;

  LlamaModel() = default;
  absl::Status Validate(const StepBatch& batch, const KvCache& cache) const;
  at::Tensor ForwardFused(const StepBatch& batch, const StepPlan& plan, KvCache& cache) const;
  at::Tensor ForwardReference(const StepBatch& batch, const StepPlan& plan, KvCache& cache) const;

  ModelConfig config_;
  ResolvedRuntime runtime_;
  // The projections, embedding and head are stored in runtime.weights' format; norms and biases
  // stay in the runtime dtype.
  WeightMatrix embed_;     // [vocab, hidden]
  at::Tensor final_norm_;  // [hidden]
  WeightMatrix lm_head_;   // [vocab, hidden]; the same storage as embed_ when tied.
  std::vector<Layer> layers_;
  std::vector<float> inv_freq_;  // [head_dim / 2], RoPE scaling applied.
};

}  // namespace collm::runtime

#endif  // COLLM_RUNTIME_LLAMA_MODEL_H_
