// FlClient against a real gRPC FederationService on 127.0.0.1 port 0, with a real engine (tiny
// model, training enabled). The service is a scripted aggregator (testing/scripted_aggregator.h),
// so the tests can check the wire contract (chunking, sha256, sample counts) and the failure
// paths (corrupt globals, rejections, an aggregator that goes away and comes back, deadlines).
#include "collm/federation/fl_client.h"

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <functional>
#include <future>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "collm/common/clock.h"
#include "collm/engine/engine.h"
#include "collm/federation/fingerprint.h"
#include "collm/lora/peft_io.h"
#include "collm/telemetry/metrics.h"
#include "collm/v1/federation.grpc.pb.h"
#include "gtest/gtest.h"
#include "testing/pattern_examples.h"
#include "testing/scripted_aggregator.h"
#include "testing/test_env.h"
#include "testing/tiny_model.h"

namespace collm::federation {
namespace {

namespace v1 = ::collm::v1;
using collm::testing::ScriptedAggregator;
using collm::testing::Server;
using collm::testing::UnixMillis;
using collm::testing::Upload;
using std::chrono::milliseconds;

lora::PeftBlob BlobOf(const lora::LoraAdapter& a) {
  const std::string dir = collm::testing::MakeTempDir("collm-fl-blob") + "/a";
  EXPECT_TRUE(lora::WritePeftAdapter(dir, a).ok());
  return {collm::testing::ReadFileOrDie(dir + "/adapter_config.json"),
          collm::testing::ReadFileOrDie(dir + "/adapter_model.safetensors")};
}

lora::LoraAdapter AdapterOf(const lora::PeftBlob& blob, const runtime::ModelConfig& model) {
  const std::string dir = collm::testing::MakeTempDir("collm-fl-blob");
  collm::testing::WriteFileOrDie(dir + "/adapter_config.json", blob.config_json);
  collm::testing::WriteFileOrDie(dir + "/adapter_model.safetensors", blob.safetensors);
  return lora::ReadPeftAdapter(dir, model).value();
}

// Polls `done` for up to two minutes (generous for 2 shared cores); not a timing assertion.
bool WaitFor(const std::function<bool()>& done) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (std::chrono::steady_clock::now() < until) {
    if (done()) return true;
    std::this_thread::sleep_for(milliseconds(20));
  }
  return done();
}

struct Device {
  std::shared_ptr<const runtime::LlamaModel> model =
      runtime::LlamaModel::Load(collm::testing::TinyModelDir(), runtime::RuntimeOptions{}).value();
  lora::AdapterRegistry registry{model->config(), model->runtime(), Clock::Real(), 100};
  lora::LoraConfig lora_config;
  std::unique_ptr<engine::Engine> engine;
  telemetry::MetricsRegistry metrics;
  std::unique_ptr<FlClient> client;

  Device() {
    lora_config.rank = 4;
    lora_config.dropout = 0;
    lora_config.targets = {runtime::LoraTarget::kQ, runtime::LoraTarget::kV};
    engine::TrainerOptions o;
    o.lr = 1e-2;
    o.micro_batch_size = 4;
    auto initial = lora::LoraAdapter::Create(model->config(), lora_config, 1).value();
    EXPECT_TRUE(registry.Publish("live", initial, "initial").ok());
    engine::TrainingSetup s;
    s.trainer =
        engine::PeftTrainer::Create(model, lora::ShadowAdapter::Create(initial, o.adamw).value(), o)
            .value();
    s.dataset = collm::testing::FixedCompletionExamples(64, 1, 300, 5);
    engine::PublishOptions p;
    p.quality_gate = true;
    s.publisher = std::make_unique<engine::ShadowPublisher>(
        model, registry, "live", p, collm::testing::FixedCompletionExamples(8, 2, 300, 5));
    engine::EngineOptions eo;
    eo.training_share = 0;
    engine = engine::Engine::Create(model, nullptr, &registry, eo).value();
    EXPECT_TRUE(engine->EnableTraining(std::move(s)).ok());
    engine->Start();
  }
  ~Device() {
    if (client) client->Stop();
    engine->Shutdown(1);
  }

