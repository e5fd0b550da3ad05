#include "collm/federation/fl_client.h"

#include <grpcpp/grpcpp.h>
#include <sys/sysinfo.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "collm/common/grpc_status.h"
#include "collm/common/logging.h"
#include "collm/common/status.h"
#include "collm/engine/dataset.h"
#include "collm/engine/engine.h"
#include "collm/federation/adapter_stream.h"
#include "collm/lora/peft_io.h"
#include "collm/telemetry/metrics.h"
#include "collm/v1/federation.grpc.pb.h"

namespace collm::federation {
namespace {

namespace fs = std::filesystem;
namespace v1 = ::collm::v1;

// Codes after which the same call can succeed later (the aggregator restarts, the network
// recovers); the rest are refusals that retrying would only repeat.
bool Retryable(const absl::Status& s) {
  switch (s.code()) {
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kDeadlineExceeded:
    case absl::StatusCode::kResourceExhausted:
    case absl::StatusCode::kAborted:
    case absl::StatusCode::kInternal:
    case absl::StatusCode::kUnknown:
      return true;
    default:
      return false;
  }
}

// How often a running task (and an adapter install) checks for Stop, the round's deadline and the
// heartbeat: engine futures cannot be woken by Stop, so their waits are sliced.
constexpr std::chrono::milliseconds kTaskPollInterval{50};
// A FakeClock moves without waking anyone, so waits on a clock other than the real one re-read it
// this often.
constexpr std::chrono::milliseconds kFakeClockPollInterval{5};
// The SLO attainment window of the load report: this many heartbeats or requests at most.
constexpr size_t kSloWindowHeartbeats = 12;
constexpr int64_t kSloWindowRequests = 256;

int64_t SystemUnixMillis() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

absl::StatusOr<std::string> ReadFile(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in.is_open()) return absl::NotFoundError(absl::StrCat(what, ": cannot read '", path, "'"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

absl::StatusOr<lora::PeftBlob> ToBlob(const lora::LoraAdapter& adapter) {
  return lora::SerializePeftAdapter(adapter);
}

absl::StatusOr<lora::LoraAdapter> FromBlob(const lora::PeftBlob& blob,
                                           const runtime::ModelConfig& model,
                                           const std::string& what) {
  return lora::ParsePeftAdapter(blob, model, what);
}

struct Metrics {
  telemetry::Counter* rounds_joined;
  telemetry::Counter* uploads_accepted;
  telemetry::Counter* uploads_rejected;
  telemetry::Counter* tasks_failed;
  telemetry::Counter* failures;
  telemetry::Gauge* connected;
  telemetry::Gauge* global_version;
  telemetry::Gauge* live_version;
};

}  // namespace

struct FlClient::Impl {
  FlClientOptions options;
  // Every time read and wait of the client goes through this clock (gRPC call deadlines aside,
  // which gRPC measures itself).
  Clock* clock = nullptr;
  // Round deadlines are wall-clock times set by the aggregator (another machine): they are
  // compared with the wall time at Create advanced by `clock`, so a fake clock drives them too.
  int64_t unix_ms_at_clock_zero = 0;
  engine::Engine* engine = nullptr;
  runtime::ModelConfig model;
  std::shared_ptr<engine::InteractionBuffer> feedback;
  std::unique_ptr<Metrics> metrics;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::FederationService::Stub> stub;
  std::mt19937_64 rng;

  // Client thread only.
  std::string session;
  double heartbeat_seconds = 5;
  int64_t failures_in_a_row = 0;
  std::unique_ptr<lora::LoraAdapter> global;  // Cached newest fetched global adapter.
  int64_t global_cached_version = 0;
  double idle_share = -1;  // Share between tasks: the engine's own at Create (or the
                           // aggregator's with follow_aggregator_share).
  engine::EngineStats last_stats;
  // (finished, met SLO) per heartbeat interval, newest last: the SLO attainment window.
  std::deque<std::pair<int64_t, int64_t>> slo_window;
  int64_t slo_window_finished = 0;
  int64_t slo_window_met = 0;
  double loss_reduction_per_step = 0;  // Of the last task with >= 2 steps; 0 = unknown.
  int64_t last_stats_nanos = -1;       // Clock time of last_stats; -1 = none yet.
  int64_t samples_at_last_round = 0;

  mutable std::mutex mu;
  std::condition_variable wake;
  bool stop = false;                      // Guarded by mu.
  grpc::ClientContext* active = nullptr;  // Guarded by mu: the call Stop cancels.
  FlClientStats stats;                    // Guarded by mu.
  std::thread thread;

  bool Stopping() const {
    std::lock_guard<std::mutex> lock(mu);
    return stop;
  }
  int64_t UnixMillis() const { return unix_ms_at_clock_zero + clock->NowNanos() / 1'000'000; }
  // `seconds` from now on the clock, in its nanoseconds.
  int64_t After(double seconds) const {
    return clock->NowNanos() + static_cast<int64_t>(seconds * 1e9);
  }
  // Sleeps `seconds` of clock time; false when Stop interrupted it.
  bool SleepFor(double seconds) {
    const int64_t until = After(seconds);
    const bool real = clock == &Clock::Real();
    std::unique_lock<std::mutex> lock(mu);
    while (!stop) {
      const std::chrono::nanoseconds left(until - clock->NowNanos());
      if (left.count() <= 0) return true;
      wake.wait_for(lock,
                    real ? left : std::min<std::chrono::nanoseconds>(left, kFakeClockPollInterval));
    }
    return false;
  }
  void SetState(const std::string& state) {
    std::lock_guard<std::mutex> lock(mu);
    stats.state = state;
    if (metrics) metrics->connected->Set(state == "connected" || state == "training" ? 1 : 0);
  }
  template <typename F>
  void Update(F f) {
    std::lock_guard<std::mutex> lock(mu);
    f(stats);
  }

  // A context with the call deadline, registered for cancellation by Stop.
  struct Call {
    Impl* impl;
    grpc::ClientContext ctx;
    Call(Impl* i, double timeout_seconds) : impl(i) {
      ctx.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1e3)));
      std::lock_guard<std::mutex> lock(impl->mu);
      impl->active = &ctx;
      if (impl->stop) ctx.TryCancel();
    }
    ~Call() {
      std::lock_guard<std::mutex> lock(impl->mu);
      impl->active = nullptr;
    }
  };

