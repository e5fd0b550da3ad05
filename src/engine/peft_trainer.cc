#include "collm/engine/peft_trainer.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <random>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "collm/common/status.h"

namespace collm::engine {
namespace {

constexpr char kMicroStepsKey[] = "collm.micro_steps";
// Target rows per head chunk in evaluation (no gradients, so only the logits chunk is held).
constexpr int64_t kEvalHeadRows = 256;

// Pads a micro-batch into next-token inputs, targets and a target mask.
struct Batch {
  at::Tensor inputs;   // [B, L-1] int64
  at::Tensor targets;  // [B, L-1] int64
  at::Tensor mask;     // [B, L-1] float, 1 where targets[b, i] counts.
  // The target positions only: their row in the flattened [B * (L-1)] inputs and their token.
  // The head never sees any other position.
  at::Tensor target_rows;  // [num_targets] int64
  at::Tensor target_ids;   // [num_targets] int64
  int64_t tokens = 0;
  int64_t num_targets = 0;
};

Batch MakeBatch(const std::vector<const TrainingExample*>& examples) {
  int64_t len = 2;
  for (const auto* e : examples) len = std::max<int64_t>(len, e->tokens.size());
  const int64_t B = static_cast<int64_t>(examples.size());
  at::Tensor tokens = at::zeros({B, len}, at::kLong);
  at::Tensor mask = at::zeros({B, len}, at::kFloat);
  auto tok = tokens.accessor<int64_t, 2>();
  auto msk = mask.accessor<float, 2>();
  Batch b;
  for (int64_t i = 0; i < B; ++i) {
    const auto& e = *examples[i];
    for (size_t j = 0; j < e.tokens.size(); ++j) {
      tok[i][j] = e.tokens[j];
      msk[i][j] = e.loss_mask[j] ? 1.f : 0.f;
    }
    b.tokens += static_cast<int64_t>(e.tokens.size());
  }
  // Position 0 is never predicted.
  b.inputs = tokens.narrow(1, 0, len - 1).contiguous();
  b.targets = tokens.narrow(1, 1, len - 1).contiguous();
  b.mask = mask.narrow(1, 1, len - 1).contiguous();
  b.target_rows = b.mask.reshape({-1}).nonzero().reshape({-1});
  b.target_ids = b.targets.reshape({-1}).index_select(0, b.target_rows);
  b.num_targets = b.target_rows.numel();
  return b;
}

// Summed cross-entropy of target rows [begin, end) of `b`, given the last decoder layer's output
// `hidden` [B, L-1, hidden]: the head runs on those rows only.
absl::StatusOr<at::Tensor> TargetLossSum(const runtime::LlamaModel& model, const at::Tensor& hidden,
                                         const Batch& b, int64_t begin, int64_t end) {
  const auto dev = hidden.device();
  at::Tensor rows = b.target_rows.narrow(0, begin, end - begin).to(dev);
  at::Tensor x = hidden.reshape({-1, hidden.size(-1)}).index_select(0, rows);
  COLLM_ASSIGN_OR_RETURN(at::Tensor logits, model.DenseHead(x));
  return at::cross_entropy_loss(logits, b.target_ids.narrow(0, begin, end - begin).to(dev), {},
                                at::Reduction::Sum);
}

}  // namespace

absl::Status TrainerOptions::Validate() const {
  auto bad = [](const std::string& field, const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("training.", field, " ", what));
  };
  if (!(lr > 0) || !std::isfinite(lr)) return bad("lr", absl::StrCat("must be > 0, got ", lr));
  if (schedule == LrSchedule::kCosine && total_steps <= 0)
    return bad("total_steps", "must be > 0 for cosine");
  if (warmup_steps < 0)
    return bad("warmup_steps", absl::StrCat("must be >= 0, got ", warmup_steps));
  if (!(min_lr_ratio >= 0 && min_lr_ratio <= 1)) return bad("min_lr_ratio", "must be in [0, 1]");
  if (head_chunk_rows <= 0) {
    return bad("head_chunk_rows", absl::StrCat("must be > 0, got ", head_chunk_rows));
  }
  if (micro_batch_size <= 0)
    return bad("micro_batch_size", absl::StrCat("must be > 0, got ", micro_batch_size));
  if (grad_accum_steps <= 0)
    return bad("grad_accum_steps", absl::StrCat("must be > 0, got ", grad_accum_steps));
  if (!(adamw.beta1 >= 0 && adamw.beta1 < 1) || !(adamw.beta2 >= 0 && adamw.beta2 < 1)) {
    return bad("adamw.beta1/beta2", "must be in [0, 1)");
  }
  if (!(adamw.eps > 0)) return bad("adamw.eps", "must be > 0");
  if (!(adamw.weight_decay >= 0)) return bad("adamw.weight_decay", "must be >= 0");
  if (!(prox_mu >= 0) || !std::isfinite(prox_mu)) {
    return bad("prox_mu", absl::StrCat("must be >= 0, got ", prox_mu));
  }
  return absl::OkStatus();
}

