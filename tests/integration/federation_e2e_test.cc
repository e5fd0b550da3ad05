// Federation end to end, as operators run it: a real collm-aggregator process and three real collmd
// processes serving stories260K on loopback, each fine-tuning on its own shard of GSM8K. Raw data
// stays with each daemon; only adapters travel. The global held-out loss is computed here,
// independently of anything the processes report, on examples no daemon trains on.
// Needs $COLLM_MODELS_DIR and $COLLM_DATA_DIR (skips when unset, fails when set but missing).
#include <grpcpp/grpcpp.h>
#include <httplib.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

#include "absl/strings/str_replace.h"
#include "collm/engine/dataset.h"
#include "collm/engine/peft_trainer.h"
#include "collm/lora/peft_io.h"
#include "collm/runtime/llama_model.h"
#include "collm/runtime/tokenizer.h"
#include "collm/v1/federation.grpc.pb.h"
#include "collm/v1/inference.grpc.pb.h"
#include "gtest/gtest.h"
#include "testing/federation_cluster.h"
#include "testing/subprocess.h"
#include "testing/tcp_proxy.h"
#include "testing/test_env.h"

namespace collm {
namespace {

using collm::testing::BinaryPath;
using collm::testing::FederationCluster;
using collm::testing::MakeTempDir;
using collm::testing::ReadFileOrDie;
using collm::testing::RunCommand;
using collm::testing::ServerProcess;
using collm::testing::WriteFileOrDie;

std::vector<std::string> ReadLines(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) {
    if (!line.empty()) lines.push_back(line);
  }
  return lines;
}

void WriteLines(const std::string& path, const std::vector<std::string>& lines, size_t begin,
                size_t end) {
  std::string out;
  for (size_t i = begin; i < end && i < lines.size(); ++i) out += lines[i] + "\n";
  WriteFileOrDie(path, out);
}

struct Shards {
  std::string dir, model_dir, held_out_file;
  std::vector<std::string> shards;  // One per device, disjoint.
};

// Three disjoint 150-example shards of GSM8K for the devices and a disjoint 64-example held-out
// file that no device sees, so the global loss measured here is honest.
Shards MakeShards(const std::string& model_dir, const std::string& data,
                  const std::string& prefix) {
  Shards s;
  s.dir = MakeTempDir(prefix);
  s.model_dir = model_dir;
  const std::vector<std::string> lines = ReadLines(data);
  EXPECT_GE(lines.size(), 1064u) << data;
  for (int i = 0; i < 3; ++i) {
    s.shards.push_back(s.dir + "/shard" + std::to_string(i) + ".jsonl");
    WriteLines(s.shards.back(), lines, 150 * i, 150 * (i + 1));
  }
  s.held_out_file = s.dir + "/held_out.jsonl";
  WriteLines(s.held_out_file, lines, 1000, 1064);
  return s;
}

// `extra`: more top-level YAML (coordination:, metrics_address:, ...).
// `address`: where it listens; a restarted aggregator takes its predecessor's port.
std::string WriteAggregatorConfig(const Shards& s, const std::string& policy,
                                  const std::string& extra = "",
                                  const std::string& address = "127.0.0.1:0") {
  const std::string yaml = extra + "server:\n  address: " + address +
                           "\n"
                           "state_dir: " +
                           s.dir + "/agg-state\n" + "model_config: " + s.model_dir +
                           "/config.json\n" + R"(
lora:
  rank: 8
  alpha: 16
  dropout: 0
  targets: [q_proj, v_proj]
seed: 7
heartbeat_interval_ms: 300
offline_after_missed: 10
tick_ms: 50
auto_start: true
logging: {level: info}
policy:
)" + policy;
  WriteFileOrDie(s.dir + "/aggregator.yaml", yaml);
  return s.dir + "/aggregator.yaml";
}

std::string WriteDaemonConfig(const Shards& s, int i, int aggregator_port) {
  const std::string id = "edge-" + std::to_string(i);
  const std::string yaml = "model: " + s.model_dir + R"(
server: {address: 127.0.0.1:0}
metrics: {address: 127.0.0.1:0}
engine: {training_share: 0}
training:
  enabled: true
  data: [)" + s.shards[i] + R"(]
  dataset:
    prompt_field: question
    completion_field: answer
    prompt_template: "Question: {prompt}\nAnswer: "
    max_length: 192
    held_out_fraction: 0.1
    seed: )" + std::to_string(i) +
                           R"(
  lora: {rank: 8, alpha: 16, dropout: 0, targets: [q_proj, v_proj]}
  adapter_name: live
  trainer: {lr: 0.01, micro_batch_size: 4, seed: )" +
                           std::to_string(100 + i) + R"(}
  publish: {every_steps: 0, quality_gate: true, min_improvement: 0.0}
federation:
  enabled: true
  aggregator: 127.0.0.1:)" +
                           std::to_string(aggregator_port) + R"(
  device_id: )" + id + R"(
  heartbeat_seconds: 0.3
  backoff: {initial_seconds: 0.1, max_seconds: 1}
  upload_chunk_bytes: 16KiB
  install_global: shadow_and_live
logging: {level: info}
)";
  const std::string path = s.dir + "/" + id + ".yaml";
  WriteFileOrDie(path, yaml);
  return path;
}

