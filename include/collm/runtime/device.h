// Where and in what precision the model computes.
#ifndef COLLM_RUNTIME_DEVICE_H_
#define COLLM_RUNTIME_DEVICE_H_

#include <ATen/core/TensorBody.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <string>

#include "absl/status/statusor.h"
#include "collm/runtime/weight_format.h"

namespace collm::runtime {

struct RuntimeOptions {
  std::string device = "cpu";  // "cpu" or "cuda", "cuda:N".
  // "auto" (f32 on CPU, where bf16/f16 matmuls are 30-100x slower; bf16 on CUDA), "f32", "bf16",
  // "f16". Stored weights are converted at load.
  std::string dtype = "auto";
  int num_threads = 0;  // Intra-op threads for torch; 0 = leave torch's default.
  // Storage of the frozen base's matrices (projections, embedding, head): "f32" (as dtype says),
  // "int8" or "int4" (block-quantized at load, see weight_format.h; CPU and f32 compute only).
  std::string weights = "f32";
};

struct ResolvedRuntime {
  c10::Device device = c10::Device(c10::kCPU);
  c10::ScalarType dtype = c10::kFloat;
  WeightFormat weights = WeightFormat::kF32;
};

// Validates `options` against this build of libtorch: an unknown device string, CUDA without a
// CUDA build or device, or an unknown dtype give InvalidArgument naming the option. Quantized
// weights need device cpu and dtype f32 (the CUDA path keeps bf16); other combinations are
// InvalidArgument too.
absl::StatusOr<ResolvedRuntime> ResolveRuntime(const RuntimeOptions& options);

std::string DTypeName(c10::ScalarType dtype);

}  // namespace collm::runtime

#endif  // COLLM_RUNTIME_DEVICE_H_
