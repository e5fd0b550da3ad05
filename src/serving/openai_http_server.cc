#include "collm/serving/openai_http_server.h"

#include <httplib.h>

#include <chrono>
#include <condition_variable>
#include <ctime>
#include <exception>
#include <mutex>
#include <random>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "collm/common/logging.h"
#include "collm/common/secret.h"
#include "nlohmann/json.hpp"

namespace collm::serving {
namespace {

using nlohmann::json;

// An error as OpenAI reports it: HTTP status + {"error": {message, type, param, code}}.
struct ApiError {
  int http_status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;  // "" = null.
  std::string code;   // "" = null.
};

ApiError BadField(const std::string& param, const std::string& message) {
  return ApiError{400, message, "invalid_request_error", param, ""};
}

json ErrorJson(const ApiError& e) {
  json error = {{"message", e.message},
                {"type", e.type},
                {"param", e.param.empty() ? json(nullptr) : json(e.param)},
                {"code", e.code.empty() ? json(nullptr) : json(e.code)}};
  return json{{"error", std::move(error)}};
}

void SendError(httplib::Response& res, const ApiError& e) {
  res.status = e.http_status;
  res.set_content(ErrorJson(e).dump(), "application/json");
}

// Backend statuses -> HTTP. Validation messages start with the field they name.
ApiError FromStatus(const absl::Status& s, const std::string& fallback_param = "") {
  const std::string message(s.message());
  switch (s.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange: {
      std::string param = fallback_param;
      const size_t end = message.find_first_of(" [.");
      for (const char* field : {"prompt", "messages", "max_tokens", "stop", "temperature", "top_p",
                                "top_k", "min_p", "seed", "model"}) {
        if (message.substr(0, end) == field) param = field;
      }
      return ApiError{400, message, "invalid_request_error", param, ""};
    }
    case absl::StatusCode::kFailedPrecondition:
      return ApiError{400, message, "invalid_request_error", fallback_param, ""};
    case absl::StatusCode::kNotFound:
      return ApiError{404, message, "invalid_request_error", "model", "model_not_found"};
    case absl::StatusCode::kResourceExhausted:
      return ApiError{429, message, "rate_limit_error", "", "queue_full"};
    case absl::StatusCode::kUnavailable:
      return ApiError{503, message, "service_unavailable", "", "not_ready"};
    case absl::StatusCode::kDeadlineExceeded:
      return ApiError{504, message, "timeout", "", ""};
    case absl::StatusCode::kCancelled:
      return ApiError{503, message, "service_unavailable", "", "cancelled"};
    default:
      return ApiError{500, message, "server_error", "", ""};
  }
}

std::string RandomId(const char* prefix) {
  static thread_local std::mt19937_64 rng(std::random_device{}() ^
                                          static_cast<uint64_t>(std::time(nullptr)));
  static const char kHex[] = "0123456789abcdef";
  std::string id = prefix;
  for (int i = 0; i < 24; ++i) id += kHex[rng() % 16];
  return id;
}

// --- Request parsing: one helper per JSON type, each naming the field it rejects -------------

using FieldResult = std::optional<ApiError>;  // nullopt = fine.

FieldResult OptionalNumber(const json& body, const char* key, std::optional<double>* out) {
  if (!body.contains(key) || body[key].is_null()) return std::nullopt;
  if (!body[key].is_number()) return BadField(key, absl::StrCat(key, " must be a number"));
  *out = body[key].get<double>();
  return std::nullopt;
}

FieldResult OptionalInteger(const json& body, const char* key, std::optional<int64_t>* out) {
  if (!body.contains(key) || body[key].is_null()) return std::nullopt;
  const json& v = body[key];
  if (v.is_number_integer()) {
    *out = v.get<int64_t>();
    return std::nullopt;
  }
  // 16.0 is an integer to JavaScript clients.
  if (v.is_number_float() &&
      v.get<double>() == static_cast<double>(static_cast<int64_t>(v.get<double>()))) {
    *out = static_cast<int64_t>(v.get<double>());
    return std::nullopt;
  }
  return BadField(key, absl::StrCat(key, " must be an integer"));
}

FieldResult OptionalBool(const json& body, const char* key, bool* out) {
  if (!body.contains(key) || body[key].is_null()) return std::nullopt;
  if (!body[key].is_boolean()) return BadField(key, absl::StrCat(key, " must be a boolean"));
  *out = body[key].get<bool>();
  return std::nullopt;
}

// Fields collm does not implement are refused when set to something that changes the result,
// rather than silently ignored.
FieldResult Unsupported(const json& body) {
  auto set = [&](const char* key) { return body.contains(key) && !body[key].is_null(); };
  if (set("n")) {
    if (!body["n"].is_number_integer()) return BadField("n", "n must be an integer");
    if (body["n"].get<int64_t>() != 1)
      return BadField("n", "n must be 1: collm generates one choice per request");
  }
  if (set("best_of") && !(body["best_of"].is_number_integer() && body["best_of"] == 1))
    return BadField("best_of", "best_of must be 1: collm generates one choice per request");
  if (set("echo") && !(body["echo"].is_boolean() && !body["echo"].get<bool>()))
    return BadField("echo", "echo is not supported");
  if (set("logprobs") && !(body["logprobs"].is_boolean() && !body["logprobs"].get<bool>()))
    return BadField("logprobs", "logprobs is not supported");
  if (set("top_logprobs")) return BadField("top_logprobs", "top_logprobs is not supported");
  for (const char* key : {"presence_penalty", "frequency_penalty"}) {
    if (set(key) && !(body[key].is_number() && body[key].get<double>() == 0.0)) {
      return BadField(key, absl::StrCat(key, " is not supported (only 0); use repetition_penalty"));
    }
  }
  for (const char* key : {"tools", "functions"}) {
    if (set(key) && !(body[key].is_array() && body[key].empty()))
      return BadField(key, absl::StrCat(key, " (function calling) is not supported"));
  }
  if (set("response_format")) {
    const json& f = body["response_format"];
    if (!(f.is_object() && f.value("type", "") == "text"))
      return BadField("response_format", "response_format: only {\"type\": \"text\"} is supported");
  }
  return std::nullopt;
}

// The fields both endpoints share. `stream`/`include_usage` come back separately.
FieldResult ParseCommon(const json& body, bool chat, CompletionRequest* req, bool* stream,
                        bool* include_usage) {
  if (auto e = Unsupported(body)) return e;
  if (body.contains("model") && !body["model"].is_null()) {
    if (!body["model"].is_string()) return BadField("model", "model must be a string");
    req->model = body["model"].get<std::string>();
  }
  std::optional<int64_t> max_tokens;
  if (auto e = OptionalInteger(body, "max_tokens", &max_tokens)) return e;
  if (chat && !max_tokens) {
    if (auto e = OptionalInteger(body, "max_completion_tokens", &max_tokens)) return e;
  }
  if (max_tokens && (*max_tokens <= 0 || *max_tokens > (1 << 30))) {
    return BadField(body.contains("max_tokens") ? "max_tokens" : "max_completion_tokens",
                    absl::StrCat("max_tokens must be > 0, got ", *max_tokens));
  }
  req->max_tokens = max_tokens;
  if (auto e = OptionalNumber(body, "temperature", &req->temperature)) return e;
  if (req->temperature && (*req->temperature < 0 || *req->temperature > 2))
    return BadField("temperature",
                    absl::StrCat("temperature must be in [0, 2], got ", *req->temperature));
  if (auto e = OptionalNumber(body, "top_p", &req->top_p)) return e;
  if (req->top_p && (*req->top_p <= 0 || *req->top_p > 1))
    return BadField("top_p", absl::StrCat("top_p must be in (0, 1], got ", *req->top_p));
  if (auto e = OptionalInteger(body, "top_k", &req->top_k)) return e;
  // -1 is "off" in vLLM's API.
  if (req->top_k && *req->top_k == -1) req->top_k = 0;
  if (req->top_k && *req->top_k < 0)
    return BadField("top_k", absl::StrCat("top_k must be >= 0 (or -1), got ", *req->top_k));
  if (auto e = OptionalNumber(body, "min_p", &req->min_p)) return e;
  if (req->min_p && (*req->min_p < 0 || *req->min_p >= 1))
    return BadField("min_p", absl::StrCat("min_p must be in [0, 1), got ", *req->min_p));
  if (auto e = OptionalNumber(body, "repetition_penalty", &req->repetition_penalty)) return e;
  if (req->repetition_penalty && *req->repetition_penalty <= 0)
    return BadField("repetition_penalty",
                    absl::StrCat("repetition_penalty must be > 0, got ", *req->repetition_penalty));
  std::optional<int64_t> seed;
  if (auto e = OptionalInteger(body, "seed", &seed)) return e;
  if (seed) req->seed = static_cast<uint64_t>(*seed);
  if (auto e = OptionalBool(body, "ignore_eos", &req->ignore_eos)) return e;
  if (body.contains("stop") && !body["stop"].is_null()) {
    const json& stop = body["stop"];
    if (stop.is_string()) {
      req->stop.push_back(stop.get<std::string>());
    } else if (stop.is_array()) {
      for (size_t i = 0; i < stop.size(); ++i) {
        if (!stop[i].is_string())
          return BadField("stop", absl::StrCat("stop[", i, "] must be a string"));
        req->stop.push_back(stop[i].get<std::string>());
      }
    } else {
      return BadField("stop", "stop must be a string or an array of strings");
    }
    for (size_t i = 0; i < req->stop.size(); ++i) {
      if (req->stop[i].empty()) return BadField("stop", absl::StrCat("stop[", i, "] is empty"));
    }
  }
  if (auto e = OptionalBool(body, "stream", stream)) return e;
  if (body.contains("stream_options") && !body["stream_options"].is_null()) {
    const json& o = body["stream_options"];
    if (!o.is_object()) return BadField("stream_options", "stream_options must be an object");
    if (auto e = OptionalBool(o, "include_usage", include_usage)) {
      e->param = "stream_options.include_usage";
      e->message = "stream_options.include_usage must be a boolean";
      return e;
    }
  }
  return std::nullopt;
}

FieldResult ParsePrompt(const json& body, CompletionRequest* req) {
  if (!body.contains("prompt") || body["prompt"].is_null())
    return BadField("prompt", "prompt is required");
  const json& p = body["prompt"];
  if (p.is_string()) {
    req->prompt = p.get<std::string>();
  } else if (p.is_array() && p.size() == 1 && p[0].is_string()) {
    req->prompt = p[0].get<std::string>();
  } else if (p.is_array() && !p.empty() && p[0].is_string()) {
    return BadField("prompt",
                    "prompt: one prompt per request (an array of several is not "
                    "supported)");
  } else if (p.is_array()) {
    return BadField("prompt", "prompt must be a string (token-id prompts are not supported)");
  } else {
    return BadField("prompt", "prompt must be a string");
  }
  if (req->prompt.empty()) return BadField("prompt", "prompt is empty");
  return std::nullopt;
}

FieldResult ParseMessages(const json& body, CompletionRequest* req) {
  if (!body.contains("messages") || !body["messages"].is_array())
    return BadField("messages", "messages must be an array of {role, content}");
  const json& messages = body["messages"];
  if (messages.empty()) return BadField("messages", "messages is empty");
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string at = absl::StrCat("messages[", i, "]");
    const json& m = messages[i];
    if (!m.is_object()) return BadField(at, absl::StrCat(at, " must be an object"));
    if (!m.contains("role") || !m["role"].is_string())
      return BadField(at + ".role", absl::StrCat(at, ".role must be a string"));
    ChatMessage message;
    message.role = m["role"].get<std::string>();
    if (message.role == "developer") message.role = "system";  // OpenAI's newer name.
    if (message.role != "system" && message.role != "user" && message.role != "assistant") {
      return BadField(at + ".role", absl::StrCat(at,
                                                 ".role must be system, user or assistant, "
                                                 "got '",
                                                 message.role, "'"));
    }
    const json content = m.contains("content") ? m["content"] : json(nullptr);
    if (content.is_string()) {
      message.content = content.get<std::string>();
    } else if (content.is_array()) {
      for (size_t j = 0; j < content.size(); ++j) {
        const json& part = content[j];
        if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
            !part["text"].is_string()) {
          return BadField(absl::StrCat(at, ".content[", j, "]"),
                          absl::StrCat(at, ".content[", j,
                                       "] must be {\"type\": \"text\", \"text\": string} (only "
                                       "text parts are supported)"));
        }
        message.content += part["text"].get<std::string>();
      }
    } else if (!(content.is_null() && message.role == "assistant")) {
      return BadField(at + ".content",
                      absl::StrCat(at, ".content must be a string or an array of text parts"));
    }
    req->messages.push_back(std::move(message));
  }
  req->chat = true;
  return std::nullopt;
}

