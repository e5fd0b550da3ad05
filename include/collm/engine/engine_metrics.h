// The engine's Prometheus series: request latencies and outcomes, batch sizes, queue depth, KV
// use, training progress and the live adapter. Registered once in a MetricsRegistry (borrowed,
// must outlive this); the series themselves are thread-safe, and the engine thread updates them.
#ifndef COLLM_ENGINE_ENGINE_METRICS_H_
#define COLLM_ENGINE_ENGINE_METRICS_H_

#include <cstdint>
#include <string>

#include "collm/engine/request.h"
#include "collm/telemetry/metrics.h"

namespace collm::engine {

struct EngineMetrics {
  // Registers every series in `registry`; `kv_blocks_total` is the KV pool's size.
  EngineMetrics(telemetry::MetricsRegistry& registry, int64_t kv_blocks_total);

  // One finished request: `generated` output tokens (latencies only when it had tokens).
  void RecordFinish(const RequestResult& result, bool had_first_token, int64_t generated);
  // One request shed by SLO-aware admission: collm_requests_shed_total{slo_class, reason}
  // ("default" for requests without a class; reason "rejected" or "deprioritized").
  void RecordShed(const std::string& slo_class, const std::string& reason);

  telemetry::Histogram* ttft;
  telemetry::Histogram* tpot;
  telemetry::Histogram* e2e;
  telemetry::Histogram* batch_tokens;
  telemetry::Counter* requests_ok;
  telemetry::Counter* requests_cancelled;
  telemetry::Counter* requests_expired;
  telemetry::Counter* requests_slo_met;
  telemetry::Counter* generated_tokens;
  telemetry::Counter* prompt_tokens;
  telemetry::Counter* steps;
  telemetry::Counter* train_micro_steps;
  telemetry::Counter* train_optimizer_steps;
  telemetry::Counter* train_guard_blocked;
  telemetry::Counter* train_share_yields;
  telemetry::Gauge* queue_depth;
  telemetry::Gauge* running;
  telemetry::Gauge* kv_used;
  telemetry::Gauge* kv_total;
  telemetry::Gauge* train_loss;
  telemetry::Gauge* train_share;
  telemetry::Gauge* train_share_target;
  telemetry::Gauge* train_share_ceiling;
  telemetry::Gauge* held_out_loss;
  telemetry::Gauge* adapter_version;
  telemetry::Gauge* slo_attainment;

 private:
  telemetry::MetricsRegistry* registry_;
};

}  // namespace collm::engine

#endif  // COLLM_ENGINE_ENGINE_METRICS_H_
