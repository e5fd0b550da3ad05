#include "collm/lora/adapter_registry.h"

#include "absl/strings/str_cat.h"
#include "collm/common/status.h"
#include "collm/lora/peft_io.h"

namespace collm::lora {

AdapterRegistry::AdapterRegistry(const runtime::ModelConfig& model,
                                 const runtime::ResolvedRuntime& runtime, Clock& clock,
                                 int keep_versions)
    : model_(model), runtime_(runtime), clock_(clock), keep_versions_(std::max(1, keep_versions)) {}

absl::StatusOr<std::shared_ptr<const AdapterSnapshot>> AdapterRegistry::Publish(
    const std::string& name, const LoraAdapter& adapter, const std::string& source,
    double held_out_loss) {
  if (name.empty()) return absl::InvalidArgumentError("adapter name must not be empty");
  COLLM_RETURN_IF_ERROR(Annotate(adapter.Validate(model_), absl::StrCat("adapter '", name, "'")));
  auto snapshot = std::make_shared<AdapterSnapshot>();
  snapshot->name = name;
  snapshot->adapter = adapter.Clone();
  COLLM_ASSIGN_OR_RETURN(snapshot->weights, snapshot->adapter.ToWeights(model_, runtime_));
  snapshot->source = source;
  snapshot->held_out_loss = held_out_loss;
  snapshot->published_nanos = clock_.NowNanos();

  std::lock_guard<std::mutex> lock(mu_);
  Entry& e = entries_[name];
  snapshot->version = e.next_version++;
  e.versions.push_back(std::move(snapshot));
  while (static_cast<int>(e.versions.size()) > keep_versions_) e.versions.pop_front();
  ++generation_;
  return e.versions.back();
}

absl::StatusOr<std::shared_ptr<const AdapterSnapshot>> AdapterRegistry::LoadPeft(
    const std::string& name, const std::string& dir) {
  COLLM_ASSIGN_OR_RETURN(LoraAdapter adapter, ReadPeftAdapter(dir, model_));
  return Publish(name, adapter, "peft:" + dir);
}

absl::StatusOr<std::shared_ptr<const AdapterSnapshot>> AdapterRegistry::Get(
    const std::string& name) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(name);
  if (it == entries_.end())
    return absl::NotFoundError(absl::StrCat("no adapter named '", name, "'"));
  return it->second.versions.back();
}

absl::StatusOr<std::shared_ptr<const AdapterSnapshot>> AdapterRegistry::GetVersion(
    const std::string& name, int64_t version) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(name);
  if (it != entries_.end()) {
    for (const auto& s : it->second.versions) {
      if (s->version == version) return s;
    }
  }
  return absl::NotFoundError(
      absl::StrCat("adapter '", name, "' version ", version, " is not kept"));
}

absl::StatusOr<std::shared_ptr<const AdapterSnapshot>> AdapterRegistry::Rollback(
    const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(name);
  if (it == entries_.end())
    return absl::NotFoundError(absl::StrCat("no adapter named '", name, "'"));
  if (it->second.versions.size() < 2) {
    return absl::FailedPreconditionError(
        absl::StrCat("adapter '", name, "' has no previous version to roll back to"));
  }
  it->second.versions.pop_back();
  ++generation_;
  return it->second.versions.back();
}

absl::Status AdapterRegistry::Unload(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  if (entries_.erase(name) == 0) {
    return absl::NotFoundError(absl::StrCat("no adapter named '", name, "'"));
  }
  ++generation_;
  return absl::OkStatus();
}

std::vector<AdapterInfo> AdapterRegistry::List() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<AdapterInfo> out;
  for (const auto& [name, e] : entries_) {
    const AdapterSnapshot& s = *e.versions.back();
    out.push_back({name, s.version, static_cast<int64_t>(e.versions.size()) - 1,
                   s.adapter.config.rank, s.source, s.held_out_loss});
  }
  return out;
}

int64_t AdapterRegistry::generation() const {
  std::lock_guard<std::mutex> lock(mu_);
  return generation_;
}

}  // namespace collm::lora
