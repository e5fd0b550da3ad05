#include "collm/serving/inference_service.h"

#include <ATen/ATen.h>
#include <arpa/inet.h>
#include <google/protobuf/unknown_field_set.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "collm/lora/peft_io.h"
#include "collm/runtime/generator.h"
#include "collm/serving/grpc_server.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "testing/test_env.h"
#include "testing/tiny_model.h"

namespace collm::serving {
namespace {

using collm::v1::GenerateRequest;
using collm::v1::GenerateResponse;
using collm::v1::InferenceService;

struct StreamResult {
  grpc::Status status;
  std::vector<GenerateResponse> messages;
  std::string text;  // Concatenated deltas.
  std::vector<int32_t> ids;
};

struct FixtureOptions {
  engine::EngineOptions engine;
  // False: the engine thread is not started; a driver thread steps it with a pause after every
  // step, so requests last long enough for cancellation, deadlines and a full queue to be
  // observed on any machine.
  bool start_engine = true;
  int slow_step_ms = 5;
  bool feedback = true;
  std::optional<ChatTemplate> chat_template;  // For Generate's `chat` input; none = refused.
  std::vector<std::string> adapter_roots;     // ServiceContext's.
  std::string admin_token;
};

// A real server on 127.0.0.1:0 in front of an engine on the tiny model, and a client channel.
class Fixture {
 public:
  explicit Fixture(FixtureOptions options = {}) {
    const std::string dir = collm::testing::TinyModelDir();
    model_ = runtime::LlamaModel::Load(dir, runtime::RuntimeOptions{}).value();
    tokenizer_ = runtime::Tokenizer::Load(dir + "/tokenizer.model").value();
    registry_ = std::make_unique<lora::AdapterRegistry>(model_->config(), model_->runtime());
    engine_ =
        engine::Engine::Create(model_, tokenizer_.get(), registry_.get(), options.engine).value();
    if (options.start_engine) {
      engine_->Start();
    } else {
      driver_ = std::thread([this, ms = options.slow_step_ms] {
        while (!stop_driver_.load()) {
          engine_->StepForTest();
          std::this_thread::sleep_for(std::chrono::milliseconds(ms));
        }
      });
    }
    if (options.feedback) feedback_ = std::make_shared<engine::InteractionBuffer>(16);
    ServiceContext ctx;
    ctx.engine = engine_.get();
    ctx.tokenizer = tokenizer_.get();
    ctx.registry = registry_.get();
    ctx.feedback = feedback_;
    ctx.default_sampling.temperature = 0;
    chat_ = std::make_unique<ChatPromptEncoder>(options.chat_template, *tokenizer_);
    ctx.chat = chat_.get();
    ctx.adapter_roots = options.adapter_roots;
    ctx.admin_token = options.admin_token;
    service_ = std::make_unique<InferenceServiceImpl>(std::move(ctx));
    GrpcServerOptions so;
    so.address = "127.0.0.1:0";
    server_ = GrpcServer::Start(so, {service_.get()}).value();
    channel_ = grpc::CreateChannel("127.0.0.1:" + std::to_string(server_->port()),
                                   grpc::InsecureChannelCredentials());
    stub_ = InferenceService::NewStub(channel_);
  }

  ~Fixture() {
    server_->Shutdown(5);  // In-flight streams end through the engine, so it must still run.
    if (driver_.joinable()) {
      stop_driver_ = true;
      driver_.join();
    }
    engine_->Shutdown(0);
  }

  StreamResult Generate(const GenerateRequest& request,
                        const std::function<void(grpc::ClientContext&, int)>& on_message = nullptr,
                        double deadline_seconds = 60) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::milliseconds(static_cast<int64_t>(deadline_seconds * 1000)));
    StreamResult r;
    auto reader = stub_->Generate(&ctx, request);
    GenerateResponse m;
    while (reader->Read(&m)) {
      r.text += m.text();
      r.ids.insert(r.ids.end(), m.token_ids().begin(), m.token_ids().end());
      r.messages.push_back(m);
      if (on_message) on_message(ctx, static_cast<int>(r.messages.size()));
    }
    r.status = reader->Finish();
    return r;
  }

  // Greedy output of `prompt` from a Generator alone (the reference for served output).
  runtime::GenerationResult Alone(const std::string& prompt, int max_tokens) {
    runtime::Generator gen(model_, tokenizer_.get());
    runtime::GenerationRequest g;
    g.prompt = tokenizer_->Encode(prompt, true);
    g.params.temperature = 0;
    g.params.max_tokens = max_tokens;
    g.params.ignore_eos = true;
    return gen.Generate({g}).value()[0];
  }

