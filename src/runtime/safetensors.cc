#include "collm/runtime/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "collm/common/file_io.h"
#include "collm/common/status.h"
#include "nlohmann/json.hpp"

namespace collm::runtime {
namespace {

using Json = nlohmann::json;

// Real headers are a few hundred KiB at most; the cap keeps a hostile length prefix from making
// us parse (and allocate for) gigabytes of JSON.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;
// A valid header nests three deep (root / entry / shape); the cap bounds the parser's memory on
// "[[[[..." bombs.
constexpr int kMaxJsonDepth = 16;
constexpr char kMetadataKey[] = "__metadata__";
constexpr char kSingleFileName[] = "model.safetensors";
constexpr char kIndexFileName[] = "model.safetensors.index.json";

std::string Quote(absl::string_view s) { return absl::StrCat("'", s, "'"); }

absl::Status FileError(absl::StatusCode code, absl::string_view path, absl::string_view what) {
  return absl::Status(code, absl::StrCat(path, ": ", what));
}

absl::Status TensorError(absl::string_view path, absl::string_view tensor, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", Quote(tensor), ": ", what));
}

absl::Status ErrnoError(int err, absl::string_view path, absl::string_view op) {
  return absl::Status(absl::ErrnoToStatusCode(err),
                      absl::StrCat(path, ": ", op, " failed: ", std::strerror(err)));
}

// Counts bracket nesting outside string literals. Cheaper than letting the parser build a
// pathologically deep tree first.
bool NestingWithin(absl::string_view text, int max_depth) {
  int depth = 0;
  bool in_string = false;
  bool escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth) return false;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return true;
}

// Parses untrusted JSON without exceptions. Returns a discarded value on syntax errors.
Json ParseJson(absl::string_view text) {
  return Json::parse(text.begin(), text.end(), /*cb=*/nullptr, /*allow_exceptions=*/false);
}

// JSON integers arrive as signed or unsigned; floats, bools and negatives are rejected here so
// callers see one uint64 range.
bool AsNonNegativeInt(const Json& value, uint64_t* out) {
  if (value.is_number_unsigned()) {
    *out = value.get<uint64_t>();
    return true;
  }
  if (value.is_number_integer()) {
    int64_t v = value.get<int64_t>();
    if (v < 0) return false;
    *out = static_cast<uint64_t>(v);
    return true;
  }
  return false;
}

uint64_t LoadLe64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

uint16_t LoadLe16(const uint8_t* p) {
  return static_cast<uint16_t>(p[0] | (static_cast<uint16_t>(p[1]) << 8));
}

// Shape -> element count and byte size, rejecting anything that does not fit in int64 / size_t.
absl::Status CheckedSizes(absl::string_view path, absl::string_view tensor,
                          const std::vector<int64_t>& shape, StoredDType dtype, uint64_t* numel,
                          uint64_t* nbytes) {
  uint64_t n = 1;
  for (int64_t dim : shape) {
    if (dim < 0) {
      return TensorError(path, tensor, absl::StrCat("negative dimension ", dim, " in shape"));
    }
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(dim), &n) ||
        n > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return TensorError(path, tensor, "element count overflows int64");
    }
  }
  uint64_t bytes = 0;
  if (__builtin_mul_overflow(n, static_cast<uint64_t>(StoredDTypeSize(dtype)), &bytes) ||
      bytes > std::numeric_limits<size_t>::max()) {
    return TensorError(path, tensor, "byte size overflows");
  }
  *numel = n;
  *nbytes = bytes;
  return absl::OkStatus();
}

// Closes a descriptor on every exit path of the readers.
class FdCloser {
 public:
  explicit FdCloser(int fd) : fd_(fd) {}
  ~FdCloser() {
    if (fd_ >= 0) ::close(fd_);
  }
  FdCloser(const FdCloser&) = delete;
  FdCloser& operator=(const FdCloser&) = delete;

 private:
  int fd_;
};

