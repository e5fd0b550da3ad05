#include "collm/runtime/lora_weights.h"

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace collm::runtime {
namespace {

constexpr const char* kNames[kNumLoraTargets] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"};

// Stacks A rows and lays B out block-diagonally so one fused projection gets one delta GEMM pair.
LoraProjection Fuse(const std::vector<const LoraFactors::Factor*>& parts,
                    const std::vector<int64_t>& outs, double scale) {
  std::vector<at::Tensor> as;
  int64_t total_rank = 0;
  for (const auto* p : parts) {
    if (p->a.defined()) {
      as.push_back(p->a);
      total_rank += p->a.size(0);
    }
  }
  if (as.empty()) return {};
  std::vector<at::Tensor> rows;
  int64_t offset = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    const auto* p = parts[i];
    const auto opts = as[0].options();
    if (!p->a.defined()) {
      rows.push_back(at::zeros({outs[i], total_rank}, opts));
      continue;
    }
    const int64_t r = p->a.size(0);
    std::vector<at::Tensor> cols;
    if (offset > 0) cols.push_back(at::zeros({outs[i], offset}, opts));
    cols.push_back(p->b * scale);
    if (total_rank - offset - r > 0)
      cols.push_back(at::zeros({outs[i], total_rank - offset - r}, opts));
    rows.push_back(cols.size() == 1 ? cols[0] : at::cat(cols, 1));
    offset += r;
  }
  LoraProjection proj;
  proj.a = as.size() == 1 ? as[0] : at::cat(as, 0);
  proj.b = rows.size() == 1 ? rows[0] : at::cat(rows, 0);
  if (!proj.a.requires_grad()) {
    proj.a = proj.a.contiguous();
    proj.b = proj.b.contiguous();
  }
  return proj;
}

}  // namespace

const char* LoraTargetName(LoraTarget target) { return kNames[static_cast<int>(target)]; }

absl::StatusOr<LoraTarget> ParseLoraTarget(const std::string& name) {
  for (int i = 0; i < kNumLoraTargets; ++i) {
    if (name == kNames[i]) return static_cast<LoraTarget>(i);
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown LoRA target module '", name,
                                                 "' (known: ", absl::StrJoin(kNames, ", "), ")"));
}

int64_t LoraTargetIn(const ModelConfig& c, LoraTarget t) {
  switch (t) {
    case LoraTarget::kO:
      return c.q_size();
    case LoraTarget::kDown:
      return c.intermediate_size;
    default:
      return c.hidden_size;
  }
}

int64_t LoraTargetOut(const ModelConfig& c, LoraTarget t) {
  switch (t) {
    case LoraTarget::kQ:
      return c.q_size();
    case LoraTarget::kK:
    case LoraTarget::kV:
      return c.kv_size();
    case LoraTarget::kO:
    case LoraTarget::kDown:
      return c.hidden_size;
    case LoraTarget::kGate:
    case LoraTarget::kUp:
      return c.intermediate_size;
  }
  return 0;
}

absl::StatusOr<LoraWeights> FuseLora(const ModelConfig& config, const LoraFactors& factors) {
  if (static_cast<int64_t>(factors.layers.size()) != config.num_hidden_layers) {
    return absl::InvalidArgumentError(absl::StrCat("adapter has ", factors.layers.size(),
                                                   " layers, the model has ",
                                                   config.num_hidden_layers));
  }
  LoraWeights w;
  for (size_t l = 0; l < factors.layers.size(); ++l) {
    const auto& f = factors.layers[l];
    for (int t = 0; t < kNumLoraTargets; ++t) {
      const auto& p = f[t];
      if (!p.a.defined() && !p.b.defined()) continue;
      const auto target = static_cast<LoraTarget>(t);
      const int64_t in = LoraTargetIn(config, target), out = LoraTargetOut(config, target);
      if (!p.a.defined() || !p.b.defined() || p.a.dim() != 2 || p.b.dim() != 2 ||
          p.a.size(1) != in || p.b.size(0) != out || p.a.size(0) != p.b.size(1) ||
          p.a.size(0) == 0) {
        return absl::InvalidArgumentError(absl::StrCat("layer ", l, " ", kNames[t],
                                                       ": LoRA A must be [r, ", in, "] and B [",
                                                       out, ", r] with the same r > 0"));
      }
    }
    LoraLayer layer;
    const double s = factors.scale;
    using T = LoraTarget;
    auto part = [&](T t) { return &f[static_cast<int>(t)]; };
    layer.qkv = Fuse({part(T::kQ), part(T::kK), part(T::kV)},
                     {config.q_size(), config.kv_size(), config.kv_size()}, s);
    layer.o = Fuse({part(T::kO)}, {config.hidden_size}, s);
    layer.gate_up = Fuse({part(T::kGate), part(T::kUp)},
                         {config.intermediate_size, config.intermediate_size}, s);
    layer.down = Fuse({part(T::kDown)}, {config.hidden_size}, s);
    w.layers.push_back(std::move(layer));
  }
  return w;
}

}  // namespace collm::runtime