  double Backoff() {
    const double base = std::min(
        options.backoff_max_seconds,
        options.backoff_initial_seconds *
            std::pow(2.0, static_cast<double>(std::min<int64_t>(failures_in_a_row - 1, 30))));
    // Jitter spreads the reconnects of many devices after an aggregator restart.
    std::uniform_real_distribution<double> jitter(0.75, 1.25);
    return base * jitter(rng);
  }

  void Loop();
  absl::Status Cycle();
  absl::Status Register();
  absl::Status Heartbeat(v1::HeartbeatResponse* response);
  // True when the aggregator answers a heartbeat with "register again".
  bool SessionLost();
  absl::StatusOr<std::unique_ptr<lora::LoraAdapter>> Fetch(int64_t version, int64_t* got_version);
  absl::Status InstallNewGlobal(int64_t version);
  absl::Status Install(const lora::LoraAdapter& adapter, bool publish, int64_t version);
  absl::Status RunTask(const v1::RoundTask& task);
  absl::Status Upload(const v1::RoundTask& task, const engine::TrainingReport& report,
                      std::string* reason);
  v1::DeviceTelemetry Telemetry();
  void Fail(const absl::Status& s);
};

void FlClient::Impl::Fail(const absl::Status& s) {
  ++failures_in_a_row;
  if (metrics) metrics->failures->Increment();
  Update([&](FlClientStats& st) {
    ++st.failures;
    st.last_error = std::string(s.message());
  });
}

void FlClient::Impl::Loop() {
  SetState("connecting");
  while (!Stopping()) {
    const absl::Status s = Cycle();
    if (Stopping()) break;
    if (!s.ok()) {
      Fail(s);
      SetState("disconnected");
      const double delay = Backoff();
      // The first failure of a streak is worth a warning; the retries after it are not news.
      if (failures_in_a_row == 1) {
        COLLM_LOG_WARN("federation: {} (retrying with backoff)", s.ToString());
      } else {
        COLLM_LOG_DEBUG("federation: {} (retry in {:.2f} s)", s.ToString(), delay);
      }
      if (!Retryable(s) && s.code() != absl::StatusCode::kCancelled) {
        // A refusal (wrong model, bad id, bad credentials) will not fix itself quickly; the
        // backoff still applies so the operator can fix the aggregator side.
        COLLM_LOG_ERROR("federation: the aggregator refused: {}", s.ToString());
      }
      SleepFor(delay);
      continue;
    }
    if (failures_in_a_row > 0) COLLM_LOG_INFO("federation: connected to {}", options.aggregator);
    failures_in_a_row = 0;
    SleepFor(heartbeat_seconds);
  }
  SetState("stopped");
}

