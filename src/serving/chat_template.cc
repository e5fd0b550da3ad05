#include "collm/serving/chat_template.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "nlohmann/json.hpp"

namespace collm::serving {
namespace {

constexpr const char* kQwenDefaultSystem = "You are a helpful assistant.";

// Python's str.strip() / Jinja's trim on the whitespace chat text contains.
std::string Strip(const std::string& s) { return std::string(absl::StripAsciiWhitespace(s)); }

absl::Status CheckRole(const ChatMessage& m, size_t index) {
  if (m.role == "system" || m.role == "user" || m.role == "assistant") return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "messages[", index, "].role must be system, user or assistant, got '", m.role, "'"));
}

// The [INST] families require user/assistant/user/... after an optional leading system message.
absl::Status CheckAlternates(const std::vector<ChatMessage>& messages, size_t first,
                             const char* family) {
  for (size_t i = first; i < messages.size(); ++i) {
    const bool want_user = (i - first) % 2 == 0;
    if ((messages[i].role == "user") != want_user || messages[i].role == "system") {
      return absl::InvalidArgumentError(absl::StrCat(
          "messages[", i, "].role is '", messages[i].role, "': the ", family,
          " chat template needs an optional system message first, then user and assistant "
          "messages alternating, starting with user"));
    }
  }
  return absl::OkStatus();
}

std::string TokenString(const nlohmann::json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string())
    return v["content"].get<std::string>();
  return "";
}

}  // namespace

const char* ChatFamilyName(ChatFamily family) {
  switch (family) {
    case ChatFamily::kLlama2:
      return "llama2";
    case ChatFamily::kLlama3:
      return "llama3";
    case ChatFamily::kChatMl:
      return "chatml";
    case ChatFamily::kQwen:
      return "qwen";
    case ChatFamily::kMistral:
      return "mistral";
    case ChatFamily::kZephyr:
      return "zephyr";
  }
  return "unknown";
}

absl::StatusOr<ChatFamily> ParseChatFamily(const std::string& name) {
  for (ChatFamily f : {ChatFamily::kLlama2, ChatFamily::kLlama3, ChatFamily::kChatMl,
                       ChatFamily::kQwen, ChatFamily::kMistral, ChatFamily::kZephyr}) {
    if (name == ChatFamilyName(f)) return f;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown chat template family '", name,
                   "': expected one of llama2, llama3, chatml, qwen, mistral, zephyr"));
}

ChatTemplate::ChatTemplate(ChatFamily family, std::string bos, std::string eos)
    : family_(family), bos_(std::move(bos)), eos_(std::move(eos)) {
  const bool llama3 = family == ChatFamily::kLlama3;
  const bool chatml = family == ChatFamily::kChatMl || family == ChatFamily::kQwen;
  if (bos_.empty() && !chatml) bos_ = llama3 ? "<|begin_of_text|>" : "<s>";
  if (eos_.empty()) eos_ = llama3 ? "<|eot_id|>" : chatml ? "<|im_end|>" : "</s>";
}

absl::StatusOr<ChatFamily> ChatTemplate::Recognize(const std::string& jinja) {
  // Most specific markers first: Llama 2's template also contains "[INST]".
  if (absl::StrContains(jinja, "<|start_header_id|>")) return ChatFamily::kLlama3;
  if (absl::StrContains(jinja, "<|im_start|>")) {
    return absl::StrContains(jinja, kQwenDefaultSystem) ? ChatFamily::kQwen : ChatFamily::kChatMl;
  }
  if (absl::StrContains(jinja, "<|user|>") && absl::StrContains(jinja, "<|assistant|>"))
    return ChatFamily::kZephyr;
  if (absl::StrContains(jinja, "[INST]")) {
    return absl::StrContains(jinja, "<<SYS>>") ? ChatFamily::kLlama2 : ChatFamily::kMistral;
  }
  return absl::InvalidArgumentError(
      "the chat_template is not one collm recognises (looked for the markers of Llama 3 "
      "<|start_header_id|>, ChatML/Qwen <|im_start|>, Zephyr <|user|>, Llama 2 [INST] <<SYS>>, "
      "Mistral [INST]); name the family in http.chat_template");
}

absl::StatusOr<std::optional<ChatTemplate>> ChatTemplate::ForModel(
    const std::string& model_dir, const std::string& family_override) {
  const std::string path = model_dir + "/tokenizer_config.json";
  nlohmann::json config = nlohmann::json::object();
  if (std::filesystem::exists(path)) {
    std::ifstream in(path);
    std::stringstream text;
    text << in.rdbuf();
    config = nlohmann::json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
    if (config.is_discarded() || !config.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
    }
  }
  const std::string bos = config.contains("bos_token") ? TokenString(config["bos_token"]) : "";
  const std::string eos = config.contains("eos_token") ? TokenString(config["eos_token"]) : "";
  if (!family_override.empty()) {
    auto family = ParseChatFamily(family_override);
    if (!family.ok())
      return absl::InvalidArgumentError(
          absl::StrCat("http.chat_template: ", family.status().message()));
    return ChatTemplate(*family, bos, eos);
  }
  if (!config.contains("chat_template") || config["chat_template"].is_null()) {
    return std::optional<ChatTemplate>();
  }
  const nlohmann::json& t = config["chat_template"];
  std::string jinja;
  if (t.is_string()) {
    jinja = t.get<std::string>();
  } else if (t.is_array()) {
    for (const auto& entry : t) {
      if (entry.is_object() && entry.value("name", "") == "default" && entry.contains("template") &&
          entry["template"].is_string()) {
        jinja = entry["template"].get<std::string>();
      }
    }
    if (jinja.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": chat_template is a list without a \"default\" template"));
    }
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": chat_template must be a string or a list of {name, template}"));
  }
  auto family = Recognize(jinja);
  if (!family.ok())
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", family.status().message()));
  return ChatTemplate(*family, bos, eos);
}

