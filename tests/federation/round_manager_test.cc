// RoundManager and StateStore with a FakeClock and a real state directory: registration, sampling,
// quorum and deadline closes, rejections (late, NaN, wrong shape, not a participant), restart
// resume with the accepted updates, corrupt state files.
#include "collm/federation/round_manager.h"

#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "collm/federation/fingerprint.h"
#include "collm/federation/state_store.h"
#include "collm/lora/peft_io.h"
#include "collm/runtime/random_model.h"
#include "gtest/gtest.h"
#include "testing/test_env.h"

namespace collm::federation {
namespace {

constexpr int64_t kStart = 1700000000LL * 1000000000LL;  // A Unix time, as the real clock gives.

class RoundManagerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = runtime::TinyLlamaConfig();
    lora::LoraConfig cfg;
    cfg.rank = 2;
    initial_ = *lora::LoraAdapter::Create(model_, cfg, 1);
    dir_ = collm::testing::MakeTempDir("round-manager");
    options_.model = model_;
    options_.heartbeat_interval_ms = 1000;
    options_.offline_after_missed = 3;
    options_.policy.set_min_clients(3);
    options_.policy.set_deadline_s(60);
    options_.policy.set_rounds(5);
    options_.auto_start = true;
  }

  std::unique_ptr<RoundManager> Make() {
    auto store = StateStore::Open(dir_);
    EXPECT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
    auto m = RoundManager::Create(options_, clock_, store_.get(), initial_);
    EXPECT_TRUE(m.ok()) << m.status();
    return m.ok() ? std::move(*m) : nullptr;
  }

  std::string Register(RoundManager& m, const std::string& id) {
    v1::RegisterRequest req;
    req.set_device_id(id);
    req.mutable_capabilities()->set_model_fingerprint(ModelFingerprint(model_));
    auto r = m.Register(req, "test");
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? r->session() : "";
  }

  v1::HeartbeatResponse Beat(RoundManager& m, const std::string& id, const std::string& session) {
    v1::HeartbeatRequest req;
    req.set_device_id(id);
    req.set_session(session);
    auto r = m.Heartbeat(req, "test");
    EXPECT_TRUE(r.ok());
    return *r;
  }

  // The global adapter moved by `shift` in every A entry, as a trained update would be.
  lora::PeftBlob Update(float shift) {
    lora::LoraAdapter a = initial_.Clone();
    for (auto& layer : a.factors.layers) {
      for (auto& f : layer) {
        if (f.a.defined()) f.a = f.a + shift;
      }
    }
    return *lora::SerializePeftAdapter(a);
  }

  absl::Status Submit(RoundManager& m, const std::string& id, const std::string& session,
                      int64_t round, const lora::PeftBlob& blob, int64_t samples = 10,
                      const std::string& sha256 = "") {
    v1::UpdateHeader h;
    h.mutable_adapter()->set_sha256(sha256);
    h.set_device_id(id);
    h.set_session(session);
    h.set_round(round);
    h.set_base_version(1);
    h.set_num_samples(samples);
    h.set_train_loss(2.0);
    return m.SubmitUpdate(h, blob);
  }

  runtime::ModelConfig model_;
  lora::LoraAdapter initial_;
  std::string dir_;
  RoundManagerOptions options_;
  FakeClock clock_{kStart};
  std::unique_ptr<StateStore> store_;
};

