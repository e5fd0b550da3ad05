#include "collm/engine/engine.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

#include "absl/strings/str_cat.h"
#include "collm/common/logging.h"
#include "collm/common/status.h"

namespace collm::engine {

struct Engine::Sequence {
  uint64_t id = 0;
  EngineRequest request;
  std::shared_ptr<RequestSink> sink;
  std::shared_ptr<const lora::AdapterSnapshot> pin;  // Null = base model.
  SloTarget slo;
  runtime::SequenceKv kv;
  std::vector<int32_t> context;  // Prompt + generated, for the repetition penalty.
  int64_t prefilled = 0;
  int64_t limit = 0;  // Generated tokens at most (max_tokens capped by the context).
  int64_t generated = 0;
  std::optional<runtime::Sampler> sampler;
  std::optional<runtime::IncrementalDetokenizer> detok;
  std::optional<runtime::StopStringMatcher> stops;
  int64_t submit_nanos = 0, first_token_nanos = 0, last_token_nanos = 0;
  bool cancelled = false;
  std::optional<runtime::FinishReason> finished;  // Set when EOS or a stop string ended it.

  int64_t prompt_size() const { return static_cast<int64_t>(request.prompt.size()); }
  bool decoding() const { return prefilled == prompt_size(); }
};

struct Engine::Metrics {
  telemetry::Histogram* ttft;
  telemetry::Histogram* tpot;
  telemetry::Histogram* e2e;
  telemetry::Histogram* batch_tokens;
  telemetry::Counter* requests_ok;
  telemetry::Counter* requests_cancelled;
  telemetry::Counter* requests_expired;
  telemetry::Counter* requests_slo_met;
  telemetry::Counter* generated_tokens;
  telemetry::Counter* prompt_tokens;
  telemetry::Counter* steps;
  telemetry::Counter* train_micro_steps;
  telemetry::Counter* train_optimizer_steps;
  telemetry::Counter* train_guard_blocked;
  telemetry::Gauge* queue_depth;
  telemetry::Gauge* running;
  telemetry::Gauge* kv_used;
  telemetry::Gauge* kv_total;
  telemetry::Gauge* train_loss;
  telemetry::Gauge* train_share;
  telemetry::Gauge* held_out_loss;
  telemetry::Gauge* adapter_version;
  telemetry::Gauge* slo_attainment;
};

void Engine::SetMetrics(telemetry::MetricsRegistry* r) {
  if (r == nullptr) {
    metrics_.reset();
    return;
  }
  const auto latency = telemetry::ExponentialBuckets(0.001, 2, 16);  // 1 ms .. 33 s.
  metrics_ = std::make_unique<Metrics>(Metrics{
      r->GetHistogram("collm_ttft_seconds", "Time to first token, queueing included", latency),
      r->GetHistogram("collm_tpot_seconds", "Mean time per output token after the first", latency),
      r->GetHistogram("collm_e2e_seconds", "Request latency from submit to finish", latency),
      r->GetHistogram("collm_batch_tokens", "Tokens per engine step (decodes + prefill chunks)",
                      telemetry::ExponentialBuckets(1, 2, 12)),
      r->GetCounter("collm_requests_total", "Finished requests by outcome", {{"outcome", "ok"}}),
      r->GetCounter("collm_requests_total", "Finished requests by outcome",
                    {{"outcome", "cancelled"}}),
      r->GetCounter("collm_requests_total", "Finished requests by outcome",
                    {{"outcome", "deadline_exceeded"}}),
      r->GetCounter("collm_requests_slo_met_total", "Requests that met their TTFT and TPOT SLOs"),
      r->GetCounter("collm_generated_tokens_total", "Output tokens generated"),
      r->GetCounter("collm_prompt_tokens_total", "Prompt tokens prefilled"),
      r->GetCounter("collm_engine_steps_total", "Inference steps run"),
      r->GetCounter("collm_train_micro_steps_total", "PEFT micro-steps run"),
      r->GetCounter("collm_train_steps_total", "PEFT optimizer steps run"),
      r->GetCounter("collm_train_guard_blocked_total", "Micro-steps skipped by the SLO guard"),
      r->GetGauge("collm_queue_depth", "Requests waiting for admission"),
      r->GetGauge("collm_running_sequences", "Sequences in the running batch"),
      r->GetGauge("collm_kv_cache_blocks_used", "KV cache blocks in use"),
      r->GetGauge("collm_kv_cache_blocks_total", "KV cache blocks in the pool"),
      r->GetGauge("collm_train_loss", "Training loss of the last optimizer step"),
      r->GetGauge("collm_train_time_share", "Share of busy engine time spent training"),
      r->GetGauge("collm_held_out_loss", "Held-out loss of the live adapter (-1 unknown)"),
      r->GetGauge("collm_live_adapter_version", "Version of the adapter training publishes to"),
      r->GetGauge("collm_slo_attainment", "Share of finished requests that met their SLOs"),
  });
  metrics_->kv_total->Set(static_cast<double>(cache_->num_blocks()));
  metrics_->held_out_loss->Set(-1);
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(
    std::shared_ptr<const runtime::LlamaModel> model, const runtime::Tokenizer* tokenizer,
    lora::AdapterRegistry* registry, const EngineOptions& options, Clock& clock) {
  auto bad = [](const std::string& field, int64_t v) {
    return absl::InvalidArgumentError(absl::StrCat("engine.", field, " must be > 0, got ", v));
  };
  if (options.max_step_tokens <= 0) return bad("max_step_tokens", options.max_step_tokens);
  if (options.max_running <= 0) return bad("max_running", options.max_running);
  if (options.max_queued <= 0) return bad("max_queued", options.max_queued);
  if (!(options.training_share >= 0 && options.training_share <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("engine.training_share must be in [0, 1], got ", options.training_share));
  }
  if (!(options.guard_safety >= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("engine.guard_safety must be >= 1, got ", options.guard_safety));
  }
  if (!options.default_adapter.empty() &&
      (registry == nullptr || !registry->Get(options.default_adapter).ok())) {
    return absl::NotFoundError(
        absl::StrCat("engine.default_adapter '", options.default_adapter, "' is not loaded"));
  }
  if (!(options.guard_idle_risk >= 0 && options.guard_idle_risk <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("engine.guard_idle_risk must be in [0, 1], got ", options.guard_idle_risk));
  }
  std::unique_ptr<Engine> e(new Engine());
  e->model_ = std::move(model);
  e->tokenizer_ = tokenizer;
  e->registry_ = registry;
  e->options_ = options;
  e->clock_ = &clock;
  COLLM_ASSIGN_OR_RETURN(e->cache_, runtime::KvCache::Create(e->model_->config(), options.kv_cache,
                                                             e->model_->runtime()));
  e->stats_.kv_blocks_total = e->cache_->num_blocks();
  e->stats_.training_share = options.training_share;
  return e;
}

Engine::~Engine() { Shutdown(0); }

void Engine::Start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (thread_.joinable() || stop_) return;
  thread_ = std::thread([this] { Loop(); });
}

absl::StatusOr<uint64_t> Engine::Submit(EngineRequest request, std::shared_ptr<RequestSink> sink) {
  const runtime::ModelConfig& config = model_->config();
  COLLM_RETURN_IF_ERROR(request.params.Validate());
  const int64_t n = static_cast<int64_t>(request.prompt.size());
  if (n == 0) return absl::InvalidArgumentError("prompt is empty");
  if (n >= config.max_position_embeddings) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt has ", n, " tokens; the context is ", config.max_position_embeddings));
  }
  for (int32_t id : request.prompt) {
    if (id < 0 || id >= config.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt token ", id, " is outside the vocabulary"));
    }
  }
  if (!request.params.stop.empty() && tokenizer_ == nullptr) {
    return absl::InvalidArgumentError("stop strings need a tokenizer");
  }
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
  const std::string adapter = request.adapter.empty() ? options_.default_adapter : request.adapter;
  if (!adapter.empty()) {
    if (registry_ == nullptr)
      return absl::NotFoundError(absl::StrCat("no adapter named '", adapter, "'"));
    COLLM_ASSIGN_OR_RETURN(seq->pin, registry_->Get(adapter));  // Pinned for the whole request.
  }
  seq->limit = std::min<int64_t>(request.params.max_tokens, config.max_position_embeddings - n);
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
  if (last_submit_nanos_ > 0) {
    const double gap = (seq->submit_nanos - last_submit_nanos_) * 1e-9;
    interarrival_ = interarrival_ == 0 ? gap : 0.9 * interarrival_ + 0.1 * gap;
  }
  last_submit_nanos_ = seq->submit_nanos;

