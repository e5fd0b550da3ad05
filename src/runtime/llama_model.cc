#include "collm/runtime/llama_model.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "collm/common/status.h"
#include "collm/runtime/safetensors.h"
#include "collm/runtime/small_gemm.h"

namespace collm::runtime {

// Per-step bookkeeping shared by both implementations.
// Token rows that share one adapter. Rows are contiguous when the sequences using the adapter
// are adjacent in the batch, which lets the delta GEMMs work on views instead of gathers.
struct LlamaModel::AdapterGroup {
  const LoraWeights* adapter = nullptr;
  std::vector<int64_t> rows;
  bool contiguous = true;
  at::Tensor index;  // rows as an int64 tensor, for the non-contiguous case.
};

struct LlamaModel::StepPlan {
  std::vector<AdapterGroup> adapters;
  int64_t num_tokens = 0;
  std::vector<int64_t> positions;   // [T] absolute position of each new token.
  std::vector<int32_t> seq_of;      // [T] index into batch.sequences.
  std::vector<int64_t> logit_rows;  // Token indices whose logits are returned, in order.
};

namespace {

std::string ShapeString(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

inline float Dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// out = x / rms(x) * w, as HF LlamaRMSNorm (statistics in f32).
inline void RmsNormRow(const float* x, const float* w, float* out, int64_t n, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * inv * w[i];
}

void RmsNormRows(const at::Tensor& x, const at::Tensor& w, at::Tensor& out, float eps) {
  const int64_t rows = x.size(0), n = x.size(1);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) RmsNormRow(xp + r * n, wp, op + r * n, n, eps);
  });
}

// The one place the fused CPU path picks its GEMM: few rows of contiguous f32 activations go to
// the weight-streaming SmallGemm (see small_gemm.h; it beats OpenBLAS's gemv and small-m sgemm),
// everything else to libtorch (for quantized weights: block rows dequantized into an f32 scratch
// for sgemm). Returns false when libtorch should run.
// Quantized weights have no libtorch kernel at small m, so SetSmallGemmMaxRows(0) (the f32
// baseline switch) does not apply to them.
int64_t SmallGemmRowsFor(const WeightMatrix& w) {
  return w.quantized() ? kSmallGemmDefaultMaxRows : SmallGemmMaxRows();
}

bool RunSmallGemm(const at::Tensor& x, const WeightMatrix& w, const at::Tensor& b, at::Tensor& y,
                  bool accumulate) {
  const int64_t m = x.size(0);
  const int64_t max_rows = SmallGemmRowsFor(w);
  const bool weights_ok =
      w.quantized() || (w.dense().scalar_type() == at::kFloat && w.dense().is_contiguous());
  if (m > max_rows || !weights_ok || x.scalar_type() != at::kFloat || !x.device().is_cpu() ||
      x.stride(1) != 1 || (b.defined() && (b.scalar_type() != at::kFloat || !b.is_contiguous())) ||
      y.stride(1) != 1) {
    return false;
  }
  SmallGemmArgs args;
  args.m = m;
  w.SetGemmWeights(args);
  args.x = x.data_ptr<float>();
  args.ldx = x.stride(0);
  args.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  args.y = y.data_ptr<float>();
  args.ldy = y.stride(0);
  args.accumulate = accumulate;
  SmallGemm(args);
  return true;
}

// y = x W^T (+ b). A single f32 row goes through GEMV, which streams the weights much faster than
// a one-row GEMM in OpenBLAS.
at::Tensor Linear(const at::Tensor& x, const WeightMatrix& w, const at::Tensor& b) {
  if (x.size(0) <= SmallGemmRowsFor(w)) {
    at::Tensor y = at::empty({x.size(0), w.rows()}, x.options());
    if (RunSmallGemm(x, w, b, y, /*accumulate=*/false)) return y;
  }
  if (w.quantized()) {
    at::Tensor y = DequantizedMatmul(x, w.quantized_matrix());
    return b.defined() ? y.add_(b) : y;
  }
  const at::Tensor& wd = w.dense();
  if (x.size(0) == 1) {
    at::Tensor y;
    if (b.defined()) {
      y = b.clone();
      y.addmv_(wd, x.select(0, 0));
    } else {
      y = at::mv(wd, x.select(0, 0));
    }
    return y.unsqueeze(0);
  }
  return b.defined() ? at::addmm(b, x, wd.t()) : at::mm(x, wd.t());
}

// x += a W^T, with the residual add folded into the GEMM (beta = 1).
void AddLinear(at::Tensor& x, const at::Tensor& a, const WeightMatrix& w) {
  if (RunSmallGemm(a, w, at::Tensor(), x, /*accumulate=*/true)) return;
  if (w.quantized()) {
    x.add_(DequantizedMatmul(a, w.quantized_matrix()));
  } else if (x.size(0) == 1) {
    at::Tensor row = x.select(0, 0);
    row.addmv_(w.dense(), a.select(0, 0));
  } else {
    x.addmm_(a, w.dense().t());
  }
}

