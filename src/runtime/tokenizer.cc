#include "collm/runtime/tokenizer.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "sentencepiece_shim.h"  // Private to src/runtime.

namespace collm::runtime {
namespace {

// "▁", the marker SentencePiece uses for a space.
constexpr absl::string_view kSpaceSymbol = "\xE2\x96\x81";
// U+FFFD; SentencePiece decodes each byte of an incomplete or invalid byte-fallback run to it.
constexpr absl::string_view kReplacementChar = "\xEF\xBF\xBD";
// Prompt ids kept as context for the first generated pieces. A handful is enough: only the
// leading-space rule and byte runs cross token boundaries.
constexpr size_t kMaxPromptContext = 8;

// True when `text` ends inside a UTF-8 sequence or with U+FFFD (how SentencePiece renders an
// incomplete byte run): more ids may still complete the character.
bool EndsWithIncompleteUtf8(absl::string_view text) {
  if (absl::EndsWith(text, kReplacementChar)) return true;
  const size_t n = text.size();
  for (size_t back = 1; back <= std::min<size_t>(4, n); ++back) {
    const auto c = static_cast<unsigned char>(text[n - back]);
    if ((c & 0xC0) == 0x80) continue;  // Continuation byte: keep looking for the lead byte.
    size_t need = 1;
    if ((c & 0xE0) == 0xC0) {
      need = 2;
    } else if ((c & 0xF0) == 0xE0) {
      need = 3;
    } else if ((c & 0xF8) == 0xF0) {
      need = 4;
    }
    return back < need;
  }
  return false;
}

// Length of the common prefix of `a` and `b`, backed off to a UTF-8 character boundary of `b`.
size_t CommonUtf8Prefix(absl::string_view a, absl::string_view b) {
  size_t i = 0;
  while (i < a.size() && i < b.size() && a[i] == b[i]) ++i;
  while (i > 0 && i < b.size() && (static_cast<unsigned char>(b[i]) & 0xC0) == 0x80) --i;
  return i;
}

}  // namespace

Tokenizer::Tokenizer() : processor_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {}
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(
        absl::StrCat("cannot open tokenizer model ", path, ": ", std::strerror(errno)));
  }
  std::string serialized((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return absl::DataLossError(absl::StrCat("cannot read tokenizer model ", path));
  if (serialized.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer model ", path, " is empty"));
  }

  auto tokenizer = std::unique_ptr<Tokenizer>(new Tokenizer());
  sentencepiece::util::Status status = tokenizer->processor_->LoadFromSerializedProto(serialized);
  if (!status.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer model ", path,
                                                   " is not a valid SentencePiece model: ",
                                                   status.message()));
  }
  const sentencepiece::SentencePieceProcessor& sp = *tokenizer->processor_;
  if (sp.GetPieceSize() <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer model ", path, " has no pieces"));
  }
  for (int id = 0; id < sp.GetPieceSize(); ++id) {
    if (sp.IsControl(id) || sp.IsUnknown(id) || sp.IsUnused(id) || sp.IsByte(id)) continue;
    const std::string& piece = sp.IdToPiece(id);
    if (!absl::StartsWith(piece, kSpaceSymbol) || piece.size() == kSpaceSymbol.size()) continue;
    const bool plain = std::all_of(piece.begin() + kSpaceSymbol.size(), piece.end(), [](char c) {
      return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
    });
    if (plain) {
      tokenizer->anchor_id_ = id;
      break;
    }
  }
  return tokenizer;
}

std::vector<int32_t> Tokenizer::Encode(absl::string_view text, bool add_bos) const {
  std::vector<int> ids;
  // Encode only fails on an unloaded model, which Load rules out.
  processor_->Encode(std::string_view(text.data(), text.size()), &ids).IgnoreError();
  std::vector<int32_t> out;
  out.reserve(ids.size() + 1);
  if (add_bos && bos_id() >= 0) out.push_back(bos_id());
  out.insert(out.end(), ids.begin(), ids.end());
  return out;
}

