// HTTP the way operators and the OpenAI-API tests call it: the real curl binary (and npm for the
// official client), through /bin/sh. For tests of collmd's and collm-router's HTTP endpoints.
#ifndef COLLM_TESTING_CURL_H_
#define COLLM_TESTING_CURL_H_

#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "testing/subprocess.h"

namespace collm::testing {

// `s` as one single-quoted shell word.
std::string ShellQuote(const std::string& s);

// curl -sS against 127.0.0.1:`port``path`, with "Authorization: Bearer `api_key`" unless empty;
// `out` is the body, a newline and the HTTP status (split it with BodyAndStatus).
ProcessResult CurlGet(int port, const std::string& path, const std::string& api_key = "");
// The same as a JSON POST of `json_body`; `flags` go to curl as they are (e.g. "-N").
ProcessResult CurlPost(int port, const std::string& path, const std::string& json_body,
                       const std::string& api_key = "", const std::string& flags = "");
// Body and HTTP status of a CurlGet/CurlPost output (status 0 when there is none).
std::pair<std::string, int> BodyAndStatus(const std::string& out);

// The payloads of the `data: ` events of a server-sent event stream, in order (comments skipped).
std::vector<std::string> SseData(const std::string& body);

// `npm install PACKAGE` into `dir` (bounded to 180 s). Unavailable with npm's output when it
// fails (no registry reachable), so a test can skip.
absl::Status NpmInstall(const std::string& dir, const std::string& package);

// Runs tests/testing/openai_stream_chat.mjs with the official `openai` client (NpmInstall'ed into
// `dir`) against http://127.0.0.1:`port`/v1: expects a streamed chat completion of `model` (text
// in >= 2 chunks, a finish reason, usage, `model` first in /v1/models) and a 404 for a model that
// does not exist. For the OpenAI API tests of collmd and collm-router.
void ExpectOpenAiClientStreamsAChat(const std::string& dir, int port, const std::string& model);

}  // namespace collm::testing

#endif  // COLLM_TESTING_CURL_H_
