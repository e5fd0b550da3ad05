#include "collm/federation/round_manager.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "collm/common/crash_point.h"
#include "collm/common/logging.h"
#include "collm/common/status.h"
#include "collm/federation/fingerprint.h"

namespace collm::federation {
namespace {

bool ValidDeviceId(const std::string& id) {
  if (id.empty() || id.size() > 64 || id == "." || id == "..") return false;
  return std::all_of(id.begin(), id.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
           c == '_' || c == '-';
  });
}

std::string NewSession() {
  std::random_device rd;
  return absl::StrFormat("%08x%08x%08x%08x", rd(), rd(), rd(), rd());
}

bool Contains(const google::protobuf::RepeatedPtrField<std::string>& list, const std::string& s) {
  return std::find(list.begin(), list.end(), s) != list.end();
}

absl::Status Bad(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("policy.", field, " ", what));
}

}  // namespace

v1::FederationPolicy DefaultPolicy() {
  v1::FederationPolicy p;
  p.set_rounds(10);
  p.set_local_steps(20);
  p.set_lr(1e-3);
  p.set_min_clients(2);
  p.set_max_clients(0);
  p.set_quorum(0);
  p.set_deadline_s(300);
  p.set_strategy("fedavg");
  p.set_server_optimizer("none");
  p.set_server_lr(1e-2);
  p.set_prox_mu(0);
  p.set_clip_norm(0);
  p.set_max_update_norm(0);
  p.set_trim_ratio(0.1);
  p.set_training_share(0.5);
  return p;
}

absl::Status ValidatePolicy(const v1::FederationPolicy& p) {
  auto finite = [](double v) { return std::isfinite(v); };
  if (p.has_rounds() && p.rounds() < 0)
    return Bad("rounds", absl::StrCat("must be >= 0, got ", p.rounds()));
  if (p.has_local_steps() && p.local_steps() <= 0) {
    return Bad("local_steps", absl::StrCat("must be > 0, got ", p.local_steps()));
  }
  if (p.has_lr() && !(finite(p.lr()) && p.lr() > 0))
    return Bad("lr", absl::StrCat("must be > 0, got ", p.lr()));
  if (p.has_min_clients() && p.min_clients() < 1) {
    return Bad("min_clients", absl::StrCat("must be >= 1, got ", p.min_clients()));
  }
  if (p.has_max_clients() && p.max_clients() < 0) {
    return Bad("max_clients", absl::StrCat("must be >= 0 (0 = all), got ", p.max_clients()));
  }
  if (p.has_max_clients() && p.has_min_clients() && p.max_clients() > 0 &&
      p.max_clients() < p.min_clients()) {
    return Bad("max_clients", absl::StrCat("must be 0 or >= min_clients (", p.min_clients(),
                                           "), got ", p.max_clients()));
  }
  if (p.has_quorum() && p.quorum() < 0)
    return Bad("quorum", absl::StrCat("must be >= 0, got ", p.quorum()));
  if (p.has_deadline_s() && !(finite(p.deadline_s()) && p.deadline_s() > 0)) {
    return Bad("deadline_s", absl::StrCat("must be > 0, got ", p.deadline_s()));
  }
  if (p.has_strategy()) {
    if (auto c = ParseCombine(p.strategy()); !c.ok())
      return Bad("strategy", std::string(c.status().message()));
  }
  if (p.has_server_optimizer()) {
    if (auto o = ParseServerOptimizer(p.server_optimizer()); !o.ok()) {
      return Bad("server_optimizer", std::string(o.status().message()));
    }
  }
  if (p.has_server_lr() && !(finite(p.server_lr()) && p.server_lr() > 0)) {
    return Bad("server_lr", absl::StrCat("must be > 0, got ", p.server_lr()));
  }
  if (p.has_prox_mu() && !(finite(p.prox_mu()) && p.prox_mu() >= 0)) {
    return Bad("prox_mu", absl::StrCat("must be >= 0, got ", p.prox_mu()));
  }
  if (p.has_clip_norm() && !(finite(p.clip_norm()) && p.clip_norm() >= 0)) {
    return Bad("clip_norm", absl::StrCat("must be >= 0 (0 = off), got ", p.clip_norm()));
  }
  if (p.has_max_update_norm() && !(finite(p.max_update_norm()) && p.max_update_norm() >= 0)) {
    return Bad("max_update_norm",
               absl::StrCat("must be >= 0 (0 = off), got ", p.max_update_norm()));
  }
  if (p.has_trim_ratio() && !(p.trim_ratio() >= 0 && p.trim_ratio() < 0.5)) {
    return Bad("trim_ratio", absl::StrCat("must be in [0, 0.5), got ", p.trim_ratio()));
  }
  if (p.has_training_share() && !(p.training_share() >= 0 && p.training_share() <= 1)) {
    return Bad("training_share", absl::StrCat("must be in [0, 1], got ", p.training_share()));
  }
  return absl::OkStatus();
}

