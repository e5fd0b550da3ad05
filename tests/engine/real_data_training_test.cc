// PEFT training on real data: GSM8K ($COLLM_DATA_DIR) with the pretrained stories260K
// ($COLLM_MODELS_DIR). Skips when the variables are unset, fails when set but files are missing.
#include <cmath>
#include <cstdio>

#include "collm/engine/dataset.h"
#include "collm/engine/peft_trainer.h"
#include "gtest/gtest.h"
#include "testing/test_env.h"

namespace collm::engine {
namespace {

struct TrainRun {
  double before = 0, after = 0;
  std::vector<double> losses;
};

TrainRun Train(const std::string& model_dir, const std::string& data, uint64_t seed, int steps,
               const std::string& weights = "f32") {
  TrainRun run;
  runtime::RuntimeOptions ro;
  ro.weights = weights;
  auto model = runtime::LlamaModel::Load(model_dir, ro).value();
  auto tok = runtime::Tokenizer::Load(model_dir + "/tokenizer.model").value();
  DatasetOptions d;
  d.format.prompt_field = "question";
  d.format.completion_field = "answer";
  d.format.prompt_template = "Question: {prompt}\nAnswer: ";
  d.max_length = 192;
  d.max_examples = 240;
  d.held_out_fraction = 0.1;
  LoadReport report;
  Dataset ds = Dataset::Load(data, *tok, d, &report).value();
  EXPECT_EQ(report.skipped, 0);
  EXPECT_EQ(ds.held_out().size(), 24u);

  lora::LoraConfig c;
  c.rank = 8;
  c.alpha = 16;
  c.dropout = 0.05;
  c.targets = {runtime::LoraTarget::kQ,   runtime::LoraTarget::kK,    runtime::LoraTarget::kV,
               runtime::LoraTarget::kO,   runtime::LoraTarget::kGate, runtime::LoraTarget::kUp,
               runtime::LoraTarget::kDown};
  TrainerOptions o;
  o.lr = 3e-3;
  o.micro_batch_size = 8;
  o.warmup_steps = 3;
  o.schedule = LrSchedule::kCosine;
  o.total_steps = steps;
  o.seed = seed;
  auto shadow = lora::ShadowAdapter::Create(
                    lora::LoraAdapter::Create(model->config(), c, seed).value(), o.adamw)
                    .value();
  auto trainer = PeftTrainer::Create(model, std::move(shadow), o).value();
  run.before = trainer->Evaluate(ds.held_out()).value();
  ExampleSampler sampler(&ds.train(), seed);
  for (int i = 0; i < steps; ++i) run.losses.push_back(trainer->Step(sampler).value().loss);
  run.after = trainer->Evaluate(ds.held_out()).value();
  return run;
}

TEST(RealDataTrainingTest, Gsm8kFineTuningOfStories260KLowersHeldOutLossReproducibly) {
  COLLM_REQUIRE_MODEL_FILE(model_dir, "stories260K-hf");
  COLLM_REQUIRE_DATA_FILE(data, "finetune/gsm8k/train.jsonl");
  TrainRun a = Train(model_dir, data, 5, 20);
  // TinyStories has never seen math word problems: a clear, fast drop is expected.
  EXPECT_LT(a.after, a.before - 1.0) << "held-out loss " << a.before << " -> " << a.after;
  TrainRun b = Train(model_dir, data, 5, 4);
  for (size_t i = 0; i < b.losses.size(); ++i) {
    EXPECT_EQ(b.losses[i], a.losses[i]) << "step " << i + 1 << " differs with the same seed";
  }
  EXPECT_DOUBLE_EQ(a.before, b.before);
}

// QLoRA-style: the shadow adapter trains on a quantized frozen base (forward and backward through
// the dequantized weights, gradients only for LoRA) and must learn like it does on f32.
TEST(RealDataTrainingTest, Gsm8kFineTuningOnAnInt8BaseLearnsLikeF32) {
  COLLM_REQUIRE_MODEL_FILE(model_dir, "stories260K-hf");
  COLLM_REQUIRE_DATA_FILE(data, "finetune/gsm8k/train.jsonl");
  TrainRun f32 = Train(model_dir, data, 5, 20);
  TrainRun int8 = Train(model_dir, data, 5, 20, "int8");
  TrainRun int4 = Train(model_dir, data, 5, 20, "int4");
  std::printf(
      "[ held-out GSM8K loss, 20 steps, seed 5 ] f32 %.4f -> %.4f, int8 %.4f -> %.4f, "
      "int4 %.4f -> %.4f\n",
      f32.before, f32.after, int8.before, int8.after, int4.before, int4.after);
  EXPECT_LT(int8.after, int8.before - 1.0)
      << "held-out loss " << int8.before << " -> " << int8.after;
  // The trained adapter on the int8 base ends within 1% of the f32 run's held-out loss.
  EXPECT_LT(std::abs(int8.after - f32.after), 0.01 * f32.after);
  EXPECT_LT(std::abs(int8.before - f32.before), 0.01 * f32.before);
  EXPECT_LT(int4.after, int4.before - 1.0);
}

}  // namespace
}  // namespace collm::engine
