// A loopback TCP proxy for fault-injection tests: it forwards 127.0.0.1:port() to a target port
// on 127.0.0.1 and, on command, cuts the link (open connections reset, new ones refused), resets
// every open connection once, or delays every forwarded chunk. A device that dials the proxy
// instead of the aggregator sees what a flaky edge uplink does to gRPC: resets mid-stream,
// UNAVAILABLE while cut, slow streams.
#ifndef COLLM_TESTING_TCP_PROXY_H_
#define COLLM_TESTING_TCP_PROXY_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"

namespace collm::testing {

// Thread-safe. One thread accepts; each connection gets one thread pumping both directions.
class TcpProxy {
 public:
  // Listens on 127.0.0.1, a port the kernel picks, forwarding to 127.0.0.1:target_port.
  static absl::StatusOr<std::unique_ptr<TcpProxy>> Start(int target_port);
  ~TcpProxy();  // Closes everything and joins the threads.

  int port() const { return port_; }

  // Resets every open connection (RST, not FIN: the peer sees ECONNRESET) and refuses new ones the
  // same way until Restore().
  void Cut();
  void Restore();
  // Resets every connection open now; new ones are served as before.
  void ResetAll();
  // Each chunk read from either side waits this long before it is forwarded (0 = none).
  void SetDelay(std::chrono::milliseconds delay);

  int64_t connections_accepted() const { return accepted_.load(); }
  int64_t connections_reset() const { return reset_.load(); }

 private:
  TcpProxy() = default;
  void AcceptLoop();
  void Pump(int client, int upstream, uint64_t generation);

  int listen_fd_ = -1;
  int port_ = 0;
  int target_port_ = 0;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> cut_{false};
  // Bumped by Cut() and ResetAll(): a pump whose generation is older resets its connection.
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> delay_ms_{0};
  std::atomic<int64_t> accepted_{0};
  std::atomic<int64_t> reset_{0};
  std::thread acceptor_;
  std::mutex mu_;
  std::vector<std::thread> pumps_;  // Guarded by mu_.
};

}  // namespace collm::testing

#endif  // COLLM_TESTING_TCP_PROXY_H_
