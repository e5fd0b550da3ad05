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

// The driver against a real collmd on the shipped demo config, for a few seconds: the status
// line refreshes and the summary parses. The accuracy is a measured result, not asserted.
TEST(CollmctlDemoTest, DrivesARealCollmdAndPrintsStatusAndSummary) {
  const std::string dir = collm::testing::MakeTempDir("demo");
  ASSERT_EQ(RunCommand(Collmctl() + " task make --train 200 --heldout 20 --out " + dir).exit_code,
            0);
  setenv("COLLM_MODEL", collm::testing::TinyModelDir().c_str(), 1);
  setenv("COLLM_DEMO_DATA", (dir + "/train.jsonl").c_str(), 1);
  COLLM_START_SERVER(d, "src/collmd", std::string(COLLM_SOURCE_DIR) + "/configs/demo.yaml", dir,
                     "collmd");
  auto r = RunCommand(Collmctl() + " demo --daemon " + d.address() + " --heldout " + dir +
                      "/heldout.jsonl --duration 6 --eval-every 2 --eval-examples 5 --no-live");
  ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
  EXPECT_NE(r.err.find("] served "), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("held-out EM "), std::string::npos) << r.err;
  const auto summary = r.out.find("SUMMARY\n");
  ASSERT_NE(summary, std::string::npos) << r.out;
  std::map<std::string, double> kv;
  std::istringstream in(r.out.substr(summary + 8));
  for (std::string key, value; in >> key >> value;) kv[key] = std::stod(value);
  for (const char* key : {"wall_s", "requests_served", "client_errors", "ttft_p50_ms",
                          "tpot_p50_ms", "slo_attainment_pct", "train_steps", "published_versions",
                          "heldout_em_start_pct", "heldout_em_end_pct"}) {
    EXPECT_EQ(kv.count(key), 1u) << "summary lacks " << key << ":\n" << r.out;
  }
  EXPECT_GT(kv["requests_served"], 0) << r.out;
  EXPECT_GE(kv["wall_s"], 6) << r.out;
  EXPECT_GE(kv["heldout_em_end_pct"], 0);
  EXPECT_LE(kv["heldout_em_end_pct"], 100);
  EXPECT_EQ(d.Stop(), 0) << d.log();
}

}  // namespace
}  // namespace collm::cli