  std::lock_guard<std::mutex> lock(mu_);
  if (!accepting_) return absl::UnavailableError("the engine is shutting down");
  if (static_cast<int64_t>(queue_.size()) >= options_.max_queued) {
    ++stats_.rejected_queue_full;
    return absl::ResourceExhaustedError(
        absl::StrCat("request queue is full (", options_.max_queued, ")"));
  }
  seq->id = next_id_++;
  const uint64_t id = seq->id;
  queue_.push_back(std::move(seq));
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
  infer_cost_ = infer_step_seconds;
  std::fill(phase_cost_.begin(), phase_cost_.end(), phase_seconds_per_token);
}

absl::Status Engine::EnableTraining(TrainingSetup setup) {
  if (setup.trainer == nullptr) return absl::InvalidArgumentError("training needs a trainer");
  if (setup.dataset.empty() && setup.feedback == nullptr) {
    return absl::InvalidArgumentError("training needs a dataset or a feedback buffer");
  }
  training_ = std::move(setup);
  if (!training_.dataset.empty()) {
    sampler_ = std::make_unique<ExampleSampler>(&training_.dataset, training_.seed);
  }
  phase_cost_.assign(static_cast<size_t>(training_.trainer->num_phases()), 0.0);
  return absl::OkStatus();
}

