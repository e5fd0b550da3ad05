#include "collm/serving/openai_engine_backend.h"

#include <ctime>
#include <utility>

#include "absl/strings/str_cat.h"

namespace collm::serving {
namespace {

// The engine's output, as the HTTP layer's sink wants it. Engine thread; never blocks.
class EngineSink final : public engine::RequestSink {
 public:
  EngineSink(std::shared_ptr<CompletionSink> sink, std::string base_model_id)
      : sink_(std::move(sink)), base_model_id_(std::move(base_model_id)) {}

  void OnDelta(const std::string& text, const std::vector<int32_t>&) override {
    if (!text.empty()) sink_->OnText(text);
  }
  void OnFinish(const engine::RequestResult& r) override {
    CompletionResult out;
    out.status = r.status;
    // OpenAI has no "eos": the model stopping by itself is "stop", as a stop string is.
    out.finish_reason = r.finish_reason == runtime::FinishReason::kLength ? "length" : "stop";
    out.prompt_tokens = r.prompt_tokens;
    out.completion_tokens = r.completion_tokens;
    out.model = r.adapter.empty() ? base_model_id_ : r.adapter;
    out.adapter_version = r.adapter_version;
    sink_->OnFinish(out);
  }

 private:
  const std::shared_ptr<CompletionSink> sink_;
  const std::string base_model_id_;
};

}  // namespace

EngineCompletionBackend::EngineCompletionBackend(EngineBackendContext context)
    : ctx_(std::move(context)),
      chat_(ctx_.chat_template, *ctx_.tokenizer),
      created_(static_cast<int64_t>(std::time(nullptr))) {}

std::vector<ModelInfo> EngineCompletionBackend::Models() const {
  std::vector<ModelInfo> models;
  ModelInfo base;
  base.id = ctx_.base_model_id;
  base.created = created_;
  models.push_back(base);
  for (const lora::AdapterInfo& a : ctx_.registry->List()) {
    ModelInfo m;
    m.id = a.name;
    m.created = created_;
    m.adapter = true;
    m.version = a.version;
    m.parent = ctx_.base_model_id;
    m.source = a.source;
    models.push_back(std::move(m));
  }
  return models;
}

absl::Status EngineCompletionBackend::Ready() const {
  if (draining_) return absl::UnavailableError("collmd is draining (shutting down)");
  return absl::OkStatus();
}

std::vector<int32_t> EngineCompletionBackend::EncodeChat(const std::string& rendered) const {
  return chat_.EncodeRendered(rendered);
}

absl::StatusOr<uint64_t> EngineCompletionBackend::Submit(CompletionRequest request,
                                                         std::shared_ptr<CompletionSink> sink) {
  if (draining_) return absl::UnavailableError("collmd is draining (shutting down)");
  engine::EngineRequest req;
  if (!request.model.empty() && request.model != ctx_.base_model_id) {
    if (!ctx_.registry->Get(request.model).ok()) {
      return absl::NotFoundError(absl::StrCat("the model '", request.model,
                                              "' does not exist (GET /v1/models lists the base "
                                              "model '",
                                              ctx_.base_model_id, "' and the adapters)"));
    }
    req.adapter = request.model;
  }
  runtime::SamplingParams& p = req.params;
  p = ctx_.default_sampling;
  if (request.max_tokens) p.max_tokens = static_cast<int>(*request.max_tokens);
  if (request.temperature) p.temperature = static_cast<float>(*request.temperature);
  if (request.top_p) p.top_p = static_cast<float>(*request.top_p);
  if (request.top_k) p.top_k = static_cast<int>(*request.top_k);
  if (request.min_p) p.min_p = static_cast<float>(*request.min_p);
  if (request.repetition_penalty)
    p.repetition_penalty = static_cast<float>(*request.repetition_penalty);
  if (request.seed) p.seed = *request.seed;
  if (!request.stop.empty()) p.stop = request.stop;
  p.ignore_eos = p.ignore_eos || request.ignore_eos;
  if (request.chat) {
    absl::StatusOr<ChatPrompt> chat = chat_.Encode(request.messages);
    if (!chat.ok()) return chat.status();
    req.prompt = std::move(chat->ids);
    for (std::string& s : chat->stop) p.stop.push_back(std::move(s));
  } else {
    req.prompt = ctx_.tokenizer->Encode(request.prompt, /*add_bos=*/true);
  }
  const absl::Status valid = engine::ValidateRequest(req, ctx_.engine->request_limits(),
                                                     request.chat ? "messages" : "prompt");
  if (!valid.ok()) return valid;
  return ctx_.engine->Submit(std::move(req),
                             std::make_shared<EngineSink>(std::move(sink), ctx_.base_model_id));
}

void EngineCompletionBackend::Cancel(uint64_t id) { ctx_.engine->Cancel(id); }

}  // namespace collm::serving
