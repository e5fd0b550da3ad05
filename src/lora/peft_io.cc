#include "collm/lora/peft_io.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "collm/common/file_io.h"
#include "collm/common/status.h"
#include "collm/runtime/safetensors.h"

namespace collm::lora {

using runtime::LoraTarget;

namespace {

constexpr char kConfigFile[] = "adapter_config.json";
constexpr char kWeightsFile[] = "adapter_model.safetensors";
constexpr char kLayerPrefix[] = "base_model.model.model.layers.";

const char* ModuleGroup(LoraTarget t) {
  switch (t) {
    case LoraTarget::kGate:
    case LoraTarget::kUp:
    case LoraTarget::kDown:
      return "mlp";
    default:
      return "self_attn";
  }
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

std::string ErrnoMessage() { return std::strerror(errno); }

// A tensor name parsed back into (layer, target, factor).
struct ParsedName {
  int64_t layer = -1;
  LoraTarget target = LoraTarget::kQ;
  bool a = false;
};

// False when `name` is not a PEFT LoRA factor name of a known Llama module.
bool ParsePeftTensorName(const std::string& name, ParsedName* out) {
  if (!absl::StartsWith(name, kLayerPrefix)) return false;
  const size_t begin = sizeof(kLayerPrefix) - 1;
  size_t end = begin;
  while (end < name.size() && absl::ascii_isdigit(static_cast<unsigned char>(name[end]))) ++end;
  if (end == begin || end - begin > 9 || end >= name.size() || name[end] != '.') return false;
  if (end - begin > 1 && name[begin] == '0') return false;  // "07": not how PEFT spells it.
  int64_t layer = 0;
  if (!absl::SimpleAtoi(absl::string_view(name).substr(begin, end - begin), &layer)) return false;
  const absl::string_view rest = absl::string_view(name).substr(end + 1);
  for (int t = 0; t < runtime::kNumLoraTargets; ++t) {
    const auto target = static_cast<LoraTarget>(t);
    for (bool a : {true, false}) {
      if (rest == absl::StrCat(ModuleGroup(target), ".", runtime::LoraTargetName(target),
                               a ? ".lora_A.weight" : ".lora_B.weight")) {
        *out = {layer, target, a};
        return true;
      }
    }
  }
  return false;
}

absl::StatusOr<std::string> ReadWholeFile(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    return absl::NotFoundError(absl::StrCat(path, ": no such file"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", ErrnoMessage()));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return absl::InternalError(absl::StrCat(path, ": read failed"));
  return ss.str();
}

// Shared by the file and in-memory readers; `file.path()` names the source in errors.
absl::StatusOr<LoraAdapter> ReadTensors(const runtime::SafetensorsFile& file,
                                        const LoraConfig& config,
                                        const runtime::ModelConfig& model) {
  const std::string& path = file.path();
  LoraAdapter adapter;
  adapter.config = config;
  adapter.factors.scale = config.scale();
  adapter.factors.layers.resize(model.num_hidden_layers);
  const auto is_target = [&](LoraTarget t) {
    return std::find(config.targets.begin(), config.targets.end(), t) != config.targets.end();
  };
  for (const std::string& name : file.TensorNames()) {
    ParsedName p;
    if (!ParsePeftTensorName(name, &p)) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": unexpected tensor '", name, "' (collm expects only ", kLayerPrefix,
                       "N.{self_attn,mlp}.<module>.lora_{A,B}.weight for Llama linear modules)"));
    }
    if (p.layer >= model.num_hidden_layers) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", name, "' is for layer ",
                                                     p.layer, " but the base model has ",
                                                     model.num_hidden_layers, " layers"));
    }
    if (!is_target(p.target)) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": tensor '", name, "' is for module ", runtime::LoraTargetName(p.target),
          ", which is not in ", kConfigFile, " \"target_modules\""));
    }
    COLLM_ASSIGN_OR_RETURN(runtime::TensorView view, file.Get(name));
    if (view.shape.size() != 2) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": tensor '", name, "' must be 2-D, got shape ", ShapeString(view.shape)));
    }
    const int64_t rank_dim = p.a ? view.shape[0] : view.shape[1];
    if (rank_dim != config.rank) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor '", name, "' has rank ", rank_dim, " (shape ",
                       ShapeString(view.shape), ") but ", kConfigFile, " \"r\" is ", config.rank));
    }
    const std::vector<int64_t> want =
        p.a ? std::vector<int64_t>{config.rank, runtime::LoraTargetIn(model, p.target)}
            : std::vector<int64_t>{runtime::LoraTargetOut(model, p.target), config.rank};
    if (view.shape != want) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": tensor '", name, "' has shape ", ShapeString(view.shape), ", expected ",
          ShapeString(want), " for this base model (was the adapter trained for another model?)"));
    }
    auto& factor = adapter.factors.layers[p.layer][static_cast<int>(p.target)];
    at::Tensor t = at::empty(view.shape, at::kFloat);
    runtime::ConvertToFloat32(view, t.data_ptr<float>());
    if (!at::isfinite(t).all().item<bool>()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor '", name, "' has NaN or Inf values"));
    }
    (p.a ? factor.a : factor.b) = std::move(t);
  }
  for (int64_t l = 0; l < model.num_hidden_layers; ++l) {
    for (LoraTarget t : config.targets) {
      const auto& factor = adapter.factors.layers[l][static_cast<int>(t)];
      for (bool a : {true, false}) {
        if (!(a ? factor.a : factor.b).defined()) {
          return absl::InvalidArgumentError(
              absl::StrCat(path, ": missing tensor '", PeftTensorName(l, t, a), "'"));
        }
      }
    }
  }
  return adapter;
}

