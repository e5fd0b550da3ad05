#include <cmath>
#include <iomanip>
#include <iostream>
#include <map>
#include <ostream>
#include <sstream>

#include "collm/cli/commands.h"
#include "collm/common/clock.h"
#include "collm/engine/dataset.h"
#include "collm/engine/peft_trainer.h"
#include "collm/lora/peft_io.h"
#include "collm/lora/shadow_adapter.h"
#include "collm/runtime/llama_model.h"
#include "collm/runtime/tokenizer.h"

namespace collm::cli {
namespace {

std::string Bar(double fraction, int width) {
  const int filled = static_cast<int>(std::round(fraction * width));
  return std::string(filled, '#') + std::string(width - filled, '.');
}

std::string Duration(double seconds) {
  const int s = static_cast<int>(seconds + 0.5);
  std::ostringstream o;
  o << std::setfill('0') << std::setw(2) << s / 60 << ":" << std::setw(2) << s % 60;
  return o.str();
}

}  // namespace

int RunFinetune(const FinetuneArgs& args, std::ostream& out, std::ostream& err) {
  auto fail = [&](const absl::Status& s, int code) {
    err << "collmctl finetune: " << s.message() << "\n";
    return code;
  };
  if (args.steps <= 0) return fail(absl::InvalidArgumentError("--steps must be > 0"), 2);
  if (args.out_dir.empty()) return fail(absl::InvalidArgumentError("--out is required"), 2);

  lora::LoraConfig lora_config;
  lora_config.rank = args.rank;
  lora_config.alpha = args.alpha;
  lora_config.dropout = args.dropout;
  lora_config.use_rslora = args.rslora;
  lora_config.base_model_name_or_path = args.model_dir;
  lora_config.targets.clear();
  for (const auto& t : args.targets) {
    auto target = runtime::ParseLoraTarget(t);
    if (!target.ok()) return fail(target.status(), 2);
    lora_config.targets.push_back(*target);
  }
  if (absl::Status s = lora_config.Validate(); !s.ok()) return fail(s, 2);

  engine::TrainerOptions topt;
  topt.lr = args.lr;
  topt.schedule = args.schedule;
  topt.warmup_steps = args.warmup;
  topt.total_steps = args.steps;
  topt.micro_batch_size = args.batch;
  topt.grad_accum_steps = args.accum;
  topt.max_grad_norm = args.max_grad_norm;
  topt.adamw.weight_decay = args.weight_decay;
  topt.seed = args.seed;
  if (absl::Status s = topt.Validate(); !s.ok()) return fail(s, 2);

  auto model = runtime::LlamaModel::Load(args.model_dir, runtime::RuntimeOptions{});
  if (!model.ok()) return fail(model.status(), 1);
  auto tokenizer = runtime::Tokenizer::Load(args.model_dir + "/tokenizer.model");
  if (!tokenizer.ok()) return fail(tokenizer.status(), 1);

  engine::DatasetOptions dopt;
  dopt.format.prompt_field = args.prompt_field;
  dopt.format.completion_field = args.completion_field;
  dopt.format.text_field = args.text_field;
  dopt.format.messages_field = args.messages_field;
  dopt.format.prompt_template = args.prompt_template;
  dopt.max_length = std::min<int64_t>(args.max_length, (*model)->config().max_position_embeddings);
  dopt.held_out_fraction = args.held_out;
  dopt.seed = args.seed;
  dopt.max_examples = args.max_examples;
  engine::LoadReport report;
  auto dataset = engine::Dataset::Load(args.data_path, **tokenizer, dopt, &report);
  if (!dataset.ok()) return fail(dataset.status(), 2);
  err << "collmctl finetune: " << args.data_path << ": " << report.loaded << " examples ("
      << dataset->train().size() << " train, " << dataset->held_out().size() << " held out), "
      << report.skipped << " bad lines skipped, " << report.truncated << " truncated\n";
  for (const auto& e : report.errors) err << "  " << e << "\n";
  if (dataset->train().empty()) {
    return fail(absl::InvalidArgumentError("no training examples after the held-out split"), 2);
  }
  std::vector<engine::TrainingExample> eval(dataset->held_out().begin(), dataset->held_out().end());
  if (args.eval_examples > 0 && static_cast<int64_t>(eval.size()) > args.eval_examples) {
    eval.resize(args.eval_examples);
  }
  if (eval.empty()) eval.assign(dataset->train().begin(), dataset->train().begin() + 1);

  absl::StatusOr<lora::LoraAdapter> initial =
      args.init_adapter.empty()
          ? lora::LoraAdapter::Create((*model)->config(), lora_config, args.seed)
          : lora::ReadPeftAdapter(args.init_adapter, (*model)->config());
  if (!initial.ok()) return fail(initial.status(), 2);
  auto shadow = lora::ShadowAdapter::Create(*initial, topt.adamw);
  if (!shadow.ok()) return fail(shadow.status(), 1);
  auto trainer = engine::PeftTrainer::Create(*model, std::move(*shadow), topt);
  if (!trainer.ok()) return fail(trainer.status(), 2);

  auto before = (*trainer)->Evaluate(eval);
  if (!before.ok()) return fail(before.status(), 1);
  out << std::fixed << std::setprecision(4) << "held-out loss before: " << *before << " (ppl "
      << std::exp(*before) << ", " << eval.size() << " examples)\n"
      << std::flush;

  engine::ExampleSampler sampler(&dataset->train(), args.seed);
  const int64_t t0 = Clock::Real().NowNanos();
  int64_t tokens = 0;
  double last_loss = 0;
  for (int64_t step = 1; step <= args.steps; ++step) {
    auto stats = (*trainer)->Step(sampler);
    if (!stats.ok()) return fail(stats.status(), 1);
    tokens += stats->tokens;
    last_loss = stats->loss;
    if (args.progress) {
      const double elapsed = (Clock::Real().NowNanos() - t0) * 1e-9;
      const double frac = static_cast<double>(step) / args.steps;
      err << "\r[" << Bar(frac, 30) << "] " << step << "/" << args.steps << std::fixed
          << std::setprecision(4) << " loss " << stats->loss << std::scientific
          << std::setprecision(1) << " lr " << stats->lr << std::fixed << std::setprecision(0)
          << " " << tokens / std::max(elapsed, 1e-9) << " tok/s ETA "
          << Duration(elapsed / frac - elapsed) << "   " << std::flush;
    }
  }
  const double seconds = (Clock::Real().NowNanos() - t0) * 1e-9;
  if (args.progress) err << "\n";
  auto after = (*trainer)->Evaluate(eval);
  if (!after.ok()) return fail(after.status(), 1);
  lora::LoraAdapter result = (*trainer)->shadow().Snapshot();
  result.config.base_model_name_or_path = args.model_dir;
  if (absl::Status s = lora::WritePeftAdapter(args.out_dir, result); !s.ok()) return fail(s, 1);
  out << std::fixed << std::setprecision(4) << "held-out loss after: " << *after << " (ppl "
      << std::exp(*after) << ")\n"
      << "trained " << args.steps << " steps in " << std::setprecision(1) << seconds << " s ("
      << std::setprecision(0) << tokens / std::max(seconds, 1e-9) << " tok/s), last train loss "
      << std::setprecision(4) << last_loss << "\n"
      << "adapter written to " << args.out_dir << "\n";
  return 0;
}

void AddFinetuneCommand(CLI::App& app, FinetuneArgs& a, int& exit_code) {
  CLI::App* cmd = app.add_subcommand("finetune", "Train a LoRA adapter locally (PEFT format out)");
  cmd->add_option("--model", a.model_dir, "Hugging Face model directory")->required();
  cmd->add_option("--data", a.data_path, "JSONL (or JSON array) training file")->required();
  cmd->add_option("--steps", a.steps, "Optimizer steps")->capture_default_str();
  cmd->add_option("--out", a.out_dir, "Output PEFT adapter directory")->required();
  cmd->add_option("--rank,-r", a.rank, "LoRA rank")->capture_default_str();
  cmd->add_option("--alpha", a.alpha, "LoRA alpha")->capture_default_str();
  cmd->add_option("--dropout", a.dropout, "LoRA dropout")->capture_default_str();
  cmd->add_flag("--rslora", a.rslora, "Scale alpha/sqrt(r) (rsLoRA)");
  cmd->add_option("--targets", a.targets,
                  "Target modules (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--lr", a.lr, "Peak learning rate")->capture_default_str();
  // Parsed here, once: a misspelt schedule fails with the option and the allowed values.
  const std::map<std::string, engine::LrSchedule> schedules = {
      {"constant", engine::LrSchedule::kConstant}, {"cosine", engine::LrSchedule::kCosine}};
  cmd->add_option("--schedule", a.schedule,
                  "Learning-rate schedule after warmup: constant or cosine (default cosine)")
      ->transform(CLI::CheckedTransformer(schedules));
  cmd->add_option("--warmup", a.warmup, "Warmup steps")->capture_default_str();
  cmd->add_option("--batch", a.batch, "Micro-batch size (examples)")->capture_default_str();
  cmd->add_option("--accum", a.accum, "Gradient accumulation steps")->capture_default_str();
  cmd->add_option("--max-grad-norm", a.max_grad_norm, "Clip norm (<= 0: off)")
      ->capture_default_str();
  cmd->add_option("--weight-decay", a.weight_decay, "AdamW weight decay")->capture_default_str();
  cmd->add_option("--seed,-s", a.seed, "Seed (init, data order, dropout, split)")
      ->capture_default_str();
  cmd->add_option("--max-length", a.max_length, "Max tokens per example")->capture_default_str();
  cmd->add_option("--max-examples", a.max_examples, "Use at most this many records (0 = all)");
  cmd->add_option("--held-out", a.held_out, "Held-out fraction")->capture_default_str();
  cmd->add_option("--eval-examples", a.eval_examples, "Held-out examples evaluated (0 = all)")
      ->capture_default_str();
  cmd->add_option("--prompt-field", a.prompt_field, "Prompt field (GSM8K: question)")
      ->capture_default_str();
  cmd->add_option("--completion-field", a.completion_field, "Completion field (GSM8K: answer)")
      ->capture_default_str();
  cmd->add_option("--text-field", a.text_field, "Plain-text field")->capture_default_str();
  cmd->add_option("--messages-field", a.messages_field, "Chat messages field")
      ->capture_default_str();
  cmd->add_option("--prompt-template", a.prompt_template, "Prompt template with {prompt}");
  cmd->add_option("--init-adapter", a.init_adapter, "Start from this PEFT adapter");
  cmd->add_flag("!--no-progress", a.progress, "No progress bar");
  cmd->callback([&]() { exit_code = RunFinetune(a, std::cout, std::cerr); });
}

}  // namespace collm::cli
