#include "collm/engine/request.h"

#include "absl/strings/str_cat.h"

namespace collm::engine {

absl::Status ValidateRequest(const EngineRequest& request, const RequestLimits& limits,
                             absl::string_view prompt_field) {
  const int64_t n = static_cast<int64_t>(request.prompt.size());
  if (n == 0) return absl::InvalidArgumentError(absl::StrCat(prompt_field, " is empty"));
  if (n >= limits.context_size) {
    return absl::InvalidArgumentError(
        absl::StrCat(prompt_field, " has ", n, " tokens; the context is ", limits.context_size));
  }
  for (int64_t i = 0; i < n; ++i) {
    const int32_t id = request.prompt[static_cast<size_t>(i)];
    if (id < 0 || id >= limits.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(prompt_field, "[", i, "] = ", id,
                                                     " is outside the vocabulary [0, ",
                                                     limits.vocab_size, ")"));
    }
  }
  const runtime::SamplingParams& p = request.params;
  for (size_t i = 0; i < p.stop.size(); ++i) {
    if (p.stop[i].empty()) {
      return absl::InvalidArgumentError(absl::StrCat("sampling.stop[", i, "] is empty"));
    }
  }
  if (!p.stop.empty() && !limits.has_tokenizer) {
    return absl::InvalidArgumentError("sampling.stop: stop strings need a tokenizer");
  }
  if (absl::Status valid = p.Validate(); !valid.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("sampling.", valid.message()));
  }
  return absl::OkStatus();
}

}  // namespace collm::engine
