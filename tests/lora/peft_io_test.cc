// PEFT adapter files: our writer and reader agree bit for bit, every corrupt or mismatched file is
// refused with an error naming the file and tensor or key, and adapters cross-check against an
// independent Python implementation (tests/reference/peft_reference.py) in both directions.
#include "collm/lora/peft_io.h"

#include <ATen/ATen.h>

#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "absl/strings/str_join.h"
#include "collm/runtime/llama_model.h"
#include "collm/runtime/random_model.h"
#include "collm/runtime/safetensors.h"
#include "collm/runtime/tokenizer.h"
#include "gtest/gtest.h"
#include "testing/subprocess.h"
#include "testing/test_env.h"
#include "testing/tiny_model.h"

namespace collm::lora {
namespace {

using ::collm::testing::MakeTempDir;
using ::collm::testing::ReadFileOrDie;
using ::collm::testing::WriteFileOrDie;
using runtime::LoraTarget;

const std::vector<LoraTarget> kAllTargets = {LoraTarget::kQ,   LoraTarget::kK,    LoraTarget::kV,
                                             LoraTarget::kO,   LoraTarget::kGate, LoraTarget::kUp,
                                             LoraTarget::kDown};

// A PEFT-initialized adapter with B ~ N(0, 0.1^2) so that it changes the model.
LoraAdapter RandomAdapter(const runtime::ModelConfig& model, std::vector<LoraTarget> targets,
                          int rank = 4, double alpha = 8, bool rslora = false, uint64_t seed = 1) {
  LoraConfig config;
  config.rank = rank;
  config.alpha = alpha;
  config.use_rslora = rslora;
  config.targets = std::move(targets);
  config.base_model_name_or_path = "tiny";
  LoraAdapter adapter = LoraAdapter::Create(model, config, seed).value();
  at::manual_seed(seed);
  for (auto& layer : adapter.factors.layers) {
    for (auto& f : layer) {
      if (f.b.defined()) f.b = at::randn(f.b.sizes()) * 0.1;
    }
  }
  return adapter;
}

std::map<std::string, at::Tensor> ReadAllTensors(const std::string& path) {
  auto file = runtime::SafetensorsFile::Open(path).value();
  std::map<std::string, at::Tensor> out;
  for (const auto& name : file->TensorNames()) {
    runtime::TensorView v = file->Get(name).value();
    at::Tensor t = at::empty(v.shape, at::kFloat);
    runtime::ConvertToFloat32(v, t.data_ptr<float>());
    out[name] = t;
  }
  return out;
}

void WriteAllTensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors) {
  std::vector<runtime::TensorToWrite> list;
  std::vector<at::Tensor> keep;
  for (const auto& [name, t] : tensors) {
    keep.push_back(t.contiguous());
    list.push_back({name, runtime::StoredDType::kF32,
                    std::vector<int64_t>(t.sizes().begin(), t.sizes().end()),
                    keep.back().data_ptr<float>()});
  }
  ASSERT_TRUE(runtime::WriteSafetensors(path, list).ok());
}

// Builds a valid adapter dir for the tiny model, lets `corrupt` damage it, and returns the
// reader's error message.
template <typename F>
std::string ErrorAfter(F corrupt) {
  const runtime::ModelConfig model = runtime::TinyLlamaConfig();
  const std::string dir = MakeTempDir("collm-peft");
  EXPECT_TRUE(WritePeftAdapter(dir, RandomAdapter(model, {LoraTarget::kQ, LoraTarget::kV})).ok());
  EXPECT_TRUE(ReadPeftAdapter(dir, model).ok());
  corrupt(dir);
  auto read = ReadPeftAdapter(dir, model);
  EXPECT_FALSE(read.ok());
  return read.ok() ? "" : std::string(read.status().message());
}

// Rewrites the adapter's tensors through `edit`.
template <typename F>
void EditTensors(const std::string& dir, F edit) {
  const std::string path = dir + "/adapter_model.safetensors";
  auto tensors = ReadAllTensors(path);
  edit(tensors);
  WriteAllTensors(path, tensors);
}

void EditConfig(const std::string& dir, const std::string& key, const nlohmann::json& value) {
  const std::string path = dir + "/adapter_config.json";
  auto j = nlohmann::json::parse(ReadFileOrDie(path));
  j[key] = value;
  WriteFileOrDie(path, j.dump(2));
}

#define EXPECT_HAS(message, needle)                    \
  EXPECT_NE((message).find(needle), std::string::npos) \
      << "missing '" << (needle) << "' in: " << (message)

TEST(PeftIoTest, TensorNamesFollowPeft) {
  EXPECT_EQ(PeftTensorName(3, LoraTarget::kQ, true),
            "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight");
  EXPECT_EQ(PeftTensorName(0, LoraTarget::kDown, false),
            "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight");
  EXPECT_EQ(PeftTensorName(11, LoraTarget::kO, false),
            "base_model.model.model.layers.11.self_attn.o_proj.lora_B.weight");
  EXPECT_EQ(PeftTensorName(1, LoraTarget::kGate, true),
            "base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight");
}

TEST(PeftIoTest, RoundTripIsBitIdentical) {
  const runtime::ModelConfig model = runtime::TinyLlamaConfig();
  const LoraAdapter adapter = RandomAdapter(model, kAllTargets, 4, 8, true, 7);
  const std::string dir = MakeTempDir("collm-peft") + "/nested/adapter";
  ASSERT_TRUE(WritePeftAdapter(dir, adapter).ok());

  auto file = runtime::SafetensorsFile::Open(dir + "/adapter_model.safetensors").value();
  auto names = file->TensorNames();
  std::set<std::string> want;
  for (int64_t l = 0; l < model.num_hidden_layers; ++l) {
    for (LoraTarget t : kAllTargets) {
      want.insert(PeftTensorName(l, t, true));
      want.insert(PeftTensorName(l, t, false));
    }
  }
  EXPECT_EQ(std::set<std::string>(names.begin(), names.end()), want);
  EXPECT_EQ(names.size(), want.size());
  for (const auto& name : names) EXPECT_EQ(file->Get(name)->dtype, runtime::StoredDType::kF32);
  EXPECT_EQ(file->metadata().at("format"), "pt");
  // No temporary files are left behind.
  int entries = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    (void)e;
    ++entries;
  }
  EXPECT_EQ(entries, 2);

