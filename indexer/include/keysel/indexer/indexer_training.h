// The Lightning Indexer's training objectives (SPEC §9.1) in double precision: the KL divergence from the main
// attention's head-mean distribution to the softmax of the indexer score, over all allowed keys (the dense
// warm-up) or over the selected keys with both distributions renormalised on them (the sparse stage), and its
// gradient with respect to the indexer's queries, weights and keys.
//
// This is the reference every faster or framework implementation is checked against (keysel.torch's
// indexer_kl_loss among them); it favours clarity over speed.
#pragma once

#include <cstdint>

#include "keysel/core/tensor.h"

namespace keysel {

enum class LossReduction : std::uint8_t {
  mean,  // mean over the query tokens that have at least one key (and target mass on them)
  sum,   // sum over those query tokens
};

/// Where the gradients go: fp64 views of the input's shape, or empty views for gradients not wanted.
struct IndexerLossGradients {
  TensorView queries;  // [T, HI, DI]
  TensorView weights;  // [T, HI]
  TensorView keys;     // [N, DI]
};

/// The loss of SPEC §9.1 for one sequence.
///   target:    fp32/fp64 [T, N]: pbar[t, s] of the main attention (per_token group mean, SPEC §2); entries
///              outside the keys a row reads are ignored, the rest must be finite and >= 0
///   queries:   fp32/fp64 [T, HI, DI] indexer queries qI;  weights: fp32/fp64 [T, HI];  keys: fp32/fp64 [N, DI]
///   positions: int32 [T]: query t reads keys s <= positions[t] (s < N)
///   selection: int32 [T, 1, W] (the per_token selection; distinct allowed keys, then -1) for the sparse stage,
///              or an empty view for the dense warm-up over every allowed key
/// Per query token t with key set S (allowed keys, or the selected ones): with I[t,s] = sum_j w[t,j]
/// ReLU(qI[t,j] . kI[s]), ptilde = target / sum_S target and logq = log_softmax_S(I):
///   L[t] = sum_{s in S, ptilde > 0} ptilde[s] (log ptilde[s] - logq[s]).
/// A token whose S is empty or holds no target mass is skipped. Returns the mean (or sum) of L over the others
/// (0 when none); writes dLoss/dqI, dLoss/dw, dLoss/dkI into the non-empty views of `gradients` (ReLU'(0) = 0).
/// Throws keysel::Error naming the argument, writing nothing, on bad input (SPEC §6).
double indexer_kl_loss_reference(const TensorView& target, const TensorView& queries, const TensorView& weights,
                                 const TensorView& keys, const TensorView& positions, const TensorView& selection,
                                 LossReduction reduction = LossReduction::mean,
                                 const IndexerLossGradients& gradients = {});

}  // namespace keysel
