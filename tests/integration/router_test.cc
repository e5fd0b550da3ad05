// collm-router as operators run it: real collmd replicas on stories260K ($COLLM_MODELS_DIR; skips
// when unset, fails when set but missing) and a real collm-router process in front of them, all on
// loopback; real gRPC clients (C++ and the Python reference client) and real /metrics scrapes.
#include <grpcpp/grpcpp.h>
#include <httplib.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "collm/v1/inference.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "testing/subprocess.h"
#include "testing/test_env.h"

namespace collm {
namespace {

using collm::testing::BinaryPath;
using collm::testing::MakeTempDir;
using collm::testing::ServerProcess;
using collm::testing::WriteFileOrDie;

// A collmd on the model in `model_dir`; with `training`, it fine-tunes the shadow adapter ("live",
// also its default adapter) on a toy data set at a high share, so it reports itself as training.
std::string WriteReplicaConfig(const std::string& dir, const std::string& name,
                               const std::string& model_dir, bool training) {
  std::string yaml = "model: " + model_dir + R"(
server:
  address: 127.0.0.1:0
metrics:
  address: 127.0.0.1:0
engine:
  training_share: 0.9
  share_controller: {enabled: true}
logging:
  level: info
shutdown_grace_seconds: 5
)";
  if (training) {
    std::string data;
    for (int i = 0; i < 64; ++i) {
      data += "{\"prompt\": \"Tell me story " + std::to_string(i) +
              "\", \"completion\": \"Once upon a time there was a little cat who liked to "
              "play in the sun all day long.\"}\n";
    }
    WriteFileOrDie(dir + "/" + name + "-train.jsonl", data);
    yaml += "training:\n  enabled: true\n  data: [" + name +
            "-train.jsonl]\n  trainer:\n    lr: 0.001\n    micro_batch_size: 8\n"
            "  lora:\n    rank: 4\n  publish:\n    every_steps: 1000000\n";
  }
  const std::string path = dir + "/" + name + ".yaml";
  WriteFileOrDie(path, yaml);
  return path;
}

std::string WriteRouterConfig(const std::string& dir, const std::vector<std::string>& replicas,
                              const std::string& policy, const std::string& extra = "") {
  std::string yaml = R"(server:
  address: 127.0.0.1:0
metrics:
  address: 127.0.0.1:0
policy: )" + policy + "\nreplicas:\n";
  for (const std::string& r : replicas) yaml += "  - " + r + "\n";
  yaml += extra;
  WriteFileOrDie(dir + "/router.yaml", yaml);
  return dir + "/router.yaml";
}

struct Streamed {
  grpc::Status status;
  std::string text;
  v1::GenerateResponse last;
  int messages = 0;
};

