#include "collm/engine/shadow_publisher.h"

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
  return options_.every_steps > 0 && optimizer_step > 0 && optimizer_step % options_.every_steps == 0;
}

absl::StatusOr<double> ShadowPublisher::LiveLoss() {
  auto live = registry_.Get(name_);
  if (live.ok()) {
    if ((*live)->held_out_loss >= 0) return (*live)->held_out_loss;
    return EvaluateLoss(*model_, &(*live)->weights, held_out_);
  }
  return EvaluateLoss(*model_, nullptr, held_out_);  // Nothing live yet: the base model.
}

absl::StatusOr<bool> ShadowPublisher::Consider(const PeftTrainer& trainer) {
  ++stats_.attempts;
  double candidate = -1;
  const bool can_evaluate = !held_out_.empty();
  if (can_evaluate) {
    COLLM_ASSIGN_OR_RETURN(candidate, trainer.Evaluate(held_out_));
    stats_.last_candidate_loss = candidate;
  }
  if (options_.quality_gate) {
    if (!can_evaluate) {
      return absl::FailedPreconditionError("publish quality gate needs held-out examples");
    }
    COLLM_ASSIGN_OR_RETURN(double live, LiveLoss());
    stats_.live_loss = live;
    if (candidate > live - options_.min_improvement) {
      ++stats_.rejected;
      stats_.last_decision = absl::StrFormat(
          "kept training: held-out loss %.4f does not beat the live %.4f by %.4f", candidate, live,
          options_.min_improvement);
      return false;
    }
  }
  COLLM_ASSIGN_OR_RETURN(auto snapshot,
                         registry_.Publish(name_, trainer.shadow().Snapshot(),
                                           absl::StrCat("shadow step ", trainer.shadow().step()),
                                           candidate));
  ++stats_.published;
  stats_.live_version = snapshot->version;
  if (candidate >= 0) stats_.live_loss = candidate;
  stats_.last_decision = absl::StrFormat("published version %d (held-out loss %.4f)",
                                         snapshot->version, candidate);
  return true;
}

}  // namespace collm::engine
