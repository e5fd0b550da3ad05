// STAND-IN (wt-aggregator only): a minimal FedAvg and in-memory PEFT blobs so the aggregator can be
// built and tested before the real math (wt-fedmath: src/federation/aggregation.cc and
// lora::SerializePeftAdapter/ParsePeftAdapter) lands on main. DELETE this file when rebasing on
// a main that has src/federation/aggregation.cc.
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <torch/torch.h>

#include "absl/strings/str_cat.h"
#include "collm/common/status.h"
#include "collm/federation/aggregation.h"
#include "collm/lora/peft_io.h"

namespace collm::lora {
namespace {
std::string Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}
std::string TempDir() {
  static std::atomic<int> n{0};
  auto dir = std::filesystem::temp_directory_path() /
             absl::StrCat("collm-peftblob-", ::getpid(), "-", n.fetch_add(1));
  std::filesystem::create_directories(dir);
  return dir.string();
}
}  // namespace

absl::StatusOr<PeftBlob> SerializePeftAdapter(const LoraAdapter& adapter) {
  const std::string dir = TempDir();
  COLLM_RETURN_IF_ERROR(WritePeftAdapter(dir, adapter));
  PeftBlob blob{Slurp(dir + "/adapter_config.json"), Slurp(dir + "/adapter_model.safetensors")};
  std::filesystem::remove_all(dir);
  return blob;
}

absl::StatusOr<LoraAdapter> ParsePeftAdapter(const PeftBlob& blob, const runtime::ModelConfig& model,
                                            const std::string& what) {
  const std::string dir = TempDir();
  std::ofstream(dir + "/adapter_config.json", std::ios::binary) << blob.config_json;
  std::ofstream(dir + "/adapter_model.safetensors", std::ios::binary) << blob.safetensors;
  auto adapter = ReadPeftAdapter(dir, model);
  std::filesystem::remove_all(dir);
  if (!adapter.ok()) return Annotate(adapter.status(), what);
  return adapter;
}

}  // namespace collm::lora

namespace collm::federation {

absl::StatusOr<Combine> ParseCombine(const std::string& name) {
  if (name == "fedavg" || name == "fedit") return Combine::kFedAvg;
  if (name == "exact") return Combine::kExact;
  if (name == "trimmed_mean") return Combine::kTrimmedMean;
  if (name == "median") return Combine::kMedian;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown strategy '", name, "' (fedavg|fedit|exact|trimmed_mean|median)"));
}
std::string CombineName(Combine c) {
  switch (c) {
    case Combine::kFedAvg: return "fedavg";
    case Combine::kExact: return "exact";
    case Combine::kTrimmedMean: return "trimmed_mean";
    case Combine::kMedian: return "median";
  }
  return "fedavg";
}
absl::StatusOr<ServerOptimizer> ParseServerOptimizer(const std::string& name) {
  if (name == "none") return ServerOptimizer::kNone;
  if (name == "fedadam") return ServerOptimizer::kFedAdam;
  if (name == "fedyogi") return ServerOptimizer::kFedYogi;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown server optimizer '", name, "' (none|fedadam|fedyogi)"));
}
std::string ServerOptimizerName(ServerOptimizer o) {
  switch (o) {
    case ServerOptimizer::kNone: return "none";
    case ServerOptimizer::kFedAdam: return "fedadam";
    case ServerOptimizer::kFedYogi: return "fedyogi";
  }
  return "none";
}

absl::StatusOr<double> ValidateUpdate(const runtime::ModelConfig& model,
                                      const lora::LoraAdapter& global, const ClientUpdate& update,
                                      const AggregationOptions& options) {
  const std::string who = absl::StrCat("update from ", update.device_id);
  if (update.num_samples <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(who, ": num_samples must be > 0, got ", update.num_samples));
  }
  COLLM_RETURN_IF_ERROR(Annotate(update.adapter.Validate(model), who));
  double sq = 0;
  for (size_t l = 0; l < global.factors.layers.size(); ++l) {
    for (int t = 0; t < runtime::kNumLoraTargets; ++t) {
      const auto& g = global.factors.layers[l][t];
      const auto& u = update.adapter.factors.layers[l][t];
      if (g.a.defined() != u.a.defined()) {
        return absl::InvalidArgumentError(absl::StrCat(
            who, ": layer ", l, " ", runtime::LoraTargetName(static_cast<runtime::LoraTarget>(t)),
            " is ", u.a.defined() ? "adapted" : "missing", " unlike the global adapter"));
      }
      if (!g.a.defined()) continue;
      if (!g.a.sizes().equals(u.a.sizes()) || !g.b.sizes().equals(u.b.sizes())) {
        return absl::InvalidArgumentError(absl::StrCat(
            who, ": layer ", l, " ", runtime::LoraTargetName(static_cast<runtime::LoraTarget>(t)),
            " has a shape unlike the global adapter's"));
      }
      sq += (u.a - g.a).pow(2).sum().item<double>() + (u.b - g.b).pow(2).sum().item<double>();
    }
  }
  const double norm = std::sqrt(sq);
  if (!std::isfinite(norm)) return absl::InvalidArgumentError(absl::StrCat(who, ": non-finite values"));
  if (options.max_update_norm > 0 && norm > options.max_update_norm) {
    return absl::InvalidArgumentError(absl::StrCat(who, ": delta norm ", norm,
                                                   " exceeds max_update_norm ",
                                                   options.max_update_norm));
  }
  return norm;
}

absl::StatusOr<AggregationResult> Aggregate(const runtime::ModelConfig& model,
                                            const lora::LoraAdapter& global,
                                            const std::vector<ClientUpdate>& updates,
                                            const AggregationOptions& options,
                                            ServerOptimizerState* state) {
  if (updates.empty()) return absl::InvalidArgumentError("no updates to aggregate");
  AggregationResult result;
  result.adapter = global.Clone();
  double total = 0;
  for (const auto& u : updates) total += static_cast<double>(u.num_samples);
  for (size_t l = 0; l < global.factors.layers.size(); ++l) {
    for (int t = 0; t < runtime::kNumLoraTargets; ++t) {
      auto& out = result.adapter.factors.layers[l][t];
      if (!out.a.defined()) continue;
      at::Tensor a = torch::zeros_like(out.a), b = torch::zeros_like(out.b);
      for (const auto& u : updates) {
        const double w = static_cast<double>(u.num_samples) / total;
        a += w * u.adapter.factors.layers[l][t].a;
        b += w * u.adapter.factors.layers[l][t].b;
      }
      out.a = a;
      out.b = b;
    }
  }
  result.delta_norms.assign(updates.size(), 0);
  result.clipped.assign(updates.size(), false);
  return result;
}

}  // namespace collm::federation
