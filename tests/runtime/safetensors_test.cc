#include "collm/runtime/safetensors.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "testing/test_env.h"

namespace collm::runtime {
namespace {

using ::collm::testing::MakeTempDir;
using ::collm::testing::ReadFileOrDie;
using ::collm::testing::WriteFileOrDie;

// A status is only useful to an operator if it says which file, which tensor and what is wrong.
void ExpectError(const absl::Status& status, absl::StatusCode code,
                 std::initializer_list<std::string> needles) {
  EXPECT_EQ(status.code(), code) << status;
  for (const std::string& needle : needles) {
    EXPECT_NE(status.message().find(needle), absl::string_view::npos)
        << "message lacks \"" << needle << "\": " << status.message();
  }
}

// Raw file bytes: little-endian length prefix, header JSON, data.
std::string RawFile(const std::string& header, const std::string& data = "") {
  std::string out(8, '\0');
  uint64_t len = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(len >> (8 * i));
  return out + header + data;
}

std::string WriteRaw(const std::string& dir, const std::string& name, const std::string& bytes) {
  std::string path = dir + "/" + name;
  WriteFileOrDie(path, bytes);
  return path;
}

uint64_t HeaderLength(const std::string& bytes) {
  uint64_t len = 0;
  for (int i = 7; i >= 0; --i) len = (len << 8) | static_cast<uint8_t>(bytes[i]);
  return len;
}

std::vector<uint8_t> AsBytes(const TensorView& view) {
  return std::vector<uint8_t>(view.data, view.data + view.nbytes);
}

template <typename T>
std::vector<uint8_t> AsBytes(const std::vector<T>& values) {
  const auto* p = reinterpret_cast<const uint8_t*>(values.data());
  return std::vector<uint8_t>(p, p + values.size() * sizeof(T));
}

// Writes a small valid file with three dtypes and metadata; returns its path.
struct SampleTensors {
  std::vector<float> f32 = {1.0f, -2.5f, 3.25f, 0.0f, 1e-3f, 7.0f};
  std::vector<uint16_t> f16 = {0x3c00, 0xc000, 0x0001};
  std::vector<uint16_t> bf16 = {0x3f80, 0x4049, 0x7f80, 0xff80};

  std::vector<TensorToWrite> ToWrite() const {
    return {
        {"layer.weight", StoredDType::kF32, {2, 3}, f32.data()},
        {"layer.half", StoredDType::kF16, {3}, f16.data()},
        {"layer.brain", StoredDType::kBF16, {2, 1, 2}, bf16.data()},
    };
  }
};

std::string WriteSample(const std::string& dir, const std::string& name = "model.safetensors") {
  SampleTensors sample;
  std::string path = dir + "/" + name;
  absl::Status status = WriteSafetensors(path, sample.ToWrite(), {{"format", "pt"}});
  EXPECT_TRUE(status.ok()) << status;
  return path;
}

// ----------------------------------------------------------------------------------------------
// Writing and reading back.

TEST(SafetensorsTest, RoundTripPreservesNamesShapesDtypesBytesAndMetadata) {
  std::string dir = MakeTempDir();
  SampleTensors sample;
  std::string path = dir + "/model.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, sample.ToWrite(), {{"format", "pt"}, {"k", "v"}}).ok());

  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->path(), path);
  EXPECT_EQ((*file)->metadata(),
            (std::map<std::string, std::string>{{"format", "pt"}, {"k", "v"}}));
  EXPECT_EQ((*file)->TensorNames(),
            (std::vector<std::string>{"layer.weight", "layer.half", "layer.brain"}));
  EXPECT_TRUE((*file)->Contains("layer.half"));
  EXPECT_FALSE((*file)->Contains("layer"));

  auto w = (*file)->Get("layer.weight");
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->name, "layer.weight");
  EXPECT_EQ(w->file, path);
  EXPECT_EQ(w->dtype, StoredDType::kF32);
  EXPECT_EQ(w->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(w->numel(), 6);
  EXPECT_EQ(AsBytes(*w), AsBytes(sample.f32));
  std::vector<float> floats(6);
  ConvertToFloat32(*w, floats.data());
  EXPECT_EQ(floats, sample.f32);

  auto h = (*file)->Get("layer.half");
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->dtype, StoredDType::kF16);
  EXPECT_EQ(AsBytes(*h), AsBytes(sample.f16));
  floats.resize(3);
  ConvertToFloat32(*h, floats.data());
  EXPECT_EQ(floats, (std::vector<float>{1.0f, -2.0f, std::ldexp(1.0f, -24)}));

