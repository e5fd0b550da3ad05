// gRPC collm.v1.InferenceService on top of the engine (callback API: handlers never block on
// tensors; Generate streams from the engine thread through a per-request reactor).
#ifndef COLLM_SERVING_INFERENCE_SERVICE_H_
#define COLLM_SERVING_INFERENCE_SERVICE_H_

#include <memory>
#include <string>
#include <vector>

#include "collm/common/clock.h"
#include "collm/engine/dataset.h"
#include "collm/engine/engine.h"
#include "collm/lora/adapter_registry.h"
#include "collm/runtime/sampler.h"
#include "collm/runtime/tokenizer.h"
#include "collm/serving/chat_prompt_encoder.h"
#include "collm/v1/inference.grpc.pb.h"

namespace collm::serving {

// Everything the service borrows; all must outlive it.
struct ServiceContext {
  engine::Engine* engine = nullptr;
  const runtime::Tokenizer* tokenizer = nullptr;
  lora::AdapterRegistry* registry = nullptr;            // Required.
  std::shared_ptr<engine::InteractionBuffer> feedback;  // Null: feedback is refused.
  engine::DatasetOptions feedback_format;               // How feedback becomes examples.
  runtime::SamplingParams default_sampling;             // For unset request fields.
  Clock* clock = &Clock::Real();
  // Renders Generate's `chat` input; null: chat requests are refused (FAILED_PRECONDITION).
  const ChatPromptEncoder* chat = nullptr;
  // LoadAdapter reads only PEFT directories inside these (symlinks and ".." resolved); empty =
  // LoadAdapter is refused, as a client must not make the daemon read arbitrary server paths.
  std::vector<std::string> adapter_roots;
  // Bearer token LoadAdapter and UnloadAdapter require ("" = none: anyone who reaches the port).
  std::string admin_token;
};

// Thread-safe (gRPC calls it from its own threads).
class InferenceServiceImpl final : public collm::v1::InferenceService::CallbackService {
 public:
  explicit InferenceServiceImpl(ServiceContext context);
  ~InferenceServiceImpl() override;

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
  grpc::ServerUnaryReactor* ScoreCompletions(
      grpc::CallbackServerContext* context, const collm::v1::ScoreCompletionsRequest* request,
      collm::v1::ScoreCompletionsResponse* response) override;

 private:
  class Worker;
  // The body of LoadAdapter, on loader_ once the call is authorized and `path` confined.
  grpc::Status Load(const collm::v1::LoadAdapterRequest& request, const std::string& path,
                    collm::v1::LoadAdapterResponse* response);
  ServiceContext ctx_;
  // Runs adapter loads (disk reads and parsing) and waits for scores off gRPC's callback
  // threads, one at a time.
  std::unique_ptr<Worker> loader_;
};

}  // namespace collm::serving

#endif  // COLLM_SERVING_INFERENCE_SERVICE_H_
