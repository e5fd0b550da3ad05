// The one conversion between absl::Status (every module's API) and grpc::Status (the service
// layer and gRPC clients). absl and gRPC use the canonical status codes with the same numbers, so
// the code carries over unchanged. Its own small library (collm_grpc_status), so collm_common stays
// free of gRPC.
#ifndef COLLM_COMMON_GRPC_STATUS_H_
#define COLLM_COMMON_GRPC_STATUS_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace collm {

// The same code and message; OK -> grpc::Status::OK.
grpc::Status ToGrpcStatus(const absl::Status& status);

// The same code; the message is prefixed with "`context`: " when `context` is not empty (the call
// that failed, e.g. "Register"). OK -> OkStatus().
absl::Status FromGrpcStatus(const grpc::Status& status, absl::string_view context = "");

}  // namespace collm

#endif  // COLLM_COMMON_GRPC_STATUS_H_
