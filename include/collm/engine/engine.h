// The engine: the loop thread that owns the model's KV cache, the running sequences and the
// shadow-adapter trainer, and composes the parts that do the work: continuous batching
// (Sequence, PlanStep/ApplyStep in batch_planner.h), admission under a KV budget (a request
// enters only when its whole sequence, prompt + max_tokens capped by the context, fits), the
// co-execution policy (coordination::CoExecutionPolicy) that decides when training phases run,
// and the federation hooks. Other threads submit through a bounded queue and receive output
// through a per-request sink.
#ifndef COLLM_ENGINE_ENGINE_H_
#define COLLM_ENGINE_ENGINE_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "collm/common/clock.h"
#include "collm/coordination/admission.h"
#include "collm/coordination/arrival_rate.h"
#include "collm/coordination/co_execution_policy.h"
#include "collm/coordination/load_rates.h"
#include "collm/coordination/share_controller.h"
#include "collm/engine/dataset.h"
#include "collm/engine/engine_metrics.h"
#include "collm/engine/peft_trainer.h"
#include "collm/engine/request.h"
#include "collm/engine/sequence.h"
#include "collm/engine/shadow_publisher.h"
#include "collm/lora/adapter_registry.h"
#include "collm/runtime/generator.h"
#include "collm/runtime/kv_cache.h"
#include "collm/runtime/llama_model.h"
#include "collm/runtime/sampler.h"
#include "collm/runtime/tokenizer.h"
#include "collm/telemetry/metrics.h"

namespace collm::engine {

struct EngineOptions {
  int64_t max_step_tokens = 256;     // Tokens per step: decodes + prefill chunks; > 0.
  int64_t max_running = 32;          // Sequences in the running batch at most; > 0.
  int64_t max_queued = 128;          // Waiting requests at most; more are refused at once; > 0.
  runtime::KvCacheOptions kv_cache;  // The paged KV pool (block size, blocks); admission holds a
                                     // request until its whole sequence fits.
  std::string default_adapter;       // Adapter for requests that name none; "" = base model.
  SloTarget default_slo;             // For requests without an SLO class; {0, 0} = no objective.
  // Named SLO classes a request picks with EngineRequest::slo_class; an unknown name is
  // InvalidArgument. Their tightest TTFT bounds what an idle training phase may take.
  std::map<std::string, SloTarget> slo_classes;

  // Co-execution (fast timescale; passed on as coordination::CoExecutionOptions). PEFT
  // micro-steps on the shadow adapter run in the same loop as inference steps, once
  // EnableTraining() attached a trainer.
  double training_share = 0.0;  // Target share of busy engine time spent training, in [0, 1].
                                // Idle time is always used for training when > 0.
  bool slo_guard = true;        // Start a micro-step only if no queued or running request would
                                // then miss its TTFT/TPOT objective, given measured step costs.
  double guard_safety = 1.2;    // Multiplier on predicted costs in the guard; >= 1.
  // Training granularity is one phase (a decoder layer's forward or backward) of one example; when
  // even that exceeds what an arriving request could wait, idle training still runs if the
  // expected share of arrivals it delays (measured arrival rate x phase time) is at most this,
  // in [0, 1].
  // Without it a daemon whose SLO is tighter than a phase would never train.
  double guard_idle_risk = 0.02;
  // Bound on the predicted cost of any one training phase (ms), by construction: micro-steps are
  // sized from the measured phase costs so every per-token phase fits, and the head phase runs
  // in row chunks that fit. >= 0; 0 = no bound (collmd.yaml's engine.max_phase_ms).
  double max_phase_ms = 0;
  // The per-step share controller (coordination/share_controller.h): inside the share ceiling
  // (training_share, or a task's share) it sets the share every step from the SLO headroom of
  // queued and running requests and yields at once to a load surge past the forecast.
  // collmd.yaml's engine.share_controller.
  coordination::ShareControllerOptions share_controller;

