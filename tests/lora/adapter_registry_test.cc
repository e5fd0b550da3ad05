#include "collm/lora/adapter_registry.h"

#include <ATen/ATen.h>

#include "collm/lora/peft_io.h"
#include "collm/runtime/generator.h"
#include "collm/runtime/llama_model.h"
#include "gtest/gtest.h"
#include "testing/test_env.h"
#include "testing/tiny_model.h"

namespace collm::lora {
namespace {

struct Env {
  std::shared_ptr<const runtime::LlamaModel> model;
  std::unique_ptr<AdapterRegistry> registry;
};

Env MakeEnv() {
  Env e;
  e.model =
      runtime::LlamaModel::Load(collm::testing::TinyModelDir(), runtime::RuntimeOptions{}).value();
  e.registry = std::make_unique<AdapterRegistry>(e.model->config(), e.model->runtime());
  return e;
}

LoraAdapter RandomAdapter(const runtime::ModelConfig& c, uint64_t seed) {
  LoraConfig config;
  config.rank = 4;
  config.targets = {runtime::LoraTarget::kQ, runtime::LoraTarget::kV, runtime::LoraTarget::kDown};
  LoraAdapter a = LoraAdapter::Create(c, config, seed).value();
  at::manual_seed(seed);
  for (auto& layer : a.factors.layers) {
    for (auto& f : layer) {
      if (f.b.defined()) f.b = at::randn_like(f.b) * 0.3;
    }
  }
  return a;
}

std::vector<int32_t> GreedyAlone(const runtime::LlamaModel& model, const runtime::LoraWeights* w,
                                 const std::vector<int32_t>& prompt, int n) {
  runtime::Generator gen(std::shared_ptr<const runtime::LlamaModel>(&model, [](auto*) {}), nullptr);
  runtime::GenerationRequest r;
  r.prompt = prompt;
  r.params.temperature = 0;
  r.params.max_tokens = n;
  r.params.ignore_eos = true;
  r.adapter = w;
  return gen.Generate({r}).value()[0].tokens;
}

TEST(AdapterRegistryTest, VersionsIncreaseAndRollbackRestoresPreviousOutputsExactly) {
  Env e = MakeEnv();
  const auto& c = e.model->config();
  auto v1 = e.registry->Publish("a", RandomAdapter(c, 1), "test").value();
  auto v2 = e.registry->Publish("a", RandomAdapter(c, 2), "test").value();
  EXPECT_EQ(v1->version, 1);
  EXPECT_EQ(v2->version, 2);
  EXPECT_EQ(e.registry->Get("a").value(), v2);
  EXPECT_EQ(e.registry->GetVersion("a", 1).value(), v1);
  EXPECT_EQ(e.registry->GetVersion("a", 7).status().code(), absl::StatusCode::kNotFound);
  const std::vector<int32_t> prompt = {1, 50, 60, 70};
  auto out1 = GreedyAlone(*e.model, &v1->weights, prompt, 12);
  auto out2 = GreedyAlone(*e.model, &v2->weights, prompt, 12);
  EXPECT_NE(out1, out2);
  auto back = e.registry->Rollback("a").value();
  EXPECT_EQ(back->version, 1);
  EXPECT_EQ(GreedyAlone(*e.model, &e.registry->Get("a").value()->weights, prompt, 12), out1);
  EXPECT_EQ(e.registry->Rollback("a").status().code(), absl::StatusCode::kFailedPrecondition);
  // Versions are never reused after a rollback.
  EXPECT_EQ(e.registry->Publish("a", RandomAdapter(c, 3), "test").value()->version, 3);
}

TEST(AdapterRegistryTest, ListUnloadAndPinnedSnapshotsOutliveUnload) {
  Env e = MakeEnv();
  const auto& c = e.model->config();
  auto pinned = e.registry->Publish("x", RandomAdapter(c, 4), "peft:/tmp/x").value();
  ASSERT_TRUE(e.registry->Publish("y", RandomAdapter(c, 5), "shadow").ok());
  auto list = e.registry->List();
  ASSERT_EQ(list.size(), 2u);
  EXPECT_EQ(list[0].name, "x");
  EXPECT_EQ(list[0].rank, 4);
  EXPECT_EQ(list[0].source, "peft:/tmp/x");
  ASSERT_TRUE(e.registry->Unload("x").ok());
  EXPECT_EQ(e.registry->Get("x").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(e.registry->Unload("x").code(), absl::StatusCode::kNotFound);
  // The request that pinned v1 can still decode with it.
  EXPECT_EQ(GreedyAlone(*e.model, &pinned->weights, {1, 2, 3}, 5).size(), 5u);
  EXPECT_GE(e.registry->generation(), 3);
}

TEST(AdapterRegistryTest, LoadsPeftDirectoriesByNameAndKeepsStateOnBadOnes) {
  Env e = MakeEnv();
  const std::string dir = collm::testing::MakeTempDir("collm-peft-reg") + "/a";
  LoraAdapter written = RandomAdapter(e.model->config(), 8);
  ASSERT_TRUE(WritePeftAdapter(dir, written).ok());
  auto v1 = e.registry->LoadPeft("math", dir).value();
  EXPECT_EQ(v1->version, 1);
  EXPECT_EQ(v1->source, "peft:" + dir);
  auto bad = e.registry->LoadPeft("math", dir + "/missing");
  EXPECT_FALSE(bad.ok());
  EXPECT_NE(std::string(bad.status().message()).find(dir + "/missing"), std::string::npos)
      << bad.status();
  EXPECT_EQ(e.registry->Get("math").value(), v1);
  const std::vector<int32_t> prompt = {1, 9, 8, 7};
  auto direct = written.ToWeights(e.model->config(), e.model->runtime()).value();
  EXPECT_EQ(GreedyAlone(*e.model, &v1->weights, prompt, 10),
            GreedyAlone(*e.model, &direct, prompt, 10));
}

TEST(AdapterRegistryTest, RejectsInvalidAdapters) {
  Env e = MakeEnv();
  LoraAdapter bad = RandomAdapter(e.model->config(), 6);
  bad.factors.layers[1][static_cast<int>(runtime::LoraTarget::kV)].b[0][0] = NAN;
  auto s = e.registry->Publish("bad", bad, "test");
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.status().message()).find("layer 1 v_proj"), std::string::npos)
      << s.status();
  EXPECT_EQ(e.registry->Get("bad").status().code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(e.registry->Publish("", RandomAdapter(e.model->config(), 7), "t").ok());
}

// A decode loop publishing between steps: every request's tokens come from the version it pinned
// when it started, and requests that start after the publish get the new version.
TEST(AdapterRegistryTest, PublishingWhileRequestsDecodeKeepsEachRequestOnOneVersion) {
  Env e = MakeEnv();
  const auto& c = e.model->config();
  ASSERT_TRUE(e.registry->Publish("live", RandomAdapter(c, 10), "v1").ok());
  struct Req {
    std::vector<int32_t> prompt;
    std::shared_ptr<const AdapterSnapshot> pin;
    runtime::SequenceKv kv;
    std::vector<int32_t> out;
    bool started = false;
  };
  std::vector<Req> reqs(4);
  const std::vector<int> start_step = {0, 0, 4, 6};
  for (size_t i = 0; i < reqs.size(); ++i)
    reqs[i].prompt = {1, static_cast<int32_t>(20 + i), 33, 44};
  auto cache = runtime::KvCache::Create(c, {16, 32, 0}, e.model->runtime()).value();
  const int kTokens = 8;
  for (int step = 0; step < 20; ++step) {
    if (step == 3) {
      ASSERT_TRUE(e.registry->Publish("live", RandomAdapter(c, 11), "v2").ok());
    }
    if (step == 5) {
      ASSERT_TRUE(e.registry->Publish("live", RandomAdapter(c, 12), "v3").ok());
    }
    runtime::StepBatch batch;
    std::vector<Req*> in_batch;
    for (size_t i = 0; i < reqs.size(); ++i) {
      Req& r = reqs[i];
      if (step < start_step[i] || static_cast<int>(r.out.size()) >= kTokens) continue;
      if (!r.started) {
        r.started = true;
        r.pin = e.registry->Get("live").value();  // Pinned for the request's lifetime.
        ASSERT_TRUE(cache->Reserve(r.kv, r.prompt.size() + kTokens).ok());
        batch.tokens.insert(batch.tokens.end(), r.prompt.begin(), r.prompt.end());
        batch.sequences.push_back(
            {&r.kv, static_cast<int64_t>(r.prompt.size()), false, &r.pin->weights});
      } else {
        batch.tokens.push_back(r.out.back());
        batch.sequences.push_back({&r.kv, 1, false, &r.pin->weights});
      }
      in_batch.push_back(&r);
    }
    if (in_batch.empty()) continue;
    at::Tensor logits = e.model->Forward(batch, *cache).value();
    for (size_t k = 0; k < in_batch.size(); ++k) {
      in_batch[k]->out.push_back(static_cast<int32_t>(logits[k].argmax().item<int64_t>()));
    }
  }
  const std::vector<int64_t> want_version = {1, 1, 2, 3};
  for (size_t i = 0; i < reqs.size(); ++i) {
    ASSERT_EQ(reqs[i].out.size(), static_cast<size_t>(kTokens));
    EXPECT_EQ(reqs[i].pin->version, want_version[i]) << "request " << i;
    EXPECT_EQ(reqs[i].out, GreedyAlone(*e.model, &reqs[i].pin->weights, reqs[i].prompt, kTokens))
        << "request " << i << " mixed versions";
  }
}

}  // namespace
}  // namespace collm::lora
