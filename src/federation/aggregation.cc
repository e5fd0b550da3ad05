#include "collm/federation/aggregation.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "collm/common/status.h"
#include "collm/lora/peft_io.h"

namespace collm::federation {
namespace {

using runtime::LoraTarget;

// Components of the re-factored exact aggregate whose singular value is below this fraction of
// the largest carry nothing measurable in f32; they are re-seeded (see ExactCombine).
constexpr double kDeadSingularValue = 1e-6;

bool HasTarget(const lora::LoraConfig& config, LoraTarget t) {
  return std::find(config.targets.begin(), config.targets.end(), t) != config.targets.end();
}

std::string TargetList(const lora::LoraConfig& config) {
  std::vector<std::string> names;
  for (LoraTarget t : config.targets) names.push_back(runtime::LoraTargetName(t));
  return absl::StrJoin(names, ", ");
}

std::string ModuleName(int64_t layer, LoraTarget t) {
  return absl::StrCat("layer ", layer, " ", runtime::LoraTargetName(t));
}

std::string ShapeString(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

std::string Who(const ClientUpdate& update) {
  return absl::StrCat("update from ",
                      update.device_id.empty() ? "<unnamed device>" : update.device_id);
}

absl::Status ValidateOptions(const AggregationOptions& o) {
  auto bad = [](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("aggregation options: ", what));
  };
  if (!(o.server_lr > 0) || !std::isfinite(o.server_lr)) {
    return bad(absl::StrCat("server_lr must be > 0, got ", o.server_lr));
  }
  if (!(o.beta1 >= 0 && o.beta1 < 1))
    return bad(absl::StrCat("beta1 must be in [0, 1), got ", o.beta1));
  if (!(o.beta2 >= 0 && o.beta2 < 1))
    return bad(absl::StrCat("beta2 must be in [0, 1), got ", o.beta2));
  if (!(o.tau > 0) || !std::isfinite(o.tau))
    return bad(absl::StrCat("tau must be > 0, got ", o.tau));
  if (!(o.clip_norm >= 0) || !std::isfinite(o.clip_norm)) {
    return bad(absl::StrCat("clip_norm must be >= 0, got ", o.clip_norm));
  }
  if (!(o.max_update_norm >= 0) || !std::isfinite(o.max_update_norm)) {
    return bad(absl::StrCat("max_update_norm must be >= 0, got ", o.max_update_norm));
  }
  if (!(o.trim_ratio >= 0 && o.trim_ratio < 0.5)) {
    return bad(absl::StrCat("trim_ratio must be in [0, 0.5), got ", o.trim_ratio));
  }
  return absl::OkStatus();
}

double SquaredNorm(const at::Tensor& t) { return t.square().sum(at::kDouble).item<double>(); }

// ‖s_u B_u A_u − s_g B_g A_g‖²_F without forming the out x in products: with P = [s_u B_u, −s_g
// B_g] and Q = [A_u; A_g], ‖PQ‖² = Σ (PᵀP) ⊙ (QQᵀ), two small Gram matrices. In f64 because the
// difference of two nearly equal products would otherwise drown in f32 rounding.
double ProductDeltaSquaredNorm(const at::Tensor& bu, const at::Tensor& au, double su,
                               const at::Tensor& bg, const at::Tensor& ag, double sg) {
  const at::Tensor p = at::cat({bu.to(at::kDouble) * su, bg.to(at::kDouble) * (-sg)}, 1);
  const at::Tensor q = at::cat({au.to(at::kDouble), ag.to(at::kDouble)}, 0);
  const double sq = (at::matmul(p.t(), p) * at::matmul(q, q.t())).sum().item<double>();
  return std::max(0.0, sq);
}

// One term of Σ coef_j · B_j A_j for the exact combination.
struct ProductTerm {
  at::Tensor a, b;  // [r_j, in], [out, r_j]
  double coef = 0;  // weight x that adapter's scale.
};

// The best rank-`rank` factorization (A [rank, in], B [out, rank]) of Σ coef_j B_j A_j / scale.
// Stacks B_stack = [coef_j B_j] (out x R) and A_stack = [A_j] (R x in); when R < min(out, in)
// it QR-factors both stacks and takes the SVD of the R x R core R_B R_Aᵀ, so no out x in matrix
// is ever formed; otherwise the stacks are already at least as large as the dense product, which
// is formed and decomposed directly. √Σ goes to both sides so A and B have balanced norms.
// Components with (near) zero singular value — fewer than `rank` live directions — get a zero B
// column and the global's A row: they add nothing to the product, but unlike a zero A row they
// still receive gradients in the next round of local training.
void ExactCombine(const std::vector<ProductTerm>& terms, int64_t rank, double scale,
                  const at::Tensor& global_a, at::Tensor* out_a, at::Tensor* out_b) {
  std::vector<at::Tensor> bs, as;
  bs.reserve(terms.size());
  as.reserve(terms.size());
  for (const ProductTerm& t : terms) {
    bs.push_back(t.b * t.coef);
    as.push_back(t.a);
  }
  const at::Tensor b_stack = at::cat(bs, 1);
  const at::Tensor a_stack = at::cat(as, 0);
  bs.clear();
  as.clear();
  const int64_t out = b_stack.size(0), in = a_stack.size(1), total_rank = b_stack.size(1);
  at::Tensor left, sigma, right;  // product = left · diag(sigma) · right
  if (total_rank < std::min(out, in)) {
    auto [qb, rb] = at::linalg_qr(b_stack, "reduced");      // out x R, R x R
    auto [qa, ra] = at::linalg_qr(a_stack.t(), "reduced");  // in x R, R x R
    auto [u, s, vh] = at::linalg_svd(at::matmul(rb, ra.t()), /*full_matrices=*/false);
    left = at::matmul(qb, u);
    sigma = s;
    right = at::matmul(vh, qa.t());
  } else {
    auto [u, s, vh] = at::linalg_svd(at::matmul(b_stack, a_stack), /*full_matrices=*/false);
    left = u;
    sigma = s;
    right = vh;
  }
  const int64_t keep = std::min<int64_t>(rank, sigma.size(0));
  const at::Tensor sv = sigma.narrow(0, 0, keep).to(at::kDouble);
  const double largest = keep > 0 ? sv[0].item<double>() : 0.0;
  int64_t live = 0;
  while (live < keep && largest > 0 && sv[live].item<double>() > kDeadSingularValue * largest) {
    ++live;
  }
  at::Tensor b = at::zeros({out, rank}, at::kFloat);
  at::Tensor a = global_a.clone();
  if (live > 0) {
    const at::Tensor root = at::sqrt(sigma.narrow(0, 0, live) / scale);
    b.narrow(1, 0, live).copy_(left.narrow(1, 0, live) * root.unsqueeze(0));
    a.narrow(0, 0, live).copy_(right.narrow(0, 0, live) * root.unsqueeze(1));
  }
  *out_a = std::move(a);
  *out_b = std::move(b);
}

// Coordinate-wise trimmed mean (trim = number dropped at each end) or, for `median`, the median
// (mean of the two middle values for an even count) over the first dimension of `stack`.
at::Tensor CoordinateWise(const at::Tensor& stack, bool median, int64_t trim) {
  const int64_t k = stack.size(0);
  const at::Tensor sorted = std::get<0>(stack.sort(0));
  if (median) {
    if (k % 2 == 1) return sorted[k / 2].clone();
    return (sorted[k / 2 - 1] + sorted[k / 2]) * 0.5;
  }
  return sorted.narrow(0, trim, k - 2 * trim).mean(0);
}

}  // namespace

absl::StatusOr<Combine> ParseCombine(const std::string& name) {
  if (name == "fedavg" || name == "fedit") return Combine::kFedAvg;
  if (name == "exact") return Combine::kExact;
  if (name == "trimmed_mean") return Combine::kTrimmedMean;
  if (name == "median") return Combine::kMedian;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown aggregation strategy '", name,
                   "' (expected fedavg, fedit, exact, trimmed_mean or median)"));
}