  lora::LoraAdapter Fresh(uint64_t seed) const {
    return lora::LoraAdapter::Create(model->config(), lora_config, seed).value();
  }

  FlClientOptions Options(int port) const {
    FlClientOptions o;
    o.aggregator = absl::StrCat("127.0.0.1:", port);
    o.device_id = "dev-1";
    o.heartbeat_seconds = 0.05;
    o.backoff_initial_seconds = 0.02;
    o.backoff_max_seconds = 0.2;
    o.rpc_timeout_seconds = 10;
    o.upload_chunk_bytes = 1000;
    o.model_name = "tiny";
    o.model_fingerprint = ModelFingerprint(
        runtime::ModelConfig::FromFile(collm::testing::TinyModelDir() + "/config.json").value());
    o.local_samples = 64;
    o.serving_address = "127.0.0.1:50051";
    return o;
  }

  void StartClient(FlClientOptions o, Clock& clock = Clock::Real()) {
    client =
        FlClient::Create(std::move(o), *engine, model->config(), nullptr, &metrics, clock).value();
    client->Start();
  }
};

double MaxAbsDiff(const lora::LoraAdapter& x, const lora::LoraAdapter& y) {
  double m = 0;
  for (size_t l = 0; l < x.factors.layers.size(); ++l) {
    for (int t = 0; t < runtime::kNumLoraTargets; ++t) {
      const auto& a = x.factors.layers[l][t];
      if (!a.a.defined()) continue;
      m = std::max(m, (a.a - y.factors.layers[l][t].a).abs().max().item<double>());
      m = std::max(m, (a.b - y.factors.layers[l][t].b).abs().max().item<double>());
    }
  }
  return m;
}

TEST(FlClientTest, JoinsARoundUploadsTheBudgetAndInstallsTheNextGlobal) {
  Device d;
  ScriptedAggregator agg;
  const lora::LoraAdapter v1_adapter = d.Fresh(7);
  agg.globals[1] = BlobOf(v1_adapter);
  v1::RoundTask task;
  task.set_round(1);
  task.set_global_version(1);
  task.set_local_steps(3);
  task.set_lr(1e-2);
  task.set_deadline_unix_ms(UnixMillis() + 600'000);
  task.set_training_share(1.0);
  agg.task = task;
  Server server(&agg, 0);
  ASSERT_TRUE(server.ok());
  d.StartClient(d.Options(server.port()));

  ASSERT_TRUE(WaitFor([&] {
    std::lock_guard<std::mutex> lock(agg.mu);
    return !agg.uploads.empty();
  })) << d.client->Stats().last_error;
  Upload u;
  {
    std::lock_guard<std::mutex> lock(agg.mu);
    u = agg.uploads[0];
    ASSERT_EQ(agg.registered.size(), 1u);
    EXPECT_EQ(agg.registered[0].model_fingerprint(), d.Options(0).model_fingerprint);
    EXPECT_EQ(agg.registered[0].model_fingerprint().size(), 64u);
    EXPECT_EQ(agg.registered[0].local_samples(), 64);
    EXPECT_GT(agg.registered[0].memory_bytes(), 0);
  }
  EXPECT_EQ(u.header.device_id(), "dev-1");
  EXPECT_EQ(u.header.session(), "s1");
  EXPECT_EQ(u.header.round(), 1);
  EXPECT_EQ(u.header.base_version(), 1);
  EXPECT_EQ(u.header.num_samples(), 3 * 4) << "3 optimizer steps of one micro-batch of 4";
  EXPECT_GT(u.header.train_loss(), 0);
  EXPECT_GT(u.header.held_out_loss(), 0);
  EXPECT_EQ(u.header.adapter().sha256(), federation::Sha256Hex(u.data));
  EXPECT_EQ(u.header.adapter().safetensors_bytes(), static_cast<int64_t>(u.data.size()));
  EXPECT_EQ(u.chunks, static_cast<int>((u.data.size() + 999) / 1000)) << "1000-byte chunks";
  EXPECT_GT(u.chunks, 1);
  // The update was trained from v1 (not from the device's own initial adapter).
  const lora::LoraAdapter trained =
      AdapterOf({u.header.adapter().config_json(), u.data}, d.model->config());
  EXPECT_GT(MaxAbsDiff(trained, v1_adapter), 0);
  EXPECT_LT(MaxAbsDiff(trained, v1_adapter), 3 * 1e-2 * 1.5) << "at most ~lr per AdamW step";
  // The service records the upload before the device reads the answer.
  ASSERT_TRUE(WaitFor([&] { return d.client->Stats().uploads_accepted == 1; }));
  EXPECT_EQ(d.client->Stats().rounds_joined, 1);

  // The round closes; v2 (here: the update itself) becomes the global and beats what is live.
  {
    std::lock_guard<std::mutex> lock(agg.mu);
    agg.globals[2] = {u.header.adapter().config_json(), u.data};
  }
  ASSERT_TRUE(WaitFor([&] { return d.client->Stats().live_version == 2; }))
      << d.client->Stats().last_error;
  auto live = d.registry.Get("live").value();
  EXPECT_EQ(live->source, "global v2");
  EXPECT_LT(MaxAbsDiff(live->adapter, trained), 1e-7);
  EXPECT_EQ(d.client->Stats().global_version, 2);
  {
    std::lock_guard<std::mutex> lock(agg.mu);
    ASSERT_FALSE(agg.telemetry.empty());
    const v1::DeviceTelemetry& t = agg.telemetry.back();
    EXPECT_GE(t.slo_attainment(), 0);
    // The load report, measured by the task it just trained.
    EXPECT_GT(t.optimizer_step_seconds(), 0);
    EXPECT_GT(t.train_tokens_per_s_solo(), 0);
    EXPECT_GE(t.loss_reduction_per_step(), 0);
    EXPECT_GT(t.max_running(), 0);
    EXPECT_GT(t.free_kv_fraction(), 0);
    EXPECT_LE(t.free_kv_fraction(), 1);
    EXPECT_EQ(t.slo_attainment_window(), 1) << "no request finished: nothing missed";
    EXPECT_EQ(t.serving_address(), "127.0.0.1:50051");
    EXPECT_EQ(t.arrival_rate_1s(), 0);
  }
  const std::string text = d.metrics.RenderPrometheus();
  for (const char* needle :
       {"collm_fl_uploads_total{outcome=\"accepted\"} 1", "collm_fl_rounds_joined_total 1",
        "collm_fl_global_version 2", "collm_fl_live_global_version 2", "collm_fl_connected 1"}) {
    EXPECT_NE(text.find(needle), std::string::npos) << needle << " missing in:\n" << text;
  }
}

// Budgets only (issue 11): the aggregator's policy share in heartbeats does not make a device
// train between tasks unless its config asks to follow it.
TEST(FlClientTest, BetweenTasksTheDeviceKeepsItsOwnShareUnlessItFollowsTheAggregator) {
  Device d;
  ScriptedAggregator agg;
  agg.globals[1] = BlobOf(d.Fresh(7));
  agg.training_share = 0.7;
  Server server(&agg, 0);
  ASSERT_TRUE(server.ok());
  d.StartClient(d.Options(server.port()));
  ASSERT_TRUE(WaitFor([&] { return d.client->Stats().heartbeats >= 10; }));
  EXPECT_EQ(d.engine->Stats().training_share, 0);
  EXPECT_EQ(d.engine->Stats().train_optimizer_steps, 0) << "trained outside any task";
  d.client->Stop();

  FlClientOptions follow = d.Options(server.port());
  follow.follow_aggregator_share = true;
  d.StartClient(follow);
  ASSERT_TRUE(WaitFor([&] { return d.engine->Stats().training_share == 0.7; }));
}

TEST(FlClientTest, ACorruptGlobalIsRefusedAndNothingIsInstalled) {
  Device d;
  ScriptedAggregator agg;
  agg.globals[1] = BlobOf(d.Fresh(7));
  agg.corrupt_sha = true;
  Server server(&agg, 0);
  d.StartClient(d.Options(server.port()));
  ASSERT_TRUE(WaitFor([&] { return d.client->Stats().failures >= 2; }));
  const FlClientStats st = d.client->Stats();
  EXPECT_NE(st.last_error.find("sha256 mismatch"), std::string::npos) << st.last_error;
  EXPECT_EQ(st.global_version, 0);
  EXPECT_EQ(d.registry.Get("live").value()->version, 1) << "nothing went live";
  // The fix arrives: the next retry installs it.
  {
    std::lock_guard<std::mutex> lock(agg.mu);
    agg.corrupt_sha = false;
  }
  ASSERT_TRUE(WaitFor([&] { return d.client->Stats().global_version == 1; }));
}

TEST(FlClientTest, ARejectedUpdateIsCountedAndNotRetried) {
  Device d;
  ScriptedAggregator agg;
  agg.globals[1] = BlobOf(d.Fresh(7));
  agg.reject_reason = "late update for round 1 (round 2 is open)";
  v1::RoundTask task;
  task.set_round(1);
  task.set_global_version(1);
  task.set_local_steps(1);
  task.set_training_share(1.0);
  agg.task = task;  // Stays open: the device must not train it again.
  Server server(&agg, 0);
  d.StartClient(d.Options(server.port()));
  ASSERT_TRUE(WaitFor([&] { return d.client->Stats().uploads_rejected == 1; }));
  const int64_t heartbeats = d.client->Stats().heartbeats;
  ASSERT_TRUE(WaitFor([&] { return d.client->Stats().heartbeats >= heartbeats + 5; }));
  const FlClientStats st = d.client->Stats();
  EXPECT_EQ(st.rounds_joined, 1);
  EXPECT_EQ(st.last_round, 1);
  EXPECT_NE(st.last_error.find("late update"), std::string::npos) << st.last_error;
  std::lock_guard<std::mutex> lock(agg.mu);
  EXPECT_EQ(agg.uploads.size(), 1u);
}

TEST(FlClientTest, TheDeadlineCutsTrainingShortAndAPartialUpdateIsUploaded) {
  Device d;
  ScriptedAggregator agg;
  agg.globals[1] = BlobOf(d.Fresh(7));
  Server server(&agg, 0);
  FlClientOptions o = d.Options(server.port());
  o.deadline_margin_seconds = 1.0;
  d.StartClient(o);
  // Install v1 first, so the task below starts training at once.
  ASSERT_TRUE(WaitFor([&] { return d.client->Stats().global_version == 1; }));
  v1::RoundTask task;
  task.set_round(1);
  task.set_global_version(1);
  task.set_local_steps(1'000'000);  // Far more than fits before the deadline.
  task.set_training_share(1.0);
  task.set_deadline_unix_ms(UnixMillis() + 3000);
  {
    std::lock_guard<std::mutex> lock(agg.mu);
    agg.task = task;
  }
  ASSERT_TRUE(WaitFor([&] {
    std::lock_guard<std::mutex> lock(agg.mu);
    return !agg.uploads.empty();
  })) << d.client->Stats().last_error;
  std::lock_guard<std::mutex> lock(agg.mu);
  const v1::UpdateHeader& h = agg.uploads[0].header;
  EXPECT_GT(h.num_samples(), 0);
  EXPECT_LT(h.num_samples(), 1'000'000 * 4);
  EXPECT_EQ(h.num_samples() % 4, 0) << "whole optimizer steps only";
}

TEST(FlClientTest, KeepsServingWhileTheAggregatorIsDownAndRejoins) {
  Device d;
  ScriptedAggregator agg;
  int port = 0;
  {
    Server probe(&agg, 0);  // Learn a free port, then leave nothing listening on it.
    port = probe.port();
  }
  d.StartClient(d.Options(port));
  ASSERT_TRUE(WaitFor([&] { return d.client->Stats().failures >= 3; }));
  EXPECT_EQ(d.client->Stats().state, "disconnected");
  EXPECT_EQ(d.client->Stats().registrations, 0);

  // Serving is unaffected.
  struct Sink : engine::RequestSink {
    std::promise<engine::RequestResult> done;
    void OnDelta(const std::string&, const std::vector<int32_t>&) override {}
    void OnFinish(const engine::RequestResult& r) override { done.set_value(r); }
  };
  auto sink = std::make_shared<Sink>();
  auto finished = sink->done.get_future();
  engine::EngineRequest r;
  r.prompt = {1, 5, 6, 7};
  r.params.max_tokens = 5;
  r.params.ignore_eos = true;
  ASSERT_TRUE(d.engine->Submit(r, sink).ok());
  ASSERT_EQ(finished.wait_for(std::chrono::seconds(60)), std::future_status::ready);
  const engine::RequestResult result = finished.get();
  EXPECT_TRUE(result.status.ok()) << result.status;
  EXPECT_EQ(result.completion_tokens, 5);

  // The aggregator comes back on the same address: the device registers.
  Server server(&agg, port);
  ASSERT_TRUE(server.ok()) << "could not listen on port " << port << " again";
  ASSERT_TRUE(WaitFor([&] {
    const FlClientStats st = d.client->Stats();
    return st.registrations == 1 && st.state == "connected";
  })) << d.client->Stats().last_error;

  // An aggregator restart that lost the sessions: the device registers again.
  {
    std::lock_guard<std::mutex> lock(agg.mu);
    agg.sessions.clear();
  }
  ASSERT_TRUE(WaitFor([&] { return d.client->Stats().registrations == 2; }));
}

// The heartbeat interval is measured on the injected clock: while a fake clock stands still no
// heartbeat follows the first, however long the test waits; advancing it one interval brings the
// next one.
TEST(FlClientTest, HeartbeatsFollowTheInjectedClock) {
  Device d;
  ScriptedAggregator agg;  // Tells devices a 50 ms heartbeat interval at Register.
  Server server(&agg, 0);
  FakeClock clock(int64_t{1'000'000'000'000});
  d.StartClient(d.Options(server.port()), clock);
  ASSERT_TRUE(WaitFor([&] { return d.client->Stats().heartbeats >= 1; }))
      << d.client->Stats().last_error;
  // Ten intervals of real time: a client sleeping on the real clock would heartbeat again.
  std::this_thread::sleep_for(milliseconds(500));
  EXPECT_EQ(d.client->Stats().heartbeats, 1);
  clock.AdvanceSeconds(0.05);
  ASSERT_TRUE(WaitFor([&] { return d.client->Stats().heartbeats >= 2; }));
  std::this_thread::sleep_for(milliseconds(200));
  EXPECT_EQ(d.client->Stats().heartbeats, 2);
}

TEST(FlClientTest, BadOptionsAreNamed) {
  Device d;
  FlClientOptions o = d.Options(1);
  o.device_id = "";
  auto c = FlClient::Create(o, *d.engine, d.model->config(), nullptr, nullptr);
  EXPECT_NE(std::string(c.status().message()).find("device_id"), std::string::npos);
  o = d.Options(1);
  o.tls.enabled = true;
  o.tls.ca = "/nonexistent/ca.pem";
  c = FlClient::Create(o, *d.engine, d.model->config(), nullptr, nullptr);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(std::string(c.status().message()).find("federation.tls.ca"), std::string::npos);
  o = d.Options(1);
  o.tls.cert = "x.pem";
  c = FlClient::Create(o, *d.engine, d.model->config(), nullptr, nullptr);
  EXPECT_NE(std::string(c.status().message()).find("cert and key"), std::string::npos);
}

}  // namespace
}  // namespace collm::federation
