#include "collm/telemetry/metrics.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace collm::telemetry {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

std::vector<std::string> SplitLines(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

// A registry touching every feature of the exposition, with lint-clean names for promtool.
void FillSampleRegistry(MetricsRegistry& registry) {
  registry.GetCounter("collm_requests_total", "Requests served.", {{"adapter", "math"}})
      ->Increment(3);
  registry.GetCounter("collm_requests_total", "Requests served.", {{"adapter", "base"}})
      ->Increment();
  registry.GetGauge("collm_kv_blocks_used", "KV cache blocks in use.\nSee \\docs.")->Set(12.5);
  registry.GetGauge("collm_queue_depth", "Queued requests.", {{"path", "C:\\q \"x\"\nend"}})
      ->Set(-2);
  Histogram* h = registry.GetHistogram("collm_request_latency_seconds", "Request latency.",
                                       ExponentialBuckets(0.005, 10, 4), {{"adapter", "math"}});
  for (double v : {0.001, 0.02, 0.3, 7.0, kInf}) h->Observe(v);
  registry.GetHistogram("collm_tokens_generated", "Tokens per request.", {}, {})->Observe(5);
}

// --- Counter / Gauge ------------------------------------------------------------------------

TEST(CounterTest, AddsAndStartsAtZero) {
  Counter c;
  EXPECT_EQ(c.value(), 0);
  c.Increment();
  c.Increment(2.5);
  EXPECT_DOUBLE_EQ(c.value(), 3.5);
}

TEST(CounterTest, IgnoresNegativeAndNaNDeltas) {
  Counter c;
  c.Increment(5);
  c.Increment(-1);
  c.Increment(kNaN);
  c.Increment(0);
  EXPECT_EQ(c.value(), 5);
}

TEST(GaugeTest, SetsAndAddsBothWays) {
  Gauge g;
  EXPECT_EQ(g.value(), 0);
  g.Set(10);
  g.Add(-4);
  g.Add(0.5);
  EXPECT_DOUBLE_EQ(g.value(), 6.5);
  g.Set(-3);
  EXPECT_EQ(g.value(), -3);
}

// --- Histogram ------------------------------------------------------------------------------

TEST(HistogramTest, CountsCumulativelyWithInclusiveUpperBounds) {
  Histogram h({1, 2, 5});
  for (double v : {0.5, 1.0, 1.5, 2.0, 4.0, 5.0, 6.0, -3.0}) h.Observe(v);
  const Histogram::Snapshot snap = h.snapshot();
  EXPECT_EQ(snap.upper_bounds, (std::vector<double>{1, 2, 5}));
  // <=1: 0.5, 1.0, -3.0; <=2: +1.5, 2.0; <=5: +4.0, 5.0; +Inf: +6.0.
  EXPECT_EQ(snap.cumulative_counts, (std::vector<uint64_t>{3, 5, 7, 8}));
  EXPECT_EQ(snap.count, 8u);
  EXPECT_DOUBLE_EQ(snap.sum, 0.5 + 1 + 1.5 + 2 + 4 + 5 + 6 - 3);
}

TEST(HistogramTest, IgnoresNaN) {
  Histogram h({1});
  h.Observe(kNaN);
  h.Observe(0.5);
  h.Observe(kNaN);
  const Histogram::Snapshot snap = h.snapshot();
  EXPECT_EQ(snap.count, 1u);
  EXPECT_EQ(snap.sum, 0.5);
  EXPECT_EQ(snap.cumulative_counts, (std::vector<uint64_t>{1, 1}));
}

TEST(HistogramTest, InfinityGoesToTheInfBucket) {
  Histogram h({1});
  h.Observe(kInf);
  const Histogram::Snapshot snap = h.snapshot();
  EXPECT_EQ(snap.cumulative_counts, (std::vector<uint64_t>{0, 1}));
  EXPECT_EQ(snap.sum, kInf);
}

TEST(HistogramTest, EmptyBoundsKeepSumAndCount) {
  Histogram h({});
  h.Observe(2);
  h.Observe(3);
  const Histogram::Snapshot snap = h.snapshot();
  EXPECT_EQ(snap.cumulative_counts, (std::vector<uint64_t>{2}));
  EXPECT_EQ(snap.count, 2u);
  EXPECT_EQ(snap.sum, 5);
  EXPECT_TRUE(std::isnan(h.Quantile(0.5)));
}

TEST(HistogramTest, QuantilesOfUniformDataInterpolateLinearly) {
  std::vector<double> bounds;
  for (int b = 10; b <= 100; b += 10) bounds.push_back(b);
  Histogram h(bounds);
  for (int v = 1; v <= 100; ++v) h.Observe(v);  // 10 values per bucket.
  EXPECT_DOUBLE_EQ(h.Quantile(0.5), 50);
  EXPECT_DOUBLE_EQ(h.Quantile(0.25), 25);
  EXPECT_DOUBLE_EQ(h.Quantile(0.95), 95);
  EXPECT_DOUBLE_EQ(h.Quantile(0.99), 99);
  EXPECT_DOUBLE_EQ(h.Quantile(1.0), 100);
  EXPECT_DOUBLE_EQ(h.Quantile(0.05), 5);  // First bucket interpolates from 0.
  EXPECT_DOUBLE_EQ(h.Quantile(0.0), 0);
}

TEST(HistogramTest, QuantileInInfBucketReturnsHighestFiniteBound) {
  Histogram h({10, 20});
  for (int i = 0; i < 10; ++i) h.Observe(5);
  for (int i = 0; i < 10; ++i) h.Observe(1000);
  EXPECT_DOUBLE_EQ(h.Quantile(0.9), 20);
  EXPECT_DOUBLE_EQ(h.Quantile(0.25), 5);
  // Rank 10 is reached in the first bucket: its upper edge.
  EXPECT_DOUBLE_EQ(h.Quantile(0.5), 10);
}

TEST(HistogramTest, QuantileSkipsEmptyBucketsAndHandlesEdgeCases) {
  Histogram h({1, 2, 4});
  EXPECT_TRUE(std::isnan(h.Quantile(0.5)));  // Empty.
  for (int i = 0; i < 4; ++i) h.Observe(3);  // All in (2, 4].
  EXPECT_DOUBLE_EQ(h.Quantile(0.0), 2);
  EXPECT_DOUBLE_EQ(h.Quantile(0.5), 3);
  EXPECT_DOUBLE_EQ(h.Quantile(1.0), 4);
  EXPECT_EQ(h.Quantile(-0.1), -kInf);
  EXPECT_EQ(h.Quantile(1.1), kInf);
  EXPECT_TRUE(std::isnan(h.Quantile(kNaN)));
}

TEST(HistogramTest, NonPositiveFirstBoundIsReturnedAsIs) {
  Histogram h({-1, 0, 1});
  h.Observe(-5);
  h.Observe(-7);
  EXPECT_DOUBLE_EQ(h.Quantile(0.5), -1);
}

TEST(ExponentialBucketsTest, MultipliesByFactor) {
  EXPECT_EQ(ExponentialBuckets(1, 2, 5), (std::vector<double>{1, 2, 4, 8, 16}));
  const std::vector<double> b = ExponentialBuckets(0.001, 10, 3);
  ASSERT_EQ(b.size(), 3u);
  EXPECT_DOUBLE_EQ(b[0], 0.001);
  EXPECT_DOUBLE_EQ(b[1], 0.01);
  EXPECT_DOUBLE_EQ(b[2], 0.1);
}

// --- Registry -------------------------------------------------------------------------------

TEST(MetricsRegistryTest, SameNameAndLabelsReturnSamePointer) {
  MetricsRegistry registry;
  Counter* a = registry.GetCounter("c_total", "help", {{"x", "1"}, {"y", "2"}});
  Counter* b = registry.GetCounter("c_total", "other help", {{"y", "2"}, {"x", "1"}});
  Counter* c = registry.GetCounter("c_total", "help", {{"x", "2"}, {"y", "2"}});
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  EXPECT_EQ(registry.GetGauge("g", "h"), registry.GetGauge("g", "h"));
  EXPECT_EQ(registry.GetHistogram("h", "h", {1, 2}), registry.GetHistogram("h", "h", {1, 2}));
  EXPECT_NE(registry.GetHistogram("h", "h", {1, 2}),
            registry.GetHistogram("h", "h", {1, 2}, {{"a", "b"}}));
}

TEST(MetricsRegistryTest, RendersExactExposition) {
  MetricsRegistry registry;
  registry
      .GetCounter("collm_requests_total", "Requests served.", {{"code", "ok"}, {"adapter", "math"}})
      ->Increment(3);
  // The help of the first call wins.
  registry.GetCounter("collm_requests_total", "Ignored.", {{"adapter", "base"}, {"code", "ok"}})
      ->Increment();
  registry.GetGauge("collm_kv_blocks_used", "KV blocks in use.")->Set(12.5);
  Histogram* h = registry.GetHistogram("collm_request_latency_seconds", "Latency.",
                                       {0.005, 0.5, 2.5}, {{"adapter", "math"}});
  for (double v : {0.125, 0.5, 0.5, 8.0}) h->Observe(v);

  const std::string expected =
      "# HELP collm_kv_blocks_used KV blocks in use.\n"
      "# TYPE collm_kv_blocks_used gauge\n"
      "collm_kv_blocks_used 12.5\n"
      "# HELP collm_request_latency_seconds Latency.\n"
      "# TYPE collm_request_latency_seconds histogram\n"
      "collm_request_latency_seconds_bucket{adapter=\"math\",le=\"0.005\"} 0\n"
      "collm_request_latency_seconds_bucket{adapter=\"math\",le=\"0.5\"} 3\n"
      "collm_request_latency_seconds_bucket{adapter=\"math\",le=\"2.5\"} 3\n"
      "collm_request_latency_seconds_bucket{adapter=\"math\",le=\"+Inf\"} 4\n"
      "collm_request_latency_seconds_sum{adapter=\"math\"} 9.125\n"
      "collm_request_latency_seconds_count{adapter=\"math\"} 4\n"
      "# HELP collm_requests_total Requests served.\n"
      "# TYPE collm_requests_total counter\n"
      "collm_requests_total{adapter=\"base\",code=\"ok\"} 1\n"
      "collm_requests_total{adapter=\"math\",code=\"ok\"} 3\n";
  EXPECT_EQ(registry.RenderPrometheus(), expected);
}

TEST(MetricsRegistryTest, EmptyRegistryRendersNothing) {
  MetricsRegistry registry;
  EXPECT_EQ(registry.RenderPrometheus(), "");
}

TEST(MetricsRegistryTest, EscapesLabelValues) {
  MetricsRegistry registry;
  registry
      .GetCounter("m_total", "h", {{"path", "C:\\dir"}, {"quote", "say \"hi\""}, {"nl", "a\nb"}})
      ->Increment();
  EXPECT_EQ(registry.RenderPrometheus(),
            "# HELP m_total h\n"
            "# TYPE m_total counter\n"
            "m_total{nl=\"a\\nb\",path=\"C:\\\\dir\",quote=\"say \\\"hi\\\"\"} 1\n");
}

TEST(MetricsRegistryTest, EscapesHelpBackslashAndNewlineOnly) {
  MetricsRegistry registry;
  registry.GetGauge("m", "line1\nline2 \\ \"quoted\"")->Set(1);
  EXPECT_EQ(registry.RenderPrometheus(),
            "# HELP m line1\\nline2 \\\\ \"quoted\"\n"
            "# TYPE m gauge\n"
            "m 1\n");
}

TEST(MetricsRegistryTest, FormatsSpecialAndLargeValues) {
  MetricsRegistry registry;
  const std::vector<std::pair<double, std::string>> cases = {
      {1e6, "1000000"},
      {-42, "-42"},
      {0.1, "0.1"},
      {-0.0, "0"},
      {kInf, "+Inf"},
      {-kInf, "-Inf"},
      {kNaN, "NaN"},
      {1e300, "1e+300"},
      {1.5e-7, "1.5e-07"},
      {123456789012.0, "123456789012"},
      {1.0 / 3, "0.3333333333333333"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    registry.GetGauge("g", "h", {{"i", std::to_string(i + 10)}})->Set(cases[i].first);
  }
  const std::vector<std::string> lines = SplitLines(registry.RenderPrometheus());
  ASSERT_EQ(lines.size(), cases.size() + 2);
  for (size_t i = 0; i < cases.size(); ++i) {
    EXPECT_EQ(lines[i + 2], "g{i=\"" + std::to_string(i + 10) + "\"} " + cases[i].second);
  }
}

TEST(MetricsRegistryTest, FloatValuesRoundTrip) {
  MetricsRegistry registry;
  Gauge* g = registry.GetGauge("g", "h");
  for (double v : {0.1, 1.0 / 3, 2.0 / 3, 1e-300, 6.02214076e23, 0.005, 1234.5678}) {
    g->Set(v);
    const std::string text = registry.RenderPrometheus();
    const std::string value = text.substr(text.rfind(' ') + 1);
    EXPECT_EQ(std::strtod(value.c_str(), nullptr), v) << value;
  }
}

TEST(MetricsRegistryTest, EveryLineMatchesTheTextFormat) {
  MetricsRegistry registry;
  FillSampleRegistry(registry);
  const std::regex comment(R"(^# (HELP [a-zA-Z_:][a-zA-Z0-9_:]* .*|TYPE [a-zA-Z_:][a-zA-Z0-9_:]* )"
                           R"((counter|gauge|histogram)))");
  const std::regex sample(
      R"(^[a-zA-Z_:][a-zA-Z0-9_:]*)"
      R"((\{[a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\[\\"n])*"(,[a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\[\\"n])*")*\})?)"
      R"( ([-+]?[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?|[-+]Inf|NaN)$)");
  const std::vector<std::string> lines = SplitLines(registry.RenderPrometheus());
  ASSERT_FALSE(lines.empty());
  int samples = 0;
  for (const std::string& line : lines) {
    if (line.rfind("#", 0) == 0) {
      EXPECT_TRUE(std::regex_match(line, comment)) << line;
    } else {
      EXPECT_TRUE(std::regex_match(line, sample)) << line;
      ++samples;
    }
  }
  // 2 counters + 2 gauges + (5 buckets + sum + count) + (1 bucket + sum + count).
  EXPECT_EQ(samples, 2 + 2 + 7 + 3);
}

