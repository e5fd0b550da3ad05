#include "collm/lora/lora_adapter.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "absl/strings/str_cat.h"
#include "collm/common/status.h"

namespace collm::lora {

using runtime::LoraTarget;

absl::StatusOr<LoraAdapter> LoraAdapter::Create(const runtime::ModelConfig& model,
                                                const LoraConfig& config, uint64_t seed) {
  COLLM_RETURN_IF_ERROR(config.Validate());
  LoraAdapter adapter;
  adapter.config = config;
  adapter.factors.scale = config.scale();
  adapter.factors.layers.resize(model.num_hidden_layers);
  // A private generator: the adapter's initial values depend on `seed` only, not on whatever
  // else drew from torch's global generator.
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::NoGradGuard no_grad;
  for (auto& layer : adapter.factors.layers) {
    for (LoraTarget t : config.targets) {
      const int64_t in = runtime::LoraTargetIn(model, t), out = runtime::LoraTargetOut(model, t);
      // nn.init.kaiming_uniform_(A, a=sqrt(5)) as PEFT does: bound = 1/sqrt(fan_in).
      const double bound = 1.0 / std::sqrt(static_cast<double>(in));
      auto& f = layer[static_cast<int>(t)];
      f.a = at::empty({config.rank, in}, at::kFloat).uniform_(-bound, bound, gen);
      f.b = at::zeros({out, config.rank}, at::kFloat);
    }
  }
  return adapter;
}

LoraAdapter LoraAdapter::Clone() const {
  LoraAdapter copy;
  copy.config = config;
  copy.factors.scale = factors.scale;
  copy.factors.layers.resize(factors.layers.size());
  for (size_t l = 0; l < factors.layers.size(); ++l) {
    for (int t = 0; t < runtime::kNumLoraTargets; ++t) {
      const auto& f = factors.layers[l][t];
      if (!f.a.defined()) continue;
      copy.factors.layers[l][t].a = f.a.detach().clone();
      copy.factors.layers[l][t].b = f.b.detach().clone();
    }
  }
  return copy;
}

absl::Status LoraAdapter::Validate(const runtime::ModelConfig& model) const {
  COLLM_RETURN_IF_ERROR(config.Validate());
  if (static_cast<int64_t>(factors.layers.size()) != model.num_hidden_layers) {
    return absl::InvalidArgumentError(absl::StrCat("adapter has ", factors.layers.size(),
                                                   " layers, the base model ",
                                                   model.num_hidden_layers));
  }
  for (size_t l = 0; l < factors.layers.size(); ++l) {
    for (int t = 0; t < runtime::kNumLoraTargets; ++t) {
      const auto target = static_cast<LoraTarget>(t);
      const auto& f = factors.layers[l][t];
      const bool wanted =
          std::find(config.targets.begin(), config.targets.end(), target) != config.targets.end();
      const std::string where = absl::StrCat("layer ", l, " ", runtime::LoraTargetName(target));
      if (!wanted) {
        if (f.a.defined() || f.b.defined()) {
          return absl::InvalidArgumentError(where + ": has factors but is not a target module");
        }
        continue;
      }
      if (!f.a.defined() || !f.b.defined()) {
        return absl::InvalidArgumentError(where + ": lora_A or lora_B is missing");
      }
      const int64_t in = runtime::LoraTargetIn(model, target);
      const int64_t out = runtime::LoraTargetOut(model, target);
      if (f.a.sizes() != at::IntArrayRef({config.rank, in}) ||
          f.b.sizes() != at::IntArrayRef({out, config.rank})) {
        return absl::InvalidArgumentError(absl::StrCat(
            where, ": expected lora_A [", config.rank, ", ", in, "] and lora_B [", out, ", ",
            config.rank, "], got ", c10::str(f.a.sizes()), " and ", c10::str(f.b.sizes())));
      }
      if (!at::isfinite(f.a).all().item<bool>() || !at::isfinite(f.b).all().item<bool>()) {
        return absl::InvalidArgumentError(where + ": has NaN or Inf values");
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<runtime::LoraWeights> LoraAdapter::ToWeights(
    const runtime::ModelConfig& model, const runtime::ResolvedRuntime& rt) const {
  try {
    at::NoGradGuard no_grad;
    runtime::LoraFactors moved;
    moved.scale = factors.scale;
    moved.layers.resize(factors.layers.size());
    for (size_t l = 0; l < factors.layers.size(); ++l) {
      for (int t = 0; t < runtime::kNumLoraTargets; ++t) {
        const auto& f = factors.layers[l][t];
        if (!f.a.defined()) continue;
        moved.layers[l][t].a = f.a.detach().to(rt.device, rt.dtype);
        moved.layers[l][t].b = f.b.detach().to(rt.device, rt.dtype);
      }
    }
    return runtime::FuseLora(model, moved);
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("adapter to device: ", e.what_without_backtrace()));
  }
}

int64_t LoraAdapter::num_parameters() const {
  int64_t n = 0;
  for (const auto& layer : factors.layers) {
    for (const auto& f : layer) {
      if (f.a.defined()) n += f.a.numel() + f.b.numel();
    }
  }
  return n;
}

}  // namespace collm::lora