absl::Status FlClient::Impl::Cycle() {
  if (session.empty()) COLLM_RETURN_IF_ERROR(Register());
  v1::HeartbeatResponse hb;
  COLLM_RETURN_IF_ERROR(Heartbeat(&hb));
  if (hb.reregister()) {
    COLLM_LOG_INFO("federation: the aggregator lost our session; registering again");
    session.clear();
    return Register();
  }
  SetState("connected");
  int64_t last_round;
  {
    std::lock_guard<std::mutex> lock(mu);
    last_round = stats.last_round;
  }
  if (hb.has_task() && hb.task().round() != last_round) return RunTask(hb.task());
  if (hb.global_version() > global_cached_version)
    COLLM_RETURN_IF_ERROR(InstallNewGlobal(hb.global_version()));
  // Budgets only: the aggregator's policy share is applied between tasks only when the config
  // asks for it; otherwise the engine keeps its own share (0 in a federated config), so a device
  // does not go on training local data after the last round.
  if (options.follow_aggregator_share && hb.training_share() != idle_share) {
    COLLM_RETURN_IF_ERROR(engine->SetTrainingShare(std::clamp(hb.training_share(), 0.0, 1.0)));
    idle_share = hb.training_share();
  }
  return absl::OkStatus();
}

absl::Status FlClient::Impl::Register() {
  v1::RegisterRequest req;
  req.set_device_id(options.device_id);
  v1::DeviceCapabilities* c = req.mutable_capabilities();
  c->set_model_name(options.model_name);
  c->set_model_fingerprint(options.model_fingerprint);
  c->set_accelerator(options.accelerator);
  struct sysinfo info {};
  if (sysinfo(&info) == 0) c->set_memory_bytes(static_cast<int64_t>(info.totalram) * info.mem_unit);
  const engine::EngineStats st = engine->Stats();
  if (st.train_step_seconds > 0 && st.train_optimizer_steps > 0) {
    c->set_train_tokens_per_s(static_cast<double>(st.train_tokens) /
                              std::max<double>(1, static_cast<double>(st.train_optimizer_steps)) /
                              st.train_step_seconds);
  }
  if (st.infer_step_seconds > 0) c->set_infer_tokens_per_s(1.0 / st.infer_step_seconds);
  c->set_local_samples(options.local_samples);
  v1::RegisterResponse resp;
  Call call(this, options.rpc_timeout_seconds);
  COLLM_RETURN_IF_ERROR(FromGrpcStatus(stub->Register(&call.ctx, req, &resp), "Register"));
  session = resp.session();
  if (resp.heartbeat_interval_ms() > 0) heartbeat_seconds = resp.heartbeat_interval_ms() * 1e-3;
  Update([](FlClientStats& s) { ++s.registrations; });
  COLLM_LOG_INFO("federation: registered with {} as {} (global version {}, heartbeat {:.1f} s)",
                 options.aggregator, options.device_id, resp.global_version(), heartbeat_seconds);
  return absl::OkStatus();
}