  // SLO-aware admission (coordination/admission.h): a request predicted, from the measured step
  // cost and the prefill queued ahead of it, to miss its class's TTFT objective is refused at
  // Submit (kReject: ResourceExhausted) or queued behind those that can make theirs
  // (kDeprioritize); a queued request that falls behind is deprioritised in both modes, never
  // dropped. Classes without a TTFT objective are never shed. Default kNone (first come, first
  // served). collmd.yaml's engine.admission.
  coordination::AdmissionMode admission = coordination::AdmissionMode::kNone;
};

// Where training examples come from: feedback from served requests first, then the dataset.
struct TrainingSetup {
  std::unique_ptr<PeftTrainer> trainer;
  std::vector<TrainingExample> dataset;         // Local training data (may be empty).
  std::shared_ptr<InteractionBuffer> feedback;  // May be null.
  std::unique_ptr<ShadowPublisher> publisher;   // May be null: never publish.
  uint64_t seed = 0;                            // Seeds the dataset's example order.
  std::string checkpoint_dir;          // Periodic shadow checkpoints go here ("" = none) ...
  int64_t checkpoint_every_steps = 0;  // ... every N optimizer steps (0 = never periodic).
};

struct EngineStats {
  int64_t queued = 0;
  int64_t running = 0;
  int64_t steps = 0;
  int64_t last_batch_tokens = 0;
  int64_t completed = 0;
  int64_t cancelled = 0;
  int64_t expired = 0;
  int64_t rejected_queue_full = 0;
  int64_t rejected_slo = 0;   // Refused at Submit: predicted to miss the TTFT objective.
  int64_t deprioritized = 0;  // Queued behind the rest: predicted to miss it (at or after Submit).
  int64_t slo_met = 0;
  int64_t prompt_tokens = 0;  // Prompt tokens of admitted requests.
  int64_t generated_tokens = 0;
  int64_t kv_blocks_used = 0;
  int64_t kv_blocks_total = 0;
  // Training.
  int64_t train_phases = 0;  // Micro-step phases run (one decoder layer forward/backward).
  int64_t train_micro_steps = 0;
  int64_t train_optimizer_steps = 0;
  int64_t train_examples = 0;
  int64_t train_tokens = 0;              // Tokens forwarded by completed optimizer steps.
  int64_t train_guard_blocked = 0;       // Phases not run because an SLO would be missed.
  double train_loss = 0;                 // Loss of the last optimizer step.
  double train_time_share = 0;           // Measured share of busy time spent training (EWMA).
  double train_step_seconds = 0;         // EWMA cost of one micro-step.
  double infer_step_seconds = 0;         // EWMA cost of one inference step.
  double training_share = 0;             // Share aimed for this step (the share controller's).
  double training_share_ceiling = 0;     // Its ceiling (EngineOptions, SetTrainingShare or a task).
  std::string share_reason = "ceiling";  // Why the share is what it is (ShareReasonName).
  int64_t share_yields = 0;              // Load surges training yielded to.
  bool training_task_active = false;     // A RunTrainingTask budget is being trained.
  PublishStats publish;
  // Load signals for routers (GetStats; collm-router).
  int64_t queued_prompt_tokens = 0;    // Prompt tokens not yet prefilled (queued + running).
  int64_t running_context_tokens = 0;  // KV tokens of running sequences.
  int64_t max_step_tokens = 0;         // EngineOptions::max_step_tokens.
};

// Federation hooks (the slow timescale actuates these; see Engine::RunTrainingTask).
// A training budget: exactly `optimizer_steps` optimizer steps on the shadow adapter, scheduled
// like all training (serving first, the SLO guard in charge), then a report.
struct TrainingTask {
  int64_t optimizer_steps = 0;  // > 0.
  double lr = 0;                // Peak learning rate from now on; 0 = keep the trainer's.
  double prox_mu = 0;           // FedProx coefficient (anchor = the shadow at task start); >= 0.
  double training_share = -1;   // Share while the task runs, [0, 1]; < 0 = keep the current one.
  double share_after = -1;      // Share once the task is done, [0, 1]; < 0 = keep.
};

// The engine's load as the slow timescale and the router plan with it (Engine::LoadReport).
// 0 = not measured yet for the estimates.
struct EngineLoadReport {
  double arrival_rate_1s = 0;   // Requests/s, decayed over ~1 s (coordination::LoadRates).
  double arrival_rate_30s = 0;  // Requests/s, decayed over ~30 s.
  double arrival_trend = 0;     // Requests/s per second.
  int64_t queued = 0;
  int64_t running = 0;
  int64_t max_running = 0;
  double free_kv_fraction = 1;  // Free KV blocks / total.
  // Serving-only capacity from the measured step-cost model (coordination::StepCostModel::
  // ServingCapacityRps at the mean prompt and output lengths): prefill at full steps' cost per
  // token, decode at decode steps' cost per row of the batches they carried. Conservative at
  // light load (small measured batches); planners keep headroom below it.
  double serving_capacity_rps = 0;
  double serving_capacity_tokens_per_s = 0;  // capacity_rps x mean tokens per request.
  double optimizer_step_seconds = 0;         // One optimizer step training alone.
  double train_tokens_per_s_solo = 0;        // Training tokens/s training alone.
  double training_share = 0;                 // Current target share.
  double train_time_share = 0;               // Measured share of busy time (EWMA).
  bool training_task_active = false;
  int64_t adapter_version = 0;  // Live adapter version (local publish counter).
};

struct TrainingReport {
  absl::Status status;          // OK; Cancelled when replaced, superseded by an install or shut
                                // down; Aborted when cut short with no step done; else the error.
  lora::LoraAdapter adapter;    // Shadow snapshot right after the task's last optimizer step.
  int64_t optimizer_steps = 0;  // Steps in the snapshot (< the budget only when cut short).
  int64_t num_samples = 0;      // Examples trained on during the task (FedAvg weight).
  double mean_train_loss = 0;   // Mean over the task's optimizer steps.
  double held_out_loss = -1;    // Of the snapshot on the publisher's held-out set; < 0 = none.
  double first_step_loss = 0;   // Loss of the task's first and last optimizer step (the quality
  double last_step_loss = 0;    // gain estimate: their difference per step).
};

struct InstallOptions {
  bool reset_optimizer = true;  // Fresh AdamW moments (a new global version is a new start).
  bool publish = false;         // Also publish to the live adapter through the publisher's gate.
  std::string source;           // Recorded with the published version, e.g. "global v3".
};

struct InstallResult {
  absl::Status status;        // Load or publish error; FailedPrecondition without training.
  bool published = false;     // The quality gate let it go live.
  std::string decision;       // The gate's reason.
  double held_out_loss = -1;  // Of the installed adapter; < 0 = not measured.
};

struct ScoreResult {
  absl::Status status;
  double loss = 0;            // Mean cross-entropy per target token (nats).
  int64_t target_tokens = 0;  // Tokens the mean is over.
  std::string adapter;        // Scored adapter; "" = the base model.
  int64_t adapter_version = 0;
};

// Thread-safe: Submit, Cancel, Stats and Shutdown may be called from any thread.
class Engine {
 public:
  // `registry` may be null (base model only). The model, tokenizer and registry must outlive it.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(
      std::shared_ptr<const runtime::LlamaModel> model, const runtime::Tokenizer* tokenizer,
      lora::AdapterRegistry* registry, const EngineOptions& options, Clock& clock = Clock::Real());
  ~Engine();

