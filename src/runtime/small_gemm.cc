#include "collm/runtime/small_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define COLLM_SMALL_GEMM_X86 1
#endif

namespace collm::runtime {
namespace {

// Register tile: kTileM activation rows x kTileN weight rows. With AVX2 that is 12 accumulators
// plus 3 weight vectors in the 16 ymm registers; activations are FMA memory operands.
constexpr int kTileM = 4;
constexpr int kTileN = 3;

// Dot products of MR rows of x with NR rows of w over k, written to out[MR * NR] (row-major in
// m). Every implementation has this signature so the driver below is shared.
using TileFn = void (*)(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t k,
                        float* out);

// Portable tile: eight lanes per accumulator, so the compiler vectorises it for the baseline ISA.
template <int MR, int NR>
void TilePortable(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t k, float* out) {
  constexpr int kLanes = 8;
  float acc[MR][NR][kLanes] = {};
  const int64_t k8 = k / kLanes * kLanes;
  for (int64_t p = 0; p < k8; p += kLanes) {
    for (int j = 0; j < NR; ++j) {
      const float* wj = w + j * ldw + p;
      for (int i = 0; i < MR; ++i) {
        const float* xi = x + i * ldx + p;
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) acc[i][j][l] += xi[l] * wj[l];
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      float s = 0.f;
      for (int l = 0; l < kLanes; ++l) s += acc[i][j][l];
      for (int64_t p = k8; p < k; ++p) s += x[i * ldx + p] * w[j * ldw + p];
      out[i * NR + j] = s;
    }
  }
}

#if COLLM_SMALL_GEMM_X86
#define COLLM_AVX2 __attribute__((target("avx2,fma")))

// Eight consecutive f32 weights of one row. A quantized format replaces this with a block
// decoder (int8/int4 -> f32 with the block's scale); nothing else in the tile changes.
COLLM_AVX2 inline __m256 LoadWeights8(const float* w) { return _mm256_loadu_ps(w); }

COLLM_AVX2 inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int MR, int NR>
COLLM_AVX2 void TileAvx2(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t k,
                         float* out) {
  __m256 acc[MR][NR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  }
  const int64_t k8 = k / 8 * 8;
  for (int64_t p = 0; p < k8; p += 8) {
    __m256 wv[NR];
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) wv[j] = LoadWeights8(w + j * ldw + p);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * ldx + p);
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      float s = HorizontalSum(acc[i][j]);
      for (int64_t p = k8; p < k; ++p) s += x[i * ldx + p] * w[j * ldw + p];
      out[i * NR + j] = s;
    }
  }
}
#endif  // COLLM_SMALL_GEMM_X86

// tiles[mr - 1][nr - 1] for the partial tiles at the m and n edges.
struct TileTable {
  TileFn tiles[kTileM][kTileN];
};

template <template <int, int> class Maker>
constexpr TileTable MakeTable() {
  return {{{Maker<1, 1>::fn, Maker<1, 2>::fn, Maker<1, 3>::fn},
           {Maker<2, 1>::fn, Maker<2, 2>::fn, Maker<2, 3>::fn},
           {Maker<3, 1>::fn, Maker<3, 2>::fn, Maker<3, 3>::fn},
           {Maker<4, 1>::fn, Maker<4, 2>::fn, Maker<4, 3>::fn}}};
}
static_assert(kTileM == 4 && kTileN == 3, "MakeTable lists every partial tile shape");

template <int MR, int NR>
struct PortableMaker {
  static constexpr TileFn fn = &TilePortable<MR, NR>;
};
constexpr TileTable kPortableTable = MakeTable<PortableMaker>();

#if COLLM_SMALL_GEMM_X86
template <int MR, int NR>
struct Avx2Maker {
  static constexpr TileFn fn = &TileAvx2<MR, NR>;
};
constexpr TileTable kAvx2Table = MakeTable<Avx2Maker>();
#endif

// Weight rows [n_begin, n_end): each tile of kTileN rows is read from memory once and reused from
// L1 by every group of kTileM activation rows.
void RunRows(const SmallGemmArgs& a, const TileTable& table, int64_t n_begin, int64_t n_end) {
  float out[kTileM * kTileN];
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTileN) {
    const int nr = static_cast<int>(std::min<int64_t>(kTileN, n_end - n0));
    const float* w = a.w + n0 * a.ldw;
    for (int64_t m0 = 0; m0 < a.m; m0 += kTileM) {
      const int mr = static_cast<int>(std::min<int64_t>(kTileM, a.m - m0));
      table.tiles[mr - 1][nr - 1](a.x + m0 * a.ldx, a.ldx, w, a.ldw, a.k, out);
      for (int i = 0; i < mr; ++i) {
        float* y = a.y + (m0 + i) * a.ldy + n0;
        for (int j = 0; j < nr; ++j) {
          float v = out[i * nr + j];
          if (a.bias != nullptr) v += a.bias[n0 + j];
          y[j] = a.accumulate ? y[j] + v : v;
        }
      }
    }
  }
}

std::atomic<int64_t> g_max_rows{kSmallGemmDefaultMaxRows};

}  // namespace

bool SmallGemmHasAvx2() {
#if COLLM_SMALL_GEMM_X86
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

SmallGemmIsa SmallGemmDefaultIsa() {
  return SmallGemmHasAvx2() ? SmallGemmIsa::kAvx2 : SmallGemmIsa::kPortable;
}

void SmallGemm(const SmallGemmArgs& args, SmallGemmIsa isa) {
  if (args.m <= 0 || args.n <= 0) return;
  if (isa == SmallGemmIsa::kAuto) isa = SmallGemmDefaultIsa();
  const TileTable* table = &kPortableTable;
#if COLLM_SMALL_GEMM_X86
  if (isa == SmallGemmIsa::kAvx2 && SmallGemmHasAvx2()) table = &kAvx2Table;
#endif
  // Split n into whole tiles, at least ~64 KiB of weights per task so small layers stay on one
  // thread (a fork costs more than streaming them).
  const int64_t num_tiles = (args.n + kTileN - 1) / kTileN;
  const int64_t grain = std::max<int64_t>(1, (16384 / std::max<int64_t>(1, args.k)) / kTileN);
  at::parallel_for(0, num_tiles, grain, [&](int64_t begin, int64_t end) {
    RunRows(args, *table, begin * kTileN, std::min(args.n, end * kTileN));
  });
}

int64_t SmallGemmMaxRows() { return g_max_rows.load(std::memory_order_relaxed); }

void SetSmallGemmMaxRows(int64_t rows) {
  g_max_rows.store(std::max<int64_t>(0, rows), std::memory_order_relaxed);
}

}  // namespace collm::runtime
