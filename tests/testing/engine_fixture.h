// The set-up the engine tests share: the tiny random Llama with its tokenizer and an adapter
// registry, a trainer on a fresh rank-4 shadow adapter (published as "live" for the engine to
// serve), the pattern data it learns, and a sink that collects one request's output. Header-only;
// for test binaries that link collm_engine.
#ifndef COLLM_TESTING_ENGINE_FIXTURE_H_
#define COLLM_TESTING_ENGINE_FIXTURE_H_

#include <chrono>
#include <cstdint>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "collm/engine/engine.h"
#include "collm/runtime/generator.h"
#include "gtest/gtest.h"
#include "testing/pattern_examples.h"
#include "testing/tiny_model.h"

namespace collm::testing {

// Examples of the fixed completion 300, 305, ... the tiny model learns within a few steps.
inline std::vector<engine::TrainingExample> EnginePatternExamples(int n, uint32_t seed) {
  return FixedCompletionExamples(n, seed, 300, 5);
}

// Collects one request's output. Thread-safe; read after Wait().
class CollectingSink : public engine::RequestSink {
 public:
  void OnDelta(const std::string& text, const std::vector<int32_t>& ids) override {
    std::lock_guard<std::mutex> lock(mu_);
    text_ += text;
    if (!ids.empty()) ids_.insert(ids_.end(), ids.begin(), ids.end());
    ++deltas_;
  }
  void OnFinish(const engine::RequestResult& result) override {
    std::lock_guard<std::mutex> lock(mu_);
    result_ = result;
    done_.set_value();
  }
  bool Wait(double seconds = 60) {
    return future_.wait_for(std::chrono::duration<double>(seconds)) == std::future_status::ready;
  }
  std::string text() {
    std::lock_guard<std::mutex> l(mu_);
    return text_;
  }
  std::vector<int32_t> ids() {
    std::lock_guard<std::mutex> l(mu_);
    return ids_;
  }
  int deltas() {
    std::lock_guard<std::mutex> l(mu_);
    return deltas_;
  }
  engine::RequestResult result() {
    std::lock_guard<std::mutex> l(mu_);
    return result_;
  }

 private:
  std::mutex mu_;
  std::string text_;
  std::vector<int32_t> ids_;
  int deltas_ = 0;
  engine::RequestResult result_;
  std::promise<void> done_;
  std::future<void> future_ = done_.get_future();
};

// The tiny model, its tokenizer and a registry keeping `keep_versions` versions per adapter.
struct EngineFixture {
  explicit EngineFixture(int keep_versions = 4)
      : registry(model->config(), model->runtime(), Clock::Real(), keep_versions) {}

  // A trainer (lr 1e-2, `micro_batch` examples per micro-step) on a fresh rank-4 adapter over
  // Q, V and Down, which is also published as "live" (kept in `initial`); 64 pattern examples.
  engine::TrainingSetup MakeTrainingSetup(int64_t micro_batch) {
    lora::LoraConfig c;
    c.rank = 4;
    c.dropout = 0;
    c.targets = {runtime::LoraTarget::kQ, runtime::LoraTarget::kV, runtime::LoraTarget::kDown};
    engine::TrainerOptions o;
    o.lr = 1e-2;
    o.micro_batch_size = micro_batch;
    initial = lora::LoraAdapter::Create(model->config(), c, 1).value();
    EXPECT_TRUE(registry.Publish("live", initial, "initial").ok());
    engine::TrainingSetup s;
    s.trainer =
        engine::PeftTrainer::Create(model, lora::ShadowAdapter::Create(initial, o.adamw).value(), o)
            .value();
    s.dataset = EnginePatternExamples(64, 1);
    return s;
  }

  // A publisher to "live" judged on 8 held-out pattern examples.
  std::unique_ptr<engine::ShadowPublisher> MakePublisher(engine::PublishOptions options) {
    return std::make_unique<engine::ShadowPublisher>(model, registry, "live", options,
                                                     EnginePatternExamples(8, 2));
  }

  // What `r` generates alone, outside the engine (the reference batching must match).
  std::vector<int32_t> Alone(const engine::EngineRequest& r,
                             const runtime::LoraWeights* weights = nullptr) const {
    runtime::Generator gen(model, tokenizer.get());
    runtime::GenerationRequest g;
    g.prompt = r.prompt;
    g.params = r.params;
    g.adapter = weights;
    return gen.Generate({g}).value()[0].tokens;
  }

  std::shared_ptr<const runtime::LlamaModel> model =
      runtime::LlamaModel::Load(TinyModelDir(), runtime::RuntimeOptions{}).value();
  std::unique_ptr<runtime::Tokenizer> tokenizer =
      runtime::Tokenizer::Load(TinyModelDir() + "/tokenizer.model").value();
  lora::AdapterRegistry registry;
  lora::LoraAdapter initial;
};

}  // namespace collm::testing

#endif  // COLLM_TESTING_ENGINE_FIXTURE_H_
