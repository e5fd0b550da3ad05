#include "collm/runtime/generator.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>

#include "absl/strings/str_cat.h"
#include "collm/common/status.h"

namespace collm::runtime {

const char* FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength:
      return "length";
    case FinishReason::kEos:
      return "eos";
    case FinishReason::kStop:
      return "stop";
  }
  return "unknown";
}

Generator::Generator(std::shared_ptr<const LlamaModel> model, const Tokenizer* tokenizer,
                     GeneratorOptions options, Clock& clock)
    : model_(std::move(model)), tokenizer_(tokenizer), options_(options), clock_(clock) {}

namespace {

struct Active {
  size_t index;
  const GenerationRequest* request;
  SequenceKv kv;
  std::vector<int32_t> context;  // Prompt + generated, for the repetition penalty.
  int64_t prefilled = 0;
  int64_t limit = 0;  // Max generated tokens (max_tokens capped by the context).
  Sampler sampler;
  std::optional<IncrementalDetokenizer> detok;
  std::optional<StopStringMatcher> stops;
  bool done = false;
  Active(size_t i, const GenerationRequest* r) : index(i), request(r), sampler(r->params) {}
};

}  // namespace

absl::StatusOr<std::vector<GenerationResult>> Generator::Generate(
    const std::vector<GenerationRequest>& requests, const TextCallback& on_text) {
  const ModelConfig& config = model_->config();
  const int64_t context = config.max_position_embeddings;
  const int64_t start_ns = clock_.NowNanos();
  std::vector<GenerationResult> results(requests.size());
  if (requests.empty()) return results;

  std::vector<std::unique_ptr<Active>> seqs;
  int64_t blocks_needed = 0;
  KvCacheOptions kv_options = options_.kv_cache;
  for (size_t i = 0; i < requests.size(); ++i) {
    const GenerationRequest& r = requests[i];
    const std::string where = absl::StrCat("request ", i, ": ");
    COLLM_RETURN_IF_ERROR(Annotate(r.params.Validate(), absl::StrCat("request ", i)));
    const int64_t n = static_cast<int64_t>(r.prompt.size());
    if (n == 0) return absl::InvalidArgumentError(where + "prompt is empty");
    if (n >= context) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "prompt has ", n, " tokens; the model's context is ", context));
    }
    for (int32_t id : r.prompt) {
      if (id < 0 || id >= config.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, "prompt token ", id, " is outside the vocabulary"));
      }
    }
    if (!r.params.stop.empty() && tokenizer_ == nullptr) {
      return absl::InvalidArgumentError(where + "stop strings need a tokenizer");
    }
    auto a = std::make_unique<Active>(i, &r);
    a->context = r.prompt;
    a->limit = std::min<int64_t>(r.params.max_tokens, context - n);
    if (tokenizer_ != nullptr) {
      const size_t tail = std::min<size_t>(r.prompt.size(), 4);
      a->detok.emplace(*tokenizer_, absl::MakeConstSpan(r.prompt).subspan(r.prompt.size() - tail));
      a->stops.emplace(r.params.stop);
    }
    const int64_t bs = kv_options.block_size > 0 ? kv_options.block_size : 16;
    blocks_needed += (n + a->limit + bs - 1) / bs;
    seqs.push_back(std::move(a));
  }
  if (kv_options.num_blocks == 0) kv_options.num_blocks = blocks_needed;
  COLLM_ASSIGN_OR_RETURN(auto cache, KvCache::Create(config, kv_options, model_->runtime()));
  for (auto& a : seqs) {
    COLLM_RETURN_IF_ERROR(
        cache->Reserve(a->kv, static_cast<int64_t>(a->request->prompt.size()) + a->limit));
  }

  auto finish = [&](Active& a, FinishReason reason) {
    GenerationResult& res = results[a.index];
    if (a.detok) {
      std::string tail = a.stops->stopped() ? "" : a.stops->Push(a.detok->Finish());
      if (!a.stops->stopped()) tail += a.stops->Finish();
      if (!tail.empty()) {
        res.text += tail;
        if (on_text) on_text(a.index, tail);
      }
    }
    res.finish_reason = reason;
    res.total_seconds = (clock_.NowNanos() - start_ns) * 1e-9;
    a.done = true;
    cache->Release(a.kv);
  };

  // Takes one sampled token for `a`; returns false when `a` finished.
  auto accept = [&](Active& a, at::Tensor logits_row) {
    GenerationResult& res = results[a.index];
    float* lp = logits_row.data_ptr<float>();
    const int32_t token = a.sampler.Sample(absl::MakeSpan(lp, config.vocab_size), a.context);
    if (res.tokens.empty()) res.ttft_seconds = (clock_.NowNanos() - start_ns) * 1e-9;
    const auto& eos = config.eos_token_ids;
    if (!a.request->params.ignore_eos && std::find(eos.begin(), eos.end(), token) != eos.end()) {
      finish(a, FinishReason::kEos);
      return;
    }
    res.tokens.push_back(token);
    a.context.push_back(token);
    if (a.detok) {
      std::string delta = a.stops->Push(a.detok->Push(token));
      if (!delta.empty()) {
        res.text += delta;
        if (on_text) on_text(a.index, delta);
      }
      if (a.stops->stopped()) {
        finish(a, FinishReason::kStop);
        return;
      }
    }
    if (static_cast<int64_t>(res.tokens.size()) >= a.limit) finish(a, FinishReason::kLength);
  };

  // Prefill, chunked: each step carries up to prefill_chunk prompt tokens across sequences.
  const int64_t chunk = std::max<int64_t>(1, options_.prefill_chunk);
  for (;;) {
    StepBatch batch;
    std::vector<Active*> finishing;
    int64_t budget = chunk;
    for (auto& a : seqs) {
      const int64_t n = static_cast<int64_t>(a->request->prompt.size());
      if (a->prefilled >= n || budget == 0) continue;
      const int64_t take = std::min(budget, n - a->prefilled);
      batch.tokens.insert(batch.tokens.end(), a->request->prompt.begin() + a->prefilled,
                          a->request->prompt.begin() + a->prefilled + take);
      batch.sequences.push_back({&a->kv, take, false, a->request->adapter});
      a->prefilled += take;
      budget -= take;
      if (a->prefilled == n) finishing.push_back(a.get());
    }
    if (batch.sequences.empty()) break;
    COLLM_ASSIGN_OR_RETURN(at::Tensor logits, model_->Forward(batch, *cache, options_.forward));
    // Logit rows come in sequence order; only sequences whose prompt completed sample.
    for (size_t s = 0; s < batch.sequences.size(); ++s) {
      for (Active* a : finishing) {
        if (&a->kv == batch.sequences[s].kv) accept(*a, logits[s]);
      }
    }
  }

  // Decode: one token per live sequence per step.
  for (;;) {
    StepBatch batch;
    std::vector<Active*> live;
    for (auto& a : seqs) {
      if (a->done) continue;
      batch.tokens.push_back(a->context.back());
      batch.sequences.push_back({&a->kv, 1, false, a->request->adapter});
      live.push_back(a.get());
    }
    if (live.empty()) break;
    COLLM_ASSIGN_OR_RETURN(at::Tensor logits, model_->Forward(batch, *cache, options_.forward));
    for (size_t s = 0; s < live.size(); ++s) accept(*live[s], logits[s]);
  }
  return results;
}

}  // namespace collm::runtime
