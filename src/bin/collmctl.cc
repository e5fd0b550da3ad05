// collmctl: the user's and operator's command line. Subcommands live in the cli module.
#include <iostream>

#include "CLI/CLI.hpp"
#include "collm/cli/commands.h"
#include "collm/common/logging.h"

int main(int argc, char** argv) {
  CLI::App app{"collmctl: run, fine-tune and manage collm models"};
  app.require_subcommand(1);
  int exit_code = 0;
  collm::cli::GenerateArgs generate_args;
  collm::cli::AddGenerateCommand(app, generate_args, exit_code);
  collm::cli::FinetuneArgs finetune_args;
  collm::cli::AddFinetuneCommand(app, finetune_args, exit_code);
  collm::cli::FedArgs fed_args;
  collm::cli::AddFedCommand(app, fed_args, exit_code);
  collm::cli::RandomModelArgs random_args;
  collm::cli::AddRandomModelCommand(app, random_args, exit_code);
  collm::cli::DeviceArgs device_args;
  collm::cli::AddDeviceCommands(app, device_args, exit_code);

  collm::cli::TaskArgs task_args;
  collm::cli::AddTaskCommand(app, task_args, exit_code);
  collm::cli::DemoArgs demo_args;
  collm::cli::AddDemoCommand(app, demo_args, exit_code);

  collm::LoggingOptions logging;
  logging.level = "warn";
  (void)collm::InitLogging(logging);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return exit_code;
}