ExampleSampler::ExampleSampler(const std::vector<TrainingExample>* examples, uint64_t seed)
    : examples_(examples), seed_(seed) {
  Shuffle();
}

void ExampleSampler::Shuffle() {
  order_.resize(examples_->size());
  for (size_t i = 0; i < order_.size(); ++i) order_[i] = i;
  // Fisher-Yates on raw mt19937_64 output: std::shuffle differs between standard libraries.
  std::mt19937_64 rng(seed_ * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(epoch_));
  for (size_t i = order_.size(); i > 1; --i) std::swap(order_[i - 1], order_[rng() % i]);
}

std::vector<const TrainingExample*> ExampleSampler::Next(int64_t n) {
  std::vector<const TrainingExample*> out;
  if (examples_->empty()) return out;
  while (static_cast<int64_t>(out.size()) < n) {
    if (position_ >= static_cast<int64_t>(order_.size())) {
      ++epoch_;
      position_ = 0;
      Shuffle();
    }
    out.push_back(&(*examples_)[order_[position_++]]);
  }
  return out;
}

std::map<std::string, std::string> ExampleSampler::State() const {
  return {{"sampler.epoch", std::to_string(epoch_)},
          {"sampler.position", std::to_string(position_)}};
}

absl::Status ExampleSampler::Restore(const std::map<std::string, std::string>& state) {
  int64_t epoch, position;
  auto e = state.find("sampler.epoch"), p = state.find("sampler.position");
  if (e == state.end() || p == state.end() || !absl::SimpleAtoi(e->second, &epoch) ||
      !absl::SimpleAtoi(p->second, &position) || epoch < 0 || position < 0) {
    return absl::InvalidArgumentError("checkpoint has no valid sampler.epoch / sampler.position");
  }
  epoch_ = epoch;
  Shuffle();
  position_ = position;
  return absl::OkStatus();
}

absl::StatusOr<LossSum> EvaluateLossSum(const runtime::LlamaModel& model,
                                        const runtime::LoraWeights* adapter,
                                        const std::vector<const TrainingExample*>& examples,
                                        int64_t batch_size) {
  at::NoGradGuard no_grad;
  LossSum total;
  batch_size = std::max<int64_t>(1, batch_size);
  for (size_t i = 0; i < examples.size(); i += batch_size) {
    std::vector<const TrainingExample*> chunk(
        examples.begin() + i, examples.begin() + std::min(examples.size(), i + batch_size));
    Batch b = MakeBatch(chunk);
    if (b.num_targets == 0) continue;
    if (adapter != nullptr &&
        static_cast<int64_t>(adapter->layers.size()) != model.config().num_hidden_layers) {
      return absl::InvalidArgumentError("evaluation: adapter layer count differs from the model");
    }
    COLLM_ASSIGN_OR_RETURN(auto ctx, model.DenseBegin(b.inputs));
    at::Tensor x = ctx.hidden;
    for (int64_t l = 0; l < model.config().num_hidden_layers; ++l) {
      COLLM_ASSIGN_OR_RETURN(x, model.DenseLayer(ctx, l, x, adapter, 0.0, false));
    }
    try {
      for (int64_t r = 0; r < b.num_targets; r += kEvalHeadRows) {
        COLLM_ASSIGN_OR_RETURN(
            at::Tensor sum,
            TargetLossSum(model, x, b, r, std::min(b.num_targets, r + kEvalHeadRows)));
        total.sum += sum.item<double>();
      }
    } catch (const c10::Error& e) {
      return absl::InternalError(absl::StrCat("evaluation: ", e.what_without_backtrace()));
    }
    total.targets += b.num_targets;
  }
  return total;
}

