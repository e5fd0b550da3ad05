// The engine's federation hooks: the slow timescale (the FL client) posts commands — a training
// share, an adapter to install, a training budget — that run on the engine thread at the next
// step boundary, so serving never waits on a lock held by training; a budget's progress is
// tracked here and reported through its future.
#include <cmath>

#include "absl/strings/str_cat.h"
#include "collm/common/logging.h"
#include "collm/common/status.h"
#include "collm/engine/engine.h"

namespace collm::engine {

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

void Engine::SetShare(double share) {
  // The ceiling; the share controller works inside it from the next step on.
  share_ceiling_ = share;
  policy_->set_training_share(share);
  std::lock_guard<std::mutex> lock(mu_);
  stats_.training_share = share;
  stats_.training_share_ceiling = share;
}

absl::Status Engine::SetTrainingShare(double share) {
  COLLM_RETURN_IF_ERROR(CheckShare("training share", share));
  PostCommand([this, share] { SetShare(share); });
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
  if (task.training_share >= 0) SetShare(task.training_share);
  std::lock_guard<std::mutex> lock(mu_);
  // The load the task's ceiling was planned for: arrivals past it are a surge training yields to.
  task_forecast_rate_ = load_rates_.Forecast(clock_->NowNanos(), 0);
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
  r.first_step_loss = t->first_loss;
  r.last_step_loss = t->last_loss;
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
  }
  if (r.status.ok() && t->task.share_after >= 0) {
    SetShare(t->task.share_after);
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    task_forecast_rate_ = -1;
    stats_.training_task_active = false;
    stats_.training_share = policy_->training_share();
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
  if (task_->steps == 1) task_->first_loss = step->loss;
  task_->last_loss = step->loss;
  if (task_->steps >= task_->task.optimizer_steps) EndTask(absl::OkStatus());
}

}  // namespace collm::engine
