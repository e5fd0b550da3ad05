#include "collm/config/aggregator_config.h"

#include <filesystem>
#include <optional>
#include <string>

#include "collm/config/daemon_config.h"
#include "config/config_test_util.h"
#include "gtest/gtest.h"
#include "testing/test_env.h"

namespace collm::config {
namespace {

namespace fs = std::filesystem;

const std::string kShippedConfig = std::string(COLLM_SOURCE_DIR) + "/configs/aggregator.yaml";
const char kRequired[] = "state_dir: /s\nmodel_config: /m/config.json\n";

absl::StatusOr<AggregatorConfig> Parse(const std::string& rest, const std::string& base = "/cfg") {
  return AggregatorConfig::FromYaml(kRequired + rest, base);
}

std::string ErrorOf(const std::string& rest) {
  absl::StatusOr<AggregatorConfig> c = Parse(rest);
  EXPECT_FALSE(c.ok()) << "expected an error for:\n" << rest;
  if (c.ok()) return "";
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
  return std::string(c.status().message());
}

TEST(AggregatorConfigTest, ShippedConfigGivesTheDocumentedDefaults) {
  ScopedEnv token("COLLM_ADMIN_TOKEN", std::nullopt);
  ScopedEnv models("COLLM_MODELS_DIR", "/srv/models");
  absl::StatusOr<AggregatorConfig> c = AggregatorConfig::FromFile(kShippedConfig);
  ASSERT_TRUE(c.ok()) << c.status();
  const AggregatorConfig defaults;
  EXPECT_EQ(c->address, defaults.address);
  EXPECT_EQ(c->max_message_bytes, defaults.max_message_bytes);
  EXPECT_EQ(c->heartbeat_interval_ms, defaults.heartbeat_interval_ms);
  EXPECT_EQ(c->offline_after_missed, defaults.offline_after_missed);
  EXPECT_EQ(c->max_update_bytes, defaults.max_update_bytes);
  EXPECT_EQ(c->tick_ms, defaults.tick_ms);
  EXPECT_EQ(c->auto_start, defaults.auto_start);
  EXPECT_EQ(c->shutdown_grace_seconds, defaults.shutdown_grace_seconds);
  EXPECT_EQ(c->admin_token, "");
  // Relative paths resolve against configs/.
  const fs::path configs = fs::path(kShippedConfig).parent_path();
  EXPECT_EQ(c->state_dir, (configs / "aggregator-state").lexically_normal().string());
  EXPECT_EQ(c->policy.strategy(), "fedavg");
  EXPECT_EQ(c->policy.local_steps(), 20);
  const coordination::RoundPlannerOptions planner;
  EXPECT_EQ(c->coordination.policy, planner.policy);
  EXPECT_EQ(c->coordination.v, planner.v);
  EXPECT_EQ(c->coordination.slo_target, planner.slo_target);
  EXPECT_EQ(c->coordination.max_utilization, planner.max_utilization);
  EXPECT_EQ(c->coordination.max_share, planner.max_share);
  EXPECT_EQ(c->coordination.min_budget_steps, planner.min_budget_steps);
  EXPECT_EQ(c->coordination.deadline_slack, planner.deadline_slack);
  EXPECT_EQ(c->metrics_address, "127.0.0.1:9500");  // Off ("") unless configured.
  EXPECT_EQ(defaults.metrics_address, "");
}

TEST(AggregatorConfigTest, CoordinationSectionIsParsedAndValidated) {
  absl::StatusOr<AggregatorConfig> c = Parse(
      "coordination: {policy: uniform, V: 3, slo_target: 0.9, max_utilization: 0.7, "
      "max_share: 0.5, min_budget_steps: 4, deadline_slack: 2}\nmetrics_address: 127.0.0.1:0\n");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->coordination.policy, coordination::RoundPolicy::kUniform);
  EXPECT_EQ(c->coordination.v, 3);
  EXPECT_EQ(c->coordination.slo_target, 0.9);
  EXPECT_EQ(c->coordination.max_utilization, 0.7);
  EXPECT_EQ(c->coordination.max_share, 0.5);
  EXPECT_EQ(c->coordination.min_budget_steps, 4);
  EXPECT_EQ(c->coordination.deadline_slack, 2);
  EXPECT_EQ(c->metrics_address, "127.0.0.1:0");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf("coordination: {policy: greedy}\n"),
                      "coordination.policy must be uniform or drift_plus_penalty, got 'greedy'");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf("coordination: {V: -1}\n"),
                      "coordination.V must be >= 0, got -1");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf("coordination: {max_share: 2}\n"),
                      "coordination.max_share must be in (0, 1], got 2");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf("coordination: {min_budget_steps: 0}\n"),
                      "coordination.min_budget_steps must be >= 1, got 0");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf("coordination: {vv: 1}\n"), "coordination.vv: unknown key");
}