  // Starts the engine thread.
  void Start();
  // What requests are validated against (ValidateRequest): the model's vocabulary and context.
  RequestLimits request_limits() const;
  // Validates (ValidateRequest, then the SLO class and adapter) and enqueues. InvalidArgument
  // naming the field, NotFound for an unknown adapter,
  // ResourceExhausted at once when the queue is full, the request can never fit in the KV
  // cache, or (admission kReject) it is predicted to miss its TTFT objective. Returns the id.
  absl::StatusOr<uint64_t> Submit(EngineRequest request, std::shared_ptr<RequestSink> sink);
  // The request finishes with Cancelled within one step. Unknown ids are ignored.
  void Cancel(uint64_t id);
  // Stops accepting requests, lets running and queued ones finish for up to `grace_seconds`,
  // cancels what is left, and joins the engine thread. Idempotent.
  void Shutdown(double grace_seconds);
  EngineStats Stats() const;
  // Teacher-forced mean token loss of an adapter on `examples` (no gradients, nothing trained):
  // `adapter` is resolved like a request's ("" = options.default_adapter; `base_model` = no
  // adapter, with adapter ""). NotFound for an unknown adapter, InvalidArgument when no example
  // has a target. Runs on the engine thread between steps, like the publish gate's evaluation,
  // so it holds serving up for its length: callers bound the examples. Thread-safe; the future
  // is always fulfilled (Cancelled at Shutdown at the latest).
  std::future<ScoreResult> Score(std::vector<TrainingExample> examples, std::string adapter,
                                 bool base_model);
  // A snapshot of load and measured costs (engine_load_report.cc).
  EngineLoadReport LoadReport() const;

