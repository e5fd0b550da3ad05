#include "collm/runtime/llama_model.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "gtest/gtest.h"
#include "testing/test_env.h"
#include "testing/tiny_model.h"

namespace collm::runtime {
namespace {

using ::collm::testing::TinyModelDir;

std::shared_ptr<const LlamaModel> LoadOrDie(const std::string& dir) {
  auto model = LlamaModel::Load(dir, RuntimeOptions{});
  EXPECT_TRUE(model.ok()) << model.status();
  return model.ok() ? *model : nullptr;
}

std::vector<int32_t> RandomTokens(int n, int vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng() % vocab);
  return t;
}

// Runs `tokens` through a fresh cache in one prefill; returns logits for every position.
at::Tensor PrefillAll(const LlamaModel& model, const std::vector<int32_t>& tokens,
                      const ForwardOptions& options = {}) {
  auto cache = KvCache::Create(model.config(), {16, 64, 0}, model.runtime()).value();
  SequenceKv kv;
  EXPECT_TRUE(cache->Reserve(kv, tokens.size()).ok());
  StepBatch batch{tokens, {{&kv, static_cast<int64_t>(tokens.size()), true}}};
  auto logits = model.Forward(batch, *cache, options);
  EXPECT_TRUE(logits.ok()) << logits.status();
  return logits.ok() ? *logits : at::Tensor();
}

void ExpectClose(const at::Tensor& a, const at::Tensor& b, double tol, const std::string& what) {
  ASSERT_EQ(a.sizes(), b.sizes()) << what;
  const double diff = (a - b).abs().max().item<double>();
  EXPECT_LT(diff, tol) << what << ": max abs diff " << diff;
}

TEST(LlamaModelTest, LoadsTinyModel) {
  auto model = LoadOrDie(TinyModelDir());
  ASSERT_NE(model, nullptr);
  EXPECT_EQ(model->config().num_hidden_layers, 2);
  EXPECT_TRUE(model->uses_fused_cpu_kernels());
  EXPECT_GT(model->parameter_bytes(), 0);
}

TEST(LlamaModelTest, FusedKernelsMatchReferenceOps) {
  auto model = LoadOrDie(TinyModelDir());
  auto tokens = RandomTokens(37, model->config().vocab_size, 1);
  at::Tensor fused = PrefillAll(*model, tokens);
  at::Tensor reference = PrefillAll(*model, tokens, ForwardOptions{true});
  ExpectClose(fused, reference, 1e-4, "fused vs reference");
  EXPECT_GT(fused.abs().max().item<double>(), 0.1) << "logits should not be trivially zero";
}

TEST(LlamaModelTest, DecodeWithKvCacheEqualsFullRecompute) {
  auto model = LoadOrDie(TinyModelDir());
  auto tokens = RandomTokens(40, model->config().vocab_size, 2);
  for (bool reference : {false, true}) {
    ForwardOptions options{reference};
    at::Tensor full = PrefillAll(*model, tokens, options);  // [40, V]
    auto cache = KvCache::Create(model->config(), {8, 16, 0}, model->runtime()).value();
    SequenceKv kv;
    ASSERT_TRUE(cache->Reserve(kv, tokens.size()).ok());
    // Prefill 10, then decode one token at a time.
    std::vector<int32_t> head(tokens.begin(), tokens.begin() + 10);
    auto first = model->Forward({head, {{&kv, 10, false}}}, *cache, options);
    ASSERT_TRUE(first.ok()) << first.status();
    ExpectClose(*first, full.narrow(0, 9, 1), 1e-4, "prefill last row");
    for (size_t i = 10; i < tokens.size(); ++i) {
      auto step = model->Forward({{tokens[i]}, {{&kv, 1, false}}}, *cache, options);
      ASSERT_TRUE(step.ok()) << step.status();
      ExpectClose(*step, full.narrow(0, i, 1), 1e-4, "decode position " + std::to_string(i));
    }
    EXPECT_EQ(kv.length, static_cast<int64_t>(tokens.size()));
  }
}

TEST(LlamaModelTest, BatchedStepEqualsEachSequenceAlone) {
  auto model = LoadOrDie(TinyModelDir());
  const int vocab = model->config().vocab_size;
  const std::vector<int> prompt_lengths = {5, 17, 1, 33};
  std::vector<std::vector<int32_t>> seqs;
  for (size_t i = 0; i < prompt_lengths.size(); ++i) {
    seqs.push_back(RandomTokens(prompt_lengths[i] + 6, vocab, 10 + i));
  }
  for (bool reference : {false, true}) {
    ForwardOptions options{reference};
    auto cache = KvCache::Create(model->config(), {4, 128, 0}, model->runtime()).value();
    std::vector<SequenceKv> kvs(seqs.size());
    for (size_t i = 0; i < seqs.size(); ++i)
      ASSERT_TRUE(cache->Reserve(kvs[i], seqs[i].size()).ok());
    // One step prefills all prompts together.
    StepBatch prefill;
    for (size_t i = 0; i < seqs.size(); ++i) {
      prefill.tokens.insert(prefill.tokens.end(), seqs[i].begin(),
                            seqs[i].begin() + prompt_lengths[i]);
      prefill.sequences.push_back({&kvs[i], prompt_lengths[i], false});
    }
    auto batched = model->Forward(prefill, *cache, options);
    ASSERT_TRUE(batched.ok()) << batched.status();
    ASSERT_EQ(batched->size(0), static_cast<int64_t>(seqs.size()));
    std::vector<at::Tensor> alone;
    for (const auto& s : seqs) alone.push_back(PrefillAll(*model, s, options));
    for (size_t i = 0; i < seqs.size(); ++i) {
      ExpectClose((*batched)[i], alone[i][prompt_lengths[i] - 1], 1e-4, "prefill row");
    }
    // Decode steps with sequences of different lengths, one dropping out after 3 steps.
    for (int step = 0; step < 6; ++step) {
      StepBatch decode;
      std::vector<size_t> members;
      for (size_t i = 0; i < seqs.size(); ++i) {
        if (i == 2 && step >= 3) continue;
        decode.tokens.push_back(seqs[i][prompt_lengths[i] + step]);
        decode.sequences.push_back({&kvs[i], 1, false});
        members.push_back(i);
      }
      auto out = model->Forward(decode, *cache, options);
      ASSERT_TRUE(out.ok()) << out.status();
      for (size_t r = 0; r < members.size(); ++r) {
        const size_t i = members[r];
        ExpectClose((*out)[r], alone[i][prompt_lengths[i] + step], 1e-4,
                    "decode step " + std::to_string(step) + " seq " + std::to_string(i));
      }
    }
  }
}

TEST(LlamaModelTest, ChunkedPrefillEqualsWholePrefill) {
  auto model = LoadOrDie(TinyModelDir());
  auto tokens = RandomTokens(50, model->config().vocab_size, 3);
  at::Tensor full = PrefillAll(*model, tokens);
  auto cache = KvCache::Create(model->config(), {16, 8, 0}, model->runtime()).value();
  SequenceKv kv;
  ASSERT_TRUE(cache->Reserve(kv, 50).ok());
  int64_t done = 0;
  for (int64_t chunk : {7, 16, 27}) {
    std::vector<int32_t> part(tokens.begin() + done, tokens.begin() + done + chunk);
    auto out = model->Forward({part, {{&kv, chunk, true}}}, *cache);
    ASSERT_TRUE(out.ok()) << out.status();
    ExpectClose(*out, full.narrow(0, done, chunk), 1e-4, "chunk at " + std::to_string(done));
    done += chunk;
  }
}

TEST(LlamaModelTest, RejectsInvalidBatchesWithoutChangingState) {
  auto model = LoadOrDie(TinyModelDir());
  auto cache = KvCache::Create(model->config(), {16, 32, 0}, model->runtime()).value();
  SequenceKv kv;
  ASSERT_TRUE(cache->Reserve(kv, 16).ok());
  auto expect_invalid = [&](const StepBatch& b, const std::string& needle) {
    auto out = model->Forward(b, *cache);
    ASSERT_FALSE(out.ok());
    EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(std::string(out.status().message()).find(needle), std::string::npos) << out.status();
    EXPECT_EQ(kv.length, 0);
  };
  expect_invalid({{1, 512}, {{&kv, 2, false}}}, "outside the vocabulary");
  expect_invalid({{1, -3}, {{&kv, 2, false}}}, "outside the vocabulary");
  expect_invalid({{1, 2, 3}, {{&kv, 2, false}}}, "claim 2 tokens");
  expect_invalid({std::vector<int32_t>(17, 1), {{&kv, 17, false}}}, "KvCache::Reserve");
  expect_invalid({{1, 2}, {{&kv, 1, false}, {&kv, 1, false}}}, "twice");
  expect_invalid({{}, {}}, "no sequences");
  SequenceKv big;
  big.length = 250;
  ASSERT_TRUE(cache->Reserve(big, 260).ok());
  auto out = model->Forward({std::vector<int32_t>(10, 1), {{&big, 10, false}}}, *cache);
  ASSERT_FALSE(out.ok());
  EXPECT_NE(std::string(out.status().message()).find("past the context"), std::string::npos);
}

// --- loading: every kind of bad model directory gives an error naming the problem ------------

std::string CopyTinyModel() {
  std::string dir = collm::testing::MakeTempDir("collm-bad-model");
  for (const auto& e : std::filesystem::directory_iterator(TinyModelDir())) {
    std::filesystem::copy_file(e.path(), dir + "/" + e.path().filename().string());
  }
  return dir;
}

void ExpectLoadError(const std::string& dir, const std::vector<std::string>& needles) {
  auto model = LlamaModel::Load(dir, RuntimeOptions{});
  ASSERT_FALSE(model.ok());
  for (const auto& n : needles) {
    EXPECT_NE(std::string(model.status().message()).find(n), std::string::npos)
        << "missing '" << n << "' in: " << model.status();
  }
}

TEST(LlamaModelLoadTest, MissingDirectoryOrConfig) {
  ExpectLoadError("/nonexistent/collm-model", {"/nonexistent/collm-model/config.json"});
  std::string dir = CopyTinyModel();
  std::filesystem::remove(dir + "/model.safetensors");
  ExpectLoadError(dir, {"model.safetensors"});
}

TEST(LlamaModelLoadTest, BadConfigNamesTheKey) {
  std::string dir = CopyTinyModel();
  std::string cfg = collm::testing::ReadFileOrDie(dir + "/config.json");
  auto pos = cfg.find("\"num_key_value_heads\": 2");
  ASSERT_NE(pos, std::string::npos);
  collm::testing::WriteFileOrDie(dir + "/config.json",
                                 cfg.replace(pos, 24, "\"num_key_value_heads\": 3"));
  ExpectLoadError(dir, {"num_key_value_heads", "config.json"});
  collm::testing::WriteFileOrDie(dir + "/config.json", "{not json");
  ExpectLoadError(dir, {"config.json", "not valid JSON"});
}

TEST(LlamaModelLoadTest, ShapeMismatchNamesTensor) {
  std::string dir = CopyTinyModel();
  std::string cfg = collm::testing::ReadFileOrDie(dir + "/config.json");
  auto pos = cfg.find("\"intermediate_size\": 176");
  ASSERT_NE(pos, std::string::npos);
  collm::testing::WriteFileOrDie(dir + "/config.json",
                                 cfg.replace(pos, 24, "\"intermediate_size\": 128"));
  ExpectLoadError(dir, {"model.layers.0.mlp.gate_proj.weight", "[176, 64]", "[128, 64]"});
}

TEST(LlamaModelLoadTest, MissingTensorNamesTensorAndFile) {
  RandomModelOptions options;
  options.config = TinyLlamaConfig();
  options.config.tie_word_embeddings = false;
  options.write_tokenizer = false;
  std::string dir = collm::testing::WriteModelToTempDir(options);
  // Claim tied=false but drop lm_head.weight from the file by writing a tied checkpoint.
  RandomModelOptions tied = options;
  tied.config.tie_word_embeddings = true;
  ASSERT_TRUE(WriteRandomModel(dir + "/tied", tied).ok());
  std::filesystem::copy_file(dir + "/tied/model.safetensors", dir + "/model.safetensors",
                             std::filesystem::copy_options::overwrite_existing);
  ExpectLoadError(dir, {"lm_head.weight", dir});
}

TEST(LlamaModelLoadTest, TruncatedWeightsFileIsAnErrorNotACrash) {
  std::string dir = CopyTinyModel();
  const std::string path = dir + "/model.safetensors";
  const auto size = std::filesystem::file_size(path);
  std::filesystem::resize_file(path, size / 2);
  ExpectLoadError(dir, {"model.safetensors"});
}

TEST(LlamaModelLoadTest, Bf16AndF16CheckpointsLoadAndAgree) {
  RandomModelOptions options;
  options.config = TinyLlamaConfig();
  options.write_tokenizer = false;
  options.seed = 7;
  std::string f32_dir = collm::testing::WriteModelToTempDir(options);
  options.dtype = StoredDType::kBF16;
  std::string bf16_dir = collm::testing::WriteModelToTempDir(options);
  auto a = LoadOrDie(f32_dir), b = LoadOrDie(bf16_dir);
  auto tokens = RandomTokens(12, 512, 4);
  at::Tensor la = PrefillAll(*a, tokens), lb = PrefillAll(*b, tokens);
  // bf16 keeps ~3 significant digits: close, not equal.
  const double diff = (la - lb).abs().max().item<double>();
  EXPECT_LT(diff, 0.1);
  EXPECT_GT(diff, 0.0);
}

TEST(LlamaModelTest, QwenStyleBiasAndUntiedHeadMatchReference) {
  RandomModelOptions options;
  options.config = TinyLlamaConfig();
  options.config.model_type = "qwen2";
  options.config.qkv_bias = true;
  options.config.tie_word_embeddings = false;
  options.config.rope_theta = 1e6;
  options.write_tokenizer = false;
  auto model = LoadOrDie(collm::testing::WriteModelToTempDir(options));
  ASSERT_NE(model, nullptr);
  EXPECT_TRUE(model->config().qkv_bias);
  auto tokens = RandomTokens(21, 512, 5);
  ExpectClose(PrefillAll(*model, tokens), PrefillAll(*model, tokens, ForwardOptions{true}), 1e-4,
              "qwen2 fused vs reference");
}

TEST(LlamaModelTest, Llama3RopeScalingMatchesReference) {
  RandomModelOptions options;
  options.config = TinyLlamaConfig();
  options.config.rope_scaling.type = "llama3";
  options.config.rope_scaling.factor = 8;
  options.config.rope_scaling.original_max_position_embeddings = 64;
  options.write_tokenizer = false;
  auto model = LoadOrDie(collm::testing::WriteModelToTempDir(options));
  ASSERT_NE(model, nullptr);
  auto tokens = RandomTokens(100, 512, 6);
  ExpectClose(PrefillAll(*model, tokens), PrefillAll(*model, tokens, ForwardOptions{true}), 1e-4,
              "llama3 rope fused vs reference");
}

}  // namespace
}  // namespace collm::runtime
