// One frozen base matrix [rows, cols] (a projection W, used as y = x W^T, or the embedding table)
// in the runtime's storage format: a plain tensor (f32/bf16/f16, any device) or a CPU
// QuantizedMatrix (runtime.weights int8/int4). The decoder holds every projection as one of these,
// so the rest of the model does not care how the base is stored.
//
// Immutable after construction; thread-safe to read. Copies share storage (tied embeddings).
#ifndef COLLM_RUNTIME_WEIGHT_MATRIX_H_
#define COLLM_RUNTIME_WEIGHT_MATRIX_H_

#include <ATen/core/TensorBody.h>

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "collm/runtime/quantized_matrix.h"
#include "collm/runtime/small_gemm.h"
#include "collm/runtime/weight_format.h"

namespace collm::runtime {

class WeightMatrix {
 public:
  WeightMatrix() = default;
  // Keeps `dense` (2-D) as it is.
  explicit WeightMatrix(at::Tensor dense);
  explicit WeightMatrix(QuantizedMatrix quantized);

  // `w` kept as is for kF32, else quantized (then `w` must be a CPU float tensor; errors name
  // `name`).
  static absl::StatusOr<WeightMatrix> Create(const at::Tensor& w, WeightFormat format,
                                             const std::string& name);

  bool defined() const { return quantized_ || dense_.defined(); }
  bool quantized() const { return quantized_; }
  WeightFormat format() const { return quantized_ ? q_.format() : WeightFormat::kF32; }
  int64_t rows() const { return quantized_ ? q_.rows() : dense_.size(0); }
  int64_t cols() const { return quantized_ ? q_.cols() : dense_.size(1); }
  int64_t nbytes() const { return quantized_ ? q_.nbytes() : dense_.nbytes(); }
  bool is_same(const WeightMatrix& other) const;
  // REQUIRES: !quantized().
  const at::Tensor& dense() const { return dense_; }
  // REQUIRES: quantized().
  const QuantizedMatrix& quantized_matrix() const { return q_; }

  // The whole matrix as a tensor: dense() itself, or a new f32 dequantized copy.
  at::Tensor ToDense() const;

  // y = x W^T (+ bias) for x [..., cols]. Autograd flows into x (and bias) only: for a quantized
  // matrix the backward recomputes dX = dY deq(W) block-row by block-row, so no f32 copy of W is
  // kept alive by the graph. REQUIRES: this object outlives the autograd graph.
  at::Tensor Linear(const at::Tensor& x, const at::Tensor& bias) const;

  // Rows `ids` (int64, any shape) as [ids..., cols] in the matrix's dtype (f32 when quantized):
  // the embedding lookup.
  at::Tensor Rows(const at::Tensor& ids) const;

  // Points `args`' weight operands (format, w or wq/scales and strides, n, k) at this matrix.
  // REQUIRES: quantized(), or dense() is a contiguous CPU f32 tensor.
  void SetGemmWeights(SmallGemmArgs& args) const;

 private:
  at::Tensor dense_;
  QuantizedMatrix q_;
  bool quantized_ = false;
};

// x [m, cols] (f32, CPU) times deq(W)^T -> [m, rows], dequantizing a few rows of W at a time into
// an f32 scratch for sgemm: the large-m (prefill) path.
at::Tensor DequantizedMatmul(const at::Tensor& x, const QuantizedMatrix& w);

}  // namespace collm::runtime

#endif  // COLLM_RUNTIME_WEIGHT_MATRIX_H_
