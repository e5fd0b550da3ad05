// Includes the SentencePiece headers next to Abseil.
//
// Debian's libsentencepiece 0.1.x declares `namespace absl { using std::string_view; }` in its
// public header, which collides with Abseil's own `absl::string_view` class (Debian builds Abseil
// with ABSL_OPTION_USE_STD_STRING_VIEW=0). Renaming the namespace while the header is parsed keeps
// the library's signatures on std::string_view (so they still link) and leaves Abseil untouched.
// Include this instead of <sentencepiece_*.h>, and only from .cc files.
#ifndef COLLM_SRC_RUNTIME_SENTENCEPIECE_SHIM_H_
#define COLLM_SRC_RUNTIME_SENTENCEPIECE_SHIM_H_

#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#define absl collm_sentencepiece_absl
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>
#undef absl

#endif  // COLLM_SRC_RUNTIME_SENTENCEPIECE_SHIM_H_
