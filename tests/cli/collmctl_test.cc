// collmctl as users run it: a real process, real files.
#include "gtest/gtest.h"
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
  auto again = RunCommand(Collmctl() + " generate --model " + dir +
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
