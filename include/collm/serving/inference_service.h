// gRPC collm.v1.InferenceService on top of the engine (callback API: handlers never block on
// tensors; Generate streams from the engine thread through a per-request reactor).
#ifndef COLLM_SERVING_INFERENCE_SERVICE_H_
#define COLLM_SERVING_INFERENCE_SERVICE_H_

#include <memory>

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
};

// Thread-safe (gRPC calls it from its own threads).
class InferenceServiceImpl final : public collm::v1::InferenceService::CallbackService {
 public:
  explicit InferenceServiceImpl(ServiceContext context);

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

 private:
  ServiceContext ctx_;
};

}  // namespace collm::serving

#endif  // COLLM_SERVING_INFERENCE_SERVICE_H_
