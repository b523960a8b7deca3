// The AVX2 kernel (AVX2, FMA, F16C): 8 floats per register; bf16 widened by a shift, fp16 by vcvtph2ps; row
// tails copied into a zeroed register-sized buffer. Compiled with those flags (attention/CMakeLists.txt) and
// only called when the CPU has them.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "sparse_attention_backward_simd.h"
#include "sparse_attention_simd.h"

namespace keysel::attention_kernels {
namespace {

struct Avx2 {
  static constexpr int W = 8;
  static constexpr int kMaxChunks = 2;  // 4 heads x 2 registers of accumulators leave room in 16 registers
  using V = __m256;

  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V x) { _mm256_storeu_ps(p, x); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static float reduce_add(V x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static float reduce_max(V x) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static float exp_scalar(float x) { return std::exp(x); }

  /// exp(x) to about 2 ulp for x in [-87, 88.7]; 0 below -87 (and for -inf).
  static V exp(V x) {
    const V tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.7f));
    const V n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    V y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    // 2^n through the exponent field: n is in [-126, 128], and 2^128 only meets values that overflow anyway.
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(126)), 23);
    const V scaled = _mm256_mul_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), _mm256_set1_ps(2.0f));
    return _mm256_andnot_ps(tiny, scaled);
  }

  static V widen(__m128i bits, DType dtype) {
    if (dtype == DType::bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
    return _mm256_cvtph_ps(bits);
  }

  template <DType T>
  static V load_row(const std::byte* row, std::int64_t i) {
    if constexpr (T == DType::fp32) {
      return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + i);
    } else {
      return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * i)), T);
    }
  }
  template <DType T>
  static V load_row_tail(const std::byte* row, std::int64_t i, std::int64_t n) {
    alignas(32) std::byte buffer[32] = {};
    const std::int64_t element = T == DType::fp32 ? 4 : 2;
    std::memcpy(buffer, row + element * i, static_cast<std::size_t>(element * n));
    return load_row<T>(buffer, 0);
  }
};

}  // namespace

void attend_avx2(const Problem& problem, const std::int32_t* keys, std::int64_t count, const State& state) {
  attend_simd<Avx2>(problem, keys, count, state);
}

void attend_shared_avx2(const Problem* problems, std::int64_t units, const std::int32_t* keys,
                        const std::int64_t* counts, const State* states) {
  attend_shared_simd<Avx2>(problems, units, keys, counts, states);
}

BackwardOps backward_ops_avx2() { return backward_ops<Avx2>(); }

}  // namespace keysel::attention_kernels
