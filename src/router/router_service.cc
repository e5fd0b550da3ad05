#include "collm/router/router_service.h"

#include <algorithm>
#include <chrono>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "collm/common/logging.h"

namespace collm::router {
namespace {

using collm::v1::GenerateRequest;
using collm::v1::GenerateResponse;
using Stub = collm::v1::InferenceService::Stub;

// gRPC reports "no deadline" as the far future.
bool HasDeadline(std::chrono::system_clock::time_point deadline) {
  return deadline < std::chrono::system_clock::now() + std::chrono::hours(24 * 365);
}

// The router does not load a tokenizer: text prompts (and chat messages, before the replica adds
// its template's few markers) are estimated at ~4 bytes per token (what SentencePiece vocabularies
// give on English), token prompts are counted.
int64_t EstimatePromptTokens(const GenerateRequest& request) {
  if (request.input_case() == GenerateRequest::kPromptTokens) {
    return std::max<int64_t>(request.prompt_tokens().ids_size(), 1);
  }
  if (request.input_case() == GenerateRequest::kChat) {
    int64_t bytes = 0;
    for (const collm::v1::ChatMessage& m : request.chat().messages()) bytes += m.content().size();
    return bytes / 4 + 1;
  }
  return static_cast<int64_t>(request.prompt().size()) / 4 + 1;
}

// Failures before the first token that another replica may not have: unreachable or draining
// (UNAVAILABLE), its queue full (RESOURCE_EXHAUSTED), ABORTED.
bool RetryableBeforeFirstToken(grpc::StatusCode code) {
  return code == grpc::StatusCode::UNAVAILABLE || code == grpc::StatusCode::RESOURCE_EXHAUSTED ||
         code == grpc::StatusCode::ABORTED;
}

grpc::ServerUnaryReactor* Reply(grpc::CallbackServerContext* context, grpc::Status status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(std::move(status));
  return reactor;
}

std::chrono::system_clock::time_point UnaryDeadline(const grpc::CallbackServerContext& context,
                                                    int64_t timeout_ms) {
  const auto own = std::chrono::system_clock::now() + std::chrono::milliseconds(timeout_ms);
  return std::min(own, context.deadline());
}

// A unary call forwarded to one admitted replica, retried once on another when the first is
// unreachable. Deletes itself after finishing the server call.
template <typename Req, typename Resp>
class ForwardedUnary {
 public:
  using Call = std::function<void(Stub*, grpc::ClientContext*, const Req*, Resp*,
                                  std::function<void(grpc::Status)>)>;
  static grpc::ServerUnaryReactor* Start(grpc::CallbackServerContext* context, ReplicaPool& pool,
                                         const Req* request, Resp* response, int64_t timeout_ms,
                                         Call call) {
    auto* self = new ForwardedUnary(context, pool, request, response, timeout_ms, std::move(call));
    grpc::ServerUnaryReactor* reactor = self->reactor_;
    self->Attempt();
    return reactor;
  }

 private:
  ForwardedUnary(grpc::CallbackServerContext* context, ReplicaPool& pool, const Req* request,
                 Resp* response, int64_t timeout_ms, Call call)
      : reactor_(context->DefaultReactor()),
        pool_(pool),
        request_(*request),
        response_(response),
        deadline_(UnaryDeadline(*context, timeout_ms)),
        call_(std::move(call)) {}

  void Attempt() {
    absl::StatusOr<ReplicaPool::Lease> lease = pool_.AnyAdmitted(tried_);
    if (!lease.ok()) {
      Done(grpc::Status(grpc::StatusCode::UNAVAILABLE, std::string(lease.status().message())));
      return;
    }
    tried_.push_back(lease->index);
    address_ = lease->address;
    context_ = std::make_unique<grpc::ClientContext>();
    context_->set_deadline(deadline_);
    response_->Clear();
    call_(lease->stub, context_.get(), &request_, response_,
          [this](grpc::Status status) { OnUpstream(std::move(status)); });
  }

  void OnUpstream(grpc::Status status) {
    if (status.error_code() == grpc::StatusCode::UNAVAILABLE && tried_.size() < 2) {
      Attempt();
      return;
    }
    if (!status.ok()) {
      status = grpc::Status(status.error_code(),
                            absl::StrCat("replica ", address_, ": ", status.error_message()));
    }
    Done(std::move(status));
  }