  auto b = (*file)->Get("layer.brain");
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->dtype, StoredDType::kBF16);
  EXPECT_EQ(b->shape, (std::vector<int64_t>{2, 1, 2}));
  EXPECT_EQ(AsBytes(*b), AsBytes(sample.bf16));
  floats.resize(4);
  ConvertToFloat32(*b, floats.data());
  EXPECT_EQ(floats[0], 1.0f);
  EXPECT_EQ(floats[1], 3.140625f);
  EXPECT_EQ(floats[2], std::numeric_limits<float>::infinity());
  EXPECT_EQ(floats[3], -std::numeric_limits<float>::infinity());
}

TEST(SafetensorsTest, DataSectionStartsEightByteAligned) {
  std::string dir = MakeTempDir();
  // Vary the header length so every padding amount is exercised.
  for (int n = 1; n <= 9; ++n) {
    std::vector<float> data(1, 1.0f);
    std::string path = dir + "/a" + std::to_string(n) + ".safetensors";
    ASSERT_TRUE(
        WriteSafetensors(path, {{std::string(n, 'x'), StoredDType::kF32, {1}, data.data()}}).ok());
    std::string bytes = ReadFileOrDie(path);
    uint64_t header_len = HeaderLength(bytes);
    EXPECT_EQ((8 + header_len) % 8, 0u) << n;
    EXPECT_EQ(bytes.size(), 8 + header_len + 4);
    auto file = SafetensorsFile::Open(path);
    ASSERT_TRUE(file.ok()) << file.status();
    auto view = (*file)->Get(std::string(n, 'x'));
    ASSERT_TRUE(view.ok());
    EXPECT_EQ(reinterpret_cast<uintptr_t>(view->data) % 8, 0u);
  }
}

TEST(SafetensorsTest, EmptyHeaderAndZeroElementTensorsAreValid) {
  std::string dir = MakeTempDir();
  auto empty = SafetensorsFile::Open(WriteRaw(dir, "empty.safetensors", RawFile("{}")));
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_TRUE((*empty)->TensorNames().empty());
  EXPECT_TRUE((*empty)->metadata().empty());

  std::vector<float> one = {5.0f};
  std::string path = dir + "/zero.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, {{"nothing", StoredDType::kF16, {0, 4}, nullptr},
                                      {"scalar", StoredDType::kF32, {}, one.data()}})
                  .ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  auto nothing = (*file)->Get("nothing");
  ASSERT_TRUE(nothing.ok());
  EXPECT_EQ(nothing->numel(), 0);
  EXPECT_EQ(nothing->nbytes, 0u);
  auto scalar = (*file)->Get("scalar");
  ASSERT_TRUE(scalar.ok());
  EXPECT_EQ(scalar->numel(), 1);
  float value = 0;
  ConvertToFloat32(*scalar, &value);
  EXPECT_EQ(value, 5.0f);
}

// Found by fuzz_safetensors under UBSan: converting a 0-element F32 tensor into an empty buffer
// (a null data()) called memcpy with a null pointer. Fails under -DCOLLM_SANITIZE=undefined.
TEST(SafetensorsTest, ZeroElementF32TensorConvertsIntoANullBuffer) {
  const std::string header = R"({"z": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]}})";
  std::string bytes(8, '\0');
  bytes[0] = static_cast<char>(header.size());
  auto file = SafetensorsFile::FromBytes(bytes + header, "crash-74fbdcb1");
  ASSERT_TRUE(file.ok()) << file.status();
  auto z = (*file)->Get("z");
  ASSERT_TRUE(z.ok()) << z.status();
  EXPECT_EQ(z->numel(), 0);
  std::vector<float> out;
  ConvertToFloat32(*z, out.data());
}

TEST(SafetensorsTest, WriteReplacesExistingFileAndLeavesNoTemporary) {
  std::string dir = MakeTempDir();
  std::string path = dir + "/model.safetensors";
  WriteFileOrDie(path, "old junk");
  WriteSample(dir);
  EXPECT_TRUE(SafetensorsFile::Open(path).ok());
  int entries = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    ++entries;
    EXPECT_EQ(entry.path().filename(), "model.safetensors");
  }
  EXPECT_EQ(entries, 1);
}

