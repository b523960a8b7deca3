// Kernels of the fast top-k paths, one set per SIMD level (private to the module).
//
// The *_avx2 / *_avx512 definitions live in fast_topk_avx2.cpp / fast_topk_avx512.cpp, compiled with the
// matching -m flags; they use raw pointers and intrinsics only (no std:: templates, whose instantiations the
// linker could share with code meant for older CPUs). The helpers below are in an unnamed namespace and use
// __builtin_bit_cast (not the std::bit_cast template) for the same reason: every translation unit gets its own
// copy, compiled for its own level.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include "keysel/indexer/simd.h"

namespace keysel::topk_kernels {
namespace {

/// Order-preserving 32-bit key of a float: a larger key is a larger score; -0 and +0 share a key; NaN is 0
/// (below every other key, which is at least key(-inf) = 0x007FFFFF).
inline std::uint32_t score_key(float score) {
  if (score != score) return 0;
  std::uint32_t bits = __builtin_bit_cast(std::uint32_t, score);
  if (score == 0.0f) bits = 0;
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

inline float key_score(std::uint32_t key) {
  const std::uint32_t bits = (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
  return __builtin_bit_cast(float, bits);
}

/// A candidate as one word: (score key << 32) | (0xFFFFFFFF - position). A larger word is a better candidate
/// under the tie rule (higher score; equal scores: lower position), and words of distinct positions differ.
inline std::uint64_t make_candidate(float score, std::uint32_t position) {
  return (static_cast<std::uint64_t>(score_key(score)) << 32) | (0xFFFFFFFFu - position);
}
inline std::int32_t candidate_position(std::uint64_t candidate) {
  return static_cast<std::int32_t>(0xFFFFFFFFu - static_cast<std::uint32_t>(candidate));
}
inline float candidate_score(std::uint64_t candidate) {
  return key_score(static_cast<std::uint32_t>(candidate >> 32));
}

/// Calls f(std::integral_constant<int, 0>) ... f(std::integral_constant<int, N-1>), fully unrolled, so that
/// arrays of registers stay in registers (the AVX-512 scans).
template <int N, typename F>
[[gnu::always_inline]] inline void unroll(F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) __attribute__((always_inline)) {
    (f(std::integral_constant<int, I>{}), ...);
  }(std::make_integer_sequence<int, N>{});
}

}  // namespace

/// Writes make_candidate(scores[i], first_position + i) for every i < n with scores[i] >= threshold (so never
/// for NaN), in increasing i, to out; returns how many were written. out needs room for n + kFilterSlack
/// words (the SIMD versions store whole vectors past the last word written).
inline constexpr std::int64_t kFilterSlack = 16;
using FilterFn = std::int64_t (*)(const float* scores, std::int64_t n, float threshold,
                                  std::uint32_t first_position, std::uint64_t* out);
std::int64_t filter_scalar(const float* scores, std::int64_t n, float threshold, std::uint32_t first_position,
                           std::uint64_t* out);
std::int64_t filter_avx2(const float* scores, std::int64_t n, float threshold, std::uint32_t first_position,
                         std::uint64_t* out);
std::int64_t filter_avx512(const float* scores, std::int64_t n, float threshold, std::uint32_t first_position,
                           std::uint64_t* out);
FilterFn filter_for(SimdLevel level);

/// Inner products of a block of keys with a group of queries:
///   out[q * out_stride + j] = sum_d queries[q * dim + d] * keys[j * dim + d]   for q < nq, j < nk.
/// nq must be a multiple of kQueryTile; out_stride >= round_up(nk, kKeyTile) (columns past nk get junk).
/// workspace: kKeyTile * dim floats (one packed panel of keys).
inline constexpr std::int64_t kQueryTile = 8;
inline constexpr std::int64_t kKeyTile = 48;
using BlockScoresFn = void (*)(const float* queries, std::int64_t nq, const float* keys, std::int64_t nk,
                               std::int64_t dim, float* out, std::int64_t out_stride, float* workspace);
void block_scores_scalar(const float* queries, std::int64_t nq, const float* keys, std::int64_t nk,
                         std::int64_t dim, float* out, std::int64_t out_stride, float* workspace);
void block_scores_avx2(const float* queries, std::int64_t nq, const float* keys, std::int64_t nk,
                       std::int64_t dim, float* out, std::int64_t out_stride, float* workspace);
void block_scores_avx512(const float* queries, std::int64_t nq, const float* keys, std::int64_t nk,
                         std::int64_t dim, float* out, std::int64_t out_stride, float* workspace);
BlockScoresFn block_scores_for(SimdLevel level);

/// Per-query candidate lists of the fused inner-product top-k (inner_product_topk.cpp owns the memory and the
/// compaction; the scan kernels only append).
struct CandidateLists {
  std::uint64_t* words = nullptr;  ///< [queries][capacity] candidate words (make_candidate)
  std::int64_t* count = nullptr;   ///< [queries] words in each list
  float* threshold = nullptr;      ///< [queries]: scores below it are skipped (+inf for padding queries)
  std::int64_t capacity = 0;       ///< a list that reaches it is compacted
  /// Keeps the best words of list `query` (count < capacity after), raising its threshold.
  void (*compact)(CandidateLists& lists, std::int64_t query) = nullptr;
  void* owner = nullptr;  ///< for compact
};

/// The fused AVX-512 scan: queries in vector lanes (16 per register, `vectors` registers: 16 * vectors queries,
/// given transposed as qt [dim][16 * vectors], zero for padding queries), keys read in place (no packing) from
/// keys [nk, dim] and broadcast, a register tile of vectors x (24 / vectors) keys, the next tile's key rows
/// prefetched. Every score is one fp32 FMA chain over d = 0 .. dim-1 (as block_scores_* compute it).
///   scan_keys_avx512: appends make_candidate(score, first_position + j) to query q's list for every score at or
///                     above threshold[q] (compared in registers, so nothing is stored for the other keys);
///   score_keys_avx512: writes every score, out[j * 16 * vectors + q].
inline constexpr std::int64_t kScanMaxVectors = 4;
void scan_keys_avx512(const float* qt, std::int64_t vectors, const float* keys, std::int64_t nk, std::int64_t dim,
                      std::uint32_t first_position, CandidateLists& lists);
void score_keys_avx512(const float* qt, std::int64_t vectors, const float* keys, std::int64_t nk, std::int64_t dim,
                       float* out);

/// For 16 queries at once: out[l] = the rank-th largest (rank >= 1) of column l of scores [rows][stride] (columns
/// 0..15; NaN ranks lowest), found by a binary search on the scores' order keys (32 vector passes over `keys`, a
/// workspace of rows * 16 words); -inf when fewer than `rank` scores are not NaN.
void rank_thresholds_avx512(const float* scores, std::int64_t rows, std::int64_t stride, std::int64_t rank,
                            std::uint32_t* keys, float* out);

/// Exact rescoring of groups of up to 16 keys, each group with its own query: out[l] = query . keys[positions[l]]
/// for l < count, as one fp32 FMA chain over d = 0 .. dim-1 (bit for bit what the scans compute); the rows are
/// transposed in registers, and four groups run side by side (independent FMA chains).
struct RescoreGroup {
  const float* query = nullptr;
  const std::uint32_t* positions = nullptr;
  std::int64_t count = 0;  ///< 1..16
  float* out = nullptr;
};
void exact_scores_avx512(const RescoreGroup* groups, std::int64_t n, const float* keys, std::int64_t dim);

/// The bf16 prefilter of the fused inner-product top-k (AVX-512 BF16, fast_topk_avx512_bf16.cpp), for CPUs where
/// `vdpbf16ps` outruns fp32 FMA. Queries and keys are rounded to bf16 and dotted with `vdpbf16ps` (fp32
/// accumulation): a = that approximate score, bound[q] * ||k_j|| >= |a - exact| (inner_product_topk.cpp derives
/// bound[q]). Key j is kept for query q unless a < threshold[q] - bound[q] * ||k_j|| (NaN a: kept), so every key
/// whose exact score reaches the threshold is kept; its position is appended, and the caller rescores the kept
/// keys exactly (exact_scores_avx512) while they are still in cache. Lists hold at least nk positions. Keys with
/// ||k|| outside [2^-40, 2^40] (other than 0) or not finite are always kept.
struct ApproxLists {
  std::uint32_t* positions = nullptr;  ///< [queries][capacity]
  std::int64_t* count = nullptr;       ///< [queries], set to 0 by the caller
  const float* threshold = nullptr;    ///< [queries]: +inf for padding queries
  const float* bound = nullptr;        ///< [queries]
  std::int64_t capacity = 0;
};
/// Queries [n, dim] (n <= 16 * vectors) as bf16 pairs in lanes: out [ceil(dim / 2)][16 * vectors] 32-bit words
/// (channel 2p in the low half), zero past n and dim. Rounded to nearest even, as the keys are.
void pack_queries_bf16(const float* queries, std::int64_t n, std::int64_t dim, std::int64_t vectors, std::uint32_t* out);
void scan_keys_bf16(const std::uint32_t* qt16, std::int64_t vectors, const float* keys, std::int64_t nk,
                    std::int64_t dim, std::uint32_t first_position, ApproxLists& lists);

namespace {

/// Packs keys [j0, j0 + kKeyTile) of keys [nk, dim] into panel[d * kKeyTile + jj] (zeros past nk).
inline void pack_key_panel(const float* keys, std::int64_t nk, std::int64_t dim, std::int64_t j0, float* panel) {
  for (std::int64_t jj = 0; jj < kKeyTile; ++jj) {
    const std::int64_t j = j0 + jj;
    if (j < nk) {
      const float* row = keys + j * dim;
      for (std::int64_t d = 0; d < dim; ++d) panel[d * kKeyTile + jj] = row[d];
    } else {
      for (std::int64_t d = 0; d < dim; ++d) panel[d * kKeyTile + jj] = 0.0f;
    }
  }
}

}  // namespace

}  // namespace keysel::topk_kernels
