#include <grpcpp/grpcpp.h>

#include <cstdlib>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <ostream>

#include "absl/strings/str_cat.h"
#include "collm/cli/commands.h"
#include "collm/common/clock.h"
#include "collm/lora/peft_io.h"
#include "collm/runtime/generator.h"
#include "collm/runtime/llama_model.h"
#include "collm/runtime/random_model.h"
#include "collm/runtime/tokenizer.h"
#include "collm/v1/inference.grpc.pb.h"

namespace collm::cli {

std::string DefaultTinyModelDir() {
  std::string base;
  if (const char* d = std::getenv("COLLM_CACHE_DIR"); d != nullptr && *d) {
    base = d;
  } else if (const char* x = std::getenv("XDG_CACHE_HOME"); x != nullptr && *x) {
    base = std::string(x) + "/collm";
  } else if (const char* h = std::getenv("HOME"); h != nullptr && *h) {
    base = std::string(h) + "/.cache/collm";
  } else {
    base = std::filesystem::temp_directory_path().string() + "/collm";
  }
  return base + "/tiny-random";
}

namespace {

// Streams from a running collmd over gRPC.
int RunRemoteGenerate(const GenerateArgs& args, std::ostream& out, std::ostream& err) {
  auto stub = v1::InferenceService::NewStub(
      grpc::CreateChannel(args.daemon, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(10));
  v1::GenerateRequest req;
  req.set_prompt(args.prompt);
  req.set_add_bos(!args.no_bos);
  req.set_adapter(args.adapter_name);
  auto* s = req.mutable_sampling();
  s->set_temperature(args.temperature);
  s->set_top_k(args.top_k);
  s->set_top_p(args.top_p);
  s->set_min_p(args.min_p);
  s->set_repetition_penalty(args.repetition_penalty);
  s->set_seed(args.seed);
  s->set_max_tokens(args.max_tokens);
  s->set_ignore_eos(args.ignore_eos);
  for (const auto& stop : args.stop) s->add_stop(stop);
  const int64_t t0 = Clock::Real().NowNanos();
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse msg, last;
  while (reader->Read(&msg)) {
    out << msg.text() << std::flush;
    last = msg;
  }
  grpc::Status status = reader->Finish();
  if (!status.ok()) {
    err << "\ncollmctl: " << args.daemon << ": " << status.error_message() << " (gRPC code "
        << status.error_code() << ")\n";
    return status.error_code() == grpc::StatusCode::INVALID_ARGUMENT ? 2 : 1;
  }
  out << "\n" << std::flush;
  err << std::fixed << std::setprecision(1) << "collmctl: " << args.daemon << ": "
      << last.usage().completion_tokens() << " tokens in " << (Clock::Real().NowNanos() - t0) * 1e-6
      << " ms; ttft " << last.ttft_seconds() * 1e3 << " ms, tpot " << last.tpot_seconds() * 1e3
      << " ms; adapter '" << last.adapter() << "' v" << last.adapter_version() << "\n";
  return 0;
}

}  // namespace

int RunGenerate(const GenerateArgs& args, std::ostream& out, std::ostream& err) {
  if (!args.daemon.empty()) return RunRemoteGenerate(args, out, err);
  std::string dir = args.model_dir;
  if (dir.empty()) {
    dir = DefaultTinyModelDir();
    err << "collmctl: no --model given; using the built-in tiny RANDOM model at " << dir
        << " (its output is gibberish).\n"
        << "collmctl: point --model at a Hugging Face Llama directory (config.json, "
           "model.safetensors, tokenizer.model) for real text.\n";
    if (!std::filesystem::exists(dir + "/model.safetensors")) {
      runtime::RandomModelOptions options;
      options.config = runtime::TinyLlamaConfig();
      options.seed = 0;
      if (absl::Status s = runtime::WriteRandomModel(dir, options); !s.ok()) {
        err << "collmctl: cannot write the tiny model: " << s << "\n";
        return 1;
      }
    }
  }
  runtime::RuntimeOptions rt;
  rt.device = args.device;
  rt.dtype = args.dtype;
  rt.weights = args.weights;
  rt.num_threads = args.threads;

  const int64_t t0 = Clock::Real().NowNanos();
  auto model = runtime::LlamaModel::Load(dir, rt);
  if (!model.ok()) {
    err << "collmctl: " << model.status().message() << "\n";
    return model.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  auto tokenizer = runtime::Tokenizer::Load(dir + "/tokenizer.model");
  if (!tokenizer.ok()) {
    err << "collmctl: " << tokenizer.status().message() << "\n";
    return 1;
  }
  const int64_t t_loaded = Clock::Real().NowNanos();

  runtime::GenerationRequest request;
  request.prompt = (*tokenizer)->Encode(args.prompt, /*add_bos=*/!args.no_bos);
  request.params.temperature = args.temperature;
  request.params.top_k = args.top_k;
  request.params.top_p = args.top_p;
  request.params.min_p = args.min_p;
  request.params.repetition_penalty = args.repetition_penalty;
  request.params.seed = args.seed;
  request.params.max_tokens = args.max_tokens;
  request.params.stop = args.stop;
  request.params.ignore_eos = args.ignore_eos;
  if (absl::Status s = request.params.Validate(); !s.ok()) {
    err << "collmctl: " << s.message() << "\n";
    return 2;
  }

  runtime::LoraWeights adapter_weights;
  if (!args.adapter_dir.empty()) {
    auto adapter = lora::ReadPeftAdapter(args.adapter_dir, (*model)->config());
    if (!adapter.ok()) {
      err << "collmctl: " << adapter.status().message() << "\n";
      return 2;
    }
    auto weights = adapter->ToWeights((*model)->config(), (*model)->runtime());
    if (!weights.ok()) {
      err << "collmctl: " << weights.status().message() << "\n";
      return 1;
    }
    adapter_weights = std::move(*weights);
    request.adapter = &adapter_weights;
    err << "collmctl: serving adapter " << args.adapter_dir << " unmerged (rank "
        << adapter->config.rank << ")\n";
  }

  runtime::Generator generator(*model, tokenizer->get());
  auto results = generator.Generate(
      {request}, [&](size_t, const std::string& delta) { out << delta << std::flush; });
  if (!results.ok()) {
    err << "\ncollmctl: " << results.status().message() << "\n";
    return results.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  out << "\n" << std::flush;
  const runtime::GenerationResult& r = (*results)[0];
  const double load_s = (t_loaded - t0) * 1e-9;
  const double decode_s = r.total_seconds - r.ttft_seconds;
  const size_t n = r.tokens.size();
  err << std::fixed << std::setprecision(1) << "collmctl: load " << load_s * 1e3 << " ms; prompt "
      << request.prompt.size() << " tokens, prefill " << r.ttft_seconds * 1e3 << " ms ("
      << request.prompt.size() / std::max(r.ttft_seconds, 1e-9) << " tok/s); generated " << n
      << " tokens, decode " << decode_s * 1e3 << " ms ("
      << (n > 1 ? (n - 1) / std::max(decode_s, 1e-9) : 0.0) << " tok/s); finish "
      << runtime::FinishReasonName(r.finish_reason) << "\n";
  return 0;
}

void AddGenerateCommand(CLI::App& app, GenerateArgs& args, int& exit_code) {
  CLI::App* cmd = app.add_subcommand("generate", "Generate text locally from a prompt");
  cmd->add_option("--model", args.model_dir,
                  "Hugging Face model directory (default: the built-in tiny random model)");
  cmd->add_option("--adapter", args.adapter_dir, "PEFT LoRA adapter directory, served unmerged");
  cmd->add_option("--daemon", args.daemon, "host:port of a running collmd to stream from");
  cmd->add_option("--adapter-name", args.adapter_name, "With --daemon: adapter name to use");
  cmd->add_option("--prompt,-p", args.prompt, "Prompt text")->capture_default_str();
  cmd->add_option("--max-tokens,-n", args.max_tokens, "Tokens to generate at most")
      ->capture_default_str();
  cmd->add_option("--temperature,-t", args.temperature, "Sampling temperature; 0 = greedy")
      ->capture_default_str();
  cmd->add_option("--top-k", args.top_k, "Top-k (0 = off)")->capture_default_str();
  cmd->add_option("--top-p", args.top_p, "Nucleus mass (1 = off)")->capture_default_str();
  cmd->add_option("--min-p", args.min_p, "Min-p relative to the top token (0 = off)")
      ->capture_default_str();
  cmd->add_option("--repeat-penalty", args.repetition_penalty, "Repetition penalty (1 = off)")
      ->capture_default_str();
  cmd->add_option("--seed,-s", args.seed, "Sampling seed")->capture_default_str();
  cmd->add_option("--stop", args.stop, "Stop string (repeatable)");
  cmd->add_flag("--no-bos", args.no_bos, "Do not prepend BOS to the prompt");
  cmd->add_flag("--ignore-eos", args.ignore_eos, "Keep generating past EOS");
  cmd->add_option("--device", args.device, "cpu or cuda[:N]")->capture_default_str();
  cmd->add_option("--dtype", args.dtype, "auto, f32, bf16 or f16")->capture_default_str();
  cmd->add_option("--weights", args.weights, "Base weights: f32, int8 or int4 (quantized at load)")
      ->capture_default_str();
  cmd->add_option("--threads", args.threads, "Intra-op threads (0 = default)");
  cmd->callback([&]() { exit_code = RunGenerate(args, std::cout, std::cerr); });
}

}  // namespace collm::cli
