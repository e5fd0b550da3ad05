#include "collm/lora/shadow_adapter.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstring>
#include <filesystem>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "collm/common/status.h"
#include "collm/lora/peft_io.h"
#include "collm/runtime/safetensors.h"

namespace collm::lora {
namespace {

constexpr char kOptimizerFile[] = "optimizer.safetensors";
constexpr char kStepKey[] = "collm.step";

}  // namespace

absl::StatusOr<std::unique_ptr<ShadowAdapter>> ShadowAdapter::Create(const LoraAdapter& initial,
                                                                     const AdamWOptions& options) {
  std::unique_ptr<ShadowAdapter> s(new ShadowAdapter());
  s->options_ = options;
  s->adapter_ = initial.Clone();
  for (at::Tensor* p : s->Parameters()) {
    *p = p->to(at::kFloat).cpu().contiguous().requires_grad_(true);
    s->exp_avg_.push_back(at::zeros_like(*p).detach());
    s->exp_avg_sq_.push_back(at::zeros_like(*p).detach());
  }
  return s;
}

std::vector<at::Tensor*> ShadowAdapter::Parameters() {
  std::vector<at::Tensor*> out;
  for (auto& layer : adapter_.factors.layers) {
    for (auto& f : layer) {
      if (!f.a.defined()) continue;
      out.push_back(&f.a);
      out.push_back(&f.b);
    }
  }
  return out;
}

void ShadowAdapter::ZeroGrad() {
  for (at::Tensor* p : Parameters()) {
    if (p->grad().defined()) p->mutable_grad() = at::Tensor();
  }
}

double ShadowAdapter::Step(double lr, double max_grad_norm) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor*> params = Parameters();
  double sq = 0;
  for (at::Tensor* p : params) {
    if (p->grad().defined()) sq += p->grad().pow(2).sum().item<double>();
  }
  const double norm = std::sqrt(sq);
  const double clip =
      (max_grad_norm > 0 && norm > max_grad_norm) ? max_grad_norm / (norm + 1e-6) : 1.0;
  ++step_;
  const double b1 = options_.beta1, b2 = options_.beta2;
  const double bc1 = 1 - std::pow(b1, static_cast<double>(step_));
  const double bc2 = 1 - std::pow(b2, static_cast<double>(step_));
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor& p = *params[i];
    if (!p.grad().defined()) continue;
    at::Tensor g = p.grad() * clip;
    exp_avg_[i].mul_(b1).add_(g, 1 - b1);
    exp_avg_sq_[i].mul_(b2).addcmul_(g, g, 1 - b2);
    if (options_.weight_decay > 0) p.mul_(1 - lr * options_.weight_decay);
    at::Tensor denom = (exp_avg_sq_[i] / bc2).sqrt_().add_(options_.eps);
    p.addcdiv_(exp_avg_[i], denom, -lr / bc1);
  }
  ZeroGrad();
  return norm;
}

LoraAdapter ShadowAdapter::Snapshot() const { return adapter_.Clone(); }

absl::Status ShadowAdapter::Load(const LoraAdapter& adapter, bool reset_optimizer) {
  if (adapter.config.rank != adapter_.config.rank ||
      adapter.config.targets != adapter_.config.targets ||
      adapter.factors.layers.size() != adapter_.factors.layers.size()) {
    return absl::InvalidArgumentError(
        "the adapter to load has a different rank, target modules or layer count than the shadow");
  }
  at::NoGradGuard no_grad;
  for (size_t l = 0; l < adapter_.factors.layers.size(); ++l) {
    for (int t = 0; t < runtime::kNumLoraTargets; ++t) {
      auto& dst = adapter_.factors.layers[l][t];
      const auto& src = adapter.factors.layers[l][t];
      if (!dst.a.defined()) continue;
      if (!src.a.defined() || src.a.sizes() != dst.a.sizes() || src.b.sizes() != dst.b.sizes()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "layer ", l, " ", runtime::LoraTargetName(static_cast<runtime::LoraTarget>(t)),
            ": shape differs from the shadow adapter"));
      }
    }
  }
  for (size_t l = 0; l < adapter_.factors.layers.size(); ++l) {
    for (int t = 0; t < runtime::kNumLoraTargets; ++t) {
      auto& dst = adapter_.factors.layers[l][t];
      if (!dst.a.defined()) continue;
      dst.a.copy_(adapter.factors.layers[l][t].a);
      dst.b.copy_(adapter.factors.layers[l][t].b);
    }
  }
  adapter_.config.alpha = adapter.config.alpha;
  adapter_.config.use_rslora = adapter.config.use_rslora;
  adapter_.factors.scale = adapter.factors.scale;
  if (reset_optimizer) {
    for (auto& m : exp_avg_) m.zero_();
    for (auto& v : exp_avg_sq_) v.zero_();
    step_ = 0;
  }
  return absl::OkStatus();
}

