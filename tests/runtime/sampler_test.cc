#include "collm/runtime/sampler.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "gtest/gtest.h"

namespace collm::runtime {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

SamplingParams Params(float temperature, uint64_t seed = 0) {
  SamplingParams params;
  params.temperature = temperature;
  params.seed = seed;
  return params;
}

// Draws `n` tokens from fresh copies of `logits` (Sample modifies them in place).
std::vector<int32_t> Draw(Sampler& sampler, const std::vector<float>& logits, int n,
                          const std::vector<int32_t>& context = {}) {
  std::vector<int32_t> out;
  for (int i = 0; i < n; ++i) {
    std::vector<float> copy = logits;
    out.push_back(sampler.Sample(absl::MakeSpan(copy), context));
  }
  return out;
}

std::vector<double> Frequencies(const std::vector<int32_t>& draws, size_t vocab) {
  std::vector<double> freq(vocab, 0.0);
  for (int32_t id : draws) freq.at(id) += 1.0 / draws.size();
  return freq;
}

std::vector<float> RandomLogits(size_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> logits(vocab);
  for (float& logit : logits) logit = normal(rng);
  return logits;
}

int32_t ArgmaxOf(const std::vector<float>& logits) {
  int32_t best = 0;
  for (size_t i = 1; i < logits.size(); ++i) {
    if (logits[i] > logits[best]) best = static_cast<int32_t>(i);
  }
  return best;
}

TEST(SamplingParamsTest, DefaultsAreValid) { EXPECT_TRUE(SamplingParams().Validate().ok()); }

TEST(SamplingParamsTest, ErrorsNameTheFieldAndValue) {
  struct Case {
    void (*mutate)(SamplingParams&);
    std::string field;
    std::string value;
  };
  const std::vector<Case> cases = {
      {[](SamplingParams& p) { p.temperature = -1.0f; }, "temperature", "-1"},
      {[](SamplingParams& p) { p.temperature = std::nanf(""); }, "temperature", "nan"},
      {[](SamplingParams& p) { p.temperature = kInf; }, "temperature", "inf"},
      {[](SamplingParams& p) { p.top_k = -3; }, "top_k", "-3"},
      {[](SamplingParams& p) { p.top_p = 1.5f; }, "top_p", "1.5"},
      {[](SamplingParams& p) { p.top_p = 0.0f; }, "top_p", "0"},
      {[](SamplingParams& p) { p.top_p = std::nanf(""); }, "top_p", "nan"},
      {[](SamplingParams& p) { p.min_p = 1.0f; }, "min_p", "1"},
      {[](SamplingParams& p) { p.min_p = -0.25f; }, "min_p", "-0.25"},
      {[](SamplingParams& p) { p.min_p = std::nanf(""); }, "min_p", "nan"},
      {[](SamplingParams& p) { p.repetition_penalty = 0.0f; }, "repetition_penalty", "0"},
      {[](SamplingParams& p) { p.repetition_penalty = std::nanf(""); }, "repetition_penalty",
       "nan"},
      {[](SamplingParams& p) { p.max_tokens = 0; }, "max_tokens", "0"},
  };
  for (const Case& c : cases) {
    SamplingParams params;
    c.mutate(params);
    absl::Status status = params.Validate();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.field;
    EXPECT_TRUE(absl::StrContains(status.message(), c.field)) << status;
    EXPECT_TRUE(absl::StrContains(status.message(), "got " + c.value)) << status;
  }
  SamplingParams edge;
  edge.temperature = 0.0f;
  edge.top_p = 1.0f;
  edge.min_p = 0.0f;
  edge.top_k = 0;
  EXPECT_TRUE(edge.Validate().ok());
}

TEST(SamplerTest, GreedyPicksArgmaxLowestIdOnTies) {
  Sampler sampler(Params(0.0f));
  std::vector<float> logits = {0.1f, 2.0f, -1.0f, 2.0f};
  EXPECT_EQ(sampler.Sample(absl::MakeSpan(logits), {}), 1);
  const std::vector<float> random = RandomLogits(32000, 3);
  EXPECT_EQ(Draw(sampler, random, 1)[0], ArgmaxOf(random));
}

TEST(SamplerTest, SameSeedSameSequenceDifferentSeedDifferent) {
  const std::vector<float> logits = RandomLogits(100, 5);
  SamplingParams params = Params(1.5f, 42);
  params.top_p = 0.95f;
  params.top_k = 50;
  Sampler a(params), b(params);
  params.seed = 43;
  Sampler c(params);
  const std::vector<int32_t> from_a = Draw(a, logits, 200);
  EXPECT_EQ(from_a, Draw(b, logits, 200));
  EXPECT_NE(from_a, Draw(c, logits, 200));
}

TEST(SamplerTest, TopKOneIsGreedy) {
  const std::vector<float> logits = RandomLogits(1000, 7);
  SamplingParams params = Params(2.0f, 1);
  params.top_k = 1;
  Sampler sampler(params);
  for (int32_t id : Draw(sampler, logits, 100)) EXPECT_EQ(id, ArgmaxOf(logits));
}

TEST(SamplerTest, TinyTopPIsGreedy) {
  const std::vector<float> logits = RandomLogits(50000, 8);
  SamplingParams params = Params(1.0f, 2);
  params.top_p = 1e-6f;
  Sampler sampler(params);
  for (int32_t id : Draw(sampler, logits, 50)) EXPECT_EQ(id, ArgmaxOf(logits));
}

TEST(SamplerTest, TopKKeepsOnlyTheKMostLikely) {
  const std::vector<float> logits = {0.0f, 3.0f, 1.0f, 2.9f, -2.0f, 2.8f};
  SamplingParams params = Params(5.0f, 3);
  params.top_k = 3;
  Sampler sampler(params);
  const std::vector<double> freq = Frequencies(Draw(sampler, logits, 3000), logits.size());
  EXPECT_EQ(freq[0] + freq[2] + freq[4], 0.0);
  EXPECT_GT(freq[1], 0.2);
  EXPECT_GT(freq[3], 0.2);
  EXPECT_GT(freq[5], 0.2);
}

TEST(SamplerTest, TopPKeepsSmallestNucleus) {
  // Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.8 keeps exactly the first two.
  const std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.15f),
                                     std::log(0.05f)};
  SamplingParams params = Params(1.0f, 4);
  params.top_p = 0.79f;
  Sampler sampler(params);
  const std::vector<double> freq = Frequencies(Draw(sampler, logits, 5000), logits.size());
  EXPECT_EQ(freq[2] + freq[3], 0.0);
  EXPECT_NEAR(freq[0], 0.5 / 0.8, 0.03);
}

