// Runs a real binary as a child process: a command through /bin/sh with its output captured, or a
// server (collmd, collm-aggregator) kept running for the test (testing/process.h, with the log
// tail printed when the test fails).
#ifndef COLLM_TESTING_SUBPROCESS_H_
#define COLLM_TESTING_SUBPROCESS_H_

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "testing/process.h"

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

// Starts BinaryPath(binary) --config `config` as a ServerProcess with NAME.log and NAME.ports in
// `dir`, and waits (up to `ready_timeout`) for its ports. The log tail goes to stderr when the
// process is destroyed during a failed test. `env`: "NAME=value" entries for the child only.
absl::StatusOr<std::unique_ptr<ServerProcess>> StartServer(
    const std::string& binary, const std::string& config, const std::string& dir,
    const std::string& name, std::chrono::milliseconds ready_timeout = std::chrono::seconds(60),
    std::vector<std::string> env = {});

// True when the running gtest test has failed so far (for ChildProcess::Options).
bool CurrentTestFailed();

}  // namespace collm::testing

// Declares `collm::testing::ServerProcess& var`, started by StartServer(binary, config, dir, name);
// fails the test (with the log tail) when it does not come up.
#define COLLM_START_SERVER(var, binary, config, dir, name)                        \
  auto var##_started_ = ::collm::testing::StartServer(binary, config, dir, name); \
  ASSERT_TRUE(var##_started_.ok()) << var##_started_.status();                    \
  ::collm::testing::ServerProcess& var = **var##_started_

#endif  // COLLM_TESTING_SUBPROCESS_H_
