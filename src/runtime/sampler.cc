#include "collm/runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace collm::runtime {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Descending logit, then ascending id: a strict total order, so which tokens survive top-k/top-p
// and the order they are summed in do not depend on the standard library's sort.
bool Before(const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

int32_t Argmax(absl::Span<const float> logits) {
  size_t best = 0;
  for (size_t i = 1; i < logits.size(); ++i) {
    if (logits[i] > logits[best]) best = i;  // Strict: the lowest id wins ties.
  }
  return static_cast<int32_t>(best);
}

}  // namespace

absl::Status SamplingParams::Validate() const {
  // Written as !(ok) so NaN fails every check.
  if (!(temperature >= 0.0f) || std::isinf(temperature)) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be a finite number >= 0, got ", temperature));
  }
  if (top_k < 0) return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", top_k));
  if (!(top_p > 0.0f && top_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", top_p));
  }
  if (!(min_p >= 0.0f && min_p < 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("min_p must be in [0, 1), got ", min_p));
  }
  if (!(repetition_penalty > 0.0f) || std::isinf(repetition_penalty)) {
    return absl::InvalidArgumentError(
        absl::StrCat("repetition_penalty must be a finite number > 0, got ", repetition_penalty));
  }
  if (max_tokens <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("max_tokens must be > 0, got ", max_tokens));
  }
  return absl::OkStatus();
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}

int32_t Sampler::Sample(absl::Span<float> logits, absl::Span<const int32_t> context) {
  const size_t vocab = logits.size();
  for (float& logit : logits) {
    if (std::isnan(logit)) logit = kNegInf;  // A NaN would poison every comparison below.
  }

  if (params_.repetition_penalty != 1.0f && !context.empty()) {
    // Each distinct token is penalized once, however often it repeats (HF semantics).
    std::vector<int32_t> seen(context.begin(), context.end());
    std::sort(seen.begin(), seen.end());
    seen.erase(std::unique(seen.begin(), seen.end()), seen.end());
    for (int32_t id : seen) {
      if (id < 0 || static_cast<size_t>(id) >= vocab) continue;  // Untrusted prompt ids.
      float& logit = logits[id];
      logit =
          logit > 0.0f ? logit / params_.repetition_penalty : logit * params_.repetition_penalty;
    }
  }

  if (params_.temperature == 0.0f) return Argmax(logits);

  scratch_.clear();
  const float inv_temperature = 1.0f / params_.temperature;
  for (size_t i = 0; i < vocab; ++i) {
    if (logits[i] == kNegInf) continue;
    float scaled = logits[i] * inv_temperature;
    // Keeps exp(x - max) finite when a logit is +inf or overflows under a small temperature.
    if (scaled > std::numeric_limits<float>::max()) scaled = std::numeric_limits<float>::max();
    scratch_.emplace_back(scaled, static_cast<int32_t>(i));
  }
  if (scratch_.empty()) return Argmax(logits);  // Everything is masked: nothing to sample.

  // `sorted` counts the leading entries of scratch_ known to be in final (Before) order.
  size_t sorted = 0;
  if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < scratch_.size()) {
    std::partial_sort(scratch_.begin(), scratch_.begin() + params_.top_k, scratch_.end(), Before);
    scratch_.resize(params_.top_k);
    sorted = scratch_.size();
  }

  float max_logit = kNegInf;
  for (const auto& entry : scratch_) max_logit = std::max(max_logit, entry.first);
  double total = 0.0;
  for (auto& entry : scratch_) {
    entry.first = std::exp(entry.first - max_logit);  // Unnormalized probability from here on.
    total += entry.first;
  }

  if (params_.top_p < 1.0f) {
    // Sort only as far as the nucleus reaches, doubling the sorted prefix: a peaked distribution
    // over 150k tokens needs a few dozen entries ordered, not all of them.
    const double target = static_cast<double>(params_.top_p) * total;
    double cumulative = 0.0;
    size_t keep = 0;
    size_t chunk = 64;
    while (keep < scratch_.size()) {
      if (keep == sorted) {
        const size_t next = std::min(scratch_.size(), sorted + chunk);
        std::partial_sort(scratch_.begin() + sorted, scratch_.begin() + next, scratch_.end(),
                          Before);
        sorted = next;
        chunk *= 2;
      }
      cumulative += scratch_[keep].first;
      ++keep;
      if (cumulative >= target) break;
    }
    scratch_.resize(std::max<size_t>(keep, 1));
    total = cumulative;
  }

  if (params_.min_p > 0.0f) {
    float max_prob = 0.0f;
    for (const auto& entry : scratch_) max_prob = std::max(max_prob, entry.first);
    const float threshold = params_.min_p * max_prob;
    // Filtering keeps relative order, and the most likely token always survives.
    auto end = std::remove_if(scratch_.begin(), scratch_.end(),
                              [threshold](const auto& entry) { return entry.first < threshold; });
    scratch_.erase(end, scratch_.end());
    total = 0.0;
    for (const auto& entry : scratch_) total += entry.first;
  }

  // Uniform in [0, 1) from the top 53 bits, so a seed gives the same tokens on every standard
  // library (std::uniform_real_distribution is implementation-defined).
  const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53;
  const double threshold = u * total;
  double cumulative = 0.0;
  for (const auto& entry : scratch_) {
    cumulative += entry.first;
    if (threshold < cumulative) return entry.second;
  }
  return scratch_.back().second;  // Rounding left u * total at or past the last boundary.
}

StopStringMatcher::StopStringMatcher(std::vector<std::string> stop) {
  for (auto& s : stop) {
    if (!s.empty()) stop_.push_back(std::move(s));  // "" would match everywhere.
  }
}

std::string StopStringMatcher::Push(const std::string& delta) {
  if (stopped_) return "";
  pending_ += delta;
  // Held-back text is rescanned, so a stop string split across deltas is still found.
  size_t first = std::string::npos;
  for (const auto& s : stop_) first = std::min(first, pending_.find(s));
  if (first != std::string::npos) {
    stopped_ = true;
    std::string out = pending_.substr(0, first);
    pending_.clear();
    return out;
  }
  // Hold back the longest tail that is a proper prefix of some stop string. It starts at a
  // character boundary because the stop strings are whole UTF-8 strings.
  size_t hold = 0;
  for (const auto& s : stop_) {
    for (size_t len = std::min(s.size() - 1, pending_.size()); len > hold; --len) {
      if (pending_.compare(pending_.size() - len, len, s, 0, len) == 0) {
        hold = len;
        break;
      }
    }
  }
  std::string out = pending_.substr(0, pending_.size() - hold);
  pending_.erase(0, pending_.size() - hold);
  return out;
}

std::string StopStringMatcher::Finish() {
  if (stopped_) return "";
  std::string out;
  out.swap(pending_);
  return out;
}

}  // namespace collm::runtime
