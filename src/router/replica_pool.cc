#include "collm/router/replica_pool.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "collm/common/logging.h"

namespace collm::router {
namespace {

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address, int64_t max_bytes) {
  grpc::ChannelArguments args;
  const int limit = static_cast<int>(std::min<int64_t>(max_bytes, INT_MAX));
  args.SetMaxReceiveMessageSize(limit);
  args.SetMaxSendMessageSize(limit);
  // A restarted replica should be reachable again within about a second, not gRPC's default
  // minutes of backoff, so re-admission follows its health probe promptly.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

}  // namespace

absl::StatusOr<std::unique_ptr<ReplicaPool>> ReplicaPool::Create(
    ReplicaPoolOptions options, Clock& clock, telemetry::MetricsRegistry* metrics) {
  if (options.replicas.empty()) {
    return absl::InvalidArgumentError("replicas must list at least one replica");
  }
  if (auto s = coordination::ValidateSlackOptions(options.slack); !s.ok()) return s;
  if (auto s = coordination::ValidateEjectionOptions(options.ejection); !s.ok()) return s;
  if (options.poll_interval_ms < 1 || options.poll_timeout_ms < 1) {
    return absl::InvalidArgumentError("poll_interval_ms and poll_timeout_ms must be >= 1");
  }
  return std::unique_ptr<ReplicaPool>(new ReplicaPool(std::move(options), clock, metrics));
}

ReplicaPool::ReplicaPool(ReplicaPoolOptions options, Clock& clock,
                         telemetry::MetricsRegistry* metrics)
    : options_(std::move(options)),
      clock_(clock),
      names_(options_.replicas),
      policy_(options_.policy, options_.slack, options_.seed) {
  replicas_.resize(options_.replicas.size());
  for (size_t i = 0; i < replicas_.size(); ++i) {
    Replica& r = replicas_[i];
    r.address = options_.replicas[i];
    r.stub =
        collm::v1::InferenceService::NewStub(MakeChannel(r.address, options_.max_message_bytes));
    r.health = coordination::ReplicaHealth(options_.ejection);
    stubs_.push_back(r.stub.get());
    if (metrics != nullptr) {
      const telemetry::Labels labels = {{"replica", r.address}};
      r.routed =
          metrics->GetCounter("collm_router_routed_total",
                              "Generate requests sent to each replica (retries included)", labels);
      r.ejections = metrics->GetCounter("collm_router_ejections_total",
                                        "Times each replica was ejected as unhealthy", labels);
      r.admitted_gauge =
          metrics->GetGauge("collm_router_replica_admitted",
                            "1 while the replica takes requests, 0 while ejected", labels);
      r.outstanding_gauge = metrics->GetGauge(
          "collm_router_outstanding", "Generate requests in flight at each replica", labels);
      r.predicted_ttft = metrics->GetGauge(
          "collm_router_predicted_ttft_seconds",
          "The slack policy's last predicted time to first token at each replica", labels);
      r.admitted_gauge->Set(1);
    }
  }
}

ReplicaPool::~ReplicaPool() { Stop(); }

void ReplicaPool::Start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (poller_.joinable() || stop_) return;
  poller_ = std::thread([this] { PollLoop(); });
}

void ReplicaPool::Stop() {
  std::thread poller;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    poller = std::move(poller_);
  }
  cv_.notify_all();
  if (poller.joinable()) poller.join();
  // Poll callbacks touch `this`; wait for those in flight (each ends within poll_timeout_ms).
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return polls_in_flight_ == 0; });
}

void ReplicaPool::WaitForFirstPoll(int64_t timeout_ms) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms), [&] {
    return std::all_of(replicas_.begin(), replicas_.end(),
                       [](const Replica& r) { return r.polled_once; });
  });
}

void ReplicaPool::PollLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    // A replica whose previous poll has not answered yet is not polled again, so a hung replica
    // costs one call per poll_timeout_ms, not one per interval.
    std::vector<int> due;
    for (int i = 0; i < static_cast<int>(replicas_.size()); ++i) {
      if (replicas_[i].poll_in_flight) continue;
      replicas_[i].poll_in_flight = true;
      ++polls_in_flight_;
      due.push_back(i);
    }
    // gRPC may run a completion inline; OnReport takes mu_, so no lock while calling out.
    lock.unlock();
    for (int i : due) PollOne(i);
    lock.lock();
    cv_.wait_for(lock, std::chrono::milliseconds(options_.poll_interval_ms), [&] { return stop_; });
  }
}

void ReplicaPool::PollOne(int index) {
  struct Call {
    grpc::ClientContext context;
    collm::v1::GetStatsRequest request;
    collm::v1::GetStatsResponse response;
    int64_t start = 0;
  };
  auto call = std::make_shared<Call>();
  call->start = clock_.NowNanos();
  call->context.set_deadline(std::chrono::system_clock::now() +
                             std::chrono::milliseconds(options_.poll_timeout_ms));
  // The stub is fixed after Create, so reading it without mu_ is safe.
  collm::v1::InferenceService::Stub* stub = stubs_[index];
  stub->async()->GetStats(&call->context, &call->request, &call->response,
                          [this, index, call](grpc::Status status) {
                            OnReport(index, call->start, status, call->response);
                          });
}

