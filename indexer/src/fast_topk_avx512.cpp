// AVX-512 kernels of the fast top-k paths (compiled with the avx512 level's flags, AVX-512 F/BW/VL/DQ, no VNNI
// or BF16: they run on every AVX-512 CPU). Off x86-64 (no flags) the functions are stubs that are never called:
// simd_level() is scalar there.
#include "fast_topk_kernels.h"

#if defined(__AVX512F__)
#include <immintrin.h>

#include <type_traits>
#include <utility>

// GCC 12 reports its own _mm512_undefined_* placeholders inside the intrinsics as maybe-uninitialized.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

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


// ---- fused inner-product scan ---------------------------------------------------------------------------------

namespace {

/// The multiply-add updates its accumulator in place: with the intrinsic GCC 12 copies accumulators between
/// registers on every step; the asm statement pins them.
#if defined(__GNUC__) && !defined(__clang__)
inline __m512 fma_in_place(__m512 acc, __m512 q, __m512 b) {
  __asm__("vfmadd231ps %2, %1, %0" : "+v"(acc) : "v"(q), "v"(b));
  return acc;
}
#else
inline __m512 fma_in_place(__m512 acc, __m512 q, __m512 b) { return _mm512_fmadd_ps(q, b, acc); }
#endif

/// acc[i][k] = scores of queries [16 i, 16 i + 16) with key row kb + k * dim. `next` is the next tile's first
/// key row (prefetched one cache line per row every 16 channels; the tile itself is then in L1).
template <int V, int K>
[[gnu::always_inline]] inline void score_tile(const float* qt, const float* kb, const float* next, std::int64_t dim,
                                              __m512 (&acc)[V][K]) {
  unroll<V>([&](auto i) { unroll<K>([&](auto k) { acc[i][k] = _mm512_setzero_ps(); }); });
  const float* q = qt;
  for (std::int64_t d0 = 0; d0 < dim; d0 += 16) {
    // Plain loop, outside the lambdas: GCC 12 drops a prefetch written inside them.
    for (int k = 0; k < K; ++k) _mm_prefetch(reinterpret_cast<const char*>(next + k * dim + d0), _MM_HINT_T0);
    const std::int64_t d1 = d0 + 16 < dim ? d0 + 16 : dim;
    for (std::int64_t d = d0; d < d1; ++d, q += 16 * V) {
      __m512 qv[V];
      unroll<V>([&](auto i) { qv[i] = _mm512_loadu_ps(q + 16 * i); });
      unroll<K>([&](auto k) {
        const __m512 b = _mm512_set1_ps(kb[k * dim + d]);
        unroll<V>([&](auto i) { acc[i][k] = fma_in_place(acc[i][k], qv[i], b); });
      });
    }
  }
}

template <int V, int K>
void scan(const float* qt, const float* keys, std::int64_t nk, std::int64_t dim, std::uint32_t first_position,
          CandidateLists& lists) {
  alignas(64) float tile_scores[K][16 * V];
  const auto run = [&]<int KT>(std::integral_constant<int, KT>, std::int64_t j) {
    const float* kb = keys + j * dim;
    const float* next = j + 2 * KT <= nk ? kb + KT * dim : kb;
    __m512 acc[V][KT];
    score_tile<V, KT>(qt, kb, next, dim, acc);
    __mmask16 mask[V][KT];
    __mmask16 any = 0;
    unroll<V>([&](auto i) {
      const __m512 t = _mm512_loadu_ps(lists.threshold + 16 * i);
      unroll<KT>([&](auto k) {
        mask[i][k] = _mm512_cmp_ps_mask(acc[i][k], t, _CMP_GE_OQ);  // never NaN
        any = static_cast<__mmask16>(any | mask[i][k]);
      });
    });
    if (any == 0) return;
    unroll<V>([&](auto i) { unroll<KT>([&](auto k) { _mm512_store_ps(&tile_scores[k][16 * i], acc[i][k]); }); });
    // The passing (query, key) pairs as entries q + 64 k, compressed in registers (a compress straight to memory
    // is microcoded on Zen 4) into one short list, then one loop over it: one hard-to-predict loop exit per tile.
    alignas(64) std::uint32_t entries[16 * V * KT + 16];
    std::int64_t n = 0;
    unroll<V>([&](auto i) {
      const __m512i lanes = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(16 * i));
      unroll<KT>([&](auto k) {
        _mm512_storeu_si512(entries + n, _mm512_maskz_compress_epi32(mask[i][k], _mm512_add_epi32(lanes, _mm512_set1_epi32(64 * k))));
        n += __builtin_popcount(mask[i][k]);
      });
    });
    std::uint64_t* words = lists.words;  // no __restrict: compact() reorders words and resets count
    std::int64_t* count = lists.count;
    const std::int64_t capacity = lists.capacity;
    for (std::int64_t e = 0; e < n; ++e) {
      const std::uint32_t q = entries[e] & 63u, k = entries[e] >> 6;
      // make_candidate: the score's order key above, 0xFFFFFFFF - position below.
      const std::uint32_t position = first_position + static_cast<std::uint32_t>(j) + k;
      words[q * capacity + count[q]] = (static_cast<std::uint64_t>(score_key(tile_scores[k][q])) << 32) | (0xFFFFFFFFu - position);
      if (++count[q] == capacity) lists.compact(lists, q);
    }
  };
  std::int64_t j = 0;
  for (; j + K <= nk; j += K) run(std::integral_constant<int, K>{}, j);
  for (; j < nk; ++j) run(std::integral_constant<int, 1>{}, j);
}

