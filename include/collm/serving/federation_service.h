// The aggregator's gRPC services on a RoundManager: FederationService (devices) and
// FederationAdminService (operators). See proto/collm/v1/federation.proto for the contract.
//
// Security (the listening credentials are the server's; these are the per-call checks):
//   - admin calls need metadata "authorization: Bearer <admin_token>" when a token is set, else
//     UNAUTHENTICATED;
//   - with device_id_from_cert (mutual TLS), a device call's device_id must equal the verified
//     client certificate's common name, else PERMISSION_DENIED.
// Every rejected upload (transport or content) is counted by the RoundManager and answered with
// INVALID_ARGUMENT / FAILED_PRECONDITION naming what is wrong.
// Sync API: handlers run on gRPC's thread pool; tensor work happens in the RoundManager outside
// its lock. Thread-safe.
#ifndef COLLM_SERVING_FEDERATION_SERVICE_H_
#define COLLM_SERVING_FEDERATION_SERVICE_H_

#include <cstdint>
#include <string>

#include "collm/federation/round_manager.h"
#include "collm/v1/federation.grpc.pb.h"

namespace collm::serving {

struct FederationServiceOptions {
  std::string admin_token;           // "" = admin calls are not authenticated (plaintext demos).
  bool device_id_from_cert = false;  // mTLS: device_id must be the client certificate's CN.
  int64_t max_update_bytes = 256 << 20;  // Largest accepted adapter payload.
  int64_t chunk_bytes = 1 << 20;         // Data chunk size when sending adapters.
  int64_t watch_poll_ms = 500;  // WatchRounds re-checks at least this often (offline devices).
};

// The device-facing service: Register, Heartbeat, UploadUpdate (chunked, size- and sha256-checked
// by federation::AdapterReceiver before the RoundManager sees it) and FetchGlobal. A thin layer: it
// checks identity and transport, and leaves every decision to the RoundManager, which it borrows
// (the aggregator's main owns both and keeps the manager alive until the server is shut down).
// Thread-safe: gRPC's sync handlers call it concurrently; it holds no mutable state of its own.
class FederationServiceImpl final : public v1::FederationService::Service {
 public:
  FederationServiceImpl(federation::RoundManager& manager, const FederationServiceOptions& options)
      : manager_(manager), options_(options) {}
  grpc::Status Register(grpc::ServerContext* context, const v1::RegisterRequest* request,
                        v1::RegisterResponse* response) override;
  grpc::Status Heartbeat(grpc::ServerContext* context, const v1::HeartbeatRequest* request,
                         v1::HeartbeatResponse* response) override;
  grpc::Status UploadUpdate(grpc::ServerContext* context,
                            grpc::ServerReader<v1::UpdateChunk>* reader,
                            v1::UploadResponse* response) override;
  grpc::Status FetchGlobal(grpc::ServerContext* context, const v1::FetchGlobalRequest* request,
                           grpc::ServerWriter<v1::AdapterChunk>* writer) override;

 private:
  grpc::Status CheckIdentity(grpc::ServerContext* context, const std::string& device_id) const;
  federation::RoundManager& manager_;
  const FederationServiceOptions options_;
};

// The operator-facing service (collmctl fed): status, devices, rounds, control (start / pause /
// resume), policy, adapter download and a status stream. Every call is authorized with the admin
// token first. Borrows the RoundManager like FederationServiceImpl (same owner, same lifetime).
// Thread-safe: no mutable state of its own; WatchRounds blocks its handler thread until the client
// goes away or the manager shuts down.
class FederationAdminServiceImpl final : public v1::FederationAdminService::Service {
 public:
  FederationAdminServiceImpl(federation::RoundManager& manager,
                             const FederationServiceOptions& options)
      : manager_(manager), options_(options) {}
  grpc::Status GetStatus(grpc::ServerContext* context, const v1::GetStatusRequest* request,
                         v1::FederationStatus* response) override;
  grpc::Status ListDevices(grpc::ServerContext* context, const v1::ListDevicesRequest* request,
                           v1::ListDevicesResponse* response) override;
  grpc::Status ListRounds(grpc::ServerContext* context, const v1::ListRoundsRequest* request,
                          v1::ListRoundsResponse* response) override;
  grpc::Status GetRound(grpc::ServerContext* context, const v1::GetRoundRequest* request,
                        v1::RoundInfo* response) override;
  grpc::Status Start(grpc::ServerContext* context, const v1::ControlRequest* request,
                     v1::FederationStatus* response) override;
  grpc::Status Pause(grpc::ServerContext* context, const v1::ControlRequest* request,
                     v1::FederationStatus* response) override;
  grpc::Status Resume(grpc::ServerContext* context, const v1::ControlRequest* request,
                      v1::FederationStatus* response) override;
  grpc::Status SetPolicy(grpc::ServerContext* context, const v1::SetPolicyRequest* request,
                         v1::FederationStatus* response) override;
  grpc::Status PullAdapter(grpc::ServerContext* context, const v1::PullAdapterRequest* request,
                           grpc::ServerWriter<v1::AdapterChunk>* writer) override;
  grpc::Status WatchRounds(grpc::ServerContext* context, const v1::WatchRequest* request,
                           grpc::ServerWriter<v1::FederationStatus>* writer) override;

 private:
  grpc::Status Authorize(grpc::ServerContext* context) const;
  federation::RoundManager& manager_;
  const FederationServiceOptions options_;
};

}  // namespace collm::serving

#endif  // COLLM_SERVING_FEDERATION_SERVICE_H_