  auto back = ReadPeftAdapter(dir, model);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->config.rank, 4);
  EXPECT_EQ(back->config.alpha, 8);
  EXPECT_TRUE(back->config.use_rslora);
  EXPECT_EQ(back->config.targets, kAllTargets);
  EXPECT_EQ(back->config.base_model_name_or_path, "tiny");
  EXPECT_DOUBLE_EQ(back->factors.scale, adapter.factors.scale);
  for (int64_t l = 0; l < model.num_hidden_layers; ++l) {
    for (int t = 0; t < runtime::kNumLoraTargets; ++t) {
      const auto& got = back->factors.layers[l][t];
      const auto& want_f = adapter.factors.layers[l][t];
      ASSERT_TRUE(got.a.defined() && got.b.defined());
      EXPECT_TRUE(got.a.equal(want_f.a)) << "layer " << l << " target " << t;
      EXPECT_TRUE(got.b.equal(want_f.b)) << "layer " << l << " target " << t;
      EXPECT_NE(got.b.abs().sum().item<double>(), 0.0);
    }
  }
  // Writing again over an existing directory works and gives the same bytes.
  const std::string before = ReadFileOrDie(dir + "/adapter_model.safetensors");
  ASSERT_TRUE(WritePeftAdapter(dir, *back).ok());
  EXPECT_EQ(ReadFileOrDie(dir + "/adapter_model.safetensors"), before);
}

