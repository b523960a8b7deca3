// Launch parameters of the sparse MLA backward on a GPU, filled by the checks in cuda_sparse_mla_backward.cpp for
// the launch in cuda_sparse_mla_backward.cu (which runs the attention backward's kernels over the latent cache).
#pragma once

#include <cstdint>
#include <string_view>

namespace keysel::cuda_kernels {

struct SparseMlaBackwardLaunch {
  const void* q;                    // [T, H, 576], bf16 or fp32 (as kv), contiguous
  const void* kv;                   // [N, 576], contiguous
  bool bf16;                        // q and kv
  const void* out;                  // [T, H, 512], bf16 or fp32 (out_bf16)
  const void* grad_out;             // [T, H, 512], bf16 or fp32 (grad_out_bf16)
  bool out_bf16, grad_out_bf16;
  const float* lse;                 // [T, H]
  const float* grad_lse;            // [T, H] or nullptr
  const std::int32_t* indices;      // [T, topk], row stride index_stride
  std::int64_t index_stride;
  int topk;
  const std::int32_t* topk_length;  // [T] or nullptr
  const float* attn_sink;           // [H] or nullptr
  float* grad_q;                    // [T, H, 576]
  float* grad_kv;                   // [N, 576]
  float* grad_attn_sink;            // [H] or nullptr (needs attn_sink)
  std::int64_t tokens, slots;
  int heads;
  float scale;
  int device;  // the current GPU
};

/// Launches on `stream` (a cudaStream_t); throws keysel::Error of `function` when CUDA refuses.
void launch_sparse_mla_backward(std::string_view function, const SparseMlaBackwardLaunch& launch, void* stream);

}  // namespace keysel::cuda_kernels
