// The engine's federation hooks: training budgets (run exactly N optimizer steps, then report),
// installing an adapter into the shadow (and through the quality gate into the live adapter), and
// run-time training shares, all applied on the engine thread at step boundaries.
#include <ATen/ATen.h>

#include <chrono>
#include <future>

#include "collm/engine/engine.h"
#include "gtest/gtest.h"
#include "testing/engine_fixture.h"

namespace collm::engine {
namespace {

constexpr auto kWait = std::chrono::seconds(120);

using collm::testing::EnginePatternExamples;

struct Env : collm::testing::EngineFixture {
  Env() : EngineFixture(/*keep_versions=*/100) {}

  TrainingSetup Setup(bool quality_gate) {
    TrainingSetup s = MakeTrainingSetup(/*micro_batch=*/4);
    PublishOptions p;  // every_steps = 0: only the hooks publish.
    p.quality_gate = quality_gate;
    s.publisher = MakePublisher(p);
    return s;
  }

  std::unique_ptr<Engine> Make(double share, bool quality_gate = true) {
    EngineOptions o;
    o.training_share = share;
    auto e = Engine::Create(model, nullptr, &registry, o).value();
    EXPECT_TRUE(e->EnableTraining(Setup(quality_gate)).ok());
    return e;
  }

  double Loss(const lora::LoraAdapter& a) const {
    auto w = a.ToWeights(model->config(), model->runtime()).value();
    return EvaluateLoss(*model, &w, EnginePatternExamples(8, 2)).value();
  }
};

double MaxAbsDiff(const lora::LoraAdapter& x, const lora::LoraAdapter& y) {
  double m = 0;
  for (size_t l = 0; l < x.factors.layers.size(); ++l) {
    for (int t = 0; t < runtime::kNumLoraTargets; ++t) {
      const auto& a = x.factors.layers[l][t];
      const auto& b = y.factors.layers[l][t];
      if (!a.a.defined()) continue;
      m = std::max(m, (a.a - b.a).abs().max().item<double>());
      m = std::max(m, (a.b - b.b).abs().max().item<double>());
    }
  }
  return m;
}

TEST(FederationHooksTest, TaskRunsExactlyItsBudgetThenReportsTheSnapshot) {
  Env e;
  auto engine = e.Make(/*share=*/0);  // No training until the task asks for it.
  engine->Start();
  TrainingTask task;
  task.optimizer_steps = 5;
  task.training_share = 1.0;
  task.share_after = 0;  // Stop after the budget, so the step count below is exact.
  auto future = engine->RunTrainingTask(task);
  ASSERT_EQ(future.wait_for(kWait), std::future_status::ready);
  TrainingReport r = future.get();
  ASSERT_TRUE(r.status.ok()) << r.status;
  EXPECT_EQ(r.optimizer_steps, 5);
  EXPECT_EQ(r.num_samples, 5 * 4);  // micro_batch 4, one micro-batch per step.
  EXPECT_GT(r.mean_train_loss, 0);
  // The report's held-out loss is that of exactly the snapshot it carries.
  ASSERT_GE(r.held_out_loss, 0);
  EXPECT_NEAR(r.held_out_loss, e.Loss(r.adapter), 1e-4);
  EXPECT_LT(r.held_out_loss, e.Loss(e.initial)) << "five steps on the pattern should help";
  engine->Shutdown(1);
  EngineStats st = engine->Stats();
  EXPECT_EQ(st.train_optimizer_steps, 5) << "share_after = 0 must stop training after the budget";
  EXPECT_EQ(st.training_share, 0);
  EXPECT_FALSE(st.training_task_active);
}

TEST(FederationHooksTest, InstallLoadsTheShadowAndTheGateDecidesWhatGoesLive) {
  Env e;
  auto engine = e.Make(0);
  engine->Start();
  // A trained adapter: the result of a budget.
  TrainingTask task;
  task.optimizer_steps = 6;
  task.training_share = 1.0;
  task.share_after = 0;
  auto trained_future = engine->RunTrainingTask(task);
  ASSERT_EQ(trained_future.wait_for(kWait), std::future_status::ready);
  TrainingReport trained = trained_future.get();
  ASSERT_TRUE(trained.status.ok()) << trained.status;

  // Installing it with publish: it beats the live (initial) adapter on held-out, so it goes live.
  InstallOptions publish;
  publish.publish = true;
  publish.source = "global v7";
  auto installed = engine->InstallAdapter(trained.adapter.Clone(), publish);
  ASSERT_EQ(installed.wait_for(kWait), std::future_status::ready);
  InstallResult ir = installed.get();
  ASSERT_TRUE(ir.status.ok()) << ir.status;
  EXPECT_TRUE(ir.published) << ir.decision;
  auto live = e.registry.Get("live").value();
  EXPECT_EQ(live->version, 2);
  EXPECT_EQ(live->source, "global v7");
  EXPECT_LT(MaxAbsDiff(live->adapter, trained.adapter), 1e-7);

  // The initial adapter is worse than what is live now: installed into the shadow, but the gate
  // keeps it out of the live adapter.
  auto worse = engine->InstallAdapter(e.initial.Clone(), publish);
  ASSERT_EQ(worse.wait_for(kWait), std::future_status::ready);
  InstallResult wr = worse.get();
  ASSERT_TRUE(wr.status.ok()) << wr.status;
  EXPECT_FALSE(wr.published);
  EXPECT_NE(wr.decision.find("kept training"), std::string::npos) << wr.decision;
  EXPECT_EQ(e.registry.Get("live").value()->version, 2);
  EXPECT_EQ(engine->Stats().publish.rejected, 1);

  // The shadow holds the installed adapter: one step at a negligible lr reports it unchanged.
  task.optimizer_steps = 1;
  task.lr = 1e-12;
  auto probe = engine->RunTrainingTask(task);
  ASSERT_EQ(probe.wait_for(kWait), std::future_status::ready);
  TrainingReport pr = probe.get();
  ASSERT_TRUE(pr.status.ok()) << pr.status;
  EXPECT_LT(MaxAbsDiff(pr.adapter, e.initial), 1e-6);
  engine->Shutdown(1);
}

TEST(FederationHooksTest, InstallCancelsARunningTaskAndEarlyFinishReportsAPartialUpdate) {
  Env e;
  auto engine = e.Make(0);  // Driven step by step on this thread.
  TrainingTask task;
  task.optimizer_steps = 100;
  task.training_share = 1.0;
  auto first = engine->RunTrainingTask(task);
  auto install = engine->InstallAdapter(e.initial.Clone(), InstallOptions{});
  ASSERT_TRUE(engine->StepForTest());  // Starts the task, then the install supersedes it.
  ASSERT_EQ(first.wait_for(std::chrono::seconds(0)), std::future_status::ready);
  TrainingReport fr = first.get();
  EXPECT_EQ(fr.status.code(), absl::StatusCode::kCancelled) << fr.status;
  EXPECT_TRUE(install.get().status.ok());

  auto second = engine->RunTrainingTask(task);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(engine->StepForTest());  // One optimizer step each.
  EXPECT_TRUE(engine->Stats().training_task_active);
  engine->FinishTrainingTaskEarly();
  engine->StepForTest();
  ASSERT_EQ(second.wait_for(std::chrono::seconds(0)), std::future_status::ready);
  TrainingReport sr = second.get();
  ASSERT_TRUE(sr.status.ok()) << sr.status;
  EXPECT_EQ(sr.optimizer_steps, 3);
  EXPECT_EQ(sr.num_samples, 12);
  EXPECT_GT(MaxAbsDiff(sr.adapter, e.initial), 0);

  // Cut short before any step: nothing to upload.
  auto third = engine->RunTrainingTask(task);
  engine->FinishTrainingTaskEarly();
  engine->StepForTest();
  EXPECT_EQ(third.get().status.code(), absl::StatusCode::kAborted);
}

TEST(FederationHooksTest, TaskTrainingStaysUnderTheSloGuard) {
  Env e;
  FakeClock clock(1'000'000'000);
  auto model_tokenizer =
      runtime::Tokenizer::Load(collm::testing::TinyModelDir() + "/tokenizer.model").value();
  EngineOptions o;
  o.training_share = 0;
  o.guard_safety = 1.0;
  o.share_controller.enabled = false;  // The SLO guard alone (the controller: coexecution_test).
  o.slo_classes["tight"] = {0, 10};
  auto engine = Engine::Create(e.model, model_tokenizer.get(), &e.registry, o, clock).value();
  ASSERT_TRUE(engine->EnableTraining(e.Setup(true)).ok());
  EngineRequest r;
  r.prompt = model_tokenizer->Encode("hello there", true);
  r.params.max_tokens = 50;
  r.params.ignore_eos = true;
  r.slo_class = "tight";
  ASSERT_TRUE(engine->Submit(r, nullptr).ok());
  TrainingTask task;
  task.optimizer_steps = 2;
  task.training_share = 1.0;
  auto future = engine->RunTrainingTask(task);
  // A 10 ms TPOT objective leaves no room for a 100 ms-per-token phase: the budget waits.
  for (int i = 0; i < 5; ++i) {
    engine->SetCostEstimatesForTest(0.010, 0.100);
    ASSERT_TRUE(engine->StepForTest());
    clock.AdvanceSeconds(0.010);
  }
  EXPECT_EQ(engine->Stats().train_micro_steps, 0);
  EXPECT_EQ(engine->Stats().train_guard_blocked, 5);
  EXPECT_EQ(future.wait_for(std::chrono::seconds(0)), std::future_status::timeout);
  engine->Cancel(1);
  // Idle again: the budget proceeds and completes.
  for (int i = 0; i < 4 && future.wait_for(std::chrono::seconds(0)) != std::future_status::ready;
       ++i) {
    engine->StepForTest();
  }
  ASSERT_EQ(future.wait_for(std::chrono::seconds(0)), std::future_status::ready);
  EXPECT_EQ(future.get().optimizer_steps, 2);
}

TEST(FederationHooksTest, BadArgumentsAndShutdownAreReportedNotHung) {
  Env e;
  auto engine = e.Make(0);
  EXPECT_EQ(engine->SetTrainingShare(1.5).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine->SetTrainingShare(-0.1).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(engine->SetTrainingShare(0.25).ok());
  engine->StepForTest();
  EXPECT_EQ(engine->Stats().training_share, 0.25);

  TrainingTask bad;
  bad.optimizer_steps = 0;
  auto r = engine->RunTrainingTask(bad).get();
  EXPECT_EQ(r.status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(r.status.message()).find("optimizer_steps"), std::string::npos);
  bad.optimizer_steps = 1;
  bad.training_share = 2;
  r = engine->RunTrainingTask(bad).get();
  EXPECT_NE(std::string(r.status.message()).find("training_share"), std::string::npos);

  // An adapter of another shape is refused by the shadow, naming why.
  lora::LoraConfig c;
  c.rank = 8;
  c.targets = {runtime::LoraTarget::kQ};
  auto other = lora::LoraAdapter::Create(e.model->config(), c, 3).value();
  auto install = engine->InstallAdapter(other, InstallOptions{});
  engine->StepForTest();
  InstallResult ir = install.get();
  EXPECT_EQ(ir.status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(ir.status.message()).find("rank"), std::string::npos) << ir.status;

  // Pending work is settled at shutdown; later calls are refused at once.
  TrainingTask task;
  task.optimizer_steps = 3;
  task.training_share = 0;  // Never trains: only Shutdown can end it.
  auto pending = engine->RunTrainingTask(task);
  engine->Shutdown(0);
  EXPECT_EQ(pending.get().status.code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(engine->RunTrainingTask(task).get().status.code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(engine->InstallAdapter(e.initial, {}).get().status.code(),
            absl::StatusCode::kCancelled);

  // Without training the hooks say so.
  EngineOptions o;
  auto plain = Engine::Create(e.model, nullptr, &e.registry, o).value();
  EXPECT_EQ(plain->RunTrainingTask(task).get().status.code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(plain->InstallAdapter(e.initial, {}).get().status.code(),
            absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace collm::engine
