// The AVX-512 indexer kernels, written once (private). Included by two files, each compiled with its own flags:
//   indexer_kernels_avx512.cpp      AVX-512 F/BW/VL/DQ: Kind::f32 (every format decoded to fp32, fp32 FMA)
//   indexer_kernels_avx512_dot.cpp  + VNNI + BF16:      Kind::bf16 (vdpbf16ps) and Kind::i8 (vpdpbusd)
// so that the plain AVX-512 path never contains a VNNI or BF16 instruction. Everything is in an unnamed
// namespace (each file gets its own copy, compiled for its own flags; nothing is shared at link time), and the
// parts that need VNNI or BF16 exist only where the compiler was given them.
//
// Layout: 16 query heads per vector lane group, a tile of kKeys keys per pass. The query is packed once per call
// so that one load gives 16 heads' values at one channel step, and each key's values at that step are
// broadcast:
//   Kind::f32   fp32 FMA      query [DIp][HIp] fp32,        key decoded to fp32 (exact for every format)
//   Kind::bf16  vdpbf16ps     query [DIp/2][HIp][2] bf16,   key decoded to bf16 (bf16, fp8: exact)
//   Kind::i8    vpdpbusd      query [DIp/4][HIp][4] int8,   key codes + 128 as uint8; the +128 is removed with
//                             128 * sum(query codes) per head and group
// GCC 12 reports its own _mm512_undefined_* placeholders inside the intrinsic headers as "may be used
// uninitialized" (a known false positive); the warning says nothing about this file.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "indexer_kernels.h"

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__AVX512DQ__)
#error "indexer_kernels_avx512.h needs AVX-512 F/BW/VL/DQ (compile flags set in indexer/CMakeLists.txt)"
#endif
#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)
#define KEYSEL_AVX512_DOT 1
#else
#define KEYSEL_AVX512_DOT 0
#endif

