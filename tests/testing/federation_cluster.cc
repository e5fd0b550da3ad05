#include "testing/federation_cluster.h"

#include "absl/strings/str_cat.h"
#include "testing/subprocess.h"

namespace collm::testing {

std::string FederationCluster::DaemonName(int index) { return absl::StrCat("edge-", index); }

absl::StatusOr<std::unique_ptr<FederationCluster>> FederationCluster::Start(
    const std::string& dir, const std::string& aggregator_config, int num_daemons,
    const DaemonConfigWriter& daemon_config) {
  auto cluster = std::unique_ptr<FederationCluster>(new FederationCluster());
  cluster->dir_ = dir;
  auto aggregator = StartServer("src/collm-aggregator", aggregator_config, dir, "aggregator");
  if (!aggregator.ok()) return aggregator.status();
  cluster->aggregator_ = *std::move(aggregator);
  for (int i = 0; i < num_daemons; ++i) {
    auto daemon = StartServer("src/collmd", daemon_config(i, cluster->aggregator_->grpc_port()),
                              dir, DaemonName(i));
    if (!daemon.ok()) {
      return absl::Status(daemon.status().code(),
                          absl::StrCat(DaemonName(i), ": ", daemon.status().message()));
    }
    cluster->daemons_.push_back(*std::move(daemon));
  }
  return cluster;
}

absl::Status FederationCluster::RestartAggregator(const std::string& config) {
  aggregator_->Kill();
  // The first process's log stays beside the new one's, for Logs() and post-mortems.
  auto aggregator = StartServer("src/collm-aggregator", config, dir_, "aggregator-restarted");
  if (!aggregator.ok()) return aggregator.status();
  killed_aggregators_.push_back(std::move(aggregator_));
  aggregator_ = *std::move(aggregator);
  return absl::OkStatus();
}

FederationCluster::~FederationCluster() {
  // Daemons first: an aggregator that went away first would only make them log reconnects.
  daemons_.clear();
  aggregator_.reset();
}

std::string FederationCluster::Logs() const {
  std::string out;
  for (const auto& killed : killed_aggregators_)
    absl::StrAppend(&out, "--- aggregator (killed) ---\n", killed->log());
  absl::StrAppend(&out, "--- aggregator ---\n", aggregator_->log());
  for (int i = 0; i < num_daemons(); ++i) {
    absl::StrAppend(&out, "--- ", DaemonName(i), " ---\n", daemons_[i]->log());
  }
  return out;
}

}  // namespace collm::testing
