#include "collm/runtime/tokenizer.h"

#include <fstream>
#include <queue>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "collm/common/status.h"
#include "sentencepiece_model.h"

namespace collm::runtime {
namespace {

constexpr absl::string_view kSpaceSymbol = "\xE2\x96\x81";  // U+2581 "▁".
constexpr absl::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD.

// Length of the UTF-8 sequence starting with `lead`, 0 if `lead` cannot start one.
int Utf8Length(uint8_t lead) {
  if (lead < 0x80) return 1;
  if (lead >= 0xC2 && lead <= 0xDF) return 2;
  if (lead >= 0xE0 && lead <= 0xEF) return 3;
  if (lead >= 0xF0 && lead <= 0xF4) return 4;
  return 0;
}

bool IsContinuation(uint8_t b) { return (b & 0xC0) == 0x80; }

// Whether `second` may follow `lead` (a 3- or 4-byte lead): excludes overlong forms (E0 80-9F,
// F0 80-8F), UTF-16 surrogates (ED A0-BF) and code points past U+10FFFF (F4 90-BF), which are
// not UTF-8 and which protobuf refuses to serialize in a string field.
bool AllowedSecond(uint8_t lead, uint8_t second) {
  switch (lead) {
    case 0xE0:
      return second >= 0xA0;
    case 0xED:
      return second <= 0x9F;
    case 0xF0:
      return second >= 0x90;
    case 0xF4:
      return second <= 0x8F;
    default:
      return true;
  }
}

// Appends the well-formed UTF-8 in `in` to `out`, each invalid byte as U+FFFD, left to right.
// Unless `final`, an incomplete (but so far valid) sequence at the end is left unconsumed.
// Returns the number of bytes consumed.
size_t AppendValidUtf8(absl::string_view in, bool final, std::string* out) {
  size_t i = 0;
  while (i < in.size()) {
    const int len = Utf8Length(static_cast<uint8_t>(in[i]));
    if (len == 0) {
      out->append(kReplacement.data(), kReplacement.size());
      ++i;
      continue;
    }
    int have = 1;
    while (
        have < len && i + have < in.size() && IsContinuation(static_cast<uint8_t>(in[i + have])) &&
        (have > 1 || AllowedSecond(static_cast<uint8_t>(in[i]), static_cast<uint8_t>(in[i + 1])))) {
      ++have;
    }
    if (have == len) {
      out->append(in.data() + i, len);
      i += len;
    } else if (i + have == in.size() && !final) {
      break;  // Incomplete character at the end: wait for more bytes.
    } else {
      out->append(kReplacement.data(), kReplacement.size());
      ++i;
    }
  }
  return i;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open tokenizer ", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  return FromSerializedProto(ss.str(), path);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromSerializedProto(absl::string_view bytes,
                                                                          const std::string& name) {
  auto invalid = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer ", name, ": ", what));
  };
  if (bytes.empty()) return invalid("file is empty");
  auto parsed = spm::ParseModelProto(bytes);
  if (!parsed.ok()) {
    return invalid(absl::StrCat("not a SentencePiece model (", parsed.status().message(), ")"));
  }
  const spm::ModelProto& m = *parsed;
  if (m.pieces.empty()) return invalid("no pieces (not a SentencePiece model?)");
  if (m.model_type != 2) {
    return invalid(absl::StrCat("model type ", m.model_type,
                                " is not supported (only BPE, as used by Llama-family models)"));
  }
  if (m.has_precompiled_charsmap) {
    return invalid(absl::StrCat("normalizer '", m.normalizer_name,
                                "' with a precompiled charsmap is not supported (only identity)"));
  }
  const int32_t n = static_cast<int32_t>(m.pieces.size());
  auto check_id = [&](const char* what, int32_t id, bool allow_negative) -> absl::Status {
    if ((id < 0 && !allow_negative) || id >= n) {
      return invalid(absl::StrCat(what, " ", id, " is outside the vocabulary of ", n));
    }
    return absl::OkStatus();
  };
  COLLM_RETURN_IF_ERROR(check_id("unk_id", m.unk_id, false));
  COLLM_RETURN_IF_ERROR(check_id("bos_id", m.bos_id, true));
  COLLM_RETURN_IF_ERROR(check_id("eos_id", m.eos_id, true));

