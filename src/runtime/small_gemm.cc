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

// Dot products of activation rows m0 .. m0 + MR - 1 with weight rows n0 .. n0 + NR - 1 over k,
// written to out[MR * NR] (row-major in m). Every implementation has this signature so the driver
// below is shared.
using TileFn = void (*)(const SmallGemmArgs& a, int64_t m0, int64_t n0, float* out);

// Weight formats. Each names one weight row (Row), gives weight p of it (At) and, for the
// vectorised tiles, eight consecutive weights starting at a multiple of 8 (Load8 / Load8Avx2).
struct F32Weights {
  using Row = const float*;
  static Row RowOf(const SmallGemmArgs& a, int64_t n) { return a.w + n * a.ldw; }
  static float At(Row r, int64_t p) { return r[p]; }
  static void Load8(Row r, int64_t p, float* out) {
    for (int l = 0; l < 8; ++l) out[l] = r[p + l];
  }
};

struct Int8Weights {
  struct Row {
    const int8_t* q;
    const float* s;
  };
  static Row RowOf(const SmallGemmArgs& a, int64_t n) {
    return {reinterpret_cast<const int8_t*>(a.wq + n * a.ldwq), a.scales + n * a.lds};
  }
  static float At(const Row& r, int64_t p) {
    return r.s[p / kQuantBlock] * static_cast<float>(r.q[p]);
  }
  static void Load8(const Row& r, int64_t p, float* out) {
    const float d = r.s[p / kQuantBlock];
    for (int l = 0; l < 8; ++l) out[l] = d * static_cast<float>(r.q[p + l]);
  }
};

struct Int4Weights {
  struct Row {
    const uint8_t* q;
    const float* s;
  };
  static constexpr int64_t kHalf = kQuantBlock / 2;
  static Row RowOf(const SmallGemmArgs& a, int64_t n) {
    return {a.wq + n * a.ldwq, a.scales + n * a.lds};
  }
  static float At(const Row& r, int64_t p) {
    const int64_t b = p / kQuantBlock, e = p % kQuantBlock;
    const uint8_t byte = r.q[b * kHalf + e % kHalf];
    return r.s[b] * static_cast<float>((e < kHalf ? byte & 0xF : byte >> 4) - 8);
  }
  static void Load8(const Row& r, int64_t p, float* out) {
    const int64_t b = p / kQuantBlock, e = p % kQuantBlock;
    const uint8_t* bytes = r.q + b * kHalf + e % kHalf;
    const int shift = e < kHalf ? 0 : 4;
    const float d = r.s[b];
    for (int l = 0; l < 8; ++l) out[l] = d * static_cast<float>(((bytes[l] >> shift) & 0xF) - 8);
  }
};

// Portable tile: eight lanes per accumulator, so the compiler vectorises it for the baseline ISA.
template <int MR, int NR, class W>
void TilePortable(const SmallGemmArgs& a, int64_t m0, int64_t n0, float* out) {
  constexpr int kLanes = 8;
  typename W::Row rows[NR];
  for (int j = 0; j < NR; ++j) rows[j] = W::RowOf(a, n0 + j);
  const float* x = a.x + m0 * a.ldx;
  const int64_t ldx = a.ldx, k = a.k;
  float acc[MR][NR][kLanes] = {};
  const int64_t k8 = k / kLanes * kLanes;
  for (int64_t p = 0; p < k8; p += kLanes) {
    for (int j = 0; j < NR; ++j) {
      float wj[kLanes];
      W::Load8(rows[j], p, wj);
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
      for (int64_t p = k8; p < k; ++p) s += x[i * ldx + p] * W::At(rows[j], p);
      out[i * NR + j] = s;
    }
  }
}

#if COLLM_SMALL_GEMM_X86
#define COLLM_AVX2 __attribute__((target("avx2,fma")))

COLLM_AVX2 inline __m256 Load8Avx2(F32Weights::Row r, int64_t p) { return _mm256_loadu_ps(r + p); }

COLLM_AVX2 inline __m256 Load8Avx2(const Int8Weights::Row& r, int64_t p) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(r.q + p));
  const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
  return _mm256_mul_ps(q, _mm256_set1_ps(r.s[p / kQuantBlock]));
}

