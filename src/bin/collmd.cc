// collmd: one per device. Loads the base model once, serves inference over gRPC with continuous
// batching, trains the shadow adapter in the same engine loop, takes part in federated rounds
// (federation: section), exposes Prometheus metrics, and drains + checkpoints on SIGTERM/SIGINT.

#include <csignal>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>

#include "CLI/CLI.hpp"
#include "collm/common/logging.h"
#include "collm/common/shutdown_signals.h"
#include "collm/config/daemon_config.h"
#include "collm/config/shared_sections.h"
#include "collm/engine/dataset.h"
#include "collm/engine/engine.h"
#include "collm/engine/peft_trainer.h"
#include "collm/engine/shadow_publisher.h"
#include "collm/federation/fingerprint.h"
#include "collm/federation/fl_client.h"
#include "collm/lora/adapter_registry.h"
#include "collm/lora/peft_io.h"
#include "collm/lora/shadow_adapter.h"
#include "collm/runtime/llama_model.h"
#include "collm/runtime/tokenizer.h"
#include "collm/serving/chat_prompt_encoder.h"
#include "collm/serving/chat_template.h"
#include "collm/serving/grpc_server.h"
#include "collm/serving/inference_service.h"
#include "collm/serving/metrics_http_server.h"
#include "collm/serving/openai_engine_backend.h"
#include "collm/serving/openai_http_server.h"
#include "collm/telemetry/metrics.h"

namespace {

using collm::config::DaemonConfig;

int Fail(const absl::Status& s, int code = 1) {
  COLLM_LOG_ERROR("{}", std::string(s.message()));
  std::cerr << "collmd: " << s.message() << "\n";
  return code;
}

// Training examples longer than the model's context could never be forwarded: cut them there.
collm::engine::DatasetOptions FitToContext(collm::engine::DatasetOptions options,
                                           const collm::runtime::LlamaModel& model) {
  const int64_t context = model.config().max_position_embeddings;
  if (options.max_length > context) {
    COLLM_LOG_INFO("training.dataset.max_length {} exceeds the model's context; using {}",
                   options.max_length, context);
    options.max_length = context;
  }
  return options;
}

// Builds the trainer (resuming from the checkpoint when one exists), its data and publisher.
absl::StatusOr<collm::engine::TrainingSetup> MakeTraining(
    const DaemonConfig& cfg, std::shared_ptr<const collm::runtime::LlamaModel> model,
    const collm::runtime::Tokenizer& tokenizer, collm::lora::AdapterRegistry& registry,
    std::map<std::string, std::string>* cursor) {
  const auto& t = cfg.training;
  collm::engine::TrainingSetup setup;
  setup.seed = t.trainer.seed;
  setup.checkpoint_dir = t.checkpoint_dir;
  setup.checkpoint_every_steps = t.checkpoint_every_steps;
  std::vector<collm::engine::TrainingExample> held_out;
  const collm::engine::DatasetOptions dataset_options = FitToContext(t.dataset, *model);
  for (const std::string& path : t.data) {
    collm::engine::LoadReport report;
    auto ds = collm::engine::Dataset::Load(path, tokenizer, dataset_options, &report);
    if (!ds.ok()) return ds.status();
    COLLM_LOG_INFO("training data {}: {} examples, {} bad lines skipped, {} truncated", path,
                   report.loaded, report.skipped, report.truncated);
    for (const auto& e : report.errors) COLLM_LOG_WARN("  {}", e);
    setup.dataset.insert(setup.dataset.end(), ds->train().begin(), ds->train().end());
    held_out.insert(held_out.end(), ds->held_out().begin(), ds->held_out().end());
  }
  if (held_out.size() > 64) held_out.resize(64);  // Bounded evaluation cost per publish.
  const bool resume = !t.checkpoint_dir.empty() &&
                      std::filesystem::exists(t.checkpoint_dir + "/optimizer.safetensors");
  if (resume) {
    auto trainer = collm::engine::PeftTrainer::Resume(model, t.checkpoint_dir, t.trainer, cursor);
    if (!trainer.ok()) return trainer.status();
    setup.trainer = std::move(*trainer);
    COLLM_LOG_INFO("resumed the shadow adapter from {} at step {}", t.checkpoint_dir,
                   setup.trainer->shadow().step());
  } else {
    auto initial = t.init_adapter.empty()
                       ? collm::lora::LoraAdapter::Create(model->config(), t.lora, t.trainer.seed)
                       : collm::lora::ReadPeftAdapter(t.init_adapter, model->config());
    if (!initial.ok()) return initial.status();
    auto shadow = collm::lora::ShadowAdapter::Create(*initial, t.trainer.adamw);
    if (!shadow.ok()) return shadow.status();
    auto trainer = collm::engine::PeftTrainer::Create(model, std::move(*shadow), t.trainer);
    if (!trainer.ok()) return trainer.status();
    setup.trainer = std::move(*trainer);
  }
  // The shadow's current state is what serves under the training adapter's name at start.
  if (!registry.Get(t.adapter_name).ok()) {
    auto s = registry.Publish(t.adapter_name, setup.trainer->shadow().Snapshot(),
                              resume ? "checkpoint " + t.checkpoint_dir : "initial shadow");
    if (!s.ok()) return s.status();
  }
  if (t.feedback_capacity > 0) {
    setup.feedback = std::make_shared<collm::engine::InteractionBuffer>(t.feedback_capacity);
  }
  setup.publisher = std::make_unique<collm::engine::ShadowPublisher>(
      model, registry, t.adapter_name, t.publish, std::move(held_out));
  return setup;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"collmd: serve an LLM and improve it at the same time"};
  std::string config_path;
  std::string ports_file;
  app.add_option("--config,-c", config_path, "YAML config (see configs/collmd.yaml)")->required();
  app.add_option("--ports-file", ports_file,
                 "Write 'grpc=PORT metrics=PORT [http=PORT]' here once serving (for port 0)");
  CLI11_PARSE(app, argc, argv);