  // Attaches the shadow-adapter trainer; call before Start(). InvalidArgument for a bad share.
  absl::Status EnableTraining(TrainingSetup setup);

  // Runs one scheduling step (inference, then maybe a training micro-step) on the calling thread
  // (only when Start() was not called): for tests that drive time with a FakeClock. Returns false
  // when there was nothing to do.
  bool StepForTest();
  // Records request latencies, batch sizes, queue depth, KV use and training progress into
  // `metrics` (borrowed, must outlive the engine). Call before Start().
  void SetMetrics(telemetry::MetricsRegistry* metrics);
  // Writes the shadow adapter, its optimizer state and the data cursor to `dir`, so a restarted
  // daemon resumes training where it stopped. Only while the engine thread is not running (before
  // Start or after Shutdown). FailedPrecondition without training.
  absl::Status CheckpointTraining(const std::string& dir);
  // Restores the data cursor saved by CheckpointTraining (the trainer itself is resumed with
  // PeftTrainer::Resume before EnableTraining).
  absl::Status RestoreTrainingCursor(const std::map<std::string, std::string>& state);

  // Replaces the measured costs the SLO guard and admission predict with (tests with a
  // FakeClock): one inference step (full or decode-only), and one training phase per padded input
  // token (every phase alike).
  void SetCostEstimatesForTest(double infer_step_seconds, double phase_seconds_per_token);

  // --- Federation hooks. Thread-safe; each is applied on the engine thread at the next step
  // boundary (the thread that owns the trainer and shadow), so serving never waits on a lock held
  // by training. Without Start(), StepForTest() applies them. Futures are always fulfilled: at
  // Shutdown at the latest (Cancelled).
  // Sets the target training share. InvalidArgument outside [0, 1].
  absl::Status SetTrainingShare(double share);
  // Loads `adapter` (same targets and rank as the shadow) into the shadow adapter, dropping a
  // partial step; a running training task is cancelled (its base changed). With
  // `options.publish`, then offers it to the ShadowPublisher's quality gate for the live adapter.
  std::future<InstallResult> InstallAdapter(lora::LoraAdapter adapter, InstallOptions options);
  // Starts a training budget (replacing a running one, which reports Cancelled). The report
  // comes after exactly task.optimizer_steps optimizer steps. InvalidArgument for a bad task and
  // FailedPrecondition without training come through the future as well.
  std::future<TrainingReport> RunTrainingTask(TrainingTask task);
  // Ends the running task now (e.g. at the round deadline): it reports the steps done so far
  // (a partial update), or Aborted when none was done. No-op without a task.
  void FinishTrainingTaskEarly();

 private:
  Engine() = default;

  // --- The loop (engine.cc) ---
  void Loop();
  bool Step();  // Commands, one inference step, then maybe training phases.
  // Drops cancelled and expired sequences, admits from the queue, plans, runs and applies one
  // batch (PlanStep / forward / ApplyStep), retires finished sequences.
  bool InferenceStep();
  void Finish(Sequence& s, const absl::Status& status, runtime::FinishReason reason);
  void RecordStepMetrics(int64_t batch_tokens);
  // Routers' load signals into stats_ (engine thread, mu_ held).
  void RecordLoadSignals();
  // SLO-aware admission; the *Locked ones REQUIRE mu_ held.
  // Moves queued requests predicted to miss their TTFT objective behind the others.
  void DeprioritizeHopelessLocked();
  // Prompt tokens of the queued requests ahead of every deprioritised one.
  int64_t FrontPrefillTokensLocked() const;
  // Counts a shed request (stats, collm_requests_shed_total{slo_class, reason}).
  void CountShedLocked(const Sequence& s, const char* reason);
  // Serving as the co-execution policy sees it (queued and running requests, arrival rate).
  coordination::ServingSnapshot ServingSnapshotNow() const;
  // The share controller's decision for this step, applied to the co-execution policy.
  void UpdateShare();

  // --- Training on the engine thread (engine_training.cc) ---
  // Runs training phases (see PeftTrainer::AdvanceMicroStep) and publish evaluation slices while
  // the co-execution policy allows; returns whether it ran any.
  bool MaybeTrain();
  enum class BeginResult { kStarted, kDoesNotFit, kNoData };
  // Starts a micro-step of at most `max_examples` whose padded input tokens fit `max_tokens`
  // (< 0: exactly one example, whatever its size).
  BeginResult BeginMicroStep(int64_t max_examples, double max_tokens);
  // Returns whether the micro-step finished. `max_head_rows`: see PeftTrainer::AdvanceMicroStep.
  bool RunTrainingPhase(int64_t max_head_rows);
  void RunEvaluationSlice(int64_t examples);
  void PollPublisher(bool wait = false);  // Publishes once a background evaluation is done.
  // Saves the training checkpoint; engine thread, or any thread while the loop is stopped.
  absl::Status SaveTrainingCheckpoint(const std::string& dir);
  void CountGuardBlocked();