absl::StatusOr<LoraAdapter> AdapterFromFile(const runtime::SafetensorsFile& file,
                                            const LoraConfig& config,
                                            const runtime::ModelConfig& model) {
  try {
    COLLM_ASSIGN_OR_RETURN(LoraAdapter adapter, ReadTensors(file, config, model));
    COLLM_RETURN_IF_ERROR(Annotate(adapter.Validate(model), file.path()));
    return adapter;
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat(file.path(), ": ", e.what_without_backtrace()));
  }
}

}  // namespace

std::string PeftTensorName(int64_t layer, LoraTarget target, bool a) {
  return absl::StrCat(kLayerPrefix, layer, ".", ModuleGroup(target), ".",
                      runtime::LoraTargetName(target), a ? ".lora_A.weight" : ".lora_B.weight");
}

namespace {

// The adapter's factors as F32 tensors to write, in PEFT names; `keep` owns the contiguous CPU
// copies the entries point into. Shared by the file writer and the in-memory serializer so both
// produce the same bytes.
absl::Status CollectTensors(const LoraAdapter& adapter, std::vector<at::Tensor>* keep,
                            std::vector<runtime::TensorToWrite>* tensors) {
  COLLM_RETURN_IF_ERROR(adapter.config.Validate());
  try {
    at::NoGradGuard no_grad;
    for (size_t l = 0; l < adapter.factors.layers.size(); ++l) {
      for (int t = 0; t < runtime::kNumLoraTargets; ++t) {
        const auto target = static_cast<LoraTarget>(t);
        const auto& f = adapter.factors.layers[l][t];
        const bool wanted = std::find(adapter.config.targets.begin(), adapter.config.targets.end(),
                                      target) != adapter.config.targets.end();
        if (!wanted) {
          if (f.a.defined() || f.b.defined()) {
            return absl::InvalidArgumentError(
                absl::StrCat("layer ", l, " ", runtime::LoraTargetName(target),
                             ": has factors but is not a target module"));
          }
          continue;
        }
        for (bool a : {true, false}) {
          const at::Tensor& src = a ? f.a : f.b;
          if (!src.defined() || src.dim() != 2) {
            return absl::InvalidArgumentError(
                absl::StrCat("layer ", l, " ", runtime::LoraTargetName(target), ": lora_",
                             a ? "A" : "B", " is missing or not 2-D"));
          }
          keep->push_back(src.detach().to(at::kFloat).cpu().contiguous());
          const at::Tensor& c = keep->back();
          tensors->push_back({PeftTensorName(static_cast<int64_t>(l), target, a),
                              runtime::StoredDType::kF32,
                              {c.size(0), c.size(1)},
                              c.data_ptr<float>()});
        }
      }
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("adapter to CPU f32: ", e.what_without_backtrace()));
  }
  return absl::OkStatus();
}

const std::map<std::string, std::string>& SafetensorsMetadata() {
  static const auto* const kMetadata = new std::map<std::string, std::string>{{"format", "pt"}};
  return *kMetadata;
}

}  // namespace