FederationCluster::DaemonConfigWriter DaemonConfigs(const Shards& s) {
  return [&s](int i, int aggregator_port) { return WriteDaemonConfig(s, i, aggregator_port); };
}

// The admin API, polled in-process (a collmctl process per poll would be slow on busy cores).
class Admin {
 public:
  explicit Admin(const std::string& address)
      : stub_(v1::FederationAdminService::NewStub(
            grpc::CreateChannel(address, grpc::InsecureChannelCredentials()))) {}
  v1::FederationStatus Status() {
    grpc::ClientContext ctx;
    v1::FederationStatus out;
    grpc::Status st = stub_->GetStatus(&ctx, v1::GetStatusRequest(), &out);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return out;
  }
  // Round `n`, or a RoundInfo with round 0 when it does not exist yet.
  v1::RoundInfo Round(int64_t n) {
    grpc::ClientContext ctx;
    v1::GetRoundRequest req;
    req.set_round(n);
    v1::RoundInfo out;
    if (!stub_->GetRound(&ctx, req, &out).ok()) return v1::RoundInfo();
    return out;
  }

 private:
  std::unique_ptr<v1::FederationAdminService::Stub> stub_;
};

// Polls `done` every 50 ms for up to `seconds`; true once it holds.
bool WaitFor(const std::function<bool()>& done, int seconds) {
  for (int i = 0; i < seconds * 20; ++i) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return done();
}

