// SLO-aware admission in the engine (EngineOptions::admission), on a fake clock with a fixed
// step cost: 10 ms per step, 16 tokens per step, so a request's predicted TTFT is its queueing so
// far plus 10 ms per 16 prompt tokens queued ahead of it and its own.
#include <memory>
#include <string>
#include <vector>

#include "collm/engine/engine.h"
#include "gtest/gtest.h"
#include "testing/engine_fixture.h"

namespace collm::engine {
namespace {

using collm::testing::CollectingSink;
using Env = collm::testing::EngineFixture;
constexpr int64_t kMs = 1'000'000;

EngineOptions Options(coordination::AdmissionMode mode) {
  EngineOptions o;
  o.max_step_tokens = 16;
  o.max_running = 1;
  o.admission = mode;
  o.slo_classes["fast"] = SloTarget{50, 0};
  o.slo_classes["batch"] = SloTarget{0, 0};  // No objective: never shed.
  return o;
}

// 16 prompt tokens (one step's budget), 2 generated.
EngineRequest Req(const std::string& slo_class, int seed) {
  EngineRequest r;
  for (int i = 0; i < 16; ++i) r.prompt.push_back(5 + (seed * 7 + i) % 200);
  r.params.temperature = 0;
  r.params.max_tokens = 2;
  r.params.ignore_eos = true;
  r.slo_class = slo_class;
  return r;
}

TEST(SloAdmissionTest, RejectsAtSubmitWhatCannotMakeItsTtftAndServesEveryAccepted) {
  Env e;
  FakeClock clock(1000 * kMs);
  telemetry::MetricsRegistry metrics;
  auto engine = Engine::Create(e.model, e.tokenizer.get(), nullptr,
                               Options(coordination::AdmissionMode::kReject), clock)
                    .value();
  engine->SetMetrics(&metrics);
  engine->SetCostEstimatesForTest(0.010, 0);
  // The k-th "fast" request waits for k requests of 16 tokens: (k + 1) x 10 ms. 50 ms: five fit.
  std::vector<std::shared_ptr<CollectingSink>> accepted;
  for (int k = 0; k < 5; ++k) {
    auto sink = std::make_shared<CollectingSink>();
    auto id = engine->Submit(Req("fast", k), sink);
    ASSERT_TRUE(id.ok()) << "request " << k << ": " << id.status();
    accepted.push_back(sink);
  }
  auto late = engine->Submit(Req("fast", 5), std::make_shared<CollectingSink>());
  ASSERT_EQ(late.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(late.status().message().find("cannot meet its TTFT objective of 50 ms"),
            std::string::npos)
      << late.status();
  EXPECT_NE(late.status().message().find("predicted 60 ms"), std::string::npos) << late.status();
  // Neither a class without an objective nor one under admission kNone is ever shed.
  auto batch = std::make_shared<CollectingSink>();
  ASSERT_TRUE(engine->Submit(Req("batch", 6), batch).ok());
  accepted.push_back(batch);
  EXPECT_EQ(engine->Stats().rejected_slo, 1);
  const std::string text = metrics.RenderPrometheus();
  EXPECT_NE(text.find("collm_requests_shed_total{reason=\"rejected\",slo_class=\"fast\"} 1"),
            std::string::npos)
      << text;

  engine->Shutdown(60);  // Drains: no accepted request is lost.
  for (size_t i = 0; i < accepted.size(); ++i) {
    ASSERT_TRUE(accepted[i]->Wait(0)) << i;
    EXPECT_TRUE(accepted[i]->result().status.ok()) << i << ": " << accepted[i]->result().status;
    EXPECT_EQ(accepted[i]->ids().size(), 2u) << i;
  }
}

TEST(SloAdmissionTest, QueuedRequestThatFallsBehindIsServedAfterThoseThatCanStillMakeIt) {
  Env e;
  FakeClock clock(1000 * kMs);
  auto engine = Engine::Create(e.model, e.tokenizer.get(), nullptr,
                               Options(coordination::AdmissionMode::kReject), clock)
                    .value();
  engine->SetCostEstimatesForTest(0.010, 0);
  auto first = std::make_shared<CollectingSink>(), second = std::make_shared<CollectingSink>();
  ASSERT_TRUE(engine->Submit(Req("fast", 1), first).ok());  // Predicted 10 ms.
  clock.AdvanceNanos(45 * kMs);
  // Behind the first: 20 ms, fits. The first has waited 45 ms; with its 10 ms step it is late.
  ASSERT_TRUE(engine->Submit(Req("fast", 2), second).ok());
  ASSERT_TRUE(engine->StepForTest());
  EXPECT_EQ(engine->Stats().deprioritized, 1);
  EXPECT_EQ(second->ids().size(), 1u);  // Prefilled first, its first token out.
  EXPECT_TRUE(first->ids().empty());
  engine->Shutdown(60);
  ASSERT_TRUE(first->Wait(0));
  EXPECT_TRUE(first->result().status.ok()) << first->result().status;  // Late, but served.
  EXPECT_EQ(first->ids().size(), 2u);
  EXPECT_TRUE(second->result().status.ok());
}

TEST(SloAdmissionTest, DeprioritizeAcceptsButQueuesBehindRequestsThatCanMakeIt) {
  Env e;
  FakeClock clock(1000 * kMs);
  auto engine = Engine::Create(e.model, e.tokenizer.get(), nullptr,
                               Options(coordination::AdmissionMode::kDeprioritize), clock)
                    .value();
  engine->SetCostEstimatesForTest(0.010, 0);
  std::vector<std::shared_ptr<CollectingSink>> sinks;
  for (int k = 0; k < 6; ++k) {
    sinks.push_back(std::make_shared<CollectingSink>());
    ASSERT_TRUE(engine->Submit(Req("fast", k), sinks.back()).ok()) << k;
  }
  EXPECT_EQ(engine->Stats().deprioritized, 1);  // The sixth: predicted 60 ms.
  // A class without an objective is never deprioritised: it queues in front of the sixth.
  auto batch = std::make_shared<CollectingSink>();
  ASSERT_TRUE(engine->Submit(Req("batch", 9), batch).ok());
  EXPECT_EQ(engine->Stats().deprioritized, 1);
  // Serve the five in front and the batch request (one at a time, 2 tokens each: 2 steps each).
  for (int i = 0; i < 12; ++i) ASSERT_TRUE(engine->StepForTest());
  for (int k = 0; k < 5; ++k) EXPECT_TRUE(sinks[k]->Wait(0)) << k;
  EXPECT_TRUE(batch->Wait(0));
  EXPECT_FALSE(sinks[5]->Wait(0));  // Last, but not lost:
  engine->Shutdown(60);
  ASSERT_TRUE(sinks[5]->Wait(0));
  EXPECT_TRUE(sinks[5]->result().status.ok());
}

TEST(SloAdmissionTest, NoneAdmitsEverythingFirstComeFirstServed) {
  Env e;
  FakeClock clock(1000 * kMs);
  auto engine = Engine::Create(e.model, e.tokenizer.get(), nullptr,
                               Options(coordination::AdmissionMode::kNone), clock)
                    .value();
  engine->SetCostEstimatesForTest(0.010, 0);
  for (int k = 0; k < 8; ++k) {
    ASSERT_TRUE(engine->Submit(Req("fast", k), std::make_shared<CollectingSink>()).ok()) << k;
  }
  EXPECT_EQ(engine->Stats().rejected_slo, 0);
  EXPECT_EQ(engine->Stats().deprioritized, 0);
  engine->Shutdown(60);
  EXPECT_EQ(engine->Stats().completed, 8);
}

}  // namespace
}  // namespace collm::engine
