// The chat renderers against the exact strings transformers' apply_chat_template(tokenize=False,
// add_generation_prompt=True) gives for each family's published template, and recognition of
// those templates from tokenizer_config.json.
#include <string>
#include <vector>

#include "collm/serving/chat_template.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "testing/test_env.h"

namespace collm::serving {
namespace {

using collm::testing::MakeTempDir;
using collm::testing::WriteFileOrDie;

const std::vector<ChatMessage> kConversation = {
    {"system", "You are terse."},
    {"user", "Hi there"},
    {"assistant", "Hello!"},
    {"user", "What is 2+2?"},
};

std::string Quoted(const char* text) { return nlohmann::json(text).dump(); }

std::string Render(ChatFamily family, const std::vector<ChatMessage>& messages = kConversation) {
  auto out = ChatTemplate(family).Render(messages);
  EXPECT_TRUE(out.ok()) << out.status();
  return out.ok() ? *out : "";
}

TEST(ChatTemplateTest, Llama2PutsTheSystemPromptInTheFirstInstBlock) {
  EXPECT_EQ(Render(ChatFamily::kLlama2),
            "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello! </s>"
            "<s>[INST] What is 2+2? [/INST]");
  // Content is stripped, as the template's .strip() does.
  EXPECT_EQ(Render(ChatFamily::kLlama2, {{"user", "  Hi  "}}), "<s>[INST] Hi [/INST]");
}

TEST(ChatTemplateTest, Llama3UsesHeadersAndEotAndOpensTheAssistantTurn) {
  EXPECT_EQ(Render(ChatFamily::kLlama3),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are "
            "terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi "
            "there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWhat is "
            "2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
}

TEST(ChatTemplateTest, ChatMlAndQwenDifferOnlyInTheDefaultSystemPrompt) {
  const std::string turns =
      "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
      "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n";
  EXPECT_EQ(Render(ChatFamily::kChatMl), "<|im_start|>system\nYou are terse.<|im_end|>\n" + turns);
  EXPECT_EQ(Render(ChatFamily::kQwen), "<|im_start|>system\nYou are terse.<|im_end|>\n" + turns);
  const std::vector<ChatMessage> no_system(kConversation.begin() + 1, kConversation.end());
  EXPECT_EQ(Render(ChatFamily::kChatMl, no_system), turns);
  EXPECT_EQ(Render(ChatFamily::kQwen, no_system),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + turns);
}

TEST(ChatTemplateTest, MistralHasNoSpaceBeforeTheAnswerAndFoldsTheSystemPrompt) {
  EXPECT_EQ(Render(ChatFamily::kMistral),
            "<s>[INST] You are terse.\n\nHi there [/INST]Hello!</s>[INST] What is 2+2? [/INST]");
}

TEST(ChatTemplateTest, ZephyrEndsEveryTurnWithEosAndANewline) {
  EXPECT_EQ(Render(ChatFamily::kZephyr),
            "<|system|>\nYou are terse.</s>\n<|user|>\nHi there</s>\n<|assistant|>\nHello!</s>\n"
            "<|user|>\nWhat is 2+2?</s>\n<|assistant|>\n");
}

TEST(ChatTemplateTest, TheModelsBosAndEosStringsAreUsed) {
  auto out = ChatTemplate(ChatFamily::kZephyr, "<s>", "<|endoftext|>").Render({{"user", "x"}});
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(*out, "<|user|>\nx<|endoftext|>\n<|assistant|>\n");
}

TEST(ChatTemplateTest, BadConversationsAreErrorsNamingTheMessage) {
  auto bad_role = ChatTemplate(ChatFamily::kChatMl).Render({{"user", "a"}, {"tool", "b"}});
  ASSERT_FALSE(bad_role.ok());
  EXPECT_NE(bad_role.status().message().find("messages[1].role"), std::string::npos)
      << bad_role.status();
  auto no_user = ChatTemplate(ChatFamily::kLlama3).Render({{"system", "a"}});
  EXPECT_FALSE(no_user.ok());
  auto not_alternating = ChatTemplate(ChatFamily::kLlama2).Render({{"user", "a"}, {"user", "b"}});
  ASSERT_FALSE(not_alternating.ok());
  EXPECT_NE(not_alternating.status().message().find("messages[1]"), std::string::npos);
  auto system_late = ChatTemplate(ChatFamily::kMistral)
                         .Render({{"user", "a"}, {"assistant", "b"}, {"system", "c"}});
  EXPECT_FALSE(system_late.ok());
}

// Excerpts of the templates as the models ship them.
constexpr const char* kLlama2Jinja =
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set "
    "system_message = messages[0]['content'] %}{% endif %}{% for message in loop_messages %}{% if "
    "loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + "
    "system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% endif %}{% if "
    "message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}";
constexpr const char* kLlama3Jinja =
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}";
constexpr const char* kQwenJinja =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
    "'<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>"
    "' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}";
constexpr const char* kChatMlJinja =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n'}}{% endfor %}";
constexpr const char* kMistralJinja =
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
    "message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ "
    "message['content'] + eos_token}}{% endif %}{% endfor %}";
constexpr const char* kZephyrJinja =
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + "
    "message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ "
    "'<|assistant|>\\n'  + message['content'] + eos_token }}\n{% endif %}\n{% endfor %}";

TEST(ChatTemplateTest, RecognizesEachFamilyByItsMarkers) {
  EXPECT_EQ(ChatTemplate::Recognize(kLlama2Jinja).value(), ChatFamily::kLlama2);
  EXPECT_EQ(ChatTemplate::Recognize(kLlama3Jinja).value(), ChatFamily::kLlama3);
  EXPECT_EQ(ChatTemplate::Recognize(kQwenJinja).value(), ChatFamily::kQwen);
  EXPECT_EQ(ChatTemplate::Recognize(kChatMlJinja).value(), ChatFamily::kChatMl);
  EXPECT_EQ(ChatTemplate::Recognize(kMistralJinja).value(), ChatFamily::kMistral);
  EXPECT_EQ(ChatTemplate::Recognize(kZephyrJinja).value(), ChatFamily::kZephyr);
  auto unknown = ChatTemplate::Recognize("{{ 'Human: ' + message['content'] }}");
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.status().message().find("http.chat_template"), std::string::npos);
}

TEST(ChatTemplateTest, ForModelReadsTokenizerConfigAndHonoursTheOverride) {
  const std::string dir = MakeTempDir("chat-template");
  // No tokenizer_config.json and no override: no template (chat is refused later, not at start).
  auto none = ChatTemplate::ForModel(dir, "");
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_FALSE(none->has_value());

  WriteFileOrDie(dir + "/tokenizer_config.json",
                 std::string(R"({"bos_token": {"content": "<s>", "lstrip": false},
                                 "eos_token": "</s>", "chat_template": )") +
                     Quoted(kZephyrJinja) + "}");
  auto zephyr = ChatTemplate::ForModel(dir, "");
  ASSERT_TRUE(zephyr.ok()) << zephyr.status();
  ASSERT_TRUE(zephyr->has_value());
  EXPECT_EQ((*zephyr)->family(), ChatFamily::kZephyr);
  EXPECT_EQ((*zephyr)->bos(), "<s>");

  auto forced = ChatTemplate::ForModel(dir, "chatml");
  ASSERT_TRUE(forced.ok());
  EXPECT_EQ((*forced)->family(), ChatFamily::kChatMl);
  auto bad_name = ChatTemplate::ForModel(dir, "vicuna");
  ASSERT_FALSE(bad_name.ok());
  EXPECT_NE(bad_name.status().message().find("http.chat_template"), std::string::npos);

  WriteFileOrDie(dir + "/tokenizer_config.json",
                 R"({"chat_template": "{{ 'Human: ' + message['content'] }}"})");
  auto unknown = ChatTemplate::ForModel(dir, "");
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.status().message().find("tokenizer_config.json"), std::string::npos);

  WriteFileOrDie(dir + "/tokenizer_config.json",
                 std::string(R"({"chat_template": [{"name": "tool_use", "template": "x"},
                                                   {"name": "default", "template": )") +
                     Quoted(kLlama3Jinja) + "}]}");
  auto listed = ChatTemplate::ForModel(dir, "");
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_EQ((*listed)->family(), ChatFamily::kLlama3);
  EXPECT_EQ((*listed)->bos(), "<|begin_of_text|>");
}

}  // namespace
}  // namespace collm::serving
