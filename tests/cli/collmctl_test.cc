// collmctl as users run it: a real process, real files, a real collmd for the operator verbs.
#include "collm/lora/lora_adapter.h"
#include "collm/lora/peft_io.h"
#include "collm/runtime/llama_model.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "testing/subprocess.h"
#include "testing/test_env.h"
#include "testing/tiny_model.h"

namespace collm::cli {
namespace {

using collm::testing::BinaryPath;
using collm::testing::RunCommand;

std::string Collmctl() { return BinaryPath("src/collmctl"); }

TEST(CollmctlGenerateTest, PrintsOnlyTheContinuationAndTimingToStderr) {
  const std::string dir = collm::testing::TinyModelDir();
  auto r = RunCommand(Collmctl() + " generate --model " + dir +
                      " --prompt 'Once upon a time' --max-tokens 12 --temperature 0 --ignore-eos");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_FALSE(r.out.empty());
  EXPECT_EQ(r.out.find("Once upon a time"), std::string::npos) << "prompt echoed: " << r.out;
  EXPECT_NE(r.err.find("generated 12 tokens"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("tok/s"), std::string::npos) << r.err;
  // Greedy is deterministic across processes; seeded sampling too.
  auto again =
      RunCommand(Collmctl() + " generate --model " + dir +
                 " --prompt 'Once upon a time' --max-tokens 12 --temperature 0 --ignore-eos");
  EXPECT_EQ(again.out, r.out);
  auto s1 = RunCommand(Collmctl() + " generate --model " + dir + " -p hi -n 16 -t 1 --seed 5");
  auto s2 = RunCommand(Collmctl() + " generate --model " + dir + " -p hi -n 16 -t 1 --seed 5");
  ASSERT_EQ(s1.exit_code, 0) << s1.err;
  EXPECT_EQ(s1.out, s2.out);
}

TEST(CollmctlGenerateTest, OfflineDefaultUsesTinyRandomModelAndSaysSo) {
  const std::string cache = collm::testing::MakeTempDir("collm-cache");
  auto r = RunCommand("COLLM_CACHE_DIR=" + cache + " " + Collmctl() +
                      " generate --prompt hello --max-tokens 5 --temperature 0 --ignore-eos");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("tiny RANDOM model"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("--model"), std::string::npos) << r.err;
  EXPECT_FALSE(r.out.empty());
}

TEST(CollmctlGenerateTest, BadInputGivesClearErrors) {
  auto missing = RunCommand(Collmctl() + " generate --model /nonexistent/m --prompt x");
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_NE(missing.err.find("/nonexistent/m/config.json"), std::string::npos) << missing.err;
  const std::string dir = collm::testing::TinyModelDir();
  auto bad_p = RunCommand(Collmctl() + " generate --model " + dir + " --prompt x --top-p 2");
  EXPECT_EQ(bad_p.exit_code, 2);
  EXPECT_NE(bad_p.err.find("top_p"), std::string::npos) << bad_p.err;
  auto bad_flag = RunCommand(Collmctl() + " generate --model " + dir + " --max-tokens abc");
  EXPECT_NE(bad_flag.exit_code, 0);
  EXPECT_NE(bad_flag.err.find("max-tokens"), std::string::npos) << bad_flag.err;
  auto bad_device = RunCommand(Collmctl() + " generate --model " + dir + " --device tpu");
  EXPECT_EQ(bad_device.exit_code, 2);
  EXPECT_NE(bad_device.err.find("runtime.device"), std::string::npos) << bad_device.err;
}

TEST(CollmctlGenerateTest, RealStoriesModelTellsAStory) {
  COLLM_REQUIRE_MODEL_FILE(dir, "stories260K-hf");
  auto r = RunCommand(Collmctl() + " generate --model " + dir +
                      " --prompt 'Once upon a time' --max-tokens 40 --temperature 0");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out.rfind(", there was a little girl named Lily.", 0), 0u) << r.out;
}

TEST(CollmctlRandomModelTest, WritesLoadableCheckpointInRealShape) {
  COLLM_REQUIRE_MODEL_FILE(shape, "shapes/stories15M.json");
  const std::string out = collm::testing::MakeTempDir("collm-rand") + "/m";
  auto r = RunCommand(Collmctl() + " random-model --out " + out + " --shape " + shape +
                      " --dtype bf16 --seed 3");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto gen = RunCommand(Collmctl() + " generate --model " + out + " -p x -n 2");
  // No tokenizer for a 32000 vocabulary: a clear error naming the file.
  EXPECT_NE(gen.exit_code, 0);
  EXPECT_NE(gen.err.find("tokenizer.model"), std::string::npos) << gen.err;
  auto bad = RunCommand(Collmctl() + " random-model --out " + out + "2 --shape nope");
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.err.find("--shape"), std::string::npos);
}

}  // namespace
}  // namespace collm::cli