TEST(SafetensorsTest, WriteRejectsDuplicateAndEmptyNames) {
  std::string dir = MakeTempDir();
  std::string path = dir + "/out.safetensors";
  float x = 1.0f;
  ExpectError(WriteSafetensors(
                  path, {{"a", StoredDType::kF32, {1}, &x}, {"a", StoredDType::kF32, {1}, &x}}),
              absl::StatusCode::kInvalidArgument, {path, "'a'", "duplicate"});
  ExpectError(WriteSafetensors(path, {{"", StoredDType::kF32, {1}, &x}}),
              absl::StatusCode::kInvalidArgument, {path, "empty name"});
  ExpectError(WriteSafetensors(path, {{"neg", StoredDType::kF32, {-1}, &x}}),
              absl::StatusCode::kInvalidArgument, {path, "'neg'", "negative"});
  EXPECT_FALSE(std::filesystem::exists(path));
}

TEST(SafetensorsTest, WriteIntoMissingDirectoryNamesPath) {
  std::string path = MakeTempDir() + "/no/such/dir/out.safetensors";
  float x = 1.0f;
  ExpectError(WriteSafetensors(path, {{"a", StoredDType::kF32, {1}, &x}}),
              absl::StatusCode::kNotFound, {path});
}

TEST(SafetensorsTest, DTypeNamesAndSizes) {
  for (StoredDType dtype : {StoredDType::kF32, StoredDType::kF16, StoredDType::kBF16}) {
    auto parsed = ParseStoredDType(StoredDTypeName(dtype));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, dtype);
  }
  EXPECT_EQ(StoredDTypeSize(StoredDType::kF32), 4u);
  EXPECT_EQ(StoredDTypeSize(StoredDType::kF16), 2u);
  EXPECT_EQ(StoredDTypeSize(StoredDType::kBF16), 2u);
  ExpectError(ParseStoredDType("I64").status(), absl::StatusCode::kInvalidArgument, {"I64"});
  EXPECT_FALSE(ParseStoredDType("f32").ok());
}

TEST(SafetensorsTest, ConvertsUnalignedHalfData) {
  // Odd offset into a buffer: the converter must not assume 2-byte alignment.
  std::vector<uint8_t> buffer = {0xff, 0x00, 0x3c, 0x00, 0xc0};
  TensorView view;
  view.dtype = StoredDType::kF16;
  view.shape = {2};
  view.data = buffer.data() + 1;
  view.nbytes = 4;
  float out[2];
  ConvertToFloat32(view, out);
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -2.0f);
}

// ----------------------------------------------------------------------------------------------
// Corrupt files: each names the file, the tensor where there is one, and the problem.

constexpr char kGoodEntry[] = R"("t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";

TEST(SafetensorsTest, RejectsFileShorterThanLengthPrefix) {
  std::string path = WriteRaw(MakeTempDir(), "short.safetensors", "abc");
  ExpectError(SafetensorsFile::Open(path).status(), absl::StatusCode::kInvalidArgument,
              {path, "3 bytes", "too short"});
}

TEST(SafetensorsTest, RejectsMissingFile) {
  std::string path = MakeTempDir() + "/nope.safetensors";
  ExpectError(SafetensorsFile::Open(path).status(), absl::StatusCode::kNotFound, {path});
}

TEST(SafetensorsTest, RejectsTruncatedDataSection) {
  std::string dir = MakeTempDir();
  std::string bytes = ReadFileOrDie(WriteSample(dir));
  std::string path = WriteRaw(dir, "cut.safetensors", bytes.substr(0, bytes.size() - 1));
  // The last tensor in the data section is the one whose bytes are missing.
  ExpectError(SafetensorsFile::Open(path).status(), absl::StatusCode::kInvalidArgument,
              {path, "'layer.brain'", "past the end of the data section"});
}

TEST(SafetensorsTest, RejectsHeaderLengthLargerThanFile) {
  std::string dir = MakeTempDir();
  std::string bytes = RawFile(std::string("{") + kGoodEntry + "}", std::string(8, '\0'));
  bytes[0] = static_cast<char>(0x00);
  bytes[1] = static_cast<char>(0x10);  // 4096, far more than the file holds.
  std::string path = WriteRaw(dir, "lie.safetensors", bytes);
  ExpectError(SafetensorsFile::Open(path).status(), absl::StatusCode::kInvalidArgument,
              {path, "header length 4096", "truncated"});

  std::string huge = bytes;
  for (int i = 0; i < 8; ++i) huge[i] = static_cast<char>(0xff);
  path = WriteRaw(dir, "huge.safetensors", huge);
  ExpectError(SafetensorsFile::Open(path).status(), absl::StatusCode::kInvalidArgument,
              {path, "header length", "limit"});
}

