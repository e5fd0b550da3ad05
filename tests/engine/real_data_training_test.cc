// PEFT training on real data: GSM8K ($COLLM_DATA_DIR) with the pretrained stories260K
// ($COLLM_MODELS_DIR). Skips when the variables are unset, fails when set but files are missing.
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

TrainRun Train(const std::string& model_dir, const std::string& data, uint64_t seed, int steps) {
  TrainRun run;
  auto model = runtime::LlamaModel::Load(model_dir, runtime::RuntimeOptions{}).value();
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

}  // namespace
}  // namespace collm::engine
