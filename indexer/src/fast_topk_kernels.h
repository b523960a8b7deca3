// Kernels of the fast top-k paths, one set per SIMD level (private to the module).
//
// The *_avx2 / *_avx512 definitions live in fast_topk_avx2.cpp / fast_topk_avx512.cpp, compiled with the
// matching -m flags; they use raw pointers and intrinsics only (no std:: templates, whose instantiations the
// linker could share with code meant for older CPUs). The helpers below are in an unnamed namespace and use
// __builtin_bit_cast (not the std::bit_cast template) for the same reason: every translation unit gets its own
// copy, compiled for its own level.
#pragma once

#include <cstdint>

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
