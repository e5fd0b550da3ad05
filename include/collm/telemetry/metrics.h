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

#include "absl/base/thread_annotations.h"

namespace collm::telemetry {

// Prometheus metric type of a family (the "# TYPE" line).
enum class MetricType { kCounter, kGauge, kHistogram };

// Label set, e.g. {{"adapter", "math"}}. Keys must match [a-zA-Z_][a-zA-Z0-9_]*.
using Labels = std::map<std::string, std::string>;

// Monotonic counter. Thread-safe, lock-free.
class Counter {
 public:
  // Adds `delta`; a negative or NaN delta is ignored (counters never go down).
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

// Cumulative histogram over fixed upper bounds (plus +Inf). Thread-safe: Observe takes only this
// histogram's own mutex, never the registry's.
class Histogram {
 public:
  // REQUIRES: `upper_bounds` finite and strictly increasing (aborts otherwise). May be empty
  // (only the +Inf bucket, i.e. sum and count).
  explicit Histogram(std::vector<double> upper_bounds);
  // Counts `value` in the first bucket with value <= bound, O(log #bounds). NaN is ignored.
  void Observe(double value);
  struct Snapshot {
    std::vector<double> upper_bounds;
    std::vector<uint64_t> cumulative_counts;  // One per bound, then +Inf (= count).
    uint64_t count = 0;
    double sum = 0;
  };
  Snapshot snapshot() const;
  // Estimated quantile q in [0, 1] by linear interpolation inside the bucket (Prometheus'
  // histogram_quantile); the first bucket's lower edge is 0 and a quantile in the +Inf bucket
  // returns the highest finite bound. NaN when empty or without finite bounds; q < 0 gives -Inf
  // and q > 1 gives +Inf, as in Prometheus. Unlike Prometheus, q == 0 gives the lower edge of the
  // first non-empty bucket instead of NaN.
  double Quantile(double q) const;

 private:
  const std::vector<double> bounds_;
  mutable std::mutex mu_;
  std::vector<uint64_t> counts_ ABSL_GUARDED_BY(mu_);  // Per bucket, bounds_.size() + 1.
  uint64_t count_ ABSL_GUARDED_BY(mu_) = 0;
  double sum_ ABSL_GUARDED_BY(mu_) = 0;
};

// Exponential bucket bounds: start, start*factor, ... (count bounds).
// REQUIRES: start > 0, factor > 1, count >= 1 (aborts otherwise).
std::vector<double> ExponentialBuckets(double start, double factor, int count);

// Owns metric families by name; hands out stable pointers (valid for the registry's lifetime).
// Thread-safe. The registry mutex guards only the family maps: Get* and RenderPrometheus take it,
// updates through the returned pointers do not.
class MetricsRegistry {
 public:
  MetricsRegistry();
  ~MetricsRegistry();
  MetricsRegistry(const MetricsRegistry&) = delete;
  MetricsRegistry& operator=(const MetricsRegistry&) = delete;

  // Metric names must match [a-zA-Z_:][a-zA-Z0-9_:]* and label names [a-zA-Z_][a-zA-Z0-9_]*;
  // histograms may not use the label "le", and all series of a histogram family share one set
  // of bounds. Violations are programming errors (abort).
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
  // Returns the family `name`, creating it with `help` and `type`; aborts on a type clash.
  Family& FindOrCreateFamily(const std::string& name, const std::string& help, MetricType type)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable std::mutex mu_;
  std::map<std::string, std::unique_ptr<Family>> families_ ABSL_GUARDED_BY(mu_);
};

}  // namespace collm::telemetry

#endif  // COLLM_TELEMETRY_METRICS_H_
