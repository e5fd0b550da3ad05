#include "collm/engine/dataset.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "gtest/gtest.h"
#include "testing/test_env.h"
#include "testing/tiny_model.h"

namespace collm::engine {
namespace {

bool Contains(absl::string_view haystack, absl::string_view needle) {
  return absl::StrContains(haystack, needle);
}

const runtime::Tokenizer& TinyTokenizer() {
  static const runtime::Tokenizer* tokenizer = [] {
    auto loaded = runtime::Tokenizer::Load(collm::testing::TinyModelDir() + "/tokenizer.model");
    EXPECT_TRUE(loaded.ok()) << loaded.status();
    return loaded.ok() ? loaded->release() : nullptr;
  }();
  return *tokenizer;
}

std::string WriteData(const std::string& name, const std::string& contents) {
  const std::string path = collm::testing::MakeTempDir("collm-dataset") + "/" + name;
  collm::testing::WriteFileOrDie(path, contents);
  return path;
}

std::vector<int32_t> Concat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

std::vector<uint8_t> Mask(size_t zeros, size_t ones) {
  std::vector<uint8_t> mask(zeros, 0);
  mask.insert(mask.end(), ones, 1);
  return mask;
}

// Every example, train and held-out, in no particular order.
std::vector<TrainingExample> All(const Dataset& dataset) {
  std::vector<TrainingExample> all = dataset.train();
  all.insert(all.end(), dataset.held_out().begin(), dataset.held_out().end());
  return all;
}

DatasetOptions NoSplit() {
  DatasetOptions options;
  options.held_out_fraction = 0;
  return options;
}

TEST(DatasetTest, PromptCompletionMaskCoversExactlyTheCompletion) {
  const runtime::Tokenizer& tok = TinyTokenizer();
  const std::string path =
      WriteData("pc.jsonl", R"({"prompt": "Once upon a time", "completion": "there was a cat."})"
                            "\n");
  DatasetOptions options = NoSplit();
  options.format.prompt_template = "Q: {prompt}\nA: ";
  LoadReport report;
  auto dataset = Dataset::Load(path, tok, options, &report);
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  ASSERT_EQ(dataset->train().size(), 1u);
  EXPECT_TRUE(dataset->held_out().empty());
  EXPECT_EQ(report.lines, 1);
  EXPECT_EQ(report.loaded, 1);
  EXPECT_EQ(report.skipped, 0);

  const std::vector<int32_t> prompt = tok.Encode("Q: Once upon a time\nA: ", true);
  std::vector<int32_t> completion = tok.Encode("there was a cat.", false);
  completion.push_back(tok.eos_id());
  const TrainingExample& ex = dataset->train()[0];
  EXPECT_EQ(ex.tokens, Concat(prompt, completion));
  EXPECT_EQ(ex.loss_mask, Mask(prompt.size(), completion.size()));
  EXPECT_EQ(ex.tokens.front(), tok.bos_id());
  EXPECT_EQ(ex.loss_mask.front(), 0);
  EXPECT_EQ(ex.tokens.back(), tok.eos_id());
  EXPECT_EQ(ex.loss_mask.back(), 1);
  EXPECT_EQ(ex.num_targets(), static_cast<int64_t>(completion.size()));

  // MakeExample tokenizes the same way.
  TrainingExample made = MakeExample(tok, "Once upon a time", "there was a cat.", options);
  EXPECT_EQ(made.tokens, ex.tokens);
  EXPECT_EQ(made.loss_mask, ex.loss_mask);
}

TEST(DatasetTest, NoBosNoEos) {
  const runtime::Tokenizer& tok = TinyTokenizer();
  DatasetOptions options = NoSplit();
  options.add_bos = false;
  options.add_eos = false;
  TrainingExample ex = MakeExample(tok, "hello", "world", options);
  const std::vector<int32_t> prompt = tok.Encode("hello\n", false);
  const std::vector<int32_t> completion = tok.Encode("world", false);
  EXPECT_EQ(ex.tokens, Concat(prompt, completion));
  EXPECT_EQ(ex.loss_mask, Mask(prompt.size(), completion.size()));
}

TEST(DatasetTest, TextRecordsTrainOnEveryTokenButBos) {
  const runtime::Tokenizer& tok = TinyTokenizer();
  const std::string path = WriteData("text.jsonl",
                                     "{\"text\": \"The little dog ran home.\"}\n"
                                     "\n   \n"
                                     "{\"text\": \"Tim was happy.\"}\n");
  LoadReport report;
  auto dataset = Dataset::Load(path, tok, NoSplit(), &report);
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  ASSERT_EQ(dataset->train().size(), 2u);
  EXPECT_EQ(report.lines, 2);  // Blank lines are not records.
  std::vector<int32_t> expected = tok.Encode("The little dog ran home.", true);
  expected.push_back(tok.eos_id());
  const TrainingExample& ex = dataset->train()[0];
  EXPECT_EQ(ex.tokens, expected);
  EXPECT_EQ(ex.loss_mask, Mask(1, expected.size() - 1));
}

TEST(DatasetTest, ChatRecordsMaskOnlyAssistantTurns) {
  const runtime::Tokenizer& tok = TinyTokenizer();
  const std::string path =
      WriteData("chat.jsonl", R"({"messages": [{"role": "system", "content": "Be kind."},)"
                              R"( {"role": "user", "content": "Hi there"},)"
                              R"( {"role": "assistant", "content": "Hello friend"},)"
                              R"( {"role": "user", "content": "Tell a story"},)"
                              R"( {"role": "assistant", "content": "Once upon a time"},)"
                              R"( {"role": "user", "content": "trailing, dropped"}]})"
                              "\n");
  DatasetOptions options = NoSplit();
  auto dataset = Dataset::Load(path, tok, options, nullptr);
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  ASSERT_EQ(dataset->train().size(), 1u);

  const std::vector<int32_t> ctx1 =
      tok.Encode("System: Be kind.\nUser: Hi there\nAssistant: ", true);
  const std::vector<int32_t> ans1 = tok.Encode("Hello friend\n", false);
  const std::vector<int32_t> ctx2 = tok.Encode("User: Tell a story\nAssistant: ", false);
  std::vector<int32_t> ans2 = tok.Encode("Once upon a time\n", false);
  ans2.push_back(tok.eos_id());

  const TrainingExample& ex = dataset->train()[0];
  EXPECT_EQ(ex.tokens, Concat(Concat(Concat(ctx1, ans1), ctx2), ans2));
  std::vector<uint8_t> mask = Mask(ctx1.size(), ans1.size());
  const std::vector<uint8_t> second = Mask(ctx2.size(), ans2.size());
  mask.insert(mask.end(), second.begin(), second.end());
  EXPECT_EQ(ex.loss_mask, mask);
  EXPECT_EQ(ex.num_targets(), static_cast<int64_t>(ans1.size() + ans2.size()));

  // The masked tokens decode to the assistant turns.
  std::vector<int32_t> targets;
  for (size_t i = 0; i < ex.tokens.size(); ++i) {
    if (ex.loss_mask[i]) targets.push_back(ex.tokens[i]);
  }
  const std::string decoded = tok.Decode(targets);
  EXPECT_PRED2(Contains, decoded, "Hello friend");
  EXPECT_PRED2(Contains, decoded, "Once upon a time");
  EXPECT_FALSE(Contains(decoded, "story"));
}

TEST(DatasetTest, ConfigurableFieldsAndTemplate) {
  const runtime::Tokenizer& tok = TinyTokenizer();
  const std::string path =
      WriteData("gsm.jsonl", R"({"question": "What is 2+2?", "answer": "It is 4.\n#### 4"})"
                             "\n");
  DatasetOptions options = NoSplit();
  options.format.prompt_field = "question";
  options.format.completion_field = "answer";
  options.format.prompt_template = "Question: {prompt}\nAnswer: ";
  auto dataset = Dataset::Load(path, tok, options, nullptr);
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  ASSERT_EQ(dataset->train().size(), 1u);
  const std::vector<int32_t> prompt = tok.Encode("Question: What is 2+2?\nAnswer: ", true);
  std::vector<int32_t> completion = tok.Encode("It is 4.\n#### 4", false);
  completion.push_back(tok.eos_id());
  EXPECT_EQ(dataset->train()[0].tokens, Concat(prompt, completion));
  EXPECT_EQ(dataset->train()[0].loss_mask, Mask(prompt.size(), completion.size()));
}

TEST(DatasetTest, AlpacaInputIsAppendedToThePrompt) {
  const runtime::Tokenizer& tok = TinyTokenizer();
  const std::string path = WriteData(
      "alpaca.jsonl", R"({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"})"
                      "\n"
                      R"({"instruction": "Say hi.", "input": "", "output": "hi"})"
                      "\n");
  DatasetOptions options = NoSplit();
  options.format.prompt_field = "instruction";
  options.format.completion_field = "output";
  auto dataset = Dataset::Load(path, tok, options, nullptr);
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  ASSERT_EQ(dataset->train().size(), 2u);
  const std::vector<int32_t> p0 = tok.Encode("Add the numbers.\n2 and 3\n", true);
  const std::vector<int32_t> p1 = tok.Encode("Say hi.\n", true);
  EXPECT_EQ(std::vector<int32_t>(dataset->train()[0].tokens.begin(),
                                 dataset->train()[0].tokens.begin() + p0.size()),
            p0);
  EXPECT_EQ(dataset->train()[0].loss_mask,
            Mask(p0.size(), dataset->train()[0].tokens.size() - p0.size()));
  EXPECT_EQ(std::vector<int32_t>(dataset->train()[1].tokens.begin(),
                                 dataset->train()[1].tokens.begin() + p1.size()),
            p1);
}

