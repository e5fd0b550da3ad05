#include "collm/coordination/routing_policy.h"

#include <map>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace collm::coordination {
namespace {

ReplicaView Idle() {
  ReplicaView r;
  r.load_known = true;
  r.seconds_per_token = 0.001;
  return r;
}

std::vector<std::string> Names(int n) {
  std::vector<std::string> names;
  for (int i = 0; i < n; ++i) names.push_back("r" + std::to_string(i));
  return names;
}

// How often each replica is chosen over `trials` identical decisions.
std::vector<int> Counts(RoutingPolicy& policy, const RouteRequest& request,
                        const std::vector<ReplicaView>& replicas, int trials) {
  std::vector<int> counts(replicas.size(), 0);
  for (int t = 0; t < trials; ++t) {
    auto d = policy.Choose(request, replicas, Names(static_cast<int>(replicas.size())));
    EXPECT_TRUE(d.ok()) << d.status();
    if (d.ok()) ++counts[d->index];
  }
  return counts;
}

TEST(RoutingPolicyTest, SlackPredictsFromQueuedPrefillDecodeLoadAndTrainingShare) {
  SlackOptions o;
  o.decode_weight_tokens = 10;
  RoutingPolicy p(RoutingPolicyKind::kSlack, o, 1);
  RouteRequest req;
  req.prompt_tokens = 100;
  ReplicaView r = Idle();
  EXPECT_DOUBLE_EQ(p.PredictTtftSeconds(req, r), 0.1);  // Its own prompt only.
  r.queued_prompt_tokens = 300;
  r.unreported_prompt_tokens = 100;
  EXPECT_DOUBLE_EQ(p.PredictTtftSeconds(req, r), 0.5);
  r.running_sequences = 5;  // 5 x 10 tokens of decode interference.
  EXPECT_DOUBLE_EQ(p.PredictTtftSeconds(req, r), 0.55);
  r.training_share = 0.5;  // Half speed.
  EXPECT_DOUBLE_EQ(p.PredictTtftSeconds(req, r), 1.1);
  r.training_share = 1.0;  // Floored at min_speed, finite.
  EXPECT_NEAR(p.PredictTtftSeconds(req, r), 0.55 / o.min_speed, 1e-9);
  r.training_share = 0;
  r.kv_free_fraction = 0.01;  // Admission will wait for memory.
  EXPECT_DOUBLE_EQ(p.PredictTtftSeconds(req, r), 0.55 + o.low_kv_penalty_seconds);
}

TEST(RoutingPolicyTest, SlackUsesTheDefaultCostUntilAReplicaMeasuredOne) {
  SlackOptions o;
  o.default_seconds_per_token = 0.01;
  RoutingPolicy p(RoutingPolicyKind::kSlack, o, 1);
  RouteRequest req;
  req.prompt_tokens = 10;
  ReplicaView unknown;  // No report yet: only the router's own outstanding counts.
  unknown.outstanding = 2;
  EXPECT_DOUBLE_EQ(p.PredictTtftSeconds(req, unknown), (10 + 2 * o.decode_weight_tokens) * 0.01);
}

TEST(RoutingPolicyTest, SlackSendsEverythingToTheClearlyBestReplica) {
  RoutingPolicy p(RoutingPolicyKind::kSlack, SlackOptions{}, 7);
  std::vector<ReplicaView> rs = {Idle(), Idle(), Idle()};
  rs[0].queued_prompt_tokens = 5000;
  rs[2].queued_prompt_tokens = 3000;
  RouteRequest req;
  req.prompt_tokens = 50;
  const std::vector<int> counts = Counts(p, req, rs, 200);
  EXPECT_EQ(counts[1], 200);
}

TEST(RoutingPolicyTest, SlackPicksAtRandomBetweenTheBestTwoWhenTheyAreClose) {
  RoutingPolicy p(RoutingPolicyKind::kSlack, SlackOptions{}, 7);
  std::vector<ReplicaView> rs = {Idle(), Idle(), Idle()};
  rs[0].queued_prompt_tokens = 100;
  rs[1].queued_prompt_tokens = 110;   // Within 25 % of the best.
  rs[2].queued_prompt_tokens = 5000;  // Never.
  RouteRequest req;
  req.prompt_tokens = 10;
  const std::vector<int> counts = Counts(p, req, rs, 400);
  EXPECT_EQ(counts[2], 0);
  EXPECT_GT(counts[0], 120);
  EXPECT_GT(counts[1], 120);
}

TEST(RoutingPolicyTest, SlackSpreadsRequestsOverEquallyIdleReplicas) {
  RoutingPolicy p(RoutingPolicyKind::kSlack, SlackOptions{}, 11);
  const std::vector<ReplicaView> rs = {Idle(), Idle(), Idle(), Idle()};
  RouteRequest req;
  for (int count : Counts(p, req, rs, 400)) EXPECT_GT(count, 50);
}

TEST(RoutingPolicyTest, SlackAvoidsATrainingReplica) {
  RoutingPolicy p(RoutingPolicyKind::kSlack, SlackOptions{}, 3);
  std::vector<ReplicaView> rs = {Idle(), Idle()};
  rs[0].training_share = 0.6;  // Serves at 40 % speed.
  RouteRequest req;
  req.prompt_tokens = 40;
  std::vector<int> counts = Counts(p, req, rs, 100);
  EXPECT_EQ(counts[0], 0);
  // Under enough load on the idle one, the training replica takes work again.
  rs[1].queued_prompt_tokens = 400;
  counts = Counts(p, req, rs, 100);
  EXPECT_EQ(counts[0], 100);
}

TEST(RoutingPolicyTest, RoundRobinTakesTurnsAndSkipsIneligibleReplicas) {
  RoutingPolicy p(RoutingPolicyKind::kRoundRobin, SlackOptions{}, 1);
  std::vector<ReplicaView> rs = {Idle(), Idle(), Idle()};
  RouteRequest req;
  std::vector<int> seen;
  for (int i = 0; i < 4; ++i) seen.push_back(p.Choose(req, rs, Names(3))->index);
  EXPECT_EQ(seen, (std::vector<int>{0, 1, 2, 0}));
  rs[1].admitted = false;
  seen.clear();
  for (int i = 0; i < 3; ++i) seen.push_back(p.Choose(req, rs, Names(3))->index);
  EXPECT_EQ(seen, (std::vector<int>{2, 0, 2}));
}

TEST(RoutingPolicyTest, LeastOutstandingCountsTheRoutersOwnInFlightRequests) {
  RoutingPolicy p(RoutingPolicyKind::kLeastOutstanding, SlackOptions{}, 1);
  std::vector<ReplicaView> rs = {Idle(), Idle(), Idle()};
  rs[0].outstanding = 3;
  rs[1].outstanding = 1;
  rs[2].outstanding = 2;
  EXPECT_EQ(p.Choose(RouteRequest{}, rs, Names(3))->index, 1);
}

TEST(RoutingPolicyTest, AdapterAffinityOnlyRoutesToReplicasServingTheVersion) {
  for (RoutingPolicyKind kind : {RoutingPolicyKind::kRoundRobin,
                                 RoutingPolicyKind::kLeastOutstanding, RoutingPolicyKind::kSlack}) {
    RoutingPolicy p(kind, SlackOptions{}, 5);
    std::vector<ReplicaView> rs = {Idle(), Idle(), Idle()};
    rs[0].adapters = {{"math", 2}};
    rs[1].adapters = {{"math", 4}, {"chat", 1}};
    rs[1].queued_prompt_tokens = 10000;  // Busy, but the only one with v>=3.
    RouteRequest req;
    req.adapter = "math";
    req.min_adapter_version = 3;
    for (int t = 0; t < 20; ++t) {
      EXPECT_EQ(p.Choose(req, rs, Names(3))->index, 1) << RoutingPolicyName(kind);
    }
    req.min_adapter_version = 0;
    for (int t = 0; t < 20; ++t) {
      EXPECT_NE(p.Choose(req, rs, Names(3))->index, 2) << RoutingPolicyName(kind);
    }
  }
}

TEST(RoutingPolicyTest, NoEligibleReplicaIsAClearError) {
  RoutingPolicy p(RoutingPolicyKind::kSlack, SlackOptions{}, 5);
  std::vector<ReplicaView> rs = {Idle(), Idle(), ReplicaView{}};
  rs[0].admitted = false;
  rs[1].adapters = {{"math", 2}};
  RouteRequest req;
  req.adapter = "math";
  req.min_adapter_version = 3;
  auto d = p.Choose(req, rs, {"a:1", "b:2", "c:3"});
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(d.status().message(),
            "no replica can serve adapter 'math' v>=3: a:1 ejected; b:2 serves 'math' v2; c:3 has "
            "not reported its adapters yet");
  auto none = p.Choose(RouteRequest{}, {}, {});
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().message(), "no replica can serve the request: no replicas configured");
}

TEST(RoutingPolicyTest, ARetryExcludesTheReplicaThatFailed) {
  RoutingPolicy p(RoutingPolicyKind::kSlack, SlackOptions{}, 5);
  std::vector<ReplicaView> rs = {Idle(), Idle()};
  rs[1].queued_prompt_tokens = 1000;
  EXPECT_EQ(p.Choose(RouteRequest{}, rs, Names(2))->index, 0);
  EXPECT_EQ(p.Choose(RouteRequest{}, rs, Names(2), {0})->index, 1);
  EXPECT_FALSE(p.Choose(RouteRequest{}, rs, Names(2), {0, 1}).ok());
}

TEST(RoutingPolicyTest, BadSlackOptionsNameTheField) {
  SlackOptions o;
  o.min_speed = 0;
  EXPECT_EQ(ValidateSlackOptions(o).message(), "slack.min_speed must be in (0, 1], got 0");
  o = SlackOptions{};
  o.default_seconds_per_token = -1;
  EXPECT_EQ(ValidateSlackOptions(o).message(),
            "slack.default_seconds_per_token must be > 0, got -1");
  EXPECT_TRUE(ValidateSlackOptions(SlackOptions{}).ok());
}

}  // namespace
}  // namespace collm::coordination