RoundManager::RoundManager(const RoundManagerOptions& options, Clock& clock, StateStore* store)
    : options_(options), clock_(clock), store_(store), planner_(options.planner) {}

void RoundManager::CountUpdate(const std::string& outcome, const std::string& reason) const {
  if (options_.metrics == nullptr) return;
  options_.metrics
      ->GetCounter("collm_fed_updates_total", "Uploaded updates, by outcome and reason",
                   {{"outcome", outcome}, {"reason", reason}})
      ->Increment();
}

void RoundManager::CountRound(const std::string& outcome) const {
  if (options_.metrics == nullptr) return;
  options_.metrics
      ->GetCounter("collm_fed_rounds_total", "Rounds closed, by outcome", {{"outcome", outcome}})
      ->Increment();
}

void RoundManager::ExportDecisionsLocked(const v1::RoundInfo& round) {
  telemetry::MetricsRegistry* m = options_.metrics;
  if (m == nullptr) return;
  m->GetGauge("collm_fed_round", "Current round number")->Set(static_cast<double>(round.round()));
  m->GetGauge("collm_fed_round_participants", "Participants of the current round")
      ->Set(static_cast<double>(round.participants_size()));
  for (const auto& d : round.decisions()) {
    const telemetry::Labels l = {{"device", d.device_id()}};
    m->GetGauge("collm_fed_device_chosen", "1 = the device trains in the current round", l)
        ->Set(d.chosen() ? 1 : 0);
    m->GetGauge("collm_fed_device_budget_steps", "Optimizer steps in the device's task", l)
        ->Set(static_cast<double>(d.budget_steps()));
    m->GetGauge("collm_fed_device_share_ceiling", "Training-share ceiling in the device's task", l)
        ->Set(d.share_ceiling());
    m->GetGauge("collm_fed_device_forecast_utilization",
                "Forecast serving utilization the round was planned with", l)
        ->Set(d.forecast_utilization());
    m->GetGauge("collm_fed_device_slo_queue", "Virtual queue of SLO deficit (drift-plus-penalty)",
                l)
        ->Set(d.slo_queue());
    m->GetGauge("collm_fed_device_quality_debt", "Quality-debt virtual queue", l)
        ->Set(d.quality_debt());
    m->GetGauge("collm_fed_device_expected_gain", "Expected quality gain of the device's budget", l)
        ->Set(d.expected_gain());
  }
}

absl::StatusOr<std::unique_ptr<RoundManager>> RoundManager::Create(
    const RoundManagerOptions& options, Clock& clock, StateStore* store,
    const lora::LoraAdapter& initial) {
  if (options.heartbeat_interval_ms <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("heartbeat_interval_ms must be > 0, got ", options.heartbeat_interval_ms));
  }
  if (options.offline_after_missed <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("offline_after_missed must be > 0, got ", options.offline_after_missed));
  }
  RoundManagerOptions opts = options;
  if (opts.model_fingerprint.empty()) opts.model_fingerprint = ModelFingerprint(opts.model);
  v1::FederationPolicy policy = DefaultPolicy();
  policy.MergeFrom(options.policy);
  COLLM_RETURN_IF_ERROR(ValidatePolicy(policy));
  std::unique_ptr<RoundManager> m(new RoundManager(opts, clock, store));
  std::lock_guard<std::mutex> lock(m->mu_);
  if (store->Empty()) {
    COLLM_RETURN_IF_ERROR(Annotate(initial.Validate(opts.model), "initial adapter"));
    m->global_ = initial.Clone();
    COLLM_RETURN_IF_ERROR(store->SaveGlobal(1, m->global_));
    m->policy_ = policy;
    COLLM_RETURN_IF_ERROR(store->SavePolicy(policy));
    m->status_.set_state(opts.auto_start ? "running" : "idle");
    m->status_.set_global_version(1);
    // status.json last: its presence marks the state dir as initialized.
    COLLM_RETURN_IF_ERROR(m->SaveStatusLocked());
    COLLM_LOG_INFO("new federation in {} ({}), global version 1", store->dir(), m->status_.state());
    return m;
  }
  COLLM_ASSIGN_OR_RETURN(FederationState state, store->Load(opts.model));
  m->status_ = std::move(state.status);
  // The persisted policy wins; defaults fill fields it predates.
  m->policy_ = DefaultPolicy();
  m->policy_.MergeFrom(state.policy);
  COLLM_RETURN_IF_ERROR(Annotate(ValidatePolicy(m->policy_), store->dir() + "/policy.json"));
  for (auto& info : state.devices) {
    Device d;
    d.info = std::move(info);
    // Offline until its next heartbeat, which its persisted session makes valid again: the
    // clock is Unix time, so the stored last-seen keeps its meaning across the restart.
    d.last_seen_ns = d.info.last_seen_unix_ms() * 1000000;
    if (auto it = state.sessions.find(d.info.device_id()); it != state.sessions.end())
      d.session = it->second;
    m->devices_[d.info.device_id()] = std::move(d);
  }
  m->rounds_ = std::move(state.rounds);
  // The rounds are the record of who took part (devices.json may predate the last accepted
  // update when the kill came between the two writes), so the count is rebuilt from them.
  for (auto& [id, d] : m->devices_) d.info.set_rounds_participated(0);
  for (const auto& r : m->rounds_) {
    for (const auto& u : r.updates()) {
      if (auto it = m->devices_.find(u.device_id()); it != m->devices_.end())
        it->second.info.set_rounds_participated(it->second.info.rounds_participated() + 1);
    }
  }
  // The virtual queues are the planner's memory: they resume from the newest round that has
  // decisions (each decision holds the queues after that round's update).
  for (auto r = m->rounds_.rbegin(); r != m->rounds_.rend(); ++r) {
    if (r->decisions_size() == 0) continue;
    for (const auto& d : r->decisions())
      m->planner_.RestoreQueues(d.device_id(), d.slo_queue(), d.quality_debt());
    break;
  }
  m->global_ = std::move(state.global);
  m->optimizer_ = std::move(state.optimizer);
  m->update_sha256_ = std::move(state.update_sha256);
  if (!m->rounds_.empty()) {
    v1::RoundInfo& last = m->rounds_.back();
    // Killed while aggregating: the inputs are all on disk, so aggregate again.
    if (last.state() == "aggregating") last.set_state("collecting");
    if (last.state() == "collecting") {
      auto& adapters = state.open_updates[last.round()];
      for (const auto& info : last.updates()) {
        ClientUpdate u;
        u.device_id = info.device_id();
        u.num_samples = info.num_samples();
        u.train_loss = info.train_loss();
        u.adapter = std::move(adapters.at(info.device_id()));
        m->updates_.emplace(u.device_id, std::move(u));
      }
    }
  }
  COLLM_LOG_INFO(
      "resumed federation from {}: {}, round {}, global version {}, {} accepted "
      "update(s) in the open round",
      store->dir(), m->status_.state(), m->status_.current_round(), m->status_.global_version(),
      m->updates_.size());
  return m;
}

