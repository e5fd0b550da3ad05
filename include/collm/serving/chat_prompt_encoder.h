// A conversation -> the prompt ids a chat model was trained on: the model's chat template
// (chat_template.h) rendered, then tokenized with its special-token strings as single ids. One
// implementation for both of collmd's doors: the OpenAI chat API (openai_engine_backend.h) and
// gRPC Generate's `chat` input (which collm-router's OpenAI API forwards).
#ifndef COLLM_SERVING_CHAT_PROMPT_ENCODER_H_
#define COLLM_SERVING_CHAT_PROMPT_ENCODER_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "collm/runtime/tokenizer.h"
#include "collm/serving/chat_template.h"

namespace collm::serving {

struct ChatPrompt {
  std::vector<int32_t> ids;
  std::vector<std::string> stop;  // The template's end-of-turn strings, to add to the request's.
};

// Immutable after construction; thread-safe. The tokenizer must outlive it.
class ChatPromptEncoder {
 public:
  // `chat_template` none: Encode refuses every conversation (the model has no template).
  ChatPromptEncoder(std::optional<ChatTemplate> chat_template, const runtime::Tokenizer& tokenizer);

  bool has_template() const { return template_.has_value(); }

  // FailedPrecondition without a template (naming http.chat_template, the key that sets one);
  // InvalidArgument from ChatTemplate::Render for a conversation the template cannot take.
  absl::StatusOr<ChatPrompt> Encode(const std::vector<ChatMessage>& messages) const;

  // The ids of already rendered text: special-token strings become their ids (when the vocabulary
  // has them, as HF tokenizers split special tokens before BPE), the text between them is encoded
  // without BOS.
  std::vector<int32_t> EncodeRendered(const std::string& rendered) const;

 private:
  std::optional<ChatTemplate> template_;
  const runtime::Tokenizer& tokenizer_;
  std::map<std::string, int32_t> special_ids_;  // Special-token string -> id.
};

}  // namespace collm::serving

#endif  // COLLM_SERVING_CHAT_PROMPT_ENCODER_H_