std::string CombineName(Combine c) {
  switch (c) {
    case Combine::kFedAvg:
      return "fedavg";
    case Combine::kExact:
      return "exact";
    case Combine::kTrimmedMean:
      return "trimmed_mean";
    case Combine::kMedian:
      return "median";
  }
  return "?";
}

absl::StatusOr<ServerOptimizer> ParseServerOptimizer(const std::string& name) {
  if (name == "none") return ServerOptimizer::kNone;
  if (name == "fedadam") return ServerOptimizer::kFedAdam;
  if (name == "fedyogi") return ServerOptimizer::kFedYogi;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown server optimizer '", name, "' (expected none, fedadam or fedyogi)"));
}

std::string ServerOptimizerName(ServerOptimizer o) {
  switch (o) {
    case ServerOptimizer::kNone:
      return "none";
    case ServerOptimizer::kFedAdam:
      return "fedadam";
    case ServerOptimizer::kFedYogi:
      return "fedyogi";
  }
  return "?";
}

absl::StatusOr<double> ValidateUpdate(const runtime::ModelConfig& model,
                                      const lora::LoraAdapter& global, const ClientUpdate& update,
                                      const AggregationOptions& options) {
  COLLM_RETURN_IF_ERROR(ValidateOptions(options));
  const std::string who = Who(update);
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(who, ": ", what));
  };
  if (update.num_samples <= 0) {
    return bad(absl::StrCat("num_samples must be > 0, got ", update.num_samples));
  }
  if (!std::isfinite(update.train_loss)) {
    return bad(absl::StrCat("train_loss is not finite (", update.train_loss, ")"));
  }
  const lora::LoraConfig& gc = global.config;
  const lora::LoraConfig& uc = update.adapter.config;
  const bool exact = options.combine == Combine::kExact;
  for (LoraTarget t : uc.targets) {
    if (!HasTarget(gc, t)) {
      return bad(absl::StrCat("unknown module ", runtime::LoraTargetName(t),
                              ": the global adapter adapts only ", TargetList(gc)));
    }
  }
  for (LoraTarget t : gc.targets) {
    if (!HasTarget(uc, t)) {
      return bad(absl::StrCat("missing module ", runtime::LoraTargetName(t),
                              ": the global adapter adapts ", TargetList(gc)));
    }
  }
  const double su = uc.scale(), sg = gc.scale();
  if (!exact) {
    if (uc.rank != gc.rank) {
      return bad(absl::StrCat("rank ", uc.rank, " differs from the global rank ", gc.rank,
                              " (only the exact strategy combines different ranks)"));
    }
    if (std::abs(su - sg) > 1e-9 * std::abs(sg)) {
      return bad(absl::StrCat("LoRA scale ", su, " differs from the global scale ", sg,
                              " (lora_alpha or use_rslora changed; only the exact strategy "
                              "combines different scales)"));
    }
  }
  if (uc.rank <= 0) return bad(absl::StrCat("rank must be > 0, got ", uc.rank));
  const int64_t layers = model.num_hidden_layers;
  if (static_cast<int64_t>(update.adapter.factors.layers.size()) != layers) {
    return bad(absl::StrCat("has ", update.adapter.factors.layers.size(),
                            " layers, the base model has ", layers));
  }
  if (static_cast<int64_t>(global.factors.layers.size()) != layers) {
    return absl::InvalidArgumentError(absl::StrCat("global adapter has ",
                                                   global.factors.layers.size(),
                                                   " layers, the base model has ", layers));
  }
  double delta_sq = 0, worst_sq = -1;
  std::string worst;
  try {
    at::NoGradGuard no_grad;
    for (int64_t l = 0; l < layers; ++l) {
      for (int ti = 0; ti < runtime::kNumLoraTargets; ++ti) {
        const auto t = static_cast<LoraTarget>(ti);
        const auto& f = update.adapter.factors.layers[l][ti];
        const std::string module = ModuleName(l, t);
        if (!HasTarget(gc, t)) {
          if (f.a.defined() || f.b.defined()) {
            return bad(absl::StrCat(module, ": unknown module (the global adapter adapts only ",
                                    TargetList(gc), ")"));
          }
          continue;
        }
        const auto& g = global.factors.layers[l][ti];
        if (!g.a.defined() || !g.b.defined()) {
          return absl::InvalidArgumentError(
              absl::StrCat("global adapter: ", module, ": factors missing"));
        }
        for (bool is_a : {true, false}) {
          const at::Tensor& x = is_a ? f.a : f.b;
          const char* factor = is_a ? "lora_A" : "lora_B";
          if (!x.defined()) return bad(absl::StrCat(module, ": ", factor, " is missing"));
          const std::vector<int64_t> want =
              is_a ? std::vector<int64_t>{uc.rank, runtime::LoraTargetIn(model, t)}
                   : std::vector<int64_t>{runtime::LoraTargetOut(model, t), uc.rank};
          if (x.sizes() != at::IntArrayRef(want)) {
            return bad(absl::StrCat(module, ": ", factor, " has shape ", ShapeString(x.sizes()),
                                    ", expected ", ShapeString(want)));
          }
          if (x.scalar_type() != at::kFloat || !x.device().is_cpu()) {
            return bad(absl::StrCat(module, ": ", factor, " must be f32 on the CPU"));
          }
          if (!at::isfinite(x).all().item<bool>()) {
            return bad(absl::StrCat(module, ": ", factor, " has NaN or Inf values"));
          }
        }
        // Exact aggregation combines products, so its delta (and clipping) lives there too; the
        // factor-wise rules combine factors, so theirs is the factor difference.
        const double sq = exact ? ProductDeltaSquaredNorm(f.b, f.a, su, g.b, g.a, sg)
                                : SquaredNorm(f.a - g.a) + SquaredNorm(f.b - g.b);
        delta_sq += sq;
        if (sq > worst_sq) {
          worst_sq = sq;
          worst = module;
        }
      }
    }
  } catch (const c10::Error& e) {
    return bad(e.what_without_backtrace());
  }
  const double norm = std::sqrt(delta_sq);
  if (options.max_update_norm > 0 && norm > options.max_update_norm) {
    return bad(absl::StrCat("delta norm ", norm, " exceeds max_update_norm ",
                            options.max_update_norm, " (largest contribution: ", worst, ")"));
  }
  return norm;
}