namespace keysel::indexer_detail {
namespace {

constexpr int kLanes = 16;
constexpr int kKeys = 6;  // keys per tile: 4 head vectors x 6 keys = 24 accumulators of 32 registers

enum class Kind { f32, bf16, i8 };

struct PackedQuery {
  std::int64_t heads_padded = 0;
  std::vector<float> f32;                // [DIp][HIp]
  std::vector<std::uint16_t> bf16;       // [DIp/2][HIp][2]
  std::vector<std::int8_t> i8;           // [DIp/4][HIp][4]
  std::vector<std::int32_t> correction;  // [groups][HIp]
  std::vector<float> scales;             // [groups][HIp], 0 for padding heads
  std::vector<float> weights;            // [HIp]: w * sq with one group, w otherwise; 0 for padding heads
};

PackedQuery pack_query(const IndexerProblem& p, Kind kind) {
  PackedQuery q;
  const std::int64_t hp = (p.heads + kLanes - 1) / kLanes * kLanes, pd = p.padded_dim;
  q.heads_padded = hp;
  q.scales.assign(static_cast<std::size_t>(p.groups * hp), 0.0f);
  q.weights.assign(static_cast<std::size_t>(hp), 0.0f);
  for (std::int64_t h = 0; h < p.heads; ++h) {
    for (std::int64_t g = 0; g < p.groups; ++g) q.scales[g * hp + h] = p.query_scales[h * p.groups + g];
    q.weights[h] = p.groups == 1 ? p.weights[h] * p.query_scales[h] : p.weights[h];
  }
  auto value = [&](std::int64_t h, std::int64_t d) { return h < p.heads ? p.query_values[h * pd + d] : 0.0f; };
  if (kind == Kind::f32) {
    q.f32.resize(static_cast<std::size_t>(pd * hp));
    for (std::int64_t d = 0; d < pd; ++d)
      for (std::int64_t h = 0; h < hp; ++h) q.f32[d * hp + h] = value(h, d);
  } else if (kind == Kind::bf16) {
    q.bf16.resize(static_cast<std::size_t>(pd * hp));
    for (std::int64_t d = 0; d < pd; ++d)
      for (std::int64_t h = 0; h < hp; ++h) q.bf16[((d / 2) * hp + h) * 2 + d % 2] = fp32_to_bf16_bits(value(h, d));
  } else {
    q.i8.resize(static_cast<std::size_t>(pd * hp));
    q.correction.assign(static_cast<std::size_t>(p.groups * hp), 0);
    for (std::int64_t d = 0; d < pd; ++d) {
      for (std::int64_t h = 0; h < hp; ++h) {
        const auto code = static_cast<std::int8_t>(value(h, d));
        q.i8[((d / 4) * hp + h) * 4 + d % 4] = code;
        q.correction[(d / p.group_channels) * hp + h] += 128 * code;
      }
    }
  }
  return q;
}

/// fp8 e4m3 codes (16 of them, widened to 32-bit lanes) to fp32: sign and the 7 magnitude bits moved into an
/// fp32's exponent and mantissa fields, then scaled by 2^(127-7): exact for normals and subnormals alike (e4m3
/// codes here are finite: S.1111.111 never occurs).
inline __m512 e4m3_to_ps(__m512i x) {
  const __m512i magnitude = _mm512_slli_epi32(_mm512_and_si512(x, _mm512_set1_epi32(0x7F)), 20);
  const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(x, _mm512_set1_epi32(0x80)), 24);
  return _mm512_mul_ps(_mm512_castsi512_ps(_mm512_or_si512(magnitude, sign)), _mm512_set1_ps(0x1p120f));
}

/// Key row `src` (padded_dim channels of `format`) decoded to fp32.
[[maybe_unused]] void decode_row_f32(DType format, const std::uint8_t* src, std::int64_t pd, float* dst) {
  switch (format) {
    case DType::fp32: std::memcpy(dst, src, static_cast<std::size_t>(pd * 4)); break;
    case DType::fp16:
      for (std::int64_t d = 0; d < pd; d += 16)
        _mm512_storeu_ps(dst + d, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * d))));
      break;
    case DType::bf16:
      for (std::int64_t d = 0; d < pd; d += 16) {
        const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * d)));
        _mm512_storeu_ps(dst + d, _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)));
      }
      break;
    case DType::fp8_e4m3:
      for (std::int64_t d = 0; d < pd; d += 16)
        _mm512_storeu_ps(dst + d, e4m3_to_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d)))));
      break;
    case DType::fp8_e5m2:
      // An e5m2 code is the top byte of the fp16 with the same value.
      for (std::int64_t d = 0; d < pd; d += 16) {
        const __m256i h = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d))), 8);
        _mm512_storeu_ps(dst + d, _mm512_cvtph_ps(h));
      }
      break;
    case DType::int8:
      for (std::int64_t d = 0; d < pd; d += 16)
        _mm512_storeu_ps(dst + d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d)))));
      break;
    case DType::int4: {
      // 8 bytes = 16 codes: each byte twice, the low nibble in even lanes and the high one in odd lanes, then
      // sign-extended from 4 bits: (n ^ 8) - 8.
      const __m512i shifts = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
      for (std::int64_t d = 0; d < pd; d += 16) {
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + d / 2));
        const __m512i twice = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(bytes, bytes));
        const __m512i nibble = _mm512_and_si512(_mm512_srlv_epi32(twice, shifts), _mm512_set1_epi32(0xF));
        const __m512i code = _mm512_sub_epi32(_mm512_xor_si512(nibble, _mm512_set1_epi32(8)), _mm512_set1_epi32(8));
        _mm512_storeu_ps(dst + d, _mm512_cvtepi32_ps(code));
      }
      break;
    }
    default: break;
  }
}

#if KEYSEL_AVX512_DOT
/// Key row decoded to bf16 (bf16, fp8: exact).
void decode_row_bf16(DType format, const std::uint8_t* src, std::int64_t pd, std::uint16_t* dst) {
  switch (format) {
    case DType::bf16: std::memcpy(dst, src, static_cast<std::size_t>(pd * 2)); break;
    case DType::fp8_e4m3:
      for (std::int64_t d = 0; d < pd; d += 16) {
        const __m512 f = e4m3_to_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d))));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), (__m256i)(_mm512_cvtneps_pbh(f)));
      }
      break;
    case DType::fp8_e5m2:
      for (std::int64_t d = 0; d < pd; d += 16) {
        const __m256i h = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d))), 8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), (__m256i)(_mm512_cvtneps_pbh(_mm512_cvtph_ps(h))));
      }
      break;
    default: break;
  }
}

