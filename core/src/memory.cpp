#include "keysel/core/memory.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "keysel/core/error.h"

namespace keysel {
namespace {

/// The first number in a file ("max" and missing files give nothing).
bool read_number(const char* path, std::uint64_t& value) {
  std::ifstream file(path);
  if (!file) return false;
  std::string text;
  file >> text;
  if (text.empty() || text == "max") return false;
  try {
    value = std::stoull(text);
  } catch (...) {
    return false;
  }
  return true;
}

std::uint64_t meminfo_available() {
  std::ifstream file("/proc/meminfo");
  std::string line;
  while (std::getline(file, line)) {
    std::istringstream fields(line);
    std::string key;
    std::uint64_t kib = 0;
    if (fields >> key >> kib && key == "MemAvailable:") return kib * 1024;
  }
  return 0;
}

}  // namespace

std::uint64_t available_memory_bytes() {
  std::uint64_t available = meminfo_available();
  std::uint64_t limit = 0, usage = 0;
  // A container's limit is what counts (cgroup v2, then v1; an unlimited v1 reports a huge number).
  if ((read_number("/sys/fs/cgroup/memory.max", limit) && read_number("/sys/fs/cgroup/memory.current", usage)) ||
      (read_number("/sys/fs/cgroup/memory/memory.limit_in_bytes", limit) &&
       read_number("/sys/fs/cgroup/memory/memory.usage_in_bytes", usage))) {
    const std::uint64_t room = limit > usage ? limit - usage : 0;
    available = available == 0 ? room : std::min(available, room);
  }
  return available;
}

std::string format_bytes(double bytes) {
  const char* units[] = {"bytes", "kB", "MB", "GB", "TB", "PB", "EB"};
  int unit = 0;
  while (bytes >= 1000.0 && unit < 6) {
    bytes /= 1000.0;
    ++unit;
  }
  char text[64];
  std::snprintf(text, sizeof text, unit == 0 ? "%.0f %s" : "%.1f %s", bytes, units[unit]);
  return text;
}

void check_memory(double needed, std::uint64_t available, std::string_view function, std::string_view what) {
  if (available == 0 || needed <= static_cast<double>(available)) return;
  detail::throw_error(function, std::string(what) + " needs an estimated " + format_bytes(needed) +
                                    " of memory; this machine has " +
                                    format_bytes(static_cast<double>(available)) + " available");
}

}  // namespace keysel