TEST(AggregatorConfigTest, StateDirAndModelConfigAreRequired) {
  absl::StatusOr<AggregatorConfig> c = AggregatorConfig::FromYaml("model_config: /m\n", "/cfg");
  ASSERT_FALSE(c.ok());
  EXPECT_PRED_FORMAT2(Contains, std::string(c.status().message()), "state_dir is required");
  c = AggregatorConfig::FromYaml("state_dir: /s\n", "/cfg");
  ASSERT_FALSE(c.ok());
  EXPECT_PRED_FORMAT2(Contains, std::string(c.status().message()), "model_config is required");
}

TEST(AggregatorConfigTest, UnknownKeysAreNamedWithASuggestion) {
  EXPECT_PRED_FORMAT2(Contains, ErrorOf("policy:\n  lrr: 1\n"),
                      "policy.lrr: unknown key (known: rounds, ");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf("policy:\n  lrr: 1\n"), "did you mean lr?");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf("tickms: 5\n"), "did you mean tick_ms?");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf("tls: {cert_file: a}\n"), "tls.cert_file: unknown key");
}

TEST(AggregatorConfigTest, BadValuesNameTheKey) {
  EXPECT_PRED_FORMAT2(Contains, ErrorOf("tick_ms: 0\n"), "tick_ms must be >= 1, got 0");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf("policy: {local_steps: 0}\n"),
                      "policy.local_steps must be >= 1, got 0");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf("policy: {lr: -2}\n"), "policy.lr must be > 0, got -2");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf("server: {max_message_bytes: 100}\n"),
                      "server.max_message_bytes must be >= 4096, got 100");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf("seed: -1\n"), "seed must be an integer >= 0, got '-1'");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf("auto_start: maybe\n"),
                      "auto_start must be true or false, got 'maybe'");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf("lora: {rank: 0}\n"), "lora.rank must be > 0, got 0");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf("lora: {targets: [q_proj, nope]}\n"), "lora.targets[1]");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf("logging: {level: loud}\n"),
                      "logging.level must be one of trace, ");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf("tls: {cert: c.pem}\n"), "tls needs both cert and key");
  EXPECT_PRED_FORMAT2(Contains, ErrorOf("admin_token: t\nadmin_token_file: f\n"),
                      "admin_token_file and admin_token are exclusive");
}

TEST(AggregatorConfigTest, ByteSizesTakeUnits) {
  absl::StatusOr<AggregatorConfig> c =
      Parse("server: {max_message_bytes: 32MiB}\nmax_update_bytes: 1GB\n");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->max_message_bytes, int64_t{32} << 20);
  EXPECT_EQ(c->max_update_bytes, int64_t{1000000000});
}

TEST(AggregatorConfigTest, PathsExpandAndResolveAgainstTheConfigDirectory) {
  ScopedEnv home("HOME", "/home/tester");
  ScopedEnv token("COLLM_TEST_TOKEN", "sekret");
  absl::StatusOr<AggregatorConfig> c = AggregatorConfig::FromYaml(
      "state_dir: ~/state/\nmodel_config: ../m/config.json\ninitial_adapter: ad\n"
      "admin_token: \"${COLLM_TEST_TOKEN}$${X}\"\n",
      "/etc/collm");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->state_dir, "/home/tester/state");
  EXPECT_EQ(c->model_config, "/etc/m/config.json");
  EXPECT_EQ(c->initial_adapter, "/etc/collm/ad");
  EXPECT_EQ(c->admin_token, "sekret${X}");
}

