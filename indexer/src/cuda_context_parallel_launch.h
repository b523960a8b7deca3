// Launch parameters of the context-parallel kernels (cuda_context_parallel.cu), filled by the NCCL steps in
// cuda_context_parallel.cpp.
#pragma once

#include <cstdint>
#include <string_view>

namespace keysel::cuda_kernels {

/// Where a rank's local row j lives in the sequence (ContextShards), for host and device code.
struct ShardMap {
  bool round_robin;
  std::int64_t ranks, rank, page, span;  // span: ceil(n_keys / ranks), the contiguous layout's range

#if defined(__CUDACC__)
  __host__ __device__
#endif
  std::int64_t global(std::int64_t j) const {
    if (!round_robin) return rank * span + j;
    return ((j / page) * ranks + rank) * page + j % page;
  }
  /// The local row of global position s, or -1 when another rank holds it.
#if defined(__CUDACC__)
  __host__ __device__
#endif
  std::int64_t local(std::int64_t s) const {
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