// out[rows] += (in[rows] A^T) B^T for each adapter group that adapts this projection.
template <typename Group, typename Select>
void AddLoraDeltas(at::Tensor& out, const at::Tensor& in, const std::vector<Group>& groups,
                   Select select) {
  for (const Group& g : groups) {
    const LoraProjection& p = select(*g.adapter);
    if (!p.defined()) continue;
    if (g.contiguous) {
      const int64_t begin = g.rows.front(), n = static_cast<int64_t>(g.rows.size());
      at::Tensor x = in.narrow(0, begin, n);
      at::Tensor y = out.narrow(0, begin, n);
      if (n == 1) {
        at::Tensor row = y.select(0, 0);
        row.addmv_(p.b, at::mv(p.a, x.select(0, 0)));
      } else {
        y.addmm_(at::mm(x, p.a.t()), p.b.t());
      }
    } else {
      at::Tensor delta = at::mm(at::mm(in.index_select(0, g.index), p.a.t()), p.b.t());
      out.index_add_(0, g.index, delta);
    }
  }
}

at::Tensor LoraDelta(const at::Tensor& x, const LoraProjection& p, double dropout, bool training) {
  at::Tensor in = (training && dropout > 0) ? at::dropout(x, dropout, /*train=*/true) : x;
  return at::linear(at::linear(in, p.a), p.b);
}

at::Tensor RmsNormReference(const at::Tensor& x, const at::Tensor& w, double eps) {
  at::Tensor xf = x.to(at::kFloat);
  at::Tensor normed = xf * at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return w * normed.to(x.scalar_type());
}

at::Tensor RotateHalf(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

std::vector<float> ComputeInvFreq(const ModelConfig& c) {
  const int64_t half = c.head_dim / 2;
  std::vector<float> inv(half);
  for (int64_t i = 0; i < half; ++i) {
    double f = 1.0 / std::pow(c.rope_theta, static_cast<double>(2 * i) / c.head_dim);
    const RopeScaling& rs = c.rope_scaling;
    if (rs.type == "linear") {
      f /= rs.factor;
    } else if (rs.type == "llama3") {
      // Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, smooth in between.
      const double old_ctx = static_cast<double>(rs.original_max_position_embeddings);
      const double low_wavelen = old_ctx / rs.low_freq_factor;
      const double high_wavelen = old_ctx / rs.high_freq_factor;
      const double wavelen = 2 * M_PI / f;
      if (wavelen > low_wavelen) {
        f /= rs.factor;
      } else if (wavelen >= high_wavelen) {
        const double smooth =
            (old_ctx / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor);
        f = (1 - smooth) * f / rs.factor + smooth * f;
      }
    }
    inv[i] = static_cast<float>(f);
  }
  return inv;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Loading

absl::StatusOr<std::shared_ptr<const LlamaModel>> LlamaModel::Load(const std::string& dir,
                                                                   const RuntimeOptions& options) {
  COLLM_ASSIGN_OR_RETURN(ResolvedRuntime runtime, ResolveRuntime(options));
  COLLM_ASSIGN_OR_RETURN(ModelConfig config, ModelConfig::FromFile(dir + "/config.json"));
  COLLM_ASSIGN_OR_RETURN(auto checkpoint, SafetensorsCheckpoint::Open(dir));

  std::vector<std::string> names = {"model.embed_tokens.weight", "model.norm.weight"};
  if (!config.tie_word_embeddings) names.push_back("lm_head.weight");
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    for (const char* n :
         {"input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
          "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
          "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}) {
      names.push_back(p + n);
    }
    if (config.qkv_bias) {
      for (const char* n :
           {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"}) {
        names.push_back(p + n);
      }
    }
    if (config.o_bias) names.push_back(p + "self_attn.o_proj.bias");
  }

  std::map<std::string, at::Tensor> tensors;
  try {
    // NoGradGuard, not InferenceMode: inference tensors could not be saved for backward, and PEFT
    // training runs autograd through these frozen weights.
    at::NoGradGuard no_grad;
    for (const std::string& name : names) {
      COLLM_ASSIGN_OR_RETURN(TensorView view, checkpoint->Get(name));
      at::Tensor t = at::empty(view.shape, at::kFloat);
      ConvertToFloat32(view, t.data_ptr<float>());
      tensors.emplace(name, std::move(t));
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("loading ", dir, ": ", e.what_without_backtrace()));
  }
  return FromTensors(config, std::move(tensors), runtime, checkpoint->dir());
}

absl::StatusOr<std::shared_ptr<const LlamaModel>> LlamaModel::FromTensors(
    const ModelConfig& config, std::map<std::string, at::Tensor> tensors,
    const ResolvedRuntime& runtime, const std::string& source) {
  COLLM_RETURN_IF_ERROR(config.Validate());
  const int64_t d = config.hidden_size, ff = config.intermediate_size, v = config.vocab_size;
  const int64_t q = config.q_size(), kv = config.kv_size();

  auto get = [&](const std::string& name,
                 std::vector<int64_t> shape) -> absl::StatusOr<at::Tensor> {
    auto it = tensors.find(name);
    if (it == tensors.end()) {
      return absl::NotFoundError(absl::StrCat(source, ": missing tensor '", name, "'"));
    }
    if (it->second.sizes() != at::IntArrayRef(shape)) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": tensor '", name, "' has shape ",
                                                     ShapeString(it->second.sizes()), ", expected ",
                                                     ShapeString(shape), " from config.json"));
    }
    return it->second.to(runtime.device, runtime.dtype).contiguous();
  };
  // A base matrix in runtime.weights' format (quantizing drops the f32 tensor right away).
  auto matrix = [&](at::Tensor w, const std::string& name) -> absl::StatusOr<WeightMatrix> {
    return WeightMatrix::Create(w, runtime.weights, absl::StrCat(source, ": ", name));
  };

  std::shared_ptr<LlamaModel> model(new LlamaModel());
  model->config_ = config;
  model->runtime_ = runtime;
  model->inv_freq_ = ComputeInvFreq(config);
  try {
    at::NoGradGuard no_grad;  // See Load: the weights must stay usable under autograd.
    {
      COLLM_ASSIGN_OR_RETURN(at::Tensor embed, get("model.embed_tokens.weight", {v, d}));
      COLLM_ASSIGN_OR_RETURN(model->embed_, matrix(embed, "model.embed_tokens.weight"));
    }
    COLLM_ASSIGN_OR_RETURN(model->final_norm_, get("model.norm.weight", {d}));
    if (config.tie_word_embeddings) {
      model->lm_head_ = model->embed_;
    } else {
      COLLM_ASSIGN_OR_RETURN(at::Tensor head, get("lm_head.weight", {v, d}));
      COLLM_ASSIGN_OR_RETURN(model->lm_head_, matrix(head, "lm_head.weight"));
    }
    for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
      const std::string p = absl::StrCat("model.layers.", l, ".");
      Layer layer;
      COLLM_ASSIGN_OR_RETURN(layer.attn_norm, get(p + "input_layernorm.weight", {d}));
      COLLM_ASSIGN_OR_RETURN(at::Tensor wq, get(p + "self_attn.q_proj.weight", {q, d}));
      COLLM_ASSIGN_OR_RETURN(at::Tensor wk, get(p + "self_attn.k_proj.weight", {kv, d}));
      COLLM_ASSIGN_OR_RETURN(at::Tensor wv, get(p + "self_attn.v_proj.weight", {kv, d}));
      COLLM_ASSIGN_OR_RETURN(layer.w_qkv,
                             matrix(at::cat({wq, wk, wv}, 0).contiguous(), p + "self_attn.qkv"));
      if (config.qkv_bias) {
        COLLM_ASSIGN_OR_RETURN(at::Tensor bq, get(p + "self_attn.q_proj.bias", {q}));
        COLLM_ASSIGN_OR_RETURN(at::Tensor bk, get(p + "self_attn.k_proj.bias", {kv}));
        COLLM_ASSIGN_OR_RETURN(at::Tensor bv, get(p + "self_attn.v_proj.bias", {kv}));
        layer.b_qkv = at::cat({bq, bk, bv}, 0).contiguous();
      }
      COLLM_ASSIGN_OR_RETURN(at::Tensor wo, get(p + "self_attn.o_proj.weight", {d, q}));
      COLLM_ASSIGN_OR_RETURN(layer.w_o, matrix(wo, p + "self_attn.o_proj.weight"));
      if (config.o_bias) {
        COLLM_ASSIGN_OR_RETURN(layer.b_o, get(p + "self_attn.o_proj.bias", {d}));
      }
      COLLM_ASSIGN_OR_RETURN(layer.ffn_norm, get(p + "post_attention_layernorm.weight", {d}));
      COLLM_ASSIGN_OR_RETURN(at::Tensor wg, get(p + "mlp.gate_proj.weight", {ff, d}));
      COLLM_ASSIGN_OR_RETURN(at::Tensor wu, get(p + "mlp.up_proj.weight", {ff, d}));
      COLLM_ASSIGN_OR_RETURN(layer.w_gate_up,
                             matrix(at::cat({wg, wu}, 0).contiguous(), p + "mlp.gate_up"));
      COLLM_ASSIGN_OR_RETURN(at::Tensor wd, get(p + "mlp.down_proj.weight", {d, ff}));
      COLLM_ASSIGN_OR_RETURN(layer.w_down, matrix(wd, p + "mlp.down_proj.weight"));
      model->layers_.push_back(std::move(layer));
      // The fused copies exist now: drop this layer's originals to bound peak memory.
      for (auto it = tensors.lower_bound(p);
           it != tensors.end() && it->first.compare(0, p.size(), p) == 0;) {
        it = tensors.erase(it);
      }
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat(source, ": ", e.what_without_backtrace()));
  }
  return std::shared_ptr<const LlamaModel>(std::move(model));
}

