// collmd as operators run it: a real process with a YAML config on loopback ports, real gRPC
// clients (C++ and Python), a real HTTP scrape, SIGTERM drain and restart-resume.
#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <httplib.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <thread>

#include "collm/federation/fingerprint.h"
#include "collm/lora/lora_adapter.h"
#include "collm/runtime/generator.h"
#include "collm/runtime/llama_model.h"
#include "collm/v1/inference.grpc.pb.h"
#include "gtest/gtest.h"
#include "testing/scripted_aggregator.h"
#include "testing/subprocess.h"
#include "testing/test_env.h"
#include "testing/tiny_model.h"

namespace collm {
namespace {

using collm::testing::BinaryPath;
using collm::testing::MakeTempDir;
using collm::testing::ReadFileOrDie;
using collm::testing::WriteFileOrDie;

std::string WriteConfig(const std::string& dir, bool training = true) {
  std::string data;
  for (int i = 0; i < 40; ++i) {
    data += "{\"prompt\": \"Tell me rule " + std::to_string(i) +
            "\", \"completion\": \"the cat sat on the mat\"}\n";
  }
  WriteFileOrDie(dir + "/train.jsonl", data);
  const std::string yaml = "model: " + collm::testing::TinyModelDir() + R"(
server:
  address: 127.0.0.1:0
metrics:
  address: 127.0.0.1:0
engine:
  training_share: 0.5
training:
  enabled: )" + std::string(training ? "true" : "false") +
                           R"(
  data: [train.jsonl]
  trainer:
    lr: 0.01
    micro_batch_size: 4
  lora:
    rank: 4
  publish:
    every_steps: 5
  checkpoint_dir: shadow
logging:
  level: info
shutdown_grace_seconds: 20
)";
  WriteFileOrDie(dir + "/collmd.yaml", yaml);
  return dir + "/collmd.yaml";
}

struct Streamed {
  grpc::Status status;
  std::string text;
  v1::GenerateResponse last;
  int messages = 0;
};