v1::DeviceTelemetry FlClient::Impl::Telemetry() {
  const engine::EngineStats st = engine->Stats();
  const int64_t now = clock->NowNanos();
  const double dt = static_cast<double>(now - last_stats_nanos) * 1e-9;
  const engine::EngineStats& p = last_stats;
  auto arrived = [](const engine::EngineStats& s) {
    return s.completed + s.cancelled + s.expired + s.rejected_queue_full + s.queued + s.running;
  };
  v1::DeviceTelemetry t;
  if (dt > 0 && last_stats_nanos >= 0) {
    t.set_arrival_rate(static_cast<double>(arrived(st) - arrived(p)) / dt);
    t.set_infer_tokens_per_s(static_cast<double>(st.generated_tokens + st.prompt_tokens -
                                                 p.generated_tokens - p.prompt_tokens) /
                             dt);
    t.set_train_tokens_per_s(static_cast<double>(st.train_tokens - p.train_tokens) / dt);
  }
  const int64_t finished = st.completed + st.cancelled + st.expired;
  const int64_t finished_before = p.completed + p.cancelled + p.expired;
  if (last_stats_nanos >= 0) {
    slo_window.emplace_back(finished - finished_before, st.slo_met - p.slo_met);
    slo_window_finished += slo_window.back().first;
    slo_window_met += slo_window.back().second;
    // ~12 heartbeats (a minute at the default interval) or 256 requests, whichever is less,
    // keeping at least the newest interval.
    while (slo_window.size() > 1 &&
           (slo_window.size() > kSloWindowHeartbeats ||
            slo_window_finished - slo_window.front().first >= kSloWindowRequests)) {
      slo_window_finished -= slo_window.front().first;
      slo_window_met -= slo_window.front().second;
      slo_window.pop_front();
    }
  }
  t.set_slo_attainment_window(slo_window_finished > 0 ? static_cast<double>(slo_window_met) /
                                                            static_cast<double>(slo_window_finished)
                                                      : 1.0);
  const engine::EngineLoadReport load = engine->LoadReport();
  t.set_arrival_rate_1s(load.arrival_rate_1s);
  t.set_arrival_rate_30s(load.arrival_rate_30s);
  t.set_arrival_trend(load.arrival_trend);
  t.set_running_sequences(load.running);
  t.set_max_running(load.max_running);
  t.set_free_kv_fraction(load.free_kv_fraction);
  t.set_serving_capacity_rps(load.serving_capacity_rps);
  t.set_serving_capacity_tokens_per_s(load.serving_capacity_tokens_per_s);
  t.set_train_tokens_per_s_solo(load.train_tokens_per_s_solo);
  t.set_optimizer_step_seconds(load.optimizer_step_seconds);
  t.set_loss_reduction_per_step(loss_reduction_per_step);
  t.set_adapter_version(load.adapter_version);
  t.set_serving_address(options.serving_address);
  t.set_training_task_active(load.training_task_active);
  // Recent attainment: over the requests finished since the last heartbeat (1 when none).
  t.set_slo_attainment(finished > finished_before
                           ? static_cast<double>(st.slo_met - p.slo_met) /
                                 static_cast<double>(finished - finished_before)
                           : 1.0);
  t.set_queue_depth(st.queued);
  const int64_t samples = feedback ? feedback->total_added() : 0;
  t.set_new_local_samples(samples - samples_at_last_round);
  t.set_held_out_loss(st.publish.live_loss >= 0 ? st.publish.live_loss : 0);
  t.set_training_share(st.train_time_share);
  {
    std::lock_guard<std::mutex> lock(mu);
    t.set_live_version(stats.live_version);
  }
  last_stats = st;
  last_stats_nanos = now;
  return t;
}

bool FlClient::Impl::SessionLost() {
  v1::HeartbeatResponse hb;
  return Heartbeat(&hb).ok() && hb.reregister();
}

