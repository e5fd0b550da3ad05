#include "collm/lora/lora_config.h"

#include <cmath>
#include <nlohmann/json.hpp>
#include <string>

#include "gtest/gtest.h"

namespace collm::lora {
namespace {

using runtime::LoraTarget;

// What PEFT 0.13's save_pretrained writes for
// LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
// task_type="CAUSAL_LM") on meta-llama/Llama-2-7b-hf.
constexpr char kHfLlamaConfig[] = R"({
  "alpha_pattern": {},
  "auto_mapping": null,
  "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
  "bias": "none",
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": true,
  "layer_replication": null,
  "layers_pattern": null,
  "layers_to_transform": null,
  "loftq_config": {},
  "lora_alpha": 32,
  "lora_dropout": 0.05,
  "megatron_config": null,
  "megatron_core": "megatron.core",
  "modules_to_save": null,
  "peft_type": "LORA",
  "r": 16,
  "rank_pattern": {},
  "revision": null,
  "target_modules": [
    "v_proj",
    "q_proj"
  ],
  "task_type": "CAUSAL_LM",
  "use_dora": false,
  "use_rslora": false
})";

// kHfLlamaConfig with `key` set to `value` (JSON text); "null" erases nothing, it sets null.
std::string WithKey(const std::string& key, const std::string& value) {
  auto j = nlohmann::json::parse(kHfLlamaConfig);
  j[key] = nlohmann::json::parse(value);
  return j.dump();
}

std::string ErrorOf(const absl::StatusOr<LoraConfig>& c) {
  EXPECT_FALSE(c.ok());
  if (!c.ok()) {
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  }
  return c.ok() ? "" : std::string(c.status().message());
}

TEST(LoraConfigTest, ScaleIsAlphaOverRankOrOverSqrtRankWithRsLora) {
  LoraConfig c;
  c.rank = 16;
  c.alpha = 32;
  EXPECT_DOUBLE_EQ(c.scale(), 2.0);
  c.use_rslora = true;
  EXPECT_DOUBLE_EQ(c.scale(), 8.0);
  c.rank = 8;
  EXPECT_DOUBLE_EQ(c.scale(), 32 / std::sqrt(8.0));
}

TEST(LoraConfigTest, DefaultsAreValid) { EXPECT_TRUE(LoraConfig{}.Validate().ok()); }

TEST(LoraConfigTest, ValidateErrorsNameTheField) {
  const auto error = [](auto mutate) {
    LoraConfig c;
    mutate(c);
    absl::Status s = c.Validate();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    return std::string(s.message());
  };
  EXPECT_EQ(error([](LoraConfig& c) { c.rank = 0; }), "lora.rank must be > 0, got 0");
  EXPECT_NE(error([](LoraConfig& c) { c.rank = 5000; }).find("lora.rank must be <= 4096"),
            std::string::npos);
  EXPECT_NE(error([](LoraConfig& c) { c.alpha = 0; }).find("lora.alpha"), std::string::npos);
  EXPECT_NE(error([](LoraConfig& c) { c.alpha = NAN; }).find("lora.alpha"), std::string::npos);
  EXPECT_NE(error([](LoraConfig& c) { c.alpha = INFINITY; }).find("lora.alpha"), std::string::npos);
  EXPECT_NE(error([](LoraConfig& c) { c.dropout = 1.0; }).find("lora.dropout"), std::string::npos);
  EXPECT_NE(error([](LoraConfig& c) { c.dropout = -0.1; }).find("lora.dropout"), std::string::npos);
  EXPECT_NE(error([](LoraConfig& c) { c.dropout = NAN; }).find("lora.dropout"), std::string::npos);
  EXPECT_NE(error([](LoraConfig& c) { c.targets.clear(); }).find("lora.targets"),
            std::string::npos);
  EXPECT_EQ(error([](LoraConfig& c) {
              c.targets = {LoraTarget::kQ, LoraTarget::kQ};
            }),
            "lora.targets lists q_proj twice");
}

TEST(LoraConfigTest, ParsesWhatHfPeftWritesForLlama) {
  auto c = LoraConfig::FromPeftJson(kHfLlamaConfig);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rank, 16);
  EXPECT_DOUBLE_EQ(c->alpha, 32);
  EXPECT_DOUBLE_EQ(c->dropout, 0.05);
  EXPECT_FALSE(c->use_rslora);
  EXPECT_EQ(c->targets, (std::vector<LoraTarget>{LoraTarget::kV, LoraTarget::kQ}));
  EXPECT_EQ(c->base_model_name_or_path, "meta-llama/Llama-2-7b-hf");
  EXPECT_DOUBLE_EQ(c->scale(), 2.0);
}

