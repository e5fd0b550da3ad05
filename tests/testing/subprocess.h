// Runs a real binary as a child process (through /bin/sh) and captures its output.
#ifndef COLLM_TESTING_SUBPROCESS_H_
#define COLLM_TESTING_SUBPROCESS_H_

#include <string>

namespace collm::testing {

struct ProcessResult {
  int exit_code = -1;
  std::string out;
  std::string err;
};

// `command` is a shell command line; env assignments may prefix it.
ProcessResult RunCommand(const std::string& command);

// Path of a binary built in this tree (e.g. "src/collmctl").
std::string BinaryPath(const std::string& relative);

}  // namespace collm::testing

#endif  // COLLM_TESTING_SUBPROCESS_H_
