// The device scratch memory of the CUDA top-k (cuda_topk.cu), shared with the checks that size a caller's
// workspace (cuda_topk.cpp, cuda_indexer.cpp). Plain C++: compiled with and without CUDA.
#pragma once

#include <cstdint>
#include <string_view>

#include "keysel/core/checked.h"
#include "keysel/core/tensor.h"
#include "../../attention/src/cuda_workspace.h"  // detail::workspace_pointer (the attention module builds it)

namespace keysel::cuda_kernels {

inline constexpr int kTopkBins = 2048;        // coarse histogram bins per row
inline constexpr int kTopkMaxSegments = 512;  // blocks per row of the several-blocks-per-row path

/// Scratch bytes of one launch_topk over `rows` rows of `n` scores, with `segments` blocks per row: histograms,
/// per-row and per-segment counters, and the threshold bucket's keys. The bound for any GPU takes
/// kTopkMaxSegments. Throws keysel::Error of `function` on overflow.
inline std::int64_t topk_scratch_bytes(std::int64_t rows, std::int64_t n, std::int64_t segments,
                                       std::string_view function) {
  const std::int64_t per_row = checked_add(
      checked_add(kTopkBins + 4, checked_mul(segments, 4, function, "scores"), function, "scores"),
      n > 0 ? n : 1, function, "scores");
  return checked_mul(checked_mul(rows, per_row, function, "scores"), 4, function, "scores");
}

}  // namespace keysel::cuda_kernels