void ReplicaPool::OnReport(int index, int64_t poll_start, const grpc::Status& status,
                           const collm::v1::GetStatsResponse& report) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    Replica& r = replicas_[index];
    r.poll_in_flight = false;
    r.polled_once = true;
    --polls_in_flight_;
    if (!status.ok()) {
      RecordFailure(r, absl::StrCat("GetStats: ", status.error_message()));
    } else {
      RecordSuccess(r);
      r.last_report = report;
      coordination::ReplicaView& v = r.view;
      v.load_known = true;
      v.queued_prompt_tokens = report.queued_prompt_tokens();
      v.running_sequences = report.running();
      v.running_context_tokens = report.running_context_tokens();
      v.kv_free_fraction = report.kv_blocks_total() > 0 ? report.kv_free_fraction() : 1.0;
      v.training_share = report.training_share_now();
      v.seconds_per_token =
          report.infer_step_seconds() > 0 && report.last_batch_tokens() > 0
              ? report.infer_step_seconds() / static_cast<double>(report.last_batch_tokens())
              : 0.0;
      v.adapters.clear();
      for (const auto& a : report.adapters()) {
        int64_t& version = v.adapters[a.name()];
        version = std::max(version, a.version());
      }
      // Requests routed before this poll started are in the report (queued or running).
      while (!r.sent.empty() && r.sent.front().first < poll_start) r.sent.pop_front();
      UpdateUnreported(r, clock_.NowNanos());
    }
  }
  cv_.notify_all();
}

void ReplicaPool::UpdateUnreported(Replica& r, int64_t now) {
  // Entries older than a few poll timeouts are dropped even without a report, so a replica that
  // stopped answering polls does not accumulate phantom load forever.
  const int64_t horizon = now - 4 * options_.poll_timeout_ms * 1000000;
  while (!r.sent.empty() && r.sent.front().first < horizon) r.sent.pop_front();
  int64_t tokens = 0;
  for (const auto& [when, n] : r.sent) tokens += n;
  r.view.unreported_prompt_tokens = tokens;
}

void ReplicaPool::RecordFailure(Replica& r, const std::string& why) {
  const bool was_admitted = r.health.admitted();
  if (r.health.RecordFailure(clock_.NowNanos())) {
    COLLM_LOG_WARN("replica {} ejected after {} failures ({})", r.address,
                   options_.ejection.failures_to_eject, why);
    if (r.ejections) r.ejections->Increment();
  }
  if (was_admitted != r.health.admitted() && r.admitted_gauge) r.admitted_gauge->Set(0);
  r.view.admitted = r.health.admitted();
}

void ReplicaPool::RecordSuccess(Replica& r) {
  if (r.health.RecordSuccess(clock_.NowNanos())) {
    COLLM_LOG_INFO("replica {} re-admitted", r.address);
    if (r.admitted_gauge) r.admitted_gauge->Set(1);
  }
  r.view.admitted = r.health.admitted();
}

absl::StatusOr<ReplicaPool::Lease> ReplicaPool::Acquire(const coordination::RouteRequest& request,
                                                        const std::vector<int>& exclude) {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t now = clock_.NowNanos();
  std::vector<coordination::ReplicaView> views;
  views.reserve(replicas_.size());
  for (Replica& r : replicas_) {
    UpdateUnreported(r, now);
    views.push_back(r.view);
  }
  if (!options_.slack.per_replica_cost) {
    double sum = 0;
    int measured = 0;
    for (const coordination::ReplicaView& v : views) {
      if (v.load_known && v.seconds_per_token > 0) {
        sum += v.seconds_per_token;
        ++measured;
      }
    }
    if (measured > 0) {
      for (coordination::ReplicaView& v : views) v.seconds_per_token = sum / measured;
    }
  }
  absl::StatusOr<coordination::RouteDecision> d = policy_.Choose(request, views, names_, exclude);
  if (!d.ok()) return d.status();
  for (size_t i = 0; i < d->predicted_ttft_s.size(); ++i) {
    if (d->predicted_ttft_s[i] >= 0 && replicas_[i].predicted_ttft) {
      replicas_[i].predicted_ttft->Set(d->predicted_ttft_s[i]);
    }
  }
  Replica& r = replicas_[d->index];
  ++r.view.outstanding;
  r.sent.emplace_back(now, std::max<int64_t>(request.prompt_tokens, 1));
  UpdateUnreported(r, now);
  if (r.routed) r.routed->Increment();
  if (r.outstanding_gauge) r.outstanding_gauge->Set(static_cast<double>(r.view.outstanding));
  return Lease{d->index, r.address, r.stub.get()};
}

void ReplicaPool::Release(const Lease& lease, ReplicaOutcome outcome) {
  std::lock_guard<std::mutex> lock(mu_);
  Replica& r = replicas_[lease.index];
  r.view.outstanding = std::max<int64_t>(r.view.outstanding - 1, 0);
  if (r.outstanding_gauge) r.outstanding_gauge->Set(static_cast<double>(r.view.outstanding));
  if (outcome == ReplicaOutcome::kUnavailable) RecordFailure(r, "a request found it unavailable");
}

absl::StatusOr<ReplicaPool::Lease> ReplicaPool::AnyAdmitted(const std::vector<int>& exclude) {
  std::lock_guard<std::mutex> lock(mu_);
  const size_t n = replicas_.size();
  for (size_t k = 0; k < n; ++k) {
    const size_t i = (any_cursor_ + k) % n;
    Replica& r = replicas_[i];
    if (!r.health.admitted()) continue;
    if (std::find(exclude.begin(), exclude.end(), static_cast<int>(i)) != exclude.end()) continue;
    any_cursor_ = (i + 1) % n;
    return Lease{static_cast<int>(i), r.address, r.stub.get()};
  }
  return absl::UnavailableError("no replica is available: all are ejected or failed this call");
}

std::vector<ReplicaStatus> ReplicaPool::Status() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<ReplicaStatus> out;
  for (const Replica& r : replicas_) {
    ReplicaStatus s;
    s.address = r.address;
    s.admitted = r.health.admitted();
    s.load_known = r.view.load_known;
    s.outstanding = r.view.outstanding;
    s.last_report = r.last_report;
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace collm::router
