// Selectors of the selection pipeline beyond the baselines of selector.h, all behind the one Selector interface:
//
//   block top-k (Quest)   per-block min/max key bounds pick the blocks, then keys inside them
//   controlled fidelity   exactly round(p * k) keys of the exact top-k, the rest from outside it (accuracy studies)
//   hybrid                candidates from any selector with a larger k', re-ranked exactly (or by a given score)
//
// Every selector writes what select_topk writes: per row the policy's kept keys (sinks 0..n_sink-1, the last
// n_local allowed positions) plus chosen free keys, min(policy.width(), allowed) keys in all when enough keys
// can be chosen, ascending, then -1 padding; all arguments are checked before anything is written.
//
// "pbar-consistent" scores: where keys are ranked by attention, the score is the group's mean probability
// pbar (SPEC §2) or an estimate of it that equals pbar when the estimate is exact, so a selector reduces to
// the exact top-k in its exact limit (block size 1; k' = N).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>

#include "keysel/indexer/selector.h"

namespace keysel {

// ---- block top-k (Quest) ---------------------------------------------------------------------------------

struct BlockTopKOptions {
  /// Keys per block (a page of the KV cache), >= 1. Block b holds positions [b * block_size, (b+1) * block_size).
  std::int64_t block_size = 16;
  /// Blocks are taken in order of their score until they hold oversample x (free slots) free keys, >= 1.
  /// With more candidate keys than free slots, the candidates are re-ranked exactly (pbar renormalised over
  /// the candidates and the kept keys) and the best fill the row.
  double oversample = 1.0;
  /// When a request says nothing of its cache (CacheReuse::unknown), keep the block summaries between select()
  /// calls while inputs.k is the same view (pointer, dtype, strides) over a cache that only grows: a call then
  /// summarises only the blocks that changed. Off by default, because a different cache that happens to reuse
  /// the same memory would go unnoticed. A request with CacheReuse::appended reuses the summaries of its
  /// unchanged keys whatever this says; CacheReuse::fresh recomputes them all.
  bool reuse_summaries = false;
};

/// Quest-style selection. For each key head, every block keeps the channel-wise minimum and maximum of its keys;
/// the logit bound of query head h on block b is U[h,b] = scale * sum_d max(q_d min_d, q_d max_d) >= any of the
/// block's logits. Blocks are ranked by the pbar-consistent estimate
///   score[b] = (1/|G|) sum_{h in G} exp(U[h,b]) / Z_h,   Z_h = sum over allowed blocks of n_b exp(U[h,b])
/// (n_b = allowed keys in block b), which is pbar itself for block size 1: then, with oversample 1, the
/// selection equals exact_topk. The block summaries are computed from inputs.k in select() (every call, or
/// only for new blocks with reuse_summaries); cost counts the summaries read and the keys re-ranked, not the
/// summarising, which a serving engine does once per appended block. Not thread-safe (it owns the summaries).
std::unique_ptr<Selector> make_block_topk_selector(const BlockTopKOptions& options = {});

// ---- controlled fidelity ----------------------------------------------------------------------------------

enum class FidelityFill : std::uint8_t {
  random,       // uniformly random allowed keys outside the exact top-k
  next_ranked,  // the keys ranked just below the exact top-k (k_eff + 1, k_eff + 2, ... by pbar)
};

enum class FidelityDrop : std::uint8_t {
  random,  // the kept part of the exact top-k is a uniformly random subset of it
  lowest,  // the kept part is its best-ranked keys: the lowest-ranked keys of the exact top-k are dropped
};

struct FidelityOptions {
  /// Target retrieval precision p in [0, 1]: the fraction of the exact top-k (k_eff = min(k, allowed) keys)
  /// that each row holds.
  double precision = 1.0;
  FidelityFill fill = FidelityFill::random;
  std::uint64_t seed = 0;  // the kept subset of the top-k and the random fill (one stream per row)
  FidelityDrop drop = FidelityDrop::random;
};

/// Selections of controlled fidelity for accuracy studies (the protocol of the native top-k sparse attention
/// study): with E the exact top-k (the k_eff = min(k, allowed) allowed keys of largest pbar, SPEC §2), each row
/// holds exactly round(p * k_eff) keys of E, so that its recall (SPEC §4) is round(p * k_eff) / k_eff. The row
/// is the kept keys (whether in E or not), a uniformly random subset of E's other keys (with drop = lowest: E's
/// best-ranked other keys, so that the keys dropped are the lowest-ranked of E), and keys outside E,
/// uniformly random or next-ranked, for the remaining slots. The count is exact whenever it is feasible: the
/// kept keys that fall in E always count, kept keys outside E take slots, and there must be enough allowed keys
/// outside E; otherwise the nearest feasible count is used. Computes pbar in double (group_probabilities).
std::unique_ptr<Selector> make_fidelity_selector(const FidelityOptions& options);

// ---- hybrid -------------------------------------------------------------------------------------------------

/// Scores of candidate keys for re-ranking (higher is better; NaN never selected): for query token t and
/// selection group `group`, scores[i] of keys[i]. For instance the Lightning Indexer's I[t, keys[i]].
using CandidateScore = std::function<void(std::int64_t t, std::int64_t group, std::span<const std::int32_t> keys,
                                          std::span<double> scores)>;

/// Candidates from `candidates` run with k' = max(candidate_k, policy.k) (same granularity and kept keys), then
/// re-ranked: the best free slots among the candidate free keys join the kept keys. The default re-rank is
/// exact: pbar renormalised over the candidates and the kept keys,
///   score[s] = (1/|G|) sum_{h in G} exp(l[h,s] - lse_h),   lse_h = log sum_{s' in U and kept} exp(l[h,s'])
/// (l = scale q.k in double), which orders the candidates as pbar does for a group of one head, and for any
/// group when the candidates and the kept keys hold nearly all the mass. With k' = N it is the exact top-k.
/// `name` defaults to "hybrid(<candidates name>)".
std::unique_ptr<Selector> make_hybrid_selector(std::unique_ptr<Selector> candidates, std::int64_t candidate_k,
                                               std::string name = "");
/// The same, re-ranked by `rerank` instead of the exact score.
std::unique_ptr<Selector> make_hybrid_selector(std::unique_ptr<Selector> candidates, std::int64_t candidate_k,
                                               CandidateScore rerank, std::string name);

}  // namespace keysel
