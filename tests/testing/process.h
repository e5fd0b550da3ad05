// Child processes for integration tests and load benchmarks: start a real binary with its output
// in a log file, wait for a file it writes (noticing at once when it dies instead), stop it with
// SIGTERM and then SIGKILL. No gtest here, so benchmarks link it too (target
// collm_testing_process); tests/testing/subprocess.h adds the gtest-aware defaults.
#ifndef COLLM_TESTING_PROCESS_H_
#define COLLM_TESTING_PROCESS_H_

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace collm::testing {

// One child process (fork + exec, no shell), stdin from /dev/null, stdout and stderr appended to a
// log file. The destructor stops a child that still runs (Stop()). Owned by one thread; not
// thread-safe.
class ChildProcess {
 public:
  struct Options {
    // argv[0] is the path of the executable (no PATH lookup). REQUIRES: non-empty.
    std::vector<std::string> argv;
    // Receives the child's stdout and stderr (appended; created when missing).
    std::string log_path;
    // Stop(): how long the child gets after SIGTERM before SIGKILL. Default 30 s (a daemon drains
    // its requests and checkpoints on SIGTERM).
    std::chrono::milliseconds stop_grace = std::chrono::seconds(30);
    // Asked once at destruction; when it returns true the log tail goes to stderr (tests pass
    // "the current test has failed"). Empty: never.
    std::function<bool()> print_log_tail_if;
    // "NAME=value" entries added to (or replacing in) the parent's environment for the child.
    std::vector<std::string> env;
    // > 0: RLIMIT_FSIZE of the child, in bytes (a write past it fails with EFBIG, as on a full
    // disk, once the child ignores SIGXFSZ as the daemons do).
    int64_t file_size_limit = 0;
  };

  // Starts the child. InvalidArgument on an empty argv, InternalError when the log cannot be
  // opened or fork fails; an executable that cannot be exec'd exits 127 with the reason in its log.
  static absl::StatusOr<std::unique_ptr<ChildProcess>> Start(Options options);

  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  ~ChildProcess();

  // Polls every 20 ms, up to `timeout`, until `path` exists and is not empty; the child is reaped
  // (waitpid WNOHANG) on every poll, so a child that died fails at once. Returns the file's
  // contents. FailedPrecondition when the child exited, DeadlineExceeded on timeout; both carry
  // the exit status and the log tail.
  absl::StatusOr<std::string> WaitForFile(const std::string& path,
                                          std::chrono::milliseconds timeout);

  // True while the child has not exited (reaps it when it has).
  bool Running();
  // SIGTERM, up to options.stop_grace for it to exit, then SIGKILL. Returns the exit code, or
  // 128 + signal when a signal ended it. Idempotent: later calls return the same code.
  int Stop();
  // SIGKILL now; returns as Stop().
  int Kill();
  // Exit code of a child that has exited (as Stop()); -1 while it runs.
  int exit_code() const { return exit_code_; }

  pid_t pid() const { return pid_; }
  const std::string& log_path() const { return options_.log_path; }
  // The whole log, and its last `lines` lines ("" when unreadable).
  std::string Log() const;
  std::string LogTail(int lines = 40) const;
  // "exited with status N" / "killed by signal S" / "running", for messages.
  std::string Describe() const;

 private:
  explicit ChildProcess(Options options) : options_(std::move(options)) {}
  // Blocks up to `timeout` for the child to exit; true once it has (exit_code_ set).
  bool WaitForExit(std::chrono::milliseconds timeout);
  void Reap(int wait_status);

  Options options_;
  pid_t pid_ = -1;
  int exit_code_ = -1;
};

// A server binary run as `BINARY --config CONFIG --ports-file PORTS [extra...]` that listens on
// port 0 and then writes its ports, atomically, as "grpc=N metrics=M" (collmd,
// collm-aggregator). Start() returns once the ports are known. Owned by one thread.
class ServerProcess {
 public:
  struct Options {
    std::string binary;  // Path of the executable.
    std::string config;  // Passed as --config.
    std::string dir;     // Ports file and log go here, as NAME.ports and NAME.log.
    std::string name;
    std::vector<std::string> extra_args;
    // Until the ports file appears (model loading on busy cores is slow).
    std::chrono::milliseconds ready_timeout = std::chrono::seconds(60);
    std::chrono::milliseconds stop_grace = std::chrono::seconds(30);
    std::function<bool()> print_log_tail_if;  // As ChildProcess::Options.
    std::vector<std::string> env;             // As ChildProcess::Options.
    int64_t file_size_limit = 0;              // As ChildProcess::Options.
  };

  // Starts the binary and waits for its ports: an error (with the log tail) when it dies first,
  // times out, or writes a ports file without a positive grpc port.
  static absl::StatusOr<std::unique_ptr<ServerProcess>> Start(Options options);

  // Port named `key` in the ports file; 0 when absent.
  int port(const std::string& key) const;
  int grpc_port() const { return port("grpc"); }
  int metrics_port() const { return port("metrics"); }
  // "127.0.0.1:<grpc port>".
  std::string address() const;

  ChildProcess& process() { return *process_; }
  const ChildProcess& process() const { return *process_; }
  int Stop() { return process_->Stop(); }
  int Kill() { return process_->Kill(); }
  std::string log() const { return process_->Log(); }

 private:
  ServerProcess() = default;
  std::unique_ptr<ChildProcess> process_;
  std::map<std::string, int> ports_;
};

// Parses "key=value" words ("grpc=5001 metrics=9100"). InvalidArgument naming the word that is not
// key=<positive int>.
absl::StatusOr<std::map<std::string, int>> ParsePortsFile(const std::string& text);

}  // namespace collm::testing

#endif  // COLLM_TESTING_PROCESS_H_
