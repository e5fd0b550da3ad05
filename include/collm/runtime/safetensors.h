// Reading and writing the safetensors format (https://huggingface.co/docs/safetensors), without
// torch. Files are untrusted: every offset, shape and dtype in the header is validated against the
// real file size before any byte of tensor data is touched, and every error names the file and,
// where there is one, the tensor.
#ifndef COLLM_RUNTIME_SAFETENSORS_H_
#define COLLM_RUNTIME_SAFETENSORS_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace collm::runtime {

// Element types collm reads from and writes to checkpoints.
enum class StoredDType { kF32, kF16, kBF16 };

// "F32", "F16", "BF16" (the safetensors spelling).
const char* StoredDTypeName(StoredDType dtype);
size_t StoredDTypeSize(StoredDType dtype);
// Parses the safetensors spelling; any other dtype (I64, F64, U8, ...) is InvalidArgument.
absl::StatusOr<StoredDType> ParseStoredDType(absl::string_view name);

// A borrowed view of one tensor's bytes inside a mapped file. Valid while the file that produced
// it is alive. `data` may be unaligned: read it with memcpy or the converters below.
struct TensorView {
  std::string name;
  std::string file;  // Path of the file holding it, for error messages.
  StoredDType dtype = StoredDType::kF32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  size_t nbytes = 0;

  int64_t numel() const;
};

// Converts `view` elementwise to float32 into out[0, view.numel()).
// REQUIRES: out has room for view.numel() floats.
void ConvertToFloat32(const TensorView& view, float* out);

// IEEE half / bfloat16 bit conversions (round-to-nearest-even on the way down).
float HalfToFloat(uint16_t bits);
float BFloat16ToFloat(uint16_t bits);
uint16_t FloatToHalf(float value);
uint16_t FloatToBFloat16(float value);

// One memory-mapped .safetensors file. Immutable after Open; thread-safe.
class SafetensorsFile {
 public:
  // Maps `path` read-only and validates the whole header: length prefix within the file, JSON
  // well-formed, every entry with a known dtype, non-negative shape, data_offsets in order, inside
  // the data section and of exactly numel * element size bytes. Errors name the file and tensor.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  // The same format and the same validation for an image held in memory (e.g. received over the
  // network). The object keeps `bytes`; `what` stands in for the path in errors and in path().
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> FromBytes(std::string bytes,
                                                                    const std::string& what);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // The optional "__metadata__" string map.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Names in file order of their data offsets.
  std::vector<std::string> TensorNames() const;
  bool Contains(absl::string_view name) const;
  // NotFound naming the file and tensor when absent.
  absl::StatusOr<TensorView> Get(absl::string_view name) const;

 private:
  SafetensorsFile() = default;
  // Validates the header of the image [base, base + size) and indexes its tensors.
  absl::Status Parse(const uint8_t* base, uint64_t size);

  std::string path_;
  std::string bytes_;  // The image, for FromBytes (Open maps the file instead).
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::map<std::string, std::string> metadata_;
  std::map<std::string, TensorView, std::less<>> tensors_;
};

// A model's weights: either `model.safetensors` or the shards listed by
// `model.safetensors.index.json` (its "weight_map": tensor name -> shard file name in the same
// directory). Immutable after Open; thread-safe.
class SafetensorsCheckpoint {
 public:
  // Opens `dir`. Shard names must be plain file names inside `dir` (no '/', no ".."): the index
  // is untrusted too. A tensor listed in the index but absent from its shard is an error.
  static absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> Open(const std::string& dir);

  std::vector<std::string> TensorNames() const;
  bool Contains(absl::string_view name) const;
  // NotFound naming the checkpoint and tensor when absent.
  absl::StatusOr<TensorView> Get(absl::string_view name) const;
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*, std::less<>> by_name_;
};

// A tensor to write. `data` holds numel * element-size bytes of `dtype` in row-major order.
struct TensorToWrite {
  std::string name;
  StoredDType dtype = StoredDType::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
};

// Writes a safetensors file atomically (temporary file in the same directory, fsync, rename), with
// the header padded so the data section starts 8-byte aligned. Duplicate or empty names are
// InvalidArgument.
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata = {});
// The exact bytes WriteSafetensors would write, in memory. Errors as WriteSafetensors, naming
// `what` where it names the path.
absl::StatusOr<std::string> SerializeSafetensors(
    const std::vector<TensorToWrite>& tensors,
    const std::map<std::string, std::string>& metadata = {},
    const std::string& what = "safetensors image");

}  // namespace collm::runtime

#endif  // COLLM_RUNTIME_SAFETENSORS_H_
