// Reference attention in double precision: probabilities, full attention and attention over a selection.
//
// These are the ground truth every faster kernel and every fidelity metric is checked against (SPEC §1, §4).
// They favour clarity over speed but are parallelised with OpenMP over query tokens and heads.
#pragma once

#include "keysel/core/attention_inputs.h"
#include "keysel/core/selection.h"

namespace keysel {

/// Per-head probabilities p[t,h,s] = softmax over allowed s of (scale * q[t,h] . k[s,kv(h)]).
///   probabilities: fp64 [T, Hq, N], written in full; disallowed keys get 0.
void attention_probabilities(const AttentionInputs& inputs, const TensorView& probabilities);

/// Group-mean probabilities pbar[t,G,s] = (1/|G|) sum_{h in G} p[t,h,s] (SPEC §2).
///   pbar: fp64 [T, G, N] with G = group_count(granularity, Hq, Hkv); disallowed keys get 0.
void group_probabilities(const AttentionInputs& inputs, Granularity granularity, const TensorView& pbar);

/// attention_probabilities, group_probabilities and (when `out` is not empty) full_attention of the same
/// inputs in one pass, each query's logits computed once: every value equals the separate functions' bit for bit.
///   probabilities: fp64 [T, Hq, N]; pbar: fp64 [T, G, N]; out: fp32 or fp64 [T, Hq, Dv] (needs v) or empty.
void exact_attention(const AttentionInputs& inputs, Granularity granularity, const TensorView& probabilities,
                     const TensorView& pbar, const TensorView& out);

/// Full causal attention o[t,h] = sum_s p[t,h,s] v[s,kv(h)] and its log-sum-exp.
///   out: fp32 or fp64 [T, Hq, Dv]
///   lse: fp32 or fp64 [T, Hq], log sum_s exp(scale * q.k) over allowed s; may be an empty view.
void full_attention(const AttentionInputs& inputs, const TensorView& out, const TensorView& lse = {});

/// Attention restricted to a selection, renormalised on it (SPEC §4 o_A):
///   o_A[t,h] = sum_{s in A} p[t,h,s] v[s] / sum_{s in A} p[t,h,s], computed with a log-sum-exp.
///   selection: int32 [T, G, W] (G from granularity), -1 entries ignored; entries must be allowed and distinct.
///   out:       fp32 or fp64 [T, Hq, Dv]; a query with no selected key gets zeros and lse = -infinity.
///   lse:       fp32 or fp64 [T, Hq], log sum_{s in A} exp(scale * q.k); may be an empty view.
void sparse_attention_reference(const AttentionInputs& inputs, const TensorView& selection,
                                Granularity granularity, const TensorView& out, const TensorView& lse = {});

/// Gradients of sparse_attention_reference's `out` and `lse` (SPEC §9) in double precision: given dOut = d loss /
/// d out and optionally dLse = d loss / d lse, dQ, dK and dV of loss = sum(out * dOut) + sum(lse * dLse), the
/// selection held fixed. Recomputes the forward's out and lse.
///   inputs, selection, granularity: as sparse_attention_reference (v required)
///   grad_out: fp32, bf16, fp16 or fp64 [T, Hq, Dv]
///   grad_q:   fp32 or fp64 [T, Hq, D]; a query with no selected key gets zeros
///   grad_k:   fp32 or fp64 [N, Hkv, D]; a key no row selects gets zeros
///   grad_v:   fp32 or fp64 [N, Hkv, Dv]
///   grad_lse: fp32 or fp64 [T, Hq], or empty (no lse term); ignored on rows with no selected key
void sparse_attention_backward_reference(const AttentionInputs& inputs, const TensorView& selection,
                                         Granularity granularity, const TensorView& grad_out,
                                         const TensorView& grad_q, const TensorView& grad_k,
                                         const TensorView& grad_v, const TensorView& grad_lse = {});

}  // namespace keysel
