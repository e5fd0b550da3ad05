// Aggregation math on the tiny model's shapes: FedAvg/FedIT weights, exact LoRA aggregation against
// dense products and torch's SVD, mixed ranks, robust rules, clipping, FedAdam/FedYogi state, and
// the validation errors a device gets for a bad update.
#include "collm/federation/aggregation.h"

#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <vector>

#include "collm/lora/peft_io.h"
#include "collm/runtime/random_model.h"
#include "gtest/gtest.h"

namespace collm::federation {
namespace {

using runtime::LoraTarget;

#define EXPECT_HAS(message, needle)                    \
  EXPECT_NE((message).find(needle), std::string::npos) \
      << "missing '" << (needle) << "' in: " << (message)

const std::vector<LoraTarget> kTargets = {LoraTarget::kQ, LoraTarget::kV};

runtime::ModelConfig Model() { return runtime::TinyLlamaConfig(); }

// An adapter with random A and B (B ~ N(0, b_std^2)); `live_rank` < rank zeroes B's last columns,
// so the product has rank live_rank although the factors have rank `rank`.
lora::LoraAdapter RandomAdapter(int rank, uint64_t seed, double alpha = 16, double b_std = 0.1,
                                int live_rank = -1) {
  lora::LoraConfig config;
  config.rank = rank;
  config.alpha = alpha;
  config.targets = kTargets;
  lora::LoraAdapter adapter = lora::LoraAdapter::Create(Model(), config, seed).value();
  at::manual_seed(seed);
  for (auto& layer : adapter.factors.layers) {
    for (auto& f : layer) {
      if (!f.b.defined()) continue;
      f.a = at::randn(f.a.sizes()) * 0.2;
      f.b = at::randn(f.b.sizes()) * b_std;
      if (live_rank >= 0) f.b.narrow(1, live_rank, rank - live_rank).zero_();
    }
  }
  return adapter;
}

ClientUpdate Update(const std::string& device, int64_t samples, lora::LoraAdapter adapter) {
  ClientUpdate u;
  u.device_id = device;
  u.num_samples = samples;
  u.train_loss = 1.0;
  u.adapter = std::move(adapter);
  return u;
}

at::Tensor Product(const lora::LoraAdapter& a, int64_t layer, LoraTarget t) {
  const auto& f = a.factors.layers[layer][static_cast<int>(t)];
  return at::matmul(f.b.to(at::kDouble), f.a.to(at::kDouble)) * a.config.scale();
}

// Σ p_k s_k B_k A_k in f64.
at::Tensor MeanProduct(const std::vector<ClientUpdate>& updates, int64_t layer, LoraTarget t) {
  double total = 0;
  for (const auto& u : updates) total += static_cast<double>(u.num_samples);
  at::Tensor sum;
  for (const auto& u : updates) {
    at::Tensor p = Product(u.adapter, layer, t) * (static_cast<double>(u.num_samples) / total);
    sum = sum.defined() ? sum + p : p;
  }
  return sum;
}

double RelativeError(const at::Tensor& got, const at::Tensor& want) {
  return (got.to(at::kDouble) - want.to(at::kDouble)).norm().item<double>() /
         want.to(at::kDouble).norm().item<double>();
}

// The best rank-r approximation of `m` (Eckart–Young) by torch's SVD.
at::Tensor BestRank(const at::Tensor& m, int64_t r) {
  auto [u, s, vh] = at::linalg_svd(m, false);
  return at::matmul(u.narrow(1, 0, r) * s.narrow(0, 0, r).unsqueeze(0), vh.narrow(0, 0, r));
}

AggregationResult AggregateOk(const lora::LoraAdapter& global,
                              const std::vector<ClientUpdate>& updates,
                              const AggregationOptions& options,
                              ServerOptimizerState* state = nullptr) {
  auto r = Aggregate(Model(), global, updates, options, state);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? *std::move(r) : AggregationResult{};
}

AggregationOptions With(Combine c) {
  AggregationOptions o;
  o.combine = c;
  return o;
}

TEST(AggregationTest, ParsesStrategyNames) {
  EXPECT_EQ(ParseCombine("fedit").value(), Combine::kFedAvg);
  EXPECT_EQ(ParseCombine("exact").value(), Combine::kExact);
  EXPECT_EQ(CombineName(ParseCombine("trimmed_mean").value()), "trimmed_mean");
  EXPECT_EQ(ParseServerOptimizer("fedyogi").value(), ServerOptimizer::kFedYogi);
  EXPECT_HAS(std::string(ParseCombine("krum").status().message()), "'krum'");
  EXPECT_HAS(std::string(ParseServerOptimizer("sgd").status().message()), "'sgd'");
}

TEST(AggregationTest, FedAvgOfIdenticalUpdatesIsThatUpdate) {
  const auto global = RandomAdapter(8, 1);
  const auto trained = RandomAdapter(8, 2);
  std::vector<ClientUpdate> updates = {Update("a", 3, trained.Clone()),
                                       Update("b", 10, trained.Clone()),
                                       Update("c", 1, trained.Clone())};
  for (Combine c : {Combine::kFedAvg, Combine::kMedian, Combine::kTrimmedMean}) {
    const auto r = AggregateOk(global, updates, With(c));
    for (int64_t l = 0; l < 2; ++l) {
      for (LoraTarget t : kTargets) {
        const auto& got = r.adapter.factors.layers[l][static_cast<int>(t)];
        const auto& want = trained.factors.layers[l][static_cast<int>(t)];
        EXPECT_TRUE(at::allclose(got.a, want.a, 1e-5, 1e-6)) << CombineName(c);
        EXPECT_TRUE(at::allclose(got.b, want.b, 1e-5, 1e-6)) << CombineName(c);
      }
    }
  }
}

TEST(AggregationTest, FedAvgWeightsBySamplesAndKeepsTheGlobalConfig) {
  auto global = RandomAdapter(8, 1);
  global.config.base_model_name_or_path = "stories";
  const auto x = RandomAdapter(8, 2), y = RandomAdapter(8, 3);
  const auto r =
      AggregateOk(global, {Update("a", 1, x), Update("b", 3, y)}, With(Combine::kFedAvg));
  for (int64_t l = 0; l < 2; ++l) {
    for (LoraTarget t : kTargets) {
      const int ti = static_cast<int>(t);
      const auto& got = r.adapter.factors.layers[l][ti];
      EXPECT_TRUE(at::allclose(
          got.a, x.factors.layers[l][ti].a * 0.25 + y.factors.layers[l][ti].a * 0.75, 1e-5, 1e-6));
      EXPECT_TRUE(at::allclose(
          got.b, x.factors.layers[l][ti].b * 0.25 + y.factors.layers[l][ti].b * 0.75, 1e-5, 1e-6));
    }
  }
  EXPECT_EQ(r.adapter.config.rank, 8);
  EXPECT_EQ(r.adapter.config.alpha, 16);
  EXPECT_EQ(r.adapter.config.targets, kTargets);
  EXPECT_EQ(r.adapter.config.base_model_name_or_path, "stories");
  EXPECT_TRUE(r.adapter.Validate(Model()).ok());
  // The result is a valid PEFT adapter: it serializes and parses back.
  auto blob = lora::SerializePeftAdapter(r.adapter);
  ASSERT_TRUE(blob.ok());
  EXPECT_TRUE(lora::ParsePeftAdapter(*blob, Model(), "aggregate").ok());
}

TEST(AggregationTest, ExactEqualsTheMeanOfProductsWhereFedItDoesNot) {
  // Rank-8 factors whose products have rank 4: the two clients' total rank (8) fits the global
  // rank, so exact aggregation loses nothing; FedIT's cross terms Σ p (B_k − B̄)(A_k − Ā) remain.
  const auto global = RandomAdapter(8, 1);
  const std::vector<ClientUpdate> updates = {Update("a", 1, RandomAdapter(8, 2, 16, 0.1, 4)),
                                             Update("b", 3, RandomAdapter(8, 3, 16, 0.1, 4))};
  const auto exact = AggregateOk(global, updates, With(Combine::kExact));
  const auto fedit = AggregateOk(global, updates, With(Combine::kFedAvg));
  for (int64_t l = 0; l < 2; ++l) {
    for (LoraTarget t : kTargets) {
      const at::Tensor want = MeanProduct(updates, l, t);
      const double exact_err = RelativeError(Product(exact.adapter, l, t), want);
      const double fedit_err = RelativeError(Product(fedit.adapter, l, t), want);
      EXPECT_LT(exact_err, 1e-4) << "layer " << l << " " << runtime::LoraTargetName(t);
      EXPECT_GT(fedit_err, 0.2) << "layer " << l << " " << runtime::LoraTargetName(t);
    }
  }
}

TEST(AggregationTest, ExactTruncationIsTheBestRankRApproximation) {
  const auto global = RandomAdapter(8, 1);
  // 3 clients (stacked rank 24 < 32: the QR + small-core path) and 10 clients (stacked rank 80 >=
  // 64: the dense path).
  for (int clients : {3, 10}) {
    std::vector<ClientUpdate> updates;
    for (int i = 0; i < clients; ++i) {
      updates.push_back(Update("d" + std::to_string(i), 1 + i, RandomAdapter(8, 10 + i)));
    }
    const auto r = AggregateOk(global, updates, With(Combine::kExact));
    for (int64_t l = 0; l < 2; ++l) {
      for (LoraTarget t : kTargets) {
        const at::Tensor mean = MeanProduct(updates, l, t);
        const at::Tensor best = BestRank(mean, 8);
        const at::Tensor got = Product(r.adapter, l, t);
        EXPECT_LT(RelativeError(got, best), 1e-4) << clients << " clients, layer " << l;
        // Truncation really happened: the best rank-8 product is not the mean itself.
        EXPECT_GT(RelativeError(best, mean), 1e-2);
        // And FedIT is further from the mean than the best rank-8 approximation.
        const auto fedit = AggregateOk(global, updates, With(Combine::kFedAvg));
        EXPECT_GT(RelativeError(Product(fedit.adapter, l, t), mean), RelativeError(got, mean));
      }
    }
  }
}

TEST(AggregationTest, ExactCombinesMixedRanksAndScales) {
  const auto global = RandomAdapter(8, 1);
  // Ranks 4 and 8 (total 12 > 8): the best rank-8 approximation of the mean product.
  std::vector<ClientUpdate> updates = {Update("r4", 2, RandomAdapter(4, 2, 8)),
                                       Update("r8", 1, RandomAdapter(8, 3, 16))};
  auto r = AggregateOk(global, updates, With(Combine::kExact));
  EXPECT_EQ(r.adapter.config.rank, 8);
  for (int64_t l = 0; l < 2; ++l) {
    for (LoraTarget t : kTargets) {
      const auto& f = r.adapter.factors.layers[l][static_cast<int>(t)];
      EXPECT_EQ(f.a.size(0), 8);
      EXPECT_EQ(f.b.size(1), 8);
      EXPECT_LT(RelativeError(Product(r.adapter, l, t), BestRank(MeanProduct(updates, l, t), 8)),
                1e-4);
    }
  }
  // Ranks 2 and 4 with different alphas fit in rank 8: exact.
  updates = {Update("r2", 1, RandomAdapter(2, 4, 4)), Update("r4", 1, RandomAdapter(4, 5, 32))};
  r = AggregateOk(global, updates, With(Combine::kExact));
  for (int64_t l = 0; l < 2; ++l) {
    for (LoraTarget t : kTargets) {
      EXPECT_LT(RelativeError(Product(r.adapter, l, t), MeanProduct(updates, l, t)), 1e-4);
      // The unused components carry no product (B column 0) but keep live A rows for training.
      const auto& f = r.adapter.factors.layers[l][static_cast<int>(t)];
      EXPECT_EQ(f.b.narrow(1, 6, 2).abs().max().item<float>(), 0.f);
      EXPECT_GT(f.a.narrow(0, 6, 2).abs().max().item<float>(), 0.f);
    }
  }
  // FedAvg refuses what it cannot combine.
  auto fedavg = Aggregate(Model(), global, updates, With(Combine::kFedAvg), nullptr);
  ASSERT_FALSE(fedavg.ok());
  EXPECT_HAS(std::string(fedavg.status().message()),
             "update from r2: rank 2 differs from the global rank 8");
}

TEST(AggregationTest, MedianAndTrimmedMeanResistOneHugeOutlier) {
  const auto global = RandomAdapter(8, 1);
  const auto honest = RandomAdapter(8, 2);
  std::vector<ClientUpdate> updates;
  for (int i = 0; i < 5; ++i) {
    lora::LoraAdapter a = honest.Clone();
    at::manual_seed(100 + i);
    for (auto& layer : a.factors.layers) {
      for (auto& f : layer) {
        if (!f.a.defined()) continue;
        f.a += at::randn(f.a.sizes()) * 1e-3;
        f.b += at::randn(f.b.sizes()) * 1e-3;
      }
    }
    updates.push_back(Update("honest" + std::to_string(i), 10, std::move(a)));
  }
  lora::LoraAdapter evil = honest.Clone();
  for (auto& layer : evil.factors.layers) {
    for (auto& f : layer) {
      if (!f.a.defined()) continue;
      f.a += 1e3;
      f.b -= 1e3;
    }
  }
  updates.push_back(Update("evil", 10, std::move(evil)));
  AggregationOptions trimmed = With(Combine::kTrimmedMean);
  trimmed.trim_ratio = 0.2;  // Drops one update at each end of 6.
  for (const AggregationOptions& o : {With(Combine::kMedian), trimmed}) {
    const auto r = AggregateOk(global, updates, o);
    const auto& got = r.adapter.factors.layers[1][static_cast<int>(LoraTarget::kV)];
    const auto& want = honest.factors.layers[1][static_cast<int>(LoraTarget::kV)];
    EXPECT_LT((got.a - want.a).abs().max().item<float>(), 1e-2) << CombineName(o.combine);
    EXPECT_LT((got.b - want.b).abs().max().item<float>(), 1e-2) << CombineName(o.combine);
  }
  const auto avg = AggregateOk(global, updates, With(Combine::kFedAvg));
  EXPECT_GT((avg.adapter.factors.layers[1][2].a - honest.factors.layers[1][2].a)
                .abs()
                .max()
                .item<float>(),
            100.f);
}

double FactorDeltaNorm(const lora::LoraAdapter& x, const lora::LoraAdapter& g) {
  double sq = 0;
  for (size_t l = 0; l < g.factors.layers.size(); ++l) {
    for (LoraTarget t : kTargets) {
      const int ti = static_cast<int>(t);
      sq += (x.factors.layers[l][ti].a - g.factors.layers[l][ti].a).pow(2).sum().item<double>();
      sq += (x.factors.layers[l][ti].b - g.factors.layers[l][ti].b).pow(2).sum().item<double>();
    }
  }
  return std::sqrt(sq);
}

TEST(AggregationTest, ClippingBoundsEachUpdatesDelta) {
  const auto global = RandomAdapter(8, 1);
  const auto big = RandomAdapter(8, 2);
  const double big_norm = FactorDeltaNorm(big, global);
  ASSERT_GT(big_norm, 2.0);
  AggregationOptions o = With(Combine::kFedAvg);
  o.clip_norm = 0.5;
  auto r = AggregateOk(global, {Update("big", 1, big)}, o);
  ASSERT_EQ(r.clipped.size(), 1u);
  EXPECT_TRUE(r.clipped[0]);
  EXPECT_NEAR(r.delta_norms[0], big_norm, 1e-3 * big_norm);
  EXPECT_NEAR(FactorDeltaNorm(r.adapter, global), 0.5, 1e-4);

  // A small update next to a big one: only the big one is clipped, and the mean moves by at most
  // the weighted sum of the clipped deltas.
  lora::LoraAdapter small = global.Clone();
  small.factors.layers[0][0].a[0][0] += 0.1f;
  r = AggregateOk(global, {Update("small", 1, small), Update("big", 1, big)}, o);
  EXPECT_FALSE(r.clipped[0]);
  EXPECT_TRUE(r.clipped[1]);
  EXPECT_NEAR(r.delta_norms[0], 0.1, 1e-5);
  EXPECT_LE(FactorDeltaNorm(r.adapter, global), 0.5 * 0.1 + 0.5 * 0.5 + 1e-5);

  // Exact aggregation clips the product delta ‖s·B·A − s·B_g·A_g‖; from a fresh global (B = 0)
  // the new product's norm is exactly the clip norm.
  lora::LoraAdapter fresh = RandomAdapter(8, 1, 16, 0.0);
  double product_norm_sq = 0;
  for (int64_t l = 0; l < 2; ++l) {
    for (LoraTarget t : kTargets) product_norm_sq += Product(big, l, t).pow(2).sum().item<double>();
  }
  o.combine = Combine::kExact;
  o.clip_norm = 0.25;
  r = AggregateOk(fresh, {Update("big", 1, big)}, o);
  EXPECT_TRUE(r.clipped[0]);
  EXPECT_NEAR(r.delta_norms[0], std::sqrt(product_norm_sq), 1e-3 * std::sqrt(product_norm_sq));
  double got_sq = 0;
  for (int64_t l = 0; l < 2; ++l) {
    for (LoraTarget t : kTargets) {
      got_sq += Product(r.adapter, l, t).pow(2).sum().item<double>();
      // Direction kept: the clipped product is the original scaled down.
      EXPECT_LT(RelativeError(Product(r.adapter, l, t),
                              Product(big, l, t) * (0.25 / std::sqrt(product_norm_sq))),
                1e-4);
    }
  }
  EXPECT_NEAR(std::sqrt(got_sq), 0.25, 1e-4);
}

TEST(AggregationTest, FedAdamAndFedYogiKeepStateAcrossRounds) {
  const std::string name = lora::PeftTensorName(1, LoraTarget::kQ, true);
  const int q = static_cast<int>(LoraTarget::kQ);
  for (ServerOptimizer opt : {ServerOptimizer::kFedAdam, ServerOptimizer::kFedYogi}) {
    AggregationOptions o = With(Combine::kFedAvg);
    o.server_optimizer = opt;
    o.server_lr = 0.05;
    const auto global = RandomAdapter(8, 1);
    const auto trained = RandomAdapter(8, 2);
    ServerOptimizerState state;
    const auto r1 = AggregateOk(global, {Update("a", 1, trained)}, o, &state);
    EXPECT_EQ(state.steps, 1);
    EXPECT_EQ(state.m.size(), 2u * 2 * 2);  // layers x targets x {A, B}
    const at::Tensor g1 = global.factors.layers[1][q].a;
    const at::Tensor d1 = trained.factors.layers[1][q].a - g1;
    const at::Tensor m1 = d1 * (1 - o.beta1);
    const at::Tensor v1 = d1 * d1 * (1 - o.beta2);  // Yogi's first step equals Adam's from v = 0.
    EXPECT_TRUE(at::allclose(state.m.at(name), m1, 1e-5, 1e-7));
    EXPECT_TRUE(at::allclose(state.v.at(name), v1, 1e-5, 1e-9));
    const at::Tensor x1 = g1 + m1 / (at::sqrt(v1) + o.tau) * o.server_lr;
    EXPECT_TRUE(at::allclose(r1.adapter.factors.layers[1][q].a, x1, 1e-5, 1e-6));
    // Each coordinate moves by about server_lr·(1−β1)/√(1−β2), whatever the size of its delta.
    EXPECT_LT((r1.adapter.factors.layers[1][q].a - g1).abs().max().item<float>(),
              o.server_lr * (1 - o.beta1) / std::sqrt(1 - o.beta2) * 1.01);

    // Round 2 from the new global: the moments carry over.
    const auto r2 = AggregateOk(r1.adapter, {Update("a", 1, trained)}, o, &state);
    EXPECT_EQ(state.steps, 2);
    const at::Tensor d2 = trained.factors.layers[1][q].a - x1;
    const at::Tensor m2 = m1 * o.beta1 + d2 * (1 - o.beta1);
    at::Tensor v2;
    if (opt == ServerOptimizer::kFedAdam) {
      v2 = v1 * o.beta2 + d2 * d2 * (1 - o.beta2);
    } else {
      v2 = v1 - d2 * d2 * at::sign(v1 - d2 * d2) * (1 - o.beta2);
    }
    EXPECT_TRUE(at::allclose(state.m.at(name), m2, 1e-4, 1e-7)) << ServerOptimizerName(opt);
    EXPECT_TRUE(at::allclose(state.v.at(name), v2, 1e-4, 1e-9)) << ServerOptimizerName(opt);
    EXPECT_TRUE(at::allclose(r2.adapter.factors.layers[1][q].a,
                             x1 + m2 / (at::sqrt(v2) + o.tau) * o.server_lr, 1e-4, 1e-6));
    // A fresh state would have stepped differently: the state is really used.
    ServerOptimizerState fresh;
    const auto r2_fresh = AggregateOk(r1.adapter, {Update("a", 1, trained)}, o, &fresh);
    EXPECT_FALSE(at::allclose(r2_fresh.adapter.factors.layers[1][q].a,
                              r2.adapter.factors.layers[1][q].a, 1e-4, 1e-6));
  }
  // The state is required and untouched by a failed aggregation.
  AggregationOptions o = With(Combine::kFedAvg);
  o.server_optimizer = ServerOptimizer::kFedAdam;
  EXPECT_FALSE(
      Aggregate(Model(), RandomAdapter(8, 1), {Update("a", 1, RandomAdapter(8, 2))}, o, nullptr)
          .ok());
  ServerOptimizerState state;
  state.steps = 7;
  EXPECT_FALSE(
      Aggregate(Model(), RandomAdapter(8, 1), {Update("a", 0, RandomAdapter(8, 2))}, o, &state)
          .ok());
  EXPECT_EQ(state.steps, 7);
  EXPECT_TRUE(state.m.empty());
}

// ValidateUpdate's message for `update` against a rank-8 q/v global.
std::string Rejection(const ClientUpdate& update, AggregationOptions o = AggregationOptions()) {
  const auto global = RandomAdapter(8, 1);
  auto v = ValidateUpdate(Model(), global, update, o);
  EXPECT_FALSE(v.ok());
  // Aggregate refuses the round with the same message, even next to a valid (null) update.
  auto a = Aggregate(Model(), global, {Update("ok", 1, global.Clone()), update}, o, nullptr);
  EXPECT_FALSE(a.ok());
  if (v.ok() || a.ok()) return "";
  EXPECT_EQ(v.status().message(), a.status().message());
  return std::string(v.status().message());
}

TEST(AggregationTest, RejectsBadUpdatesNamingDeviceLayerAndModule) {
  const int v = static_cast<int>(LoraTarget::kV);
  auto nan = RandomAdapter(8, 2);
  nan.factors.layers[1][v].a[2][3] = NAN;
  std::string m = Rejection(Update("dev-nan", 5, nan));
  EXPECT_HAS(m, "update from dev-nan");
  EXPECT_HAS(m, "layer 1 v_proj");
  EXPECT_HAS(m, "lora_A has NaN or Inf");

  auto shape = RandomAdapter(8, 2);
  shape.factors.layers[0][v].b = at::zeros({32, 7});
  m = Rejection(Update("dev-shape", 5, shape));
  EXPECT_HAS(m, "update from dev-shape");
  EXPECT_HAS(m, "layer 0 v_proj: lora_B has shape [32, 7], expected [32, 8]");

  auto unknown = RandomAdapter(8, 2);
  unknown.factors.layers[1][static_cast<int>(LoraTarget::kK)] = {at::zeros({8, 64}),
                                                                 at::zeros({32, 8})};
  m = Rejection(Update("dev-k", 5, unknown));
  EXPECT_HAS(m, "update from dev-k");
  EXPECT_HAS(m, "layer 1 k_proj: unknown module");
  auto unknown_config = RandomAdapter(8, 2);
  unknown_config.config.targets.push_back(LoraTarget::kO);
  EXPECT_HAS(Rejection(Update("dev-o", 5, unknown_config)), "unknown module o_proj");

  m = Rejection(Update("dev-zero", 0, RandomAdapter(8, 2)));
  EXPECT_HAS(m, "update from dev-zero: num_samples must be > 0, got 0");

  AggregationOptions bounded;
  bounded.max_update_norm = 0.5;
  m = Rejection(Update("dev-big", 5, RandomAdapter(8, 2)), bounded);
  EXPECT_HAS(m, "update from dev-big: delta norm");
  EXPECT_HAS(m, "exceeds max_update_norm 0.5");
  // Within the bound it passes and reports the norm.
  bounded.max_update_norm = 1e6;
  const auto global = RandomAdapter(8, 1);
  const auto fine = RandomAdapter(8, 2);
  auto norm = ValidateUpdate(Model(), global, Update("dev-ok", 5, fine), bounded);
  ASSERT_TRUE(norm.ok()) << norm.status();
  EXPECT_NEAR(*norm, FactorDeltaNorm(fine, global), 1e-3);

  auto alpha = RandomAdapter(8, 2, 32);
  EXPECT_HAS(Rejection(Update("dev-alpha", 5, alpha)), "differs from the global scale");

  AggregationOptions bad_options;
  bad_options.trim_ratio = 0.5;
  EXPECT_HAS(
      std::string(
          ValidateUpdate(Model(), global, Update("x", 1, fine), bad_options).status().message()),
      "trim_ratio must be in [0, 0.5)");
  EXPECT_HAS(
      std::string(Aggregate(Model(), global, {}, AggregationOptions(), nullptr).status().message()),
      "no updates");
}

}  // namespace
}  // namespace collm::federation