absl::StatusOr<std::string> ReadSmallFile(const std::string& path, uint64_t max_bytes) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError(errno, path, "open");
  FdCloser closer(fd);
  struct stat st;
  if (::fstat(fd, &st) != 0) return ErrnoError(errno, path, "fstat");
  if (!S_ISREG(st.st_mode)) {
    return FileError(absl::StatusCode::kInvalidArgument, path, "not a regular file");
  }
  if (static_cast<uint64_t>(st.st_size) > max_bytes) {
    return FileError(
        absl::StatusCode::kInvalidArgument, path,
        absl::StrCat("file is ", st.st_size, " bytes, more than the limit of ", max_bytes));
  }
  std::string contents(static_cast<size_t>(st.st_size), '\0');
  size_t done = 0;
  while (done < contents.size()) {
    ssize_t n = ::read(fd, &contents[done], contents.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(errno, path, "read");
    }
    if (n == 0) break;  // Shrunk underneath us; parse what we have.
    done += static_cast<size_t>(n);
  }
  contents.resize(done);
  return contents;
}

bool FileExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

std::string JoinPath(const std::string& dir, const std::string& name) {
  if (dir.empty() || dir.back() == '/') return dir + name;
  return absl::StrCat(dir, "/", name);
}

// The index is untrusted: a shard name must not escape the checkpoint directory.
absl::Status ValidateShardName(const std::string& index_path, const std::string& tensor,
                               const std::string& shard) {
  if (shard.empty() || shard.find('/') != std::string::npos ||
      shard.find('\\') != std::string::npos || shard.find("..") != std::string::npos ||
      shard.find('\0') != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat(index_path, ": tensor ", Quote(tensor), ": shard name ", Quote(shard),
                     " is not a plain file name in the checkpoint directory"));
  }
  return absl::OkStatus();
}

}  // namespace

const char* StoredDTypeName(StoredDType dtype) {
  switch (dtype) {
    case StoredDType::kF32:
      return "F32";
    case StoredDType::kF16:
      return "F16";
    case StoredDType::kBF16:
      return "BF16";
  }
  return "?";
}

size_t StoredDTypeSize(StoredDType dtype) {
  switch (dtype) {
    case StoredDType::kF32:
      return 4;
    case StoredDType::kF16:
    case StoredDType::kBF16:
      return 2;
  }
  return 0;
}

absl::StatusOr<StoredDType> ParseStoredDType(absl::string_view name) {
  if (name == "F32") return StoredDType::kF32;
  if (name == "F16") return StoredDType::kF16;
  if (name == "BF16") return StoredDType::kBF16;
  return absl::InvalidArgumentError(
      absl::StrCat("unsupported dtype ", Quote(name), " (supported: F32, F16, BF16)"));
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t dim : shape) n *= dim;
  return n;
}

float HalfToFloat(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1fu;
  const uint32_t mantissa = bits & 0x3ffu;
  uint32_t out;
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24 is exact in float.
    float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  } else if (exponent == 0x1f) {
    out = sign | 0x7f800000u | (mantissa << 13);  // Inf, or NaN keeping its payload.
  } else {
    out = sign | ((exponent + (127 - 15)) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &out, sizeof(f));
  return f;
}

float BFloat16ToFloat(uint16_t bits) {
  uint32_t out = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &out, sizeof(f));
  return f;
}

uint16_t FloatToHalf(float value) {
  uint32_t f;
  std::memcpy(&f, &value, sizeof(f));
  const uint16_t sign = static_cast<uint16_t>((f >> 16) & 0x8000u);
  const uint32_t abs = f & 0x7fffffffu;
  if (abs >= 0x7f800000u) {
    if (abs == 0x7f800000u) return sign | 0x7c00u;
    // Quiet bit set so a NaN whose payload lives only in the low bits stays a NaN.
    return static_cast<uint16_t>(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));
  }
  // 65520 is halfway between 65504 (max half) and 2^16; ties-to-even rounds it up to inf.
  if (abs >= 0x477ff000u) return sign | 0x7c00u;
  const uint32_t exponent = abs >> 23;
  if (exponent < 113) {
    // Result is a half subnormal (or zero): round(value * 2^24) with ties to even.
    const uint32_t shift = 126 - exponent;
    if (shift > 24) return sign;
    const uint32_t mantissa = (abs & 0x7fffffu) | 0x800000u;
    uint32_t q = mantissa >> shift;
    const uint32_t rem = mantissa & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return static_cast<uint16_t>(sign | q);
  }
  // Normal: rebias the exponent; a rounding carry into the exponent is exactly right.
  uint32_t h = ((exponent - 112) << 10) | ((abs >> 13) & 0x3ffu);
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

