#include "collm/engine/peft_trainer.h"

#include <ATen/ATen.h>

#include <array>
#include <random>

#include "collm/lora/shadow_adapter.h"
#include "gtest/gtest.h"
#include "testing/test_env.h"
#include "testing/tiny_model.h"

namespace collm::engine {
namespace {

using runtime::LoraTarget;

std::shared_ptr<const runtime::LlamaModel> Tiny() {
  return runtime::LlamaModel::Load(collm::testing::TinyModelDir(), runtime::RuntimeOptions{})
      .value();
}

// Synthetic task the tiny model can learn: after a prompt, repeat a fixed pattern.
std::vector<TrainingExample> PatternExamples(int n, uint32_t seed, int prompt_len = 6) {
  std::mt19937 rng(seed);
  std::vector<TrainingExample> out;
  for (int i = 0; i < n; ++i) {
    TrainingExample e;
    e.tokens.push_back(1);
    e.loss_mask.push_back(0);
    for (int k = 0; k < prompt_len; ++k) {
      e.tokens.push_back(3 + rng() % 500);
      e.loss_mask.push_back(0);
    }
    for (int k = 0; k < 8; ++k) {
      e.tokens.push_back(100 + (k * 7 + e.tokens[1]) % 50);
      e.loss_mask.push_back(1);
    }
    out.push_back(std::move(e));
  }
  return out;
}

std::unique_ptr<PeftTrainer> MakeTrainer(std::shared_ptr<const runtime::LlamaModel> model,
                                         TrainerOptions options, double dropout = 0.0,
                                         uint64_t init_seed = 1) {
  lora::LoraConfig config;
  config.rank = 8;
  config.alpha = 16;
  config.dropout = dropout;
  config.targets = {LoraTarget::kQ,    LoraTarget::kK,  LoraTarget::kV,   LoraTarget::kO,
                    LoraTarget::kGate, LoraTarget::kUp, LoraTarget::kDown};
  auto adapter = lora::LoraAdapter::Create(model->config(), config, init_seed).value();
  auto shadow = lora::ShadowAdapter::Create(adapter, options.adamw).value();
  return PeftTrainer::Create(std::move(model), std::move(shadow), options).value();
}

TEST(PeftTrainerTest, LearnsAPatternAndLeavesTheBaseUntouched) {
  auto model = Tiny();
  at::Tensor base_before = model->BaseWeight(0, LoraTarget::kQ).clone();
  auto train = PatternExamples(64, 1), held_out = PatternExamples(16, 2);
  TrainerOptions o;
  o.lr = 1e-2;
  o.micro_batch_size = 8;
  auto trainer = MakeTrainer(model, o, 0.05);
  const double before = trainer->Evaluate(held_out).value();
  // A fresh adapter (B = 0) is exactly the base model.
  EXPECT_NEAR(before, EvaluateLoss(*model, nullptr, held_out).value(), 1e-6);
  ExampleSampler sampler(&train, 3);
  for (int i = 0; i < 40; ++i) ASSERT_TRUE(trainer->Step(sampler).ok());
  const double after = trainer->Evaluate(held_out).value();
  EXPECT_LT(after, before - 1.0) << "held-out loss " << before << " -> " << after;
  EXPECT_TRUE(model->BaseWeight(0, LoraTarget::kQ).equal(base_before));
  EXPECT_EQ(trainer->shadow().step(), 40);
}

TEST(PeftTrainerTest, SameSeedSameLosses) {
  auto model = Tiny();
  auto train = PatternExamples(32, 4);
  auto run = [&](uint64_t seed) {
    TrainerOptions o;
    o.lr = 5e-3;
    o.seed = seed;
    o.micro_batch_size = 4;
    auto trainer = MakeTrainer(model, o, 0.1);
    ExampleSampler sampler(&train, seed);
    std::vector<double> losses;
    for (int i = 0; i < 6; ++i) losses.push_back(trainer->Step(sampler).value().loss);
    return losses;
  };
  auto a = run(7), b = run(7), c = run(8);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
}

TEST(PeftTrainerTest, GradientAccumulationEqualsOneLargeBatch) {
  auto model = Tiny();
  auto train = PatternExamples(8, 5);  // Equal target counts per example.
  TrainerOptions big;
  big.lr = 1e-2;
  big.micro_batch_size = 8;
  TrainerOptions accum = big;
  accum.micro_batch_size = 2;
  accum.grad_accum_steps = 4;
  auto t1 = MakeTrainer(model, big), t2 = MakeTrainer(model, accum);
  ExampleSampler s1(&train, 9), s2(&train, 9);
  auto r1 = t1->Step(s1).value(), r2 = t2->Step(s2).value();
  EXPECT_NEAR(r1.loss, r2.loss, 1e-5);
  EXPECT_NEAR(r1.grad_norm, r2.grad_norm, 1e-4 * r1.grad_norm);
  EXPECT_EQ(r1.target_tokens, r2.target_tokens);
  auto a1 = t1->shadow().Snapshot(), a2 = t2->shadow().Snapshot();
  const auto& f1 = a1.factors.layers[1][static_cast<int>(LoraTarget::kDown)];
  const auto& f2 = a2.factors.layers[1][static_cast<int>(LoraTarget::kDown)];
  EXPECT_LT((f1.b - f2.b).abs().max().item<double>(), 1e-5);
}

// The whole graph at once, the way training ran before the head was restricted to target rows:
// full-vocabulary logits at every position, masked cross-entropy, one backward, on a copy of the
// trainer's parameters. The reference the phased, target-only, chunked trainer must reproduce.
struct FullLogitsReference {
  runtime::LoraFactors factors;  // With .grad() of loss / (targets * grad_accum).
  double loss = 0;               // Mean token loss over the targets.
};

FullLogitsReference RunFullLogitsReference(const runtime::LlamaModel& model,
                                           const PeftTrainer& trainer,
                                           const std::vector<TrainingExample>& examples) {
  FullLogitsReference ref;
  ref.factors.scale = trainer.shadow().factors().scale;
  for (const auto& layer : trainer.shadow().factors().layers) {
    std::array<runtime::LoraFactors::Factor, runtime::kNumLoraTargets> copy;
    for (size_t t = 0; t < layer.size(); ++t) {
      if (!layer[t].a.defined()) continue;
      copy[t].a = layer[t].a.detach().clone().requires_grad_(true);
      copy[t].b = layer[t].b.detach().clone().requires_grad_(true);
    }
    ref.factors.layers.push_back(copy);
  }
  const int64_t n = static_cast<int64_t>(examples.size());
  int64_t len = 0;
  for (const auto& e : examples) len = std::max<int64_t>(len, e.tokens.size());
  at::Tensor tokens = at::zeros({n, len}, at::kLong), mask = at::zeros({n, len});
  for (int64_t i = 0; i < n; ++i) {
    for (size_t j = 0; j < examples[i].tokens.size(); ++j) {
      tokens[i][j] = examples[i].tokens[j];
      mask[i][j] = examples[i].loss_mask[j] ? 1.0 : 0.0;
    }
  }
  auto weights = runtime::FuseLora(model.config(), ref.factors).value();
  at::Tensor logits = model.DenseLogits(tokens.narrow(1, 0, len - 1), &weights, 0.0, true).value();
  at::Tensor ce =
      at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}),
                             tokens.narrow(1, 1, len - 1).reshape({-1}), {}, at::Reduction::None);
  at::Tensor m = mask.narrow(1, 1, len - 1).reshape({-1});
  at::Tensor mean = (ce * m).sum() / m.sum();
  ref.loss = mean.item<double>();
  (mean / trainer.options().grad_accum_steps).backward();
  return ref;
}