  // Polls the engine until `done` holds (or 10 s pass).
  bool WaitFor(const std::function<bool(const engine::EngineStats&)>& done) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (std::chrono::steady_clock::now() < until) {
      if (done(engine_->Stats())) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return false;
  }

  std::shared_ptr<const runtime::LlamaModel> model_;
  std::unique_ptr<runtime::Tokenizer> tokenizer_;
  std::unique_ptr<lora::AdapterRegistry> registry_;
  std::unique_ptr<engine::Engine> engine_;
  std::shared_ptr<engine::InteractionBuffer> feedback_;
  std::unique_ptr<ChatPromptEncoder> chat_;
  std::unique_ptr<InferenceServiceImpl> service_;
  std::unique_ptr<GrpcServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<InferenceService::Stub> stub_;
  std::thread driver_;
  std::atomic<bool> stop_driver_{false};
};

GenerateRequest Greedy(const std::string& prompt, int max_tokens) {
  GenerateRequest r;
  r.set_prompt(prompt);
  r.mutable_sampling()->set_temperature(0);
  r.mutable_sampling()->set_max_tokens(max_tokens);
  r.mutable_sampling()->set_ignore_eos(true);
  return r;
}

FixtureOptions Slow(int max_running = 32, int max_queued = 128) {
  FixtureOptions o;
  o.start_engine = false;
  o.engine.max_running = max_running;
  o.engine.max_queued = max_queued;
  return o;
}

