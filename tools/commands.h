// The keysel subcommands (one file each) and the small pieces they share.
#pragma once

#include <chrono>
#include <cstddef>
#include <string>

namespace keysel::cli {

/// Entry points: argv[0] is the subcommand's name; they return the exit status and throw on errors (main
/// prints the message and exits with 2).
int study_command(int argc, const char* const* argv);  // tools/study_command.cpp
int tune_command(int argc, const char* const* argv);   // tools/tune_command.cpp

/// Progress on stderr: a bar redrawn in place when stderr is a terminal, one plain line per step otherwise
/// (logs, CI). tools/progress.cpp.
class Progress {
 public:
  explicit Progress(std::string title);
  /// Steps done of total, and what just finished.
  void update(std::size_t done, std::size_t total, const std::string& what);
  /// Ends the bar's line (no-op without a terminal).
  void finish();

 private:
  std::string title_;
  bool terminal_;
  bool open_ = false;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace keysel::cli
