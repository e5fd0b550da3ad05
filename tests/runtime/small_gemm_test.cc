// SmallGemm against at::matmul on odd shapes (k and n not multiples of the vector width or the
// register tile, every m from 1 to 17, strided activations and outputs, bias, accumulation), on
// both the AVX2 and the portable implementation; and the decoder's output unchanged by it.
#include "collm/runtime/small_gemm.h"

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "collm/runtime/kv_cache.h"
#include "collm/runtime/llama_model.h"
#include "gtest/gtest.h"
#include "testing/tiny_model.h"

namespace collm::runtime {
namespace {

std::vector<SmallGemmIsa> Isas() {
  std::vector<SmallGemmIsa> isas = {SmallGemmIsa::kPortable};
  if (SmallGemmHasAvx2()) isas.push_back(SmallGemmIsa::kAvx2);
  return isas;
}

std::string IsaName(SmallGemmIsa isa) {
  return isa == SmallGemmIsa::kAvx2 ? "avx2" : isa == SmallGemmIsa::kPortable ? "portable" : "auto";
}

// Runs SmallGemm on x [m, k] (a view with row stride ldx), w [n, k] and returns y [m, n].
at::Tensor Gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, at::Tensor y,
                bool accumulate, SmallGemmIsa isa) {
  SmallGemmArgs a;
  a.m = x.size(0);
  a.n = w.size(0);
  a.k = w.size(1);
  a.x = x.data_ptr<float>();
  a.ldx = x.stride(0);
  a.w = w.data_ptr<float>();
  a.ldw = w.stride(0);
  a.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  a.y = y.data_ptr<float>();
  a.ldy = y.stride(0);
  a.accumulate = accumulate;
  SmallGemm(a, isa);
  return y;
}

TEST(SmallGemmTest, MatchesMatmulOnOddShapesAndEveryRowCount) {
  at::manual_seed(7);
  const std::vector<std::pair<int64_t, int64_t>> nk = {{1, 1},     {2, 7},     {3, 8},   {5, 9},
                                                       {7, 17},    {13, 31},   {64, 64}, {97, 133},
                                                       {257, 300}, {1000, 288}};
  for (SmallGemmIsa isa : Isas()) {
    for (auto [n, k] : nk) {
      for (int64_t m = 1; m <= 17; ++m) {
        SCOPED_TRACE(IsaName(isa) + " m=" + std::to_string(m) + " n=" + std::to_string(n) +
                     " k=" + std::to_string(k));
        // x is a column slice of a wider matrix, so its rows are strided.
        at::Tensor wide = at::randn({m, k + 5});
        at::Tensor x = wide.narrow(1, 3, k);
        at::Tensor w = at::randn({n, k});
        at::Tensor y = Gemm(x, w, at::Tensor(), at::full({m, n}, 1e30f), false, isa);
        at::Tensor want = at::matmul(x, w.t());
        const double tol = 1e-5 * std::sqrt(static_cast<double>(k)) + 1e-6;
        EXPECT_TRUE(at::allclose(y, want, tol, tol))
            << "max err " << (y - want).abs().max().item<float>();
      }
    }
  }
}

TEST(SmallGemmTest, AddsBiasAndAccumulatesIntoStridedOutput) {
  at::manual_seed(8);
  for (SmallGemmIsa isa : Isas()) {
    SCOPED_TRACE(IsaName(isa));
    const int64_t m = 6, n = 23, k = 45;
    at::Tensor x = at::randn({m, k});
    at::Tensor w = at::randn({n, k});
    at::Tensor bias = at::randn({n});
    // y is a column slice of a wider buffer: columns outside it must stay untouched.
    at::Tensor buffer = at::randn({m, n + 4});
    const at::Tensor before = buffer.clone();
    at::Tensor y = buffer.narrow(1, 2, n);
    Gemm(x, w, bias, y, /*accumulate=*/true, isa);
    const at::Tensor want = before.narrow(1, 2, n) + at::matmul(x, w.t()) + bias;
    EXPECT_TRUE(at::allclose(y, want, 1e-4, 1e-4));
    EXPECT_TRUE(at::equal(buffer.narrow(1, 0, 2), before.narrow(1, 0, 2)));
    EXPECT_TRUE(at::equal(buffer.narrow(1, n + 2, 2), before.narrow(1, n + 2, 2)));

    at::Tensor fresh = Gemm(x, w, bias, at::full({m, n}, 1e30f), /*accumulate=*/false, isa);
    EXPECT_TRUE(at::allclose(fresh, at::matmul(x, w.t()) + bias, 1e-4, 1e-4));
  }
}

TEST(SmallGemmTest, PortableAndAvx2AgreeOnALargeProjection) {
  if (!SmallGemmHasAvx2()) GTEST_SKIP() << "no AVX2/FMA on this CPU";
  at::manual_seed(9);
  // Large enough that at::parallel_for splits n over threads.
  at::Tensor x = at::randn({16, 771});
  at::Tensor w = at::randn({2051, 771});
  at::Tensor a = Gemm(x, w, at::Tensor(), at::empty({16, 2051}), false, SmallGemmIsa::kAvx2);
  at::Tensor p = Gemm(x, w, at::Tensor(), at::empty({16, 2051}), false, SmallGemmIsa::kPortable);
  EXPECT_TRUE(at::allclose(a, p, 1e-3, 1e-3));
  EXPECT_TRUE(at::allclose(a, at::matmul(x, w.t()), 1e-3, 1e-3));
}

TEST(SmallGemmTest, EmptyShapesWriteNothing) {
  float y = 42.f;
  SmallGemmArgs a;
  a.m = 0;
  a.n = 1;
  a.k = 4;
  a.y = &y;
  SmallGemm(a);
  EXPECT_EQ(y, 42.f);
}

// The decoder's logits are the same (within f32 rounding) with SmallGemm on or off, for decode
// batches from 1 row up to past the threshold.
TEST(SmallGemmTest, DecoderLogitsMatchLibtorchPath) {
  auto loaded = LlamaModel::Load(testing::TinyModelDir(), RuntimeOptions{});
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const auto& model = *loaded;
  ASSERT_TRUE(model->uses_fused_cpu_kernels());
  auto logits = [&](int64_t rows) {
    auto cache = KvCache::Create(model->config(), {16, 64, 0}, model->runtime()).value();
    std::vector<SequenceKv> seqs(rows);
    StepBatch batch;
    for (int64_t r = 0; r < rows; ++r) {
      EXPECT_TRUE(cache->Reserve(seqs[r], 3).ok());
      for (int32_t t : {5, 9, static_cast<int32_t>(r + 3)}) batch.tokens.push_back(t);
      batch.sequences.push_back({&seqs[r], 3, false});
    }
    return model->Forward(batch, *cache).value();
  };
  for (int64_t rows : {1, 2, 5, 17}) {
    SetSmallGemmMaxRows(0);
    const at::Tensor want = logits(rows);
    SetSmallGemmMaxRows(kSmallGemmDefaultMaxRows);
    const at::Tensor got = logits(rows);
    EXPECT_TRUE(at::allclose(got, want, 1e-4, 1e-4)) << rows << " sequences";
  }
}

}  // namespace
}  // namespace collm::runtime
