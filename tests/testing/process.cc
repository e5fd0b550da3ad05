#include "testing/process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

extern char** environ;

namespace collm::testing {
namespace {

constexpr auto kPollInterval = std::chrono::milliseconds(20);

std::string ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "";
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

absl::StatusOr<std::unique_ptr<ChildProcess>> ChildProcess::Start(Options options) {
  if (options.argv.empty()) return absl::InvalidArgumentError("ChildProcess: argv is empty");
  // Everything the child needs is prepared before fork: between fork and exec a child of a
  // multi-threaded parent (gRPC, torch) may only make async-signal-safe calls.
  std::vector<char*> argv;
  for (auto& a : options.argv) argv.push_back(a.data());
  argv.push_back(nullptr);
  // The parent's environment with options.env's entries replacing those of the same name.
  std::vector<std::string> env_storage;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string entry = *e;
    const std::string name = entry.substr(0, entry.find('='));
    const bool replaced = std::any_of(options.env.begin(), options.env.end(), [&](const auto& o) {
      return o.compare(0, name.size() + 1, name + "=") == 0;
    });
    if (!replaced) env_storage.push_back(entry);
  }
  env_storage.insert(env_storage.end(), options.env.begin(), options.env.end());
  std::vector<char*> envp;
  for (auto& e : env_storage) envp.push_back(e.data());
  envp.push_back(nullptr);
  const int log_fd =
      ::open(options.log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (log_fd < 0) {
    return absl::InternalError(
        absl::StrCat(options.log_path, ": cannot open the log: ", std::strerror(errno)));
  }
  const std::string exec_failed = absl::StrCat("exec ", options.argv[0], " failed: ");
  const pid_t pid = ::fork();
  if (pid < 0) {
    const std::string err = std::strerror(errno);
    ::close(log_fd);
    return absl::InternalError(absl::StrCat("fork for ", options.argv[0], " failed: ", err));
  }
  if (pid == 0) {
    if (options.file_size_limit > 0) {
      const rlimit limit = {static_cast<rlim_t>(options.file_size_limit),
                            static_cast<rlim_t>(options.file_size_limit)};
      ::setrlimit(RLIMIT_FSIZE, &limit);
    }
    const int null_fd = ::open("/dev/null", O_RDONLY);
    if (null_fd >= 0) ::dup2(null_fd, 0);
    ::dup2(log_fd, 1);
    ::dup2(log_fd, 2);
    ::execve(argv[0], argv.data(), envp.data());
    const char* reason = std::strerror(errno);  // Not strictly async-signal-safe; exiting anyway.
    (void)!::write(2, exec_failed.data(), exec_failed.size());
    (void)!::write(2, reason, std::strlen(reason));
    (void)!::write(2, "\n", 1);
    ::_exit(127);
  }
  ::close(log_fd);
  auto child = std::unique_ptr<ChildProcess>(new ChildProcess(std::move(options)));
  child->pid_ = pid;
  return child;
}

ChildProcess::~ChildProcess() {
  if (options_.print_log_tail_if && options_.print_log_tail_if()) {
    std::cerr << "--- last lines of " << options_.log_path << " (" << options_.argv[0] << ", pid "
              << pid_ << ", " << Describe() << ") ---\n"
              << LogTail() << "--- end of " << options_.log_path << " ---" << std::endl;
  }
  Stop();
}

void ChildProcess::Reap(int wait_status) {
  exit_code_ = WIFEXITED(wait_status) ? WEXITSTATUS(wait_status) : 128 + WTERMSIG(wait_status);
}

bool ChildProcess::Running() {
  if (exit_code_ >= 0) return false;
  int status = 0;
  const pid_t r = ::waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    Reap(status);
    return false;
  }
  return r == 0;
}

bool ChildProcess::WaitForExit(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (Running()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(kPollInterval);
  }
  return true;
}

int ChildProcess::Stop() {
  if (!Running()) return exit_code_;
  ::kill(pid_, SIGTERM);
  if (WaitForExit(options_.stop_grace)) return exit_code_;
  return Kill();
}

int ChildProcess::Kill() {
  if (!Running()) return exit_code_;
  ::kill(pid_, SIGKILL);
  int status = 0;
  while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
  }
  Reap(status);
  return exit_code_;
}