  // --- Federation hooks: commands posted by other threads, run on the engine thread
  // (engine_federation_hooks.cc) ---
  // The running training task (RunTrainingTask) and its progress.
  struct ActiveTask {
    TrainingTask task;
    std::shared_ptr<std::promise<TrainingReport>> promise;
    int64_t steps = 0;
    int64_t samples = 0;           // Examples in micro-steps so far.
    int64_t samples_in_steps = 0;  // ... of which in completed optimizer steps.
    double loss_sum = 0;
    double first_loss = 0;
    double last_loss = 0;
  };
  bool PostCommand(std::function<void()> command);  // False once Shutdown closed the queue.
  void RunCommands();                               // Engine thread.
  void StartTask(TrainingTask task, std::shared_ptr<std::promise<TrainingReport>> promise);
  void EndTask(absl::Status status);  // Reports the active task (engine thread).
  // Called by RunTrainingPhase after each micro-step (engine thread).
  void OnTaskProgress(int64_t examples, const absl::Status& status,
                      const std::optional<StepStats>& step);
  void SetShare(double share);  // The share ceiling: policy and stats (engine thread).

  std::shared_ptr<const runtime::LlamaModel> model_;
  const runtime::Tokenizer* tokenizer_ = nullptr;
  lora::AdapterRegistry* registry_ = nullptr;
  EngineOptions options_;
  Clock* clock_ = nullptr;
  std::unique_ptr<runtime::KvCache> cache_;  // Engine thread only.

  mutable std::mutex mu_;
  std::condition_variable wake_;
  std::deque<std::unique_ptr<Sequence>> queue_;  // Guarded by mu_.
  std::set<uint64_t> cancel_requests_;           // Guarded by mu_.
  uint64_t next_id_ = 1;                         // Guarded by mu_.
  bool accepting_ = true;                        // Guarded by mu_.
  bool stop_ = false;                            // Guarded by mu_.
  int64_t shutdown_deadline_nanos_ = 0;          // Guarded by mu_; 0 = not shutting down.
  EngineStats stats_;                            // Guarded by mu_.
  coordination::ArrivalRateEstimator arrivals_;  // Guarded by mu_ (Submit records).
  coordination::LoadRates load_rates_;           // Guarded by mu_ (Submit records).
  std::vector<std::function<void()>> commands_;  // Guarded by mu_.
  bool commands_closed_ = false;                 // Guarded by mu_; set by Shutdown.
  // SLO-aware admission: Submit predicts against it, the engine thread feeds it step costs.
  std::unique_ptr<coordination::AdmissionController> admission_;  // Guarded by mu_.
  coordination::AdmissionLoad load_;  // Guarded by mu_; the running batch after the last step.

  std::vector<std::unique_ptr<Sequence>> running_;  // Engine thread only.
  std::thread thread_;

  // Engine thread only.
  std::unique_ptr<coordination::CoExecutionPolicy> policy_;  // When to train; learned costs.
  std::unique_ptr<coordination::ShareController> share_;     // How much, within the ceiling.
  double share_ceiling_ = 0;
  // Arrivals/s the running task's ceiling was planned for (the forecast at its start); < 0 = no
  // task: the 30 s rate is the forecast.
  double task_forecast_rate_ = -1;
  TrainingSetup training_;
  std::unique_ptr<ExampleSampler> sampler_;
  std::deque<TrainingExample> pool_;  // Drawn examples waiting for a micro-step they fit.
  double micro_step_seconds_ = 0;     // Spent on the micro-step in flight so far.
  double last_infer_seconds_ = 0;     // This iteration's inference and training seconds.
  double last_train_seconds_ = 0;
  std::unique_ptr<ActiveTask> task_;
  std::unique_ptr<EngineMetrics> metrics_;  // Null = none.
};

}  // namespace collm::engine

#endif  // COLLM_ENGINE_ENGINE_H_
