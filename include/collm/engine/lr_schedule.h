// The learning-rate schedule of PEFT training, apart from peft_trainer.h so that argument and
// config parsers can name it without including torch.
#ifndef COLLM_ENGINE_LR_SCHEDULE_H_
#define COLLM_ENGINE_LR_SCHEDULE_H_

namespace collm::engine {

// The learning rate after warmup (collmd.yaml and collmctl spell them "constant" and "cosine").
enum class LrSchedule {
  kConstant,  // lr throughout.
  kCosine,    // Cosine decay from lr to min_lr_ratio * lr at total_steps.
};

}  // namespace collm::engine

#endif  // COLLM_ENGINE_LR_SCHEDULE_H_