TEST(InferenceServiceTest, GenerateStreamsTheTextOfAGeneratorRunAlone) {
  Fixture f;
  const std::string prompt = "Once upon a time";
  GenerateRequest req = Greedy(prompt, 24);
  req.set_request_id("client-7");
  StreamResult r = f.Generate(req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  ASSERT_GE(r.messages.size(), 2u);
  runtime::GenerationResult alone = f.Alone(prompt, 24);
  EXPECT_EQ(r.text, alone.text);
  EXPECT_EQ(r.ids, alone.tokens);
  const GenerateResponse& last = r.messages.back();
  EXPECT_EQ(last.finish_reason(), collm::v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(last.usage().prompt_tokens(),
            static_cast<int>(f.tokenizer_->Encode(prompt, true).size()));
  EXPECT_EQ(last.usage().completion_tokens(), 24);
  EXPECT_EQ(last.adapter(), "");
  EXPECT_EQ(last.adapter_version(), 0);
  EXPECT_EQ(last.request_id(), "client-7");
  EXPECT_GT(last.ttft_seconds(), 0);
  EXPECT_GT(last.tpot_seconds(), 0);
  for (size_t i = 0; i + 1 < r.messages.size(); ++i) {
    EXPECT_EQ(r.messages[i].finish_reason(), collm::v1::FINISH_REASON_UNSPECIFIED);
  }
}

// collm-router forwards OpenAI chats as messages: the daemon renders them with its template and
// serves exactly the prompt the OpenAI chat API would have built.
TEST(InferenceServiceTest, ChatInputIsRenderedWithTheDaemonsTemplate) {
  FixtureOptions o;
  o.chat_template = ChatTemplate(ChatFamily::kZephyr);
  Fixture f(o);
  GenerateRequest chat = Greedy("", 12);
  auto* m = chat.mutable_chat()->add_messages();
  m->set_role("system");
  m->set_content("You tell stories.");
  m = chat.mutable_chat()->add_messages();
  m->set_role("user");
  m->set_content("Once upon a time");
  StreamResult r = f.Generate(chat);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  const ChatPrompt expected =
      f.chat_->Encode({{"system", "You tell stories."}, {"user", "Once upon a time"}}).value();
  GenerateRequest tokens = Greedy("", 12);
  for (int32_t id : expected.ids) tokens.mutable_prompt_tokens()->add_ids(id);
  for (const std::string& s : expected.stop) tokens.mutable_sampling()->add_stop(s);
  StreamResult same = f.Generate(tokens);
  ASSERT_TRUE(same.status.ok()) << same.status.error_message();
  EXPECT_EQ(r.ids, same.ids);
  EXPECT_EQ(r.messages.back().usage().prompt_tokens(), static_cast<int>(expected.ids.size()));

  // A conversation the template cannot take names the message.
  GenerateRequest bad = Greedy("", 4);
  m = bad.mutable_chat()->add_messages();
  m->set_role("wizard");
  m->set_content("x");
  StreamResult refused = f.Generate(bad);
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

TEST(InferenceServiceTest, ChatInputWithoutATemplateIsAFailedPrecondition) {
  Fixture f;
  GenerateRequest chat = Greedy("", 4);
  auto* m = chat.mutable_chat()->add_messages();
  m->set_role("user");
  m->set_content("hi");
  StreamResult r = f.Generate(chat);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(r.status.error_message().find("http.chat_template"), std::string::npos)
      << r.status.error_message();
}

TEST(InferenceServiceTest, TokenPromptsAndStopStringsAreServed) {
  Fixture f;
  const std::string prompt = "The little dog";
  runtime::GenerationResult alone = f.Alone(prompt, 16);
  ASSERT_GE(alone.text.size(), 4u);
  GenerateRequest req = Greedy("", 16);
  for (int32_t id : f.tokenizer_->Encode(prompt, true)) req.mutable_prompt_tokens()->add_ids(id);
  StreamResult r = f.Generate(req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.text, alone.text);

  // A stop string taken from the middle of the output cuts the text right before it.
  // (One whole UTF-8 character: the random model's text is not ASCII.)
  size_t at = alone.text.size() / 2;
  while (at > 0 && (static_cast<unsigned char>(alone.text[at]) & 0xC0) == 0x80) --at;
  const unsigned char lead = static_cast<unsigned char>(alone.text[at]);
  const size_t len = lead < 0x80 ? 1 : lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : 2;
  const std::string stop = alone.text.substr(at, len);
  req.mutable_sampling()->add_stop(stop);
  r = f.Generate(req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.text, alone.text.substr(0, alone.text.find(stop)));
  EXPECT_EQ(r.messages.back().finish_reason(), collm::v1::FINISH_REASON_STOP);
}

TEST(InferenceServiceTest, SixteenConcurrentStreamsAllMatchTheirReference) {
  Fixture f;
  constexpr int kClients = 16;
  std::vector<std::string> prompts;
  std::vector<std::string> expected;
  for (int i = 0; i < kClients; ++i) {
    prompts.push_back("Story number " + std::to_string(i) + " about a cat");
    expected.push_back(f.Alone(prompts.back(), 10 + i).text);
  }
  std::vector<StreamResult> results(kClients);
  std::vector<std::thread> threads;
  for (int i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] { results[i] = f.Generate(Greedy(prompts[i], 10 + i)); });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kClients; ++i) {
    ASSERT_TRUE(results[i].status.ok()) << i << ": " << results[i].status.error_message();
    EXPECT_EQ(results[i].text, expected[i]) << "client " << i;
    EXPECT_EQ(results[i].messages.back().usage().completion_tokens(), 10 + i);
  }
  EXPECT_TRUE(f.WaitFor([](const engine::EngineStats& s) { return s.completed == kClients; }));
}

TEST(InferenceServiceTest, ClientCancellationCancelsTheEngineRequest) {
  Fixture f(Slow());
  StreamResult r = f.Generate(Greedy("Cancel me", 200), [](grpc::ClientContext& ctx, int n) {
    if (n == 1) ctx.TryCancel();
  });
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::CANCELLED) << r.status.error_message();
  EXPECT_TRUE(f.WaitFor([](const engine::EngineStats& s) {
    return s.cancelled == 1 && s.running == 0 && s.kv_blocks_used == 0;
  }));
  EXPECT_EQ(f.engine_->Stats().completed, 0);
}

TEST(InferenceServiceTest, DeadlineExpiryEndsTheRequest) {
  Fixture f(Slow());
  StreamResult r = f.Generate(Greedy("Too slow", 200), nullptr, /*deadline_seconds=*/0.2);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << r.status.error_message();
  // The engine drops it (expired by its own deadline, or cancelled when gRPC gave up first).
  EXPECT_TRUE(f.WaitFor([](const engine::EngineStats& s) {
    return s.expired + s.cancelled == 1 && s.kv_blocks_used == 0;
  }));
  EXPECT_EQ(f.engine_->Stats().completed, 0);
}

