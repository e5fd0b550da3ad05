// The engine's training half: PEFT micro-steps on the shadow adapter and the publisher's held-out
// evaluation, run in slices on the engine thread where the co-execution policy allows them, plus
// periodic checkpoints. The policy decides; this file carries the decisions out and feeds back
// what they cost.
#include <algorithm>
#include <limits>

#include "absl/strings/str_cat.h"
#include "collm/common/logging.h"
#include "collm/engine/engine.h"

namespace collm::engine {

absl::Status Engine::EnableTraining(TrainingSetup setup) {
  if (setup.trainer == nullptr) return absl::InvalidArgumentError("training needs a trainer");
  if (setup.dataset.empty() && setup.feedback == nullptr) {
    return absl::InvalidArgumentError("training needs a dataset or a feedback buffer");
  }
  training_ = std::move(setup);
  if (!training_.dataset.empty()) {
    sampler_ = std::make_unique<ExampleSampler>(&training_.dataset, training_.seed);
  }
  policy_->set_num_phases(training_.trainer->num_phases());
  return absl::OkStatus();
}

void Engine::CountGuardBlocked() {
  if (metrics_) metrics_->train_guard_blocked->Increment();
  std::lock_guard<std::mutex> lock(mu_);
  ++stats_.train_guard_blocked;
}

bool Engine::MaybeTrain() {
  using Action = coordination::CoExecutionDecision::Action;
  last_train_seconds_ = 0;
  if (training_.trainer == nullptr || !policy_->training_wanted()) return false;
  PeftTrainer& trainer = *training_.trainer;
  PollPublisher();
  bool ran = false;
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_) break;  // Shutting down: serve what is left, no new training.
    }
    coordination::TrainerSnapshot state;
    state.evaluating = training_.publisher != nullptr && training_.publisher->evaluating();
    state.micro_step_active = trainer.micro_step_active();
    if (state.micro_step_active) {
      state.next_phase = trainer.next_phase();
      state.micro_step_tokens = trainer.micro_step_tokens();
      state.head_rows_left = trainer.head_rows_left();
    }
    const coordination::CoExecutionDecision d = policy_->Decide(ServingSnapshotNow(), state);
    if (d.action == Action::kStop) break;
    if (d.action == Action::kBlocked) {
      CountGuardBlocked();
      break;
    }
    if (d.action == Action::kEvaluate) {
      RunEvaluationSlice(d.eval_examples);
      ran = true;
      if (!d.continue_after) break;
      continue;
    }
    if (d.action == Action::kBeginMicroStep) {
      const int64_t max_examples = trainer.options().micro_batch_size;
      BeginResult begun = BeginMicroStep(max_examples, d.max_tokens);
      if (begun == BeginResult::kDoesNotFit && d.has_fallback) {
        begun = BeginMicroStep(max_examples, d.fallback_max_tokens);
      }
      if (begun == BeginResult::kNoData) break;
      if (begun == BeginResult::kDoesNotFit) {
        CountGuardBlocked();
        break;
      }
    }
    const bool finished = RunTrainingPhase(d.max_head_rows);
    ran = true;
    // While serving, one phase between inference steps; without the guard a whole micro-step
    // (the naive interleaving it is measured against); when idle, phases until a request arrives
    // or the micro-step is done.
    if (finished || !d.continue_after) break;
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

void Engine::RunEvaluationSlice(int64_t examples) {
  const int64_t start = clock_->NowNanos();
  if (auto st = training_.publisher->EvaluateSome(examples); !st.ok()) {
    COLLM_LOG_ERROR("held-out evaluation failed: {}", st.ToString());
  }
  const double seconds = static_cast<double>(clock_->NowNanos() - start) * 1e-9;
  last_train_seconds_ += seconds;
  policy_->RecordEvaluation(seconds, examples);
  PollPublisher();
}

