// collm-router's OpenAI-compatible API as application developers reach it: two real collmd
// replicas on stories260K ($COLLM_MODELS_DIR; skips when unset) behind a real collm-router
// process, called with curl and with the official `openai` npm package. Requests take the router's
// gRPC routing path; chats are rendered by the replica that serves them.
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "testing/curl.h"
#include "testing/subprocess.h"
#include "testing/test_env.h"

namespace collm {
namespace {

using collm::testing::BodyAndStatus;
using collm::testing::CurlGet;
using collm::testing::RunCommand;
using collm::testing::WriteFileOrDie;
using nlohmann::json;

// A replica rendering chats with the Zephyr template; `http` also serves the OpenAI API itself
// (the direct answer the router's must equal); `training` fine-tunes the "live" adapter (its
// default adapter; nothing is published, so it still answers as the base model does).
std::string WriteReplica(const std::string& dir, const std::string& name,
                         const std::string& model_dir, bool http, bool training) {
  std::string yaml = "model: " + model_dir + R"(
server:
  address: 127.0.0.1:0
metrics:
  address: 127.0.0.1:0
http:
  enabled: )" + (http ? "true" : "false") +
                     R"(
  address: 127.0.0.1:0
  chat_template: zephyr
sampling:
  temperature: 0
engine:
  training_share: 0.3
shutdown_grace_seconds: 5
)";
  if (training) {
    std::string data;
    for (int i = 0; i < 32; ++i) {
      data += "{\"prompt\": \"Tell me story " + std::to_string(i) +
              "\", \"completion\": \"Once upon a time there was a cat.\"}\n";
    }
    WriteFileOrDie(dir + "/" + name + "-train.jsonl", data);
    yaml += "training:\n  enabled: true\n  data: [" + name +
            "-train.jsonl]\n  lora:\n    rank: 4\n  publish:\n    every_steps: 1000000\n";
  }
  WriteFileOrDie(dir + "/" + name + ".yaml", yaml);
  return dir + "/" + name + ".yaml";
}

std::string WriteRouter(const std::string& dir, const std::vector<std::string>& replicas) {
  std::string yaml = R"(server:
  address: 127.0.0.1:0
metrics:
  address: 127.0.0.1:0
policy: round_robin
poll_interval_ms: 50
ejection:
  failures_to_eject: 2
http:
  enabled: true
  address: 127.0.0.1:0
  api_keys: [test-key]
  served_model_name: stories260K-hf
replicas:
)";
  for (const std::string& r : replicas) yaml += "  - " + r + "\n";
  WriteFileOrDie(dir + "/router.yaml", yaml);
  return dir + "/router.yaml";
}

std::pair<json, int> Post(int port, const std::string& path, const json& body,
                          const std::string& key = "test-key") {
  auto [out, status] = BodyAndStatus(collm::testing::CurlPost(port, path, body.dump(), key).out);
  json parsed = json::parse(out, nullptr, false);
  EXPECT_FALSE(parsed.is_discarded()) << out;
  return {parsed, status};
}

const json kChat = json::array({{{"role", "user"}, {"content", "Tell me a story"}}});