// Largest |trainer grad - reference grad| over every factor, and the largest reference gradient.
std::pair<double, double> GradientGap(const PeftTrainer& trainer, const FullLogitsReference& ref) {
  double worst = 0, largest = 0;
  for (size_t l = 0; l < ref.factors.layers.size(); ++l) {
    for (size_t t = 0; t < ref.factors.layers[l].size(); ++t) {
      const auto& got = trainer.shadow().factors().layers[l][t];
      const auto& want = ref.factors.layers[l][t];
      if (!got.a.defined()) continue;
      EXPECT_TRUE(got.a.grad().defined()) << "layer " << l << " target " << t;
      if (!got.a.grad().defined()) return {1e30, 0};
      worst = std::max(worst, (got.a.grad() - want.a.grad()).abs().max().item<double>());
      worst = std::max(worst, (got.b.grad() - want.b.grad()).abs().max().item<double>());
      largest = std::max(largest, want.a.grad().abs().max().item<double>());
    }
  }
  return {worst, largest};
}

void RandomizeB(PeftTrainer& trainer) {
  // B = 0 at init would make every A gradient zero: give B values first.
  for (auto& layer : trainer.shadow().factors().layers) {
    for (auto& f : layer) {
      if (f.b.defined()) f.b.data().normal_(0, 0.05);
    }
  }
}

