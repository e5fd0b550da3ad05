// A weight-streaming f32 GEMM for few activation rows: y = x W^T (+ bias) (+ y), where x is
// [m, k] with m small (decode steps: one row per sequence), W is [n, k] row-major as the runtime
// stores its projections, and y is [m, n].
//
// Why: batch-1 and small-batch decode is bound by reading the weights. OpenBLAS's sgemm packs
// for large m and its gemv streams well below the memory bandwidth; this kernel reads every weight
// row once from memory for all m rows (a tile of kTileN weight rows stays in L1 while each group
// of kTileM activation rows passes over it), with register-blocked AVX2/FMA accumulators chosen at
// run time and a portable fallback of the same blocking. Threads split n with at::parallel_for,
// so torch's intra-op thread count applies.
//
// Quantized weights (weight_format.h) use the same tiling: only the load of eight consecutive
// weights of one row becomes a block decoder (int8/int4 -> f32 times the block's scale), so each
// quantized weight is read from memory once and decoded once per kTileM activation rows.
//
// Thread-safe: SmallGemm has no state; the row threshold is an atomic process-wide setting.
#ifndef COLLM_RUNTIME_SMALL_GEMM_H_
#define COLLM_RUNTIME_SMALL_GEMM_H_

#include <cstdint>

#include "collm/runtime/weight_format.h"

namespace collm::runtime {

// Which implementation SmallGemm runs.
enum class SmallGemmIsa {
  kAuto,      // AVX2/FMA when the CPU has both, else kPortable.
  kPortable,  // Plain C++ (compiler-vectorised for the baseline ISA).
  kAvx2,      // AVX2/FMA intrinsics. REQUIRES: SmallGemmHasAvx2().
};

// One call's operands. Strides are in floats; rows of x, W and y are contiguous.
struct SmallGemmArgs {
  int64_t m = 0;  // Activation rows (any m >= 0 works; the kernel is meant for m <= ~16).
  int64_t n = 0;  // Output columns = weight rows.
  int64_t k = 0;  // Reduction length = activation columns = weight columns.
  const float* x = nullptr;  // [m, k], row stride ldx >= k.
  int64_t ldx = 0;
  // The weights [n, k]: f32 in w (row stride ldw >= k floats), or for kInt8/kInt4 the blocks of
  // weight_format.h in wq (row stride ldwq bytes, rows padded to whole blocks) with one scale per
  // block in scales (row stride lds floats).
  WeightFormat format = WeightFormat::kF32;
  const float* w = nullptr;
  int64_t ldw = 0;
  const uint8_t* wq = nullptr;
  int64_t ldwq = 0;
  const float* scales = nullptr;
  int64_t lds = 0;
  const float* bias = nullptr;  // [n] or null.
  float* y = nullptr;           // [m, n], row stride ldy >= n; must not alias x or w.
  int64_t ldy = 0;
  bool accumulate = false;  // true: y += x W^T (+ bias); false: y = x W^T (+ bias).
};

// True when this CPU supports AVX2 and FMA (and the build targets x86).
bool SmallGemmHasAvx2();

// The implementation kAuto resolves to on this CPU.
SmallGemmIsa SmallGemmDefaultIsa();

// Computes args.y as documented on SmallGemmArgs. REQUIRES: the shapes and strides above.
void SmallGemm(const SmallGemmArgs& args, SmallGemmIsa isa = SmallGemmIsa::kAuto);

// The runtime's CPU f32 linear layers use SmallGemm when the activation has at most this many
// rows, and libtorch (OpenBLAS) above it. 0 sends everything to libtorch (the benchmark's "old
// path"). Default kSmallGemmDefaultMaxRows.
inline constexpr int64_t kSmallGemmDefaultMaxRows = 16;
int64_t SmallGemmMaxRows();
void SetSmallGemmMaxRows(int64_t rows);

}  // namespace collm::runtime

#endif  // COLLM_RUNTIME_SMALL_GEMM_H_
