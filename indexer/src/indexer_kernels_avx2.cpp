// AVX2 + FMA + F16C kernels. Compiled with those flags only here; called only when the CPU has them.
//
// 8 query heads per vector, kKeys keys per tile (4 x 3 = 12 accumulators of 16 registers):
//   float formats   keys decoded to fp32, fp32 FMA, query [DIp][HIp] fp32
//   int8, int4      codes widened to int16, vpmaddwd (exact int32 sums of pairs), query [DIp/2][HIp][2] int16
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "indexer_kernels.h"

namespace keysel::indexer_detail {
namespace {

constexpr int kLanes = 8;
constexpr int kKeys = 3;
constexpr std::int64_t kHeadPadding = 16;

struct PackedQuery {
  std::int64_t heads_padded = 0;
  std::vector<float> f32;          // [DIp][HIp]
  std::vector<std::int16_t> i16;   // [DIp/2][HIp][2]
  std::vector<float> scales;       // [groups][HIp]
  std::vector<float> weights;      // [HIp]
};

bool is_integer_format(DType format) { return format == DType::int8 || format == DType::int4; }

PackedQuery pack_query(const IndexerProblem& p) {
  PackedQuery q;
  const std::int64_t hp = (p.heads + kHeadPadding - 1) / kHeadPadding * kHeadPadding, pd = p.padded_dim;
  q.heads_padded = hp;
  q.scales.assign(static_cast<std::size_t>(p.groups * hp), 0.0f);
  q.weights.assign(static_cast<std::size_t>(hp), 0.0f);
  for (std::int64_t h = 0; h < p.heads; ++h) {
    for (std::int64_t g = 0; g < p.groups; ++g) q.scales[g * hp + h] = p.query_scales[h * p.groups + g];
    q.weights[h] = p.groups == 1 ? p.weights[h] * p.query_scales[h] : p.weights[h];
  }
  auto value = [&](std::int64_t h, std::int64_t d) { return h < p.heads ? p.query_values[h * pd + d] : 0.0f; };
  if (is_integer_format(p.format)) {
    q.i16.resize(static_cast<std::size_t>(pd * hp));
    for (std::int64_t d = 0; d < pd; ++d)
      for (std::int64_t h = 0; h < hp; ++h) q.i16[((d / 2) * hp + h) * 2 + d % 2] = static_cast<std::int16_t>(value(h, d));
  } else {
    q.f32.resize(static_cast<std::size_t>(pd * hp));
    for (std::int64_t d = 0; d < pd; ++d)
      for (std::int64_t h = 0; h < hp; ++h) q.f32[d * hp + h] = value(h, d);
  }
  return q;
}

void load_keys(const IndexerProblem& p, std::int64_t s, int count, void* buffer) {
  const std::int64_t pd = p.padded_dim;
  for (int k = 0; k < count; ++k) {
    const std::uint8_t* src = p.key_codes + (s + k) * p.row_bytes;
    float* dst = static_cast<float*>(buffer) + k * pd;
    switch (p.format) {
      case DType::fp32: std::memcpy(dst, src, static_cast<std::size_t>(pd * 4)); break;
      case DType::fp16:
        for (std::int64_t d = 0; d < pd; d += 8)
          _mm256_storeu_ps(dst + d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * d))));
        break;
      case DType::bf16:
        for (std::int64_t d = 0; d < pd; d += 8) {
          const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * d)));
          _mm256_storeu_ps(dst + d, _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)));
        }
        break;
      case DType::fp8_e4m3:
        // Sign and magnitude bits placed in an fp32, scaled by 2^(127-7): exact, subnormals included.
        for (std::int64_t d = 0; d < pd; d += 8) {
          std::int64_t eight;
          std::memcpy(&eight, src + d, 8);
          const __m256i x = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(eight));
          const __m256i magnitude = _mm256_slli_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x7F)), 20);
          const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x80)), 24);
          _mm256_storeu_ps(dst + d, _mm256_mul_ps(_mm256_castsi256_ps(_mm256_or_si256(magnitude, sign)),
                                                  _mm256_set1_ps(0x1p120f)));
        }
        break;
      case DType::fp8_e5m2:
        for (std::int64_t d = 0; d < pd; d += 8) {
          std::int64_t eight;
          std::memcpy(&eight, src + d, 8);
          const __m128i h = _mm_slli_epi16(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(eight)), 8);
          _mm256_storeu_ps(dst + d, _mm256_cvtph_ps(h));
        }
        break;
      case DType::int8: {
        std::int16_t* out = static_cast<std::int16_t*>(buffer) + k * pd;
        for (std::int64_t d = 0; d < pd; d += 16) {
          const __m256i x = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d)));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + d), x);
        }
        break;
      }
      case DType::int4: {
        std::int16_t* out = static_cast<std::int16_t*>(buffer) + k * pd;
        for (std::int64_t d = 0; d < pd; d += 2) {
          const int byte = src[d / 2];
          const int low = byte & 0x0F, high = byte >> 4;
          out[d] = static_cast<std::int16_t>(low >= 8 ? low - 16 : low);
          out[d + 1] = static_cast<std::int16_t>(high >= 8 ? high - 16 : high);
        }
        break;
      }
      default: break;
    }
  }
}