TEST(SafetensorsTest, RejectsInvalidJson) {
  std::string dir = MakeTempDir();
  std::string path = WriteRaw(dir, "bad.safetensors", RawFile(R"({"t":{"dtype":)"));
  ExpectError(SafetensorsFile::Open(path).status(), absl::StatusCode::kInvalidArgument,
              {path, "not valid JSON"});
  path = WriteRaw(dir, "array.safetensors", RawFile("[1,2]"));
  ExpectError(SafetensorsFile::Open(path).status(), absl::StatusCode::kInvalidArgument,
              {path, "not a JSON object"});
  path = WriteRaw(dir, "deep.safetensors", RawFile(std::string(5000, '[')));
  ExpectError(SafetensorsFile::Open(path).status(), absl::StatusCode::kInvalidArgument,
              {path, "nests deeper"});
  path = WriteRaw(dir, "entry.safetensors", RawFile(R"({"t":[1]})"));
  ExpectError(SafetensorsFile::Open(path).status(), absl::StatusCode::kInvalidArgument,
              {path, "'t'", "not a JSON object"});
}

TEST(SafetensorsTest, RejectsUnsupportedDtype) {
  std::string path = WriteRaw(
      MakeTempDir(), "i64.safetensors",
      RawFile(R"({"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})", std::string(8, '\0')));
  ExpectError(SafetensorsFile::Open(path).status(), absl::StatusCode::kInvalidArgument,
              {path, "'ids'", "unsupported dtype", "I64"});
}

TEST(SafetensorsTest, RejectsMissingOrMistypedFields) {
  std::string dir = MakeTempDir();
  struct Case {
    const char* header;
    const char* problem;
  };
  for (const Case& c : std::vector<Case>{
           {R"({"t":{"shape":[2],"data_offsets":[0,8]}})", "dtype"},
           {R"({"t":{"dtype":3,"shape":[2],"data_offsets":[0,8]}})", "dtype"},
           {R"({"t":{"dtype":"F32","data_offsets":[0,8]}})", "shape"},
           {R"({"t":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", "shape"},
           {R"({"t":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", "shape entry"},
           {R"({"t":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}})", "shape entry"},
           {R"({"t":{"dtype":"F32","shape":[2]}})", "data_offsets"},
           {R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", "data_offsets"},
           {R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}})", "data_offsets"},
           {R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[-1,8]}})", "data_offsets"},
           {R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}})", "data_offsets"},
           {R"({"t":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", "out of order"},
           {R"({"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})",
            "overflow"},
           {R"({"t":{"dtype":"F32","shape":[9223372036854775807],"data_offsets":[0,8]}})",
            "overflow"},
       }) {
    std::string path = WriteRaw(dir, "f.safetensors", RawFile(c.header, std::string(8, '\0')));
    ExpectError(SafetensorsFile::Open(path).status(), absl::StatusCode::kInvalidArgument,
                {path, "'t'", c.problem});
  }
}