template <int V, int K>
void dense(const float* qt, const float* keys, std::int64_t nk, std::int64_t dim, float* out) {
  const auto run = [&]<int KT>(std::integral_constant<int, KT>, std::int64_t j) {
    const float* kb = keys + j * dim;
    __m512 acc[V][KT];
    score_tile<V, KT>(qt, kb, j + 2 * KT <= nk ? kb + KT * dim : kb, dim, acc);
    unroll<V>([&](auto i) { unroll<KT>([&](auto k) { _mm512_storeu_ps(out + (j + k) * 16 * V + 16 * i, acc[i][k]); }); });
  };
  std::int64_t j = 0;
  for (; j + K <= nk; j += K) run(std::integral_constant<int, K>{}, j);
  for (; j < nk; ++j) run(std::integral_constant<int, 1>{}, j);
}

}  // namespace

// ---- sampled thresholds ---------------------------------------------------------------------------------------

void rank_thresholds_avx512(const float* scores, std::int64_t rows, std::int64_t stride, std::int64_t rank,
                            std::uint32_t* keys, float* out) {
  // Order keys (score_key, 16 lanes at a time): -0 -> +0; negative: ~bits; positive: bits | sign bit; NaN: 0.
  const auto key_of = [](__m512 v) {
    const __mmask16 zero = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_EQ_OQ);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __m512i bits = _mm512_mask_mov_epi32(_mm512_castps_si512(v), zero | nan, _mm512_setzero_si512());
    const __m512i flip = _mm512_or_si512(_mm512_srai_epi32(bits, 31), _mm512_set1_epi32(static_cast<int>(0x80000000u)));
    return _mm512_maskz_xor_epi32(static_cast<__mmask16>(~nan), bits, flip);
  };
  // The keys once, then the largest key t with at least `rank` keys >= t, one bit at a time from the top.
  __m512i t = _mm512_setzero_si512();
  const __m512i need = _mm512_set1_epi32(static_cast<int>(rank));
  const std::int64_t n = rows;
  for (std::int64_t i = 0; i < n; ++i) _mm512_storeu_si512(keys + 16 * i, key_of(_mm512_loadu_ps(scores + i * stride)));
  for (int bit = 31; bit >= 0; --bit) {
    const __m512i candidate = _mm512_or_si512(t, _mm512_set1_epi32(static_cast<int>(1u << bit)));
    __m512i count0 = _mm512_setzero_si512(), count1 = _mm512_setzero_si512();
    const __m512i one = _mm512_set1_epi32(1);
    std::int64_t i = 0;
    for (; i + 2 <= n; i += 2) {
      count0 = _mm512_mask_add_epi32(count0, _mm512_cmpge_epu32_mask(_mm512_loadu_si512(keys + 16 * i), candidate), count0, one);
      count1 = _mm512_mask_add_epi32(count1, _mm512_cmpge_epu32_mask(_mm512_loadu_si512(keys + 16 * i + 16), candidate), count1, one);
    }
    if (i < n) count0 = _mm512_mask_add_epi32(count0, _mm512_cmpge_epu32_mask(_mm512_loadu_si512(keys + 16 * i), candidate), count0, one);
    t = _mm512_mask_mov_epi32(t, _mm512_cmpge_epu32_mask(_mm512_add_epi32(count0, count1), need), candidate);
  }
  alignas(64) std::uint32_t key[16];
  _mm512_store_si512(key, t);
  for (int l = 0; l < 16; ++l) out[l] = key[l] == 0 ? -__builtin_inff() : key_score(key[l]);
}

// ---- exact rescoring ------------------------------------------------------------------------------------------

