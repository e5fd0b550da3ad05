#include "collm/federation/adapter_stream.h"

#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "collm/federation/fingerprint.h"

namespace collm::federation {

v1::AdapterBlobHeader DescribeAdapter(const lora::PeftBlob& blob) {
  v1::AdapterBlobHeader h;
  h.set_config_json(blob.config_json);
  h.set_safetensors_bytes(static_cast<int64_t>(blob.safetensors.size()));
  h.set_sha256(Sha256Hex(blob.safetensors));
  return h;
}

bool WriteAdapterChunks(absl::string_view payload, int64_t chunk_bytes,
                        const std::function<bool(std::string)>& write) {
  const size_t step = static_cast<size_t>(chunk_bytes);
  for (size_t off = 0; off < payload.size(); off += step) {
    if (!write(std::string(payload.substr(off, step)))) return false;
  }
  return true;
}

AdapterReceiver::AdapterReceiver(const v1::AdapterBlobHeader& header, std::string what)
    : what_(std::move(what)),
      announced_(header.safetensors_bytes()),
      sha256_(absl::AsciiStrToLower(header.sha256())) {
  blob_.config_json = header.config_json();
}

absl::StatusOr<AdapterReceiver> AdapterReceiver::Begin(const v1::AdapterBlobHeader& header,
                                                       int64_t max_bytes, std::string what) {
  const int64_t announced = header.safetensors_bytes();
  if (announced < 0 || announced > max_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": the header announces ", announced,
                                                   " bytes; the limit is ", max_bytes));
  }
  AdapterReceiver r(header, std::move(what));
  // Checked above, so a lying header cannot make this allocate more than the limit.
  r.blob_.safetensors.reserve(static_cast<size_t>(announced));
  return r;
}

absl::Status AdapterReceiver::Add(absl::string_view data) {
  if (static_cast<int64_t>(data.size()) > announced_ - received_bytes()) {
    return absl::DataLossError(
        absl::StrCat(what_, ": more than the announced ", announced_, " bytes"));
  }
  blob_.safetensors.append(data.data(), data.size());
  return absl::OkStatus();
}

absl::StatusOr<lora::PeftBlob> AdapterReceiver::Finish() && {
  if (received_bytes() != announced_) {
    return absl::DataLossError(absl::StrCat(what_, ": got ", received_bytes(),
                                            " bytes, the header announced ", announced_));
  }
  const std::string digest = Sha256Hex(blob_.safetensors);
  if (digest != sha256_) {
    return absl::DataLossError(absl::StrCat(what_, ": sha256 mismatch (got ", digest,
                                            ", the header says '", sha256_, "')"));
  }
  return std::move(blob_);
}

absl::Status AdapterChunkReader::Add(const v1::AdapterChunk& chunk) {
  if (receiver_.has_value()) {
    if (chunk.has_header()) return absl::DataLossError(call_ + ": a second header in the stream");
    return receiver_->Add(chunk.data());
  }
  if (!chunk.has_header()) return absl::DataLossError(call_ + ": the first message has no header");
  header_ = chunk.header();
  absl::StatusOr<AdapterReceiver> r = AdapterReceiver::Begin(
      header_, max_bytes_, absl::StrCat("global version ", header_.version()));
  // The peer sent an impossible size: a broken transfer like any other, for the reader.
  if (!r.ok()) return absl::DataLossError(r.status().message());
  receiver_.emplace(*std::move(r));
  return absl::OkStatus();
}

absl::StatusOr<lora::PeftBlob> AdapterChunkReader::Finish() && {
  if (!receiver_.has_value()) return absl::DataLossError(call_ + ": empty stream");
  return std::move(*receiver_).Finish();
}

}  // namespace collm::federation
