// The child-process fixture itself, on real /bin/sh children: early death is an error at once with
// the log tail, SIGTERM-ignoring children get SIGKILL, ports files are parsed or refused.
#include "testing/process.h"

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <thread>

#include "gtest/gtest.h"
#include "testing/test_env.h"

namespace collm::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

std::unique_ptr<ChildProcess> StartShell(const std::string& dir, const std::string& script,
                                         milliseconds stop_grace = seconds(30)) {
  ChildProcess::Options options;
  options.argv = {"/bin/sh", "-c", script};
  options.log_path = dir + "/child.log";
  options.stop_grace = stop_grace;
  auto child = ChildProcess::Start(std::move(options));
  EXPECT_TRUE(child.ok()) << child.status();
  return child.ok() ? *std::move(child) : nullptr;
}

// A stand-in for collmd / collm-aggregator: `script` runs with $4 = the --ports-file path.
std::string WriteServerScript(const std::string& dir, const std::string& body) {
  const std::string path = dir + "/server.sh";
  WriteFileOrDie(path, "#!/bin/sh\n" + body + "\n");
  EXPECT_EQ(::chmod(path.c_str(), 0755), 0);
  return path;
}

ServerProcess::Options ServerOptions(const std::string& dir, const std::string& binary) {
  ServerProcess::Options options;
  options.binary = binary;
  options.config = dir + "/unused.yaml";
  options.dir = dir;
  options.name = "server";
  options.ready_timeout = seconds(20);
  return options;
}

TEST(ChildProcessTest, ChildThatExitsEarlyFailsTheWaitAtOnceWithItsLogTail) {
  const std::string dir = MakeTempDir("process-early");
  auto child = StartShell(dir, "echo line-1; echo 'fatal: bad config key' >&2; exit 3");
  ASSERT_NE(child, nullptr);
  const auto start = std::chrono::steady_clock::now();
  auto r = child->WaitForFile(dir + "/never", seconds(60));
  ASSERT_FALSE(r.ok());
  // Noticed by waitpid, not by running into the 60 s timeout.
  EXPECT_LT(std::chrono::steady_clock::now() - start, seconds(20));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  EXPECT_NE(r.status().message().find("exited with status 3"), std::string::npos) << r.status();
  EXPECT_NE(r.status().message().find("fatal: bad config key"), std::string::npos) << r.status();
  EXPECT_NE(r.status().message().find("line-1"), std::string::npos) << "stdout is logged too";
  EXPECT_EQ(child->exit_code(), 3);
  EXPECT_FALSE(child->Running());
}

TEST(ChildProcessTest, MissingExecutableExits127NamingIt) {
  const std::string dir = MakeTempDir("process-noexec");
  ChildProcess::Options options;
  options.argv = {dir + "/no-such-binary"};
  options.log_path = dir + "/child.log";
  auto child = ChildProcess::Start(std::move(options));
  ASSERT_TRUE(child.ok()) << child.status();
  auto r = (*child)->WaitForFile(dir + "/ports", seconds(20));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ((*child)->exit_code(), 127);
  EXPECT_NE(r.status().message().find("no-such-binary failed"), std::string::npos) << r.status();
}

TEST(ChildProcessTest, WaitTimesOutWithTheLogTailWhileTheChildRuns) {
  const std::string dir = MakeTempDir("process-timeout");
  auto child = StartShell(dir, "echo still-loading; exec sleep 30");
  ASSERT_NE(child, nullptr);
  ASSERT_TRUE(child->WaitForFile(child->log_path(), seconds(20)).ok());  // The echo is in.
  auto r = child->WaitForFile(dir + "/never", milliseconds(300));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded) << r.status();
  EXPECT_NE(r.status().message().find("still-loading"), std::string::npos) << r.status();
  EXPECT_TRUE(child->Running());
  EXPECT_EQ(child->Stop(), 128 + SIGTERM);
}

TEST(ChildProcessTest, StopSendsSigtermFirstAndTheChildExitsCleanly) {
  const std::string dir = MakeTempDir("process-term");
  auto child = StartShell(dir, "trap 'echo got-term; exit 0' TERM; echo up > " + dir +
                                   "/ready; while :; do sleep 0.05; done");
  ASSERT_NE(child, nullptr);
  ASSERT_TRUE(child->WaitForFile(dir + "/ready", seconds(20)).ok());
  EXPECT_EQ(child->Stop(), 0);
  EXPECT_NE(child->Log().find("got-term"), std::string::npos) << child->Log();
  EXPECT_EQ(child->Stop(), 0) << "idempotent";
}

