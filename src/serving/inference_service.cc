#include "collm/serving/inference_service.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "collm/common/file_io.h"
#include "collm/common/grpc_status.h"
#include "collm/common/logging.h"
#include "collm/serving/bearer_auth.h"

namespace collm::serving {
namespace {

using collm::v1::GenerateRequest;
using collm::v1::GenerateResponse;

grpc::Status InvalidArgument(std::string message) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, std::move(message));
}

collm::v1::FinishReason ToProto(runtime::FinishReason reason) {
  switch (reason) {
    case runtime::FinishReason::kLength:
      return collm::v1::FINISH_REASON_LENGTH;
    case runtime::FinishReason::kEos:
      return collm::v1::FINISH_REASON_EOS;
    case runtime::FinishReason::kStop:
      return collm::v1::FINISH_REASON_STOP;
  }
  return collm::v1::FINISH_REASON_UNSPECIFIED;
}

void ToProto(const lora::AdapterInfo& info, collm::v1::AdapterInfo* out) {
  out->set_name(info.name);
  out->set_version(info.version);
  out->set_previous_versions(info.previous_versions);
  out->set_rank(info.rank);
  out->set_source(info.source);
  out->set_held_out_loss(info.held_out_loss);
}

// Request fields over the daemon's defaults (engine::ValidateRequest checks the result).
runtime::SamplingParams ResolveSampling(const collm::v1::SamplingParams& in,
                                        const runtime::SamplingParams& defaults) {
  runtime::SamplingParams p = defaults;
  if (in.has_temperature()) p.temperature = in.temperature();
  if (in.has_top_k()) p.top_k = in.top_k();
  if (in.has_top_p()) p.top_p = in.top_p();
  if (in.has_min_p()) p.min_p = in.min_p();
  if (in.has_repetition_penalty()) p.repetition_penalty = in.repetition_penalty();
  if (in.has_seed()) p.seed = in.seed();
  if (in.has_max_tokens()) p.max_tokens = in.max_tokens();
  if (in.stop_size() > 0) p.stop.assign(in.stop().begin(), in.stop().end());
  p.ignore_eos = p.ignore_eos || in.ignore_eos();
  return p;
}

// What the Generate stream shares between the gRPC reactor and the engine's sink. The engine may
// keep the sink (and so this state) after the RPC is gone; `reactor` is null from then on.
class GenerateReactor;
struct StreamState {
  std::mutex mu;
  GenerateReactor* reactor = nullptr;  // Guarded by mu; null after OnDone.
  // Output not yet handed to gRPC; deltas that arrive while a write is in flight coalesce here.
  std::string pending_text;          // Guarded by mu.
  std::vector<int32_t> pending_ids;  // Guarded by mu.
  bool has_pending = false;          // Guarded by mu.
  bool write_in_flight = false;      // Guarded by mu.
  bool write_failed = false;         // Guarded by mu: the client is gone.
  bool engine_done = false;          // Guarded by mu: OnFinish arrived.
  bool final_queued = false;         // Guarded by mu: the last message waits to be written.
  bool finish_started = false;       // Guarded by mu.
  GenerateResponse final_message;    // Guarded by mu.
  grpc::Status final_status;         // Guarded by mu.
};

// One Generate call. Deletes itself in OnDone. At most one write is in flight; whichever thread
// (engine or gRPC) finds the stream idle starts the next write, outside the lock, because gRPC
// may run reactions inline.
class GenerateReactor final : public grpc::ServerWriteReactor<GenerateResponse> {
 public:
  GenerateReactor(engine::Engine* engine, std::shared_ptr<StreamState> state)
      : engine_(engine), state_(std::move(state)) {
    state_->reactor = this;
  }