TEST(DatasetTest, BadLinesAreReportedWithLineNumbersAndSkipped) {
  const runtime::Tokenizer& tok = TinyTokenizer();
  const std::vector<std::string> lines = {
      R"({"prompt": "a", "completion": "b"})",                        // 1 good
      "this is not json",                                             // 2
      "[1, 2, 3]",                                                    // 3 array
      R"({"prompt": "only a prompt"})",                               // 4 missing field
      R"({"prompt": 5, "completion": "x"})",                          // 5 wrong type
      R"({"messages": [{"role": "tool", "content": "x"}]})",          // 6 unknown role
      "",                                                             // 7 blank
      R"({"something": "else"})",                                     // 8 no rule
      R"({"messages": [{"role": "user", "content": "no answer"}]})",  // 9 no assistant
      R"({"text": ["not", "a", "string"]})",                          // 10 wrong type
      R"({"text": "fine"})",                                          // 11 good
  };
  const std::string path = WriteData("bad.jsonl", absl::StrJoin(lines, "\n") + "\n");
  LoadReport report;
  auto dataset = Dataset::Load(path, tok, NoSplit(), &report);
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  EXPECT_EQ(dataset->train().size(), 2u);
  EXPECT_EQ(report.lines, 10);
  EXPECT_EQ(report.loaded, 2);
  EXPECT_EQ(report.skipped, 8);
  ASSERT_EQ(report.errors.size(), 8u) << absl::StrJoin(report.errors, "\n");
  EXPECT_EQ(report.errors[0], path + ":2: not valid JSON");
  EXPECT_PRED2(Contains, report.errors[1], path + ":3: expected a JSON object, got array");
  EXPECT_PRED2(Contains, report.errors[2], path + ":4: has 'prompt' but no 'completion'");
  EXPECT_PRED2(Contains, report.errors[3],
               path + ":5: field 'prompt' must be a string, got number");
  EXPECT_PRED2(Contains, report.errors[4], path + ":6: messages[0].role 'tool' is not one of");
  EXPECT_PRED2(Contains, report.errors[5], path + ":8: no usable field");
  EXPECT_PRED2(Contains, report.errors[6], path + ":9: field 'messages' has no assistant turn");
  EXPECT_PRED2(Contains, report.errors[7], path + ":10: field 'text' must be a string, got array");
}