namespace collm::cli {
namespace {

std::string WritePatternJsonl(const std::string& dir) {
  std::string jsonl;
  for (int i = 0; i < 60; ++i) {
    jsonl += "{\"prompt\": \"Say the rule " + std::to_string(i) +
             "\", \"completion\": \"the cat sat on the mat\"}\n";
  }
  jsonl += "this line is not json\n";
  const std::string path = dir + "/train.jsonl";
  collm::testing::WriteFileOrDie(path, jsonl);
  return path;
}

TEST(CollmctlFinetuneTest, TrainsWritesPeftAdapterAndGenerateServesIt) {
  const std::string model = collm::testing::TinyModelDir();
  const std::string dir = collm::testing::MakeTempDir("collm-ft");
  const std::string data = WritePatternJsonl(dir);
  auto r = RunCommand(
      collm::testing::BinaryPath("src/collmctl") + " finetune --model " + model + " --data " +
      data + " --steps 60 --lr 2e-2 --batch 8 --rank 8 --seed 3 --out " + dir + "/adapter");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // Progress bar and the bad-line report go to stderr.
  EXPECT_NE(r.err.find("60/60"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("1 bad lines skipped"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("train.jsonl:61"), std::string::npos) << r.err;
  const auto before = r.out.find("held-out loss before: "),
             after = r.out.find("held-out loss after: ");
  ASSERT_NE(before, std::string::npos) << r.out;
  ASSERT_NE(after, std::string::npos) << r.out;
  const double loss_before = std::stod(r.out.substr(before + 22));
  const double loss_after = std::stod(r.out.substr(after + 21));
  EXPECT_LT(loss_after, loss_before - 1.0) << r.out;
  EXPECT_FALSE(collm::testing::ReadFileOrDie(dir + "/adapter/adapter_config.json").empty());

  const std::string gen = collm::testing::BinaryPath("src/collmctl") + " generate --model " +
                          model +
                          " --prompt 'Say the rule 7' --max-tokens 8 --temperature 0 --ignore-eos";
  auto base = RunCommand(gen);
  auto tuned = RunCommand(gen + " --adapter " + dir + "/adapter");
  ASSERT_EQ(tuned.exit_code, 0) << tuned.err;
  EXPECT_NE(tuned.err.find("serving adapter"), std::string::npos) << tuned.err;
  EXPECT_NE(tuned.out, base.out);
  // The tuned model has picked up the trained completion's words; the random base has not.
  auto words = [](const std::string& text) {
    int n = 0;
    for (const char* w : {"cat", "sat", "mat"}) n += text.find(w) != std::string::npos;
    return n;
  };
  EXPECT_GE(words(tuned.out), 1) << "tuned: " << tuned.out;
  EXPECT_EQ(words(base.out), 0) << "base: " << base.out;
}

TEST(CollmctlFinetuneTest, BadInputGivesClearErrors) {
  const std::string model = collm::testing::TinyModelDir();
  const std::string ctl = collm::testing::BinaryPath("src/collmctl");
  auto missing =
      RunCommand(ctl + " finetune --model " + model + " --data /nonexistent.jsonl --out /tmp/x");
  EXPECT_EQ(missing.exit_code, 2);
  EXPECT_NE(missing.err.find("/nonexistent.jsonl"), std::string::npos) << missing.err;
  auto target = RunCommand(ctl + " finetune --model " + model +
                           " --data x --out /tmp/x --targets q_proj,qkv");
  EXPECT_EQ(target.exit_code, 2);
  EXPECT_NE(target.err.find("qkv"), std::string::npos) << target.err;
  auto rank = RunCommand(ctl + " finetune --model " + model + " --data x --out /tmp/x --rank 0");
  EXPECT_EQ(rank.exit_code, 2);
  EXPECT_NE(rank.err.find("rank"), std::string::npos) << rank.err;
  auto adapter =
      RunCommand(ctl + " generate --model " + model + " --adapter /nonexistent/adapter -p x");
  EXPECT_EQ(adapter.exit_code, 2);
  EXPECT_NE(adapter.err.find("/nonexistent/adapter"), std::string::npos) << adapter.err;
}

}  // namespace
}  // namespace collm::cli

// --- Operator verbs against a real collmd (tiny model) ----------------------------------------

namespace collm::cli {
namespace {

// `server_keys`: more lines of the server: section, each indented by two spaces.
std::string WriteDaemonConfig(const std::string& dir, const std::string& server_keys = "") {
  collm::testing::WriteFileOrDie(dir + "/collmd.yaml",
                                 "model: " + collm::testing::TinyModelDir() + R"(
server:
  address: 127.0.0.1:0
)" + server_keys + R"(metrics:
  address: 127.0.0.1:0
shutdown_grace_seconds: 5
)");
  return dir + "/collmd.yaml";
}

TEST(CollmctlDeviceTest, HealthExitsZeroWhileServingAndOneWhenNot) {
  const std::string dir = collm::testing::MakeTempDir("collmctl-health");
  COLLM_START_SERVER(d, "src/collmd", WriteDaemonConfig(dir), dir, "collmd");
  auto ok = RunCommand(Collmctl() + " health " + d.address());
  EXPECT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_EQ(ok.out, "SERVING\n");
  ASSERT_EQ(d.Stop(), 0) << d.log();
  auto gone = RunCommand(Collmctl() + " health " + d.address() + " --timeout 2");
  EXPECT_EQ(gone.exit_code, 1);
  EXPECT_NE(gone.err.find("cannot reach collmd at " + d.address()), std::string::npos) << gone.err;
  auto usage = RunCommand(Collmctl() + " health");
  EXPECT_NE(usage.exit_code, 0);
  EXPECT_NE(usage.err.find("ADDR"), std::string::npos) << usage.err;
}

TEST(CollmctlDeviceTest, StatsPrintsATableOrJsonFromGetStats) {
  const std::string dir = collm::testing::MakeTempDir("collmctl-stats");
  COLLM_START_SERVER(d, "src/collmd", WriteDaemonConfig(dir), dir, "collmd");
  auto gen = RunCommand(Collmctl() + " generate --daemon " + d.address() +
                        " -p hi -n 4 --temperature 0 --ignore-eos");
  ASSERT_EQ(gen.exit_code, 0) << gen.err;
  auto table = RunCommand(Collmctl() + " stats " + d.address());
  ASSERT_EQ(table.exit_code, 0) << table.err;
  EXPECT_NE(table.out.find("completed                1\n"), std::string::npos) << table.out;
  EXPECT_NE(table.out.find("generated tokens         4\n"), std::string::npos) << table.out;
  auto json = RunCommand(Collmctl() + " stats -d " + d.address() + " --json");
  ASSERT_EQ(json.exit_code, 0) << json.err;
  auto parsed = nlohmann::json::parse(json.out, nullptr, false);
  ASSERT_FALSE(parsed.is_discarded()) << json.out;
  // Proto3 JSON writes int64 as a string.
  EXPECT_EQ(parsed["completed"], "1") << json.out;
  EXPECT_EQ(parsed["generated_tokens"], "4") << json.out;
}

TEST(CollmctlDeviceTest, AdaptersLoadListUnload) {
  const std::string dir = collm::testing::MakeTempDir("collmctl-adapters");
  auto model = runtime::LlamaModel::Load(collm::testing::TinyModelDir(), {}).value();
  auto adapter = lora::LoraAdapter::Create(model->config(), lora::LoraConfig{}, 7).value();
  ASSERT_TRUE(lora::WritePeftAdapter(dir + "/peft", adapter).ok());
  const std::string outside = collm::testing::MakeTempDir("collmctl-outside");
  ASSERT_TRUE(lora::WritePeftAdapter(outside + "/peft", adapter).ok());
  COLLM_START_SERVER(d, "src/collmd",
                     WriteDaemonConfig(dir, "  adapter_roots: [" + dir + "]\n  admin_token: tok\n"),
                     dir, "collmd");
  const std::string anonymous = Collmctl() + " adapters -d " + d.address();
  const std::string ctl = anonymous + " --token tok";
  auto empty = RunCommand(anonymous + " list");  // Listing needs no token.
  ASSERT_EQ(empty.exit_code, 0) << empty.err;
  EXPECT_NE(empty.out.find("no adapters"), std::string::npos) << empty.out;
  auto refused = RunCommand(anonymous + " load support " + dir + "/peft");
  EXPECT_EQ(refused.exit_code, 1);
  EXPECT_NE(refused.err.find("admin token"), std::string::npos) << refused.err;
  auto escaped = RunCommand(ctl + " load support " + outside + "/peft");
  EXPECT_EQ(escaped.exit_code, 1);
  EXPECT_NE(escaped.err.find("outside the allowed roots"), std::string::npos) << escaped.err;
  auto load = RunCommand("COLLM_ADMIN_TOKEN=tok " + anonymous + " load support " + dir + "/peft");
  ASSERT_EQ(load.exit_code, 0) << load.err;
  EXPECT_EQ(load.out, "loaded support v1 from " + dir + "/peft\n");
  auto list = RunCommand(ctl + " list");
  ASSERT_EQ(list.exit_code, 0) << list.err;
  EXPECT_NE(list.out.find("NAME"), std::string::npos) << list.out;
  EXPECT_NE(list.out.find("support"), std::string::npos) << list.out;
  auto json = RunCommand(ctl + " list --json");
  auto parsed = nlohmann::json::parse(json.out, nullptr, false);
  ASSERT_FALSE(parsed.is_discarded()) << json.out;
  EXPECT_EQ(parsed["adapters"][0]["name"], "support");
  EXPECT_EQ(parsed["adapters"][0]["version"], "1");
  auto bad = RunCommand(ctl + " load other /nonexistent/peft");
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.err.find("/nonexistent/peft"), std::string::npos) << bad.err;
  auto unload = RunCommand(ctl + " unload support");
  ASSERT_EQ(unload.exit_code, 0) << unload.err;
  EXPECT_NE(RunCommand(ctl + " list").out.find("no adapters"), std::string::npos);
  auto twice = RunCommand(ctl + " unload support");
  EXPECT_EQ(twice.exit_code, 1);
  EXPECT_NE(twice.err.find("support"), std::string::npos) << twice.err;
}

}  // namespace
}  // namespace collm::cli
