#include "collm/runtime/kv_cache.h"

#include <ATen/ATen.h>

#include "collm/runtime/random_model.h"
#include "gtest/gtest.h"

namespace collm::runtime {
namespace {

TEST(KvCacheTest, ReserveAndReleaseAccountBlocks) {
  auto cache = KvCache::Create(TinyLlamaConfig(), {16, 10, 0}, ResolvedRuntime{}).value();
  EXPECT_EQ(cache->num_blocks(), 10);
  EXPECT_EQ(cache->num_free_blocks(), 10);
  EXPECT_EQ(cache->keys(0).sizes(), (std::vector<int64_t>{10, 16, 2, 16}));
  SequenceKv a, b;
  ASSERT_TRUE(cache->Reserve(a, 17).ok());  // 2 blocks.
  EXPECT_EQ(a.blocks.size(), 2u);
  ASSERT_TRUE(cache->Reserve(a, 32).ok());  // Still 2.
  EXPECT_EQ(cache->num_free_blocks(), 8);
  ASSERT_TRUE(cache->Reserve(b, 128).ok());
  EXPECT_EQ(cache->num_free_blocks(), 0);
  cache->Release(a);
  EXPECT_TRUE(a.blocks.empty());
  EXPECT_EQ(a.length, 0);
  EXPECT_EQ(cache->num_free_blocks(), 2);
}

TEST(KvCacheTest, ExhaustionChangesNothing) {
  auto cache = KvCache::Create(TinyLlamaConfig(), {16, 4, 0}, ResolvedRuntime{}).value();
  SequenceKv a;
  ASSERT_TRUE(cache->Reserve(a, 16).ok());
  absl::Status s = cache->Reserve(a, 16 * 5);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(a.blocks.size(), 1u);
  EXPECT_EQ(cache->num_free_blocks(), 3);
  EXPECT_EQ(cache->BlocksNeeded(a, 16 * 4), 3);
}

TEST(KvCacheTest, SizedByMemoryBound) {
  const ModelConfig c = TinyLlamaConfig();
  const int64_t block_bytes = 2 * c.num_hidden_layers * 16 * c.kv_size() * 4;
  auto cache = KvCache::Create(c, {16, 0, block_bytes * 7 + 5}, ResolvedRuntime{}).value();
  EXPECT_EQ(cache->num_blocks(), 7);
  EXPECT_EQ(cache->bytes(), block_bytes * 7);
  auto too_small = KvCache::Create(c, {16, 0, block_bytes - 1}, ResolvedRuntime{});
  EXPECT_EQ(too_small.status().code(), absl::StatusCode::kInvalidArgument);
  auto bad_block = KvCache::Create(c, {0, 4, 0}, ResolvedRuntime{});
  EXPECT_NE(std::string(bad_block.status().message()).find("block_size"), std::string::npos);
}

}  // namespace
}  // namespace collm::runtime