  // Finishes at once with `status` (a request that never reached the engine).
  void Reject(grpc::Status status) {
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      state_->finish_started = true;
    }
    Finish(std::move(status));
  }

  void SetRequestId(uint64_t id) {
    std::lock_guard<std::mutex> lock(state_->mu);
    engine_id_ = id;
    submitted_ = true;
  }

  // Starts the next write or the Finish when the stream is idle. Any thread, no lock held.
  static void Pump(const std::shared_ptr<StreamState>& state) {
    GenerateReactor* reactor = nullptr;
    enum { kNothing, kWrite, kFinish } action = kNothing;
    grpc::Status status;
    {
      std::lock_guard<std::mutex> lock(state->mu);
      reactor = state->reactor;
      if (reactor == nullptr || state->finish_started || state->write_in_flight) return;
      if (state->write_failed || (state->engine_done && !state->final_status.ok())) {
        // Partial output is not worth sending with an error; a broken stream cannot take it.
        if (!state->engine_done) return;  // The engine still reports; Finish after OnFinish.
        action = kFinish;
        status = state->write_failed && state->final_status.ok()
                     ? grpc::Status(grpc::StatusCode::CANCELLED, "the stream broke")
                     : state->final_status;
      } else if (state->has_pending) {
        reactor->out_.Clear();
        reactor->out_.set_text(std::move(state->pending_text));
        reactor->out_.mutable_token_ids()->Add(state->pending_ids.begin(),
                                               state->pending_ids.end());
        state->pending_text.clear();
        state->pending_ids.clear();
        state->has_pending = false;
        action = kWrite;
      } else if (state->final_queued) {
        reactor->out_ = std::move(state->final_message);
        state->final_queued = false;
        action = kWrite;
      } else if (state->engine_done) {
        action = kFinish;
        status = state->final_status;
      }
      if (action == kWrite) state->write_in_flight = true;
      if (action == kFinish) state->finish_started = true;
    }
    // After these calls the reactor may already be deleted (OnDone on another thread).
    if (action == kWrite) reactor->StartWrite(&reactor->out_);
    if (action == kFinish) reactor->Finish(std::move(status));
  }

  void OnWriteDone(bool ok) override {
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      state_->write_in_flight = false;
      if (!ok) state_->write_failed = true;
    }
    if (!ok) CancelInEngine();
    Pump(state_);
  }

  void OnCancel() override { CancelInEngine(); }

  void OnDone() override {
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      state_->reactor = nullptr;
    }
    delete this;
  }

 private:
  void CancelInEngine() {
    uint64_t id = 0;
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      if (!submitted_ || state_->engine_done || cancel_sent_) return;
      cancel_sent_ = true;
      id = engine_id_;
    }
    engine_->Cancel(id);  // The engine answers with OnFinish(Cancelled) within one step.
  }

  engine::Engine* const engine_;
  const std::shared_ptr<StreamState> state_;
  GenerateResponse out_;      // The message being written; touched only by the writer.
  uint64_t engine_id_ = 0;    // Guarded by state_->mu.
  bool submitted_ = false;    // Guarded by state_->mu.
  bool cancel_sent_ = false;  // Guarded by state_->mu.
};

// The engine's view of one stream. Runs on the engine thread: only queues and pumps.
class StreamSink final : public engine::RequestSink {
 public:
  StreamSink(std::shared_ptr<StreamState> state, std::string request_id)
      : state_(std::move(state)), request_id_(std::move(request_id)) {}

  void OnDelta(const std::string& text, const std::vector<int32_t>& ids) override {
    if (text.empty() && ids.empty()) return;
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      if (state_->reactor == nullptr || state_->write_failed) return;
      state_->pending_text += text;
      state_->pending_ids.insert(state_->pending_ids.end(), ids.begin(), ids.end());
      state_->has_pending = true;
    }
    GenerateReactor::Pump(state_);
  }

  void OnFinish(const engine::RequestResult& result) override {
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      state_->engine_done = true;
      state_->final_status = ToGrpcStatus(result.status);
      if (result.status.ok()) {
        GenerateResponse& m = state_->final_message;
        m.set_finish_reason(ToProto(result.finish_reason));
        m.mutable_usage()->set_prompt_tokens(static_cast<int32_t>(result.prompt_tokens));
        m.mutable_usage()->set_completion_tokens(static_cast<int32_t>(result.completion_tokens));
        m.set_adapter(result.adapter);
        m.set_adapter_version(result.adapter_version);
        m.set_ttft_seconds(result.ttft_seconds);
        m.set_tpot_seconds(result.tpot_seconds);
        m.set_request_id(request_id_);
        state_->final_queued = true;
      }
    }
    GenerateReactor::Pump(state_);
  }

 private:
  const std::shared_ptr<StreamState> state_;
  const std::string request_id_;
};

