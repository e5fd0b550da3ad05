// collmctl subcommands as functions, so tests can call them in-process and src/bin/collmctl.cc
// only wires them to CLI11.
#ifndef COLLM_CLI_COMMANDS_H_
#define COLLM_CLI_COMMANDS_H_

#include <cstdint>
#include <iosfwd>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"

namespace collm::cli {

struct GenerateArgs {
  std::string model_dir;  // Empty: the tiny random model (offline default).
  std::string prompt = "Once upon a time";
  int max_tokens = 64;
  float temperature = 0.8f;
  int top_k = 40;
  float top_p = 0.95f;
  float min_p = 0.05f;
  float repetition_penalty = 1.0f;
  uint64_t seed = 0;
  std::vector<std::string> stop;
  bool no_bos = false;
  bool ignore_eos = false;
  std::string device = "cpu";
  std::string dtype = "auto";
  int threads = 0;
};

// Prints the continuation (not the prompt) to `out` as it streams; timing and notes to `err`.
// Returns the process exit code (0 ok, 1 runtime error, 2 bad arguments).
int RunGenerate(const GenerateArgs& args, std::ostream& out, std::ostream& err);
void AddGenerateCommand(CLI::App& app, GenerateArgs& args, int& exit_code);

struct RandomModelArgs {
  std::string out_dir;
  // "tiny", or a shape name from shapes_dir (e.g. "stories15M"), or a path to a config.json.
  std::string shape = "tiny";
  std::string dtype = "f32";  // Stored dtype: f32, bf16, f16.
  uint64_t seed = 0;
  bool tokenizer = true;  // Train and write tokenizer.model (only for vocab sizes <= 2000).
};

int RunRandomModel(const RandomModelArgs& args, std::ostream& out, std::ostream& err);
void AddRandomModelCommand(CLI::App& app, RandomModelArgs& args, int& exit_code);

// Where the offline default model lives: $COLLM_CACHE_DIR, else $XDG_CACHE_HOME/collm, else
// ~/.cache/collm, plus "/tiny-random". Written on first use.
std::string DefaultTinyModelDir();

}  // namespace collm::cli

#endif  // COLLM_CLI_COMMANDS_H_
