// Unmerged LoRA in the decoder: y = x W^T + s (x A^T) B^T must equal running a model whose
// weights had s B A merged in; mixed-adapter batches must equal each request alone; the dense
// (training) forward must agree with the step forward and send gradients only to the adapter.
#include <ATen/ATen.h>

#include <random>

#include "collm/runtime/llama_model.h"
#include "collm/runtime/safetensors.h"
#include "gtest/gtest.h"
#include "testing/tiny_model.h"

namespace collm::runtime {
namespace {

LoraFactors RandomFactors(const ModelConfig& c, int rank, double scale, uint64_t seed,
                          std::vector<LoraTarget> targets = {
                              LoraTarget::kQ, LoraTarget::kK, LoraTarget::kV, LoraTarget::kO,
                              LoraTarget::kGate, LoraTarget::kUp, LoraTarget::kDown}) {
  at::manual_seed(seed);
  LoraFactors f;
  f.scale = scale;
  f.layers.resize(c.num_hidden_layers);
  for (auto& layer : f.layers) {
    for (LoraTarget t : targets) {
      layer[static_cast<int>(t)].a = at::randn({rank, LoraTargetIn(c, t)}) * 0.1;
      layer[static_cast<int>(t)].b = at::randn({LoraTargetOut(c, t), rank}) * 0.1;
    }
  }
  return f;
}

// Builds the same model with s * B A merged into every adapted weight.
std::shared_ptr<const LlamaModel> MergedModel(const std::string& dir, const LoraFactors& f) {
  auto config = ModelConfig::FromFile(dir + "/config.json").value();
  auto ckpt = SafetensorsCheckpoint::Open(dir).value();
  std::map<std::string, at::Tensor> tensors;
  for (const auto& name : ckpt->TensorNames()) {
    TensorView v = ckpt->Get(name).value();
    at::Tensor t = at::empty(v.shape, at::kFloat);
    ConvertToFloat32(v, t.data_ptr<float>());
    tensors[name] = t;
  }
  const char* module_prefix[kNumLoraTargets] = {
      "self_attn.", "self_attn.", "self_attn.", "self_attn.", "mlp.", "mlp.", "mlp."};
  for (size_t l = 0; l < f.layers.size(); ++l) {
    for (int t = 0; t < kNumLoraTargets; ++t) {
      const auto& p = f.layers[l][t];
      if (!p.a.defined()) continue;
      const std::string name = "model.layers." + std::to_string(l) + "." + module_prefix[t] +
                               LoraTargetName(static_cast<LoraTarget>(t)) + ".weight";
      tensors[name] = tensors[name] + f.scale * at::mm(p.b, p.a);
    }
  }
  return LlamaModel::FromTensors(config, tensors, ResolvedRuntime{}, dir).value();
}

at::Tensor StepLogits(const LlamaModel& m, const std::vector<int32_t>& tokens,
                      const LoraWeights* adapter, bool reference) {
  auto cache = KvCache::Create(m.config(), {16, 32, 0}, m.runtime()).value();
  SequenceKv kv;
  EXPECT_TRUE(cache->Reserve(kv, tokens.size()).ok());
  SequenceStep s{&kv, static_cast<int64_t>(tokens.size()), true, adapter};
  return m.Forward({tokens, {s}}, *cache, ForwardOptions{reference}).value();
}

std::vector<int32_t> Tokens(int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = rng() % 512;
  return t;
}

double MaxDiff(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

TEST(LoraForwardTest, UnmergedEqualsMergedOnEveryTarget) {
  const std::string dir = collm::testing::TinyModelDir();
  auto base = LlamaModel::Load(dir, RuntimeOptions{}).value();
  LoraFactors f = RandomFactors(base->config(), 4, 2.0, 1);
  LoraWeights w = FuseLora(base->config(), f).value();
  auto merged = MergedModel(dir, f);
  auto tokens = Tokens(30, 2);
  at::Tensor want = StepLogits(*merged, tokens, nullptr, false);
  for (bool reference : {false, true}) {
    at::Tensor got = StepLogits(*base, tokens, &w, reference);
    EXPECT_LT(MaxDiff(got, want), 1e-4) << "reference=" << reference;
  }
  // And the adapter really changes the output.
  EXPECT_GT(MaxDiff(StepLogits(*base, tokens, nullptr, false), want), 1e-2);
}

TEST(LoraForwardTest, PartialTargetsUnmergedEqualsMerged) {
  const std::string dir = collm::testing::TinyModelDir();
  auto base = LlamaModel::Load(dir, RuntimeOptions{}).value();
  LoraFactors f = RandomFactors(base->config(), 3, 0.5, 3, {LoraTarget::kK, LoraTarget::kUp});
  LoraWeights w = FuseLora(base->config(), f).value();
  auto tokens = Tokens(17, 4);
  EXPECT_LT(MaxDiff(StepLogits(*base, tokens, &w, false),
                    StepLogits(*MergedModel(dir, f), tokens, nullptr, false)),
            1e-4);
}

TEST(LoraForwardTest, MixedAdapterBatchEqualsEachRequestAlone) {
  auto model = LlamaModel::Load(collm::testing::TinyModelDir(), RuntimeOptions{}).value();
  const ModelConfig& c = model->config();
  std::vector<LoraWeights> adapters;
  for (int i = 0; i < 3; ++i)
    adapters.push_back(FuseLora(c, RandomFactors(c, 2 + 2 * i, 1.0, 10 + i)).value());
  // Six sequences: adapters 0,1,0,none,2,1 — so groups are non-contiguous.
  const std::vector<const LoraWeights*> use = {&adapters[0], &adapters[1], &adapters[0],
                                               nullptr,      &adapters[2], &adapters[1]};
  const std::vector<int> lengths = {5, 9, 1, 7, 12, 3};
  for (bool reference : {false, true}) {
    auto cache = KvCache::Create(c, {8, 64, 0}, model->runtime()).value();
    std::vector<SequenceKv> kvs(use.size());
    std::vector<std::vector<int32_t>> seqs;
    StepBatch prefill;
    for (size_t i = 0; i < use.size(); ++i) {
      seqs.push_back(Tokens(lengths[i] + 3, 100 + i));
      ASSERT_TRUE(cache->Reserve(kvs[i], seqs[i].size()).ok());
      prefill.tokens.insert(prefill.tokens.end(), seqs[i].begin(), seqs[i].begin() + lengths[i]);
      prefill.sequences.push_back({&kvs[i], lengths[i], false, use[i]});
    }
    at::Tensor batched = model->Forward(prefill, *cache, ForwardOptions{reference}).value();
    for (size_t i = 0; i < use.size(); ++i) {
      at::Tensor alone = StepLogits(*model, seqs[i], use[i], reference);
      EXPECT_LT(MaxDiff(batched[i], alone[lengths[i] - 1]), 1e-4) << "prefill seq " << i;
    }
    for (int step = 0; step < 3; ++step) {
      StepBatch decode;
      for (size_t i = 0; i < use.size(); ++i) {
        decode.tokens.push_back(seqs[i][lengths[i] + step]);
        decode.sequences.push_back({&kvs[i], 1, false, use[i]});
      }
      at::Tensor out = model->Forward(decode, *cache, ForwardOptions{reference}).value();
      for (size_t i = 0; i < use.size(); ++i) {
        at::Tensor alone = StepLogits(*model, seqs[i], use[i], reference);
        EXPECT_LT(MaxDiff(out[i], alone[lengths[i] + step]), 1e-4)
            << "decode step " << step << " seq " << i << " reference=" << reference;
      }
    }
  }
}

TEST(LoraForwardTest, DenseForwardMatchesStepForwardAndTrainsOnlyTheAdapter) {
  auto model = LlamaModel::Load(collm::testing::TinyModelDir(), RuntimeOptions{}).value();
  const ModelConfig& c = model->config();
  LoraFactors f = RandomFactors(c, 4, 1.0, 7);
  for (auto& layer : f.layers) {
    for (auto& p : layer) {
      p.a.requires_grad_(true);
      p.b.requires_grad_(true);
    }
  }
  LoraWeights w = FuseLora(c, f).value();
  auto a = Tokens(20, 8), b = Tokens(20, 9);
  std::vector<int64_t> flat(a.begin(), a.end());
  flat.insert(flat.end(), b.begin(), b.end());
  at::Tensor tokens = at::tensor(flat, at::kLong).view({2, 20});
  at::Tensor dense = model->DenseLogits(tokens, &w).value();
  {
    at::NoGradGuard no_grad;
    LoraWeights frozen = FuseLora(c, f).value();
    EXPECT_LT(MaxDiff(dense[0].detach(), StepLogits(*model, a, &frozen, false)), 1e-4);
    EXPECT_LT(MaxDiff(dense[1].detach(), StepLogits(*model, b, &frozen, false)), 1e-4);
  }
  dense.logsumexp(-1).sum().backward();
  for (auto& layer : f.layers) {
    for (auto& p : layer) {
      ASSERT_TRUE(p.b.grad().defined());
      EXPECT_GT(p.b.grad().abs().sum().item<double>(), 0.0);
    }
  }
  EXPECT_FALSE(model->BaseWeight(0, LoraTarget::kQ).requires_grad());
  EXPECT_FALSE(model->BaseWeight(0, LoraTarget::kQ).grad().defined());
}

TEST(LoraForwardTest, RejectsMismatchedAdapters) {
  auto model = LlamaModel::Load(collm::testing::TinyModelDir(), RuntimeOptions{}).value();
  const ModelConfig& c = model->config();
  LoraFactors f = RandomFactors(c, 2, 1.0, 1);
  f.layers[1][static_cast<int>(LoraTarget::kDown)].a = at::randn({2, 7});
  auto bad = FuseLora(c, f);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(std::string(bad.status().message()).find("layer 1 down_proj"), std::string::npos)
      << bad.status();
  LoraFactors short_f = RandomFactors(c, 2, 1.0, 1);
  short_f.layers.pop_back();
  EXPECT_FALSE(FuseLora(c, short_f).ok());
  EXPECT_EQ(ParseLoraTarget("qkv_proj").status().code(), absl::StatusCode::kInvalidArgument);
  // A double-precision adapter is refused by the step instead of silently mis-computing.
  LoraWeights wrong = FuseLora(c, RandomFactors(c, 2, 1.0, 1)).value();
  wrong.layers[0].o.a = wrong.layers[0].o.a.to(at::kDouble);
  auto cache = KvCache::Create(c, {16, 4, 0}, model->runtime()).value();
  SequenceKv kv;
  ASSERT_TRUE(cache->Reserve(kv, 3).ok());
  auto out = model->Forward({{1, 2, 3}, {{&kv, 3, false, &wrong}}}, *cache);
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace collm::runtime
