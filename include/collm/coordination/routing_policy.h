// The fast timescale's per-request half: which replica serves the next request. Pure policy: what
// the router knows about each replica (its last load report, the router's own outstanding counts,
// health) in, a choice out; randomness from an injected seed, time from the caller. No I/O, no
// threads, no gRPC. collm-router owns one instance; the cluster simulator can run the same code.
//
// Policies:
// - round_robin: the next admitted, eligible replica in turn.
// - least_outstanding: fewest requests the router has in flight there (ties: lowest index).
// - slack (default): the predicted time to first token of this request on each replica, from the
//   prompt work queued there (as last reported, plus what the router sent since), its running
//   decode load, and its training share u (a replica at share u serves at ~(1 - u) of its speed,
//   so the router steers load away from training replicas). The choice is random between the best
//   two when their predictions are within `tie_margin` of each other, so a burst routed on the same
//   stale report does not pile onto one replica; otherwise the best wins.
// Adapter affinity (every policy): a request naming an adapter, optionally with a minimum version,
// is eligible only for replicas whose last report lists that adapter at that version or newer.
#ifndef COLLM_COORDINATION_ROUTING_POLICY_H_
#define COLLM_COORDINATION_ROUTING_POLICY_H_

#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace collm::coordination {

enum class RoutingPolicyKind { kRoundRobin, kLeastOutstanding, kSlack };

// "round_robin" / "least_outstanding" / "slack".
const char* RoutingPolicyName(RoutingPolicyKind kind);

struct SlackOptions {
  // Serving cost of one token (prefill or decode) when a replica has not measured one yet:
  // its infer_step_seconds / last_batch_tokens replaces it once reported. > 0.
  double default_seconds_per_token = 0.002;
  // How many tokens of prefill-equivalent work one running sequence adds to a new request's wait
  // (it shares every step's token budget with the prefill). >= 0.
  double decode_weight_tokens = 16;
  // A random choice between the best two only when the second's prediction is at most
  // (1 + tie_margin) x the best's; >= 0. 0 = always the best.
  double tie_margin = 0.25;
  // Floor on the speed (1 - u) of a training replica, so u = 1 is finite. (0, 1].
  double min_speed = 0.05;
  // Added to the prediction when a replica's free KV fraction is below `low_kv_fraction`
  // (admission will wait for memory there). Seconds, >= 0.
  double low_kv_penalty_seconds = 1.0;
  double low_kv_fraction = 0.05;  // [0, 1].
  // Each replica's own measured per-token cost (heterogeneous hardware), instead of the mean over
  // replicas. Off by default: replicas serve the same model, and one replica's small-batch step
  // cost is dominated by noise (scheduling, cold caches after idling) that would outweigh load.
  bool per_replica_cost = false;
};

// InvalidArgument naming the field ("slack.<field> ...").
absl::Status ValidateSlackOptions(const SlackOptions& options);

// What the router knows about one replica.
struct ReplicaView {
  bool admitted = true;     // Not ejected (see ReplicaHealth).
  bool load_known = false;  // At least one load report arrived; the fields below come from it.
  int64_t queued_prompt_tokens = 0;    // Reported: prompt tokens not yet prefilled.
  int64_t running_sequences = 0;       // Reported.
  int64_t running_context_tokens = 0;  // Reported (informational; decode load is per sequence).
  double kv_free_fraction = 1;         // Reported, [0, 1].
  double training_share = 0;           // Reported share of time spent training now, [0, 1].
  double seconds_per_token = 0;        // Reported step cost per token; 0 = not measured.
  std::map<std::string, int64_t> adapters;  // Reported: adapter name -> newest version served.
  // The router's own view, current (not stale like the report).
  int64_t outstanding = 0;               // Requests in flight there.
  int64_t unreported_prompt_tokens = 0;  // Prompt tokens sent there since its last report.
};

struct RouteRequest {
  int64_t prompt_tokens = 1;        // Estimated prompt length; >= 1.
  std::string adapter;              // "" = any replica (its default adapter).
  int64_t min_adapter_version = 0;  // With `adapter`: the oldest acceptable version; 0 = any.
};

struct RouteDecision {
  int index = -1;                        // Chosen replica.
  std::vector<double> predicted_ttft_s;  // slack: per replica (< 0 = not eligible); else empty.
};

// Thread-compatible: the owner serializes calls (collm-router holds its replica lock).
class RoutingPolicy {
 public:
  RoutingPolicy(RoutingPolicyKind kind, SlackOptions slack, uint64_t seed);

  RoutingPolicyKind kind() const { return kind_; }

  // Chooses among `replicas` (indices into it), skipping those in `exclude` (a retry's failed
  // replica) and those not admitted or not serving the request's adapter. Unavailable with a
  // message that says why each replica cannot serve when none can ("no replica can serve adapter
  // 'x' v>=3: 127.0.0.1:5001 ejected; 127.0.0.1:5002 serves 'x' v2").
  absl::StatusOr<RouteDecision> Choose(const RouteRequest& request,
                                       const std::vector<ReplicaView>& replicas,
                                       const std::vector<std::string>& names,
                                       const std::vector<int>& exclude = {});

  // slack's prediction for one replica (seconds), public for tests and the router's metrics.
  double PredictTtftSeconds(const RouteRequest& request, const ReplicaView& replica) const;

  // Whether `replica` serves `request`'s adapter at the asked version. Empty adapter: yes.
  static bool ServesAdapter(const RouteRequest& request, const ReplicaView& replica);

 private:
  RoutingPolicyKind kind_;
  SlackOptions slack_;
  std::mt19937_64 rng_;
  size_t next_ = 0;  // round_robin's cursor.
};

}  // namespace collm::coordination

#endif  // COLLM_COORDINATION_ROUTING_POLICY_H_