int64_t LlamaModel::parameter_bytes() const {
  int64_t n = embed_.nbytes() + final_norm_.nbytes();
  if (!lm_head_.is_same(embed_)) n += lm_head_.nbytes();
  for (const Layer& l : layers_) {
    for (const at::Tensor* t : {&l.attn_norm, &l.b_qkv, &l.b_o, &l.ffn_norm}) {
      if (t->defined()) n += t->nbytes();
    }
    for (const WeightMatrix* w : {&l.w_qkv, &l.w_o, &l.w_gate_up, &l.w_down}) n += w->nbytes();
  }
  return n;
}

bool LlamaModel::uses_fused_cpu_kernels() const {
  return runtime_.device.is_cpu() && runtime_.dtype == at::kFloat;
}

// ---------------------------------------------------------------------------------------------
// Forward

absl::Status LlamaModel::Validate(const StepBatch& batch, const KvCache& cache) const {
  if (batch.sequences.empty()) return absl::InvalidArgumentError("step batch has no sequences");
  if (cache.num_layers() != config_.num_hidden_layers ||
      cache.keys(0).size(2) != config_.num_key_value_heads ||
      cache.keys(0).size(3) != config_.head_dim || cache.keys(0).scalar_type() != runtime_.dtype ||
      cache.keys(0).device() != runtime_.device) {
    return absl::InvalidArgumentError("KV cache was created for a different model or runtime");
  }
  int64_t total = 0;
  std::set<const SequenceKv*> seen;
  for (size_t i = 0; i < batch.sequences.size(); ++i) {
    const SequenceStep& s = batch.sequences[i];
    if (s.kv == nullptr)
      return absl::InvalidArgumentError(absl::StrCat("sequence ", i, " has no KV state"));
    if (!seen.insert(s.kv).second) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", i, " appears twice in one step"));
    }
    if (s.num_tokens <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence ", i, " has num_tokens ", s.num_tokens));
    }
    const int64_t end = s.kv->length + s.num_tokens;
    if (end > config_.max_position_embeddings) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", i, " would reach position ", end,
                                                     ", past the context of ",
                                                     config_.max_position_embeddings));
    }
    if (static_cast<int64_t>(s.kv->blocks.size()) * cache.block_size() < end) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sequence ", i, " has KV room for ", s.kv->blocks.size() * cache.block_size(),
          " positions but needs ", end, " (call KvCache::Reserve first)"));
    }
    total += s.num_tokens;
    if (s.adapter != nullptr) {
      if (static_cast<int64_t>(s.adapter->layers.size()) != config_.num_hidden_layers) {
        return absl::InvalidArgumentError(
            absl::StrCat("sequence ", i, "'s adapter has ", s.adapter->layers.size(),
                         " layers, the model ", config_.num_hidden_layers));
      }
      for (const LoraLayer& l : s.adapter->layers) {
        for (const LoraProjection* p : {&l.qkv, &l.o, &l.gate_up, &l.down}) {
          if (p->defined() &&
              (p->a.scalar_type() != runtime_.dtype || p->a.device() != runtime_.device ||
               p->b.scalar_type() != runtime_.dtype)) {
            return absl::InvalidArgumentError(
                absl::StrCat("sequence ", i, "'s adapter is not in the model's dtype and device"));
          }
        }
      }
    }
  }
  if (total != static_cast<int64_t>(batch.tokens.size())) {
    return absl::InvalidArgumentError(
        absl::StrCat("sequences claim ", total, " tokens but the batch has ", batch.tokens.size()));
  }
  for (size_t i = 0; i < batch.tokens.size(); ++i) {
    if (batch.tokens[i] < 0 || batch.tokens[i] >= config_.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", batch.tokens[i], " at index ", i,
                                                     " is outside the vocabulary [0, ",
                                                     config_.vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<at::Tensor> LlamaModel::Forward(const StepBatch& batch, KvCache& cache,
                                               const ForwardOptions& options) const {
  COLLM_RETURN_IF_ERROR(Validate(batch, cache));
  StepPlan plan;
  plan.num_tokens = static_cast<int64_t>(batch.tokens.size());
  plan.positions.reserve(plan.num_tokens);
  plan.seq_of.reserve(plan.num_tokens);
  int64_t t = 0;
  for (size_t i = 0; i < batch.sequences.size(); ++i) {
    const SequenceStep& s = batch.sequences[i];
    for (int64_t j = 0; j < s.num_tokens; ++j, ++t) {
      plan.positions.push_back(s.kv->length + j);
      plan.seq_of.push_back(static_cast<int32_t>(i));
      if (s.all_logits || j == s.num_tokens - 1) plan.logit_rows.push_back(t);
      if (s.adapter == nullptr) continue;
      AdapterGroup* group = nullptr;
      for (auto& g : plan.adapters) {
        if (g.adapter == s.adapter) group = &g;
      }
      if (group == nullptr) {
        plan.adapters.push_back({s.adapter, {}, true, {}});
        group = &plan.adapters.back();
      }
      if (!group->rows.empty() && group->rows.back() != t - 1) group->contiguous = false;
      group->rows.push_back(t);
    }
  }
  for (auto& g : plan.adapters) {
    if (!g.contiguous) g.index = at::tensor(g.rows, at::kLong).to(runtime_.device);
  }
  at::Tensor logits;
  try {
    c10::InferenceMode guard;
    logits = (uses_fused_cpu_kernels() && !options.force_reference)
                 ? ForwardFused(batch, plan, cache)
                 : ForwardReference(batch, plan, cache);
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("forward failed: ", e.what_without_backtrace()));
  }
  for (const SequenceStep& s : batch.sequences) s.kv->length += s.num_tokens;
  return logits;
}

at::Tensor LlamaModel::ForwardFused(const StepBatch& batch, const StepPlan& plan,
                                    KvCache& cache) const {
  const ModelConfig& c = config_;
  const int64_t T = plan.num_tokens, d = c.hidden_size, hd = c.head_dim, half = hd / 2;
  const int64_t H = c.num_attention_heads, KV = c.num_key_value_heads, group = H / KV;
  const int64_t qs = c.q_size(), kvs = c.kv_size(), qkv_dim = qs + 2 * kvs;
  const int64_t ff = c.intermediate_size, bs = cache.block_size();
  const float eps = static_cast<float>(c.rms_norm_eps);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const auto f32 = at::TensorOptions().dtype(at::kFloat);

  // Embedding rows.
  at::Tensor x = at::empty({T, d}, f32);
  {
    float* xp = x.data_ptr<float>();
    if (embed_.quantized()) {
      for (int64_t i = 0; i < T; ++i)
        embed_.quantized_matrix().DequantizeRow(batch.tokens[i], xp + i * d);
    } else {
      const float* emb = embed_.dense().data_ptr<float>();
      for (int64_t i = 0; i < T; ++i)
        std::memcpy(xp + i * d, emb + batch.tokens[i] * d, d * sizeof(float));
    }
  }
  // RoPE angles, once per token for all layers and heads.
  std::vector<float> cos_t(T * half), sin_t(T * half);
  for (int64_t i = 0; i < T; ++i) {
    const float pos = static_cast<float>(plan.positions[i]);
    for (int64_t k = 0; k < half; ++k) {
      const float a = pos * inv_freq_[k];
      cos_t[i * half + k] = std::cos(a);
      sin_t[i * half + k] = std::sin(a);
    }
  }
  // Per token: its block table and context length.
  std::vector<const int32_t*> blocks_of(T);
  for (int64_t i = 0; i < T; ++i) blocks_of[i] = batch.sequences[plan.seq_of[i]].kv->blocks.data();

  // Sequences with many new tokens (prefill chunks) run attention as GEMMs over a gathered copy of
  // their keys/values; single decode tokens and short chunks use the per-(token, head) loops,
  // where GEMM call overhead would dominate.
  constexpr int64_t kGemmAttentionMinTokens = 16;
  struct GemmSeq {
    int64_t t0, n, ctx;
    const int32_t* blocks;
    at::Tensor mask;  // [n, ctx], true where the key is in the query's future.
  };
  std::vector<GemmSeq> gemm_seqs;
  std::vector<int64_t> loop_tokens;
  {
    int64_t t0 = 0;
    for (const SequenceStep& s : batch.sequences) {
      if (s.num_tokens >= kGemmAttentionMinTokens) {
        const int64_t start = s.kv->length, ctx = start + s.num_tokens;
        at::Tensor key_pos = at::arange(ctx, at::kLong).unsqueeze(0);
        at::Tensor query_pos = (at::arange(s.num_tokens, at::kLong) + start).unsqueeze(1);
        gemm_seqs.push_back({t0, s.num_tokens, ctx, s.kv->blocks.data(), key_pos > query_pos});
      } else {
        for (int64_t j = 0; j < s.num_tokens; ++j) loop_tokens.push_back(t0 + j);
      }
      t0 += s.num_tokens;
    }
  }
  int64_t ctx_sum = 0;
  for (int64_t i : loop_tokens) ctx_sum += plan.positions[i] + 1;
  const int64_t avg_ctx = std::max<int64_t>(
      1, loop_tokens.empty() ? 1 : ctx_sum / static_cast<int64_t>(loop_tokens.size()));
  const int64_t attn_grain = std::max<int64_t>(1, 32768 / (avg_ctx * hd * 4));
  const int64_t num_loop_items = static_cast<int64_t>(loop_tokens.size()) * H;

  at::Tensor h = at::empty({T, d}, f32);
  at::Tensor attn = at::empty({T, qs}, f32);
  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer& L = layers_[l];
    RmsNormRows(x, L.attn_norm, h, eps);
    at::Tensor qkv = Linear(h, L.w_qkv, L.b_qkv);  // [T, qkv_dim]
    AddLoraDeltas(qkv, h, plan.adapters,
                  [l](const LoraWeights& w) -> const LoraProjection& { return w.layers[l].qkv; });
    float* qkvp = qkv.data_ptr<float>();

    // RoPE on q and k heads (rotate-half pairs i and i + half), then append k and v to the cache.
    float* kc = cache.keys(l).data_ptr<float>();
    float* vc = cache.values(l).data_ptr<float>();
    for (int64_t i = 0; i < T; ++i) {
      float* row = qkvp + i * qkv_dim;
      const float* cs = cos_t.data() + i * half;
      const float* sn = sin_t.data() + i * half;
      for (int64_t head = 0; head < H + KV; ++head) {
        float* v = row + head * hd;
        for (int64_t k = 0; k < half; ++k) {
          const float x0 = v[k], x1 = v[k + half];
          v[k] = x0 * cs[k] - x1 * sn[k];
          v[k + half] = x1 * cs[k] + x0 * sn[k];
        }
      }
      const int64_t p = plan.positions[i];
      const int64_t slot = static_cast<int64_t>(blocks_of[i][p / bs]) * bs + p % bs;
      std::memcpy(kc + slot * kvs, row + qs, kvs * sizeof(float));
      std::memcpy(vc + slot * kvs, row + qs + kvs, kvs * sizeof(float));
    }

    // Causal attention of each (token, head) over its own sequence's cache, block by block.
    float* ap = attn.data_ptr<float>();
    at::parallel_for(0, num_loop_items, attn_grain, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t i = loop_tokens[idx / H], head = idx % H, g = head / group;
        const int64_t ctx = plan.positions[i] + 1;
        const int32_t* blocks = blocks_of[i];
        const float* qv = qkvp + i * qkv_dim + head * hd;
        scores.resize(ctx);
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j0 = 0; j0 < ctx; j0 += bs) {
          const float* kb = kc + (static_cast<int64_t>(blocks[j0 / bs]) * bs * KV + g) * hd;
          const int64_t n = std::min(bs, ctx - j0);
          for (int64_t j = 0; j < n; ++j) {
            const float s = Dot(qv, kb + j * KV * hd, hd) * scale;
            scores[j0 + j] = s;
            mx = std::max(mx, s);
          }
        }
        float sum = 0.f;
        for (int64_t j = 0; j < ctx; ++j) {
          scores[j] = std::exp(scores[j] - mx);
          sum += scores[j];
        }
        const float inv_sum = 1.0f / sum;
        float* out = ap + i * qs + head * hd;
        std::fill(out, out + hd, 0.f);
        for (int64_t j0 = 0; j0 < ctx; j0 += bs) {
          const float* vb = vc + (static_cast<int64_t>(blocks[j0 / bs]) * bs * KV + g) * hd;
          const int64_t n = std::min(bs, ctx - j0);
          for (int64_t j = 0; j < n; ++j) {
            const float w = scores[j0 + j] * inv_sum;
            const float* vv = vb + j * KV * hd;
#pragma omp simd
            for (int64_t k = 0; k < hd; ++k) out[k] += w * vv[k];
          }
        }
      }
    });

    for (const GemmSeq& gs : gemm_seqs) {
      // Gather this sequence's keys and values into contiguous [ctx, kv_size] matrices.
      at::Tensor keys = at::empty({gs.ctx, kvs}, f32), values = at::empty({gs.ctx, kvs}, f32);
      float* kp = keys.data_ptr<float>();
      float* vp = values.data_ptr<float>();
      for (int64_t j0 = 0; j0 < gs.ctx; j0 += bs) {
        const int64_t n = std::min(bs, gs.ctx - j0);
        const int64_t src = static_cast<int64_t>(gs.blocks[j0 / bs]) * bs * kvs;
        std::memcpy(kp + j0 * kvs, kc + src, n * kvs * sizeof(float));
        std::memcpy(vp + j0 * kvs, vc + src, n * kvs * sizeof(float));
      }
      at::Tensor rows = qkv.narrow(0, gs.t0, gs.n);
      at::Tensor out_rows = attn.narrow(0, gs.t0, gs.n);
      for (int64_t head = 0; head < H; ++head) {
        const int64_t g = head / group;
        at::Tensor scores = at::mm(rows.narrow(1, head * hd, hd), keys.narrow(1, g * hd, hd).t());
        scores.mul_(scale).masked_fill_(gs.mask, -std::numeric_limits<float>::infinity());
        out_rows.narrow(1, head * hd, hd)
            .copy_(at::mm(at::softmax(scores, 1), values.narrow(1, g * hd, hd)));
      }
    }

    if (L.b_o.defined()) x.add_(L.b_o);
    AddLinear(x, attn, L.w_o);
    AddLoraDeltas(x, attn, plan.adapters,
                  [l](const LoraWeights& w) -> const LoraProjection& { return w.layers[l].o; });

    RmsNormRows(x, L.ffn_norm, h, eps);
    at::Tensor gu = Linear(h, L.w_gate_up, at::Tensor());  // [T, 2 ff]
    AddLoraDeltas(gu, h, plan.adapters, [l](const LoraWeights& w) -> const LoraProjection& {
      return w.layers[l].gate_up;
    });
    at::Tensor act = at::silu(gu.narrow(1, 0, ff)).mul_(gu.narrow(1, ff, ff));
    AddLinear(x, act, L.w_down);
    AddLoraDeltas(x, act, plan.adapters,
                  [l](const LoraWeights& w) -> const LoraProjection& { return w.layers[l].down; });
  }

  const int64_t R = static_cast<int64_t>(plan.logit_rows.size());
  at::Tensor last = R == T ? x : x.index_select(0, at::tensor(plan.logit_rows, at::kLong));
  at::Tensor normed = at::empty({R, d}, f32);
  RmsNormRows(last.contiguous(), final_norm_, normed, eps);
  return Linear(normed, lm_head_, at::Tensor());
}