TEST(SafetensorsTest, RejectsOffsetsOutOfRange) {
  std::string path = WriteRaw(
      MakeTempDir(), "range.safetensors",
      RawFile(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", std::string(8, '\0')));
  ExpectError(SafetensorsFile::Open(path).status(), absl::StatusCode::kInvalidArgument,
              {path, "'t'", "[8, 16]", "past the end of the data section"});
}

TEST(SafetensorsTest, RejectsSizeMismatch) {
  std::string path = WriteRaw(
      MakeTempDir(), "size.safetensors",
      RawFile(R"({"t":{"dtype":"BF16","shape":[3],"data_offsets":[0,8]}})", std::string(8, '\0')));
  ExpectError(SafetensorsFile::Open(path).status(), absl::StatusCode::kInvalidArgument,
              {path, "'t'", "span 8 bytes", "need 6"});
}

TEST(SafetensorsTest, RejectsOverlappingRanges) {
  std::string path = WriteRaw(MakeTempDir(), "overlap.safetensors",
                              RawFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                      std::string(12, '\0')));
  ExpectError(SafetensorsFile::Open(path).status(), absl::StatusCode::kInvalidArgument,
              {path, "'b'", "overlap", "'a'"});
}

TEST(SafetensorsTest, RejectsNegativeDim) {
  std::string path =
      WriteRaw(MakeTempDir(), "neg.safetensors",
               RawFile(R"({"t":{"dtype":"F32","shape":[-2,-1],"data_offsets":[0,8]}})",
                       std::string(8, '\0')));
  ExpectError(SafetensorsFile::Open(path).status(), absl::StatusCode::kInvalidArgument,
              {path, "'t'", "negative dimension -2"});
}

TEST(SafetensorsTest, RejectsNonStringMetadata) {
  std::string dir = MakeTempDir();
  std::string path = WriteRaw(
      dir, "meta.safetensors",
      RawFile(std::string(R"({"__metadata__":{"format":"pt","step":3},)") + kGoodEntry + "}",
              std::string(8, '\0')));
  ExpectError(SafetensorsFile::Open(path).status(), absl::StatusCode::kInvalidArgument,
              {path, "__metadata__", "'step'", "not a string"});
  path = WriteRaw(dir, "meta2.safetensors", RawFile(R"({"__metadata__":"pt"})"));
  ExpectError(SafetensorsFile::Open(path).status(), absl::StatusCode::kInvalidArgument,
              {path, "__metadata__"});
}

TEST(SafetensorsTest, GetMissingTensorIsNotFound) {
  std::string path = WriteSample(MakeTempDir());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok());
  ExpectError((*file)->Get("ghost").status(), absl::StatusCode::kNotFound, {path, "'ghost'"});
}

// Untrusted bytes must produce a Status, never a crash or an out-of-bounds read (the latter is
// caught when this runs under ASan).
TEST(SafetensorsTest, SurvivesRandomTruncationAndHeaderCorruption) {
  std::string dir = MakeTempDir();
  // Built by hand rather than with WriteSafetensors: its fsync can take seconds on a busy disk.
  const std::string good =
      RawFile(R"({"__metadata__":{"format":"pt"},)"
              R"("w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
              R"("h":{"dtype":"F16","shape":[3],"data_offsets":[24,30]},)"
              R"("b":{"dtype":"BF16","shape":[2,1,2],"data_offsets":[30,38]}})",
              std::string(38, '\x3c'));
  ASSERT_TRUE(SafetensorsFile::Open(WriteRaw(dir, "good.safetensors", good)).ok());
  const size_t header_end = 8 + HeaderLength(good);
  const std::string path = dir + "/fuzz.safetensors";
  std::mt19937 rng(20240601);
  int opened = 0;
  for (int i = 0; i < 1500; ++i) {
    std::string bytes = good;
    if (i % 3 == 0) {
      bytes.resize(std::uniform_int_distribution<size_t>(0, good.size() - 1)(rng));
    } else {
      int flips = std::uniform_int_distribution<int>(1, 4)(rng);
      for (int f = 0; f < flips; ++f) {
        size_t at = std::uniform_int_distribution<size_t>(0, header_end - 1)(rng);
        bytes[at] = static_cast<char>(std::uniform_int_distribution<int>(0, 255)(rng));
      }
    }
    // Removed first: ext4 flushes a truncated-and-rewritten file on close, which is slow.
    std::filesystem::remove(path);
    WriteFileOrDie(path, bytes);
    auto file = SafetensorsFile::Open(path);
    if (!file.ok()) {
      EXPECT_NE(file.status().message().find(path), absl::string_view::npos) << file.status();
      continue;
    }
    ++opened;
    for (const std::string& name : (*file)->TensorNames()) {
      auto view = (*file)->Get(name);
      ASSERT_TRUE(view.ok());
      ASSERT_EQ(view->nbytes, view->numel() * StoredDTypeSize(view->dtype));
      std::vector<float> out(view->numel());
      ConvertToFloat32(*view, out.data());
    }
  }
  EXPECT_GT(opened, 0);  // Some flips land in harmless places (padding, name letters).
}

TEST(SafetensorsTest, OpensRealStories260K) {
  COLLM_REQUIRE_MODEL_FILE(path, "stories260K-hf/model.safetensors");
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->TensorNames().size(), 48u);
  auto embed = (*file)->Get("model.embed_tokens.weight");
  ASSERT_TRUE(embed.ok()) << embed.status();
  EXPECT_EQ(embed->dtype, StoredDType::kF32);
  EXPECT_EQ(embed->shape, (std::vector<int64_t>{512, 64}));
  auto gate = (*file)->Get("model.layers.0.mlp.gate_proj.weight");
  ASSERT_TRUE(gate.ok()) << gate.status();
  EXPECT_EQ(gate->shape, (std::vector<int64_t>{172, 64}));
  std::vector<float> values(gate->numel());
  ConvertToFloat32(*gate, values.data());
  for (float v : values) ASSERT_TRUE(std::isfinite(v));
}