/// Key row of int8 / int4 codes as code + 128 (uint8).
void decode_row_u8(DType format, const std::uint8_t* src, std::int64_t pd, std::uint8_t* dst) {
  if (format == DType::int8) {
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
    for (std::int64_t d = 0; d < pd; d += 32) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + d));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), _mm256_xor_si256(x, flip));
    }
    return;
  }
  // int4: 32 bytes = 64 codes: widen each byte to a word, move the high nibble to the word's high byte (that is
  // the element order), then map nibble n to code + 128 = (n ^ 8) + 120.
  for (std::int64_t d = 0; d < pd; d += 64) {
    // A row of 32 channels mod 64 ends after 16 bytes: the masked load reads nothing past it.
    const __mmask32 valid = d + 64 <= pd ? 0xFFFFFFFFu : 0x0000FFFFu;
    const __m512i w = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(valid, src + d / 2));
    __m512i t = _mm512_or_si512(_mm512_and_si512(w, _mm512_set1_epi16(0x000F)),
                                _mm512_and_si512(_mm512_slli_epi16(w, 4), _mm512_set1_epi16(0x0F00)));
    t = _mm512_add_epi16(_mm512_xor_si512(t, _mm512_set1_epi16(0x0808)), _mm512_set1_epi16(0x7878));
    if (d + 64 <= pd) {
      _mm512_storeu_si512(dst + d, t);
    } else {  // a padded row of 32 channels mod 64: only the first half is real
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), _mm512_castsi512_si256(t));
    }
  }
}
#endif

std::int64_t element_bytes(Kind kind) { return kind == Kind::f32 ? 4 : kind == Kind::bf16 ? 2 : 1; }

// Decodes keys [s, s + count) into the tile buffer (kKeys rows of DIp elements; rows past count are zero).
template <Kind K>
void load_keys(const IndexerProblem& p, std::int64_t s, int count, void* buffer) {
  const std::int64_t pd = p.padded_dim;
  for (int k = 0; k < count; ++k) {
    const std::uint8_t* src = p.key_codes + (s + k) * p.row_bytes;
    if constexpr (K == Kind::f32) {
      decode_row_f32(p.format, src, pd, static_cast<float*>(buffer) + k * pd);
    }
#if KEYSEL_AVX512_DOT
    if constexpr (K == Kind::bf16) decode_row_bf16(p.format, src, pd, static_cast<std::uint16_t*>(buffer) + k * pd);
    if constexpr (K == Kind::i8) decode_row_u8(p.format, src, pd, static_cast<std::uint8_t*>(buffer) + k * pd);
#endif
  }
}

// The hot loops for the common case of 4 head vectors (64 heads) x 6 keys, with the 24 accumulators as named
// locals: GCC keeps an array of vector accumulators in memory (a store per multiply-add), named locals in registers.
#define KEYSEL_DECLARE_ROW(T, k, zero) T a0_##k = zero, a1_##k = zero, a2_##k = zero, a3_##k = zero;
#define KEYSEL_DECLARE(T, zero)                                                                        \
  KEYSEL_DECLARE_ROW(T, 0, zero) KEYSEL_DECLARE_ROW(T, 1, zero) KEYSEL_DECLARE_ROW(T, 2, zero)        \
  KEYSEL_DECLARE_ROW(T, 3, zero) KEYSEL_DECLARE_ROW(T, 4, zero) KEYSEL_DECLARE_ROW(T, 5, zero)
#define KEYSEL_STEP(k, op, b)                                                                          \
  a0_##k = op(a0_##k, q0, b);                                                                          \
  a1_##k = op(a1_##k, q1, b);                                                                          \
  a2_##k = op(a2_##k, q2, b);                                                                          \
  a3_##k = op(a3_##k, q3, b);
