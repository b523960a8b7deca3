// Launch parameters of the sparse attention decode kernels, filled by the checks in cuda_sparse_attention.cpp
// for the launch in cuda_sparse_attention.cu.
#pragma once

#include <cstdint>
#include <string_view>

#include "keysel/core/selection.h"

namespace keysel::cuda_kernels {

struct SparseDecodeLaunch {
  const void* q;                    // bf16 [B, Hq, D]
  const void* k;                    // bf16 [num_blocks, block_size, Hkv, D]
  const void* v;                    // bf16 [num_blocks, block_size, Hkv, D]
  const std::int32_t* block_table;  // [B, max_blocks], nullptr: block b is sequence b
  const std::int32_t* selection;    // [B, G, W]
  void* out;                        // fp32 or bf16 [B, Hq, D]
  float* lse;                       // [B, Hq] natural log, may be nullptr
  int batch, query_heads, kv_heads, head_dim, groups, width;
  int block_size, max_blocks, num_blocks;
  Granularity granularity;
  bool out_bf16;
  float scale;
  int multiprocessors;
  int device;  // the current GPU
};

/// Launches on `stream` (a cudaStream_t); throws keysel::Error of `function` when CUDA refuses.
void launch_sparse_attention_decode(std::string_view function, const SparseDecodeLaunch& launch, void* stream);

}  // namespace keysel::cuda_kernels
