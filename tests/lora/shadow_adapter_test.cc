// The shadow adapter: an independent trainable copy, AdamW steps with clipping and decoupled weight
// decay, detached snapshots, loading a new version with or without the optimizer state, and
// checkpoints that resume training exactly where it stopped.
#include "collm/lora/shadow_adapter.h"

#include <ATen/ATen.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <string>

#include "collm/runtime/random_model.h"
#include "gtest/gtest.h"
#include "testing/test_env.h"

namespace collm::lora {
namespace {

using ::collm::testing::MakeTempDir;
using runtime::LoraTarget;

LoraAdapter FreshAdapter(int rank = 4, uint64_t seed = 3) {
  LoraConfig config;
  config.rank = rank;
  config.targets = {LoraTarget::kQ, LoraTarget::kV};
  return LoraAdapter::Create(runtime::TinyLlamaConfig(), config, seed).value();
}

std::unique_ptr<ShadowAdapter> MakeShadow(const LoraAdapter& initial, AdamWOptions options = {}) {
  auto shadow = ShadowAdapter::Create(initial, options);
  EXPECT_TRUE(shadow.ok()) << shadow.status();
  return shadow.ok() ? *std::move(shadow) : nullptr;
}

// Every trainable tensor of `factors`, in layer and target order.
std::vector<at::Tensor> Tensors(const runtime::LoraFactors& factors) {
  std::vector<at::Tensor> out;
  for (const auto& layer : factors.layers) {
    for (const auto& f : layer) {
      if (!f.a.defined()) continue;
      out.push_back(f.a);
      out.push_back(f.b);
    }
  }
  return out;
}

std::vector<at::Tensor> Copies(const runtime::LoraFactors& factors) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& t : Tensors(factors)) out.push_back(t.detach().clone());
  return out;
}

// d(sum of every parameter)/dp = 1 everywhere: every parameter gets a gradient of ones.
void BackwardSumOfAll(const ShadowAdapter& shadow) {
  at::Tensor loss = at::zeros({});
  for (const at::Tensor& t : Tensors(shadow.factors())) loss = loss + t.sum();
  loss.backward();
}

int64_t NumElements(const runtime::LoraFactors& factors) {
  int64_t n = 0;
  for (const at::Tensor& t : Tensors(factors)) n += t.numel();
  return n;
}

TEST(ShadowAdapterTest, StartsAsAnIndependentTrainableF32Copy) {
  const LoraAdapter initial = FreshAdapter();
  auto shadow = MakeShadow(initial);
  ASSERT_NE(shadow, nullptr);
  EXPECT_EQ(shadow->step(), 0);
  EXPECT_EQ(shadow->config().rank, 4);
  const auto params = Tensors(shadow->factors());
  const auto originals = Tensors(initial.factors);
  ASSERT_EQ(params.size(), originals.size());
  ASSERT_EQ(params.size(), 2 * 2 * initial.factors.layers.size()) << "A and B of q and v";
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_TRUE(params[i].requires_grad());
    EXPECT_EQ(params[i].scalar_type(), at::kFloat);
    EXPECT_TRUE(at::equal(params[i], originals[i]));
  }
  const auto before = Copies(initial.factors);
  BackwardSumOfAll(*shadow);
  shadow->Step(0.1, 0);
  const auto after = Tensors(initial.factors);
  for (size_t i = 0; i < before.size(); ++i) {
    EXPECT_TRUE(at::equal(after[i], before[i])) << "training the shadow changed the original";
  }
}

TEST(ShadowAdapterTest, FirstAdamWStepMovesEveryParameterByLrAgainstItsGradient) {
  auto shadow = MakeShadow(FreshAdapter());
  ASSERT_NE(shadow, nullptr);
  const auto before = Copies(shadow->factors());
  BackwardSumOfAll(*shadow);
  const double norm = shadow->Step(0.01, 0);
  // Gradient of ones: the global norm is sqrt(#elements); bias-corrected m / sqrt(v) is 1.
  EXPECT_NEAR(norm, std::sqrt(static_cast<double>(NumElements(shadow->factors()))), 1e-6);
  EXPECT_EQ(shadow->step(), 1);
  const auto after = Tensors(shadow->factors());
  for (size_t i = 0; i < before.size(); ++i) {
    EXPECT_TRUE(at::allclose(after[i].detach(), before[i] - 0.01, 1e-5, 1e-6)) << "tensor " << i;
    EXPECT_FALSE(after[i].grad().defined()) << "Step clears the gradients";
  }
}

TEST(ShadowAdapterTest, StepReturnsTheNormBeforeClipping) {
  auto shadow = MakeShadow(FreshAdapter());
  ASSERT_NE(shadow, nullptr);
  BackwardSumOfAll(*shadow);
  const double full = std::sqrt(static_cast<double>(NumElements(shadow->factors())));
  ASSERT_GT(full, 0.5);
  EXPECT_NEAR(shadow->Step(0.01, 0.5), full, 1e-6);
}