#define KEYSEL_STORE_ROW(k, convert) \
  out[0][k] = convert(a0_##k, 0); out[1][k] = convert(a1_##k, 1); out[2][k] = convert(a2_##k, 2); out[3][k] = convert(a3_##k, 3);
#define KEYSEL_STORE(convert)                                                                           \
  KEYSEL_STORE_ROW(0, convert) KEYSEL_STORE_ROW(1, convert) KEYSEL_STORE_ROW(2, convert)              \
  KEYSEL_STORE_ROW(3, convert) KEYSEL_STORE_ROW(4, convert) KEYSEL_STORE_ROW(5, convert)
#define KEYSEL_AS_IS(a, i) (a)

// The multiply-adds update their accumulator in place. With the intrinsics GCC 12 copies every accumulator to a
// fresh register and back on each step (twice the vector instructions); the asm statements pin them.
#if defined(__GNUC__) && !defined(__clang__)
inline __m512 fma_f32(__m512 acc, __m512 q, __m512 b) {
  __asm__("vfmadd231ps %2, %1, %0" : "+v"(acc) : "v"(q), "v"(b));
  return acc;
}
#else
inline __m512 fma_f32(__m512 acc, __m512 q, __m512 b) { return _mm512_fmadd_ps(q, b, acc); }
#endif

static_assert(kKeys == 6, "the hot loops below are written out for 6 keys");

// out[i][k] = dot products of head vector hv0 + i with key k over channels [d0, d1).
[[maybe_unused]] void hot_f32(const PackedQuery& q, std::int64_t hv0, std::int64_t pd, const float* keys, std::int64_t d0,
             std::int64_t d1, __m512 out[4][kKeys]) {
  const std::int64_t hp = q.heads_padded;
  const __m512 zero = _mm512_setzero_ps();
  KEYSEL_DECLARE(__m512, zero)
  const float* qrow = q.f32.data() + d0 * hp + hv0 * kLanes;
  const float* kb = keys + d0;
  for (std::int64_t d = d0; d < d1; ++d, qrow += hp, ++kb) {
    const __m512 q0 = _mm512_loadu_ps(qrow), q1 = _mm512_loadu_ps(qrow + 16), q2 = _mm512_loadu_ps(qrow + 32),
                 q3 = _mm512_loadu_ps(qrow + 48);
    {
      const __m512 b = _mm512_set1_ps(kb[0]);
      KEYSEL_STEP(0, fma_f32, b)
    }
    {
      const __m512 b = _mm512_set1_ps(kb[pd]);
      KEYSEL_STEP(1, fma_f32, b)
    }
    {
      const __m512 b = _mm512_set1_ps(kb[2 * pd]);
      KEYSEL_STEP(2, fma_f32, b)
    }
    {
      const __m512 b = _mm512_set1_ps(kb[3 * pd]);
      KEYSEL_STEP(3, fma_f32, b)
    }
    {
      const __m512 b = _mm512_set1_ps(kb[4 * pd]);
      KEYSEL_STEP(4, fma_f32, b)
    }
    {
      const __m512 b = _mm512_set1_ps(kb[5 * pd]);
      KEYSEL_STEP(5, fma_f32, b)
    }
  }
  KEYSEL_STORE(KEYSEL_AS_IS)
}

#if KEYSEL_AVX512_DOT
#if defined(__GNUC__) && !defined(__clang__)
inline __m512 dot_bf16(__m512 acc, __m512bh q, __m512bh b) {
  __asm__("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(q), "v"(b));
  return acc;
}
inline __m512i dot_i8(__m512i acc, __m512i q, __m512i b) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(b), "v"(q));
  return acc;
}
#else
inline __m512 dot_bf16(__m512 acc, __m512bh q, __m512bh b) { return _mm512_dpbf16_ps(acc, q, b); }
inline __m512i dot_i8(__m512i acc, __m512i q, __m512i b) { return _mm512_dpbusd_epi32(acc, b, q); }
#endif

template <typename T>
inline T broadcast_bits(const void* p) {
  std::int32_t bits;
  std::memcpy(&bits, p, 4);
  return (T)(_mm512_set1_epi32(bits));
}