bool RoundManager::Online(const Device& d) const {
  return !d.session.empty() &&
         clock_.NowNanos() - d.last_seen_ns <=
             options_.offline_after_missed * options_.heartbeat_interval_ms * 1000000;
}

v1::RoundInfo* RoundManager::OpenRound() {
  if (rounds_.empty() || rounds_.back().state() != "collecting") return nullptr;
  return &rounds_.back();
}

v1::RoundInfo* RoundManager::FindRound(int64_t round) {
  for (auto& r : rounds_) {
    if (r.round() == round) return &r;
  }
  return nullptr;
}

void RoundManager::ChangedLocked() {
  ++changes_;
  changed_.notify_all();
}

absl::Status RoundManager::SaveStatusLocked() { return store_->SaveStatus(status_); }

absl::Status RoundManager::SaveSessionsLocked() {
  std::map<std::string, std::string> sessions;
  for (const auto& [id, d] : devices_) {
    if (!d.session.empty()) sessions[id] = d.session;
  }
  return store_->SaveSessions(sessions);
}

absl::Status RoundManager::SaveDevicesLocked() {
  std::vector<v1::DeviceInfo> list;
  for (const auto& [id, d] : devices_) list.push_back(DeviceInfoLocked(d));
  return store_->SaveDevices(list);
}

v1::DeviceInfo RoundManager::DeviceInfoLocked(const Device& d) const {
  v1::DeviceInfo info = d.info;
  std::string state = "offline";
  if (Online(d)) {
    state = "online";
    if (!rounds_.empty() && rounds_.back().state() == "collecting" &&
        Contains(rounds_.back().participants(), d.info.device_id()) &&
        updates_.count(d.info.device_id()) == 0) {
      state = "training";
    }
  }
  info.set_state(state);
  return info;
}

v1::FederationStatus RoundManager::StatusLocked() const {
  v1::FederationStatus s = status_;
  int64_t online = 0;
  for (const auto& [id, d] : devices_) online += Online(d) ? 1 : 0;
  s.set_devices_online(online);
  s.set_devices_total(static_cast<int64_t>(devices_.size()));
  *s.mutable_policy() = policy_;
  return s;
}

int64_t RoundManager::DeadlineQuorumLocked() const {
  return std::max<int64_t>(1, (policy_.min_clients() + 1) / 2);
}

AggregationOptions RoundManager::OptionsLocked(const v1::RoundInfo& round) const {
  AggregationOptions o;
  o.combine = ParseCombine(round.strategy().empty() ? policy_.strategy() : round.strategy())
                  .value_or(Combine::kFedAvg);
  o.server_optimizer =
      ParseServerOptimizer(policy_.server_optimizer()).value_or(ServerOptimizer::kNone);
  o.server_lr = policy_.server_lr();
  o.clip_norm = policy_.clip_norm();
  o.max_update_norm = policy_.max_update_norm();
  o.trim_ratio = policy_.trim_ratio();
  return o;
}