namespace {

/// Transposes 16 rows of 16 floats in registers: on return r[c] holds column c.
[[gnu::always_inline]] inline void transpose16(__m512 (&r)[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    u[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    u[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    u[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  // u[4g + c] holds, in 128-bit lane L, column 4L + c of rows 4g .. 4g + 3.
  __m512 v[16];
  for (int g = 0; g < 4; g += 2) {
    for (int c = 0; c < 4; ++c) {
      v[4 * g + c] = _mm512_shuffle_f32x4(u[4 * g + c], u[4 * g + 4 + c], 0x88);
      v[4 * g + 4 + c] = _mm512_shuffle_f32x4(u[4 * g + c], u[4 * g + 4 + c], 0xdd);
    }
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm512_shuffle_f32x4(v[c], v[8 + c], 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(v[4 + c], v[12 + c], 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(v[c], v[8 + c], 0xdd);
    r[12 + c] = _mm512_shuffle_f32x4(v[4 + c], v[12 + c], 0xdd);
  }
}

}  // namespace

void exact_scores_avx512(const RescoreGroup* groups, std::int64_t n, const float* keys, std::int64_t dim) {
  for (std::int64_t i = 0; i < n; ++i) {
    const RescoreGroup& group = groups[i];
    const float* row[16];
    for (int l = 0; l < 16; ++l) row[l] = keys + static_cast<std::int64_t>(group.positions[l < group.count ? l : 0]) * dim;
    __m512 acc = _mm512_setzero_ps();
    for (std::int64_t d0 = 0; d0 < dim; d0 += 16) {
      const std::int64_t w = dim - d0 < 16 ? dim - d0 : 16;
      const __mmask16 valid = static_cast<__mmask16>(w == 16 ? 0xFFFF : (1u << w) - 1u);
      __m512 r[16];
      unroll<16>([&](auto l) { r[l] = _mm512_maskz_loadu_ps(valid, row[l] + d0); });
      transpose16(r);
      // One FMA per channel, in channel order: the scans' chain, lane by lane.
      if (w == 16) {
        unroll<16>([&](auto c) { acc = _mm512_fmadd_ps(_mm512_set1_ps(group.query[d0 + c]), r[c], acc); });
      } else {
        alignas(64) float column[16][16];
        unroll<16>([&](auto c) { _mm512_store_ps(column[c], r[c]); });
        for (std::int64_t c = 0; c < w; ++c) acc = _mm512_fmadd_ps(_mm512_set1_ps(group.query[d0 + c]), _mm512_load_ps(column[c]), acc);
      }
    }
    const __mmask16 keep = static_cast<__mmask16>(group.count >= 16 ? 0xFFFF : (1u << group.count) - 1u);
    _mm512_mask_storeu_ps(group.out, keep, acc);
  }
}

// Register tiles of vectors x keys = 24 accumulators (of 32 registers) at every width.
void scan_keys_avx512(const float* qt, std::int64_t vectors, const float* keys, std::int64_t nk, std::int64_t dim,
                      std::uint32_t first_position, CandidateLists& lists) {
  switch (vectors) {
    case 4: scan<4, 6>(qt, keys, nk, dim, first_position, lists); break;
    case 3: scan<3, 8>(qt, keys, nk, dim, first_position, lists); break;
    case 2: scan<2, 12>(qt, keys, nk, dim, first_position, lists); break;
    default: scan<1, 24>(qt, keys, nk, dim, first_position, lists); break;
  }
}

void score_keys_avx512(const float* qt, std::int64_t vectors, const float* keys, std::int64_t nk, std::int64_t dim,
                       float* out) {
  switch (vectors) {
    case 4: dense<4, 6>(qt, keys, nk, dim, out); break;
    case 3: dense<3, 8>(qt, keys, nk, dim, out); break;
    case 2: dense<2, 12>(qt, keys, nk, dim, out); break;
    default: dense<1, 24>(qt, keys, nk, dim, out); break;
  }
}

}  // namespace keysel::topk_kernels

#else  // not compiled for AVX-512

namespace keysel::topk_kernels {

std::int64_t filter_avx512(const float* scores, std::int64_t n, float threshold, std::uint32_t first_position,
                         std::uint64_t* out) {
  return filter_scalar(scores, n, threshold, first_position, out);
}

void block_scores_avx512(const float* queries, std::int64_t nq, const float* keys, std::int64_t nk,
                       std::int64_t dim, float* out, std::int64_t out_stride, float* workspace) {
  block_scores_scalar(queries, nq, keys, nk, dim, out, out_stride, workspace);
}

void scan_keys_avx512(const float*, std::int64_t, const float*, std::int64_t, std::int64_t, std::uint32_t,
                      CandidateLists&) {}
void score_keys_avx512(const float*, std::int64_t, const float*, std::int64_t, std::int64_t, float*) {}
void exact_scores_avx512(const RescoreGroup*, std::int64_t, const float*, std::int64_t) {}
void rank_thresholds_avx512(const float*, std::int64_t, std::int64_t, std::int64_t, std::uint32_t*, float*) {}

}  // namespace keysel::topk_kernels

#endif
