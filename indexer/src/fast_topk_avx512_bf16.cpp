// The bf16 prefilter of the fused inner-product top-k (AVX-512 F/BW/VL/DQ + BF16; compiled with those flags only
// here, run only where the CPU has BF16 and `vdpbf16ps` outruns fp32 FMA: see inner_product_topk.cpp).
//
// Queries are packed once as bf16 pairs in vector lanes (16 queries per register, 4 registers); keys are read in
// place, a tile of 6 rows at a time converted to bf16 pairs (and their norms taken) in L1, and each pair of
// channels is broadcast into `vdpbf16ps`, which does two multiply-adds per lane: twice the MACs of an fp32 FMA per
// instruction. In registers, each approximate score a is compared with threshold[q] - bound[q] * ||k||; the keys
// kept are rescored exactly later, so the approximation decides only which keys are rescored, never a score.
#include "fast_topk_kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

#include <type_traits>
#include <utility>

// GCC 12 reports its own _mm512_undefined_* placeholders inside the intrinsics as maybe-uninitialized.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace keysel::topk_kernels {
namespace {

#if defined(__GNUC__) && !defined(__clang__)
inline __m512 dot_in_place(__m512 acc, __m512 q, __m512 b) {  // acc += q.bf16[2i] b.bf16[2i] + q.bf16[2i+1] b.bf16[2i+1]
  __asm__("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(q), "v"(b));
  return acc;
}
#else
inline __m512 dot_in_place(__m512 acc, __m512 q, __m512 b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)q, (__m512bh)b);
}
#endif

/// `n` fp32 values (n <= 32) to bf16, rounded to nearest even, stored as n 16-bit values (zeros past n up to 32).
inline void to_bf16(const float* src, std::int64_t n, std::uint16_t* dst) {
  const __mmask16 lo = static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1u);
  const __mmask16 hi = static_cast<__mmask16>(n >= 32 ? 0xFFFF : n <= 16 ? 0 : (1u << (n - 16)) - 1u);
  const __m512 a = _mm512_maskz_loadu_ps(lo, src), b = _mm512_maskz_loadu_ps(hi, src + 16);
  _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(b, a));
}

constexpr float kNormLow = 0x1p-40f, kNormHigh = 0x1p40f;

/// Channels [0, channels) of the tile's K rows (row stride `stride`) as bf16 pairs, kb16[k * padded_pairs + p]
/// (zero past the channels), and, when `norm` is given, the rows' norms over those channels: +inf for a norm the
/// bound does not cover (outside [2^-40, 2^40] but not 0, or not finite).
template <int K>
inline void convert_tile(const float* kb, std::int64_t stride, std::int64_t channels, std::int64_t padded_pairs,
                         std::uint32_t* kb16, float* norm) {
  for (int k = 0; k < K; ++k) {
    const float* row = kb + k * stride;
    std::uint16_t* out = reinterpret_cast<std::uint16_t*>(kb16 + k * padded_pairs);
    __m512 sum = _mm512_setzero_ps();
    for (std::int64_t d = 0; d < 2 * padded_pairs; d += 32) {
      const std::int64_t n = channels - d > 32 ? 32 : channels - d > 0 ? channels - d : 0;
      to_bf16(row + d, n, out + d);
      if (norm != nullptr) {
        const __mmask16 lo = static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1u);
        const __mmask16 hi = static_cast<__mmask16>(n >= 32 ? 0xFFFF : n <= 16 ? 0 : (1u << (n - 16)) - 1u);
        const __m512 a = _mm512_maskz_loadu_ps(lo, row + d), b = _mm512_maskz_loadu_ps(hi, row + d + 16);
        sum = _mm512_fmadd_ps(a, a, sum);
        sum = _mm512_fmadd_ps(b, b, sum);
      }
    }
    if (norm != nullptr) {
      float value = __builtin_sqrtf(_mm512_reduce_add_ps(sum));
      if (value != 0.0f && !(value >= kNormLow && value <= kNormHigh)) value = __builtin_inff();
      norm[k] = value;
    }
  }
}

/// The norm of a row of `dim` channels, as convert_tile gives it.
inline float row_norm(const float* row, std::int64_t dim) {
  __m512 sum = _mm512_setzero_ps();
  for (std::int64_t d = 0; d < dim; d += 16) {
    const __mmask16 m = static_cast<__mmask16>(dim - d >= 16 ? 0xFFFF : (1u << (dim - d)) - 1u);
    const __m512 x = _mm512_maskz_loadu_ps(m, row + d);
    sum = _mm512_fmadd_ps(x, x, sum);
  }
  float value = __builtin_sqrtf(_mm512_reduce_add_ps(sum));
  if (value != 0.0f && !(value >= kNormLow && value <= kNormHigh)) value = __builtin_inff();
  return value;
}

