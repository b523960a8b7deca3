// AVX2 kernels of the fast top-k paths (compiled with -mavx2 -mfma -mf16c; run at SimdLevel::avx2 and above).
// Off x86-64 (no flags) the functions are stubs that are never called: simd_level() is scalar there.
#include "fast_topk_kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace keysel::topk_kernels {
namespace {

inline std::int64_t emit(const float* scores, std::int64_t base, std::uint32_t mask, std::uint32_t first_position,
                         std::uint64_t* out, std::int64_t count) {
  while (mask != 0) {
    const int j = __builtin_ctz(mask);
    out[count++] = make_candidate(scores[base + j], first_position + static_cast<std::uint32_t>(base + j));
    mask &= mask - 1;
  }
  return count;
}

}  // namespace

std::int64_t filter_avx2(const float* scores, std::int64_t n, float threshold, std::uint32_t first_position,
                         std::uint64_t* out) {
  const __m256 t = _mm256_set1_ps(threshold);
  std::int64_t count = 0;
  std::int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256 c0 = _mm256_cmp_ps(_mm256_loadu_ps(scores + i), t, _CMP_GE_OQ);
    const __m256 c1 = _mm256_cmp_ps(_mm256_loadu_ps(scores + i + 8), t, _CMP_GE_OQ);
    const __m256 c2 = _mm256_cmp_ps(_mm256_loadu_ps(scores + i + 16), t, _CMP_GE_OQ);
    const __m256 c3 = _mm256_cmp_ps(_mm256_loadu_ps(scores + i + 24), t, _CMP_GE_OQ);
    const __m256 any = _mm256_or_ps(_mm256_or_ps(c0, c1), _mm256_or_ps(c2, c3));
    if (_mm256_testz_ps(any, any)) continue;
    const std::uint32_t mask = static_cast<std::uint32_t>(_mm256_movemask_ps(c0)) |
                               (static_cast<std::uint32_t>(_mm256_movemask_ps(c1)) << 8) |
                               (static_cast<std::uint32_t>(_mm256_movemask_ps(c2)) << 16) |
                               (static_cast<std::uint32_t>(_mm256_movemask_ps(c3)) << 24);
    count = emit(scores, i, mask, first_position, out, count);
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 c = _mm256_cmp_ps(_mm256_loadu_ps(scores + i), t, _CMP_GE_OQ);
    count = emit(scores, i, static_cast<std::uint32_t>(_mm256_movemask_ps(c)), first_position, out, count);
  }
  for (; i < n; ++i) {
    if (scores[i] >= threshold) out[count++] = make_candidate(scores[i], first_position + static_cast<std::uint32_t>(i));
  }
  return count;
}

void block_scores_avx2(const float* queries, std::int64_t nq, const float* keys, std::int64_t nk,
                       std::int64_t dim, float* out, std::int64_t out_stride, float* workspace) {
  constexpr int kRows = 4;  // 4 queries x 16 keys: 8 accumulators, 2 loads, 1 broadcast of 16 registers
  for (std::int64_t j0 = 0; j0 < nk; j0 += kKeyTile) {
    pack_key_panel(keys, nk, dim, j0, workspace);
    for (std::int64_t half = 0; half < kKeyTile; half += 16) {
      for (std::int64_t q0 = 0; q0 < nq; q0 += kRows) {
        __m256 acc[kRows][2];
        for (int m = 0; m < kRows; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
        const float* q = queries + q0 * dim;
        const float* panel = workspace + half;
        for (std::int64_t d = 0; d < dim; ++d, panel += kKeyTile) {
          const __m256 b0 = _mm256_loadu_ps(panel);
          const __m256 b1 = _mm256_loadu_ps(panel + 8);
          for (int m = 0; m < kRows; ++m) {
            const __m256 a = _mm256_broadcast_ss(q + m * dim + d);
            acc[m][0] = _mm256_fmadd_ps(a, b0, acc[m][0]);
            acc[m][1] = _mm256_fmadd_ps(a, b1, acc[m][1]);
          }
        }
        for (int m = 0; m < kRows; ++m) {
          float* o = out + (q0 + m) * out_stride + j0 + half;
          _mm256_storeu_ps(o, acc[m][0]);
          _mm256_storeu_ps(o + 8, acc[m][1]);
        }
      }
    }
  }
}

}  // namespace keysel::topk_kernels

#else  // not compiled for AVX2

namespace keysel::topk_kernels {

std::int64_t filter_avx2(const float* scores, std::int64_t n, float threshold, std::uint32_t first_position,
                         std::uint64_t* out) {
  return filter_scalar(scores, n, threshold, first_position, out);
}

void block_scores_avx2(const float* queries, std::int64_t nq, const float* keys, std::int64_t nk,
                       std::int64_t dim, float* out, std::int64_t out_stride, float* workspace) {
  block_scores_scalar(queries, nq, keys, nk, dim, out, out_stride, workspace);
}

}  // namespace keysel::topk_kernels

#endif
