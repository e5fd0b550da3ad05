#include "collm/engine/engine.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "collm/common/logging.h"
#include "collm/common/status.h"
#include "collm/engine/batch_planner.h"

namespace collm::engine {

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(
    std::shared_ptr<const runtime::LlamaModel> model, const runtime::Tokenizer* tokenizer,
    lora::AdapterRegistry* registry, const EngineOptions& options, Clock& clock) {
  auto bad = [](const std::string& field, int64_t v) {
    return absl::InvalidArgumentError(absl::StrCat("engine.", field, " must be > 0, got ", v));
  };
  if (options.max_step_tokens <= 0) return bad("max_step_tokens", options.max_step_tokens);
  if (options.max_running <= 0) return bad("max_running", options.max_running);
  if (options.max_queued <= 0) return bad("max_queued", options.max_queued);
  coordination::CoExecutionOptions co;
  co.training_share = options.training_share;
  co.slo_guard = options.slo_guard;
  co.guard_safety = options.guard_safety;
  co.guard_idle_risk = options.guard_idle_risk;
  co.max_phase_ms = options.max_phase_ms;
  co.tightest_ttft_ms = options.default_slo.ttft_ms > 0 ? options.default_slo.ttft_ms : 0;
  for (const auto& [name, slo] : options.slo_classes) {
    if (slo.ttft_ms > 0 && (co.tightest_ttft_ms <= 0 || slo.ttft_ms < co.tightest_ttft_ms)) {
      co.tightest_ttft_ms = slo.ttft_ms;
    }
  }
  COLLM_RETURN_IF_ERROR(coordination::ValidateCoExecutionOptions(co));
  COLLM_RETURN_IF_ERROR(coordination::ValidateShareControllerOptions(options.share_controller));
  if (!options.default_adapter.empty() &&
      (registry == nullptr || !registry->Get(options.default_adapter).ok())) {
    return absl::NotFoundError(
        absl::StrCat("engine.default_adapter '", options.default_adapter, "' is not loaded"));
  }
  std::unique_ptr<Engine> e(new Engine());
  e->model_ = std::move(model);
  e->tokenizer_ = tokenizer;
  e->registry_ = registry;
  e->options_ = options;
  e->clock_ = &clock;
  e->policy_ = std::make_unique<coordination::CoExecutionPolicy>(co, 0, clock);
  e->share_ = std::make_unique<coordination::ShareController>(options.share_controller, clock);
  e->share_ceiling_ = options.training_share;
  e->admission_ = std::make_unique<coordination::AdmissionController>(options.admission,
                                                                      options.max_step_tokens);
  e->load_.max_running = options.max_running;
  COLLM_ASSIGN_OR_RETURN(e->cache_, runtime::KvCache::Create(e->model_->config(), options.kv_cache,
                                                             e->model_->runtime()));
  e->stats_.kv_blocks_total = e->cache_->num_blocks();
  e->stats_.training_share = options.training_share;
  e->stats_.training_share_ceiling = options.training_share;
  e->stats_.max_step_tokens = options.max_step_tokens;
  return e;
}

Engine::~Engine() { Shutdown(0); }

void Engine::Start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (thread_.joinable() || stop_) return;
  thread_ = std::thread([this] { Loop(); });
}

void Engine::SetMetrics(telemetry::MetricsRegistry* registry) {
  if (registry == nullptr) {
    metrics_.reset();
    return;
  }
  metrics_ = std::make_unique<EngineMetrics>(*registry, cache_->num_blocks());
}

RequestLimits Engine::request_limits() const {
  RequestLimits limits;
  limits.vocab_size = model_->config().vocab_size;
  limits.context_size = model_->config().max_position_embeddings;
  limits.has_tokenizer = tokenizer_ != nullptr;
  return limits;
}

