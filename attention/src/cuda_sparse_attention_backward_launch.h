// Launch parameters of the sparse attention backward kernels, filled by the checks in
// cuda_sparse_attention_backward.cpp for the launch in cuda_sparse_attention_backward.cu.
#pragma once

#include <cstdint>
#include <string_view>

#include "keysel/core/selection.h"

namespace keysel::cuda_kernels {

struct SparseBackwardLaunch {
  const void* q;                  // [T, Hq, D], bf16 or fp32 (as k, v, out, grad_out)
  const void* k;                  // [N, Hkv, D]
  const void* v;                  // [N, Hkv, Dv]
  const void* out;                // [T, Hq, Dv]
  const void* grad_out;           // [T, Hq, Dv]
  const float* lse;               // [T, Hq]
  const std::int32_t* selection;  // [T, G, W]
  float* grad_q;                  // [T, Hq, D]
  float* grad_k;                  // [N, Hkv, D]
  float* grad_v;                  // [N, Hkv, Dv]
  std::int64_t tokens, keys;
  int query_heads, kv_heads, head_dim, value_dim, groups, width;
  Granularity granularity;
  bool bf16;
  float scale;
  int device;  // the current GPU
};

/// Launches on `stream` (a cudaStream_t); throws keysel::Error of `function` when CUDA refuses.
void launch_sparse_attention_backward(std::string_view function, const SparseBackwardLaunch& launch, void* stream);

}  // namespace keysel::cuda_kernels