at::Tensor LlamaModel::ForwardReference(const StepBatch& batch, const StepPlan& plan,
                                        KvCache& cache) const {
  const ModelConfig& c = config_;
  const int64_t T = plan.num_tokens, hd = c.head_dim;
  const int64_t H = c.num_attention_heads, KV = c.num_key_value_heads, group = H / KV;
  const int64_t qs = c.q_size(), kvs = c.kv_size(), bs = cache.block_size();
  const auto dev = runtime_.device;
  const auto i64 = at::TensorOptions().dtype(at::kLong);

  at::Tensor tokens =
      at::tensor(std::vector<int64_t>(batch.tokens.begin(), batch.tokens.end()), i64).to(dev);
  at::Tensor positions = at::tensor(plan.positions, i64).to(dev);
  // Cache slot of each new token.
  std::vector<int64_t> slots(T);
  for (int64_t i = 0; i < T; ++i) {
    const int64_t p = plan.positions[i];
    slots[i] =
        static_cast<int64_t>(batch.sequences[plan.seq_of[i]].kv->blocks[p / bs]) * bs + p % bs;
  }
  at::Tensor slot_t = at::tensor(slots, i64).to(dev);

  at::Tensor inv_freq = at::tensor(inv_freq_, at::kFloat).to(dev);
  at::Tensor freqs = positions.to(at::kFloat).unsqueeze(1) * inv_freq.unsqueeze(0);  // [T, hd/2]
  at::Tensor emb = at::cat({freqs, freqs}, -1);
  at::Tensor cos = emb.cos().to(runtime_.dtype).unsqueeze(1);  // [T, 1, hd]
  at::Tensor sin = emb.sin().to(runtime_.dtype).unsqueeze(1);

  at::Tensor x = embed_.Rows(tokens);
  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer& L = layers_[l];
    at::Tensor h = RmsNormReference(x, L.attn_norm, c.rms_norm_eps);
    at::Tensor qkv = L.w_qkv.Linear(h, L.b_qkv);
    AddLoraDeltas(qkv, h, plan.adapters,
                  [l](const LoraWeights& w) -> const LoraProjection& { return w.layers[l].qkv; });
    at::Tensor q = qkv.narrow(1, 0, qs).view({T, H, hd});
    at::Tensor k = qkv.narrow(1, qs, kvs).view({T, KV, hd});
    at::Tensor v = qkv.narrow(1, qs + kvs, kvs).view({T, KV, hd});
    q = q * cos + RotateHalf(q) * sin;
    k = k * cos + RotateHalf(k) * sin;
    at::Tensor kflat = cache.keys(l).view({-1, KV, hd});
    at::Tensor vflat = cache.values(l).view({-1, KV, hd});
    kflat.index_copy_(0, slot_t, k);
    vflat.index_copy_(0, slot_t, v);

    std::vector<at::Tensor> outs;
    int64_t t0 = 0;
    for (const SequenceStep& s : batch.sequences) {
      const int64_t n = s.num_tokens, start = s.kv->length, ctx = start + n;
      std::vector<int64_t> ctx_slots(ctx);
      for (int64_t p = 0; p < ctx; ++p)
        ctx_slots[p] = static_cast<int64_t>(s.kv->blocks[p / bs]) * bs + p % bs;
      at::Tensor idx = at::tensor(ctx_slots, i64).to(dev);
      at::Tensor ks = kflat.index_select(0, idx).repeat_interleave(group, 1);  // [ctx, H, hd]
      at::Tensor vs = vflat.index_select(0, idx).repeat_interleave(group, 1);
      at::Tensor qs_ = q.narrow(0, t0, n);  // [n, H, hd]
      at::Tensor scores =
          at::einsum("nhd,chd->hnc", {qs_, ks}).to(at::kFloat) / std::sqrt(double(hd));
      // Token i (position start + i) sees keys 0 .. start + i.
      at::Tensor key_pos = at::arange(ctx, i64.device(dev)).unsqueeze(0);
      at::Tensor query_pos = (at::arange(n, i64.device(dev)) + start).unsqueeze(1);
      scores = scores.masked_fill(key_pos > query_pos, -std::numeric_limits<float>::infinity());
      at::Tensor probs = at::softmax(scores, -1).to(runtime_.dtype);
      outs.push_back(at::einsum("hnc,chd->nhd", {probs, vs}).reshape({n, qs}));
      t0 += n;
    }
    at::Tensor attn = at::cat(outs, 0);
    x = x + L.w_o.Linear(attn, L.b_o);
    AddLoraDeltas(x, attn, plan.adapters,
                  [l](const LoraWeights& w) -> const LoraProjection& { return w.layers[l].o; });
    h = RmsNormReference(x, L.ffn_norm, c.rms_norm_eps);
    at::Tensor gu = L.w_gate_up.Linear(h, at::Tensor());
    AddLoraDeltas(gu, h, plan.adapters, [l](const LoraWeights& w) -> const LoraProjection& {
      return w.layers[l].gate_up;
    });
    const int64_t ff = c.intermediate_size;
    at::Tensor act = at::silu(gu.narrow(1, 0, ff)) * gu.narrow(1, ff, ff);
    x = x + L.w_down.Linear(act, at::Tensor());
    AddLoraDeltas(x, act, plan.adapters,
                  [l](const LoraWeights& w) -> const LoraProjection& { return w.layers[l].down; });
  }
  at::Tensor rows = at::tensor(plan.logit_rows, i64).to(dev);
  at::Tensor last = x.index_select(0, rows);
  at::Tensor logits =
      lm_head_.Linear(RmsNormReference(last, final_norm_, c.rms_norm_eps), at::Tensor());
  return logits.to(at::kCPU, at::kFloat).contiguous();
}

