#include "collm/federation/adapter_stream.h"

#include <string>
#include <vector>

#include "collm/federation/fingerprint.h"
#include "gtest/gtest.h"

namespace collm::federation {
namespace {

lora::PeftBlob MakeBlob(size_t bytes) {
  lora::PeftBlob blob;
  blob.config_json = R"({"r": 4})";
  blob.safetensors.resize(bytes);
  for (size_t i = 0; i < bytes; ++i) blob.safetensors[i] = static_cast<char>((i * 131 + 7) % 251);
  return blob;
}

std::vector<std::string> Split(const lora::PeftBlob& blob, int64_t chunk_bytes) {
  std::vector<std::string> chunks;
  EXPECT_TRUE(WriteAdapterChunks(blob.safetensors, chunk_bytes, [&](std::string data) {
    chunks.push_back(std::move(data));
    return true;
  }));
  return chunks;
}

TEST(AdapterStreamTest, RoundTripsInChunks) {
  const lora::PeftBlob blob = MakeBlob(10000);
  const v1::AdapterBlobHeader header = DescribeAdapter(blob);
  EXPECT_EQ(header.safetensors_bytes(), 10000);
  EXPECT_EQ(header.sha256(), Sha256Hex(blob.safetensors));
  EXPECT_EQ(header.config_json(), blob.config_json);
  const std::vector<std::string> chunks = Split(blob, 4096);
  ASSERT_EQ(chunks.size(), 3u);
  EXPECT_EQ(chunks[0].size(), 4096u);
  EXPECT_EQ(chunks[2].size(), 10000u - 2 * 4096);

  absl::StatusOr<AdapterReceiver> r = AdapterReceiver::Begin(header, 1 << 20, "global version 2");
  ASSERT_TRUE(r.ok()) << r.status();
  for (const std::string& c : chunks) ASSERT_TRUE(r->Add(c).ok());
  EXPECT_EQ(r->received_bytes(), 10000);
  absl::StatusOr<lora::PeftBlob> got = std::move(*r).Finish();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->safetensors, blob.safetensors);
  EXPECT_EQ(got->config_json, blob.config_json);
}

TEST(AdapterStreamTest, ASenderThatGoesAwayStopsTheWrites) {
  const lora::PeftBlob blob = MakeBlob(100);
  int writes = 0;
  EXPECT_FALSE(WriteAdapterChunks(blob.safetensors, 10, [&](std::string) { return ++writes < 3; }));
  EXPECT_EQ(writes, 3);
}

TEST(AdapterStreamTest, ACorruptedChunkIsAShaMismatch) {
  const lora::PeftBlob blob = MakeBlob(5000);
  std::vector<std::string> chunks = Split(blob, 1000);
  chunks[3][17] ^= 0x01;
  absl::StatusOr<AdapterReceiver> r =
      AdapterReceiver::Begin(DescribeAdapter(blob), 1 << 20, "global version 5");
  ASSERT_TRUE(r.ok()) << r.status();
  for (const std::string& c : chunks) ASSERT_TRUE(r->Add(c).ok());
  absl::StatusOr<lora::PeftBlob> got = std::move(*r).Finish();
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(got.status().message().find("global version 5: sha256 mismatch (got "),
            std::string::npos)
      << got.status();
  EXPECT_NE(got.status().message().find(DescribeAdapter(blob).sha256()), std::string::npos);
}

TEST(AdapterStreamTest, AnOversizedAnnouncementNamesTheLimit) {
  const lora::PeftBlob blob = MakeBlob(5000);
  absl::StatusOr<AdapterReceiver> r = AdapterReceiver::Begin(DescribeAdapter(blob), 4096, "update");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.status().message(), "update: the header announces 5000 bytes; the limit is 4096");

  v1::AdapterBlobHeader negative = DescribeAdapter(blob);
  negative.set_safetensors_bytes(-1);
  EXPECT_FALSE(AdapterReceiver::Begin(negative, 4096, "update").ok());
}

