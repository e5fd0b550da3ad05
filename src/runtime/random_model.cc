#include "collm/runtime/random_model.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "collm/common/status.h"
#include "collm/runtime/tokenizer.h"

namespace collm::runtime {
namespace {

// Box-Muller on raw mt19937_64 bits: std::normal_distribution differs between standard libraries,
// and the same seed must give the same file everywhere.
class NormalSource {
 public:
  explicit NormalSource(uint64_t seed) : rng_(seed) {}
  float Next() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double u1 = ((rng_() >> 11) + 1) * 0x1.0p-53;  // (0, 1]: log(u1) is finite.
    double u2 = (rng_() >> 11) * 0x1.0p-53;
    double r = std::sqrt(-2.0 * std::log(u1));
    spare_ = static_cast<float>(r * std::sin(2 * M_PI * u2));
    has_spare_ = true;
    return static_cast<float>(r * std::cos(2 * M_PI * u2));
  }

 private:
  std::mt19937_64 rng_;
  bool has_spare_ = false;
  float spare_ = 0;
};

struct OwnedTensor {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

OwnedTensor MakeTensor(std::string name, std::vector<int64_t> shape, StoredDType dtype,
                       NormalSource& normal, float mean, float std) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  OwnedTensor t{std::move(name), std::move(shape), {}};
  t.bytes.resize(static_cast<size_t>(numel) * StoredDTypeSize(dtype));
  for (int64_t i = 0; i < numel; ++i) {
    float v = mean + std * normal.Next();
    switch (dtype) {
      case StoredDType::kF32:
        std::memcpy(t.bytes.data() + 4 * i, &v, 4);
        break;
      case StoredDType::kF16: {
        uint16_t h = FloatToHalf(v);
        std::memcpy(t.bytes.data() + 2 * i, &h, 2);
        break;
      }
      case StoredDType::kBF16: {
        uint16_t h = FloatToBFloat16(v);
        std::memcpy(t.bytes.data() + 2 * i, &h, 2);
        break;
      }
    }
  }
  return t;
}

}  // namespace

ModelConfig TinyLlamaConfig() {
  ModelConfig c;
  c.model_type = "llama";
  c.hidden_size = 64;
  c.intermediate_size = 176;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.vocab_size = 512;
  c.max_position_embeddings = 256;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  c.tie_word_embeddings = true;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  c.torch_dtype = "float32";
  return c;
}

absl::Status WriteRandomModel(const std::string& dir, const RandomModelOptions& options) {
  const ModelConfig& c = options.config;
  COLLM_RETURN_IF_ERROR(c.Validate());
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", dir, ": ", ec.message()));

  NormalSource normal(options.seed);
  const StoredDType dt = options.dtype;
  const float s = options.init_std;
  std::vector<OwnedTensor> tensors;
  tensors.push_back(
      MakeTensor("model.embed_tokens.weight", {c.vocab_size, c.hidden_size}, dt, normal, 0, s));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    tensors.push_back(
        MakeTensor(p + "input_layernorm.weight", {c.hidden_size}, dt, normal, 1, 0.1f));
    tensors.push_back(
        MakeTensor(p + "self_attn.q_proj.weight", {c.q_size(), c.hidden_size}, dt, normal, 0, s));
    tensors.push_back(
        MakeTensor(p + "self_attn.k_proj.weight", {c.kv_size(), c.hidden_size}, dt, normal, 0, s));
    tensors.push_back(
        MakeTensor(p + "self_attn.v_proj.weight", {c.kv_size(), c.hidden_size}, dt, normal, 0, s));
    if (c.qkv_bias) {
      tensors.push_back(MakeTensor(p + "self_attn.q_proj.bias", {c.q_size()}, dt, normal, 0, s));
      tensors.push_back(MakeTensor(p + "self_attn.k_proj.bias", {c.kv_size()}, dt, normal, 0, s));
      tensors.push_back(MakeTensor(p + "self_attn.v_proj.bias", {c.kv_size()}, dt, normal, 0, s));
    }
    tensors.push_back(
        MakeTensor(p + "self_attn.o_proj.weight", {c.hidden_size, c.q_size()}, dt, normal, 0, s));
    if (c.o_bias) {
      tensors.push_back(MakeTensor(p + "self_attn.o_proj.bias", {c.hidden_size}, dt, normal, 0, s));
    }
    tensors.push_back(
        MakeTensor(p + "post_attention_layernorm.weight", {c.hidden_size}, dt, normal, 1, 0.1f));
    tensors.push_back(MakeTensor(p + "mlp.gate_proj.weight", {c.intermediate_size, c.hidden_size},
                                 dt, normal, 0, s));
    tensors.push_back(MakeTensor(p + "mlp.up_proj.weight", {c.intermediate_size, c.hidden_size}, dt,
                                 normal, 0, s));
    tensors.push_back(MakeTensor(p + "mlp.down_proj.weight", {c.hidden_size, c.intermediate_size},
                                 dt, normal, 0, s));
  }
  tensors.push_back(MakeTensor("model.norm.weight", {c.hidden_size}, dt, normal, 1, 0.1f));
  if (!c.tie_word_embeddings) {
    tensors.push_back(
        MakeTensor("lm_head.weight", {c.vocab_size, c.hidden_size}, dt, normal, 0, s));
  } else if (options.write_untied_lm_head) {
    OwnedTensor head = tensors.front();
    head.name = "lm_head.weight";
    tensors.push_back(std::move(head));
  }

  std::vector<TensorToWrite> to_write;
  to_write.reserve(tensors.size());
  for (const auto& t : tensors) to_write.push_back({t.name, dt, t.shape, t.bytes.data()});
  COLLM_RETURN_IF_ERROR(WriteSafetensors(dir + "/model.safetensors", to_write,
                                         {{"format", "pt"}, {"collm", "random"}}));

  ModelConfig stored = c;
  stored.torch_dtype = dt == StoredDType::kF32   ? "float32"
                       : dt == StoredDType::kF16 ? "float16"
                                                 : "bfloat16";
  {
    std::ofstream out(dir + "/config.json", std::ios::trunc);
    out << stored.ToJson() << "\n";
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", dir, "/config.json"));
  }
  if (options.write_tokenizer) {
    COLLM_RETURN_IF_ERROR(
        TrainTinyTokenizer(dir + "/tokenizer.model", static_cast<int>(c.vocab_size)));
  }
  return absl::OkStatus();
}

}  // namespace collm::runtime