// The phased micro-step (one layer per phase, backward through detached layer boundaries) must
// give the gradients of one whole-graph backward through DenseLogits.
TEST(PeftTrainerTest, PhasedMicroStepGivesTheWholeGraphGradients) {
  auto model = Tiny();
  auto train = PatternExamples(3, 6);
  TrainerOptions o;
  o.grad_accum_steps = 2;  // No optimizer step: the gradients stay on the parameters.
  auto trainer = MakeTrainer(model, o, 0.0, 5);
  RandomizeB(*trainer);
  const FullLogitsReference ref = RunFullLogitsReference(*model, *trainer, train);
  std::vector<const TrainingExample*> batch;
  for (const auto& e : train) batch.push_back(&e);

  ASSERT_TRUE(trainer->BeginMicroStep(batch).ok());
  EXPECT_EQ(trainer->num_phases(), 2 * model->config().num_hidden_layers + 1);
  int phases = 0;
  for (;;) {
    EXPECT_EQ(trainer->next_phase(), phases);
    auto r = trainer->AdvanceMicroStep();
    ASSERT_TRUE(r.ok()) << r.status();
    ++phases;
    if (r->finished) {
      EXPECT_FALSE(r->step.has_value());  // Still accumulating.
      break;
    }
    EXPECT_TRUE(trainer->micro_step_active());
  }
  EXPECT_EQ(phases, trainer->num_phases());
  EXPECT_FALSE(trainer->micro_step_active());
  const auto [worst, largest] = GradientGap(*trainer, ref);
  EXPECT_GT(largest, 1e-6);
  EXPECT_LT(worst, 1e-5 * std::max(1.0, largest));
}

// The head and loss run on target rows only, in chunks of head_chunk_rows, and the head phase
// split over several calls (max_head_rows): the loss and every LoRA gradient must still be those
// of full-vocabulary logits at every position. Examples of different lengths, so padding and
// prompt positions are both present and must be skipped.
TEST(PeftTrainerTest, TargetOnlyChunkedHeadGivesTheFullLogitsLossAndGradients) {
  auto model = Tiny();
  auto train = PatternExamples(2, 11, 6);
  for (auto& e : PatternExamples(2, 12, 13)) train.push_back(std::move(e));
  TrainerOptions o;
  o.grad_accum_steps = 2;
  o.head_chunk_rows = 5;  // 32 targets: chunks of 5, the last one short.
  auto trainer = MakeTrainer(model, o, 0.0, 5);
  RandomizeB(*trainer);
  const FullLogitsReference ref = RunFullLogitsReference(*model, *trainer, train);
  std::vector<const TrainingExample*> batch;
  for (const auto& e : train) batch.push_back(&e);

  ASSERT_TRUE(trainer->BeginMicroStep(batch).ok());
  const int64_t layers = model->config().num_hidden_layers;
  for (int64_t l = 0; l < layers; ++l) ASSERT_TRUE(trainer->AdvanceMicroStep().ok());
  ASSERT_EQ(trainer->next_phase(), trainer->head_phase());
  EXPECT_EQ(trainer->head_rows_left(), 32);
  int head_calls = 0;
  while (trainer->next_phase() == trainer->head_phase()) {
    const int64_t left = trainer->head_rows_left();
    auto r = trainer->AdvanceMicroStep(/*max_head_rows=*/7);
    ASSERT_TRUE(r.ok()) << r.status();
    ++head_calls;
    if (trainer->next_phase() == trainer->head_phase()) {
      EXPECT_EQ(trainer->head_rows_left(), left - 7);
    }
  }
  EXPECT_EQ(head_calls, 5);  // 7 + 7 + 7 + 7 + 4 rows.
  EXPECT_EQ(trainer->head_rows_left(), 0);
  for (;;) {
    auto r = trainer->AdvanceMicroStep();
    ASSERT_TRUE(r.ok()) << r.status();
    if (r->finished) break;
  }
  const auto [worst, largest] = GradientGap(*trainer, ref);
  EXPECT_GT(largest, 1e-6);
  EXPECT_LT(worst, 1e-5 * std::max(1.0, largest));

  // The loss: a step's reported loss is taken before its update, so one micro-step from the same
  // parameters reports the reference loss; evaluation (target rows only) agrees with it too.
  TrainerOptions one = o;
  one.grad_accum_steps = 1;
  auto fresh = MakeTrainer(model, one, 0.0, 5);
  for (size_t l = 0; l < ref.factors.layers.size(); ++l) {
    for (size_t t = 0; t < ref.factors.layers[l].size(); ++t) {
      auto& f = fresh->shadow().factors().layers[l][t];
      if (f.b.defined()) f.b.data().copy_(trainer->shadow().factors().layers[l][t].b.detach());
    }
  }
  auto evaluated = fresh->Evaluate(train);
  ASSERT_TRUE(evaluated.ok()) << evaluated.status();
  EXPECT_NEAR(*evaluated, ref.loss, 1e-5);
  auto stats = fresh->MicroStep(batch);
  ASSERT_TRUE(stats.ok()) << stats.status();
  ASSERT_TRUE(stats->has_value());
  EXPECT_NEAR((*stats)->loss, ref.loss, 1e-5);
}

