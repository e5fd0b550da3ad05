// Counters, gauges and histograms with Prometheus text exposition (format 0.0.4). Torch-free and
// dependency-free so every module can record metrics; the serving layer exposes them over HTTP.
#ifndef COLLM_TELEMETRY_METRICS_H_
#define COLLM_TELEMETRY_METRICS_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace collm::telemetry {

// Label set, e.g. {{"adapter", "math"}}. Keys must match [a-zA-Z_][a-zA-Z0-9_]*.
using Labels = std::map<std::string, std::string>;

// Monotonic counter. Thread-safe, lock-free.
class Counter {
 public:
  void Increment(double delta = 1.0);
  double value() const;

 private:
  std::atomic<double> value_{0.0};
};

// Value that goes up and down. Thread-safe, lock-free.
class Gauge {
 public:
  void Set(double value);
  void Add(double delta);
  double value() const;

 private:
  std::atomic<double> value_{0.0};
};

// Cumulative histogram over fixed upper bounds (plus +Inf). Thread-safe.
class Histogram {
 public:
  explicit Histogram(std::vector<double> upper_bounds);
  void Observe(double value);
  struct Snapshot {
    std::vector<double> upper_bounds;
    std::vector<uint64_t> cumulative_counts;  // One per bound, then +Inf (= count).
    uint64_t count = 0;
    double sum = 0;
  };
  Snapshot snapshot() const;
  // Estimated quantile q in [0, 1] by linear interpolation inside the bucket (Prometheus'
  // histogram_quantile); NaN when empty.
  double Quantile(double q) const;

 private:
  const std::vector<double> bounds_;
  mutable std::mutex mu_;
  std::vector<uint64_t> counts_;  // Per bucket (not cumulative), bounds_.size() + 1.
  uint64_t count_ = 0;
  double sum_ = 0;
};

// Exponential bucket bounds: start, start*factor, ... (count bounds).
std::vector<double> ExponentialBuckets(double start, double factor, int count);

// Owns metric families by name; hands out stable pointers (valid for the registry's lifetime).
// Thread-safe.
class MetricsRegistry {
 public:
  // Returns the metric for (name, labels), creating it on first use. `help` is taken from the
  // first call. Using one name for two metric types is a programming error (aborts).
  Counter* GetCounter(const std::string& name, const std::string& help, const Labels& labels = {});
  Gauge* GetGauge(const std::string& name, const std::string& help, const Labels& labels = {});
  Histogram* GetHistogram(const std::string& name, const std::string& help,
                          const std::vector<double>& upper_bounds, const Labels& labels = {});

  // Prometheus text exposition of every metric, families sorted by name, with # HELP / # TYPE
  // lines, escaped label values and _bucket/_sum/_count series for histograms.
  std::string RenderPrometheus() const;

 private:
  struct Family;
  mutable std::mutex mu_;
  std::map<std::string, std::unique_ptr<Family>> families_;
};

}  // namespace collm::telemetry

#endif  // COLLM_TELEMETRY_METRICS_H_
