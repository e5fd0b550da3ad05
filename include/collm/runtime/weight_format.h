// How the frozen base's projection matrices are stored (`runtime.weights`). Torch-free so the
// kernels (small_gemm.h) can name it.
//
// Block formats, both over blocks of kQuantBlock consecutive weights of one row (rows are padded
// with zeros to a whole number of blocks, so any row length works), with one f32 scale per block:
//   kInt8: w = d * q, q in [-127, 127], d = max|w| / 127 (like llama.cpp's Q8_0).
//   kInt4: w = d * (q - 8), q in [0, 15], d = w_m / -8 where w_m is the block's weight of largest
//          magnitude, so it maps exactly to q = 0 (like Q4_0). A block of 32 is 16 bytes: byte i
//          holds element i in its low nibble and element i + 16 in its high nibble.
#ifndef COLLM_RUNTIME_WEIGHT_FORMAT_H_
#define COLLM_RUNTIME_WEIGHT_FORMAT_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace collm::runtime {

enum class WeightFormat {
  kF32,   // Plain f32 (4 bytes per weight).
  kInt8,  // 8-bit blocks: 1.125 bytes per weight.
  kInt4,  // 4-bit blocks: 0.625 bytes per weight.
};

inline constexpr int64_t kQuantBlock = 32;

// "f32", "int8" or "int4"; anything else gives InvalidArgument naming runtime.weights.
absl::StatusOr<WeightFormat> ParseWeightFormat(absl::string_view name);
std::string WeightFormatName(WeightFormat format);

}  // namespace collm::runtime

#endif  // COLLM_RUNTIME_WEIGHT_FORMAT_H_
