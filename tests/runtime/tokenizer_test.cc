#include "collm/runtime/tokenizer.h"

#include <chrono>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "testing/test_env.h"

namespace collm::runtime {
namespace {

// A tokenizer trained once per binary; training takes tens of milliseconds.
const Tokenizer& TinyTokenizer() {
  static const Tokenizer* tokenizer = [] {
    const std::string path = collm::testing::MakeTempDir("collm-tok") + "/tokenizer.model";
    absl::Status status = TrainTinyTokenizer(path, 512);
    EXPECT_TRUE(status.ok()) << status;
    auto loaded = Tokenizer::Load(path);
    EXPECT_TRUE(loaded.ok()) << loaded.status();
    return loaded.ok() ? loaded->release() : nullptr;
  }();
  return *tokenizer;
}

std::unique_ptr<Tokenizer> LoadOrDie(const std::string& path) {
  auto tokenizer = Tokenizer::Load(path);
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  return tokenizer.ok() ? std::move(tokenizer).value() : nullptr;
}

// The id of the byte-fallback piece for `byte`, or -1.
int32_t ByteId(const Tokenizer& tokenizer, unsigned char byte) {
  const std::string piece = absl::StrFormat("<0x%02X>", byte);
  for (int32_t id = 0; id < tokenizer.vocab_size(); ++id) {
    if (tokenizer.IdToPiece(id) == piece) return id;
  }
  return -1;
}

int32_t PieceId(const Tokenizer& tokenizer, const std::string& piece) {
  for (int32_t id = 0; id < tokenizer.vocab_size(); ++id) {
    if (tokenizer.IdToPiece(id) == piece) return id;
  }
  return -1;
}

bool EndsInsideUtf8Sequence(const std::string& text) {
  size_t n = text.size();
  for (size_t back = 1; back <= 4 && back <= n; ++back) {
    const auto c = static_cast<unsigned char>(text[n - back]);
    if ((c & 0xC0) == 0x80) continue;
    const size_t need = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : 4;
    return back < need;
  }
  return false;
}

// Streams random id sequences (plain pieces, byte-fallback runs of multi-byte characters, some
// cut short, BOS/EOS, bare spaces, out-of-range ids) through IncrementalDetokenizer and checks
// that the deltas concatenate to Decode() after the prompt, and never end mid-character.
void CheckIncrementalMatchesDecode(const Tokenizer& tokenizer, uint64_t seed, int trials) {
  std::mt19937_64 rng(seed);
  auto pick = [&rng](size_t n) { return static_cast<size_t>(rng() % n); };
  const std::vector<std::string> words = {"Once", " upon", " a time", ", said", " Mira",
                                          "\n",   " 42",   "!",       " ",      "  two  spaces",
                                          "é",    " 世界"};
  const std::vector<std::string> chars = {"é", "ñ", "世", "界", "🙂", "🚀", "€", "ß", "한"};
  const int32_t space_id = PieceId(tokenizer, "\xE2\x96\x81");
  const int32_t vocab = tokenizer.vocab_size();

  for (int trial = 0; trial < trials; ++trial) {
    std::vector<int32_t> prompt;
    switch (pick(4)) {
      case 0:
        break;
      case 1:
        prompt.push_back(tokenizer.bos_id());
        break;
      default:
        prompt = tokenizer.Encode(words[pick(words.size())] + words[pick(words.size())],
                                  /*add_bos=*/pick(2) == 0);
    }
    std::vector<int32_t> generated;
    const size_t length = 1 + pick(24);
    while (generated.size() < length) {
      const size_t kind = pick(20);
      if (kind < 7) {
        generated.push_back(static_cast<int32_t>(pick(vocab)));
      } else if (kind < 12) {
        std::string c = chars[pick(chars.size())];
        if (pick(5) == 0) c.resize(1 + pick(c.size()));  // Possibly an incomplete character.
        for (unsigned char byte : c) generated.push_back(ByteId(tokenizer, byte));
      } else if (kind < 14) {
        generated.push_back(pick(2) == 0 ? tokenizer.bos_id() : tokenizer.eos_id());
      } else if (kind < 15) {
        generated.push_back(pick(2) == 0 ? -3 : vocab + 7);
      } else if (kind < 17 && space_id >= 0) {
        generated.push_back(space_id);
      } else {
        for (int32_t id : tokenizer.Encode(words[pick(words.size())], false)) {
          generated.push_back(id);
        }
      }
    }

    std::vector<int32_t> all = prompt;
    all.insert(all.end(), generated.begin(), generated.end());
    const std::string prompt_text = tokenizer.Decode(prompt);
    const std::string full_text = tokenizer.Decode(all);
    ASSERT_TRUE(absl::StartsWith(full_text, prompt_text));
    const std::string expected = full_text.substr(prompt_text.size());

    IncrementalDetokenizer detokenizer(tokenizer, prompt);
    std::string streamed;
    for (int32_t id : generated) {
      const std::string delta = detokenizer.Push(id);
      EXPECT_FALSE(EndsInsideUtf8Sequence(delta)) << "trial " << trial;
      streamed += delta;
    }
    streamed += detokenizer.Finish();
    ASSERT_EQ(streamed, expected) << "trial " << trial << " seed " << seed;
  }
}

TEST(TokenizerTest, LoadsStories260K) {
  COLLM_REQUIRE_MODEL_FILE(path, "stories260K-hf/tokenizer.model");
  auto tokenizer = LoadOrDie(path);
  ASSERT_NE(tokenizer, nullptr);
  EXPECT_EQ(tokenizer->vocab_size(), 512);
  EXPECT_EQ(tokenizer->bos_id(), 1);
  EXPECT_EQ(tokenizer->eos_id(), 2);
  EXPECT_EQ(tokenizer->Encode("Once upon a time", false),
            (std::vector<int32_t>{403, 407, 261, 378}));
  EXPECT_EQ(tokenizer->Encode("Once upon a time", true),
            (std::vector<int32_t>{1, 403, 407, 261, 378}));
  EXPECT_EQ(tokenizer->IdToPiece(403), "\xE2\x96\x81Once");
  EXPECT_EQ(tokenizer->Decode({1, 403, 407, 261, 378, 2}), "Once upon a time");
}

TEST(TokenizerTest, LoadsLlama2AndRoundTripsByteFallback) {
  COLLM_REQUIRE_MODEL_FILE(path, "llama2-tokenizer/tokenizer.model");
  auto tokenizer = LoadOrDie(path);
  ASSERT_NE(tokenizer, nullptr);
  EXPECT_EQ(tokenizer->vocab_size(), 32000);
  EXPECT_EQ(tokenizer->Encode("Once upon a time", false),
            (std::vector<int32_t>{9038, 2501, 263, 931}));
  const std::string text = "Emoji 🙂🚀, CJK 世界 and 한국어, naïve café: 3.14!";
  EXPECT_EQ(tokenizer->Decode(tokenizer->Encode(text, true)), text);
}

TEST(TokenizerTest, DecodeSkipsOutOfRangeIds) {
  const Tokenizer& tokenizer = TinyTokenizer();
  const std::vector<int32_t> ids = tokenizer.Encode("Once upon a time", false);
  std::vector<int32_t> noisy = {-1, tokenizer.vocab_size(), ids[0], 1 << 30};
  noisy.insert(noisy.end(), ids.begin() + 1, ids.end());
  noisy.push_back(-2147483647 - 1);
  EXPECT_EQ(tokenizer.Decode(noisy), "Once upon a time");
  EXPECT_EQ(tokenizer.Decode({}), "");
  EXPECT_EQ(tokenizer.IdToPiece(-1), "");
  EXPECT_EQ(tokenizer.IdToPiece(tokenizer.vocab_size()), "");
}

TEST(TokenizerTest, ControlTokensProduceNoText) {
  const Tokenizer& tokenizer = TinyTokenizer();
  EXPECT_EQ(tokenizer.Decode({tokenizer.bos_id(), tokenizer.eos_id()}), "");
}

TEST(TokenizerTest, MissingFileIsNotFoundNamingPath) {
  const std::string path = collm::testing::MakeTempDir() + "/nope.model";
  auto tokenizer = Tokenizer::Load(path);
  ASSERT_FALSE(tokenizer.ok());
  EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(tokenizer.status().message(), path)) << tokenizer.status();
}

TEST(TokenizerTest, EmptyFileIsErrorNamingPath) {
  const std::string path = collm::testing::MakeTempDir() + "/empty.model";
  collm::testing::WriteFileOrDie(path, "");
  auto tokenizer = Tokenizer::Load(path);
  ASSERT_FALSE(tokenizer.ok());
  EXPECT_TRUE(absl::StrContains(tokenizer.status().message(), path)) << tokenizer.status();
  EXPECT_TRUE(absl::StrContains(tokenizer.status().message(), "empty")) << tokenizer.status();
}

TEST(TokenizerTest, CorruptFileIsErrorNamingPath) {
  const std::string dir = collm::testing::MakeTempDir();
  for (const std::string& contents :
       {std::string("this is not a protobuf\n"), std::string("\xff\xff\xff\xff\x0f", 5),
        std::string("\x0a\x05\x0a\x01", 4)}) {
    const std::string path = dir + "/corrupt.model";
    collm::testing::WriteFileOrDie(path, contents);
    auto tokenizer = Tokenizer::Load(path);
    ASSERT_FALSE(tokenizer.ok());
    EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StrContains(tokenizer.status().message(), path)) << tokenizer.status();
  }
}