absl::Status FlClient::Impl::Heartbeat(v1::HeartbeatResponse* response) {
  v1::HeartbeatRequest req;
  req.set_device_id(options.device_id);
  req.set_session(session);
  *req.mutable_telemetry() = Telemetry();
  Call call(this, options.rpc_timeout_seconds);
  COLLM_RETURN_IF_ERROR(FromGrpcStatus(stub->Heartbeat(&call.ctx, req, response), "Heartbeat"));
  Update([](FlClientStats& s) { ++s.heartbeats; });
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<lora::LoraAdapter>> FlClient::Impl::Fetch(int64_t version,
                                                                         int64_t* got_version) {
  v1::FetchGlobalRequest req;
  req.set_device_id(options.device_id);
  req.set_session(session);
  req.set_version(version);
  Call call(this, options.rpc_timeout_seconds);
  auto reader = stub->FetchGlobal(&call.ctx, req);
  v1::AdapterChunk chunk;
  AdapterChunkReader stream("FetchGlobal", kMaxReceivedAdapterBytes);
  absl::Status bad;
  while (bad.ok() && reader->Read(&chunk)) bad = stream.Add(chunk);
  if (!bad.ok()) {
    call.ctx.TryCancel();
    reader->Finish();
    return bad;
  }
  COLLM_RETURN_IF_ERROR(FromGrpcStatus(reader->Finish(), "FetchGlobal"));
  const v1::AdapterBlobHeader header = stream.header();
  COLLM_ASSIGN_OR_RETURN(lora::PeftBlob blob, std::move(stream).Finish());
  if (version > 0 && header.version() != version) {
    return absl::DataLossError(
        absl::StrCat("FetchGlobal: asked for version ", version, ", got ", header.version()));
  }
  const std::string what = absl::StrCat("global version ", header.version());
  COLLM_ASSIGN_OR_RETURN(lora::LoraAdapter adapter, FromBlob(blob, model, what));
  *got_version = header.version();
  return std::make_unique<lora::LoraAdapter>(std::move(adapter));
}

absl::Status FlClient::Impl::Install(const lora::LoraAdapter& adapter, bool publish,
                                     int64_t version) {
  engine::InstallOptions io;
  io.publish = publish;
  io.source = absl::StrCat("global v", version);
  auto future = engine->InstallAdapter(adapter.Clone(), io);
  // The engine applies it at its next step boundary; a step is milliseconds, an evaluation for
  // the gate seconds at most.
  while (future.wait_for(kTaskPollInterval) != std::future_status::ready) {
    if (Stopping()) return absl::CancelledError("stopping");
  }
  engine::InstallResult r = future.get();
  if (!r.status.ok()) {
    return absl::Status(r.status.code(),
                        absl::StrCat("installing global v", version, ": ", r.status.message()));
  }
  if (publish) {
    COLLM_LOG_INFO("federation: global v{} {}: {}", version,
                   r.published ? "is live" : "stays in the shadow only", r.decision);
    if (r.published) {
      if (metrics) metrics->live_version->Set(static_cast<double>(version));
      Update([&](FlClientStats& s) { s.live_version = version; });
    }
  }
  return absl::OkStatus();
}

absl::Status FlClient::Impl::InstallNewGlobal(int64_t version) {
  int64_t got = 0;
  COLLM_ASSIGN_OR_RETURN(auto adapter, Fetch(version, &got));
  COLLM_RETURN_IF_ERROR(
      Install(*adapter, options.install_global == InstallGlobal::kShadowAndLive, got));
  global = std::move(adapter);
  global_cached_version = got;
  if (metrics) metrics->global_version->Set(static_cast<double>(got));
  Update([&](FlClientStats& s) { s.global_version = got; });
  return absl::OkStatus();
}

absl::Status FlClient::Impl::RunTask(const v1::RoundTask& task) {
  const int64_t round = task.round();
  COLLM_LOG_INFO("federation: round {}: {} local steps from global v{} (lr {}, deadline in {} ms)",
                 round, task.local_steps(), task.global_version(), task.lr(),
                 task.deadline_unix_ms() > 0 ? task.deadline_unix_ms() - UnixMillis() : -1);
  auto finish_round = [&](bool failed) {
    if (failed && metrics) metrics->tasks_failed->Increment();
    Update([&](FlClientStats& s) {
      s.last_round = round;
      if (failed) ++s.tasks_failed;
    });
  };
  if (task.local_steps() <= 0) {
    COLLM_LOG_WARN("federation: round {} asks for {} local steps; skipping it", round,
                   task.local_steps());
    finish_round(true);
    return absl::OkStatus();
  }
  // The update must be trained from exactly the task's global version: a newer one is fetched
  // (and installed like any new global), then the shadow is reset to it, dropping whatever local
  // training did to it since.
  if (task.global_version() > 0 && task.global_version() != global_cached_version) {
    COLLM_RETURN_IF_ERROR(InstallNewGlobal(task.global_version()));
  } else if (global != nullptr) {
    COLLM_RETURN_IF_ERROR(Install(*global, /*publish=*/false, global_cached_version));
  }
  if (metrics) metrics->rounds_joined->Increment();
  Update([](FlClientStats& s) { ++s.rounds_joined; });
  SetState("training");

  engine::TrainingTask t;
  t.optimizer_steps = task.local_steps();
  t.lr = task.lr() > 0 ? task.lr() : 0;
  t.prox_mu = std::max(0.0, task.prox_mu());
  t.training_share = task.training_share() > 0 ? std::min(1.0, task.training_share())
                                               : options.task_training_share;
  t.share_after = idle_share >= 0 ? std::clamp(idle_share, 0.0, 1.0) : -1;
  auto future = engine->RunTrainingTask(t);
  const int64_t deadline = task.deadline_unix_ms();
  const int64_t cut_ms =
      deadline > 0 ? deadline - static_cast<int64_t>(options.deadline_margin_seconds * 1e3) : 0;
  int64_t next_heartbeat = After(heartbeat_seconds);
  bool cut = false;
  while (future.wait_for(kTaskPollInterval) != std::future_status::ready) {
    if (Stopping()) {
      engine->FinishTrainingTaskEarly();
      return absl::CancelledError("stopping");
    }
    if (!cut && cut_ms > 0 && UnixMillis() >= cut_ms) {
      // Near the deadline: a partial update still counts; none at all does not.
      COLLM_LOG_INFO("federation: round {}: the deadline is near; uploading what is trained",
                     round);
      engine->FinishTrainingTaskEarly();
      cut = true;
    }
    if (clock->NowNanos() >= next_heartbeat) {
      // Liveness while training; the aggregator may also have closed the round without us.
      v1::HeartbeatResponse hb;
      absl::Status s = Heartbeat(&hb);
      next_heartbeat = After(heartbeat_seconds);
      if (s.ok() && hb.reregister()) {
        // The aggregator restarted without our session; its rounds survive a restart, so
        // register again and keep training if the task is still ours (a failed registration
        // keeps training too: the next heartbeat asks again).
        COLLM_LOG_INFO("federation: round {}: the aggregator lost our session; registering again",
                       round);
        session.clear();
        s = Register();
        if (s.ok()) s = Heartbeat(&hb);
      }
      if (s.ok() && !cut && (hb.reregister() || !hb.has_task() || hb.task().round() != round)) {
        COLLM_LOG_INFO("federation: round {} closed before our update; stopping its training",
                       round);
        engine->FinishTrainingTaskEarly();
        future.wait();
        SetState("connected");
        finish_round(true);
        if (hb.reregister()) session.clear();
        return absl::OkStatus();
      }
    }
  }
  const engine::TrainingReport report = future.get();
  SetState("connected");
  if (report.status.ok() && report.optimizer_steps >= 2) {
    // The quality-gain estimate the aggregator plans with; a task that made the loss worse
    // reports no gain rather than a negative one.
    loss_reduction_per_step = std::max(0.0, (report.first_step_loss - report.last_step_loss) /
                                                static_cast<double>(report.optimizer_steps - 1));
  }
  if (!report.status.ok()) {
    COLLM_LOG_WARN("federation: round {}: training produced no update: {}", round,
                   report.status.ToString());
    finish_round(true);
    return absl::OkStatus();
  }
  // Upload, retrying transport failures until the deadline.
  int64_t attempts = 0;
  bool registered_again = false;
  for (;;) {
    std::string reason;
    const absl::Status s = Upload(task, report, &reason);
    if (!s.ok() && !Retryable(s) && !registered_again && SessionLost()) {
      // The aggregator no longer knows our session (its state was restored from before we
      // registered, or we were registered elsewhere): the finished update is still worth
      // sending, under a new session, rather than losing the round.
      COLLM_LOG_INFO(
          "federation: round {}: the aggregator lost our session; registering again "
          "and re-sending the update",
          round);
      registered_again = true;
      session.clear();
      if (Register().ok()) continue;
    }
    if (s.ok() && reason.empty()) {
      COLLM_LOG_INFO(
          "federation: round {}: update accepted ({} steps, {} samples, loss {:.4f}, "
          "held-out {:.4f})",
          round, report.optimizer_steps, report.num_samples, report.mean_train_loss,
          report.held_out_loss);
      if (metrics) metrics->uploads_accepted->Increment();
      Update([](FlClientStats& st) { ++st.uploads_accepted; });
      samples_at_last_round = feedback ? feedback->total_added() : 0;
      finish_round(false);
      return absl::OkStatus();
    }
    if (s.ok() || !Retryable(s)) {
      const std::string why = s.ok() ? reason : s.ToString();
      COLLM_LOG_WARN("federation: round {}: update rejected: {}", round, why);
      if (metrics) metrics->uploads_rejected->Increment();
      Update([&](FlClientStats& st) {
        ++st.uploads_rejected;
        st.last_error = why;
      });
      finish_round(true);
      return absl::OkStatus();
    }
    ++attempts;
    Fail(s);
    if (deadline > 0 && UnixMillis() >= deadline) {
      COLLM_LOG_WARN("federation: round {}: upload failed until the deadline: {}", round,
                     s.ToString());
      finish_round(true);
      return absl::OkStatus();
    }
    if (!SleepFor(Backoff())) return absl::CancelledError("stopping");
  }
}

absl::Status FlClient::Impl::Upload(const v1::RoundTask& task, const engine::TrainingReport& report,
                                    std::string* reason) {
  COLLM_ASSIGN_OR_RETURN(lora::PeftBlob blob, ToBlob(report.adapter));
  v1::UpdateChunk first;
  v1::UpdateHeader* h = first.mutable_header();
  h->set_device_id(options.device_id);
  h->set_session(session);
  h->set_round(task.round());
  h->set_base_version(task.global_version());
  h->set_num_samples(report.num_samples);
  h->set_train_loss(report.mean_train_loss);
  h->set_held_out_loss(report.held_out_loss >= 0 ? report.held_out_loss : 0);
  *h->mutable_adapter() = DescribeAdapter(blob);
  Call call(this, options.rpc_timeout_seconds);
  v1::UploadResponse resp;
  auto writer = stub->UploadUpdate(&call.ctx, &resp);
  const bool open =
      writer->Write(first) &&
      WriteAdapterChunks(blob.safetensors, options.upload_chunk_bytes, [&](std::string data) {
        v1::UpdateChunk chunk;
        chunk.set_data(std::move(data));
        return writer->Write(chunk);
      });
  if (open) writer->WritesDone();
  // When a write fails the server has already answered (or the call is dead); Finish says which.
  COLLM_RETURN_IF_ERROR(FromGrpcStatus(writer->Finish(), "UploadUpdate"));
  if (!resp.accepted())
    *reason = resp.reason().empty() ? "rejected (no reason given)" : resp.reason();
  return absl::OkStatus();
}

FlClient::FlClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

FlClient::~FlClient() { Stop(); }

absl::StatusOr<std::unique_ptr<FlClient>> FlClient::Create(
    FlClientOptions options, engine::Engine& engine, const runtime::ModelConfig& model,
    std::shared_ptr<engine::InteractionBuffer> feedback, telemetry::MetricsRegistry* metrics,
    Clock& clock) {
  auto bad = [](const std::string& what) { return absl::InvalidArgumentError(what); };
  if (options.aggregator.empty()) return bad("federation.aggregator must not be empty");
  if (options.device_id.empty()) return bad("federation.device_id must not be empty");
  if (options.model_fingerprint.empty()) return bad("federation: the model fingerprint is empty");
  if (!(options.heartbeat_seconds > 0)) {
    return bad(
        absl::StrCat("federation.heartbeat_seconds must be > 0, got ", options.heartbeat_seconds));
  }
  if (!(options.backoff_initial_seconds > 0) ||
      !(options.backoff_max_seconds >= options.backoff_initial_seconds)) {
    return bad(absl::StrCat("federation.backoff: need 0 < initial_seconds <= max_seconds, got ",
                            options.backoff_initial_seconds, " and ", options.backoff_max_seconds));
  }
  if (!(options.rpc_timeout_seconds > 0)) {
    return bad(absl::StrCat("federation.rpc_timeout_seconds must be > 0, got ",
                            options.rpc_timeout_seconds));
  }
  if (options.upload_chunk_bytes <= 0) {
    return bad(absl::StrCat("federation.upload_chunk_bytes must be > 0, got ",
                            options.upload_chunk_bytes));
  }
  if (!(options.task_training_share > 0 && options.task_training_share <= 1)) {
    return bad(absl::StrCat("federation.task_training_share must be in (0, 1], got ",
                            options.task_training_share));
  }
  if (options.tls.cert.empty() != options.tls.key.empty()) {
    return bad("federation.tls: cert and key must be set together (mutual TLS)");
  }
  std::shared_ptr<grpc::ChannelCredentials> creds;
  grpc::ChannelArguments args;
  if (options.tls.enabled) {
    grpc::SslCredentialsOptions ssl;
    if (!options.tls.ca.empty()) {
      COLLM_ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadFile(options.tls.ca, "federation.tls.ca"));
    }
    if (!options.tls.cert.empty()) {
      COLLM_ASSIGN_OR_RETURN(ssl.pem_cert_chain, ReadFile(options.tls.cert, "federation.tls.cert"));
      COLLM_ASSIGN_OR_RETURN(ssl.pem_private_key, ReadFile(options.tls.key, "federation.tls.key"));
    }
    creds = grpc::SslCredentials(ssl);
    if (!options.tls.server_name.empty()) {
      args.SetSslTargetNameOverride(options.tls.server_name);
    }
  } else {
    creds = grpc::InsecureChannelCredentials();
  }
  // Adapters arrive in chunks, but leave room for whatever chunk size the aggregator picked.
  args.SetMaxReceiveMessageSize(64 << 20);
  args.SetMaxSendMessageSize(
      static_cast<int>(std::min<int64_t>(options.upload_chunk_bytes + (1 << 20), INT32_MAX)));
  // Reconnect attempts are ours (with jitter); keep gRPC's own from stretching a dead channel.
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS,
              static_cast<int>(std::max(100.0, options.backoff_max_seconds * 1e3)));
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS,
              static_cast<int>(std::max(20.0, options.backoff_initial_seconds * 1e3)));
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS,
              static_cast<int>(std::max(20.0, options.backoff_initial_seconds * 1e3)));
  auto impl = std::make_unique<Impl>();
  impl->clock = &clock;
  impl->unix_ms_at_clock_zero = SystemUnixMillis() - clock.NowNanos() / 1'000'000;
  impl->channel = grpc::CreateCustomChannel(options.aggregator, creds, args);
  impl->stub = v1::FederationService::NewStub(impl->channel);
  impl->heartbeat_seconds = options.heartbeat_seconds;
  impl->rng.seed(options.seed ^ std::hash<std::string>()(options.device_id));
  impl->options = std::move(options);
  impl->engine = &engine;
  // What the daemon's config asked for between rounds; every task ends back at it.
  impl->idle_share = engine.Stats().training_share;
  impl->model = model;
  impl->feedback = std::move(feedback);
  if (impl->feedback) impl->samples_at_last_round = impl->feedback->total_added();
  if (metrics != nullptr) {
    impl->metrics = std::make_unique<Metrics>(Metrics{
        metrics->GetCounter("collm_fl_rounds_joined_total", "Federated round tasks started"),
        metrics->GetCounter("collm_fl_uploads_total", "Updates uploaded, by outcome",
                            {{"outcome", "accepted"}}),
        metrics->GetCounter("collm_fl_uploads_total", "Updates uploaded, by outcome",
                            {{"outcome", "rejected"}}),
        metrics->GetCounter("collm_fl_tasks_failed_total",
                            "Round tasks that ended without an accepted update"),
        metrics->GetCounter("collm_fl_failures_total", "Failed calls to the aggregator"),
        metrics->GetGauge("collm_fl_connected", "1 while the aggregator answers, else 0"),
        metrics->GetGauge("collm_fl_global_version", "Newest global adapter version installed"),
        metrics->GetGauge("collm_fl_live_global_version",
                          "Newest global adapter version that went live (0 = none)"),
    });
  }
  return std::unique_ptr<FlClient>(new FlClient(std::move(impl)));
}

void FlClient::Start() {
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (impl_->thread.joinable() || impl_->stop) return;
  impl_->thread = std::thread([this] { impl_->Loop(); });
}

void FlClient::Stop() {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->stop = true;
    if (impl_->active != nullptr) impl_->active->TryCancel();
    impl_->wake.notify_all();
  }
  if (impl_->thread.joinable()) impl_->thread.join();
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->stats.state = "stopped";
}

FlClientStats FlClient::Stats() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->stats;
}

}  // namespace collm::federation