TEST(SamplerTest, MinPFiltersRelativeToMax) {
  const std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.15f),
                                     std::log(0.05f)};
  SamplingParams params = Params(1.0f, 5);
  params.min_p = 0.5f;  // Keeps p >= 0.25.
  Sampler sampler(params);
  const std::vector<double> freq = Frequencies(Draw(sampler, logits, 5000), logits.size());
  EXPECT_EQ(freq[2] + freq[3], 0.0);
  EXPECT_NEAR(freq[0], 0.5 / 0.8, 0.03);
  EXPECT_NEAR(freq[1], 0.3 / 0.8, 0.03);
}

TEST(SamplerTest, RepetitionPenaltyChangesArgmax) {
  SamplingParams params = Params(0.0f);
  params.repetition_penalty = 1.2f;
  Sampler sampler(params);
  // 2.0 / 1.2 = 1.67 < 1.9, so the repeated token 0 loses. Repeats and bad ids count once / not.
  std::vector<float> logits = {2.0f, 1.9f, -1.0f};
  EXPECT_EQ(sampler.Sample(absl::MakeSpan(logits), {0, 0, 0, -4, 99}), 1);
  EXPECT_FLOAT_EQ(logits[0], 2.0f / 1.2f);
  // Negative logits are multiplied: -0.5 * 1.2 = -0.6 < -0.55.
  std::vector<float> negative = {-0.5f, -0.55f};
  EXPECT_EQ(sampler.Sample(absl::MakeSpan(negative), {0}), 1);
  std::vector<float> untouched = {2.0f, 1.9f};
  EXPECT_EQ(sampler.Sample(absl::MakeSpan(untouched), {}), 0);
}

TEST(SamplerTest, EmpiricalDistributionMatchesSoftmax) {
  const std::vector<float> logits = {1.0f, 0.5f, 0.0f, -1.0f};
  double z = 0.0;
  for (float l : logits) z += std::exp(l);
  Sampler sampler(Params(1.0f, 6));
  const std::vector<double> freq = Frequencies(Draw(sampler, logits, 20000), logits.size());
  for (size_t i = 0; i < logits.size(); ++i) {
    EXPECT_NEAR(freq[i], std::exp(logits[i]) / z, 0.015) << i;
  }
}

TEST(SamplerTest, LowerTemperatureIsSharper) {
  const std::vector<float> logits = {1.0f, 0.5f, 0.0f, -1.0f};
  double previous = 1.0;
  for (float temperature : {0.25f, 1.0f, 4.0f}) {
    Sampler sampler(Params(temperature, 7));
    const double top = Frequencies(Draw(sampler, logits, 4000), logits.size())[0];
    EXPECT_LT(top, previous) << temperature;
    previous = top;
  }
}

