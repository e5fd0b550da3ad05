#include "collm/runtime/model_config.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "collm/common/status.h"

namespace collm::runtime {
namespace {

using nlohmann::json;

absl::Status Invalid(absl::string_view key, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("config.json: ", key, " ", what));
}

// Reads an optional integer field; a present field of the wrong type is an error (a float where
// an int is expected usually means a corrupted or foreign file).
absl::Status ReadInt(const json& j, const char* key, bool required, int64_t* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required) return Invalid(key, "is required");
    return absl::OkStatus();
  }
  if (!it->is_number_integer())
    return Invalid(key, absl::StrCat("must be an integer, got ", it->dump()));
  *out = it->get<int64_t>();
  return absl::OkStatus();
}

absl::Status ReadDouble(const json& j, const char* key, double* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_number()) return Invalid(key, absl::StrCat("must be a number, got ", it->dump()));
  *out = it->get<double>();
  return absl::OkStatus();
}

absl::Status ReadBool(const json& j, const char* key, bool* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_boolean())
    return Invalid(key, absl::StrCat("must be true or false, got ", it->dump()));
  *out = it->get<bool>();
  return absl::OkStatus();
}

absl::Status ReadString(const json& j, const char* key, std::string* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_string()) return Invalid(key, absl::StrCat("must be a string, got ", it->dump()));
  *out = it->get<std::string>();
  return absl::OkStatus();
}