  // Before any thread starts, so only signals.Wait() below receives SIGTERM/SIGINT.
  const collm::ShutdownSignals signals;
  // A client that closes an HTTP stream must not kill the daemon: writes then fail with EPIPE.
  signal(SIGPIPE, SIG_IGN);

  auto cfg = DaemonConfig::FromFile(config_path);
  if (!cfg.ok()) {
    std::cerr << "collmd: " << cfg.status().message() << "\n";
    return 2;
  }
  if (auto s = collm::InitLogging(cfg->logging); !s.ok()) return Fail(s, 2);

  collm::telemetry::MetricsRegistry metrics;
  std::unique_ptr<collm::serving::MetricsHttpServer> metrics_server;
  if (cfg->metrics.enabled) {
    auto m = collm::serving::MetricsHttpServer::Start(cfg->metrics.address, metrics);
    if (!m.ok()) return Fail(m.status());
    metrics_server = std::move(*m);
  }

  COLLM_LOG_INFO("loading {}", cfg->model_dir);
  auto model = collm::runtime::LlamaModel::Load(cfg->model_dir, cfg->runtime);
  if (!model.ok()) return Fail(model.status());
  auto tokenizer = collm::runtime::Tokenizer::Load(cfg->model_dir + "/tokenizer.model");
  if (!tokenizer.ok()) return Fail(tokenizer.status());
  collm::lora::AdapterRegistry registry((*model)->config(), (*model)->runtime());
  for (const auto& [name, dir] : cfg->adapters) {
    auto s = registry.LoadPeft(name, dir);
    if (!s.ok()) return Fail(s.status());
    COLLM_LOG_INFO("adapter {} v{} from {}", name, (*s)->version, dir);
  }