uint16_t FloatToBFloat16(float value) {
  uint32_t f;
  std::memcpy(&f, &value, sizeof(f));
  if ((f & 0x7fffffffu) > 0x7f800000u) {
    // Truncating could clear every payload bit and turn NaN into inf.
    return static_cast<uint16_t>((f >> 16) | 0x0040u);
  }
  f += 0x7fffu + ((f >> 16) & 1u);
  return static_cast<uint16_t>(f >> 16);
}

void ConvertToFloat32(const TensorView& view, float* out) {
  const size_t n = static_cast<size_t>(view.numel());
  // An empty tensor's buffers may be null (an empty vector's data(), a 0-element torch tensor's
  // data_ptr), and memcpy with a null pointer is undefined even for 0 bytes (found by
  // fuzz_safetensors under UBSan).
  if (n == 0) return;
  const uint8_t* p = view.data;
  switch (view.dtype) {
    case StoredDType::kF32:
      // safetensors is little-endian, as is every host collm targets.
      std::memcpy(out, p, n * sizeof(float));
      return;
    case StoredDType::kF16:
      for (size_t i = 0; i < n; ++i) out[i] = HalfToFloat(LoadLe16(p + 2 * i));
      return;
    case StoredDType::kBF16:
      for (size_t i = 0; i < n; ++i) out[i] = BFloat16ToFloat(LoadLe16(p + 2 * i));
      return;
  }
}

// ---------------------------------------------------------------------------------------------
// SafetensorsFile

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;

  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError(errno, path, "open");
  FdCloser closer(fd);
  struct stat st;
  if (::fstat(fd, &st) != 0) return ErrnoError(errno, path, "fstat");
  if (!S_ISREG(st.st_mode)) {
    return FileError(absl::StatusCode::kInvalidArgument, path, "not a regular file");
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    return FileError(absl::StatusCode::kInvalidArgument, path,
                     absl::StrCat("file is ", file_size,
                                  " bytes, too short for the 8-byte header length prefix"));
  }
  if (file_size > std::numeric_limits<size_t>::max()) {
    return FileError(absl::StatusCode::kInvalidArgument, path, "file too large to map");
  }
  void* map = ::mmap(nullptr, static_cast<size_t>(file_size), PROT_READ, MAP_PRIVATE, fd, 0);
  if (map == MAP_FAILED) return ErrnoError(errno, path, "mmap");
  // Owned from here on, so every error below unmaps via the destructor.
  file->map_ = map;
  file->map_size_ = static_cast<size_t>(file_size);
  COLLM_RETURN_IF_ERROR(file->Parse(static_cast<const uint8_t*>(map), file_size));
  return file;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::FromBytes(
    std::string bytes, const std::string& what) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = what;
  // Moved in before parsing: the views point into the member, not into the argument.
  file->bytes_ = std::move(bytes);
  const uint64_t size = file->bytes_.size();
  if (size < 8) {
    return FileError(
        absl::StatusCode::kInvalidArgument, what,
        absl::StrCat("image is ", size, " bytes, too short for the 8-byte header length prefix"));
  }
  COLLM_RETURN_IF_ERROR(file->Parse(reinterpret_cast<const uint8_t*>(file->bytes_.data()), size));
  return file;
}