TEST(PeftIoTest, WritesGradTrackingTensors) {
  const runtime::ModelConfig model = runtime::TinyLlamaConfig();
  LoraAdapter adapter = RandomAdapter(model, {LoraTarget::kO});
  for (auto& layer : adapter.factors.layers) {
    for (auto& f : layer) {
      if (!f.a.defined()) continue;
      f.a.requires_grad_(true);
      f.b = f.b.t().contiguous().t().requires_grad_(true);  // Non-contiguous view is fine too.
    }
  }
  const std::string dir = MakeTempDir("collm-peft");
  ASSERT_TRUE(WritePeftAdapter(dir, adapter).ok());
  auto back = ReadPeftAdapter(dir, model);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(back->factors.layers[1][3].b.equal(adapter.factors.layers[1][3].b.detach()));
}

TEST(PeftIoTest, RejectsMissingFiles) {
  std::string m = ErrorAfter(
      [](const std::string& dir) { std::filesystem::remove(dir + "/adapter_config.json"); });
  EXPECT_HAS(m, "adapter_config.json");
  m = ErrorAfter(
      [](const std::string& dir) { std::filesystem::remove(dir + "/adapter_model.safetensors"); });
  EXPECT_HAS(m, "adapter_model.safetensors");
  EXPECT_HAS(m, "no such file");
  auto missing_dir = ReadPeftAdapter("/nonexistent/adapter", runtime::TinyLlamaConfig());
  EXPECT_EQ(missing_dir.status().code(), absl::StatusCode::kNotFound);
}

TEST(PeftIoTest, RejectsBadJson) {
  const std::string m = ErrorAfter(
      [](const std::string& dir) { WriteFileOrDie(dir + "/adapter_config.json", "{\"r\": 4, "); });
  EXPECT_HAS(m, "adapter_config.json");
  EXPECT_HAS(m, "not valid JSON");
}

TEST(PeftIoTest, RejectsUnsupportedConfigNamingFileAndKey) {
  std::string m = ErrorAfter([](const std::string& dir) {
    EditConfig(dir, "target_modules", {"q_proj", "qkv_proj"});
  });
  EXPECT_HAS(m, "adapter_config.json");
  EXPECT_HAS(m, "target_modules");
  EXPECT_HAS(m, "qkv_proj");
  m = ErrorAfter([](const std::string& dir) { EditConfig(dir, "use_dora", true); });
  EXPECT_HAS(m, "adapter_config.json");
  EXPECT_HAS(m, "\"use_dora\"");
}

TEST(PeftIoTest, RejectsAdapterForAnotherBaseModel) {
  runtime::ModelConfig other = runtime::TinyLlamaConfig();
  other.hidden_size = 32;
  const std::string dir = MakeTempDir("collm-peft");
  ASSERT_TRUE(WritePeftAdapter(dir, RandomAdapter(other, {LoraTarget::kQ, LoraTarget::kV})).ok());
  auto read = ReadPeftAdapter(dir, runtime::TinyLlamaConfig());
  ASSERT_FALSE(read.ok());
  const std::string m(read.status().message());
  EXPECT_HAS(m, "adapter_model.safetensors");
  EXPECT_HAS(m, "lora_A.weight' has shape [4, 32], expected [4, 64]");
  // And it reads fine against the model it was made for.
  EXPECT_TRUE(ReadPeftAdapter(dir, other).ok());
}

TEST(PeftIoTest, RejectsRankDifferentFromConfig) {
  const std::string m = ErrorAfter([](const std::string& dir) { EditConfig(dir, "r", 8); });
  EXPECT_HAS(m, "adapter_model.safetensors");
  EXPECT_HAS(m, "has rank 4");
  EXPECT_HAS(m, "\"r\" is 8");
  EXPECT_HAS(m, "base_model.model.model.layers.");
}

TEST(PeftIoTest, RejectsLayerBeyondModel) {
  const std::string m = ErrorAfter([](const std::string& dir) {
    EditTensors(dir, [](auto& t) {
      t[PeftTensorName(2, LoraTarget::kQ, true)] = t[PeftTensorName(0, LoraTarget::kQ, true)];
      t[PeftTensorName(2, LoraTarget::kQ, false)] = t[PeftTensorName(0, LoraTarget::kQ, false)];
    });
  });
  EXPECT_HAS(m, "'base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight' is for layer 2");
  EXPECT_HAS(m, "has 2 layers");
}

