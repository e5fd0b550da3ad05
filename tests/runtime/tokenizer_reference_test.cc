// collm's SentencePiece BPE implementation against the real SentencePiece library (Python binding
// from Debian), on real tokenizers and on the tiny tokenizer collm trains and serializes itself.
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "collm/runtime/tokenizer.h"
#include "gtest/gtest.h"
#include "testing/subprocess.h"
#include "testing/test_env.h"

namespace collm::runtime {
namespace {

const std::vector<std::string>& TrickyTexts() {
  static const std::vector<std::string> texts = {
      "Once upon a time",
      "",
      " ",
      "  two  leading and   inner spaces  ",
      "Tabs\tand\nnewlines\n\nhere",
      "Numbers 1234567 and 3.14159, dates 2023-11-16!",
      "Unicode: caf\xC3\xA9 na\xC3\xAFve \xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E \xF0\x9F\x98\x80 "
      "emoji",
      "GSM8K: Natalia sold clips to 48 of her friends in April, and then she sold half as many "
      "clips in May. <<48/2=24>> #### 72",
      "\xE2\x96\x81"
      "already escaped \xE2\x96\x81",
      "<s> literal control text </s> <unk>",
      "x",
      "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX!",
  };
  return texts;
}

void CompareWithSentencePiece(const std::string& model_path, uint32_t seed) {
  auto tok = Tokenizer::Load(model_path);
  ASSERT_TRUE(tok.ok()) << tok.status();
  std::mt19937 rng(seed);
  nlohmann::json req;
  req["model"] = model_path;
  req["encode"] = TrickyTexts();
  std::vector<std::vector<int32_t>> id_lists;
  for (int i = 0; i < 200; ++i) {
    std::vector<int32_t> ids;
    const int n = 1 + rng() % 12;
    for (int k = 0; k < n; ++k) ids.push_back(static_cast<int32_t>(rng() % (*tok)->vocab_size()));
    id_lists.push_back(ids);
  }
  req["decode"] = id_lists;
  const std::string dir = collm::testing::MakeTempDir("collm-spm");
  collm::testing::WriteFileOrDie(dir + "/req.json", req.dump());
  auto r = collm::testing::RunCommand("/usr/bin/python3 " + std::string(COLLM_SOURCE_DIR) +
                                      "/tests/reference/spm_reference.py " + dir + "/req.json");
  ASSERT_EQ(r.exit_code, 0) << "the reference needs Debian's python3-sentencepiece (installed by "
                               "scripts/setup.sh): "
                            << r.err;
  auto out = nlohmann::json::parse(r.out);
  for (size_t i = 0; i < TrickyTexts().size(); ++i) {
    const auto expected = out["encode"][i].get<std::vector<int32_t>>();
    EXPECT_EQ((*tok)->Encode(TrickyTexts()[i], false), expected)
        << "text: '" << TrickyTexts()[i] << "'";
  }
  for (size_t i = 0; i < id_lists.size(); ++i) {
    EXPECT_EQ((*tok)->Decode(id_lists[i]), out["decode"][i].get<std::string>())
        << "ids #" << i << ": " << nlohmann::json(id_lists[i]).dump();
  }
}

TEST(TokenizerReferenceTest, MatchesSentencePieceOnStories260KTokenizer) {
  COLLM_REQUIRE_MODEL_FILE(path, "stories260K-hf/tokenizer.model");
  CompareWithSentencePiece(path, 1);
}

TEST(TokenizerReferenceTest, MatchesSentencePieceOnLlama2Tokenizer) {
  COLLM_REQUIRE_MODEL_FILE(path, "llama2-tokenizer/tokenizer.model");
  CompareWithSentencePiece(path, 2);
}

TEST(TokenizerReferenceTest, TinyTokenizerLoadsInSentencePieceAndAgrees) {
  const std::string path = collm::testing::MakeTempDir("collm-tiny-spm") + "/tokenizer.model";
  ASSERT_TRUE(TrainTinyTokenizer(path, 512).ok());
  CompareWithSentencePiece(path, 3);
}

}  // namespace
}  // namespace collm::runtime
