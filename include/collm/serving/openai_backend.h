// What the OpenAI-compatible HTTP layer (openai_http_server.h) needs from whatever generates:
// collmd implements it on its Engine (openai_engine_backend.h); a router can implement it by
// forwarding to devices. Plain structs and absl::Status, no HTTP, JSON or engine types, so the
// HTTP layer is reused as is over a different backend.
#ifndef COLLM_SERVING_OPENAI_BACKEND_H_
#define COLLM_SERVING_OPENAI_BACKEND_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "collm/serving/chat_template.h"

namespace collm::serving {

// One validated OpenAI request (completion or chat), fields as the client sent them; unset
// optionals take the backend's defaults.
struct CompletionRequest {
  std::string model;  // An id from Models(); "" = the backend's default.
  bool chat = false;
  std::string prompt;                 // When !chat.
  std::vector<ChatMessage> messages;  // When chat.
  std::optional<int64_t> max_tokens;
  std::optional<double> temperature;
  std::optional<double> top_p;
  std::optional<int64_t> top_k;  // Extensions vLLM and llama.cpp accept too.
  std::optional<double> min_p;
  std::optional<double> repetition_penalty;
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  bool ignore_eos = false;
};

struct CompletionResult {
  // OK; else why the request failed after it was accepted (Cancelled, DeadlineExceeded, ...).
  absl::Status status;
  std::string finish_reason = "length";  // "stop" (EOS or a stop string) or "length".
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  std::string model;  // The id that served it (adapter name or base id).
  int64_t adapter_version = 0;
};

// Receives one request's output. Called from a backend thread; must not block.
class CompletionSink {
 public:
  virtual ~CompletionSink() = default;
  virtual void OnText(const std::string& text) = 0;           // Final text, UTF-8 complete.
  virtual void OnFinish(const CompletionResult& result) = 0;  // Exactly once, last.
};

struct ModelInfo {
  std::string id;
  std::string owned_by = "collm";
  int64_t created = 0;  // Unix seconds.
  bool adapter = false;
  int64_t version = 0;  // Adapter version (0 for the base model).
  std::string parent;   // The base model's id, for adapters.
  std::string source;   // Where an adapter came from.
};

// Thread-safe: the HTTP server calls it from its worker threads.
class CompletionBackend {
 public:
  virtual ~CompletionBackend() = default;
  virtual std::vector<ModelInfo> Models() const = 0;
  // OK when requests are accepted; Unavailable (with why) while starting or draining.
  virtual absl::Status Ready() const = 0;
  // Starts generating. Errors before anything ran: InvalidArgument naming the field (400),
  // NotFound for an unknown model (404), ResourceExhausted when the queue is full (429),
  // Unavailable when not accepting (503), FailedPrecondition for what this backend cannot do
  // (e.g. chat without a template; 400). On OK the sink receives the output; returns an id for
  // Cancel.
  virtual absl::StatusOr<uint64_t> Submit(CompletionRequest request,
                                          std::shared_ptr<CompletionSink> sink) = 0;
  // The request finishes soon with Cancelled (the client went away). Unknown ids are ignored.
  virtual void Cancel(uint64_t id) = 0;
};

}  // namespace collm::serving

#endif  // COLLM_SERVING_OPENAI_BACKEND_H_
