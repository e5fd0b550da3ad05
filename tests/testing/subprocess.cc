#include "testing/subprocess.h"

#include <sys/wait.h>

#include <cstdlib>

#include "gtest/gtest.h"
#include "testing/test_env.h"

namespace collm::testing {

ProcessResult RunCommand(const std::string& command) {
  const std::string dir = MakeTempDir("collm-proc");
  const std::string out = dir + "/out", err = dir + "/err";
  const std::string full = command + " </dev/null >" + out + " 2>" + err;
  const int status = std::system(full.c_str());
  ProcessResult r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = ReadFileOrDie(out);
  r.err = ReadFileOrDie(err);
  return r;
}

std::string BinaryPath(const std::string& relative) {
#ifdef COLLM_BINARY_DIR
  return std::string(COLLM_BINARY_DIR) + "/" + relative;
#else
  return relative;
#endif
}

absl::StatusOr<std::unique_ptr<ServerProcess>> StartServer(const std::string& binary,
                                                           const std::string& config,
                                                           const std::string& dir,
                                                           const std::string& name,
                                                           std::chrono::milliseconds ready_timeout,
                                                           std::vector<std::string> env) {
  ServerProcess::Options options;
  options.binary = BinaryPath(binary);
  options.config = config;
  options.dir = dir;
  options.name = name;
  options.ready_timeout = ready_timeout;
  options.print_log_tail_if = CurrentTestFailed;
  options.env = std::move(env);
  return ServerProcess::Start(std::move(options));
}

bool CurrentTestFailed() { return ::testing::Test::HasFailure(); }

}  // namespace collm::testing