absl::StatusOr<AggregationResult> Aggregate(const runtime::ModelConfig& model,
                                            const lora::LoraAdapter& global,
                                            const std::vector<ClientUpdate>& updates,
                                            const AggregationOptions& options,
                                            ServerOptimizerState* state) {
  COLLM_RETURN_IF_ERROR(ValidateOptions(options));
  if (updates.empty()) return absl::InvalidArgumentError("no updates to aggregate");
  if (options.server_optimizer != ServerOptimizer::kNone && state == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "server optimizer ", ServerOptimizerName(options.server_optimizer), " needs a state"));
  }
  COLLM_RETURN_IF_ERROR(Annotate(global.Validate(model), "global adapter"));

  AggregationResult result;
  std::vector<double> coef;  // Clipping factor per update: 1 = unclipped.
  double total_samples = 0;
  for (const ClientUpdate& u : updates) {
    COLLM_ASSIGN_OR_RETURN(double norm, ValidateUpdate(model, global, u, options));
    result.delta_norms.push_back(norm);
    const bool clip = options.clip_norm > 0 && norm > options.clip_norm;
    result.clipped.push_back(clip);
    coef.push_back(clip ? options.clip_norm / norm : 1.0);
    total_samples += static_cast<double>(u.num_samples);
  }
  const size_t k = updates.size();
  std::vector<double> weight(k);
  for (size_t i = 0; i < k; ++i)
    weight[i] = static_cast<double>(updates[i].num_samples) / total_samples;

  const lora::LoraConfig& gc = global.config;
  lora::LoraAdapter& next = result.adapter;
  next.config = gc;
  next.factors.scale = gc.scale();
  next.factors.layers.resize(global.factors.layers.size());
  ServerOptimizerState new_state;
  try {
    at::NoGradGuard no_grad;
    for (size_t l = 0; l < global.factors.layers.size(); ++l) {
      for (LoraTarget t : gc.targets) {
        const int ti = static_cast<int>(t);
        const at::Tensor ga = global.factors.layers[l][ti].a.detach().to(at::kFloat).contiguous();
        const at::Tensor gb = global.factors.layers[l][ti].b.detach().to(at::kFloat).contiguous();
        auto& out = next.factors.layers[l][ti];
        // The update's factor after clipping: global + c·(update − global).
        auto clipped = [&](size_t i, bool a) {
          const at::Tensor& x = a ? updates[i].adapter.factors.layers[l][ti].a
                                  : updates[i].adapter.factors.layers[l][ti].b;
          if (coef[i] == 1.0) return x;
          const at::Tensor& g = a ? ga : gb;
          return g + (x - g) * coef[i];
        };
        switch (options.combine) {
          case Combine::kFedAvg: {
            for (bool a : {true, false}) {
              at::Tensor acc = at::zeros_like(a ? ga : gb);
              for (size_t i = 0; i < k; ++i) acc.add_(clipped(i, a), weight[i]);
              (a ? out.a : out.b) = acc;
            }
            break;
          }
          case Combine::kTrimmedMean:
          case Combine::kMedian: {
            const int64_t trim =
                static_cast<int64_t>(std::floor(options.trim_ratio * static_cast<double>(k)));
            for (bool a : {true, false}) {
              std::vector<at::Tensor> all;
              all.reserve(k);
              for (size_t i = 0; i < k; ++i) all.push_back(clipped(i, a));
              (a ? out.a : out.b) =
                  CoordinateWise(at::stack(all), options.combine == Combine::kMedian, trim);
            }
            break;
          }
          case Combine::kExact: {
            std::vector<ProductTerm> terms;
            terms.reserve(k + 1);
            // A clipped product delta c·(P_i − P_g) leaves (1 − c)·P_g behind: the global's
            // factors enter the stack once with the sum of those leftovers.
            double global_coef = 0;
            for (size_t i = 0; i < k; ++i) {
              const auto& f = updates[i].adapter.factors.layers[l][ti];
              terms.push_back({f.a, f.b, weight[i] * coef[i] * updates[i].adapter.config.scale()});
              global_coef += weight[i] * (1.0 - coef[i]);
            }
            if (global_coef > 0) terms.push_back({ga, gb, global_coef * gc.scale()});
            ExactCombine(terms, gc.rank, gc.scale(), ga, &out.a, &out.b);
            break;
          }
        }
        if (options.server_optimizer != ServerOptimizer::kNone) {
          // Reddi et al. 2021: the combined adapter minus the global is a pseudo-gradient (with
          // the sign of a step); the server runs Adam/Yogi on it. Moments are per PEFT tensor.
          // For the exact strategy the factors are re-factored each round, so the moments follow
          // the factors, not a fixed basis of the product.
          for (bool a : {true, false}) {
            const std::string name = lora::PeftTensorName(static_cast<int64_t>(l), t, a);
            const at::Tensor& g = a ? ga : gb;
            at::Tensor& x = a ? out.a : out.b;
            const at::Tensor delta = x - g;
            const at::Tensor delta_sq = delta * delta;
            auto previous = [&](const std::map<std::string, at::Tensor>& from) {
              auto it = from.find(name);
              // A missing or reshaped moment (first round, or the global rank changed) restarts
              // from zero, as Flower's strategies start.
              if (it == from.end() || !it->second.defined() ||
                  it->second.sizes() != delta.sizes()) {
                return at::zeros_like(delta);
              }
              return it->second.to(at::kFloat);
            };
            const at::Tensor m = previous(state->m) * options.beta1 + delta * (1 - options.beta1);
            at::Tensor v = previous(state->v);
            if (options.server_optimizer == ServerOptimizer::kFedAdam) {
              v = v * options.beta2 + delta_sq * (1 - options.beta2);
            } else {
              v = v - delta_sq * at::sign(v - delta_sq) * (1 - options.beta2);
            }
            x = g + m / (at::sqrt(v) + options.tau) * options.server_lr;
            new_state.m[name] = m;
            new_state.v[name] = v;
          }
        }
        for (const at::Tensor* x : {&out.a, &out.b}) {
          if (!at::isfinite(*x).all().item<bool>()) {
            return absl::InternalError(absl::StrCat("aggregation produced non-finite values in ",
                                                    ModuleName(static_cast<int64_t>(l), t)));
          }
        }
      }
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("aggregation: ", e.what_without_backtrace()));
  }
  // The state changes only when the whole aggregation succeeded.
  if (options.server_optimizer != ServerOptimizer::kNone) {
    new_state.steps = state->steps + 1;
    *state = std::move(new_state);
  }
  return result;
}

}  // namespace collm::federation
