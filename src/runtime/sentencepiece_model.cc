#include "sentencepiece_model.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "collm/common/status.h"

namespace collm::runtime::spm {
namespace {

// Field numbers from sentencepiece_model.proto.
constexpr int kModelPieces = 1, kModelTrainerSpec = 2, kModelNormalizerSpec = 3;
constexpr int kPieceText = 1, kPieceScore = 2, kPieceType = 3;
constexpr int kTrainerModelType = 3, kTrainerVocabSize = 4, kTrainerByteFallback = 35,
              kTrainerUnkId = 40, kTrainerUnkSurface = 44, kTrainerBosId = 41, kTrainerEosId = 42,
              kTrainerPadId = 43;
constexpr int kNormName = 1, kNormCharsmap = 2, kNormDummyPrefix = 3, kNormRemoveExtraWs = 4,
              kNormEscapeWs = 5;

class Reader {
 public:
  explicit Reader(absl::string_view data) : data_(data) {}
  bool done() const { return pos_ >= data_.size(); }

  absl::Status Varint(uint64_t* out) {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos_ >= data_.size()) return absl::InvalidArgumentError("truncated varint");
      const uint8_t b = static_cast<uint8_t>(data_[pos_++]);
      v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if ((b & 0x80) == 0) {
        *out = v;
        return absl::OkStatus();
      }
    }
    return absl::InvalidArgumentError("varint longer than 10 bytes");
  }

  // Reads the next field key; wire type in *wire.
  absl::Status Key(int* field, int* wire) {
    uint64_t key = 0;
    COLLM_RETURN_IF_ERROR(Varint(&key));
    *field = static_cast<int>(key >> 3);
    *wire = static_cast<int>(key & 7);
    if (*field == 0) return absl::InvalidArgumentError("field number 0");
    return absl::OkStatus();
  }

  absl::Status Bytes(absl::string_view* out) {
    uint64_t n = 0;
    COLLM_RETURN_IF_ERROR(Varint(&n));
    if (n > data_.size() - pos_) return absl::InvalidArgumentError("length past the end of data");
    *out = data_.substr(pos_, n);
    pos_ += n;
    return absl::OkStatus();
  }

  absl::Status Fixed32(uint32_t* out) {
    if (data_.size() - pos_ < 4) return absl::InvalidArgumentError("truncated fixed32");
    std::memcpy(out, data_.data() + pos_, 4);
    pos_ += 4;
    return absl::OkStatus();
  }

  absl::Status Skip(int wire) {
    uint64_t v = 0;
    absl::string_view s;
    uint32_t f = 0;
    switch (wire) {
      case 0:
        return Varint(&v);
      case 1:
        if (data_.size() - pos_ < 8) return absl::InvalidArgumentError("truncated fixed64");
        pos_ += 8;
        return absl::OkStatus();
      case 2:
        return Bytes(&s);
      case 5:
        return Fixed32(&f);
      default:
        return absl::InvalidArgumentError(absl::StrCat("unsupported wire type ", wire));
    }
  }

 private:
  absl::string_view data_;
  size_t pos_ = 0;
};

absl::Status ExpectWire(int field, int wire, int want) {
  if (wire != want) {
    return absl::InvalidArgumentError(
        absl::StrCat("field ", field, " has wire type ", wire, ", expected ", want));
  }
  return absl::OkStatus();
}

