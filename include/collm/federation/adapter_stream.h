// The chunked, sha256-checked adapter transfer of federation.proto, written once for every side:
// FetchGlobal / PullAdapter (aggregator -> device or collmctl) and UploadUpdate (device ->
// aggregator). A transfer is a header (AdapterBlobHeader: config_json, safetensors_bytes, sha256)
// followed by the safetensors bytes in data chunks. The sender describes and splits; the receiver
// checks the announced size against its limit before allocating, refuses bytes beyond the
// announced size, and on Finish checks the size and the sha256. The gRPC stream loops stay with
// the callers (server and client streams differ); only the bytes and their checks live here.
#ifndef COLLM_FEDERATION_ADAPTER_STREAM_H_
#define COLLM_FEDERATION_ADAPTER_STREAM_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "collm/lora/peft_io.h"
#include "collm/v1/federation.pb.h"

namespace collm::federation {

// The largest adapter a device or collmctl accepts from an aggregator: far above any LoRA of the
// models collm runs, small enough that a lying header cannot make a receiver allocate gigabytes.
constexpr int64_t kMaxReceivedAdapterBytes = int64_t{1} << 30;

// --- Sender ----------------------------------------------------------------------------------

// The header for `blob`: config_json, safetensors_bytes and sha256 set; version left to the
// caller.
v1::AdapterBlobHeader DescribeAdapter(const lora::PeftBlob& blob);

// Calls `write` with consecutive pieces of `payload`, each at most `chunk_bytes` long (none for an
// empty payload), stopping at the first false. Returns false when a write did.
// REQUIRES: chunk_bytes > 0.
bool WriteAdapterChunks(absl::string_view payload, int64_t chunk_bytes,
                        const std::function<bool(std::string)>& write);

// --- Receiver --------------------------------------------------------------------------------

// Collects one transfer's data chunks. Every error message starts with `what` (the transfer in the
// caller's words, e.g. "global version 3" or "update"); callers that answer a peer pass the
// message on. Owned by the thread reading the stream; not thread-safe; one per transfer.
class AdapterReceiver {
 public:
  // Checks the announced size: InvalidArgument "... announces N bytes; the limit is L" when it is
  // negative or above `max_bytes`. REQUIRES: max_bytes >= 0.
  static absl::StatusOr<AdapterReceiver> Begin(const v1::AdapterBlobHeader& header,
                                               int64_t max_bytes, std::string what);

  // Appends one data chunk; DataLoss when it would go past the announced size.
  absl::Status Add(absl::string_view data);

  // The blob, once the received size equals the announced one and the bytes hash to the header's
  // sha256 (DataLoss naming both otherwise).
  absl::StatusOr<lora::PeftBlob> Finish() &&;

  int64_t announced_bytes() const { return announced_; }
  int64_t received_bytes() const { return static_cast<int64_t>(blob_.safetensors.size()); }

 private:
  AdapterReceiver(const v1::AdapterBlobHeader& header, std::string what);

  std::string what_;
  int64_t announced_ = 0;
  std::string sha256_;
  lora::PeftBlob blob_;
};

// Reads a stream of AdapterChunk (FetchGlobal, PullAdapter: a global version going to a device or
// to collmctl): the first message must be the header, every later one data. Errors are DataLoss:
// "`call`: ..." for a stream out of order, "global version V: ..." for the bytes (AdapterReceiver's
// checks, the size limit included). Owned by the reading thread; not thread-safe.
class AdapterChunkReader {
 public:
  // `call` names the RPC in errors ("FetchGlobal"). REQUIRES: max_bytes >= 0.
  AdapterChunkReader(std::string call, int64_t max_bytes)
      : call_(std::move(call)), max_bytes_(max_bytes) {}

  absl::Status Add(const v1::AdapterChunk& chunk);
  // The blob once the stream is complete and checked; DataLoss for an empty stream.
  absl::StatusOr<lora::PeftBlob> Finish() &&;
  // The header (default until the first message).
  const v1::AdapterBlobHeader& header() const { return header_; }

 private:
  std::string call_;
  int64_t max_bytes_;
  v1::AdapterBlobHeader header_;
  std::optional<AdapterReceiver> receiver_;
};

}  // namespace collm::federation

#endif  // COLLM_FEDERATION_ADAPTER_STREAM_H_