TEST(InferenceServiceTest, FullQueueIsRefusedAtOnce) {
  Fixture f(Slow(/*max_running=*/1, /*max_queued=*/1));
  grpc::ClientContext running_ctx, queued_ctx;
  auto running = f.stub_->Generate(&running_ctx, Greedy("First", 200));
  ASSERT_TRUE(f.WaitFor([](const engine::EngineStats& s) { return s.running == 1; }));
  auto queued = f.stub_->Generate(&queued_ctx, Greedy("Second", 200));
  ASSERT_TRUE(f.WaitFor([](const engine::EngineStats& s) { return s.queued == 1; }));

  StreamResult refused = f.Generate(Greedy("Third", 200));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << refused.status.error_message();
  EXPECT_NE(refused.status.error_message().find("queue is full"), std::string::npos);
  EXPECT_TRUE(refused.messages.empty());
  // Refused at once: the first request (200 slow tokens) is still running, nothing has finished.
  EXPECT_EQ(f.engine_->Stats().completed, 0);
  EXPECT_EQ(f.engine_->Stats().running, 1);
  EXPECT_EQ(f.engine_->Stats().rejected_queue_full, 1);

  running_ctx.TryCancel();
  queued_ctx.TryCancel();
  EXPECT_EQ(running->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_EQ(queued->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(f.WaitFor([](const engine::EngineStats& s) {
    return s.cancelled == 2 && s.kv_blocks_used == 0 && s.queued == 0;
  }));
}

TEST(InferenceServiceTest, MalformedRequestsNameTheField) {
  FixtureOptions o;
  o.engine.slo_classes["interactive"] = {500, 50};
  Fixture f(o);
  auto expect = [&](const GenerateRequest& req, grpc::StatusCode code, const std::string& needle) {
    StreamResult r = f.Generate(req);
    EXPECT_EQ(r.status.error_code(), code) << r.status.error_message();
    EXPECT_NE(r.status.error_message().find(needle), std::string::npos) << r.status.error_message();
    EXPECT_TRUE(r.messages.empty());
  };
  GenerateRequest req = Greedy("Hello", 4);
  req.mutable_sampling()->set_top_p(2);
  expect(req, grpc::StatusCode::INVALID_ARGUMENT, "sampling.top_p must be in (0, 1], got 2");

  req = Greedy("Hello", 4);
  req.mutable_sampling()->set_max_tokens(0);
  expect(req, grpc::StatusCode::INVALID_ARGUMENT, "sampling.max_tokens");

  expect(Greedy("", 4), grpc::StatusCode::INVALID_ARGUMENT, "prompt is empty");
  req = Greedy("Hello", 4);
  req.clear_prompt();
  expect(req, grpc::StatusCode::INVALID_ARGUMENT, "prompt is empty");

  req = Greedy("Hello", 4);
  req.set_slo_class("batchy");
  expect(req, grpc::StatusCode::INVALID_ARGUMENT, "slo_class 'batchy'");

  req = Greedy("", 4);
  req.mutable_prompt_tokens()->add_ids(1);
  req.mutable_prompt_tokens()->add_ids(100000);
  expect(req, grpc::StatusCode::INVALID_ARGUMENT, "prompt_tokens.ids[1] = 100000");

  req = Greedy("Hello", 4);
  req.set_adapter("nope");
  expect(req, grpc::StatusCode::NOT_FOUND, "nope");

  // The known SLO class is accepted.
  req = Greedy("Hello", 4);
  req.set_slo_class("interactive");
  EXPECT_TRUE(f.Generate(req).status.ok());
}

TEST(InferenceServiceTest, TokenizeReturnsIdsAndPieces) {
  Fixture f;
  grpc::ClientContext ctx;
  collm::v1::TokenizeRequest req;
  req.set_text("Hello world");
  collm::v1::TokenizeResponse resp;
  ASSERT_TRUE(f.stub_->Tokenize(&ctx, req, &resp).ok());
  const std::vector<int32_t> expected = f.tokenizer_->Encode("Hello world", true);
  ASSERT_EQ(resp.ids_size(), static_cast<int>(expected.size()));
  ASSERT_EQ(resp.pieces_size(), resp.ids_size());
  for (int i = 0; i < resp.ids_size(); ++i) {
    EXPECT_EQ(resp.ids(i), expected[i]);
    EXPECT_EQ(resp.pieces(i), f.tokenizer_->IdToPiece(expected[i]));
  }
  EXPECT_EQ(resp.ids(0), f.tokenizer_->bos_id());

  grpc::ClientContext ctx2;
  req.set_add_bos(false);
  ASSERT_TRUE(f.stub_->Tokenize(&ctx2, req, &resp).ok());
  EXPECT_EQ(resp.ids_size(), static_cast<int>(expected.size()) - 1);
}

lora::LoraAdapter RandomAdapter(const runtime::ModelConfig& c, uint64_t seed) {
  lora::LoraConfig config;
  config.rank = 4;
  config.targets = {runtime::LoraTarget::kQ, runtime::LoraTarget::kV};
  lora::LoraAdapter a = lora::LoraAdapter::Create(c, config, seed).value();
  at::manual_seed(seed);
  for (auto& layer : a.factors.layers) {
    for (auto& f : layer) {
      if (f.b.defined()) f.b = at::randn_like(f.b) * 0.3;
    }
  }
  return a;
}

TEST(InferenceServiceTest, LoadsListsServesAndUnloadsAdapters) {
  const std::string root = collm::testing::MakeTempDir("collm-serving");
  FixtureOptions options;
  options.adapter_roots = {root};
  Fixture f(options);
  const std::string dir = root + "/math";
  ASSERT_TRUE(lora::WritePeftAdapter(dir, RandomAdapter(f.model_->config(), 3)).ok());

  collm::v1::LoadAdapterRequest load;
  load.set_name("math");
  load.set_path(dir);
  collm::v1::LoadAdapterResponse loaded;
  {
    grpc::ClientContext ctx;
    grpc::Status s = f.stub_->LoadAdapter(&ctx, load, &loaded);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  EXPECT_EQ(loaded.adapter().name(), "math");
  EXPECT_EQ(loaded.adapter().version(), 1);
  EXPECT_EQ(loaded.adapter().rank(), 4);
  EXPECT_EQ(loaded.adapter().source(), "peft:" + dir);

  {
    grpc::ClientContext ctx;
    collm::v1::LoadAdapterRequest bad = load;
    bad.set_path(dir + "/missing");
    grpc::Status s = f.stub_->LoadAdapter(&ctx, bad, &loaded);
    EXPECT_TRUE(s.error_code() == grpc::StatusCode::NOT_FOUND ||
                s.error_code() == grpc::StatusCode::INVALID_ARGUMENT)
        << s.error_code();
    EXPECT_NE(s.error_message().find("missing"), std::string::npos) << s.error_message();
  }
  {
    grpc::ClientContext ctx;
    collm::v1::ListAdaptersResponse list;
    ASSERT_TRUE(f.stub_->ListAdapters(&ctx, {}, &list).ok());
    ASSERT_EQ(list.adapters_size(), 1);
    EXPECT_EQ(list.adapters(0).name(), "math");
    EXPECT_EQ(list.adapters(0).version(), 1);
  }

  GenerateRequest req = Greedy("Two plus two", 8);
  req.set_adapter("math");
  StreamResult r = f.Generate(req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.messages.back().adapter(), "math");
  EXPECT_EQ(r.messages.back().adapter_version(), 1);

  {
    grpc::ClientContext ctx;
    collm::v1::UnloadAdapterRequest unload;
    unload.set_name("math");
    collm::v1::UnloadAdapterResponse out;
    ASSERT_TRUE(f.stub_->UnloadAdapter(&ctx, unload, &out).ok());
    grpc::ClientContext again;
    EXPECT_EQ(f.stub_->UnloadAdapter(&again, unload, &out).error_code(),
              grpc::StatusCode::NOT_FOUND);
  }
  EXPECT_EQ(f.Generate(req).status.error_code(), grpc::StatusCode::NOT_FOUND);
}

// A client names a path on the daemon's machine: only dirs inside server.adapter_roots may be
// read, after resolving ".." and symlinks, and only with the admin token when one is set.
TEST(InferenceServiceTest, AdapterLoadsAreConfinedToTheRootsAndNeedTheAdminToken) {
  const std::string root = collm::testing::MakeTempDir("collm-roots");
  const std::string outside = collm::testing::MakeTempDir("collm-outside");
  FixtureOptions options;
  options.adapter_roots = {root};
  options.admin_token = "s3cret";
  Fixture f(options);
  const auto adapter = RandomAdapter(f.model_->config(), 3);
  ASSERT_TRUE(lora::WritePeftAdapter(root + "/ok", adapter).ok());
  ASSERT_TRUE(lora::WritePeftAdapter(outside + "/evil", adapter).ok());
  std::filesystem::create_directory_symlink(outside + "/evil", root + "/link");

  auto load = [&](const std::string& path, const std::string& token) {
    grpc::ClientContext ctx;
    if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
    collm::v1::LoadAdapterRequest req;
    req.set_name("a");
    req.set_path(path);
    collm::v1::LoadAdapterResponse out;
    return f.stub_->LoadAdapter(&ctx, req, &out);
  };
  grpc::Status s = load(root + "/ok", "");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << s.error_message();
  EXPECT_NE(s.error_message().find("authorization: Bearer"), std::string::npos);
  EXPECT_EQ(load(root + "/ok", "wrong").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  for (const std::string& escape :
       {outside + "/evil", root + "/../" + outside.substr(outside.rfind('/') + 1) + "/evil",
        root + "/link"}) {
    s = load(escape, "s3cret");
    EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED) << escape;
    EXPECT_NE(s.error_message().find("outside the allowed roots"), std::string::npos)
        << s.error_message();
  }
  s = load(root + "/ok", "s3cret");
  ASSERT_TRUE(s.ok()) << s.error_message();
  {
    grpc::ClientContext ctx;
    collm::v1::UnloadAdapterRequest req;
    req.set_name("a");
    collm::v1::UnloadAdapterResponse out;
    EXPECT_EQ(f.stub_->UnloadAdapter(&ctx, req, &out).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
    grpc::ClientContext authorized;
    authorized.AddMetadata("authorization", "Bearer s3cret");
    EXPECT_TRUE(f.stub_->UnloadAdapter(&authorized, req, &out).ok());
  }
}

TEST(InferenceServiceTest, AdapterLoadingIsOffWithoutRoots) {
  Fixture f;
  const std::string dir = collm::testing::MakeTempDir("collm-noroots") + "/a";
  ASSERT_TRUE(lora::WritePeftAdapter(dir, RandomAdapter(f.model_->config(), 3)).ok());
  grpc::ClientContext ctx;
  collm::v1::LoadAdapterRequest req;
  req.set_name("a");
  req.set_path(dir);
  collm::v1::LoadAdapterResponse out;
  const grpc::Status s = f.stub_->LoadAdapter(&ctx, req, &out);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(s.error_message().find("server.adapter_roots"), std::string::npos) << s.error_message();
}

TEST(InferenceServiceTest, FeedbackBecomesTrainingData) {
  Fixture f;
  auto submit = [&](const collm::v1::SubmitFeedbackRequest& req,
                    collm::v1::SubmitFeedbackResponse* resp) {
    grpc::ClientContext ctx;
    return f.stub_->SubmitFeedback(&ctx, req, resp);
  };
  collm::v1::SubmitFeedbackRequest req;
  collm::v1::SubmitFeedbackResponse resp;
  req.set_prompt("What is two plus two?");
  req.set_completion("Four.");
  req.set_rating(collm::v1::SubmitFeedbackRequest::RATING_GOOD);
  ASSERT_TRUE(submit(req, &resp).ok());
  EXPECT_TRUE(resp.accepted_for_training());
  EXPECT_EQ(resp.buffered_examples(), 1);

  req.set_rating(collm::v1::SubmitFeedbackRequest::RATING_BAD);
  ASSERT_TRUE(submit(req, &resp).ok());
  EXPECT_FALSE(resp.accepted_for_training());
  EXPECT_EQ(resp.buffered_examples(), 1);

  req.set_corrected_completion("It is four.");
  ASSERT_TRUE(submit(req, &resp).ok());
  EXPECT_TRUE(resp.accepted_for_training());
  EXPECT_EQ(resp.buffered_examples(), 2);

  std::vector<engine::TrainingExample> taken = f.feedback_->Take(10);
  ASSERT_EQ(taken.size(), 2u);
  engine::DatasetOptions format;
  EXPECT_EQ(taken[0].tokens,
            engine::MakeExample(*f.tokenizer_, "What is two plus two?", "Four.", format).tokens);
  EXPECT_EQ(
      taken[1].tokens,
      engine::MakeExample(*f.tokenizer_, "What is two plus two?", "It is four.", format).tokens);

  req.set_prompt("");
  grpc::Status s = submit(req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message(), "prompt is empty");
}

// ScoreCompletions is the teacher-forced loss EvaluateLoss gives, on the examples formatted as
// training data is, for the named adapter or (base_model) none; Generate's base_model serves
// the base model alone.
TEST(InferenceServiceTest, ScoreCompletionsAndBaseModelRequests) {
  Fixture f;
  ASSERT_TRUE(f.registry_->Publish("math", RandomAdapter(f.model_->config(), 3), "test").ok());
  const std::vector<std::pair<std::string, std::string>> pairs = {
      {"What is two plus two?", "Four."}, {"Parity: 7 is ", "odd"}};
  std::vector<engine::TrainingExample> examples;
  collm::v1::ScoreCompletionsRequest req;
  for (const auto& [prompt, completion] : pairs) {
    examples.push_back(engine::MakeExample(*f.tokenizer_, prompt, completion, {}));
    auto* e = req.add_examples();
    e->set_prompt(prompt);
    e->set_completion(completion);
  }
  auto score = [&](const collm::v1::ScoreCompletionsRequest& r,
                   collm::v1::ScoreCompletionsResponse* out) {
    grpc::ClientContext ctx;
    return f.stub_->ScoreCompletions(&ctx, r, out);
  };
  const double base_want = engine::EvaluateLoss(*f.model_, nullptr, examples).value();
  const double math_want =
      engine::EvaluateLoss(*f.model_, &f.registry_->Get("math").value()->weights, examples).value();
  ASSERT_GT(std::abs(base_want - math_want), 1e-3) << "the adapter must change the loss";

  collm::v1::ScoreCompletionsResponse out;
  req.set_base_model(true);
  grpc::Status s = score(req, &out);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_NEAR(out.loss(), base_want, 1e-4 * std::max(1.0, base_want));
  EXPECT_EQ(out.target_tokens(), examples[0].num_targets() + examples[1].num_targets());
  EXPECT_EQ(out.adapter(), "");
  EXPECT_EQ(out.adapter_version(), 0);

  req.set_base_model(false);
  req.set_adapter("math");
  s = score(req, &out);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_NEAR(out.loss(), math_want, 1e-4 * std::max(1.0, math_want));
  EXPECT_EQ(out.adapter(), "math");
  EXPECT_EQ(out.adapter_version(), 1);

  req.set_base_model(true);
  s = score(req, &out);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message(), "base_model asks for no adapter; adapter is 'math'");
  req.set_base_model(false);
  req.set_adapter("nope");
  EXPECT_EQ(score(req, &out).error_code(), grpc::StatusCode::NOT_FOUND);
  collm::v1::ScoreCompletionsRequest bad;
  s = score(bad, &out);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message(), "examples is empty");
  bad.add_examples()->set_prompt("no completion");
  s = score(bad, &out);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message(), "examples[0] needs a non-empty prompt and completion");

  // Generate: base_model serves no adapter; with an adapter named it is refused.
  GenerateRequest gen = Greedy("Two plus two", 8);
  gen.set_base_model(true);
  StreamResult r = f.Generate(gen);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.messages.back().adapter(), "");
  EXPECT_EQ(r.ids, f.Alone("Two plus two", 8).tokens);
  gen.set_adapter("math");
  r = f.Generate(gen);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(r.status.error_message().find("base_model"), std::string::npos)
      << r.status.error_message();
}

