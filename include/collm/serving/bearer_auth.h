// Bearer-token authorization of gRPC calls ("authorization: Bearer <token>" metadata), shared by
// the aggregator's admin service and collmd's adapter-management calls.
#ifndef COLLM_SERVING_BEARER_AUTH_H_
#define COLLM_SERVING_BEARER_AUTH_H_

#include <grpcpp/grpcpp.h>

#include <string>

#include "absl/strings/string_view.h"

namespace collm::serving {

// OK when `token` is empty (authentication not configured) or the call carries the token;
// UNAUTHENTICATED otherwise, naming the `kind` of token ("admin") and how to send it.
grpc::Status CheckBearerToken(const grpc::ServerContextBase& context, const std::string& token,
                              absl::string_view kind);

}  // namespace collm::serving

#endif  // COLLM_SERVING_BEARER_AUTH_H_