absl::StatusOr<uint64_t> Engine::Submit(EngineRequest request, std::shared_ptr<RequestSink> sink) {
  COLLM_RETURN_IF_ERROR(ValidateRequest(request, request_limits()));
  auto seq = std::make_unique<Sequence>();
  seq->slo = options_.default_slo;
  if (!request.slo_class.empty()) {
    auto it = options_.slo_classes.find(request.slo_class);
    if (it == options_.slo_classes.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("slo_class '", request.slo_class, "' is not configured"));
    }
    seq->slo = it->second;
  }
  if (request.base_model && !request.adapter.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("base_model asks for no adapter; adapter is '", request.adapter, "'"));
  }
  const std::string adapter = request.base_model        ? std::string()
                              : request.adapter.empty() ? options_.default_adapter
                                                        : request.adapter;
  if (!adapter.empty()) {
    if (registry_ == nullptr)
      return absl::NotFoundError(absl::StrCat("no adapter named '", adapter, "'"));
    COLLM_ASSIGN_OR_RETURN(seq->pin, registry_->Get(adapter));  // Pinned for the whole request.
  }
  const int64_t n = static_cast<int64_t>(request.prompt.size());
  seq->limit =
      std::min<int64_t>(request.params.max_tokens, model_->config().max_position_embeddings - n);
  if (cache_->BlocksFor(n + seq->limit) > cache_->num_blocks()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("request needs ", cache_->BlocksFor(n + seq->limit),
                     " KV blocks; the cache has ", cache_->num_blocks()));
  }
  seq->context = request.prompt;
  seq->sampler.emplace(request.params);
  if (tokenizer_ != nullptr) {
    seq->detok.emplace(*tokenizer_, request.prompt);
    seq->stops.emplace(request.params.stop);
  }
  seq->request = std::move(request);
  seq->sink = std::move(sink);
  seq->submit_nanos = clock_->NowNanos();

  std::lock_guard<std::mutex> lock(mu_);
  arrivals_.Record(seq->submit_nanos);
  load_rates_.RecordArrival(seq->submit_nanos);
  if (!accepting_) return absl::UnavailableError("the engine is shutting down");
  if (static_cast<int64_t>(queue_.size()) >= options_.max_queued) {
    ++stats_.rejected_queue_full;
    return absl::ResourceExhaustedError(
        absl::StrCat("request queue is full (", options_.max_queued, ")"));
  }
  // SLO-aware admission: would it make its TTFT behind what is queued in front and the running
  // batch? The prediction uses the step cost measured so far; before any, everything is admitted.
  coordination::QueuedRequest candidate;
  candidate.ttft_ms = seq->slo.ttft_ms;
  candidate.submit_nanos = seq->submit_nanos;
  candidate.prompt_tokens = n;
  const int64_t ahead = FrontPrefillTokensLocked();
  if (admission_->WillMiss(candidate, ahead, load_, seq->submit_nanos)) {
    if (admission_->mode() == coordination::AdmissionMode::kReject) {
      CountShedLocked(*seq, "rejected");
      const double predicted_ms =
          admission_->PredictTtftSeconds(candidate, ahead, load_, seq->submit_nanos) * 1e3;
      return absl::ResourceExhaustedError(absl::StrCat(
          "request cannot meet its TTFT objective of ", seq->slo.ttft_ms, " ms (slo_class '",
          seq->request.slo_class.empty() ? "default" : seq->request.slo_class, "'): predicted ",
          static_cast<int64_t>(std::lround(predicted_ms)), " ms with ", ahead,
          " prompt tokens queued ahead and ", load_.running, " running; retry later"));
    }
    seq->deprioritized = true;
    CountShedLocked(*seq, "deprioritized");
  }
  seq->id = next_id_++;
  const uint64_t id = seq->id;
  stats_.queued_prompt_tokens += seq->prompt_size();
  if (seq->deprioritized) {
    queue_.push_back(std::move(seq));
  } else {
    // In front of every deprioritised request, first come first served among the others.
    auto at = std::find_if(queue_.begin(), queue_.end(),
                           [](const std::unique_ptr<Sequence>& q) { return q->deprioritized; });
    queue_.insert(at, std::move(seq));
  }
  stats_.queued = static_cast<int64_t>(queue_.size());
  wake_.notify_one();
  return id;
}

void Engine::Cancel(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  cancel_requests_.insert(id);
  wake_.notify_one();
}

