#include "collm/federation/state_store.h"

#include <fcntl.h>
#include <google/protobuf/util/json_util.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "collm/common/file_io.h"
#include "collm/common/logging.h"
#include "collm/common/status.h"
#include "collm/lora/peft_io.h"
#include "collm/runtime/safetensors.h"

namespace collm::federation {
namespace {

namespace fs = std::filesystem;

constexpr char kOptimizerFile[] = "server_optimizer.safetensors";
constexpr char kUploadShaFile[] = "upload.sha256";

std::string ErrnoMessage() { return std::strerror(errno); }

absl::StatusOr<std::string> ToJson(const google::protobuf::Message& message) {
  std::string out;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.preserve_proto_field_names = true;
  auto s = google::protobuf::util::MessageToJsonString(message, &out, options);
  if (!s.ok()) return absl::InternalError(std::string(s.message()));
  return out;
}

// Reads and parses one JSON state file; DataLoss naming the file when it is unreadable or corrupt.
absl::Status ReadJson(const std::string& path, google::protobuf::Message* message) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::DataLossError(absl::StrCat(path, ": cannot read: ", ErrnoMessage()));
  std::stringstream ss;
  ss << in.rdbuf();
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = true;  // Newer aggregators may add fields.
  auto s = google::protobuf::util::JsonStringToMessage(ss.str(), message, options);
  if (!s.ok()) {
    return absl::DataLossError(absl::StrCat(path, ": corrupt state file (",
                                            std::string(s.message()),
                                            "); restore it from a backup or remove the state dir"));
  }
  return absl::OkStatus();
}

absl::Status SaveJson(const std::string& path, const google::protobuf::Message& message) {
  COLLM_ASSIGN_OR_RETURN(std::string text, ToJson(message));
  return WriteFileAtomically(path, text);
}

absl::Status MakeDirs(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat(dir, ": cannot create: ", ec.message()));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<StateStore>> StateStore::Open(const std::string& dir) {
  if (dir.empty()) return absl::InvalidArgumentError("state_dir must not be empty");
  COLLM_RETURN_IF_ERROR(MakeDirs(dir));
  COLLM_RETURN_IF_ERROR(MakeDirs(dir + "/rounds"));
  COLLM_RETURN_IF_ERROR(MakeDirs(dir + "/globals"));
  return std::unique_ptr<StateStore>(new StateStore(dir));
}

bool StateStore::Empty() const { return !fs::exists(dir_ + "/status.json"); }

std::string StateStore::GlobalDir(int64_t version) const {
  return absl::StrCat(dir_, "/globals/v", version);
}

absl::Status StateStore::SaveStatus(const v1::FederationStatus& status) {
  v1::FederationStatus copy = status;
  copy.clear_policy();
  return SaveJson(dir_ + "/status.json", copy);
}

absl::Status StateStore::SavePolicy(const v1::FederationPolicy& policy) {
  return SaveJson(dir_ + "/policy.json", policy);
}

absl::Status StateStore::SaveDevices(const std::vector<v1::DeviceInfo>& devices) {
  v1::ListDevicesResponse list;
  for (const auto& d : devices) *list.add_devices() = d;
  return SaveJson(dir_ + "/devices.json", list);
}

absl::Status StateStore::SaveSessions(const std::map<std::string, std::string>& session_by_device) {
  v1::DeviceSessions file;
  file.mutable_session_by_device()->insert(session_by_device.begin(), session_by_device.end());
  return SaveJson(dir_ + "/sessions.json", file);
}

absl::Status StateStore::SaveRound(const v1::RoundInfo& round) {
  const std::string dir = absl::StrCat(dir_, "/rounds/", round.round());
  COLLM_RETURN_IF_ERROR(MakeDirs(dir));
  return SaveJson(dir + "/round.json", round);
}

absl::Status StateStore::SaveUpdate(int64_t round, const std::string& device_id,
                                    const lora::LoraAdapter& adapter, const std::string& sha256) {
  const std::string dir = absl::StrCat(dir_, "/rounds/", round, "/updates/", device_id);
  COLLM_RETURN_IF_ERROR(lora::WritePeftAdapter(dir, adapter));
  return WriteFileAtomically(absl::StrCat(dir, "/", kUploadShaFile), sha256);
}

absl::Status StateStore::SaveGlobal(int64_t version, const lora::LoraAdapter& adapter) {
  return lora::WritePeftAdapter(GlobalDir(version), adapter);
}

absl::Status StateStore::SaveOptimizer(int64_t version, const ServerOptimizerState& state) {
  COLLM_RETURN_IF_ERROR(MakeDirs(GlobalDir(version)));
  std::vector<at::Tensor> keep;  // Contiguous f32 copies alive until written.
  std::vector<runtime::TensorToWrite> tensors;
  for (const auto* group : {&state.m, &state.v}) {
    const char* prefix = group == &state.m ? "m/" : "v/";
    for (const auto& [name, t] : *group) {
      keep.push_back(t.detach().to(torch::kFloat32).contiguous());
      tensors.push_back({absl::StrCat(prefix, name), runtime::StoredDType::kF32,
                         keep.back().sizes().vec(), keep.back().data_ptr()});
    }
  }
  return runtime::WriteSafetensors(GlobalDir(version) + "/" + kOptimizerFile, tensors,
                                   {{"steps", absl::StrCat(state.steps)}});
}

absl::StatusOr<lora::LoraAdapter> StateStore::ReadGlobal(int64_t version,
                                                         const runtime::ModelConfig& model) const {
  const std::string dir = GlobalDir(version);
  if (!fs::exists(dir + "/adapter_config.json")) {
    return absl::NotFoundError(
        absl::StrCat("global version ", version, " is not stored (", dir, " is missing)"));
  }
  auto adapter = lora::ReadPeftAdapter(dir, model);
  if (!adapter.ok()) {
    return absl::DataLossError(
        absl::StrCat("global version ", version, ": ", adapter.status().message()));
  }
  return adapter;
}

void StateStore::ReconcileWithRounds(FederationState* state) const {
  v1::FederationStatus& status = state->status;
  int64_t completed = 0, accepted = 0, newest_round = status.current_round();
  int64_t result_version = 0;
  for (const v1::RoundInfo& r : state->rounds) {
    accepted += r.updates_size();
    newest_round = std::max<int64_t>(newest_round, r.round());
    if (r.state() != "done") continue;
    ++completed;
    result_version = std::max<int64_t>(result_version, r.result_version());
  }
  // A kill after a round closed (round.json "done") but before status.json took the new version:
  // the version is on disk (written before the round closed), so it is the current one; leaving
  // the old one would let the next round overwrite it.
  if (result_version > status.global_version()) {
    COLLM_LOG_WARN("{}/status.json has global version {}, the round log {}: resuming from {}", dir_,
                   status.global_version(), result_version, result_version);
    status.set_global_version(result_version);
  }
  // Counters only rise: status.json lags the round log after a kill between their writes.
  status.set_current_round(newest_round);
  status.set_rounds_completed(std::max(status.rounds_completed(), completed));
  status.set_updates_accepted(std::max(status.updates_accepted(), accepted));
}

absl::StatusOr<FederationState> StateStore::Load(const runtime::ModelConfig& model) const {
  FederationState state;
  COLLM_RETURN_IF_ERROR(ReadJson(dir_ + "/status.json", &state.status));
  if (fs::exists(dir_ + "/policy.json")) {
    COLLM_RETURN_IF_ERROR(ReadJson(dir_ + "/policy.json", &state.policy));
  }
  if (fs::exists(dir_ + "/devices.json")) {
    v1::ListDevicesResponse list;
    COLLM_RETURN_IF_ERROR(ReadJson(dir_ + "/devices.json", &list));
    state.devices.assign(list.devices().begin(), list.devices().end());
  }
  // Absent in state dirs written before sessions were persisted: those devices register again.
  if (fs::exists(dir_ + "/sessions.json")) {
    v1::DeviceSessions file;
    COLLM_RETURN_IF_ERROR(ReadJson(dir_ + "/sessions.json", &file));
    state.sessions.insert(file.session_by_device().begin(), file.session_by_device().end());
  }
  // Round directories are named by number; anything else (including a directory created just
  // before a crash, without its round.json yet) is not a round.
  std::map<int64_t, std::string> round_dirs;
  for (const auto& entry : fs::directory_iterator(dir_ + "/rounds")) {
    int64_t n = 0;
    if (!entry.is_directory() || !absl::SimpleAtoi(entry.path().filename().string(), &n)) continue;
    if (!fs::exists(entry.path() / "round.json")) continue;
    round_dirs[n] = entry.path().string();
  }
  for (const auto& [n, dir] : round_dirs) {
    v1::RoundInfo round;
    COLLM_RETURN_IF_ERROR(ReadJson(dir + "/round.json", &round));
    if (round.round() != n) {
      return absl::DataLossError(absl::StrCat(dir, "/round.json: says round ", round.round(),
                                              " but lies in the directory of round ", n));
    }
    for (const auto& u : round.updates()) {
      // Absent for updates stored before it was: their re-sends are refused as duplicates.
      std::ifstream sha(absl::StrCat(dir, "/updates/", u.device_id(), "/", kUploadShaFile));
      std::string hex;
      if (sha >> hex) state.update_sha256[{n, u.device_id()}] = hex;
    }
    if (round.state() == "collecting" || round.state() == "aggregating") {
      auto& updates = state.open_updates[n];
      for (const auto& u : round.updates()) {
        const std::string udir = absl::StrCat(dir, "/updates/", u.device_id());
        auto adapter = lora::ReadPeftAdapter(udir, model);
        if (!adapter.ok()) {
          return absl::DataLossError(absl::StrCat(dir, "/round.json lists the update from ",
                                                  u.device_id(), " but ", udir,
                                                  " cannot be read: ", adapter.status().message()));
        }
        updates.emplace(u.device_id(), std::move(*adapter));
      }
    }
    state.rounds.push_back(std::move(round));
  }
  ReconcileWithRounds(&state);
  COLLM_ASSIGN_OR_RETURN(state.global, ReadGlobal(state.status.global_version(), model));
  // The moments that produced the current global version; state dirs written before they were
  // kept per version have one file at the top.
  std::string opt_path =
      absl::StrCat(GlobalDir(state.status.global_version()), "/", kOptimizerFile);
  if (!fs::exists(opt_path)) opt_path = absl::StrCat(dir_, "/", kOptimizerFile);
  if (fs::exists(opt_path)) {
    auto file = runtime::SafetensorsFile::Open(opt_path);
    if (!file.ok()) return absl::DataLossError(std::string(file.status().message()));
    const auto& meta = (*file)->metadata();
    if (auto it = meta.find("steps"); it != meta.end()) {
      if (!absl::SimpleAtoi(it->second, &state.optimizer.steps)) {
        return absl::DataLossError(
            absl::StrCat(opt_path, ": bad 'steps' metadata '", it->second, "'"));
      }
    }
    for (const std::string& name : (*file)->TensorNames()) {
      COLLM_ASSIGN_OR_RETURN(runtime::TensorView view, (*file)->Get(name));
      at::Tensor t = torch::empty(view.shape, torch::kFloat32);
      runtime::ConvertToFloat32(view, t.data_ptr<float>());
      if (absl::StartsWith(name, "m/")) {
        state.optimizer.m[name.substr(2)] = t;
      } else if (absl::StartsWith(name, "v/")) {
        state.optimizer.v[name.substr(2)] = t;
      } else {
        return absl::DataLossError(absl::StrCat(opt_path, ": unexpected tensor '", name, "'"));
      }
    }
  }
  return state;
}

}  // namespace collm::federation