bool Engine::RunTrainingPhase(int64_t max_head_rows) {
  PeftTrainer& trainer = *training_.trainer;
  const int64_t phase = trainer.next_phase();
  const int64_t n = trainer.micro_step_examples();
  const int64_t tokens = trainer.micro_step_tokens();
  const int64_t head_rows_before = trainer.head_rows_left();
  const int64_t start = clock_->NowNanos();
  auto result = trainer.AdvanceMicroStep(max_head_rows);
  const double seconds = static_cast<double>(clock_->NowNanos() - start) * 1e-9;
  last_train_seconds_ += seconds;
  micro_step_seconds_ += seconds;
  if (phase == trainer.head_phase()) {
    // The head runs on target rows only; a failed phase aborted the run (0 rows left).
    const int64_t rows = head_rows_before - trainer.head_rows_left();
    if (result.ok() && rows > 0) policy_->RecordHeadRows(seconds, rows);
  } else {
    policy_->RecordPhase(phase, seconds, tokens);
  }
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
  policy_->RecordMicroStep(micro_step_seconds_);
  const std::optional<StepStats>& step = result->step;
  if (step.has_value() && !training_.checkpoint_dir.empty() &&
      training_.checkpoint_every_steps > 0 && step->step % training_.checkpoint_every_steps == 0) {
    if (auto s = SaveTrainingCheckpoint(training_.checkpoint_dir); !s.ok()) {
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
  stats_.train_step_seconds = policy_->costs().micro_step_seconds();
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

absl::Status Engine::CheckpointTraining(const std::string& dir) {
  if (training_.trainer == nullptr) return absl::FailedPreconditionError("training is not enabled");
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (thread_.joinable() && !stop_) {
      return absl::FailedPreconditionError("checkpoint while the engine thread runs");
    }
  }
  return SaveTrainingCheckpoint(dir);
}

absl::Status Engine::SaveTrainingCheckpoint(const std::string& dir) {
  std::map<std::string, std::string> extra;
  if (sampler_ != nullptr) extra = sampler_->State();
  training_.trainer->DiscardPartialStep();  // Checkpoints sit on optimizer-step boundaries.
  return training_.trainer->SaveCheckpoint(dir, extra);
}

absl::Status Engine::RestoreTrainingCursor(const std::map<std::string, std::string>& state) {
  if (sampler_ == nullptr) return absl::OkStatus();
  return sampler_->Restore(state);
}

std::future<ScoreResult> Engine::Score(std::vector<TrainingExample> examples, std::string adapter,
                                       bool base_model) {
  auto promise = std::make_shared<std::promise<ScoreResult>>();
  std::future<ScoreResult> future = promise->get_future();
  ScoreResult early;
  // The same resolution as Submit: the version pinned here is the one scored.
  std::shared_ptr<const lora::AdapterSnapshot> pin;
  if (base_model && !adapter.empty()) {
    early.status = absl::InvalidArgumentError(
        absl::StrCat("base_model asks for no adapter; adapter is '", adapter, "'"));
  } else if (!base_model) {
    const std::string name = adapter.empty() ? options_.default_adapter : adapter;
    if (!name.empty()) {
      auto got = registry_ == nullptr
                     ? absl::StatusOr<std::shared_ptr<const lora::AdapterSnapshot>>(
                           absl::NotFoundError(absl::StrCat("no adapter named '", name, "'")))
                     : registry_->Get(name);
      if (got.ok()) {
        pin = *std::move(got);
      } else {
        early.status = got.status();
      }
    }
  }
  if (!early.status.ok()) {
    promise->set_value(std::move(early));
    return future;
  }
  auto shared = std::make_shared<std::vector<TrainingExample>>(std::move(examples));
  const bool posted = PostCommand([this, promise, shared, pin] {
    ScoreResult r;
    if (pin != nullptr) {
      r.adapter = pin->name;
      r.adapter_version = pin->version;
    }
    std::vector<const TrainingExample*> refs;
    for (const TrainingExample& e : *shared) refs.push_back(&e);
    auto sum = EvaluateLossSum(*model_, pin != nullptr ? &pin->weights : nullptr, refs);
    if (!sum.ok()) {
      r.status = sum.status();
    } else if (sum->targets == 0) {
      r.status = absl::InvalidArgumentError("no example has a target token");
    } else {
      r.loss = sum->sum / static_cast<double>(sum->targets);
      r.target_tokens = sum->targets;
    }
    promise->set_value(std::move(r));
  });
  if (!posted) {
    ScoreResult r;
    r.status = absl::CancelledError("the engine is shut down");
    promise->set_value(std::move(r));
  }
  return future;
}

}  // namespace collm::engine