template <int V, int K>
void scan(const std::uint32_t* qt16, const float* keys, std::int64_t nk, std::int64_t dim,
          std::uint32_t first_position, ApproxLists& lists) {
  const std::int64_t pairs = (dim + 1) / 2;
  // The tile's keys as bf16 pairs: K rows of up to 128 pairs (D = 256) on the stack (12 KiB), larger dims in
  // pieces below.
  constexpr std::int64_t kMaxPairs = 128;
  alignas(64) std::uint32_t kb16[K * kMaxPairs];
  float norm[K];
  const auto run = [&]<int KT>(std::integral_constant<int, KT>, std::int64_t j) {
    const float* kb = keys + j * dim;
    const float* next = j + 2 * KT <= nk ? kb + KT * dim : kb;
    __m512 acc[V][KT];
    unroll<V>([&](auto i) { unroll<KT>([&](auto k) { acc[i][k] = _mm512_setzero_ps(); }); });
    for (std::int64_t p0 = 0; p0 < pairs; p0 += kMaxPairs) {  // pieces of the channels
      const std::int64_t piece = pairs - p0 < kMaxPairs ? pairs - p0 : kMaxPairs;
      const std::int64_t piece_padded = (piece + 15) / 16 * 16;
      const std::int64_t piece_dim = dim - 2 * p0 < 2 * piece ? dim - 2 * p0 : 2 * piece;
      const bool one_piece = pairs <= kMaxPairs;
      convert_tile<KT>(kb + 2 * p0, dim, piece_dim, piece_padded, kb16, one_piece ? norm : nullptr);
      if (!one_piece && p0 == 0) {
        for (int k = 0; k < KT; ++k) norm[k] = row_norm(kb + k * dim, dim);
      }
      const std::uint32_t* q = qt16 + p0 * 16 * V;
      for (std::int64_t pp0 = 0; pp0 < piece; pp0 += 8) {
        // Plain loop, outside the lambdas: GCC 12 drops a prefetch written inside them. A line of each of the next
        // tile's rows every 8 pairs (16 channels).
        for (int k = 0; k < KT; ++k) _mm_prefetch(reinterpret_cast<const char*>(next + k * dim + 2 * (p0 + pp0)), _MM_HINT_T0);
        const std::int64_t pp1 = pp0 + 8 < piece ? pp0 + 8 : piece;
        for (std::int64_t p = pp0; p < pp1; ++p, q += 16 * V) {
          __m512 qv[V];
          unroll<V>([&](auto i) { qv[i] = _mm512_castsi512_ps(_mm512_loadu_si512(q + 16 * i)); });
          unroll<KT>([&](auto k) {
            const __m512 b = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(kb16[k * piece_padded + p])));
            unroll<V>([&](auto i) { acc[i][k] = dot_in_place(acc[i][k], qv[i], b); });
          });
        }
      }
    }
    // Keep unless a < threshold - bound * ||k|| (NaN: kept). Padding queries have threshold +inf, bound 0.
    __mmask16 mask[V][KT];
    __mmask16 any = 0;
    unroll<V>([&](auto i) {
      const __m512 t = _mm512_loadu_ps(lists.threshold + 16 * i), e = _mm512_loadu_ps(lists.bound + 16 * i);
      const __mmask16 real = _mm512_cmp_ps_mask(t, _mm512_set1_ps(__builtin_inff()), _CMP_NEQ_UQ);
      unroll<KT>([&](auto k) {
        const __m512 limit = _mm512_fnmadd_ps(e, _mm512_set1_ps(norm[k]), t);  // t - e * ||k||
        mask[i][k] = _mm512_mask_cmp_ps_mask(real, acc[i][k], limit, _CMP_NLT_UQ);
        any = static_cast<__mmask16>(any | mask[i][k]);
      });
    });
    if (any == 0) return;
    // The kept (query, key) pairs as entries q + 64 k, compressed in registers (a compress straight to memory is
    // microcoded on Zen 4) into one short list, then one loop over it: one hard-to-predict loop exit per tile.
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
    std::uint32_t* __restrict positions = lists.positions;
    std::int64_t* __restrict count = lists.count;
    const std::int64_t capacity = lists.capacity;
    const std::uint32_t position = first_position + static_cast<std::uint32_t>(j);
    for (std::int64_t e = 0; e < n; ++e) {
      const std::uint32_t q = entries[e] & 63u, k = entries[e] >> 6;
      positions[q * capacity + count[q]++] = position + k;
    }
  };
  std::int64_t j = 0;
  for (; j + K <= nk; j += K) run(std::integral_constant<int, K>{}, j);
  for (; j < nk; ++j) run(std::integral_constant<int, 1>{}, j);
}

}  // namespace

void pack_queries_bf16(const float* queries, std::int64_t n, std::int64_t dim, std::int64_t vectors, std::uint32_t* out) {
  const std::int64_t width = 16 * vectors, pairs = (dim + 1) / 2;
  alignas(64) std::uint16_t row[32];
  for (std::int64_t p = 0; p < pairs * width; ++p) out[p] = 0;
  for (std::int64_t q = 0; q < n; ++q) {
    for (std::int64_t d = 0; d < dim; d += 32) {
      to_bf16(queries + q * dim + d, dim - d < 32 ? dim - d : 32, row);
      for (std::int64_t c = 0; c < 32 && d + c < 2 * pairs; c += 2) {
        out[((d + c) / 2) * width + q] = static_cast<std::uint32_t>(row[c]) | (static_cast<std::uint32_t>(row[c + 1]) << 16);
      }
    }
  }
}

void scan_keys_bf16(const std::uint32_t* qt16, std::int64_t vectors, const float* keys, std::int64_t nk,
                    std::int64_t dim, std::uint32_t first_position, ApproxLists& lists) {
  switch (vectors) {
    case 4: scan<4, 6>(qt16, keys, nk, dim, first_position, lists); break;
    case 3: scan<3, 8>(qt16, keys, nk, dim, first_position, lists); break;
    case 2: scan<2, 12>(qt16, keys, nk, dim, first_position, lists); break;
    default: scan<1, 24>(qt16, keys, nk, dim, first_position, lists); break;
  }
}

}  // namespace keysel::topk_kernels

#else  // not compiled for AVX-512 BF16: never called (the dispatch needs the CPU feature and this build)

namespace keysel::topk_kernels {

void pack_queries_bf16(const float*, std::int64_t, std::int64_t, std::int64_t, std::uint32_t*) {}
void scan_keys_bf16(const std::uint32_t*, std::int64_t, const float*, std::int64_t, std::int64_t, std::uint32_t,
                    ApproxLists&) {}

}  // namespace keysel::topk_kernels

#endif