TEST(PeftTrainerTest, AbortedMicroStepLeavesNoGradient) {
  auto model = Tiny();
  auto train = PatternExamples(2, 7);
  auto trainer = MakeTrainer(model, TrainerOptions{});
  std::vector<const TrainingExample*> batch = {&train[0], &train[1]};
  ASSERT_TRUE(trainer->BeginMicroStep(batch).ok());
  EXPECT_EQ(trainer->BeginMicroStep(batch).code(), absl::StatusCode::kFailedPrecondition);
  for (int i = 0; i < model->config().num_hidden_layers + 2; ++i) {
    ASSERT_TRUE(trainer->AdvanceMicroStep().ok());  // Forward, head, one backward layer.
  }
  trainer->DiscardPartialStep();
  EXPECT_FALSE(trainer->micro_step_active());
  for (const auto& layer : trainer->shadow().factors().layers) {
    for (const auto& f : layer) {
      if (!f.a.defined()) continue;
      EXPECT_TRUE(!f.a.grad().defined() || f.a.grad().abs().max().item<double>() == 0);
      EXPECT_TRUE(!f.b.grad().defined() || f.b.grad().abs().max().item<double>() == 0);
    }
  }
  EXPECT_EQ(trainer->AdvanceMicroStep().status().code(), absl::StatusCode::kFailedPrecondition);
  // A fresh micro-step runs normally afterwards.
  auto stats = trainer->MicroStep(batch);
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_TRUE(stats->has_value());
}

// Σ ‖w − w_anchor‖² over every factor.
double SquaredDistance(const lora::LoraAdapter& x, const lora::LoraAdapter& anchor) {
  double sq = 0;
  for (size_t l = 0; l < x.factors.layers.size(); ++l) {
    for (int t = 0; t < runtime::kNumLoraTargets; ++t) {
      const auto& f = x.factors.layers[l][t];
      if (!f.a.defined()) continue;
      sq += (f.a - anchor.factors.layers[l][t].a).square().sum().item<double>();
      sq += (f.b - anchor.factors.layers[l][t].b).square().sum().item<double>();
    }
  }
  return sq;
}

