// StateStore on a real temporary directory: what is saved loads back, and a corrupt or truncated
// file is a DataLoss naming it while every other file stays as it was.
#include "collm/federation/state_store.h"

#include <torch/torch.h>

#include <filesystem>
#include <string>

#include "gtest/gtest.h"
#include "testing/test_env.h"
#include "testing/tiny_model.h"

namespace collm::federation {
namespace {

namespace fs = std::filesystem;

runtime::ModelConfig TinyConfig() {
  return runtime::ModelConfig::FromFile(collm::testing::TinyModelDir() + "/config.json").value();
}

lora::LoraAdapter Adapter(const runtime::ModelConfig& model, uint64_t seed) {
  lora::LoraConfig c;
  c.rank = 4;
  c.targets = {runtime::LoraTarget::kQ, runtime::LoraTarget::kV};
  lora::LoraAdapter a = lora::LoraAdapter::Create(model, c, seed).value();
  // B = 0 in a fresh adapter; make it non-zero so a lost B would show.
  for (auto& layer : a.factors.layers) {
    for (auto& f : layer) {
      if (f.b.defined()) f.b = torch::full_like(f.b, 0.25 + static_cast<double>(seed));
    }
  }
  return a;
}

bool SameFactors(const lora::LoraAdapter& x, const lora::LoraAdapter& y) {
  if (x.factors.layers.size() != y.factors.layers.size()) return false;
  for (size_t l = 0; l < x.factors.layers.size(); ++l) {
    for (int t = 0; t < runtime::kNumLoraTargets; ++t) {
      const auto& a = x.factors.layers[l][t];
      const auto& b = y.factors.layers[l][t];
      if (a.a.defined() != b.a.defined()) return false;
      if (!a.a.defined()) continue;
      if (!torch::equal(a.a, b.a) || !torch::equal(a.b, b.b)) return false;
    }
  }
  return true;
}

// A state with a collecting round that has one accepted update, a global and optimizer moments.
struct Saved {
  v1::FederationStatus status;
  v1::FederationPolicy policy;
  v1::RoundInfo round;
  v1::DeviceInfo device;
};

Saved SaveEverything(StateStore& store, const runtime::ModelConfig& model) {
  Saved s;
  s.status.set_state("running");
  s.status.set_current_round(2);
  s.status.set_global_version(3);
  s.status.set_updates_accepted(5);
  s.status.mutable_policy()->set_lr(0.5);  // Not written: the policy lives in policy.json.
  s.policy.set_lr(0.01);
  s.policy.set_strategy("exact");
  s.device.set_device_id("dev-1");
  s.device.set_rounds_participated(4);
  s.round.set_round(2);
  s.round.set_state("collecting");
  s.round.set_base_version(3);
  s.round.add_participants("dev-1");
  s.round.add_updates()->set_device_id("dev-1");
  EXPECT_TRUE(store.SaveGlobal(3, Adapter(model, 3)).ok());
  EXPECT_TRUE(store.SaveUpdate(2, "dev-1", Adapter(model, 7), "5ha256").ok());
  EXPECT_TRUE(store.SaveRound(s.round).ok());
  EXPECT_TRUE(store.SaveDevices({s.device}).ok());
  EXPECT_TRUE(store.SavePolicy(s.policy).ok());
  ServerOptimizerState opt;
  opt.steps = 9;
  opt.m["x"] = torch::arange(6, torch::kFloat32).reshape({2, 3});
  opt.v["x"] = torch::full({2, 3}, 2.0f);
  EXPECT_TRUE(store.SaveOptimizer(3, opt).ok());
  EXPECT_TRUE(store.SaveStatus(s.status).ok());
  return s;
}

TEST(StateStoreTest, WhatIsSavedLoadsBack) {
  const runtime::ModelConfig model = TinyConfig();
  const std::string dir = collm::testing::MakeTempDir("collm-state") + "/state";
  auto store = StateStore::Open(dir).value();
  EXPECT_TRUE(store->Empty());
  const Saved saved = SaveEverything(*store, model);
  EXPECT_FALSE(store->Empty());

  // A fresh store on the same directory, as after a restart.
  auto reopened = StateStore::Open(dir).value();
  absl::StatusOr<FederationState> state = reopened->Load(model);
  ASSERT_TRUE(state.ok()) << state.status();
  EXPECT_EQ(state->status.state(), "running");
  EXPECT_EQ(state->status.current_round(), 2);
  EXPECT_EQ(state->status.global_version(), 3);
  EXPECT_EQ(state->status.updates_accepted(), 5);
  EXPECT_FALSE(state->status.has_policy());
  EXPECT_EQ(state->policy.lr(), 0.01);
  EXPECT_EQ(state->policy.strategy(), "exact");
  ASSERT_EQ(state->devices.size(), 1u);
  EXPECT_EQ(state->devices[0].device_id(), "dev-1");
  EXPECT_EQ(state->devices[0].rounds_participated(), 4);
  EXPECT_EQ(state->update_sha256.at({2, "dev-1"}), "5ha256");
  ASSERT_EQ(state->rounds.size(), 1u);
  EXPECT_EQ(state->rounds[0].round(), 2);
  EXPECT_EQ(state->rounds[0].state(), "collecting");
  ASSERT_EQ(state->open_updates.count(2), 1u);
  ASSERT_EQ(state->open_updates[2].count("dev-1"), 1u);
  EXPECT_TRUE(SameFactors(state->open_updates[2].at("dev-1"), Adapter(model, 7)));
  EXPECT_TRUE(SameFactors(state->global, Adapter(model, 3)));
  EXPECT_EQ(state->optimizer.steps, 9);
  EXPECT_TRUE(
      torch::equal(state->optimizer.m.at("x"), torch::arange(6, torch::kFloat32).reshape({2, 3})));
  EXPECT_TRUE(torch::equal(state->optimizer.v.at("x"), torch::full({2, 3}, 2.0f)));
}

TEST(StateStoreTest, ACorruptFileIsDataLossNamingItAndNothingElseIsTouched) {
  const runtime::ModelConfig model = TinyConfig();
  const std::string dir = collm::testing::MakeTempDir("collm-state") + "/state";
  auto store = StateStore::Open(dir).value();
  SaveEverything(*store, model);
  const std::string policy_before = collm::testing::ReadFileOrDie(dir + "/policy.json");
  const std::string status_before = collm::testing::ReadFileOrDie(dir + "/status.json");

  collm::testing::WriteFileOrDie(dir + "/devices.json", "{\"devices\": [ {\"device_id\": ");
  absl::StatusOr<FederationState> state = store->Load(model);
  ASSERT_FALSE(state.ok());
  EXPECT_EQ(state.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(state.status().message().find(dir + "/devices.json: corrupt state file"),
            std::string::npos)
      << state.status();
  // Loading reads only: the other files are exactly as they were.
  EXPECT_EQ(collm::testing::ReadFileOrDie(dir + "/policy.json"), policy_before);
  EXPECT_EQ(collm::testing::ReadFileOrDie(dir + "/status.json"), status_before);
}

TEST(StateStoreTest, ATruncatedRoundFileIsDataLossNamingIt) {
  const runtime::ModelConfig model = TinyConfig();
  const std::string dir = collm::testing::MakeTempDir("collm-state") + "/state";
  auto store = StateStore::Open(dir).value();
  SaveEverything(*store, model);
  const std::string round_file = dir + "/rounds/2/round.json";
  const std::string text = collm::testing::ReadFileOrDie(round_file);
  collm::testing::WriteFileOrDie(round_file, text.substr(0, text.size() / 2));
  absl::StatusOr<FederationState> state = store->Load(model);
  ASSERT_FALSE(state.ok());
  EXPECT_EQ(state.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(state.status().message().find(round_file), std::string::npos) << state.status();
}

TEST(StateStoreTest, AListedUpdateWithoutItsFilesIsDataLoss) {
  const runtime::ModelConfig model = TinyConfig();
  const std::string dir = collm::testing::MakeTempDir("collm-state") + "/state";
  auto store = StateStore::Open(dir).value();
  SaveEverything(*store, model);
  fs::remove_all(dir + "/rounds/2/updates/dev-1");
  absl::StatusOr<FederationState> state = store->Load(model);
  ASSERT_FALSE(state.ok());
  EXPECT_EQ(state.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(state.status().message().find("lists the update from dev-1"), std::string::npos)
      << state.status();
}

TEST(StateStoreTest, SavesReplaceAtomicallyAndLeftoversOfACrashAreIgnored) {
  const runtime::ModelConfig model = TinyConfig();
  const std::string dir = collm::testing::MakeTempDir("collm-state") + "/state";
  auto store = StateStore::Open(dir).value();
  Saved saved = SaveEverything(*store, model);
  saved.status.set_current_round(3);
  ASSERT_TRUE(store->SaveStatus(saved.status).ok());
  // The replace left no temporary file behind.
  for (const auto& entry : fs::directory_iterator(dir)) {
    EXPECT_EQ(entry.path().filename().string().find(".tmp"), std::string::npos) << entry.path();
  }
  // What a kill -9 in the middle of a write leaves: a torn temporary beside the real file, and a
  // round directory created before its round.json.
  collm::testing::WriteFileOrDie(dir + "/status.json.tmp.12345", "{\"state\": \"fin");
  fs::create_directories(dir + "/rounds/3");
  absl::StatusOr<FederationState> state = store->Load(model);
  ASSERT_TRUE(state.ok()) << state.status();
  EXPECT_EQ(state->status.current_round(), 3);
  EXPECT_EQ(state->rounds.size(), 1u);
}

TEST(StateStoreTest, AMissingGlobalVersionIsAnError) {
  const runtime::ModelConfig model = TinyConfig();
  const std::string dir = collm::testing::MakeTempDir("collm-state") + "/state";
  auto store = StateStore::Open(dir).value();
  SaveEverything(*store, model);
  fs::remove_all(store->GlobalDir(3));
  absl::StatusOr<FederationState> state = store->Load(model);
  ASSERT_FALSE(state.ok());
  EXPECT_NE(state.status().message().find("global version 3 is not stored"), std::string::npos)
      << state.status();
}

}  // namespace
}  // namespace collm::federation