TEST(MetricsRegistryTest, PromtoolAcceptsExposition) {
  constexpr char kPromtool[] = "/usr/bin/promtool";
  if (access(kPromtool, X_OK) != 0) {
    GTEST_SKIP() << kPromtool << " not found (apt-get install prometheus); skipping lint";
  }
  MetricsRegistry registry;
  FillSampleRegistry(registry);
  const std::string path = ::testing::TempDir() + "collm_metrics_promtool.txt";
  {
    std::ofstream out(path, std::ios::binary);
    out << registry.RenderPrometheus();
  }
  const std::string command = std::string(kPromtool) + " check metrics < " + path + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string output;
  char buf[512];
  while (size_t n = std::fread(buf, 1, sizeof(buf), pipe)) output.append(buf, n);
  const int status = pclose(pipe);
  std::remove(path.c_str());
  ASSERT_TRUE(WIFEXITED(status)) << output;
  EXPECT_EQ(WEXITSTATUS(status), 0) << output;
  EXPECT_EQ(output, "");
}

TEST(MetricsRegistryTest, ConcurrentUpdatesAreExact) {
  MetricsRegistry registry;
  constexpr int kThreads = 4;
  constexpr int kIterations = 100000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&registry, t] {
      // Every thread looks the metrics up itself, racing on family creation.
      Counter* counter = registry.GetCounter("ops_total", "h");
      Gauge* gauge = registry.GetGauge("level", "h");
      Histogram* histogram = registry.GetHistogram("sizes", "h", {1, 2, 4});
      Counter* own = registry.GetCounter("per_thread_total", "h", {{"t", std::to_string(t)}});
      for (int i = 0; i < kIterations; ++i) {
        counter->Increment();
        gauge->Add(i % 2 == 0 ? 2 : -1);
        histogram->Observe(i % 5);  // 0,1,2,3,4.
        own->Increment(0.5);
        if (i % 20000 == 0) registry.RenderPrometheus();  // Readers interleave with writers.
      }
    });
  }
  for (std::thread& thread : threads) thread.join();

  EXPECT_EQ(registry.GetCounter("ops_total", "h")->value(), kThreads * kIterations);
  EXPECT_EQ(registry.GetGauge("level", "h")->value(), kThreads * kIterations / 2);
  const Histogram::Snapshot snap = registry.GetHistogram("sizes", "h", {1, 2, 4})->snapshot();
  const uint64_t per_value = kThreads * kIterations / 5;
  EXPECT_EQ(snap.count, uint64_t{kThreads} * kIterations);
  EXPECT_EQ(snap.cumulative_counts,
            (std::vector<uint64_t>{2 * per_value, 3 * per_value, 5 * per_value, 5 * per_value}));
  EXPECT_EQ(snap.sum, static_cast<double>(per_value * (0 + 1 + 2 + 3 + 4)));
  for (int t = 0; t < kThreads; ++t) {
    EXPECT_EQ(registry.GetCounter("per_thread_total", "h", {{"t", std::to_string(t)}})->value(),
              kIterations / 2);
  }
}