// --- Output -------------------------------------------------------------------------------

json UsageJson(const CompletionResult& r) {
  return json{{"prompt_tokens", r.prompt_tokens},
              {"completion_tokens", r.completion_tokens},
              {"total_tokens", r.prompt_tokens + r.completion_tokens}};
}

// What one request's output looks like on the wire (ids, object names, chunk shapes).
struct ResponseShape {
  bool chat = false;
  std::string id;
  int64_t created = 0;
  std::string model;

  json Envelope(bool chunk) const {
    const char* object =
        chat ? (chunk ? "chat.completion.chunk" : "chat.completion") : "text_completion";
    return json{{"id", id}, {"object", object}, {"created", created}, {"model", model}};
  }
  json Full(const std::string& text, const CompletionResult& r) const {
    json out = Envelope(false);
    json choice = {{"index", 0}, {"logprobs", nullptr}, {"finish_reason", r.finish_reason}};
    if (chat) {
      choice["message"] = {{"role", "assistant"}, {"content", text}};
    } else {
      choice["text"] = text;
    }
    out["choices"] = json::array({std::move(choice)});
    out["usage"] = UsageJson(r);
    return out;
  }
  // A content chunk (finish_reason null) or, with `finish`, the last choice chunk.
  json Chunk(const std::string& text, const char* finish, bool role, bool include_usage) const {
    json out = Envelope(true);
    json choice = {{"index", 0},
                   {"logprobs", nullptr},
                   {"finish_reason", finish == nullptr ? json(nullptr) : json(finish)}};
    if (chat) {
      json delta = json::object();
      if (role) delta["role"] = "assistant";
      if (!text.empty() || role) delta["content"] = text;
      choice["delta"] = std::move(delta);
    } else {
      choice["text"] = text;
    }
    out["choices"] = json::array({std::move(choice)});
    if (include_usage) out["usage"] = nullptr;
    return out;
  }
  json UsageChunk(const CompletionResult& r) const {
    json out = Envelope(true);
    out["choices"] = json::array();
    out["usage"] = UsageJson(r);
    return out;
  }
};

