// Fast exact top-k selection (SPEC §2): the same selections as keysel::select_topk, without sorting every score.
//
// Three ways in:
//   fast_select_topk     drop-in for select_topk on a materialised score tensor [T, G, N] (OpenMP over rows).
//   fast_select_topk_row one row of scores already in memory (for callers that own the row loop).
//   StreamingTopK        fused score-then-select: the caller scores keys block by block and pushes each block;
//                        the accumulator keeps a running threshold, rejects most blocks with one SIMD compare
//                        and never holds more than O(k + block) candidates.
//
// The tie rule is fixed, so every path gives the same selection as select_topk, bit for bit:
//   - higher score first; equal scores prefer the lower position (+0.0 and -0.0 are equal scores);
//   - NaN scores are never selected; -inf scores can be (they rank below every finite score);
//   - the kept keys (sinks 0..n_sink-1 and the last n_local allowed positions) are always in the row;
//   - rows are written in ascending position order and padded with -1.
//
// Speed: a candidate is one 64-bit word, (order-preserving 32-bit key of the score << 32) | (2^32 - 1 - position),
// so the tie rule is plain integer order. A threshold from a sample of the row (64 runs of 32 scores), set low
// and then checked (if fewer than k scores pass it, the pass is redone with -inf), picks a small candidate set
// in one SIMD compare pass; a 2048-bin histogram of the candidates' keys over their range finds the exact k-th
// candidate, and one scan in position order writes the row already sorted.
// The SIMD level (AVX-512, AVX2 or scalar) is the indexer's (keysel/indexer/simd.h): chosen at run time,
// forced with KEYSEL_SIMD=scalar|avx2|avx512 or set_simd_level(). Every level gives the same selections.
#pragma once

#include <cstdint>
#include <vector>

#include "keysel/core/row_plan.h"
#include "keysel/core/selection.h"
#include "keysel/core/tensor.h"

namespace keysel {

/// Same contract, arguments and output as keysel::select_topk (indexer/topk.h), computed fast:
///   scores:    fp32 or fp64 [T, G, N] (any strides); higher is better. fp32 rows use SIMD and 64-bit candidate
///              words; fp64 rows (whose order a 32-bit key cannot hold) use the same sampled threshold with
///              (score, position) pairs in scalar code.
///   positions: int32 [T]; query t may read keys s <= positions[t].
///   selection: int32 [T, G, policy.width()], writable: kept keys plus the best other allowed keys, ascending,
///              then -1 padding. Identical to what select_topk writes for the same arguments.
/// Throws keysel::Error (writing nothing) on a bad shape, dtype, device, policy or position.
void fast_select_topk(const TensorView& scores, const TensorView& positions, const SelectionPolicy& policy,
                      const TensorView& selection);

/// How one selection row splits into kept keys and the keys the top-k chooses is core's SelectionRowPlan
/// (keysel/core/row_plan.h): callers of StreamingTopK push the scores of [sink_end, local_begin) only, with
/// k = fill.

/// One selection row from fp32 scores in memory.
///   scores:    scores[s] is the score of key s, contiguous; only s in [plan.sink_end, plan.local_begin) are read.
///   out:       plan.width entries: kept keys and the best `fill` others, ascending, then -1 padding.
/// Equal to the matching row of select_topk. No argument checks (the plan comes from SelectionRowPlan::make;
/// positions below 2^31 - 1). Thread-safe: scratch buffers are per thread.
void fast_select_topk_row(const float* scores, const SelectionRowPlan& plan, std::int32_t* out);

/// Streaming exact top-k over blocks of scores: keeps the best k (score, position) pairs seen so far.
///
/// Usage for one selection row (fused score-then-select):
///   const SelectionRowPlan plan = SelectionRowPlan::make(policy, pos, n_keys);
///   StreamingTopK top(plan.fill);
///   for (each block [b, e) of [plan.sink_end, plan.local_begin)) {
///     if (top.can_skip_block_max(block_upper_bound)) continue;   // optional: bound-based block skipping
///     compute scores[0 .. e-b) of keys b .. e-1;
///     top.push(scores, b, e - b);
///   }
///   top.finish_row(plan, out_row);        // kept keys + chosen keys, ascending, -1 padded, plan.width entries
///
/// Blocks may come in any order and from several accumulators combined with merge(); positions must be
/// distinct across everything pushed, in [0, 2^31 - 1). Memory: at most max(2k, k + 4096) + 4096 candidates
/// (8 bytes each) whatever the block size; when that fills, the best k are kept and threshold() rises.
/// Not thread-safe; use one accumulator per thread and merge().
class StreamingTopK {
 public:
  /// An accumulator keeping the best `k` (k >= 0; 0 keeps nothing). Throws keysel::Error on k < 0 or
  /// k >= 2^31.
  explicit StreamingTopK(std::int64_t k = 0);

  /// Forgets everything pushed and sets a new k (keeps the allocated memory).
  void reset(std::int64_t k);
  std::int64_t k() const { return k_; }