grpc::Status Generate(const std::string& address, int max_tokens) {
  auto stub = v1::InferenceService::NewStub(
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  v1::GenerateRequest req;
  req.set_prompt("Once upon a time");
  req.mutable_sampling()->set_temperature(0);
  req.mutable_sampling()->set_max_tokens(max_tokens);
  req.mutable_sampling()->set_ignore_eos(true);
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse msg;
  int tokens = 0;
  while (reader->Read(&msg)) tokens = static_cast<int>(msg.usage().completion_tokens());
  grpc::Status st = reader->Finish();
  if (st.ok() && tokens != max_tokens) {
    return grpc::Status(grpc::StatusCode::INTERNAL, "got " + std::to_string(tokens) + " of " +
                                                        std::to_string(max_tokens) + " tokens");
  }
  return st;
}

std::string Metrics(int port) {
  httplib::Client http("127.0.0.1", port);
  auto res = http.Get("/metrics");
  return res ? res->body : "";
}

std::string Ctl(const ServerProcess& agg, const std::string& args) {
  return BinaryPath("src/collmctl") + " fed -a " + agg.address() + " " + args;
}

TEST(FederationE2eTest, ThreeDaemonsCompleteThreeRoundsAndTheGlobalHeldOutLossFalls) {
  COLLM_REQUIRE_MODEL_FILE(model_dir, "stories260K-hf");
  COLLM_REQUIRE_DATA_FILE(data, "finetune/gsm8k/train.jsonl");
  const Shards s = MakeShards(model_dir, data, "fl-e2e-3rounds");
  auto started = FederationCluster::Start(s.dir, WriteAggregatorConfig(s, R"(  rounds: 3
  local_steps: 5
  lr: 0.01
  min_clients: 3
  quorum: 0
  deadline_s: 120
  strategy: fedavg
  training_share: 0.5
)"),
                                          3, DaemonConfigs(s));
  ASSERT_TRUE(started.ok()) << started.status();
  FederationCluster& fed = **started;
  ServerProcess& agg = fed.aggregator();
  Admin admin(agg.address());

  // Serving goes on while the federation runs: every daemon answers Generate between and
  // during rounds, until the aggregator has finished all three.
  std::vector<int> served(3, 0);
  auto finished = [&] { return admin.Status().state() == "finished"; };
  for (int iter = 0; iter < 600 && !finished(); ++iter) {
    for (int i = 0; i < 3; ++i) {
      grpc::Status st = Generate(fed.daemon(i).address(), 4);
      ASSERT_TRUE(st.ok()) << "edge-" << i << ": " << st.error_message() << "\n" << fed.Logs();
      ++served[i];
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_TRUE(finished()) << fed.Logs();
  for (int i = 0; i < 3; ++i) EXPECT_GE(served[i], 1) << "edge-" << i;

  // The round log, as collmctl prints it for scripts.
  auto r = RunCommand(Ctl(agg, "rounds --json"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto rounds = nlohmann::json::parse(r.out)["rounds"];
  ASSERT_EQ(rounds.size(), 3u) << r.out;
  for (const auto& round : rounds) {
    const int64_t n = std::stoll(round["round"].get<std::string>());
    EXPECT_EQ(round["state"], "done") << round.dump();
    EXPECT_EQ(round["base_version"], std::to_string(n)) << round.dump();
    EXPECT_EQ(round["result_version"], std::to_string(n + 1)) << round.dump();
    EXPECT_EQ(round["participants"].size(), 3u) << round.dump();
    ASSERT_EQ(round["updates"].size(), 3u) << round.dump();
    std::set<std::string> from;
    for (const auto& u : round["updates"]) {
      from.insert(u["device_id"].get<std::string>());
      // local_steps x micro_batch samples, reported by the device.
      EXPECT_EQ(u["num_samples"], "20") << u.dump();
      EXPECT_GT(u["delta_norm"].get<double>(), 0) << u.dump();
    }
    EXPECT_EQ(from, (std::set<std::string>{"edge-0", "edge-1", "edge-2"}));
    EXPECT_NE(round["note"].get<std::string>().find("quorum: 3 of 3"), std::string::npos)
        << round.dump();
  }
  r = RunCommand(Ctl(agg, "status --json"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto status = nlohmann::json::parse(r.out);
  EXPECT_EQ(status["global_version"], "4");
  EXPECT_EQ(status["rounds_completed"], "3");
  EXPECT_EQ(status["updates_accepted"], "9");
  EXPECT_EQ(status["updates_rejected"], "0");

  // Every daemon installs the final global version (heartbeats announce it).
  for (int i = 0; i < 3; ++i) {
    std::string body;
    EXPECT_TRUE(WaitFor(
        [&] {
          body = Metrics(fed.daemon(i).metrics_port());
          return body.find("collm_fl_global_version 4") != std::string::npos;
        },
        60))
        << "edge-" << i << "\n"
        << body << "\n"
        << fed.daemon(i).log();
    EXPECT_NE(body.find("collm_fl_uploads_total{outcome=\"accepted\"} 3"), std::string::npos)
        << body;
  }
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(Generate(fed.daemon(i).address(), 4).ok())
        << "edge-" << i << " after the last round";
  }

  // The global held-out loss, computed here on examples no device has: v1 (the fresh adapter,
  // B = 0, i.e. the base model) against v4.
  auto model = runtime::LlamaModel::Load(model_dir, runtime::RuntimeOptions{}).value();
  auto tok = runtime::Tokenizer::Load(model_dir + "/tokenizer.model").value();
  engine::DatasetOptions d;
  d.format.prompt_field = "question";
  d.format.completion_field = "answer";
  d.format.prompt_template = "Question: {prompt}\nAnswer: ";
  d.max_length = 192;
  d.held_out_fraction = 0;
  auto held_out = engine::Dataset::Load(s.held_out_file, *tok, d, nullptr);
  ASSERT_TRUE(held_out.ok()) << held_out.status();
  // A few long problems leave no answer token within 192 tokens and are dropped.
  ASSERT_GE(held_out->train().size(), 40u);
  double loss[2] = {0, 0};
  const int64_t versions[2] = {1, 4};
  for (int k = 0; k < 2; ++k) {
    const std::string out = s.dir + "/pulled-v" + std::to_string(versions[k]);
    r = RunCommand(Ctl(agg, "adapter pull " + std::to_string(versions[k]) + " --out " + out));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto adapter = lora::ReadPeftAdapter(out, model->config());
    ASSERT_TRUE(adapter.ok()) << adapter.status();
    auto weights = adapter->ToWeights(model->config(), model->runtime());
    ASSERT_TRUE(weights.ok()) << weights.status();
    auto l = engine::EvaluateLoss(*model, &*weights, held_out->train());
    ASSERT_TRUE(l.ok()) << l.status();
    loss[k] = *l;
  }
  // Three rounds of 3 x 5 steps at lr 1e-2 move stories260K clearly towards GSM8K (it has never
  // seen math word problems: about 6.7 -> 4.1 nats here); 0.5 is far above run-to-run noise.
  EXPECT_LT(loss[1], loss[0] - 0.5)
      << "global held-out loss v1 " << loss[0] << " -> v4 " << loss[1];
  std::cout << "global held-out loss v1 " << loss[0] << " -> v4 " << loss[1] << std::endl;
}

TEST(FederationE2eTest, ADaemonKilledMidRoundLeavesTheRoundToTheDeadlineQuorum) {
  COLLM_REQUIRE_MODEL_FILE(model_dir, "stories260K-hf");
  COLLM_REQUIRE_DATA_FILE(data, "finetune/gsm8k/train.jsonl");
  const Shards s = MakeShards(model_dir, data, "fl-e2e-kill");
  // quorum 0 = all participants, so the round cannot close early once a participant is gone:
  // only the deadline rule (>= max(1, ceil(3 / 2)) = 2 accepted updates) completes it. The
  // deadline is generous: under a loaded CI machine 10 local steps took up to ~15 s.
  auto started = FederationCluster::Start(s.dir, WriteAggregatorConfig(s, R"(  rounds: 1
  local_steps: 6
  lr: 0.01
  min_clients: 3
  quorum: 0
  deadline_s: 60
  strategy: fedavg
  training_share: 0.5
)"),
                                          3, DaemonConfigs(s));
  ASSERT_TRUE(started.ok()) << started.status();
  FederationCluster& fed = **started;
  ServerProcess& agg = fed.aggregator();
  Admin admin(agg.address());

  // Kill edge-2 the moment round 1 opens: it has at most just received its task, and 6 local
  // steps plus the adapter fetch lie between that and an upload.
  ASSERT_TRUE(WaitFor([&] { return admin.Round(1).round() == 1; }, 90)) << fed.Logs();
  fed.daemon(2).Kill();
  const v1::RoundInfo opened = admin.Round(1);
  EXPECT_EQ(opened.state(), "collecting");
  EXPECT_EQ(opened.participants_size(), 3);
  ASSERT_EQ(opened.updates_size(), 0) << "edge-2 was killed before anyone could upload";

  // The survivors keep serving while the round waits for its deadline.
  for (int i = 0; i < 2; ++i) {
    grpc::Status st = Generate(fed.daemon(i).address(), 4);
    EXPECT_TRUE(st.ok()) << "edge-" << i << ": " << st.error_message();
  }
  ASSERT_TRUE(WaitFor(
      [&] {
        const std::string st = admin.Round(1).state();
        return st == "done" || st == "failed";
      },
      150))
      << fed.Logs();

  auto r = RunCommand(Ctl(agg, "round show 1 --json"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto round = nlohmann::json::parse(r.out);
  EXPECT_EQ(round["state"], "done") << round.dump() << "\n" << fed.Logs();
  EXPECT_EQ(round["participants"].size(), 3u) << round.dump();
  std::set<std::string> from;
  for (const auto& u : round["updates"]) from.insert(u["device_id"].get<std::string>());
  EXPECT_EQ(from, (std::set<std::string>{"edge-0", "edge-1"})) << round.dump();
  EXPECT_NE(round["note"].get<std::string>().find("deadline: 2 of 3 updates (deadline quorum 2)"),
            std::string::npos)
      << round.dump();
  EXPECT_EQ(round["result_version"], "2") << round.dump();

  r = RunCommand(Ctl(agg, "status --json"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto status = nlohmann::json::parse(r.out);
  EXPECT_EQ(status["global_version"], "2");
  EXPECT_EQ(status["rounds_completed"], "1");
  EXPECT_EQ(status["state"], "finished");

  // The survivors install the aggregate of their two updates.
  for (int i = 0; i < 2; ++i) {
    std::string body;
    EXPECT_TRUE(WaitFor(
        [&] {
          body = Metrics(fed.daemon(i).metrics_port());
          return body.find("collm_fl_global_version 2") != std::string::npos;
        },
        60))
        << "edge-" << i << "\n"
        << body << "\n"
        << fed.daemon(i).log();
  }
}

// The crash a user met: the aggregator SIGKILLed right after the first of two updates was accepted
// and restarted at once. The second device trains through it; the round must close on quorum as if
// nothing had happened, each update counted exactly once, and per-device history must survive.
// `lose_sessions`: sessions.json is deleted before the restart (a state dir from before sessions
// were persisted), so the device must register again mid-task and still deliver its update.
void KillTheAggregatorAfterTheFirstUpdate(const std::string& model_dir, const std::string& data,
                                          bool lose_sessions) {
  const Shards s = MakeShards(model_dir, data, "fl-e2e-agg-kill");
  const std::string policy = R"(  rounds: 1
  local_steps: 12
  lr: 0.01
  min_clients: 2
  quorum: 0
  deadline_s: 150
  strategy: fedavg
  training_share: 0.5
)";
  // edge-1 trains 4x the rows per step, so edge-0's update lands well before edge-1's.
  auto configs = [&s](int i, int aggregator_port) {
    const std::string path = WriteDaemonConfig(s, i, aggregator_port);
    if (i == 1) {
      WriteFileOrDie(path, absl::StrReplaceAll(ReadFileOrDie(path),
                                               {{"micro_batch_size: 4", "micro_batch_size: 16"}}));
    }
    return path;
  };
  auto started = FederationCluster::Start(s.dir, WriteAggregatorConfig(s, policy), 2, configs);
  ASSERT_TRUE(started.ok()) << started.status();
  FederationCluster& fed = **started;
  const int port = fed.aggregator().grpc_port();
  {
    Admin admin(fed.aggregator().address());
    ASSERT_TRUE(WaitFor([&] { return admin.Round(1).updates_size() >= 1; }, 120)) << fed.Logs();
    ASSERT_EQ(admin.Round(1).updates_size(), 1) << "edge-1 finished too early for this test";
  }
  if (lose_sessions) {
    fed.aggregator().Kill();
    std::filesystem::remove(s.dir + "/agg-state/sessions.json");
  }
  ASSERT_TRUE(fed.RestartAggregator(
                     WriteAggregatorConfig(s, policy, "", "127.0.0.1:" + std::to_string(port)))
                  .ok())
      << fed.Logs();
  ServerProcess& agg = fed.aggregator();
  Admin admin(agg.address());
  ASSERT_TRUE(WaitFor(
      [&] {
        const std::string st = admin.Round(1).state();
        return st == "done" || st == "failed";
      },
      170))
      << fed.Logs();

  auto r = RunCommand(Ctl(agg, "round show 1 --json"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto round = nlohmann::json::parse(r.out);
  EXPECT_EQ(round["state"], "done") << round.dump() << "\n" << fed.Logs();
  std::multiset<std::string> from;
  for (const auto& u : round["updates"]) from.insert(u["device_id"].get<std::string>());
  EXPECT_EQ(from, (std::multiset<std::string>{"edge-0", "edge-1"})) << round.dump();
  EXPECT_EQ(round["note"].get<std::string>().find("deadline"), std::string::npos)
      << "closed on quorum, not at the deadline: " << round.dump();
  EXPECT_EQ(round.value("rejected", nlohmann::json::array()).size(), 0u) << round.dump();

  r = RunCommand(Ctl(agg, "status --json"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto status = nlohmann::json::parse(r.out);
  EXPECT_EQ(status["updates_accepted"], "2") << status.dump();
  EXPECT_EQ(status["rounds_completed"], "1") << status.dump();
  EXPECT_EQ(status["global_version"], "2") << status.dump();

  r = RunCommand(Ctl(agg, "devices --json"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto devices = nlohmann::json::parse(r.out);
  ASSERT_EQ(devices["devices"].size(), 2u) << devices.dump();
  for (const auto& d : devices["devices"])
    EXPECT_EQ(d["rounds_participated"], "1") << devices.dump();
  EXPECT_EQ(agg.log().find("unknown session"), std::string::npos) << agg.log();
  // With its session persisted the device never notices the restart beyond a few retries.
  const bool registered_again = fed.daemon(1).log().find("lost our session") != std::string::npos;
  EXPECT_EQ(registered_again, lose_sessions) << fed.daemon(1).log();
}

TEST(FederationE2eTest, AnAggregatorKilledAfterTheFirstUpdateResumesTheRoundOnQuorum) {
  COLLM_REQUIRE_MODEL_FILE(model_dir, "stories260K-hf");
  COLLM_REQUIRE_DATA_FILE(data, "finetune/gsm8k/train.jsonl");
  KillTheAggregatorAfterTheFirstUpdate(model_dir, data, /*lose_sessions=*/false);
}

TEST(FederationE2eTest, ADeviceWhoseSessionWasLostRegistersAgainAndStillDeliversItsUpdate) {
  COLLM_REQUIRE_MODEL_FILE(model_dir, "stories260K-hf");
  COLLM_REQUIRE_DATA_FILE(data, "finetune/gsm8k/train.jsonl");
  KillTheAggregatorAfterTheFirstUpdate(model_dir, data, /*lose_sessions=*/true);
}

// The shipped configs/collmd-federated.yaml, on loopback ports the kernel picks, as daemon
// `index` of a cluster.
std::string WriteShippedFederatedConfig(const std::string& dir, int index, int aggregator_port) {
  std::string yaml =
      ReadFileOrDie(std::string(COLLM_SOURCE_DIR) + "/configs/collmd-federated.yaml");
  auto replace = [&](const std::string& from, const std::string& to) {
    const size_t at = yaml.find(from);
    EXPECT_NE(at, std::string::npos) << from << " is no longer in collmd-federated.yaml";
    if (at != std::string::npos) yaml.replace(at, from.size(), to);
  };
  replace("\"${COLLM_AGGREGATOR:-127.0.0.1:50061}\"",
          "127.0.0.1:" + std::to_string(aggregator_port));
  replace("\"${COLLM_DEVICE_ID:-edge-1}\"", FederationCluster::DaemonName(index));
  replace("address: \"127.0.0.1:50051\"", "address: 127.0.0.1:0");
  replace("address: \"127.0.0.1:9400\"", "address: 127.0.0.1:0");
  const std::string path = dir + "/" + FederationCluster::DaemonName(index) + ".yaml";
  WriteFileOrDie(path, yaml);
  return path;
}

// The counter `name` (no labels) in a Prometheus text body; -1 when absent.
double Counter(const std::string& body, const std::string& name) {
  const size_t at = body.find("\n" + name + " ");
  if (at == std::string::npos) return -1;
  return std::stod(body.substr(at + name.size() + 2));
}

// Issue 11's report: with configs/collmd-federated.yaml ("no local training between rounds"), a
// device went on training its local data after the last round (collm_train_steps_total rising,
// train_time_share 0.99). In federated mode a device trains only inside the coordinator's
// budgets; the round log explains every decision, and the aggregator exports /metrics.
TEST(FederationE2eTest, AfterTheLastRoundTheShippedFederatedConfigTrainsNoMore) {
  COLLM_REQUIRE_MODEL_FILE(model_dir, "stories260K-hf");
  COLLM_REQUIRE_DATA_FILE(data, "finetune/gsm8k/train.jsonl");
  const Shards s = MakeShards(model_dir, data, "fl-e2e-budgets-only");
  auto started = FederationCluster::Start(
      s.dir,
      WriteAggregatorConfig(s, R"(  rounds: 2
  local_steps: 3
  lr: 0.003
  min_clients: 2
  quorum: 0
  deadline_s: 120
  training_share: 0.5
)",
                            "metrics_address: 127.0.0.1:0\n"),
      2, [&](int i, int port) { return WriteShippedFederatedConfig(s.dir, i, port); });
  ASSERT_TRUE(started.ok()) << started.status();
  FederationCluster& fed = **started;
  ServerProcess& agg = fed.aggregator();
  Admin admin(agg.address());
  ASSERT_TRUE(WaitFor([&] { return admin.Status().state() == "finished"; }, 240)) << fed.Logs();

  // Each device trained exactly its budgets, and then nothing more.
  std::vector<double> steps(2);
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(WaitFor(
        [&] {
          return Metrics(fed.daemon(i).metrics_port()).find("collm_fl_global_version 3") !=
                 std::string::npos;
        },
        60))
        << fed.daemon(i).log();
    steps[i] = Counter(Metrics(fed.daemon(i).metrics_port()), "collm_train_steps_total");
    EXPECT_EQ(steps[i], 6) << "edge-" << i << ": 2 rounds x 3 steps";
  }
  std::this_thread::sleep_for(std::chrono::seconds(4));  // > 10 heartbeats of 300 ms.
  for (int i = 0; i < 2; ++i) {
    const std::string body = Metrics(fed.daemon(i).metrics_port());
    EXPECT_EQ(Counter(body, "collm_train_steps_total"), steps[i])
        << "edge-" << i << " kept training after the last round\n"
        << body;
    EXPECT_EQ(Counter(body, "collm_train_micro_steps_total"),
              Counter(Metrics(fed.daemon(i).metrics_port()), "collm_train_micro_steps_total"));
  }

  // The second round was planned from the devices' load reports and says so, per device.
  auto r = RunCommand(Ctl(agg, "round show 2 --json"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto round = nlohmann::json::parse(r.out);
  EXPECT_EQ(round["coordination_policy"], "drift_plus_penalty") << round.dump();
  ASSERT_EQ(round["decisions"].size(), 2u) << round.dump();
  for (const auto& d : round["decisions"]) {
    EXPECT_TRUE(d["chosen"].get<bool>()) << d.dump();  // Both idle: both train.
    EXPECT_EQ(d["budget_steps"], "3") << d.dump();
    EXPECT_FALSE(d["reason"].get<std::string>().empty()) << d.dump();
  }
  r = RunCommand(Ctl(agg, "round show 2"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("coordination     drift_plus_penalty"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("SLO_QUEUE"), std::string::npos) << r.out;

  const std::string agg_metrics = Metrics(agg.metrics_port());
  EXPECT_NE(agg_metrics.find("collm_fed_rounds_total{outcome=\"done\"} 2"), std::string::npos)
      << agg_metrics;
  EXPECT_NE(agg_metrics.find("collm_fed_updates_total{outcome=\"accepted\",reason=\"none\"} 4"),
            std::string::npos)
      << agg_metrics;
  EXPECT_NE(agg_metrics.find("collm_fed_device_slo_queue{device=\"edge-0\"}"), std::string::npos);
  EXPECT_NE(agg_metrics.find("collm_fed_aggregation_seconds_count 2"), std::string::npos);
}

// The slow timescale reads real load: after a first round (everyone trains once, so every device
// has measured step costs), edge-0 is kept busy by client load sent straight to it while edge-1
// and edge-2 stay idle; the next round (2 of 3 devices) goes to the idle two, and its decisions,
// as `collmctl fed round show 2 --json` prints them, say why: edge-0's forecast utilization (its
// arrival rate over the serving capacity from its measured step costs) leaves it the smallest
// share ceiling. Choices are asserted, not timings, so a loaded machine changes nothing.
TEST(FederationE2eTest, SkewedLoadPutsTrainingOnTheLightlyLoadedDevices) {
  COLLM_REQUIRE_MODEL_FILE(model_dir, "stories260K-hf");
  COLLM_REQUIRE_DATA_FILE(data, "finetune/gsm8k/train.jsonl");
  const Shards s = MakeShards(model_dir, data, "fl-e2e-skewed");
  auto started = FederationCluster::Start(s.dir, WriteAggregatorConfig(s, R"(  rounds: 1
  local_steps: 2
  lr: 0.003
  min_clients: 3
  max_clients: 3
  quorum: 0
  deadline_s: 120
  training_share: 0.5
)"),
                                          3, DaemonConfigs(s));
  ASSERT_TRUE(started.ok()) << started.status();
  FederationCluster& fed = **started;
  ServerProcess& agg = fed.aggregator();
  Admin admin(agg.address());
  ASSERT_TRUE(WaitFor([&] { return admin.Status().state() == "finished"; }, 240)) << fed.Logs();

  // Skewed load: four clients back to back on edge-0 only.
  std::atomic<bool> stop{false};
  std::atomic<int> served{0}, failed{0};
  std::vector<std::thread> clients;
  for (int c = 0; c < 4; ++c) {
    clients.emplace_back([&] {
      while (!stop) {
        if (Generate(fed.daemon(0).address(), 32).ok()) {
          ++served;
        } else {
          ++failed;
        }
      }
    });
  }
  // Several heartbeats (300 ms) carry the load report, the 1 s arrival rate has built up.
  ASSERT_TRUE(WaitFor([&] { return served.load() >= 40; }, 120));
  std::this_thread::sleep_for(std::chrono::seconds(2));

  // A second round of 2 of the 3 devices, planned from those reports.
  {
    auto stub = v1::FederationAdminService::NewStub(
        grpc::CreateChannel(agg.address(), grpc::InsecureChannelCredentials()));
    v1::SetPolicyRequest req;
    req.mutable_policy()->set_rounds(2);
    req.mutable_policy()->set_min_clients(2);
    req.mutable_policy()->set_max_clients(2);
    grpc::ClientContext ctx;
    v1::FederationStatus out;
    ASSERT_TRUE(stub->SetPolicy(&ctx, req, &out).ok());
    grpc::ClientContext start_ctx;
    grpc::Status st = stub->Start(&start_ctx, v1::ControlRequest(), &out);
    ASSERT_TRUE(st.ok()) << st.error_message();
  }
  ASSERT_TRUE(WaitFor([&] { return admin.Status().rounds_completed() >= 2; }, 240)) << fed.Logs();
  stop = true;
  for (auto& t : clients) t.join();
  EXPECT_EQ(failed.load(), 0);

  auto r = RunCommand(Ctl(agg, "round show 2 --json"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto round = nlohmann::json::parse(r.out);
  EXPECT_EQ(round["coordination_policy"], "drift_plus_penalty") << round.dump();
  ASSERT_EQ(round["decisions"].size(), 3u) << round.dump();
  std::map<std::string, nlohmann::json> by_device;
  for (const auto& d : round["decisions"]) by_device[d["device_id"].get<std::string>()] = d;
  auto num = [](const nlohmann::json& d, const char* key) {
    return d.contains(key) ? d[key].get<double>() : 0.0;
  };
  const nlohmann::json& busy = by_device["edge-0"];
  EXPECT_FALSE(busy.value("chosen", false)) << "the loaded device was chosen:\n" << round.dump(2);
  EXPECT_GT(num(busy, "forecast_arrival_rate"), 1) << busy.dump();
  EXPECT_GT(num(busy, "forecast_utilization"), 0.05) << busy.dump();
  for (const char* idle : {"edge-1", "edge-2"}) {
    const nlohmann::json& d = by_device[idle];
    EXPECT_TRUE(d.value("chosen", false)) << idle << " was left out:\n" << round.dump(2);
    EXPECT_LT(num(d, "forecast_utilization"), num(busy, "forecast_utilization")) << d.dump();
    EXPECT_GT(num(d, "share_ceiling"), num(busy, "share_ceiling")) << d.dump();
  }
  EXPECT_FALSE(busy["reason"].get<std::string>().empty()) << busy.dump();
  std::cout << "round 2, edge-0: " << busy.dump() << std::endl;
}

// `collmctl fed ARGS --json` against `agg`, parsed (an empty object and a failure when it fails).
nlohmann::json FedJson(const ServerProcess& agg, const std::string& args) {
  auto r = RunCommand(Ctl(agg, args + " --json"));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.exit_code == 0 ? nlohmann::json::parse(r.out) : nlohmann::json::object();
}

// Who delivered the updates a round counts (a multiset: one device counted twice shows).
std::multiset<std::string> UpdateSenders(const nlohmann::json& round) {
  std::multiset<std::string> from;
  for (const auto& u : round.value("updates", nlohmann::json::array()))
    from.insert(u["device_id"].get<std::string>());
  return from;
}

// Waits up to `seconds` for round `n` to be done or failed; true once it is.
bool WaitForRoundClosed(Admin& admin, int64_t n, int seconds) {
  return WaitFor(
      [&] {
        const std::string state = admin.Round(n).state();
        return state == "done" || state == "failed";
      },
      seconds);
}

// Issue 14's flaky uplink: edge-1 reaches the aggregator only through a loopback TCP proxy the
// test controls. `proxy` is created by the config writer, once the aggregator's port is known,
// and must outlive the cluster (declare it first).
FederationCluster::DaemonConfigWriter ConfigsWithEdge1BehindAProxy(
    const Shards& s, std::unique_ptr<collm::testing::TcpProxy>& proxy) {
  return [&s, &proxy](int i, int aggregator_port) {
    if (i != 1) return WriteDaemonConfig(s, i, aggregator_port);
    auto started = collm::testing::TcpProxy::Start(aggregator_port);
    EXPECT_TRUE(started.ok()) << started.status();
    proxy = std::move(*started);
    return WriteDaemonConfig(s, i, proxy->port());
  };
}

// The link of a participant is cut right after the round opens and stays cut past the deadline:
// the device keeps serving, backs off, the round closes on the deadline quorum without it, and
// once the link returns the device rejoins and delivers its update in the next round.
TEST(FederationE2eTest, ADeviceWhoseLinkIsCutKeepsServingAndRejoinsTheNextRound) {
  COLLM_REQUIRE_MODEL_FILE(model_dir, "stories260K-hf");
  COLLM_REQUIRE_DATA_FILE(data, "finetune/gsm8k/train.jsonl");
  const Shards s = MakeShards(model_dir, data, "fl-e2e-link-cut");
  std::unique_ptr<collm::testing::TcpProxy> proxy;
  // min_clients 2: round 2 opens only once edge-1 is back online. The deadline quorum is
  // max(1, ceil(2 / 2)) = 1, so round 1 closes at its deadline on edge-0's update alone.
  auto started = FederationCluster::Start(s.dir, WriteAggregatorConfig(s, R"(  rounds: 2
  local_steps: 4
  lr: 0.01
  min_clients: 2
  quorum: 0
  deadline_s: 30
  strategy: fedavg
  training_share: 0.5
)"),
                                          2, ConfigsWithEdge1BehindAProxy(s, proxy));
  ASSERT_TRUE(started.ok()) << started.status();
  FederationCluster& fed = **started;
  ServerProcess& agg = fed.aggregator();
  Admin admin(agg.address());
  ASSERT_TRUE(WaitFor([&] { return admin.Round(1).round() == 1; }, 90)) << fed.Logs();
  proxy->Cut();
  ASSERT_EQ(admin.Round(1).participants_size(), 2);

  // Cut off, edge-1 still serves its users, and counts the failed calls it backs off from.
  grpc::Status st = Generate(fed.daemon(1).address(), 4);
  EXPECT_TRUE(st.ok()) << st.error_message();
  EXPECT_TRUE(WaitFor(
      [&] {
        return Counter(Metrics(fed.daemon(1).metrics_port()), "collm_fl_failures_total") >= 2;
      },
      30))
      << fed.daemon(1).log();
  ASSERT_TRUE(WaitForRoundClosed(admin, 1, 90)) << fed.Logs();
  st = Generate(fed.daemon(1).address(), 4);
  EXPECT_TRUE(st.ok()) << st.error_message();
  proxy->Restore();

  ASSERT_TRUE(WaitForRoundClosed(admin, 2, 120)) << fed.Logs();
  auto round = FedJson(agg, "round show 1");
  EXPECT_EQ(round["state"], "done") << round.dump();
  EXPECT_EQ(UpdateSenders(round), (std::multiset<std::string>{"edge-0"})) << round.dump();
  EXPECT_NE(round["note"].get<std::string>().find("deadline"), std::string::npos) << round.dump();
  round = FedJson(agg, "round show 2");
  EXPECT_EQ(round["state"], "done") << round.dump() << "\n" << fed.Logs();
  EXPECT_EQ(UpdateSenders(round), (std::multiset<std::string>{"edge-0", "edge-1"})) << round.dump();
  EXPECT_EQ(round["note"].get<std::string>().find("deadline"), std::string::npos)
      << "round 2 closes on quorum: " << round.dump();
  const auto status = FedJson(agg, "status");
  EXPECT_EQ(status["updates_accepted"], "3") << status.dump();
  EXPECT_EQ(status["rounds_completed"], "2") << status.dump();
  EXPECT_GE(proxy->connections_reset(), 1);
}

// A slow link that is also reset every 250 ms while the round collects: heartbeats, the task
// fetch and the chunked upload all break and are retried, and each update is still counted
// exactly once.
TEST(FederationE2eTest, ASlowLinkResetEvery250MsStillDeliversEachUpdateExactlyOnce) {
  COLLM_REQUIRE_MODEL_FILE(model_dir, "stories260K-hf");
  COLLM_REQUIRE_DATA_FILE(data, "finetune/gsm8k/train.jsonl");
  const Shards s = MakeShards(model_dir, data, "fl-e2e-link-reset");
  std::unique_ptr<collm::testing::TcpProxy> proxy;
  auto started = FederationCluster::Start(s.dir, WriteAggregatorConfig(s, R"(  rounds: 1
  local_steps: 6
  lr: 0.01
  min_clients: 2
  quorum: 0
  deadline_s: 150
  strategy: fedavg
  training_share: 0.5
)"),
                                          2, ConfigsWithEdge1BehindAProxy(s, proxy));
  ASSERT_TRUE(started.ok()) << started.status();
  FederationCluster& fed = **started;
  ServerProcess& agg = fed.aggregator();
  Admin admin(agg.address());
  ASSERT_TRUE(WaitFor([&] { return admin.Round(1).round() == 1; }, 90)) << fed.Logs();
  proxy->SetDelay(std::chrono::milliseconds(30));
  std::atomic<bool> closed{false};
  std::thread resets([&] {
    while (!closed) {
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
      proxy->ResetAll();
    }
  });
  closed = WaitForRoundClosed(admin, 1, 170);
  const bool round_closed = closed.exchange(true);
  resets.join();
  ASSERT_TRUE(round_closed) << fed.Logs();

  const auto round = FedJson(agg, "round show 1");
  EXPECT_EQ(round["state"], "done") << round.dump() << "\n" << fed.Logs();
  EXPECT_EQ(UpdateSenders(round), (std::multiset<std::string>{"edge-0", "edge-1"})) << round.dump();
  const auto status = FedJson(agg, "status");
  EXPECT_EQ(status["updates_accepted"], "2") << status.dump();
  EXPECT_EQ(status["global_version"], "2") << status.dump();
  EXPECT_GE(proxy->connections_reset(), 1);
  // The device learns its update landed, even when the answer to an upload was lost in a reset.
  EXPECT_TRUE(WaitFor(
      [&] {
        return Counter(Metrics(fed.daemon(1).metrics_port()), "collm_fl_global_version") == 2;
      },
      60))
      << fed.daemon(1).log();
  std::cerr << "proxy: " << proxy->connections_accepted() << " connections, "
            << proxy->connections_reset() << " reset; edge-1 failed calls "
            << Counter(Metrics(fed.daemon(1).metrics_port()), "collm_fl_failures_total") << "\n";
}

}  // namespace
}  // namespace collm
