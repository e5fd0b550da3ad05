// collm.v1.InferenceService in front of a ReplicaPool: what a client of one collmd sees, served by
// several. Generate streams are proxied token by token to the replica the routing policy chooses;
// a stream that failed before its first token (replica unreachable, its queue full) is retried
// once on another replica, never after tokens were streamed. The client's deadline and
// cancellation reach the replica. Tokenize and SubmitFeedback go to any admitted replica (the
// replicas serve the same base model), ListAdapters is the union over admitted replicas (newest
// version of each name), GetStats sums the replicas' last load reports. LoadAdapter and
// UnloadAdapter are refused: adapters are managed on each replica.
#ifndef COLLM_ROUTER_ROUTER_SERVICE_H_
#define COLLM_ROUTER_ROUTER_SERVICE_H_

#include <condition_variable>
#include <cstdint>
#include <mutex>

#include "collm/common/clock.h"
#include "collm/router/replica_pool.h"
#include "collm/telemetry/metrics.h"
#include "collm/v1/inference.grpc.pb.h"

namespace collm::router {

struct RouterServiceOptions {
  int64_t max_outstanding = 256;         // Generate streams in flight; more get RESOURCE_EXHAUSTED.
  bool retry_before_first_token = true;  // One retry elsewhere while nothing was streamed.
  int64_t unary_timeout_ms = 10000;      // Tokenize / ListAdapters / SubmitFeedback upstream,
                                         // when the client set no earlier deadline.
};

// Thread-safe (gRPC calls it from its threads). Each Generate stream runs on its own thread,
// bounded by max_outstanding. `pool` and `metrics` are borrowed and must outlive the service;
// the destructor waits for every stream's thread to finish.
class RouterService final : public collm::v1::InferenceService::CallbackService {
 public:
  RouterService(ReplicaPool& pool, RouterServiceOptions options,
                telemetry::MetricsRegistry& metrics, Clock& clock = Clock::Real());
  ~RouterService() override;

  // New Generate calls are refused with UNAVAILABLE from now on (SIGTERM drain).
  void StopAccepting();
  // Waits up to `seconds` for in-flight Generate streams to end; true when none is left.
  bool WaitForIdle(double seconds);
  int64_t in_flight() const;

  grpc::ServerWriteReactor<collm::v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const collm::v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const collm::v1::TokenizeRequest* request,
                                     collm::v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* ListAdapters(grpc::CallbackServerContext* context,
                                         const collm::v1::ListAdaptersRequest* request,
                                         collm::v1::ListAdaptersResponse* response) override;
  grpc::ServerUnaryReactor* LoadAdapter(grpc::CallbackServerContext* context,
                                        const collm::v1::LoadAdapterRequest* request,
                                        collm::v1::LoadAdapterResponse* response) override;
  grpc::ServerUnaryReactor* UnloadAdapter(grpc::CallbackServerContext* context,
                                          const collm::v1::UnloadAdapterRequest* request,
                                          collm::v1::UnloadAdapterResponse* response) override;
  grpc::ServerUnaryReactor* SubmitFeedback(grpc::CallbackServerContext* context,
                                           const collm::v1::SubmitFeedbackRequest* request,
                                           collm::v1::SubmitFeedbackResponse* response) override;
  grpc::ServerUnaryReactor* GetStats(grpc::CallbackServerContext* context,
                                     const collm::v1::GetStatsRequest* request,
                                     collm::v1::GetStatsResponse* response) override;

  // Counters shared with the stream threads.
  struct Metrics {
    telemetry::Counter* retries = nullptr;
    telemetry::Counter* rejected_full = nullptr;
    telemetry::Counter* rejected_no_replica = nullptr;
    telemetry::Counter* rejected_draining = nullptr;
    telemetry::Histogram* routing_delay = nullptr;
    telemetry::Gauge* in_flight = nullptr;
  };

 private:
  friend class ProxyStream;
  void StreamEnded();

  ReplicaPool& pool_;
  const RouterServiceOptions options_;
  Clock& clock_;
  Metrics metrics_;
  mutable std::mutex mu_;
  std::condition_variable idle_;
  int64_t in_flight_ = 0;  // Guarded by mu_.
  bool accepting_ = true;  // Guarded by mu_.
};

}  // namespace collm::router

#endif  // COLLM_ROUTER_ROUTER_SERVICE_H_