absl::StatusOr<std::string> ChildProcess::WaitForFile(const std::string& path,
                                                      std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    // Checked before the file, so a child that wrote the file and then died is still an error.
    if (!Running()) {
      return absl::FailedPreconditionError(
          absl::StrCat(options_.argv[0], " ", Describe(), " before writing ", path, "; last lines",
                       " of ", options_.log_path, ":\n", LogTail()));
    }
    const std::string contents = ReadWholeFile(path);
    if (!contents.empty()) return contents;
    if (std::chrono::steady_clock::now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          options_.argv[0], " (pid ", pid_, ") wrote no ", path, " within ", timeout.count(),
          " ms; last lines of ", options_.log_path, ":\n", LogTail()));
    }
    std::this_thread::sleep_for(kPollInterval);
  }
}

std::string ChildProcess::Log() const { return ReadWholeFile(options_.log_path); }

std::string ChildProcess::LogTail(int lines) const {
  if (lines <= 0) return "";
  const std::string log = Log();
  // A trailing newline ends the last line; it does not start another.
  size_t begin = log.size() > 0 && log.back() == '\n' ? log.size() - 1 : log.size();
  for (int n = 0; n < lines; ++n) {
    const size_t nl = begin == 0 ? std::string::npos : log.rfind('\n', begin - 1);
    if (nl == std::string::npos) return log;
    begin = nl;
  }
  return log.substr(begin + 1);
}

std::string ChildProcess::Describe() const {
  if (exit_code_ < 0) return "running";
  if (exit_code_ > 128) return absl::StrCat("killed by signal ", exit_code_ - 128);
  return absl::StrCat("exited with status ", exit_code_);
}

absl::StatusOr<std::map<std::string, int>> ParsePortsFile(const std::string& text) {
  std::map<std::string, int> ports;
  for (absl::string_view word : absl::StrSplit(text, absl::ByAnyChar(" \t\n"), absl::SkipEmpty())) {
    const std::vector<absl::string_view> kv = absl::StrSplit(word, absl::MaxSplits('=', 1));
    int port = 0;
    if (kv.size() != 2 || kv[0].empty() || !absl::SimpleAtoi(kv[1], &port) || port <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("ports file: '", word, "' is not key=<positive port>"));
    }
    ports[std::string(kv[0])] = port;
  }
  return ports;
}

absl::StatusOr<std::unique_ptr<ServerProcess>> ServerProcess::Start(Options options) {
  const std::string ports_file = absl::StrCat(options.dir, "/", options.name, ".ports");
  ::unlink(ports_file.c_str());  // A file left by an earlier run must not pass for this one's.
  ChildProcess::Options child;
  child.argv = {options.binary, "--config", options.config, "--ports-file", ports_file};
  child.argv.insert(child.argv.end(), options.extra_args.begin(), options.extra_args.end());
  child.log_path = absl::StrCat(options.dir, "/", options.name, ".log");
  child.stop_grace = options.stop_grace;
  child.print_log_tail_if = std::move(options.print_log_tail_if);
  child.env = std::move(options.env);
  child.file_size_limit = options.file_size_limit;
  auto server = std::unique_ptr<ServerProcess>(new ServerProcess());
  auto process = ChildProcess::Start(std::move(child));
  if (!process.ok()) return process.status();
  server->process_ = *std::move(process);
  auto text = server->process_->WaitForFile(ports_file, options.ready_timeout);
  if (!text.ok()) return text.status();
  auto ports = ParsePortsFile(*text);
  if (!ports.ok() || ports->count("grpc") == 0) {
    return absl::InternalError(
        absl::StrCat(options.binary, " wrote ", ports_file, " without a grpc port: '", *text, "'",
                     ports.ok() ? "" : absl::StrCat(" (", ports.status().message(), ")"),
                     "; last lines of its log:\n", server->process_->LogTail()));
  }
  server->ports_ = *std::move(ports);
  return server;
}

int ServerProcess::port(const std::string& key) const {
  auto it = ports_.find(key);
  return it == ports_.end() ? 0 : it->second;
}

std::string ServerProcess::address() const { return absl::StrCat("127.0.0.1:", grpc_port()); }

}  // namespace collm::testing
