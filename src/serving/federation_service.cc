#include "collm/serving/federation_service.h"

#include <algorithm>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "collm/common/crash_point.h"
#include "collm/common/grpc_status.h"
#include "collm/federation/adapter_stream.h"
#include "collm/serving/bearer_auth.h"

namespace collm::serving {
namespace {

// Sends a PEFT blob as a header then data chunks; false when the client went away.
bool SendBlob(int64_t version, const lora::PeftBlob& blob, int64_t chunk_bytes,
              grpc::ServerWriter<v1::AdapterChunk>* writer) {
  v1::AdapterChunk first;
  *first.mutable_header() = federation::DescribeAdapter(blob);
  first.mutable_header()->set_version(version);
  if (!writer->Write(first)) return false;
  return federation::WriteAdapterChunks(blob.safetensors, chunk_bytes, [&](std::string data) {
    v1::AdapterChunk c;
    c.set_data(std::move(data));
    return writer->Write(c);
  });
}

}  // namespace

grpc::Status FederationServiceImpl::CheckIdentity(grpc::ServerContext* context,
                                                  const std::string& device_id) const {
  if (!options_.device_id_from_cert) return grpc::Status::OK;
  const auto auth = context->auth_context();
  std::vector<grpc::string_ref> cns =
      auth ? auth->FindPropertyValues("x509_common_name") : std::vector<grpc::string_ref>{};
  if (auth == nullptr || !auth->IsPeerAuthenticated() || cns.empty()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "device calls need a verified client certificate (mutual TLS)");
  }
  const std::string cn(cns.front().data(), cns.front().size());
  if (cn != device_id) {
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        absl::StrCat("device_id '", device_id,
                                     "' does not match the client certificate's CN '", cn, "'"));
  }
  return grpc::Status::OK;
}

grpc::Status FederationServiceImpl::Register(grpc::ServerContext* context,
                                             const v1::RegisterRequest* request,
                                             v1::RegisterResponse* response) {
  if (grpc::Status s = CheckIdentity(context, request->device_id()); !s.ok()) return s;
  auto r = manager_.Register(*request, context->peer());
  if (!r.ok()) return ToGrpcStatus(r.status());
  *response = std::move(*r);
  return grpc::Status::OK;
}

grpc::Status FederationServiceImpl::Heartbeat(grpc::ServerContext* context,
                                              const v1::HeartbeatRequest* request,
                                              v1::HeartbeatResponse* response) {
  if (grpc::Status s = CheckIdentity(context, request->device_id()); !s.ok()) return s;
  auto r = manager_.Heartbeat(*request, context->peer());
  if (!r.ok()) return ToGrpcStatus(r.status());
  *response = std::move(*r);
  return grpc::Status::OK;
}

grpc::Status FederationServiceImpl::UploadUpdate(grpc::ServerContext* context,
                                                 grpc::ServerReader<v1::UpdateChunk>* reader,
                                                 v1::UploadResponse* response) {
  v1::UpdateChunk chunk;
  if (!reader->Read(&chunk)) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "empty upload: no UpdateHeader");
  }
  if (!chunk.has_header()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "the first UpdateChunk must carry the UpdateHeader");
  }
  const v1::UpdateHeader header = chunk.header();
  if (grpc::Status s = CheckIdentity(context, header.device_id()); !s.ok()) return s;
  if (absl::Status s = manager_.CheckSession(header.device_id(), header.session()); !s.ok()) {
    manager_.RecordRejection(header.device_id(), header.round(), std::string(s.message()),
                             "session");
    return ToGrpcStatus(s);
  }
  auto reject = [&](const std::string& reason) {
    manager_.RecordRejection(header.device_id(), header.round(), reason);
    response->set_accepted(false);
    response->set_reason(reason);
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, reason);
  };
  // An update always has a payload; the receiver checks the upper limit.
  if (header.adapter().safetensors_bytes() == 0) {
    return reject(absl::StrCat("adapter.safetensors_bytes must be in [1, ",
                               options_.max_update_bytes, "], got 0"));
  }
  if (header.adapter().config_json().empty()) return reject("adapter.config_json is empty");
  auto receiver =
      federation::AdapterReceiver::Begin(header.adapter(), options_.max_update_bytes, "update");
  if (!receiver.ok()) {
    return reject(
        absl::StrCat(receiver.status().message(), " (the aggregator's max_update_bytes)"));
  }
  while (reader->Read(&chunk)) {
    if (!chunk.has_data()) return reject("an UpdateChunk after the first carries a second header");
    if (absl::Status s = receiver->Add(chunk.data()); !s.ok()) {
      return reject(std::string(s.message()));
    }
    CrashPoint("upload_chunk");
  }
  if (context->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "upload cancelled");
  absl::StatusOr<lora::PeftBlob> blob = std::move(*receiver).Finish();
  if (!blob.ok()) return reject(std::string(blob.status().message()));
  if (absl::Status s = manager_.SubmitUpdate(header, *blob); !s.ok()) {
    response->set_accepted(false);
    response->set_reason(std::string(s.message()));
    return ToGrpcStatus(s);
  }
  response->set_accepted(true);
  return grpc::Status::OK;
}