absl::StatusOr<v1::RegisterResponse> RoundManager::Register(const v1::RegisterRequest& request,
                                                            const std::string& peer) {
  const std::string& id = request.device_id();
  if (!ValidDeviceId(id)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "device_id must match [A-Za-z0-9._-]{1,64} (and not be '.' or '..'), got '", id, "'"));
  }
  const std::string& fp = request.capabilities().model_fingerprint();
  if (fp != options_.model_fingerprint) {
    return absl::FailedPreconditionError(absl::StrCat(
        "device ", id, ": model fingerprint '", fp, "' does not match the aggregator's base model ",
        "(fingerprint '", options_.model_fingerprint,
        "' = sha256 of the canonical config.json); devices must serve the same base model"));
  }
  std::lock_guard<std::mutex> lock(mu_);
  Device& d = devices_[id];
  d.info.set_device_id(id);
  *d.info.mutable_capabilities() = request.capabilities();
  d.info.set_address(peer);
  d.info.set_last_seen_unix_ms(NowMs());
  d.session = NewSession();
  d.last_seen_ns = clock_.NowNanos();
  if (auto s = SaveDevicesLocked(); !s.ok())
    COLLM_LOG_ERROR("saving devices: {}", std::string(s.message()));
  // Before the device learns its session, so an aggregator restarted after this answer still
  // knows it; when it cannot be saved the session lasts until a restart (then: register again).
  if (auto s = SaveSessionsLocked(); !s.ok())
    COLLM_LOG_ERROR("saving sessions: {}", std::string(s.message()));
  ChangedLocked();
  COLLM_LOG_INFO("device {} registered from {}", id, peer);
  v1::RegisterResponse response;
  response.set_session(d.session);
  response.set_heartbeat_interval_ms(options_.heartbeat_interval_ms);
  response.set_global_version(status_.global_version());
  return response;
}

