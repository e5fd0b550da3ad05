// The step plan (pure) and its application (the one place sequences change after a forward).
#include "collm/engine/batch_planner.h"

#include <ATen/ATen.h>

#include "gtest/gtest.h"
#include "testing/engine_fixture.h"

namespace collm::engine {
namespace {

using collm::testing::CollectingSink;

std::unique_ptr<Sequence> Prefilling(int64_t prompt_len, int64_t prefilled) {
  auto s = std::make_unique<Sequence>();
  for (int64_t i = 0; i < prompt_len; ++i) s->request.prompt.push_back(10 + i);
  s->context = s->request.prompt;
  s->prefilled = prefilled;
  s->request.params.temperature = 0;  // Greedy: the test's logits pick the token.
  s->sampler.emplace(s->request.params);
  s->limit = 8;
  return s;
}

std::unique_ptr<Sequence> Decoding(int32_t last_token) {
  auto s = Prefilling(3, 3);
  s->context.push_back(last_token);
  s->generated = 1;
  return s;
}

TEST(BatchPlannerTest, DecodesFirstThenPrefillChunksWithinTheBudget) {
  std::vector<std::unique_ptr<Sequence>> running;
  running.push_back(Prefilling(10, 2));  // 8 prompt tokens left.
  running.push_back(Decoding(42));
  running.push_back(Prefilling(5, 0));  // Nothing left of the budget for it.
  const StepPlan plan = PlanStep(running, /*max_step_tokens=*/6);
  ASSERT_EQ(plan.members.size(), 2u);
  EXPECT_EQ(plan.members[0], running[1].get());  // The decode comes first ...
  EXPECT_EQ(plan.members[1], running[0].get());  // ... then a 5-token prefill chunk.
  EXPECT_EQ(plan.batch.tokens, (std::vector<int32_t>{42, 12, 13, 14, 15, 16}));
  EXPECT_EQ(plan.batch.sequences[0].num_tokens, 1);
  EXPECT_EQ(plan.batch.sequences[1].num_tokens, 5);
  EXPECT_EQ(plan.batch.sequences[1].kv, &running[0]->kv);
  EXPECT_EQ(plan.num_tokens(), 6);
  // Planning changed nothing.
  EXPECT_EQ(running[0]->prefilled, 2);
  EXPECT_EQ(running[1]->generated, 1);
}

TEST(BatchPlannerTest, ApplyAdvancesPrefillsSamplesDecodesAndStopsAtEos) {
  runtime::ModelConfig config;
  config.vocab_size = 16;
  config.eos_token_ids = {2};
  std::vector<std::unique_ptr<Sequence>> running;
  running.push_back(Decoding(42));       // Samples 7.
  running.push_back(Prefilling(3, 1));   // Finishes its prompt: samples EOS.
  running.push_back(Prefilling(10, 2));  // Chunk of 4: still prefilling, nothing sampled.
  auto sink = std::make_shared<CollectingSink>();
  running[0]->sink = sink;
  const StepPlan plan = PlanStep(running, /*max_step_tokens=*/7);
  ASSERT_EQ(plan.members.size(), 3u);
  ASSERT_EQ(plan.batch.sequences[2].num_tokens, 4);
  at::Tensor logits = at::zeros({3, 16});
  logits[0][7] = 5;
  logits[1][2] = 5;
  logits[2][9] = 5;
  ApplyStep(plan, logits, /*now_nanos=*/1234, config);

  EXPECT_EQ(running[0]->generated, 2);
  EXPECT_EQ(running[0]->context.back(), 7);
  EXPECT_EQ(running[0]->first_token_nanos, 1234);
  EXPECT_EQ(sink->ids(), std::vector<int32_t>{7});
  EXPECT_FALSE(running[0]->finished.has_value());

  EXPECT_EQ(running[2]->prefilled, 6);
  EXPECT_EQ(running[2]->generated, 0);
  EXPECT_EQ(running[2]->first_token_nanos, 0);

  EXPECT_TRUE(running[1]->decoding());
  ASSERT_TRUE(running[1]->finished.has_value());
  EXPECT_EQ(*running[1]->finished, runtime::FinishReason::kEos);
  EXPECT_EQ(running[1]->generated, 0);  // EOS is not an output token.
}

TEST(RequestValidationTest, NamesTheFieldAndTheValue) {
  RequestLimits limits;
  limits.vocab_size = 100;
  limits.context_size = 4;
  auto message = [&](const EngineRequest& r, absl::string_view field = "prompt") {
    absl::Status s = ValidateRequest(r, limits, field);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    return std::string(s.message());
  };
  EngineRequest r;
  EXPECT_EQ(message(r), "prompt is empty");
  r.prompt = {1, 2, 3, 4};
  EXPECT_EQ(message(r), "prompt has 4 tokens; the context is 4");
  r.prompt = {1, 100, 3};
  EXPECT_EQ(message(r, "prompt_tokens.ids"),
            "prompt_tokens.ids[1] = 100 is outside the vocabulary [0, 100)");
  r.prompt = {1, 2};
  r.params.stop = {"x", ""};
  EXPECT_EQ(message(r), "sampling.stop[1] is empty");
  r.params.stop = {"x"};
  EXPECT_EQ(message(r), "sampling.stop: stop strings need a tokenizer");
  limits.has_tokenizer = true;
  r.params.top_p = 2;
  EXPECT_EQ(message(r), "sampling.top_p must be in (0, 1], got 2");
  r.params.top_p = 1;
  EXPECT_TRUE(ValidateRequest(r, limits).ok());
}

}  // namespace
}  // namespace collm::engine
