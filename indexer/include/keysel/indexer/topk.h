// Exact top-k selection (SPEC §2): from any score, and from the main attention itself.
#pragma once

#include "keysel/core/attention_inputs.h"
#include "keysel/core/selection.h"

namespace keysel {

/// Top-k of a score over allowed keys, plus the always-kept keys of the policy.
///   scores:    fp32 or fp64 [T, G, N]; higher is better. NaN scores are never selected; -inf can be.
///   positions: int32 [T]; query t may read keys s <= positions[t].
///   selection: int32 [T, G, policy.width()], written as: the kept keys (sinks 0..n_sink-1 and the last
///              n_local allowed positions) and the highest-scoring other allowed keys, all distinct, in
///              ascending position order, then -1 padding. Equal scores prefer the lower position.
/// Throws keysel::Error (writing nothing) on a bad shape, dtype, policy or position.
void select_topk(const TensorView& scores, const TensorView& positions, const SelectionPolicy& policy,
                 const TensorView& selection);

/// The exact top-k E[t,G] of the main attention: select_topk over pbar (SPEC §2).
///   selection: int32 [T, G, policy.width()].
void exact_topk(const AttentionInputs& inputs, const SelectionPolicy& policy, const TensorView& selection);

}  // namespace keysel