// Engine deadline (engine clock) for the gRPC deadline; 0 when the client set none.
int64_t EngineDeadline(const grpc::CallbackServerContext& context, const Clock& clock) {
  const auto deadline = context.deadline();
  const auto now = std::chrono::system_clock::now();
  // gRPC reports "no deadline" as the far future.
  if (deadline >= now + std::chrono::hours(24 * 365)) return 0;
  const int64_t remaining =
      std::chrono::duration_cast<std::chrono::nanoseconds>(deadline - now).count();
  return clock.NowNanos() + std::max<int64_t>(remaining, 1);
}

grpc::ServerUnaryReactor* Reply(grpc::CallbackServerContext* context, grpc::Status status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(std::move(status));
  return reactor;
}

// Runs a handler body so that no exception reaches gRPC.
template <typename Fn>
grpc::Status Guarded(const char* method, Fn&& fn) {
  try {
    return fn();
  } catch (const std::exception& e) {
    COLLM_LOG_ERROR("{} failed: {}", method, e.what());
    return grpc::Status(grpc::StatusCode::INTERNAL, absl::StrCat(method, ": ", e.what()));
  } catch (...) {
    return grpc::Status(grpc::StatusCode::INTERNAL, absl::StrCat(method, ": unknown error"));
  }
}

template <typename Fn>
grpc::ServerUnaryReactor* Unary(grpc::CallbackServerContext* context, const char* method, Fn&& fn) {
  return Reply(context, Guarded(method, std::forward<Fn>(fn)));
}

}  // namespace

// One thread and a queue; the destructor runs what is queued, then joins.
class InferenceServiceImpl::Worker {
 public:
  Worker() : thread_([this] { Run(); }) {}
  ~Worker() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  void Post(std::function<void()> fn) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(std::move(fn));
    }
    cv_.notify_one();
  }

 private:
  void Run() {
    for (;;) {
      std::function<void()> fn;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;
        fn = std::move(queue_.front());
        queue_.pop_front();
      }
      fn();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stopping_ = false;
  std::thread thread_;  // Last: starts once the members it uses exist.
};

InferenceServiceImpl::InferenceServiceImpl(ServiceContext context)
    : ctx_(std::move(context)), loader_(std::make_unique<Worker>()) {}

InferenceServiceImpl::~InferenceServiceImpl() = default;

