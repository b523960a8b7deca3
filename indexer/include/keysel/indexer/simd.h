// Which SIMD code paths the indexer kernels use.
//
// The level (SimdLevel, simd_level(), set_simd_level(), ScopedSimdLevel, KEYSEL_SIMD) is keysel's one dispatch
// for every kernel family and lives in keysel/core/cpu_features.h; this header includes it and adds what the
// Lightning Indexer picks within a level. Per key format, the indexer asks keysel::choose_kernel for the
// implementation with the highest multiply-accumulate rate this CPU has at the active level:
//   fp32, fp16              fp32 FMA (avx512: zmm; avx2: ymm)
//   bf16, fp8 e4m3/e5m2     avx512: `vdpbf16ps` (AVX-512 BF16) where it outruns fp32 FMA (AMD Zen 4: 2x),
//                           else fp32 FMA on keys widened to fp32 (Intel Xeon: `vdpbf16ps` at half the FMA rate);
//                           avx2: fp32 FMA
//   int8, int4              avx512: `vpdpbusd` (AVX-512 VNNI); without VNNI, or at avx2: `vpmaddwd` on int16
//   scalar level            portable C++ (fp32; int32 for the integer formats)
// Every path computes the same scores up to fp32 rounding (the tests compare each with the scalar one).
#pragma once

#include <string_view>

#include "keysel/core/cpu_features.h"
#include "keysel/core/dtype.h"

namespace keysel {

/// The indexer implementation that scores keys of `format` at the active level on this CPU: "avx512_bf16",
/// "avx512_vnni", "avx512_fma", "avx2_fma", "avx2_madd16" or "scalar".
std::string_view indexer_kernel_name(DType format);

/// The scan inner_product_topk (keysel/indexer/fast_topk.h) uses at the active level on this CPU:
///   "avx512_bf16_prefilter"  bf16 dot products (`vdpbf16ps`) with a proven error bound pick the keys that can reach
///                            the top k, which are then rescored exactly (where `vdpbf16ps` outruns fp32 FMA enough:
///                            AMD Zen 4); results identical to the fp32 scans
///   "avx512_fma"             fp32 FMA, queries in vector lanes, keys read in place (Intel Xeon)
///   "avx2_fma", "scalar"     key panels and StreamingTopK
/// (Inputs the bf16 error bound does not cover, and problems too small for its sampled threshold, take avx512_fma.)
std::string_view inner_product_kernel_name();

}  // namespace keysel
