#include "collm/runtime/model_config.h"

#include "collm/runtime/random_model.h"
#include "gtest/gtest.h"
#include "testing/test_env.h"

namespace collm::runtime {
namespace {

void ExpectInvalid(const std::string& json, const std::string& needle) {
  auto c = ModelConfig::FromJson(json);
  ASSERT_FALSE(c.ok()) << json;
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(c.status().message()).find(needle), std::string::npos) << c.status();
}

const char* kBase =
    R"({"model_type":"llama","hidden_size":64,"intermediate_size":172,"num_hidden_layers":5,)"
    R"("num_attention_heads":8,"num_key_value_heads":4,"vocab_size":512)";

std::string With(const std::string& extra) { return std::string(kBase) + extra + "}"; }

TEST(ModelConfigTest, ParsesDefaultsAndDerivedSizes) {
  auto c = ModelConfig::FromJson(With("")).value();
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_EQ(c.q_size(), 64);
  EXPECT_EQ(c.kv_size(), 32);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_EQ(c.eos_token_ids, std::vector<int32_t>{2});
  auto l3 =
      ModelConfig::FromJson(
          With(
              R"(,"eos_token_id":[2,3],"rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192})"))
          .value();
  EXPECT_EQ(l3.eos_token_ids, (std::vector<int32_t>{2, 3}));
  EXPECT_EQ(l3.rope_scaling.type, "llama3");
}

TEST(ModelConfigTest, QwenHasQkvBiasMistralWindowCapsContext) {
  auto q =
      ModelConfig::FromJson(
          With(
              R"(,"model_type":"qwen2","use_sliding_window":false,"sliding_window":64,"max_position_embeddings":1024)"))
          .value();
  EXPECT_TRUE(q.qkv_bias);
  EXPECT_FALSE(q.o_bias);
  EXPECT_EQ(q.max_position_embeddings, 1024);
  auto m =
      ModelConfig::FromJson(
          With(R"(,"model_type":"mistral","sliding_window":256,"max_position_embeddings":1024)"))
          .value();
  EXPECT_EQ(m.max_position_embeddings, 256);
}

TEST(ModelConfigTest, RejectsBadValuesNamingTheKey) {
  ExpectInvalid("[1,2]", "object");
  ExpectInvalid("{", "not valid JSON");
  ExpectInvalid(With(R"(,"model_type":"gpt2")"), "model_type");
  ExpectInvalid(With(R"(,"num_key_value_heads":3)"), "num_key_value_heads");
  ExpectInvalid(With(R"(,"hidden_size":0)"), "hidden_size must be > 0");
  ExpectInvalid(With(R"(,"hidden_size":"64")"), "hidden_size must be an integer");
  ExpectInvalid(With(R"(,"hidden_act":"gelu")"), "hidden_act");
  ExpectInvalid(With(R"(,"rope_scaling":{"type":"yarn","factor":4})"), "rope_scaling");
  ExpectInvalid(With(R"(,"num_local_experts":8)"), "mixture-of-experts");
  ExpectInvalid(With(R"(,"eos_token_id":9999)"), "eos_token_id");
  ExpectInvalid(With(R"(,"head_dim":7)"), "head_dim");
  ExpectInvalid(With(R"(,"vocab_size":4000000000)"), "implausibly large");
  ExpectInvalid(R"({"model_type":"llama","hidden_size":64})", "intermediate_size is required");
}

TEST(ModelConfigTest, ToJsonRoundTrips) {
  ModelConfig c = TinyLlamaConfig();
  c.rope_scaling.type = "linear";
  c.rope_scaling.factor = 2;
  auto back = ModelConfig::FromJson(c.ToJson()).value();
  EXPECT_EQ(back.hidden_size, c.hidden_size);
  EXPECT_EQ(back.num_key_value_heads, c.num_key_value_heads);
  EXPECT_EQ(back.head_dim, c.head_dim);
  EXPECT_EQ(back.tie_word_embeddings, c.tie_word_embeddings);
  EXPECT_EQ(back.rope_scaling.type, "linear");
  EXPECT_DOUBLE_EQ(back.rope_scaling.factor, 2);
}

TEST(ModelConfigTest, ParsesRealStoriesConfigAndShapes) {
  COLLM_REQUIRE_MODEL_FILE(path, "stories260K-hf/config.json");
  auto c = ModelConfig::FromFile(path).value();
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.num_key_value_heads, 4);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_TRUE(c.tie_word_embeddings);
  COLLM_REQUIRE_MODEL_FILE(qwen, "shapes/qwen2.5-0.5B.json");
  auto q = ModelConfig::FromFile(qwen).value();
  EXPECT_TRUE(q.qkv_bias);
  EXPECT_EQ(q.head_dim, 64);
  COLLM_REQUIRE_MODEL_FILE(tl, "shapes/tinyllama-1.1B.json");
  EXPECT_FALSE(ModelConfig::FromFile(tl).value().tie_word_embeddings);
}

}  // namespace
}  // namespace collm::runtime