void hot_bf16(const PackedQuery& q, std::int64_t hv0, std::int64_t pd, const std::uint16_t* keys, std::int64_t d0,
              std::int64_t d1, __m512 out[4][kKeys]) {
  const std::int64_t hp = q.heads_padded;
  const __m512 zero = _mm512_setzero_ps();
  KEYSEL_DECLARE(__m512, zero)
  const std::uint16_t* qrow = q.bf16.data() + (d0 / 2 * hp + hv0 * kLanes) * 2;
  const std::uint16_t* kb = keys + d0;
  for (std::int64_t d = d0; d < d1; d += 2, qrow += 2 * hp, kb += 2) {
    const __m512bh q0 = (__m512bh)(_mm512_loadu_si512(qrow)), q1 = (__m512bh)(_mm512_loadu_si512(qrow + 32)),
                   q2 = (__m512bh)(_mm512_loadu_si512(qrow + 64)), q3 = (__m512bh)(_mm512_loadu_si512(qrow + 96));
    {
      const __m512bh b = broadcast_bits<__m512bh>(kb);
      KEYSEL_STEP(0, dot_bf16, b)
    }
    {
      const __m512bh b = broadcast_bits<__m512bh>(kb + pd);
      KEYSEL_STEP(1, dot_bf16, b)
    }
    {
      const __m512bh b = broadcast_bits<__m512bh>(kb + 2 * pd);
      KEYSEL_STEP(2, dot_bf16, b)
    }
    {
      const __m512bh b = broadcast_bits<__m512bh>(kb + 3 * pd);
      KEYSEL_STEP(3, dot_bf16, b)
    }
    {
      const __m512bh b = broadcast_bits<__m512bh>(kb + 4 * pd);
      KEYSEL_STEP(4, dot_bf16, b)
    }
    {
      const __m512bh b = broadcast_bits<__m512bh>(kb + 5 * pd);
      KEYSEL_STEP(5, dot_bf16, b)
    }
  }
  KEYSEL_STORE(KEYSEL_AS_IS)
}

void hot_i8(const PackedQuery& q, std::int64_t hv0, std::int64_t pd, const std::uint8_t* keys, std::int64_t g,
            std::int64_t d0, std::int64_t d1, __m512 out[4][kKeys]) {
  const std::int64_t hp = q.heads_padded;
  const __m512i zero = _mm512_setzero_si512();
  KEYSEL_DECLARE(__m512i, zero)
  const std::int8_t* qrow = q.i8.data() + (d0 / 4 * hp + hv0 * kLanes) * 4;
  const std::uint8_t* kb = keys + d0;
  for (std::int64_t d = d0; d < d1; d += 4, qrow += 4 * hp, kb += 4) {
    const __m512i q0 = _mm512_loadu_si512(qrow), q1 = _mm512_loadu_si512(qrow + 64),
                  q2 = _mm512_loadu_si512(qrow + 128), q3 = _mm512_loadu_si512(qrow + 192);
    {
      const __m512i b = broadcast_bits<__m512i>(kb);
      KEYSEL_STEP(0, dot_i8, b)
    }
    {
      const __m512i b = broadcast_bits<__m512i>(kb + pd);
      KEYSEL_STEP(1, dot_i8, b)
    }
    {
      const __m512i b = broadcast_bits<__m512i>(kb + 2 * pd);
      KEYSEL_STEP(2, dot_i8, b)
    }
    {
      const __m512i b = broadcast_bits<__m512i>(kb + 3 * pd);
      KEYSEL_STEP(3, dot_i8, b)
    }
    {
      const __m512i b = broadcast_bits<__m512i>(kb + 4 * pd);
      KEYSEL_STEP(4, dot_i8, b)
    }
    {
      const __m512i b = broadcast_bits<__m512i>(kb + 5 * pd);
      KEYSEL_STEP(5, dot_i8, b)
    }
  }
  const std::int32_t* correction = q.correction.data() + g * hp + hv0 * kLanes;
  const __m512i c[4] = {_mm512_loadu_si512(correction), _mm512_loadu_si512(correction + 16),
                        _mm512_loadu_si512(correction + 32), _mm512_loadu_si512(correction + 48)};
#define KEYSEL_CORRECT(a, i) _mm512_cvtepi32_ps(_mm512_sub_epi32((a), c[i]))
  KEYSEL_STORE(KEYSEL_CORRECT)
#undef KEYSEL_CORRECT
}
#endif  // KEYSEL_AVX512_DOT

