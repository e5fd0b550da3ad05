// The daemon side of federation: one thread in collmd that connects out to a collm-aggregator
// (proto/collm/v1/federation.proto), registers the device, heartbeats with telemetry from the
// engine, and on a round task fetches the global adapter (chunked, sha256-checked), installs it
// into the shadow adapter, trains exactly the task's budget inside the engine's co-execution
// scheduler (serving first, the SLO guard in charge) and uploads the update (chunked, with its
// sample count and losses). Every newer global version is installed into the shadow and, when
// configured, offered to the live adapter through the local quality gate. Outside tasks the device
// trains only at its own configured share (budgets only), unless follow_aggregator_share. Each
// heartbeat carries the load report (Engine::LoadReport plus windows kept here) the aggregator
// plans rounds with. A lost aggregator means
// retries with exponential backoff and jitter; serving never depends on it.
#ifndef COLLM_FEDERATION_FL_CLIENT_H_
#define COLLM_FEDERATION_FL_CLIENT_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "collm/common/clock.h"
#include "collm/runtime/model_config.h"

namespace collm::engine {
class Engine;
class InteractionBuffer;
}  // namespace collm::engine

namespace collm::telemetry {
class MetricsRegistry;
}

namespace collm::federation {

// Where new global versions go: the shadow adapter only, or also the live adapter when the
// version passes the local quality gate.
enum class InstallGlobal { kShadow, kShadowAndLive };

// Channel security towards the aggregator. Files are read once, by FlClient::Create.
struct FlTlsOptions {
  bool enabled = false;     // TLS to the aggregator; false = plaintext (loopback/testing only).
  std::string ca;           // PEM CA bundle that signed the aggregator's certificate; "" = system.
  std::string cert;         // PEM client certificate for mutual TLS; with `key`, or neither.
  std::string key;          // PEM private key of `cert`.
  std::string server_name;  // Name verified in the aggregator's certificate; "" = the host.
};

// The one set of federation client options and defaults: collmd.yaml's federation: section
// (config::FederationConfig) is this struct, so a default lives only here.
struct FlClientOptions {
  // Connection: from collmd.yaml's federation: section.
  std::string aggregator;  // host:port; required.
  std::string device_id;   // [A-Za-z0-9._-]{1,64}; required.
  FlTlsOptions tls;
  double heartbeat_seconds = 5;          // Until Register returns the aggregator's interval; > 0.
  double backoff_initial_seconds = 0.5;  // Retry delay after the first failure; > 0.
  double backoff_max_seconds = 30;  // Doubling stops here; delays get +-25% jitter; >= initial.
  double rpc_timeout_seconds = 30;  // Per call (and per adapter transfer); > 0.
  int64_t upload_chunk_bytes = 1 << 20;  // Adapter bytes per UpdateChunk; (0, 64 MiB].
  InstallGlobal install_global = InstallGlobal::kShadowAndLive;
  double task_training_share = 0.5;    // For tasks whose training_share is 0; (0, 1].
  double deadline_margin_seconds = 1;  // Cut training short this long before a round's deadline.
  // Between tasks the device trains only as its own engine.training_share says (0 = only inside
  // the coordinator's budgets). true = follow the aggregator's policy training_share instead
  // (federation.follow_aggregator_share; an explicit ask for local training between rounds).
  bool follow_aggregator_share = false;
  // Identity sent at Register: filled by collmd from the loaded model, not from YAML.
  std::string model_name;         // e.g. "llama h64 L5".
  std::string model_fingerprint;  // sha256 of config.json (ModelFingerprint); required.
  std::string accelerator = "cpu";
  int64_t local_samples = 0;    // Local training examples.
  std::string serving_address;  // host:port of this daemon's InferenceService (load report).
  uint64_t seed = 0;            // Backoff jitter.
};

// A snapshot of the client's progress, also exported as collm_fl_* metrics.
struct FlClientStats {
  std::string state = "idle";  // idle | connecting | connected | training | disconnected | stopped.
  int64_t registrations = 0;
  int64_t heartbeats = 0;
  int64_t failures = 0;       // Failed calls (each followed by a backoff or retry).
  int64_t rounds_joined = 0;  // Tasks started.
  int64_t uploads_accepted = 0;
  int64_t uploads_rejected = 0;  // Refused by the aggregator (reason logged).
  int64_t tasks_failed = 0;      // Training or upload did not produce an accepted update.
  int64_t global_version = 0;    // Newest global version installed into the shadow.
  int64_t live_version = 0;      // Newest global version that went live (0 = none).
  int64_t last_round = 0;        // Round of the last task finished (uploaded or given up).
  std::string last_error;
};

// Thread-safe: Start, Stop and Stats may be called from any thread. The engine (with training
// enabled), feedback buffer and metrics registry are borrowed and must outlive the client.
class FlClient {
 public:
  // Reads the TLS files and builds the channel (connecting is lazy). InvalidArgument naming the
  // option for bad options; NotFound for an unreadable TLS file. `feedback` and `metrics` may be
  // null. Heartbeat and backoff sleeps, telemetry rates and round deadlines all follow `clock`
  // (borrowed; must outlive the client); a round deadline (wall time) is compared with the wall
  // time at Create advanced by `clock`.
  static absl::StatusOr<std::unique_ptr<FlClient>> Create(
      FlClientOptions options, engine::Engine& engine, const runtime::ModelConfig& model,
      std::shared_ptr<engine::InteractionBuffer> feedback, telemetry::MetricsRegistry* metrics,
      Clock& clock = Clock::Real());
  ~FlClient();

  // Starts the client thread.
  void Start();
  // Cancels the call in flight and joins the thread; a training task in the engine is cut
  // short (and not uploaded). Idempotent.
  void Stop();
  FlClientStats Stats() const;

 private:
  struct Impl;
  explicit FlClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace collm::federation

#endif  // COLLM_FEDERATION_FL_CLIENT_H_
