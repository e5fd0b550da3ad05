#include "collm/common/status.h"

#include "gtest/gtest.h"

namespace collm {
namespace {

absl::StatusOr<int> ParsePositive(int v) {
  if (v <= 0) return absl::InvalidArgumentError("must be > 0");
  return v;
}

absl::Status UseAssign(int v, int* out) {
  COLLM_ASSIGN_OR_RETURN(int x, ParsePositive(v));
  *out = x * 2;
  return absl::OkStatus();
}

absl::Status UseReturnIfError(int v) {
  COLLM_RETURN_IF_ERROR(ParsePositive(v).status());
  return absl::OkStatus();
}

TEST(StatusTest, AssignOrReturnPropagatesErrorAndValue) {
  int out = 0;
  EXPECT_TRUE(UseAssign(3, &out).ok());
  EXPECT_EQ(out, 6);
  absl::Status s = UseAssign(-1, &out);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(out, 6);
}

TEST(StatusTest, ReturnIfErrorAndAnnotate) {
  EXPECT_TRUE(UseReturnIfError(1).ok());
  absl::Status s = Annotate(UseReturnIfError(0), "lora.rank");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "lora.rank: must be > 0");
  EXPECT_TRUE(Annotate(absl::OkStatus(), "x").ok());
}

}  // namespace
}  // namespace collm