grpc::Status FederationServiceImpl::FetchGlobal(grpc::ServerContext* context,
                                                const v1::FetchGlobalRequest* request,
                                                grpc::ServerWriter<v1::AdapterChunk>* writer) {
  if (grpc::Status s = CheckIdentity(context, request->device_id()); !s.ok()) return s;
  if (absl::Status s = manager_.CheckSession(request->device_id(), request->session()); !s.ok()) {
    return ToGrpcStatus(s);
  }
  auto global = manager_.GetGlobal(request->version());
  if (!global.ok()) return ToGrpcStatus(global.status());
  if (!SendBlob(global->first, global->second, options_.chunk_bytes, writer)) {
    return grpc::Status(grpc::StatusCode::CANCELLED, "client went away");
  }
  return grpc::Status::OK;
}

grpc::Status FederationAdminServiceImpl::Authorize(grpc::ServerContext* context) const {
  return CheckBearerToken(*context, options_.admin_token, "admin");
}

#define COLLM_AUTHORIZE()                                       \
  do {                                                          \
    if (grpc::Status s = Authorize(context); !s.ok()) return s; \
  } while (0)

grpc::Status FederationAdminServiceImpl::GetStatus(grpc::ServerContext* context,
                                                   const v1::GetStatusRequest*,
                                                   v1::FederationStatus* response) {
  COLLM_AUTHORIZE();
  *response = manager_.Status();
  return grpc::Status::OK;
}

grpc::Status FederationAdminServiceImpl::ListDevices(grpc::ServerContext* context,
                                                     const v1::ListDevicesRequest*,
                                                     v1::ListDevicesResponse* response) {
  COLLM_AUTHORIZE();
  for (auto& d : manager_.Devices()) *response->add_devices() = std::move(d);
  return grpc::Status::OK;
}

grpc::Status FederationAdminServiceImpl::ListRounds(grpc::ServerContext* context,
                                                    const v1::ListRoundsRequest* request,
                                                    v1::ListRoundsResponse* response) {
  COLLM_AUTHORIZE();
  if (request->limit() < 0) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("limit must be >= 0, got ", request->limit()));
  }
  for (auto& r : manager_.Rounds(request->limit())) *response->add_rounds() = std::move(r);
  return grpc::Status::OK;
}

grpc::Status FederationAdminServiceImpl::GetRound(grpc::ServerContext* context,
                                                  const v1::GetRoundRequest* request,
                                                  v1::RoundInfo* response) {
  COLLM_AUTHORIZE();
  auto r = manager_.Round(request->round());
  if (!r.ok()) return ToGrpcStatus(r.status());
  *response = std::move(*r);
  return grpc::Status::OK;
}

grpc::Status FederationAdminServiceImpl::Start(grpc::ServerContext* context,
                                               const v1::ControlRequest*,
                                               v1::FederationStatus* response) {
  COLLM_AUTHORIZE();
  auto r = manager_.Start();
  if (!r.ok()) return ToGrpcStatus(r.status());
  *response = std::move(*r);
  return grpc::Status::OK;
}

grpc::Status FederationAdminServiceImpl::Pause(grpc::ServerContext* context,
                                               const v1::ControlRequest*,
                                               v1::FederationStatus* response) {
  COLLM_AUTHORIZE();
  auto r = manager_.Pause();
  if (!r.ok()) return ToGrpcStatus(r.status());
  *response = std::move(*r);
  return grpc::Status::OK;
}

grpc::Status FederationAdminServiceImpl::Resume(grpc::ServerContext* context,
                                                const v1::ControlRequest*,
                                                v1::FederationStatus* response) {
  COLLM_AUTHORIZE();
  auto r = manager_.Resume();
  if (!r.ok()) return ToGrpcStatus(r.status());
  *response = std::move(*r);
  return grpc::Status::OK;
}

grpc::Status FederationAdminServiceImpl::SetPolicy(grpc::ServerContext* context,
                                                   const v1::SetPolicyRequest* request,
                                                   v1::FederationStatus* response) {
  COLLM_AUTHORIZE();
  auto r = manager_.SetPolicy(request->policy());
  if (!r.ok()) return ToGrpcStatus(r.status());
  *response = std::move(*r);
  return grpc::Status::OK;
}

grpc::Status FederationAdminServiceImpl::PullAdapter(grpc::ServerContext* context,
                                                     const v1::PullAdapterRequest* request,
                                                     grpc::ServerWriter<v1::AdapterChunk>* writer) {
  COLLM_AUTHORIZE();
  if (request->version() < 0) {
    return grpc::Status(
        grpc::StatusCode::INVALID_ARGUMENT,
        absl::StrCat("version must be >= 0 (0 = newest), got ", request->version()));
  }
  auto global = manager_.GetGlobal(request->version());
  if (!global.ok()) return ToGrpcStatus(global.status());
  if (!SendBlob(global->first, global->second, options_.chunk_bytes, writer)) {
    return grpc::Status(grpc::StatusCode::CANCELLED, "client went away");
  }
  return grpc::Status::OK;
}

grpc::Status FederationAdminServiceImpl::WatchRounds(
    grpc::ServerContext* context, const v1::WatchRequest*,
    grpc::ServerWriter<v1::FederationStatus>* writer) {
  COLLM_AUTHORIZE();
  std::string last;
  int64_t seen = -1;
  while (!context->IsCancelled() && !manager_.shut_down()) {
    const int64_t now = manager_.change_count();
    const v1::FederationStatus status = manager_.Status();
    // Devices go offline without an event, so the snapshot is compared, not only the counter.
    std::string bytes;
    status.SerializeToString(&bytes);
    if (bytes != last) {
      if (!writer->Write(status)) break;
      last = std::move(bytes);
    }
    seen = manager_.WaitForChange(now, options_.watch_poll_ms);
  }
  (void)seen;
  return grpc::Status::OK;
}

}  // namespace collm::serving