bool Engine::Step() {
  RunCommands();
  last_infer_seconds_ = 0;
  const bool inferred = InferenceStep();
  const bool trained = MaybeTrain();
  // Busy-time shares, smoothed over the last ~10 iterations that did anything.
  if (inferred || trained) {
    const double train_seconds = trained ? last_train_seconds_ : 0.0;
    busy_infer_ = 0.9 * busy_infer_ + 0.1 * last_infer_seconds_;
    busy_train_ = 0.9 * busy_train_ + 0.1 * train_seconds;
    std::lock_guard<std::mutex> lock(mu_);
    const double total = busy_infer_ + busy_train_;
    stats_.train_time_share = total > 0 ? busy_train_ / total : 0;
  }
  return inferred || trained;
}

double Engine::SloSlack(int64_t now) const {
  double slack = std::numeric_limits<double>::infinity();
  auto ttft_slack = [&](const Sequence& s) {
    if (s.slo.ttft_ms <= 0 || s.first_token_nanos > 0) return;
    slack = std::min(slack, s.slo.ttft_ms * 1e-3 - (now - s.submit_nanos) * 1e-9 - infer_cost_);
  };
  for (const auto& s : running_) {
    ttft_slack(*s);
    if (s->slo.tpot_ms > 0 && s->first_token_nanos > 0) {
      // The next token arrives after the training delay plus one inference step.
      slack = std::min(slack, s->slo.tpot_ms * 1e-3 * static_cast<double>(s->generated) -
                                  (now - s->first_token_nanos) * 1e-9 - infer_cost_);
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& s : queue_) ttft_slack(*s);
  return slack;
}

double Engine::IdleBudget() const {
  // A request arriving now waits for the phase in flight, then for its first (prefill) step.
  double ttft_ms = options_.default_slo.ttft_ms > 0 ? options_.default_slo.ttft_ms
                                                    : std::numeric_limits<double>::infinity();
  for (const auto& [name, slo] : options_.slo_classes) {
    if (slo.ttft_ms > 0) ttft_ms = std::min(ttft_ms, slo.ttft_ms);
  }
  return ttft_ms * 1e-3 - infer_cost_;
}

double Engine::ArrivalRate(int64_t now) const {
  if (last_submit_nanos_ == 0) return 0;
  // The smoothed gap, or the time since the last arrival when that is already longer (so the
  // rate decays when traffic stops).
  const double since = (now - last_submit_nanos_) * 1e-9;
  const double gap = std::max(interarrival_, since);
  return gap > 0 ? 1.0 / gap : std::numeric_limits<double>::infinity();
}

double Engine::PhaseCost(int64_t phase) const {
  const double c = phase_cost_[static_cast<size_t>(phase)];
  if (c > 0) return c;
  // Not measured yet: the costliest phase measured so far (0 = nothing measured).
  return *std::max_element(phase_cost_.begin(), phase_cost_.end());
}

bool Engine::MaybeTrain() {
  last_train_seconds_ = 0;
  if (training_.trainer == nullptr || options_.training_share <= 0) return false;
  PeftTrainer& trainer = *training_.trainer;
  PollPublisher();
  const double inf = std::numeric_limits<double>::infinity();
  bool ran = false;
  for (;;) {
    bool idle;
    {
      std::lock_guard<std::mutex> lock(mu_);
      idle = queue_.empty() && running_.empty();
      if (stop_) break;  // Shutting down: serve what is left, no new training.
    }
    if (!idle) {
      const double total = busy_infer_ + busy_train_;
      if (total > 0 && busy_train_ / total >= options_.training_share) break;
    }
    // The time the next phase may take: when serving, the slack of the tightest request; when
    // idle, what a request arriving right now could absorb (it waits for at most one phase).
    double budget = inf;
    if (options_.slo_guard) budget = idle ? IdleBudget() : SloSlack(clock_->NowNanos());
    const double worst_phase = *std::max_element(phase_cost_.begin(), phase_cost_.end());
    // Whether a phase of `seconds` may run now: it fits the budget, or — idle — even one example's
    // phase is longer than an arrival could wait but arrivals are rare enough that the expected
    // share of requests it delays stays within guard_idle_risk.
    auto allowed = [&](double seconds) {
      if (options_.guard_safety * seconds <= budget) return true;
      if (!idle || options_.guard_idle_risk <= 0) return false;
      std::lock_guard<std::mutex> lock(mu_);
      return ArrivalRate(clock_->NowNanos()) * options_.guard_safety * seconds <=
             options_.guard_idle_risk;
    };
    if (training_.publisher != nullptr && training_.publisher->evaluating()) {
      // A publish's held-out evaluation: forward-only work, scheduled like a training phase.
      int64_t n = kEvalSliceExamples;
      if (std::isfinite(budget)) {
        if (eval_cost_ <= 0) {
          n = idle ? 1 : 0;
        } else {
          n = std::min<int64_t>(
              n, static_cast<int64_t>(std::floor(budget / (options_.guard_safety * eval_cost_))));
          if (n < 1 && allowed(eval_cost_)) n = 1;
        }
      }
      if (n < 1) {
        std::lock_guard<std::mutex> lock(mu_);
        ++stats_.train_guard_blocked;
        break;
      }
      const int64_t start = clock_->NowNanos();
      if (auto st = training_.publisher->EvaluateSome(n); !st.ok()) {
        COLLM_LOG_ERROR("held-out evaluation failed: {}", st.ToString());
      }
      const double seconds = (clock_->NowNanos() - start) * 1e-9;
      last_train_seconds_ += seconds;
      const double per_example = seconds / static_cast<double>(n);
      eval_cost_ = eval_cost_ == 0 ? per_example : 0.8 * eval_cost_ + 0.2 * per_example;
      PollPublisher();
      ran = true;
      if (!idle && options_.slo_guard) break;
      continue;
    }
    bool go;
    if (!trainer.micro_step_active()) {
      // Size the micro-step (in padded tokens: phase costs grow with them) so that its costliest
      // phase fits the budget.
      double tokens = inf;
      if (std::isfinite(budget)) {
        if (worst_phase <= 0) {
          tokens = idle ? -1 : 0;  // Cost unknown: measure it with one example, and only when idle.
        } else {
          tokens = budget / (options_.guard_safety * worst_phase);
        }
      }
      BeginResult begun = BeginMicroStep(trainer.options().micro_batch_size, tokens);
      if (begun == BeginResult::kDoesNotFit && idle && options_.guard_idle_risk > 0 &&
          worst_phase > 0) {
        // Not even one example fits what an arrival could wait: as many tokens as keep the
        // expected share of delayed arrivals within the risk.
        double rate;
        {
          std::lock_guard<std::mutex> lock(mu_);
          rate = ArrivalRate(clock_->NowNanos());
        }
        const double per_token_risk = rate * options_.guard_safety * worst_phase;
        begun =
            BeginMicroStep(trainer.options().micro_batch_size,
                           per_token_risk <= 0 ? inf : options_.guard_idle_risk / per_token_risk);
      }
      if (begun == BeginResult::kNoData) break;
      go = begun == BeginResult::kStarted;
    } else {
      go = !std::isfinite(budget) || allowed(PhaseCost(trainer.next_phase()) *
                                             static_cast<double>(trainer.micro_step_tokens()));
    }
    if (!go) {
      std::lock_guard<std::mutex> lock(mu_);
      ++stats_.train_guard_blocked;
      break;
    }
    const bool finished = RunTrainingPhase();
    ran = true;
    // While serving, one phase between inference steps; without the guard a whole micro-step
    // (the naive interleaving it is measured against); when idle, phases until a request arrives
    // or the micro-step is done.
    if (finished) break;
    if (!idle && options_.slo_guard) break;
  }
  return ran;
}

Engine::BeginResult Engine::BeginMicroStep(int64_t max_examples, double max_tokens) {
  // Candidates wait in pool_ (copies), so examples that do not fit this time are not skipped.
  if (static_cast<int64_t>(pool_.size()) < max_examples && training_.feedback != nullptr) {
    for (auto& e : training_.feedback->Take(static_cast<size_t>(max_examples - pool_.size()))) {
      pool_.push_back(std::move(e));
    }
  }
  if (static_cast<int64_t>(pool_.size()) < max_examples && sampler_ != nullptr) {
    for (const auto* e : sampler_->Next(max_examples - static_cast<int64_t>(pool_.size()))) {
      pool_.push_back(*e);
    }
  }
  if (pool_.empty()) return BeginResult::kNoData;
  // The longest prefix whose padded size (examples x longest input) fits; max_tokens < 0 = one.
  int64_t k = 0, longest = 0;
  while (k < static_cast<int64_t>(pool_.size()) && k < max_examples) {
    const int64_t len =
        std::max<int64_t>(longest, static_cast<int64_t>(pool_[k].tokens.size()) - 1);
    if (max_tokens < 0 ? k >= 1 : static_cast<double>((k + 1) * len) > max_tokens) break;
    longest = len;
    ++k;
  }
  if (k == 0) return BeginResult::kDoesNotFit;
  std::vector<const TrainingExample*> batch;
  for (int64_t i = 0; i < k; ++i) batch.push_back(&pool_[i]);
  auto started = training_.trainer->BeginMicroStep(batch);  // Copies what it needs.
  pool_.erase(pool_.begin(), pool_.begin() + k);
  if (!started.ok()) {
    // A bad batch (e.g. no target tokens) is dropped, not retried forever.
    COLLM_LOG_ERROR("training micro-step failed to start: {}", started.ToString());
    return BeginResult::kNoData;
  }
  micro_step_seconds_ = 0;
  return BeginResult::kStarted;
}

bool Engine::RunTrainingPhase() {
  PeftTrainer& trainer = *training_.trainer;
  const int64_t phase = trainer.next_phase();
  const int64_t n = trainer.micro_step_examples();
  const int64_t tokens = trainer.micro_step_tokens();
  const int64_t start = clock_->NowNanos();
  auto result = trainer.AdvanceMicroStep();
  const double seconds = (clock_->NowNanos() - start) * 1e-9;
  last_train_seconds_ += seconds;
  micro_step_seconds_ += seconds;
  double& cost = phase_cost_[static_cast<size_t>(phase)];
  const double per_token = seconds / static_cast<double>(std::max<int64_t>(1, tokens));
  cost = cost == 0 ? per_token : 0.8 * cost + 0.2 * per_token;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.train_phases;
  }
  if (!result.ok()) {
    COLLM_LOG_ERROR("training micro-step failed: {}", result.status().ToString());
    OnTaskProgress(n, result.status(), std::nullopt);
    return true;
  }
  if (!result->finished) return false;
  OnTaskProgress(n, absl::OkStatus(), result->step);
  train_cost_ =
      train_cost_ == 0 ? micro_step_seconds_ : 0.8 * train_cost_ + 0.2 * micro_step_seconds_;
  const std::optional<StepStats>& step = result->step;
  if (step.has_value() && !training_.checkpoint_dir.empty() &&
      training_.checkpoint_every_steps > 0 && step->step % training_.checkpoint_every_steps == 0) {
    if (auto s = CheckpointTrainingLocked(training_.checkpoint_dir); !s.ok()) {
      COLLM_LOG_ERROR("periodic checkpoint failed: {}", s.ToString());
    }
  }
  if (step.has_value() && training_.publisher != nullptr && training_.publisher->Due(step->step)) {
    // The held-out evaluation runs in slices from MaybeTrain; PollPublisher publishes when done.
    if (!training_.publisher->BeginConsider(trainer)) {
      COLLM_LOG_DEBUG("publish at step {} skipped: the previous evaluation is still running",
                      step->step);
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  ++stats_.train_micro_steps;
  stats_.train_examples += n;
  stats_.train_step_seconds = train_cost_;
  if (step.has_value()) {
    ++stats_.train_optimizer_steps;
    stats_.train_loss = step->loss;
    stats_.train_tokens += step->tokens;
  }
  if (metrics_) {
    metrics_->train_micro_steps->Increment();
    if (step.has_value()) {
      metrics_->train_optimizer_steps->Increment();
      metrics_->train_loss->Set(step->loss);
    }
  }
  return true;
}

void Engine::PollPublisher(bool wait) {
  if (training_.publisher == nullptr) return;
  auto done = training_.publisher->Poll(wait);
  if (!done.has_value()) return;
  if (!done->ok()) COLLM_LOG_ERROR("publish failed: {}", done->status().ToString());
  const PublishStats publish = training_.publisher->stats();
  std::lock_guard<std::mutex> lock(mu_);
  stats_.publish = publish;
  if (metrics_) {
    metrics_->held_out_loss->Set(publish.live_loss);
    metrics_->adapter_version->Set(static_cast<double>(publish.live_version));
  }
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

absl::Status Engine::CheckpointTraining(const std::string& dir) {
  if (training_.trainer == nullptr) return absl::FailedPreconditionError("training is not enabled");
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (thread_.joinable() && !stop_) {
      return absl::FailedPreconditionError("checkpoint while the engine thread runs");
    }
  }
  return CheckpointTrainingLocked(dir);
}

absl::Status Engine::CheckpointTrainingLocked(const std::string& dir) {
  std::map<std::string, std::string> extra;
  if (sampler_ != nullptr) extra = sampler_->State();
  training_.trainer->DiscardPartialStep();  // Checkpoints sit on optimizer-step boundaries.
  return training_.trainer->SaveCheckpoint(dir, extra);
}

absl::Status Engine::RestoreTrainingCursor(const std::map<std::string, std::string>& state) {
  if (sampler_ == nullptr) return absl::OkStatus();
  return sampler_->Restore(state);
}

void Engine::Loop() {
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      const bool idle = queue_.empty() && running_.empty();
      if (stop_ && idle) return;
      const bool can_train = training_.trainer != nullptr && options_.training_share > 0;
      if (idle && !can_train && commands_.empty()) {
        // Wake for submits, cancels and shutdown; the timeout bounds how late a deadline is seen.
        wake_.wait_for(lock, std::chrono::milliseconds(50));
        continue;
      }
    }
    Step();
  }
}