Streamed Generate(const std::string& address, const std::string& prompt, int max_tokens,
                  const std::string& adapter = "", int64_t min_version = 0) {
  auto stub = v1::InferenceService::NewStub(
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  v1::GenerateRequest req;
  req.set_prompt(prompt);
  req.set_adapter(adapter);
  req.set_min_adapter_version(min_version);
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

std::string Scrape(int port) {
  httplib::Client http("127.0.0.1", port);
  auto res = http.Get("/metrics");
  if (!res || res->status != 200) return "";
  return res->body;
}

// The value of `series` (name{labels} exactly as rendered) in a scrape; -1 when absent.
double MetricValue(const std::string& body, const std::string& series) {
  const size_t at = body.find("\n" + series + " ");
  if (at == std::string::npos) return -1;
  return std::atof(body.c_str() + at + series.size() + 2);
}

double Routed(int metrics_port, const std::string& replica) {
  return std::max(0.0, MetricValue(Scrape(metrics_port),
                                   "collm_router_routed_total{replica=\"" + replica + "\"}"));
}

grpc::health::v1::HealthCheckResponse::ServingStatus Health(const std::string& address) {
  auto stub = grpc::health::v1::Health::NewStub(
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::health::v1::HealthCheckRequest req;
  req.set_service("collm.v1.InferenceService");
  grpc::health::v1::HealthCheckResponse resp;
  EXPECT_TRUE(stub->Check(&ctx, req, &resp).ok());
  return resp.status();
}

v1::GetStatsResponse Stats(const std::string& address) {
  auto stub = v1::InferenceService::NewStub(
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::GetStatsResponse out;
  EXPECT_TRUE(stub->GetStats(&ctx, v1::GetStatsRequest(), &out).ok());
  return out;
}

TEST(RouterTest, RoutesStreamsSurvivesAKilledReplicaAndServesThePythonClient) {
  COLLM_REQUIRE_MODEL_FILE(model, "stories260K-hf");
  const std::string dir = MakeTempDir("router");
  std::vector<std::unique_ptr<ServerProcess>> replicas;
  std::vector<std::string> addresses;
  for (int i = 0; i < 3; ++i) {
    const std::string name = "replica" + std::to_string(i);
    auto r = collm::testing::StartServer("src/collmd", WriteReplicaConfig(dir, name, model, false),
                                         dir, name);
    ASSERT_TRUE(r.ok()) << r.status();
    addresses.push_back((*r)->address());
    replicas.push_back(std::move(*r));
  }
  // round_robin makes "one of the next three requests goes to the killed replica" certain; a
  // slow ejection (10 failed polls of 100 ms) leaves time to send them before it is ejected.
  COLLM_START_SERVER(router, "src/collm-router",
                     WriteRouterConfig(dir, addresses, "round_robin",
                                       "poll_interval_ms: 100\nejection:\n  failures_to_eject: "
                                       "10\n  base_backoff_ms: 60000\n  max_backoff_ms: 60000\n"),
                     dir, "router");

  EXPECT_EQ(Health(router.address()), grpc::health::v1::HealthCheckResponse::SERVING);
  // Streams come through token by token, with what the replica itself would answer.
  const Streamed direct = Generate(addresses[0], "Once upon a time", 12);
  ASSERT_TRUE(direct.status.ok()) << direct.status.error_message();
  for (int i = 0; i < 3; ++i) {
    const Streamed via = Generate(router.address(), "Once upon a time", 12);
    ASSERT_TRUE(via.status.ok()) << via.status.error_message();
    EXPECT_EQ(via.text, direct.text);
    EXPECT_EQ(via.last.usage().completion_tokens(), 12);
    EXPECT_GT(via.messages, 1);
  }
  for (const std::string& a : addresses) EXPECT_EQ(Routed(router.metrics_port(), a), 1) << a;

  // Tokenize is forwarded; GetStats sums the replicas' reports.
  {
    auto stub = v1::InferenceService::NewStub(
        grpc::CreateChannel(router.address(), grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    v1::TokenizeRequest req;
    req.set_text("Once upon a time");
    v1::TokenizeResponse resp;
    ASSERT_TRUE(stub->Tokenize(&ctx, req, &resp).ok());
    EXPECT_GT(resp.ids_size(), 2);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));  // A fresh report.
    const v1::GetStatsResponse sum = Stats(router.address());
    int64_t completed = 0;
    for (const std::string& a : addresses) completed += Stats(a).completed();
    EXPECT_EQ(sum.completed(), completed);
    EXPECT_EQ(sum.completed(), 4);
    EXPECT_GT(sum.kv_blocks_total(), 0);
  }

  // The Python reference client works unchanged through the router.
  const std::string stubs = dir + "/stubs";
  std::filesystem::create_directories(stubs);
  auto gen = collm::testing::RunCommand(
      "protoc --proto_path=" + std::string(COLLM_SOURCE_DIR) + "/proto --python_out=" + stubs +
      " --grpc_out=" + stubs +
      " --plugin=protoc-gen-grpc=/usr/bin/grpc_python_plugin collm/v1/inference.proto");
  ASSERT_EQ(gen.exit_code, 0) << gen.err;
  auto py = collm::testing::RunCommand("/usr/bin/python3 " + std::string(COLLM_SOURCE_DIR) +
                                       "/tests/reference/python_client.py " + stubs + " " +
                                       router.address() + " 'Once upon a time' 9");
  ASSERT_EQ(py.exit_code, 0) << py.err;
  auto j = nlohmann::json::parse(py.out);
  EXPECT_EQ(j["completion_tokens"], 9);
  EXPECT_EQ(j["text"].get<std::string>(), Generate(addresses[1], "Once upon a time", 9).text);

  // Kill a replica: requests that land on it fail before their first token and are retried on
  // another replica, so every one succeeds.
  const double retries_before =
      std::max(0.0, MetricValue(Scrape(router.metrics_port()), "collm_router_retries_total"));
  replicas[2]->Kill();
  for (int i = 0; i < 4; ++i) {
    const Streamed via = Generate(router.address(), "Lily went to the park", 8);
    EXPECT_TRUE(via.status.ok()) << via.status.error_message();
    EXPECT_EQ(via.last.usage().completion_tokens(), 8);
  }
  EXPECT_GE(MetricValue(Scrape(router.metrics_port()), "collm_router_retries_total"),
            retries_before + 1);
  // Its polls fail too; it is ejected and gets no more requests.
  const std::string killed = "{replica=\"" + addresses[2] + "\"}";
  bool ejected = false;
  for (int i = 0; i < 100 && !ejected; ++i) {
    ejected =
        MetricValue(Scrape(router.metrics_port()), "collm_router_replica_admitted" + killed) == 0;
    if (!ejected) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_TRUE(ejected);
  EXPECT_EQ(MetricValue(Scrape(router.metrics_port()), "collm_router_ejections_total" + killed), 1);
  const double routed_to_killed = Routed(router.metrics_port(), addresses[2]);
  for (int i = 0; i < 4; ++i) {
    EXPECT_TRUE(Generate(router.address(), "Lily went to the park", 4).status.ok());
  }
  EXPECT_EQ(Routed(router.metrics_port(), addresses[2]), routed_to_killed);

  // With every replica gone, the error says why.
  replicas[0]->Kill();
  replicas[1]->Kill();
  Streamed none;
  for (int i = 0; i < 100; ++i) {
    none = Generate(router.address(), "x", 2);
    if (none.status.error_message().find("no replica can serve") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(none.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(none.status.error_message().find("ejected"), std::string::npos)
      << none.status.error_message();
  // Its health says so too.
  auto health = grpc::health::v1::HealthCheckResponse::SERVING;
  for (int i = 0; i < 50 && health == grpc::health::v1::HealthCheckResponse::SERVING; ++i) {
    health = Health(router.address());
    if (health == grpc::health::v1::HealthCheckResponse::SERVING) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  EXPECT_EQ(health, grpc::health::v1::HealthCheckResponse::NOT_SERVING);

  // SIGTERM: a clean exit.
  EXPECT_EQ(router.Stop(), 0);
}

TEST(RouterTest, SlackSteersAwayFromATrainingReplicaAndFollowsAdapterAffinity) {
  COLLM_REQUIRE_MODEL_FILE(model, "stories260K-hf");
  const std::string dir = MakeTempDir("router-slack");
  COLLM_START_SERVER(trainer, "src/collmd", WriteReplicaConfig(dir, "trainer", model, true), dir,
                     "trainer");
  COLLM_START_SERVER(server, "src/collmd", WriteReplicaConfig(dir, "server", model, false), dir,
                     "server");
  COLLM_START_SERVER(router, "src/collm-router",
                     WriteRouterConfig(dir, {trainer.address(), server.address()}, "slack"), dir,
                     "router");

  // The trainer reports its training share once it has run a few phases.
  double share = 0;
  for (int i = 0; i < 300 && share < 0.3; ++i) {
    share = Stats(trainer.address()).training_share_now();
    if (share < 0.3) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_GE(share, 0.3) << "the training replica never reported training";
  EXPECT_EQ(Stats(server.address()).training_share_now(), 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // The router polls it.

  // Requests that name no adapter (each replica's default) go to the replica that is not
  // training.
  const int kRequests = 12;
  for (int i = 0; i < kRequests; ++i) {
    const Streamed s = Generate(router.address(), "Once upon a time", 6);
    ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  }
  const double to_trainer = Routed(router.metrics_port(), trainer.address());
  const double to_server = Routed(router.metrics_port(), server.address());
  EXPECT_EQ(to_trainer + to_server, kRequests);
  EXPECT_LT(to_trainer, kRequests / 4)
      << "slack sent " << to_trainer << " of " << kRequests << " requests to the training replica";

  // Affinity: only the trainer serves "live", so requests naming it go there, training or not.
  for (int i = 0; i < 4; ++i) {
    const Streamed s = Generate(router.address(), "Once upon a time", 4, "live");
    ASSERT_TRUE(s.status.ok()) << s.status.error_message();
    EXPECT_EQ(s.last.adapter(), "live");
  }
  EXPECT_EQ(Routed(router.metrics_port(), trainer.address()), to_trainer + 4);
  const Streamed too_new = Generate(router.address(), "Once upon a time", 4, "live", 1000);
  EXPECT_EQ(too_new.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(too_new.status.error_message().find("no replica can serve adapter 'live' v>=1000"),
            std::string::npos)
      << too_new.status.error_message();
  const Streamed unknown = Generate(router.address(), "Once upon a time", 4, "nope");
  EXPECT_NE(unknown.status.error_message().find("does not serve 'nope'"), std::string::npos)
      << unknown.status.error_message();

  // ListAdapters is the union over replicas.
  auto stub = v1::InferenceService::NewStub(
      grpc::CreateChannel(router.address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  v1::ListAdaptersResponse adapters;
  ASSERT_TRUE(stub->ListAdapters(&ctx, v1::ListAdaptersRequest(), &adapters).ok());
  ASSERT_EQ(adapters.adapters_size(), 1);
  EXPECT_EQ(adapters.adapters(0).name(), "live");

  // The router's metrics carry the routing delay.
  const std::string body = Scrape(router.metrics_port());
  EXPECT_NE(body.find("collm_router_routing_delay_seconds_count"), std::string::npos);
  EXPECT_EQ(router.Stop(), 0);
}

// A Generate stream read on its own thread; `first_token` is set once a message arrived.
class BackgroundStream {
 public:
  BackgroundStream(const std::string& address, int max_tokens) {
    stub_ = v1::InferenceService::NewStub(
        grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
    req_.set_prompt("Once upon a time");
    req_.mutable_sampling()->set_temperature(0);
    req_.mutable_sampling()->set_max_tokens(max_tokens);
    req_.mutable_sampling()->set_ignore_eos(true);
    thread_ = std::thread([this] {
      auto reader = stub_->Generate(&ctx_, req_);
      v1::GenerateResponse msg;
      while (reader->Read(&msg)) {
        result_.last = msg;
        ++result_.messages;
        first_token_.store(true);
      }
      result_.status = reader->Finish();
      done_.store(true);
    });
  }
  ~BackgroundStream() {
    if (thread_.joinable()) thread_.join();
  }
  // True once a token arrived (the stream may have ended since).
  bool WaitForFirstToken() {
    for (int i = 0; i < 3000 && !first_token_.load() && !done_.load(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return first_token_.load();
  }
  bool done() const { return done_.load(); }
  void Cancel() { ctx_.TryCancel(); }
  const Streamed& Join() {
    thread_.join();
    return result_;
  }

 private:
  std::unique_ptr<v1::InferenceService::Stub> stub_;
  grpc::ClientContext ctx_;
  v1::GenerateRequest req_;
  Streamed result_;
  std::atomic<bool> first_token_{false};
  std::atomic<bool> done_{false};
  std::thread thread_;
};

// The fast timescale on both sides: a burst of requests sent straight to a training replica (its
// own load jumping past its forecast) makes it yield training at once (share target 0, a counted
// yield, training_share_now 0 in GetStats), and the router, seeing its load, sends new requests
// to the other replica; once the burst is over, the replica trains at its ceiling again.
TEST(RouterTest, ALoadSpikeOnATrainingReplicaYieldsItsTrainingAndTheRouterRoutesAround) {
  COLLM_REQUIRE_MODEL_FILE(model, "stories260K-hf");
  const std::string dir = MakeTempDir("router-spike");
  COLLM_START_SERVER(trainer, "src/collmd", WriteReplicaConfig(dir, "trainer", model, true), dir,
                     "trainer");
  COLLM_START_SERVER(server, "src/collmd", WriteReplicaConfig(dir, "server", model, false), dir,
                     "server");
  COLLM_START_SERVER(router, "src/collm-router",
                     WriteRouterConfig(dir, {trainer.address(), server.address()}, "slack"), dir,
                     "router");
  double share = 0;
  for (int i = 0; i < 300 && share < 0.3; ++i) {
    share = Stats(trainer.address()).training_share_now();
    if (share < 0.3) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_GE(share, 0.3) << "the training replica never reported training";
  const std::string before = Scrape(trainer.metrics_port());
  EXPECT_EQ(MetricValue(before, "collm_train_share_target"), 0.9);
  EXPECT_EQ(MetricValue(before, "collm_train_share_yields_total"), 0);

  // The spike: 48 long generations at once, straight to the trainer (more than its 32 running
  // slots). They are cancelled once the checks below are done, so a fast machine does not finish
  // them before the checks and a slow one does not keep the test waiting for them.
  constexpr int kSpike = 48;
  auto spike_stub = v1::InferenceService::NewStub(
      grpc::CreateChannel(trainer.address(), grpc::InsecureChannelCredentials()));
  std::vector<std::unique_ptr<grpc::ClientContext>> spike_ctx;
  for (int i = 0; i < kSpike; ++i) {
    spike_ctx.push_back(std::make_unique<grpc::ClientContext>());
    spike_ctx.back()->set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(5));
  }
  std::vector<grpc::Status> spike_status(kSpike);
  std::vector<std::thread> spike;
  for (int i = 0; i < kSpike; ++i) {
    spike.emplace_back([&, i] {
      v1::GenerateRequest req;
      req.set_prompt("Spike " + std::to_string(i));
      req.mutable_sampling()->set_temperature(0);
      req.mutable_sampling()->set_max_tokens(480);
      req.mutable_sampling()->set_ignore_eos(true);
      auto reader = spike_stub->Generate(spike_ctx[i].get(), req);
      v1::GenerateResponse msg;
      while (reader->Read(&msg)) {
      }
      spike_status[i] = reader->Finish();
    });
  }
  // While it is loaded, the trainer has yielded: no training share, one counted yield.
  bool yielded = false;
  for (int i = 0; i < 1000 && !yielded; ++i) {
    const v1::GetStatsResponse st = Stats(trainer.address());
    const std::string m = Scrape(trainer.metrics_port());
    yielded = st.running() + st.queued() > 0 && st.training_share_now() == 0 &&
              MetricValue(m, "collm_train_share_target") == 0 &&
              MetricValue(m, "collm_train_share_yields_total") >= 1;
    if (!yielded) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_TRUE(yielded) << "the trainer never yielded under the spike:\n"
                       << Scrape(trainer.metrics_port());
  // The router sees the spike in the trainer's load report (polled every 50 ms) and routes new
  // requests to the other replica while it lasts.
  std::this_thread::sleep_for(std::chrono::milliseconds(150));
  const double to_trainer_before = Routed(router.metrics_port(), trainer.address());
  const double to_server_before = Routed(router.metrics_port(), server.address());
  constexpr int kRouted = 6;
  for (int i = 0; i < kRouted; ++i) {
    const Streamed s = Generate(router.address(), "Once upon a time", 4);
    ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  }
  const v1::GetStatsResponse during = Stats(trainer.address());
  ASSERT_GT(during.running() + during.queued(), 0)
      << "the spike ended before the routed requests did; the check below would prove nothing";
  const double to_trainer = Routed(router.metrics_port(), trainer.address()) - to_trainer_before;
  const double to_server = Routed(router.metrics_port(), server.address()) - to_server_before;
  EXPECT_EQ(to_trainer + to_server, kRouted);
  EXPECT_LE(to_trainer, 1) << "the router sent " << to_trainer << " of " << kRouted
                           << " requests to the replica under the spike";
  for (auto& c : spike_ctx) c->TryCancel();
  for (auto& t : spike) t.join();
  for (const grpc::Status& st : spike_status) {
    EXPECT_TRUE(st.ok() || st.error_code() == grpc::StatusCode::CANCELLED) << st.error_message();
  }
  // The spike is over: after the hold and the ramp, the trainer is back at its ceiling.
  double target = -1;
  for (int i = 0; i < 200 && target != 0.9; ++i) {
    target = MetricValue(Scrape(trainer.metrics_port()), "collm_train_share_target");
    if (target != 0.9) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(target, 0.9) << "training never came back after the spike";
}

TEST(RouterTest, DeadlinesBoundsMidStreamFailuresAndTheSigtermDrain) {
  COLLM_REQUIRE_MODEL_FILE(model, "stories260K-hf");
  const std::string dir = MakeTempDir("router-failures");
  COLLM_START_SERVER(a, "src/collmd", WriteReplicaConfig(dir, "a", model, false), dir, "a");
  COLLM_START_SERVER(b, "src/collmd", WriteReplicaConfig(dir, "b", model, false), dir, "b");
  COLLM_START_SERVER(router, "src/collm-router",
                     WriteRouterConfig(dir, {a.address(), b.address()}, "least_outstanding",
                                       "max_outstanding: 1\nshutdown_grace_seconds: 30\n"),
                     dir, "router");

  // The client's deadline reaches the replica, which stops the request instead of generating on.
  {
    auto stub = v1::InferenceService::NewStub(
        grpc::CreateChannel(router.address(), grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(150));
    v1::GenerateRequest req;
    req.set_prompt("Once upon a time");
    req.mutable_sampling()->set_max_tokens(480);
    req.mutable_sampling()->set_ignore_eos(true);
    auto reader = stub->Generate(&ctx, req);
    v1::GenerateResponse msg;
    while (reader->Read(&msg)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
    int64_t stopped = 0;
    for (int i = 0; i < 100 && stopped == 0; ++i) {
      for (const ServerProcess* r : {&a, &b}) {
        const v1::GetStatsResponse st = Stats(r->address());
        stopped += st.expired() + st.cancelled();
      }
      if (stopped == 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    EXPECT_EQ(stopped, 1) << "the replica never learned that the client gave up";
  }
  // So does a client's cancel.
  {
    BackgroundStream cancelled(router.address(), 480);
    ASSERT_TRUE(cancelled.WaitForFirstToken());
    if (!cancelled.done()) {
      cancelled.Cancel();
      EXPECT_EQ(cancelled.Join().status.error_code(), grpc::StatusCode::CANCELLED);
      int64_t stopped = 0;
      for (int i = 0; i < 100 && stopped < 2; ++i) {
        stopped = 0;
        for (const ServerProcess* r : {&a, &b}) {
          const v1::GetStatsResponse st = Stats(r->address());
          stopped += st.expired() + st.cancelled();
        }
        if (stopped < 2) std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
      EXPECT_EQ(stopped, 2) << "the replica never learned that the client cancelled";
    }
  }

  // While one stream is in flight, max_outstanding (1) refuses another at once.
  double retries = MetricValue(Scrape(router.metrics_port()), "collm_router_retries_total");
  {
    BackgroundStream running(router.address(), 480);
    ASSERT_TRUE(running.WaitForFirstToken()) << "the stream ended before its first token";
    // stories260K is fast; on an idle machine 480 tokens may be done already.
    if (running.done()) GTEST_SKIP() << "the stream finished before the checks could run";
    const Streamed refused = Generate(router.address(), "x", 2);
    EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_NE(refused.status.error_message().find("max_outstanding (1)"), std::string::npos)
        << refused.status.error_message();
    // Kill the replica that streams it: the client gets the error (tokens were already
    // streamed, so no retry could be honest) naming the replica.
    const std::string body = Scrape(router.metrics_port());
    ServerProcess* serving =
        MetricValue(body, "collm_router_outstanding{replica=\"" + a.address() + "\"}") == 1 ? &a
                                                                                            : &b;
    ServerProcess* other = serving == &a ? &b : &a;
    serving->Kill();
    const Streamed cut = running.Join();
    if (cut.status.ok()) GTEST_SKIP() << "the stream finished before its replica was killed";
    EXPECT_GT(cut.messages, 0);
    EXPECT_NE(cut.status.error_message().find(serving->address() + " (after streaming)"),
              std::string::npos)
        << cut.status.error_message();
    EXPECT_EQ(MetricValue(Scrape(router.metrics_port()), "collm_router_retries_total"), retries);
    // New requests are served by the replica that is left.
    const Streamed next = Generate(router.address(), "Lily went to the park", 4);
    EXPECT_TRUE(next.status.ok()) << next.status.error_message();
    EXPECT_GE(Routed(router.metrics_port(), other->address()), 1);
  }

  // SIGTERM drains: a stream in flight finishes whole, then the router exits 0.
  BackgroundStream draining(router.address(), 300);
  ASSERT_TRUE(draining.WaitForFirstToken());
  EXPECT_EQ(router.Stop(), 0);
  const Streamed drained = draining.Join();
  EXPECT_TRUE(drained.status.ok()) << drained.status.error_message();
  EXPECT_EQ(drained.last.usage().completion_tokens(), 300);
}

TEST(RouterTest, BadConfigIsAClearError) {
  const std::string dir = MakeTempDir("router-bad");
  WriteFileOrDie(dir + "/a.yaml", "replicas: [127.0.0.1:5001]\npolicy: fastest\n");
  auto r =
      collm::testing::RunCommand(BinaryPath("src/collm-router") + " --config " + dir + "/a.yaml");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("policy must be one of slack, round_robin, least_outstanding"),
            std::string::npos)
      << r.err;
  WriteFileOrDie(dir + "/b.yaml", "policy: slack\n");
  r = collm::testing::RunCommand(BinaryPath("src/collm-router") + " --config " + dir + "/b.yaml");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("replicas is required"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace collm