absl::Status ParseRopeScaling(const json& j, RopeScaling* out) {
  if (j.is_null()) return absl::OkStatus();
  if (!j.is_object()) return Invalid("rope_scaling", "must be an object or null");
  std::string type;
  COLLM_RETURN_IF_ERROR(ReadString(j, "rope_type", &type));
  if (type.empty()) COLLM_RETURN_IF_ERROR(ReadString(j, "type", &type));
  if (type.empty() || type == "default") return absl::OkStatus();
  if (type != "linear" && type != "llama3") {
    return Invalid("rope_scaling.rope_type",
                   absl::StrCat("'", type, "' is not supported (supported: linear, llama3)"));
  }
  out->type = type;
  COLLM_RETURN_IF_ERROR(ReadDouble(j, "factor", &out->factor));
  if (!(out->factor >= 1.0)) return Invalid("rope_scaling.factor", "must be >= 1");
  if (type == "llama3") {
    COLLM_RETURN_IF_ERROR(ReadDouble(j, "low_freq_factor", &out->low_freq_factor));
    COLLM_RETURN_IF_ERROR(ReadDouble(j, "high_freq_factor", &out->high_freq_factor));
    COLLM_RETURN_IF_ERROR(ReadInt(j, "original_max_position_embeddings", false,
                                  &out->original_max_position_embeddings));
    if (!(out->high_freq_factor > out->low_freq_factor) || out->low_freq_factor <= 0) {
      return Invalid("rope_scaling", "needs 0 < low_freq_factor < high_freq_factor");
    }
    if (out->original_max_position_embeddings <= 0) {
      return Invalid("rope_scaling.original_max_position_embeddings", "must be > 0");
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> ModelConfig::FromJson(absl::string_view json_text) {
  json j = json::parse(json_text.begin(), json_text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError("config.json: not valid JSON");
  if (!j.is_object()) return absl::InvalidArgumentError("config.json: top level must be an object");

  ModelConfig c;
  c.model_type.clear();
  COLLM_RETURN_IF_ERROR(ReadString(j, "model_type", &c.model_type));
  if (c.model_type.empty()) {
    // Older exports only name the architecture.
    auto arch = j.find("architectures");
    if (arch != j.end() && arch->is_array() && !arch->empty() && (*arch)[0].is_string()) {
      const std::string a = (*arch)[0].get<std::string>();
      if (a == "LlamaForCausalLM") c.model_type = "llama";
      if (a == "MistralForCausalLM") c.model_type = "mistral";
      if (a == "Qwen2ForCausalLM") c.model_type = "qwen2";
    }
  }
  if (c.model_type != "llama" && c.model_type != "mistral" && c.model_type != "qwen2") {
    return Invalid(
        "model_type",
        absl::StrCat("'", c.model_type, "' is not supported (supported: llama, mistral, qwen2)"));
  }
  if (j.contains("num_local_experts") || j.contains("num_experts")) {
    return Invalid("num_local_experts", "mixture-of-experts models are not supported");
  }

  COLLM_RETURN_IF_ERROR(ReadInt(j, "hidden_size", true, &c.hidden_size));
  COLLM_RETURN_IF_ERROR(ReadInt(j, "intermediate_size", true, &c.intermediate_size));
  COLLM_RETURN_IF_ERROR(ReadInt(j, "num_hidden_layers", true, &c.num_hidden_layers));
  COLLM_RETURN_IF_ERROR(ReadInt(j, "num_attention_heads", true, &c.num_attention_heads));
  c.num_key_value_heads = c.num_attention_heads;
  COLLM_RETURN_IF_ERROR(ReadInt(j, "num_key_value_heads", false, &c.num_key_value_heads));
  COLLM_RETURN_IF_ERROR(ReadInt(j, "vocab_size", true, &c.vocab_size));
  COLLM_RETURN_IF_ERROR(ReadInt(j, "max_position_embeddings", false, &c.max_position_embeddings));
  c.head_dim = 0;
  COLLM_RETURN_IF_ERROR(ReadInt(j, "head_dim", false, &c.head_dim));
  if (c.head_dim == 0 && c.num_attention_heads > 0) {
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  COLLM_RETURN_IF_ERROR(ReadDouble(j, "rms_norm_eps", &c.rms_norm_eps));
  COLLM_RETURN_IF_ERROR(ReadDouble(j, "rope_theta", &c.rope_theta));
  if (auto it = j.find("rope_scaling"); it != j.end()) {
    COLLM_RETURN_IF_ERROR(ParseRopeScaling(*it, &c.rope_scaling));
  }
  COLLM_RETURN_IF_ERROR(ReadBool(j, "tie_word_embeddings", &c.tie_word_embeddings));

  std::string act = "silu";
  COLLM_RETURN_IF_ERROR(ReadString(j, "hidden_act", &act));
  if (act != "silu")
    return Invalid("hidden_act", absl::StrCat("'", act, "' is not supported (silu)"));

  bool attention_bias = false;
  COLLM_RETURN_IF_ERROR(ReadBool(j, "attention_bias", &attention_bias));
  c.qkv_bias = attention_bias || c.model_type == "qwen2";  // Qwen2 always has q/k/v bias.
  c.o_bias = attention_bias && c.model_type != "qwen2";
  bool mlp_bias = false;
  COLLM_RETURN_IF_ERROR(ReadBool(j, "mlp_bias", &mlp_bias));
  if (mlp_bias) return Invalid("mlp_bias", "true is not supported");

  // Full attention equals sliding-window attention while the context fits in the window, so
  // cap the context instead of implementing the window.
  bool use_sliding_window = c.model_type == "mistral";
  COLLM_RETURN_IF_ERROR(ReadBool(j, "use_sliding_window", &use_sliding_window));
  int64_t sliding_window = 0;
  COLLM_RETURN_IF_ERROR(ReadInt(j, "sliding_window", false, &sliding_window));
  if (use_sliding_window && sliding_window > 0 && sliding_window < c.max_position_embeddings) {
    c.max_position_embeddings = sliding_window;
  }

  int64_t bos = c.bos_token_id;
  COLLM_RETURN_IF_ERROR(ReadInt(j, "bos_token_id", false, &bos));
  c.bos_token_id = static_cast<int32_t>(bos);
  if (auto it = j.find("eos_token_id"); it != j.end() && !it->is_null()) {
    c.eos_token_ids.clear();
    if (it->is_number_integer()) {
      c.eos_token_ids.push_back(it->get<int32_t>());
    } else if (it->is_array()) {
      for (const auto& e : *it) {
        if (!e.is_number_integer()) return Invalid("eos_token_id", "must hold integers");
        c.eos_token_ids.push_back(e.get<int32_t>());
      }
    } else {
      return Invalid("eos_token_id", "must be an integer or a list of integers");
    }
  }
  COLLM_RETURN_IF_ERROR(ReadString(j, "torch_dtype", &c.torch_dtype));
  COLLM_RETURN_IF_ERROR(c.Validate());
  return c;
}

absl::StatusOr<ModelConfig> ModelConfig::FromFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open model config ", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  auto config = FromJson(ss.str());
  if (!config.ok()) return Annotate(config.status(), path);
  return config;
}

absl::Status ModelConfig::Validate() const {
  auto positive = [](const char* key, int64_t v) -> absl::Status {
    if (v <= 0) return Invalid(key, absl::StrCat("must be > 0, got ", v));
    return absl::OkStatus();
  };
  COLLM_RETURN_IF_ERROR(positive("hidden_size", hidden_size));
  COLLM_RETURN_IF_ERROR(positive("intermediate_size", intermediate_size));
  COLLM_RETURN_IF_ERROR(positive("num_hidden_layers", num_hidden_layers));
  COLLM_RETURN_IF_ERROR(positive("num_attention_heads", num_attention_heads));
  COLLM_RETURN_IF_ERROR(positive("num_key_value_heads", num_key_value_heads));
  COLLM_RETURN_IF_ERROR(positive("head_dim", head_dim));
  COLLM_RETURN_IF_ERROR(positive("vocab_size", vocab_size));
  COLLM_RETURN_IF_ERROR(positive("max_position_embeddings", max_position_embeddings));
  if (num_attention_heads % num_key_value_heads != 0) {
    return Invalid("num_key_value_heads",
                   absl::StrCat("(", num_key_value_heads, ") must divide num_attention_heads (",
                                num_attention_heads, ")"));
  }
  if (head_dim % 2 != 0)
    return Invalid("head_dim", absl::StrCat("must be even for RoPE, got ", head_dim));
  if (!(rms_norm_eps > 0)) return Invalid("rms_norm_eps", "must be > 0");
  if (!(rope_theta > 0)) return Invalid("rope_theta", "must be > 0");
  // Guard against absurd sizes from a hostile file before anything allocates from them.
  constexpr int64_t kMaxDim = int64_t{1} << 20;
  if (hidden_size > kMaxDim || intermediate_size > kMaxDim || vocab_size > kMaxDim * 4 ||
      num_hidden_layers > 4096 || num_attention_heads > 4096 || head_dim > 4096 ||
      max_position_embeddings > (int64_t{1} << 24)) {
    return Invalid("sizes", "are implausibly large");
  }
  if (bos_token_id < 0 || bos_token_id >= vocab_size) {
    return Invalid("bos_token_id", absl::StrCat("must be in [0, vocab_size), got ", bos_token_id));
  }
  for (int32_t e : eos_token_ids) {
    if (e < 0 || e >= vocab_size) {
      return Invalid("eos_token_id", absl::StrCat("must be in [0, vocab_size), got ", e));
    }
  }
  return absl::OkStatus();
}

std::string ModelConfig::ToJson() const {
  json j;
  j["architectures"] = {model_type == "qwen2"     ? "Qwen2ForCausalLM"
                        : model_type == "mistral" ? "MistralForCausalLM"
                                                  : "LlamaForCausalLM"};
  j["model_type"] = model_type;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_key_value_heads;
  j["head_dim"] = head_dim;
  j["vocab_size"] = vocab_size;
  j["max_position_embeddings"] = max_position_embeddings;
  j["rms_norm_eps"] = rms_norm_eps;
  j["rope_theta"] = rope_theta;
  if (rope_scaling.type.empty()) {
    j["rope_scaling"] = nullptr;
  } else {
    json rs = {{"rope_type", rope_scaling.type}, {"factor", rope_scaling.factor}};
    if (rope_scaling.type == "llama3") {
      rs["low_freq_factor"] = rope_scaling.low_freq_factor;
      rs["high_freq_factor"] = rope_scaling.high_freq_factor;
      rs["original_max_position_embeddings"] = rope_scaling.original_max_position_embeddings;
    }
    j["rope_scaling"] = rs;
  }
  j["hidden_act"] = "silu";
  j["tie_word_embeddings"] = tie_word_embeddings;
  if (model_type != "qwen2") j["attention_bias"] = qkv_bias;
  j["mlp_bias"] = false;
  j["bos_token_id"] = bos_token_id;
  if (eos_token_ids.size() == 1) {
    j["eos_token_id"] = eos_token_ids[0];
  } else {
    j["eos_token_id"] = eos_token_ids;
  }
  j["torch_dtype"] = torch_dtype;
  return j.dump(2);
}

}  // namespace collm::runtime
