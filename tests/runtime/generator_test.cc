#include "collm/runtime/generator.h"

#include <filesystem>

#include "gtest/gtest.h"
#include "testing/test_env.h"
#include "testing/tiny_model.h"

namespace collm::runtime {
namespace {

struct Fixture {
  std::shared_ptr<const LlamaModel> model;
  std::unique_ptr<Tokenizer> tokenizer;
};

Fixture LoadTiny(const std::string& dir = collm::testing::TinyModelDir()) {
  Fixture f;
  f.model = LlamaModel::Load(dir, RuntimeOptions{}).value();
  f.tokenizer = Tokenizer::Load(dir + "/tokenizer.model").value();
  return f;
}

GenerationRequest Request(const Tokenizer& tok, const std::string& prompt, float temperature,
                          uint64_t seed, int max_tokens) {
  GenerationRequest r;
  r.prompt = tok.Encode(prompt, true);
  r.params.temperature = temperature;
  r.params.seed = seed;
  r.params.max_tokens = max_tokens;
  r.params.ignore_eos = true;
  return r;
}

TEST(GeneratorTest, SeededSamplingIsReproducibleAndBatchIndependent) {
  Fixture f = LoadTiny();
  Generator gen(f.model, f.tokenizer.get());
  std::vector<GenerationRequest> reqs = {
      Request(*f.tokenizer, "Once upon a time", 1.0, 7, 20),
      Request(*f.tokenizer, "The cat", 1.0, 8, 12),
      Request(*f.tokenizer, "A dog ran to the park and", 0, 0, 16)};
  auto batched = gen.Generate(reqs).value();
  auto again = gen.Generate(reqs).value();
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(batched[i].tokens, again[i].tokens) << "request " << i;
    auto alone = gen.Generate({reqs[i]}).value();
    EXPECT_EQ(batched[i].tokens, alone[0].tokens) << "request " << i << " alone vs batched";
    EXPECT_EQ(batched[i].text, alone[0].text);
    EXPECT_EQ(batched[i].tokens.size(), static_cast<size_t>(reqs[i].params.max_tokens));
    EXPECT_EQ(batched[i].finish_reason, FinishReason::kLength);
  }
  auto other_seed = reqs[0];
  other_seed.params.seed = 99;
  EXPECT_NE(gen.Generate({other_seed}).value()[0].tokens, batched[0].tokens);
}

TEST(GeneratorTest, StreamedDeltasConcatenateToText) {
  Fixture f = LoadTiny();
  Generator gen(f.model, f.tokenizer.get());
  std::vector<std::string> streamed(2);
  auto results = gen.Generate({Request(*f.tokenizer, "Hello", 0.9, 1, 30),
                               Request(*f.tokenizer, "Lily saw", 0.9, 2, 25)},
                              [&](size_t i, const std::string& d) { streamed[i] += d; })
                     .value();
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(streamed[i], results[i].text);
    EXPECT_FALSE(results[i].text.empty());
  }
}

TEST(GeneratorTest, StopStringEndsGenerationBeforeIt) {
  Fixture f = LoadTiny();
  Generator gen(f.model, f.tokenizer.get());
  auto free_run = gen.Generate({Request(*f.tokenizer, "Once", 0, 0, 40)}).value()[0];
  ASSERT_GE(free_run.text.size(), 6u);
  // Stop at a piece of text we know greedy decoding produces.
  const std::string stop = free_run.text.substr(free_run.text.size() / 2, 3);
  auto req = Request(*f.tokenizer, "Once", 0, 0, 40);
  req.params.stop = {stop};
  std::string streamed;
  auto r = gen.Generate({req}, [&](size_t, const std::string& d) { streamed += d; }).value()[0];
  EXPECT_EQ(r.finish_reason, FinishReason::kStop);
  EXPECT_EQ(r.text, free_run.text.substr(0, free_run.text.find(stop)));
  EXPECT_EQ(streamed, r.text);
  EXPECT_LT(r.tokens.size(), free_run.tokens.size());
}

TEST(GeneratorTest, EosFinishesAndIsNotEmitted) {
  // Make the token greedy decoding emits third the EOS token of a copy of the model.
  Fixture f = LoadTiny();
  Generator gen(f.model, f.tokenizer.get());
  auto base = gen.Generate({Request(*f.tokenizer, "Once", 0, 0, 10)}).value()[0];
  const int32_t eos = base.tokens[2];
  std::string dir = collm::testing::MakeTempDir("collm-eos");
  for (const auto& e : std::filesystem::directory_iterator(collm::testing::TinyModelDir())) {
    std::filesystem::copy_file(e.path(), dir + "/" + e.path().filename().string());
  }
  std::string cfg = collm::testing::ReadFileOrDie(dir + "/config.json");
  const std::string key = "\"eos_token_id\": 2";
  ASSERT_NE(cfg.find(key), std::string::npos);
  cfg.replace(cfg.find(key), key.size(), "\"eos_token_id\": " + std::to_string(eos));
  collm::testing::WriteFileOrDie(dir + "/config.json", cfg);
  Fixture g = LoadTiny(dir);
  Generator gen2(g.model, g.tokenizer.get());
  auto req = Request(*g.tokenizer, "Once", 0, 0, 10);
  req.params.ignore_eos = false;
  auto r = gen2.Generate({req}).value()[0];
  EXPECT_EQ(r.finish_reason, FinishReason::kEos);
  const size_t first_eos =
      std::find(base.tokens.begin(), base.tokens.end(), eos) - base.tokens.begin();
  EXPECT_EQ(r.tokens, std::vector<int32_t>(base.tokens.begin(), base.tokens.begin() + first_eos));
}

TEST(GeneratorTest, ContextEndFinishesWithLength) {
  Fixture f = LoadTiny();
  Generator gen(f.model, f.tokenizer.get());
  GenerationRequest r;
  r.prompt = std::vector<int32_t>(250, 100);
  r.params.max_tokens = 100;
  r.params.ignore_eos = true;
  auto out = gen.Generate({r}).value()[0];
  EXPECT_EQ(out.tokens.size(), 6u);  // Context 256.
  EXPECT_EQ(out.finish_reason, FinishReason::kLength);
}

TEST(GeneratorTest, RejectsBadRequests) {
  Fixture f = LoadTiny();
  Generator gen(f.model, f.tokenizer.get());
  GenerationRequest empty;
  EXPECT_EQ(gen.Generate({empty}).status().code(), absl::StatusCode::kInvalidArgument);
  GenerationRequest too_long;
  too_long.prompt = std::vector<int32_t>(256, 5);
  EXPECT_NE(std::string(gen.Generate({too_long}).status().message()).find("context"),
            std::string::npos);
  GenerationRequest bad_token;
  bad_token.prompt = {1, 100000};
  EXPECT_NE(std::string(gen.Generate({bad_token}).status().message()).find("vocabulary"),
            std::string::npos);
  GenerationRequest bad_param = Request(*f.tokenizer, "x", 1.0, 0, 4);
  bad_param.params.top_p = 1.5;
  auto s = gen.Generate({bad_param}).status();
  EXPECT_NE(std::string(s.message()).find("top_p"), std::string::npos) << s;
}

}  // namespace
}  // namespace collm::runtime