// ----------------------------------------------------------------------------------------------
// Checkpoints: one file or an index of shards.

std::string WriteIndex(const std::string& dir, const std::string& weight_map_json) {
  return WriteRaw(dir, "model.safetensors.index.json",
                  R"({"metadata":{"total_size":0},"weight_map":)" + weight_map_json + "}");
}

TEST(SafetensorsCheckpointTest, OpensSingleFile) {
  std::string dir = MakeTempDir();
  WriteSample(dir);
  auto ckpt = SafetensorsCheckpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->dir(), dir);
  EXPECT_EQ((*ckpt)->TensorNames().size(), 3u);
  EXPECT_TRUE((*ckpt)->Contains("layer.half"));
  auto view = (*ckpt)->Get("layer.weight");
  ASSERT_TRUE(view.ok());
  EXPECT_EQ(view->shape, (std::vector<int64_t>{2, 3}));
}

TEST(SafetensorsCheckpointTest, ShardedRoundTrip) {
  std::string dir = MakeTempDir();
  std::vector<float> a = {1, 2, 3, 4}, b = {5, 6};
  std::vector<uint16_t> c = {FloatToBFloat16(7.0f)}, d = {FloatToHalf(8.0f), FloatToHalf(9.0f)};
  const std::string shard1 = "model-00001-of-00002.safetensors";
  const std::string shard2 = "model-00002-of-00002.safetensors";
  ASSERT_TRUE(WriteSafetensors(dir + "/" + shard1, {{"a", StoredDType::kF32, {2, 2}, a.data()},
                                                    {"b", StoredDType::kF32, {2}, b.data()}})
                  .ok());
  ASSERT_TRUE(WriteSafetensors(dir + "/" + shard2, {{"c", StoredDType::kBF16, {1}, c.data()},
                                                    {"d", StoredDType::kF16, {2}, d.data()}})
                  .ok());
  WriteIndex(dir, R"({"a":")" + shard1 + R"(","b":")" + shard1 + R"(","c":")" + shard2 +
                      R"(","d":")" + shard2 + R"("})");

  auto ckpt = SafetensorsCheckpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->TensorNames(), (std::vector<std::string>{"a", "b", "c", "d"}));
  auto va = (*ckpt)->Get("a");
  auto vd = (*ckpt)->Get("d");
  ASSERT_TRUE(va.ok() && vd.ok());
  EXPECT_EQ(va->file, dir + "/" + shard1);
  EXPECT_EQ(vd->file, dir + "/" + shard2);
  EXPECT_EQ(AsBytes(*va), AsBytes(a));
  float out[2];
  ConvertToFloat32(*vd, out);
  EXPECT_EQ(out[0], 8.0f);
  EXPECT_EQ(out[1], 9.0f);
  auto vc = (*ckpt)->Get("c");
  ASSERT_TRUE(vc.ok());
  ConvertToFloat32(*vc, out);
  EXPECT_EQ(out[0], 7.0f);
}

TEST(SafetensorsCheckpointTest, MissingFilesIsNotFound) {
  std::string dir = MakeTempDir();
  ExpectError(SafetensorsCheckpoint::Open(dir).status(), absl::StatusCode::kNotFound,
              {dir, "model.safetensors", "model.safetensors.index.json"});
}

TEST(SafetensorsCheckpointTest, IndexNamingMissingShard) {
  std::string dir = MakeTempDir();
  std::string index = WriteIndex(dir, R"({"w":"gone.safetensors"})");
  ExpectError(SafetensorsCheckpoint::Open(dir).status(), absl::StatusCode::kNotFound,
              {index, dir + "/gone.safetensors", "'w'"});
}