absl::Status RoundManager::CheckSession(const std::string& device_id,
                                        const std::string& session) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = devices_.find(device_id);
  if (it == devices_.end()) {
    return absl::FailedPreconditionError(
        absl::StrCat("unknown device '", device_id, "': register first"));
  }
  if (it->second.session.empty() || it->second.session != session) {
    return absl::FailedPreconditionError(
        absl::StrCat("device ", device_id,
                     ": unknown session (the aggregator restarted or the device "
                     "re-registered elsewhere): register again"));
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::HeartbeatResponse> RoundManager::Heartbeat(const v1::HeartbeatRequest& request,
                                                              const std::string& peer) {
  std::lock_guard<std::mutex> lock(mu_);
  v1::HeartbeatResponse response;
  response.set_global_version(status_.global_version());
  response.set_training_share(policy_.training_share());
  auto it = devices_.find(request.device_id());
  if (it == devices_.end() || it->second.session.empty() ||
      it->second.session != request.session()) {
    response.set_reregister(true);
    return response;
  }
  Device& d = it->second;
  const bool was_online = Online(d);
  d.last_seen_ns = clock_.NowNanos();
  d.info.set_last_seen_unix_ms(NowMs());
  d.info.set_address(peer);
  *d.info.mutable_telemetry() = request.telemetry();
  if (!was_online) ChangedLocked();
  if (const v1::RoundInfo* round = OpenRound();
      round != nullptr && Contains(round->participants(), d.info.device_id()) &&
      updates_.count(d.info.device_id()) == 0) {
    v1::RoundTask* task = response.mutable_task();
    task->set_round(round->round());
    task->set_global_version(round->base_version());
    task->set_local_steps(policy_.local_steps());
    task->set_training_share(policy_.training_share());
    // The planner's budget and ceiling for this device (rounds persisted before planning had
    // none: the policy's values).
    for (const auto& decision : round->decisions()) {
      if (decision.device_id() != d.info.device_id() || !decision.chosen()) continue;
      task->set_local_steps(std::max<int64_t>(1, decision.budget_steps()));
      task->set_training_share(decision.share_ceiling());
    }
    task->set_lr(policy_.lr());
    task->set_prox_mu(policy_.prox_mu());
    task->set_deadline_unix_ms(round->deadline_unix_ms());
  }
  return response;
}

void RoundManager::RejectLocked(const std::string& device_id, int64_t round,
                                const std::string& reason, const std::string& kind) {
  COLLM_LOG_WARN("update from {} for round {} rejected: {}", device_id, round, reason);
  status_.set_updates_rejected(status_.updates_rejected() + 1);
  const bool late = kind == "late";
  if (late) status_.set_late_updates(status_.late_updates() + 1);
  CountUpdate(late ? "late" : "rejected", kind);
  if (auto it = devices_.find(device_id); it != devices_.end()) {
    it->second.info.set_updates_rejected(it->second.info.updates_rejected() + 1);
    (void)SaveDevicesLocked();
  }
  if (v1::RoundInfo* r = FindRound(round)) {
    r->add_rejected(absl::StrCat(device_id, ": ", reason));
    if (auto s = store_->SaveRound(*r); !s.ok()) COLLM_LOG_ERROR("{}", std::string(s.message()));
  }
  if (auto s = SaveStatusLocked(); !s.ok()) COLLM_LOG_ERROR("{}", std::string(s.message()));
  ChangedLocked();
}

void RoundManager::RecordRejection(const std::string& device_id, int64_t round,
                                   const std::string& reason, const std::string& kind) {
  std::lock_guard<std::mutex> lock(mu_);
  RejectLocked(device_id, round, reason, kind);
}

absl::Status RoundManager::SubmitUpdate(const v1::UpdateHeader& header,
                                        const lora::PeftBlob& blob) {
  const std::string& id = header.device_id();
  const int64_t number = header.round();
  lora::LoraAdapter global;
  AggregationOptions agg;
  // Checks against the round; returns the rejection (recorded) or OK.
  auto check_round = [&]() -> absl::Status {
    v1::RoundInfo* open = OpenRound();
    const int64_t current = status_.current_round();
    if (open == nullptr || number != open->round()) {
      if (number >= 1 && number <= current) {
        const absl::Status s = absl::FailedPreconditionError(
            absl::StrCat("late update: round ", number, " is closed (current round ", current,
                         open != nullptr ? ", collecting" : ", none collecting", ")"));
        RejectLocked(id, number, std::string(s.message()), "late");
        return s;
      }
      const absl::Status s = absl::InvalidArgumentError(
          absl::StrCat("round ", number, " does not exist (current round ", current, ")"));
      RejectLocked(id, number, std::string(s.message()), "unknown_round");
      return s;
    }
    absl::Status s;
    std::string kind;
    if (!Contains(open->participants(), id)) {
      s = absl::FailedPreconditionError(
          absl::StrCat("device ", id, " is not a participant of round ", number));
      kind = "not_participant";
    } else if (updates_.count(id) != 0) {
      s = absl::FailedPreconditionError(
          absl::StrCat("device ", id, " already uploaded an update for round ", number));
      kind = "duplicate";
    } else if (header.base_version() != open->base_version()) {
      s = absl::FailedPreconditionError(
          absl::StrCat("base_version ", header.base_version(), " does not match round ", number,
                       ", which trains global version ", open->base_version()));
      kind = "wrong_base";
    } else if (header.num_samples() <= 0) {
      s = absl::InvalidArgumentError(
          absl::StrCat("num_samples must be > 0, got ", header.num_samples()));
      kind = "bad_header";
    }
    if (!s.ok()) RejectLocked(id, number, std::string(s.message()), kind);
    return s;
  };
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (auto it = devices_.find(id); it == devices_.end() || it->second.session.empty() ||
                                     it->second.session != header.session()) {
      const absl::Status s = absl::FailedPreconditionError(
          absl::StrCat("device ", id, ": unknown device or session: register again"));
      RejectLocked(id, number, std::string(s.message()), "session");
      return s;
    }
    // A re-send of the update this device already delivered (its first upload was recorded,
    // then the answer was lost: the aggregator was killed or the link cut) is acknowledged
    // again, not counted again and not a rejection.
    if (auto it = update_sha256_.find({number, id}); it != update_sha256_.end() &&
                                                     !it->second.empty() &&
                                                     it->second == header.adapter().sha256()) {
      COLLM_LOG_INFO("round {}: {} re-sent the update already accepted; acknowledged again", number,
                     id);
      CountUpdate("resent", "none");
      return absl::OkStatus();
    }
    COLLM_RETURN_IF_ERROR(check_round());
    global = global_;
    agg = OptionsLocked(*OpenRound());
  }
  // Parsing and validation are tensor work: done without the lock.
  ClientUpdate update;
  update.device_id = id;
  update.num_samples = header.num_samples();
  update.train_loss = header.train_loss();
  absl::StatusOr<double> norm;
  auto parsed = lora::ParsePeftAdapter(blob, options_.model, absl::StrCat("update from ", id));
  if (parsed.ok()) {
    update.adapter = std::move(*parsed);
    norm = ValidateUpdate(options_.model, global, update, agg);
  } else {
    norm = parsed.status();
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (!norm.ok()) {
    const absl::Status s = absl::InvalidArgumentError(norm.status().message());
    RejectLocked(id, number, std::string(s.message()), "invalid_adapter");
    return s;
  }
  COLLM_RETURN_IF_ERROR(check_round());  // The round may have closed meanwhile.
  CrashPoint("update_accepted");
  if (auto s = store_->SaveUpdate(number, id, update.adapter, header.adapter().sha256()); !s.ok()) {
    COLLM_LOG_ERROR("storing the update from {}: {}", id, std::string(s.message()));
    return absl::InternalError(
        absl::StrCat("the aggregator could not store the update: ", s.message()));
  }
  CrashPoint("update_stored");
  v1::RoundInfo* open = OpenRound();
  v1::UpdateInfo* info = open->add_updates();
  info->set_device_id(id);
  info->set_num_samples(header.num_samples());
  info->set_train_loss(header.train_loss());
  info->set_held_out_loss(header.held_out_loss());
  info->set_delta_norm(*norm);
  info->set_received_unix_ms(NowMs());
  if (auto s = store_->SaveRound(*open); !s.ok()) {
    open->mutable_updates()->RemoveLast();
    return absl::InternalError(
        absl::StrCat("the aggregator could not record the update: ", s.message()));
  }
  updates_.emplace(id, std::move(update));
  update_sha256_[{number, id}] = header.adapter().sha256();
  status_.set_updates_accepted(status_.updates_accepted() + 1);
  CountUpdate("accepted", "none");
  devices_[id].info.set_rounds_participated(devices_[id].info.rounds_participated() + 1);
  if (auto s = SaveStatusLocked(); !s.ok()) COLLM_LOG_ERROR("{}", std::string(s.message()));
  if (auto s = SaveDevicesLocked(); !s.ok()) COLLM_LOG_ERROR("{}", std::string(s.message()));
  COLLM_LOG_INFO("round {}: accepted the update from {} ({} samples, delta norm {:.4g}), {}/{}",
                 number, id, header.num_samples(), *norm, open->updates_size(),
                 open->participants_size());
  ChangedLocked();
  CrashPoint("update_recorded");
  return absl::OkStatus();
}

absl::StatusOr<std::pair<int64_t, lora::PeftBlob>> RoundManager::GetGlobal(int64_t version) const {
  lora::LoraAdapter adapter;
  int64_t v = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const int64_t newest = status_.global_version();
    v = version == 0 ? newest : version;
    if (v < 1 || v > newest) {
      return absl::NotFoundError(
          absl::StrCat("global version ", version, " does not exist (newest is ", newest, ")"));
    }
    if (v == newest) adapter = global_;
  }
  if (!adapter.factors.layers.size()) {
    COLLM_ASSIGN_OR_RETURN(adapter, store_->ReadGlobal(v, options_.model));
  }
  COLLM_ASSIGN_OR_RETURN(lora::PeftBlob blob, lora::SerializePeftAdapter(adapter));
  return std::make_pair(v, std::move(blob));
}