absl::Status SafetensorsFile::Parse(const uint8_t* base, uint64_t file_size) {
  const std::string& path = path_;
  const uint64_t header_len = LoadLe64(base);
  if (header_len > kMaxHeaderBytes) {
    return FileError(absl::StatusCode::kInvalidArgument, path,
                     absl::StrCat("header length ", header_len, " exceeds the limit of ",
                                  kMaxHeaderBytes, " bytes"));
  }
  if (header_len > file_size - 8) {
    return FileError(absl::StatusCode::kInvalidArgument, path,
                     absl::StrCat("header length ", header_len, " exceeds the ", file_size - 8,
                                  " bytes after the length prefix (file truncated?)"));
  }
  const absl::string_view header_text(reinterpret_cast<const char*>(base + 8),
                                      static_cast<size_t>(header_len));
  if (!NestingWithin(header_text, kMaxJsonDepth)) {
    return FileError(absl::StatusCode::kInvalidArgument, path,
                     absl::StrCat("header JSON nests deeper than ", kMaxJsonDepth));
  }
  const Json header = ParseJson(header_text);
  if (header.is_discarded()) {
    return FileError(absl::StatusCode::kInvalidArgument, path, "header is not valid JSON");
  }
  if (!header.is_object()) {
    return FileError(absl::StatusCode::kInvalidArgument, path, "header is not a JSON object");
  }

  const uint64_t data_size = file_size - 8 - header_len;
  const uint8_t* data_base = base + 8 + header_len;
  struct Range {
    uint64_t begin, end;
    const std::string* name;
  };
  std::vector<Range> ranges;
  for (const auto& [name, entry] : header.items()) {
    if (name == kMetadataKey) {
      if (!entry.is_object()) {
        return FileError(absl::StatusCode::kInvalidArgument, path,
                         "__metadata__ is not a JSON object");
      }
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) {
          return FileError(
              absl::StatusCode::kInvalidArgument, path,
              absl::StrCat("__metadata__ value for key ", Quote(key), " is not a string"));
        }
        metadata_[key] = value.get<std::string>();
      }
      continue;
    }
    if (!entry.is_object()) return TensorError(path, name, "entry is not a JSON object");

    auto dtype_it = entry.find("dtype");
    if (dtype_it == entry.end() || !dtype_it->is_string()) {
      return TensorError(path, name, "missing or non-string \"dtype\"");
    }
    absl::StatusOr<StoredDType> dtype = ParseStoredDType(dtype_it->get<std::string>());
    if (!dtype.ok()) return TensorError(path, name, dtype.status().message());

    auto shape_it = entry.find("shape");
    if (shape_it == entry.end() || !shape_it->is_array()) {
      return TensorError(path, name, "missing or non-array \"shape\"");
    }
    std::vector<int64_t> shape;
    for (const Json& dim : *shape_it) {
      if (dim.is_number_integer() && !dim.is_number_unsigned() && dim.get<int64_t>() < 0) {
        return TensorError(path, name,
                           absl::StrCat("negative dimension ", dim.get<int64_t>(), " in shape"));
      }
      uint64_t d = 0;
      if (!AsNonNegativeInt(dim, &d) ||
          d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return TensorError(path, name,
                           absl::StrCat("shape entry ", dim.dump(), " is not an integer in range"));
      }
      shape.push_back(static_cast<int64_t>(d));
    }
    uint64_t numel = 0, nbytes = 0;
    COLLM_RETURN_IF_ERROR(CheckedSizes(path, name, shape, *dtype, &numel, &nbytes));

    auto offsets_it = entry.find("data_offsets");
    uint64_t begin = 0, end = 0;
    if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2 ||
        !AsNonNegativeInt((*offsets_it)[0], &begin) || !AsNonNegativeInt((*offsets_it)[1], &end)) {
      return TensorError(path, name,
                         "\"data_offsets\" must be an array of two non-negative integers");
    }
    if (begin > end) {
      return TensorError(path, name,
                         absl::StrCat("data_offsets [", begin, ", ", end, "] are out of order"));
    }
    if (end > data_size) {
      return TensorError(path, name,
                         absl::StrCat("data_offsets [", begin, ", ", end,
                                      "] run past the end of the data section (", data_size,
                                      " bytes; file truncated?)"));
    }
    if (end - begin != nbytes) {
      return TensorError(
          path, name,
          absl::StrCat("data_offsets [", begin, ", ", end, "] span ", end - begin,
                       " bytes but shape and dtype ", StoredDTypeName(*dtype), " need ", nbytes));
    }

    TensorView view;
    view.name = name;
    view.file = path;
    view.dtype = *dtype;
    view.shape = std::move(shape);
    view.data = data_base + begin;
    view.nbytes = static_cast<size_t>(nbytes);
    auto [it, inserted] = tensors_.emplace(name, std::move(view));
    (void)inserted;  // nlohmann keeps one value per key, so names are already unique.
    ranges.push_back(Range{begin, end, &it->first});
  }

  // Two tensors sharing bytes means the header lies about at least one of them.
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  const Range* prev = nullptr;
  for (const Range& r : ranges) {
    if (r.begin == r.end) continue;  // Empty tensors occupy no bytes.
    if (prev != nullptr && r.begin < prev->end) {
      return TensorError(
          path, *r.name,
          absl::StrCat("data_offsets [", r.begin, ", ", r.end, "] overlap those of tensor ",
                       Quote(*prev->name), " [", prev->begin, ", ", prev->end, "]"));
    }
    prev = &r;
  }
  return absl::OkStatus();
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, map_size_);
}