void Engine::Finish(Sequence& s, absl::Status status, runtime::FinishReason reason) {
  const int64_t now = clock_->NowNanos();
  if (s.detok && status.ok()) {
    std::string tail = s.stops->stopped() ? "" : s.stops->Push(s.detok->Finish());
    if (!s.stops->stopped()) tail += s.stops->Finish();
    if (!tail.empty() && s.sink) s.sink->OnDelta(tail, {});
  }
  RequestResult r;
  r.status = std::move(status);
  r.finish_reason = reason;
  r.prompt_tokens = s.prompt_size();
  r.completion_tokens = s.generated;
  if (s.pin) {
    r.adapter = s.pin->name;
    r.adapter_version = s.pin->version;
  }
  r.e2e_seconds = (now - s.submit_nanos) * 1e-9;
  if (s.first_token_nanos > 0) {
    r.ttft_seconds = (s.first_token_nanos - s.submit_nanos) * 1e-9;
    if (s.generated > 1) {
      r.tpot_seconds =
          (s.last_token_nanos - s.first_token_nanos) * 1e-9 / static_cast<double>(s.generated - 1);
    }
  }
  r.slo_met = r.status.ok() && s.first_token_nanos > 0 &&
              (s.slo.ttft_ms <= 0 || r.ttft_seconds * 1e3 <= s.slo.ttft_ms) &&
              (s.slo.tpot_ms <= 0 || r.tpot_seconds * 1e3 <= s.slo.tpot_ms);
  cache_->Release(s.kv);
  if (metrics_) {
    if (r.status.ok()) {
      metrics_->requests_ok->Increment();
      if (s.first_token_nanos > 0) metrics_->ttft->Observe(r.ttft_seconds);
      if (s.generated > 1) metrics_->tpot->Observe(r.tpot_seconds);
      metrics_->e2e->Observe(r.e2e_seconds);
      if (r.slo_met) metrics_->requests_slo_met->Increment();
    } else if (r.status.code() == absl::StatusCode::kDeadlineExceeded) {
      metrics_->requests_expired->Increment();
    } else {
      metrics_->requests_cancelled->Increment();
    }
    metrics_->generated_tokens->Increment(static_cast<double>(s.generated));
  }
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
      absl::Status why;
      if (cancel_requests_.count(s.id))
        why = absl::CancelledError("request cancelled");
      else if (force_cancel)
        why = absl::CancelledError("engine shut down before the request ran");
      else if (s.request.deadline_nanos > 0 && now >= s.request.deadline_nanos)
        why = absl::DeadlineExceededError("deadline expired while queued");
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
    Sequence& s = **it;
    absl::Status why;
    if (s.cancelled)
      why = absl::CancelledError("request cancelled");
    else if (force_cancel)
      why = absl::CancelledError("engine shut down during the request");
    else if (s.request.deadline_nanos > 0 && now >= s.request.deadline_nanos)
      why = absl::DeadlineExceededError("deadline expired");
    if (why.ok()) {
      ++it;
      continue;
    }
    Finish(s, why, runtime::FinishReason::kLength);
    it = running_.erase(it);
    did_work = true;
  }

  // Admission, first come first served: a request enters when its whole KV need fits.
  {
    std::lock_guard<std::mutex> lock(mu_);
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
    stats_.running = 0;
    stats_.kv_blocks_used = cache_->num_blocks() - cache_->num_free_blocks();
    return did_work;
  }

  // Decodes first (one token each), then prefill chunks in the remaining budget.
  runtime::StepBatch batch;
  std::vector<Sequence*> members;
  int64_t budget = options_.max_step_tokens;
  for (auto& s : running_) {
    if (!s->decoding() || budget <= 0) continue;
    batch.tokens.push_back(s->context.back());
    batch.sequences.push_back({&s->kv, 1, false, s->pin ? &s->pin->weights : nullptr});
    members.push_back(s.get());
    --budget;
  }
  for (auto& s : running_) {
    if (s->decoding() || budget <= 0) continue;
    const int64_t take = std::min(budget, s->prompt_size() - s->prefilled);
    batch.tokens.insert(batch.tokens.end(), s->request.prompt.begin() + s->prefilled,
                        s->request.prompt.begin() + s->prefilled + take);
    batch.sequences.push_back({&s->kv, take, false, s->pin ? &s->pin->weights : nullptr});
    members.push_back(s.get());
    budget -= take;
  }
  const int64_t forward_start = clock_->NowNanos();
  auto logits = model_->Forward(batch, *cache_);
  if (!logits.ok()) {
    COLLM_LOG_ERROR("engine step failed: {}", logits.status().ToString());
    for (auto& s : running_) Finish(*s, logits.status(), runtime::FinishReason::kLength);
    running_.clear();
    return true;
  }
  const int64_t after = clock_->NowNanos();
  const double step_seconds = (after - forward_start) * 1e-9;
  infer_cost_ = infer_cost_ == 0 ? step_seconds : 0.8 * infer_cost_ + 0.2 * step_seconds;
  last_infer_seconds_ = step_seconds;
  const int64_t vocab = model_->config().vocab_size;
  for (size_t k = 0; k < members.size(); ++k) {
    Sequence& s = *members[k];
    if (!s.decoding()) {
      s.prefilled += batch.sequences[k].num_tokens;
      if (!s.decoding()) continue;  // Prompt not finished yet: no token to sample.
    }
    at::Tensor row = (*logits)[static_cast<int64_t>(k)];
    const int32_t token =
        s.sampler->Sample(absl::MakeSpan(row.data_ptr<float>(), vocab), s.context);
    if (s.first_token_nanos == 0) s.first_token_nanos = after;
    s.last_token_nanos = after;
    const auto& eos = model_->config().eos_token_ids;
    if (!s.request.params.ignore_eos && std::find(eos.begin(), eos.end(), token) != eos.end()) {
      s.finished = runtime::FinishReason::kEos;
      continue;
    }
    ++s.generated;
    s.context.push_back(token);
    std::string text;
    if (s.detok) text = s.stops->Push(s.detok->Push(token));
    if (s.sink) s.sink->OnDelta(text, {token});
    if (s.stops && s.stops->stopped()) s.finished = runtime::FinishReason::kStop;
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
  RecordStepMetrics(static_cast<int64_t>(batch.tokens.size()));
  std::lock_guard<std::mutex> lock(mu_);
  ++stats_.steps;
  stats_.last_batch_tokens = static_cast<int64_t>(batch.tokens.size());
  stats_.infer_step_seconds = infer_cost_;
  stats_.running = static_cast<int64_t>(running_.size());
  stats_.kv_blocks_used = cache_->num_blocks() - cache_->num_free_blocks();
  return true;
}

