// What the machine can give: studies estimate their peak memory and refuse up front when it cannot fit,
// instead of being killed (or throwing std::bad_alloc) after minutes of work.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace keysel {

/// Bytes this process can still allocate without swapping: /proc/meminfo's MemAvailable, lowered to the cgroup
/// (v2 or v1) memory limit minus current usage when one is set. 0 when nothing can be read (not Linux).
std::uint64_t available_memory_bytes();

/// "12.3 GB" (decimal units), for messages.
std::string format_bytes(double bytes);

/// Throws keysel::Error of `function` naming `what` when `needed` bytes exceed `available` (0 means unknown, and
/// nothing is checked): "<what> needs an estimated 51.2 GB; this machine has 23.1 GB available".
void check_memory(double needed, std::uint64_t available, std::string_view function, std::string_view what);

}  // namespace keysel
