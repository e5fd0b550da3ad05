// Fine-tuning data: JSONL records turned into tokenized examples with a loss mask, a held-out
// split, and the in-memory buffer that collects training data from served requests.
#ifndef COLLM_ENGINE_DATASET_H_
#define COLLM_ENGINE_DATASET_H_

#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "collm/runtime/tokenizer.h"

namespace collm::engine {

// One tokenized example. loss_mask[i] == 1 when tokens[i] is a training target (completion
// tokens, the assistant's turns, or every token of a plain-text record); prompt tokens are 0.
struct TrainingExample {
  std::vector<int32_t> tokens;
  std::vector<uint8_t> loss_mask;
  int64_t num_targets() const;
};

// How records map to text. A record is used by the first rule that applies:
//   1. `messages_field` holds a list of {"role", "content"} (chat): rendered with the chat
//      template below; loss on assistant contents (and the end-of-turn marker) only.
//   2. `prompt_field` and `completion_field` are strings: prompt_template with "{prompt}"
//      replaced, then the completion; loss on the completion (+ EOS).
//   3. `text_field` is a string: loss on every token.
// Any other record is a bad line (reported, skipped, counted).
struct DatasetFormat {
  std::string prompt_field = "prompt";          // GSM8K: "question".
  std::string completion_field = "completion";  // GSM8K: "answer".
  std::string text_field = "text";
  std::string messages_field = "messages";
  std::string prompt_template = "{prompt}\n";  // e.g. "Question: {prompt}\nAnswer: ".
  // Chat template pieces: each turn is role_prefix(role) + content + turn_end.
  std::string user_prefix = "User: ";
  std::string assistant_prefix = "Assistant: ";
  std::string system_prefix = "System: ";
  std::string turn_end = "\n";
};

struct DatasetOptions {
  DatasetFormat format;
  int64_t max_length = 512;         // Tokens per example; longer ones are truncated (counted).
  bool add_bos = true;
  bool add_eos = true;              // Append EOS to completions / assistant turns / text.
  double held_out_fraction = 0.1;   // In [0, 1): share of examples kept out of training.
  uint64_t seed = 0;                // Decides the split (same seed, same split).
  int64_t max_examples = 0;         // Stop after this many good records; 0 = all.
};

struct LoadReport {
  int64_t lines = 0;       // Non-empty lines (or array elements) seen.
  int64_t loaded = 0;      // Examples kept.
  int64_t skipped = 0;     // Bad lines.
  int64_t truncated = 0;   // Examples cut to max_length.
  int64_t no_targets = 0;  // Examples dropped because truncation left no target token.
  std::vector<std::string> errors;  // The first 20 problems, each "PATH:LINE: what".
};

// Immutable after Load; thread-safe to read.
class Dataset {
 public:
  // Reads a JSON Lines file (one object per line) or a JSON array of objects (e.g. Code Alpaca's
  // .json). A missing or unreadable file, or a file with no usable record, is an error; bad
  // records are skipped and reported in `report` (may be null).
  static absl::StatusOr<Dataset> Load(const std::string& path, const runtime::Tokenizer& tokenizer,
                                      const DatasetOptions& options, LoadReport* report);
  // Builds from already tokenized examples (split as Load does).
  static Dataset FromExamples(std::vector<TrainingExample> examples, double held_out_fraction,
                              uint64_t seed);

  const std::vector<TrainingExample>& train() const { return train_; }
  const std::vector<TrainingExample>& held_out() const { return held_out_; }

 private:
  std::vector<TrainingExample> train_;
  std::vector<TrainingExample> held_out_;
};

// Tokenizes one prompt/completion pair the way Dataset does (for feedback from served requests).
TrainingExample MakeExample(const runtime::Tokenizer& tokenizer, const std::string& prompt,
                            const std::string& completion, const DatasetOptions& options);

// Bounded FIFO of examples that arrive while serving (feedback, corrected completions).
// Thread-safe. When full, the oldest example is dropped (and counted).
class InteractionBuffer {
 public:
  explicit InteractionBuffer(size_t capacity);
  void Add(TrainingExample example);
  // Removes and returns up to `max` examples, oldest first.
  std::vector<TrainingExample> Take(size_t max);
  size_t size() const;
  int64_t total_added() const;
  int64_t dropped() const;

 private:
  const size_t capacity_;
  mutable std::mutex mu_;
  std::deque<TrainingExample> items_;
  int64_t total_added_ = 0;
  int64_t dropped_ = 0;
};

}  // namespace collm::engine

#endif  // COLLM_ENGINE_DATASET_H_
