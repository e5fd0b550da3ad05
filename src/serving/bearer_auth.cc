#include "collm/serving/bearer_auth.h"

#include "absl/strings/str_cat.h"
#include "collm/common/secret.h"

namespace collm::serving {

grpc::Status CheckBearerToken(const grpc::ServerContextBase& context, const std::string& token,
                              absl::string_view kind) {
  if (token.empty()) return grpc::Status::OK;
  const auto& md = context.client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) {
    return grpc::Status(
        grpc::StatusCode::UNAUTHENTICATED,
        absl::StrCat(kind, " calls need metadata 'authorization: Bearer <", kind, " token>'"));
  }
  const absl::string_view value(it->second.data(), it->second.size());
  if (!SameSecret(value, absl::StrCat("Bearer ", token))) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, absl::StrCat("wrong ", kind, " token"));
  }
  return grpc::Status::OK;
}

}  // namespace collm::serving