// Where a request's output waits for the HTTP thread that writes it. The backend may keep the
// sink after the HTTP side is gone; the state then just fills up and is dropped.
struct OutputQueue {
  std::mutex mu;
  std::condition_variable ready;
  std::string text;         // Guarded by mu: not yet written.
  bool done = false;        // Guarded by mu.
  CompletionResult result;  // Guarded by mu; valid when done.
};

class QueueSink final : public CompletionSink {
 public:
  explicit QueueSink(std::shared_ptr<OutputQueue> queue) : queue_(std::move(queue)) {}
  void OnText(const std::string& text) override {
    if (text.empty()) return;
    {
      std::lock_guard<std::mutex> lock(queue_->mu);
      queue_->text += text;
    }
    queue_->ready.notify_all();
  }
  void OnFinish(const CompletionResult& result) override {
    {
      std::lock_guard<std::mutex> lock(queue_->mu);
      queue_->done = true;
      queue_->result = result;
    }
    queue_->ready.notify_all();
  }

 private:
  const std::shared_ptr<OutputQueue> queue_;
};

std::string Sse(const json& payload) { return absl::StrCat("data: ", payload.dump(), "\n\n"); }

class Handlers {
 public:
  Handlers(const OpenAiHttpOptions& options, CompletionBackend& backend)
      : options_(options), backend_(backend) {}