TEST(AdapterStreamTest, BytesBeyondTheAnnouncedSizeAreRefused) {
  const lora::PeftBlob blob = MakeBlob(100);
  v1::AdapterBlobHeader header = DescribeAdapter(blob);
  header.set_safetensors_bytes(60);
  absl::StatusOr<AdapterReceiver> r = AdapterReceiver::Begin(header, 1 << 20, "update");
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_TRUE(r->Add(blob.safetensors.substr(0, 50)).ok());
  const absl::Status s = r->Add(blob.safetensors.substr(50, 50));
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(s.message(), "update: more than the announced 60 bytes");
}

TEST(AdapterStreamTest, ATruncatedTransferNamesBothSizes) {
  const lora::PeftBlob blob = MakeBlob(100);
  absl::StatusOr<AdapterReceiver> r = AdapterReceiver::Begin(DescribeAdapter(blob), 1000, "update");
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_TRUE(r->Add(blob.safetensors.substr(0, 40)).ok());
  absl::StatusOr<lora::PeftBlob> got = std::move(*r).Finish();
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.status().message(), "update: got 40 bytes, the header announced 100");
}

TEST(AdapterStreamTest, AnEmptyPayloadRoundTripsWithoutChunks) {
  const lora::PeftBlob blob = MakeBlob(0);
  EXPECT_TRUE(Split(blob, 16).empty());
  const v1::AdapterBlobHeader header = DescribeAdapter(blob);
  EXPECT_EQ(header.safetensors_bytes(), 0);
  EXPECT_EQ(header.sha256(), Sha256Hex(""));
  absl::StatusOr<AdapterReceiver> r = AdapterReceiver::Begin(header, 0, "update");
  ASSERT_TRUE(r.ok()) << r.status();
  absl::StatusOr<lora::PeftBlob> got = std::move(*r).Finish();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(got->safetensors.empty());
  EXPECT_EQ(got->config_json, blob.config_json);
  // One byte against an empty announcement is too many.
  r = AdapterReceiver::Begin(header, 0, "update");
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->Add("x").ok());
}

std::vector<v1::AdapterChunk> Stream(const lora::PeftBlob& blob, int64_t version,
                                     int64_t chunk_bytes) {
  std::vector<v1::AdapterChunk> out(1);
  *out[0].mutable_header() = DescribeAdapter(blob);
  out[0].mutable_header()->set_version(version);
  for (std::string& data : Split(blob, chunk_bytes)) {
    out.emplace_back().set_data(std::move(data));
  }
  return out;
}

TEST(AdapterChunkReaderTest, ReadsAHeaderThenData) {
  const lora::PeftBlob blob = MakeBlob(3000);
  AdapterChunkReader reader("FetchGlobal", 1 << 20);
  for (const v1::AdapterChunk& c : Stream(blob, 4, 1000)) ASSERT_TRUE(reader.Add(c).ok());
  EXPECT_EQ(reader.header().version(), 4);
  absl::StatusOr<lora::PeftBlob> got = std::move(reader).Finish();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->safetensors, blob.safetensors);
}

TEST(AdapterChunkReaderTest, AStreamOutOfOrderOrTooLargeIsDataLoss) {
  const lora::PeftBlob blob = MakeBlob(3000);
  std::vector<v1::AdapterChunk> chunks = Stream(blob, 4, 1000);

  AdapterChunkReader data_first("PullAdapter", 1 << 20);
  absl::Status s = data_first.Add(chunks[1]);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(s.message(), "PullAdapter: the first message has no header");

  AdapterChunkReader two_headers("PullAdapter", 1 << 20);
  ASSERT_TRUE(two_headers.Add(chunks[0]).ok());
  s = two_headers.Add(chunks[0]);
  EXPECT_EQ(s.message(), "PullAdapter: a second header in the stream");

  AdapterChunkReader small("FetchGlobal", 100);
  s = small.Add(chunks[0]);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(s.message(), "global version 4: the header announces 3000 bytes; the limit is 100");

  AdapterChunkReader empty("FetchGlobal", 100);
  absl::StatusOr<lora::PeftBlob> got = std::move(empty).Finish();
  EXPECT_EQ(got.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(got.status().message(), "FetchGlobal: empty stream");
}

}  // namespace
}  // namespace collm::federation
