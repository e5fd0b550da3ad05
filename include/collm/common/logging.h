// The one place that knows spdlog. Other code logs through COLLM_LOG_* so the backend can change.
#ifndef COLLM_COMMON_LOGGING_H_
#define COLLM_COMMON_LOGGING_H_

#include <string>

#include "absl/status/status.h"
#include "spdlog/spdlog.h"

namespace collm {

struct LoggingOptions {
  std::string level = "info";  // trace, debug, info, warn, error, critical, off.
  bool json = false;           // One JSON object per line instead of human text.
};

// Configures the process-wide logger (stderr). Call once from main(); safe to call again.
// Returns InvalidArgument for an unknown level.
absl::Status InitLogging(const LoggingOptions& options);

}  // namespace collm

#define COLLM_LOG_DEBUG(...) SPDLOG_DEBUG(__VA_ARGS__)
#define COLLM_LOG_INFO(...) SPDLOG_INFO(__VA_ARGS__)
#define COLLM_LOG_WARN(...) SPDLOG_WARN(__VA_ARGS__)
#define COLLM_LOG_ERROR(...) SPDLOG_ERROR(__VA_ARGS__)

#endif  // COLLM_COMMON_LOGGING_H_