  bool Authorized(const httplib::Request& req, httplib::Response& res) const {
    if (options_.api_keys.empty()) return true;
    const std::string header = req.get_header_value("Authorization");
    constexpr absl::string_view kBearer = "Bearer ";
    if (absl::StartsWithIgnoreCase(header, kBearer)) {
      const std::string key = header.substr(kBearer.size());
      for (const std::string& k : options_.api_keys) {
        if (SameSecret(k, key)) return true;
      }
    }
    SendError(res, ApiError{401,
                            header.empty() ? "missing API key: send Authorization: Bearer KEY"
                                           : "incorrect API key provided",
                            "authentication_error", "", "invalid_api_key"});
    return false;
  }

  void Health(const httplib::Request&, httplib::Response& res) const {
    const absl::Status ready = backend_.Ready();
    if (ready.ok()) {
      res.set_content(R"({"status":"ok"})", "application/json");
    } else {
      SendError(res, FromStatus(ready));
    }
  }

  void Models(const httplib::Request& req, httplib::Response& res) const {
    if (!Authorized(req, res)) return;
    json data = json::array();
    for (const ModelInfo& m : backend_.Models()) data.push_back(ModelJson(m));
    res.set_content(json{{"object", "list"}, {"data", std::move(data)}}.dump(), "application/json");
  }

