#include "collm/config/yaml_reader.h"

#include <yaml-cpp/yaml.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "config/config_test_util.h"
#include "gtest/gtest.h"
#include "testing/test_env.h"

namespace collm::config {
namespace {

absl::StatusOr<Section> OpenDoc(const std::string& yaml, std::vector<std::string> known,
                                const std::string& base_dir = "/cfg") {
  absl::StatusOr<YAML::Node> doc = LoadYaml(yaml);
  if (!doc.ok()) return doc.status();
  return Section::Open(*doc, "", std::move(known), base_dir);
}

TEST(YamlReaderTest, ExpandsVariablesWithDefaults) {
  ScopedEnv x("COLLM_TEST_X", "abc");
  ScopedEnv empty("COLLM_TEST_EMPTY", "");
  ScopedEnv unset("COLLM_TEST_UNSET", std::nullopt);
  absl::StatusOr<std::string> s = ExpandEnv(
      "${COLLM_TEST_X}/${COLLM_TEST_UNSET:-d}/${COLLM_TEST_EMPTY:-e}/${COLLM_TEST_X:-n}", "k");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(*s, "abc/d/e/abc");
  s = ExpandEnv("${COLLM_TEST_UNSET:-}", "k");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(*s, "");
}

TEST(YamlReaderTest, DoubleDollarIsALiteral) {
  ScopedEnv x("COLLM_TEST_X", "abc");
  absl::StatusOr<std::string> s = ExpandEnv("$${COLLM_TEST_X} costs $5 ${COLLM_TEST_X}", "k");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(*s, "${COLLM_TEST_X} costs $5 abc");
}

TEST(YamlReaderTest, ExpansionErrorsNameTheKey) {
  ScopedEnv unset("COLLM_TEST_UNSET", std::nullopt);
  absl::StatusOr<std::string> s = ExpandEnv("a/${COLLM_TEST_UNSET}", "server.address");
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_PRED_FORMAT2(
      Contains, std::string(s.status().message()),
      "server.address refers to environment variable COLLM_TEST_UNSET, which is not set");
  s = ExpandEnv("${COLLM_TEST_UNSET", "a.b");
  ASSERT_FALSE(s.ok());
  EXPECT_PRED_FORMAT2(Contains, std::string(s.status().message()), "a.b has an unterminated ${");
  s = ExpandEnv("${1X}", "a.b");
  ASSERT_FALSE(s.ok());
  EXPECT_PRED_FORMAT2(Contains, std::string(s.status().message()),
                      "a.b has a bad variable reference '${1X}'");
}

TEST(YamlReaderTest, ResolvesHomeAndRelativePaths) {
  ScopedEnv home("HOME", "/home/tester");
  EXPECT_EQ(*ResolvePath("~", "k", "/etc/c"), "/home/tester");
  EXPECT_EQ(*ResolvePath("~/m/", "k", "/etc/c"), "/home/tester/m");
  EXPECT_EQ(*ResolvePath("~other/m", "k", "/etc/c"), "/etc/c/~other/m");
  EXPECT_EQ(*ResolvePath("../m/./x", "k", "/etc/c"), "/etc/m/x");
  EXPECT_EQ(*ResolvePath("/abs/p", "k", "/etc/c"), "/abs/p");
  EXPECT_EQ(*ResolvePath("rel", "k", ""), "rel");
  EXPECT_EQ(*ResolvePath("", "k", "/etc/c"), "");
}

TEST(YamlReaderTest, HomeWithoutHomeIsAnErrorNamingTheKey) {
  ScopedEnv home("HOME", std::nullopt);
  absl::StatusOr<std::string> p = ResolvePath("~/m", "state_dir", "/etc/c");
  ASSERT_FALSE(p.ok());
  EXPECT_PRED_FORMAT2(Contains, std::string(p.status().message()),
                      "state_dir starts with ~ but HOME is not set");
}

TEST(YamlReaderTest, UnknownKeySuggestsTheClosestAndNamesTheFullPath) {
  absl::StatusOr<Section> root = OpenDoc("engine:\n  kv_cache:\n    blok_size: 4\n", {"engine"});
  ASSERT_TRUE(root.ok()) << root.status();
  absl::StatusOr<Section> engine = root->Sub("engine", {"kv_cache"});
  ASSERT_TRUE(engine.ok()) << engine.status();
  absl::StatusOr<Section> kv = engine->Sub("kv_cache", {"block_size", "num_blocks"});
  ASSERT_FALSE(kv.ok());
  EXPECT_EQ(kv.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(kv.status().message(),
            "engine.kv_cache.blok_size: unknown key (known: block_size, num_blocks); did you "
            "mean block_size?");
  // Nothing close: no suggestion.
  absl::StatusOr<Section> far = OpenDoc("zzzzzz: 1\n", {"model"});
  ASSERT_FALSE(far.ok());
  EXPECT_EQ(far.status().message(), "zzzzzz: unknown key (known: model)");
}

TEST(YamlReaderTest, DuplicateKeysAreErrors) {
  absl::StatusOr<Section> s = OpenDoc("a: 1\na: 2\n", {"a"});
  ASSERT_FALSE(s.ok());
  EXPECT_PRED_FORMAT2(Contains, std::string(s.status().message()), "a: duplicate key");
}

TEST(YamlReaderTest, TypedReadersNameTheKeyAndKeepDefaults) {
  absl::StatusOr<Section> root =
      OpenDoc("s: {n: x, b: maybe, d: .inf, u: -1, bytes: 2KiB, on: YES}\n", {"s"});
  ASSERT_TRUE(root.ok()) << root.status();
  absl::StatusOr<Section> s = root->Sub("s", {"n", "b", "d", "u", "bytes", "on", "absent"});
  ASSERT_TRUE(s.ok()) << s.status();
  int64_t n = 7;
  EXPECT_EQ(s->Int("n", &n).message(), "s.n must be an integer, got 'x'");
  EXPECT_EQ(n, 7);
  bool b = false;
  EXPECT_EQ(s->Bool("b", &b).message(), "s.b must be true or false, got 'maybe'");
  EXPECT_TRUE(s->Bool("on", &b).ok());
  EXPECT_TRUE(b);
  double d = 1;
  EXPECT_EQ(s->Double("d", &d).message(), "s.d must be a finite number, got '.inf'");
  uint64_t u = 0;
  EXPECT_EQ(s->Uint("u", &u).message(), "s.u must be an integer >= 0, got '-1'");
  int64_t bytes = 0;
  ASSERT_TRUE(s->Bytes("bytes", &bytes).ok());
  EXPECT_EQ(bytes, 2048);
  int64_t absent = 42;
  ASSERT_TRUE(s->Int("absent", &absent).ok());
  EXPECT_EQ(absent, 42);
}

enum class Color { kRed, kGreen };

TEST(YamlReaderTest, EnumsNameTheKeyAndTheAllowedValues) {
  absl::StatusOr<Section> s = OpenDoc("good: green\nbad: blue\n", {"good", "bad", "absent"});
  ASSERT_TRUE(s.ok()) << s.status();
  const std::vector<std::pair<std::string, Color>> kColors = {{"red", Color::kRed},
                                                              {"green", Color::kGreen}};
  Color c = Color::kRed;
  ASSERT_TRUE(s->Enum("good", kColors, &c).ok());
  EXPECT_EQ(c, Color::kGreen);
  absl::Status bad = s->Enum("bad", kColors, &c);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.message(), "bad must be one of red, green, got 'blue'");
  EXPECT_EQ(c, Color::kGreen);
  ASSERT_TRUE(s->Enum("absent", kColors, &c).ok());
  EXPECT_EQ(c, Color::kGreen);
}

TEST(YamlReaderTest, SyntaxErrorsGiveLineAndColumn) {
  absl::StatusOr<YAML::Node> doc = LoadYaml("a: 1\n\tb: 2\n");
  ASSERT_FALSE(doc.ok());
  EXPECT_PRED_FORMAT2(Contains, std::string(doc.status().message()),
                      "line 2, column 1: invalid YAML: ");
}

TEST(YamlReaderTest, ReadConfigFileGivesTheTextAndItsDirectory) {
  const std::string dir = testing::MakeTempDir("collm-yaml-reader");
  testing::WriteFileOrDie(dir + "/c.yaml", "a: 1\n");
  absl::StatusOr<ConfigFileText> f = ReadConfigFile(dir + "/c.yaml");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->text, "a: 1\n");
  EXPECT_EQ(f->base_dir, dir);
  f = ReadConfigFile(dir + "/missing.yaml");
  EXPECT_EQ(f.status().code(), absl::StatusCode::kNotFound);
  f = ReadConfigFile(dir);
  EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace collm::config
