// AVX-512 kernels of the fast top-k paths (compiled with -mavx512f -mavx2 -mfma; AVX-512 F instructions only).
#include <immintrin.h>

// GCC 12 reports its own _mm512_undefined_* placeholders inside the intrinsics as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "fast_topk_kernels.h"

namespace keysel::topk_kernels {
namespace {

/// Writes the candidate words of the lanes of `v` (scores[base .. base + 16)) set in `mask`, in lane order.
inline std::int64_t emit(__m512 v, std::int64_t base, __mmask16 mask, std::uint32_t first_position,
                         std::uint64_t* out, std::int64_t count) {
  if (mask == 0) return count;
  // Order-preserving keys (score_key): -0 becomes +0; negative: ~bits; positive: bits | sign bit.
  const __mmask16 zero = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_EQ_OQ);
  const __m512i bits = _mm512_mask_mov_epi32(_mm512_castps_si512(v), zero, _mm512_setzero_si512());
  const __m512i flip = _mm512_or_si512(_mm512_srai_epi32(bits, 31), _mm512_set1_epi32(static_cast<int>(0x80000000u)));
  const __m512i key = _mm512_xor_si512(bits, flip);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i position =
      _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(first_position + static_cast<std::uint32_t>(base))), lanes);
  const __m512i low = _mm512_sub_epi32(_mm512_set1_epi32(-1), position);  // 0xFFFFFFFF - position
  for (int half = 0; half < 2; ++half) {
    const __m256i key_half = half == 0 ? _mm512_castsi512_si256(key) : _mm512_extracti64x4_epi64(key, 1);
    const __m256i low_half = half == 0 ? _mm512_castsi512_si256(low) : _mm512_extracti64x4_epi64(low, 1);
    const __m512i words = _mm512_or_si512(_mm512_slli_epi64(_mm512_cvtepu32_epi64(key_half), 32),
                                          _mm512_cvtepu32_epi64(low_half));
    const __mmask8 m = static_cast<__mmask8>(half == 0 ? mask : mask >> 8);
    // Compress in a register and store all 8 lanes (out has kFilterSlack words of room past n): a masked
    // compress-store to memory is microcoded and slow on some CPUs (AMD Zen 4).
    _mm512_storeu_si512(out + count, _mm512_maskz_compress_epi64(m, words));
    count += __builtin_popcount(m);
  }
  return count;
}

}  // namespace

std::int64_t filter_avx512(const float* scores, std::int64_t n, float threshold, std::uint32_t first_position,
                           std::uint64_t* out) {
  const __m512 t = _mm512_set1_ps(threshold);
  std::int64_t count = 0;
  std::int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m512 v0 = _mm512_loadu_ps(scores + i);
    const __m512 v1 = _mm512_loadu_ps(scores + i + 16);
    const __m512 v2 = _mm512_loadu_ps(scores + i + 32);
    const __m512 v3 = _mm512_loadu_ps(scores + i + 48);
    const __mmask16 m0 = _mm512_cmp_ps_mask(v0, t, _CMP_GE_OQ);
    const __mmask16 m1 = _mm512_cmp_ps_mask(v1, t, _CMP_GE_OQ);
    const __mmask16 m2 = _mm512_cmp_ps_mask(v2, t, _CMP_GE_OQ);
    const __mmask16 m3 = _mm512_cmp_ps_mask(v3, t, _CMP_GE_OQ);
    if ((m0 | m1 | m2 | m3) == 0) continue;
    count = emit(v0, i, m0, first_position, out, count);
    count = emit(v1, i + 16, m1, first_position, out, count);
    count = emit(v2, i + 32, m2, first_position, out, count);
    count = emit(v3, i + 48, m3, first_position, out, count);
  }
  for (; i < n; i += 16) {
    const std::int64_t left = n - i;
    const __mmask16 valid = left >= 16 ? static_cast<__mmask16>(0xFFFF)
                                       : static_cast<__mmask16>((1u << left) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(valid, scores + i);
    const __mmask16 m = _mm512_mask_cmp_ps_mask(valid, v, t, _CMP_GE_OQ);
    count = emit(v, i, m, first_position, out, count);
  }
  return count;
}

void block_scores_avx512(const float* queries, std::int64_t nq, const float* keys, std::int64_t nk,
                         std::int64_t dim, float* out, std::int64_t out_stride, float* workspace) {
  for (std::int64_t j0 = 0; j0 < nk; j0 += kKeyTile) {
    pack_key_panel(keys, nk, dim, j0, workspace);
    for (std::int64_t q0 = 0; q0 < nq; q0 += kQueryTile) {
      __m512 acc[kQueryTile][3];  // 8 queries x 48 keys: 24 accumulators of 32 registers
      for (int m = 0; m < kQueryTile; ++m) acc[m][0] = acc[m][1] = acc[m][2] = _mm512_setzero_ps();
      const float* q = queries + q0 * dim;
      const float* panel = workspace;
      for (std::int64_t d = 0; d < dim; ++d, panel += kKeyTile) {
        const __m512 b0 = _mm512_loadu_ps(panel);
        const __m512 b1 = _mm512_loadu_ps(panel + 16);
        const __m512 b2 = _mm512_loadu_ps(panel + 32);
        for (int m = 0; m < kQueryTile; ++m) {
          const __m512 a = _mm512_set1_ps(q[m * dim + d]);
          acc[m][0] = _mm512_fmadd_ps(a, b0, acc[m][0]);
          acc[m][1] = _mm512_fmadd_ps(a, b1, acc[m][1]);
          acc[m][2] = _mm512_fmadd_ps(a, b2, acc[m][2]);
        }
      }
      for (int m = 0; m < kQueryTile; ++m) {
        float* o = out + (q0 + m) * out_stride + j0;
        _mm512_storeu_ps(o, acc[m][0]);
        _mm512_storeu_ps(o + 16, acc[m][1]);
        _mm512_storeu_ps(o + 32, acc[m][2]);
      }
    }
  }
}

}  // namespace keysel::topk_kernels