  std::shared_ptr<collm::engine::InteractionBuffer> feedback;
  std::optional<collm::engine::TrainingSetup> training;
  std::map<std::string, std::string> cursor;
  int64_t local_samples = 0;
  if (cfg->training.enabled) {
    auto setup = MakeTraining(*cfg, *model, **tokenizer, registry, &cursor);
    if (!setup.ok()) return Fail(setup.status());
    feedback = setup->feedback;
    local_samples = static_cast<int64_t>(setup->dataset.size());
    training = std::move(*setup);
  }
  // With training on, requests that name no adapter get the continuously improving one.
  if (cfg->training.enabled && cfg->engine.default_adapter.empty()) {
    cfg->engine.default_adapter = cfg->training.adapter_name;
  }
  auto engine = collm::engine::Engine::Create(*model, tokenizer->get(), &registry, cfg->engine);
  if (!engine.ok()) return Fail(engine.status());
  if (training) {
    if (auto s = (*engine)->EnableTraining(std::move(*training)); !s.ok()) return Fail(s);
    if (!cursor.empty()) {
      if (auto s = (*engine)->RestoreTrainingCursor(cursor); !s.ok()) return Fail(s);
    }
  }
  (*engine)->SetMetrics(&metrics);
  (*engine)->Start();

  // The chat template serves both doors: the OpenAI chat API and gRPC Generate's `chat` input
  // (what collm-router forwards). Unrecognised, it stops collmd only where the OpenAI API is on;
  // otherwise gRPC chat requests are refused.
  auto chat_template =
      collm::serving::ChatTemplate::ForModel(cfg->model_dir, cfg->http.chat_template);
  if (!chat_template.ok()) {
    if (cfg->http.enabled) return Fail(chat_template.status(), 2);
    COLLM_LOG_WARN("gRPC chat requests will be refused: {}",
                   std::string(chat_template.status().message()));
    chat_template = std::optional<collm::serving::ChatTemplate>();
  }
  const collm::serving::ChatPromptEncoder chat_encoder(*chat_template, **tokenizer);

  collm::serving::ServiceContext ctx;
  ctx.chat = &chat_encoder;
  ctx.engine = engine->get();
  ctx.tokenizer = tokenizer->get();
  ctx.registry = &registry;
  ctx.feedback = feedback;
  ctx.feedback_format = FitToContext(cfg->training.dataset, **model);
  ctx.default_sampling = cfg->default_sampling;
  ctx.adapter_roots = cfg->server.adapter_roots;
  auto admin_token = collm::config::ResolveToken(
      cfg->server.admin_token, cfg->server.admin_token_file, "server.admin_token_file");
  if (!admin_token.ok()) return Fail(admin_token.status());
  ctx.admin_token = *admin_token;
  if (!ctx.adapter_roots.empty() && ctx.admin_token.empty()) {
    COLLM_LOG_WARN(
        "server.adapter_roots is set without server.admin_token: any client that "
        "reaches the gRPC port may load and unload adapters");
  }
  collm::serving::InferenceServiceImpl service(ctx);
  collm::serving::GrpcServerOptions server_options;
  server_options.address = cfg->server.address;
  server_options.max_message_bytes = cfg->server.max_message_bytes;
  auto server = collm::serving::GrpcServer::Start(server_options, {&service});
  if (!server.ok()) return Fail(server.status());
  (*server)->SetServing(true);
  const int metrics_port = metrics_server ? metrics_server->port() : 0;
  COLLM_LOG_INFO("serving on port {} (metrics port {}), training {}", (*server)->port(),
                 metrics_port, cfg->training.enabled ? "on" : "off");

