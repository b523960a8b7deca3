// keysel: the command line. This file only dispatches; each subcommand lives in its own file.
#include <cstring>
#include <exception>
#include <iostream>
#include <string>
#include <string_view>

#include "commands.h"
#include "keysel/core/build_config.h"

namespace {

struct Subcommand {
  std::string_view name;
  std::string_view summary;
  int (*run)(int argc, const char* const* argv);  // argv[0] is the subcommand's name
};

constexpr Subcommand kSubcommands[] = {
    {"study", "run selectors over workloads (built in, or a JSON study file) and report their fidelity and cost",
     keysel::cli::study_command},
    {"tune", "search indexer formats, scales, rotation and FAISS settings for the cheapest selector meeting a target",
     keysel::cli::tune_command},
};

void print_usage(std::ostream& out) {
  out << "keysel " << KEYSEL_VERSION << ": selects which cached keys top-k sparse attention reads, and measures\n"
         "how faithful a selection is to exact attention (recall of the exact top-k, attention mass kept, output\n"
         "error).\n\n"
         "Usage: keysel <command> [options]\n\n"
         "Commands:\n";
  for (const Subcommand& c : kSubcommands) out << "  " << c.name << std::string(10 - c.name.size(), ' ') << c.summary << "\n";
  out << "\nRun 'keysel <command> --help' for a command's options.\n"
         "  --help, -h    show this help\n"
         "  --version     show the version\n";
}

}  // namespace

int main(int argc, char** argv) {
  // Usage errors and library errors (keysel::Error, bad option values) exit with status 2; nothing aborts.
  try {
    if (argc < 2) {
      print_usage(std::cerr);
      std::cerr << "\nkeysel: error: no command given\n";
      return 2;
    }
    const std::string_view command = argv[1];
    if (command == "--help" || command == "-h" || command == "help") {
      print_usage(std::cout);
      return 0;
    }
    if (command == "--version") {
      std::cout << "keysel " << KEYSEL_VERSION << "\n";
      return 0;
    }
    for (const Subcommand& c : kSubcommands) {
      if (c.name == command) return c.run(argc - 1, argv + 1);
    }
    std::cerr << "keysel: error: unknown command '" << command << "' (run 'keysel --help' for the list)\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "keysel: error: " << e.what() << "\n";
    return 2;
  }
}