#undef KEYSEL_AS_IS
#undef KEYSEL_STORE
#undef KEYSEL_STORE_ROW
#undef KEYSEL_STEP
#undef KEYSEL_DECLARE
#undef KEYSEL_DECLARE_ROW

/// Calls f(std::integral_constant<int, 0>) ... f(std::integral_constant<int, N-1>): loops over registers that
/// the compiler sees fully unrolled from the start, so that accumulator arrays live in registers.
template <int N, typename F>
[[gnu::always_inline]] inline void unroll(F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) { (f(std::integral_constant<int, I>{}), ...); }(
      std::make_integer_sequence<int, N>{});
}

// Accumulates, for the tile's keys, sum over heads [hv0*16, (hv0+NV)*16) of w * ReLU(logit) into score[k].
template <Kind K, int NV>
void tile(const IndexerProblem& p, const PackedQuery& q, std::int64_t hv0, const void* keys,
          const float* key_scales /*[kKeys][groups]*/, float* score /*[kKeys]*/) {
  const std::int64_t hp = q.heads_padded, pd = p.padded_dim;
  __m512 total[NV][kKeys];
  unroll<NV>([&](auto i) { unroll<kKeys>([&](auto k) { total[i][k] = _mm512_setzero_ps(); }); });
  for (std::int64_t g = 0; g < p.groups; ++g) {
    const std::int64_t d0 = g * p.group_channels, d1 = std::min(d0 + p.group_channels, pd);
    __m512 dot[NV][kKeys];
    if constexpr (NV == 4 && K == Kind::f32) {
      hot_f32(q, hv0, pd, static_cast<const float*>(keys), d0, d1, dot);
    } else if constexpr (K == Kind::f32) {
      const float* kb = static_cast<const float*>(keys) + d0;
      unroll<NV>([&](auto i) { unroll<kKeys>([&](auto k) { dot[i][k] = _mm512_setzero_ps(); }); });
      const float* qrow = q.f32.data() + d0 * hp + hv0 * kLanes;
      for (std::int64_t d = d0; d < d1; ++d, qrow += hp, ++kb) {
        __m512 qv[NV];
        unroll<NV>([&](auto i) { qv[i] = _mm512_loadu_ps(qrow + i * kLanes); });
        unroll<kKeys>([&](auto k) {
          const __m512 b = _mm512_set1_ps(kb[k * pd]);
          unroll<NV>([&](auto i) { dot[i][k] = _mm512_fmadd_ps(qv[i], b, dot[i][k]); });
        });
      }
    }
#if KEYSEL_AVX512_DOT
    if constexpr (NV == 4 && K == Kind::bf16) {
      hot_bf16(q, hv0, pd, static_cast<const std::uint16_t*>(keys), d0, d1, dot);
    } else if constexpr (NV == 4 && K == Kind::i8) {
      hot_i8(q, hv0, pd, static_cast<const std::uint8_t*>(keys), g, d0, d1, dot);
    } else if constexpr (K == Kind::bf16) {
      const std::uint16_t* kb = static_cast<const std::uint16_t*>(keys) + d0;
      unroll<NV>([&](auto i) { unroll<kKeys>([&](auto k) { dot[i][k] = _mm512_setzero_ps(); }); });
      const std::uint16_t* qrow = q.bf16.data() + (d0 / 2 * hp + hv0 * kLanes) * 2;
      for (std::int64_t d = d0; d < d1; d += 2, qrow += 2 * hp, kb += 2) {
        __m512bh qv[NV];
        unroll<NV>([&](auto i) { qv[i] = (__m512bh)(_mm512_loadu_si512(qrow + i * 2 * kLanes)); });
        unroll<kKeys>([&](auto k) {
          std::int32_t pair;
          std::memcpy(&pair, kb + k * pd, 4);
          const __m512bh b = (__m512bh)(_mm512_set1_epi32(pair));
          unroll<NV>([&](auto i) { dot[i][k] = _mm512_dpbf16_ps(dot[i][k], qv[i], b); });
        });
      }
    } else if constexpr (K == Kind::i8) {
      const std::uint8_t* kb = static_cast<const std::uint8_t*>(keys) + d0;
      __m512i acc[NV][kKeys];
      unroll<NV>([&](auto i) { unroll<kKeys>([&](auto k) { acc[i][k] = _mm512_setzero_si512(); }); });
      const std::int8_t* qrow = q.i8.data() + (d0 / 4 * hp + hv0 * kLanes) * 4;
      for (std::int64_t d = d0; d < d1; d += 4, qrow += 4 * hp, kb += 4) {
        __m512i qv[NV];
        unroll<NV>([&](auto i) { qv[i] = _mm512_loadu_si512(qrow + i * 4 * kLanes); });
        unroll<kKeys>([&](auto k) {
          std::int32_t quad;
          std::memcpy(&quad, kb + k * pd, 4);
          const __m512i b = _mm512_set1_epi32(quad);
          unroll<NV>([&](auto i) { acc[i][k] = _mm512_dpbusd_epi32(acc[i][k], b, qv[i]); });
        });
      }
      unroll<NV>([&](auto i) {
        const __m512i corr = _mm512_loadu_si512(q.correction.data() + g * hp + (hv0 + i) * kLanes);
        unroll<kKeys>([&](auto k) { dot[i][k] = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][k], corr)); });
      });
    }