TEST(DatasetTest, AcceptsByteOrderMarkAndCrlf) {
  const std::string path =
      WriteData("crlf.jsonl", "\xEF\xBB\xBF{\"text\": \"one\"}\r\n\r\n{\"text\": \"two\"}\r\n");
  LoadReport report;
  auto dataset = Dataset::Load(path, TinyTokenizer(), NoSplit(), &report);
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  EXPECT_EQ(report.loaded, 2);
  EXPECT_EQ(report.skipped, 0) << absl::StrJoin(report.errors, "\n");
}

TEST(DatasetTest, KeepsOnlyTheFirst20Errors) {
  std::string contents;
  for (int i = 0; i < 30; ++i) contents += "nope\n";
  contents += R"({"text": "ok"})"
              "\n";
  LoadReport report;
  auto dataset =
      Dataset::Load(WriteData("many.jsonl", contents), TinyTokenizer(), NoSplit(), &report);
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  EXPECT_EQ(report.skipped, 30);
  EXPECT_EQ(report.errors.size(), 20u);
  EXPECT_EQ(report.loaded, 1);
}

TEST(DatasetTest, JsonArrayFile) {
  const runtime::Tokenizer& tok = TinyTokenizer();
  const std::string path =
      WriteData("array.json",
                "  \n[\n  {\"instruction\": \"Write hi.\", \"input\": \"\", \"output\": \"hi\"},\n"
                "  \"not an object\",\n"
                "  {\"instruction\": \"Echo.\", \"input\": \"abc\", \"output\": \"abc\"}\n]\n");
  DatasetOptions options = NoSplit();
  options.format.prompt_field = "instruction";
  options.format.completion_field = "output";
  LoadReport report;
  auto dataset = Dataset::Load(path, tok, options, &report);
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  EXPECT_EQ(dataset->train().size(), 2u);
  EXPECT_EQ(report.lines, 3);
  EXPECT_EQ(report.skipped, 1);
  ASSERT_EQ(report.errors.size(), 1u);
  EXPECT_EQ(report.errors[0], path + ":element 1: expected a JSON object, got string");
}

