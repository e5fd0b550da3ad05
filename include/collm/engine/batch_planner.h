// One inference step of continuous batching, in two halves (llama.cpp's memory-context pattern):
// PlanStep reads the running sequences and decides the batch without changing anything;
// ApplyStep is the one place that mutates the sequences with the step's logits (prefill progress,
// sampling, stop/EOS detection, output to the sinks). The engine runs the forward in between.
#ifndef COLLM_ENGINE_BATCH_PLANNER_H_
#define COLLM_ENGINE_BATCH_PLANNER_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "collm/engine/sequence.h"
#include "collm/runtime/llama_model.h"
#include "collm/runtime/model_config.h"

namespace collm::engine {

struct StepPlan {
  runtime::StepBatch batch;        // What the forward runs: tokens and per-sequence spans.
  std::vector<Sequence*> members;  // members[k] owns batch.sequences[k]; borrowed.
  int64_t num_tokens() const { return static_cast<int64_t>(batch.tokens.size()); }
};

// Decodes first (one token each, in running order), then prefill chunks in the remaining budget
// of `max_step_tokens`, so long prompts do not stall decoding. Pure: reads `running` only.
// REQUIRES: max_step_tokens > 0. The plan borrows the sequences: valid until `running` changes.
StepPlan PlanStep(const std::vector<std::unique_ptr<Sequence>>& running, int64_t max_step_tokens);

// Applies the forward's `logits` (one row per member, vocabulary wide) to the planned sequences:
// advances prefills, samples a token for every member that is decoding, stamps token times with
// `now_nanos`, marks EOS and stop strings in Sequence::finished and sends deltas to the sinks.
// Engine thread only.
void ApplyStep(const StepPlan& plan, const at::Tensor& logits, int64_t now_nanos,
               const runtime::ModelConfig& config);

}  // namespace collm::engine

#endif  // COLLM_ENGINE_BATCH_PLANNER_H_