TEST(SafetensorsCheckpointTest, IndexWithTraversalShardNameIsRejected) {
  std::string dir = MakeTempDir();
  for (const char* shard : {"../x", "..", "sub/x.safetensors", "/etc/passwd", "a\\\\b", ""}) {
    std::string index = WriteIndex(dir, std::string(R"({"w":")") + shard + R"("})");
    ExpectError(SafetensorsCheckpoint::Open(dir).status(), absl::StatusCode::kInvalidArgument,
                {index, "'w'", "not a plain file name"});
  }
}

TEST(SafetensorsCheckpointTest, TensorListedInIndexButMissingFromShard) {
  std::string dir = MakeTempDir();
  std::string shard = WriteSample(dir, "shard.safetensors");
  std::string index =
      WriteIndex(dir, R"({"layer.weight":"shard.safetensors","phantom":"shard.safetensors"})");
  ExpectError(SafetensorsCheckpoint::Open(dir).status(), absl::StatusCode::kInvalidArgument,
              {index, "'phantom'", shard, "does not contain"});
}

TEST(SafetensorsCheckpointTest, MalformedIndexIsRejected) {
  std::string dir = MakeTempDir();
  std::string index = WriteRaw(dir, "model.safetensors.index.json", "{not json");
  ExpectError(SafetensorsCheckpoint::Open(dir).status(), absl::StatusCode::kInvalidArgument,
              {index, "JSON"});
  WriteRaw(dir, "model.safetensors.index.json", R"({"weight_map":[]})");
  ExpectError(SafetensorsCheckpoint::Open(dir).status(), absl::StatusCode::kInvalidArgument,
              {index, "weight_map"});
  WriteIndex(dir, R"({"w":7})");
  ExpectError(SafetensorsCheckpoint::Open(dir).status(), absl::StatusCode::kInvalidArgument,
              {index, "'w'", "not a string"});
}

TEST(SafetensorsCheckpointTest, GetMissingTensorIsNotFound) {
  std::string dir = MakeTempDir();
  WriteSample(dir);
  auto ckpt = SafetensorsCheckpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok());
  ExpectError((*ckpt)->Get("ghost").status(), absl::StatusCode::kNotFound, {dir, "'ghost'"});
}

// ----------------------------------------------------------------------------------------------
// Half and bfloat16 conversions.

uint32_t Bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}

float FromBits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}

TEST(Float16Test, HalfToFloatExactValues) {
  EXPECT_EQ(HalfToFloat(0x3c00), 1.0f);
  EXPECT_EQ(HalfToFloat(0xc000), -2.0f);
  EXPECT_EQ(HalfToFloat(0x3555), 0x1.554p-2f);
  EXPECT_EQ(HalfToFloat(0x7bff), 65504.0f);
  EXPECT_EQ(HalfToFloat(0x0400), std::ldexp(1.0f, -14));     // Smallest normal.
  EXPECT_EQ(HalfToFloat(0x0001), std::ldexp(1.0f, -24));     // Smallest subnormal.
  EXPECT_EQ(HalfToFloat(0x03ff), std::ldexp(1023.0f, -24));  // Largest subnormal.
  EXPECT_EQ(HalfToFloat(0x8001), -std::ldexp(1.0f, -24));
  EXPECT_EQ(Bits(HalfToFloat(0x0000)), 0u);
  EXPECT_EQ(Bits(HalfToFloat(0x8000)), 0x80000000u);
  EXPECT_EQ(HalfToFloat(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(HalfToFloat(0xfc00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(HalfToFloat(0x7e00)));
  EXPECT_TRUE(std::isnan(HalfToFloat(0x7c01)));
  EXPECT_TRUE(std::isnan(HalfToFloat(0xfe00)));
}

TEST(Float16Test, FloatToHalfRoundsToNearestEven) {
  EXPECT_EQ(FloatToHalf(1.0f), 0x3c00);
  EXPECT_EQ(FloatToHalf(-2.0f), 0xc000);
  EXPECT_EQ(FloatToHalf(0.0f), 0x0000);
  EXPECT_EQ(FloatToHalf(-0.0f), 0x8000);
  // Ties in the normal range go to the even mantissa.
  EXPECT_EQ(FloatToHalf(1.0f + std::ldexp(1.0f, -11)), 0x3c00);
  EXPECT_EQ(FloatToHalf(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
  EXPECT_EQ(FloatToHalf(std::nextafter(1.0f + std::ldexp(1.0f, -11), 2.0f)), 0x3c01);
  // Rounding carries from the mantissa into the exponent.
  EXPECT_EQ(FloatToHalf(2.0f - std::ldexp(1.0f, -11)), 0x4000);
  // Overflow: 65520 is the tie between 65504 and 2^16 and rounds to infinity.
  EXPECT_EQ(FloatToHalf(65504.0f), 0x7bff);
  EXPECT_EQ(FloatToHalf(std::nextafter(65520.0f, 0.0f)), 0x7bff);
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7c00);
  EXPECT_EQ(FloatToHalf(-1e9f), 0xfc00);
  EXPECT_EQ(FloatToHalf(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(FloatToHalf(-std::numeric_limits<float>::infinity()), 0xfc00);
  // Subnormal results, including ties and the carry into the smallest normal.
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -25)), 0x0000);  // Tie to even (zero).
  EXPECT_EQ(FloatToHalf(std::nextafter(std::ldexp(1.0f, -25), 1.0f)), 0x0001);
  EXPECT_EQ(FloatToHalf(3 * std::ldexp(1.0f, -25)), 0x0002);   // Tie between 1 and 2.
  EXPECT_EQ(FloatToHalf(-5 * std::ldexp(1.0f, -25)), 0x8002);  // Tie between 2 and 3.
  EXPECT_EQ(FloatToHalf(std::ldexp(1023.5f, -24)), 0x0400);
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -30)), 0x0000);
  EXPECT_EQ(FloatToHalf(std::numeric_limits<float>::denorm_min()), 0x0000);
  // NaN stays NaN, even when its payload sits only in bits that do not fit.
  EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(FromBits(0x7f800001u)))));
  EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(FromBits(0xff800001u)))));
}

