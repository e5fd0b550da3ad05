// Precompiled for every target that includes torch: the torch headers dominate compile time.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <torch/torch.h>