v1::FederationStatus RoundManager::Status() const {
  std::lock_guard<std::mutex> lock(mu_);
  return StatusLocked();
}

std::vector<v1::DeviceInfo> RoundManager::Devices() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<v1::DeviceInfo> out;
  for (const auto& [id, d] : devices_) out.push_back(DeviceInfoLocked(d));
  return out;
}

std::vector<v1::RoundInfo> RoundManager::Rounds(int64_t limit) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<v1::RoundInfo> out(rounds_.rbegin(), rounds_.rend());
  if (limit > 0 && static_cast<int64_t>(out.size()) > limit) out.resize(limit);
  return out;
}

absl::StatusOr<v1::RoundInfo> RoundManager::Round(int64_t round) const {
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& r : rounds_) {
    if (r.round() == round) return r;
  }
  return absl::NotFoundError(
      absl::StrCat("round ", round, " does not exist (rounds 1..", status_.current_round(), ")"));
}

absl::StatusOr<v1::FederationStatus> RoundManager::Start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (status_.state() == "running") return absl::FailedPreconditionError("already running");
  if (status_.state() == "paused") {
    return absl::FailedPreconditionError("the federation is paused: use resume");
  }
  status_.set_state("running");
  COLLM_RETURN_IF_ERROR(SaveStatusLocked());
  ChangedLocked();
  return StatusLocked();
}

absl::StatusOr<v1::FederationStatus> RoundManager::Pause() {
  std::lock_guard<std::mutex> lock(mu_);
  if (status_.state() != "running") {
    return absl::FailedPreconditionError(
        absl::StrCat("only a running federation can be paused; it is ", status_.state()));
  }
  status_.set_state("paused");
  COLLM_RETURN_IF_ERROR(SaveStatusLocked());
  ChangedLocked();
  return StatusLocked();
}

absl::StatusOr<v1::FederationStatus> RoundManager::Resume() {
  std::lock_guard<std::mutex> lock(mu_);
  if (status_.state() != "paused") {
    return absl::FailedPreconditionError(
        absl::StrCat("only a paused federation can be resumed; it is ", status_.state()));
  }
  status_.set_state("running");
  COLLM_RETURN_IF_ERROR(SaveStatusLocked());
  ChangedLocked();
  return StatusLocked();
}

absl::StatusOr<v1::FederationStatus> RoundManager::SetPolicy(const v1::FederationPolicy& changes) {
  std::lock_guard<std::mutex> lock(mu_);
  v1::FederationPolicy merged = policy_;
  merged.MergeFrom(changes);
  COLLM_RETURN_IF_ERROR(ValidatePolicy(merged));
  COLLM_RETURN_IF_ERROR(store_->SavePolicy(merged));
  policy_ = merged;
  ChangedLocked();
  return StatusLocked();
}

