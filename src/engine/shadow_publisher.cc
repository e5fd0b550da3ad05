#include "collm/engine/shadow_publisher.h"

#include <chrono>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "collm/common/status.h"

namespace collm::engine {

ShadowPublisher::ShadowPublisher(std::shared_ptr<const runtime::LlamaModel> model,
                                 lora::AdapterRegistry& registry, std::string adapter_name,
                                 PublishOptions options, std::vector<TrainingExample> held_out)
    : model_(std::move(model)),
      registry_(registry),
      name_(std::move(adapter_name)),
      options_(options),
      held_out_(std::move(held_out)) {}

bool ShadowPublisher::Due(int64_t optimizer_step) const {
  return options_.every_steps > 0 && optimizer_step > 0 &&
         optimizer_step % options_.every_steps == 0;
}

absl::StatusOr<double> ShadowPublisher::LiveLoss() const {
  auto live = registry_.Get(name_);
  if (live.ok()) {
    if ((*live)->held_out_loss >= 0) return (*live)->held_out_loss;
    return EvaluateLoss(*model_, &(*live)->weights, held_out_);
  }
  return EvaluateLoss(*model_, nullptr, held_out_);  // Nothing live yet: the base model.
}

absl::StatusOr<ShadowPublisher::Losses> ShadowPublisher::Evaluate(
    const lora::LoraAdapter& candidate) const {
  Losses losses;
  if (options_.quality_gate && held_out_.empty()) {
    return absl::FailedPreconditionError("publish quality gate needs held-out examples");
  }
  if (!held_out_.empty()) {
    COLLM_ASSIGN_OR_RETURN(runtime::LoraWeights weights,
                           candidate.ToWeights(model_->config(), model_->runtime()));
    COLLM_ASSIGN_OR_RETURN(losses.candidate, EvaluateLoss(*model_, &weights, held_out_));
  }
  if (options_.quality_gate) {
    COLLM_ASSIGN_OR_RETURN(losses.live, LiveLoss());
  }
  return losses;
}

absl::StatusOr<bool> ShadowPublisher::Consider(const PeftTrainer& trainer,
                                               const std::string& source) {
  lora::LoraAdapter candidate = trainer.shadow().Snapshot();
  return Decide(candidate, trainer.shadow().step(), Evaluate(candidate), source);
}

absl::StatusOr<bool> ShadowPublisher::Decide(const lora::LoraAdapter& candidate_adapter,
                                             int64_t step, const absl::StatusOr<Losses>& losses,
                                             const std::string& source) {
  ++stats_.attempts;
  if (!losses.ok()) return losses.status();
  const double candidate = losses->candidate;
  if (candidate >= 0) stats_.last_candidate_loss = candidate;
  if (options_.quality_gate) {
    const double live = losses->live;
    stats_.live_loss = live;
    if (candidate > live - options_.min_improvement) {
      ++stats_.rejected;
      stats_.last_decision =
          absl::StrFormat("kept training: held-out loss %.4f does not beat the live %.4f by %.4f",
                          candidate, live, options_.min_improvement);
      return false;
    }
  }
  COLLM_ASSIGN_OR_RETURN(
      auto snapshot,
      registry_.Publish(name_, candidate_adapter,
                        source.empty() ? absl::StrCat("shadow step ", step) : source, candidate));
  ++stats_.published;
  stats_.live_version = snapshot->version;
  if (candidate >= 0) stats_.live_loss = candidate;
  stats_.last_decision =
      absl::StrFormat("published version %d (held-out loss %.4f)", snapshot->version, candidate);
  return true;
}

struct ShadowPublisher::Pending {
  lora::LoraAdapter candidate;
  int64_t step = 0;
  std::optional<runtime::LoraWeights> weights;  // The candidate in decoder layout.
  size_t next = 0;                              // Held-out examples evaluated so far.
  LossSum loss;
  absl::Status error;
};

bool ShadowPublisher::BeginConsider(const PeftTrainer& trainer) {
  if (pending_ != nullptr) return false;
  auto p = std::make_unique<Pending>();
  p->candidate = trainer.shadow().Snapshot();  // A deep copy: training goes on meanwhile.
  p->step = trainer.shadow().step();
  if (!held_out_.empty()) {
    auto w = p->candidate.ToWeights(model_->config(), model_->runtime());
    if (w.ok()) {
      p->weights = *std::move(w);
    } else {
      p->error = w.status();
    }
  }
  pending_ = std::move(p);
  return true;
}

bool ShadowPublisher::evaluating() const {
  return pending_ != nullptr && pending_->error.ok() && pending_->next < held_out_.size();
}

absl::Status ShadowPublisher::EvaluateSome(int64_t examples) {
  if (!evaluating()) return absl::OkStatus();
  Pending& p = *pending_;
  const size_t end =
      std::min(held_out_.size(), p.next + static_cast<size_t>(std::max<int64_t>(1, examples)));
  std::vector<const TrainingExample*> slice;
  for (size_t i = p.next; i < end; ++i) slice.push_back(&held_out_[i]);
  auto sum = EvaluateLossSum(*model_, &*p.weights, slice);
  if (!sum.ok()) {
    p.error = sum.status();
    return p.error;
  }
  p.loss.sum += sum->sum;
  p.loss.targets += sum->targets;
  p.next = end;
  return absl::OkStatus();
}

std::optional<absl::StatusOr<bool>> ShadowPublisher::Poll(bool wait) {
  if (pending_ == nullptr) return std::nullopt;
  if (wait) EvaluateSome(static_cast<int64_t>(held_out_.size())).IgnoreError();
  if (evaluating()) return std::nullopt;
  std::unique_ptr<Pending> done = std::move(pending_);
  absl::StatusOr<Losses> losses = [&]() -> absl::StatusOr<Losses> {
    COLLM_RETURN_IF_ERROR(done->error);
    if (options_.quality_gate && held_out_.empty()) {
      return absl::FailedPreconditionError("publish quality gate needs held-out examples");
    }
    Losses l;
    if (!held_out_.empty()) {
      if (done->loss.targets == 0) {
        return absl::InvalidArgumentError("no evaluation example has a target token");
      }
      l.candidate = done->loss.sum / static_cast<double>(done->loss.targets);
    }
    // The live version's loss is recorded when it was published; only the first gate (against
    // the base model) evaluates it here.
    if (options_.quality_gate) {
      COLLM_ASSIGN_OR_RETURN(l.live, LiveLoss());
    }
    return l;
  }();
  return Decide(done->candidate, done->step, losses);
}

ShadowPublisher::~ShadowPublisher() = default;

}  // namespace collm::engine