std::vector<std::string> SafetensorsFile::TensorNames() const {
  std::vector<const TensorView*> views;
  views.reserve(tensors_.size());
  for (const auto& [name, view] : tensors_) views.push_back(&view);
  std::stable_sort(views.begin(), views.end(),
                   [](const TensorView* a, const TensorView* b) { return a->data < b->data; });
  std::vector<std::string> names;
  names.reserve(views.size());
  for (const TensorView* v : views) names.push_back(v->name);
  return names;
}

bool SafetensorsFile::Contains(absl::string_view name) const {
  return tensors_.find(name) != tensors_.end();
}

absl::StatusOr<TensorView> SafetensorsFile::Get(absl::string_view name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    return absl::NotFoundError(absl::StrCat(path_, ": no tensor named ", Quote(name)));
  }
  return it->second;
}

// ---------------------------------------------------------------------------------------------
// SafetensorsCheckpoint

absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> SafetensorsCheckpoint::Open(
    const std::string& dir) {
  auto checkpoint = std::make_unique<SafetensorsCheckpoint>();
  checkpoint->dir_ = dir;
  const std::string index_path = JoinPath(dir, kIndexFileName);
  const std::string single_path = JoinPath(dir, kSingleFileName);

  if (!FileExists(index_path)) {
    if (!FileExists(single_path)) {
      return absl::NotFoundError(absl::StrCat("checkpoint directory ", dir, " has neither ",
                                              kSingleFileName, " nor ", kIndexFileName));
    }
    COLLM_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(single_path));
    for (const std::string& name : file->TensorNames()) checkpoint->by_name_[name] = file.get();
    checkpoint->files_.push_back(std::move(file));
    return checkpoint;
  }

  COLLM_ASSIGN_OR_RETURN(std::string index_text, ReadSmallFile(index_path, kMaxHeaderBytes));
  if (!NestingWithin(index_text, kMaxJsonDepth)) {
    return FileError(absl::StatusCode::kInvalidArgument, index_path,
                     absl::StrCat("JSON nests deeper than ", kMaxJsonDepth));
  }
  const Json index = ParseJson(index_text);
  if (index.is_discarded() || !index.is_object()) {
    return FileError(absl::StatusCode::kInvalidArgument, index_path, "not a valid JSON object");
  }
  auto map_it = index.find("weight_map");
  if (map_it == index.end() || !map_it->is_object()) {
    return FileError(absl::StatusCode::kInvalidArgument, index_path,
                     "missing or non-object \"weight_map\"");
  }

  std::map<std::string, const SafetensorsFile*> shards;
  for (const auto& [tensor, shard_json] : map_it->items()) {
    if (!shard_json.is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path, ": tensor ", Quote(tensor), ": shard name is not a string"));
    }
    const std::string shard = shard_json.get<std::string>();
    COLLM_RETURN_IF_ERROR(ValidateShardName(index_path, tensor, shard));
    auto shard_it = shards.find(shard);
    if (shard_it == shards.end()) {
      absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
          SafetensorsFile::Open(JoinPath(dir, shard));
      if (!file.ok()) {
        return Annotate(file.status(), absl::StrCat("shard ", Quote(shard), " listed in ",
                                                    index_path, " for tensor ", Quote(tensor)));
      }
      shard_it = shards.emplace(shard, file->get()).first;
      checkpoint->files_.push_back(*std::move(file));
    }
    const SafetensorsFile* file = shard_it->second;
    if (!file->Contains(tensor)) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": tensor ", Quote(tensor),
                                                     " is listed in shard ", Quote(shard), " but ",
                                                     file->path(), " does not contain it"));
    }
    checkpoint->by_name_[tensor] = file;
  }
  return checkpoint;
}