  void Done(grpc::Status status) {
    reactor_->Finish(std::move(status));
    delete this;
  }

  grpc::ServerUnaryReactor* const reactor_;
  ReplicaPool& pool_;
  const Req request_;
  Resp* const response_;
  const std::chrono::system_clock::time_point deadline_;
  const Call call_;
  std::unique_ptr<grpc::ClientContext> context_;
  std::vector<int> tried_;
  std::string address_;
};

}  // namespace

// One proxied Generate stream. The reactor is gRPC's; the relay runs on its own thread (reading
// the replica's stream blocks) and hands each message to the client, one write at a time, so a
// slow client slows its replica stream instead of buffering without bound. Deleted in OnDone,
// which gRPC runs only after the relay thread called Finish, its last touch of the reactor.
class ProxyStream final : public grpc::ServerWriteReactor<GenerateResponse> {
 public:
  ProxyStream(RouterService* service, grpc::CallbackServerContext* context,
              const GenerateRequest& request)
      : service_(service),
        request_(request),
        deadline_(context->deadline()),
        arrival_nanos_(service->clock_.NowNanos()) {}

  void Begin() {
    std::thread([this] { Relay(); }).detach();
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    write_pending_ = false;
    write_ok_ = ok;
    cv_.notify_all();
  }

  void OnCancel() override {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_ = true;
    if (upstream_ != nullptr) upstream_->TryCancel();
    cv_.notify_all();
  }

  void OnDone() override { delete this; }

 private:
  // Writes one message to the client; false when the client is gone.
  bool Write(const GenerateResponse& message) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cancelled_) return false;
      write_pending_ = true;
    }
    StartWrite(&message);
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !write_pending_; });
    return write_ok_;
  }

  void Relay() {
    RouterService* const service = service_;
    grpc::Status status;
    try {
      status = RelayAttempts();
    } catch (const std::exception& e) {
      COLLM_LOG_ERROR("Generate relay failed: {}", e.what());
      status = grpc::Status(grpc::StatusCode::INTERNAL, absl::StrCat("router: ", e.what()));
    }
    Finish(std::move(status));  // `this` may be deleted from here on.
    service->StreamEnded();
  }

  grpc::Status RelayAttempts() {
    coordination::RouteRequest route;
    route.prompt_tokens = EstimatePromptTokens(request_);
    route.adapter = request_.adapter();
    route.min_adapter_version = request_.min_adapter_version();
    std::vector<int> failed;
    const int max_attempts = service_->options_.retry_before_first_token ? 2 : 1;
    for (int attempt = 1;; ++attempt) {
      absl::StatusOr<ReplicaPool::Lease> lease = service_->pool_.Acquire(route, failed);
      if (!lease.ok()) {
        if (service_->metrics_.rejected_no_replica)
          service_->metrics_.rejected_no_replica->Increment();
        return grpc::Status(grpc::StatusCode::UNAVAILABLE, std::string(lease.status().message()));
      }
      if (attempt == 1 && service_->metrics_.routing_delay) {
        service_->metrics_.routing_delay->Observe(
            static_cast<double>(service_->clock_.NowNanos() - arrival_nanos_) * 1e-9);
      }
      bool streamed = false;
      grpc::Status status = RelayFrom(*lease, &streamed);
      const bool unreachable = status.error_code() == grpc::StatusCode::UNAVAILABLE;
      service_->pool_.Release(*lease,
                              unreachable ? ReplicaOutcome::kUnavailable : ReplicaOutcome::kOk);
      if (status.ok()) return status;
      bool cancelled = false;
      {
        std::lock_guard<std::mutex> lock(mu_);
        cancelled = cancelled_;
      }
      if (!streamed && !cancelled && attempt < max_attempts &&
          RetryableBeforeFirstToken(status.error_code())) {
        COLLM_LOG_WARN("replica {} failed before the first token ({}); retrying elsewhere",
                       lease->address, status.error_message());
        if (service_->metrics_.retries) service_->metrics_.retries->Increment();
        failed.push_back(lease->index);
        continue;
      }
      return grpc::Status(status.error_code(), absl::StrCat("replica ", lease->address,
                                                            streamed ? " (after streaming)" : "",
                                                            ": ", status.error_message()));
    }
  }

  // One attempt at one replica: its stream to the client until it ends.
  grpc::Status RelayFrom(const ReplicaPool::Lease& lease, bool* streamed) {
    grpc::ClientContext upstream;
    if (HasDeadline(deadline_)) upstream.set_deadline(deadline_);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cancelled_) return grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled");
      upstream_ = &upstream;
    }
    std::unique_ptr<grpc::ClientReader<GenerateResponse>> reader =
        lease.stub->Generate(&upstream, request_);
    GenerateResponse message;
    bool client_gone = false;
    while (reader->Read(&message)) {
      *streamed = true;
      if (!Write(message)) {
        client_gone = true;
        upstream.TryCancel();
        break;
      }
    }
    grpc::Status status = reader->Finish();
    {
      std::lock_guard<std::mutex> lock(mu_);
      upstream_ = nullptr;
    }
    if (client_gone) return grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
    return status;
  }

  RouterService* const service_;
  const GenerateRequest request_;
  const std::chrono::system_clock::time_point deadline_;
  const int64_t arrival_nanos_;
  std::mutex mu_;
  std::condition_variable cv_;
  grpc::ClientContext* upstream_ = nullptr;  // Guarded by mu_: the attempt in flight.
  bool cancelled_ = false;                   // Guarded by mu_.
  bool write_pending_ = false;               // Guarded by mu_.
  bool write_ok_ = true;                     // Guarded by mu_.
};