absl::StatusOr<at::Tensor> LlamaModel::DenseLogits(const at::Tensor& tokens,
                                                   const LoraWeights* adapter, double lora_dropout,
                                                   bool training) const {
  COLLM_ASSIGN_OR_RETURN(DenseContext ctx, DenseBegin(tokens));
  if (adapter != nullptr &&
      static_cast<int64_t>(adapter->layers.size()) != config_.num_hidden_layers) {
    return absl::InvalidArgumentError("DenseLogits: adapter layer count differs from the model");
  }
  at::Tensor x = ctx.hidden;
  for (int64_t l = 0; l < config_.num_hidden_layers; ++l) {
    COLLM_ASSIGN_OR_RETURN(x, DenseLayer(ctx, l, x, adapter, lora_dropout, training));
  }
  return DenseHead(x);
}

absl::StatusOr<LlamaModel::DenseContext> LlamaModel::DenseBegin(const at::Tensor& tokens) const {
  const ModelConfig& c = config_;
  if (tokens.dim() != 2 || tokens.scalar_type() != at::kLong) {
    return absl::InvalidArgumentError("DenseLogits needs a [batch, length] int64 token tensor");
  }
  const int64_t B = tokens.size(0), Lq = tokens.size(1);
  if (B == 0 || Lq == 0 || Lq > c.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("DenseLogits: length ", Lq, " must be in [1, ",
                                                   c.max_position_embeddings, "]"));
  }
  if (tokens.numel() > 0 &&
      (tokens.min().item<int64_t>() < 0 || tokens.max().item<int64_t>() >= c.vocab_size)) {
    return absl::InvalidArgumentError("DenseLogits: token id outside the vocabulary");
  }
  const int64_t hd = c.head_dim;
  const auto dev = runtime_.device;
  try {
    DenseContext ctx;
    at::Tensor ids = tokens.to(dev);
    at::Tensor inv_freq = at::tensor(inv_freq_, at::kFloat).to(dev);
    at::Tensor freqs =
        at::arange(Lq, at::TensorOptions().dtype(at::kFloat).device(dev)).unsqueeze(1) *
        inv_freq.unsqueeze(0);
    at::Tensor emb = at::cat({freqs, freqs}, -1);
    ctx.cos = emb.cos().to(runtime_.dtype).view({1, Lq, 1, hd});
    ctx.sin = emb.sin().to(runtime_.dtype).view({1, Lq, 1, hd});
    ctx.mask = at::full({Lq, Lq}, -std::numeric_limits<float>::infinity(),
                        at::TensorOptions().dtype(at::kFloat).device(dev))
                   .triu(1);
    ctx.hidden = embed_.Rows(ids.reshape({-1})).view({B, Lq, c.hidden_size});
    return ctx;
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("dense forward failed: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<at::Tensor> LlamaModel::DenseLayer(const DenseContext& ctx, int64_t layer,
                                                  const at::Tensor& hidden,
                                                  const LoraWeights* adapter, double lora_dropout,
                                                  bool training) const {
  const ModelConfig& c = config_;
  if (layer < 0 || layer >= c.num_hidden_layers) {
    return absl::InvalidArgumentError(absl::StrCat("DenseLayer: no layer ", layer));
  }
  if (adapter != nullptr && static_cast<int64_t>(adapter->layers.size()) != c.num_hidden_layers) {
    return absl::InvalidArgumentError("DenseLayer: adapter layer count differs from the model");
  }
  const int64_t hd = c.head_dim, H = c.num_attention_heads, KV = c.num_key_value_heads;
  const int64_t group = H / KV, qs = c.q_size(), kvs = c.kv_size(), ff = c.intermediate_size;
  const int64_t B = hidden.size(0), Lq = hidden.size(1);
  try {
    auto delta = [&](const at::Tensor& in, const LoraProjection& p) {
      return LoraDelta(in, p, lora_dropout, training);
    };
    at::Tensor x = hidden;
    const Layer& L = layers_[layer];
    const LoraLayer* A = adapter != nullptr ? &adapter->layers[layer] : nullptr;
    at::Tensor h = RmsNormReference(x, L.attn_norm, c.rms_norm_eps);
    at::Tensor qkv = L.w_qkv.Linear(h, L.b_qkv);
    if (A != nullptr && A->qkv.defined()) qkv = qkv + delta(h, A->qkv);
    at::Tensor q = qkv.narrow(2, 0, qs).view({B, Lq, H, hd});
    at::Tensor k = qkv.narrow(2, qs, kvs).view({B, Lq, KV, hd});
    at::Tensor v = qkv.narrow(2, qs + kvs, kvs).view({B, Lq, KV, hd});
    q = q * ctx.cos + RotateHalf(q) * ctx.sin;
    k = (k * ctx.cos + RotateHalf(k) * ctx.sin).repeat_interleave(group, 2);
    v = v.repeat_interleave(group, 2);
    at::Tensor scores =
        at::einsum("blhd,bshd->bhls", {q, k}).to(at::kFloat) / std::sqrt(double(hd)) + ctx.mask;
    at::Tensor probs = at::softmax(scores, -1).to(runtime_.dtype);
    at::Tensor attn = at::einsum("bhls,bshd->blhd", {probs, v}).reshape({B, Lq, qs});
    x = x + L.w_o.Linear(attn, L.b_o);
    if (A != nullptr && A->o.defined()) x = x + delta(attn, A->o);
    h = RmsNormReference(x, L.ffn_norm, c.rms_norm_eps);
    at::Tensor gu = L.w_gate_up.Linear(h, at::Tensor());
    if (A != nullptr && A->gate_up.defined()) gu = gu + delta(h, A->gate_up);
    at::Tensor act = at::silu(gu.narrow(2, 0, ff)) * gu.narrow(2, ff, ff);
    x = x + L.w_down.Linear(act, at::Tensor());
    if (A != nullptr && A->down.defined()) x = x + delta(act, A->down);
    return x;
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("dense forward failed: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<at::Tensor> LlamaModel::DenseHead(const at::Tensor& hidden) const {
  try {
    return lm_head_
        .Linear(RmsNormReference(hidden, final_norm_, config_.rms_norm_eps), at::Tensor())
        .to(at::kFloat);
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("dense forward failed: ", e.what_without_backtrace()));
  }
}

at::Tensor LlamaModel::BaseWeight(int64_t layer, LoraTarget target) const {
  const Layer& L = layers_.at(layer);
  const ModelConfig& c = config_;
  switch (target) {
    case LoraTarget::kQ:
      return L.w_qkv.ToDense().narrow(0, 0, c.q_size());
    case LoraTarget::kK:
      return L.w_qkv.ToDense().narrow(0, c.q_size(), c.kv_size());
    case LoraTarget::kV:
      return L.w_qkv.ToDense().narrow(0, c.q_size() + c.kv_size(), c.kv_size());
    case LoraTarget::kO:
      return L.w_o.ToDense();
    case LoraTarget::kGate:
      return L.w_gate_up.ToDense().narrow(0, 0, c.intermediate_size);
    case LoraTarget::kUp:
      return L.w_gate_up.ToDense().narrow(0, c.intermediate_size, c.intermediate_size);
    case LoraTarget::kDown:
      return L.w_down.ToDense();
  }
  return {};
}

}  // namespace collm::runtime
