#include "collm/engine/engine.h"

#include <ATen/ATen.h>

#include <atomic>
#include <chrono>
#include <future>
#include <thread>

#include "gtest/gtest.h"
#include "testing/engine_fixture.h"

namespace collm::engine {
namespace {

using collm::testing::CollectingSink;
using Env = collm::testing::EngineFixture;

EngineRequest Req(const runtime::Tokenizer& tok, const std::string& prompt, float temperature,
                  uint64_t seed, int max_tokens) {
  EngineRequest r;
  r.prompt = tok.Encode(prompt, true);
  r.params.temperature = temperature;
  r.params.seed = seed;
  r.params.max_tokens = max_tokens;
  r.params.ignore_eos = true;
  return r;
}

TEST(EngineTest, ContinuousBatchingMatchesEachRequestAlone) {
  Env e;
  EngineOptions o;
  o.max_step_tokens = 12;  // Forces chunked prefill and prefill/decode mixing.
  o.max_running = 5;       // Forces queueing: sequences join as others leave.
  auto engine = Engine::Create(e.model, e.tokenizer.get(), nullptr, o).value();
  engine->Start();
  std::vector<EngineRequest> reqs;
  std::vector<std::shared_ptr<CollectingSink>> sinks;
  for (int i = 0; i < 12; ++i) {
    std::string prompt = "Once upon a time number " + std::to_string(i);
    for (int k = 0; k < i % 4; ++k) prompt += " and the little dog ran to the park";
    reqs.push_back(Req(*e.tokenizer, prompt, i % 3 == 0 ? 0.0f : 0.9f, 100 + i, 5 + (i * 7) % 17));
    sinks.push_back(std::make_shared<CollectingSink>());
    ASSERT_TRUE(engine->Submit(reqs.back(), sinks.back()).ok());
  }
  for (size_t i = 0; i < reqs.size(); ++i) {
    ASSERT_TRUE(sinks[i]->Wait()) << "request " << i;
    EXPECT_TRUE(sinks[i]->result().status.ok()) << sinks[i]->result().status;
    EXPECT_EQ(sinks[i]->ids(), e.Alone(reqs[i])) << "request " << i;
    EXPECT_EQ(sinks[i]->result().completion_tokens, reqs[i].params.max_tokens);
    EXPECT_EQ(sinks[i]->result().finish_reason, runtime::FinishReason::kLength);
  }
  engine->Shutdown(1);
  EngineStats st = engine->Stats();
  EXPECT_EQ(st.completed, 12);
  EXPECT_EQ(st.kv_blocks_used, 0);
  EXPECT_LE(st.last_batch_tokens, 12);
}

TEST(EngineTest, InvalidRequestsNameTheField) {
  Env e;
  EngineOptions o;
  o.slo_classes["interactive"] = {500, 50};
  o.kv_cache.num_blocks = 4;
  auto engine = Engine::Create(e.model, e.tokenizer.get(), &e.registry, o).value();
  auto sink = std::make_shared<CollectingSink>();
  auto expect = [&](EngineRequest r, absl::StatusCode code, const std::string& needle) {
    auto s = engine->Submit(std::move(r), sink);
    ASSERT_FALSE(s.ok());
    EXPECT_EQ(s.status().code(), code) << s.status();
    EXPECT_NE(std::string(s.status().message()).find(needle), std::string::npos) << s.status();
  };
  EngineRequest empty;
  expect(empty, absl::StatusCode::kInvalidArgument, "prompt is empty");
  auto r = Req(*e.tokenizer, "hi", 1, 0, 4);
  r.params.top_p = 2;
  expect(r, absl::StatusCode::kInvalidArgument, "top_p");
  r = Req(*e.tokenizer, "hi", 1, 0, 4);
  r.prompt.push_back(99999);
  expect(r, absl::StatusCode::kInvalidArgument, "vocabulary");
  r = Req(*e.tokenizer, "hi", 1, 0, 4);
  r.adapter = "nope";
  expect(r, absl::StatusCode::kNotFound, "nope");
  r = Req(*e.tokenizer, "hi", 1, 0, 4);
  r.slo_class = "batch";
  expect(r, absl::StatusCode::kInvalidArgument, "slo_class");
  r = Req(*e.tokenizer, "hi", 1, 0, 200);  // Needs more than 4 blocks of 16.
  expect(r, absl::StatusCode::kResourceExhausted, "KV blocks");
  EXPECT_EQ(engine->Stats().queued, 0);
}

TEST(EngineTest, FullQueueIsRefusedAtOnce) {
  Env e;
  EngineOptions o;
  o.max_queued = 2;
  auto engine = Engine::Create(e.model, e.tokenizer.get(), nullptr, o).value();  // Not started.
  auto sink = std::make_shared<CollectingSink>();
  ASSERT_TRUE(engine->Submit(Req(*e.tokenizer, "a", 1, 0, 3), sink).ok());
  ASSERT_TRUE(
      engine->Submit(Req(*e.tokenizer, "b", 1, 0, 3), std::make_shared<CollectingSink>()).ok());
  auto third = engine->Submit(Req(*e.tokenizer, "c", 1, 0, 3), std::make_shared<CollectingSink>());
  EXPECT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(engine->Stats().rejected_queue_full, 1);
  engine->Shutdown(10);  // Drains the two accepted ones.
  EXPECT_TRUE(sink->result().status.ok());
}

TEST(EngineTest, CancelledRequestFreesItsSequenceWithinOneStep) {
  Env e;
  FakeClock clock;
  auto engine = Engine::Create(e.model, e.tokenizer.get(), nullptr, EngineOptions{}, clock).value();
  auto sink = std::make_shared<CollectingSink>();
  auto id = engine->Submit(Req(*e.tokenizer, "Once upon a time", 1, 0, 100), sink).value();
  ASSERT_TRUE(engine->StepForTest());  // Prefill + first token.
  ASSERT_TRUE(engine->StepForTest());
  EXPECT_GT(engine->Stats().kv_blocks_used, 0);
  engine->Cancel(id);
  ASSERT_TRUE(engine->StepForTest());
  ASSERT_TRUE(sink->Wait(0));
  EXPECT_EQ(sink->result().status.code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(sink->result().completion_tokens, 2);
  EXPECT_EQ(engine->Stats().kv_blocks_used, 0);
  EXPECT_EQ(engine->Stats().cancelled, 1);
}

TEST(EngineTest, DeadlineExpiresQueuedAndRunningRequests) {
  Env e;
  FakeClock clock(1'000'000'000);
  EngineOptions o;
  o.max_running = 1;
  auto engine = Engine::Create(e.model, e.tokenizer.get(), nullptr, o, clock).value();
  auto running = std::make_shared<CollectingSink>(), queued = std::make_shared<CollectingSink>();
  auto r1 = Req(*e.tokenizer, "first", 1, 0, 50);
  r1.deadline_nanos = clock.NowNanos() + 2'000'000'000;
  auto r2 = Req(*e.tokenizer, "second", 1, 0, 50);
  r2.deadline_nanos = clock.NowNanos() + 1'000'000'000;
  ASSERT_TRUE(engine->Submit(r1, running).ok());
  ASSERT_TRUE(engine->Submit(r2, queued).ok());
  ASSERT_TRUE(engine->StepForTest());
  clock.AdvanceSeconds(1.5);  // r2 (still queued behind max_running 1) expires.
  ASSERT_TRUE(engine->StepForTest());
  ASSERT_TRUE(queued->Wait(0));
  EXPECT_EQ(queued->result().status.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(queued->result().completion_tokens, 0);
  clock.AdvanceSeconds(1.0);  // r1 expires while decoding.
  ASSERT_TRUE(engine->StepForTest());
  ASSERT_TRUE(running->Wait(0));
  EXPECT_EQ(running->result().status.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(engine->Stats().expired, 2);
  EXPECT_EQ(engine->Stats().kv_blocks_used, 0);
}

TEST(EngineTest, KvBoundAdmitsOnlyWhatFitsAndQueuesTheRest) {
  Env e;
  EngineOptions o;
  o.kv_cache.block_size = 16;
  o.kv_cache.num_blocks = 4;  // Two requests of <= 32 positions at a time.
  auto engine = Engine::Create(e.model, e.tokenizer.get(), nullptr, o).value();
  std::vector<std::shared_ptr<CollectingSink>> sinks;
  std::vector<EngineRequest> reqs;
  for (int i = 0; i < 5; ++i) {
    reqs.push_back(Req(*e.tokenizer, "The cat " + std::to_string(i), 0, 0, 20));
    sinks.push_back(std::make_shared<CollectingSink>());
    ASSERT_TRUE(engine->Submit(reqs.back(), sinks.back()).ok());
  }
  ASSERT_TRUE(engine->StepForTest());
  EXPECT_EQ(engine->Stats().running, 2);
  EXPECT_EQ(engine->Stats().queued, 3);
  while (engine->StepForTest()) {
  }
  for (size_t i = 0; i < sinks.size(); ++i) {
    ASSERT_TRUE(sinks[i]->Wait(0));
    EXPECT_EQ(sinks[i]->ids(), e.Alone(reqs[i]));
  }
}

TEST(EngineTest, RequestsKeepTheAdapterVersionTheyStartedWith) {
  Env e;
  lora::LoraConfig c;
  c.rank = 4;
  auto make = [&](uint64_t seed) {
    auto a = lora::LoraAdapter::Create(e.model->config(), c, seed).value();
    at::manual_seed(seed);
    for (auto& layer : a.factors.layers) {
      for (auto& f : layer) {
        if (f.b.defined()) f.b = at::randn_like(f.b) * 0.5;
      }
    }
    return a;
  };
  auto v1 = e.registry.Publish("live", make(1), "t").value();
  auto engine = Engine::Create(e.model, e.tokenizer.get(), &e.registry, EngineOptions{}).value();
  auto r = Req(*e.tokenizer, "Once upon a time", 0, 0, 12);
  r.adapter = "live";
  auto s1 = std::make_shared<CollectingSink>(), s2 = std::make_shared<CollectingSink>();
  ASSERT_TRUE(engine->Submit(r, s1).ok());
  ASSERT_TRUE(engine->StepForTest());
  auto v2 = e.registry.Publish("live", make(2), "t").value();  // Mid-request.
  ASSERT_TRUE(engine->Submit(r, s2).ok());
  while (engine->StepForTest()) {
  }
  EXPECT_EQ(s1->result().adapter_version, 1);
  EXPECT_EQ(s2->result().adapter_version, 2);
  EXPECT_EQ(s1->ids(), e.Alone(r, &v1->weights));
  EXPECT_EQ(s2->ids(), e.Alone(r, &v2->weights));
  EXPECT_NE(s1->ids(), s2->ids());
}

TEST(EngineTest, StreamedTextStopsAndShutdownDrains) {
  Env e;
  auto engine = Engine::Create(e.model, e.tokenizer.get(), nullptr, EngineOptions{}).value();
  engine->Start();
  auto free_run = std::make_shared<CollectingSink>();
  auto base = Req(*e.tokenizer, "Once", 0, 0, 30);
  ASSERT_TRUE(engine->Submit(base, free_run).ok());
  ASSERT_TRUE(free_run->Wait());
  const std::string full = free_run->text();
  ASSERT_GT(full.size(), 8u);
  auto stopped = std::make_shared<CollectingSink>();
  auto with_stop = base;
  with_stop.params.stop = {full.substr(full.size() / 2, 3)};
  ASSERT_TRUE(engine->Submit(with_stop, stopped).ok());
  ASSERT_TRUE(stopped->Wait());
  EXPECT_EQ(stopped->result().finish_reason, runtime::FinishReason::kStop);
  EXPECT_EQ(stopped->text(), full.substr(0, full.find(with_stop.params.stop[0])));

  std::vector<std::shared_ptr<CollectingSink>> sinks;
  for (int i = 0; i < 4; ++i) {
    sinks.push_back(std::make_shared<CollectingSink>());
    ASSERT_TRUE(
        engine->Submit(Req(*e.tokenizer, "x" + std::to_string(i), 1, i, 10), sinks.back()).ok());
  }
  engine->Shutdown(30);
  for (auto& s : sinks) {
    ASSERT_TRUE(s->Wait(0));
    EXPECT_TRUE(s->result().status.ok());
  }
  EXPECT_EQ(engine->Submit(base, std::make_shared<CollectingSink>()).status().code(),
            absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace collm::engine
