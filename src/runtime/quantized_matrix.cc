#include "collm/runtime/quantized_matrix.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"

namespace collm::runtime {

absl::StatusOr<WeightFormat> ParseWeightFormat(absl::string_view name) {
  if (name == "f32") return WeightFormat::kF32;
  if (name == "int8") return WeightFormat::kInt8;
  if (name == "int4") return WeightFormat::kInt4;
  return absl::InvalidArgumentError(
      absl::StrCat("runtime.weights must be f32, int8 or int4, got '", name, "'"));
}

std::string WeightFormatName(WeightFormat format) {
  switch (format) {
    case WeightFormat::kF32:
      return "f32";
    case WeightFormat::kInt8:
      return "int8";
    case WeightFormat::kInt4:
      return "int4";
  }
  return "?";
}

namespace {

// One block of kQuantBlock values (zero padded) -> its scale and quantized bytes.
float QuantizeBlockInt8(const float* x, uint8_t* out) {
  float amax = 0.f;
  for (int64_t i = 0; i < kQuantBlock; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / 127.f;
  const float inv = d > 0 ? 1.f / d : 0.f;
  for (int64_t i = 0; i < kQuantBlock; ++i) {
    const int q = static_cast<int>(std::lrintf(x[i] * inv));
    out[i] = static_cast<uint8_t>(static_cast<int8_t>(std::clamp(q, -127, 127)));
  }
  return d;
}

float QuantizeBlockInt4(const float* x, uint8_t* out) {
  // The signed value of largest magnitude maps to -8 exactly, so the full [-8, 7] range is used.
  float amax = 0.f, m = 0.f;
  for (int64_t i = 0; i < kQuantBlock; ++i) {
    if (std::fabs(x[i]) > amax) {
      amax = std::fabs(x[i]);
      m = x[i];
    }
  }
  const float d = m / -8.f;
  const float inv = d != 0 ? 1.f / d : 0.f;
  constexpr int64_t kHalf = kQuantBlock / 2;
  for (int64_t i = 0; i < kHalf; ++i) {
    const int lo = std::clamp(static_cast<int>(std::lrintf(x[i] * inv)) + 8, 0, 15);
    const int hi = std::clamp(static_cast<int>(std::lrintf(x[i + kHalf] * inv)) + 8, 0, 15);
    out[i] = static_cast<uint8_t>(lo | (hi << 4));
  }
  return d;
}

}  // namespace

absl::StatusOr<QuantizedMatrix> QuantizedMatrix::Quantize(const at::Tensor& w, WeightFormat format,
                                                          const std::string& name) {
  if (format == WeightFormat::kF32) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": f32 is not a quantized format"));
  }
  if (w.dim() != 2 || !w.is_floating_point() || !w.device().is_cpu()) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": only 2-D floating-point CPU tensors can be quantized"));
  }
  at::Tensor src = w.to(at::kFloat).contiguous();
  if (!at::isfinite(src).all().item<bool>()) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": has non-finite values"));
  }
  QuantizedMatrix q;
  q.format_ = format;
  q.rows_ = src.size(0);
  q.cols_ = src.size(1);
  q.blocks_per_row_ = (q.cols_ + kQuantBlock - 1) / kQuantBlock;
  const int64_t block_bytes = format == WeightFormat::kInt8 ? kQuantBlock : kQuantBlock / 2;
  q.data_ = at::empty({q.rows_, q.blocks_per_row_ * block_bytes}, at::kByte);
  q.scales_ = at::empty({q.rows_, q.blocks_per_row_}, at::kFloat);
  const float* sp = src.data_ptr<float>();
  uint8_t* dp = q.data_.data_ptr<uint8_t>();
  float* scp = q.scales_.data_ptr<float>();
  const int64_t cols = q.cols_, nb = q.blocks_per_row_, rb = q.row_bytes();
  at::parallel_for(0, q.rows_, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, cols)),
                   [&](int64_t begin, int64_t end) {
                     float block[kQuantBlock];
                     for (int64_t r = begin; r < end; ++r) {
                       for (int64_t b = 0; b < nb; ++b) {
                         const int64_t c0 = b * kQuantBlock;
                         const int64_t n = std::min(kQuantBlock, cols - c0);
                         std::fill(block, block + kQuantBlock, 0.f);
                         std::memcpy(block, sp + r * cols + c0, n * sizeof(float));
                         uint8_t* out = dp + r * rb + b * block_bytes;
                         scp[r * nb + b] = format == WeightFormat::kInt8
                                               ? QuantizeBlockInt8(block, out)
                                               : QuantizeBlockInt4(block, out);
                       }
                     }
                   });
  return q;
}

void QuantizedMatrix::DequantizeRow(int64_t r, float* out) const {
  const uint8_t* row = data() + r * row_bytes();
  const float* s = scales() + r * blocks_per_row_;
  if (format_ == WeightFormat::kInt8) {
    const auto* q = reinterpret_cast<const int8_t*>(row);
    for (int64_t c = 0; c < cols_; ++c) out[c] = s[c / kQuantBlock] * static_cast<float>(q[c]);
  } else {
    constexpr int64_t kHalf = kQuantBlock / 2;
    for (int64_t c = 0; c < cols_; ++c) {
      const int64_t b = c / kQuantBlock, e = c % kQuantBlock;
      const uint8_t byte = row[b * kHalf + e % kHalf];
      const int v = (e < kHalf ? byte & 0xF : byte >> 4) - 8;
      out[c] = s[b] * static_cast<float>(v);
    }
  }
}

at::Tensor QuantizedMatrix::DequantizeRows(int64_t begin, int64_t n) const {
  at::Tensor out = at::empty({n, cols_}, at::kFloat);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols_)),
                   [&](int64_t b, int64_t e) {
                     for (int64_t r = b; r < e; ++r) DequantizeRow(begin + r, op + r * cols_);
                   });
  return out;
}

}  // namespace collm::runtime