// --- Federation hooks ---------------------------------------------------------------------------

struct Engine::ActiveTask {
  TrainingTask task;
  std::shared_ptr<std::promise<TrainingReport>> promise;
  int64_t steps = 0;
  int64_t samples = 0;           // Examples in micro-steps so far.
  int64_t samples_in_steps = 0;  // ... of which in completed optimizer steps.
  double loss_sum = 0;
};

bool Engine::PostCommand(std::function<void()> command) {
  std::lock_guard<std::mutex> lock(mu_);
  if (commands_closed_) return false;
  commands_.push_back(std::move(command));
  wake_.notify_one();
  return true;
}

void Engine::RunCommands() {
  std::vector<std::function<void()>> commands;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (commands_.empty()) return;
    commands.swap(commands_);
  }
  for (auto& c : commands) c();
}

namespace {

absl::Status CheckShare(const char* what, double share) {
  if (share >= 0 && share <= 1) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(what, " must be in [0, 1], got ", share));
}

template <typename T>
std::future<T> Ready(T value) {
  std::promise<T> p;
  p.set_value(std::move(value));
  return p.get_future();
}

}  // namespace

absl::Status Engine::SetTrainingShare(double share) {
  COLLM_RETURN_IF_ERROR(CheckShare("training share", share));
  PostCommand([this, share] {
    options_.training_share = share;
    std::lock_guard<std::mutex> lock(mu_);
    stats_.training_share = share;
  });
  return absl::OkStatus();
}