TEST(IncrementalDetokenizerTest, FirstPieceKeepsLeadingSpaceAfterPrompt) {
  const Tokenizer& tokenizer = TinyTokenizer();
  const int32_t the = PieceId(tokenizer, "\xE2\x96\x81the");
  ASSERT_GE(the, 0);
  IncrementalDetokenizer with_prompt(tokenizer, tokenizer.Encode("The end.", true));
  EXPECT_EQ(with_prompt.Push(the), " the");
  EXPECT_EQ(with_prompt.Finish(), "");
  // Right after a bare space piece the leading space is already spent, as in Decode().
  IncrementalDetokenizer after_space(tokenizer, {PieceId(tokenizer, "\xE2\x96\x81")});
  EXPECT_EQ(after_space.Push(the), " the");
  IncrementalDetokenizer detokenizer(tokenizer, {tokenizer.bos_id()});
  EXPECT_EQ(detokenizer.Push(the), "the");
  EXPECT_EQ(detokenizer.Finish(), "");
}

TEST(IncrementalDetokenizerTest, WithoutPromptFirstPieceLosesLeadingSpace) {
  const Tokenizer& tokenizer = TinyTokenizer();
  const std::vector<int32_t> ids = tokenizer.Encode("Once upon a time", false);
  for (const std::vector<int32_t>& prompt :
       {std::vector<int32_t>{}, std::vector<int32_t>{tokenizer.bos_id()}}) {
    IncrementalDetokenizer detokenizer(tokenizer, prompt);
    std::string text;
    for (int32_t id : ids) text += detokenizer.Push(id);
    text += detokenizer.Finish();
    EXPECT_EQ(text, "Once upon a time");
  }
}