  void Model(const httplib::Request& req, httplib::Response& res) const {
    if (!Authorized(req, res)) return;
    const std::string id = req.matches[1];
    for (const ModelInfo& m : backend_.Models()) {
      if (m.id == id) {
        res.set_content(ModelJson(m).dump(), "application/json");
        return;
      }
    }
    SendError(res, ApiError{404, absl::StrCat("the model '", id, "' does not exist"),
                            "invalid_request_error", "model", "model_not_found"});
  }

  void Generate(const httplib::Request& http, httplib::Response& res, bool chat) {
    if (!Authorized(http, res)) return;
    json body = json::parse(http.body, nullptr, /*allow_exceptions=*/false);
    if (body.is_discarded()) {
      return SendError(res, ApiError{400, "the request body is not valid JSON",
                                     "invalid_request_error", "", ""});
    }
    if (!body.is_object()) {
      return SendError(res, ApiError{400, "the request body must be a JSON object",
                                     "invalid_request_error", "", ""});
    }
    CompletionRequest req;
    bool stream = false;
    bool include_usage = false;
    FieldResult bad = chat ? ParseMessages(body, &req) : ParsePrompt(body, &req);
    if (!bad) bad = ParseCommon(body, chat, &req, &stream, &include_usage);
    if (bad) return SendError(res, *bad);

    ResponseShape shape;
    shape.chat = chat;
    shape.id = RandomId(chat ? "chatcmpl-" : "cmpl-");
    shape.created = static_cast<int64_t>(std::time(nullptr));
    shape.model = req.model;
    auto queue = std::make_shared<OutputQueue>();
    absl::StatusOr<uint64_t> id =
        backend_.Submit(std::move(req), std::make_shared<QueueSink>(queue));
    if (!id.ok()) return SendError(res, FromStatus(id.status(), chat ? "messages" : "prompt"));
    if (!stream) return Complete(queue, shape, *id, res);
    Stream(queue, shape, include_usage, *id, res);
  }