TEST(LoraConfigTest, ParsesRsLoraStringTargetAndAllLinear) {
  auto c = LoraConfig::FromPeftJson(WithKey("use_rslora", "true"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_DOUBLE_EQ(c->scale(), 8.0);
  c = LoraConfig::FromPeftJson(WithKey("target_modules", R"("down_proj")"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->targets, std::vector<LoraTarget>{LoraTarget::kDown});
  c = LoraConfig::FromPeftJson(WithKey("target_modules", R"("all-linear")"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->targets.size(), 7u);
  // Off-valued switches of newer PEFT versions are fine; a fractional alpha too.
  c = LoraConfig::FromPeftJson(WithKey("lora_bias", "false"));
  EXPECT_TRUE(c.ok()) << c.status();
  c = LoraConfig::FromPeftJson(WithKey("exclude_modules", "null"));
  EXPECT_TRUE(c.ok()) << c.status();
  c = LoraConfig::FromPeftJson(WithKey("lora_alpha", "12.5"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_DOUBLE_EQ(c->alpha, 12.5);
}

TEST(LoraConfigTest, MissingKeysTakePeftDefaults) {
  auto c = LoraConfig::FromPeftJson(R"({"peft_type": "LORA"})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rank, 8);
  EXPECT_DOUBLE_EQ(c->alpha, 8);
  EXPECT_DOUBLE_EQ(c->dropout, 0);
  EXPECT_EQ(c->targets, (std::vector<LoraTarget>{LoraTarget::kQ, LoraTarget::kV}));
}

TEST(LoraConfigTest, RejectionsNameTheKey) {
  struct Case {
    std::string key, value;
  };
  const Case cases[] = {
      {"peft_type", R"("IA3")"},
      {"r", "0"},
      {"r", "-4"},
      {"r", "2.5"},
      {"r", R"("8")"},
      {"r", "100000"},
      {"lora_alpha", "0"},
      {"lora_alpha", R"("16")"},
      {"lora_dropout", "1.0"},
      {"lora_dropout", "-0.5"},
      {"target_modules", R"(["q_proj", "qkv_proj"])"},
      {"target_modules", R"(["q_proj", "q_proj"])"},
      {"target_modules", "[]"},
      {"target_modules", "[3]"},
      {"target_modules", R"(".*\\.(q|v)_proj")"},
      {"target_modules", R"("model.layers.0.self_attn.q_proj")"},
      {"target_modules", "null"},
      {"use_rslora", R"("yes")"},
      {"bias", R"("all")"},
      {"bias", R"("lora_only")"},
      {"fan_in_fan_out", "true"},
      {"rank_pattern", R"({"q_proj": 4})"},
      {"alpha_pattern", R"({"v_proj": 64})"},
      {"use_dora", "true"},
      {"modules_to_save", R"(["lm_head"])"},
      {"layers_to_transform", "[0, 1]"},
      {"layers_to_transform", "3"},
      {"base_model_name_or_path", "7"},
      {"lora_bias", "true"},
      {"layer_replication", "[[0, 4], [2, 5]]"},
  };
  for (const Case& c : cases) {
    const std::string message = ErrorOf(LoraConfig::FromPeftJson(WithKey(c.key, c.value)));
    EXPECT_NE(message.find("\"" + c.key + "\""), std::string::npos)
        << c.key << "=" << c.value << ": " << message;
  }
  // The unknown module is named too.
  EXPECT_NE(ErrorOf(LoraConfig::FromPeftJson(WithKey("target_modules", R"(["qkv_proj"])")))
                .find("qkv_proj"),
            std::string::npos);
}

TEST(LoraConfigTest, RejectsMalformedJson) {
  EXPECT_NE(ErrorOf(LoraConfig::FromPeftJson("{\"r\": 8,")).find("not valid JSON"),
            std::string::npos);
  EXPECT_NE(ErrorOf(LoraConfig::FromPeftJson("[1, 2]")).find("object"), std::string::npos);
  EXPECT_FALSE(LoraConfig::FromPeftJson("").ok());
}

TEST(LoraConfigTest, ToPeftJsonWritesWhatHfWritesAndRoundTrips) {
  LoraConfig c;
  c.rank = 4;
  c.alpha = 8;
  c.dropout = 0.1;
  c.use_rslora = true;
  c.targets = {LoraTarget::kQ, LoraTarget::kK, LoraTarget::kDown};
  c.base_model_name_or_path = "stories260K-hf";
  const std::string text = c.ToPeftJson();
  auto j = nlohmann::json::parse(text);
  EXPECT_EQ(j["peft_type"], "LORA");
  EXPECT_EQ(j["task_type"], "CAUSAL_LM");
  EXPECT_EQ(j["r"], 4);
  EXPECT_TRUE(j["lora_alpha"].is_number_integer());
  EXPECT_EQ(j["lora_alpha"], 8);
  EXPECT_EQ(j["target_modules"], (nlohmann::json{"q_proj", "k_proj", "down_proj"}));
  EXPECT_EQ(j["bias"], "none");
  EXPECT_EQ(j["fan_in_fan_out"], false);
  EXPECT_EQ(j["inference_mode"], true);
  EXPECT_TRUE(j["modules_to_save"].is_null());
  EXPECT_EQ(j["init_lora_weights"], true);
  EXPECT_EQ(j["rank_pattern"], nlohmann::json::object());
  EXPECT_EQ(j["alpha_pattern"], nlohmann::json::object());
  EXPECT_EQ(j["use_dora"], false);
  EXPECT_EQ(j["use_rslora"], true);

  auto back = LoraConfig::FromPeftJson(text);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->rank, c.rank);
  EXPECT_EQ(back->alpha, c.alpha);
  EXPECT_EQ(back->dropout, c.dropout);
  EXPECT_EQ(back->use_rslora, c.use_rslora);
  EXPECT_EQ(back->targets, c.targets);
  EXPECT_EQ(back->base_model_name_or_path, c.base_model_name_or_path);
  EXPECT_EQ(back->ToPeftJson(), text);

  // The HF file round-trips too.
  auto hf = LoraConfig::FromPeftJson(kHfLlamaConfig);
  ASSERT_TRUE(hf.ok());
  auto again = LoraConfig::FromPeftJson(hf->ToPeftJson());
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->ToPeftJson(), hf->ToPeftJson());
}

}  // namespace
}  // namespace collm::lora
