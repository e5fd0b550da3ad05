// Co-execution: PEFT micro-steps on the shadow adapter interleaved with inference in the engine
// loop, under a training-share target and an SLO guard.
#include <ATen/ATen.h>

#include <chrono>
#include <future>
#include <random>
#include <thread>

#include "collm/engine/engine.h"
#include "gtest/gtest.h"
#include "testing/engine_fixture.h"
#include "testing/test_env.h"

namespace collm::engine {
namespace {

using collm::testing::CollectingSink;
using collm::testing::EnginePatternExamples;

// Costs below are given per example: every pattern example has 8 input tokens.
constexpr double kPerToken = 1.0 / 8;

struct Env : collm::testing::EngineFixture {
  Env() : EngineFixture(/*keep_versions=*/1000) {}

  TrainingSetup Setup(int64_t micro_batch, int64_t publish_every) {
    TrainingSetup s = MakeTrainingSetup(micro_batch);
    if (publish_every > 0) {
      PublishOptions p;
      p.every_steps = publish_every;
      s.publisher = MakePublisher(p);
    }
    return s;
  }
};

TEST(CoExecutionTest, TrainsAndPublishesWhileServingAndEveryRequestUsesOneVersion) {
  Env e;
  EngineOptions o;
  o.training_share = 0.5;
  o.default_adapter = "live";
  TrainingSetup setup = e.Setup(4, 3);  // Publishes the initial "live" version.
  auto engine = Engine::Create(e.model, e.tokenizer.get(), &e.registry, o).value();
  ASSERT_TRUE(engine->EnableTraining(std::move(setup)).ok());
  const double base_loss = EvaluateLoss(*e.model, nullptr, EnginePatternExamples(8, 2)).value();
  engine->Start();
  std::vector<std::shared_ptr<CollectingSink>> sinks;
  std::vector<EngineRequest> reqs;
  for (int wave = 0; wave < 4; ++wave) {
    for (int i = 0; i < 3; ++i) {
      EngineRequest r;
      r.prompt = e.tokenizer->Encode("Once upon a time " + std::to_string(wave * 3 + i), true);
      r.params.temperature = 0;
      r.params.max_tokens = 10;
      r.params.ignore_eos = true;
      reqs.push_back(r);
      sinks.push_back(std::make_shared<CollectingSink>());
      ASSERT_TRUE(engine->Submit(r, sinks.back()).ok());
    }
    for (size_t k = sinks.size() - 3; k < sinks.size(); ++k) ASSERT_TRUE(sinks[k]->Wait());
    // Let training run on idle time between waves.
    const int64_t target = (wave + 1) * 3;
    for (int spin = 0; spin < 600 && engine->Stats().train_optimizer_steps < target; ++spin) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  engine->Shutdown(10);
  EngineStats st = engine->Stats();
  EXPECT_GE(st.train_optimizer_steps, 12);
  EXPECT_GE(st.publish.published, 3);
  EXPECT_LT(st.publish.live_loss, base_loss - 0.5) << "held-out loss should fall while serving";
  int64_t last_version = 0;
  for (size_t i = 0; i < sinks.size(); ++i) {
    const RequestResult& r = sinks[i]->result();
    ASSERT_TRUE(r.status.ok()) << r.status;
    EXPECT_EQ(r.adapter, "live");
    EXPECT_GE(r.adapter_version, last_version) << "versions only move forward";
    last_version = r.adapter_version;
    // Recompute the request alone with exactly the version it reported.
    auto snap = e.registry.GetVersion("live", r.adapter_version).value();
    EXPECT_EQ(sinks[i]->ids(), e.Alone(reqs[i], &snap->weights)) << "request " << i;
  }
  EXPECT_GT(last_version, 1) << "later requests should be served by a published version";
}

TEST(CoExecutionTest, SloGuardShrinksOrBlocksMicroStepsByTheSlack) {
  Env e;
  FakeClock clock(1'000'000'000);
  EngineOptions o;
  o.training_share = 1.0;
  o.guard_safety = 1.0;
  o.share_controller.enabled = false;  // The SLO guard alone (the controller: tests below).
  o.slo_classes["tight"] = {0, 10};
  o.slo_classes["loose"] = {0, 50};
  auto engine = Engine::Create(e.model, e.tokenizer.get(), &e.registry, o, clock).value();
  ASSERT_TRUE(engine->EnableTraining(e.Setup(4, 0)).ok());
  const int64_t phases = 2 * e.model->config().num_hidden_layers + 1;
  EngineRequest r;
  r.prompt = e.tokenizer->Encode("hello there", true);
  r.params.max_tokens = 60;
  r.params.ignore_eos = true;
  r.slo_class = "tight";
  auto sink = std::make_shared<CollectingSink>();
  ASSERT_TRUE(engine->Submit(r, sink).ok());
  // Each inference step takes 10 ms of (fake) time and each training phase 25 ms per example.
  // "tight" asks for a 10 ms TPOT: there is never room for a single example's phase.
  for (int i = 0; i < 5; ++i) {
    engine->SetCostEstimatesForTest(0.010, kPerToken * 0.025);
    ASSERT_TRUE(engine->StepForTest());
    clock.AdvanceSeconds(0.010);
  }
  EngineStats st = engine->Stats();
  EXPECT_EQ(st.train_guard_blocked, 5);
  EXPECT_EQ(st.train_phases, 0);
  engine->Cancel(1);
  // Idle now, and no class has a TTFT objective: a whole micro-step of 4 uses the idle time.
  engine->SetCostEstimatesForTest(0.010, kPerToken * 0.025);
  ASSERT_TRUE(engine->StepForTest());
  st = engine->Stats();
  EXPECT_EQ(st.train_micro_steps, 1);
  EXPECT_EQ(st.train_examples, 4);
  EXPECT_EQ(st.train_phases, phases);

  // "loose" allows 50 ms per token: after the first token 40 ms of slack remain, enough for one
  // example's phase but not four, so the micro-step shrinks to one example, and it advances by
  // one phase per inference step (serving never waits for a whole micro-step).
  r.slo_class = "loose";
  auto sink2 = std::make_shared<CollectingSink>();
  ASSERT_TRUE(engine->Submit(r, sink2).ok());
  for (int64_t i = 0; i < phases; ++i) {
    engine->SetCostEstimatesForTest(0.010, kPerToken * 0.025);
    ASSERT_TRUE(engine->StepForTest());
    clock.AdvanceSeconds(0.010);
    st = engine->Stats();
    EXPECT_EQ(st.train_phases, phases + i + 1) << "one phase per inference step";
    EXPECT_EQ(st.train_micro_steps, i + 1 < phases ? 1 : 2);
  }
  EXPECT_EQ(st.train_examples, 5);
  EXPECT_EQ(sink2->ids().size(), static_cast<size_t>(phases)) << "a token every step meanwhile";
}

TEST(CoExecutionTest, IdleMicroStepsAreSizedToTheTtftObjective) {
  Env e;
  FakeClock clock(1'000'000'000);
  EngineOptions o;
  o.training_share = 0.5;
  o.guard_safety = 1.0;
  o.share_controller.enabled = false;  // The SLO guard alone (the controller: tests below).
  o.default_slo = {40, 0};  // A request arriving now may wait 40 - 10 (its prefill) = 30 ms.
  auto engine = Engine::Create(e.model, e.tokenizer.get(), &e.registry, o, clock).value();
  ASSERT_TRUE(engine->EnableTraining(e.Setup(8, 0)).ok());
  // Cost unknown: the first idle micro-step measures it with a single example.
  ASSERT_TRUE(engine->StepForTest());
  EXPECT_EQ(engine->Stats().train_examples, 1);
  // 10 ms per example and phase: three examples' phases fit the 30 ms an arrival can absorb.
  engine->SetCostEstimatesForTest(0.010, kPerToken * 0.010);
  ASSERT_TRUE(engine->StepForTest());
  EXPECT_EQ(engine->Stats().train_examples, 1 + 3);
  // One example's phase (40 ms) no longer fits, but nothing has arrived yet: the expected share
  // of delayed arrivals is 0, within guard_idle_risk, so whole micro-batches still train.
  engine->SetCostEstimatesForTest(0.010, kPerToken * 0.040);
  ASSERT_TRUE(engine->StepForTest());
  EXPECT_EQ(engine->Stats().train_examples, 4 + 8);
  // Requests now arrive every 10 ms: a 40 ms phase would delay most of them. Nothing starts.
  for (int i = 0; i < 3; ++i) {
    EngineRequest r;
    r.prompt = e.tokenizer->Encode("hi", true);
    r.params.max_tokens = 1;
    ASSERT_TRUE(engine->Submit(r, std::make_shared<CollectingSink>()).ok());
    clock.AdvanceSeconds(0.010);
  }
  for (int i = 0; i < 3 && engine->Stats().completed < 3; ++i) {
    engine->SetCostEstimatesForTest(0.010, kPerToken * 0.040);
    engine->StepForTest();
  }
  ASSERT_EQ(engine->Stats().completed, 3);
  const int64_t blocked = engine->Stats().train_guard_blocked;
  engine->SetCostEstimatesForTest(0.010, kPerToken * 0.040);
  EXPECT_FALSE(engine->StepForTest());
  EXPECT_EQ(engine->Stats().train_examples, 12);
  EXPECT_EQ(engine->Stats().train_guard_blocked, blocked + 1);
}

TEST(CoExecutionTest, MetricsAndCheckpointResume) {
  Env e;
  telemetry::MetricsRegistry metrics;
  EngineOptions o;
  o.training_share = 0.5;
  auto engine = Engine::Create(e.model, e.tokenizer.get(), &e.registry, o).value();
  ASSERT_TRUE(engine->EnableTraining(e.Setup(2, 2)).ok());
  engine->SetMetrics(&metrics);
  EngineRequest r;
  r.prompt = e.tokenizer->Encode("metrics please", true);
  r.params.max_tokens = 6;
  r.params.ignore_eos = true;
  auto sink = std::make_shared<CollectingSink>();
  ASSERT_TRUE(engine->Submit(r, sink).ok());
  for (int i = 0; i < 12; ++i) engine->StepForTest();
  ASSERT_TRUE(sink->Wait());
  const std::string text = metrics.RenderPrometheus();
  for (const char* needle :
       {"collm_ttft_seconds_count 1", "collm_requests_total{outcome=\"ok\"} 1",
        "collm_generated_tokens_total 6", "collm_train_steps_total", "collm_kv_cache_blocks_total",
        "collm_live_adapter_version", "collm_batch_tokens_bucket"}) {
    EXPECT_NE(text.find(needle), std::string::npos) << needle << " missing in:\n" << text;
  }
  const int64_t steps = engine->Stats().train_optimizer_steps;
  ASSERT_GT(steps, 0);
  engine->Shutdown(1);
  const std::string dir = collm::testing::MakeTempDir("collm-engine-ckpt") + "/shadow";
  ASSERT_TRUE(engine->CheckpointTraining(dir).ok());
  std::map<std::string, std::string> extra;
  TrainerOptions to;
  to.lr = 1e-2;
  to.micro_batch_size = 2;
  auto resumed = PeftTrainer::Resume(e.model, dir, to, &extra).value();
  EXPECT_EQ(resumed->shadow().step(), steps);
  EXPECT_TRUE(extra.count("sampler.epoch"));
}

TEST(CoExecutionTest, ZeroShareNeverTrainsAndBadShareIsRejected) {
  Env e;
  EngineOptions o;
  o.training_share = 0;
  auto engine = Engine::Create(e.model, e.tokenizer.get(), &e.registry, o).value();
  ASSERT_TRUE(engine->EnableTraining(e.Setup(2, 0)).ok());
  EXPECT_FALSE(engine->StepForTest());
  EXPECT_EQ(engine->Stats().train_micro_steps, 0);
  o.training_share = 1.5;
  auto bad = Engine::Create(e.model, e.tokenizer.get(), &e.registry, o);
  EXPECT_NE(std::string(bad.status().message()).find("training_share"), std::string::npos);
  EngineOptions idle_train;
  idle_train.training_share = 0.1;
  auto trains = Engine::Create(e.model, e.tokenizer.get(), &e.registry, idle_train).value();
  ASSERT_TRUE(trains->EnableTraining(e.Setup(2, 0)).ok());
  EXPECT_TRUE(trains->StepForTest());  // Idle: any share > 0 uses the idle time.
  EXPECT_EQ(trains->Stats().train_micro_steps, 1);
}

TEST(CoExecutionTest, ALoadSurgeYieldsTrainingWithinOneStepAndTheCutTaskReportsAPartialUpdate) {
  Env e;
  FakeClock clock(1'000'000'000);
  telemetry::MetricsRegistry metrics;
  EngineOptions o;
  o.training_share = 0;  // Only the task trains; its share is the ceiling.
  auto engine = Engine::Create(e.model, e.tokenizer.get(), &e.registry, o, clock).value();
  ASSERT_TRUE(engine->EnableTraining(e.Setup(4, 0)).ok());
  engine->SetMetrics(&metrics);
  TrainingTask task;
  task.optimizer_steps = 100;
  task.training_share = 0.8;
  auto future = engine->RunTrainingTask(task);
  // Idle (forecast 0 req/s): one optimizer step per engine step, at the whole ceiling.
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(engine->StepForTest());
    clock.AdvanceSeconds(0.1);
  }
  EngineStats st = engine->Stats();
  ASSERT_EQ(st.train_optimizer_steps, 3);
  EXPECT_DOUBLE_EQ(st.training_share, 0.8);
  EXPECT_DOUBLE_EQ(st.training_share_ceiling, 0.8);
  EXPECT_EQ(st.share_reason, "ceiling");
  EXPECT_EQ(st.share_yields, 0);

  // A burst of 8 requests (8 req/s over the 1 s window against a forecast of 0): the very next
  // step serves them and runs no training phase.
  std::vector<std::shared_ptr<CollectingSink>> sinks;
  for (int i = 0; i < 8; ++i) {
    EngineRequest r;
    r.prompt = e.tokenizer->Encode("Once upon a time " + std::to_string(i), true);
    r.params.max_tokens = 20;
    r.params.ignore_eos = true;
    sinks.push_back(std::make_shared<CollectingSink>());
    ASSERT_TRUE(engine->Submit(r, sinks.back()).ok());
  }
  const int64_t phases_before = st.train_phases;
  ASSERT_TRUE(engine->StepForTest());
  st = engine->Stats();
  EXPECT_DOUBLE_EQ(st.training_share, 0) << "training yields within one step";
  EXPECT_DOUBLE_EQ(st.training_share_ceiling, 0.8);
  EXPECT_EQ(st.share_reason, "surge");
  EXPECT_EQ(st.share_yields, 1);
  EXPECT_EQ(st.train_phases, phases_before);
  const std::string text = metrics.RenderPrometheus();
  EXPECT_NE(text.find("collm_train_share_target 0\n"), std::string::npos) << text;
  EXPECT_NE(text.find("collm_train_share_ceiling 0.8"), std::string::npos) << text;
  EXPECT_NE(text.find("collm_train_share_yields_total 1"), std::string::npos) << text;
  // The burst is served with no training in between.
  for (int i = 0; i < 40 && engine->Stats().completed < 8; ++i) {
    ASSERT_TRUE(engine->StepForTest());
    clock.AdvanceSeconds(0.005);
  }
  st = engine->Stats();
  ASSERT_EQ(st.completed, 8);
  EXPECT_EQ(st.train_phases, phases_before);
  EXPECT_EQ(st.train_optimizer_steps, 3);
  // The round's deadline comes while the load is still above the forecast: the task is cut
  // short and reports the steps it did, weighted by the samples actually trained.
  engine->FinishTrainingTaskEarly();
  engine->StepForTest();
  ASSERT_EQ(future.wait_for(std::chrono::seconds(0)), std::future_status::ready);
  TrainingReport r = future.get();
  ASSERT_TRUE(r.status.ok()) << r.status;
  EXPECT_EQ(r.optimizer_steps, 3);
  EXPECT_EQ(r.num_samples, 3 * 4);
}

TEST(CoExecutionTest, ShareRecoversAfterTheSurgeAndShrinksWithSloHeadroom) {
  Env e;
  FakeClock clock(1'000'000'000);
  EngineOptions o;
  o.training_share = 0.6;
  o.default_slo = {0, 50};  // TPOT 50 ms: headroom falls as a decoding request falls behind.
  auto engine = Engine::Create(e.model, e.tokenizer.get(), &e.registry, o, clock).value();
  ASSERT_TRUE(engine->EnableTraining(e.Setup(2, 0)).ok());
  engine->SetCostEstimatesForTest(0.010, kPerToken * 0.001);
  for (int i = 0; i < 5; ++i) {
    EngineRequest r;
    r.prompt = e.tokenizer->Encode("hi", true);
    r.params.max_tokens = 1;
    ASSERT_TRUE(engine->Submit(r, std::make_shared<CollectingSink>()).ok());
  }
  for (int i = 0; i < 10 && engine->Stats().completed < 5; ++i) engine->StepForTest();
  ASSERT_EQ(engine->Stats().completed, 5);
  EXPECT_EQ(engine->Stats().share_reason, "surge");
  // 5 req/s decays under 2 req/s above the 30 s rate after ~1 s; then the 500 ms hold, then the
  // ramp back (at most the ceiling per second).
  clock.AdvanceSeconds(1.0);
  engine->StepForTest();
  EXPECT_DOUBLE_EQ(engine->Stats().training_share, 0);
  clock.AdvanceSeconds(0.6);
  engine->StepForTest();
  EXPECT_EQ(engine->Stats().share_reason, "recovering");
  EXPECT_LT(engine->Stats().training_share, 0.6);
  clock.AdvanceSeconds(1.0);
  engine->StepForTest();
  EXPECT_DOUBLE_EQ(engine->Stats().training_share, 0.6);
  EXPECT_EQ(engine->Stats().share_reason, "ceiling");
  // A request decoding against a 50 ms TPOT: after its second token, 77 ms after its first,
  // with an 8 ms inference step (the EWMA after one 0 s fake step) it has
  // (2 x 0.05 - 0.077 - 0.008) / 0.05 = 0.3 of a token's objective left: the share is
  // 0.6 x (0.3 - 0.1) / (0.5 - 0.1).
  EngineRequest r;
  r.prompt = e.tokenizer->Encode("a slow one", true);
  r.params.max_tokens = 50;
  r.params.ignore_eos = true;
  ASSERT_TRUE(engine->Submit(r, std::make_shared<CollectingSink>()).ok());
  engine->SetCostEstimatesForTest(0.010, kPerToken * 0.001);
  engine->StepForTest();  // Prefill and the first token.
  EXPECT_DOUBLE_EQ(engine->Stats().training_share, 0.6) << "a fresh request has room";
  clock.AdvanceSeconds(0.077);
  engine->SetCostEstimatesForTest(0.010, kPerToken * 0.001);
  engine->StepForTest();
  const EngineStats st = engine->Stats();
  EXPECT_EQ(st.share_reason, "slo_headroom");
  EXPECT_NEAR(st.training_share, 0.3, 1e-6);
}

}  // namespace
}  // namespace collm::engine