absl::Status ParsePiece(absl::string_view data, Piece* piece) {
  Reader r(data);
  while (!r.done()) {
    int field, wire;
    COLLM_RETURN_IF_ERROR(r.Key(&field, &wire));
    if (field == kPieceText) {
      COLLM_RETURN_IF_ERROR(ExpectWire(field, wire, 2));
      absl::string_view s;
      COLLM_RETURN_IF_ERROR(r.Bytes(&s));
      piece->text = std::string(s);
    } else if (field == kPieceScore) {
      COLLM_RETURN_IF_ERROR(ExpectWire(field, wire, 5));
      uint32_t bits = 0;
      COLLM_RETURN_IF_ERROR(r.Fixed32(&bits));
      std::memcpy(&piece->score, &bits, 4);
    } else if (field == kPieceType) {
      COLLM_RETURN_IF_ERROR(ExpectWire(field, wire, 0));
      uint64_t t = 0;
      COLLM_RETURN_IF_ERROR(r.Varint(&t));
      if (t < 1 || t > 6) return absl::InvalidArgumentError(absl::StrCat("piece type ", t));
      piece->type = static_cast<PieceType>(t);
    } else {
      COLLM_RETURN_IF_ERROR(r.Skip(wire));
    }
  }
  return absl::OkStatus();
}

absl::Status ReadBool(Reader& r, int field, int wire, bool* out) {
  COLLM_RETURN_IF_ERROR(ExpectWire(field, wire, 0));
  uint64_t v = 0;
  COLLM_RETURN_IF_ERROR(r.Varint(&v));
  *out = v != 0;
  return absl::OkStatus();
}

absl::Status ReadInt32(Reader& r, int field, int wire, int32_t* out) {
  COLLM_RETURN_IF_ERROR(ExpectWire(field, wire, 0));
  uint64_t v = 0;
  COLLM_RETURN_IF_ERROR(r.Varint(&v));
  *out = static_cast<int32_t>(static_cast<int64_t>(v));  // Negative int32 are 10-byte varints.
  return absl::OkStatus();
}

absl::Status ParseTrainerSpec(absl::string_view data, ModelProto* m) {
  Reader r(data);
  while (!r.done()) {
    int field, wire;
    COLLM_RETURN_IF_ERROR(r.Key(&field, &wire));
    switch (field) {
      case kTrainerModelType: {
        int32_t v;
        COLLM_RETURN_IF_ERROR(ReadInt32(r, field, wire, &v));
        m->model_type = v;
        break;
      }
      case kTrainerByteFallback:
        COLLM_RETURN_IF_ERROR(ReadBool(r, field, wire, &m->byte_fallback));
        break;
      case kTrainerUnkId:
        COLLM_RETURN_IF_ERROR(ReadInt32(r, field, wire, &m->unk_id));
        break;
      case kTrainerBosId:
        COLLM_RETURN_IF_ERROR(ReadInt32(r, field, wire, &m->bos_id));
        break;
      case kTrainerEosId:
        COLLM_RETURN_IF_ERROR(ReadInt32(r, field, wire, &m->eos_id));
        break;
      case kTrainerPadId:
        COLLM_RETURN_IF_ERROR(ReadInt32(r, field, wire, &m->pad_id));
        break;
      case kTrainerUnkSurface: {
        COLLM_RETURN_IF_ERROR(ExpectWire(field, wire, 2));
        absl::string_view s;
        COLLM_RETURN_IF_ERROR(r.Bytes(&s));
        m->unk_surface = std::string(s);
        break;
      }
      default:
        COLLM_RETURN_IF_ERROR(r.Skip(wire));
    }
  }
  return absl::OkStatus();
}

absl::Status ParseNormalizerSpec(absl::string_view data, ModelProto* m) {
  Reader r(data);
  while (!r.done()) {
    int field, wire;
    COLLM_RETURN_IF_ERROR(r.Key(&field, &wire));
    absl::string_view s;
    switch (field) {
      case kNormName:
        COLLM_RETURN_IF_ERROR(ExpectWire(field, wire, 2));
        COLLM_RETURN_IF_ERROR(r.Bytes(&s));
        m->normalizer_name = std::string(s);
        break;
      case kNormCharsmap:
        COLLM_RETURN_IF_ERROR(ExpectWire(field, wire, 2));
        COLLM_RETURN_IF_ERROR(r.Bytes(&s));
        m->has_precompiled_charsmap = !s.empty();
        break;
      case kNormDummyPrefix:
        COLLM_RETURN_IF_ERROR(ReadBool(r, field, wire, &m->add_dummy_prefix));
        break;
      case kNormRemoveExtraWs:
        COLLM_RETURN_IF_ERROR(ReadBool(r, field, wire, &m->remove_extra_whitespaces));
        break;
      case kNormEscapeWs:
        COLLM_RETURN_IF_ERROR(ReadBool(r, field, wire, &m->escape_whitespaces));
        break;
      default:
        COLLM_RETURN_IF_ERROR(r.Skip(wire));
    }
  }
  return absl::OkStatus();
}

