// collm-aggregator as operators run it: a real process on a loopback port with a tiny random
// model's config.json, C++ gRPC clients playing devices, collmctl fed as a process, kill -9 and
// restart on the same state dir, and TLS / mutual TLS with certificates made by openssl.
#include <grpcpp/grpcpp.h>
#include <torch/torch.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <thread>

#include "absl/strings/str_cat.h"
#include "collm/federation/fingerprint.h"
#include "collm/lora/peft_io.h"
#include "collm/runtime/model_config.h"
#include "collm/v1/federation.grpc.pb.h"
#include "gtest/gtest.h"
#include "testing/subprocess.h"
#include "testing/test_env.h"
#include "testing/tiny_model.h"

namespace collm {
namespace {

using collm::testing::BinaryPath;
using collm::testing::MakeTempDir;
using collm::testing::ReadFileOrDie;
using collm::testing::RunCommand;
using collm::testing::WriteFileOrDie;

constexpr char kToken[] = "s3cret-token";

std::string WriteConfig(const std::string& dir, const std::string& extra, int min_clients = 3,
                        double deadline_s = 120) {
  const std::string yaml = "server:\n  address: 127.0.0.1:0\nstate_dir: " + dir + "/state\n" +
                           "model_config: " + collm::testing::TinyModelDir() + "/config.json\n" +
                           "lora:\n  rank: 2\n  targets: [q_proj, v_proj]\n" +
                           "heartbeat_interval_ms: 1000\noffline_after_missed: 30\ntick_ms: 50\n" +
                           "auto_start: true\nadmin_token: " + kToken + "\n" +
                           "policy:\n  rounds: 3\n  min_clients: " + std::to_string(min_clients) +
                           "\n  deadline_s: " + std::to_string(deadline_s) + "\n" + extra;
  WriteFileOrDie(dir + "/aggregator.yaml", yaml);
  return dir + "/aggregator.yaml";
}

runtime::ModelConfig TinyConfig() {
  return *runtime::ModelConfig::FromFile(collm::testing::TinyModelDir() + "/config.json");
}

// One device, speaking FederationService the way collmd's FL client does.
class Device {
 public:
  Device(const std::string& id, std::shared_ptr<grpc::Channel> channel)
      : id_(id), stub_(v1::FederationService::NewStub(std::move(channel))) {}

