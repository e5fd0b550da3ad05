// collmd's OpenAI-compatible API as application developers reach it: a real collmd process on
// stories260K (found through $COLLM_MODELS_DIR), called with curl and with the official `openai`
// npm package installed into the test's own temp dir.
#include <cstdlib>
#include <string>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "testing/curl.h"
#include "testing/subprocess.h"
#include "testing/test_env.h"
#include "testing/tiny_model.h"

namespace collm {
namespace {

using collm::testing::BodyAndStatus;
using collm::testing::RunCommand;
using collm::testing::WriteFileOrDie;
using nlohmann::json;

std::string WriteConfig(const std::string& dir, const std::string& model_dir,
                        const std::string& extra_http = "") {
  WriteFileOrDie(dir + "/collmd.yaml", "model: " + model_dir + R"(
server:
  address: 127.0.0.1:0
metrics:
  address: 127.0.0.1:0
http:
  enabled: true
  address: 127.0.0.1:0
  api_keys: [test-key]
)" + extra_http + R"(
sampling:
  temperature: 0
shutdown_grace_seconds: 10
)");
  return dir + "/collmd.yaml";
}

collm::testing::ProcessResult Post(int port, const std::string& path, const json& body,
                                   const std::string& key = "test-key",
                                   const std::string& flags = "") {
  return collm::testing::CurlPost(port, path, body.dump(), key, flags);
}

TEST(OpenAiCollmdTest, CurlCompletionsStreamingErrorsAndKeys) {
  COLLM_REQUIRE_MODEL_FILE(model, "stories260K-hf/config.json");
  const std::string model_dir = model.substr(0, model.rfind('/'));
  const std::string dir = collm::testing::MakeTempDir("openai-collmd");
  COLLM_START_SERVER(d, "src/collmd", WriteConfig(dir, model_dir, "  chat_template: llama2\n"), dir,
                     "collmd");
  const int port = d.port("http");
  ASSERT_GT(port, 0) << "no http= in the ports file";

  auto health = collm::testing::CurlGet(port, "/health");
  EXPECT_EQ(BodyAndStatus(health.out).second, 200) << health.out << health.err;

  auto models = BodyAndStatus(collm::testing::CurlGet(port, "/v1/models", "test-key").out);
  const json list = json::parse(models.first, nullptr, false);
  ASSERT_FALSE(list.is_discarded()) << models.first;
  EXPECT_EQ(list["data"][0]["id"], "stories260K-hf") << models.first;

  auto [body, status] = BodyAndStatus(
      Post(port, "/v1/completions",
           {{"model", "stories260K-hf"}, {"prompt", "Once upon a time"}, {"max_tokens", 24}})
          .out);
  ASSERT_EQ(status, 200) << body;
  const json completion = json::parse(body);
  const std::string text = completion["choices"][0]["text"];
  EXPECT_GT(text.size(), 10u) << body;
  EXPECT_EQ(completion["usage"]["completion_tokens"].get<int>() +
                completion["usage"]["prompt_tokens"].get<int>(),
            completion["usage"]["total_tokens"].get<int>());

  // Streaming: the same greedy text, in SSE chunks, then [DONE].
  auto streamed = Post(port, "/v1/completions",
                       {{"prompt", "Once upon a time"}, {"max_tokens", 24}, {"stream", true}},
                       "test-key", "-N");
  auto [sse, sse_status] = BodyAndStatus(streamed.out);
  ASSERT_EQ(sse_status, 200) << sse;
  std::string joined;
  size_t chunks = 0;
  for (const std::string& data : collm::testing::SseData(sse)) {
    if (data == "[DONE]") continue;
    joined += json::parse(data)["choices"][0]["text"];
    ++chunks;
  }
  // At least one text event and the finish event: the server sends what was generated since its
  // last write as one event, so on a fast model the whole text may come in one.
  EXPECT_GE(chunks, 2u) << sse;
  EXPECT_EQ(joined, text);
  EXPECT_NE(sse.find("data: [DONE]\n\n"), std::string::npos) << sse;

  // Chat through the configured Llama 2 template.
  auto chat = BodyAndStatus(
      Post(port, "/v1/chat/completions",
           {{"messages", json::array({{{"role", "user"}, {"content", "Tell me a story"}}})},
            {"max_tokens", 16}})
          .out);
  EXPECT_EQ(chat.second, 200) << chat.first;
  EXPECT_EQ(json::parse(chat.first)["choices"][0]["message"]["role"], "assistant");

  auto no_key = BodyAndStatus(Post(port, "/v1/completions", {{"prompt", "x"}}, "").out);
  EXPECT_EQ(no_key.second, 401) << no_key.first;
  EXPECT_EQ(json::parse(no_key.first)["error"]["code"], "invalid_api_key");
  auto n2 = BodyAndStatus(Post(port, "/v1/completions", {{"prompt", "x"}, {"n", 2}}).out);
  EXPECT_EQ(n2.second, 400) << n2.first;
  EXPECT_EQ(json::parse(n2.first)["error"]["param"], "n");
  auto bad_type =
      BodyAndStatus(Post(port, "/v1/completions", {{"prompt", "x"}, {"max_tokens", "5"}}).out);
  EXPECT_EQ(bad_type.second, 400) << bad_type.first;
  EXPECT_EQ(json::parse(bad_type.first)["error"]["param"], "max_tokens");
  auto unknown_model =
      BodyAndStatus(Post(port, "/v1/completions", {{"prompt", "x"}, {"model", "gpt-9"}}).out);
  EXPECT_EQ(unknown_model.second, 404) << unknown_model.first;

  EXPECT_EQ(d.Stop(), 0) << d.log();  // SIGTERM drains the HTTP server too.
}

TEST(OpenAiCollmdTest, OfficialNpmClientStreamsAChatCompletion) {
  COLLM_REQUIRE_MODEL_FILE(model, "stories260K-hf/config.json");
  const std::string model_dir = model.substr(0, model.rfind('/'));
  if (RunCommand("command -v node && command -v npm").exit_code != 0) {
    GTEST_SKIP() << "node/npm are not installed";
  }
  const std::string dir = collm::testing::MakeTempDir("openai-npm");
  if (absl::Status installed = collm::testing::NpmInstall(dir, "openai"); !installed.ok()) {
    GTEST_SKIP() << installed.message();
  }
  COLLM_START_SERVER(d, "src/collmd", WriteConfig(dir, model_dir, "  chat_template: zephyr\n"), dir,
                     "collmd");
  collm::testing::ExpectOpenAiClientStreamsAChat(dir, d.port("http"), "stories260K-hf");
}

TEST(OpenAiCollmdTest, AnUnrecognisedChatTemplateStopsCollmdAtStart) {
  // A copy of the tiny model whose tokenizer_config.json has a template collm does not know.
  const std::string dir = collm::testing::MakeTempDir("openai-bad-template");
  ASSERT_EQ(RunCommand("cp -r " + collm::testing::TinyModelDir() + " " + dir + "/model").exit_code,
            0);
  WriteFileOrDie(dir + "/model/tokenizer_config.json",
                 R"({"chat_template": "{{ 'Human: ' + messages[0]['content'] }}"})");
  auto r = RunCommand(collm::testing::BinaryPath("src/collmd") + " --config " +
                      WriteConfig(dir, dir + "/model"));
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("tokenizer_config.json"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("http.chat_template"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace collm