void RoundManager::MaybeOpenRoundLocked() {
  if (status_.state() != "running" || OpenRound() != nullptr) return;
  if (policy_.rounds() > 0 && status_.rounds_completed() >= policy_.rounds()) {
    status_.set_state("finished");
    if (auto s = SaveStatusLocked(); !s.ok()) COLLM_LOG_ERROR("{}", std::string(s.message()));
    COLLM_LOG_INFO("federation finished after {} rounds", status_.rounds_completed());
    ChangedLocked();
    return;
  }
  std::vector<coordination::DeviceLoad> eligible;
  for (const auto& [id, d] : devices_) {
    if (!Online(d)) continue;
    const v1::DeviceTelemetry& t = d.info.telemetry();
    coordination::DeviceLoad load;
    load.device_id = id;
    load.arrival_rate_short = t.arrival_rate_1s();
    load.arrival_rate_long = t.arrival_rate_30s();
    load.arrival_trend = t.arrival_trend();
    // Devices without a load report (max_running unset) count as meeting their SLO.
    load.slo_attainment = t.max_running() > 0 ? t.slo_attainment_window() : 1;
    load.serving_capacity_rps = t.serving_capacity_rps();
    load.optimizer_step_seconds = t.optimizer_step_seconds();
    load.loss_reduction_per_step = t.loss_reduction_per_step();
    load.new_local_samples = t.new_local_samples();
    eligible.push_back(std::move(load));
  }
  if (static_cast<int64_t>(eligible.size()) < policy_.min_clients()) return;
  const int64_t number = status_.current_round() + 1;
  coordination::RoundLimits limits;
  limits.min_clients = policy_.min_clients();
  limits.max_clients = policy_.max_clients();
  limits.local_steps = policy_.local_steps();
  limits.deadline_s = policy_.deadline_s();
  limits.training_share = policy_.training_share();
  limits.delivery_s = static_cast<double>(options_.heartbeat_interval_ms) * 1e-3;
  limits.seed = options_.seed ^ (static_cast<uint64_t>(number) * 0x9E3779B97F4A7C15ull);
  const coordination::RoundPlan plan = planner_.Plan(std::move(eligible), limits);
  const std::vector<std::string> participants = plan.Participants();
  v1::RoundInfo round;
  round.set_round(number);
  round.set_state("collecting");
  round.set_base_version(status_.global_version());
  for (const auto& id : participants) round.add_participants(id);
  round.set_coordination_policy(coordination::RoundPolicyName(plan.policy) +
                                (plan.fallback ? " (fallback)" : ""));
  for (const auto& d : plan.decisions) {
    v1::RoundDecision* out = round.add_decisions();
    out->set_device_id(d.device_id);
    out->set_chosen(d.chosen);
    out->set_budget_steps(d.budget_steps);
    out->set_share_ceiling(d.share_ceiling);
    out->set_forecast_arrival_rate(d.forecast_arrival_rate);
    out->set_forecast_utilization(d.forecast_utilization);
    out->set_slo_queue(d.slo_queue);
    out->set_quality_debt(d.quality_debt);
    out->set_expected_gain(d.expected_gain);
    out->set_score(d.score);
    out->set_reason(d.reason);
  }
  round.set_started_unix_ms(NowMs());
  round.set_deadline_unix_ms(NowMs() + static_cast<int64_t>(std::llround(plan.deadline_s * 1000)));
  round.set_strategy(policy_.strategy());
  if (auto s = store_->SaveRound(round); !s.ok()) {
    COLLM_LOG_ERROR("cannot open round {}: {}", number, std::string(s.message()));
    return;
  }
  rounds_.push_back(round);
  updates_.clear();
  status_.set_current_round(number);
  if (auto s = SaveStatusLocked(); !s.ok()) COLLM_LOG_ERROR("{}", std::string(s.message()));
  COLLM_LOG_INFO("round {} opened ({}): {} participant(s), base version {}, deadline in {} s",
                 number, round.coordination_policy(), participants.size(), round.base_version(),
                 plan.deadline_s);
  for (const auto& d : plan.decisions) {
    COLLM_LOG_INFO(
        "round {}: {} {}: budget {} steps, share ceiling {:.2f}, forecast {:.3g} req/s "
        "(utilization {:.2f}), SLO queue {:.3g}, quality debt {:.3g}, gain {:.2f}: {}",
        number, d.device_id, d.chosen ? "chosen" : "not chosen", d.budget_steps, d.share_ceiling,
        d.forecast_arrival_rate, d.forecast_utilization, d.slo_queue, d.quality_debt,
        d.expected_gain, d.reason);
  }
  ExportDecisionsLocked(round);
  ChangedLocked();
}

