// A federation as operators run it, for integration tests: a real collm-aggregator process and N
// real collmd processes that join it, all on loopback ports chosen by the kernel.
#ifndef COLLM_TESTING_FEDERATION_CLUSTER_H_
#define COLLM_TESTING_FEDERATION_CLUSTER_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "testing/process.h"

namespace collm::testing {

// Owns the processes: destroying the cluster stops the daemons, then the aggregator (SIGTERM, then
// SIGKILL after the grace); each prints its log tail when the test has failed. Owned by the test
// thread; not thread-safe.
class FederationCluster {
 public:
  // Writes the config of daemon `index`, which joins the aggregator on 127.0.0.1:aggregator_port;
  // returns its path.
  using DaemonConfigWriter = std::function<std::string(int index, int aggregator_port)>;

  // Starts collm-aggregator with `aggregator_config`, then `num_daemons` collmd processes named
  // edge-0, edge-1, ... with the configs `daemon_config` writes; logs and ports files go to `dir`.
  // An error (with the failing process's log tail) when any of them does not come up.
  static absl::StatusOr<std::unique_ptr<FederationCluster>> Start(
      const std::string& dir, const std::string& aggregator_config, int num_daemons,
      const DaemonConfigWriter& daemon_config);

  ServerProcess& aggregator() { return *aggregator_; }
  const ServerProcess& aggregator() const { return *aggregator_; }
  // REQUIRES: 0 <= index < num_daemons().
  ServerProcess& daemon(int index) { return *daemons_.at(index); }
  int num_daemons() const { return static_cast<int>(daemons_.size()); }
  static std::string DaemonName(int index);

  // Kills the aggregator with SIGKILL (a crash: nothing flushed) when it still runs and starts a
  // new one with `config`, which must listen on the old port for the daemons to find it again.
  absl::Status RestartAggregator(const std::string& config);

  // Every process's whole log, each under a "--- name ---" header.
  std::string Logs() const;

  ~FederationCluster();

 private:
  FederationCluster() = default;
  std::string dir_;
  std::unique_ptr<ServerProcess> aggregator_;
  std::vector<std::unique_ptr<ServerProcess>> killed_aggregators_;  // Kept for their logs.
  std::vector<std::unique_ptr<ServerProcess>> daemons_;
};

}  // namespace collm::testing

#endif  // COLLM_TESTING_FEDERATION_CLUSTER_H_