grpc::ServerWriteReactor<GenerateResponse>* InferenceServiceImpl::Generate(
    grpc::CallbackServerContext* context, const GenerateRequest* request) {
  auto state = std::make_shared<StreamState>();
  auto* reactor = new GenerateReactor(ctx_.engine, state);
  try {
    engine::EngineRequest req;
    std::vector<std::string> chat_stop;  // The chat template's end-of-turn strings.
    switch (request->input_case()) {
      case GenerateRequest::kPrompt: {
        if (request->prompt().empty()) {
          reactor->Reject(InvalidArgument("prompt is empty"));
          return reactor;
        }
        const bool add_bos = request->has_add_bos() ? request->add_bos() : true;
        req.prompt = ctx_.tokenizer->Encode(request->prompt(), add_bos);
        break;
      }
      case GenerateRequest::kPromptTokens: {
        const auto& ids = request->prompt_tokens().ids();
        if (ids.empty()) {
          reactor->Reject(InvalidArgument("prompt_tokens is empty"));
          return reactor;
        }
        req.prompt.assign(ids.begin(), ids.end());
        break;
      }
      case GenerateRequest::kChat: {
        if (ctx_.chat == nullptr || !ctx_.chat->has_template()) {
          reactor->Reject(grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                                       "this daemon's model has no chat template: set "
                                       "http.chat_template in its config, or send a prompt"));
          return reactor;
        }
        std::vector<ChatMessage> messages;
        for (const collm::v1::ChatMessage& m : request->chat().messages()) {
          messages.push_back({m.role(), m.content()});
        }
        absl::StatusOr<ChatPrompt> chat = ctx_.chat->Encode(messages);
        if (!chat.ok()) {
          reactor->Reject(ToGrpcStatus(chat.status()));
          return reactor;
        }
        req.prompt = std::move(chat->ids);
        chat_stop = std::move(chat->stop);
        break;
      }
      default:
        reactor->Reject(InvalidArgument("prompt is empty: set prompt, prompt_tokens or chat"));
        return reactor;
    }
    req.params = ResolveSampling(request->sampling(), ctx_.default_sampling);
    for (std::string& s : chat_stop) req.params.stop.push_back(std::move(s));
    const absl::Status valid = engine::ValidateRequest(
        req, ctx_.engine->request_limits(),
        request->input_case() == GenerateRequest::kPromptTokens ? "prompt_tokens.ids"
        : request->input_case() == GenerateRequest::kChat       ? "chat.messages"
                                                                : "prompt");
    if (!valid.ok()) {
      reactor->Reject(ToGrpcStatus(valid));
      return reactor;
    }
    req.adapter = request->adapter();
    req.base_model = request->base_model();
    req.slo_class = request->slo_class();
    req.deadline_nanos = EngineDeadline(*context, *ctx_.clock);

    auto sink = std::make_shared<StreamSink>(state, request->request_id());
    absl::StatusOr<uint64_t> id = ctx_.engine->Submit(std::move(req), std::move(sink));
    if (!id.ok()) {
      reactor->Reject(ToGrpcStatus(id.status()));
      return reactor;
    }
    // Output may already be streaming: gRPC holds writes started before the handler returns.
    reactor->SetRequestId(*id);
  } catch (const std::exception& e) {
    COLLM_LOG_ERROR("Generate failed: {}", e.what());
    reactor->Reject(grpc::Status(grpc::StatusCode::INTERNAL, absl::StrCat("Generate: ", e.what())));
  }
  return reactor;
}

grpc::ServerUnaryReactor* InferenceServiceImpl::Tokenize(grpc::CallbackServerContext* context,
                                                         const collm::v1::TokenizeRequest* request,
                                                         collm::v1::TokenizeResponse* response) {
  return Unary(context, "Tokenize", [&] {
    const bool add_bos = request->has_add_bos() ? request->add_bos() : true;
    for (int32_t id : ctx_.tokenizer->Encode(request->text(), add_bos)) {
      response->add_ids(id);
      response->add_pieces(ctx_.tokenizer->IdToPiece(id));
    }
    return grpc::Status::OK;
  });
}

grpc::ServerUnaryReactor* InferenceServiceImpl::ListAdapters(
    grpc::CallbackServerContext* context, const collm::v1::ListAdaptersRequest* /*request*/,
    collm::v1::ListAdaptersResponse* response) {
  return Unary(context, "ListAdapters", [&] {
    for (const lora::AdapterInfo& info : ctx_.registry->List())
      ToProto(info, response->add_adapters());
    return grpc::Status::OK;
  });
}

