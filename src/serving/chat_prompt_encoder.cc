#include "collm/serving/chat_prompt_encoder.h"

#include <set>
#include <utility>

namespace collm::serving {

ChatPromptEncoder::ChatPromptEncoder(std::optional<ChatTemplate> chat_template,
                                     const runtime::Tokenizer& tokenizer)
    : template_(std::move(chat_template)), tokenizer_(tokenizer) {
  if (!template_) return;
  const std::vector<std::string> wanted = template_->SpecialTokens();
  const std::set<std::string> wanted_set(wanted.begin(), wanted.end());
  for (int32_t id = 0; id < tokenizer_.vocab_size(); ++id) {
    const std::string piece = tokenizer_.IdToPiece(id);
    if (wanted_set.count(piece) > 0 && special_ids_.count(piece) == 0) special_ids_[piece] = id;
  }
}

absl::StatusOr<ChatPrompt> ChatPromptEncoder::Encode(
    const std::vector<ChatMessage>& messages) const {
  if (!template_) {
    return absl::FailedPreconditionError(
        "this model has no chat template (tokenizer_config.json has no chat_template): set "
        "http.chat_template in the collmd config, or use /v1/completions");
  }
  absl::StatusOr<std::string> rendered = template_->Render(messages);
  if (!rendered.ok()) return rendered.status();
  ChatPrompt out;
  out.ids = EncodeRendered(*rendered);
  out.stop = template_->StopStrings();
  return out;
}

std::vector<int32_t> ChatPromptEncoder::EncodeRendered(const std::string& rendered) const {
  std::vector<int32_t> ids;
  size_t pos = 0;
  while (pos < rendered.size()) {
    // The earliest special token from here (the longest when several start at one place).
    size_t best = std::string::npos;
    const std::pair<const std::string, int32_t>* hit = nullptr;
    for (const auto& entry : special_ids_) {
      const size_t at = rendered.find(entry.first, pos);
      if (at == std::string::npos) continue;
      if (at < best || (at == best && entry.first.size() > hit->first.size())) {
        best = at;
        hit = &entry;
      }
    }
    const size_t text_end = hit == nullptr ? rendered.size() : best;
    if (text_end > pos) {
      const std::vector<int32_t> text = tokenizer_.Encode(
          absl::string_view(rendered).substr(pos, text_end - pos), /*add_bos=*/false);
      ids.insert(ids.end(), text.begin(), text.end());
    }
    if (hit == nullptr) break;
    ids.push_back(hit->second);
    pos = best + hit->first.size();
  }
  return ids;
}

}  // namespace collm::serving