absl::StatusOr<std::string> ChatTemplate::Render(const std::vector<ChatMessage>& messages,
                                                 bool add_generation_prompt) const {
  bool has_user = false;
  for (size_t i = 0; i < messages.size(); ++i) {
    if (auto s = CheckRole(messages[i], i); !s.ok()) return s;
    has_user = has_user || messages[i].role == "user";
  }
  if (!has_user) return absl::InvalidArgumentError("messages must contain a user message");
  const bool leading_system = messages.front().role == "system";
  std::string out;
  switch (family_) {
    case ChatFamily::kLlama2: {
      const size_t first = leading_system ? 1 : 0;
      if (auto s = CheckAlternates(messages, first, "Llama 2"); !s.ok()) return s;
      for (size_t i = first; i < messages.size(); ++i) {
        std::string content = messages[i].content;
        if (i == first && leading_system) {
          content = absl::StrCat("<<SYS>>\n", messages[0].content, "\n<</SYS>>\n\n", content);
        }
        if (messages[i].role == "user") {
          absl::StrAppend(&out, bos_, "[INST] ", Strip(content), " [/INST]");
        } else {
          absl::StrAppend(&out, " ", Strip(content), " ", eos_);
        }
      }
      break;
    }
    case ChatFamily::kMistral: {
      // Mistral v0.1's template refuses a system message; like later Mistral templates, collm
      // puts it before the first user message instead of failing OpenAI clients that send one.
      const size_t first = leading_system ? 1 : 0;
      if (auto s = CheckAlternates(messages, first, "Mistral"); !s.ok()) return s;
      out = bos_;
      for (size_t i = first; i < messages.size(); ++i) {
        if (messages[i].role == "user") {
          const std::string content =
              i == first && leading_system
                  ? absl::StrCat(messages[0].content, "\n\n", messages[i].content)
                  : messages[i].content;
          absl::StrAppend(&out, "[INST] ", content, " [/INST]");
        } else {
          absl::StrAppend(&out, messages[i].content, eos_);
        }
      }
      break;
    }
    case ChatFamily::kLlama3:
      for (size_t i = 0; i < messages.size(); ++i) {
        absl::StrAppend(&out, i == 0 ? bos_ : "", "<|start_header_id|>", messages[i].role,
                        "<|end_header_id|>\n\n", Strip(messages[i].content), "<|eot_id|>");
      }
      if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      break;
    case ChatFamily::kChatMl:
    case ChatFamily::kQwen:
      if (family_ == ChatFamily::kQwen && !leading_system) {
        absl::StrAppend(&out, "<|im_start|>system\n", kQwenDefaultSystem, "<|im_end|>\n");
      }
      for (const ChatMessage& m : messages) {
        absl::StrAppend(&out, "<|im_start|>", m.role, "\n", m.content, "<|im_end|>\n");
      }
      if (add_generation_prompt) out += "<|im_start|>assistant\n";
      break;
    case ChatFamily::kZephyr:
      for (const ChatMessage& m : messages) {
        absl::StrAppend(&out, "<|", m.role, "|>\n", m.content, eos_, "\n");
      }
      if (add_generation_prompt) out += "<|assistant|>\n";
      break;
  }
  return out;
}

std::vector<std::string> ChatTemplate::SpecialTokens() const {
  std::vector<std::string> tokens;
  if (!bos_.empty()) tokens.push_back(bos_);
  tokens.push_back(eos_);
  switch (family_) {
    case ChatFamily::kLlama3:
      for (const char* t : {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"})
        tokens.push_back(t);
      break;
    case ChatFamily::kChatMl:
    case ChatFamily::kQwen:
      tokens.push_back("<|im_start|>");
      tokens.push_back("<|im_end|>");
      break;
    default:
      break;
  }
  std::sort(tokens.begin(), tokens.end());
  tokens.erase(std::unique(tokens.begin(), tokens.end()), tokens.end());
  return tokens;
}

std::vector<std::string> ChatTemplate::StopStrings() const {
  switch (family_) {
    case ChatFamily::kLlama3:
      return {"<|eot_id|>"};
    case ChatFamily::kChatMl:
    case ChatFamily::kQwen:
      return {"<|im_end|>"};
    default:
      return {};
  }
}

}  // namespace collm::serving
