#include "collm/engine/dataset.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iterator>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/string_view.h"
#include "collm/common/status.h"
#include "nlohmann/json.hpp"

namespace collm::engine {
namespace {

using Json = nlohmann::json;

constexpr size_t kMaxErrors = 20;
constexpr absl::string_view kPromptPlaceholder = "{prompt}";

// A run of rendered text that shares one loss-mask value.
struct Segment {
  std::string text;
  uint8_t mask = 0;
};

// Encodes run by run so the mask boundaries stay exact (see DatasetFormat).
TrainingExample Tokenize(const runtime::Tokenizer& tokenizer, const std::vector<Segment>& segments,
                         bool add_bos, bool add_eos) {
  TrainingExample example;
  if (add_bos && tokenizer.bos_id() >= 0) {
    example.tokens.push_back(tokenizer.bos_id());
    example.loss_mask.push_back(0);
  }
  for (const Segment& segment : segments) {
    std::vector<int32_t> ids = tokenizer.Encode(segment.text, /*add_bos=*/false);
    example.tokens.insert(example.tokens.end(), ids.begin(), ids.end());
    example.loss_mask.insert(example.loss_mask.end(), ids.size(), segment.mask);
  }
  if (add_eos && tokenizer.eos_id() >= 0) {
    example.tokens.push_back(tokenizer.eos_id());
    example.loss_mask.push_back(1);
  }
  return example;
}

// Returns true when it cut the example.
bool Truncate(TrainingExample& example, int64_t max_length) {
  if (static_cast<int64_t>(example.tokens.size()) <= max_length) return false;
  example.tokens.resize(max_length);
  example.loss_mask.resize(max_length);
  return true;
}

std::string ApplyTemplate(const std::string& prompt_template, const std::string& prompt) {
  return absl::StrReplaceAll(prompt_template, {{kPromptPlaceholder, prompt}});
}

bool Has(const Json& record, const std::string& field) {
  return !field.empty() && record.contains(field);
}

absl::Status WrongType(absl::string_view what, const Json& value) {
  return absl::InvalidArgumentError(
      absl::StrCat(what, " must be a string, got ", value.type_name()));
}

// The string field `field` of `record`, which the caller knows is present.
absl::StatusOr<std::string> StringField(const Json& record, const std::string& field) {
  const Json& value = record.at(field);
  if (!value.is_string()) return WrongType(absl::StrCat("field '", field, "'"), value);
  return value.get<std::string>();
}

absl::StatusOr<std::vector<Segment>> RenderChat(const Json& messages, const DatasetFormat& format) {
  if (!messages.is_array()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "field '", format.messages_field, "' must be an array, got ", messages.type_name()));
  }
  std::vector<Segment> segments;
  std::string context;  // Mask-0 text not yet emitted.
  for (size_t i = 0; i < messages.size(); ++i) {
    const Json& message = messages[i];
    const std::string where = absl::StrCat(format.messages_field, "[", i, "]");
    if (!message.is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, " must be an object, got ", message.type_name()));
    }
    auto role_it = message.find("role");
    auto content_it = message.find("content");
    if (role_it == message.end()) {
      return absl::InvalidArgumentError(absl::StrCat(where, " has no 'role'"));
    }
    if (content_it == message.end()) {
      return absl::InvalidArgumentError(absl::StrCat(where, " has no 'content'"));
    }
    if (!role_it->is_string()) return WrongType(absl::StrCat(where, ".role"), *role_it);
    if (!content_it->is_string()) return WrongType(absl::StrCat(where, ".content"), *content_it);
    const std::string& role = role_it->get_ref<const std::string&>();
    const std::string& content = content_it->get_ref<const std::string&>();
    if (role == "system") {
      absl::StrAppend(&context, format.system_prefix, content, format.turn_end);
    } else if (role == "user") {
      absl::StrAppend(&context, format.user_prefix, content, format.turn_end);
    } else if (role == "assistant") {
      absl::StrAppend(&context, format.assistant_prefix);
      segments.push_back({std::move(context), 0});
      context.clear();
      segments.push_back({absl::StrCat(content, format.turn_end), 1});
    } else {
      return absl::InvalidArgumentError(absl::StrCat(where, ".role '", role.substr(0, 40),
                                                     "' is not one of system, user, assistant"));
    }
  }
  // `context` left over = messages after the last assistant turn: no target, dropped.
  if (segments.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("field '", format.messages_field, "' has no assistant turn"));
  }
  return segments;
}