TEST_F(RoundManagerTest, RefusesAnotherBaseModelAndBadDeviceIds) {
  auto m = Make();
  v1::RegisterRequest req;
  req.set_device_id("dev-1");
  req.mutable_capabilities()->set_model_fingerprint("deadbeef");
  auto r = m->Register(req, "test");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(r.status().message().find("fingerprint 'deadbeef'"), std::string::npos) << r.status();
  req.set_device_id("../etc");
  EXPECT_EQ(m->Register(req, "test").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(RoundManagerTest, WaitsForMinClientsThenRunsARoundToQuorum) {
  auto m = Make();
  const std::string s1 = Register(*m, "dev-1"), s2 = Register(*m, "dev-2");
  m->Tick();
  EXPECT_EQ(m->Status().current_round(), 0) << "two devices < min_clients 3";
  const std::string s3 = Register(*m, "dev-3");
  m->Tick();
  ASSERT_EQ(m->Status().current_round(), 1);
  v1::HeartbeatResponse hb = Beat(*m, "dev-2", s2);
  ASSERT_TRUE(hb.has_task());
  EXPECT_EQ(hb.task().round(), 1);
  EXPECT_EQ(hb.task().global_version(), 1);
  EXPECT_EQ(hb.task().deadline_unix_ms(), kStart / 1000000 + 60000);

  ASSERT_TRUE(Submit(*m, "dev-1", s1, 1, Update(1.0f), 10).ok());
  ASSERT_TRUE(Submit(*m, "dev-2", s2, 1, Update(2.0f), 30).ok());
  EXPECT_FALSE(Beat(*m, "dev-1", s1).has_task()) << "uploaded: no task any more";
  m->Tick();
  EXPECT_EQ(m->Status().global_version(), 1) << "2 of 3: no quorum before the deadline";
  ASSERT_TRUE(Submit(*m, "dev-3", s3, 1, Update(4.0f), 60).ok());
  m->Tick();
  const v1::FederationStatus st = m->Status();
  EXPECT_EQ(st.global_version(), 2);
  EXPECT_EQ(st.rounds_completed(), 1);
  EXPECT_EQ(st.current_round(), 2) << "the next round opens at once";
  auto r1 = m->Round(1);
  ASSERT_TRUE(r1.ok());
  EXPECT_EQ(r1->state(), "done");
  EXPECT_EQ(r1->result_version(), 2);
  EXPECT_NE(r1->note().find("quorum"), std::string::npos);

  // The stored global version 2 is the sample-weighted mean (stand-in FedAvg: shifts 1, 2, 4
  // weighted 10, 30, 60 -> 3.1 on every A entry).
  auto v2 = store_->ReadGlobal(2, model_);
  ASSERT_TRUE(v2.ok()) << v2.status();
  const auto& a0 = initial_.factors.layers[0][0].a;
  EXPECT_TRUE(torch::allclose(v2->factors.layers[0][0].a, a0 + 3.1f, 1e-4, 1e-5));
  auto fetched = m->GetGlobal(0);
  ASSERT_TRUE(fetched.ok());
  EXPECT_EQ(fetched->first, 2);

  // An update for round 1 now is late: rejected and counted.
  absl::Status late = Submit(*m, "dev-1", s1, 1, Update(1.0f));
  EXPECT_EQ(late.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(late.message().find("late update"), std::string::npos) << late;
  EXPECT_EQ(m->Status().late_updates(), 1);
  EXPECT_EQ(m->Status().updates_rejected(), 1);
}

// A device whose upload was accepted but whose answer was lost (a reset link, a restart) sends
// the same payload again: acknowledged, never counted twice, even once the round has closed. A
// different payload from the same device stays a duplicate.
TEST_F(RoundManagerTest, TheSameUpdateSentAgainIsAcknowledgedAndCountedOnce) {
  options_.policy.set_min_clients(2);
  auto m = Make();
  const std::string s1 = Register(*m, "dev-1"), s2 = Register(*m, "dev-2");
  m->Tick();
  ASSERT_EQ(m->Status().current_round(), 1);
  const lora::PeftBlob blob = Update(1.0f);
  ASSERT_TRUE(Submit(*m, "dev-1", s1, 1, blob, 10, "sha-a").ok());
  EXPECT_TRUE(Submit(*m, "dev-1", s1, 1, blob, 10, "sha-a").ok());
  EXPECT_EQ(m->Status().updates_accepted(), 1);
  EXPECT_EQ(m->Status().updates_rejected(), 0);
  absl::Status other = Submit(*m, "dev-1", s1, 1, Update(2.0f), 10, "sha-b");
  EXPECT_EQ(other.code(), absl::StatusCode::kFailedPrecondition) << other;
  EXPECT_NE(other.message().find("already uploaded"), std::string::npos) << other;
  ASSERT_TRUE(Submit(*m, "dev-2", s2, 1, Update(3.0f), 10, "sha-c").ok());
  m->Tick();
  ASSERT_EQ(m->Round(1)->state(), "done");
  EXPECT_EQ(m->Round(1)->updates_size(), 2);
  // After the close, and after a restart (the sha256 is stored with the round).
  EXPECT_TRUE(Submit(*m, "dev-2", s2, 1, Update(3.0f), 10, "sha-c").ok());
  m.reset();
  m = Make();
  EXPECT_TRUE(Submit(*m, "dev-2", s2, 1, Update(3.0f), 10, "sha-c").ok());
  EXPECT_EQ(Submit(*m, "dev-2", s2, 1, Update(3.0f), 10, "").code(),
            absl::StatusCode::kFailedPrecondition)
      << "without a digest it is a late update";
  EXPECT_EQ(m->Status().updates_accepted(), 2);
  EXPECT_EQ(m->Status().rounds_completed(), 1);
}

TEST_F(RoundManagerTest, RejectsNanWrongShapeAndNonParticipants) {
  options_.policy.set_max_clients(3);
  auto m = Make();
  const std::string s1 = Register(*m, "dev-1"), s2 = Register(*m, "dev-2");
  const std::string s3 = Register(*m, "dev-3");
  m->Tick();
  ASSERT_EQ(m->Status().current_round(), 1);
  const std::string s4 = Register(*m, "dev-4");

  lora::LoraAdapter nan = initial_.Clone();
  nan.factors.layers[0][0].a = nan.factors.layers[0][0].a.clone();
  nan.factors.layers[0][0].a.index_put_({0, 0}, std::nanf(""));
  // Written past SerializePeftAdapter's own checks? Either way the aggregator must refuse it.
  auto nan_blob = lora::SerializePeftAdapter(nan);
  if (nan_blob.ok()) {
    absl::Status s = Submit(*m, "dev-1", s1, 1, *nan_blob);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  }
  lora::LoraConfig wide;
  wide.rank = 4;
  auto wrong = *lora::SerializePeftAdapter(*lora::LoraAdapter::Create(model_, wide, 2));
  absl::Status s = Submit(*m, "dev-2", s2, 1, wrong);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  s = Submit(*m, "dev-4", s4, 1, Update(1.0f));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("not a participant"), std::string::npos) << s;
  s = Submit(*m, "dev-3", "bogus", 1, Update(1.0f));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  s = Submit(*m, "dev-3", s3, 1, Update(1.0f), 0);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  const v1::FederationStatus st = m->Status();
  EXPECT_EQ(st.updates_accepted(), 0);
  EXPECT_EQ(st.updates_rejected(), nan_blob.ok() ? 5 : 4);
  auto r1 = m->Round(1);
  EXPECT_EQ(r1->rejected_size(), st.updates_rejected());
}

TEST_F(RoundManagerTest, SilentDeviceRoundClosesAtTheDeadlineAndOfflineDevicesAreNotSampled) {
  auto m = Make();
  const std::string s1 = Register(*m, "dev-1"), s2 = Register(*m, "dev-2");
  const std::string s3 = Register(*m, "dev-3");
  m->Tick();
  ASSERT_TRUE(Submit(*m, "dev-1", s1, 1, Update(1.0f)).ok());
  ASSERT_TRUE(Submit(*m, "dev-2", s2, 1, Update(1.0f)).ok());
  clock_.AdvanceSeconds(59);
  Beat(*m, "dev-1", s1);
  Beat(*m, "dev-2", s2);
  m->Tick();
  EXPECT_EQ(m->Status().global_version(), 1);
  clock_.AdvanceSeconds(2);
  m->Tick();
  auto r1 = m->Round(1);
  EXPECT_EQ(r1->state(), "done");
  EXPECT_NE(r1->note().find("deadline: 2 of 3"), std::string::npos) << r1->note();
  EXPECT_EQ(m->Status().global_version(), 2);
  // dev-3 has been silent for 61 s > 3 missed 1 s heartbeats: offline, and with only two online
  // devices round 2 does not open.
  EXPECT_EQ(m->Status().devices_online(), 2);
  EXPECT_EQ(m->Status().current_round(), 1);
  for (const auto& d : m->Devices()) {
    EXPECT_EQ(d.state(), d.device_id() == "dev-3" ? "offline" : "online") << d.device_id();
  }
}

TEST_F(RoundManagerTest, RoundFailsAtTheDeadlineWithoutTheDeadlineQuorum) {
  options_.policy.set_min_clients(3);  // Deadline quorum ceil(3/2) = 2.
  auto m = Make();
  const std::string s1 = Register(*m, "dev-1");
  Register(*m, "dev-2");
  Register(*m, "dev-3");
  m->Tick();
  ASSERT_TRUE(Submit(*m, "dev-1", s1, 1, Update(1.0f)).ok());
  clock_.AdvanceSeconds(61);
  m->Tick();
  EXPECT_EQ(m->Round(1)->state(), "failed");
  EXPECT_NE(m->Round(1)->note().find("deadline quorum is 2"), std::string::npos);
  EXPECT_EQ(m->Status().global_version(), 1);
}

TEST_F(RoundManagerTest, RestartResumesTheOpenRoundWithItsAcceptedUpdates) {
  std::string s1, s2, s3;
  {
    auto m = Make();
    s1 = Register(*m, "dev-1");
    s2 = Register(*m, "dev-2");
    s3 = Register(*m, "dev-3");
    m->Tick();
    ASSERT_TRUE(Submit(*m, "dev-1", s1, 1, Update(1.0f), 10).ok());
    // No Shutdown(): as after a kill -9.
  }
  auto m = Make();
  v1::FederationStatus st = m->Status();
  EXPECT_EQ(st.state(), "running");
  EXPECT_EQ(st.current_round(), 1);
  EXPECT_EQ(st.updates_accepted(), 1);
  EXPECT_EQ(m->Round(1)->updates_size(), 1);
  // Sessions are persisted: a device that trained through the restart keeps its task and its
  // update is accepted under the session it registered with, with no re-registration.
  const v1::HeartbeatResponse hb = Beat(*m, "dev-2", s2);
  EXPECT_FALSE(hb.reregister());
  EXPECT_TRUE(hb.has_task());
  ASSERT_TRUE(Submit(*m, "dev-2", s2, 1, Update(1.0f), 10).ok());
  // A device that registers again gets a new session; the old one stops working.
  const std::string old_s3 = s3;
  s3 = Register(*m, "dev-3");
  EXPECT_NE(s3, old_s3);
  EXPECT_TRUE(Beat(*m, "dev-3", old_s3).reregister());
  ASSERT_TRUE(Submit(*m, "dev-3", s3, 1, Update(4.0f), 20).ok());
  m->Tick();
  EXPECT_EQ(m->Round(1)->state(), "done");
  // Per-device history survives: the update accepted before the kill still counts for dev-1.
  for (const auto& d : m->Devices()) EXPECT_EQ(d.rounds_participated(), 1) << d.device_id();
  auto v2 = store_->ReadGlobal(2, model_);
  ASSERT_TRUE(v2.ok());
  // (1*10 + 1*10 + 4*20) / 40 = 2.5: the update accepted before the restart counted.
  EXPECT_TRUE(torch::allclose(v2->factors.layers[0][0].a, initial_.factors.layers[0][0].a + 2.5f,
                              1e-4, 1e-5));
}

TEST_F(RoundManagerTest, StateWithoutSessionsFileAsksDevicesToRegisterAgain) {
  std::string s1;
  {
    auto m = Make();
    s1 = Register(*m, "dev-1");
  }
  // A state dir written before sessions were persisted (or whose sessions.json was removed).
  std::filesystem::remove(dir_ + "/sessions.json");
  auto m = Make();
  EXPECT_TRUE(Beat(*m, "dev-1", s1).reregister());
  const std::string again = Register(*m, "dev-1");
  EXPECT_FALSE(Beat(*m, "dev-1", again).reregister());
}

TEST_F(RoundManagerTest, PolicyAndControlValidation) {
  options_.auto_start = false;
  auto m = Make();
  EXPECT_EQ(m->Status().state(), "idle");
  EXPECT_EQ(m->Pause().status().code(), absl::StatusCode::kFailedPrecondition);
  v1::FederationPolicy p;
  p.set_lr(-1);
  auto bad = m->SetPolicy(p);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("policy.lr must be > 0, got -1"), std::string::npos);
  p.Clear();
  p.set_strategy("bogus");
  EXPECT_NE(m->SetPolicy(p).status().message().find("policy.strategy"), std::string::npos);
  p.Clear();
  p.set_local_steps(7);
  ASSERT_TRUE(m->SetPolicy(p).ok());
  EXPECT_EQ(m->Status().policy().local_steps(), 7);
  EXPECT_EQ(m->Status().policy().lr(), DefaultPolicy().lr()) << "unset fields stay";
  ASSERT_TRUE(m->Start().ok());
  ASSERT_TRUE(m->Pause().ok());
  EXPECT_EQ(m->Status().state(), "paused");
  // Persisted: a restart keeps state and policy.
  m.reset();
  m = Make();
  EXPECT_EQ(m->Status().state(), "paused");
  EXPECT_EQ(m->Status().policy().local_steps(), 7);
}

// A load report as collmd sends it: `rate` req/s steady, a 10 req/s capacity, 1 s steps.
v1::HeartbeatRequest LoadBeat(const std::string& id, const std::string& session, double rate,
                              double attainment = 1.0) {
  v1::HeartbeatRequest req;
  req.set_device_id(id);
  req.set_session(session);
  v1::DeviceTelemetry* t = req.mutable_telemetry();
  t->set_arrival_rate_1s(rate);
  t->set_arrival_rate_30s(rate);
  t->set_slo_attainment_window(attainment);
  t->set_serving_capacity_rps(10);
  t->set_optimizer_step_seconds(1);
  t->set_loss_reduction_per_step(0.01);
  t->set_max_running(8);
  return req;
}

TEST_F(RoundManagerTest, DriftPlusPenaltyTrainsIdleDevicesWithTheirOwnBudgetsAndExplainsIt) {
  telemetry::MetricsRegistry metrics;
  options_.metrics = &metrics;
  options_.policy.set_min_clients(1);
  options_.policy.set_local_steps(100);
  auto m = Make();
  const std::string s1 = Register(*m, "idle"), s2 = Register(*m, "light"),
                    s3 = Register(*m, "busy");
  ASSERT_TRUE(m->Heartbeat(LoadBeat("idle", s1, 0), "test").ok());
  ASSERT_TRUE(m->Heartbeat(LoadBeat("light", s2, 2), "test").ok());
  ASSERT_TRUE(m->Heartbeat(LoadBeat("busy", s3, 9), "test").ok());
  m->Tick();
  auto round = m->Round(1);
  ASSERT_TRUE(round.ok()) << round.status();
  EXPECT_EQ(round->coordination_policy(), "drift_plus_penalty");
  EXPECT_EQ(std::vector<std::string>(round->participants().begin(), round->participants().end()),
            (std::vector<std::string>{"idle", "light"}));
  ASSERT_EQ(round->decisions_size(), 3);
  for (const auto& d : round->decisions()) EXPECT_FALSE(d.reason().empty()) << d.device_id();
  // Each participant's task carries its own budget and share ceiling.
  auto idle = m->Heartbeat(LoadBeat("idle", s1, 0), "test");
  auto light = m->Heartbeat(LoadBeat("light", s2, 2), "test");
  auto busy = m->Heartbeat(LoadBeat("busy", s3, 9), "test");
  ASSERT_TRUE(idle->has_task() && light->has_task());
  EXPECT_FALSE(busy->has_task());
  EXPECT_EQ(idle->task().local_steps(), 59);  // (60 s deadline - 1 s delivery) / 1 s per step.
  EXPECT_DOUBLE_EQ(idle->task().training_share(), 1.0);
  EXPECT_LT(light->task().local_steps(), idle->task().local_steps());
  EXPECT_LT(light->task().training_share(), 1.0);
  const std::string text = metrics.RenderPrometheus();
  EXPECT_NE(text.find("collm_fed_device_chosen{device=\"busy\"} 0"), std::string::npos) << text;
  EXPECT_NE(text.find("collm_fed_device_budget_steps{device=\"idle\"} 59"), std::string::npos);
  EXPECT_NE(text.find("collm_fed_round_participants 2"), std::string::npos);
}

TEST_F(RoundManagerTest, UniformPolicyAndDevicesWithoutLoadReportsKeepTheOldSampling) {
  options_.planner.policy = coordination::RoundPolicy::kUniform;
  auto m = Make();
  const std::string s1 = Register(*m, "dev-1"), s2 = Register(*m, "dev-2"),
                    s3 = Register(*m, "dev-3");
  ASSERT_TRUE(m->Heartbeat(LoadBeat("dev-1", s1, 9), "test").ok());
  m->Tick();
  auto round = m->Round(1);
  ASSERT_TRUE(round.ok());
  EXPECT_EQ(round->coordination_policy(), "uniform");
  EXPECT_EQ(round->participants_size(), 3);  // Busy or not: uniform samples everyone.
  auto hb = m->Heartbeat(LoadBeat("dev-1", s1, 9), "test");
  EXPECT_EQ(hb->task().local_steps(), DefaultPolicy().local_steps());
  EXPECT_DOUBLE_EQ(hb->task().training_share(), DefaultPolicy().training_share());
}

TEST_F(RoundManagerTest, VirtualQueuesSurviveARestartThroughThePersistedDecisions) {
  options_.policy.set_min_clients(1);
  options_.policy.set_deadline_s(5);
  {
    auto m = Make();
    const std::string s1 = Register(*m, "good"), s2 = Register(*m, "missing");
    ASSERT_TRUE(m->Heartbeat(LoadBeat("good", s1, 0), "test").ok());
    ASSERT_TRUE(m->Heartbeat(LoadBeat("missing", s2, 0, /*attainment=*/0.35), "test").ok());
    m->Tick();
    auto round = m->Round(1);
    ASSERT_TRUE(round.ok());
    for (const auto& d : round->decisions()) {
      if (d.device_id() == "missing") {
        EXPECT_NEAR(d.slo_queue(), 0.6, 1e-9);
      }
    }
    ASSERT_TRUE(m->Shutdown().ok());
  }
  auto m = Make();
  const std::string s1 = Register(*m, "good"), s2 = Register(*m, "missing");
  ASSERT_TRUE(m->Heartbeat(LoadBeat("good", s1, 0), "test").ok());
  ASSERT_TRUE(m->Heartbeat(LoadBeat("missing", s2, 0, 0.35), "test").ok());
  clock_.AdvanceSeconds(6);  // Round 1's deadline passes without updates: it fails.
  ASSERT_TRUE(m->Heartbeat(LoadBeat("good", s1, 0), "test").ok());
  ASSERT_TRUE(m->Heartbeat(LoadBeat("missing", s2, 0, 0.35), "test").ok());
  m->Tick();
  auto round = m->Round(2);
  ASSERT_TRUE(round.ok()) << round.status();
  for (const auto& d : round->decisions()) {
    if (d.device_id() == "missing") {
      EXPECT_NEAR(d.slo_queue(), 1.2, 1e-9);  // Resumed, and grown by this round's deficit.
    }
  }
}

TEST(StateStoreTest, CorruptFilesAreNamedAndTempFilesIgnored) {
  const std::string dir = collm::testing::MakeTempDir("state-store");
  const runtime::ModelConfig model = runtime::TinyLlamaConfig();
  lora::LoraConfig cfg;
  cfg.rank = 2;
  auto store = *StateStore::Open(dir);
  EXPECT_TRUE(store->Empty());
  ASSERT_TRUE(store->SaveGlobal(1, *lora::LoraAdapter::Create(model, cfg, 1)).ok());
  v1::FederationStatus status;
  status.set_state("running");
  status.set_global_version(1);
  ASSERT_TRUE(store->SaveStatus(status).ok());
  ServerOptimizerState opt;
  opt.steps = 3;
  opt.m["x"] = torch::ones({2, 2});
  opt.v["x"] = torch::full({2, 2}, 2.0f);
  ASSERT_TRUE(store->SaveOptimizer(1, opt).ok());
  // A write interrupted before its rename leaves only a temp file: ignored.
  std::ofstream(dir + "/status.json.tmp.999") << "{\"state\": \"tor";
  auto loaded = store->Load(model);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->status.state(), "running");
  EXPECT_EQ(loaded->optimizer.steps, 3);
  EXPECT_TRUE(torch::equal(loaded->optimizer.v.at("x"), opt.v["x"]));

  std::ofstream(dir + "/devices.json") << "{\"devices\": [ {\"device_id\": ";
  auto bad = store->Load(model);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(bad.status().message().find("devices.json"), std::string::npos) << bad.status();
  std::filesystem::remove(dir + "/devices.json");

  // A round that lists an update whose files are missing.
  v1::RoundInfo round;
  round.set_round(1);
  round.set_state("collecting");
  round.add_updates()->set_device_id("dev-1");
  ASSERT_TRUE(store->SaveRound(round).ok());
  bad = store->Load(model);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(bad.status().message().find("lists the update from dev-1"), std::string::npos)
      << bad.status();
}

}  // namespace
}  // namespace collm::federation