void Engine::Shutdown(double grace_seconds) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    accepting_ = false;
    if (shutdown_deadline_nanos_ == 0) {
      shutdown_deadline_nanos_ = clock_->NowNanos() + static_cast<int64_t>(grace_seconds * 1e9) + 1;
    }
    stop_ = true;
    wake_.notify_one();
  }
  if (thread_.joinable()) {
    thread_.join();
  } else {
    // Never started: drive the remaining work here.
    while (Step()) {
    }
  }
  // A held-out evaluation still running decides now, so the final stats (and the live version a
  // restarted daemon finds) include it.
  if (training_.publisher != nullptr && training_.publisher->pending()) PollPublisher(true);
  // The engine thread is gone, so this thread owns the trainer now: settle every posted hook
  // (late ones are refused by PostCommand) and the running task, so no future is left hanging.
  std::vector<std::function<void()>> left;
  {
    std::lock_guard<std::mutex> lock(mu_);
    commands_closed_ = true;
    left.swap(commands_);
  }
  for (auto& c : left) c();
  if (task_) EndTask(absl::CancelledError("the engine shut down during the training task"));
}

EngineStats Engine::Stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

bool Engine::StepForTest() { return Step(); }

void Engine::SetCostEstimatesForTest(double infer_step_seconds, double phase_seconds_per_token) {
  policy_->mutable_costs().SetEstimates(infer_step_seconds, phase_seconds_per_token);
  std::lock_guard<std::mutex> lock(mu_);
  admission_->costs().SetEstimates(infer_step_seconds, infer_step_seconds);
}

void Engine::Loop() {
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      const bool idle = queue_.empty() && running_.empty();
      if (stop_ && idle) return;
      // The ceiling, not the share: a share the controller holds at 0 must still be revisited.
      const bool can_train = training_.trainer != nullptr && share_ceiling_ > 0;
      if (idle && !can_train && commands_.empty()) {
        // Wake for submits, cancels and shutdown; the timeout bounds how late a deadline is seen.
        wake_.wait_for(lock, std::chrono::milliseconds(50));
        continue;
      }
    }
    if (!Step()) {
      // Nothing ran (training yielded, or nothing fits): wait for a submit or a command, briefly,
      // instead of spinning; the controller sees the clock move at the next step.
      std::unique_lock<std::mutex> lock(mu_);
      if (queue_.empty() && commands_.empty() && !stop_) {
        wake_.wait_for(lock, std::chrono::milliseconds(10));
      }
    }
  }
}

bool Engine::Step() {
  RunCommands();
  last_infer_seconds_ = 0;
  const bool inferred = InferenceStep();
  UpdateShare();
  const bool trained = MaybeTrain();
  if (inferred || trained) {
    policy_->RecordIteration(last_infer_seconds_, trained ? last_train_seconds_ : 0.0);
    std::lock_guard<std::mutex> lock(mu_);
    stats_.train_time_share = policy_->train_time_share();
  }
  return inferred || trained;
}

coordination::ServingSnapshot Engine::ServingSnapshotNow() const {
  coordination::ServingSnapshot snapshot;
  auto add = [&](const Sequence& s) {
    if (s.slo.ttft_ms <= 0 && s.slo.tpot_ms <= 0) return;
    snapshot.requests.push_back({s.slo, s.submit_nanos, s.first_token_nanos, s.generated});
  };
  for (const auto& s : running_) add(*s);
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& s : queue_) add(*s);
  snapshot.idle = queue_.empty() && running_.empty();
  snapshot.arrival_rate = arrivals_.Rate(clock_->NowNanos());
  return snapshot;
}

void Engine::UpdateShare() {
  if (training_.trainer == nullptr) return;
  const coordination::ServingSnapshot serving = ServingSnapshotNow();
  coordination::ShareSignals signals;
  signals.ceiling = share_ceiling_;
  signals.slo_headroom = policy_->SloHeadroom(serving, clock_->NowNanos());
  {
    std::lock_guard<std::mutex> lock(mu_);
    const int64_t now = clock_->NowNanos();
    signals.arrival_rate = load_rates_.ShortRate(now);
    signals.forecast_rate =
        task_forecast_rate_ >= 0 ? task_forecast_rate_ : load_rates_.LongRate(now);
  }
  const coordination::ShareDecision d = share_->Update(signals);
  policy_->set_training_share(d.share);
  if (metrics_) {
    metrics_->train_share_target->Set(d.share);
    metrics_->train_share_ceiling->Set(share_ceiling_);
    if (d.surge_started) metrics_->train_share_yields->Increment();
  }
  if (d.surge_started) {
    COLLM_LOG_INFO("engine: arrivals {:.2f}/s jumped past the forecast {:.2f}/s; training yields",
                   signals.arrival_rate, signals.forecast_rate);
  }
  std::lock_guard<std::mutex> lock(mu_);
  stats_.training_share = d.share;
  stats_.training_share_ceiling = share_ceiling_;
  stats_.share_reason = coordination::ShareReasonName(d.reason);
  if (d.surge_started) ++stats_.share_yields;
}

