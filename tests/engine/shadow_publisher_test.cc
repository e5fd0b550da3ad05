#include "collm/engine/shadow_publisher.h"

#include <random>

#include "gtest/gtest.h"
#include "testing/pattern_examples.h"
#include "testing/tiny_model.h"

namespace collm::engine {
namespace {

std::vector<TrainingExample> Pattern(int n, uint32_t seed) {
  return collm::testing::FixedCompletionExamples(n, seed, 200, 3);
}

struct Fixture {
  std::shared_ptr<const runtime::LlamaModel> model =
      runtime::LlamaModel::Load(collm::testing::TinyModelDir(), runtime::RuntimeOptions{}).value();
  lora::AdapterRegistry registry{model->config(), model->runtime()};
  std::unique_ptr<PeftTrainer> trainer;
  Fixture() {
    lora::LoraConfig c;
    c.rank = 4;
    c.dropout = 0;
    c.targets = {runtime::LoraTarget::kQ, runtime::LoraTarget::kV, runtime::LoraTarget::kDown};
    TrainerOptions o;
    o.lr = 1e-2;
    auto shadow = lora::ShadowAdapter::Create(
                      lora::LoraAdapter::Create(model->config(), c, 1).value(), o.adamw)
                      .value();
    trainer = PeftTrainer::Create(model, std::move(shadow), o).value();
  }
};

TEST(ShadowPublisherTest, QualityGateRefusesNoImprovementAndPublishesRealGains) {
  Fixture f;
  auto train = Pattern(32, 1);
  PublishOptions opts;
  opts.quality_gate = true;
  opts.min_improvement = 0.05;
  ShadowPublisher pub(f.model, f.registry, "live", opts, Pattern(8, 2));
  // An untrained shadow equals the base model: no improvement, nothing goes live.
  EXPECT_FALSE(pub.Consider(*f.trainer).value());
  EXPECT_EQ(pub.stats().rejected, 1);
  EXPECT_NE(pub.stats().last_decision.find("kept training"), std::string::npos);
  EXPECT_EQ(f.registry.Get("live").status().code(), absl::StatusCode::kNotFound);

  ExampleSampler sampler(&train, 1);
  for (int i = 0; i < 15; ++i) ASSERT_TRUE(f.trainer->Step(sampler).ok());
  EXPECT_TRUE(pub.Consider(*f.trainer).value());
  EXPECT_EQ(pub.stats().published, 1);
  EXPECT_EQ(pub.stats().live_version, 1);
  auto live = f.registry.Get("live").value();
  EXPECT_NEAR(live->held_out_loss, pub.stats().last_candidate_loss, 1e-12);
  EXPECT_LT(pub.stats().live_loss, EvaluateLoss(*f.model, nullptr, Pattern(8, 2)).value() - 0.05);
  // Same shadow again: not better than itself, refused.
  EXPECT_FALSE(pub.Consider(*f.trainer).value());
  EXPECT_EQ(pub.stats().rejected, 2);
  EXPECT_EQ(f.registry.Get("live").value()->version, 1);
}

TEST(ShadowPublisherTest, UngatedPublishesEveryNSteps) {
  Fixture f;
  PublishOptions opts;
  opts.every_steps = 5;
  ShadowPublisher pub(f.model, f.registry, "live", opts, Pattern(4, 3));
  EXPECT_FALSE(pub.Due(0));
  EXPECT_FALSE(pub.Due(4));
  EXPECT_TRUE(pub.Due(5));
  EXPECT_TRUE(pub.Due(10));
  EXPECT_TRUE(pub.Consider(*f.trainer).value());
  EXPECT_TRUE(pub.Consider(*f.trainer).value());
  EXPECT_EQ(f.registry.Get("live").value()->version, 2);
  EXPECT_EQ(f.registry.Get("live").value()->source, "shadow step 0");
}

// The sliced variant decides like Consider, on the copy taken when it began: training that goes
// on meanwhile does not leak into the published version.
TEST(ShadowPublisherTest, SlicedEvaluationPublishesTheSnapshotItBeganWith) {
  Fixture f;
  auto train = Pattern(32, 1);
  PublishOptions opts;
  opts.quality_gate = true;
  ShadowPublisher pub(f.model, f.registry, "live", opts, Pattern(8, 2));
  ExampleSampler sampler(&train, 1);
  for (int i = 0; i < 15; ++i) ASSERT_TRUE(f.trainer->Step(sampler).ok());
  const lora::LoraAdapter began = f.trainer->shadow().Snapshot();
  const double whole = f.trainer->Evaluate(Pattern(8, 2)).value();
  ASSERT_TRUE(pub.BeginConsider(*f.trainer));
  EXPECT_TRUE(pub.pending());
  EXPECT_FALSE(pub.BeginConsider(*f.trainer)) << "one evaluation at a time";
  ASSERT_TRUE(f.trainer->Step(sampler).ok());  // The shadow moves on meanwhile.
  ASSERT_TRUE(pub.EvaluateSome(3).ok());
  EXPECT_TRUE(pub.evaluating());
  EXPECT_FALSE(pub.Poll().has_value()) << "5 of 8 held-out examples left";
  ASSERT_TRUE(pub.EvaluateSome(5).ok());
  EXPECT_FALSE(pub.evaluating());
  auto decided = pub.Poll();
  ASSERT_TRUE(decided.has_value());
  ASSERT_TRUE(decided->ok()) << decided->status();
  EXPECT_TRUE(**decided);
  EXPECT_FALSE(pub.pending());
  EXPECT_FALSE(pub.Poll().has_value());
  EXPECT_EQ(pub.stats().published, 1);
  EXPECT_NEAR(pub.stats().last_candidate_loss, whole, 1e-5) << "slices sum to the whole loss";
  auto live = f.registry.Get("live").value();
  EXPECT_EQ(live->source, "shadow step 15");
  const auto& want = began.factors.layers[0][static_cast<int>(runtime::LoraTarget::kQ)].b;
  const auto& got = live->adapter.factors.layers[0][static_cast<int>(runtime::LoraTarget::kQ)].b;
  EXPECT_TRUE(got.equal(want));
}

}  // namespace
}  // namespace collm::engine
