// collmd's configuration: YAML (configs/collmd.yaml documents every key) -> each module's Options,
// read with the rules of collm/config/yaml_reader.h (shared with aggregator.yaml).
// Unknown keys and bad values are errors naming the key path ("engine.max_step_tokens must be > 0,
// got 0"; "engine.max_step_tokenz: unknown key").
#ifndef COLLM_CONFIG_DAEMON_CONFIG_H_
#define COLLM_CONFIG_DAEMON_CONFIG_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "collm/common/logging.h"
#include "collm/config/shared_sections.h"
#include "collm/engine/dataset.h"
#include "collm/engine/engine.h"
#include "collm/engine/peft_trainer.h"
#include "collm/engine/shadow_publisher.h"
#include "collm/federation/fl_client.h"
#include "collm/lora/lora_config.h"
#include "collm/runtime/device.h"
#include "collm/runtime/sampler.h"

namespace collm::config {

struct TrainingConfig {
  bool enabled = false;
  // Local JSONL/JSON files (relative to the config file). Empty with enabled = feedback-only
  // training (examples from SubmitFeedback; then feedback_capacity must be > 0).
  std::vector<std::string> data;
  engine::DatasetOptions dataset;     // Fields, template, max_length, held_out_fraction, seed.
  lora::LoraConfig lora;              // Shadow adapter shape (when not starting from one).
  std::string adapter_name = "live";  // Registry name the shadow publishes to.
  std::string init_adapter;           // PEFT dir to start from; "" = fresh adapter.
  engine::TrainerOptions trainer;
  engine::PublishOptions publish;
  std::string checkpoint_dir;          // Shadow checkpoints (resume after restart); "" = none.
  int64_t checkpoint_every_steps = 0;  // 0 = only at shutdown.
  int64_t feedback_capacity = 1024;    // Examples buffered from SubmitFeedback.
};

struct ServerConfig {
  std::string address = "127.0.0.1:50051";  // gRPC listen address; port 0 = pick a free one.
  int64_t max_message_bytes = 64 << 20;
  // LoadAdapter may read only PEFT dirs inside these (relative to the config file); empty =
  // LoadAdapter refused.
  std::vector<std::string> adapter_roots;
  std::string admin_token;       // Bearer token for LoadAdapter/UnloadAdapter ("" = none).
  std::string admin_token_file;  // Read the token from this file instead (exclusive).
};

struct MetricsConfig {
  bool enabled = true;
  std::string address = "127.0.0.1:9400";  // Prometheus /metrics over HTTP; port 0 = free port.
};

// Taking part in federated fine-tuning: collmd connects out to a collm-aggregator, trains its
// shadow adapter for each round's budget and uploads the result (see federation/fl_client.h).
// The federation: section fills the client's connection options (their defaults are
// FlClientOptions'); collmd fills the identity fields (model_name, ...) before FlClient::Create.
struct FederationConfig : federation::FlClientOptions {
  bool enabled = false;
};

struct DaemonConfig {
  std::string model_dir;  // HF model directory (required).
  runtime::RuntimeOptions runtime;
  engine::EngineOptions engine;
  runtime::SamplingParams default_sampling;     // For fields a request leaves unset.
  std::map<std::string, std::string> adapters;  // name -> PEFT dir, loaded at start.
  TrainingConfig training;
  FederationConfig federation;
  ServerConfig server;
  MetricsConfig metrics;
  HttpConfig http;
  LoggingOptions logging;
  double shutdown_grace_seconds = 10;  // Drain time on SIGTERM/SIGINT.

  // Parses YAML text. Every value may use ${VAR} or ${VAR:-default} (an unset VAR without a
  // default is an error; "$${" is a literal "${"). Paths (model, adapters, server.adapter_roots,
  // server.admin_token_file, training.data,
  // training.init_adapter, training.checkpoint_dir, federation.tls.{ca,cert,key}) expand a leading
  // "~/" to $HOME; relative ones resolve against `base_dir` ("" = leave them relative). Errors are
  // InvalidArgument naming the key path; YAML syntax errors give "line L, column C" (1-based).
  static absl::StatusOr<DaemonConfig> FromYaml(const std::string& yaml,
                                               const std::string& base_dir);
  // FromYaml on the file's text with base_dir = the file's (absolute) directory; errors are
  // prefixed with "PATH: ". NotFound when the file does not exist.
  static absl::StatusOr<DaemonConfig> FromFile(const std::string& path);
};

}  // namespace collm::config

#endif  // COLLM_CONFIG_DAEMON_CONFIG_H_