TEST(ShadowAdapterTest, ClippingScalesTheGradientThatReachesTheMoments) {
  // With eps 1 the first update is lr * g / (|g| + 1) per entry, so it shows the size of the
  // (clipped) gradient g that reached the moments.
  AdamWOptions options;
  options.eps = 1.0;
  auto clipped = MakeShadow(FreshAdapter(), options);
  auto unclipped = MakeShadow(FreshAdapter(), options);
  ASSERT_NE(clipped, nullptr);
  ASSERT_NE(unclipped, nullptr);
  const auto before = Copies(clipped->factors());
  BackwardSumOfAll(*clipped);
  BackwardSumOfAll(*unclipped);
  const double norm = std::sqrt(static_cast<double>(NumElements(clipped->factors())));
  clipped->Step(1.0, norm / 10);  // Every gradient entry becomes ~0.1.
  unclipped->Step(1.0, 0);
  const double c = (norm / 10) / (norm + 1e-6);  // The clip factor, times the gradient 1.
  const auto got_clipped = Tensors(clipped->factors());
  const auto got_unclipped = Tensors(unclipped->factors());
  for (size_t i = 0; i < before.size(); ++i) {
    EXPECT_TRUE(at::allclose(got_clipped[i].detach(), before[i] - c / (c + 1.0), 1e-4, 1e-6));
    EXPECT_TRUE(at::allclose(got_unclipped[i].detach(), before[i] - 0.5, 1e-4, 1e-6));
  }
}

TEST(ShadowAdapterTest, ParametersWithoutAGradientAreLeftAlone) {
  auto shadow = MakeShadow(FreshAdapter());
  ASSERT_NE(shadow, nullptr);
  const auto before = Copies(shadow->factors());
  // Only layer 0's q_proj A gets a gradient.
  const auto& q0 = shadow->factors().layers[0][static_cast<int>(LoraTarget::kQ)];
  q0.a.sum().backward();
  shadow->Step(0.01, 0);
  const auto after = Tensors(shadow->factors());
  EXPECT_TRUE(at::allclose(after[0].detach(), before[0] - 0.01, 1e-5, 1e-6));
  for (size_t i = 1; i < before.size(); ++i) {
    EXPECT_TRUE(at::equal(after[i].detach(), before[i])) << "tensor " << i << " moved";
  }
}

TEST(ShadowAdapterTest, WeightDecayIsDecoupledFromTheGradient) {
  AdamWOptions options;
  options.weight_decay = 0.5;
  auto shadow = MakeShadow(FreshAdapter(), options);
  ASSERT_NE(shadow, nullptr);
  const auto before = Copies(shadow->factors());
  BackwardSumOfAll(*shadow);
  shadow->Step(0.1, 0);
  const auto after = Tensors(shadow->factors());
  for (size_t i = 0; i < before.size(); ++i) {
    // p * (1 - lr * wd) - lr * m / sqrt(v).
    EXPECT_TRUE(at::allclose(after[i].detach(), before[i] * (1 - 0.1 * 0.5) - 0.1, 1e-5, 1e-6));
  }
}

TEST(ShadowAdapterTest, ZeroGradDropsAccumulatedGradients) {
  auto shadow = MakeShadow(FreshAdapter());
  ASSERT_NE(shadow, nullptr);
  const auto before = Copies(shadow->factors());
  BackwardSumOfAll(*shadow);
  shadow->ZeroGrad();
  for (const at::Tensor& t : Tensors(shadow->factors())) EXPECT_FALSE(t.grad().defined());
  shadow->Step(0.01, 0);  // Nothing to apply.
  const auto after = Tensors(shadow->factors());
  for (size_t i = 0; i < before.size(); ++i) EXPECT_TRUE(at::equal(after[i].detach(), before[i]));
}

TEST(ShadowAdapterTest, SnapshotIsADetachedCopyThatLaterStepsDoNotTouch) {
  auto shadow = MakeShadow(FreshAdapter());
  ASSERT_NE(shadow, nullptr);
  BackwardSumOfAll(*shadow);
  shadow->Step(0.01, 0);
  const LoraAdapter snapshot = shadow->Snapshot();
  const auto snapped = Copies(snapshot.factors);
  const auto snapshot_tensors = Tensors(snapshot.factors);
  const auto live = Tensors(shadow->factors());
  for (size_t i = 0; i < live.size(); ++i) {
    EXPECT_FALSE(snapshot_tensors[i].requires_grad());
    EXPECT_TRUE(at::equal(snapshot_tensors[i], live[i].detach()));
  }
  BackwardSumOfAll(*shadow);
  shadow->Step(0.01, 0);
  const auto later = Tensors(snapshot.factors);
  for (size_t i = 0; i < later.size(); ++i) EXPECT_TRUE(at::equal(later[i], snapped[i]));
}