 private:
  static json ModelJson(const ModelInfo& m) {
    json out = {
        {"id", m.id}, {"object", "model"}, {"created", m.created}, {"owned_by", m.owned_by}};
    if (m.adapter) {
      out["parent"] = m.parent;
      out["version"] = m.version;
      out["source"] = m.source;
    } else {
      out["parent"] = nullptr;
    }
    return out;
  }

  // Non-streaming. A result ready within one heartbeat is answered whole (errors with their own
  // status). A longer one is answered 200 at once, as chunked JSON led by one space per heartbeat
  // (JSON allows leading whitespace): httplib 0.11 tells a handler nothing about a client that
  // left, but a failed write does, and then the request is cancelled as a vanished stream's is.
  // An error after that point is the body's {"error": ...} under the 200.
  void Complete(std::shared_ptr<OutputQueue> queue, ResponseShape shape, uint64_t id,
                httplib::Response& res) {
    const auto heartbeat = std::chrono::duration<double>(options_.heartbeat_seconds);
    {
      std::unique_lock<std::mutex> lock(queue->mu);
      if (queue->ready.wait_for(lock, heartbeat, [&] { return queue->done; })) {
        if (!queue->result.status.ok()) return SendError(res, FromStatus(queue->result.status));
        if (!queue->result.model.empty()) shape.model = queue->result.model;
        res.set_content(shape.Full(queue->text, queue->result).dump(), "application/json");
        return;
      }
    }
    auto finished = std::make_shared<bool>(false);
    res.set_chunked_content_provider(
        "application/json",
        [queue, shape, heartbeat, finished](size_t, httplib::DataSink& sink) mutable {
          std::string out = " ";
          {
            std::unique_lock<std::mutex> lock(queue->mu);
            if (queue->ready.wait_for(lock, heartbeat, [&] { return queue->done; })) {
              if (!queue->result.model.empty()) shape.model = queue->result.model;
              out = queue->result.status.ok() ? shape.Full(queue->text, queue->result).dump()
                                              : ErrorJson(FromStatus(queue->result.status)).dump();
              *finished = true;
            }
          }
          if (!sink.write(out.data(), out.size())) return false;
          if (*finished) sink.done();
          return true;
        },
        [this, id, finished](bool) {
          if (!*finished) backend_.Cancel(id);
        });
  }

  void Stream(std::shared_ptr<OutputQueue> queue, ResponseShape shape, bool include_usage,
              uint64_t id, httplib::Response& res) {
    struct Progress {
      bool started = false;
      bool finished = false;
    };
    auto progress = std::make_shared<Progress>();
    const auto heartbeat = std::chrono::duration<double>(options_.heartbeat_seconds);
    res.set_header("Cache-Control", "no-cache");
    res.set_header("X-Accel-Buffering", "no");
    res.set_chunked_content_provider(
        "text/event-stream",
        [queue, shape, include_usage, progress, heartbeat](size_t,
                                                           httplib::DataSink& sink) mutable {
          std::string text;
          bool done = false;
          CompletionResult result;
          {
            std::unique_lock<std::mutex> lock(queue->mu);
            queue->ready.wait_for(lock, heartbeat,
                                  [&] { return queue->done || !queue->text.empty(); });
            text = std::move(queue->text);
            queue->text.clear();
            done = queue->done;
            if (done) result = queue->result;
          }
          if (!result.model.empty()) shape.model = result.model;
          std::string out;
          if (!progress->started && shape.chat) {
            out += Sse(shape.Chunk("", nullptr, /*role=*/true, include_usage));
          }
          progress->started = true;
          if (!text.empty()) out += Sse(shape.Chunk(text, nullptr, false, include_usage));
          if (done) {
            if (result.status.ok()) {
              out += Sse(shape.Chunk("", result.finish_reason.c_str(), false, include_usage));
              if (include_usage) out += Sse(shape.UsageChunk(result));
            } else {
              out += Sse(ErrorJson(FromStatus(result.status)));
            }
            out += "data: [DONE]\n\n";
          }
          // An SSE comment keeps proxies from timing out and finds clients that went away.
          if (out.empty()) out = ": keep-alive\n\n";
          if (!sink.write(out.data(), out.size())) return false;
          if (done) {
            progress->finished = true;
            sink.done();
          }
          return true;
        },
        [this, id, progress](bool) {
          // A stream that ended before the request did lost its client.
          if (!progress->finished) backend_.Cancel(id);
        });
  }

