// Launch parameters of the top-k and Lightning Indexer kernels: the C++17 boundary between the checks in
// cuda_topk.cpp / cuda_indexer.cpp and the kernels in cuda_topk.cu / cuda_indexer.cu.
#pragma once

#include <cstdint>
#include <string>

namespace keysel::cuda_kernels {

struct TopkLaunch {
  const float* scores;            // [rows = T * G, n]
  const std::int32_t* positions;  // [T]
  std::int32_t* selection;        // [rows, width]
  std::int64_t rows, groups, n, k, n_sink, n_local, width;
  bool kept_on_top;
  int multiprocessors;
  int force_path;  // 0: by shape; 1: one block per row; 2: several blocks per row (tests)
  int device;         // the current GPU
  bool programmatic;  // sm_90+: chain the kernels by programmatic dependent launch
};

/// Returns "" or the CUDA error text.
std::string launch_topk(const TopkLaunch& launch, void* stream);

struct IndexerLaunch {
  const std::uint8_t* q;                // fp8 [R, HI, DI]
  const float* weights;                 // [R, HI]
  const std::uint8_t* cache;            // [num_blocks, 64, DI + 4], 16-byte aligned
  const std::int32_t* block_table;      // [S, max_blocks] or nullptr
  const std::int32_t* positions;        // [R]
  const std::int32_t* sequence_of_row;  // [R] or nullptr
  float* logits;                        // [R, n]
  std::int64_t rows, n, num_blocks;
  int heads, dim, sequences, max_blocks, blocks_per_sequence, multiprocessors;
  int device;         // the current GPU
  bool programmatic;  // sm_90+: launched as a programmatic dependent of the stream's previous kernel
};

/// Returns "" or the CUDA error text.
std::string launch_indexer_logits(const IndexerLaunch& launch, void* stream);

}  // namespace keysel::cuda_kernels
