#include "testing/subprocess.h"

#include <sys/wait.h>

#include <cstdlib>

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

}  // namespace collm::testing
