#include "collm/router/router_completion_backend.h"

#include <ctime>
#include <future>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "collm/common/logging.h"

namespace collm::router {
namespace {

using collm::v1::GenerateRequest;
using collm::v1::GenerateResponse;

// grpc::StatusCode and absl::StatusCode share their numbering (both are the canonical codes).
absl::Status ToAbsl(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

GenerateRequest ToGenerate(const serving::CompletionRequest& r, const std::string& adapter) {
  GenerateRequest g;
  if (r.chat) {
    for (const serving::ChatMessage& m : r.messages) {
      collm::v1::ChatMessage* out = g.mutable_chat()->add_messages();
      out->set_role(m.role);
      out->set_content(m.content);
    }
  } else {
    g.set_prompt(r.prompt);
  }
  g.set_adapter(adapter);
  collm::v1::SamplingParams& p = *g.mutable_sampling();
  // The HTTP layer validated the ranges; the replica validates against its own limits.
  if (r.max_tokens) p.set_max_tokens(static_cast<int32_t>(*r.max_tokens));
  if (r.temperature) p.set_temperature(static_cast<float>(*r.temperature));
  if (r.top_p) p.set_top_p(static_cast<float>(*r.top_p));
  if (r.top_k) p.set_top_k(static_cast<int32_t>(*r.top_k));
  if (r.min_p) p.set_min_p(static_cast<float>(*r.min_p));
  if (r.repetition_penalty) p.set_repetition_penalty(static_cast<float>(*r.repetition_penalty));
  if (r.seed) p.set_seed(*r.seed);
  for (const std::string& s : r.stop) p.add_stop(s);
  p.set_ignore_eos(r.ignore_eos);
  return g;
}

}  // namespace

struct RouterCompletionBackend::Call {
  uint64_t id = 0;
  std::shared_ptr<serving::CompletionSink> sink;
  grpc::ClientContext context;
  std::promise<absl::Status> first;  // Set once: the first message arrived, or why none will.
};

RouterCompletionBackend::RouterCompletionBackend(std::shared_ptr<grpc::Channel> channel,
                                                 const ReplicaPool& pool, std::string base_model_id)
    : stub_(collm::v1::InferenceService::NewStub(std::move(channel))),
      pool_(pool),
      base_model_id_(std::move(base_model_id)),
      created_(static_cast<int64_t>(std::time(nullptr))) {}

RouterCompletionBackend::~RouterCompletionBackend() {
  std::unique_lock<std::mutex> lock(mu_);
  for (auto& entry : calls_) entry.second->context.TryCancel();
  idle_.wait(lock, [&] { return calls_.empty(); });
}

std::vector<serving::ModelInfo> RouterCompletionBackend::Models() const {
  std::map<std::string, collm::v1::AdapterInfo> newest;
  for (const ReplicaStatus& r : pool_.Status()) {
    if (!r.admitted || !r.load_known) continue;
    for (const collm::v1::AdapterInfo& a : r.last_report.adapters()) {
      auto it = newest.find(a.name());
      if (it == newest.end() || it->second.version() < a.version()) newest[a.name()] = a;
    }
  }
  std::vector<serving::ModelInfo> models;
  serving::ModelInfo base;
  base.id = base_model_id_;
  base.created = created_;
  models.push_back(base);
  for (const auto& [name, a] : newest) {
    serving::ModelInfo m;
    m.id = name;
    m.created = created_;
    m.adapter = true;
    m.version = a.version();
    m.parent = base_model_id_;
    m.source = a.source();
    models.push_back(std::move(m));
  }
  return models;
}

absl::Status RouterCompletionBackend::Ready() const {
  if (draining_) return absl::UnavailableError("collm-router is draining (shutting down)");
  for (const ReplicaStatus& r : pool_.Status()) {
    if (r.admitted) return absl::OkStatus();
  }
  return absl::UnavailableError("no replica is admitted (all are unreachable or ejected)");
}

absl::StatusOr<uint64_t> RouterCompletionBackend::Submit(
    serving::CompletionRequest request, std::shared_ptr<serving::CompletionSink> sink) {
  if (draining_) return absl::UnavailableError("collm-router is draining (shutting down)");
  std::string adapter;
  if (!request.model.empty() && request.model != base_model_id_) {
    // Known adapters come from the replicas' last reports; one loaded since reaches them within
    // a poll, and a replica without it answers NOT_FOUND itself.
    bool known = false;
    for (const serving::ModelInfo& m : Models()) known = known || m.id == request.model;
    if (!known) {
      return absl::NotFoundError(
          absl::StrCat("the model '", request.model,
                       "' does not exist on any admitted replica (GET /v1/models "
                       "lists the base model '",
                       base_model_id_, "' and the adapters)"));
    }
    adapter = request.model;
  }
  auto call = std::make_shared<Call>();
  call->sink = std::move(sink);
  std::future<absl::Status> first = call->first.get_future();
  {
    std::lock_guard<std::mutex> lock(mu_);
    call->id = next_id_++;
    calls_[call->id] = call;
  }
  std::thread(&RouterCompletionBackend::Relay, this, call, ToGenerate(request, adapter)).detach();
  absl::Status started = first.get();
  if (!started.ok()) return started;
  return call->id;
}

void RouterCompletionBackend::Relay(std::shared_ptr<Call> call, GenerateRequest request) {
  std::unique_ptr<grpc::ClientReader<GenerateResponse>> reader =
      stub_->Generate(&call->context, request);
  serving::CompletionResult result;
  bool started = false;
  GenerateResponse msg;
  while (reader->Read(&msg)) {
    if (!started) {
      started = true;
      call->first.set_value(absl::OkStatus());
    }
    if (!msg.text().empty()) call->sink->OnText(msg.text());
    if (msg.finish_reason() != collm::v1::FINISH_REASON_UNSPECIFIED) {
      // OpenAI has no "eos": the model stopping by itself is "stop", as a stop string is.
      result.finish_reason =
          msg.finish_reason() == collm::v1::FINISH_REASON_LENGTH ? "length" : "stop";
      result.prompt_tokens = msg.usage().prompt_tokens();
      result.completion_tokens = msg.usage().completion_tokens();
      result.model = msg.adapter().empty() ? base_model_id_ : msg.adapter();
      result.adapter_version = msg.adapter_version();
    }
  }
  const absl::Status status = ToAbsl(reader->Finish());
  if (!started) {
    // Nothing reached the client: Submit reports it (an OK stream always sends its last message).
    call->first.set_value(status.ok() ? absl::InternalError("the replica's stream was empty")
                                      : status);
  } else {
    result.status = status;
    call->sink->OnFinish(result);
  }
  std::lock_guard<std::mutex> lock(mu_);
  calls_.erase(call->id);
  if (calls_.empty()) idle_.notify_all();
}

void RouterCompletionBackend::Cancel(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = calls_.find(id);
  if (it != calls_.end()) it->second->context.TryCancel();
}

}  // namespace collm::router