absl::Status ShadowAdapter::SaveCheckpoint(
    const std::string& dir, const std::map<std::string, std::string>& metadata) const {
  COLLM_RETURN_IF_ERROR(WritePeftAdapter(dir, adapter_));
  std::vector<runtime::TensorToWrite> tensors;
  std::vector<at::Tensor> keep;
  size_t i = 0;
  for (size_t l = 0; l < adapter_.factors.layers.size(); ++l) {
    for (int t = 0; t < runtime::kNumLoraTargets; ++t) {
      if (!adapter_.factors.layers[l][t].a.defined()) continue;
      for (bool a : {true, false}) {
        const std::string name =
            PeftTensorName(static_cast<int64_t>(l), static_cast<runtime::LoraTarget>(t), a);
        for (const auto* moments : {&exp_avg_, &exp_avg_sq_}) {
          keep.push_back((*moments)[i].contiguous());
          tensors.push_back(
              {name + (moments == &exp_avg_ ? ".exp_avg" : ".exp_avg_sq"),
               runtime::StoredDType::kF32,
               std::vector<int64_t>(keep.back().sizes().begin(), keep.back().sizes().end()),
               keep.back().data_ptr<float>()});
        }
        ++i;
      }
    }
  }
  std::map<std::string, std::string> meta = metadata;
  meta[kStepKey] = std::to_string(step_);
  return runtime::WriteSafetensors(dir + "/" + kOptimizerFile, tensors, meta);
}

absl::StatusOr<std::unique_ptr<ShadowAdapter>> ShadowAdapter::LoadCheckpoint(
    const std::string& dir, const runtime::ModelConfig& model, const AdamWOptions& options,
    std::map<std::string, std::string>* metadata) {
  COLLM_ASSIGN_OR_RETURN(LoraAdapter adapter, ReadPeftAdapter(dir, model));
  COLLM_ASSIGN_OR_RETURN(auto shadow, Create(adapter, options));
  COLLM_ASSIGN_OR_RETURN(auto file, runtime::SafetensorsFile::Open(dir + "/" + kOptimizerFile));
  auto it = file->metadata().find(kStepKey);
  if (it == file->metadata().end() || !absl::SimpleAtoi(it->second, &shadow->step_) ||
      shadow->step_ < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(file->path(), ": missing or bad '", kStepKey, "' metadata"));
  }
  size_t i = 0;
  for (size_t l = 0; l < shadow->adapter_.factors.layers.size(); ++l) {
    for (int t = 0; t < runtime::kNumLoraTargets; ++t) {
      if (!shadow->adapter_.factors.layers[l][t].a.defined()) continue;
      for (bool a : {true, false}) {
        const std::string name =
            PeftTensorName(static_cast<int64_t>(l), static_cast<runtime::LoraTarget>(t), a);
        for (auto* moments : {&shadow->exp_avg_, &shadow->exp_avg_sq_}) {
          const std::string key =
              name + (moments == &shadow->exp_avg_ ? ".exp_avg" : ".exp_avg_sq");
          COLLM_ASSIGN_OR_RETURN(runtime::TensorView view, file->Get(key));
          at::Tensor& dst = (*moments)[i];
          if (view.shape != std::vector<int64_t>(dst.sizes().begin(), dst.sizes().end())) {
            return absl::InvalidArgumentError(absl::StrCat(file->path(), ": tensor '", key,
                                                           "' does not match the adapter's shape"));
          }
          runtime::ConvertToFloat32(view, dst.data_ptr<float>());
        }
        ++i;
      }
    }
  }
  if (metadata != nullptr) *metadata = file->metadata();
  return shadow;
}

}  // namespace collm::lora