void Engine::Finish(Sequence& s, const absl::Status& status, runtime::FinishReason reason) {
  const RequestResult r = s.Finish(status, reason, clock_->NowNanos());
  cache_->Release(s.kv);
  if (metrics_) metrics_->RecordFinish(r, s.first_token_nanos > 0, s.generated);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (r.status.ok()) {
      ++stats_.completed;
      if (r.slo_met) ++stats_.slo_met;
    } else if (r.status.code() == absl::StatusCode::kDeadlineExceeded) {
      ++stats_.expired;
    } else if (r.status.code() == absl::StatusCode::kCancelled) {
      ++stats_.cancelled;
    }
    stats_.generated_tokens += s.generated;
  }
  if (s.sink) s.sink->OnFinish(r);
}

int64_t Engine::FrontPrefillTokensLocked() const {
  int64_t tokens = 0;
  for (const auto& q : queue_) {
    if (q->deprioritized) break;
    tokens += q->prompt_size();
  }
  return tokens;
}

void Engine::CountShedLocked(const Sequence& s, const char* reason) {
  if (std::string(reason) == "rejected") {
    ++stats_.rejected_slo;
  } else {
    ++stats_.deprioritized;
  }
  if (metrics_) metrics_->RecordShed(s.request.slo_class, reason);
}

void Engine::DeprioritizeHopelessLocked() {
  if (admission_->mode() == coordination::AdmissionMode::kNone) return;
  std::vector<coordination::QueuedRequest> front;
  for (const auto& q : queue_) {
    if (q->deprioritized) break;
    front.push_back({q->slo.ttft_ms, q->submit_nanos, q->prompt_size()});
  }
  const std::vector<size_t> hopeless = admission_->FindHopeless(front, load_, clock_->NowNanos());
  if (hopeless.empty()) return;
  for (size_t i : hopeless) {
    queue_[i]->deprioritized = true;
    CountShedLocked(*queue_[i], "deprioritized");
  }
  // Stable: both halves keep their arrival order, so no request overtakes another of its kind.
  std::stable_partition(queue_.begin(), queue_.end(),
                        [](const std::unique_ptr<Sequence>& q) { return !q->deprioritized; });
}