absl::StatusOr<double> EvaluateLoss(const runtime::LlamaModel& model,
                                    const runtime::LoraWeights* adapter,
                                    const std::vector<TrainingExample>& examples,
                                    int64_t batch_size) {
  std::vector<const TrainingExample*> all;
  for (const auto& e : examples) all.push_back(&e);
  COLLM_ASSIGN_OR_RETURN(LossSum total, EvaluateLossSum(model, adapter, all, batch_size));
  if (total.targets == 0)
    return absl::InvalidArgumentError("no evaluation example has a target token");
  return total.sum / static_cast<double>(total.targets);
}

absl::StatusOr<std::unique_ptr<PeftTrainer>> PeftTrainer::Create(
    std::shared_ptr<const runtime::LlamaModel> model, std::unique_ptr<lora::ShadowAdapter> shadow,
    const TrainerOptions& options) {
  COLLM_RETURN_IF_ERROR(options.Validate());
  std::unique_ptr<PeftTrainer> t(new PeftTrainer());
  t->model_ = std::move(model);
  t->shadow_ = std::move(shadow);
  t->options_ = options;
  return t;
}

double PeftTrainer::LearningRate(int64_t step) const {
  const TrainerOptions& o = options_;
  if (o.warmup_steps > 0 && step <= o.warmup_steps) {
    return o.lr * static_cast<double>(step) / static_cast<double>(o.warmup_steps);
  }
  if (o.schedule == LrSchedule::kConstant) return o.lr;
  const double span = std::max<int64_t>(1, o.total_steps - o.warmup_steps);
  const double progress = std::min(1.0, static_cast<double>(step - o.warmup_steps) / span);
  const double cosine = 0.5 * (1 + std::cos(M_PI * progress));
  return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * cosine);
}

// A phased micro-step's state between phases: the batch, the fused adapter on the autograd graph,
// and each layer's (detached) input and output so the backward can run one layer at a time.
struct PeftTrainer::Run {
  Batch batch;
  int64_t examples = 0;
  runtime::LoraWeights weights;
  runtime::LlamaModel::DenseContext ctx;
  std::vector<at::Tensor> inputs, outputs;  // Per layer.
  at::Tensor grad;                          // d loss / d (output of the layer to backprop next).
  at::Tensor top;                           // The last layer's output, detached, during the head.
  int64_t head_done = 0;                    // Target rows the head phase has run.
  double loss_sum = 0;                      // Their summed cross-entropy.
  int64_t phase = 0;
};

PeftTrainer::PeftTrainer() = default;
PeftTrainer::~PeftTrainer() = default;

int64_t PeftTrainer::num_phases() const { return 2 * model_->config().num_hidden_layers + 1; }
int64_t PeftTrainer::next_phase() const { return run_ ? run_->phase : 0; }
int64_t PeftTrainer::head_phase() const { return model_->config().num_hidden_layers; }
int64_t PeftTrainer::head_rows_left() const {
  if (run_ == nullptr || run_->phase > head_phase()) return 0;
  return run_->batch.num_targets - run_->head_done;
}
int64_t PeftTrainer::micro_step_examples() const { return run_ ? run_->examples : 0; }
int64_t PeftTrainer::micro_step_tokens() const { return run_ ? run_->batch.inputs.numel() : 0; }
void PeftTrainer::AbortMicroStep() { run_.reset(); }