TEST(ChildProcessTest, ChildThatIgnoresSigtermGetsSigkillAfterTheGrace) {
  const std::string dir = MakeTempDir("process-kill");
  auto child = StartShell(
      dir,
      "trap 'echo ignoring-term' TERM; echo up > " + dir + "/ready; while :; do sleep 0.05; done",
      milliseconds(500));
  ASSERT_NE(child, nullptr);
  ASSERT_TRUE(child->WaitForFile(dir + "/ready", seconds(20)).ok());
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(child->Stop(), 128 + SIGKILL);
  EXPECT_GE(std::chrono::steady_clock::now() - start, milliseconds(500)) << "waited the grace";
  EXPECT_NE(child->Describe().find("killed by signal 9"), std::string::npos);
  EXPECT_NE(child->Log().find("ignoring-term"), std::string::npos) << "SIGTERM came first";
}

TEST(ChildProcessTest, LogTailKeepsTheLastLines) {
  const std::string dir = MakeTempDir("process-tail");
  auto child = StartShell(dir, "for i in 1 2 3 4 5; do echo line-$i; done");
  ASSERT_NE(child, nullptr);
  while (child->Running()) std::this_thread::sleep_for(milliseconds(20));
  EXPECT_EQ(child->LogTail(2), "line-4\nline-5\n");
  EXPECT_EQ(child->LogTail(10), child->Log());
  EXPECT_EQ(child->LogTail(0), "");
}

TEST(ServerProcessTest, ReadsThePortsTheServerWrites) {
  const std::string dir = MakeTempDir("process-server");
  const std::string bin = WriteServerScript(
      dir,
      "test \"$1\" = --config && test \"$3\" = --ports-file || exit 9\n"
      "printf 'grpc=5001 metrics=9100' > \"$4.tmp\" && mv \"$4.tmp\" \"$4\"\nexec sleep 30");
  auto server = ServerProcess::Start(ServerOptions(dir, bin));
  ASSERT_TRUE(server.ok()) << server.status();
  EXPECT_EQ((*server)->grpc_port(), 5001);
  EXPECT_EQ((*server)->metrics_port(), 9100);
  EXPECT_EQ((*server)->port("http"), 0);
  EXPECT_EQ((*server)->address(), "127.0.0.1:5001");
  EXPECT_EQ((*server)->Stop(), 128 + SIGTERM);
}

TEST(ServerProcessTest, ServerThatDiesBeforeItsPortsIsAnErrorWithItsLog) {
  const std::string dir = MakeTempDir("process-server-dies");
  const std::string bin =
      WriteServerScript(dir, "echo 'config: engine.max_runing: unknown key' >&2; exit 2");
  auto server = ServerProcess::Start(ServerOptions(dir, bin));
  ASSERT_FALSE(server.ok());
  EXPECT_NE(server.status().message().find("exited with status 2"), std::string::npos)
      << server.status();
  EXPECT_NE(server.status().message().find("engine.max_runing"), std::string::npos)
      << server.status();
}

TEST(ServerProcessTest, PortsFileWithoutAGrpcPortIsRefused) {
  const std::string dir = MakeTempDir("process-server-badports");
  const std::string bin = WriteServerScript(dir, "printf 'grpc=zero' > \"$4\"\nexec sleep 30");
  auto server = ServerProcess::Start(ServerOptions(dir, bin));
  ASSERT_FALSE(server.ok());
  EXPECT_NE(server.status().message().find("'grpc=zero' is not key=<positive port>"),
            std::string::npos)
      << server.status();
}

TEST(ParsePortsFileTest, ParsesWordsAndNamesTheBadOne) {
  auto ports = ParsePortsFile("grpc=1 metrics=2\n");
  ASSERT_TRUE(ports.ok()) << ports.status();
  EXPECT_EQ(ports->at("grpc"), 1);
  EXPECT_EQ(ports->at("metrics"), 2);
  auto bad = ParsePortsFile("grpc=1 metrics");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("'metrics'"), std::string::npos) << bad.status();
}

}  // namespace
}  // namespace collm::testing