void RoundManager::Tick() {
  std::lock_guard<std::mutex> tick(tick_mu_);
  std::unique_lock<std::mutex> lock(mu_);
  if (shut_down_) return;
  if (v1::RoundInfo* round = OpenRound()) {
    const int64_t n = round->participants_size();
    const int64_t accepted = round->updates_size();
    const int64_t quorum = policy_.quorum() > 0 ? std::min<int64_t>(policy_.quorum(), n) : n;
    std::string note;
    if (accepted >= quorum) {
      note = absl::StrCat("quorum: ", accepted, " of ", n, " updates");
    } else if (NowMs() >= round->deadline_unix_ms()) {
      const int64_t need = DeadlineQuorumLocked();
      if (accepted >= need) {
        note = absl::StrCat("deadline: ", accepted, " of ", n, " updates (deadline quorum ", need,
                            ")");
      } else {
        round->set_state("failed");
        round->set_finished_unix_ms(NowMs());
        round->set_note(absl::StrCat("deadline: only ", accepted, " of ", n,
                                     " updates, the deadline quorum is ", need,
                                     "; global adapter unchanged"));
        COLLM_LOG_WARN("round {} failed: {}", round->round(), std::string(round->note()));
        CountRound("failed");
        updates_.clear();
        (void)store_->SaveRound(*round);
        (void)SaveStatusLocked();
        ChangedLocked();
      }
    }
    if (!note.empty()) {
      const int64_t number = round->round();
      round->set_state("aggregating");
      ChangedLocked();
      std::vector<ClientUpdate> inputs;
      for (const auto& info : round->updates()) inputs.push_back(updates_.at(info.device_id()));
      const lora::LoraAdapter global = global_;
      const AggregationOptions agg = OptionsLocked(*round);
      const int64_t next_version = status_.global_version() + 1;
      lock.unlock();
      const int64_t aggregation_start = clock_.NowNanos();
      // Aggregate advances a copy: the moments in memory move only with the version they
      // produced, so a failed round leaves them as they were.
      ServerOptimizerState optimizer = optimizer_;
      absl::StatusOr<AggregationResult> result =
          Aggregate(options_.model, global, inputs, agg,
                    agg.server_optimizer == ServerOptimizer::kNone ? nullptr : &optimizer);
      CrashPoint("aggregating");
      if (options_.metrics != nullptr) {
        options_.metrics
            ->GetHistogram("collm_fed_aggregation_seconds", "Time to aggregate a round's updates",
                           {0.001, 0.01, 0.1, 0.5, 1, 5, 30})
            ->Observe(static_cast<double>(clock_.NowNanos() - aggregation_start) * 1e-9);
      }
      absl::Status saved =
          result.ok() ? store_->SaveGlobal(next_version, result->adapter) : result.status();
      if (saved.ok() && agg.server_optimizer != ServerOptimizer::kNone) {
        saved = store_->SaveOptimizer(next_version, optimizer);
      }
      if (saved.ok()) CrashPoint("global_written");
      lock.lock();
      round = FindRound(number);
      round->set_finished_unix_ms(NowMs());
      if (saved.ok()) {
        global_ = std::move(result->adapter);
        optimizer_ = std::move(optimizer);
        status_.set_global_version(next_version);
        status_.set_rounds_completed(status_.rounds_completed() + 1);
        double samples = 0, train = 0, held = 0;
        for (const auto& u : round->updates()) {
          samples += static_cast<double>(u.num_samples());
          train += static_cast<double>(u.num_samples()) * u.train_loss();
          held += static_cast<double>(u.num_samples()) * u.held_out_loss();
        }
        round->set_mean_train_loss(samples > 0 ? train / samples : 0);
        round->set_mean_held_out_loss(samples > 0 ? held / samples : 0);
        round->set_state("done");
        round->set_result_version(next_version);
        round->set_note(note);
        COLLM_LOG_INFO("round {} done ({}): global version {}", number, note, next_version);
        CountRound("done");
      } else {
        round->set_state("failed");
        round->set_note(absl::StrCat("aggregation failed: ", saved.message()));
        COLLM_LOG_ERROR("round {} {}", number, std::string(round->note()));
        CountRound("failed");
      }
      updates_.clear();
      if (auto s = store_->SaveRound(*round); !s.ok())
        COLLM_LOG_ERROR("{}", std::string(s.message()));
      CrashPoint("round_closed");
      if (auto s = SaveStatusLocked(); !s.ok()) COLLM_LOG_ERROR("{}", std::string(s.message()));
      ChangedLocked();
    }
  }
  MaybeOpenRoundLocked();
}

int64_t RoundManager::WaitForChange(int64_t seen, int64_t timeout_ms) const {
  std::unique_lock<std::mutex> lock(mu_);
  changed_.wait_for(lock, std::chrono::milliseconds(timeout_ms),
                    [&] { return changes_ != seen || shut_down_; });
  return changes_;
}

int64_t RoundManager::change_count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return changes_;
}

bool RoundManager::shut_down() const {
  std::lock_guard<std::mutex> lock(mu_);
  return shut_down_;
}

absl::Status RoundManager::Shutdown() {
  std::lock_guard<std::mutex> lock(mu_);
  if (shut_down_) return absl::OkStatus();
  shut_down_ = true;
  changed_.notify_all();
  COLLM_RETURN_IF_ERROR(SaveDevicesLocked());
  return SaveStatusLocked();
}

}  // namespace collm::federation
