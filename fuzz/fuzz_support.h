// Shared by the libFuzzer harnesses (docs/reliability.md).
//
// A harness feeds one input to a public keysel entry point. keysel::Error is the documented way to refuse bad
// input and is swallowed; anything else is a finding: a sanitizer report, a signal, or any other exception.
// Nothing between libFuzzer and the throw catches other exceptions, so the unwinder's search phase finds no
// handler and std::terminate runs at the throw itself: the crash's stack trace shows the throwing frame and the
// exception's what(). (A noexcept or catch (...) here would unwind to the harness first and lose that frame.)
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <string>

#include "keysel/core/error.h"
#include "keysel/core/threads.h"

namespace keysel::fuzz {

/// Runs `body` with keysel::Error swallowed; any other exception ends the process (see above).
template <class Body>
void fuzz_one(Body&& body) {
  try {
    body();
  } catch (const keysel::Error&) {
  }
}

/// Aborts with a message: a property the harness checks (a round trip, a valid selection) failed.
[[noreturn]] inline void finding(const std::string& what) {
  std::fprintf(stderr, "keysel fuzz finding: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

/// One thread: OpenMP teams make runs slower and less reproducible, and races are TSan's job (tsan preset).
inline void single_threaded() { keysel::set_num_threads(1); }

inline std::span<const std::byte> bytes_of(const std::uint8_t* data, std::size_t size) {
  return {reinterpret_cast<const std::byte*>(data), size};
}

}  // namespace keysel::fuzz