TEST(PeftIoTest, RejectsMissingFactor) {
  const std::string m = ErrorAfter([](const std::string& dir) {
    EditTensors(dir, [](auto& t) { t.erase(PeftTensorName(1, LoraTarget::kV, false)); });
  });
  EXPECT_HAS(m, "adapter_model.safetensors");
  EXPECT_HAS(m, "missing tensor 'base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight'");
}

TEST(PeftIoTest, RejectsNaNAndInf) {
  std::string m = ErrorAfter([](const std::string& dir) {
    EditTensors(dir, [](auto& t) { t[PeftTensorName(0, LoraTarget::kV, false)][3][1] = NAN; });
  });
  EXPECT_HAS(m, "'base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight' has NaN or Inf");
  m = ErrorAfter([](const std::string& dir) {
    EditTensors(dir, [](auto& t) { t[PeftTensorName(1, LoraTarget::kQ, true)][0][0] = INFINITY; });
  });
  EXPECT_HAS(m, "layers.1.self_attn.q_proj.lora_A.weight' has NaN or Inf");
}

TEST(PeftIoTest, RejectsUnexpectedTensors) {
  for (const std::string extra :
       {"base_model.model.lm_head.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
        "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
        "base_model.model.model.layers.01.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.-1.self_attn.q_proj.lora_A.weight",
        "model.layers.0.self_attn.q_proj.lora_A.weight"}) {
    const std::string m = ErrorAfter([&](const std::string& dir) {
      EditTensors(dir, [&](auto& t) { t[extra] = at::zeros({4, 64}); });
    });
    EXPECT_HAS(m, "adapter_model.safetensors");
    EXPECT_HAS(m, "unexpected tensor '" + extra + "'");
  }
  // A module that exists but is not in target_modules.
  const std::string m = ErrorAfter([](const std::string& dir) {
    EditTensors(dir, [](auto& t) {
      t[PeftTensorName(0, LoraTarget::kK, true)] = at::zeros({4, 64});
    });
  });
  EXPECT_HAS(m, "layers.0.self_attn.k_proj.lora_A.weight' is for module k_proj, which is not in");
}

TEST(PeftIoTest, RejectsTruncatedSafetensors) {
  const std::string m = ErrorAfter([](const std::string& dir) {
    const std::string path = dir + "/adapter_model.safetensors";
    std::filesystem::resize_file(path, std::filesystem::file_size(path) - 5);
  });
  EXPECT_HAS(m, "adapter_model.safetensors");
  const std::string m2 = ErrorAfter([](const std::string& dir) {
    std::filesystem::resize_file(dir + "/adapter_model.safetensors", 6);
  });
  EXPECT_HAS(m2, "adapter_model.safetensors");
}

// --- In-memory blobs (what federation sends over the network) -----------------------------------

TEST(PeftBlobTest, SameBytesAsTheFilesAndBitIdenticalRoundTrip) {
  const runtime::ModelConfig model = runtime::TinyLlamaConfig();
  const LoraAdapter adapter = RandomAdapter(model, kAllTargets, 4, 8, true, 11);
  auto blob = SerializePeftAdapter(adapter);
  ASSERT_TRUE(blob.ok()) << blob.status();
  const std::string dir = MakeTempDir("collm-peft");
  ASSERT_TRUE(WritePeftAdapter(dir, adapter).ok());
  EXPECT_EQ(blob->safetensors, ReadFileOrDie(dir + "/adapter_model.safetensors"));
  EXPECT_EQ(blob->config_json, ReadFileOrDie(dir + "/adapter_config.json"));

  auto back = ParsePeftAdapter(*blob, model, "update from dev-1");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->config.rank, 4);
  EXPECT_TRUE(back->config.use_rslora);
  EXPECT_EQ(back->config.targets, kAllTargets);
  EXPECT_DOUBLE_EQ(back->factors.scale, adapter.factors.scale);
  for (int64_t l = 0; l < model.num_hidden_layers; ++l) {
    for (int t = 0; t < runtime::kNumLoraTargets; ++t) {
      EXPECT_TRUE(back->factors.layers[l][t].a.equal(adapter.factors.layers[l][t].a));
      EXPECT_TRUE(back->factors.layers[l][t].b.equal(adapter.factors.layers[l][t].b));
    }
  }
  // Serializing what was parsed gives the same bytes again.
  EXPECT_EQ(SerializePeftAdapter(*back)->safetensors, blob->safetensors);
  // And the files read back equal the blob parsed.
  auto from_files = ReadPeftAdapter(dir, model);
  ASSERT_TRUE(from_files.ok());
  EXPECT_TRUE(from_files->factors.layers[1][6].b.equal(back->factors.layers[1][6].b));
}

