// collmd's CompletionBackend: OpenAI requests onto the same path as gRPC Generate (sampling
// defaults, engine::ValidateRequest, Engine::Submit; no second scheduler). The model id names the
// adapter: the base model's id = no adapter (the engine's default_adapter, which with training on
// is the live adapter), an adapter's registry name = that adapter.
#ifndef COLLM_SERVING_OPENAI_ENGINE_BACKEND_H_
#define COLLM_SERVING_OPENAI_ENGINE_BACKEND_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "collm/engine/engine.h"
#include "collm/lora/adapter_registry.h"
#include "collm/runtime/sampler.h"
#include "collm/runtime/tokenizer.h"
#include "collm/serving/chat_prompt_encoder.h"
#include "collm/serving/chat_template.h"
#include "collm/serving/openai_backend.h"

namespace collm::serving {

struct EngineBackendContext {
  engine::Engine* engine = nullptr;               // Required.
  const runtime::Tokenizer* tokenizer = nullptr;  // Required.
  lora::AdapterRegistry* registry = nullptr;      // Required.
  runtime::SamplingParams default_sampling;       // For fields a request leaves unset.
  std::string base_model_id;                      // Non-empty; what /v1/models calls the base.
  std::optional<ChatTemplate> chat_template;      // None: chat requests are refused (400).
};

// Thread-safe. Everything in the context must outlive it.
class EngineCompletionBackend final : public CompletionBackend {
 public:
  explicit EngineCompletionBackend(EngineBackendContext context);

  std::vector<ModelInfo> Models() const override;
  absl::Status Ready() const override;
  absl::StatusOr<uint64_t> Submit(CompletionRequest request,
                                  std::shared_ptr<CompletionSink> sink) override;
  void Cancel(uint64_t id) override;

  // From now on Ready() is Unavailable and new requests get 503 (SIGTERM drain).
  void SetDraining() { draining_ = true; }

  // ChatPromptEncoder::EncodeRendered with this backend's template. Public for tests.
  std::vector<int32_t> EncodeChat(const std::string& rendered) const;

 private:
  EngineBackendContext ctx_;
  const ChatPromptEncoder chat_;
  int64_t created_ = 0;  // Unix seconds at construction.
  std::atomic<bool> draining_{false};
};

}  // namespace collm::serving

#endif  // COLLM_SERVING_OPENAI_ENGINE_BACKEND_H_