RouterService::RouterService(ReplicaPool& pool, RouterServiceOptions options,
                             telemetry::MetricsRegistry& metrics, Clock& clock)
    : pool_(pool), options_(options), clock_(clock) {
  metrics_.retries = metrics.GetCounter("collm_router_retries_total",
                                        "Generate requests retried on another replica before their "
                                        "first token");
  metrics_.rejected_full = metrics.GetCounter("collm_router_rejected_total",
                                              "Generate requests the router refused, by reason",
                                              {{"reason", "max_outstanding"}});
  metrics_.rejected_no_replica = metrics.GetCounter(
      "collm_router_rejected_total", "Generate requests the router refused, by reason",
      {{"reason", "no_replica"}});
  metrics_.rejected_draining = metrics.GetCounter("collm_router_rejected_total",
                                                  "Generate requests the router refused, by reason",
                                                  {{"reason", "draining"}});
  metrics_.routing_delay =
      metrics.GetHistogram("collm_router_routing_delay_seconds",
                           "From a Generate call's arrival to its dispatch to a replica",
                           {0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5});
  metrics_.in_flight =
      metrics.GetGauge("collm_router_in_flight", "Generate streams in flight through the router");
}

RouterService::~RouterService() {
  std::unique_lock<std::mutex> lock(mu_);
  idle_.wait(lock, [&] { return in_flight_ == 0; });
}

void RouterService::StopAccepting() {
  std::lock_guard<std::mutex> lock(mu_);
  accepting_ = false;
}

bool RouterService::WaitForIdle(double seconds) {
  std::unique_lock<std::mutex> lock(mu_);
  return idle_.wait_for(lock, std::chrono::duration<double>(std::max(seconds, 0.0)),
                        [&] { return in_flight_ == 0; });
}

int64_t RouterService::in_flight() const {
  std::lock_guard<std::mutex> lock(mu_);
  return in_flight_;
}

void RouterService::StreamEnded() {
  std::lock_guard<std::mutex> lock(mu_);
  --in_flight_;
  metrics_.in_flight->Set(static_cast<double>(in_flight_));
  idle_.notify_all();
}

grpc::ServerWriteReactor<GenerateResponse>* RouterService::Generate(
    grpc::CallbackServerContext* context, const GenerateRequest* request) {
  auto* stream = new ProxyStream(this, context, *request);
  grpc::Status refusal;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!accepting_) {
      metrics_.rejected_draining->Increment();
      refusal = grpc::Status(grpc::StatusCode::UNAVAILABLE, "the router is shutting down");
    } else if (in_flight_ >= options_.max_outstanding) {
      metrics_.rejected_full->Increment();
      refusal = grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                             absl::StrCat("the router has max_outstanding (",
                                          options_.max_outstanding, ") requests in flight"));
    } else {
      ++in_flight_;
      metrics_.in_flight->Set(static_cast<double>(in_flight_));
    }
  }
  if (!refusal.ok()) {
    stream->Finish(std::move(refusal));
    return stream;
  }
  stream->Begin();
  return stream;
}

