// collm-aggregator's configuration: YAML (configs/aggregator.yaml documents every key), read with
// the same rules as collmd.yaml (collm/config/yaml_reader.h: ${VAR} expansion, ~ and relative
// paths, unknown keys with suggestions). Bad values are InvalidArgument naming the key path
// ("policy.lr must be > 0, got -1"; "policy.lrr: unknown key").
#ifndef COLLM_CONFIG_AGGREGATOR_CONFIG_H_
#define COLLM_CONFIG_AGGREGATOR_CONFIG_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "collm/common/logging.h"
#include "collm/coordination/round_planner.h"
#include "collm/federation/round_manager.h"
#include "collm/lora/lora_config.h"

namespace collm::config {

struct AggregatorTlsConfig {
  std::string cert;                  // Server certificate chain (PEM); "" = plaintext.
  std::string key;                   // Its private key (PEM).
  std::string client_ca;             // CA that signs device/admin client certificates (PEM).
  bool require_client_cert = false;  // Mutual TLS: refuse connections without a verified cert.
  bool device_id_from_cert = true;   // With mutual TLS: device_id must equal the cert's CN.
  bool enabled() const { return !cert.empty(); }
};

struct AggregatorConfig {
  std::string address = "127.0.0.1:7070";  // gRPC listen address; port 0 = pick a free one.
  int64_t max_message_bytes = 16 << 20;    // Per gRPC message (adapters travel in chunks).
  std::string state_dir;                   // Required: rounds, devices, global versions.
  std::string model_config;                // Required: the base model's config.json (or its dir).
  std::string initial_adapter;             // PEFT dir for global version 1; "" = fresh from `lora`.
  lora::LoraConfig lora;                   // Shape of a fresh initial adapter.
  uint64_t seed = 0;                       // Fresh adapter init and participant sampling.
  int64_t heartbeat_interval_ms = 5000;
  int64_t offline_after_missed = 3;
  int64_t max_update_bytes = 256 << 20;  // Largest accepted update payload.
  int64_t tick_ms = 200;                 // How often deadlines and round openings are checked.
  bool auto_start = false;               // Start running rounds on a fresh state dir.
  v1::FederationPolicy policy;           // Only the keys given are set (defaults fill the rest).
  AggregatorTlsConfig tls;
  std::string admin_token;       // Bearer token for admin calls ("" = none).
  std::string admin_token_file;  // Read the token from this file instead.
  LoggingOptions logging;
  double shutdown_grace_seconds = 5;
  // The slow timescale (coordination: section): who trains each round and how much.
  coordination::RoundPlannerOptions coordination;
  std::string metrics_address;  // Prometheus /metrics listen address; port 0 = any; "" = off.

  // ${VAR} / ${VAR:-default} / $${ expand in every value; paths (state_dir, model_config,
  // initial_adapter, tls.*, admin_token_file) expand a leading ~ and resolve relative ones against
  // `base_dir`. Byte sizes (server.max_message_bytes, max_update_bytes) take units (16MiB).
  static absl::StatusOr<AggregatorConfig> FromYaml(const std::string& yaml,
                                                   const std::string& base_dir);
  // FromYaml on the file's text, base_dir = its absolute directory; errors prefixed with "PATH: ".
  // NotFound when the file does not exist.
  static absl::StatusOr<AggregatorConfig> FromFile(const std::string& path);
};

}  // namespace collm::config

#endif  // COLLM_CONFIG_AGGREGATOR_CONFIG_H_
