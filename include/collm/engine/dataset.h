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
//      replaced, then the completion; loss on the completion (+ EOS). When the record also has a
//      non-empty string `input_field` (Alpaca style), the prompt is prompt + "\n" + input.
//   3. `text_field` is a string: loss on every token.
// Any other record is a bad line (reported, skipped, counted): not a JSON object, a present field
// of the wrong type, only one of prompt/completion, an empty `messages` list or one without an
// assistant turn, a role other than system/user/assistant. An empty field name disables its rule.
//
// Tokenization: the rendered text is cut into runs of equal loss mask, and each run is encoded
// separately (BOS only once, at the start; mask 0). SentencePiece puts a dummy-prefix space before
// each run, so a completion reads " answer" after its prompt and a run after a turn_end starts
// with a space; encoding run by run (not the whole string) is what keeps the mask exact at the
// boundaries. In a chat, messages after the last assistant turn carry no target and are dropped.
struct DatasetFormat {
  std::string prompt_field = "prompt";          // GSM8K: "question"; Code Alpaca: "instruction".
  std::string completion_field = "completion";  // GSM8K: "answer"; Code Alpaca: "output".
  std::string input_field = "input";            // Optional extra prompt context (Alpaca).
  std::string text_field = "text";
  std::string messages_field = "messages";
  // Must contain "{prompt}"; e.g. "Question: {prompt}\nAnswer: ".
  std::string prompt_template = "{prompt}\n";
  // Chat template pieces: each turn is role_prefix(role) + content + turn_end.
  std::string user_prefix = "User: ";
  std::string assistant_prefix = "Assistant: ";
  std::string system_prefix = "System: ";
  std::string turn_end = "\n";
};

struct DatasetOptions {
  DatasetFormat format;
  int64_t max_length = 512;  // Tokens per example (>= 2); longer ones keep their beginning.
  bool add_bos = true;
  bool add_eos = true;             // Append EOS to completions / assistant turns / text.
  double held_out_fraction = 0.1;  // In [0, 1): share of examples kept out of training.
  uint64_t seed = 0;               // Decides the split (same seed, same split).
  int64_t max_examples = 0;        // Stop after this many good records; 0 = all.
};

struct LoadReport {
  int64_t lines = 0;       // Non-blank lines (or array elements) read.
  int64_t loaded = 0;      // Examples kept.
  int64_t skipped = 0;     // Bad lines.
  int64_t truncated = 0;   // Examples cut to max_length.
  int64_t no_targets = 0;  // Examples dropped because truncation left no target token.
  // The first 20 problems, each "PATH:LINE: what" (LINE 1-based) or, for a JSON array file,
  // "PATH:element N: what" (N 0-based).
  std::vector<std::string> errors;
};

// Immutable after Load; thread-safe to read.
class Dataset {
 public:
  // Reads a JSON Lines file (one object per line) or, when its first non-blank character is '[',
  // a JSON array of objects (e.g. Code Alpaca's .json). A missing or unreadable file is NotFound;
  // a file with no usable record, or invalid options (held_out_fraction outside [0, 1),
  // max_length < 2, a prompt_template without "{prompt}"), is InvalidArgument. Bad records are
  // skipped and reported in `report` (may be null). Stops after max_examples kept examples.
  //
  // Split: the example indices are shuffled with std::mt19937_64(seed) and a Fisher-Yates shuffle
  // written here (portable, unlike std::shuffle); the first round(n * held_out_fraction) (at least
  // 1 when the fraction is > 0 and n >= 2, at most n - 1) are held out. Both parts keep file order.
  static absl::StatusOr<Dataset> Load(const std::string& path, const runtime::Tokenizer& tokenizer,
                                      const DatasetOptions& options, LoadReport* report);
  // Builds from already tokenized examples (split as Load does). A held_out_fraction outside
  // [0, 1) is clamped into it.
  static Dataset FromExamples(std::vector<TrainingExample> examples, double held_out_fraction,
                              uint64_t seed);

  const std::vector<TrainingExample>& train() const { return train_; }
  const std::vector<TrainingExample>& held_out() const { return held_out_; }

 private:
  std::vector<TrainingExample> train_;
  std::vector<TrainingExample> held_out_;
};

// Tokenizes one prompt/completion pair the way Dataset does (for feedback from served requests):
// template applied, truncated to options.max_length. The result may have no target (callers
// check num_targets()).
TrainingExample MakeExample(const runtime::Tokenizer& tokenizer, const std::string& prompt,
                            const std::string& completion, const DatasetOptions& options);

// Bounded FIFO of examples that arrive while serving (feedback, corrected completions).
// Thread-safe. When full, the oldest example is dropped (and counted).
class InteractionBuffer {
 public:
  // A capacity of 0 is treated as 1.
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
