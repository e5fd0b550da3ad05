// A [rows, cols] f32 matrix quantized into one of the block formats of weight_format.h, for the
// frozen base weights (issue 15). Rows are padded to padded_cols() = cols rounded up to a whole
// number of blocks; the padding quantizes to zero weights.
//
// Immutable after Quantize; thread-safe to read. Holds only the quantized bytes and the scales.
#ifndef COLLM_RUNTIME_QUANTIZED_MATRIX_H_
#define COLLM_RUNTIME_QUANTIZED_MATRIX_H_

#include <ATen/core/TensorBody.h>

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "collm/runtime/weight_format.h"

namespace collm::runtime {

class QuantizedMatrix {
 public:
  QuantizedMatrix() = default;

  // Quantizes a 2-D float tensor (any float dtype, CPU) to `format` (kInt8 or kInt4). `name`
  // appears in errors (not 2-D, not floating point, non-finite values).
  static absl::StatusOr<QuantizedMatrix> Quantize(const at::Tensor& w, WeightFormat format,
                                                  const std::string& name);

  WeightFormat format() const { return format_; }
  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  int64_t padded_cols() const { return blocks_per_row_ * kQuantBlock; }
  int64_t blocks_per_row() const { return blocks_per_row_; }
  // Quantized bytes of one row (row stride of data()).
  int64_t row_bytes() const { return data_.size(1); }
  const uint8_t* data() const { return data_.data_ptr<uint8_t>(); }
  const float* scales() const { return scales_.data_ptr<float>(); }  // [rows, blocks_per_row]
  int64_t nbytes() const { return data_.nbytes() + scales_.nbytes(); }
  // Whether `other` holds the same storage (tied embeddings).
  bool is_same(const QuantizedMatrix& other) const { return data_.is_same(other.data_); }

  // f32 rows [begin, begin + n) as a new [n, cols] tensor.
  at::Tensor DequantizeRows(int64_t begin, int64_t n) const;
  at::Tensor Dequantize() const { return DequantizeRows(0, rows_); }
  // Writes row r's cols() f32 values to out.
  void DequantizeRow(int64_t r, float* out) const;

 private:
  WeightFormat format_ = WeightFormat::kInt8;
  int64_t rows_ = 0, cols_ = 0, blocks_per_row_ = 0;
  at::Tensor data_;    // uint8 [rows, row_bytes]
  at::Tensor scales_;  // f32 [rows, blocks_per_row]
};

}  // namespace collm::runtime

#endif  // COLLM_RUNTIME_QUANTIZED_MATRIX_H_
