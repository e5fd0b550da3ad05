// A gRPC server with the standard health service (grpc.health.v1: NOT_SERVING until SetServing)
// and server reflection, so grpcurl-style tools work.
#ifndef COLLM_SERVING_GRPC_SERVER_H_
#define COLLM_SERVING_GRPC_SERVER_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace collm::serving {

struct GrpcServerOptions {
  std::string address = "127.0.0.1:50051";  // Port 0 picks a free port (see port()).
  int64_t max_message_bytes = 64 << 20;
  // Listening credentials (TLS / mutual TLS); null = plaintext.
  std::shared_ptr<grpc::ServerCredentials> credentials;
};

// Thread-safe.
class GrpcServer {
 public:
  // Starts listening with `services` (borrowed; must outlive the server). Health starts as
  // NOT_SERVING. Unavailable naming the address when it cannot bind.
  static absl::StatusOr<std::unique_ptr<GrpcServer>> Start(
      const GrpcServerOptions& options, const std::vector<grpc::Service*>& services);
  ~GrpcServer();
  int port() const { return port_; }
  // Overall and per-service health.
  void SetServing(bool serving);
  // A channel to this server that never leaves the process (no socket, same services and
  // limits as remote callers get): for a front end in the same binary that must take the path a
  // remote call takes. Null after Shutdown.
  std::shared_ptr<grpc::Channel> InProcessChannel();
  // Stops accepting new calls and waits up to `grace_seconds` for in-flight ones. Idempotent.
  void Shutdown(double grace_seconds);

 private:
  GrpcServer() = default;
  std::mutex mu_;
  std::unique_ptr<grpc::Server> server_;    // Guarded by mu_; null after Shutdown.
  std::vector<std::string> service_names_;  // Fixed after Start.
  int port_ = 0;
  bool shut_down_ = false;  // Guarded by mu_.
};

}  // namespace collm::serving

#endif  // COLLM_SERVING_GRPC_SERVER_H_