// Turns one record into an example (not yet truncated), or says why it is a bad record.
absl::StatusOr<TrainingExample> RecordToExample(const Json& record,
                                                const runtime::Tokenizer& tokenizer,
                                                const DatasetOptions& options) {
  const DatasetFormat& format = options.format;
  if (!record.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("expected a JSON object, got ", record.type_name()));
  }
  if (Has(record, format.messages_field)) {
    COLLM_ASSIGN_OR_RETURN(std::vector<Segment> segments,
                           RenderChat(record.at(format.messages_field), format));
    return Tokenize(tokenizer, segments, options.add_bos, options.add_eos);
  }
  const bool has_prompt = Has(record, format.prompt_field);
  const bool has_completion = Has(record, format.completion_field);
  if (has_prompt && has_completion) {
    COLLM_ASSIGN_OR_RETURN(std::string prompt, StringField(record, format.prompt_field));
    COLLM_ASSIGN_OR_RETURN(std::string completion, StringField(record, format.completion_field));
    if (Has(record, format.input_field)) {
      COLLM_ASSIGN_OR_RETURN(std::string input, StringField(record, format.input_field));
      if (!input.empty()) absl::StrAppend(&prompt, "\n", input);
    }
    std::vector<Segment> segments = {{ApplyTemplate(format.prompt_template, prompt), 0},
                                     {std::move(completion), 1}};
    return Tokenize(tokenizer, segments, options.add_bos, options.add_eos);
  }
  if (Has(record, format.text_field)) {
    COLLM_ASSIGN_OR_RETURN(std::string text, StringField(record, format.text_field));
    return Tokenize(tokenizer, {{std::move(text), 1}}, options.add_bos, options.add_eos);
  }
  if (has_prompt) {
    return absl::InvalidArgumentError(
        absl::StrCat("has '", format.prompt_field, "' but no '", format.completion_field, "'"));
  }
  if (has_completion) {
    return absl::InvalidArgumentError(
        absl::StrCat("has '", format.completion_field, "' but no '", format.prompt_field, "'"));
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "no usable field: expected '", format.messages_field, "', '", format.prompt_field, "' + '",
      format.completion_field, "', or '", format.text_field, "'"));
}

absl::Status ValidateOptions(const DatasetOptions& options) {
  const double f = options.held_out_fraction;
  if (!(f >= 0.0 && f < 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat("held_out_fraction must be in [0, 1), got ", f));
  }
  if (options.max_length < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_length must be >= 2, got ", options.max_length));
  }
  if (options.max_examples < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_examples must be >= 0, got ", options.max_examples));
  }
  if (!absl::StrContains(options.format.prompt_template, kPromptPlaceholder)) {
    return absl::InvalidArgumentError(
        absl::StrCat("format.prompt_template must contain \"{prompt}\", got \"",
                     options.format.prompt_template, "\""));
  }
  return absl::OkStatus();
}

// Accumulates examples and the report while records stream in.
class Loader {
 public:
  Loader(const std::string& path, const runtime::Tokenizer& tokenizer,
         const DatasetOptions& options, LoadReport& report)
      : path_(path), tokenizer_(tokenizer), options_(options), report_(report) {}

  bool Full() const {
    return options_.max_examples > 0 &&
           static_cast<int64_t>(examples_.size()) >= options_.max_examples;
  }

  // `where` is "LINE" or "element N".
  void Add(const Json& record, absl::string_view where) {
    ++report_.lines;
    absl::StatusOr<TrainingExample> example = RecordToExample(record, tokenizer_, options_);
    if (!example.ok()) {
      Error(where, example.status().message());
      return;
    }
    if (Truncate(*example, options_.max_length)) ++report_.truncated;
    if (example->num_targets() == 0) {
      ++report_.no_targets;
      return;
    }
    examples_.push_back(*std::move(example));
    ++report_.loaded;
  }

  void Error(absl::string_view where, absl::string_view what) {
    ++report_.skipped;
    if (report_.errors.size() < kMaxErrors) {
      report_.errors.push_back(absl::StrCat(path_, ":", where, ": ", what));
    }
  }

  std::vector<TrainingExample> TakeExamples() { return std::move(examples_); }

 private:
  const std::string& path_;
  const runtime::Tokenizer& tokenizer_;
  const DatasetOptions& options_;
  LoadReport& report_;
  std::vector<TrainingExample> examples_;
};

bool IsBlank(absl::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) {
    return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\f' || c == '\v';
  });
}

// Leading UTF-8 byte-order mark, which some editors write.
constexpr absl::string_view kUtf8Bom = "\xEF\xBB\xBF";

}  // namespace

int64_t TrainingExample::num_targets() const {
  return std::count_if(loss_mask.begin(), loss_mask.end(), [](uint8_t m) { return m != 0; });
}