  // The OpenAI-compatible API: the same engine path as gRPC Generate.
  std::unique_ptr<collm::serving::EngineCompletionBackend> openai_backend;
  std::unique_ptr<collm::serving::OpenAiHttpServer> openai_server;
  if (cfg->http.enabled) {
    const auto& h = cfg->http;
    collm::serving::EngineBackendContext bc;
    bc.engine = engine->get();
    bc.tokenizer = tokenizer->get();
    bc.registry = &registry;
    bc.default_sampling = cfg->default_sampling;
    // "/models/stories260K-hf/" names the base "stories260K-hf".
    std::filesystem::path dir = std::filesystem::path(cfg->model_dir).lexically_normal();
    if (dir.filename().empty()) dir = dir.parent_path();
    bc.base_model_id = h.served_model_name.empty() ? dir.filename().string() : h.served_model_name;
    if (bc.base_model_id.empty()) bc.base_model_id = "base";
    const std::string base_id = bc.base_model_id;
    bc.chat_template = *chat_template;
    openai_backend = std::make_unique<collm::serving::EngineCompletionBackend>(std::move(bc));
    auto started = collm::serving::OpenAiHttpServer::Start(collm::config::OpenAiHttpOptionsFrom(h),
                                                           *openai_backend);
    if (!started.ok()) return Fail(started.status());
    openai_server = std::move(*started);
    COLLM_LOG_INFO(
        "OpenAI API on port {} (model '{}', chat template {}, {})", openai_server->port(), base_id,
        *chat_template ? collm::serving::ChatFamilyName((*chat_template)->family()) : "none",
        h.api_keys.empty() ? "no API keys" : "API keys required");
  }
  if (!ports_file.empty()) {
    const std::string tmp = ports_file + ".tmp";
    {
      std::ofstream out(tmp);
      out << "grpc=" << (*server)->port() << " metrics=" << metrics_port;
      if (openai_server) out << " http=" << openai_server->port();
      out << "\n";
    }
    std::filesystem::rename(tmp, ports_file);
  }

  // Federation starts after serving does: the aggregator is never on serving's critical path.
  std::unique_ptr<collm::federation::FlClient> fl_client;
  if (cfg->federation.enabled) {
    const auto& f = cfg->federation;
    const collm::runtime::ModelConfig& mc = (*model)->config();
    // The YAML gave the connection options; the identity comes from the loaded model.
    collm::federation::FlClientOptions o = f;
    o.model_name = mc.model_type + " h" + std::to_string(mc.hidden_size) + " L" +
                   std::to_string(mc.num_hidden_layers) + " v" + std::to_string(mc.vocab_size);
    // The aggregator computes the same digest of its model's parsed config.json.
    o.model_fingerprint = collm::federation::ModelFingerprint(mc);
    o.accelerator = cfg->runtime.device;
    o.local_samples = local_samples;
    // The load report names where this daemon serves, with the port actually bound.
    o.serving_address = cfg->server.address.substr(0, cfg->server.address.rfind(':') + 1) +
                        std::to_string((*server)->port());
    o.seed = cfg->training.trainer.seed;
    auto client = collm::federation::FlClient::Create(o, **engine, mc, feedback, &metrics);
    if (!client.ok()) return Fail(client.status());
    fl_client = std::move(*client);
    fl_client->Start();
    COLLM_LOG_INFO("federation: device {} joining {}{}", f.device_id, f.aggregator,
                   f.tls.enabled ? (f.tls.cert.empty() ? " (TLS)" : " (mutual TLS)") : "");
  }

  const int sig = signals.Wait();
  COLLM_LOG_INFO("signal {}: draining for up to {} s", sig, cfg->shutdown_grace_seconds);
  // No new rounds while draining; a task in flight is cut short and not uploaded.
  if (fl_client) fl_client->Stop();
  (*server)->SetServing(false);
  if (openai_backend) openai_backend->SetDraining();  // /health says 503; new requests too.
  // The engine refuses new requests and finishes (or, after the grace, cancels) in-flight ones,
  // which completes their RPCs; then the server stops.
  (*engine)->Shutdown(cfg->shutdown_grace_seconds);
  (*server)->Shutdown(1.0);
  if (openai_server) openai_server->Stop();  // Its streams ended with their requests.
  int code = 0;
  if (cfg->training.enabled && !cfg->training.checkpoint_dir.empty()) {
    if (auto s = (*engine)->CheckpointTraining(cfg->training.checkpoint_dir); !s.ok()) {
      code = Fail(s);
    } else {
      COLLM_LOG_INFO("checkpointed the shadow adapter to {}", cfg->training.checkpoint_dir);
    }
  }
  if (metrics_server) metrics_server->Stop();
  COLLM_LOG_INFO("stopped");
  return code;
}
