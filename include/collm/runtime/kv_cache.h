// Paged KV cache: a fixed pool of blocks, each holding the keys and values of `block_size`
// consecutive positions of one sequence in every layer. A sequence owns a list of blocks (its
// block table); memory is bounded by the pool, so admission control can ask whether a request
// fits before accepting it.
#ifndef COLLM_RUNTIME_KV_CACHE_H_
#define COLLM_RUNTIME_KV_CACHE_H_

#include <ATen/core/TensorBody.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "collm/runtime/device.h"
#include "collm/runtime/model_config.h"

namespace collm::runtime {

// One sequence's view of the cache. `length` positions hold valid keys/values; `blocks` has room
// for at least `length` positions. Owned by whoever owns the sequence (the engine); mutated only
// by KvCache (blocks) and LlamaModel::Forward (length).
struct SequenceKv {
  std::vector<int32_t> blocks;
  int64_t length = 0;
};

struct KvCacheOptions {
  int64_t block_size = 16;  // Positions per block; > 0.
  // Pool size in blocks; 0 = as many as fit in max_bytes.
  int64_t num_blocks = 0;
  int64_t max_bytes = int64_t{512} << 20;  // Memory bound used when num_blocks == 0 (bytes).
};

// Owned by one thread (the engine thread); not thread-safe.
class KvCache {
 public:
  static absl::StatusOr<std::unique_ptr<KvCache>> Create(const ModelConfig& config,
                                                         const KvCacheOptions& options,
                                                         const ResolvedRuntime& runtime);

  int64_t block_size() const { return block_size_; }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t num_free_blocks() const { return static_cast<int64_t>(free_.size()); }
  int64_t bytes() const { return bytes_; }
  // Blocks needed to hold `tokens` positions.
  int64_t BlocksFor(int64_t tokens) const { return (tokens + block_size_ - 1) / block_size_; }
  // Extra blocks `seq` needs to hold `total_tokens` positions.
  int64_t BlocksNeeded(const SequenceKv& seq, int64_t total_tokens) const;

  // Makes `seq` able to hold `total_tokens` positions. ResourceExhausted, with nothing changed,
  // when the pool has too few free blocks.
  absl::Status Reserve(SequenceKv& seq, int64_t total_tokens);
  // Returns every block of `seq` to the pool; `seq` becomes empty.
  void Release(SequenceKv& seq);
  // Forgets positions >= new_length (e.g. to recompute them); keeps the blocks.
  void Truncate(SequenceKv& seq, int64_t new_length);

  // Per-layer storage, [num_blocks, block_size, num_key_value_heads, head_dim].
  at::Tensor& keys(int64_t layer) { return keys_[layer]; }
  at::Tensor& values(int64_t layer) { return values_[layer]; }
  const at::Tensor& keys(int64_t layer) const { return keys_[layer]; }
  int64_t num_layers() const { return static_cast<int64_t>(keys_.size()); }

 private:
  KvCache() = default;

  int64_t block_size_ = 0;
  int64_t num_blocks_ = 0;
  int64_t bytes_ = 0;
  std::vector<int32_t> free_;  // Stack of free block ids.
  std::vector<at::Tensor> keys_;
  std::vector<at::Tensor> values_;
};

}  // namespace collm::runtime

#endif  // COLLM_RUNTIME_KV_CACHE_H_
