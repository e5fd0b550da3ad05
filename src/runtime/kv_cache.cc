#include "collm/runtime/kv_cache.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "absl/strings/str_cat.h"
#include "collm/common/check.h"

namespace collm::runtime {

absl::StatusOr<std::unique_ptr<KvCache>> KvCache::Create(const ModelConfig& config,
                                                         const KvCacheOptions& options,
                                                         const ResolvedRuntime& runtime) {
  if (options.block_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv_cache.block_size must be > 0, got ", options.block_size));
  }
  const int64_t elem = c10::elementSize(runtime.dtype);
  const int64_t block_bytes =
      2 * config.num_hidden_layers * options.block_size * config.kv_size() * elem;
  int64_t num_blocks = options.num_blocks;
  if (num_blocks < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv_cache.num_blocks must be >= 0, got ", num_blocks));
  }
  if (num_blocks == 0) num_blocks = options.max_bytes / block_bytes;
  if (num_blocks <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("kv_cache.max_bytes (", options.max_bytes,
                                                   ") is smaller than one block (", block_bytes,
                                                   " bytes)"));
  }
  std::unique_ptr<KvCache> cache(new KvCache());
  cache->block_size_ = options.block_size;
  cache->num_blocks_ = num_blocks;
  cache->bytes_ = num_blocks * block_bytes;
  try {
    auto opts = at::TensorOptions().dtype(runtime.dtype).device(runtime.device);
    for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
      // Zeroed so a (buggy) read of an unwritten slot gives zeros, never NaN garbage.
      cache->keys_.push_back(at::zeros(
          {num_blocks, options.block_size, config.num_key_value_heads, config.head_dim}, opts));
      cache->values_.push_back(at::zeros_like(cache->keys_.back()));
    }
  } catch (const c10::Error& e) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "cannot allocate the KV cache (", cache->bytes_, " bytes): ", e.what_without_backtrace()));
  }
  cache->free_.reserve(num_blocks);
  for (int64_t b = num_blocks - 1; b >= 0; --b) cache->free_.push_back(static_cast<int32_t>(b));
  return cache;
}

int64_t KvCache::BlocksNeeded(const SequenceKv& seq, int64_t total_tokens) const {
  int64_t have = static_cast<int64_t>(seq.blocks.size());
  return std::max<int64_t>(0, BlocksFor(total_tokens) - have);
}

absl::Status KvCache::Reserve(SequenceKv& seq, int64_t total_tokens) {
  const int64_t need = BlocksNeeded(seq, total_tokens);
  if (need > num_free_blocks()) {
    return absl::ResourceExhaustedError(absl::StrCat("KV cache full: need ", need, " more blocks, ",
                                                     num_free_blocks(), " free of ", num_blocks_));
  }
  for (int64_t i = 0; i < need; ++i) {
    seq.blocks.push_back(free_.back());
    free_.pop_back();
  }
  return absl::OkStatus();
}

void KvCache::Release(SequenceKv& seq) {
  for (int32_t b : seq.blocks) free_.push_back(b);
  COLLM_CHECK(static_cast<int64_t>(free_.size()) <= num_blocks_);
  seq.blocks.clear();
  seq.length = 0;
}

void KvCache::Truncate(SequenceKv& seq, int64_t new_length) {
  COLLM_CHECK(new_length >= 0);
  if (new_length < seq.length) seq.length = new_length;
}

}  // namespace collm::runtime
