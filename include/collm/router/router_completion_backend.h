// collm-router's CompletionBackend: the OpenAI-compatible HTTP API (serving/openai_http_server.h)
// in front of the replicas. Every request becomes a collm.v1 GenerateRequest sent to the router's
// own RouterService over an in-process channel, so it takes exactly the path a gRPC Generate takes
// (routing policy, adapter affinity, the max_outstanding bound, retry before the first token,
// ejection, cancellation) - there is no second routing path. Chats travel as Generate's `chat`
// input and the chosen replica renders them with its own model's template.
#ifndef COLLM_ROUTER_ROUTER_COMPLETION_BACKEND_H_
#define COLLM_ROUTER_ROUTER_COMPLETION_BACKEND_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "collm/router/replica_pool.h"
#include "collm/serving/openai_backend.h"
#include "collm/v1/inference.grpc.pb.h"

namespace collm::router {

// Thread-safe. Each accepted request is read on its own thread (the HTTP server bounds them by
// its `threads`). `pool` is borrowed and must outlive it; the destructor cancels what is in
// flight and waits for those threads.
class RouterCompletionBackend final : public serving::CompletionBackend {
 public:
  // `channel`: to the router's RouterService (GrpcServer::InProcessChannel). `base_model_id`:
  // what /v1/models calls the replicas' base model (requests naming it, or no model, go to the
  // replicas' default adapter).
  RouterCompletionBackend(std::shared_ptr<grpc::Channel> channel, const ReplicaPool& pool,
                          std::string base_model_id);
  ~RouterCompletionBackend() override;

  // The base model and the union of the admitted replicas' adapters (newest version of each),
  // from their last load reports - what the router's ListAdapters returns.
  std::vector<serving::ModelInfo> Models() const override;
  // Unavailable while draining or while no replica is admitted.
  absl::Status Ready() const override;
  // Blocks until the routed stream produced its first message or failed before it, so errors
  // before the first token (no replica, the router or a replica full, an unknown adapter, a bad
  // field) come back as the Status the HTTP layer maps to 503 / 429 / 404 / 400.
  absl::StatusOr<uint64_t> Submit(serving::CompletionRequest request,
                                  std::shared_ptr<serving::CompletionSink> sink) override;
  void Cancel(uint64_t id) override;

  // New requests get Unavailable from now on (SIGTERM drain).
  void SetDraining() { draining_ = true; }

 private:
  struct Call;
  void Relay(std::shared_ptr<Call> call, collm::v1::GenerateRequest request);

  const std::unique_ptr<collm::v1::InferenceService::Stub> stub_;
  const ReplicaPool& pool_;
  const std::string base_model_id_;
  const int64_t created_;  // Unix seconds at construction.
  std::atomic<bool> draining_{false};
  std::mutex mu_;
  std::condition_variable idle_;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::map<uint64_t, std::shared_ptr<Call>> calls_ ABSL_GUARDED_BY(mu_);  // Threads running.
};

}  // namespace collm::router

#endif  // COLLM_ROUTER_ROUTER_COMPLETION_BACKEND_H_
