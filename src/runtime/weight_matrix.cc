#include "collm/runtime/weight_matrix.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <utility>
#include <vector>

namespace collm::runtime {
namespace {

// Rows of W dequantized per sgemm: ~1M f32 (4 MiB) of scratch, so a 32000-row head does not
// materialise 100 MB at once.
int64_t ChunkRows(const QuantizedMatrix& w) {
  return std::max<int64_t>(kQuantBlock, (int64_t{1} << 20) / std::max<int64_t>(1, w.cols()));
}

// dy [m, rows] times deq(W) -> [m, cols]: the input gradient of DequantizedMatmul.
at::Tensor DequantizedMatmulTransposed(const at::Tensor& dy, const QuantizedMatrix& w) {
  at::Tensor dx = at::zeros({dy.size(0), w.cols()}, dy.options());
  const int64_t chunk = ChunkRows(w);
  for (int64_t r0 = 0; r0 < w.rows(); r0 += chunk) {
    const int64_t n = std::min(chunk, w.rows() - r0);
    dx.addmm_(dy.narrow(1, r0, n), w.DequantizeRows(r0, n));
  }
  return dx;
}

// y = x deq(W)^T with the backward wrt x only; W is captured by address (see WeightMatrix::Linear).
class DequantizedLinearFunction : public torch::autograd::Function<DequantizedLinearFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            int64_t matrix) {
    ctx->saved_data["matrix"] = matrix;
    return DequantizedMatmul(x, *reinterpret_cast<const QuantizedMatrix*>(matrix));
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad) {
    const auto* w = reinterpret_cast<const QuantizedMatrix*>(ctx->saved_data["matrix"].toInt());
    return {DequantizedMatmulTransposed(grad[0], *w), at::Tensor()};
  }
};

}  // namespace

at::Tensor DequantizedMatmul(const at::Tensor& x, const QuantizedMatrix& w) {
  at::Tensor y = at::empty({x.size(0), w.rows()}, x.options());
  const int64_t chunk = ChunkRows(w);
  for (int64_t r0 = 0; r0 < w.rows(); r0 += chunk) {
    const int64_t n = std::min(chunk, w.rows() - r0);
    y.narrow(1, r0, n).copy_(at::mm(x, w.DequantizeRows(r0, n).t()));
  }
  return y;
}

WeightMatrix::WeightMatrix(at::Tensor dense) : dense_(std::move(dense)) {}

WeightMatrix::WeightMatrix(QuantizedMatrix quantized)
    : q_(std::move(quantized)), quantized_(true) {}

absl::StatusOr<WeightMatrix> WeightMatrix::Create(const at::Tensor& w, WeightFormat format,
                                                  const std::string& name) {
  if (format == WeightFormat::kF32) return WeightMatrix(w);
  auto q = QuantizedMatrix::Quantize(w, format, name);
  if (!q.ok()) return q.status();
  return WeightMatrix(*std::move(q));
}

bool WeightMatrix::is_same(const WeightMatrix& other) const {
  if (quantized_ != other.quantized_) return false;
  return quantized_ ? q_.is_same(other.q_) : dense_.is_same(other.dense_);
}

at::Tensor WeightMatrix::ToDense() const { return quantized_ ? q_.Dequantize() : dense_; }

at::Tensor WeightMatrix::Linear(const at::Tensor& x, const at::Tensor& bias) const {
  if (!quantized_) return at::linear(x, dense_, bias);
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = q_.rows();
  at::Tensor x2 = x.to(at::kFloat).reshape({-1, q_.cols()});
  at::Tensor y =
      DequantizedLinearFunction::apply(x2, reinterpret_cast<int64_t>(&q_)).view(out_shape);
  return bias.defined() ? y + bias : y;
}

at::Tensor WeightMatrix::Rows(const at::Tensor& ids) const {
  std::vector<int64_t> shape = ids.sizes().vec();
  shape.push_back(cols());
  if (!quantized_) return dense_.index_select(0, ids.reshape({-1})).view(shape);
  at::Tensor flat = ids.reshape({-1}).to(at::kCPU, at::kLong).contiguous();
  at::Tensor out = at::empty({flat.numel(), q_.cols()}, at::kFloat);
  const int64_t* ip = flat.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < flat.numel(); ++i) q_.DequantizeRow(ip[i], op + i * q_.cols());
  return out.view(shape);
}

void WeightMatrix::SetGemmWeights(SmallGemmArgs& args) const {
  args.n = rows();
  args.k = cols();
  if (quantized_) {
    args.format = q_.format();
    args.wq = q_.data();
    args.ldwq = q_.row_bytes();
    args.scales = q_.scales();
    args.lds = q_.blocks_per_row();
  } else {
    args.format = WeightFormat::kF32;
    args.w = dense_.data_ptr<float>();
    args.ldw = dense_.size(1);
  }
}

}  // namespace collm::runtime
