// DeepSeek-V3.2's decode rule for next_n query tokens per sequence (multi-token prediction, SPEC §7), in one place
// for the host references, the CPU top-k bounds and the CUDA kernels.
#pragma once

#include <cstdint>

#include "keysel/core/row_plan.h"  // KEYSEL_HOST_DEVICE

namespace keysel::detail {

/// The keys query token i (0 <= i < next_n) of a sequence with context length `context_len` may read: the last
/// token reads all of them, each earlier one a key fewer (context_len - next_n + i + 1; not clamped).
KEYSEL_HOST_DEVICE inline std::int64_t mtp_row_keys(std::int64_t context_len, std::int64_t next_n, std::int64_t i) {
  return context_len - next_n + i + 1;
}

}  // namespace keysel::detail
