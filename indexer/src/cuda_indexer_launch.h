// Launch parameters of the top-k and Lightning Indexer kernels, filled by the checks in cuda_topk.cpp /
// cuda_indexer.cpp for the launches in cuda_topk.cu / cuda_indexer.cu.
#pragma once

#include <cstdint>
#include <string_view>

#include "../../attention/src/cuda_glue.h"  // keysel's private CUDA glue (the attention module builds it)
#include "keysel/core/selection.h"

namespace keysel::cuda_kernels {

struct TopkLaunch {
  const float* scores;            // [rows = T * G, n]: row r at scores + r * stride (stride 0: n)
  const std::int32_t* positions;  // [T] (row r: T = r / groups), or nullptr with ends or lengths
  const std::int32_t* starts;     // [rows] or nullptr: row r's keys (and its indices) begin at starts[r]
  const std::int32_t* ends;       // [rows] or nullptr: row r's keys end before ends[r]
  const std::int32_t* lengths;    // [rows / next_n] or [rows] (lengths_per_row), or nullptr (see RowSource)
  std::int32_t* selection;        // [rows, policy.width()]
  std::int64_t rows, groups, n, stride;
  int next_n;
  bool lengths_per_row;
  SelectionPolicy policy;         // validated; its width() is below 2^31
  int device;                     // the current GPU
  cuda_glue::DeviceFacts facts;   // its facts (chain the kernels by programmatic dependent launch on sm_90+)
  int force_path;                 // 0: by shape; 1: one block per row; 2: several blocks per row (tests)
  void* workspace;                // caller's device memory of topk_scratch_bytes(rows, n, kTopkMaxSegments) bytes
                                  // or more, 16-byte aligned; nullptr: stream-ordered scratch
};

/// Launches on `stream` (a cudaStream_t); throws keysel::Error of `function` when CUDA refuses.
void launch_topk(std::string_view function, const TopkLaunch& launch, void* stream);

struct IndexerLaunch {
  const std::uint8_t* q;                // fp8 [R, HI, DI]
  const float* weights;                 // [R, HI]
  const std::uint8_t* cache;            // [num_blocks, 64 * (DI + 4)] (64 x DI fp8, then 64 fp32), 16-byte aligned
  const std::int32_t* block_table;      // [S, max_blocks] or nullptr
  const std::int32_t* positions;        // [R], or nullptr with context_lens
  const std::int32_t* sequence_of_row;  // [R] or nullptr
  const std::int32_t* context_lens;     // [S] or [S, next_n] (lens_per_row), or nullptr (positions instead)
  int next_n;                           // query rows per sequence with context_lens (row r: sequence r / next_n)
  bool lens_per_row;
  const float* key_scales;              // [n] with ragged rows (cache: fp8 values [n, DI]), else nullptr
  const std::int32_t* starts;           // [R] with ragged rows: row r reads keys [starts[r], ends[r])
  const std::int32_t* ends;             // [R] with ragged rows, else nullptr
  float* logits;                        // [R, n]
  std::int64_t rows, n, num_blocks;
  int heads, dim, sequences, max_blocks, blocks_per_sequence;
  int device;                    // the current GPU
  cuda_glue::DeviceFacts facts;  // its facts (sm_90+: launched as a programmatic dependent of the previous kernel)
};

/// Launches on `stream` (a cudaStream_t); throws keysel::Error of `function` when CUDA refuses.
void launch_indexer_logits(std::string_view function, const IndexerLaunch& launch, void* stream);

}  // namespace keysel::cuda_kernels
