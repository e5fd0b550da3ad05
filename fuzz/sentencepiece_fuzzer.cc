// A serialized SentencePiece ModelProto (tokenizer.model): parse; an accepted model must encode
// and decode text, including bytes that are not UTF-8.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "collm/runtime/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto tokenizer = collm::runtime::Tokenizer::FromSerializedProto(
      std::string(reinterpret_cast<const char*>(data), size), "fuzz.model");
  if (!tokenizer.ok()) return 0;
  for (const char* text : {"Hello world, 12 + 30 = 42.", " \xff\xfe caf\xc3\xa9 \xe2\x82", ""}) {
    std::vector<int32_t> ids = (*tokenizer)->Encode(text, true);
    ids.push_back(-1);
    ids.push_back((*tokenizer)->vocab_size() + 7);
    (void)(*tokenizer)->Decode(ids);
  }
  return 0;
}
