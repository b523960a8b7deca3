// The AVX-512 dot-product indexer kernels: bf16 and fp8 keys through `vdpbf16ps` (AVX-512 BF16), int8 and int4
// keys through `vpdpbusd` (AVX-512 VNNI). Compiled with those flags only here; called only when the CPU has them
// and they are the faster path for the format (simd.cpp).
#include "indexer_kernels_avx512.h"

#if !KEYSEL_AVX512_DOT
#error "indexer_kernels_avx512_dot.cpp needs -mavx512bf16 -mavx512vnni (indexer/CMakeLists.txt)"
#endif

namespace keysel::indexer_detail {

void score_keys_avx512_bf16(const IndexerProblem& p, std::int64_t begin, std::int64_t end, float* out) {
  score_kind<Kind::bf16>(p, begin, end, out);
}

void score_keys_avx512_vnni(const IndexerProblem& p, std::int64_t begin, std::int64_t end, float* out) {
  score_kind<Kind::i8>(p, begin, end, out);
}

}  // namespace keysel::indexer_detail