std::string Tokenizer::Decode(absl::Span<const int32_t> ids) const {
  // SentencePiece rejects the whole call on one bad id; the ids may come from a client.
  const int vocab = vocab_size();
  std::vector<int> valid;
  valid.reserve(ids.size());
  for (int32_t id : ids) {
    if (id >= 0 && id < vocab) valid.push_back(id);
  }
  std::string text;
  if (!processor_->Decode(valid, &text).ok()) return "";
  return text;
}

int Tokenizer::vocab_size() const { return processor_->GetPieceSize(); }
int32_t Tokenizer::bos_id() const { return processor_->bos_id(); }
int32_t Tokenizer::eos_id() const { return processor_->eos_id(); }

std::string Tokenizer::IdToPiece(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return "";
  return processor_->IdToPiece(id);
}

IncrementalDetokenizer::IncrementalDetokenizer(const Tokenizer& tokenizer,
                                               absl::Span<const int32_t> prompt_tail)
    : tokenizer_(tokenizer) {
  const size_t keep = std::min(prompt_tail.size(), kMaxPromptContext);
  ids_.assign(prompt_tail.end() - keep, prompt_tail.end());
  read_offset_ = ids_.size();
  if (CanAnchorAt(read_offset_)) {
    anchored_ = true;
    prefix_offset_ = read_offset_;
  }
}

std::string IncrementalDetokenizer::DecodeWindow(size_t end) const {
  std::vector<int32_t> window;
  window.reserve(end - prefix_offset_ + 1);
  // The anchor is a plain "▁word" piece: as the first piece it absorbs SentencePiece's
  // leading-space stripping and ends any byte run, so the window's own pieces decode as they do
  // in the middle of the full sequence.
  if (anchored_) window.push_back(tokenizer_.anchor_id_);
  window.insert(window.end(), ids_.begin() + prefix_offset_, ids_.begin() + end);
  return tokenizer_.Decode(window);
}

bool IncrementalDetokenizer::CanAnchorAt(size_t offset) const {
  if (tokenizer_.anchor_id_ < 0) return false;
  // Probe SentencePiece itself rather than re-deriving its rules: once the leading space has been
  // spent, appending the anchor appends " " plus its word.
  std::vector<int32_t> probe(ids_.begin(), ids_.begin() + offset);
  const std::string before = tokenizer_.Decode(probe);
  if (EndsWithIncompleteUtf8(before)) return false;  // Later bytes could still join this tail.
  probe.push_back(tokenizer_.anchor_id_);
  const std::string after = tokenizer_.Decode(probe);
  const std::string anchor_alone = tokenizer_.Decode({tokenizer_.anchor_id_});
  return after == absl::StrCat(before, " ", anchor_alone);
}

std::string IncrementalDetokenizer::Push(int32_t id) {
  ids_.push_back(id);
  const std::string prefix_text = DecodeWindow(read_offset_);
  const std::string new_text = DecodeWindow(ids_.size());
  if (new_text.size() <= prefix_text.size() || !absl::StartsWith(new_text, prefix_text) ||
      EndsWithIncompleteUtf8(new_text)) {
    return "";
  }
  std::string delta = new_text.substr(prefix_text.size());
  const size_t emitted_up_to = read_offset_;
  read_offset_ = ids_.size();
  if (anchored_) {
    prefix_offset_ = emitted_up_to;
  } else if (CanAnchorAt(emitted_up_to)) {
    anchored_ = true;
    prefix_offset_ = emitted_up_to;
  }
  // Otherwise the window keeps starting at 0 so the leading-space rule sees the true start.
  return delta;
}

std::string IncrementalDetokenizer::Finish() {
  const std::string prefix_text = DecodeWindow(read_offset_);
  const std::string new_text = DecodeWindow(ids_.size());
  read_offset_ = ids_.size();
  if (absl::StartsWith(new_text, prefix_text)) return new_text.substr(prefix_text.size());
  // Only reachable when the prompt tail ends inside a character that generated bytes complete.
  return new_text.substr(CommonUtf8Prefix(prefix_text, new_text));
}

}  // namespace collm::runtime