grpc::ServerUnaryReactor* RouterService::Tokenize(grpc::CallbackServerContext* context,
                                                  const collm::v1::TokenizeRequest* request,
                                                  collm::v1::TokenizeResponse* response) {
  return ForwardedUnary<collm::v1::TokenizeRequest, collm::v1::TokenizeResponse>::Start(
      context, pool_, request, response, options_.unary_timeout_ms,
      [](Stub* stub, grpc::ClientContext* c, const collm::v1::TokenizeRequest* q,
         collm::v1::TokenizeResponse* r, std::function<void(grpc::Status)> done) {
        stub->async()->Tokenize(c, q, r, std::move(done));
      });
}

grpc::ServerUnaryReactor* RouterService::SubmitFeedback(
    grpc::CallbackServerContext* context, const collm::v1::SubmitFeedbackRequest* request,
    collm::v1::SubmitFeedbackResponse* response) {
  return ForwardedUnary<collm::v1::SubmitFeedbackRequest, collm::v1::SubmitFeedbackResponse>::Start(
      context, pool_, request, response, options_.unary_timeout_ms,
      [](Stub* stub, grpc::ClientContext* c, const collm::v1::SubmitFeedbackRequest* q,
         collm::v1::SubmitFeedbackResponse* r, std::function<void(grpc::Status)> done) {
        stub->async()->SubmitFeedback(c, q, r, std::move(done));
      });
}

grpc::ServerUnaryReactor* RouterService::ListAdapters(
    grpc::CallbackServerContext* context, const collm::v1::ListAdaptersRequest* /*request*/,
    collm::v1::ListAdaptersResponse* response) {
  // Fan out to every admitted replica; the union keeps the newest version of each name.
  struct FanOut {
    grpc::ServerUnaryReactor* reactor;
    collm::v1::ListAdaptersResponse* response;
    std::mutex mu;
    int pending = 0;
    int succeeded = 0;
    std::string last_error;
    std::map<std::string, collm::v1::AdapterInfo> newest;
    std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
    std::vector<std::unique_ptr<collm::v1::ListAdaptersResponse>> answers;
    collm::v1::ListAdaptersRequest request;
  };
  auto fan = std::make_shared<FanOut>();
  fan->reactor = context->DefaultReactor();
  fan->response = response;
  const auto deadline = UnaryDeadline(*context, options_.unary_timeout_ms);
  std::vector<std::pair<std::string, Stub*>> targets;
  std::vector<ReplicaStatus> status = pool_.Status();
  std::vector<int> skip;
  for (int i = 0; i < static_cast<int>(status.size()); ++i) {
    if (!status[i].admitted) skip.push_back(i);
  }
  // AnyAdmitted in turn yields every admitted replica exactly once.
  std::vector<int> seen = skip;
  for (;;) {
    absl::StatusOr<ReplicaPool::Lease> lease = pool_.AnyAdmitted(seen);
    if (!lease.ok()) break;
    seen.push_back(lease->index);
    targets.emplace_back(lease->address, lease->stub);
  }
  if (targets.empty()) {
    return Reply(context, grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                       "no replica is available: all are ejected"));
  }
  fan->pending = static_cast<int>(targets.size());
  for (size_t i = 0; i < targets.size(); ++i) {
    fan->contexts.push_back(std::make_unique<grpc::ClientContext>());
    fan->contexts.back()->set_deadline(deadline);
    fan->answers.push_back(std::make_unique<collm::v1::ListAdaptersResponse>());
  }
  for (size_t i = 0; i < targets.size(); ++i) {
    collm::v1::ListAdaptersResponse* answer = fan->answers[i].get();
    const std::string address = targets[i].first;
    targets[i].second->async()->ListAdapters(
        fan->contexts[i].get(), &fan->request, answer, [fan, answer, address](grpc::Status s) {
          bool last = false;
          {
            std::lock_guard<std::mutex> lock(fan->mu);
            if (s.ok()) {
              ++fan->succeeded;
              for (const auto& a : answer->adapters()) {
                auto it = fan->newest.find(a.name());
                if (it == fan->newest.end() || it->second.version() < a.version()) {
                  fan->newest[a.name()] = a;
                }
              }
            } else {
              fan->last_error = absl::StrCat("replica ", address, ": ", s.error_message());
            }
            last = --fan->pending == 0;
          }
          if (!last) return;
          if (fan->succeeded == 0) {
            fan->reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, fan->last_error));
            return;
          }
          for (const auto& [name, info] : fan->newest) *fan->response->add_adapters() = info;
          fan->reactor->Finish(grpc::Status::OK);
        });
  }
  return fan->reactor;
}

