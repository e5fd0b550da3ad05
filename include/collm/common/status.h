// Status helpers shared by every module. Fallible public APIs return absl::Status or
// absl::StatusOr<T>; these macros keep the early-return plumbing short.
#ifndef COLLM_COMMON_STATUS_H_
#define COLLM_COMMON_STATUS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

#define COLLM_CONCAT_INNER_(a, b) a##b
#define COLLM_CONCAT_(a, b) COLLM_CONCAT_INNER_(a, b)

// Returns from the enclosing function if `expr` yields a non-OK absl::Status.
#define COLLM_RETURN_IF_ERROR(expr)                \
  do {                                             \
    ::absl::Status collm_status_ = (expr);         \
    if (!collm_status_.ok()) return collm_status_; \
  } while (0)

// `COLLM_ASSIGN_OR_RETURN(auto x, MaybeX());` declares x from an OK StatusOr or returns its
// error from the enclosing function.
#define COLLM_ASSIGN_OR_RETURN(lhs, expr) \
  COLLM_ASSIGN_OR_RETURN_IMPL_(COLLM_CONCAT_(collm_statusor_, __LINE__), lhs, expr)
#define COLLM_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                 \
  if (!tmp.ok()) return std::move(tmp).status();     \
  lhs = std::move(tmp).value()

namespace collm {

// Prefixes a non-OK status message with `context` ("loading config.json: ...").
inline absl::Status Annotate(const absl::Status& status, absl::string_view context) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat(context, ": ", status.message()));
}

}  // namespace collm

#endif  // COLLM_COMMON_STATUS_H_