  /// Offers the scores of keys [first_position, first_position + count): scores[i] is the score of key
  /// first_position + i. NaN scores are ignored. count may be 0 (scores may then be null).
  void push(const float* scores, std::int64_t first_position, std::int64_t count);

  /// Offers every pair held by `other` (which is left unchanged). Both accumulators must use the same k.
  void merge(const StreamingTopK& other);

  /// Scores strictly below threshold() can no longer enter (-inf while fewer than k pairs are held; +inf when
  /// k = 0). A block whose scores are all provably below it may be skipped without scoring it.
  float threshold() const { return threshold_; }
  /// True when no score <= `block_max` could enter (block_max < threshold()), i.e. a block whose scores are
  /// all <= block_max (an upper bound) can be skipped.
  bool can_skip_block_max(float block_max) const { return block_max < threshold_; }

  /// Number of pairs that finish() would return: min(k, non-NaN scores pushed).
  std::int64_t size();

  /// Writes the best min(k, pushed) positions in ascending order to out[0 .. width) followed by -1 padding
  /// (width >= that count), returns how many positions were written, and resets the accumulator (same k).
  std::int64_t finish(std::int32_t* out, std::int64_t width);

  /// Writes a whole selection row: the plan's sinks, the chosen positions (this accumulator, which should
  /// have k = plan.fill and have seen only keys of [sink_end, local_begin)), the local window, then -1 up
  /// to plan.width. Ascending. Resets the accumulator.
  void finish_row(const SelectionRowPlan& plan, std::int32_t* out);

  /// Writes the best min(k, pushed) pairs in descending score order (equal scores: lower position first), like
  /// faiss search: ids[i], scores[i] for i < k; missing entries get id -1 and score -inf. Either pointer may
  /// be null. Returns how many pairs were written. Resets the accumulator.
  std::int64_t finish_by_score(std::int64_t* ids, float* scores);

 private:
  void compact();
  void reserve_buffer();

  std::int64_t k_ = 0;
  float threshold_ = 0.0f;
  // Candidates as one 64-bit word each: (order-preserving score key << 32) | (0xFFFFFFFF - position), so
  // that a larger word is a better candidate under the tie rule and words are unique. candidates_[0, count_)
  // are held; the buffer has room for capacity_ plus one pushed chunk.
  std::vector<std::uint64_t> candidates_;
  std::vector<std::uint64_t> scratch_;  // compaction workspace
  std::int64_t count_ = 0;
  std::int64_t capacity_ = 0;  // compaction threshold: at this many held candidates, keep the best k
};

/// Exact maximum-inner-product search, like faiss::IndexFlatIP::search: for each query i the k keys j with the
/// largest q_i . k_j (fp32 dot products), by descending score; equal scores prefer the lower key index.
///   queries:   [nq, dim] fp32, row-major (size nq * dim)
///   keys:      [n_keys, dim] fp32, row-major (size n_keys * dim)
///   scores:    [nq, k] out (size nq * k), may be null; missing entries (k > n_keys, NaN scores) get -inf
///   ids:       [nq, k] out (size nq * k), may be null; missing entries get -1
/// The whole [nq, n_keys] score matrix never exists. At the avx512 level queries sit in vector lanes and keys are
/// read in place; a threshold per query from sampled keys keeps only the keys that can reach the top k, and where
/// `vdpbf16ps` outruns fp32 FMA (AMD Zen 4) a bf16 prefilter with a proven error bound picks them, then rescores
/// them exactly: results are bit-identical to the fp32 scan (inner_product_kernel_name() in simd.h says which scan
/// runs). Lower levels score key panels into a StreamingTopK per query. OpenMP across queries and key blocks.
/// Throws keysel::Error on nq < 0, n_keys < 0, dim < 1, k < 1, k >= 2^31, n_keys >= 2^31, or a null input
/// pointer with a non-zero size. Each (count, pointer) pair in FAISS's order, as CandidateSearch::search.
void inner_product_topk(std::int64_t nq, const float* queries, std::int64_t n_keys, const float* keys,
                        std::int64_t dim, std::int64_t k, float* scores, std::int64_t* ids);
/// The former argument order.
[[deprecated("use inner_product_topk(nq, queries, n_keys, keys, dim, k, scores, ids)")]] inline void
inner_product_topk(const float* queries, std::int64_t nq, const float* keys, std::int64_t n_keys, std::int64_t dim,
                   std::int64_t k, float* scores, std::int64_t* ids) {
  inner_product_topk(nq, queries, n_keys, keys, dim, k, scores, ids);
}

/// The same over TensorViews: queries fp32 [nq, D], keys fp32 [N, D] (both contiguous, CPU); writes
/// scores fp32 [nq, k] and ids int32 [nq, k] (either may be an empty view to skip it).
void inner_product_topk(const TensorView& queries, const TensorView& keys, std::int64_t k,
                        const TensorView& scores, const TensorView& ids);


}  // namespace keysel