TEST(InferenceServiceTest, FeedbackIsRefusedWhenTrainingIsDisabled) {
  FixtureOptions o;
  o.feedback = false;
  Fixture f(o);
  grpc::ClientContext ctx;
  collm::v1::SubmitFeedbackRequest req;
  req.set_prompt("p");
  req.set_completion("c");
  req.set_rating(collm::v1::SubmitFeedbackRequest::RATING_GOOD);
  collm::v1::SubmitFeedbackResponse resp;
  grpc::Status s = f.stub_->SubmitFeedback(&ctx, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(s.error_message(), "training is disabled");
}

TEST(InferenceServiceTest, GetStatsReportsTheEngine) {
  Fixture f;
  ASSERT_TRUE(f.Generate(Greedy("Count me", 5)).status.ok());
  ASSERT_TRUE(f.WaitFor(
      [](const engine::EngineStats& s) { return s.completed == 1 && s.kv_blocks_used == 0; }));
  grpc::ClientContext ctx;
  collm::v1::GetStatsResponse stats;
  ASSERT_TRUE(f.stub_->GetStats(&ctx, {}, &stats).ok());
  const engine::EngineStats direct = f.engine_->Stats();
  EXPECT_EQ(stats.completed(), 1);
  EXPECT_EQ(stats.generated_tokens(), 5);
  EXPECT_EQ(stats.kv_blocks_used(), 0);
  EXPECT_EQ(stats.kv_blocks_total(), direct.kv_blocks_total);
  EXPECT_GT(stats.kv_blocks_total(), 0);
  EXPECT_EQ(stats.published_versions(), 0);
}

TEST(InferenceServiceTest, HealthIsNotServingUntilSetServing) {
  Fixture f;
  auto health = grpc::health::v1::Health::NewStub(f.channel_);
  auto check = [&](const std::string& service) {
    grpc::ClientContext ctx;
    grpc::health::v1::HealthCheckRequest req;
    req.set_service(service);
    grpc::health::v1::HealthCheckResponse resp;
    grpc::Status s = health->Check(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp.status();
  };
  EXPECT_EQ(check(""), grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(check("collm.v1.InferenceService"), grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  f.server_->SetServing(true);
  EXPECT_EQ(check(""), grpc::health::v1::HealthCheckResponse::SERVING);
  EXPECT_EQ(check("collm.v1.InferenceService"), grpc::health::v1::HealthCheckResponse::SERVING);
  f.server_->SetServing(false);
  EXPECT_EQ(check(""), grpc::health::v1::HealthCheckResponse::NOT_SERVING);
}

// Service names from a ServerReflectionResponse (grpc.reflection.v1alpha), read field by field:
// list_services_response = 6 { repeated ServiceResponse service = 1 { string name = 1 } }.
std::vector<std::string> ListedServices(const std::string& response) {
  using google::protobuf::UnknownField;
  using google::protobuf::UnknownFieldSet;
  std::vector<std::string> names;
  UnknownFieldSet top;
  if (!top.ParseFromString(response)) return names;
  for (int i = 0; i < top.field_count(); ++i) {
    if (top.field(i).number() != 6 || top.field(i).type() != UnknownField::TYPE_LENGTH_DELIMITED)
      continue;
    UnknownFieldSet list;
    if (!list.ParseFromString(top.field(i).length_delimited())) continue;
    for (int j = 0; j < list.field_count(); ++j) {
      if (list.field(j).number() != 1) continue;
      UnknownFieldSet service;
      if (!service.ParseFromString(list.field(j).length_delimited())) continue;
      for (int k = 0; k < service.field_count(); ++k) {
        if (service.field(k).number() == 1) names.push_back(service.field(k).length_delimited());
      }
    }
  }
  return names;
}

TEST(InferenceServiceTest, ReflectionListsTheService) {
  Fixture f;
  grpc::GenericStub stub(f.channel_);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto call =
      stub.PrepareCall(&ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  void* tag = nullptr;
  bool ok = false;
  auto step = [&](intptr_t expected) {
    EXPECT_TRUE(cq.Next(&tag, &ok));
    EXPECT_EQ(reinterpret_cast<intptr_t>(tag), expected);
    return ok;
  };
  call->StartCall(reinterpret_cast<void*>(1));
  ASSERT_TRUE(step(1));
  // ServerReflectionRequest{list_services = ""}: field 7, length-delimited, empty.
  const std::string request("\x3a\x00", 2);
  grpc::Slice slice(request);
  grpc::ByteBuffer out(&slice, 1);
  call->Write(out, reinterpret_cast<void*>(2));
  ASSERT_TRUE(step(2));
  call->WritesDone(reinterpret_cast<void*>(3));
  ASSERT_TRUE(step(3));
  grpc::ByteBuffer in;
  call->Read(&in, reinterpret_cast<void*>(4));
  ASSERT_TRUE(step(4));
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(in.Dump(&slices).ok());
  std::string bytes;
  for (const grpc::Slice& s : slices)
    bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(5));
  step(5);
  EXPECT_TRUE(status.ok()) << status.error_message();
  std::vector<std::string> names = ListedServices(bytes);
  EXPECT_NE(std::find(names.begin(), names.end(), "collm.v1.InferenceService"), names.end())
      << "got " << names.size() << " names";
  EXPECT_NE(std::find(names.begin(), names.end(), "grpc.health.v1.Health"), names.end());
}

TEST(GrpcServerTest, BindFailureIsUnavailableNamingTheAddress) {
  // A plain socket without SO_REUSEPORT holds the port, so gRPC cannot share it.
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(::listen(fd, 1), 0);
  socklen_t len = sizeof(addr);
  ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  GrpcServerOptions o;
  o.address = "127.0.0.1:" + std::to_string(ntohs(addr.sin_port));
  auto s = GrpcServer::Start(o, {});
  ::close(fd);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(std::string(s.status().message()).find(o.address), std::string::npos) << s.status();
}

TEST(GrpcServerTest, ShutdownIsIdempotent) {
  Fixture f;
  f.server_->Shutdown(0);
  f.server_->Shutdown(0);
  f.server_->SetServing(true);  // Harmless after shutdown.
}

}  // namespace
}  // namespace collm::serving