TEST(ShadowAdapterTest, LoadReplacesTheParametersAndResetsTheOptimizerOnlyWhenAsked) {
  auto shadow = MakeShadow(FreshAdapter(4, 3));
  ASSERT_NE(shadow, nullptr);
  BackwardSumOfAll(*shadow);
  shadow->Step(0.01, 0);
  const LoraAdapter next = FreshAdapter(4, 99);
  ASSERT_TRUE(shadow->Load(next, /*reset_optimizer=*/false).ok());
  EXPECT_EQ(shadow->step(), 1) << "moments and step kept";
  const auto loaded = Tensors(shadow->factors());
  const auto expected = Tensors(next.factors);
  for (size_t i = 0; i < loaded.size(); ++i) {
    EXPECT_TRUE(at::equal(loaded[i].detach(), expected[i]));
    EXPECT_TRUE(loaded[i].requires_grad()) << "still trainable";
  }
  ASSERT_TRUE(shadow->Load(next, /*reset_optimizer=*/true).ok());
  EXPECT_EQ(shadow->step(), 0);
  // A reset optimizer makes the next step a first step again: exactly lr per parameter.
  BackwardSumOfAll(*shadow);
  shadow->Step(0.01, 0);
  const auto after = Tensors(shadow->factors());
  for (size_t i = 0; i < after.size(); ++i) {
    EXPECT_TRUE(at::allclose(after[i].detach(), expected[i] - 0.01, 1e-5, 1e-6));
  }
}

TEST(ShadowAdapterTest, LoadRefusesAnAdapterOfAnotherRankOrTargets) {
  auto shadow = MakeShadow(FreshAdapter(4));
  ASSERT_NE(shadow, nullptr);
  const absl::Status rank = shadow->Load(FreshAdapter(8), true);
  EXPECT_EQ(rank.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(rank.message().find("different rank"), std::string::npos) << rank;
  LoraConfig other;
  other.rank = 4;
  other.targets = {LoraTarget::kQ, LoraTarget::kK};
  const absl::Status targets =
      shadow->Load(LoraAdapter::Create(runtime::TinyLlamaConfig(), other, 1).value(), true);
  EXPECT_EQ(targets.code(), absl::StatusCode::kInvalidArgument) << targets;
}

TEST(ShadowAdapterTest, CheckpointResumesTrainingExactly) {
  const std::string dir = MakeTempDir("shadow-ckpt") + "/ckpt";
  AdamWOptions options;
  options.weight_decay = 0.01;
  auto shadow = MakeShadow(FreshAdapter(), options);
  ASSERT_NE(shadow, nullptr);
  for (int i = 0; i < 3; ++i) {
    BackwardSumOfAll(*shadow);
    shadow->Step(0.01, 0);
  }
  ASSERT_TRUE(shadow->SaveCheckpoint(dir, {{"trainer.cursor", "17"}}).ok());
  EXPECT_TRUE(std::filesystem::exists(dir + "/optimizer.safetensors"));
  EXPECT_TRUE(std::filesystem::exists(dir + "/adapter_model.safetensors"));

  std::map<std::string, std::string> metadata;
  auto resumed = ShadowAdapter::LoadCheckpoint(dir, runtime::TinyLlamaConfig(), options, &metadata);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_EQ((*resumed)->step(), 3);
  EXPECT_EQ(metadata["trainer.cursor"], "17");
  EXPECT_EQ(metadata["collm.step"], "3");
  // One more step on each: equal only if the moments and the step count came back too.
  BackwardSumOfAll(*shadow);
  shadow->Step(0.01, 0);
  BackwardSumOfAll(**resumed);
  (*resumed)->Step(0.01, 0);
  const auto a = Tensors(shadow->factors());
  const auto b = Tensors((*resumed)->factors());
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(at::allclose(a[i].detach(), b[i].detach(), 1e-6, 1e-7)) << "tensor " << i;
  }
}

TEST(ShadowAdapterTest, CheckpointWithoutOptimizerStateIsAnErrorNamingTheFile) {
  const std::string dir = MakeTempDir("shadow-ckpt-bad") + "/ckpt";
  auto shadow = MakeShadow(FreshAdapter());
  ASSERT_NE(shadow, nullptr);
  ASSERT_TRUE(shadow->SaveCheckpoint(dir, {}).ok());
  std::filesystem::remove(dir + "/optimizer.safetensors");
  auto resumed = ShadowAdapter::LoadCheckpoint(dir, runtime::TinyLlamaConfig(), {}, nullptr);
  ASSERT_FALSE(resumed.ok());
  EXPECT_NE(resumed.status().message().find("optimizer.safetensors"), std::string::npos)
      << resumed.status();
}

}  // namespace
}  // namespace collm::lora
