// The backward pass of sparse_attention with the extra terms sparse MLA needs (private to the attention module).
//
// sparse_attention_backward (sparse_attention.h, SPEC §9) and sparse_mla_backward (sparse_mla.h, SPEC §9.2) run
// the same deterministic two-pass kernel; this is its entry point with everything optional spelled out. Per
// query row r = (t, h) and selected key s, with P'[r,s] = exp(scale q.k - lse[r]) the probabilities the forward's
// lse normalises:
//   P[r,s]  = c[r] P'[r,s]                       (c = out_factor, 1 when absent: the output's own weights)
//   dS[r,s] = P (dP - Delta) + P' dlse[r]         (dlse = grad_lse, 0 when absent)
//   dV[s]  += P dO[r]
// Without grad_lse and out_factor the arithmetic is sparse_attention_backward's, bit for bit.
#pragma once

#include <string_view>

#include "keysel/attention/sparse_attention.h"

namespace keysel::detail {

struct BackwardTerms {
  /// d loss / d lse, fp32 [T, Hq] (any strides), or empty: the lse term of dS.
  TensorView grad_lse;
  /// [T * Hq] row-major, or null: the factor c[r] that scales the forward's output (the attention sink's
  /// exp(lse) / (exp(lse) + exp(sink))).
  const float* out_factor = nullptr;
  /// V is the first Dv channels of K (one latent per token): grad_k receives dK + dV on those channels and
  /// grad_v is not used (pass an empty view).
  bool values_in_keys = false;
  /// [T * Hq] row-major, or null: receives Delta[r] = dO[r] . out[r] as the kernel computed it.
  float* delta = nullptr;
};

/// sparse_attention_backward with the extra terms; every argument is checked (naming `function`) before anything
/// is written.
void sparse_attention_backward_with_terms(std::string_view function, const AttentionInputs& inputs,
                                          const TensorView& selection, Granularity granularity,
                                          const TensorView& out, const TensorView& lse, const TensorView& grad_out,
                                          const TensorView& grad_q, const TensorView& grad_k,
                                          const TensorView& grad_v, const SparseAttentionOptions& options,
                                          const BackwardTerms& terms);

}  // namespace keysel::detail