TEST(DatasetTest, BrokenJsonArrayIsAnError) {
  auto dataset = Dataset::Load(WriteData("broken.json", "[{\"text\": \"a\"},"), TinyTokenizer(),
                               NoSplit(), nullptr);
  ASSERT_FALSE(dataset.ok());
  EXPECT_EQ(dataset.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_PRED2(Contains, dataset.status().message(), "not a valid JSON array");
}

TEST(DatasetTest, TruncationKeepsTheBeginningAndIsCounted) {
  const runtime::Tokenizer& tok = TinyTokenizer();
  const std::string long_text =
      "Once upon a time there was a little girl named Lily who loved to play in the park.";
  const std::string path = WriteData(
      "trunc.jsonl", absl::StrCat(R"({"text": ")", long_text, "\"}\n", R"({"prompt": ")", long_text,
                                  R"(", "completion": "end"})", "\n", R"({"text": "hi"})", "\n"));
  DatasetOptions options = NoSplit();
  options.max_length = 8;
  ASSERT_GT(tok.Encode(long_text, true).size(), 8u);
  LoadReport report;
  auto dataset = Dataset::Load(path, tok, options, &report);
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  EXPECT_EQ(report.truncated, 2);
  EXPECT_EQ(report.no_targets, 1);  // The prompt alone fills max_length.
  EXPECT_EQ(report.loaded, 2);
  ASSERT_EQ(dataset->train().size(), 2u);
  const std::vector<int32_t> full = tok.Encode(long_text, true);
  EXPECT_EQ(dataset->train()[0].tokens, std::vector<int32_t>(full.begin(), full.begin() + 8));
  EXPECT_EQ(dataset->train()[0].loss_mask.size(), 8u);
}