// Serializes a valid q/v adapter for the tiny model, lets `corrupt` damage the blob, and returns
// ParsePeftAdapter's error message.
template <typename F>
std::string BlobErrorAfter(F corrupt,
                           const runtime::ModelConfig& model = runtime::TinyLlamaConfig()) {
  PeftBlob blob = SerializePeftAdapter(
                      RandomAdapter(runtime::TinyLlamaConfig(), {LoraTarget::kQ, LoraTarget::kV}))
                      .value();
  corrupt(blob);
  auto parsed = ParsePeftAdapter(blob, model, "update from dev-7");
  EXPECT_FALSE(parsed.ok());
  return parsed.ok() ? "" : std::string(parsed.status().message());
}

TEST(PeftBlobTest, RejectsTruncatedBlobs) {
  std::string m =
      BlobErrorAfter([](PeftBlob& b) { b.safetensors.resize(b.safetensors.size() - 5); });
  EXPECT_HAS(m, "update from dev-7");
  EXPECT_HAS(m, "adapter_model.safetensors");
  EXPECT_HAS(m, "truncated");
  m = BlobErrorAfter([](PeftBlob& b) { b.safetensors.resize(5); });
  EXPECT_HAS(m, "update from dev-7");
  EXPECT_HAS(m, "too short");
  m = BlobErrorAfter([](PeftBlob& b) { b.safetensors.clear(); });
  EXPECT_HAS(m, "update from dev-7");
  m = BlobErrorAfter([](PeftBlob& b) { b.config_json.resize(b.config_json.size() / 2); });
  EXPECT_HAS(m, "update from dev-7");
  EXPECT_HAS(m, "adapter_config.json");
}