grpc::ServerUnaryReactor* InferenceServiceImpl::LoadAdapter(
    grpc::CallbackServerContext* context, const collm::v1::LoadAdapterRequest* request,
    collm::v1::LoadAdapterResponse* response) {
  grpc::Status refused = Guarded("LoadAdapter", [&] {
    if (grpc::Status s = CheckBearerToken(*context, ctx_.admin_token, "admin"); !s.ok()) return s;
    if (request->name().empty()) return InvalidArgument("name is empty");
    if (request->path().empty()) return InvalidArgument("path is empty");
    return grpc::Status::OK;
  });
  if (!refused.ok()) return Reply(context, std::move(refused));
  auto path = ResolveInsideRoots(request->path(), ctx_.adapter_roots);
  if (!path.ok()) {
    const absl::Status& s = path.status();
    if (s.code() == absl::StatusCode::kFailedPrecondition) {
      return Reply(context, grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                                         "LoadAdapter is disabled on this daemon: its config "
                                         "sets no server.adapter_roots"));
    }
    return Reply(context, grpc::Status(s.code() == absl::StatusCode::kNotFound
                                           ? grpc::StatusCode::NOT_FOUND
                                           : grpc::StatusCode::PERMISSION_DENIED,
                                       absl::StrCat(s.message(), " (server.adapter_roots)")));
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  loader_->Post([this, reactor, request, response, path = *std::move(path)] {
    reactor->Finish(Guarded("LoadAdapter", [&] { return Load(*request, path, response); }));
  });
  return reactor;
}

grpc::Status InferenceServiceImpl::Load(const collm::v1::LoadAdapterRequest& request,
                                        const std::string& path,
                                        collm::v1::LoadAdapterResponse* response) {
  auto loaded = ctx_.registry->LoadPeft(request.name(), path);
  if (!loaded.ok()) {
    const auto code = loaded.status().code() == absl::StatusCode::kNotFound
                          ? grpc::StatusCode::NOT_FOUND
                          : grpc::StatusCode::INVALID_ARGUMENT;
    return grpc::Status(code, std::string(loaded.status().message()));
  }
  const lora::AdapterSnapshot& snap = **loaded;
  lora::AdapterInfo info;
  info.name = snap.name;
  info.version = snap.version;
  info.source = snap.source;
  info.held_out_loss = snap.held_out_loss;
  for (const lora::AdapterInfo& listed : ctx_.registry->List()) {
    if (listed.name == snap.name && listed.version == snap.version) info = listed;
  }
  ToProto(info, response->mutable_adapter());
  return grpc::Status::OK;
}

grpc::ServerUnaryReactor* InferenceServiceImpl::UnloadAdapter(
    grpc::CallbackServerContext* context, const collm::v1::UnloadAdapterRequest* request,
    collm::v1::UnloadAdapterResponse* /*response*/) {
  return Unary(context, "UnloadAdapter", [&] {
    if (grpc::Status s = CheckBearerToken(*context, ctx_.admin_token, "admin"); !s.ok()) return s;
    if (request->name().empty()) return InvalidArgument("name is empty");
    return ToGrpcStatus(ctx_.registry->Unload(request->name()));
  });
}

grpc::ServerUnaryReactor* InferenceServiceImpl::SubmitFeedback(
    grpc::CallbackServerContext* context, const collm::v1::SubmitFeedbackRequest* request,
    collm::v1::SubmitFeedbackResponse* response) {
  return Unary(context, "SubmitFeedback", [&] {
    if (request->prompt().empty()) return InvalidArgument("prompt is empty");
    if (ctx_.feedback == nullptr) {
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "training is disabled");
    }
    const std::string* target = nullptr;
    if (!request->corrected_completion().empty()) {
      target = &request->corrected_completion();
    } else if (request->rating() == collm::v1::SubmitFeedbackRequest::RATING_GOOD) {
      if (request->completion().empty()) return InvalidArgument("completion is empty");
      target = &request->completion();
    }
    bool accepted = false;
    if (target != nullptr) {
      engine::TrainingExample example =
          engine::MakeExample(*ctx_.tokenizer, request->prompt(), *target, ctx_.feedback_format);
      if (example.num_targets() > 0) {
        ctx_.feedback->Add(std::move(example));
        accepted = true;
      }
    }
    response->set_accepted_for_training(accepted);
    response->set_buffered_examples(static_cast<int64_t>(ctx_.feedback->size()));
    return grpc::Status::OK;
  });
}

// At most this many examples per call: the score runs on the engine thread between steps.
constexpr int kMaxScoreExamples = 256;

