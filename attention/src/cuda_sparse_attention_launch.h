// Launch parameters of the sparse attention decode kernels: the C++17 boundary between
// cuda_sparse_attention.cpp (checks) and cuda_sparse_attention.cu (kernels).
#pragma once

#include <cstdint>
#include <string>

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
  int granularity;                  // 0 per_head, 1 per_kv_head, 2 per_token
  bool out_bf16;
  float scale;
  int multiprocessors;
  int device;  // the current GPU
};

/// Launches on `stream` (a cudaStream_t); returns "" or the CUDA error text.
std::string launch_sparse_attention_decode(const SparseDecodeLaunch& launch, void* stream);

}  // namespace keysel::cuda_kernels
