// The SentencePiece BPE tokenizer of Llama-family checkpoints (`tokenizer.model`), implemented in
// collm (see src/runtime/sentencepiece_model.h for why not libsentencepiece), and the incremental,
// UTF-8-safe detokenizer used for streaming.
#ifndef COLLM_RUNTIME_TOKENIZER_H_
#define COLLM_RUNTIME_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace collm::runtime {

// Immutable after Load; thread-safe.
class Tokenizer {
 public:
  // Loads a serialized SentencePiece ModelProto. A missing, empty or corrupt file, or a model this
  // encoder does not implement (unigram, a precompiled normalization table), is an error naming
  // the path.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& path);
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromSerializedProto(absl::string_view bytes,
                                                                        const std::string& name);

  // Encodes `text` as SentencePiece does (normalization, dummy prefix, BPE merges by piece score,
  // byte fallback), prepending BOS when `add_bos` (Llama convention: the caller decides).
  std::vector<int32_t> Encode(absl::string_view text, bool add_bos) const;
  // Decodes ids to text as SentencePiece does (control ids give no text; the leading space of the
  // first piece is dropped). Ids outside the vocabulary are skipped: they can come from clients.
  std::string Decode(absl::Span<const int32_t> ids) const;

  int vocab_size() const { return static_cast<int>(pieces_.size()); }
  int32_t bos_id() const { return bos_id_; }
  int32_t eos_id() const { return eos_id_; }
  std::string IdToPiece(int32_t id) const;
  bool IsControl(int32_t id) const;

  // The bytes id `id` contributes to decoded text; `first` = it is the first text-producing piece
  // (SentencePiece then drops its leading space). Empty for control and out-of-range ids.
  std::string PieceBytes(int32_t id, bool first) const;

 private:
  Tokenizer() = default;

  struct Piece {
    std::string text;
    float score = 0;
    int type = 1;
  };
  std::vector<Piece> pieces_;
  std::unordered_map<std::string, int32_t> mergeable_;  // Normal/user-defined pieces by text.
  int32_t byte_ids_[256];
  bool byte_fallback_ = false;
  bool add_dummy_prefix_ = true;
  bool remove_extra_whitespaces_ = true;
  bool escape_whitespaces_ = true;
  int32_t unk_id_ = 0, bos_id_ = 1, eos_id_ = 2;
  std::string unk_surface_;
};

// Turns a stream of generated ids into text deltas. A delta never ends inside a UTF-8 sequence
// (byte-fallback pieces of one character are held back until it completes); the concatenation of
// all deltas plus Finish() is the text the ids add after the prompt. One per request; not
// thread-safe. The tokenizer must outlive it.
class IncrementalDetokenizer {
 public:
  // `prompt` (may be empty) decides whether the first generated piece keeps its leading space:
  // SentencePiece drops it only when no text-producing piece came before.
  IncrementalDetokenizer(const Tokenizer& tokenizer, absl::Span<const int32_t> prompt);

  // Appends one id; returns the text that became final (possibly empty).
  std::string Push(int32_t id);
  // Returns what is still held back; bytes that never completed a character become U+FFFD.
  std::string Finish();

 private:
  const Tokenizer& tokenizer_;
  bool seen_text_ = false;
  std::string pending_;
};

// Trains a small byte-fallback BPE tokenizer (SentencePiece format, loadable by SentencePiece
// itself) on an embedded English corpus and writes it atomically to `path`. Deterministic: the
// same vocab_size gives the same bytes. The model has exactly `vocab_size` pieces, which must be
// in [300, 4000].
absl::Status TrainTinyTokenizer(const std::string& path, int vocab_size);

}  // namespace collm::runtime

#endif  // COLLM_RUNTIME_TOKENIZER_H_