TEST(DatasetTest, MaxExamplesStopsEarly) {
  std::string contents;
  for (int i = 0; i < 10; ++i) contents += absl::StrCat(R"({"text": "story )", i, "\"}\n");
  DatasetOptions options = NoSplit();
  options.max_examples = 4;
  LoadReport report;
  auto dataset = Dataset::Load(WriteData("max.jsonl", contents), TinyTokenizer(), options, &report);
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  EXPECT_EQ(dataset->train().size(), 4u);
  EXPECT_EQ(report.loaded, 4);
  EXPECT_EQ(report.lines, 4);
}

TEST(DatasetTest, EmptyOrAllBadFileIsAnError) {
  auto empty = Dataset::Load(WriteData("empty.jsonl", ""), TinyTokenizer(), NoSplit(), nullptr);
  ASSERT_FALSE(empty.ok());
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_PRED2(Contains, empty.status().message(), "empty.jsonl");

  const std::string bad_path = WriteData("bad.jsonl", "nope\n{\"x\": 1}\n");
  auto bad = Dataset::Load(bad_path, TinyTokenizer(), NoSplit(), nullptr);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_PRED2(Contains, bad.status().message(), bad_path + ":1: not valid JSON");
}

TEST(DatasetTest, MissingFileIsNotFoundNamingThePath) {
  const std::string path = collm::testing::MakeTempDir("collm-dataset") + "/absent.jsonl";
  auto dataset = Dataset::Load(path, TinyTokenizer(), NoSplit(), nullptr);
  ASSERT_FALSE(dataset.ok());
  EXPECT_EQ(dataset.status().code(), absl::StatusCode::kNotFound);
  EXPECT_PRED2(Contains, dataset.status().message(), path);
}

TEST(DatasetTest, InvalidOptionsNameTheField) {
  const std::string path = WriteData("ok.jsonl", "{\"text\": \"a\"}\n");
  DatasetOptions options;
  options.held_out_fraction = 1.0;
  auto a = Dataset::Load(path, TinyTokenizer(), options, nullptr);
  EXPECT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_PRED2(Contains, a.status().message(), "held_out_fraction");
  options.held_out_fraction = -0.1;
  EXPECT_PRED2(Contains, Dataset::Load(path, TinyTokenizer(), options, nullptr).status().message(),
               "held_out_fraction");
  options = DatasetOptions();
  options.max_length = 1;
  auto b = Dataset::Load(path, TinyTokenizer(), options, nullptr);
  EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_PRED2(Contains, b.status().message(), "max_length");
  options = DatasetOptions();
  options.format.prompt_template = "no placeholder";
  EXPECT_PRED2(Contains, Dataset::Load(path, TinyTokenizer(), options, nullptr).status().message(),
               "prompt_template");
}

// Examples whose first token is their index, so splits can be compared by id.
std::vector<TrainingExample> NumberedExamples(int n) {
  std::vector<TrainingExample> examples(n);
  for (int i = 0; i < n; ++i) {
    examples[i].tokens = {i, 0};
    examples[i].loss_mask = {0, 1};
  }
  return examples;
}

std::vector<int> Ids(const std::vector<TrainingExample>& examples) {
  std::vector<int> ids;
  for (const TrainingExample& e : examples) ids.push_back(e.tokens[0]);
  return ids;
}

TEST(DatasetTest, SplitIsDeterministicAndKeepsFileOrder) {
  const Dataset a = Dataset::FromExamples(NumberedExamples(100), 0.1, 7);
  const Dataset b = Dataset::FromExamples(NumberedExamples(100), 0.1, 7);
  const Dataset c = Dataset::FromExamples(NumberedExamples(100), 0.1, 8);
  EXPECT_EQ(a.held_out().size(), 10u);
  EXPECT_EQ(a.train().size(), 90u);
  EXPECT_EQ(Ids(a.held_out()), Ids(b.held_out()));
  EXPECT_EQ(Ids(a.train()), Ids(b.train()));
  EXPECT_NE(Ids(a.held_out()), Ids(c.held_out()));

  const std::vector<int> train = Ids(a.train());
  const std::vector<int> held = Ids(a.held_out());
  EXPECT_TRUE(std::is_sorted(train.begin(), train.end()));
  EXPECT_TRUE(std::is_sorted(held.begin(), held.end()));
  std::set<int> all(train.begin(), train.end());
  all.insert(held.begin(), held.end());
  EXPECT_EQ(all.size(), 100u);
  EXPECT_EQ(*all.begin(), 0);
  EXPECT_EQ(*all.rbegin(), 99);
}

