// collmctl task make and collmctl demo as scripts/run.sh runs them: a real collmctl process, and
// for the driver a real collmd started on the shipped configs/demo.yaml.
#include <cstdlib>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "testing/subprocess.h"
#include "testing/test_env.h"
#include "testing/tiny_model.h"

namespace collm::cli {
namespace {

using collm::testing::BinaryPath;
using collm::testing::ReadFileOrDie;
using collm::testing::RunCommand;

std::string Collmctl() { return BinaryPath("src/collmctl"); }

std::vector<nlohmann::json> ReadJsonl(const std::string& path) {
  std::vector<nlohmann::json> records;
  std::istringstream in(ReadFileOrDie(path));
  for (std::string line; std::getline(in, line);) records.push_back(nlohmann::json::parse(line));
  return records;
}

TEST(CollmctlTaskTest, DeterministicDisjointSplitsOfTheAskedSize) {
  for (const std::string kind : {"parity", "copy"}) {
    const std::string a = collm::testing::MakeTempDir("task-a");
    const std::string b = collm::testing::MakeTempDir("task-b");
    const std::string args = " task make --kind " + kind + " --train 300 --heldout 40 --seed 3";
    ASSERT_EQ(RunCommand(Collmctl() + args + " --out " + a).exit_code, 0);
    ASSERT_EQ(RunCommand(Collmctl() + args + " --out " + b).exit_code, 0);
    EXPECT_EQ(ReadFileOrDie(a + "/train.jsonl"), ReadFileOrDie(b + "/train.jsonl"));
    EXPECT_EQ(ReadFileOrDie(a + "/heldout.jsonl"), ReadFileOrDie(b + "/heldout.jsonl"));
    const auto train = ReadJsonl(a + "/train.jsonl");
    const auto heldout = ReadJsonl(a + "/heldout.jsonl");
    ASSERT_EQ(train.size(), 300u);
    ASSERT_EQ(heldout.size(), 40u);
    std::set<std::string> train_prompts;
    for (const auto& r : train) train_prompts.insert(r.at("prompt").get<std::string>());
    EXPECT_EQ(train_prompts.size(), train.size()) << kind << ": repeated training prompts";
    for (const auto& r : heldout) {
      EXPECT_EQ(train_prompts.count(r.at("prompt").get<std::string>()), 0u)
          << kind << ": held-out prompt trained on: " << r.dump();
      EXPECT_FALSE(r.at("completion").get<std::string>().empty());
    }
    if (kind == "parity") {
      for (const auto& r : train) {
        const std::string p = r.at("prompt");
        const int n = std::stoi(p.substr(p.find(' ') + 1));
        EXPECT_EQ(r.at("completion"), n % 2 == 0 ? "even" : "odd") << p;
      }
    }
    // Another seed, another task.
    const std::string c = collm::testing::MakeTempDir("task-c");
    ASSERT_EQ(RunCommand(Collmctl() + " task make --kind " + kind +
                         " --train 300 --heldout 40 --seed 4 --out " + c)
                  .exit_code,
              0);
    EXPECT_NE(ReadFileOrDie(a + "/train.jsonl"), ReadFileOrDie(c + "/train.jsonl"));
  }
}

TEST(CollmctlTaskTest, BadArgumentsGiveClearErrors) {
  const std::string dir = collm::testing::MakeTempDir("task-bad");
  auto kind = RunCommand(Collmctl() + " task make --kind sort --out " + dir);
  EXPECT_EQ(kind.exit_code, 2);
  EXPECT_NE(kind.err.find("--kind must be parity or copy, got 'sort'"), std::string::npos)
      << kind.err;
  auto size = RunCommand(Collmctl() + " task make --train 0 --out " + dir);
  EXPECT_EQ(size.exit_code, 2);
  EXPECT_NE(size.err.find("--train and --heldout must be >= 1"), std::string::npos) << size.err;
  auto out = RunCommand(Collmctl() + " task make");
  EXPECT_NE(out.exit_code, 0);
  EXPECT_NE(out.err.find("--out"), std::string::npos) << out.err;
  auto demo = RunCommand(Collmctl() + " demo --heldout " + dir + "/missing.jsonl");
  EXPECT_EQ(demo.exit_code, 2);
  EXPECT_NE(demo.err.find("cannot read --heldout"), std::string::npos) << demo.err;
}

// The SUMMARY block's `key value` lines.
std::map<std::string, double> Summary(const std::string& out) {
  std::map<std::string, double> kv;
  const auto at = out.find("SUMMARY\n");
  if (at == std::string::npos) return kv;
  std::istringstream in(out.substr(at + 8));
  for (std::string key, value; in >> key >> value;) kv[key] = std::stod(value);
  return kv;
}

// The evaluation table's rows: the second column (served: base, v12, global v3) and the last
// (held-out loss).
std::vector<std::pair<std::string, double>> EvalRows(const std::string& out) {
  std::vector<std::pair<std::string, double>> rows;
  std::istringstream in(out.substr(0, out.find("SUMMARY")));
  bool table = false;
  for (std::string line; std::getline(in, line);) {
    if (line.find("time_s") != std::string::npos) {
      table = true;
      continue;
    }
    if (!table || line.empty()) continue;
    std::istringstream row(line);
    std::vector<std::string> cols;
    for (std::string c; row >> c;) cols.push_back(c);
    if (cols.size() < 4) continue;
    const std::string served = cols.size() == 5 ? cols[1] + " " + cols[2] : cols[1];
    rows.emplace_back(served, cols.back() == "n/a" ? -1 : std::stod(cols.back()));
  }
  return rows;
}

// The driver against a real collmd on the shipped demo config, for a few seconds: the status
// line refreshes and the summary parses; the first evaluation is of the untrained base model, and
// the held-out loss (ScoreCompletions) falls once the adapter trains. The exact match is a
// measured result, not asserted.
TEST(CollmctlDemoTest, DrivesARealCollmdFromTheBaseAndTheHeldOutLossFalls) {
  const std::string dir = collm::testing::MakeTempDir("demo");
  ASSERT_EQ(RunCommand(Collmctl() + " task make --train 200 --heldout 20 --out " + dir).exit_code,
            0);
  setenv("COLLM_MODEL", collm::testing::TinyModelDir().c_str(), 1);
  setenv("COLLM_DEMO_DATA", (dir + "/train.jsonl").c_str(), 1);
  COLLM_START_SERVER(d, "src/collmd", std::string(COLLM_SOURCE_DIR) + "/configs/demo.yaml", dir,
                     "collmd");
  auto r = RunCommand(Collmctl() + " demo --daemon " + d.address() + " --heldout " + dir +
                      "/heldout.jsonl --duration 8 --eval-every 2 --eval-examples 10 --no-live");
  ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
  EXPECT_NE(r.err.find("] served "), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("held-out EM "), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("% loss "), std::string::npos) << r.err;
  auto kv = Summary(r.out);
  for (const char* key :
       {"wall_s", "requests_served", "client_errors", "ttft_p50_ms", "tpot_p50_ms",
        "slo_attainment_pct", "train_steps", "published_versions", "heldout_em_start_pct",
        "heldout_em_end_pct", "heldout_loss_start", "heldout_loss_end"}) {
    EXPECT_EQ(kv.count(key), 1u) << "summary lacks " << key << ":\n" << r.out;
  }
  EXPECT_GT(kv["requests_served"], 0) << r.out;
  EXPECT_GE(kv["wall_s"], 8) << r.out;
  EXPECT_GE(kv["heldout_em_end_pct"], 0);
  EXPECT_LE(kv["heldout_em_end_pct"], 100);
  const auto rows = EvalRows(r.out);
  ASSERT_GE(rows.size(), 2u) << r.out;
  EXPECT_EQ(rows.front().first, "base") << r.out;
  EXPECT_NE(rows.back().first, "base") << r.out;
  EXPECT_GT(kv["heldout_loss_start"], 0) << r.out;  // Measured: -1 would mean not.
  EXPECT_GT(kv["heldout_loss_end"], 0) << r.out;
  EXPECT_LT(kv["heldout_loss_end"], kv["heldout_loss_start"]) << r.out;
  EXPECT_EQ(d.Stop(), 0) << d.log();
}

// scripts/run.sh --federated as a user runs it (on the binaries of this build): an aggregator,
// two collmd devices on their own shards and collm-router, all real processes; the driver's load
// goes through the router. Rounds complete, both devices serve a trained global version, and
// every process the script started is gone when it returns.
TEST(RunShTest, FederatedRunsRoundsThroughTheRouterAndStopsItsProcesses) {
  const std::string build_dir = BinaryPath(".");
  auto r = RunCommand("SKIP_BUILD=1 BUILD_DIR=" + build_dir +
                      " COLLM_MODEL=" + collm::testing::TinyModelDir() + " COLLM_DEMO_SECONDS=25 " +
                      std::string(COLLM_SOURCE_DIR) +
                      "/scripts/run.sh --federated --no-live --eval-every 6 --eval-examples 10");
  ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
  EXPECT_NE(r.err.find(" done) global v"), std::string::npos) << r.err;
  auto kv = Summary(r.out);
  for (const char* key : {"rounds_completed", "global_version", "device1_global_version",
                          "device2_global_version", "heldout_loss_start", "heldout_loss_end"}) {
    EXPECT_EQ(kv.count(key), 1u) << "summary lacks " << key << ":\n" << r.out;
  }
  EXPECT_GT(kv["requests_served"], 0) << r.out;
  EXPECT_EQ(kv["client_errors"], 0) << r.err;
  EXPECT_GE(kv["rounds_completed"], 1) << r.out;
  EXPECT_GE(kv["global_version"], 2) << r.out;  // Version 1 is the untrained initial adapter.
  EXPECT_GE(kv["device1_global_version"], 2) << r.out;
  EXPECT_GE(kv["device2_global_version"], 2) << r.out;
  const auto rows = EvalRows(r.out);
  ASSERT_GE(rows.size(), 2u) << r.out;
  EXPECT_EQ(rows.front().first, "base") << r.out;
  EXPECT_EQ(rows.back().first.rfind("global v", 0), 0u) << r.out;
  EXPECT_LT(kv["heldout_loss_end"], kv["heldout_loss_start"]) << r.out;

  // The script names its working directory; the devices' logs show they installed global
  // versions, and no process it started (each was given --ports-file in it) still runs.
  const auto at = r.err.find("logs in ");
  ASSERT_NE(at, std::string::npos) << r.err;
  const std::string work = r.err.substr(at + 8, r.err.find('\n', at) - at - 8);
  for (const char* name : {"edge-1", "edge-2"}) {
    const std::string log = ReadFileOrDie(work + "/" + name + ".log");
    EXPECT_NE(log.find("global v"), std::string::npos) << name << ":\n" << log;
  }
  // "[/]tmp/..." matches the path but not this pgrep's own shell command line.
  auto left =
      RunCommand("pgrep -af -- '--ports-file [" + work.substr(0, 1) + "]" + work.substr(1) + "/'");
  EXPECT_NE(left.exit_code, 0) << "still running:\n" << left.out;
}

}  // namespace
}  // namespace collm::cli
