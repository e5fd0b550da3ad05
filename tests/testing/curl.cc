#include "testing/curl.h"

#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "testing/test_env.h"

namespace collm::testing {
namespace {

std::string Curl(int port, const std::string& path, const std::string& api_key,
                 const std::string& flags) {
  std::string cmd = "curl -sS --max-time 120 " + flags + " -w '\\n%{http_code}'";
  if (!api_key.empty()) cmd += " -H " + ShellQuote("Authorization: Bearer " + api_key);
  return cmd + " " + ShellQuote(absl::StrCat("http://127.0.0.1:", port, path));
}

}  // namespace

std::string ShellQuote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

ProcessResult CurlGet(int port, const std::string& path, const std::string& api_key) {
  return RunCommand(Curl(port, path, api_key, ""));
}

ProcessResult CurlPost(int port, const std::string& path, const std::string& json_body,
                       const std::string& api_key, const std::string& flags) {
  return RunCommand(
      Curl(port, path, api_key,
           flags + " -H 'Content-Type: application/json' -d " + ShellQuote(json_body)));
}

std::pair<std::string, int> BodyAndStatus(const std::string& out) {
  const size_t nl = out.rfind('\n');
  if (nl == std::string::npos) return {out, 0};
  return {out.substr(0, nl), std::atoi(out.substr(nl + 1).c_str())};
}

std::vector<std::string> SseData(const std::string& body) {
  std::vector<std::string> events;
  size_t pos = 0;
  while (pos < body.size()) {
    size_t end = body.find("\n\n", pos);
    if (end == std::string::npos) end = body.size();
    const std::string event = body.substr(pos, end - pos);
    if (event.rfind("data: ", 0) == 0) events.push_back(event.substr(6));
    pos = end + 2;
  }
  return events;
}

absl::Status NpmInstall(const std::string& dir, const std::string& package) {
  const ProcessResult r = RunCommand("cd " + ShellQuote(dir) +
                                     " && timeout 180 npm install --no-audit --no-fund --silent " +
                                     ShellQuote(package) + " 2>&1");
  if (r.exit_code == 0) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat("npm install ", package,
                                             " failed (registry "
                                             "unreachable?): ",
                                             r.out, r.err));
}

void ExpectOpenAiClientStreamsAChat(const std::string& dir, int port, const std::string& model) {
  using nlohmann::json;
  WriteFileOrDie(dir + "/chat.mjs",
                 ReadFileOrDie(COLLM_SOURCE_DIR "/tests/testing/openai_stream_chat.mjs"));
  const ProcessResult run =
      RunCommand(absl::StrCat("cd ", ShellQuote(dir), " && timeout 120 node chat.mjs ",
                              "http://127.0.0.1:", port, "/v1 ", ShellQuote(model)));
  ASSERT_EQ(run.exit_code, 0) << run.out << run.err;
  const size_t nl = run.out.find('\n');
  const json result = json::parse(run.out.substr(0, nl), nullptr, false);
  ASSERT_FALSE(result.is_discarded()) << run.out;
  EXPECT_GT(result["text"].get<std::string>().size(), 0u) << run.out;
  // Text events plus the finish event; tokens generated between two writes share one event.
  EXPECT_GE(result["chunks"].get<int>(), 2) << run.out;
  EXPECT_TRUE(result["finish"] == "length" || result["finish"] == "stop") << run.out;
  EXPECT_GT(result["usage"]["completion_tokens"].get<int>(), 0) << run.out;
  EXPECT_EQ(result["models"][0], model) << run.out;
  const json error = json::parse(run.out.substr(nl + 1), nullptr, false);
  EXPECT_EQ(error["errorStatus"], 404) << run.out;
}

}  // namespace collm::testing