TEST(IncrementalDetokenizerTest, HoldsBackSplitCharacterUntilComplete) {
  const Tokenizer& tokenizer = TinyTokenizer();
  IncrementalDetokenizer detokenizer(tokenizer, tokenizer.Encode("Hi", true));
  const std::string world = "世";  // Three byte-fallback tokens in the tiny vocabulary.
  std::vector<std::string> deltas;
  for (unsigned char byte : world) {
    const int32_t id = ByteId(tokenizer, byte);
    ASSERT_GE(id, 0);
    deltas.push_back(detokenizer.Push(id));
  }
  EXPECT_EQ(deltas, (std::vector<std::string>{"", "", "世"}));
}

TEST(IncrementalDetokenizerTest, FinishFlushesIncompleteCharacter) {
  const Tokenizer& tokenizer = TinyTokenizer();
  IncrementalDetokenizer detokenizer(tokenizer, {});
  EXPECT_EQ(detokenizer.Push(ByteId(tokenizer, 0xE4)), "");
  EXPECT_EQ(detokenizer.Finish(), "\xEF\xBF\xBD");  // U+FFFD, as Decode renders it.
}

// A random model emits any byte-fallback sequence; a surrogate (ED A0 80) or an overlong form
// (E0 80 80) is not UTF-8 (protobuf refuses such a string field), so each byte is U+FFFD.
TEST(IncrementalDetokenizerTest, SurrogatesAndOverlongFormsBecomeReplacementCharacters) {
  const Tokenizer& tokenizer = TinyTokenizer();
  for (const std::vector<int> bytes :
       {std::vector<int>{0xED, 0xA0, 0x80}, std::vector<int>{0xE0, 0x80, 0x80}}) {
    IncrementalDetokenizer detokenizer(tokenizer, {});
    std::string text;
    for (int b : bytes) text += detokenizer.Push(ByteId(tokenizer, static_cast<unsigned char>(b)));
    text += detokenizer.Finish();
    EXPECT_EQ(text, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");
  }
  IncrementalDetokenizer ok(tokenizer, {});
  std::string text;
  for (int b : {0xED, 0x9F, 0xBF})
    text += ok.Push(ByteId(tokenizer, static_cast<unsigned char>(b)));
  EXPECT_EQ(text, "\xED\x9F\xBF");  // U+D7FF, the last code point before the surrogates.
}

TEST(IncrementalDetokenizerTest, RandomSequencesMatchDecodeTiny) {
  for (uint64_t seed = 1; seed <= 4; ++seed) {
    CheckIncrementalMatchesDecode(TinyTokenizer(), seed, 500);
  }
}

TEST(IncrementalDetokenizerTest, RandomSequencesMatchDecodeStories260K) {
  COLLM_REQUIRE_MODEL_FILE(path, "stories260K-hf/tokenizer.model");
  auto tokenizer = LoadOrDie(path);
  ASSERT_NE(tokenizer, nullptr);
  CheckIncrementalMatchesDecode(*tokenizer, 11, 1000);
}

TEST(IncrementalDetokenizerTest, RandomSequencesMatchDecodeLlama2) {
  COLLM_REQUIRE_MODEL_FILE(path, "llama2-tokenizer/tokenizer.model");
  auto tokenizer = LoadOrDie(path);
  ASSERT_NE(tokenizer, nullptr);
  CheckIncrementalMatchesDecode(*tokenizer, 12, 1000);
}

TEST(TinyTokenizerTest, HasExactlyTheRequestedVocabSize) {
  const std::string dir = collm::testing::MakeTempDir();
  for (int vocab_size : {300, 320, 512, 1000, 2000}) {
    const std::string path = absl::StrFormat("%s/tok%d.model", dir, vocab_size);
    ASSERT_TRUE(TrainTinyTokenizer(path, vocab_size).ok()) << vocab_size;
    auto tokenizer = LoadOrDie(path);
    ASSERT_NE(tokenizer, nullptr);
    EXPECT_EQ(tokenizer->vocab_size(), vocab_size);
    EXPECT_EQ(tokenizer->IdToPiece(0), "<unk>");
    EXPECT_EQ(tokenizer->bos_id(), 1);
    EXPECT_EQ(tokenizer->eos_id(), 2);
    const std::string text = "Once upon a time, Zoë counted 1234 stars 🙂 and 世界!\n  Bye.";
    EXPECT_EQ(tokenizer->Decode(tokenizer->Encode(text, true)), text) << vocab_size;
  }
}

TEST(TinyTokenizerTest, SplitsDigitsAndLearnsWords) {
  const Tokenizer& tokenizer = TinyTokenizer();
  std::vector<std::string> pieces;
  for (int32_t id : tokenizer.Encode("1999", false)) pieces.push_back(tokenizer.IdToPiece(id));
  EXPECT_EQ(pieces, (std::vector<std::string>{"\xE2\x96\x81", "1", "9", "9", "9"}));
  EXPECT_EQ(tokenizer.Encode("the", false).size(), 1u);
}

TEST(TinyTokenizerTest, IsDeterministic) {
  const std::string dir = collm::testing::MakeTempDir();
  ASSERT_TRUE(TrainTinyTokenizer(dir + "/a.model", 700).ok());
  ASSERT_TRUE(TrainTinyTokenizer(dir + "/b.model", 700).ok());
  const std::string a = collm::testing::ReadFileOrDie(dir + "/a.model");
  EXPECT_FALSE(a.empty());
  EXPECT_EQ(a, collm::testing::ReadFileOrDie(dir + "/b.model"));
}

TEST(TinyTokenizerTest, RejectsVocabSizeOutOfRange) {
  const std::string dir = collm::testing::MakeTempDir();
  for (int vocab_size : {0, 299, 4001}) {
    absl::Status status = TrainTinyTokenizer(dir + "/t.model", vocab_size);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StrContains(status.message(), std::to_string(vocab_size))) << status;
  }
}

TEST(TinyTokenizerTest, UnwritablePathIsError) {
  const std::string path = collm::testing::MakeTempDir() + "/missing/dir/t.model";
  absl::Status status = TrainTinyTokenizer(path, 512);
  EXPECT_FALSE(status.ok());
  EXPECT_TRUE(absl::StrContains(status.message(), path)) << status;
}

}  // namespace
}  // namespace collm::runtime