grpc::ServerUnaryReactor* RouterService::LoadAdapter(
    grpc::CallbackServerContext* context, const collm::v1::LoadAdapterRequest* /*request*/,
    collm::v1::LoadAdapterResponse* /*response*/) {
  return Reply(context, grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                                     "collm-router does not manage adapters: call LoadAdapter on "
                                     "each replica (the router routes by what they report)"));
}

grpc::ServerUnaryReactor* RouterService::UnloadAdapter(
    grpc::CallbackServerContext* context, const collm::v1::UnloadAdapterRequest* /*request*/,
    collm::v1::UnloadAdapterResponse* /*response*/) {
  return Reply(context, grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                                     "collm-router does not manage adapters: call UnloadAdapter "
                                     "on each replica"));
}

grpc::ServerUnaryReactor* RouterService::GetStats(grpc::CallbackServerContext* context,
                                                  const collm::v1::GetStatsRequest* /*request*/,
                                                  collm::v1::GetStatsResponse* out) {
  // The sum over the replicas' last load reports (at most poll_interval_ms old); shares and
  // per-step costs are the mean over replicas that reported.
  int reported = 0;
  std::map<std::string, int64_t> adapters;
  double train_time_share = 0, training_share_now = 0, infer_step_seconds = 0;
  for (const ReplicaStatus& r : pool_.Status()) {
    if (!r.load_known) continue;
    const collm::v1::GetStatsResponse& s = r.last_report;
    ++reported;
    out->set_queued(out->queued() + s.queued());
    out->set_running(out->running() + s.running());
    out->set_completed(out->completed() + s.completed());
    out->set_cancelled(out->cancelled() + s.cancelled());
    out->set_expired(out->expired() + s.expired());
    out->set_rejected_queue_full(out->rejected_queue_full() + s.rejected_queue_full());
    out->set_slo_met(out->slo_met() + s.slo_met());
    out->set_generated_tokens(out->generated_tokens() + s.generated_tokens());
    out->set_kv_blocks_used(out->kv_blocks_used() + s.kv_blocks_used());
    out->set_kv_blocks_total(out->kv_blocks_total() + s.kv_blocks_total());
    out->set_train_optimizer_steps(out->train_optimizer_steps() + s.train_optimizer_steps());
    out->set_published_versions(out->published_versions() + s.published_versions());
    out->set_queued_prompt_tokens(out->queued_prompt_tokens() + s.queued_prompt_tokens());
    out->set_running_context_tokens(out->running_context_tokens() + s.running_context_tokens());
    out->set_last_batch_tokens(out->last_batch_tokens() + s.last_batch_tokens());
    out->set_max_step_tokens(out->max_step_tokens() + s.max_step_tokens());
    train_time_share += s.train_time_share();
    training_share_now += s.training_share_now();
    infer_step_seconds += s.infer_step_seconds();
    for (const auto& a : s.adapters()) {
      int64_t& v = adapters[a.name()];
      v = std::max(v, a.version());
    }
  }
  if (reported > 0) {
    out->set_train_time_share(train_time_share / reported);
    out->set_training_share_now(training_share_now / reported);
    out->set_infer_step_seconds(infer_step_seconds / reported);
  }
  out->set_kv_free_fraction(
      out->kv_blocks_total() > 0
          ? static_cast<double>(out->kv_blocks_total() - out->kv_blocks_used()) /
                static_cast<double>(out->kv_blocks_total())
          : 0.0);
  for (const auto& [name, version] : adapters) {
    collm::v1::AdapterInfo* a = out->add_adapters();
    a->set_name(name);
    a->set_version(version);
  }
  return Reply(context, grpc::Status::OK);
}

}  // namespace collm::router
