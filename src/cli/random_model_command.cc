#include <filesystem>
#include <iostream>
#include <ostream>

#include "collm/cli/commands.h"
#include "collm/runtime/random_model.h"
#include "collm/runtime/safetensors.h"

namespace collm::cli {

int RunRandomModel(const RandomModelArgs& args, std::ostream& out, std::ostream& err) {
  runtime::RandomModelOptions options;
  if (args.shape == "tiny") {
    options.config = runtime::TinyLlamaConfig();
  } else {
    std::string path = args.shape;
    if (!std::filesystem::exists(path)) {
      err << "collmctl: --shape must be 'tiny' or a path to a config.json (e.g. "
             "shared/models/shapes/stories15M.json), got '"
          << args.shape << "'\n";
      return 2;
    }
    auto config = runtime::ModelConfig::FromFile(path);
    if (!config.ok()) {
      err << "collmctl: " << config.status().message() << "\n";
      return 2;
    }
    options.config = *config;
  }
  auto dtype = runtime::ParseStoredDType(args.dtype == "f32"    ? "F32"
                                         : args.dtype == "bf16" ? "BF16"
                                         : args.dtype == "f16"  ? "F16"
                                                                : args.dtype);
  if (!dtype.ok()) {
    err << "collmctl: --dtype must be f32, bf16 or f16, got '" << args.dtype << "'\n";
    return 2;
  }
  options.dtype = *dtype;
  options.seed = args.seed;
  options.write_tokenizer = args.tokenizer && options.config.vocab_size <= 2000;
  if (args.tokenizer && !options.write_tokenizer) {
    err << "collmctl: vocab_size " << options.config.vocab_size
        << " is too large for the built-in tokenizer trainer; writing no tokenizer.model\n";
  }
  if (absl::Status s = runtime::WriteRandomModel(args.out_dir, options); !s.ok()) {
    err << "collmctl: " << s.message() << "\n";
    return 1;
  }
  out << args.out_dir << "\n";
  return 0;
}

void AddRandomModelCommand(CLI::App& app, RandomModelArgs& args, int& exit_code) {
  CLI::App* cmd = app.add_subcommand(
      "random-model",
      "Write a Llama checkpoint with random weights (HF layout) for tests/benchmarks");
  cmd->add_option("--out,-o", args.out_dir, "Output directory")->required();
  cmd->add_option("--shape", args.shape, "'tiny' or a path to a config.json")
      ->capture_default_str();
  cmd->add_option("--dtype", args.dtype, "Stored dtype: f32, bf16, f16")->capture_default_str();
  cmd->add_option("--seed", args.seed, "Random seed")->capture_default_str();
  cmd->add_flag("!--no-tokenizer", args.tokenizer, "Do not train/write tokenizer.model");
  cmd->callback([&]() { exit_code = RunRandomModel(args, std::cout, std::cerr); });
}

}  // namespace collm::cli
