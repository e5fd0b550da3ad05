// The OpenAI-compatible HTTP API over any CompletionBackend (openai_backend.h):
//   POST /v1/completions, POST /v1/chat/completions (JSON, or server-sent events with
//   "stream": true ending in "data: [DONE]"), GET /v1/models, GET /v1/models/{id}, GET /health.
// Requests are validated here (wrong types and out-of-range values are 400s naming the field;
// unknown fields are ignored, as OpenAI does); errors use OpenAI's shape
// {"error": {"message", "type", "param", "code"}}. docs/openai_api.md lists what is supported.
#ifndef COLLM_SERVING_OPENAI_HTTP_SERVER_H_
#define COLLM_SERVING_OPENAI_HTTP_SERVER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "collm/serving/openai_backend.h"

namespace httplib {
class Server;
}

namespace collm::serving {

struct OpenAiHttpOptions {
  std::string address = "127.0.0.1:8000";  // host:port; port 0 = pick a free one.
  // Accepted bearer tokens (Authorization: Bearer KEY); empty = no authentication. /health is
  // always open (load balancers and HEALTHCHECKs probe it).
  std::vector<std::string> api_keys;
  int threads = 32;                  // Connections served at once (a stream holds one); > 0.
  int64_t max_body_bytes = 4 << 20;  // Larger request bodies get 413; > 0.
  double heartbeat_seconds = 1.0;    // Idle streams send an SSE comment this often, and
                                     // non-streaming answers not ready by then a space, which
                                     // is how a vanished client is noticed; > 0.
};

// Serves from its own threads until Stop() or destruction. The backend must outlive it.
// Thread-safe.
class OpenAiHttpServer {
 public:
  static absl::StatusOr<std::unique_ptr<OpenAiHttpServer>> Start(const OpenAiHttpOptions& options,
                                                                 CompletionBackend& backend);
  ~OpenAiHttpServer();
  int port() const { return port_; }
  // Stops listening and waits for the handlers (in-flight streams end when their requests do;
  // call after the backend finished or cancelled them). Idempotent.
  void Stop();

 private:
  OpenAiHttpServer() = default;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  int port_ = 0;
};

}  // namespace collm::serving

#endif  // COLLM_SERVING_OPENAI_HTTP_SERVER_H_