Streamed Generate(const std::string& address, const std::string& prompt, int max_tokens) {
  auto stub = v1::InferenceService::NewStub(
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  v1::GenerateRequest req;
  req.set_prompt(prompt);
  req.mutable_sampling()->set_temperature(0);
  req.mutable_sampling()->set_max_tokens(max_tokens);
  req.mutable_sampling()->set_ignore_eos(true);
  auto reader = stub->Generate(&ctx, req);
  Streamed out;
  v1::GenerateResponse msg;
  while (reader->Read(&msg)) {
    out.text += msg.text();
    out.last = msg;
    ++out.messages;
  }
  out.status = reader->Finish();
  return out;
}

TEST(CollmdTest, ServesTrainsDrainsOnSigtermAndResumesAfterRestart) {
  const std::string dir = MakeTempDir("collmd");
  const std::string config = WriteConfig(dir);
  int64_t steps_before = 0;
  {
    COLLM_START_SERVER(d, "src/collmd", config, dir, "collmd");
    Streamed first = Generate(d.address(), "Once upon a time", 12);
    ASSERT_TRUE(first.status.ok()) << first.status.error_message() << "\n" << d.log();
    EXPECT_EQ(first.last.usage().completion_tokens(), 12);
    EXPECT_EQ(first.last.adapter(), "live");

    // Training makes progress while serving.
    auto stub = v1::InferenceService::NewStub(
        grpc::CreateChannel(d.address(), grpc::InsecureChannelCredentials()));
    v1::GetStatsResponse stats;
    for (int i = 0; i < 200; ++i) {
      grpc::ClientContext ctx;
      ASSERT_TRUE(stub->GetStats(&ctx, v1::GetStatsRequest(), &stats).ok());
      if (stats.train_optimizer_steps() >= 10 && stats.published_versions() >= 2) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    EXPECT_GE(stats.train_optimizer_steps(), 10);
    EXPECT_GE(stats.published_versions(), 2);

    // The Prometheus endpoint, over real HTTP.
    httplib::Client http("127.0.0.1", d.metrics_port());
    auto res = http.Get("/metrics");
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 200);
    for (const char* m :
         {"collm_ttft_seconds_bucket", "collm_tpot_seconds_count", "collm_queue_depth",
          "collm_train_steps_total", "collm_kv_cache_blocks_used", "collm_live_adapter_version",
          "collm_slo_attainment"}) {
      EXPECT_NE(res->body.find(m), std::string::npos) << m;
    }

    // SIGTERM while a long request streams: it is drained (completes), then the daemon exits 0
    // and checkpoints the shadow adapter.
    Streamed during;
    std::thread client([&] { during = Generate(d.address(), "A long story", 120); });
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    const int code = d.Stop();
    client.join();
    EXPECT_EQ(code, 0) << d.log();
    EXPECT_TRUE(during.status.ok()) << during.status.error_message();
    EXPECT_EQ(during.last.usage().completion_tokens(), 120);
    EXPECT_TRUE(std::filesystem::exists(dir + "/shadow/optimizer.safetensors")) << d.log();
    steps_before = stats.train_optimizer_steps();
  }
  {
    COLLM_START_SERVER(d, "src/collmd", config, dir, "collmd");
    EXPECT_NE(d.log().find("resumed the shadow adapter"), std::string::npos) << d.log();
    auto stub = v1::InferenceService::NewStub(
        grpc::CreateChannel(d.address(), grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    v1::GetStatsResponse stats;
    ASSERT_TRUE(stub->GetStats(&ctx, v1::GetStatsRequest(), &stats).ok());
    EXPECT_EQ(d.Stop(), 0);
  }
  // The resumed shadow continued from the checkpointed step (never back at 0).
  std::map<std::string, std::string> meta;
  auto file = runtime::SafetensorsFile::Open(dir + "/shadow/optimizer.safetensors").value();
  EXPECT_GE(std::stoll(file->metadata().at("collm.step")), steps_before);
}

TEST(CollmdTest, PythonClientStreamsFromTheDaemon) {
  const std::string dir = MakeTempDir("collmd-py");
  const std::string stubs = dir + "/stubs";
  std::filesystem::create_directories(stubs);
  auto gen = collm::testing::RunCommand(
      "protoc --proto_path=" + std::string(COLLM_SOURCE_DIR) + "/proto --python_out=" + stubs +
      " --grpc_out=" + stubs +
      " --plugin=protoc-gen-grpc=/usr/bin/grpc_python_plugin collm/v1/inference.proto");
  ASSERT_EQ(gen.exit_code, 0) << gen.err;
  // Training off: every client must see the same (base) model.
  COLLM_START_SERVER(d, "src/collmd", WriteConfig(dir, false), dir, "collmd");
  auto py = collm::testing::RunCommand("/usr/bin/python3 " + std::string(COLLM_SOURCE_DIR) +
                                       "/tests/reference/python_client.py " + stubs + " " +
                                       d.address() + " 'Once upon a time' 9");
  ASSERT_EQ(py.exit_code, 0) << py.err;
  auto j = nlohmann::json::parse(py.out);
  EXPECT_EQ(j["completion_tokens"], 9);
  EXPECT_EQ(j["finish_reason"], "FINISH_REASON_LENGTH");
  // Same text as the C++ client gets for the same request.
  Streamed cpp = Generate(d.address(), "Once upon a time", 9);
  EXPECT_EQ(j["text"].get<std::string>(), cpp.text);
  // And collmctl generate --daemon streams the same text.
  auto ctl =
      collm::testing::RunCommand(BinaryPath("src/collmctl") + " generate --daemon " + d.address() +
                                 " --prompt 'Once upon a time' -n 9 -t 0 --ignore-eos");
  ASSERT_EQ(ctl.exit_code, 0) << ctl.err;
  EXPECT_EQ(ctl.out, cpp.text + "\n");
  EXPECT_NE(ctl.err.find("adapter ''"), std::string::npos) << ctl.err;
  auto bad = collm::testing::RunCommand(BinaryPath("src/collmctl") + " generate --daemon " +
                                        d.address() + " -p x --top-p 3");
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.err.find("top_p"), std::string::npos) << bad.err;
  EXPECT_EQ(d.Stop(), 0);
}

// A port that was free a moment ago (bind to 0, read it back, close).
int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  int port = -1;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  close(fd);
  return port;
}

TEST(CollmdTest, RealPrometheusScrapesTheMetricsEndpoint) {
  if (!std::filesystem::exists("/usr/bin/prometheus")) {
    FAIL() << "/usr/bin/prometheus is missing: scripts/setup.sh installs Debian's prometheus";
  }
  const std::string dir = MakeTempDir("collmd-prom");
  COLLM_START_SERVER(d, "src/collmd", WriteConfig(dir, false), dir, "collmd");
  ASSERT_GT(d.metrics_port(), 0) << d.log();
  ASSERT_TRUE(Generate(d.address(), "Once upon a time", 5).status.ok());
  const int prom_port = FreePort();
  WriteFileOrDie(dir + "/prometheus.yml",
                 "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: collmd\n"
                 "    static_configs:\n      - targets: ['127.0.0.1:" +
                     std::to_string(d.metrics_port()) + "']\n");
  collm::testing::ChildProcess::Options prometheus;
  prometheus.argv = {"/usr/bin/prometheus", "--config.file=" + dir + "/prometheus.yml",
                     "--storage.tsdb.path=" + dir + "/tsdb",
                     "--web.listen-address=127.0.0.1:" + std::to_string(prom_port)};
  prometheus.log_path = dir + "/prometheus.log";
  prometheus.print_log_tail_if = collm::testing::CurrentTestFailed;
  auto prom_process = collm::testing::ChildProcess::Start(std::move(prometheus));
  ASSERT_TRUE(prom_process.ok()) << prom_process.status();
  httplib::Client prom("127.0.0.1", prom_port);
  prom.set_connection_timeout(1);
  prom.set_read_timeout(5);
  double requests = -1;
  for (int i = 0; i < 300 && requests < 1 && (*prom_process)->Running(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    auto res = prom.Get("/api/v1/query?query=collm_requests_total%7Boutcome%3D%22ok%22%7D");
    if (!res || res->status != 200) continue;
    auto j = nlohmann::json::parse(res->body, nullptr, false);
    if (j.is_discarded() || j["data"]["result"].empty()) continue;
    requests = std::stod(j["data"]["result"][0]["value"][1].get<std::string>());
  }
  auto up = prom.Get("/api/v1/query?query=up%7Bjob%3D%22collmd%22%7D");
  (*prom_process)->Stop();
  EXPECT_GE(requests, 1) << "Prometheus never scraped collm_requests_total:\n"
                         << (*prom_process)->LogTail();
  ASSERT_TRUE(up);
  EXPECT_NE(up->body.find("\"1\"]"), std::string::npos) << up->body;
  EXPECT_EQ(d.Stop(), 0);
}

// collmd with a federation: section, against a scripted FederationService on loopback: it joins,
// trains the round's budget from the global version it fetched, uploads, installs the next global
// version into its live adapter through the quality gate, and serves throughout.
TEST(CollmdTest, JoinsAFederatedRoundWhileServing) {
  const std::string dir = MakeTempDir("collmd-fl");
  std::string data;
  for (int i = 0; i < 40; ++i) {
    data += "{\"prompt\": \"Tell me rule " + std::to_string(i) +
            "\", \"completion\": \"the cat sat on the mat\"}\n";
  }
  WriteFileOrDie(dir + "/train.jsonl", data);
  auto model =
      runtime::LlamaModel::Load(collm::testing::TinyModelDir(), runtime::RuntimeOptions{}).value();
  lora::LoraConfig lc;
  lc.rank = 4;
  const std::string v1_dir = dir + "/v1";
  ASSERT_TRUE(
      lora::WritePeftAdapter(v1_dir, lora::LoraAdapter::Create(model->config(), lc, 9).value())
          .ok());

  collm::testing::ScriptedAggregator agg;
  agg.globals[1] = {ReadFileOrDie(v1_dir + "/adapter_config.json"),
                    ReadFileOrDie(v1_dir + "/adapter_model.safetensors")};
  v1::RoundTask task;
  task.set_round(1);
  task.set_global_version(1);
  task.set_local_steps(4);
  task.set_lr(0.01);
  task.set_training_share(1.0);
  task.set_deadline_unix_ms(collm::testing::UnixMillis() + 600'000);
  agg.task = task;
  collm::testing::Server server(&agg, 0);
  ASSERT_TRUE(server.ok());

  const std::string yaml = "model: " + collm::testing::TinyModelDir() + R"(
server: {address: 127.0.0.1:0}
metrics: {address: 127.0.0.1:0}
engine: {training_share: 0}
training:
  enabled: true
  data: [train.jsonl]
  dataset: {held_out_fraction: 0.2}
  trainer: {lr: 0.01, micro_batch_size: 4}
  lora: {rank: 4}
  publish: {every_steps: 0, quality_gate: true}
federation:
  enabled: true
  aggregator: 127.0.0.1:)" +
                           std::to_string(server.port()) + R"(
  device_id: dev-a
  heartbeat_seconds: 0.1
  backoff: {initial_seconds: 0.05, max_seconds: 0.5}
  upload_chunk_bytes: 2KiB
  install_global: shadow_and_live
logging: {level: info}
)";
  WriteFileOrDie(dir + "/collmd.yaml", yaml);
  COLLM_START_SERVER(d, "src/collmd", dir + "/collmd.yaml", dir, "collmd");

  // Serving while the round trains.
  Streamed during = Generate(d.address(), "Once upon a time", 8);
  ASSERT_TRUE(during.status.ok()) << during.status.error_message() << "\n" << d.log();
  EXPECT_EQ(during.last.usage().completion_tokens(), 8);

  auto uploaded = [&] {
    std::lock_guard<std::mutex> lock(agg.mu);
    return !agg.uploads.empty();
  };
  for (int i = 0; i < 1200 && !uploaded(); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ASSERT_TRUE(uploaded()) << d.log();
  collm::testing::Upload u;
  {
    std::lock_guard<std::mutex> lock(agg.mu);
    u = agg.uploads[0];
    EXPECT_EQ(agg.registered.at(0).model_fingerprint(),
              federation::ModelFingerprint(
                  runtime::ModelConfig::FromFile(collm::testing::TinyModelDir() + "/config.json")
                      .value()));
    EXPECT_GT(agg.registered.at(0).local_samples(), 0);
    EXPECT_LT(agg.registered.at(0).local_samples(), 40) << "some of the 40 are held out";
    agg.globals[2] = {u.header.adapter().config_json(), u.data};  // As if aggregated.
  }
  EXPECT_EQ(u.header.device_id(), "dev-a");
  EXPECT_EQ(u.header.base_version(), 1);
  EXPECT_EQ(u.header.num_samples(), 4 * 4);
  EXPECT_GT(u.chunks, 1) << "2 KiB chunks";

  // v2 goes live after the gate; the Prometheus endpoint says so.
  httplib::Client http("127.0.0.1", d.metrics_port());
  std::string body;
  for (int i = 0; i < 1200; ++i) {
    auto res = http.Get("/metrics");
    if (res && res->body.find("collm_fl_live_global_version 2") != std::string::npos) {
      body = res->body;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_FALSE(body.empty()) << d.log();
  EXPECT_NE(body.find("collm_fl_uploads_total{outcome=\"accepted\"} 1"), std::string::npos) << body;
  Streamed after = Generate(d.address(), "Once upon a time", 4);
  ASSERT_TRUE(after.status.ok()) << after.status.error_message();
  EXPECT_EQ(after.last.adapter(), "live");
  EXPECT_EQ(d.Stop(), 0) << d.log();
  EXPECT_NE(d.log().find("global v2 is live"), std::string::npos) << d.log();
}

TEST(CollmdTest, BadConfigIsAnErrorNamingTheKey) {
  const std::string dir = MakeTempDir("collmd-bad");
  WriteFileOrDie(dir + "/bad.yaml", "model: /nonexistent\nengine:\n  max_runing: 3\n");
  auto r = collm::testing::RunCommand(BinaryPath("src/collmd") + " --config " + dir + "/bad.yaml");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("engine.max_runing"), std::string::npos) << r.err;
  WriteFileOrDie(
      dir + "/nomodel.yaml",
      "model: /nonexistent/model\nserver:\n  address: 127.0.0.1:0\nmetrics:\n  enabled: false\n");
  auto m =
      collm::testing::RunCommand(BinaryPath("src/collmd") + " --config " + dir + "/nomodel.yaml");
  EXPECT_NE(m.exit_code, 0);
  EXPECT_NE(m.err.find("/nonexistent/model"), std::string::npos) << m.err;
}

}  // namespace
}  // namespace collm