absl::StatusOr<std::optional<StepStats>> PeftTrainer::MicroStep(
    const std::vector<const TrainingExample*>& examples) {
  COLLM_RETURN_IF_ERROR(BeginMicroStep(examples));
  for (;;) {
    COLLM_ASSIGN_OR_RETURN(PhaseResult r, AdvanceMicroStep());
    if (r.finished) return r.step;
  }
}

absl::Status PeftTrainer::BeginMicroStep(const std::vector<const TrainingExample*>& examples) {
  if (run_ != nullptr) return absl::FailedPreconditionError("a micro-step is already in flight");
  if (examples.empty()) return absl::InvalidArgumentError("empty micro-batch");
  auto run = std::make_unique<Run>();
  run->batch = MakeBatch(examples);
  run->examples = static_cast<int64_t>(examples.size());
  if (run->batch.num_targets == 0)
    return absl::InvalidArgumentError("micro-batch has no target tokens");
  const auto& rt = model_->runtime();
  try {
    // Dropout draws from the global generator; seeding it from counters makes runs (and resumed
    // runs) repeat exactly. Nothing else on the engine thread draws from it between phases.
    at::manual_seed(options_.seed * 1000003ull + static_cast<uint64_t>(micro_steps_));
    runtime::LoraFactors factors;
    factors.scale = shadow_->factors().scale;
    factors.layers = shadow_->factors().layers;
    // Device copies stay on the autograd graph, so gradients reach the CPU f32 parameters.
    if (rt.device.is_cuda() || rt.dtype != at::kFloat) {
      for (auto& layer : factors.layers) {
        for (auto& f : layer) {
          if (!f.a.defined()) continue;
          f.a = f.a.to(rt.device, rt.dtype);
          f.b = f.b.to(rt.device, rt.dtype);
        }
      }
    }
    COLLM_ASSIGN_OR_RETURN(run->weights, runtime::FuseLora(model_->config(), factors));
    COLLM_ASSIGN_OR_RETURN(run->ctx, model_->DenseBegin(run->batch.inputs));
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("training step: ", e.what_without_backtrace()));
  }
  const int64_t layers = model_->config().num_hidden_layers;
  run->inputs.resize(layers);
  run->outputs.resize(layers);
  run_ = std::move(run);
  return absl::OkStatus();
}

