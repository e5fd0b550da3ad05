#include "collm/coordination/routing_policy.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace collm::coordination {
namespace {

absl::Status Bad(const char* field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("slack.", field, " ", what));
}

bool Finite(double x) { return std::isfinite(x); }

}  // namespace

const char* RoutingPolicyName(RoutingPolicyKind kind) {
  switch (kind) {
    case RoutingPolicyKind::kRoundRobin:
      return "round_robin";
    case RoutingPolicyKind::kLeastOutstanding:
      return "least_outstanding";
    case RoutingPolicyKind::kSlack:
      return "slack";
  }
  return "unknown";
}

absl::Status ValidateSlackOptions(const SlackOptions& o) {
  if (!Finite(o.default_seconds_per_token) || o.default_seconds_per_token <= 0) {
    return Bad("default_seconds_per_token",
               absl::StrCat("must be > 0, got ", o.default_seconds_per_token));
  }
  if (!Finite(o.decode_weight_tokens) || o.decode_weight_tokens < 0) {
    return Bad("decode_weight_tokens", absl::StrCat("must be >= 0, got ", o.decode_weight_tokens));
  }
  if (!Finite(o.tie_margin) || o.tie_margin < 0) {
    return Bad("tie_margin", absl::StrCat("must be >= 0, got ", o.tie_margin));
  }
  if (!Finite(o.min_speed) || o.min_speed <= 0 || o.min_speed > 1) {
    return Bad("min_speed", absl::StrCat("must be in (0, 1], got ", o.min_speed));
  }
  if (!Finite(o.low_kv_penalty_seconds) || o.low_kv_penalty_seconds < 0) {
    return Bad("low_kv_penalty_seconds",
               absl::StrCat("must be >= 0, got ", o.low_kv_penalty_seconds));
  }
  if (!Finite(o.low_kv_fraction) || o.low_kv_fraction < 0 || o.low_kv_fraction > 1) {
    return Bad("low_kv_fraction", absl::StrCat("must be in [0, 1], got ", o.low_kv_fraction));
  }
  return absl::OkStatus();
}

RoutingPolicy::RoutingPolicy(RoutingPolicyKind kind, SlackOptions slack, uint64_t seed)
    : kind_(kind), slack_(slack), rng_(seed) {}

bool RoutingPolicy::ServesAdapter(const RouteRequest& request, const ReplicaView& replica) {
  if (request.adapter.empty()) return true;
  auto it = replica.adapters.find(request.adapter);
  return it != replica.adapters.end() && it->second >= request.min_adapter_version;
}

double RoutingPolicy::PredictTtftSeconds(const RouteRequest& request, const ReplicaView& r) const {
  const double per_token =
      r.seconds_per_token > 0 ? r.seconds_per_token : slack_.default_seconds_per_token;
  // Work ahead of this request's first token, in token-equivalents: prompts not yet prefilled
  // there (reported, plus what the router sent since the report), its own prompt, and the share of
  // each step's budget the running decodes take. Unknown load counts only the router's own view.
  const double queued = static_cast<double>(r.load_known ? r.queued_prompt_tokens : 0) +
                        static_cast<double>(r.unreported_prompt_tokens);
  const double running =
      static_cast<double>(std::max(r.load_known ? r.running_sequences : int64_t{0}, r.outstanding));
  const double work = queued + static_cast<double>(std::max<int64_t>(request.prompt_tokens, 1)) +
                      running * slack_.decode_weight_tokens;
  const double share = r.load_known ? std::clamp(r.training_share, 0.0, 1.0) : 0.0;
  const double speed = std::max(1.0 - share, slack_.min_speed);
  double ttft = work * per_token / speed;
  if (r.load_known && r.kv_free_fraction < slack_.low_kv_fraction) {
    ttft += slack_.low_kv_penalty_seconds;
  }
  return ttft;
}

absl::StatusOr<RouteDecision> RoutingPolicy::Choose(const RouteRequest& request,
                                                    const std::vector<ReplicaView>& replicas,
                                                    const std::vector<std::string>& names,
                                                    const std::vector<int>& exclude) {
  const int n = static_cast<int>(replicas.size());
  std::vector<int> eligible;
  std::vector<std::string> why_not;
  auto name_of = [&](int i) {
    return i < static_cast<int>(names.size()) ? names[i] : absl::StrCat("replica ", i);
  };
  for (int i = 0; i < n; ++i) {
    const ReplicaView& r = replicas[i];
    if (std::find(exclude.begin(), exclude.end(), i) != exclude.end()) {
      why_not.push_back(absl::StrCat(name_of(i), " failed this request"));
    } else if (!r.admitted) {
      why_not.push_back(absl::StrCat(name_of(i), " ejected"));
    } else if (!ServesAdapter(request, r)) {
      auto it = r.adapters.find(request.adapter);
      if (!r.load_known) {
        why_not.push_back(absl::StrCat(name_of(i), " has not reported its adapters yet"));
      } else if (it == r.adapters.end()) {
        why_not.push_back(absl::StrCat(name_of(i), " does not serve '", request.adapter, "'"));
      } else {
        why_not.push_back(
            absl::StrCat(name_of(i), " serves '", request.adapter, "' v", it->second));
      }
    } else {
      eligible.push_back(i);
    }
  }
  if (eligible.empty()) {
    std::string what = request.adapter.empty()
                           ? std::string("no replica can serve the request")
                           : absl::StrCat("no replica can serve adapter '", request.adapter, "'",
                                          request.min_adapter_version > 0
                                              ? absl::StrCat(" v>=", request.min_adapter_version)
                                              : std::string());
    if (n == 0) return absl::UnavailableError(absl::StrCat(what, ": no replicas configured"));
    return absl::UnavailableError(absl::StrCat(what, ": ", absl::StrJoin(why_not, "; ")));
  }

  RouteDecision d;
  switch (kind_) {
    case RoutingPolicyKind::kRoundRobin: {
      // The first eligible replica at or after the cursor, so skipping one does not shift the
      // turn of the others.
      int chosen = eligible.front();
      for (int k = 0; k < n; ++k) {
        const int i = static_cast<int>((next_ + k) % n);
        if (std::find(eligible.begin(), eligible.end(), i) != eligible.end()) {
          chosen = i;
          break;
        }
      }
      next_ = static_cast<size_t>(chosen + 1) % n;
      d.index = chosen;
      return d;
    }
    case RoutingPolicyKind::kLeastOutstanding: {
      d.index = *std::min_element(eligible.begin(), eligible.end(), [&](int a, int b) {
        return replicas[a].outstanding < replicas[b].outstanding;
      });
      return d;
    }
    case RoutingPolicyKind::kSlack:
      break;
  }
  d.predicted_ttft_s.assign(n, -1.0);
  for (int i : eligible) d.predicted_ttft_s[i] = PredictTtftSeconds(request, replicas[i]);
  // Shuffled first, so replicas that predict the same (idle ones) share the load instead of the
  // lowest indices taking it all.
  std::vector<int> order = eligible;
  std::shuffle(order.begin(), order.end(), rng_);
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return d.predicted_ttft_s[a] < d.predicted_ttft_s[b]; });
  d.index = order[0];
  if (order.size() >= 2 &&
      d.predicted_ttft_s[order[1]] <= d.predicted_ttft_s[order[0]] * (1.0 + slack_.tie_margin)) {
    d.index = order[std::uniform_int_distribution<int>(0, 1)(rng_)];
  }
  return d;
}

}  // namespace collm::coordination
