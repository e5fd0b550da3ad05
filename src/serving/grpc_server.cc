#include "collm/serving/grpc_server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/impl/server_builder_option.h>
#include <grpcpp/impl/server_builder_plugin.h>
#include <grpcpp/impl/server_initializer.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace collm::serving {
namespace {

// grpc::Service does not expose its name, but the server lists the names of what it registered
// to builder plugins; this option installs a plugin that copies that list out.
class ServiceNamesPlugin final : public grpc::ServerBuilderPlugin {
 public:
  explicit ServiceNamesPlugin(std::vector<std::string>* names) : names_(names) {}
  std::string name() override { return "collm_service_names"; }
  void InitServer(grpc::ServerInitializer* /*si*/) override {}
  void Finish(grpc::ServerInitializer* si) override {
    if (const std::vector<std::string>* list = si->GetServiceList()) *names_ = *list;
  }
  void ChangeArguments(const std::string& /*name*/, void* /*value*/) override {}

 private:
  std::vector<std::string>* const names_;
};

class ServiceNamesOption final : public grpc::ServerBuilderOption {
 public:
  explicit ServiceNamesOption(std::vector<std::string>* names) : names_(names) {}
  void UpdateArguments(grpc::ChannelArguments* /*args*/) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    plugins->push_back(std::make_unique<ServiceNamesPlugin>(names_));
  }

 private:
  std::vector<std::string>* const names_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<GrpcServer>> GrpcServer::Start(
    const GrpcServerOptions& options, const std::vector<grpc::Service*>& services) {
  if (options.max_message_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_message_bytes must be > 0, got ", options.max_message_bytes));
  }
  // Both are process-wide switches read by every ServerBuilder built afterwards.
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();

  std::unique_ptr<GrpcServer> server(new GrpcServer());
  grpc::ServerBuilder builder;
  int selected_port = 0;
  builder.AddListeningPort(
      options.address,
      options.credentials ? options.credentials : grpc::InsecureServerCredentials(),
      &selected_port);
  const int max_bytes = static_cast<int>(std::min<int64_t>(options.max_message_bytes, INT_MAX));
  builder.SetMaxReceiveMessageSize(max_bytes);
  builder.SetMaxSendMessageSize(max_bytes);
  for (grpc::Service* service : services) {
    if (service == nullptr) continue;
    builder.RegisterService(service);
  }
  builder.SetOption(std::make_unique<ServiceNamesOption>(&server->service_names_));
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || selected_port == 0) {
    if (server->server_ != nullptr) server->server_->Shutdown();
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.address));
  }
  server->port_ = selected_port;
  server->SetServing(false);
  return server;
}

GrpcServer::~GrpcServer() { Shutdown(0); }

std::shared_ptr<grpc::Channel> GrpcServer::InProcessChannel() {
  std::lock_guard<std::mutex> lock(mu_);
  if (server_ == nullptr) return nullptr;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);  // The server enforces its own limits.
  args.SetMaxSendMessageSize(-1);
  return server_->InProcessChannel(args);
}

void GrpcServer::SetServing(bool serving) {
  std::lock_guard<std::mutex> lock(mu_);
  if (server_ == nullptr) return;
  grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
  if (health == nullptr) return;
  health->SetServingStatus("", serving);
  for (const std::string& name : service_names_) health->SetServingStatus(name, serving);
}

void GrpcServer::Shutdown(double grace_seconds) {
  std::unique_ptr<grpc::Server> server;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (shut_down_) return;
    shut_down_ = true;
    server = std::move(server_);
  }
  if (server == nullptr) return;
  // Health checks report NOT_SERVING while in-flight calls drain.
  if (auto* health = server->GetHealthCheckService()) health->Shutdown();
  const auto deadline = std::chrono::system_clock::now() +
                        std::chrono::duration_cast<std::chrono::system_clock::duration>(
                            std::chrono::duration<double>(grace_seconds > 0 ? grace_seconds : 0));
  server->Shutdown(deadline);
  server->Wait();
}

}  // namespace collm::serving
