// collmctl task make: the main job's built-in task, generated here so the demo needs no data set.
// Deterministic for a seed; the held-out split is drawn first and train never repeats its prompts.
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <set>
#include <string>
#include <utility>

#include "collm/cli/commands.h"
#include "nlohmann/json.hpp"

namespace collm::cli {
namespace {

using Example = std::pair<std::string, std::string>;  // prompt, completion

// "Number: 37\nParity: " -> "odd": the answer is a rule of the last digit, so held-out numbers
// are answerable only by learning the rule (or, at least, the format and its two labels).
Example Parity(std::mt19937_64& rng) {
  const int n = std::uniform_int_distribution<int>(0, 9999)(rng);
  return {"Number: " + std::to_string(n) + "\nParity: ", n % 2 == 0 ? "even" : "odd"};
}

// "Copy: k q d\nOutput: " -> "k q d": an induction-head task for a small model.
Example Copy(std::mt19937_64& rng) {
  const int len = std::uniform_int_distribution<int>(2, 4)(rng);
  std::string s;
  for (int i = 0; i < len; ++i) {
    if (i > 0) s += ' ';
    s += static_cast<char>('a' + std::uniform_int_distribution<int>(0, 25)(rng));
  }
  return {"Copy: " + s + "\nOutput: ", s};
}

bool WriteSplit(const std::filesystem::path& path, const std::vector<Example>& examples,
                std::ostream& err) {
  std::ofstream f(path);
  for (const auto& [prompt, completion] : examples) {
    f << nlohmann::json{{"prompt", prompt}, {"completion", completion}}.dump() << "\n";
  }
  if (!f) {
    err << "collmctl: cannot write " << path.string() << "\n";
    return false;
  }
  return true;
}

}  // namespace

int RunTaskMake(const TaskArgs& args, std::ostream& out, std::ostream& err) {
  Example (*make)(std::mt19937_64&) = nullptr;
  if (args.kind == "parity") make = Parity;
  if (args.kind == "copy") make = Copy;
  if (make == nullptr) {
    err << "collmctl: --kind must be parity or copy, got '" << args.kind << "'\n";
    return 2;
  }
  if (args.out_dir.empty()) {
    err << "collmctl: --out is required\n";
    return 2;
  }
  if (args.train < 1 || args.heldout < 1 || args.train + args.heldout > 5000) {
    err << "collmctl: --train and --heldout must be >= 1 and together at most 5000 (the task's "
           "distinct prompts are limited), got "
        << args.train << " and " << args.heldout << "\n";
    return 2;
  }
  std::mt19937_64 rng(args.seed);
  std::set<std::string> seen;
  std::vector<Example> heldout, train;
  // Both splits are drawn without repeats, so no held-out prompt is ever trained on.
  auto fill = [&](std::vector<Example>& split, int n) {
    for (int tries = 0; static_cast<int>(split.size()) < n && tries < 1000000; ++tries) {
      Example e = make(rng);
      if (seen.insert(e.first).second) split.push_back(std::move(e));
    }
    return static_cast<int>(split.size()) == n;
  };
  if (!fill(heldout, args.heldout) || !fill(train, args.train)) {
    err << "collmctl: task '" << args.kind << "' has too few distinct prompts for --train "
        << args.train << " + --heldout " << args.heldout << "\n";
    return 2;
  }
  std::error_code ec;
  std::filesystem::create_directories(args.out_dir, ec);
  if (ec) {
    err << "collmctl: cannot create " << args.out_dir << ": " << ec.message() << "\n";
    return 1;
  }
  const std::filesystem::path dir(args.out_dir);
  if (!WriteSplit(dir / "train.jsonl", train, err) ||
      !WriteSplit(dir / "heldout.jsonl", heldout, err)) {
    return 1;
  }
  out << (dir / "train.jsonl").string() << "\n" << (dir / "heldout.jsonl").string() << "\n";
  return 0;
}

void AddTaskCommand(CLI::App& app, TaskArgs& args, int& exit_code) {
  CLI::App* task = app.add_subcommand("task", "Built-in tasks for the demo");
  task->require_subcommand(1);
  CLI::App* make = task->add_subcommand(
      "make", "Write a deterministic task as DIR/train.jsonl and DIR/heldout.jsonl");
  make->add_option("--kind", args.kind, "parity or copy")->capture_default_str();
  make->add_option("--out,-o", args.out_dir, "Output directory")->required();
  make->add_option("--train", args.train, "Training examples")->capture_default_str();
  make->add_option("--heldout", args.heldout, "Held-out examples")->capture_default_str();
  make->add_option("--seed", args.seed, "Random seed")->capture_default_str();
  make->callback([&]() { exit_code = RunTaskMake(args, std::cout, std::cerr); });
}

}  // namespace collm::cli