std::vector<std::string> SafetensorsCheckpoint::TensorNames() const {
  std::vector<std::string> names;
  names.reserve(by_name_.size());
  for (const auto& [name, file] : by_name_) names.push_back(name);
  return names;
}

bool SafetensorsCheckpoint::Contains(absl::string_view name) const {
  return by_name_.find(name) != by_name_.end();
}

absl::StatusOr<TensorView> SafetensorsCheckpoint::Get(absl::string_view name) const {
  auto it = by_name_.find(name);
  if (it == by_name_.end()) {
    return absl::NotFoundError(
        absl::StrCat("checkpoint ", dir_, ": no tensor named ", Quote(name)));
  }
  return it->second->Get(name);
}

// ---------------------------------------------------------------------------------------------
// WriteSafetensors

namespace {

// The length prefix and padded JSON header for `tensors`, and each tensor's byte size: the part
// of the format WriteSafetensors and SerializeSafetensors share.
absl::Status BuildHeader(const std::string& path, const std::vector<TensorToWrite>& tensors,
                         const std::map<std::string, std::string>& metadata, std::string* head,
                         std::vector<uint64_t>* sizes_out) {
  // ordered_json keeps the caller's tensor order in the header, which readers that list tensors
  // in header order (and humans) appreciate.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [key, value] : metadata) meta[key] = value;
    header[kMetadataKey] = std::move(meta);
  }
  std::set<std::string> seen;
  std::vector<uint64_t> sizes;
  sizes.reserve(tensors.size());
  uint64_t offset = 0;
  for (const TensorToWrite& t : tensors) {
    if (t.name.empty()) {
      return FileError(absl::StatusCode::kInvalidArgument, path, "tensor with an empty name");
    }
    if (t.name == kMetadataKey) {
      return TensorError(path, t.name, "name is reserved for metadata");
    }
    if (!seen.insert(t.name).second) return TensorError(path, t.name, "duplicate tensor name");
    uint64_t numel = 0, nbytes = 0;
    COLLM_RETURN_IF_ERROR(CheckedSizes(path, t.name, t.shape, t.dtype, &numel, &nbytes));
    if (nbytes > 0 && t.data == nullptr) return TensorError(path, t.name, "data is null");
    uint64_t end = 0;
    if (__builtin_add_overflow(offset, nbytes, &end)) {
      return TensorError(path, t.name, "total data size overflows");
    }
    header[t.name] = {
        {"dtype", StoredDTypeName(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, end}}};
    sizes.push_back(nbytes);
    offset = end;
  }
  std::string header_text = header.dump();
  // Pad so the data section starts 8-byte aligned: mmap readers can then view F32 data in place.
  header_text.append((8 - (8 + header_text.size()) % 8) % 8, ' ');
  const uint64_t len = header_text.size();
  head->clear();
  head->reserve(8 + header_text.size());
  for (int i = 0; i < 8; ++i) head->push_back(static_cast<char>(len >> (8 * i)));
  head->append(header_text);
  *sizes_out = std::move(sizes);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> SerializeSafetensors(const std::vector<TensorToWrite>& tensors,
                                                 const std::map<std::string, std::string>& metadata,
                                                 const std::string& what) {
  std::string out;
  std::vector<uint64_t> sizes;
  COLLM_RETURN_IF_ERROR(BuildHeader(what, tensors, metadata, &out, &sizes));
  uint64_t total = out.size();
  for (uint64_t n : sizes) total += n;
  if (total > out.max_size()) {
    return FileError(absl::StatusCode::kInvalidArgument, what, "image too large for memory");
  }
  out.reserve(static_cast<size_t>(total));
  for (size_t i = 0; i < tensors.size(); ++i) {
    out.append(static_cast<const char*>(tensors[i].data), static_cast<size_t>(sizes[i]));
  }
  return out;
}

absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  std::string head;
  std::vector<uint64_t> sizes;
  COLLM_RETURN_IF_ERROR(BuildHeader(path, tensors, metadata, &head, &sizes));

  std::vector<absl::string_view> pieces = {head};
  for (size_t i = 0; i < tensors.size(); ++i) {
    pieces.emplace_back(static_cast<const char*>(tensors[i].data), static_cast<size_t>(sizes[i]));
  }
  return WriteFileAtomically(path, pieces);
}

}  // namespace collm::runtime