absl::StatusOr<Dataset> Dataset::Load(const std::string& path, const runtime::Tokenizer& tokenizer,
                                      const DatasetOptions& options, LoadReport* report) {
  COLLM_RETURN_IF_ERROR(ValidateOptions(options));
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open dataset file ", path));

  LoadReport local_report;
  LoadReport& rep = report != nullptr ? *report : local_report;
  rep = LoadReport();
  Loader loader(path, tokenizer, options, rep);

  // Peek at the first non-blank character to pick JSON Lines or a JSON array.
  std::string first_line;
  std::vector<std::string> head;  // Lines read while peeking (all blank but the last).
  char first = '\0';
  while (std::getline(in, first_line)) {
    if (head.empty() && absl::string_view(first_line).substr(0, kUtf8Bom.size()) == kUtf8Bom) {
      first_line.erase(0, kUtf8Bom.size());
    }
    head.push_back(first_line);
    const size_t pos = first_line.find_first_not_of(" \t\r\n\f\v");
    if (pos != std::string::npos) {
      first = first_line[pos];
      break;
    }
  }

  if (first == '[') {
    std::string text;
    for (const std::string& line : head) absl::StrAppend(&text, line, "\n");
    text.append(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    if (in.bad()) return absl::DataLossError(absl::StrCat("error reading ", path));
    Json array = Json::parse(text, /*cb=*/nullptr, /*allow_exceptions=*/false);
    if (array.is_discarded() || !array.is_array()) {
      loader.Error("1", "starts with '[' but is not a valid JSON array");
    } else {
      for (size_t i = 0; i < array.size() && !loader.Full(); ++i) {
        loader.Add(array[i], absl::StrCat("element ", i));
      }
    }
  } else {
    int64_t line_number = 0;
    auto handle = [&](const std::string& line) {
      ++line_number;
      if (IsBlank(line)) return;
      Json record = Json::parse(line, /*cb=*/nullptr, /*allow_exceptions=*/false);
      if (record.is_discarded()) {
        ++rep.lines;
        loader.Error(absl::StrCat(line_number), "not valid JSON");
        return;
      }
      loader.Add(record, absl::StrCat(line_number));
    };
    for (const std::string& line : head) {
      if (loader.Full()) break;
      handle(line);
    }
    std::string line;
    while (!loader.Full() && std::getline(in, line)) handle(line);
    if (in.bad()) return absl::DataLossError(absl::StrCat("error reading ", path));
  }

  std::vector<TrainingExample> examples = loader.TakeExamples();
  if (examples.empty()) {
    std::string why = "no records";
    if (!rep.errors.empty()) {
      why = absl::StrCat(rep.skipped, " bad records, first: ", rep.errors.front());
    } else if (rep.no_targets > 0) {
      why = absl::StrCat(rep.no_targets, " records with no target token within max_length ",
                         options.max_length);
    }
    return absl::InvalidArgumentError(absl::StrCat("no usable example in ", path, ": ", why));
  }
  return FromExamples(std::move(examples), options.held_out_fraction, options.seed);
}

Dataset Dataset::FromExamples(std::vector<TrainingExample> examples, double held_out_fraction,
                              uint64_t seed) {
  if (!(held_out_fraction >= 0.0)) held_out_fraction = 0.0;  // Also NaN.
  if (held_out_fraction >= 1.0) held_out_fraction = std::nextafter(1.0, 0.0);
  const size_t n = examples.size();
  size_t num_held_out =
      static_cast<size_t>(std::llround(static_cast<double>(n) * held_out_fraction));
  if (held_out_fraction > 0.0 && n >= 2) num_held_out = std::max<size_t>(num_held_out, 1);
  if (n >= 1) num_held_out = std::min(num_held_out, n - 1);

  // Portable Fisher-Yates: the same seed gives the same split on every standard library. The
  // modulo bias is ~n / 2^64, negligible.
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  std::mt19937_64 rng(seed);
  for (size_t i = n; i > 1; --i) {
    const size_t j = static_cast<size_t>(rng() % i);
    std::swap(order[i - 1], order[j]);
  }
  std::vector<bool> held(n, false);
  for (size_t k = 0; k < num_held_out; ++k) held[order[k]] = true;

  Dataset dataset;
  dataset.held_out_.reserve(num_held_out);
  dataset.train_.reserve(n - num_held_out);
  for (size_t i = 0; i < n; ++i) {
    (held[i] ? dataset.held_out_ : dataset.train_).push_back(std::move(examples[i]));
  }
  return dataset;
}

TrainingExample MakeExample(const runtime::Tokenizer& tokenizer, const std::string& prompt,
                            const std::string& completion, const DatasetOptions& options) {
  std::vector<Segment> segments = {{ApplyTemplate(options.format.prompt_template, prompt), 0},
                                   {completion, 1}};
  TrainingExample example = Tokenize(tokenizer, segments, options.add_bos, options.add_eos);
  Truncate(example, std::max<int64_t>(options.max_length, 1));
  return example;
}

InteractionBuffer::InteractionBuffer(size_t capacity) : capacity_(std::max<size_t>(capacity, 1)) {}

void InteractionBuffer::Add(TrainingExample example) {
  std::lock_guard<std::mutex> lock(mu_);
  if (items_.size() >= capacity_) {
    items_.pop_front();
    ++dropped_;
  }
  items_.push_back(std::move(example));
  ++total_added_;
}

std::vector<TrainingExample> InteractionBuffer::Take(size_t max) {
  std::lock_guard<std::mutex> lock(mu_);
  const size_t n = std::min(max, items_.size());
  std::vector<TrainingExample> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(std::move(items_.front()));
    items_.pop_front();
  }
  return out;
}

size_t InteractionBuffer::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return items_.size();
}

int64_t InteractionBuffer::total_added() const {
  std::lock_guard<std::mutex> lock(mu_);
  return total_added_;
}

int64_t InteractionBuffer::dropped() const {
  std::lock_guard<std::mutex> lock(mu_);
  return dropped_;
}

}  // namespace collm::engine
