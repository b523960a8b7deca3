// The SIMD kernel, written once over an instruction-set traits type `Isa` (private; included only by
// sparse_attention_avx2.cpp and sparse_attention_avx512.cpp, which define Isa with their own intrinsics and
// are compiled with their own -m flags). Everything here is in an anonymous namespace so that the copies
// compiled for different instruction sets never meet at link time.
//
// Isa provides: W (floats per register), kMaxChunks (registers of V per accumulator tile), type V,
// zero/set1/load/store/fmadd/mul/add/sub/max, reduce_add/reduce_max, exp (0 for arguments below -87),
// exp_scalar, load_row<DType>(row, i) (W elements from element i, widened to fp32) and
// load_row_tail<DType>(row, i, n) (n < W elements, the rest zero).
//
// Per block of kBlock keys:
//   1. scores: for each key, its K row is loaded (and converted) once per tile of up to 8 heads, and dotted with
//      each head's query; the K row kPrefetchDistance keys ahead and this key's V row are prefetched;
//   2. online softmax: per head, the block max updates the running max (rescaling sum and accumulator when it
//      grows) and the logits become weights exp(logit - max);
//   3. values: acc[h] += weight[h][j] * v[j] over a register tile of up to 4 heads x 4 registers of Dv, so each
//      V row is read from memory once and from L1 once per tile.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "sparse_attention_kernels.h"