#endif
    // Rescale this group's dot products and add them to the logits.
    if (p.groups == 1) {
      unroll<NV>([&](auto i) { unroll<kKeys>([&](auto k) { total[i][k] = dot[i][k]; }); });
    } else {
      unroll<NV>([&](auto i) {
        const __m512 sq = _mm512_loadu_ps(q.scales.data() + g * hp + (hv0 + i) * kLanes);
        unroll<kKeys>([&](auto k) {
          total[i][k] = _mm512_fmadd_ps(dot[i][k], _mm512_mul_ps(sq, _mm512_set1_ps(key_scales[k * p.groups + g])),
                                        total[i][k]);
        });
      });
    }
  }
  // ReLU, weights, sum over heads. With one group the weights carry the query scale and the key scale comes last.
  unroll<kKeys>([&](auto k) {
    __m512 sum = _mm512_setzero_ps();
    unroll<NV>([&](auto i) {
      const __m512 w = _mm512_loadu_ps(q.weights.data() + (hv0 + i) * kLanes);
      sum = _mm512_fmadd_ps(_mm512_max_ps(total[i][k], _mm512_setzero_ps()), w, sum);
    });
    const float s = _mm512_reduce_add_ps(sum);
    score[k] += p.groups == 1 ? s * key_scales[k] : s;
  });
}

template <Kind K>
void score_kind(const IndexerProblem& p, std::int64_t begin, std::int64_t end, float* out) {
  const PackedQuery q = pack_query(p, K);
  const std::int64_t vectors = q.heads_padded / kLanes;
  std::vector<std::uint8_t> buffer(static_cast<std::size_t>(kKeys * p.padded_dim * element_bytes(K) + 64), 0);
  std::vector<float> key_scales(static_cast<std::size_t>(kKeys * p.groups), 0.0f);
  for (std::int64_t s = begin; s < end; s += kKeys) {
    const int count = static_cast<int>(std::min<std::int64_t>(kKeys, end - s));
    if (count < kKeys) std::fill(buffer.begin(), buffer.end(), std::uint8_t{0});
    load_keys<K>(p, s, count, buffer.data());
    std::fill(key_scales.begin(), key_scales.end(), 0.0f);
    std::copy(p.key_scales + s * p.groups, p.key_scales + (s + count) * p.groups, key_scales.begin());
    float score[kKeys] = {};
    std::int64_t hv = 0;
    for (; hv + 4 <= vectors; hv += 4) tile<K, 4>(p, q, hv, buffer.data(), key_scales.data(), score);
    switch (vectors - hv) {
      case 3: tile<K, 3>(p, q, hv, buffer.data(), key_scales.data(), score); break;
      case 2: tile<K, 2>(p, q, hv, buffer.data(), key_scales.data(), score); break;
      case 1: tile<K, 1>(p, q, hv, buffer.data(), key_scales.data(), score); break;
      default: break;
    }
    std::copy(score, score + count, out + (s - begin));
  }
}

}  // namespace
}  // namespace keysel::indexer_detail