TEST(OpenAiRouterTest, CurlCompletionsChatModelsAndErrorsThroughTheRouter) {
  COLLM_REQUIRE_MODEL_FILE(model, "stories260K-hf/config.json");
  const std::string model_dir = model.substr(0, model.rfind('/'));
  const std::string dir = collm::testing::MakeTempDir("openai-router");
  COLLM_START_SERVER(a, "src/collmd", WriteReplica(dir, "a", model_dir, true, true), dir, "a");
  COLLM_START_SERVER(b, "src/collmd", WriteReplica(dir, "b", model_dir, false, false), dir, "b");
  COLLM_START_SERVER(router, "src/collm-router", WriteRouter(dir, {a.address(), b.address()}), dir,
                     "router");
  const int port = router.port("http");
  ASSERT_GT(port, 0) << "no http= in the router's ports file";

  EXPECT_EQ(BodyAndStatus(CurlGet(port, "/health").out).second, 200);

  // /v1/models: the base and the union of the replicas' adapters with their versions.
  auto [models_body, models_status] = BodyAndStatus(CurlGet(port, "/v1/models", "test-key").out);
  ASSERT_EQ(models_status, 200) << models_body;
  const json models = json::parse(models_body);
  EXPECT_EQ(models["data"][0]["id"], "stories260K-hf") << models_body;
  bool live = false;
  for (const json& m : models["data"]) {
    if (m["id"] != "live") continue;
    live = true;
    EXPECT_GE(m["version"].get<int>(), 0) << models_body;
    EXPECT_EQ(m["parent"], "stories260K-hf") << models_body;
  }
  EXPECT_TRUE(live) << "the training replica's adapter is missing: " << models_body;

  // Completions: greedy, so every replica answers what replica a answers directly.
  const json request = {{"prompt", "Once upon a time"}, {"max_tokens", 12}, {"ignore_eos", true}};
  auto [direct, direct_status] = Post(a.port("http"), "/v1/completions", request, "");
  ASSERT_EQ(direct_status, 200) << direct;
  const std::string text = direct["choices"][0]["text"];
  for (int i = 0; i < 2; ++i) {  // Round robin: both replicas.
    auto [routed, status] = Post(port, "/v1/completions", request);
    ASSERT_EQ(status, 200) << routed;
    EXPECT_EQ(routed["choices"][0]["text"], text) << routed;
    EXPECT_EQ(routed["usage"]["completion_tokens"], 12) << routed;
    EXPECT_EQ(routed["choices"][0]["finish_reason"], "length") << routed;
  }

  // Streaming: the same text in SSE chunks, a finish_reason, then [DONE].
  json stream_request = request;
  stream_request["stream"] = true;
  auto [sse, sse_status] = BodyAndStatus(
      collm::testing::CurlPost(port, "/v1/completions", stream_request.dump(), "test-key", "-N")
          .out);
  ASSERT_EQ(sse_status, 200) << sse;
  const std::vector<std::string> events = collm::testing::SseData(sse);
  ASSERT_GE(events.size(), 3u) << sse;
  EXPECT_EQ(events.back(), "[DONE]") << sse;
  std::string joined, finish;
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    const json chunk = json::parse(events[i]);
    joined += chunk["choices"][0]["text"].get<std::string>();
    if (chunk["choices"][0]["finish_reason"].is_string())
      finish = chunk["choices"][0]["finish_reason"];
  }
  EXPECT_EQ(joined, text);
  EXPECT_EQ(finish, "length");

  // Chat: each replica renders it with its own template (b has no HTTP API: it gets the messages
  // through gRPC), so both equal a's own answer. "live" is only on a (adapter affinity).
  const json chat = {{"messages", kChat}, {"max_tokens", 10}, {"ignore_eos", true}};
  auto [direct_chat, direct_chat_status] = Post(a.port("http"), "/v1/chat/completions", chat, "");
  ASSERT_EQ(direct_chat_status, 200) << direct_chat;
  const std::string reply = direct_chat["choices"][0]["message"]["content"];
  for (int i = 0; i < 2; ++i) {
    auto [routed, status] = Post(port, "/v1/chat/completions", chat);
    ASSERT_EQ(status, 200) << routed;
    EXPECT_EQ(routed["choices"][0]["message"]["content"], reply) << routed;
  }
  json live_chat = chat;
  live_chat["model"] = "live";
  for (int i = 0; i < 2; ++i) {
    auto [routed, status] = Post(port, "/v1/chat/completions", live_chat);
    ASSERT_EQ(status, 200) << routed;
    EXPECT_EQ(routed["model"], "live") << routed;
  }

  // Errors in OpenAI's shape with OpenAI's statuses.
  auto [unknown, unknown_status] =
      Post(port, "/v1/completions", {{"prompt", "x"}, {"model", "gpt-9"}});
  EXPECT_EQ(unknown_status, 404) << unknown;
  EXPECT_EQ(unknown["error"]["code"], "model_not_found") << unknown;
  auto [no_key, no_key_status] = Post(port, "/v1/completions", {{"prompt", "x"}}, "wrong-key");
  EXPECT_EQ(no_key_status, 401) << no_key;
  EXPECT_EQ(no_key["error"]["code"], "invalid_api_key") << no_key;
  auto [n2, n2_status] = Post(port, "/v1/completions", {{"prompt", "x"}, {"n", 2}});
  EXPECT_EQ(n2_status, 400) << n2;
  EXPECT_EQ(n2["error"]["param"], "n") << n2;

  // No replica left: /health and requests are 503 once the router has ejected both.
  EXPECT_EQ(a.Stop(), 0);
  EXPECT_EQ(b.Stop(), 0);
  int health = 0;
  for (int i = 0; i < 100 && health != 503; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    health = BodyAndStatus(CurlGet(port, "/health").out).second;
  }
  EXPECT_EQ(health, 503);
  auto [gone, gone_status] = Post(port, "/v1/completions", request);
  EXPECT_EQ(gone_status, 503) << gone;
  EXPECT_EQ(gone["error"]["type"], "service_unavailable") << gone;
  EXPECT_EQ(router.Stop(), 0) << router.process().Log();
}

TEST(OpenAiRouterTest, OfficialNpmClientStreamsAChatCompletionThroughTheRouter) {
  COLLM_REQUIRE_MODEL_FILE(model, "stories260K-hf/config.json");
  const std::string model_dir = model.substr(0, model.rfind('/'));
  if (RunCommand("command -v node && command -v npm").exit_code != 0) {
    GTEST_SKIP() << "node/npm are not installed";
  }
  const std::string dir = collm::testing::MakeTempDir("openai-router-npm");
  if (absl::Status installed = collm::testing::NpmInstall(dir, "openai"); !installed.ok()) {
    GTEST_SKIP() << installed.message();
  }
  COLLM_START_SERVER(a, "src/collmd", WriteReplica(dir, "a", model_dir, false, false), dir, "a");
  COLLM_START_SERVER(b, "src/collmd", WriteReplica(dir, "b", model_dir, false, false), dir, "b");
  COLLM_START_SERVER(router, "src/collm-router", WriteRouter(dir, {a.address(), b.address()}), dir,
                     "router");
  collm::testing::ExpectOpenAiClientStreamsAChat(dir, router.port("http"), "stories260K-hf");
}

}  // namespace
}  // namespace collm