absl::Status WritePeftAdapter(const std::string& dir, const LoraAdapter& adapter) {
  COLLM_RETURN_IF_ERROR(adapter.config.Validate());
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat(dir, ": cannot create: ", ec.message()));

  std::vector<at::Tensor> keep;
  std::vector<runtime::TensorToWrite> tensors;
  COLLM_RETURN_IF_ERROR(CollectTensors(adapter, &keep, &tensors));
  // Tensors first: a directory whose config is present has its weights complete.
  COLLM_RETURN_IF_ERROR(runtime::WriteSafetensors(absl::StrCat(dir, "/", kWeightsFile), tensors,
                                                  SafetensorsMetadata()));
  return WriteFileAtomically(absl::StrCat(dir, "/", kConfigFile), adapter.config.ToPeftJson());
}

absl::StatusOr<PeftBlob> SerializePeftAdapter(const LoraAdapter& adapter) {
  std::vector<at::Tensor> keep;
  std::vector<runtime::TensorToWrite> tensors;
  COLLM_RETURN_IF_ERROR(CollectTensors(adapter, &keep, &tensors));
  PeftBlob blob;
  COLLM_ASSIGN_OR_RETURN(blob.safetensors, runtime::SerializeSafetensors(
                                               tensors, SafetensorsMetadata(), kWeightsFile));
  blob.config_json = adapter.config.ToPeftJson();
  return blob;
}

absl::StatusOr<LoraAdapter> ReadPeftAdapter(const std::string& dir,
                                            const runtime::ModelConfig& model) {
  const std::string config_path = absl::StrCat(dir, "/", kConfigFile);
  const std::string weights_path = absl::StrCat(dir, "/", kWeightsFile);
  COLLM_ASSIGN_OR_RETURN(std::string text, ReadWholeFile(config_path));
  auto config = LoraConfig::FromPeftJson(text);
  if (!config.ok()) return Annotate(config.status(), config_path);
  std::error_code ec;
  if (!std::filesystem::is_regular_file(weights_path, ec)) {
    const bool pickle = std::filesystem::exists(absl::StrCat(dir, "/adapter_model.bin"), ec);
    return absl::NotFoundError(absl::StrCat(
        weights_path, ": no such file",
        pickle ? " (adapter_model.bin is a pickle; re-save with safe_serialization=True)" : ""));
  }
  COLLM_ASSIGN_OR_RETURN(auto file, runtime::SafetensorsFile::Open(weights_path));
  return AdapterFromFile(*file, *config, model);
}

absl::StatusOr<LoraAdapter> ParsePeftAdapter(const PeftBlob& blob,
                                             const runtime::ModelConfig& model,
                                             const std::string& what) {
  auto config = LoraConfig::FromPeftJson(blob.config_json);
  if (!config.ok()) return Annotate(config.status(), absl::StrCat(what, ": ", kConfigFile));
  COLLM_ASSIGN_OR_RETURN(auto file, runtime::SafetensorsFile::FromBytes(
                                        blob.safetensors, absl::StrCat(what, ": ", kWeightsFile)));
  return AdapterFromFile(*file, *config, model);
}

}  // namespace collm::lora
