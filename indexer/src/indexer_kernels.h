// Private: the per-instruction-set kernels of the Lightning Indexer and their dispatch.
//
// Each kernel scores the keys [begin, end) of one query token:
//   out[s - begin] = sum_h w[h] * ReLU( sum_g sq[h,g] * sk[s,g] * sum_{d in g} qv[h,d] * code_k[s,d] )
// where qv are the query's decoded code values. Kernels live in indexer_kernels_<isa>.cpp, each compiled with
// its own instruction-set flags; only the dispatcher (simd.cpp) decides which one runs, through
// keysel::choose_kernel (keysel/core/cpu_features.h): per key format, the implementation with the highest
// multiply-accumulate rate on this CPU at the active SIMD level.
#pragma once

#include <cstdint>

#include <string_view>

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

/// The implementations. avx2_fma and avx2_madd16 are one function (it picks by format); the others take any format
/// they are listed for in simd.cpp.
enum class IndexerKernel : std::uint8_t {
  scalar,       // every format, fp32 (int32 for int8/int4)
  avx2_fma,     // float formats widened to fp32, vfmadd ymm
  avx2_madd16,  // int8/int4 widened to int16, vpmaddwd ymm
  avx512_fma,   // every format decoded to fp32, vfmadd zmm (AVX-512 F/BW/VL/DQ only)
  avx512_bf16,  // bf16, fp8 e4m3/e5m2 as bf16, vdpbf16ps (AVX-512 BF16)
  avx512_vnni,  // int8/int4 as u8 + 128, vpdpbusd (AVX-512 VNNI)
};
std::string_view indexer_kernel_name(IndexerKernel kernel);

void score_keys_scalar(const IndexerProblem& problem, std::int64_t begin, std::int64_t end, float* out);
void score_keys_avx2(const IndexerProblem& problem, std::int64_t begin, std::int64_t end, float* out);
void score_keys_avx512_fma(const IndexerProblem& problem, std::int64_t begin, std::int64_t end, float* out);
void score_keys_avx512_bf16(const IndexerProblem& problem, std::int64_t begin, std::int64_t end, float* out);
void score_keys_avx512_vnni(const IndexerProblem& problem, std::int64_t begin, std::int64_t end, float* out);

/// The implementation for keys of `format` at the active simd_level() on this CPU (keysel::choose_kernel).
IndexerKernel choose_indexer_kernel(DType format);
/// Runs `kernel` (which must run on this CPU and take `problem.format`).
void score_keys_with(IndexerKernel kernel, const IndexerProblem& problem, std::int64_t begin, std::int64_t end,
                     float* out);
/// score_keys_with(choose_indexer_kernel(problem.format), ...).
void score_keys(const IndexerProblem& problem, std::int64_t begin, std::int64_t end, float* out);

}  // namespace keysel::indexer_detail