  grpc::Status Register() {
    v1::RegisterRequest req;
    req.set_device_id(id_);
    req.mutable_capabilities()->set_model_fingerprint(federation::ModelFingerprint(TinyConfig()));
    req.mutable_capabilities()->set_local_samples(100);
    v1::RegisterResponse resp;
    grpc::ClientContext ctx;
    grpc::Status s = stub_->Register(&ctx, req, &resp);
    session_ = resp.session();
    return s;
  }
  // Heartbeats (re-registering when told to) until a task arrives.
  v1::RoundTask WaitForTask() {
    for (int i = 0; i < 400; ++i) {
      v1::HeartbeatRequest req;
      req.set_device_id(id_);
      req.set_session(session_);
      v1::HeartbeatResponse resp;
      grpc::ClientContext ctx;
      EXPECT_TRUE(stub_->Heartbeat(&ctx, req, &resp).ok());
      if (resp.reregister()) EXPECT_TRUE(Register().ok());
      if (resp.has_task()) return resp.task();
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    ADD_FAILURE() << id_ << " got no task";
    return {};
  }
  // Fetches a global version; checks sha256 and size like a device must.
  lora::LoraAdapter Fetch(int64_t version, int64_t* got_version = nullptr) {
    v1::FetchGlobalRequest req;
    req.set_device_id(id_);
    req.set_session(session_);
    req.set_version(version);
    grpc::ClientContext ctx;
    auto reader = stub_->FetchGlobal(&ctx, req);
    v1::AdapterChunk chunk;
    v1::AdapterBlobHeader header;
    lora::PeftBlob blob;
    while (reader->Read(&chunk)) {
      if (chunk.has_header())
        header = chunk.header();
      else
        blob.safetensors += chunk.data();
    }
    grpc::Status s = reader->Finish();
    EXPECT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(federation::Sha256Hex(blob.safetensors), header.sha256());
    if (got_version) *got_version = header.version();
    blob.config_json = header.config_json();
    auto adapter = lora::ParsePeftAdapter(blob, TinyConfig(), "global");
    EXPECT_TRUE(adapter.ok()) << adapter.status();
    return adapter.ok() ? std::move(*adapter) : lora::LoraAdapter{};
  }
  // Uploads in 1 KiB chunks (many chunks for the tiny adapter).
  grpc::Status Upload(int64_t round, int64_t base_version, const lora::PeftBlob& blob,
                      int64_t samples, const std::string& sha_override = "") {
    grpc::ClientContext ctx;
    v1::UploadResponse resp;
    auto writer = stub_->UploadUpdate(&ctx, &resp);
    v1::UpdateChunk first;
    v1::UpdateHeader* h = first.mutable_header();
    h->set_device_id(id_);
    h->set_session(session_);
    h->set_round(round);
    h->set_base_version(base_version);
    h->set_num_samples(samples);
    h->set_train_loss(2.5);
    h->mutable_adapter()->set_config_json(blob.config_json);
    h->mutable_adapter()->set_safetensors_bytes(static_cast<int64_t>(blob.safetensors.size()));
    h->mutable_adapter()->set_sha256(sha_override.empty() ? federation::Sha256Hex(blob.safetensors)
                                                          : sha_override);
    writer->Write(first);
    for (size_t off = 0; off < blob.safetensors.size(); off += 1024) {
      v1::UpdateChunk c;
      c.set_data(blob.safetensors.substr(off, 1024));
      if (!writer->Write(c)) break;
    }
    writer->WritesDone();
    return writer->Finish();
  }
  const std::string& id() const { return id_; }
  // Talks to a restarted aggregator under the same session (the aggregator persisted it).
  void Reconnect(std::shared_ptr<grpc::Channel> channel) {
    stub_ = v1::FederationService::NewStub(std::move(channel));
  }

 private:
  std::string id_, session_;
  std::unique_ptr<v1::FederationService::Stub> stub_;
};

// dev-1, dev-2 and dev-3, registered on `channel` (none when one fails): the federation most tests
// here run.
std::vector<std::unique_ptr<Device>> RegisterThreeDevices(std::shared_ptr<grpc::Channel> channel) {
  std::vector<std::unique_ptr<Device>> devices;
  for (const char* id : {"dev-1", "dev-2", "dev-3"}) {
    devices.push_back(std::make_unique<Device>(id, channel));
    const grpc::Status s = devices.back()->Register();
    if (!s.ok()) {
      ADD_FAILURE() << "cannot register " << id << ": " << s.error_message();
      return {};
    }
  }
  return devices;
}

// `global` with every A entry shifted by `shift`: a stand-in for a locally trained adapter.
lora::PeftBlob Shifted(const lora::LoraAdapter& global, float shift) {
  lora::LoraAdapter a = global.Clone();
  for (auto& layer : a.factors.layers) {
    for (auto& f : layer) {
      if (f.a.defined()) f.a = f.a + shift;
    }
  }
  return *lora::SerializePeftAdapter(a);
}

std::unique_ptr<v1::FederationAdminService::Stub> Admin(const std::string& address) {
  return v1::FederationAdminService::NewStub(
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
}

v1::FederationStatus GetStatus(v1::FederationAdminService::Stub& admin) {
  grpc::ClientContext ctx;
  ctx.AddMetadata("authorization", std::string("Bearer ") + kToken);
  v1::FederationStatus s;
  EXPECT_TRUE(admin.GetStatus(&ctx, v1::GetStatusRequest(), &s).ok());
  return s;
}

// Polls (bounded) until the global version reaches `version`.
v1::FederationStatus WaitForVersion(v1::FederationAdminService::Stub& admin, int64_t version) {
  v1::FederationStatus s;
  for (int i = 0; i < 600; ++i) {
    s = GetStatus(admin);
    if (s.global_version() >= version) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return s;
}

std::string Ctl(const collm::testing::ServerProcess& agg, const std::string& args) {
  return BinaryPath("src/collmctl") + " fed -a " + agg.address() + " " + args;
}

TEST(CollmAggregatorTest, ThreeDevicesRoundRejectionsAndCollmctl) {
  const std::string dir = MakeTempDir("aggregator");
  COLLM_START_SERVER(agg, "src/collm-aggregator", WriteConfig(dir, ""), dir, "aggregator");
  auto channel = grpc::CreateChannel(agg.address(), grpc::InsecureChannelCredentials());
  std::vector<std::unique_ptr<Device>> devices = RegisterThreeDevices(channel);
  ASSERT_EQ(devices.size(), 3u);
  // Another base model is refused at registration.
  {
    auto stub = v1::FederationService::NewStub(channel);
    v1::RegisterRequest req;
    req.set_device_id("other");
    req.mutable_capabilities()->set_model_fingerprint("0123");
    v1::RegisterResponse resp;
    grpc::ClientContext ctx;
    grpc::Status s = stub->Register(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_NE(s.error_message().find("fingerprint"), std::string::npos);
  }
  std::vector<v1::RoundTask> tasks;
  for (auto& d : devices) tasks.push_back(d->WaitForTask());
  ASSERT_EQ(tasks[0].round(), 1);
  const lora::LoraAdapter v1_adapter = devices[0]->Fetch(tasks[0].global_version());

  // Rejections, each with its code and counted.
  lora::PeftBlob good = Shifted(v1_adapter, 1.0f);
  grpc::Status s = devices[0]->Upload(1, 1, good, 10, std::string(64, '0'));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("sha256 mismatch"), std::string::npos) << s.error_message();
  lora::PeftBlob nan = good;
  const float nan_value = std::nanf("");
  std::memcpy(&nan.safetensors[nan.safetensors.size() - 4], &nan_value, 4);
  s = devices[0]->Upload(1, 1, nan, 10);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("NaN"), std::string::npos) << s.error_message();
  lora::LoraConfig wide;
  wide.rank = 4;
  s = devices[0]->Upload(
      1, 1, *lora::SerializePeftAdapter(*lora::LoraAdapter::Create(TinyConfig(), wide, 3)), 10);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_EQ(GetStatus(*Admin(agg.address())).updates_rejected(), 3);

  // Three good updates close the round on quorum.
  const float shifts[] = {1.0f, 2.0f, 4.0f};
  const int64_t samples[] = {10, 30, 60};
  for (int i = 0; i < 3; ++i) {
    s = devices[i]->Upload(1, 1, Shifted(v1_adapter, shifts[i]), samples[i]);
    ASSERT_TRUE(s.ok()) << s.error_message() << "\n" << agg.log();
  }
  auto admin = Admin(agg.address());
  v1::FederationStatus st = WaitForVersion(*admin, 2);
  ASSERT_EQ(st.global_version(), 2) << agg.log();
  EXPECT_EQ(st.updates_accepted(), 3);
  int64_t fetched_version = 0;
  lora::LoraAdapter v2 = devices[1]->Fetch(0, &fetched_version);
  EXPECT_EQ(fetched_version, 2);
  // The sample-weighted mean: A moved by (1*10 + 2*30 + 4*60) / 100 = 3.1; B unchanged.
  for (size_t l = 0; l < v2.factors.layers.size(); ++l) {
    const auto& f = v2.factors.layers[l][0];
    EXPECT_TRUE(torch::allclose(f.a, v1_adapter.factors.layers[l][0].a + 3.1f, 1e-4, 1e-5));
    EXPECT_TRUE(torch::allclose(f.b, v1_adapter.factors.layers[l][0].b));
  }

  // A late update for the closed round 1 (other bytes than edge-0's accepted one: the same bytes
  // again would be a re-send after a lost answer, acknowledged).
  s = devices[0]->Upload(1, 1, Shifted(v1_adapter, 5.0f), 10);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(s.error_message().find("late update"), std::string::npos) << s.error_message();

  // Admin calls without or with a wrong token.
  {
    grpc::ClientContext ctx;
    v1::FederationStatus out;
    EXPECT_EQ(admin->GetStatus(&ctx, v1::GetStatusRequest(), &out).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
    grpc::ClientContext ctx2;
    ctx2.AddMetadata("authorization", "Bearer nope");
    EXPECT_EQ(admin->Start(&ctx2, v1::ControlRequest(), &out).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }

  // collmctl as a process: JSON parses and matches; tables carry the rounds.
  const std::string env = std::string("COLLM_ADMIN_TOKEN=") + kToken + " ";
  auto r = RunCommand(env + Ctl(agg, "status --json"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["global_version"], "2");  // int64 is a JSON string in proto3 JSON.
  EXPECT_EQ(j["updates_rejected"], "4");
  EXPECT_EQ(j["late_updates"], "1");
  r = RunCommand(env + Ctl(agg, "devices --json"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out)["devices"].size(), 3u);
  r = RunCommand(env + Ctl(agg, "rounds"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("done"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("1->2"), std::string::npos) << r.out;
  r = RunCommand(env + Ctl(agg, "round show 1 --json"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["state"], "done");
  EXPECT_EQ(j["updates"].size(), 3u);
  EXPECT_EQ(j["rejected"].size(), 4u);
  r = RunCommand(env + Ctl(agg, "policy set --local-steps 7 --strategy median"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("local_steps=7"), std::string::npos) << r.out;
  r = RunCommand(env + Ctl(agg, "policy set --lr -1"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("policy.lr must be > 0"), std::string::npos) << r.err;
  r = RunCommand(env + Ctl(agg, "adapter pull 2 --out " + dir + "/pulled"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto pulled = lora::ReadPeftAdapter(dir + "/pulled", TinyConfig());
  ASSERT_TRUE(pulled.ok()) << pulled.status();
  EXPECT_TRUE(torch::equal(pulled->factors.layers[0][0].a, v2.factors.layers[0][0].a));
  r = RunCommand(Ctl(agg, "status"));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("refused"), std::string::npos) << r.err;
  r = RunCommand(BinaryPath("src/collmctl") + " fed -a 127.0.0.1:1 status");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("cannot reach the aggregator"), std::string::npos) << r.err;
  r = RunCommand(env + Ctl(agg, "pause"));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  // The live display runs until stopped (it ends by itself only when the federation finishes):
  // wait for it to show the paused state, however long a loaded machine takes, then stop it.
  collm::testing::ChildProcess::Options watch;
  watch.argv = {"/usr/bin/env",
                std::string("COLLM_ADMIN_TOKEN=") + kToken,
                BinaryPath("src/collmctl"),
                "fed",
                "-a",
                agg.address(),
                "rounds",
                "watch",
                "--json"};
  watch.log_path = dir + "/watch.log";
  watch.print_log_tail_if = collm::testing::CurrentTestFailed;
  auto watcher = collm::testing::ChildProcess::Start(std::move(watch));
  ASSERT_TRUE(watcher.ok()) << watcher.status();
  const std::string paused = "\"state\":\"paused\"";
  for (int i = 0; i < 1200 && (*watcher)->Running(); ++i) {  // 60 s.
    if ((*watcher)->Log().find(paused) != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_NE((*watcher)->Log().find(paused), std::string::npos) << (*watcher)->Describe() << "\n"
                                                               << (*watcher)->Log();
  EXPECT_TRUE((*watcher)->Running()) << "rounds watch ends only when the federation finishes";
  (*watcher)->Stop();
  EXPECT_EQ(agg.Stop(), 0) << agg.log();
}

TEST(CollmAggregatorTest, SilentDeviceRoundClosesAtTheDeadline) {
  const std::string dir = MakeTempDir("aggregator-deadline");
  COLLM_START_SERVER(agg, "src/collm-aggregator", WriteConfig(dir, "", 3, 2.0), dir, "aggregator");
  auto channel = grpc::CreateChannel(agg.address(), grpc::InsecureChannelCredentials());
  std::vector<std::unique_ptr<Device>> devices = RegisterThreeDevices(channel);
  ASSERT_EQ(devices.size(), 3u);
  // dev-3 goes silent after registering; the two others train and upload.
  for (int i = 0; i < 2; ++i) {
    v1::RoundTask task = devices[i]->WaitForTask();
    lora::LoraAdapter global = devices[i]->Fetch(task.global_version());
    ASSERT_TRUE(
        devices[i]->Upload(task.round(), task.global_version(), Shifted(global, 1.0f), 5).ok());
  }
  auto admin = Admin(agg.address());
  v1::FederationStatus st = WaitForVersion(*admin, 2);
  ASSERT_EQ(st.global_version(), 2) << agg.log();
  grpc::ClientContext ctx;
  ctx.AddMetadata("authorization", std::string("Bearer ") + kToken);
  v1::GetRoundRequest req;
  req.set_round(1);
  v1::RoundInfo round;
  ASSERT_TRUE(admin->GetRound(&ctx, req, &round).ok());
  EXPECT_EQ(round.state(), "done");
  EXPECT_EQ(round.updates_size(), 2);
  EXPECT_NE(round.note().find("deadline: 2 of 3"), std::string::npos) << round.note();
}

TEST(CollmAggregatorTest, Kill9MidRoundThenRestartResumesWithTheAcceptedUpdate) {
  const std::string dir = MakeTempDir("aggregator-kill");
  const std::string config = WriteConfig(dir, "");
  std::vector<std::unique_ptr<Device>> devices;
  lora::LoraAdapter global;
  {
    COLLM_START_SERVER(agg, "src/collm-aggregator", config, dir, "aggregator");
    auto channel = grpc::CreateChannel(agg.address(), grpc::InsecureChannelCredentials());
    devices = RegisterThreeDevices(channel);
    ASSERT_EQ(devices.size(), 3u);
    v1::RoundTask task = devices[0]->WaitForTask();
    global = devices[0]->Fetch(task.global_version());
    ASSERT_TRUE(devices[0]->Upload(1, 1, Shifted(global, 1.0f), 10).ok());
    agg.Kill();
  }
  COLLM_START_SERVER(agg, "src/collm-aggregator", config, dir, "aggregator");
  EXPECT_NE(agg.log().find("1 accepted update(s) in the open round"), std::string::npos)
      << agg.log();
  auto channel = grpc::CreateChannel(agg.address(), grpc::InsecureChannelCredentials());
  for (int i = 1; i < 3; ++i) {
    devices[i] = std::make_unique<Device>(devices[i]->id(), channel);
    // The old session is unknown to the new process: WaitForTask re-registers when told to.
    v1::RoundTask task = devices[i]->WaitForTask();
    EXPECT_EQ(task.round(), 1);
    ASSERT_TRUE(devices[i]->Upload(1, 1, Shifted(global, 4.0f), 20).ok());
  }
  auto admin = Admin(agg.address());
  v1::FederationStatus st = WaitForVersion(*admin, 2);
  ASSERT_EQ(st.global_version(), 2) << agg.log();
  EXPECT_EQ(st.updates_accepted(), 3);
  lora::LoraAdapter v2 = devices[1]->Fetch(2);
  // (1*10 + 4*20 + 4*20) / 50 = 3.4: the update accepted before the kill counted.
  EXPECT_TRUE(
      torch::allclose(v2.factors.layers[0][0].a, global.factors.layers[0][0].a + 3.4f, 1e-4, 1e-5));
}

// --- Crash points (common/crash_point.h): SIGKILL at a named point, restart, check nothing -----
// acknowledged was lost or counted twice. Two devices, min_clients 2, FedAdam (so the server
// optimizer's moments are part of what must survive exactly once).

struct CrashRun {
  lora::LoraAdapter v2;  // Global version 2 after the round (empty when it never came).
  std::string log;       // The first (crashing) process's log.
};

// The aggregator on `config`, or null after a test failure naming why it did not come up.
std::unique_ptr<collm::testing::ServerProcess> StartAggregator(const std::string& config,
                                                               const std::string& dir,
                                                               std::vector<std::string> env = {}) {
  auto started = collm::testing::StartServer("src/collm-aggregator", config, dir, "aggregator",
                                             std::chrono::seconds(60), std::move(env));
  if (!started.ok()) {
    ADD_FAILURE() << started.status();
    return nullptr;
  }
  return *std::move(started);
}

// One federation round with dev-1 (shift 1, 10 samples) and dev-2 (shift 4, 20 samples) on an
// aggregator started with COLLM_CRASH_AT=`crash_at` ("" = no crash), restarted after the crash.
// Each device re-sends its update after the restart when the first upload was not answered OK,
// as collmd's FL client retries it.
CrashRun RunRoundThroughCrash(const std::string& crash_at) {
  CrashRun out;
  const std::string dir = MakeTempDir("aggregator-crash");
  const std::string config = WriteConfig(dir, "  server_optimizer: fedadam\n", 2);
  std::vector<std::unique_ptr<Device>> devices;
  std::vector<lora::PeftBlob> blobs;
  std::vector<bool> acked;
  {
    std::vector<std::string> env;
    if (!crash_at.empty()) env.push_back("COLLM_CRASH_AT=" + crash_at);
    auto started = StartAggregator(config, dir, env);
    if (started == nullptr) return out;
    collm::testing::ServerProcess& agg = *started;
    auto channel = grpc::CreateChannel(agg.address(), grpc::InsecureChannelCredentials());
    for (const char* id : {"dev-1", "dev-2"}) {
      devices.push_back(std::make_unique<Device>(id, channel));
      EXPECT_TRUE(devices.back()->Register().ok());
    }
    for (size_t i = 0; i < devices.size(); ++i) {
      const v1::RoundTask task = devices[i]->WaitForTask();
      EXPECT_EQ(task.round(), 1);
      blobs.push_back(Shifted(devices[i]->Fetch(1), i == 0 ? 1.0f : 4.0f));
      acked.push_back(devices[i]->Upload(1, 1, blobs.back(), i == 0 ? 10 : 20).ok());
    }
    if (crash_at.empty()) {
      EXPECT_EQ(WaitForVersion(*Admin(agg.address()), 2).global_version(), 2);
      out.v2 = devices[0]->Fetch(2);
      return out;
    }
    for (int i = 0; i < 600 && agg.process().Running(); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    EXPECT_EQ(agg.process().Describe(), "killed by signal 9");
    out.log = agg.log();
    EXPECT_NE(out.log.find("COLLM_CRASH_AT: crash point " + crash_at.substr(0, crash_at.find(':'))),
              std::string::npos)
        << out.log;
    EXPECT_TRUE(acked[0]) << "dev-1's update is answered before any crash point is reached";
  }
  // Restarted on the same state dir, without the crash point.
  {
    auto started = StartAggregator(config, dir);
    if (started == nullptr) return out;
    collm::testing::ServerProcess& agg = *started;
    auto channel = grpc::CreateChannel(agg.address(), grpc::InsecureChannelCredentials());
    for (size_t i = 0; i < devices.size(); ++i) {
      devices[i]->Reconnect(channel);
      if (acked[i]) continue;
      const grpc::Status s = devices[i]->Upload(1, 1, blobs[i], i == 0 ? 10 : 20);
      EXPECT_TRUE(s.ok()) << devices[i]->id() << " re-sent its update: " << s.error_message()
                          << "\n"
                          << agg.log();
    }
    auto admin = Admin(agg.address());
    const v1::FederationStatus st = WaitForVersion(*admin, 2);
    EXPECT_EQ(st.global_version(), 2) << agg.log();
    EXPECT_EQ(st.rounds_completed(), 1);
    // Each update counted once: no more (a re-send counted again) and no fewer (one lost).
    EXPECT_EQ(st.updates_accepted(), 2) << agg.log();
    EXPECT_EQ(st.updates_rejected(), 0) << agg.log();
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", std::string("Bearer ") + kToken);
    v1::GetRoundRequest req;
    req.set_round(1);
    v1::RoundInfo round;
    EXPECT_TRUE(admin->GetRound(&ctx, req, &round).ok());
    EXPECT_EQ(round.state(), "done");
    EXPECT_EQ(round.result_version(), 2);
    EXPECT_EQ(round.updates_size(), 2);
    EXPECT_EQ(round.rejected_size(), 0) << round.rejected(0);
    out.v2 = devices[0]->Fetch(2);
    EXPECT_EQ(agg.Stop(), 0);
  }
  // The state dir is valid: a third process loads it (it exits at once when it cannot).
  if (auto agg = StartAggregator(config, dir)) {
    EXPECT_EQ(GetStatus(*Admin(agg->address())).global_version(), 2) << agg->log();
  }
  return out;
}

void ExpectSameAdapter(const lora::LoraAdapter& got, const lora::LoraAdapter& want) {
  ASSERT_EQ(got.factors.layers.size(), want.factors.layers.size());
  ASSERT_FALSE(want.factors.layers.empty());
  for (size_t l = 0; l < want.factors.layers.size(); ++l) {
    ASSERT_EQ(got.factors.layers[l].size(), want.factors.layers[l].size());
    for (size_t t = 0; t < want.factors.layers[l].size(); ++t) {
      const auto& g = got.factors.layers[l][t];
      const auto& w = want.factors.layers[l][t];
      ASSERT_EQ(g.a.defined(), w.a.defined());
      if (!w.a.defined()) continue;
      EXPECT_TRUE(torch::allclose(g.a, w.a, 1e-5, 1e-6)) << "layer " << l << " target " << t;
      EXPECT_TRUE(torch::allclose(g.b, w.b, 1e-5, 1e-6)) << "layer " << l << " target " << t;
    }
  }
}

TEST(CollmAggregatorTest, KilledAtEachCrashPointTheRoundCompletesWithEveryUpdateCountedOnce) {
  // The round without a crash: what every crashed-and-restarted run must produce.
  const CrashRun reference = RunRoundThroughCrash("");
  ASSERT_FALSE(reference.v2.factors.layers.empty());
  // dev-1's upload takes this many 1 KiB chunks; the next ones are dev-2's.
  const int64_t dev1_chunks =
      static_cast<int64_t>((Shifted(reference.v2, 0).safetensors.size() + 1023) / 1024);
  // nth counts per name: :2 is dev-2's update. adapter_model.safetensors is written for global v1
  // (1), dev-1's update (2), dev-2's (3), global v2 (4); round.json when round 1 opens (1), for
  // each update (2, 3) and when it closes (4).
  const std::vector<std::string> points = {
      absl::StrCat("upload_chunk:", dev1_chunks + 1),
      "update_accepted:2",
      "update_stored:2",
      "update_recorded:2",
      "rename/round.json:3",
      "aggregating",
      "rename/adapter_model.safetensors:4",
      "rename/server_optimizer.safetensors",
      "global_written",
      "rename/round.json:4",
      "round_closed",
  };
  for (const std::string& at : points) {
    SCOPED_TRACE("COLLM_CRASH_AT=" + at);
    const CrashRun run = RunRoundThroughCrash(at);
    ExpectSameAdapter(run.v2, reference.v2);
  }
}

// Round 1 collecting with dev-1's update accepted, then the aggregator stopped: a state dir with
// every kind of file (status, policy, devices, sessions, a round, an update, a global version).
void MakeStateWithAnOpenRound(const std::string& config, const std::string& dir,
                              std::vector<std::unique_ptr<Device>>* devices,
                              std::vector<lora::PeftBlob>* blobs) {
  auto agg = StartAggregator(config, dir);
  ASSERT_NE(agg, nullptr);
  auto channel = grpc::CreateChannel(agg->address(), grpc::InsecureChannelCredentials());
  for (const char* id : {"dev-1", "dev-2"}) {
    devices->push_back(std::make_unique<Device>(id, channel));
    ASSERT_TRUE(devices->back()->Register().ok());
  }
  for (size_t i = 0; i < devices->size(); ++i) {
    ASSERT_EQ((*devices)[i]->WaitForTask().round(), 1);
    blobs->push_back(Shifted((*devices)[i]->Fetch(1), i == 0 ? 1.0f : 4.0f));
  }
  ASSERT_TRUE((*devices)[0]->Upload(1, 1, (*blobs)[0], 10).ok());
  EXPECT_EQ(agg->Stop(), 0);
}

TEST(CollmAggregatorTest, ATruncatedStateFileIsNamedAtStartAndTheProcessExitsCleanly) {
  const std::string dir = MakeTempDir("aggregator-corrupt");
  std::vector<std::unique_ptr<Device>> devices;
  std::vector<lora::PeftBlob> blobs;
  MakeStateWithAnOpenRound(WriteConfig(dir, "", 2), dir, &devices, &blobs);
  const std::vector<std::string> files = {
      "status.json",
      "policy.json",
      "devices.json",
      "sessions.json",
      "rounds/1/round.json",
      "rounds/1/updates/dev-1/adapter_config.json",
      "rounds/1/updates/dev-1/adapter_model.safetensors",
      "globals/v1/adapter_config.json",
      "globals/v1/adapter_model.safetensors",
  };
  for (size_t i = 0; i < files.size(); ++i) {
    for (const bool empty : {false, true}) {
      SCOPED_TRACE(files[i] + (empty ? " emptied" : " cut in half"));
      const std::string copy = absl::StrCat(dir, "/copy-", i, empty ? "-empty" : "-half");
      std::filesystem::create_directories(copy);
      std::filesystem::copy(dir + "/state", copy + "/state",
                            std::filesystem::copy_options::recursive);
      const std::string path = copy + "/state/" + files[i];
      ASSERT_TRUE(std::filesystem::exists(path));
      std::filesystem::resize_file(path, empty ? 0 : std::filesystem::file_size(path) / 2);
      auto started = collm::testing::StartServer("src/collm-aggregator", WriteConfig(copy, "", 2),
                                                 copy, "aggregator");
      ASSERT_FALSE(started.ok()) << "started on a state dir with a truncated " << files[i];
      const std::string message(started.status().message());
      EXPECT_NE(message.find(path), std::string::npos) << message;
      EXPECT_NE(message.find("exited with status 1"), std::string::npos) << message;
    }
  }
}

TEST(CollmAggregatorTest, AFileSizeLimitFailsTheUpdateClearlyKeepsTheStateAndRecoversAfter) {
  const std::string dir = MakeTempDir("aggregator-fsize");
  const std::string config = WriteConfig(dir, "", 2);
  std::vector<std::unique_ptr<Device>> devices;
  std::vector<lora::PeftBlob> blobs;
  MakeStateWithAnOpenRound(config, dir, &devices, &blobs);
  const std::string round_before = ReadFileOrDie(dir + "/state/rounds/1/round.json");
  // Below the size of an update's weights, above every JSON state file.
  const int64_t limit = static_cast<int64_t>(blobs[1].safetensors.size()) / 2;
  {
    collm::testing::ServerProcess::Options options;
    options.binary = BinaryPath("src/collm-aggregator");
    options.config = config;
    options.dir = dir;
    options.name = "aggregator-limited";
    options.file_size_limit = limit;
    options.print_log_tail_if = collm::testing::CurrentTestFailed;
    auto agg = collm::testing::ServerProcess::Start(std::move(options));
    ASSERT_TRUE(agg.ok()) << agg.status();
    auto channel = grpc::CreateChannel((*agg)->address(), grpc::InsecureChannelCredentials());
    devices[1]->Reconnect(channel);
    const grpc::Status s = devices[1]->Upload(1, 1, blobs[1], 20);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INTERNAL) << s.error_message();
    EXPECT_NE(s.error_message().find("could not store the update"), std::string::npos)
        << s.error_message();
    EXPECT_NE(s.error_message().find("File too large"), std::string::npos) << s.error_message();
    EXPECT_TRUE((*agg)->process().Running());
    const v1::FederationStatus st = GetStatus(*Admin((*agg)->address()));
    EXPECT_EQ(st.updates_accepted(), 1);
    EXPECT_EQ(st.global_version(), 1);
    EXPECT_EQ(ReadFileOrDie(dir + "/state/rounds/1/round.json"), round_before);
    EXPECT_EQ((*agg)->Stop(), 0);
  }
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir + "/state"))
    EXPECT_EQ(e.path().string().find(".tmp."), std::string::npos) << e.path();
  // Space is back: the same update is accepted and the round completes.
  auto agg = StartAggregator(config, dir);
  ASSERT_NE(agg, nullptr);
  devices[1]->Reconnect(grpc::CreateChannel(agg->address(), grpc::InsecureChannelCredentials()));
  ASSERT_TRUE(devices[1]->Upload(1, 1, blobs[1], 20).ok()) << agg->log();
  const v1::FederationStatus st = WaitForVersion(*Admin(agg->address()), 2);
  EXPECT_EQ(st.global_version(), 2) << agg->log();
  EXPECT_EQ(st.updates_accepted(), 2);
}

TEST(CollmAggregatorTest, AnUpdateOverMaxUpdateBytesIsRefusedNamingTheLimit) {
  const std::string dir = MakeTempDir("aggregator-limit");
  COLLM_START_SERVER(agg, "src/collm-aggregator", WriteConfig(dir, "max_update_bytes: 1KiB\n", 1),
                     dir, "aggregator");
  Device device("dev-1", grpc::CreateChannel(agg.address(), grpc::InsecureChannelCredentials()));
  ASSERT_TRUE(device.Register().ok());
  const v1::RoundTask task = device.WaitForTask();
  const lora::PeftBlob blob = Shifted(device.Fetch(task.global_version()), 1.0f);
  ASSERT_GT(blob.safetensors.size(), 1024u);
  const grpc::Status s = device.Upload(task.round(), task.global_version(), blob, 5);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find(
                absl::StrCat("announces ", blob.safetensors.size(), " bytes; the limit is 1024")),
            std::string::npos)
      << s.error_message();
  EXPECT_NE(s.error_message().find("max_update_bytes"), std::string::npos) << s.error_message();
  EXPECT_EQ(GetStatus(*Admin(agg.address())).updates_accepted(), 0);
}

// openssl CLI: a CA, a server cert for 127.0.0.1/localhost, a client cert with CN=dev-tls.
void MakeCerts(const std::string& d) {
  const std::string cmd =
      "cd " + d +
      " && openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem "
      "-days 2 -subj /CN=test-ca 2>/dev/null && "
      "openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost "
      "2>/dev/null && printf 'subjectAltName=IP:127.0.0.1,DNS:localhost' > san.ext && "
      "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem "
      "-days 2 -extfile san.ext 2>/dev/null && "
      "openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj /CN=dev-tls "
      "2>/dev/null && openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial "
      "-out client.pem -days 2 2>/dev/null";
  auto r = RunCommand(cmd);
  ASSERT_EQ(r.exit_code, 0) << r.err;
}

TEST(CollmAggregatorTest, MutualTlsRefusesPlaintextAndCertlessCallsAndBindsDeviceIdToCn) {
  const std::string dir = MakeTempDir("aggregator-tls");
  MakeCerts(dir);
  const std::string tls = "tls:\n  cert: " + dir + "/server.pem\n  key: " + dir +
                          "/server.key\n  client_ca: " + dir +
                          "/ca.pem\n  require_client_cert: true\n";
  COLLM_START_SERVER(agg, "src/collm-aggregator", WriteConfig(dir, tls), dir, "aggregator");
  const auto deadline = [] { return std::chrono::system_clock::now() + std::chrono::seconds(5); };

  // Plaintext to a TLS port: the handshake never completes.
  {
    Device plain("dev-tls", grpc::CreateChannel(agg.address(), grpc::InsecureChannelCredentials()));
    grpc::Status s = plain.Register();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  }
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = ReadFileOrDie(dir + "/ca.pem");
  // TLS without a client certificate: refused by the mutual-TLS handshake.
  {
    Device certless("dev-tls", grpc::CreateChannel(agg.address(), grpc::SslCredentials(ssl)));
    grpc::Status s = certless.Register();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  }
  ssl.pem_cert_chain = ReadFileOrDie(dir + "/client.pem");
  ssl.pem_private_key = ReadFileOrDie(dir + "/client.key");
  auto channel = grpc::CreateChannel(agg.address(), grpc::SslCredentials(ssl));
  Device ok("dev-tls", channel);
  grpc::Status s = ok.Register();
  EXPECT_TRUE(s.ok()) << s.error_message() << "\n" << agg.log();
  Device impostor("dev-1", channel);
  s = impostor.Register();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_NE(s.error_message().find("CN 'dev-tls'"), std::string::npos) << s.error_message();
  (void)deadline;

  // collmctl over mutual TLS with the token.
  auto r = RunCommand(
      std::string("COLLM_ADMIN_TOKEN=") + kToken + " " + BinaryPath("src/collmctl") +
      " fed -a localhost:" + std::to_string(agg.grpc_port()) + " --tls-ca " + dir +
      "/ca.pem --tls-cert " + dir + "/client.pem --tls-key " + dir + "/client.key status --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out)["devices_total"], "1");
}

TEST(CollmAggregatorTest, BadConfigIsNamed) {
  const std::string dir = MakeTempDir("aggregator-badcfg");
  WriteFileOrDie(dir + "/a.yaml", "state_dir: " + dir + "/s\nmodel_config: " +
                                      collm::testing::TinyModelDir() + "\npolicy:\n  lrr: 1\n");
  auto r = RunCommand(BinaryPath("src/collm-aggregator") + " --config " + dir + "/a.yaml");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("policy.lrr: unknown key"), std::string::npos) << r.err;
  WriteFileOrDie(dir + "/b.yaml", "state_dir: " + dir + "/s\nmodel_config: " +
                                      collm::testing::TinyModelDir() + "\npolicy:\n  lr: -2\n");
  r = RunCommand(BinaryPath("src/collm-aggregator") + " --config " + dir + "/b.yaml");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("policy.lr must be > 0, got -2"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace collm