TEST(Float16Test, EveryHalfRoundTripsThroughFloat) {
  for (uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const uint16_t h = static_cast<uint16_t>(bits);
    const float f = HalfToFloat(h);
    if (std::isnan(f)) {
      ASSERT_TRUE(std::isnan(HalfToFloat(FloatToHalf(f)))) << std::hex << bits;
    } else {
      ASSERT_EQ(FloatToHalf(f), h) << std::hex << bits;
    }
  }
}

#ifdef __FLT16_MAX__
// The compiler's own float -> _Float16 conversion is IEEE round-to-nearest-even; agree with it
// on random bit patterns, which cover every exponent range.
TEST(Float16Test, FloatToHalfMatchesCompilerOnRandomFloats) {
  std::mt19937 rng(7);
  for (int i = 0; i < 200000; ++i) {
    const float f = FromBits(static_cast<uint32_t>(rng()));
    if (std::isnan(f)) continue;
    const _Float16 expected_half = static_cast<_Float16>(f);
    uint16_t expected;
    std::memcpy(&expected, &expected_half, sizeof(expected));
    ASSERT_EQ(FloatToHalf(f), expected) << std::hexfloat << f;
  }
}
#endif

TEST(Float16Test, BFloat16Conversions) {
  EXPECT_EQ(BFloat16ToFloat(0x3f80), 1.0f);
  EXPECT_EQ(BFloat16ToFloat(0xc049), -3.140625f);
  EXPECT_EQ(BFloat16ToFloat(0x0001), std::ldexp(1.0f, -133));  // Subnormal.
  EXPECT_EQ(BFloat16ToFloat(0x7f80), std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(BFloat16ToFloat(0x7fc0)));

  EXPECT_EQ(FloatToBFloat16(1.0f), 0x3f80);
  EXPECT_EQ(FloatToBFloat16(-0.0f), 0x8000);
  EXPECT_EQ(FloatToBFloat16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);      // Tie to even.
  EXPECT_EQ(FloatToBFloat16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);  // Tie to even.
  EXPECT_EQ(FloatToBFloat16(std::nextafter(1.0f + std::ldexp(1.0f, -8), 2.0f)), 0x3f81);
  EXPECT_EQ(FloatToBFloat16(std::numeric_limits<float>::max()), 0x7f80);  // Rounds to inf.
  EXPECT_EQ(FloatToBFloat16(-std::numeric_limits<float>::infinity()), 0xff80);
  EXPECT_EQ(FloatToBFloat16(std::ldexp(1.0f, -133)), 0x0001);
  EXPECT_EQ(FloatToBFloat16(std::ldexp(1.0f, -134)), 0x0000);  // Subnormal tie to even.
  EXPECT_TRUE(std::isnan(BFloat16ToFloat(FloatToBFloat16(FromBits(0x7f800001u)))));
  EXPECT_TRUE(std::isnan(BFloat16ToFloat(FloatToBFloat16(FromBits(0xffc00000u)))));
  for (uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const float f = BFloat16ToFloat(static_cast<uint16_t>(bits));
    if (std::isnan(f)) continue;
    ASSERT_EQ(FloatToBFloat16(f), bits) << std::hex << bits;
  }
}

}  // namespace
}  // namespace collm::runtime
