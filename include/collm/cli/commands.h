// collmctl subcommands as functions, so tests can call them in-process and src/bin/collmctl.cc
// only wires them to CLI11.
#ifndef COLLM_CLI_COMMANDS_H_
#define COLLM_CLI_COMMANDS_H_

#include <cstdint>
#include <iosfwd>
#include <optional>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "collm/engine/lr_schedule.h"

namespace collm::cli {

struct GenerateArgs {
  std::string model_dir;     // Empty: the tiny random model (offline default).
  std::string adapter_dir;   // PEFT adapter served unmerged; empty = base model.
  std::string daemon;        // host:port of a running collmd: stream from it instead of locally.
  std::string adapter_name;  // With --daemon: the daemon's adapter to use ("" = its default).
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
  std::string weights = "f32";  // Base weight format: f32, int8, int4.
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

struct FinetuneArgs {
  std::string model_dir;
  std::string data_path;  // JSONL (or JSON array) file.
  std::string out_dir;    // PEFT adapter output.
  int64_t steps = 100;
  int rank = 8;
  double alpha = 16;
  double dropout = 0.05;
  bool rslora = false;
  std::vector<std::string> targets = {"q_proj", "k_proj", "v_proj", "o_proj"};
  double lr = 1e-3;
  engine::LrSchedule schedule = engine::LrSchedule::kCosine;
  int64_t warmup = 10;
  int64_t batch = 8;
  int64_t accum = 1;
  double max_grad_norm = 1.0;
  double weight_decay = 0.0;
  uint64_t seed = 0;
  int64_t max_length = 512;
  int64_t max_examples = 0;
  double held_out = 0.1;
  int64_t eval_examples = 128;  // Held-out examples used for the before/after loss (0 = all).
  std::string prompt_field = "prompt";
  std::string completion_field = "completion";
  std::string text_field = "text";
  std::string messages_field = "messages";
  std::string prompt_template = "{prompt}\n";
  std::string init_adapter;  // Start from this PEFT adapter instead of a fresh one.
  bool progress = true;      // Progress bar on stderr.
};

// Trains a LoRA adapter locally; progress on `err`, held-out loss before/after on `out`.
int RunFinetune(const FinetuneArgs& args, std::ostream& out, std::ostream& err);
void AddFinetuneCommand(CLI::App& app, FinetuneArgs& args, int& exit_code);

// `collmctl fed ...`: operator commands against a running collm-aggregator
// (FederationAdminService). Verbs: status | devices | rounds | rounds watch | round show N | start
// | pause | resume | policy set --rounds .. | adapter pull VERSION --out DIR. Human tables by
// default, --json for scripts (the proto messages as JSON, field names as in federation.proto).
struct FedArgs {
  std::string aggregator = "127.0.0.1:7070";  // host:port.
  std::string token;                          // Admin token; "" = $COLLM_ADMIN_TOKEN.
  std::string tls_ca;    // PEM CA to verify the aggregator; any TLS flag turns TLS on.
  std::string tls_cert;  // Client certificate (mutual TLS).
  std::string tls_key;
  bool json = false;
  double timeout_s = 10;  // Per unary call.
  int64_t round = 0;      // round show N
  int64_t limit = 0;      // rounds --limit
  int64_t version = 0;    // adapter pull VERSION (0 = newest)
  std::string out_dir;    // adapter pull --out
  // policy set: only the flags given are changed.
  std::optional<int64_t> rounds, local_steps, min_clients, max_clients, quorum;
  std::optional<double> lr, deadline_s, server_lr, prox_mu, clip_norm, max_update_norm, trim_ratio,
      training_share;
  std::optional<std::string> strategy, server_optimizer;
};

// `verb` is one of the verbs above with spaces ("round show", "rounds watch", ...). Returns the
// exit code: 0 ok, 1 unreachable or refused (message on `err` naming why), 2 bad arguments.
int RunFed(const FedArgs& args, const std::string& verb, std::ostream& out, std::ostream& err);
void AddFedCommand(CLI::App& app, FedArgs& args, int& exit_code);

// `collmctl health ADDR | stats | adapters list|load|unload`: operator verbs against a running
// collmd over gRPC. Exit codes: 0 ok (health: SERVING), 1 not serving, unreachable or refused
// (message on `err`), 2 bad arguments.
struct DeviceArgs {
  std::string address = "127.0.0.1:50051";  // collmd's gRPC host:port.
  std::string service;                      // health: the service to check ("" = the server).
  bool json = false;                        // stats, adapters: JSON instead of tables.
  double timeout_s = 5;                     // Per call.
  std::string name;                         // adapters load/unload NAME.
  std::string path;                         // adapters load PEFT_DIR.
  std::string token;  // adapters load/unload: collmd's server.admin_token ("" = none sent).
};

int RunHealth(const DeviceArgs& args, std::ostream& out, std::ostream& err);
int RunStats(const DeviceArgs& args, std::ostream& out, std::ostream& err);
// `verb`: "list", "load" or "unload".
int RunAdapters(const DeviceArgs& args, const std::string& verb, std::ostream& out,
                std::ostream& err);
void AddDeviceCommands(CLI::App& app, DeviceArgs& args, int& exit_code);

// `collmctl task make --kind K --out DIR`: writes a built-in, deterministic (seeded) task as
// DIR/train.jsonl and DIR/heldout.jsonl, {"prompt","completion"} records. The two splits never
// share a prompt. Kinds: "parity" ("Number: 37\nParity: " -> "odd") and "copy" (a few letters
// repeated back). Exit codes: 0 ok, 1 cannot write, 2 bad arguments.
struct TaskArgs {
  std::string kind = "parity";
  std::string out_dir;
  int train = 2000;   // Training examples.
  int heldout = 100;  // Held-out examples (never in train.jsonl).
  uint64_t seed = 0;
};

int RunTaskMake(const TaskArgs& args, std::ostream& out, std::ostream& err);
void AddTaskCommand(CLI::App& app, TaskArgs& args, int& exit_code);

// `collmctl demo --daemon ADDR --heldout FILE`: the main job's driver. Sends client load to a
// running collmd over gRPC, evaluates the served adapter greedily on the held-out split every
// --eval-every seconds (exact match of the completion), shows one refreshing status line on
// `err` and ends with a summary table on `out`. Exit codes: 0 ok, 1 daemon unreachable or
// failing, 2 bad arguments.
struct DemoArgs {
  std::string daemon = "127.0.0.1:50051";
  std::string heldout;           // heldout.jsonl from `collmctl task make`.
  std::string adapter = "live";  // The served adapter to evaluate (training.adapter_name).
  double duration_s = 60;        // How long to drive load.
  double eval_every_s = 10;      // Seconds between held-out evaluations.
  int eval_examples = 50;        // Held-out examples per evaluation (first N).
  int clients = 2;               // Concurrent client streams.
  int max_tokens = 8;            // Per client request and per evaluation.
  bool live = true;              // Refresh the status line with \r (false: one line per update).
  // Federated mode (scripts/run.sh --federated): `daemon` is then the collm-router in front of
  // `devices`, whose stats, served global versions and held-out losses are read one by one.
  std::vector<std::string> devices;  // collmd gRPC host:port each; empty = `daemon` alone.
  std::string aggregator;            // collm-aggregator host:port: rounds are started after the
                                     // base evaluation and shown; "" = not federated.
  std::string token;                 // Aggregator admin token; "" = $COLLM_ADMIN_TOKEN.
};

int RunDemo(const DemoArgs& args, std::ostream& out, std::ostream& err);
void AddDemoCommand(CLI::App& app, DemoArgs& args, int& exit_code);

// Where the offline default model lives: $COLLM_CACHE_DIR, else $XDG_CACHE_HOME/collm, else
// ~/.cache/collm, plus "/tiny-random". Written on first use.
std::string DefaultTinyModelDir();

}  // namespace collm::cli

#endif  // COLLM_CLI_COMMANDS_H_
