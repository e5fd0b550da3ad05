#include "collm/engine/engine_metrics.h"

namespace collm::engine {

EngineMetrics::EngineMetrics(telemetry::MetricsRegistry& r, int64_t kv_blocks_total)
    : registry_(&r) {
  const auto latency = telemetry::ExponentialBuckets(0.001, 2, 16);  // 1 ms .. 33 s.
  ttft = r.GetHistogram("collm_ttft_seconds", "Time to first token, queueing included", latency);
  tpot =
      r.GetHistogram("collm_tpot_seconds", "Mean time per output token after the first", latency);
  e2e = r.GetHistogram("collm_e2e_seconds", "Request latency from submit to finish", latency);
  batch_tokens =
      r.GetHistogram("collm_batch_tokens", "Tokens per engine step (decodes + prefill chunks)",
                     telemetry::ExponentialBuckets(1, 2, 12));
  requests_ok =
      r.GetCounter("collm_requests_total", "Finished requests by outcome", {{"outcome", "ok"}});
  requests_cancelled = r.GetCounter("collm_requests_total", "Finished requests by outcome",
                                    {{"outcome", "cancelled"}});
  requests_expired = r.GetCounter("collm_requests_total", "Finished requests by outcome",
                                  {{"outcome", "deadline_exceeded"}});
  requests_slo_met =
      r.GetCounter("collm_requests_slo_met_total", "Requests that met their TTFT and TPOT SLOs");
  generated_tokens = r.GetCounter("collm_generated_tokens_total", "Output tokens generated");
  prompt_tokens = r.GetCounter("collm_prompt_tokens_total", "Prompt tokens prefilled");
  steps = r.GetCounter("collm_engine_steps_total", "Inference steps run");
  train_micro_steps = r.GetCounter("collm_train_micro_steps_total", "PEFT micro-steps run");
  train_optimizer_steps = r.GetCounter("collm_train_steps_total", "PEFT optimizer steps run");
  train_guard_blocked =
      r.GetCounter("collm_train_guard_blocked_total", "Micro-steps skipped by the SLO guard");
  queue_depth = r.GetGauge("collm_queue_depth", "Requests waiting for admission");
  running = r.GetGauge("collm_running_sequences", "Sequences in the running batch");
  kv_used = r.GetGauge("collm_kv_cache_blocks_used", "KV cache blocks in use");
  kv_total = r.GetGauge("collm_kv_cache_blocks_total", "KV cache blocks in the pool");
  train_loss = r.GetGauge("collm_train_loss", "Training loss of the last optimizer step");
  train_share = r.GetGauge("collm_train_time_share", "Share of busy engine time spent training");
  train_share_target =
      r.GetGauge("collm_train_share_target",
                 "Training share the share controller aims for this step (within the ceiling)");
  train_share_ceiling = r.GetGauge("collm_train_share_ceiling",
                                   "Training share ceiling from the slow timescale (a round's "
                                   "task, else engine.training_share)");
  train_share_yields =
      r.GetCounter("collm_train_share_yields_total",
                   "Times training yielded to a load surge past the forecast (share controller)");
  held_out_loss =
      r.GetGauge("collm_held_out_loss", "Held-out loss of the live adapter (-1 unknown)");
  adapter_version =
      r.GetGauge("collm_live_adapter_version", "Version of the adapter training publishes to");
  slo_attainment =
      r.GetGauge("collm_slo_attainment", "Share of finished requests that met their SLOs");
  kv_total->Set(static_cast<double>(kv_blocks_total));
  held_out_loss->Set(-1);
}

void EngineMetrics::RecordFinish(const RequestResult& r, bool had_first_token, int64_t generated) {
  if (r.status.ok()) {
    requests_ok->Increment();
    if (had_first_token) ttft->Observe(r.ttft_seconds);
    if (generated > 1) tpot->Observe(r.tpot_seconds);
    e2e->Observe(r.e2e_seconds);
    if (r.slo_met) requests_slo_met->Increment();
  } else if (r.status.code() == absl::StatusCode::kDeadlineExceeded) {
    requests_expired->Increment();
  } else {
    requests_cancelled->Increment();
  }
  generated_tokens->Increment(static_cast<double>(generated));
}

void EngineMetrics::RecordShed(const std::string& slo_class, const std::string& reason) {
  // Labelled by class, so series appear as classes are shed (the registry returns the existing
  // series for a repeated label set).
  registry_
      ->GetCounter("collm_requests_shed_total",
                   "Requests shed by SLO-aware admission (predicted to miss their TTFT objective)",
                   {{"slo_class", slo_class.empty() ? "default" : slo_class}, {"reason", reason}})
      ->Increment();
}

}  // namespace collm::engine
