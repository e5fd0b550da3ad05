// SentencePiece tokenizer (the `tokenizer.model` of Llama-family checkpoints) and the incremental,
// UTF-8-safe detokenizer used for streaming.
#ifndef COLLM_RUNTIME_TOKENIZER_H_
#define COLLM_RUNTIME_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace collm::runtime {

// Immutable after Load; thread-safe (SentencePieceProcessor's const methods are).
class Tokenizer {
 public:
  // Loads a serialized SentencePiece ModelProto. A missing, empty or corrupt file is an error
  // naming the path.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& path);
  ~Tokenizer();

  // Encodes `text`, prepending BOS when `add_bos` (Llama convention: the caller decides; the model
  // file does not). Never fails: unknown bytes use byte fallback or <unk>.
  std::vector<int32_t> Encode(absl::string_view text, bool add_bos) const;
  // Decodes ids to text. Control tokens (BOS/EOS) produce no text; ids outside the vocabulary are
  // skipped rather than crashing (they can come from an untrusted client).
  std::string Decode(absl::Span<const int32_t> ids) const;

  int vocab_size() const;
  int32_t bos_id() const;
  int32_t eos_id() const;
  std::string IdToPiece(int32_t id) const;

 private:
  friend class IncrementalDetokenizer;

  Tokenizer();
  std::unique_ptr<sentencepiece::SentencePieceProcessor> processor_;
  // A plain piece starting with the SentencePiece space ("▁the"); -1 when the vocabulary has none.
  // IncrementalDetokenizer decodes windows behind it so their first piece keeps its leading space.
  int32_t anchor_id_ = -1;
};

// Turns a stream of generated token ids into a stream of text deltas. A delta never ends inside a
// UTF-8 sequence (byte-fallback tokens of one character are held back until it is complete), and
// the concatenation of all deltas plus Finish() equals Decode() of all the generated ids.
// One per request; not thread-safe. The tokenizer must outlive it.
class IncrementalDetokenizer {
 public:
  // `prompt_tail` (the last few prompt ids, may be empty) gives the first generated pieces the
  // context that decides whether SentencePiece strips their leading space.
  IncrementalDetokenizer(const Tokenizer& tokenizer, absl::Span<const int32_t> prompt_tail);

  // Appends one id; returns the text that became final (possibly empty).
  std::string Push(int32_t id);
  // Returns whatever is still held back (an incomplete UTF-8 tail is emitted as decoded, with
  // replacement characters, because no more ids will come).
  std::string Finish();

 private:
  // Decodes ids_[prefix_offset_:end), behind the anchor piece once anchored_.
  std::string DecodeWindow(size_t end) const;
  // True when the pieces from `offset` on decode the same alone (behind the anchor) as after
  // ids_[0:offset), i.e. SentencePiece's strip-the-first-leading-space rule is already spent.
  bool CanAnchorAt(size_t offset) const;

  const Tokenizer& tokenizer_;
  std::vector<int32_t> ids_;
  size_t prefix_offset_ = 0;  // Start of the window decoded for context.
  size_t read_offset_ = 0;    // Ids before this have had their text emitted.
  bool anchored_ = false;     // Windows are decoded behind tokenizer_.anchor_id_.
};

// Trains a small byte-fallback BPE SentencePiece model on an embedded English corpus and writes
// it to `path`. Used for the offline tiny random model and tests, so nothing needs downloading.
// `vocab_size` must be in [300, 2000] (260 byte/control pieces + merges).
absl::Status TrainTinyTokenizer(const std::string& path, int vocab_size);

}  // namespace collm::runtime

#endif  // COLLM_RUNTIME_TOKENIZER_H_