  std::unique_ptr<Tokenizer> t(new Tokenizer());
  std::fill(std::begin(t->byte_ids_), std::end(t->byte_ids_), -1);
  t->byte_fallback_ = m.byte_fallback;
  t->add_dummy_prefix_ = m.add_dummy_prefix;
  t->remove_extra_whitespaces_ = m.remove_extra_whitespaces;
  t->escape_whitespaces_ = m.escape_whitespaces;
  t->unk_id_ = m.unk_id;
  t->bos_id_ = m.bos_id;
  t->eos_id_ = m.eos_id;
  t->unk_surface_ = m.unk_surface;
  t->pieces_.reserve(n);
  for (int32_t id = 0; id < n; ++id) {
    const spm::Piece& p = m.pieces[id];
    t->pieces_.push_back({p.text, p.score, static_cast<int>(p.type)});
    if (p.type == spm::PieceType::kNormal || p.type == spm::PieceType::kUserDefined) {
      t->mergeable_.emplace(p.text, id);  // First occurrence wins, as in SentencePiece.
    } else if (p.type == spm::PieceType::kByte) {
      unsigned value = 0;
      if (p.text.size() != 6 || std::sscanf(p.text.c_str(), "<0x%2X>", &value) != 1) {
        return invalid(absl::StrCat("byte piece ", id, " is '", p.text, "', expected <0xNN>"));
      }
      t->byte_ids_[value] = id;
    }
  }
  if (t->byte_fallback_) {
    for (int b = 0; b < 256; ++b) {
      if (t->byte_ids_[b] < 0)
        return invalid(absl::StrCat("byte_fallback but no piece for byte ", b));
    }
  }
  return t;
}

std::vector<int32_t> Tokenizer::Encode(absl::string_view text, bool add_bos) const {
  std::vector<int32_t> ids;
  if (add_bos && bos_id_ >= 0) ids.push_back(bos_id_);

  // Normalization: identity, optionally collapsing runs of spaces and trimming.
  std::string norm;
  norm.reserve(text.size() + 4);
  if (remove_extra_whitespaces_) {
    bool pending_space = false;
    for (char c : text) {
      if (c == ' ') {
        pending_space = !norm.empty();
        continue;
      }
      if (pending_space) norm.push_back(' ');
      pending_space = false;
      norm.push_back(c);
    }
  } else {
    norm.assign(text.data(), text.size());
  }
  if (norm.empty()) return ids;
  if (add_dummy_prefix_) norm.insert(norm.begin(), ' ');
  if (escape_whitespaces_) norm = absl::StrReplaceAll(norm, {{" ", kSpaceSymbol}});
  if (remove_extra_whitespaces_) {
    // SentencePiece trims trailing spaces after escaping, so a literal "▁" at the end goes too.
    const absl::string_view space = escape_whitespaces_ ? kSpaceSymbol : " ";
    while (norm.size() >= space.size() &&
           absl::string_view(norm).substr(norm.size() - space.size()) == space) {
      norm.resize(norm.size() - space.size());
    }
    if (norm.empty()) return ids;
  }

  // Symbols start as single characters (an invalid byte is a symbol of its own).
  struct Symbol {
    int prev, next;
    size_t start, len;
  };
  std::vector<Symbol> syms;
  for (size_t i = 0; i < norm.size();) {
    int len = Utf8Length(static_cast<uint8_t>(norm[i]));
    if (len == 0 || i + len > norm.size()) len = 1;
    for (int k = 1; k < len; ++k) {
      if (!IsContinuation(static_cast<uint8_t>(norm[i + k]))) len = 1;
    }
    const int idx = static_cast<int>(syms.size());
    syms.push_back({idx - 1, idx + 1, i, static_cast<size_t>(len)});
    i += len;
  }
  syms.back().next = -1;

  // BPE: repeatedly merge the adjacent pair whose concatenation is the best-scoring piece
  // (ties: leftmost), like SentencePiece's bpe_model.cc.
  struct Candidate {
    float score;
    int left, right;
    size_t len;  // Combined length when queued; stale if a side has changed since.
    bool operator<(const Candidate& o) const {
      if (score != o.score) return score < o.score;
      return left > o.left;
    }
  };
  std::priority_queue<Candidate> queue;
  auto try_pair = [&](int left, int right) {
    if (left < 0 || right < 0) return;
    const size_t len = syms[left].len + syms[right].len;
    auto it = mergeable_.find(std::string(norm.data() + syms[left].start, len));
    if (it == mergeable_.end()) return;
    queue.push({pieces_[it->second].score, left, right, len});
  };
  for (int i = 0; i + 1 < static_cast<int>(syms.size()); ++i) try_pair(i, i + 1);
  while (!queue.empty()) {
    const Candidate c = queue.top();
    queue.pop();
    Symbol& l = syms[c.left];
    if (l.len == 0 || l.next != c.right || syms[c.right].len == 0 ||
        l.len + syms[c.right].len != c.len) {
      continue;  // Stale.
    }
    Symbol& r = syms[c.right];
    l.len += r.len;
    l.next = r.next;
    if (r.next >= 0) syms[r.next].prev = c.left;
    r.len = 0;
    try_pair(l.prev, c.left);
    try_pair(c.left, l.next);
  }

  for (int i = 0; i >= 0; i = syms[i].next) {
    const std::string piece(norm.data() + syms[i].start, syms[i].len);
    auto it = mergeable_.find(piece);
    if (it != mergeable_.end()) {
      ids.push_back(it->second);
    } else if (byte_fallback_) {
      for (unsigned char b : piece) ids.push_back(byte_ids_[b]);
    } else if (ids.empty() || ids.back() != unk_id_) {
      ids.push_back(unk_id_);  // SentencePiece folds consecutive unknowns into one.
    }
  }
  return ids;
}

bool Tokenizer::IsControl(int32_t id) const {
  return id >= 0 && id < vocab_size() &&
         pieces_[id].type == static_cast<int>(spm::PieceType::kControl);
}

std::string Tokenizer::IdToPiece(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return "";
  return pieces_[id].text;
}

std::string Tokenizer::PieceBytes(int32_t id, bool first) const {
  if (id < 0 || id >= vocab_size()) return "";
  const Piece& p = pieces_[id];
  switch (static_cast<spm::PieceType>(p.type)) {
    case spm::PieceType::kControl:
      return "";
    case spm::PieceType::kUnknown:
      return unk_surface_;
    case spm::PieceType::kByte: {
      for (int b = 0; b < 256; ++b) {
        if (byte_ids_[b] == id) return std::string(1, static_cast<char>(b));
      }
      return "";
    }
    default: {
      absl::string_view text = p.text;
      if (first && (add_dummy_prefix_ || remove_extra_whitespaces_) &&
          text.substr(0, kSpaceSymbol.size()) == kSpaceSymbol) {
        text.remove_prefix(kSpaceSymbol.size());
      }
      return absl::StrReplaceAll(text, {{kSpaceSymbol, " "}});
    }
  }
}

std::string Tokenizer::Decode(absl::Span<const int32_t> ids) const {
  std::string bytes;
  bool first = true;
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size() || IsControl(id)) continue;
    bytes += PieceBytes(id, first);
    first = false;
  }
  std::string out;
  AppendValidUtf8(bytes, /*final=*/true, &out);
  return out;
}

IncrementalDetokenizer::IncrementalDetokenizer(const Tokenizer& tokenizer,
                                               absl::Span<const int32_t> prompt)
    : tokenizer_(tokenizer) {
  for (int32_t id : prompt) {
    if (id >= 0 && id < tokenizer.vocab_size() && !tokenizer.IsControl(id)) seen_text_ = true;
  }
}

std::string IncrementalDetokenizer::Push(int32_t id) {
  if (id < 0 || id >= tokenizer_.vocab_size() || tokenizer_.IsControl(id)) return "";
  pending_ += tokenizer_.PieceBytes(id, !seen_text_);
  seen_text_ = true;
  std::string out;
  pending_.erase(0, AppendValidUtf8(pending_, /*final=*/false, &out));
  return out;
}

std::string IncrementalDetokenizer::Finish() {
  std::string out;
  AppendValidUtf8(pending_, /*final=*/true, &out);
  pending_.clear();
  return out;
}

}  // namespace collm::runtime