TEST(PeftBlobTest, RejectsALyingHeader) {
  // The header claims a larger shape than its data_offsets span.
  std::string m = BlobErrorAfter([](PeftBlob& b) {
    const std::string from = "\"shape\":[4,64]";
    const size_t at = b.safetensors.find(from);
    ASSERT_NE(at, std::string::npos);
    b.safetensors.replace(at, from.size(), "\"shape\":[4,65]");
  });
  EXPECT_HAS(m, "update from dev-7");
  EXPECT_HAS(m, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
  EXPECT_HAS(m, "data_offsets");
  // A header length prefix pointing past the end of the blob.
  m = BlobErrorAfter([](PeftBlob& b) { b.safetensors[3] = '\x7f'; });
  EXPECT_HAS(m, "header length");
}

TEST(PeftBlobTest, RejectsNaNNamingTheTensor) {
  const runtime::ModelConfig model = runtime::TinyLlamaConfig();
  LoraAdapter adapter = RandomAdapter(model, {LoraTarget::kQ, LoraTarget::kV});
  adapter.factors.layers[1][static_cast<int>(LoraTarget::kV)].b[3][2] = NAN;
  auto blob = SerializePeftAdapter(adapter);
  ASSERT_TRUE(blob.ok());  // The transport carries what it is given; the reader refuses it.
  auto parsed = ParsePeftAdapter(*blob, model, "update from dev-3");
  ASSERT_FALSE(parsed.ok());
  const std::string m(parsed.status().message());
  EXPECT_HAS(m, "update from dev-3");
  EXPECT_HAS(m, "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight");
  EXPECT_HAS(m, "NaN");
}

TEST(PeftBlobTest, RejectsWrongShapeForTheBaseModel) {
  runtime::ModelConfig other = runtime::TinyLlamaConfig();
  other.hidden_size = 128;  // q_proj is now [64, 128]: the blob's [4, 64] A no longer fits.
  const std::string m = BlobErrorAfter([](PeftBlob&) {}, other);
  EXPECT_HAS(m, "update from dev-7");
  EXPECT_HAS(m, "self_attn.q_proj.lora_A.weight");
  EXPECT_HAS(m, "expected [4, 128]");
}

// --- Cross-checks against tests/reference/peft_reference.py -------------------------------------

std::string Python() {
  return std::string("/usr/bin/python3 ") + COLLM_SOURCE_DIR + "/tests/reference/peft_reference.py";
}

// The Python reference's logits of `model_dir` with `adapter_dir` merged in, [T, V] float64.
at::Tensor ReferenceLogits(const std::string& model_dir, const std::string& adapter_dir,
                           const std::vector<int32_t>& tokens) {
  auto r = collm::testing::RunCommand(Python() + " logits --model '" + model_dir + "' --adapter '" +
                                      adapter_dir + "' --tokens " + absl::StrJoin(tokens, ","));
  auto j = nlohmann::json::parse(r.out, nullptr, false);
  if (r.exit_code != 0 || j.is_discarded() || !j.contains("logits")) {
    ADD_FAILURE() << "reference failed (needs Debian's python3-torch and python3-numpy): "
                  << r.err.substr(0, 2000) << r.out.substr(0, 500);
    return {};
  }
  auto rows = j["logits"].get<std::vector<std::vector<double>>>();
  at::Tensor t = at::empty(
      {static_cast<int64_t>(rows.size()), static_cast<int64_t>(rows[0].size())}, at::kDouble);
  for (size_t i = 0; i < rows.size(); ++i) {
    std::memcpy(t[i].data_ptr<double>(), rows[i].data(), rows[i].size() * sizeof(double));
  }
  return t;
}

// Our unmerged logits of `model` with the adapter read from `adapter_dir` (null: none).
at::Tensor OurLogits(const runtime::LlamaModel& model, const LoraAdapter* adapter,
                     const std::vector<int32_t>& tokens) {
  runtime::LoraWeights weights;
  if (adapter != nullptr) weights = adapter->ToWeights(model.config(), model.runtime()).value();
  auto cache = runtime::KvCache::Create(model.config(), {16, 64, 0}, model.runtime()).value();
  runtime::SequenceKv kv;
  EXPECT_TRUE(cache->Reserve(kv, tokens.size()).ok());
  const int64_t n = static_cast<int64_t>(tokens.size());
  return model.Forward({tokens, {{&kv, n, true, adapter ? &weights : nullptr}}}, *cache)
      .value()
      .to(at::kDouble);
}

// Reads `adapter_dir` with collm, runs it unmerged and compares with the Python merged reference.
void ExpectMatchesReference(const std::string& model_dir, const std::string& adapter_dir,
                            const std::vector<int32_t>& tokens, double tol) {
  auto model = runtime::LlamaModel::Load(model_dir, runtime::RuntimeOptions{}).value();
  auto adapter = ReadPeftAdapter(adapter_dir, model->config());
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  at::Tensor ref = ReferenceLogits(model_dir, adapter_dir, tokens);
  ASSERT_TRUE(ref.defined());
  at::Tensor ours = OurLogits(*model, &*adapter, tokens);
  ASSERT_EQ(ours.sizes(), ref.sizes());
  const double diff = (ours - ref).abs().max().item<double>();
  EXPECT_LT(diff, tol) << "max |logit diff| " << diff;
  // The adapter really moves the logits, so the match is not the base model's.
  const double moved = (OurLogits(*model, nullptr, tokens) - ref).abs().max().item<double>();
  EXPECT_GT(moved, 100 * tol) << "adapter barely changes the logits";
}

// Has the Python reference write an adapter the way HF PEFT saves one.
void PythonWriteAdapter(const std::string& model_dir, const std::string& out,
                        const std::string& args) {
  auto r = collm::testing::RunCommand(Python() + " write --model '" + model_dir + "' --out '" +
                                      out + "' " + args);
  ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
}

std::vector<int32_t> Tokens(int n) {
  std::vector<int32_t> tokens;
  for (int i = 0; i < n; ++i) tokens.push_back((i * 37 + 11) % 512);
  return tokens;
}

TEST(PeftReferenceTest, OurAdapterMatchesMergedPythonReference) {
  const std::string model_dir = collm::testing::TinyModelDir();
  const runtime::ModelConfig model = runtime::TinyLlamaConfig();
  for (bool rslora : {false, true}) {
    const std::string dir = MakeTempDir("collm-peft");
    ASSERT_TRUE(WritePeftAdapter(dir, RandomAdapter(model, kAllTargets, 4, 8, rslora, 3)).ok());
    ExpectMatchesReference(model_dir, dir, Tokens(40), 1e-4);
  }
  const std::string dir = MakeTempDir("collm-peft");
  ASSERT_TRUE(WritePeftAdapter(
                  dir, RandomAdapter(model, {LoraTarget::kV, LoraTarget::kDown}, 3, 5, false, 4))
                  .ok());
  ExpectMatchesReference(model_dir, dir, Tokens(25), 1e-4);
}

TEST(PeftReferenceTest, ReadsAdapterWrittenLikeHfPeft) {
  const std::string model_dir = collm::testing::TinyModelDir();
  const std::string dir = MakeTempDir("collm-peft");
  PythonWriteAdapter(model_dir, dir, "--r 4 --alpha 16 --targets q_proj,v_proj --seed 5");
  auto adapter = ReadPeftAdapter(dir, runtime::TinyLlamaConfig());
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  EXPECT_EQ(adapter->config.rank, 4);
  EXPECT_DOUBLE_EQ(adapter->factors.scale, 4.0);
  EXPECT_EQ(adapter->config.targets, (std::vector<LoraTarget>{LoraTarget::kQ, LoraTarget::kV}));
  ExpectMatchesReference(model_dir, dir, Tokens(40), 1e-4);
}

TEST(PeftReferenceTest, ReadsHalfPrecisionAndRsLoraAdapters) {
  const std::string model_dir = collm::testing::TinyModelDir();
  for (const char* dtype : {"F16", "BF16"}) {
    const std::string dir = MakeTempDir("collm-peft");
    PythonWriteAdapter(model_dir, dir,
                       std::string("--r 8 --alpha 16 --rslora --seed 6 --dtype ") + dtype +
                           " --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj");
    auto file = runtime::SafetensorsFile::Open(dir + "/adapter_model.safetensors").value();
    EXPECT_EQ(runtime::StoredDTypeName(file->Get(PeftTensorName(0, LoraTarget::kQ, true))->dtype),
              std::string(dtype));
    ExpectMatchesReference(model_dir, dir, Tokens(30), 1e-4);
  }
}

TEST(PeftReferenceTest, Stories260KBothDirections) {
  COLLM_REQUIRE_MODEL_FILE(model_dir, "stories260K-hf");
  auto tok = runtime::Tokenizer::Load(model_dir + "/tokenizer.model").value();
  const std::vector<int32_t> tokens =
      tok->Encode("Once upon a time there was a little dog named Max. He liked to run", true);
  const auto model = runtime::ModelConfig::FromFile(model_dir + "/config.json").value();
  // Ours -> Python.
  const std::string ours = MakeTempDir("collm-peft");
  ASSERT_TRUE(WritePeftAdapter(ours, RandomAdapter(model, kAllTargets, 8, 16, false, 9)).ok());
  ExpectMatchesReference(model_dir, ours, tokens, 1e-3);
  // HF-style -> ours.
  const std::string theirs = MakeTempDir("collm-peft");
  PythonWriteAdapter(model_dir, theirs,
                     "--r 8 --alpha 32 --targets q_proj,v_proj,down_proj --seed 10");
  ExpectMatchesReference(model_dir, theirs, tokens, 1e-3);
}

}  // namespace
}  // namespace collm::lora
