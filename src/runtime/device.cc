#include "collm/runtime/device.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "absl/strings/str_cat.h"

namespace collm::runtime {

absl::StatusOr<ResolvedRuntime> ResolveRuntime(const RuntimeOptions& options) {
  ResolvedRuntime r;
  try {
    r.device = c10::Device(options.device);
  } catch (const c10::Error&) {
    return absl::InvalidArgumentError(
        absl::StrCat("runtime.device must be 'cpu' or 'cuda[:N]', got '", options.device, "'"));
  }
  if (r.device.is_cuda()) {
    if (!at::hasCUDA()) {
      return absl::InvalidArgumentError(absl::StrCat("runtime.device is '", options.device,
                                                     "' but this libtorch has no usable CUDA"));
    }
  } else if (!r.device.is_cpu()) {
    return absl::InvalidArgumentError(
        absl::StrCat("runtime.device must be 'cpu' or 'cuda[:N]', got '", options.device, "'"));
  }
  const std::string& d = options.dtype;
  if (d == "auto") {
    r.dtype = r.device.is_cuda() ? c10::kBFloat16 : c10::kFloat;
  } else if (d == "f32" || d == "float32") {
    r.dtype = c10::kFloat;
  } else if (d == "bf16" || d == "bfloat16") {
    r.dtype = c10::kBFloat16;
  } else if (d == "f16" || d == "float16") {
    r.dtype = c10::kHalf;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("runtime.dtype must be auto, f32, bf16 or f16, got '", d, "'"));
  }
  auto weights = ParseWeightFormat(options.weights);
  if (!weights.ok()) return weights.status();
  r.weights = *weights;
  if (r.weights != WeightFormat::kF32 && (!r.device.is_cpu() || r.dtype != c10::kFloat)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "runtime.weights ", options.weights, " needs runtime.device cpu and runtime.dtype f32 ",
        "(the quantized kernels are CPU-only; on CUDA use weights f32 with dtype bf16), got ",
        options.device, " / ", DTypeName(r.dtype)));
  }
  if (options.num_threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("runtime.num_threads must be >= 0, got ", options.num_threads));
  }
  if (options.num_threads > 0) at::set_num_threads(options.num_threads);
  return r;
}

std::string DTypeName(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::kFloat:
      return "f32";
    case c10::kBFloat16:
      return "bf16";
    case c10::kHalf:
      return "f16";
    default:
      return c10::toString(dtype);
  }
}

}  // namespace collm::runtime
