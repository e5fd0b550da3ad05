// Engine::LoadReport: the load signals and measured costs the slow timescale (the FL client's
// heartbeat) and the router read, from the stats the loop keeps and the arrival rates Submit
// records; nothing here touches the engine thread's state.
#include <algorithm>
#include <cmath>

#include "collm/engine/engine.h"

namespace collm::engine {

EngineLoadReport Engine::LoadReport() const {
  EngineLoadReport r;
  EngineStats st;
  coordination::StepCostModel step_costs(options_.max_step_tokens);
  {
    std::lock_guard<std::mutex> lock(mu_);
    const int64_t now = clock_->NowNanos();
    r.arrival_rate_1s = load_rates_.ShortRate(now);
    r.arrival_rate_30s = load_rates_.LongRate(now);
    r.arrival_trend = load_rates_.Trend(now);
    st = stats_;
    step_costs = admission_->costs();
  }
  r.queued = st.queued;
  r.running = st.running;
  r.max_running = options_.max_running;
  r.free_kv_fraction = st.kv_blocks_total > 0 ? 1.0 - static_cast<double>(st.kv_blocks_used) /
                                                          static_cast<double>(st.kv_blocks_total)
                                              : 1.0;
  const int64_t finished = st.completed + st.cancelled + st.expired;
  const int64_t admitted = finished + st.running;
  if (finished > 0 && admitted > 0) {
    const double mean_generated =
        static_cast<double>(st.generated_tokens) / static_cast<double>(finished);
    const double mean_prompt =
        static_cast<double>(st.prompt_tokens) / static_cast<double>(admitted);
    // The measured step-cost model: prefill per token of full steps, decode per row of the
    // batches decode steps actually carried.
    r.serving_capacity_rps = step_costs.ServingCapacityRps(mean_prompt, mean_generated);
    r.serving_capacity_tokens_per_s = r.serving_capacity_rps * (mean_prompt + mean_generated);
  }
  if (st.train_step_seconds > 0 && st.train_optimizer_steps > 0 && st.train_micro_steps > 0) {
    const double micro_per_step =
        static_cast<double>(st.train_micro_steps) / static_cast<double>(st.train_optimizer_steps);
    r.optimizer_step_seconds = st.train_step_seconds * micro_per_step;
    const double tokens_per_step =
        static_cast<double>(st.train_tokens) / static_cast<double>(st.train_optimizer_steps);
    r.train_tokens_per_s_solo = tokens_per_step / r.optimizer_step_seconds;
  }
  r.training_share = st.training_share;
  r.train_time_share = st.train_time_share;
  r.training_task_active = st.training_task_active;
  r.adapter_version = st.publish.live_version;
  return r;
}

}  // namespace collm::engine