void PutVarint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}
void PutKey(std::string& out, int field, int wire) {
  PutVarint(out, (uint64_t(field) << 3) | wire);
}
void PutBytes(std::string& out, int field, absl::string_view s) {
  PutKey(out, field, 2);
  PutVarint(out, s.size());
  out.append(s.data(), s.size());
}
void PutInt(std::string& out, int field, int64_t v) {
  PutKey(out, field, 0);
  PutVarint(out, static_cast<uint64_t>(v));
}

}  // namespace

absl::StatusOr<ModelProto> ParseModelProto(absl::string_view bytes) {
  ModelProto m;
  Reader r(bytes);
  while (!r.done()) {
    int field, wire;
    COLLM_RETURN_IF_ERROR(r.Key(&field, &wire));
    absl::string_view s;
    if (field == kModelPieces || field == kModelTrainerSpec || field == kModelNormalizerSpec) {
      COLLM_RETURN_IF_ERROR(ExpectWire(field, wire, 2));
      COLLM_RETURN_IF_ERROR(r.Bytes(&s));
    }
    if (field == kModelPieces) {
      Piece p;
      COLLM_RETURN_IF_ERROR(Annotate(ParsePiece(s, &p), absl::StrCat("piece ", m.pieces.size())));
      m.pieces.push_back(std::move(p));
    } else if (field == kModelTrainerSpec) {
      COLLM_RETURN_IF_ERROR(Annotate(ParseTrainerSpec(s, &m), "trainer_spec"));
    } else if (field == kModelNormalizerSpec) {
      COLLM_RETURN_IF_ERROR(Annotate(ParseNormalizerSpec(s, &m), "normalizer_spec"));
    } else {
      COLLM_RETURN_IF_ERROR(r.Skip(wire));
    }
  }
  return m;
}

std::string SerializeModelProto(const ModelProto& m) {
  std::string out;
  for (const Piece& p : m.pieces) {
    std::string piece;
    PutBytes(piece, kPieceText, p.text);
    PutKey(piece, kPieceScore, 5);
    uint32_t bits = 0;
    std::memcpy(&bits, &p.score, 4);
    for (int i = 0; i < 4; ++i) piece.push_back(static_cast<char>((bits >> (8 * i)) & 0xff));
    PutInt(piece, kPieceType, static_cast<int>(p.type));
    PutBytes(out, kModelPieces, piece);
  }
  std::string trainer;
  PutInt(trainer, kTrainerModelType, m.model_type);
  PutInt(trainer, kTrainerVocabSize, static_cast<int64_t>(m.pieces.size()));
  PutInt(trainer, kTrainerByteFallback, m.byte_fallback ? 1 : 0);
  PutInt(trainer, kTrainerUnkId, m.unk_id);
  PutInt(trainer, kTrainerBosId, m.bos_id);
  PutInt(trainer, kTrainerEosId, m.eos_id);
  PutInt(trainer, kTrainerPadId, m.pad_id);
  PutBytes(out, kModelTrainerSpec, trainer);
  std::string norm;
  PutBytes(norm, kNormName, m.normalizer_name);
  PutInt(norm, kNormDummyPrefix, m.add_dummy_prefix ? 1 : 0);
  PutInt(norm, kNormRemoveExtraWs, m.remove_extra_whitespaces ? 1 : 0);
  PutInt(norm, kNormEscapeWs, m.escape_whitespaces ? 1 : 0);
  PutBytes(out, kModelNormalizerSpec, norm);
  return out;
}

}  // namespace collm::runtime::spm
