// Reading and writing SentencePiece `ModelProto` files (tokenizer.model) with a small protobuf
// wire-format codec. Private to the runtime.
//
// Why not libsentencepiece: Debian's build bundles protobuf-lite 3.14 and exports its symbols,
// which clash with the system libprotobuf 3.21 that libtorch and gRPC load into the same process
// (the process aborts at start-up). Llama-family tokenizers only need the BPE encoder, so collm
// implements it; tests compare it with the real SentencePiece (python3-sentencepiece).
#ifndef COLLM_SRC_RUNTIME_SENTENCEPIECE_MODEL_H_
#define COLLM_SRC_RUNTIME_SENTENCEPIECE_MODEL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace collm::runtime::spm {

// SentencePiece::Type values.
enum class PieceType : int {
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6
};

struct Piece {
  std::string text;
  float score = 0;
  PieceType type = PieceType::kNormal;
};

struct ModelProto {
  std::vector<Piece> pieces;
  // TrainerSpec
  int model_type = 1;  // 1 unigram, 2 BPE, 3 word, 4 char.
  bool byte_fallback = false;
  int32_t unk_id = 0, bos_id = 1, eos_id = 2, pad_id = -1;
  std::string unk_surface = " \xE2\x81\x87 ";  // Text an <unk> decodes to (" ⁇ ").
  // NormalizerSpec
  std::string normalizer_name;
  bool has_precompiled_charsmap = false;
  bool add_dummy_prefix = true;
  bool remove_extra_whitespaces = true;
  bool escape_whitespaces = true;
};

// Parses a serialized ModelProto. Untrusted: truncated or malformed input is InvalidArgument.
absl::StatusOr<ModelProto> ParseModelProto(absl::string_view bytes);
// Serializes the fields above (enough for SentencePiece itself to load the result).
std::string SerializeModelProto(const ModelProto& model);

}  // namespace collm::runtime::spm

#endif  // COLLM_SRC_RUNTIME_SENTENCEPIECE_MODEL_H_