TEST(DatasetTest, SplitEdgeCases) {
  EXPECT_EQ(Dataset::FromExamples(NumberedExamples(3), 0.01, 1).held_out().size(), 1u);
  EXPECT_EQ(Dataset::FromExamples(NumberedExamples(1), 0.5, 1).held_out().size(), 0u);
  EXPECT_EQ(Dataset::FromExamples(NumberedExamples(1), 0.5, 1).train().size(), 1u);
  EXPECT_EQ(Dataset::FromExamples(NumberedExamples(2), 0.9, 1).train().size(), 1u);
  EXPECT_EQ(Dataset::FromExamples(NumberedExamples(50), 0.0, 1).held_out().size(), 0u);
  EXPECT_EQ(Dataset::FromExamples(NumberedExamples(50), 0.25, 1).held_out().size(), 13u);
  EXPECT_EQ(Dataset::FromExamples({}, 0.1, 1).train().size(), 0u);
}

TEST(DatasetTest, LoadSplitsWithTheSeed) {
  std::string contents;
  for (int i = 0; i < 40; ++i) contents += absl::StrCat(R"({"text": "story )", i, "\"}\n");
  const std::string path = WriteData("split.jsonl", contents);
  DatasetOptions options;
  options.held_out_fraction = 0.25;
  options.seed = 3;
  auto a = Dataset::Load(path, TinyTokenizer(), options, nullptr);
  auto b = Dataset::Load(path, TinyTokenizer(), options, nullptr);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->held_out().size(), 10u);
  EXPECT_EQ(a->train().size(), 30u);
  ASSERT_EQ(a->held_out().size(), b->held_out().size());
  for (size_t i = 0; i < a->held_out().size(); ++i) {
    EXPECT_EQ(a->held_out()[i].tokens, b->held_out()[i].tokens);
  }
}

TEST(InteractionBufferTest, DropsOldestWhenFullAndTakesInOrder) {
  InteractionBuffer buffer(3);
  for (int i = 0; i < 5; ++i) buffer.Add(NumberedExamples(5)[i]);
  EXPECT_EQ(buffer.size(), 3u);
  EXPECT_EQ(buffer.total_added(), 5);
  EXPECT_EQ(buffer.dropped(), 2);
  EXPECT_EQ(Ids(buffer.Take(2)), std::vector<int>({2, 3}));
  EXPECT_EQ(Ids(buffer.Take(10)), std::vector<int>({4}));
  EXPECT_TRUE(buffer.Take(10).empty());
  EXPECT_EQ(buffer.size(), 0u);
}

TEST(InteractionBufferTest, ZeroCapacityHoldsOne) {
  InteractionBuffer buffer(0);
  buffer.Add(NumberedExamples(2)[0]);
  buffer.Add(NumberedExamples(2)[1]);
  EXPECT_EQ(buffer.size(), 1u);
  EXPECT_EQ(buffer.dropped(), 1);
  EXPECT_EQ(Ids(buffer.Take(5)), std::vector<int>({1}));
}

