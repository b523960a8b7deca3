// Launch parameters of the context-parallel kernels (cuda_context_parallel.cu), filled by the NCCL steps in
// cuda_context_parallel.cpp.
#pragma once

#include <cstdint>
#include <string_view>

#include "keysel/core/row_plan.h"

namespace keysel::cuda_kernels {

/// Where a rank's local row j lives in the sequence (ContextShards), for host and device code.
struct ShardMap {
  bool round_robin;
  std::int64_t ranks, rank, page, span;  // span: ceil(n_keys / ranks), the contiguous layout's range

  KEYSEL_HOST_DEVICE std::int64_t global(std::int64_t j) const {
    if (!round_robin) return rank * span + j;
    return ((j / page) * ranks + rank) * page + j % page;
  }
  /// The local row of global position s, or -1 when another rank holds it.
  KEYSEL_HOST_DEVICE std::int64_t local(std::int64_t s) const {
    if (s < 0) return -1;
    if (!round_robin) return s / span == rank ? s - rank * span : -1;  // s < n_keys <= ranks * span
    const std::int64_t p = s / page;
    return p % ranks == rank ? (p / ranks) * page + s % page : -1;
  }
};

/// A candidate as ncclAllGather moves it: score, global position (-1: padding); 8 bytes.
struct CandidateEntry {
  float score;
  std::int32_t position;
};

// The per-element rules of the kernels, shared with the CPU test that runs them around select_topk
// (tests/indexer/test_context_parallel.cpp).

/// Entries of a rank's candidate list (ascending positions, then -1 padding) below position s.
KEYSEL_HOST_DEVICE inline std::int64_t count_below(const CandidateEntry* list, std::int64_t k, std::int32_t s) {
  std::int64_t lo = 0, hi = k;
  while (lo < hi) {
    const std::int64_t mid = (lo + hi) / 2;
    const std::int32_t q = list[mid].position;
    if (q >= 0 && q < s) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

/// The slot of candidate i of rank r (at global position s) among every rank's candidates of row `row` in position
/// order: the ranks' positions are disjoint and each list ascending, so the slot counts the candidates below s.
///   received: [ranks, rows, k] as ncclAllGather delivers them
KEYSEL_HOST_DEVICE inline std::int64_t merged_slot(const CandidateEntry* received, std::int64_t ranks, std::int64_t rows,
                                                   std::int64_t row, std::int64_t k, std::int64_t r, std::int64_t i,
                                                   std::int32_t s) {
  std::int64_t slot = i;
  for (std::int64_t other = 0; other < ranks; ++other) {
    if (other != r) slot += count_below(received + (other * rows + row) * k, k, s);
  }
  return slot;
}

/// Entry e of a selection row: the sinks, the chosen candidates in position order, the kept window, -1 padding.
///   chosen:    [k] select_topk's columns of the merged row (k - fill leading +inf first), ascending, -1 padding
///   positions: [ranks * k] the merged candidates' global positions (column c >= k is candidate c - k)
KEYSEL_HOST_DEVICE inline std::int32_t assembled_entry(const BasicRowPlan<std::int64_t>& plan, std::int64_t e,
                                                       const std::int32_t* chosen, std::int64_t k,
                                                       const std::int32_t* positions) {
  std::int64_t lo = 0, hi = k;  // the chosen columns: a prefix, then -1
  while (lo < hi) {
    const std::int64_t mid = (lo + hi) / 2;
    if (chosen[mid] >= 0) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  const std::int64_t leading = k - plan.fill;
  const std::int64_t real = lo - leading;
  const std::int64_t window = plan.allowed - plan.local_begin;
  if (e < plan.sink_end) return static_cast<std::int32_t>(e);
  if (e < plan.sink_end + real) return positions[chosen[leading + (e - plan.sink_end)] - k];
  if (e < plan.sink_end + real + window) return static_cast<std::int32_t>(plan.local_begin + (e - plan.sink_end - real));
  return -1;
}

struct ContextSelectLaunch {
  const float* local_scores;         // [rows, n_local]
  const std::int32_t* positions;     // [tokens]
  float* masked;                     // [rows, n_local]: free keys' scores, NaN elsewhere
  std::int32_t* local_last;          // [tokens]: n_local - 1 (every local column readable)
  std::int32_t* merged_last;         // [tokens]: (ranks + 1) k - 1
  const std::int32_t* local_selection;  // [rows, k] local columns, ascending, -1 padding
  CandidateEntry* send;              // [rows, k]
  const CandidateEntry* received;    // [ranks, rows, k]
  float* merged_scores;              // [rows, (ranks + 1) k]: k - fill leading +inf, then candidates by position
  std::int32_t* merged_positions;    // [rows, ranks k]
  const std::int32_t* merged_selection;  // [rows, k] columns of merged_scores, ascending
  std::int32_t* selection;           // [rows, width]
  std::int64_t tokens, groups, n_local, n_keys, k, n_sink, n_keep_local, width;
  bool kept_on_top;
  ShardMap map;
};

/// Each on `stream` (a cudaStream_t); keysel::Error of `function` when CUDA refuses.
void launch_context_mask(std::string_view function, const ContextSelectLaunch& launch, void* stream);
void launch_context_pack(std::string_view function, const ContextSelectLaunch& launch, void* stream);
void launch_context_merge(std::string_view function, const ContextSelectLaunch& launch, void* stream);
void launch_context_assemble(std::string_view function, const ContextSelectLaunch& launch, void* stream);

/// selection [count] of global positions -> local rows of this rank (-1 where another rank holds the key).
void launch_context_localize(std::string_view function, const std::int32_t* selection, std::int32_t* local,
                             std::int64_t count, std::int64_t n_keys, const ShardMap& map, void* stream);
/// out [heads, dv], lse [heads] (may be nullptr) from every rank's o [ranks, heads, dv] and lse [ranks, heads]:
/// lse = log sum_r exp(lse_r), o = sum_r exp(lse_r - lse) o_r, summed in rank order.
void launch_context_merge_attention(std::string_view function, const float* o_all, const float* lse_all,
                                    std::int64_t ranks, std::int64_t heads, std::int64_t dv, float* out, float* lse,
                                    void* stream);

}  // namespace keysel::cuda_kernels
