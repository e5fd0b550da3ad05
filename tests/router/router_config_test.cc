#include "collm/router/router_config.h"

#include <cstdlib>
#include <string>

#include "gtest/gtest.h"

namespace collm::router {
namespace {

TEST(RouterConfigTest, TheShippedConfigParsesWithItsDocumentedDefaults) {
  unsetenv("COLLM_REPLICA_1");
  unsetenv("COLLM_REPLICA_2");
  auto c = RouterConfig::FromFile(std::string(COLLM_SOURCE_DIR) + "/configs/router.yaml");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->address, "127.0.0.1:50050");
  EXPECT_EQ(c->replicas, (std::vector<std::string>{"127.0.0.1:50051", "127.0.0.1:50052"}));
  EXPECT_EQ(c->policy, coordination::RoutingPolicyKind::kSlack);
  EXPECT_EQ(c->poll_interval_ms, 50);
  EXPECT_EQ(c->max_message_bytes, 64 << 20);
  // The file spells out the built-in defaults.
  const RouterConfig defaults;
  const coordination::SlackOptions slack;
  EXPECT_EQ(c->slack.tie_margin, slack.tie_margin);
  EXPECT_EQ(c->slack.decode_weight_tokens, slack.decode_weight_tokens);
  EXPECT_EQ(c->slack.default_seconds_per_token, slack.default_seconds_per_token);
  EXPECT_EQ(c->slack.per_replica_cost, slack.per_replica_cost);
  EXPECT_EQ(c->ejection.failures_to_eject, coordination::EjectionOptions{}.failures_to_eject);
  EXPECT_EQ(c->max_outstanding, defaults.max_outstanding);
  EXPECT_EQ(c->poll_timeout_ms, defaults.poll_timeout_ms);
  EXPECT_EQ(c->shutdown_grace_seconds, defaults.shutdown_grace_seconds);
  EXPECT_FALSE(c->http.enabled);
  EXPECT_EQ(c->http.address, "127.0.0.1:8080");  // Next to a collmd on 8000.
  EXPECT_EQ(c->http.threads, defaults.http.threads);
  EXPECT_EQ(c->http.max_body_bytes, defaults.http.max_body_bytes);
}

TEST(RouterConfigTest, TheHttpSectionReadsAsCollmdsDoes) {
  setenv("COLLM_API_KEY", "k1", 1);
  auto c = RouterConfig::FromYaml(
      "replicas: [a:1]\nhttp:\n  enabled: true\n  address: 127.0.0.1:0\n  api_keys: "
      "[\"${COLLM_API_KEY:-}\", \"${COLLM_NO_SUCH_KEY:-}\"]\n  served_model_name: base\n"
      "  max_body_bytes: 1MiB\n");
  unsetenv("COLLM_API_KEY");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->http.enabled);
  EXPECT_EQ(c->http.api_keys, std::vector<std::string>{"k1"});  // The empty one is dropped.
  EXPECT_EQ(c->http.served_model_name, "base");
  EXPECT_EQ(c->http.max_body_bytes, 1 << 20);
}

TEST(RouterConfigTest, ReplicasComeFromTheEnvironment) {
  setenv("COLLM_REPLICA_1", "10.0.0.1:7000", 1);
  setenv("COLLM_REPLICA_2", "10.0.0.2:7000", 1);
  auto c = RouterConfig::FromFile(std::string(COLLM_SOURCE_DIR) + "/configs/router.yaml");
  unsetenv("COLLM_REPLICA_1");
  unsetenv("COLLM_REPLICA_2");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->replicas, (std::vector<std::string>{"10.0.0.1:7000", "10.0.0.2:7000"}));
}

std::string Error(const std::string& yaml) {
  auto c = RouterConfig::FromYaml(yaml);
  return c.ok() ? "ok" : std::string(c.status().message());
}

TEST(RouterConfigTest, BadValuesNameTheKey) {
  EXPECT_EQ(Error("policy: slack\n"), "replicas is required (collmd addresses)");
  EXPECT_EQ(Error("replicas: []\n"), "replicas must list at least one replica");
  EXPECT_EQ(Error("replicas: [a:1, a:1]\n"), "replicas[1] 'a:1' is listed twice");
  EXPECT_EQ(Error("replicas: [nohost]\n"), "replicas[0] must be host:port, got 'nohost'");
  EXPECT_EQ(Error("replicas: [a:0]\n"), "replicas[0] needs a real port, got 'a:0'");
  EXPECT_EQ(Error("replicas: [a:1]\npolicy: fastest\n"),
            "policy must be one of slack, round_robin, least_outstanding, got 'fastest'");
  EXPECT_EQ(Error("replicas: [a:1]\npoll_interval_ms: 500\n"),
            "poll_interval_ms must be in [1, 100], got 500");
  EXPECT_EQ(Error("replicas: [a:1]\nslack:\n  min_speed: 2\n"),
            "slack.min_speed must be in (0, 1], got 2");
  EXPECT_EQ(Error("replicas: [a:1]\nejection:\n  failures_to_eject: 0\n"),
            "ejection.failures_to_eject must be >= 1, got 0");
  EXPECT_EQ(Error("replicas: [a:1]\nserver:\n  address: x:99999\n"),
            "server.address has a bad port in 'x:99999'");
  EXPECT_EQ(Error("replicas: [a:1]\nhttp:\n  threads: 0\n"), "http.threads must be > 0, got 0");
  EXPECT_EQ(Error("replicas: [a:1]\nhttp:\n  enabled: true\n  address: nohost\n"),
            "http.address must be host:port, got 'nohost'");
  const std::string chat = Error("replicas: [a:1]\nhttp:\n  chat_template: zephyr\n");
  EXPECT_NE(chat.find("http.chat_template is not used by collm-router"), std::string::npos) << chat;
  const std::string typo = Error("replicas: [a:1]\nslack:\n  tie_margn: 1\n");
  EXPECT_NE(typo.find("slack.tie_margn: unknown key"), std::string::npos) << typo;
  EXPECT_NE(typo.find("did you mean tie_margin?"), std::string::npos) << typo;
}

}  // namespace
}  // namespace collm::router
