// Server-side aggregation of LoRA client updates into a new global adapter: validation, clipping,
// the combination rule (FedAvg/FedIT, exact LoRA, trimmed mean, median) and the server optimizer
// (FedAdam/FedYogi). Pure computation on CPU f32 tensors: no I/O, no clock, no threads, so the
// round manager, tests and the benchmark all call the same code. The formulas, for n updates with
// weights w_i = samples_i / sum(samples) (robust rules: unweighted) and global factors (A_g, B_g):
//   - delta_i = update_i - global; clip_norm scales delta_i down to that L2 norm, max_update_norm
//     rejects larger ones;
//   - FedAvg/FedIT: A = sum w_i A_i, B = sum w_i B_i (factor-wise; the cross terms of B·A are
//   lost);
//   - exact: M = sum w_i s_i B_i A_i, re-factored to rank r by QR of the stacked factors and an SVD
//     of the small core (no cross-term error);
//   - trimmed mean / median: coordinate-wise over the factors;
//   - FedAdam/FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization"): with the combined
//     delta d, m = beta1 m + (1 - beta1) d; v = beta2 v + (1 - beta2) d^2 (Adam) or
//     v = v - (1 - beta2) d^2 sign(v - d^2) (Yogi); global += server_lr m / (sqrt(v) + tau).
#ifndef COLLM_FEDERATION_AGGREGATION_H_
#define COLLM_FEDERATION_AGGREGATION_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "collm/lora/lora_adapter.h"
#include "collm/runtime/model_config.h"

namespace collm::federation {

// How client adapters are combined.
enum class Combine {
  kFedAvg,       // = kFedIt: A and B averaged apart, weighted by samples (what FedIT does).
  kExact,        // Weighted mean of the products s·B_i·A_i, re-factored by QR + SVD of the small
                 // core and truncated to the global rank: no cross-term error; mixed ranks allowed.
  kTrimmedMean,  // Coordinate-wise, drop trim_ratio of the updates at each end, mean the rest.
  kMedian,       // Coordinate-wise median (mean of the two middle values for an even count).
  // kTrimmedMean and kMedian work on A and B apart, as FedIT does (so they share its cross-term
  // error), and are unweighted: a device cannot buy influence by claiming many samples.
};
enum class ServerOptimizer { kNone, kFedAdam, kFedYogi };

absl::StatusOr<Combine> ParseCombine(
    const std::string& name);  // fedavg|fedit|exact|trimmed_mean|median
std::string CombineName(Combine c);
absl::StatusOr<ServerOptimizer> ParseServerOptimizer(
    const std::string& name);  // none|fedadam|fedyogi
std::string ServerOptimizerName(ServerOptimizer o);

struct AggregationOptions {
  // How the round's client adapters become one (see Combine); the policy's `strategy`
  // (fedavg | fedit | exact | trimmed_mean | median, ParseCombine). Default kFedAvg.
  Combine combine = Combine::kFedAvg;
  // Applied to the combined delta afterwards: none = take it as is; FedAdam/FedYogi keep moment
  // state across rounds (ServerOptimizerState). The policy's `server_optimizer`. Default kNone.
  ServerOptimizer server_optimizer = ServerOptimizer::kNone;
  double server_lr = 1e-2;                       // FedAdam/FedYogi step size.
  double beta1 = 0.9, beta2 = 0.99, tau = 1e-3;  // FedAdam/FedYogi (Reddi et al. 2021).
  // The delta of an update is measured over all its tensors: the factor difference
  // (A - A_g, B - B_g) for the factor-wise rules, the product difference s·B·A - s_g·B_g·A_g
  // (summed over modules, computed from small Gram matrices) for kExact, since that is what
  // kExact combines and its ranks may differ from the global's.
  double clip_norm = 0;  // Clip each update's delta (update - global) to this L2 norm; 0 = off.
  double max_update_norm = 0;  // Reject updates whose delta norm exceeds this; 0 = off.
  double trim_ratio = 0.1;     // kTrimmedMean, in [0, 0.5).
};

// One device's trained adapter for a round.
struct ClientUpdate {
  std::string device_id;
  int64_t num_samples = 0;  // FedAvg weight; > 0.
  double train_loss = 0;
  lora::LoraAdapter adapter;
};

// Checks an update against the global adapter it was trained from: same targets, layers and
// tensor shapes (rank may differ only for kExact), finite values, num_samples > 0, delta norm
// within max_update_norm. InvalidArgument naming the device, layer, module and what is wrong.
// On success returns the delta's L2 norm (before clipping).
absl::StatusOr<double> ValidateUpdate(const runtime::ModelConfig& model,
                                      const lora::LoraAdapter& global, const ClientUpdate& update,
                                      const AggregationOptions& options);

// Server optimizer moments, persisted by the round manager between rounds.
struct ServerOptimizerState {
  int64_t steps = 0;
  std::map<std::string, at::Tensor> m, v;  // Keyed by PEFT tensor name.
};

struct AggregationResult {
  lora::LoraAdapter adapter;        // The new global adapter (global rank and config).
  std::vector<double> delta_norms;  // Per update, before clipping, in input order.
  std::vector<bool> clipped;
};

// Combines `updates` (non-empty) trained from `global` into the next global adapter. Every update
// is validated again (ValidateUpdate); the first invalid one fails the call with its message.
// Weights are num_samples / total. Clipping scales an update's delta before combining. kExact
// stacks the clients' factors (total rank R), QR-factors both stacks and takes the SVD of the
// R x R core (when R >= min(out, in) the dense product is no larger, and is decomposed instead),
// keeps the top global-rank components and divides by the global scale, so s_g·B·A is the best
// rank-r approximation of Σ p_k s_k B_k A_k; components with no singular value left get a zero B
// column and the global's A row. The server optimizer then steps on the combined factors
// (for kExact: on the re-factored A and B, whose basis may rotate between rounds).
// `state` may be null when options.server_optimizer == kNone; it changes only on success.
// Not thread-safe for the same `state`; otherwise pure.
absl::StatusOr<AggregationResult> Aggregate(const runtime::ModelConfig& model,
                                            const lora::LoraAdapter& global,
                                            const std::vector<ClientUpdate>& updates,
                                            const AggregationOptions& options,
                                            ServerOptimizerState* state);

}  // namespace collm::federation

#endif  // COLLM_FEDERATION_AGGREGATION_H_