COLLM_AVX2 inline __m256 Load8Avx2(const Int4Weights::Row& r, int64_t p) {
  constexpr int64_t kHalf = Int4Weights::kHalf;
  const int64_t b = p / kQuantBlock, e = p % kQuantBlock;
  const __m128i bytes =
      _mm_loadl_epi64(reinterpret_cast<const __m128i*>(r.q + b * kHalf + e % kHalf));
  // Elements 0..15 of a block are low nibbles, 16..31 high nibbles of the same 16 bytes.
  const __m256i v = _mm256_and_si256(
      _mm256_srlv_epi32(_mm256_cvtepu8_epi32(bytes), _mm256_set1_epi32(e < kHalf ? 0 : 4)),
      _mm256_set1_epi32(0xF));
  const __m256 q = _mm256_cvtepi32_ps(_mm256_sub_epi32(v, _mm256_set1_epi32(8)));
  return _mm256_mul_ps(q, _mm256_set1_ps(r.s[b]));
}

COLLM_AVX2 inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int MR, int NR, class W>
COLLM_AVX2 void TileAvx2(const SmallGemmArgs& a, int64_t m0, int64_t n0, float* out) {
  typename W::Row rows[NR];
#pragma GCC unroll 4
  for (int j = 0; j < NR; ++j) rows[j] = W::RowOf(a, n0 + j);
  const float* x = a.x + m0 * a.ldx;
  const int64_t ldx = a.ldx, k = a.k;
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
    for (int j = 0; j < NR; ++j) wv[j] = Load8Avx2(rows[j], p);
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
      for (int64_t p = k8; p < k; ++p) s += x[i * ldx + p] * W::At(rows[j], p);
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

template <class W>
struct PortableMakers {
  template <int MR, int NR>
  struct Maker {
    static constexpr TileFn fn = &TilePortable<MR, NR, W>;
  };
};

#if COLLM_SMALL_GEMM_X86
template <class W>
struct Avx2Makers {
  template <int MR, int NR>
  struct Maker {
    static constexpr TileFn fn = &TileAvx2<MR, NR, W>;
  };
};
#endif

// [isa][format]: isa 0 = portable, 1 = AVX2; format in WeightFormat order.
constexpr TileTable kTables[][3] = {
    {MakeTable<PortableMakers<F32Weights>::Maker>(),
     MakeTable<PortableMakers<Int8Weights>::Maker>(),
     MakeTable<PortableMakers<Int4Weights>::Maker>()},
#if COLLM_SMALL_GEMM_X86
    {MakeTable<Avx2Makers<F32Weights>::Maker>(), MakeTable<Avx2Makers<Int8Weights>::Maker>(),
     MakeTable<Avx2Makers<Int4Weights>::Maker>()},
#endif
};

// Weight rows [n_begin, n_end): each tile of kTileN rows is read from memory once and reused from
// L1 by every group of kTileM activation rows.
void RunRows(const SmallGemmArgs& a, const TileTable& table, int64_t n_begin, int64_t n_end) {
  float out[kTileM * kTileN];
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTileN) {
    const int nr = static_cast<int>(std::min<int64_t>(kTileN, n_end - n0));
    for (int64_t m0 = 0; m0 < a.m; m0 += kTileM) {
      const int mr = static_cast<int>(std::min<int64_t>(kTileM, a.m - m0));
      table.tiles[mr - 1][nr - 1](a, m0, n0, out);
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
  int isa_index = 0;
#if COLLM_SMALL_GEMM_X86
  if (isa == SmallGemmIsa::kAvx2 && SmallGemmHasAvx2()) isa_index = 1;
#endif
  const TileTable& table = kTables[isa_index][static_cast<int>(args.format)];
  // Split n into whole tiles, at least ~64 KiB of f32 weights (or as many quantized ones) per task
  // so small layers stay on one thread (a fork costs more than streaming them).
  const int64_t num_tiles = (args.n + kTileN - 1) / kTileN;
  const int64_t grain = std::max<int64_t>(1, (16384 / std::max<int64_t>(1, args.k)) / kTileN);
  at::parallel_for(0, num_tiles, grain, [&](int64_t begin, int64_t end) {
    RunRows(args, table, begin * kTileN, std::min(args.n, end * kTileN));
  });
}

int64_t SmallGemmMaxRows() { return g_max_rows.load(std::memory_order_relaxed); }

void SetSmallGemmMaxRows(int64_t rows) {
  g_max_rows.store(std::max<int64_t>(0, rows), std::memory_order_relaxed);
}

}  // namespace collm::runtime