std::future<InstallResult> Engine::InstallAdapter(lora::LoraAdapter adapter,
                                                  InstallOptions options) {
  if (training_.trainer == nullptr) {
    InstallResult r;
    r.status = absl::FailedPreconditionError("installing an adapter needs training enabled");
    return Ready(std::move(r));
  }
  auto promise = std::make_shared<std::promise<InstallResult>>();
  std::future<InstallResult> future = promise->get_future();
  auto shared_adapter = std::make_shared<lora::LoraAdapter>(std::move(adapter));
  const bool posted = PostCommand([this, promise, shared_adapter, options] {
    InstallResult r;
    // The task trained from the old shadow; its update would not match the new base.
    if (task_) EndTask(absl::CancelledError("superseded by a newly installed adapter"));
    PeftTrainer& trainer = *training_.trainer;
    trainer.DiscardPartialStep();
    r.status = trainer.shadow().Load(*shared_adapter, options.reset_optimizer);
    if (r.status.ok() && options.publish) {
      if (training_.publisher == nullptr) {
        r.status =
            absl::FailedPreconditionError("publishing an installed adapter needs a publisher");
      } else {
        // A periodic evaluation still running decides first, so the gate compares against what
        // is live after it. This evaluation runs here, on the engine thread: once per global
        // version, not per training step.
        if (training_.publisher->pending()) PollPublisher(true);
        auto published = training_.publisher->Consider(trainer, options.source);
        const PublishStats& ps = training_.publisher->stats();
        if (!published.ok()) {
          r.status = published.status();
        } else {
          r.published = *published;
        }
        r.decision = ps.last_decision;
        r.held_out_loss = ps.last_candidate_loss;
        std::lock_guard<std::mutex> lock(mu_);
        stats_.publish = ps;
        if (metrics_) {
          metrics_->held_out_loss->Set(ps.live_loss);
          metrics_->adapter_version->Set(static_cast<double>(ps.live_version));
        }
      }
    }
    promise->set_value(std::move(r));
  });
  if (!posted) {
    InstallResult r;
    r.status = absl::CancelledError("the engine is shut down");
    promise->set_value(std::move(r));
  }
  return future;
}

