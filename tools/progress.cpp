// Progress on stderr (commands.h).
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <iostream>

#include "commands.h"

namespace keysel::cli {

Progress::Progress(std::string title)
    : title_(std::move(title)), terminal_(isatty(STDERR_FILENO) == 1), start_(std::chrono::steady_clock::now()) {}

void Progress::update(std::size_t done, std::size_t total, const std::string& what) {
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  char timing[32];
  std::snprintf(timing, sizeof timing, "%.1f s", seconds);
  if (!terminal_) {
    std::cerr << title_ << " [" << done << "/" << total << "] " << what << " (" << timing << ")\n";
    return;
  }
  constexpr std::size_t kBar = 30;
  const std::size_t filled = total > 0 ? std::min(kBar, done * kBar / total) : kBar;
  std::string label = what.size() > 40 ? what.substr(0, 37) + "..." : what;
  std::cerr << "\r\033[K" << title_ << " [" << std::string(filled, '#') << std::string(kBar - filled, '.') << "] "
            << done << "/" << total << " " << timing << "  " << label << std::flush;
  open_ = true;
}

void Progress::finish() {
  if (terminal_ && open_) std::cerr << "\n";
  open_ = false;
}

}  // namespace keysel::cli
