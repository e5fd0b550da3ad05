// The OpenAI HTTP layer on a real engine (tiny model) through EngineCompletionBackend, served on
// 127.0.0.1:0 and called with a real HTTP client: output equals a Generator run alone, the SSE
// stream's shape, every error status, API keys, and a vanished client cancelling its request.
#include "collm/serving/openai_http_server.h"

#include <arpa/inet.h>
#include <httplib.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "collm/runtime/generator.h"
#include "collm/serving/openai_engine_backend.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "testing/curl.h"
#include "testing/tiny_model.h"

namespace collm::serving {
namespace {

using collm::testing::SseData;
using nlohmann::json;

struct Options {
  engine::EngineOptions engine;
  bool start_engine = true;  // False: a driver steps the engine slowly (long-lived requests).
  std::vector<std::string> api_keys;
  std::optional<ChatTemplate> chat_template = ChatTemplate(ChatFamily::kLlama2);
};

class Fixture {
 public:
  explicit Fixture(Options options = {}) {
    const std::string dir = collm::testing::TinyModelDir();
    model_ = runtime::LlamaModel::Load(dir, runtime::RuntimeOptions{}).value();
    tokenizer_ = runtime::Tokenizer::Load(dir + "/tokenizer.model").value();
    registry_ = std::make_unique<lora::AdapterRegistry>(model_->config(), model_->runtime());
    engine_ =
        engine::Engine::Create(model_, tokenizer_.get(), registry_.get(), options.engine).value();
    if (options.start_engine) {
      engine_->Start();
    } else {
      driver_ = std::thread([this] {
        while (!stop_driver_.load()) {
          engine_->StepForTest();
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
      });
    }
    EngineBackendContext ctx;
    ctx.engine = engine_.get();
    ctx.tokenizer = tokenizer_.get();
    ctx.registry = registry_.get();
    ctx.default_sampling.temperature = 0;
    ctx.base_model_id = "tiny";
    ctx.chat_template = options.chat_template;
    backend_ = std::make_unique<EngineCompletionBackend>(std::move(ctx));
    OpenAiHttpOptions ho;
    ho.address = "127.0.0.1:0";
    ho.api_keys = options.api_keys;
    ho.heartbeat_seconds = 0.05;
    server_ = OpenAiHttpServer::Start(ho, *backend_).value();
    client_ = std::make_unique<httplib::Client>("127.0.0.1", server_->port());
    client_->set_read_timeout(60, 0);
  }

  ~Fixture() {
    backend_->SetDraining();
    if (driver_.joinable()) {
      engine_->Shutdown(0);  // Cancels what is left, so streams end ...
      stop_driver_ = true;
      driver_.join();
    }
    engine_->Shutdown(0);
    server_->Stop();  // ... before the server waits for its handlers.
  }

  struct Reply {
    int status = 0;
    json body;
    std::string raw;
  };
  Reply Post(const std::string& path, const std::string& body, const std::string& key = "") {
    httplib::Headers headers;
    if (!key.empty()) headers.emplace("Authorization", "Bearer " + key);
    auto res = client_->Post(path.c_str(), headers, body, "application/json");
    Reply r;
    if (!res) return r;
    r.status = res->status;
    r.raw = res->body;
    r.body = json::parse(res->body, nullptr, false);
    return r;
  }
  Reply Get(const std::string& path, const std::string& key = "") {
    httplib::Headers headers;
    if (!key.empty()) headers.emplace("Authorization", "Bearer " + key);
    auto res = client_->Get(path.c_str(), headers);
    Reply r;
    if (!res) return r;
    r.status = res->status;
    r.raw = res->body;
    r.body = json::parse(res->body, nullptr, false);
    return r;
  }

  std::string Alone(const std::vector<int32_t>& prompt, int max_tokens) {
    runtime::Generator gen(model_, tokenizer_.get());
    runtime::GenerationRequest g;
    g.prompt = prompt;
    g.params.temperature = 0;
    g.params.max_tokens = max_tokens;
    g.params.ignore_eos = true;
    return gen.Generate({g}).value()[0].text;
  }

  bool WaitFor(const std::function<bool(const engine::EngineStats&)>& done) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (std::chrono::steady_clock::now() < until) {
      if (done(engine_->Stats())) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return false;
  }

  std::shared_ptr<const runtime::LlamaModel> model_;
  std::unique_ptr<runtime::Tokenizer> tokenizer_;
  std::unique_ptr<lora::AdapterRegistry> registry_;
  std::unique_ptr<engine::Engine> engine_;
  std::unique_ptr<EngineCompletionBackend> backend_;
  std::unique_ptr<OpenAiHttpServer> server_;
  std::unique_ptr<httplib::Client> client_;
  std::thread driver_;
  std::atomic<bool> stop_driver_{false};
};

TEST(OpenAiHttpServerTest, CompletionIsTheGeneratorsTextWithUsage) {
  Fixture f;
  const std::string prompt = "Once upon a time";
  auto r = f.Post("/v1/completions",
                  R"({"model":"tiny","prompt":"Once upon a time","max_tokens":12,)"
                  R"("temperature":0,"ignore_eos":true,"some_future_field":{"x":1}})");
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_EQ(r.body["object"], "text_completion");
  EXPECT_EQ(r.body["model"], "tiny");
  EXPECT_EQ(r.body["choices"][0]["text"], f.Alone(f.tokenizer_->Encode(prompt, true), 12));
  EXPECT_EQ(r.body["choices"][0]["finish_reason"], "length");
  const int64_t prompt_tokens = static_cast<int64_t>(f.tokenizer_->Encode(prompt, true).size());
  EXPECT_EQ(r.body["usage"]["prompt_tokens"], prompt_tokens);
  EXPECT_EQ(r.body["usage"]["completion_tokens"], 12);
  EXPECT_EQ(r.body["usage"]["total_tokens"], prompt_tokens + 12);
}

TEST(OpenAiHttpServerTest, StopStringsEndTheTextBeforeThemWithFinishReasonStop) {
  Fixture f;
  const std::string full = f.Alone(f.tokenizer_->Encode("The dog", true), 16);
  ASSERT_GE(full.size(), 6u);
  const std::string stop = full.substr(3, 2);
  const std::string expected = full.substr(0, full.find(stop));
  auto r = f.Post("/v1/completions", json{{"prompt", "The dog"},
                                          {"max_tokens", 16},
                                          {"ignore_eos", true},
                                          {"stop", json::array({stop, "zzzz"})}}
                                         .dump());
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_EQ(r.body["choices"][0]["text"], expected);
  EXPECT_EQ(r.body["choices"][0]["finish_reason"], "stop");
  auto single = f.Post(
      "/v1/completions",
      json{{"prompt", "The dog"}, {"max_tokens", 16}, {"ignore_eos", true}, {"stop", stop}}.dump());
  EXPECT_EQ(single.body["choices"][0]["text"], expected) << single.raw;
}

TEST(OpenAiHttpServerTest, ChatStreamsRoleThenDeltasThenFinishUsageAndDone) {
  Fixture f;
  const std::vector<ChatMessage> messages = {{"system", "Be brief."}, {"user", "Tell a story"}};
  const std::string rendered = ChatTemplate(ChatFamily::kLlama2).Render(messages).value();
  const std::vector<int32_t> ids = f.backend_->EncodeChat(rendered);
  ASSERT_EQ(ids.front(), f.tokenizer_->bos_id());  // "<s>" became the BOS id, not text.
  auto r = f.Post("/v1/chat/completions",
                  R"({"model":"tiny","messages":[{"role":"system","content":"Be brief."},)"
                  R"({"role":"user","content":[{"type":"text","text":"Tell a story"}]}],)"
                  R"("max_tokens":10,"ignore_eos":true,"stream":true,)"
                  R"("stream_options":{"include_usage":true}})");
  ASSERT_EQ(r.status, 200) << r.raw;
  const std::vector<std::string> data = SseData(r.raw);
  ASSERT_GE(data.size(), 4u) << r.raw;
  EXPECT_EQ(data.back(), "[DONE]");
  const json first = json::parse(data[0]);
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
  std::string text;
  for (size_t i = 0; i + 3 < data.size(); ++i) {
    const json chunk = json::parse(data[i]);
    EXPECT_TRUE(chunk["choices"][0]["finish_reason"].is_null());
    EXPECT_TRUE(chunk.contains("usage") && chunk["usage"].is_null());
    text += chunk["choices"][0]["delta"].value("content", "");
  }
  const json finish = json::parse(data[data.size() - 3]);
  EXPECT_EQ(finish["choices"][0]["finish_reason"], "length");
  const json usage = json::parse(data[data.size() - 2]);
  EXPECT_TRUE(usage["choices"].empty());
  EXPECT_EQ(usage["usage"]["completion_tokens"], 10);
  EXPECT_EQ(usage["usage"]["prompt_tokens"], static_cast<int64_t>(ids.size()));
  EXPECT_EQ(text, f.Alone(ids, 10));

  // The same request without streaming gives the same message.
  auto whole =
      f.Post("/v1/chat/completions",
             json{{"messages", json::array({{{"role", "system"}, {"content", "Be brief."}},
                                            {{"role", "user"}, {"content", "Tell a story"}}})},
                  {"max_tokens", 10},
                  {"ignore_eos", true}}
                 .dump());
  ASSERT_EQ(whole.status, 200) << whole.raw;
  EXPECT_EQ(whole.body["object"], "chat.completion");
  EXPECT_EQ(whole.body["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(whole.body["choices"][0]["message"]["content"], text);
}

TEST(OpenAiHttpServerTest, BadRequestsAre400sNamingTheField) {
  Fixture f;
  struct Case {
    std::string body;
    std::string param;
  };
  const std::vector<Case> cases = {
      {R"({"prompt":"x","max_tokens":"ten"})", "max_tokens"},
      {R"({"prompt":"x","max_tokens":0})", "max_tokens"},
      {R"({"prompt":"x","temperature":"hot"})", "temperature"},
      {R"({"prompt":"x","temperature":3})", "temperature"},
      {R"({"prompt":"x","top_p":0})", "top_p"},
      {R"({"prompt":"x","seed":1.5})", "seed"},
      {R"({"prompt":"x","stop":7})", "stop"},
      {R"({"prompt":"x","stop":["a",3]})", "stop"},
      {R"({"prompt":"x","n":2})", "n"},
      {R"({"prompt":"x","stream":"yes"})", "stream"},
      {R"({"prompt":"x","model":5})", "model"},
      {R"({"prompt":5})", "prompt"},
      {R"({"prompt":["a","b"]})", "prompt"},
      {R"({"max_tokens":3})", "prompt"},
  };
  for (const Case& c : cases) {
    auto r = f.Post("/v1/completions", c.body);
    EXPECT_EQ(r.status, 400) << c.body << " -> " << r.raw;
    EXPECT_EQ(r.body["error"]["type"], "invalid_request_error") << c.body;
    EXPECT_EQ(r.body["error"]["param"], c.param) << c.body << " -> " << r.raw;
    EXPECT_TRUE(r.body["error"]["message"].is_string());
    EXPECT_TRUE(r.body["error"].contains("code"));
  }
  auto chat = f.Post("/v1/chat/completions", R"({"messages":[{"role":"tool","content":"x"}]})");
  EXPECT_EQ(chat.status, 400);
  EXPECT_EQ(chat.body["error"]["param"], "messages[0].role") << chat.raw;
  auto not_json = f.Post("/v1/completions", "{nope");
  EXPECT_EQ(not_json.status, 400);
  EXPECT_TRUE(not_json.body["error"]["message"].is_string());
  // Longer than the context: the engine's validation, as a 400 on the prompt.
  std::string long_prompt;
  for (int i = 0; i < 2000; ++i) long_prompt += "word ";
  auto too_long = f.Post("/v1/completions", json{{"prompt", long_prompt}}.dump());
  EXPECT_EQ(too_long.status, 400) << too_long.raw;
  EXPECT_EQ(too_long.body["error"]["param"], "prompt") << too_long.raw;
  auto nowhere = f.Get("/v1/nothing");
  EXPECT_EQ(nowhere.status, 404);
  EXPECT_TRUE(nowhere.body["error"]["message"].is_string()) << nowhere.raw;
}

TEST(OpenAiHttpServerTest, ChatWithoutATemplateIsAClear400) {
  Options o;
  o.chat_template.reset();
  Fixture f(o);
  auto r = f.Post("/v1/chat/completions", R"({"messages":[{"role":"user","content":"x"}]})");
  EXPECT_EQ(r.status, 400);
  EXPECT_NE(r.body["error"]["message"].get<std::string>().find("http.chat_template"),
            std::string::npos)
      << r.raw;
}

TEST(OpenAiHttpServerTest, ModelsListTheBaseAndAdaptersAndModelSelectsOne) {
  Fixture f;
  ASSERT_TRUE(
      f.registry_
          ->Publish("alpha",
                    lora::LoraAdapter::Create(f.model_->config(), lora::LoraConfig{}, 3).value(),
                    "test")
          .ok());
  auto models = f.Get("/v1/models");
  ASSERT_EQ(models.status, 200) << models.raw;
  EXPECT_EQ(models.body["object"], "list");
  ASSERT_EQ(models.body["data"].size(), 2u) << models.raw;
  EXPECT_EQ(models.body["data"][0]["id"], "tiny");
  EXPECT_EQ(models.body["data"][1]["id"], "alpha");
  EXPECT_EQ(models.body["data"][1]["version"], 1);
  EXPECT_EQ(models.body["data"][1]["parent"], "tiny");
  EXPECT_EQ(f.Get("/v1/models/alpha").body["id"], "alpha");
  EXPECT_EQ(f.Get("/v1/models/zeta").status, 404);

  auto served = f.Post("/v1/completions", R"({"model":"alpha","prompt":"Hi","max_tokens":2})");
  ASSERT_EQ(served.status, 200) << served.raw;
  EXPECT_EQ(served.body["model"], "alpha");
  auto missing = f.Post("/v1/completions", R"({"model":"zeta","prompt":"Hi"})");
  EXPECT_EQ(missing.status, 404);
  EXPECT_EQ(missing.body["error"]["code"], "model_not_found") << missing.raw;
}

TEST(OpenAiHttpServerTest, ApiKeysAreRequiredExceptForHealth) {
  Options o;
  o.api_keys = {"k-one", "k-two"};
  Fixture f(o);
  auto none = f.Post("/v1/completions", R"({"prompt":"Hi","max_tokens":1})");
  EXPECT_EQ(none.status, 401);
  EXPECT_EQ(none.body["error"]["code"], "invalid_api_key") << none.raw;
  EXPECT_EQ(f.Post("/v1/completions", R"({"prompt":"Hi","max_tokens":1})", "wrong").status, 401);
  EXPECT_EQ(f.Get("/v1/models", "wrong").status, 401);
  EXPECT_EQ(f.Post("/v1/completions", R"({"prompt":"Hi","max_tokens":1})", "k-two").status, 200);
  EXPECT_EQ(f.Get("/v1/models", "k-one").status, 200);
  EXPECT_EQ(f.Get("/health").status, 200);
}

TEST(OpenAiHttpServerTest, FullQueueIs429AndDrainingIs503) {
  Options o;
  o.start_engine = false;
  o.engine.max_running = 1;
  o.engine.max_queued = 1;
  Fixture f(o);
  // Two long requests fill the running slot and the queue; the third is refused at once.
  std::vector<std::thread> holders;
  for (int i = 0; i < 2; ++i) {
    holders.emplace_back([&f] {
      httplib::Client c("127.0.0.1", f.server_->port());
      c.set_read_timeout(60, 0);
      auto res = c.Post("/v1/completions", R"({"prompt":"Hi","max_tokens":200,"ignore_eos":true})",
                        "application/json");
      EXPECT_TRUE(res);
    });
    // The first must be running (admitted) before the second can wait in the queue.
    ASSERT_TRUE(f.WaitFor(
        [i](const engine::EngineStats& s) { return i == 0 ? s.running == 1 : s.queued == 1; }));
  }
  auto refused = f.Post("/v1/completions", R"({"prompt":"Hi","max_tokens":2})");
  EXPECT_EQ(refused.status, 429) << refused.raw;
  EXPECT_EQ(refused.body["error"]["type"], "rate_limit_error");

  f.backend_->SetDraining();
  EXPECT_EQ(f.Get("/health").status, 503);
  auto draining = f.Post("/v1/completions", R"({"prompt":"Hi","max_tokens":2})");
  EXPECT_EQ(draining.status, 503) << draining.raw;
  f.engine_->Shutdown(0);  // Cancels the holders' requests.
  for (auto& t : holders) t.join();
}

// Sends `body` to POST /v1/completions on a raw socket, waits until the answer started (headers,
// maybe a first chunk) and the engine runs the request, then closes the connection.
void PostAndLeave(Fixture& f, const std::string& body) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(f.server_->port()));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  const std::string request =
      "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
      "application/json\r\nContent-Length: " +
      std::to_string(body.size()) + "\r\n\r\n" + body;
  ASSERT_EQ(write(fd, request.data(), request.size()), static_cast<ssize_t>(request.size()));
  char buf[512];
  ASSERT_GT(read(fd, buf, sizeof(buf)), 0);  // Headers (and maybe the first chunk) arrived.
  ASSERT_TRUE(f.WaitFor([](const engine::EngineStats& s) { return s.running == 1; }));
  close(fd);
}

TEST(OpenAiHttpServerTest, AClientThatLeavesAStreamCancelsItsRequest) {
  Options o;
  o.start_engine = false;
  Fixture f(o);
  PostAndLeave(f, R"({"prompt":"Hi","max_tokens":500,"ignore_eos":true,"stream":true})");
  EXPECT_TRUE(f.WaitFor([](const engine::EngineStats& s) { return s.cancelled == 1; }))
      << "the engine still runs the request of a client that is gone";
  EXPECT_LT(f.engine_->Stats().generated_tokens, 500);
}

// A long non-streaming answer starts after one heartbeat with whitespace, which is how a client
// that left is noticed; what a client that stays gets is still one JSON document.
TEST(OpenAiHttpServerTest, AClientThatLeavesANonStreamingRequestCancelsIt) {
  Options o;
  o.start_engine = false;
  Fixture f(o);
  PostAndLeave(f, R"({"prompt":"Hi","max_tokens":500,"ignore_eos":true})");
  EXPECT_TRUE(f.WaitFor([](const engine::EngineStats& s) { return s.cancelled == 1; }))
      << "the engine still runs the request of a client that is gone";
  EXPECT_LT(f.engine_->Stats().generated_tokens, 500);

  const Fixture::Reply stayed = f.Post("/v1/completions", R"({"prompt":"Hi","max_tokens":8})");
  EXPECT_EQ(stayed.status, 200) << stayed.raw;
  ASSERT_FALSE(stayed.body.is_discarded()) << stayed.raw;
  EXPECT_EQ(stayed.raw.front(), ' ') << "answered whole: the slow engine was not slow enough";
  EXPECT_EQ(stayed.body["usage"]["completion_tokens"], 8) << stayed.raw;
}

}  // namespace
}  // namespace collm::serving
