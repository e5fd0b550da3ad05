// Chat templates: turning an OpenAI-style conversation into the prompt text a chat model was
// trained on. Hugging Face models ship a Jinja `chat_template` in tokenizer_config.json; collm
// does not run Jinja. It recognises the template's family by its content and renders the family
// with a C++ renderer whose output equals what transformers' apply_chat_template(tokenize=False)
// gives for that template. Unknown templates are an error, never a silent fallback.
#ifndef COLLM_SERVING_CHAT_TEMPLATE_H_
#define COLLM_SERVING_CHAT_TEMPLATE_H_

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace collm::serving {

enum class ChatFamily {
  kLlama2,   // <s>[INST] <<SYS>>\n...\n<</SYS>>\n\nuser [/INST] assistant </s>
  kLlama3,   // <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>
  kChatMl,   // <|im_start|>role\ncontent<|im_end|>\n (no default system prompt)
  kQwen,     // ChatML with Qwen's default system prompt "You are a helpful assistant."
  kMistral,  // <s>[INST] user [/INST]assistant</s> (Mistral-7B-Instruct v0.1)
  kZephyr,   // <|user|>\ncontent</s>\n (Zephyr, TinyLlama-Chat)
};

// "llama2", "llama3", "chatml", "qwen", "mistral", "zephyr".
const char* ChatFamilyName(ChatFamily family);
// The inverse of ChatFamilyName; InvalidArgument listing the names otherwise.
absl::StatusOr<ChatFamily> ParseChatFamily(const std::string& name);

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant".
  std::string content;
};

// One family's renderer with the model's BOS/EOS strings. Immutable; thread-safe.
class ChatTemplate {
 public:
  // `bos`/`eos` as tokenizer_config.json names them ("<s>", "</s>"); "" = the family's usual.
  ChatTemplate(ChatFamily family, std::string bos = "", std::string eos = "");

  // Recognises the family of a Jinja chat template by its markers. InvalidArgument naming the
  // markers looked for when none matches.
  static absl::StatusOr<ChatFamily> Recognize(const std::string& jinja);

  // The chat template of the model in `model_dir`: the family named by `family_override` when
  // non-empty, else recognised from tokenizer_config.json's chat_template (a string, or a list of
  // {name, template} where "default" is used). std::nullopt when the model has no template and no
  // override was given. Errors: unreadable/bad JSON, unknown family name, unrecognised template.
  static absl::StatusOr<std::optional<ChatTemplate>> ForModel(const std::string& model_dir,
                                                              const std::string& family_override);

  ChatFamily family() const { return family_; }
  const std::string& bos() const { return bos_; }
  const std::string& eos() const { return eos_; }

  // The prompt for `messages`, ending with the assistant turn's opening when
  // `add_generation_prompt` (families whose template has none ignore it, as HF does).
  // InvalidArgument for an unknown role, no user message, or roles that do not alternate where
  // the family's template requires it (the message names the index).
  absl::StatusOr<std::string> Render(const std::vector<ChatMessage>& messages,
                                     bool add_generation_prompt = true) const;

  // Special-token strings the rendered text contains (BOS, EOS, turn markers): encode them as one
  // token each when the vocabulary has them, not as text.
  std::vector<std::string> SpecialTokens() const;
  // Strings that end an assistant turn besides EOS (e.g. "<|im_end|>"): generation stops there.
  std::vector<std::string> StopStrings() const;

 private:
  ChatFamily family_;
  std::string bos_;
  std::string eos_;
};

}  // namespace collm::serving

#endif  // COLLM_SERVING_CHAT_TEMPLATE_H_
