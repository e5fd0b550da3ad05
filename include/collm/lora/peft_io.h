// Hugging Face PEFT format: `adapter_config.json` + `adapter_model.safetensors` with tensor names
// `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` (A, [r, in]) and
// `...lora_B.weight` (B, [out, r]); mlp modules under `mlp.`. Adapters trained with HF PEFT load
// here and ours there.
#ifndef COLLM_LORA_PEFT_IO_H_
#define COLLM_LORA_PEFT_IO_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "collm/lora/lora_adapter.h"
#include "collm/runtime/model_config.h"

namespace collm::lora {

// The PEFT tensor name of a factor: `a` selects lora_A, else lora_B.
std::string PeftTensorName(int64_t layer, runtime::LoraTarget target, bool a);

// Writes `dir`/adapter_config.json and `dir`/adapter_model.safetensors (F32), creating `dir`.
// Both files are written atomically.
absl::Status WritePeftAdapter(const std::string& dir, const LoraAdapter& adapter);

// Reads a PEFT adapter directory for a base model of shape `model`. Errors name the file and
// tensor: missing files, bad JSON, unsupported config, unknown target module, a tensor for a
// layer the model lacks, missing A or B, wrong shape for this base, rank different from "r",
// NaN/Inf values, unexpected tensors. F16/BF16 files are converted to f32.
absl::StatusOr<LoraAdapter> ReadPeftAdapter(const std::string& dir,
                                            const runtime::ModelConfig& model);

// The same two files in memory, for sending adapters over the network (federation).
struct PeftBlob {
  std::string config_json;  // adapter_config.json text.
  std::string safetensors;  // adapter_model.safetensors bytes (F32).
};
absl::StatusOr<PeftBlob> SerializePeftAdapter(const LoraAdapter& adapter);
// Same checks as ReadPeftAdapter; `what` names the source in errors (e.g. "update from dev-1").
absl::StatusOr<LoraAdapter> ParsePeftAdapter(const PeftBlob& blob,
                                             const runtime::ModelConfig& model,
                                             const std::string& what);

}  // namespace collm::lora

#endif  // COLLM_LORA_PEFT_IO_H_
