// Private: the per-instruction-set kernels of the Lightning Indexer and their dispatch.
//
// Each kernel scores the keys [begin, end) of one query token:
//   out[s - begin] = sum_h w[h] * ReLU( sum_g sq[h,g] * sk[s,g] * sum_{d in g} qv[h,d] * code_k[s,d] )
// where qv are the query's decoded code values. Kernels live in indexer_kernels_<isa>.cpp, each compiled with
// its own instruction-set flags; only the dispatcher (simd.cpp) decides which one runs.
#pragma once

#include <cstdint>

#include "keysel/core/dtype.h"
#include "keysel/indexer/simd.h"

namespace keysel::indexer_detail {

struct IndexerProblem {
  DType format = DType::fp32;
  std::int64_t heads = 0;           // HI
  std::int64_t padded_dim = 0;      // channels per row (multiple of 32; channels past DI are 0)
  std::int64_t groups = 1;          // scales per row
  std::int64_t group_channels = 0;  // channels per scale group (the last group may be shorter)
  std::int64_t row_bytes = 0;       // bytes of codes per key
  const std::uint8_t* key_codes = nullptr;  // [N, row_bytes]
  const float* key_scales = nullptr;        // [N, groups]
  const float* query_values = nullptr;      // [HI, padded_dim] decoded code values of the query token
  const float* query_scales = nullptr;      // [HI, groups]
  const float* weights = nullptr;           // [HI]
};

void score_keys_scalar(const IndexerProblem& problem, std::int64_t begin, std::int64_t end, float* out);
void score_keys_avx2(const IndexerProblem& problem, std::int64_t begin, std::int64_t end, float* out);
void score_keys_avx512(const IndexerProblem& problem, std::int64_t begin, std::int64_t end, float* out);

/// The kernel of the active simd_level().
void score_keys(const IndexerProblem& problem, std::int64_t begin, std::int64_t end, float* out);

}  // namespace keysel::indexer_detail
