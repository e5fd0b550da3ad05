#include "collm/coordination/replica_health.h"

#include "gtest/gtest.h"

namespace collm::coordination {
namespace {

constexpr int64_t kMs = 1000000;

TEST(ReplicaHealthTest, EjectsAfterConsecutiveFailuresOnly) {
  ReplicaHealth h(EjectionOptions{3, 1000, 8000});
  EXPECT_FALSE(h.RecordFailure(0));
  EXPECT_FALSE(h.RecordFailure(1));
  EXPECT_TRUE(h.RecordSuccess(2) == false && h.admitted());  // A success resets the count.
  EXPECT_FALSE(h.RecordFailure(3));
  EXPECT_FALSE(h.RecordFailure(4));
  EXPECT_TRUE(h.RecordFailure(5));
  EXPECT_FALSE(h.admitted());
  EXPECT_EQ(h.ejections(), 1);
}

TEST(ReplicaHealthTest, ReadmitsOnTheFirstSuccessAfterTheBackoff) {
  ReplicaHealth h(EjectionOptions{1, 1000, 8000});
  EXPECT_TRUE(h.RecordFailure(0));
  EXPECT_FALSE(h.ProbeDue(999 * kMs));
  EXPECT_FALSE(h.RecordSuccess(500 * kMs));  // A stale answer during the backoff.
  EXPECT_FALSE(h.admitted());
  EXPECT_TRUE(h.ProbeDue(1000 * kMs));
  EXPECT_TRUE(h.RecordSuccess(1000 * kMs));
  EXPECT_TRUE(h.admitted());
}

TEST(ReplicaHealthTest, BackoffDoublesWhileTheReplicaKeepsFailingUpToTheCap) {
  ReplicaHealth h(EjectionOptions{1, 1000, 3000});
  EXPECT_TRUE(h.RecordFailure(0));           // Back at 1 s.
  EXPECT_FALSE(h.RecordFailure(500 * kMs));  // During the backoff: no extension.
  EXPECT_TRUE(h.ProbeDue(1000 * kMs));
  EXPECT_FALSE(h.RecordFailure(1000 * kMs));  // Probe failed: 2 s more.
  EXPECT_FALSE(h.ProbeDue(2999 * kMs));
  EXPECT_TRUE(h.ProbeDue(3000 * kMs));
  h.RecordFailure(3000 * kMs);  // 4 s capped at 3 s.
  EXPECT_FALSE(h.ProbeDue(5999 * kMs));
  EXPECT_TRUE(h.ProbeDue(6000 * kMs));
  EXPECT_TRUE(h.RecordSuccess(6000 * kMs));
  EXPECT_EQ(h.ejections(), 1);
  // Flapping right after re-admission backs off longer than a first ejection.
  EXPECT_TRUE(h.RecordFailure(6001 * kMs));
  EXPECT_FALSE(h.ProbeDue(6001 * kMs + 2999 * kMs));
  EXPECT_EQ(h.ejections(), 2);
}

TEST(ReplicaHealthTest, BadOptionsNameTheField) {
  EXPECT_EQ(ValidateEjectionOptions(EjectionOptions{0, 1000, 2000}).message(),
            "ejection.failures_to_eject must be >= 1, got 0");
  EXPECT_EQ(ValidateEjectionOptions(EjectionOptions{1, 1000, 10}).message(),
            "ejection.max_backoff_ms must be >= ejection.base_backoff_ms (1000), got 10");
  EXPECT_TRUE(ValidateEjectionOptions(EjectionOptions{}).ok());
}

}  // namespace
}  // namespace collm::coordination
