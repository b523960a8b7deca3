// Launch parameters of the sparse attention backward kernels, filled by the checks in
// cuda_sparse_attention_backward.cpp (and cuda_sparse_mla_backward.cu, which runs the same kernels over a latent
// cache) for the launch in cuda_sparse_attention_backward.cu.
#pragma once

#include <cstdint>
#include <string_view>

#include "keysel/core/selection.h"

namespace keysel::cuda_kernels {

struct SparseBackwardLaunch {
  const void* q;                  // [T, Hq, D], bf16 or fp32 (as k, v)
  const void* k;                  // [N, Hkv, D]
  const void* v;                  // [N, Hkv, Dv]; unused with values_in_keys
  const void* out;                // [T, Hq, Dv], bf16 or fp32 (out_bf16)
  const void* grad_out;           // [T, Hq, Dv], bf16 or fp32 (grad_out_bf16)
  const float* lse;               // [T, Hq]
  const std::int32_t* selection;  // [T, G, W]
  float* grad_q;                  // [T, Hq, D]
  float* grad_k;                  // [N, Hkv, D]
  float* grad_v;                  // [N, Hkv, Dv]; unused with values_in_keys
  std::int64_t tokens, keys;
  int query_heads, kv_heads, head_dim, value_dim, groups, width;
  Granularity granularity;
  bool bf16;                      // q, k, v
  bool out_bf16, grad_out_bf16;
  float scale;
  int device;  // the current GPU
  // The terms sparse MLA adds (SPEC §9.2); null / false for plain attention (SPEC §9). With P' = exp(scale q.k -
  // lse), c = out_factor (1 when null) and dLse = grad_lse (0 when null): P = c P', dS = P (dP - Delta) + P' dLse.
  const float* grad_lse;          // [T, Hq] or null: d loss / d lse
  const float* out_factor;        // [T, Hq] or null: c, the factor that scales the output's weights
  bool values_in_keys;            // V is the first Dv channels of K (v unused); grad_k gets dK + dV, grad_v unused
  float* delta_out;               // [T, Hq] or null: receives Delta = dO . out per row
};

/// Launches on `stream` (a cudaStream_t); throws keysel::Error of `function` when CUDA refuses. D and Dv up to
/// 256, or up to 576 (the latent of sparse MLA).
void launch_sparse_attention_backward(std::string_view function, const SparseBackwardLaunch& launch, void* stream);

}  // namespace keysel::cuda_kernels
