// Test fixture: the tiny random Llama (runtime::TinyLlamaConfig) written to a temp dir once per
// test binary and shared read-only by all tests in it.
#ifndef COLLM_TESTING_TINY_MODEL_H_
#define COLLM_TESTING_TINY_MODEL_H_

#include <string>

#include "collm/runtime/random_model.h"

namespace collm::testing {

// Directory of the shared tiny model (config.json, model.safetensors, tokenizer.model). Written on
// first use; fails the calling test if it cannot be written.
const std::string& TinyModelDir();

// Writes a fresh random model with `options` into a new temp dir and returns it.
std::string WriteModelToTempDir(const runtime::RandomModelOptions& options);

}  // namespace collm::testing

#endif  // COLLM_TESTING_TINY_MODEL_H_