absl::StatusOr<PeftTrainer::PhaseResult> PeftTrainer::AdvanceMicroStep(int64_t max_head_rows) {
  if (run_ == nullptr) return absl::FailedPreconditionError("no micro-step in flight");
  Run& r = *run_;
  const int64_t layers = model_->config().num_hidden_layers;
  PhaseResult result;
  // Any failure drops the micro-step and the gradients accumulated so far (a half-run backward
  // may have reached some layers): the next optimizer step starts clean.
  auto fail = [&](absl::Status s) {
    DiscardPartialStep();
    return s;
  };
  try {
    if (r.phase < layers) {  // Forward of layer `l`.
      const int64_t l = r.phase;
      // A detached boundary lets the backward stop here and resume later from its gradient.
      r.inputs[l] = l == 0 ? r.ctx.hidden : r.outputs[l - 1].detach().requires_grad_(true);
      auto out =
          model_->DenseLayer(r.ctx, l, r.inputs[l], &r.weights, shadow_->config().dropout, true);
      if (!out.ok()) return fail(out.status());
      r.outputs[l] = *std::move(out);
    } else if (r.phase == layers) {  // Head, loss, and its backward down to the last layer.
      if (!r.top.defined()) r.top = r.outputs[layers - 1].detach().requires_grad_(true);
      const double denom = static_cast<double>(r.batch.num_targets) * options_.grad_accum_steps;
      const int64_t end = max_head_rows > 0
                              ? std::min(r.batch.num_targets, r.head_done + max_head_rows)
                              : r.batch.num_targets;
      // Each chunk's backward runs before the next chunk's forward, so only one chunk of
      // full-vocabulary logits (and its softmax gradient) is alive at a time; the gradients
      // accumulate in r.top.grad().
      while (r.head_done < end) {
        const int64_t stop = std::min(end, r.head_done + options_.head_chunk_rows);
        auto sum = TargetLossSum(*model_, r.top, r.batch, r.head_done, stop);
        if (!sum.ok()) return fail(sum.status());
        const double value = sum->item<double>();
        if (!std::isfinite(value)) return fail(absl::InternalError("training loss is not finite"));
        (*sum / denom).backward();
        r.loss_sum += value;
        r.head_done = stop;
      }
      if (r.head_done < r.batch.num_targets) return result;  // More head rows in a later call.
      // FedProx: the proximal term belongs once to each optimizer step, so each micro-batch adds
      // its share. It depends on the factors directly, not through the layers, so its gradient
      // lands here in full. Skipped entirely at mu = 0 so plain training stays bit-identical.
      if (options_.prox_mu > 0 && has_proximal_anchor()) {
        at::Tensor prox = at::zeros({}, at::kFloat);
        const auto& factor_layers = shadow_->factors().layers;
        for (size_t fl = 0; fl < factor_layers.size(); ++fl) {
          for (int t = 0; t < runtime::kNumLoraTargets; ++t) {
            const auto& w = factor_layers[fl][t];
            if (!w.a.defined()) continue;
            const auto& anchor = anchor_.layers[fl][t];
            prox = prox + (w.a - anchor.a).square().sum() + (w.b - anchor.b).square().sum();
          }
        }
        (prox * (options_.prox_mu / 2 / options_.grad_accum_steps)).backward();
      }
      r.grad = r.top.grad();
      r.top = at::Tensor();
      accum_loss_ += r.loss_sum / static_cast<double>(r.batch.num_targets);
    } else {  // Backward of layer `l`, top to bottom.
      const int64_t l = 2 * layers - r.phase;
      if (r.outputs[l].requires_grad()) r.outputs[l].backward(r.grad);
      if (l > 0) {
        // Undefined when layer l's output did not depend on its input through the adapter path.
        r.grad = r.inputs[l].grad().defined() ? r.inputs[l].grad() : at::zeros_like(r.inputs[l]);
      }
      r.outputs[l] = at::Tensor();
      r.inputs[l] = at::Tensor();
    }
  } catch (const c10::Error& e) {
    return fail(absl::InternalError(absl::StrCat("training step: ", e.what_without_backtrace())));
  }
  ++r.phase;
  if (r.phase < num_phases()) return result;

  result.finished = true;
  ++micro_steps_;
  ++accumulated_;
  accum_tokens_ += r.batch.tokens;
  accum_targets_ += r.batch.num_targets;
  run_.reset();
  if (accumulated_ < options_.grad_accum_steps) return result;

  StepStats stats;
  stats.lr = LearningRate(shadow_->step() + 1);
  stats.grad_norm = shadow_->Step(stats.lr, options_.max_grad_norm);
  stats.step = shadow_->step();
  stats.loss = accum_loss_ / static_cast<double>(accumulated_);
  stats.tokens = accum_tokens_;
  stats.target_tokens = accum_targets_;
  accumulated_ = 0;
  accum_loss_ = 0;
  accum_tokens_ = accum_targets_ = 0;
  result.step = stats;
  return result;
}

absl::StatusOr<StepStats> PeftTrainer::Step(ExampleSampler& sampler) {
  for (;;) {
    auto batch = sampler.Next(options_.micro_batch_size);
    if (batch.empty()) return absl::FailedPreconditionError("no training examples");
    COLLM_ASSIGN_OR_RETURN(std::optional<StepStats> stats, MicroStep(batch));
    if (stats.has_value()) return *stats;
  }
}

