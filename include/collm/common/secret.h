// Comparing secrets (API keys, admin tokens) a client presents.
#ifndef COLLM_COMMON_SECRET_H_
#define COLLM_COMMON_SECRET_H_

#include "absl/strings/string_view.h"

namespace collm {

// Equality in time that depends only on the lengths, so response timing does not reveal how long
// a prefix of a guess matched.
bool SameSecret(absl::string_view a, absl::string_view b);

}  // namespace collm

#endif  // COLLM_COMMON_SECRET_H_
