// A scripted collm.v1.FederationService for tests of the device side (FlClient, collmd): a real
// gRPC server on 127.0.0.1 that hands out the tasks and global versions a test sets and records
// what devices send. Not an aggregator: no rounds, no aggregation (that is collm-aggregator's).
#ifndef COLLM_TESTING_SCRIPTED_AGGREGATOR_H_
#define COLLM_TESTING_SCRIPTED_AGGREGATOR_H_

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "collm/federation/fingerprint.h"
#include "collm/lora/peft_io.h"
#include "collm/v1/federation.grpc.pb.h"

namespace collm::testing {

namespace fl_v1 = ::collm::v1;

inline int64_t UnixMillis() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

struct Upload {
  fl_v1::UpdateHeader header;
  std::string data;
  int chunks = 0;
};

// The scripted aggregator. Thread-safe (gRPC calls it from its threads).
class ScriptedAggregator final : public fl_v1::FederationService::Service {
 public:
  std::mutex mu;
  std::map<int64_t, lora::PeftBlob> globals;  // version -> blob.
  std::optional<fl_v1::RoundTask> task;
  std::map<std::string, int64_t> sessions;  // session -> device registrations.
  std::vector<Upload> uploads;
  std::vector<fl_v1::DeviceTelemetry> telemetry;
  std::vector<fl_v1::DeviceCapabilities> registered;
  std::string reject_reason;  // Non-empty: refuse uploads with it.
  bool corrupt_sha = false;
  int64_t fetch_chunk = 700;
  int64_t fetches = 0;
  double training_share = 0;

  int64_t Newest() const { return globals.empty() ? 0 : globals.rbegin()->first; }

  grpc::Status Register(grpc::ServerContext*, const fl_v1::RegisterRequest* req,
                        fl_v1::RegisterResponse* resp) override {
    std::lock_guard<std::mutex> lock(mu);
    const std::string session = absl::StrCat("s", sessions.size() + 1);
    sessions[session] = 1;
    registered.push_back(req->capabilities());
    resp->set_session(session);
    resp->set_heartbeat_interval_ms(50);
    resp->set_global_version(Newest());
    return grpc::Status::OK;
  }

  grpc::Status Heartbeat(grpc::ServerContext*, const fl_v1::HeartbeatRequest* req,
                         fl_v1::HeartbeatResponse* resp) override {
    std::lock_guard<std::mutex> lock(mu);
    if (!sessions.count(req->session())) {
      resp->set_reregister(true);
      return grpc::Status::OK;
    }
    telemetry.push_back(req->telemetry());
    resp->set_global_version(Newest());
    resp->set_training_share(training_share);
    if (task) *resp->mutable_task() = *task;
    return grpc::Status::OK;
  }

  grpc::Status UploadUpdate(grpc::ServerContext*, grpc::ServerReader<fl_v1::UpdateChunk>* reader,
                            fl_v1::UploadResponse* resp) override {
    Upload u;
    fl_v1::UpdateChunk chunk;
    while (reader->Read(&chunk)) {
      if (chunk.has_header()) {
        u.header = chunk.header();
      } else {
        u.data += chunk.data();
        ++u.chunks;
      }
    }
    std::lock_guard<std::mutex> lock(mu);
    const bool sha_ok = federation::Sha256Hex(u.data) == u.header.adapter().sha256();
    uploads.push_back(u);
    if (!sha_ok) {
      resp->set_reason("sha256 mismatch");
    } else if (!reject_reason.empty()) {
      resp->set_reason(reject_reason);
    } else {
      resp->set_accepted(true);
      task.reset();  // Uploaded: no open task for this device any more.
    }
    return grpc::Status::OK;
  }

  grpc::Status FetchGlobal(grpc::ServerContext*, const fl_v1::FetchGlobalRequest* req,
                           grpc::ServerWriter<fl_v1::AdapterChunk>* writer) override {
    lora::PeftBlob blob;
    fl_v1::AdapterChunk head;
    int64_t chunk_size;
    {
      std::lock_guard<std::mutex> lock(mu);
      ++fetches;
      const int64_t v = req->version() == 0 ? Newest() : req->version();
      if (!globals.count(v)) return grpc::Status(grpc::StatusCode::NOT_FOUND, "no such version");
      blob = globals[v];
      head.mutable_header()->set_version(v);
      head.mutable_header()->set_sha256(corrupt_sha ? std::string(64, '0')
                                                    : federation::Sha256Hex(blob.safetensors));
      chunk_size = fetch_chunk;
    }
    head.mutable_header()->set_config_json(blob.config_json);
    head.mutable_header()->set_safetensors_bytes(static_cast<int64_t>(blob.safetensors.size()));
    writer->Write(head);
    for (size_t off = 0; off < blob.safetensors.size(); off += chunk_size) {
      fl_v1::AdapterChunk c;
      c.set_data(blob.safetensors.substr(off, chunk_size));
      writer->Write(c);
    }
    return grpc::Status::OK;
  }
};

class Server {
 public:
  // port 0 = pick one.
  Server(ScriptedAggregator* service, int port) {
    grpc::ServerBuilder b;
    b.AddListeningPort(absl::StrCat("127.0.0.1:", port), grpc::InsecureServerCredentials(), &port_);
    b.RegisterService(service);
    server_ = b.BuildAndStart();
  }
  ~Server() { Stop(); }
  void Stop() {
    if (server_)
      server_->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
    server_.reset();
  }
  int port() const { return port_; }
  bool ok() const { return server_ != nullptr; }

 private:
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
};

}  // namespace collm::testing

#endif  // COLLM_TESTING_SCRIPTED_AGGREGATOR_H_