grpc::ServerUnaryReactor* InferenceServiceImpl::ScoreCompletions(
    grpc::CallbackServerContext* context, const collm::v1::ScoreCompletionsRequest* request,
    collm::v1::ScoreCompletionsResponse* response) {
  std::vector<engine::TrainingExample> examples;
  grpc::Status refused = Guarded("ScoreCompletions", [&] {
    const int n = request->examples_size();
    if (n == 0) return InvalidArgument("examples is empty");
    if (n > kMaxScoreExamples) {
      return InvalidArgument(
          absl::StrCat("examples has ", n, " entries; at most ", kMaxScoreExamples, " per call"));
    }
    if (request->base_model() && !request->adapter().empty()) {
      return InvalidArgument(
          absl::StrCat("base_model asks for no adapter; adapter is '", request->adapter(), "'"));
    }
    for (int i = 0; i < n; ++i) {
      const auto& e = request->examples(i);
      if (e.prompt().empty() || e.completion().empty()) {
        return InvalidArgument(
            absl::StrCat("examples[", i, "] needs a non-empty prompt and completion"));
      }
      // Formatted exactly as training data and feedback are.
      examples.push_back(
          engine::MakeExample(*ctx_.tokenizer, e.prompt(), e.completion(), ctx_.feedback_format));
    }
    return grpc::Status::OK;
  });
  if (!refused.ok()) return Reply(context, std::move(refused));
  auto future = std::make_shared<std::future<engine::ScoreResult>>(
      ctx_.engine->Score(std::move(examples), request->adapter(), request->base_model()));
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  loader_->Post([reactor, response, future] {
    reactor->Finish(Guarded("ScoreCompletions", [&] {
      const engine::ScoreResult r = future->get();
      if (!r.status.ok()) return ToGrpcStatus(r.status);
      response->set_loss(r.loss);
      response->set_target_tokens(r.target_tokens);
      response->set_adapter(r.adapter);
      response->set_adapter_version(r.adapter_version);
      return grpc::Status::OK;
    }));
  });
  return reactor;
}

grpc::ServerUnaryReactor* InferenceServiceImpl::GetStats(
    grpc::CallbackServerContext* context, const collm::v1::GetStatsRequest* /*request*/,
    collm::v1::GetStatsResponse* response) {
  return Unary(context, "GetStats", [&] {
    const engine::EngineStats s = ctx_.engine->Stats();
    response->set_queued(s.queued);
    response->set_running(s.running);
    response->set_completed(s.completed);
    response->set_cancelled(s.cancelled);
    response->set_expired(s.expired);
    response->set_rejected_queue_full(s.rejected_queue_full);
    response->set_slo_met(s.slo_met);
    response->set_generated_tokens(s.generated_tokens);
    response->set_kv_blocks_used(s.kv_blocks_used);
    response->set_kv_blocks_total(s.kv_blocks_total);
    response->set_train_optimizer_steps(s.train_optimizer_steps);
    response->set_train_loss(s.train_loss);
    response->set_train_time_share(s.train_time_share);
    response->set_published_versions(s.publish.published);
    response->set_live_held_out_loss(s.publish.live_loss);
    response->set_last_publish_decision(s.publish.last_decision);
    // Load signals for routers.
    response->set_queued_prompt_tokens(s.queued_prompt_tokens);
    response->set_running_context_tokens(s.running_context_tokens);
    response->set_kv_free_fraction(s.kv_blocks_total > 0
                                       ? static_cast<double>(s.kv_blocks_total - s.kv_blocks_used) /
                                             s.kv_blocks_total
                                       : 0.0);
    // A share only counts while training is wanted: the EWMA keeps its last value when idle.
    response->set_training_share_now(std::min(s.train_time_share, s.training_share));
    response->set_infer_step_seconds(s.infer_step_seconds);
    response->set_last_batch_tokens(s.last_batch_tokens);
    response->set_max_step_tokens(s.max_step_tokens);
    if (ctx_.registry != nullptr) {
      // With the source: a federated device's "global vN" tells which global version it serves.
      for (const lora::AdapterInfo& info : ctx_.registry->List()) {
        ToProto(info, response->add_adapters());
      }
    }
    return grpc::Status::OK;
  });
}

}  // namespace collm::serving