  const OpenAiHttpOptions options_;
  CompletionBackend& backend_;
};

// Handlers must not throw into httplib (it would answer 500 without our error shape).
template <typename Fn>
httplib::Server::Handler Guarded(const char* what, Fn fn) {
  return [what, fn](const httplib::Request& req, httplib::Response& res) {
    try {
      fn(req, res);
    } catch (const std::exception& e) {
      COLLM_LOG_ERROR("{} failed: {}", what, e.what());
      SendError(res, ApiError{500, absl::StrCat(what, ": ", e.what()), "server_error", "", ""});
    }
  };
}

}  // namespace

absl::StatusOr<std::unique_ptr<OpenAiHttpServer>> OpenAiHttpServer::Start(
    const OpenAiHttpOptions& options, CompletionBackend& backend) {
  const size_t colon = options.address.rfind(':');
  int port = -1;
  if (colon == std::string::npos || !absl::SimpleAtoi(options.address.substr(colon + 1), &port) ||
      port < 0 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("http.address must be host:port, got '", options.address, "'"));
  }
  if (options.threads <= 0)
    return absl::InvalidArgumentError(
        absl::StrCat("http.threads must be > 0, got ", options.threads));
  const std::string host = options.address.substr(0, colon);
  std::unique_ptr<OpenAiHttpServer> s(new OpenAiHttpServer());
  s->server_ = std::make_unique<httplib::Server>();
  httplib::Server& server = *s->server_;
  const int threads = options.threads;
  server.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  server.set_payload_max_length(static_cast<size_t>(options.max_body_bytes));
  auto handlers = std::make_shared<Handlers>(options, backend);
  server.Get("/health", Guarded("GET /health", [handlers](const auto& req, auto& res) {
               handlers->Health(req, res);
             }));
  server.Get("/v1/models", Guarded("GET /v1/models", [handlers](const auto& req, auto& res) {
               handlers->Models(req, res);
             }));
  server.Get(R"(/v1/models/(.+))",
             Guarded("GET /v1/models/{id}",
                     [handlers](const auto& req, auto& res) { handlers->Model(req, res); }));
  server.Post("/v1/completions",
              Guarded("POST /v1/completions", [handlers](const auto& req, auto& res) {
                handlers->Generate(req, res, /*chat=*/false);
              }));
  server.Post("/v1/chat/completions",
              Guarded("POST /v1/chat/completions", [handlers](const auto& req, auto& res) {
                handlers->Generate(req, res, /*chat=*/true);
              }));
  // Unknown paths, 413s and the like in the same error shape as everything else.
  server.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    ApiError e{res.status, absl::StrCat(req.method, " ", req.path, ": HTTP ", res.status),
               res.status == 404 ? "not_found_error" : "invalid_request_error", "", ""};
    if (res.status == 404)
      e.message = absl::StrCat("no such endpoint: ", req.method, " ", req.path);
    if (res.status == 413) e.message = "the request body is too large";
    SendError(res, e);
  });
  s->port_ =
      port == 0 ? server.bind_to_any_port(host) : (server.bind_to_port(host, port) ? port : -1);
  if (s->port_ <= 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen for the OpenAI API on ", options.address));
  }
  s->thread_ = std::thread([&server] { server.listen_after_bind(); });
  return s;
}

OpenAiHttpServer::~OpenAiHttpServer() { Stop(); }

void OpenAiHttpServer::Stop() {
  if (server_) server_->stop();
  if (thread_.joinable()) thread_.join();
}

}  // namespace collm::serving