template <bool Integer, int NV>
void tile(const IndexerProblem& p, const PackedQuery& q, std::int64_t hv0, const void* keys,
          const float* key_scales, float* score) {
  const std::int64_t hp = q.heads_padded, pd = p.padded_dim;
  __m256 total[NV][kKeys];
  for (int i = 0; i < NV; ++i)
    for (int k = 0; k < kKeys; ++k) total[i][k] = _mm256_setzero_ps();
  for (int g = 0; g < p.groups; ++g) {
    const std::int64_t d0 = g * p.group_channels, d1 = std::min(d0 + p.group_channels, pd);
    __m256 dot[NV][kKeys];
    if constexpr (Integer) {
      const std::int16_t* kb = static_cast<const std::int16_t*>(keys);
      __m256i acc[NV][kKeys];
      for (int i = 0; i < NV; ++i)
        for (int k = 0; k < kKeys; ++k) acc[i][k] = _mm256_setzero_si256();
      for (std::int64_t d = d0; d < d1; d += 2) {
        __m256i qv[NV];
        for (int i = 0; i < NV; ++i)
          qv[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.i16.data() + ((d / 2) * hp + (hv0 + i) * kLanes) * 2));
        for (int k = 0; k < kKeys; ++k) {
          std::int32_t pair;
          std::memcpy(&pair, kb + k * pd + d, 4);
          const __m256i b = _mm256_set1_epi32(pair);
          for (int i = 0; i < NV; ++i) acc[i][k] = _mm256_add_epi32(acc[i][k], _mm256_madd_epi16(qv[i], b));
        }
      }
      for (int i = 0; i < NV; ++i)
        for (int k = 0; k < kKeys; ++k) dot[i][k] = _mm256_cvtepi32_ps(acc[i][k]);
    } else {
      const float* kb = static_cast<const float*>(keys);
      for (int i = 0; i < NV; ++i)
        for (int k = 0; k < kKeys; ++k) dot[i][k] = _mm256_setzero_ps();
      for (std::int64_t d = d0; d < d1; ++d) {
        __m256 qv[NV];
        for (int i = 0; i < NV; ++i) qv[i] = _mm256_loadu_ps(q.f32.data() + d * hp + (hv0 + i) * kLanes);
        for (int k = 0; k < kKeys; ++k) {
          const __m256 b = _mm256_broadcast_ss(kb + k * pd + d);
          for (int i = 0; i < NV; ++i) dot[i][k] = _mm256_fmadd_ps(qv[i], b, dot[i][k]);
        }
      }
    }
    for (int i = 0; i < NV; ++i) {
      if (p.groups == 1) {
        for (int k = 0; k < kKeys; ++k) total[i][k] = dot[i][k];
      } else {
        const __m256 sq = _mm256_loadu_ps(q.scales.data() + g * hp + (hv0 + i) * kLanes);
        for (int k = 0; k < kKeys; ++k) {
          const __m256 scaled = _mm256_mul_ps(dot[i][k], _mm256_mul_ps(sq, _mm256_set1_ps(key_scales[k * p.groups + g])));
          total[i][k] = _mm256_add_ps(total[i][k], scaled);
        }
      }
    }
  }
  for (int k = 0; k < kKeys; ++k) {
    __m256 sum = _mm256_setzero_ps();
    for (int i = 0; i < NV; ++i) {
      const __m256 w = _mm256_loadu_ps(q.weights.data() + (hv0 + i) * kLanes);
      sum = _mm256_fmadd_ps(_mm256_max_ps(total[i][k], _mm256_setzero_ps()), w, sum);
    }
    const __m128 half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
    const float s = _mm_cvtss_f32(_mm_add_ss(quarter, _mm_shuffle_ps(quarter, quarter, 1)));
    score[k] += p.groups == 1 ? s * key_scales[k] : s;
  }
}

template <bool Integer>
void score_kind(const IndexerProblem& p, std::int64_t begin, std::int64_t end, float* out) {
  const PackedQuery q = pack_query(p);
  const std::int64_t vectors = q.heads_padded / kLanes;
  std::vector<float> buffer(static_cast<std::size_t>(kKeys * p.padded_dim), 0.0f);
  std::vector<float> key_scales(static_cast<std::size_t>(kKeys * p.groups), 0.0f);
  for (std::int64_t s = begin; s < end; s += kKeys) {
    const int count = static_cast<int>(std::min<std::int64_t>(kKeys, end - s));
    if (count < kKeys) std::fill(buffer.begin(), buffer.end(), 0.0f);
    load_keys(p, s, count, buffer.data());
    std::fill(key_scales.begin(), key_scales.end(), 0.0f);
    std::copy(p.key_scales + s * p.groups, p.key_scales + (s + count) * p.groups, key_scales.begin());
    float score[kKeys] = {};
    std::int64_t hv = 0;
    for (; hv + 4 <= vectors; hv += 4) tile<Integer, 4>(p, q, hv, buffer.data(), key_scales.data(), score);
    if (vectors - hv == 2) tile<Integer, 2>(p, q, hv, buffer.data(), key_scales.data(), score);
    std::copy(score, score + count, out + (s - begin));
  }
}

}  // namespace

void score_keys_avx2(const IndexerProblem& p, std::int64_t begin, std::int64_t end, float* out) {
  if (is_integer_format(p.format)) {
    score_kind<true>(p, begin, end, out);
  } else {
    score_kind<false>(p, begin, end, out);
  }
}

}  // namespace keysel::indexer_detail
