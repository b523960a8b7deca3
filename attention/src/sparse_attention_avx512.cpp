// The AVX-512 kernel (F, BW, VL, DQ): 16 floats per register; bf16 widened by a shift, fp16 by vcvtph2ps;
// row tails read with masked loads. Compiled with the AVX-512 flags (attention/CMakeLists.txt) and only called
// when the CPU has them.
// GCC 12's AVX-512 headers trip its own uninitialised-variable warnings (the `__Y = __Y` idiom); not ours.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <cmath>

#include "sparse_attention_backward_simd.h"
#include "sparse_attention_simd.h"

namespace keysel::attention_kernels {
namespace {

struct Avx512 {
  static constexpr int W = 16;
  static constexpr int kMaxChunks = 4;
  using V = __m512;

  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V x) { _mm512_storeu_ps(p, x); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static float reduce_add(V x) { return _mm512_reduce_add_ps(x); }
  static float reduce_max(V x) { return _mm512_reduce_max_ps(x); }
  static float exp_scalar(float x) { return std::exp(x); }

  /// exp(x) to about 2 ulp for x in [-87, 88.7]; 0 below -87 (and for -inf).
  static V exp(V x) {
    const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.7f));
    const V n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    V y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(y, n));
  }

  static V widen(__m256i bits, DType dtype) {
    if (dtype == DType::bf16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    return _mm512_cvtph_ps(bits);
  }

  template <DType T>
  static V load_row(const std::byte* row, std::int64_t i) {
    if constexpr (T == DType::fp32) {
      return _mm512_loadu_ps(reinterpret_cast<const float*>(row) + i);
    } else {
      return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * i)), T);
    }
  }
  template <DType T>
  static V load_row_tail(const std::byte* row, std::int64_t i, std::int64_t n) {
    const auto mask = static_cast<__mmask16>((1u << n) - 1u);
    if constexpr (T == DType::fp32) {
      return _mm512_maskz_loadu_ps(mask, reinterpret_cast<const float*>(row) + i);
    } else {
      return widen(_mm256_maskz_loadu_epi16(mask, row + 2 * i), T);
    }
  }
};

}  // namespace

void attend_avx512(const Problem& problem, const std::int32_t* keys, std::int64_t count, const State& state) {
  attend_simd<Avx512>(problem, keys, count, state);
}

void attend_shared_avx512(const Problem* problems, std::int64_t units, const std::int32_t* keys,
                        const std::int64_t* counts, const State* states) {
  attend_shared_simd<Avx512>(problems, units, keys, counts, states);
}

BackwardOps backward_ops_avx512() { return backward_ops<Avx512>(); }

}  // namespace keysel::attention_kernels