TEST(PeftTrainerTest, FedProxKeepsTrainingNearTheAnchor) {
  auto model = Tiny();
  auto train = PatternExamples(32, 6);
  // Trains 12 steps from the same initial adapter with the same seed; the anchor is that initial
  // adapter, as the FL client anchors to the round's global.
  auto run = [&](double mu, bool set_anchor, std::vector<double>* losses) {
    TrainerOptions o;
    o.lr = 1e-2;
    o.seed = 3;
    o.micro_batch_size = 4;
    o.grad_accum_steps = 2;
    o.prox_mu = mu;
    auto trainer = MakeTrainer(model, o, 0.1);
    if (set_anchor) {
      EXPECT_TRUE(trainer->SetProximalAnchor(trainer->shadow().Snapshot()).ok());
    }
    ExampleSampler sampler(&train, 3);
    for (int i = 0; i < 12; ++i) losses->push_back(trainer->Step(sampler).value().loss);
    return trainer->shadow().Snapshot();
  };
  const lora::LoraAdapter initial = MakeTrainer(model, TrainerOptions(), 0.1)->shadow().Snapshot();
  std::vector<double> plain_losses, zero_losses, prox_losses, unanchored_losses;
  const auto plain = run(0, false, &plain_losses);
  const auto zero = run(0, true, &zero_losses);
  const auto prox = run(1.0, true, &prox_losses);
  const auto unanchored = run(1.0, false, &unanchored_losses);
  // mu = 0 (or no anchor) is bit-identical to training without FedProx.
  EXPECT_EQ(zero_losses, plain_losses);
  EXPECT_EQ(unanchored_losses, plain_losses);
  EXPECT_EQ(SquaredDistance(zero, plain), 0.0);
  EXPECT_EQ(SquaredDistance(unanchored, plain), 0.0);
  // mu > 0 ends closer to the anchor, and still trains.
  const double d_plain = SquaredDistance(plain, initial), d_prox = SquaredDistance(prox, initial);
  EXPECT_GT(d_plain, 0.0);
  EXPECT_LT(d_prox, 0.8 * d_plain)
      << "distance^2 to the anchor: plain " << d_plain << ", prox " << d_prox;
  EXPECT_LT(prox_losses.back(), prox_losses.front());

  // A mismatched anchor and a negative mu are refused, naming what is wrong.
  TrainerOptions o;
  auto trainer = MakeTrainer(model, o);
  lora::LoraConfig other;
  other.rank = 4;
  other.targets = {LoraTarget::kQ,    LoraTarget::kK,  LoraTarget::kV,   LoraTarget::kO,
                   LoraTarget::kGate, LoraTarget::kUp, LoraTarget::kDown};
  auto wrong = lora::LoraAdapter::Create(model->config(), other, 1).value();
  const absl::Status s = trainer->SetProximalAnchor(wrong);
  EXPECT_NE(std::string(s.message()).find("layer 0 q_proj"), std::string::npos) << s;
  EXPECT_FALSE(trainer->has_proximal_anchor());
  o.prox_mu = -1;
  EXPECT_NE(std::string(o.Validate().message()).find("training.prox_mu"), std::string::npos);
}

TEST(PeftTrainerTest, ScheduleWarmupAndCosine) {
  TrainerOptions o;
  o.lr = 1.0;
  o.warmup_steps = 4;
  o.schedule = LrSchedule::kCosine;
  o.total_steps = 14;
  o.min_lr_ratio = 0.1;
  auto trainer = MakeTrainer(Tiny(), o);
  EXPECT_DOUBLE_EQ(trainer->LearningRate(1), 0.25);
  EXPECT_DOUBLE_EQ(trainer->LearningRate(4), 1.0);
  EXPECT_NEAR(trainer->LearningRate(9), 0.55, 1e-9);  // Half way: (0.1 + 1) / 2.
  EXPECT_NEAR(trainer->LearningRate(14), 0.1, 1e-9);
  EXPECT_NEAR(trainer->LearningRate(100), 0.1, 1e-9);
  TrainerOptions bad = o;
  bad.total_steps = 0;
  EXPECT_NE(std::string(bad.Validate().message()).find("total_steps"), std::string::npos);
  bad = o;
  bad.lr = -1;
  EXPECT_NE(std::string(bad.Validate().message()).find("training.lr"), std::string::npos);
}

TEST(PeftTrainerTest, CheckpointAndResumeContinueExactly) {
  auto model = Tiny();
  auto train = PatternExamples(24, 6);
  TrainerOptions o;
  o.lr = 5e-3;
  o.micro_batch_size = 4;
  o.seed = 11;
  auto straight = MakeTrainer(model, o, 0.1);
  ExampleSampler s_straight(&train, 11);
  std::vector<double> want;
  for (int i = 0; i < 10; ++i) want.push_back(straight->Step(s_straight).value().loss);

  auto first = MakeTrainer(model, o, 0.1);
  ExampleSampler s_first(&train, 11);
  std::vector<double> got;
  for (int i = 0; i < 5; ++i) got.push_back(first->Step(s_first).value().loss);
  const std::string dir = collm::testing::MakeTempDir("collm-ckpt") + "/shadow";
  ASSERT_TRUE(first->SaveCheckpoint(dir, s_first.State()).ok());
  first.reset();
  std::map<std::string, std::string> extra;
  auto resumed = PeftTrainer::Resume(model, dir, o, &extra).value();
  ExampleSampler s_resumed(&train, 11);
  ASSERT_TRUE(s_resumed.Restore(extra).ok());
  EXPECT_EQ(resumed->shadow().step(), 5);
  for (int i = 0; i < 5; ++i) got.push_back(resumed->Step(s_resumed).value().loss);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_DOUBLE_EQ(got[i], want[i]) << "step " << i + 1;
}

}  // namespace
}  // namespace collm::engine