TEST(InteractionBufferTest, ConcurrentAddsAndTakes) {
  constexpr int kThreads = 4;
  constexpr int kPerThread = 500;
  InteractionBuffer buffer(100);
  std::vector<std::thread> threads;
  std::vector<int> taken;
  std::mutex taken_mu;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&buffer, t] {
      for (int i = 0; i < kPerThread; ++i) {
        TrainingExample e;
        e.tokens = {t * kPerThread + i};
        e.loss_mask = {1};
        buffer.Add(std::move(e));
      }
    });
  }
  threads.emplace_back([&] {
    for (int i = 0; i < 200; ++i) {
      std::vector<int> ids = Ids(buffer.Take(7));
      std::lock_guard<std::mutex> lock(taken_mu);
      taken.insert(taken.end(), ids.begin(), ids.end());
    }
  });
  for (std::thread& thread : threads) thread.join();
  std::vector<int> rest = Ids(buffer.Take(1000));
  taken.insert(taken.end(), rest.begin(), rest.end());
  EXPECT_EQ(buffer.total_added(), kThreads * kPerThread);
  EXPECT_EQ(static_cast<int64_t>(taken.size()) + buffer.dropped(), kThreads * kPerThread);
  EXPECT_EQ(std::set<int>(taken.begin(), taken.end()).size(), taken.size());  // No duplicates.
  EXPECT_EQ(buffer.size(), 0u);
}

// Real data: GSM8K with the stories260K tokenizer.
TEST(DatasetRealDataTest, Gsm8kTrain) {
  COLLM_REQUIRE_DATA_FILE(data, "finetune/gsm8k/train.jsonl");
  COLLM_REQUIRE_MODEL_FILE(tokenizer_path, "stories260K-hf/tokenizer.model");
  auto tokenizer = runtime::Tokenizer::Load(tokenizer_path);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  DatasetOptions options;
  options.format.prompt_field = "question";
  options.format.completion_field = "answer";
  options.format.prompt_template = "Question: {prompt}\nAnswer: ";
  options.max_examples = 500;
  options.max_length = 512;
  options.held_out_fraction = 0.1;
  LoadReport report;
  auto dataset = Dataset::Load(data, **tokenizer, options, &report);
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  EXPECT_EQ(report.loaded, 500);
  EXPECT_EQ(report.skipped, 0) << absl::StrJoin(report.errors, "\n");
  EXPECT_EQ(report.no_targets, 0);
  EXPECT_EQ(dataset->held_out().size(), 50u);
  EXPECT_EQ(dataset->train().size(), 450u);
  for (const TrainingExample& ex : All(*dataset)) {
    EXPECT_GT(ex.num_targets(), 0);
    EXPECT_LE(ex.tokens.size(), 512u);
    EXPECT_EQ(ex.tokens.size(), ex.loss_mask.size());
    EXPECT_EQ(ex.tokens[0], (*tokenizer)->bos_id());
    EXPECT_EQ(ex.loss_mask[0], 0);
  }
  // The targets of an untruncated example decode to the answer, ending in "#### N".
  const TrainingExample& first = dataset->train()[0];
  std::vector<int32_t> targets;
  for (size_t i = 0; i < first.tokens.size(); ++i) {
    if (first.loss_mask[i]) targets.push_back(first.tokens[i]);
  }
  EXPECT_PRED2(Contains, (*tokenizer)->Decode(targets), "####");
}

TEST(DatasetRealDataTest, CodeAlpacaArray) {
  COLLM_REQUIRE_DATA_FILE(data, "finetune/codealpaca/code_alpaca_2k.json");
  COLLM_REQUIRE_MODEL_FILE(tokenizer_path, "stories260K-hf/tokenizer.model");
  auto tokenizer = runtime::Tokenizer::Load(tokenizer_path);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  DatasetOptions options;
  options.format.prompt_field = "instruction";
  options.format.completion_field = "output";
  options.format.prompt_template = "### Instruction:\n{prompt}\n### Response:\n";
  options.max_examples = 200;
  LoadReport report;
  auto dataset = Dataset::Load(data, **tokenizer, options, &report);
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  EXPECT_EQ(report.loaded, 200);
  EXPECT_EQ(report.skipped, 0) << absl::StrJoin(report.errors, "\n");
  EXPECT_EQ(dataset->train().size() + dataset->held_out().size(), 200u);
  EXPECT_EQ(dataset->held_out().size(), 20u);
  for (const TrainingExample& ex : All(*dataset)) EXPECT_GT(ex.num_targets(), 0);
}

}  // namespace
}  // namespace collm::engine