TEST(AggregatorConfigTest, FromFileErrorsNameTheFile) {
  const std::string dir = testing::MakeTempDir("collm-agg-config");
  const std::string path = dir + "/a.yaml";
  testing::WriteFileOrDie(path, std::string(kRequired) + "tick_ms: 0\n");
  absl::StatusOr<AggregatorConfig> c = AggregatorConfig::FromFile(path);
  ASSERT_FALSE(c.ok());
  EXPECT_PRED_FORMAT2(Contains, std::string(c.status().message()),
                      path + ": tick_ms must be >= 1, got 0");
  c = AggregatorConfig::FromFile(dir + "/missing.yaml");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
}

// The point of one reader: the same text means the same thing in collmd.yaml and aggregator.yaml.
TEST(AggregatorConfigTest, SameTextMeansTheSameAsInTheDaemonConfig) {
  ScopedEnv home("HOME", "/home/tester");
  ScopedEnv dir("COLLM_TEST_DIR", std::nullopt);
  const std::string path = "\"${COLLM_TEST_DIR:-~/x}/$${lit}/../y/\"";
  const std::string lora =
      "lora: {rank: 4, alpha: 8, dropout: 0.1, use_rslora: YES, targets: all-linear}\n";
  const std::string logging = "logging: {level: debug, json: On}\n";

  absl::StatusOr<AggregatorConfig> agg = AggregatorConfig::FromYaml(
      "state_dir: " + path + "\nmodel_config: /m\n" + lora + logging, "/etc/collm");
  ASSERT_TRUE(agg.ok()) << agg.status();
  absl::StatusOr<DaemonConfig> daemon =
      DaemonConfig::FromYaml("model: " + path + "\ntraining:\n  " + lora + logging, "/etc/collm");
  ASSERT_TRUE(daemon.ok()) << daemon.status();

  EXPECT_EQ(agg->state_dir, "/home/tester/x/y");
  EXPECT_EQ(agg->state_dir, daemon->model_dir);
  EXPECT_EQ(agg->lora.rank, daemon->training.lora.rank);
  EXPECT_EQ(agg->lora.alpha, daemon->training.lora.alpha);
  EXPECT_EQ(agg->lora.dropout, daemon->training.lora.dropout);
  EXPECT_TRUE(agg->lora.use_rslora);
  EXPECT_EQ(agg->lora.use_rslora, daemon->training.lora.use_rslora);
  EXPECT_EQ(agg->lora.targets, daemon->training.lora.targets);
  EXPECT_EQ(agg->lora.targets.size(), 7u);
  EXPECT_EQ(agg->logging.level, daemon->logging.level);
  EXPECT_TRUE(agg->logging.json);
  EXPECT_EQ(agg->logging.json, daemon->logging.json);

  // And the same mistakes read the same way.
  absl::StatusOr<AggregatorConfig> bad_agg =
      AggregatorConfig::FromYaml("state_dir: /s\nmodel_config: /m\nlora: {rnak: 4}\n", "");
  absl::StatusOr<DaemonConfig> bad_daemon =
      DaemonConfig::FromYaml("model: /m\ntraining:\n  lora: {rnak: 4}\n", "");
  ASSERT_FALSE(bad_agg.ok());
  ASSERT_FALSE(bad_daemon.ok());
  EXPECT_PRED_FORMAT2(Contains, std::string(bad_agg.status().message()),
                      "lora.rnak: unknown key (known: rank, alpha, dropout, use_rslora, targets); "
                      "did you mean rank?");
  EXPECT_PRED_FORMAT2(Contains, std::string(bad_daemon.status().message()),
                      "training.lora.rnak: unknown key (known: rank, alpha, dropout, use_rslora, "
                      "targets); did you mean rank?");
}

}  // namespace
}  // namespace collm::config
