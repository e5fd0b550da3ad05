#include "collm/telemetry/metrics.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string_view>
#include <utility>

#include "collm/common/check.h"

namespace collm::telemetry {
namespace {

bool IsMetricNameChar(char c, bool first) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':') return true;
  return !first && c >= '0' && c <= '9';
}

bool IsLabelNameChar(char c, bool first) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_') return true;
  return !first && c >= '0' && c <= '9';
}

bool IsValidMetricName(std::string_view name) {
  if (name.empty()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    if (!IsMetricNameChar(name[i], i == 0)) return false;
  }
  return true;
}

bool IsValidLabelName(std::string_view name) {
  if (name.empty()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    if (!IsLabelNameChar(name[i], i == 0)) return false;
  }
  return true;
}

void CheckLabels(const Labels& labels, bool histogram) {
  for (const auto& [key, value] : labels) {
    COLLM_CHECK_MSG(IsValidLabelName(key), "label name must match [a-zA-Z_][a-zA-Z0-9_]*");
    // "le" is the bucket label of the _bucket series; a user label of that name would collide.
    COLLM_CHECK_MSG(!histogram || key != "le", "\"le\" is reserved for histogram buckets");
  }
}

// The CAS loop stands in for std::atomic<double>::fetch_add, which is C++20.
void AtomicAdd(std::atomic<double>& target, double delta) {
  double current = target.load(std::memory_order_relaxed);
  while (!target.compare_exchange_weak(current, current + delta, std::memory_order_relaxed,
                                       std::memory_order_relaxed)) {
  }
}

std::string EscapeHelp(std::string_view help) {
  std::string out;
  out.reserve(help.size());
  for (char c : help) {
    switch (c) {
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      default:
        out += c;
    }
  }
  return out;
}

std::string EscapeLabelValue(std::string_view value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    switch (c) {
      case '\\':
        out += "\\\\";
        break;
      case '"':
        out += "\\\"";
        break;
      case '\n':
        out += "\\n";
        break;
      default:
        out += c;
    }
  }
  return out;
}