std::future<TrainingReport> Engine::RunTrainingTask(TrainingTask task) {
  TrainingReport bad;
  if (training_.trainer == nullptr) {
    bad.status = absl::FailedPreconditionError("a training task needs training enabled");
  } else if (task.optimizer_steps <= 0) {
    bad.status = absl::InvalidArgumentError(
        absl::StrCat("task optimizer_steps must be > 0, got ", task.optimizer_steps));
  } else if (!(task.lr >= 0) || !std::isfinite(task.lr)) {
    bad.status = absl::InvalidArgumentError(absl::StrCat("task lr must be >= 0, got ", task.lr));
  } else if (!(task.prox_mu >= 0) || !std::isfinite(task.prox_mu)) {
    bad.status =
        absl::InvalidArgumentError(absl::StrCat("task prox_mu must be >= 0, got ", task.prox_mu));
  } else if (task.training_share >= 0 || std::isnan(task.training_share)) {
    bad.status = CheckShare("task training_share", task.training_share);
  }
  if (bad.status.ok() && (task.share_after >= 0 || std::isnan(task.share_after))) {
    bad.status = CheckShare("task share_after", task.share_after);
  }
  if (!bad.status.ok()) return Ready(std::move(bad));
  auto promise = std::make_shared<std::promise<TrainingReport>>();
  std::future<TrainingReport> future = promise->get_future();
  if (!PostCommand([this, task, promise] { StartTask(task, promise); })) {
    TrainingReport r;
    r.status = absl::CancelledError("the engine is shut down");
    promise->set_value(std::move(r));
  }
  return future;
}