TEST(SamplerTest, HandlesNanAndInfiniteLogits) {
  Sampler sampler(Params(1.0f, 8));
  const float nan = std::nanf("");
  for (int32_t id : Draw(sampler, {nan, -kInf, 1.0f, -kInf, nan}, 100)) EXPECT_EQ(id, 2);
  for (int32_t id : Draw(sampler, {0.0f, kInf, 1.0f}, 100)) EXPECT_EQ(id, 1);
  const int32_t masked = Draw(sampler, {-kInf, nan, -kInf}, 1)[0];
  EXPECT_GE(masked, 0);
  EXPECT_LT(masked, 3);
  Sampler greedy(Params(0.0f));
  EXPECT_EQ(Draw(greedy, {nan, -kInf, 0.5f}, 1)[0], 2);
  Sampler cold(Params(1e-6f, 9));
  EXPECT_EQ(Draw(cold, {1.0f, 2.0f, 1.5f}, 1)[0], 1);
}

TEST(SamplerTest, LargeVocabularyCombinedFilters) {
  const std::vector<float> logits = RandomLogits(150000, 10);
  SamplingParams params = Params(0.8f, 11);
  params.top_p = 0.9f;
  params.min_p = 0.01f;
  Sampler sampler(params);
  for (int32_t id : Draw(sampler, logits, 50, {1, 2, 3})) {
    EXPECT_GE(id, 0);
    EXPECT_LT(id, 150000);
    EXPECT_GT(logits[id], 5.0f);  // Far into the upper tail of N(0, 3).
  }
}

TEST(StopStringMatcherTest, PassesTextThroughWithoutStops) {
  StopStringMatcher matcher({});
  EXPECT_EQ(matcher.Push("Hello"), "Hello");
  EXPECT_EQ(matcher.Push(" world"), " world");
  EXPECT_EQ(matcher.Finish(), "");
  EXPECT_FALSE(matcher.stopped());
}

TEST(StopStringMatcherTest, FindsStopSplitAcrossDeltas) {
  StopStringMatcher matcher({"END"});
  EXPECT_EQ(matcher.Push("Hello E"), "Hello ");
  EXPECT_EQ(matcher.Push("N"), "");
  EXPECT_FALSE(matcher.stopped());
  EXPECT_EQ(matcher.Push("D and more"), "");
  EXPECT_TRUE(matcher.stopped());
  EXPECT_EQ(matcher.Push("later"), "");
  EXPECT_EQ(matcher.Finish(), "");
}

TEST(StopStringMatcherTest, ReturnsTextBeforeStopInSameDelta) {
  StopStringMatcher matcher({"\n\n"});
  EXPECT_EQ(matcher.Push("one\ntwo\n\nthree"), "one\ntwo");
  EXPECT_TRUE(matcher.stopped());
}

TEST(StopStringMatcherTest, ReleasesHeldBackPrefix) {
  StopStringMatcher matcher({"END"});
  EXPECT_EQ(matcher.Push("abc EN"), "abc ");
  EXPECT_EQ(matcher.Push("x"), "ENx");  // Diverged: no longer a possible stop.
  EXPECT_EQ(matcher.Push(" E"), " ");
  EXPECT_EQ(matcher.Finish(), "E");  // Generation ended without a match.
  EXPECT_FALSE(matcher.stopped());
}

TEST(StopStringMatcherTest, EarliestOfMultipleStopsWins) {
  StopStringMatcher matcher({"world", "lo", "hello"});
  EXPECT_EQ(matcher.Push("say hello world"), "say ");
  EXPECT_TRUE(matcher.stopped());

  StopStringMatcher later({"xyz", "wor"});
  EXPECT_EQ(later.Push("hello w"), "hello ");
  EXPECT_EQ(later.Push("orld xyz"), "");
  EXPECT_TRUE(later.stopped());
}

TEST(StopStringMatcherTest, IgnoresEmptyStopStrings) {
  StopStringMatcher matcher({"", "STOP"});
  EXPECT_EQ(matcher.Push("go on"), "go on");
  EXPECT_EQ(matcher.Push(" STOP now"), " ");
  EXPECT_TRUE(matcher.stopped());
}

TEST(StopStringMatcherTest, MultiByteStopStrings) {
  StopStringMatcher matcher({"世界"});
  EXPECT_EQ(matcher.Push("hi 世"), "hi ");
  EXPECT_EQ(matcher.Push("界!"), "");
  EXPECT_TRUE(matcher.stopped());
}

}  // namespace
}  // namespace collm::runtime