absl::StatusOr<double> PeftTrainer::Evaluate(const std::vector<TrainingExample>& examples) const {
  COLLM_ASSIGN_OR_RETURN(runtime::LoraWeights weights,
                         shadow_->Snapshot().ToWeights(model_->config(), model_->runtime()));
  return EvaluateLoss(*model_, &weights, examples);
}

absl::Status PeftTrainer::SetProximalAnchor(const lora::LoraAdapter& global) {
  const auto& layers = shadow_->factors().layers;
  if (global.factors.layers.size() != layers.size()) {
    return absl::InvalidArgumentError(absl::StrCat("proximal anchor has ",
                                                   global.factors.layers.size(),
                                                   " layers, the shadow adapter ", layers.size()));
  }
  runtime::LoraFactors anchor;
  anchor.scale = global.factors.scale;
  anchor.layers.resize(layers.size());
  try {
    at::NoGradGuard no_grad;
    for (size_t l = 0; l < layers.size(); ++l) {
      for (int t = 0; t < runtime::kNumLoraTargets; ++t) {
        const auto& w = layers[l][t];
        const auto& g = global.factors.layers[l][t];
        const std::string where =
            absl::StrCat("proximal anchor: layer ", l, " ",
                         runtime::LoraTargetName(static_cast<runtime::LoraTarget>(t)));
        if (w.a.defined() != g.a.defined() || w.b.defined() != g.b.defined()) {
          return absl::InvalidArgumentError(
              absl::StrCat(where, ": adapted in one of the anchor and the shadow adapter only"));
        }
        if (!w.a.defined()) continue;
        if (w.a.sizes() != g.a.sizes() || w.b.sizes() != g.b.sizes()) {
          return absl::InvalidArgumentError(
              absl::StrCat(where, ": factor shapes differ from the shadow adapter's"));
        }
        anchor.layers[l][t] = {g.a.detach().to(w.a.device(), w.a.scalar_type()).clone(),
                               g.b.detach().to(w.b.device(), w.b.scalar_type()).clone()};
      }
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("proximal anchor: ", e.what_without_backtrace()));
  }
  anchor_ = std::move(anchor);
  return absl::OkStatus();
}

void PeftTrainer::DiscardPartialStep() {
  run_.reset();
  shadow_->ZeroGrad();
  accumulated_ = 0;
  accum_loss_ = 0;
  accum_tokens_ = accum_targets_ = 0;
}

absl::Status PeftTrainer::SaveCheckpoint(const std::string& dir,
                                         const std::map<std::string, std::string>& extra) const {
  if (accumulated_ != 0) {
    return absl::FailedPreconditionError(
        "checkpoint requested in the middle of gradient accumulation");
  }
  std::map<std::string, std::string> meta = extra;
  meta[kMicroStepsKey] = std::to_string(micro_steps_);
  return shadow_->SaveCheckpoint(dir, meta);
}

absl::StatusOr<std::unique_ptr<PeftTrainer>> PeftTrainer::Resume(
    std::shared_ptr<const runtime::LlamaModel> model, const std::string& dir,
    const TrainerOptions& options, std::map<std::string, std::string>* extra) {
  std::map<std::string, std::string> meta;
  COLLM_ASSIGN_OR_RETURN(
      auto shadow, lora::ShadowAdapter::LoadCheckpoint(dir, model->config(), options.adamw, &meta));
  COLLM_ASSIGN_OR_RETURN(auto trainer, Create(std::move(model), std::move(shadow), options));
  auto it = meta.find(kMicroStepsKey);
  if (it == meta.end() || !absl::SimpleAtoi(it->second, &trainer->micro_steps_)) {
    return absl::InvalidArgumentError(absl::StrCat(dir, ": checkpoint lacks ", kMicroStepsKey));
  }
  if (extra != nullptr) *extra = meta;
  return trainer;
}

}  // namespace collm::engine