void Engine::FinishTrainingTaskEarly() {
  PostCommand([this] {
    if (task_) EndTask(absl::OkStatus());
  });
}

void Engine::StartTask(TrainingTask task, std::shared_ptr<std::promise<TrainingReport>> promise) {
  if (task_) EndTask(absl::CancelledError("replaced by a new training task"));
  PeftTrainer& trainer = *training_.trainer;
  // The budget counts whole optimizer steps from here: gradients accumulated before belong to
  // no task.
  trainer.DiscardPartialStep();
  if (task.lr > 0) trainer.set_lr(task.lr);
  // FedProx: the task's starting point (the global adapter just installed) anchors the local
  // steps; cleared again when the task ends.
  trainer.set_prox_mu(task.prox_mu);
  if (task.prox_mu > 0) {
    if (auto s = trainer.SetProximalAnchor(trainer.shadow().Snapshot()); !s.ok()) {
      COLLM_LOG_WARN("FedProx anchor refused ({}); training without it", s.ToString());
      trainer.set_prox_mu(0);
    }
  } else {
    trainer.ClearProximalAnchor();
  }
  task_ = std::make_unique<ActiveTask>();
  task_->task = task;
  task_->promise = std::move(promise);
  std::lock_guard<std::mutex> lock(mu_);
  if (task.training_share >= 0) {
    options_.training_share = task.training_share;
    stats_.training_share = task.training_share;
  }
  stats_.training_task_active = true;
}

void Engine::EndTask(absl::Status status) {
  std::unique_ptr<ActiveTask> t = std::move(task_);
  training_.trainer->ClearProximalAnchor();
  training_.trainer->set_prox_mu(0);
  TrainingReport r;
  r.status = std::move(status);
  r.optimizer_steps = t->steps;
  r.num_samples = t->samples_in_steps;
  if (t->steps > 0) r.mean_train_loss = t->loss_sum / static_cast<double>(t->steps);
  if (r.status.ok() && t->steps == 0) {
    r.status = absl::AbortedError("the training task ended before its first optimizer step");
  }
  if (r.status.ok()) {
    PeftTrainer& trainer = *training_.trainer;
    trainer.DiscardPartialStep();  // A cut-short task reports the last whole step.
    r.adapter = trainer.shadow().Snapshot();
    if (training_.publisher != nullptr && !training_.publisher->held_out().empty()) {
      auto loss = trainer.Evaluate(training_.publisher->held_out());
      if (loss.ok()) {
        r.held_out_loss = *loss;
      } else {
        COLLM_LOG_WARN("held-out evaluation after the training task failed: {}",
                       loss.status().ToString());
      }
    }
    if (t->task.share_after >= 0) options_.training_share = t->task.share_after;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.training_task_active = false;
    stats_.training_share = options_.training_share;
  }
  t->promise->set_value(std::move(r));
}

void Engine::OnTaskProgress(int64_t examples, const absl::Status& status,
                            const std::optional<StepStats>& step) {
  if (!task_) return;
  if (!status.ok()) {
    EndTask(status);
    return;
  }
  task_->samples += examples;
  if (!step.has_value()) return;
  ++task_->steps;
  task_->samples_in_steps = task_->samples;
  task_->loss_sum += step->loss;
  if (task_->steps >= task_->task.optimizer_steps) EndTask(absl::OkStatus());
}

}  // namespace collm::engine