bool Engine::InferenceStep() {
  const int64_t now = clock_->NowNanos();
  std::vector<std::unique_ptr<Sequence>> dropped;  // Finished outside the lock.
  std::vector<absl::Status> dropped_status;
  bool force_cancel = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    force_cancel = shutdown_deadline_nanos_ != 0 && now >= shutdown_deadline_nanos_;
    for (auto& s : running_) {
      if (cancel_requests_.count(s->id)) s->cancelled = true;
    }
    for (auto it = queue_.begin(); it != queue_.end();) {
      Sequence& s = **it;
      if (cancel_requests_.count(s.id)) s.cancelled = true;
      absl::Status why = s.DropReason(now, force_cancel, /*queued=*/true);
      if (why.ok()) {
        ++it;
        continue;
      }
      dropped_status.push_back(why);
      dropped.push_back(std::move(*it));
      it = queue_.erase(it);
    }
    cancel_requests_.clear();
  }
  for (size_t i = 0; i < dropped.size(); ++i)
    Finish(*dropped[i], dropped_status[i], runtime::FinishReason::kLength);

  // Running sequences that were cancelled, expired, or outlived the shutdown grace.
  bool did_work = !dropped.empty();
  for (auto it = running_.begin(); it != running_.end();) {
    absl::Status why = (*it)->DropReason(now, force_cancel, /*queued=*/false);
    if (why.ok()) {
      ++it;
      continue;
    }
    Finish(**it, why, runtime::FinishReason::kLength);
    it = running_.erase(it);
    did_work = true;
  }

  // Admission, first come first served (deprioritised requests last): a request enters when its
  // whole KV need fits.
  {
    std::lock_guard<std::mutex> lock(mu_);
    DeprioritizeHopelessLocked();
    while (!queue_.empty() && static_cast<int64_t>(running_.size()) < options_.max_running) {
      Sequence& s = *queue_.front();
      if (!cache_->Reserve(s.kv, s.prompt_size() + s.limit).ok()) break;
      stats_.prompt_tokens += s.prompt_size();
      if (metrics_) metrics_->prompt_tokens->Increment(static_cast<double>(s.prompt_size()));
      running_.push_back(std::move(queue_.front()));
      queue_.pop_front();
    }
    stats_.queued = static_cast<int64_t>(queue_.size());
  }
  if (running_.empty()) {
    std::lock_guard<std::mutex> lock(mu_);
    RecordLoadSignals();
    stats_.running = 0;
    load_.running = load_.running_prefill_left = 0;
    stats_.kv_blocks_used = cache_->num_blocks() - cache_->num_free_blocks();
    return did_work;
  }

  const StepPlan plan = PlanStep(running_, options_.max_step_tokens);
  const int64_t forward_start = clock_->NowNanos();
  auto logits = model_->Forward(plan.batch, *cache_);
  if (!logits.ok()) {
    COLLM_LOG_ERROR("engine step failed: {}", logits.status().ToString());
    for (auto& s : running_) Finish(*s, logits.status(), runtime::FinishReason::kLength);
    running_.clear();
    return true;
  }
  const int64_t after = clock_->NowNanos();
  last_infer_seconds_ = static_cast<double>(after - forward_start) * 1e-9;
  policy_->RecordInferenceStep(last_infer_seconds_);
  ApplyStep(plan, *logits, after, model_->config());
  {
    std::lock_guard<std::mutex> lock(mu_);
    admission_->costs().RecordStep(last_infer_seconds_, plan.num_tokens());
  }
  // Retire finished sequences.
  for (auto it = running_.begin(); it != running_.end();) {
    Sequence& s = **it;
    std::optional<runtime::FinishReason> reason = s.finished;
    if (!reason && s.generated >= s.limit) reason = runtime::FinishReason::kLength;
    if (!reason) {
      ++it;
      continue;
    }
    Finish(s, absl::OkStatus(), *reason);
    it = running_.erase(it);
  }
  RecordStepMetrics(plan.num_tokens());
  std::lock_guard<std::mutex> lock(mu_);
  ++stats_.steps;
  stats_.last_batch_tokens = plan.num_tokens();
  stats_.infer_step_seconds = policy_->costs().infer_step_seconds();
  stats_.running = static_cast<int64_t>(running_.size());
  // What a request submitted before the next step is predicted against.
  load_.running = stats_.running;
  load_.running_prefill_left = 0;
  for (const auto& s : running_) load_.running_prefill_left += s->prompt_size() - s->prefilled;
  stats_.kv_blocks_used = cache_->num_blocks() - cache_->num_free_blocks();
  RecordLoadSignals();
  return true;
}

void Engine::RecordLoadSignals() {
  int64_t unprefilled = 0, context = 0;
  for (const auto& s : queue_) unprefilled += s->prompt_size();
  for (const auto& s : running_) {
    unprefilled += s->prompt_size() - s->prefilled;
    context += s->prefilled + s->generated;
  }
  stats_.queued_prompt_tokens = unprefilled;
  stats_.running_context_tokens = context;
}

void Engine::RecordStepMetrics(int64_t batch_tokens) {
  if (!metrics_) return;
  metrics_->steps->Increment();
  metrics_->batch_tokens->Observe(static_cast<double>(batch_tokens));
  metrics_->running->Set(static_cast<double>(running_.size()));
  metrics_->kv_used->Set(static_cast<double>(cache_->num_blocks() - cache_->num_free_blocks()));
  std::lock_guard<std::mutex> lock(mu_);
  metrics_->queue_depth->Set(static_cast<double>(queue_.size()));
  metrics_->train_share->Set(stats_.train_time_share);
  const int64_t finished = stats_.completed + stats_.cancelled + stats_.expired;
  if (finished > 0) metrics_->slo_attainment->Set(static_cast<double>(stats_.slo_met) / finished);
}

}  // namespace collm::engine
