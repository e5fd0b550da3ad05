#include "collm/engine/batch_planner.h"

#include <algorithm>

namespace collm::engine {

StepPlan PlanStep(const std::vector<std::unique_ptr<Sequence>>& running, int64_t max_step_tokens) {
  StepPlan plan;
  int64_t budget = max_step_tokens;
  for (const auto& s : running) {
    if (!s->decoding() || budget <= 0) continue;
    plan.batch.tokens.push_back(s->context.back());
    plan.batch.sequences.push_back({&s->kv, 1, false, s->pin ? &s->pin->weights : nullptr});
    plan.members.push_back(s.get());
    --budget;
  }
  for (const auto& s : running) {
    if (s->decoding() || budget <= 0) continue;
    const int64_t take = std::min(budget, s->prompt_size() - s->prefilled);
    plan.batch.tokens.insert(plan.batch.tokens.end(), s->request.prompt.begin() + s->prefilled,
                             s->request.prompt.begin() + s->prefilled + take);
    plan.batch.sequences.push_back({&s->kv, take, false, s->pin ? &s->pin->weights : nullptr});
    plan.members.push_back(s.get());
    budget -= take;
  }
  return plan;
}

void ApplyStep(const StepPlan& plan, const at::Tensor& logits, int64_t now,
               const runtime::ModelConfig& config) {
  const int64_t vocab = config.vocab_size;
  const auto& eos = config.eos_token_ids;
  for (size_t k = 0; k < plan.members.size(); ++k) {
    Sequence& s = *plan.members[k];
    if (!s.decoding()) {
      s.prefilled += plan.batch.sequences[k].num_tokens;
      if (!s.decoding()) continue;  // Prompt not finished yet: no token to sample.
    }
    at::Tensor row = logits[static_cast<int64_t>(k)];
    const int32_t token =
        s.sampler->Sample(absl::MakeSpan(row.data_ptr<float>(), vocab), s.context);
    if (s.first_token_nanos == 0) s.first_token_nanos = now;
    s.last_token_nanos = now;
    if (!s.request.params.ignore_eos && std::find(eos.begin(), eos.end(), token) != eos.end()) {
      s.finished = runtime::FinishReason::kEos;
      continue;
    }
    ++s.generated;
    s.context.push_back(token);
    std::string text;
    if (s.detok) text = s.stops->Push(s.detok->Push(token));
    if (s.sink) s.sink->OnDelta(text, {token});
    if (s.stops && s.stops->stopped()) s.finished = runtime::FinishReason::kStop;
  }
}

}  // namespace collm::engine
