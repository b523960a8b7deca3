// The plain AVX-512 indexer kernel (F, BW, VL, DQ; no VNNI, no BF16): every key format decoded to fp32 and
// multiplied with fp32 FMA. Runs on every AVX-512 CPU, and is the path for bf16 and fp8 keys where `vdpbf16ps`
// is slower than fp32 FMA (Intel Xeon); see simd.cpp for the choice.
#include "indexer_kernels_avx512.h"

namespace keysel::indexer_detail {

void score_keys_avx512_fma(const IndexerProblem& p, std::int64_t begin, std::int64_t end, float* out) {
  score_kind<Kind::f32>(p, begin, end, out);
}

}  // namespace keysel::indexer_detail