// --- Programming errors abort ---------------------------------------------------------------

class MetricsDeathTest : public ::testing::Test {
 protected:
  void SetUp() override { GTEST_FLAG_SET(death_test_style, "threadsafe"); }
};

TEST_F(MetricsDeathTest, HistogramBoundsMustBeStrictlyIncreasingAndFinite) {
  EXPECT_DEATH(Histogram({1, 1}), "strictly increasing");
  EXPECT_DEATH(Histogram({2, 1}), "strictly increasing");
  EXPECT_DEATH(Histogram({1, kInf}), "finite");
  EXPECT_DEATH(Histogram({kNaN}), "finite");
}

TEST_F(MetricsDeathTest, ExponentialBucketsRejectsBadArguments) {
  EXPECT_DEATH(ExponentialBuckets(0, 2, 3), "start");
  EXPECT_DEATH(ExponentialBuckets(1, 1, 3), "factor");
  EXPECT_DEATH(ExponentialBuckets(1, 2, 0), "count");
}

TEST_F(MetricsDeathTest, InvalidNamesAbort) {
  MetricsRegistry registry;
  EXPECT_DEATH(registry.GetCounter("", "h"), "metric name");
  EXPECT_DEATH(registry.GetCounter("1abc", "h"), "metric name");
  EXPECT_DEATH(registry.GetCounter("a-b", "h"), "metric name");
  EXPECT_DEATH(registry.GetGauge("g", "h", {{"a:b", "v"}}), "label name");
  EXPECT_DEATH(registry.GetGauge("g", "h", {{"9a", "v"}}), "label name");
  EXPECT_DEATH(registry.GetGauge("g", "h", {{"", "v"}}), "label name");
  EXPECT_DEATH(registry.GetHistogram("h", "h", {1}, {{"le", "1"}}), "reserved");
  // Colons are fine in metric names (recording rules), not in label names.
  EXPECT_NE(registry.GetCounter("job:ops:rate_total", "h", {{"_a1", "v"}}), nullptr);
}

TEST_F(MetricsDeathTest, TypeOrBoundsClashAborts) {
  MetricsRegistry registry;
  registry.GetCounter("x", "h");
  EXPECT_DEATH(registry.GetGauge("x", "h"), "another type");
  EXPECT_DEATH(registry.GetHistogram("x", "h", {1}), "another type");
  registry.GetHistogram("y", "h", {1, 2});
  EXPECT_DEATH(registry.GetHistogram("y", "h", {1, 3}, {{"a", "b"}}), "share their bounds");
}

}  // namespace
}  // namespace collm::telemetry