namespace keysel::attention_kernels {
namespace {

/// How far ahead (in keys) K rows are prefetched.
constexpr std::int64_t kPrefetchDistance = 32;

/// Prefetches into L2 (locality 2: prefetcht1), which keeps the L1 miss buffers free for the demand loads and
/// lets more scattered rows be in flight at once.
inline void prefetch_row(const std::byte* row, std::int64_t bytes) {
  for (std::int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(row + offset, 0, 2);
}

template <class Isa, DType KT, int HT>
inline void score_tile(const float* q, std::int64_t dp, const std::byte* krow, std::int64_t dim, float* out) {
  using V = typename Isa::V;
  constexpr int W = Isa::W;
  V acc[HT];
  for (int i = 0; i < HT; ++i) acc[i] = Isa::zero();
  std::int64_t d = 0;
  for (; d + W <= dim; d += W) {
    const V kv = Isa::template load_row<KT>(krow, d);
    for (int i = 0; i < HT; ++i) acc[i] = Isa::fmadd(Isa::load(q + i * dp + d), kv, acc[i]);
  }
  if (d < dim) {
    const V kv = Isa::template load_row_tail<KT>(krow, d, dim - d);
    for (int i = 0; i < HT; ++i) acc[i] = Isa::fmadd(Isa::load(q + i * dp + d), kv, acc[i]);
  }
  for (int i = 0; i < HT; ++i) out[i * kBlock] = Isa::reduce_add(acc[i]);
}

template <class Isa, DType KT>
void score_block(const Problem& p, const std::byte* const* krows, std::int64_t n, float* logits) {
  for (std::int64_t j = 0; j < n; ++j) {
    std::int64_t h = 0;
    for (; h + 8 <= p.heads; h += 8) {
      score_tile<Isa, KT, 8>(p.q + h * p.dim_padded, p.dim_padded, krows[j], p.dim, logits + h * kBlock + j);
    }
    if (h + 4 <= p.heads) {
      score_tile<Isa, KT, 4>(p.q + h * p.dim_padded, p.dim_padded, krows[j], p.dim, logits + h * kBlock + j);
      h += 4;
    }
    if (h + 2 <= p.heads) {
      score_tile<Isa, KT, 2>(p.q + h * p.dim_padded, p.dim_padded, krows[j], p.dim, logits + h * kBlock + j);
      h += 2;
    }
    if (h < p.heads) {
      score_tile<Isa, KT, 1>(p.q + h * p.dim_padded, p.dim_padded, krows[j], p.dim, logits + h * kBlock + j);
    }
  }
}

/// acc[i][d0 .. d0 + CT*W) += sum_j weight[i][j] v[j][d0 ..]: CT whole registers of V (TAIL = 0), or one
/// register holding the last TAIL < W channels (CT = 1).
template <class Isa, DType VT, int HT, int CT, bool TAIL>
inline void accumulate_tile(const float* weights, const std::byte* const* vrows, std::int64_t n, std::int64_t d0,
                            std::int64_t tail, float* acc, std::int64_t dvp) {
  using V = typename Isa::V;
  constexpr int W = Isa::W;
  V a[HT][CT];
  for (int i = 0; i < HT; ++i) {
    for (int c = 0; c < CT; ++c) a[i][c] = Isa::load(acc + i * dvp + d0 + c * W);
  }
  for (std::int64_t j = 0; j < n; ++j) {
    V v[CT];
    if constexpr (TAIL) {
      v[0] = Isa::template load_row_tail<VT>(vrows[j], d0, tail);
    } else {
      for (int c = 0; c < CT; ++c) v[c] = Isa::template load_row<VT>(vrows[j], d0 + c * W);
    }
    for (int i = 0; i < HT; ++i) {
      const V w = Isa::set1(weights[i * kBlock + j]);
      for (int c = 0; c < CT; ++c) a[i][c] = Isa::fmadd(w, v[c], a[i][c]);
    }
  }
  for (int i = 0; i < HT; ++i) {
    for (int c = 0; c < CT; ++c) Isa::store(acc + i * dvp + d0 + c * W, a[i][c]);
  }
}

template <class Isa, DType VT, int HT>
void accumulate_heads(const Problem& p, const float* weights, const std::byte* const* vrows, std::int64_t n,
                      float* acc) {
  constexpr int W = Isa::W;
  const std::int64_t full = p.value_dim / W;  // whole registers of V
  const std::int64_t tail = p.value_dim - full * W;
  const std::int64_t dvp = p.value_dim_padded;
  std::int64_t c = 0;
  for (; c + Isa::kMaxChunks <= full; c += Isa::kMaxChunks) {
    accumulate_tile<Isa, VT, HT, Isa::kMaxChunks, false>(weights, vrows, n, c * W, 0, acc, dvp);
  }
  for (; c + 2 <= full; c += 2) accumulate_tile<Isa, VT, HT, 2, false>(weights, vrows, n, c * W, 0, acc, dvp);
  for (; c < full; ++c) accumulate_tile<Isa, VT, HT, 1, false>(weights, vrows, n, c * W, 0, acc, dvp);
  if (tail > 0) accumulate_tile<Isa, VT, HT, 1, true>(weights, vrows, n, full * W, tail, acc, dvp);
}

template <class Isa, DType VT>
void accumulate_block(const Problem& p, const float* logits, const std::byte* const* vrows, std::int64_t n,
                      float* acc) {
  const std::int64_t dvp = p.value_dim_padded;
  std::int64_t h = 0;
  for (; h + 4 <= p.heads; h += 4) accumulate_heads<Isa, VT, 4>(p, logits + h * kBlock, vrows, n, acc + h * dvp);
  if (h + 2 <= p.heads) {
    accumulate_heads<Isa, VT, 2>(p, logits + h * kBlock, vrows, n, acc + h * dvp);
    h += 2;
  }
  if (h < p.heads) accumulate_heads<Isa, VT, 1>(p, logits + h * kBlock, vrows, n, acc + h * dvp);
}

/// Step 2: turns the block's logits into weights relative to the updated running max.
template <class Isa>
void softmax_block(const Problem& p, std::int64_t n, const State& state) {
  using V = typename Isa::V;
  constexpr int W = Isa::W;
  static_assert(kBlock % W == 0);
  const float minus_inf = -std::numeric_limits<float>::infinity();
  for (std::int64_t h = 0; h < p.heads; ++h) {
    float* logits = state.logits + h * kBlock;
    for (std::int64_t j = n; j < kBlock; ++j) logits[j] = minus_inf;  // padding: weight exp(-inf) = 0
    V vmax = Isa::set1(minus_inf);
    for (std::int64_t j = 0; j < kBlock; j += W) vmax = Isa::max(vmax, Isa::load(logits + j));
    const float block_max = Isa::reduce_max(vmax);
    const float old_max = state.max[h];
    if (block_max > old_max) {
      // exp(-inf) = 0 wipes the (empty) state on the first block.
      const float alpha = old_max == minus_inf ? 0.0f : Isa::exp_scalar(old_max - block_max);
      state.sum[h] *= alpha;
      float* acc = state.acc + h * p.value_dim_padded;
      const V valpha = Isa::set1(alpha);
      for (std::int64_t d = 0; d < p.value_dim_padded; d += W) Isa::store(acc + d, Isa::mul(Isa::load(acc + d), valpha));
      state.max[h] = block_max;
    }
    const V vmax_now = Isa::set1(state.max[h]);
    V vsum = Isa::zero();
    for (std::int64_t j = 0; j < kBlock; j += W) {
      const V weight = Isa::exp(Isa::sub(Isa::load(logits + j), vmax_now));
      Isa::store(logits + j, weight);
      vsum = Isa::add(vsum, weight);
    }
    state.sum[h] += Isa::reduce_add(vsum);
  }
}

template <class Isa, DType KT, DType VT>
void attend_typed(const Problem& p, const std::int32_t* keys, std::int64_t count, const State& state) {
  const std::byte* krows[kBlock];
  const std::byte* vrows[kBlock];
  const std::int64_t k_bytes = p.dim * dtype_bits(KT) / 8;
  const std::int64_t v_bytes = p.value_dim * dtype_bits(VT) / 8;
  for (std::int64_t j = 0; j < std::min(count, kPrefetchDistance); ++j) {
    prefetch_row(p.k + static_cast<std::int64_t>(keys[j]) * p.k_row_bytes, k_bytes);
  }
  for (std::int64_t begin = 0; begin < count; begin += kBlock) {
    const std::int64_t n = std::min(kBlock, count - begin);
    for (std::int64_t j = 0; j < n; ++j) {
      const std::int64_t s = keys[begin + j];
      krows[j] = p.k + s * p.k_row_bytes;
      vrows[j] = p.v + s * p.v_row_bytes;
    }
    // Key by key: prefetch the K row kPrefetchDistance keys ahead and this key's V row (read in step 3, after
    // the block's scores), so that the misses of scattered rows overlap with the arithmetic.
    for (std::int64_t j = 0; j < n; ++j) {
      const std::int64_t ahead = begin + j + kPrefetchDistance;
      if (ahead < count) prefetch_row(p.k + static_cast<std::int64_t>(keys[ahead]) * p.k_row_bytes, k_bytes);
      prefetch_row(vrows[j], v_bytes);
      score_block<Isa, KT>(p, krows + j, 1, state.logits + j);
    }
    softmax_block<Isa>(p, n, state);
    accumulate_block<Isa, VT>(p, state.logits, vrows, n, state.acc);
  }
}

/// Units that share one key list (and their K/V rows): unit i attends keys[0 .. counts[i]). Block by block, each
/// unit in turn runs the steps attend_typed runs on that block (same block boundaries, same operations), so its
/// state equals attend_typed's bit for bit, while the block's K and V rows, read from memory for the first unit,
/// are still in cache for the others.
template <class Isa, DType KT, DType VT>
void attend_shared_typed(const Problem* problems, std::int64_t units, const std::int32_t* keys,
                         const std::int64_t* counts, const State* states) {
  const std::byte* krows[kBlock];
  const std::byte* vrows[kBlock];
  std::int64_t longest = 0;
  for (std::int64_t i = 0; i < units; ++i) longest = std::max(longest, counts[i]);
  for (std::int64_t begin = 0; begin < longest; begin += kBlock) {
    for (std::int64_t i = 0; i < units; ++i) {
      if (counts[i] <= begin) continue;
      const Problem& p = problems[i];
      const std::int64_t n = std::min(kBlock, counts[i] - begin);
      for (std::int64_t j = 0; j < n; ++j) {
        const std::int64_t s = keys[begin + j];
        krows[j] = p.k + s * p.k_row_bytes;
        vrows[j] = p.v + s * p.v_row_bytes;
      }
      for (std::int64_t j = 0; j < n; ++j) score_block<Isa, KT>(p, krows + j, 1, states[i].logits + j);
      softmax_block<Isa>(p, n, states[i]);
      accumulate_block<Isa, VT>(p, states[i].logits, vrows, n, states[i].acc);
    }
  }
}

template <class Isa, DType KT>
void attend_k(const Problem& p, const std::int32_t* keys, std::int64_t count, const State& state) {
  switch (p.v_dtype) {
    case DType::fp32: return attend_typed<Isa, KT, DType::fp32>(p, keys, count, state);
    case DType::bf16: return attend_typed<Isa, KT, DType::bf16>(p, keys, count, state);
    default: return attend_typed<Isa, KT, DType::fp16>(p, keys, count, state);
  }
}

template <class Isa>
void attend_simd(const Problem& p, const std::int32_t* keys, std::int64_t count, const State& state) {
  switch (p.k_dtype) {
    case DType::fp32: return attend_k<Isa, DType::fp32>(p, keys, count, state);
    case DType::bf16: return attend_k<Isa, DType::bf16>(p, keys, count, state);
    default: return attend_k<Isa, DType::fp16>(p, keys, count, state);
  }
}

template <class Isa, DType KT>
void attend_shared_k(const Problem* problems, std::int64_t units, const std::int32_t* keys, const std::int64_t* counts,
                     const State* states) {
  switch (problems[0].v_dtype) {
    case DType::fp32: return attend_shared_typed<Isa, KT, DType::fp32>(problems, units, keys, counts, states);
    case DType::bf16: return attend_shared_typed<Isa, KT, DType::bf16>(problems, units, keys, counts, states);
    default: return attend_shared_typed<Isa, KT, DType::fp16>(problems, units, keys, counts, states);
  }
}

template <class Isa>
void attend_shared_simd(const Problem* problems, std::int64_t units, const std::int32_t* keys,
                        const std::int64_t* counts, const State* states) {
  if (units <= 0) return;
  switch (problems[0].k_dtype) {
    case DType::fp32: return attend_shared_k<Isa, DType::fp32>(problems, units, keys, counts, states);
    case DType::bf16: return attend_shared_k<Isa, DType::bf16>(problems, units, keys, counts, states);
    default: return attend_shared_k<Isa, DType::fp16>(problems, units, keys, counts, states);
  }
}

}  // namespace
}  // namespace keysel::attention_kernels