// Shortest decimal form that parses back to the same double; integral values below 2^53 never
// use an exponent, so counters read naturally ("42", not "4.2e+01").
std::string FormatValue(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[64];
  if (v == std::trunc(v) && std::fabs(v) < 9007199254740992.0) {
    std::snprintf(buf, sizeof(buf), "%.0f", v);
    // "%.0f" of -0.0 is "-0"; Prometheus accepts it but "0" is what readers expect.
    return v == 0 ? "0" : buf;
  }
  for (int precision = 15; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof(buf), "%.*g", precision, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

std::string FormatLabels(const Labels& labels, const std::string* le = nullptr) {
  if (labels.empty() && le == nullptr) return "";
  std::string out = "{";
  bool first = true;
  for (const auto& [key, value] : labels) {
    if (!first) out += ',';
    first = false;
    out += key;
    out += "=\"";
    out += EscapeLabelValue(value);
    out += '"';
  }
  if (le != nullptr) {
    if (!first) out += ',';
    out += "le=\"";
    out += *le;
    out += '"';
  }
  out += '}';
  return out;
}

void AppendSample(std::string& out, const std::string& name, const std::string& labels,
                  const std::string& value) {
  out += name;
  out += labels;
  out += ' ';
  out += value;
  out += '\n';
}

}  // namespace

// --- Counter / Gauge ------------------------------------------------------------------------

void Counter::Increment(double delta) {
  // Counters never go down; `!(delta > 0)` also drops NaN.
  if (!(delta > 0)) return;
  AtomicAdd(value_, delta);
}

double Counter::value() const { return value_.load(std::memory_order_relaxed); }

void Gauge::Set(double value) { value_.store(value, std::memory_order_relaxed); }

void Gauge::Add(double delta) { AtomicAdd(value_, delta); }

double Gauge::value() const { return value_.load(std::memory_order_relaxed); }

// --- Histogram ------------------------------------------------------------------------------

Histogram::Histogram(std::vector<double> upper_bounds)
    : bounds_(std::move(upper_bounds)), counts_(bounds_.size() + 1, 0) {
  for (size_t i = 0; i < bounds_.size(); ++i) {
    COLLM_CHECK_MSG(std::isfinite(bounds_[i]), "histogram bounds must be finite");
    COLLM_CHECK_MSG(i == 0 || bounds_[i - 1] < bounds_[i],
                    "histogram bounds must be strictly increasing");
  }
}

void Histogram::Observe(double value) {
  if (std::isnan(value)) return;
  // Bucket i counts values <= bounds_[i] (Prometheus "le"); past the end is +Inf.
  const size_t bucket = static_cast<size_t>(
      std::lower_bound(bounds_.begin(), bounds_.end(), value) - bounds_.begin());
  std::lock_guard<std::mutex> lock(mu_);
  ++counts_[bucket];
  ++count_;
  sum_ += value;
}

Histogram::Snapshot Histogram::snapshot() const {
  Snapshot snap;
  snap.upper_bounds = bounds_;
  std::lock_guard<std::mutex> lock(mu_);
  snap.cumulative_counts.resize(counts_.size());
  uint64_t running = 0;
  for (size_t i = 0; i < counts_.size(); ++i) {
    running += counts_[i];
    snap.cumulative_counts[i] = running;
  }
  snap.count = count_;
  snap.sum = sum_;
  return snap;
}

double Histogram::Quantile(double q) const {
  const Snapshot snap = snapshot();
  if (std::isnan(q) || snap.count == 0 || bounds_.empty()) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  if (q < 0) return -std::numeric_limits<double>::infinity();
  if (q > 1) return std::numeric_limits<double>::infinity();

  const double rank = q * static_cast<double>(snap.count);
  const std::vector<uint64_t>& cum = snap.cumulative_counts;
  // First bucket that reaches the rank. Requiring a non-empty prefix differs from Prometheus
  // only for q == 0, where Prometheus divides 0 by an empty bucket's 0 and returns NaN.
  size_t b = 0;
  while (b < bounds_.size() && (static_cast<double>(cum[b]) < rank || cum[b] == 0)) {
    ++b;
  }
  if (b == bounds_.size()) return bounds_.back();  // In the +Inf bucket.
  if (b == 0 && bounds_[0] <= 0) return bounds_[0];

  double bucket_start = 0;
  double in_bucket = static_cast<double>(cum[b]);
  double rank_in_bucket = rank;
  if (b > 0) {
    bucket_start = bounds_[b - 1];
    in_bucket -= static_cast<double>(cum[b - 1]);
    rank_in_bucket -= static_cast<double>(cum[b - 1]);
  }
  return bucket_start + (bounds_[b] - bucket_start) * (rank_in_bucket / in_bucket);
}

std::vector<double> ExponentialBuckets(double start, double factor, int count) {
  COLLM_CHECK_MSG(start > 0 && std::isfinite(start), "ExponentialBuckets: start must be > 0");
  COLLM_CHECK_MSG(factor > 1 && std::isfinite(factor), "ExponentialBuckets: factor must be > 1");
  COLLM_CHECK_MSG(count >= 1, "ExponentialBuckets: count must be >= 1");
  std::vector<double> bounds;
  bounds.reserve(static_cast<size_t>(count));
  double bound = start;
  for (int i = 0; i < count; ++i) {
    bounds.push_back(bound);
    bound *= factor;
  }
  return bounds;
}

// --- MetricsRegistry ------------------------------------------------------------------------

struct MetricsRegistry::Family {
  MetricType type;
  std::string help;
  std::vector<double> upper_bounds;  // Histograms only; every series shares them.
  // Only the map matching `type` is used. Values are heap-allocated so pointers stay stable.
  std::map<Labels, std::unique_ptr<Counter>> counters;
  std::map<Labels, std::unique_ptr<Gauge>> gauges;
  std::map<Labels, std::unique_ptr<Histogram>> histograms;
};

namespace {

const char* TypeName(MetricType type) {
  switch (type) {
    case MetricType::kCounter:
      return "counter";
    case MetricType::kGauge:
      return "gauge";
    case MetricType::kHistogram:
      return "histogram";
  }
  return "untyped";
}

}  // namespace

MetricsRegistry::MetricsRegistry() = default;
MetricsRegistry::~MetricsRegistry() = default;

MetricsRegistry::Family& MetricsRegistry::FindOrCreateFamily(const std::string& name,
                                                             const std::string& help,
                                                             MetricType type) {
  COLLM_CHECK_MSG(IsValidMetricName(name), "metric name must match [a-zA-Z_:][a-zA-Z0-9_:]*");
  auto it = families_.find(name);
  if (it == families_.end()) {
    auto family = std::make_unique<Family>();
    family->type = type;
    family->help = help;
    it = families_.emplace(name, std::move(family)).first;
  }
  COLLM_CHECK_MSG(it->second->type == type, "metric name already registered with another type");
  return *it->second;
}

Counter* MetricsRegistry::GetCounter(const std::string& name, const std::string& help,
                                     const Labels& labels) {
  CheckLabels(labels, /*histogram=*/false);
  std::lock_guard<std::mutex> lock(mu_);
  Family& family = FindOrCreateFamily(name, help, MetricType::kCounter);
  std::unique_ptr<Counter>& slot = family.counters[labels];
  if (slot == nullptr) slot = std::make_unique<Counter>();
  return slot.get();
}

Gauge* MetricsRegistry::GetGauge(const std::string& name, const std::string& help,
                                 const Labels& labels) {
  CheckLabels(labels, /*histogram=*/false);
  std::lock_guard<std::mutex> lock(mu_);
  Family& family = FindOrCreateFamily(name, help, MetricType::kGauge);
  std::unique_ptr<Gauge>& slot = family.gauges[labels];
  if (slot == nullptr) slot = std::make_unique<Gauge>();
  return slot.get();
}

Histogram* MetricsRegistry::GetHistogram(const std::string& name, const std::string& help,
                                         const std::vector<double>& upper_bounds,
                                         const Labels& labels) {
  CheckLabels(labels, /*histogram=*/true);
  std::lock_guard<std::mutex> lock(mu_);
  Family& family = FindOrCreateFamily(name, help, MetricType::kHistogram);
  if (family.histograms.empty()) {
    family.upper_bounds = upper_bounds;
  } else {
    COLLM_CHECK_MSG(family.upper_bounds == upper_bounds,
                    "histogram series of one family must share their bounds");
  }
  std::unique_ptr<Histogram>& slot = family.histograms[labels];
  if (slot == nullptr) slot = std::make_unique<Histogram>(upper_bounds);
  return slot.get();
}

std::string MetricsRegistry::RenderPrometheus() const {
  std::string out;
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [name, family] : families_) {
    out += "# HELP ";
    out += name;
    out += ' ';
    out += EscapeHelp(family->help);
    out += '\n';
    out += "# TYPE ";
    out += name;
    out += ' ';
    out += TypeName(family->type);
    out += '\n';
    switch (family->type) {
      case MetricType::kCounter:
        for (const auto& [labels, counter] : family->counters) {
          AppendSample(out, name, FormatLabels(labels), FormatValue(counter->value()));
        }
        break;
      case MetricType::kGauge:
        for (const auto& [labels, gauge] : family->gauges) {
          AppendSample(out, name, FormatLabels(labels), FormatValue(gauge->value()));
        }
        break;
      case MetricType::kHistogram:
        for (const auto& [labels, histogram] : family->histograms) {
          const Histogram::Snapshot snap = histogram->snapshot();
          const std::string bucket_name = name + "_bucket";
          for (size_t i = 0; i <= snap.upper_bounds.size(); ++i) {
            const std::string le =
                i < snap.upper_bounds.size() ? FormatValue(snap.upper_bounds[i]) : "+Inf";
            AppendSample(out, bucket_name, FormatLabels(labels, &le),
                         std::to_string(snap.cumulative_counts[i]));
          }
          const std::string plain = FormatLabels(labels);
          AppendSample(out, name + "_sum", plain, FormatValue(snap.sum));
          AppendSample(out, name + "_count", plain, std::to_string(snap.count));
        }
        break;
    }
  }
  return out;
}

}  // namespace collm::telemetry
