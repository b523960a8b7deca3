// Tiled tensor-core sparse attention of one sequence on a GPU: the forward of sparse_attention_prefill_cuda (o_A
// and lse of SPEC §4) and the backward sparse_attention_backward_cuda runs with deterministic = false (SPEC §9);
// see keysel/attention/cuda_sparse_attention.h.
//
// Neighbouring query rows of a real model select mostly the same keys (docs/training.md, "GPU speed"). A tile
// takes R consecutive tokens of one key head (R g = 64 query rows, g = Hq / Hkv heads per key head), the union
// of their selections, and runs the products on tensor cores (WMMA, bf16 in, fp32 accumulate) over chunks of 64
// union keys, masking the keys a row did not select. One thread block (4 warps, 16 rows each) per segment (a
// tile and a key head).
//
// Unions (build_tiled_unions): every valid selection entry becomes a 64-bit key ((segment N + key) << 6 | token
// in tile), a radix sort over the bits in use groups them, a scan numbers the distinct (segment, key) pairs, and
// each pair gets the set of the tile's tokens that selected it as a 64-bit mask. A key repeated in one row is one
// bit of that mask: it counts once.
//
// Forward: S = Q K^T over each chunk, an online softmax per row in fp32 (P rounded to bf16 before P V; the row
// sums of unrounded P), out = O / l, lse = m + log l; a row without keys gets out = 0, lse = -inf. No atomics:
// the same bits on every run.
//
// Backward: with Delta' = rowsum(dO * O) - dLse per row (delta_kernel; the lse term of SPEC §9 folded in),
//   S = Q K^T, dP = dO V^T, P = exp(scale S - lse), dS = P (dP - Delta')        (64 rows x 64 keys per chunk)
//   dQ += scale dS K (kept in registers per tile), dK += scale dS^T Q, dV += P^T dO (added to memory atomically)
// P and scale dS are rounded to bf16 before the last three products (as flash attention's backward does), and dK,
// dV are sums of atomics in an order that changes from run to run: not bitwise reproducible.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>
#include <optional>
#include <string>

#include "cuda_glue.h"
#include "cuda_sparse_attention_tiled_launch.h"

namespace keysel::cuda_kernels {
namespace {

constexpr int kRows = kTiledRows;  // query rows per tile
constexpr int kChunk = 64;         // union keys per step
constexpr int kRowBlocks = kRows / 16;  // 16-row blocks of a tile (a warp's MMA rows)
constexpr int kThreads = 128;
constexpr unsigned long long kInvalid = ~0ULL;

struct Params {
  const __nv_bfloat16 *q, *k, *v, *out, *grad_out;
  const float* lse;
  const float* grad_lse;  // null: no lse term
  const std::int32_t* selection;  // [T, groups, width]
  float *grad_q, *grad_k, *grad_v;
  long long tokens, keys;
  int query_heads, kv_heads, head_dim, value_dim, groups, width;
  float scale;
};

Params params_of(const TiledShape& s) {
  Params p{};
  p.tokens = s.tokens;
  p.keys = s.keys;
  p.query_heads = static_cast<int>(s.query_heads);
  p.kv_heads = static_cast<int>(s.kv_heads);
  p.head_dim = static_cast<int>(s.head_dim);
  p.value_dim = static_cast<int>(s.value_dim);
  p.groups = static_cast<int>(s.groups);
  p.width = static_cast<int>(s.width);
  return p;
}

/// Delta' = rowsum(dO * O) - dLse of each query row, one warp per row.
__global__ void delta_kernel(Params p, float* delta) {
  const long long row = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.tokens * p.query_heads) return;
  float sum = 0.0f;
  for (int d = lane; d < p.value_dim; d += 32)
    sum += __bfloat162float(p.grad_out[row * p.value_dim + d]) * __bfloat162float(p.out[row * p.value_dim + d]);
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) delta[row] = sum - (p.grad_lse != nullptr ? p.grad_lse[row] : 0.0f);
}

// Entry e = ((segment * R) + token in tile) * width + j, segment = tile * Hkv + key head; its sort key
// ((segment N + key) << 6) | token in tile, or kInvalid (sorted last) for padding, an entry outside [0, N) or a
// token past the sequence.
__global__ void entry_kernel(Params p, int tile_len, unsigned long long* entries, long long count) {
  const long long e = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= count) return;
  const int j = static_cast<int>(e % p.width);
  const long long rest = e / p.width;
  const int local = static_cast<int>(rest % tile_len);
  const long long segment = rest / tile_len;
  const int g = static_cast<int>(segment % p.kv_heads);
  const long long t = (segment / p.kv_heads) * tile_len + local;
  unsigned long long key = kInvalid;
  if (t < p.tokens) {
    const int group = p.groups == 1 ? 0 : g;
    const std::int32_t s = p.selection[(t * p.groups + group) * p.width + j];
    if (s >= 0 && s < p.keys)
      key = ((static_cast<unsigned long long>(segment) * static_cast<unsigned long long>(p.keys) +
              static_cast<unsigned long long>(s))
             << 6) |
            static_cast<unsigned long long>(local);
  }
  entries[e] = key;
}

/// 1 at the first sorted entry of each distinct (segment, key), 0 elsewhere.
__global__ void flag_kernel(const unsigned long long* sorted, long long count, int* flags) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const unsigned long long key = sorted[i];
  flags[i] = key != kInvalid && (i == 0 || (sorted[i - 1] >> 6) != (key >> 6)) ? 1 : 0;
}

__global__ void union_kernel(const unsigned long long* sorted, const int* positions, long long count, long long keys,
                             std::int32_t* union_key, unsigned long long* union_mask, long long* segment_begin,
                             long long* segment_end) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const unsigned long long key = sorted[i];
  if (key == kInvalid) return;
  const unsigned long long n = static_cast<unsigned long long>(keys);
  const long long u = positions[i] - 1;  // this entry's union slot
  const unsigned long long segment = (key >> 6) / n;
  union_key[u] = static_cast<std::int32_t>((key >> 6) % n);
  atomicOr(union_mask + u, 1ULL << (key & 63));
  if (i == 0 || (sorted[i - 1] >> 6) / n != segment) segment_begin[segment] = u;
  if (i + 1 == count || sorted[i + 1] == kInvalid || (sorted[i + 1] >> 6) / n != segment) segment_end[segment] = u + 1;
}

/// Row block b of a tile (query rows 16 b .. 16 b + 15) holds tokens 16 b / g .. (16 b + 15) / g of the tile: their
/// bits in a union mask.
__host__ __device__ inline unsigned long long block_tokens(int b, int gq) {
  const int lo = 16 * b / gq, hi = (16 * b + 15) / gq;
  return ((2ULL << (hi - lo)) - 1) << lo;  // hi - lo < 16
}

/// Bit b set where row block b selects a key whose union mask is `mask`.
__device__ inline unsigned row_blocks_of(unsigned long long mask, int gq) {
  unsigned bits = 0;
#pragma unroll
  for (int b = 0; b < kRowBlocks; ++b) bits |= ((mask & block_tokens(b, gq)) != 0 ? 1u : 0u) << b;
  return bits;
}

constexpr int kOrderThreads = 256;

/// The walking order of each segment's union (one block per segment): its slots grouped by the row blocks that
/// select them (row_blocks_of, ascending), in slot order (ascending key) within a group. A stable counting sort,
/// so the order, and with it the forward's bits, is the same on every run.
__global__ void __launch_bounds__(kOrderThreads) order_kernel(const unsigned long long* union_mask,
                                                              const long long* segment_begin,
                                                              const long long* segment_end, int gq,
                                                              std::int32_t* order) {
  constexpr int kGroups = 1 << kRowBlocks;
  constexpr int kWarps = kOrderThreads / 32;
  __shared__ int next[kGroups];            // the next position of each group
  __shared__ int counts[kWarps][kGroups];  // a step's entries per warp and group
  const long long begin = segment_begin[blockIdx.x], end = segment_end[blockIdx.x];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x < kGroups) next[threadIdx.x] = 0;
  __syncthreads();
  for (long long i = begin + threadIdx.x; i < end; i += kOrderThreads)
    atomicAdd(&next[row_blocks_of(union_mask[i], gq)], 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    int at = 0;
    for (int b = 0; b < kGroups; ++b) {
      const int n = next[b];
      next[b] = at;
      at += n;
    }
  }
  for (long long c0 = begin; c0 < end; c0 += kOrderThreads) {
    const long long i = c0 + threadIdx.x;
    const int group = i < end ? static_cast<int>(row_blocks_of(union_mask[i], gq)) : kGroups;
    const unsigned peers = __match_any_sync(0xffffffffu, group);
    const int rank = __popc(peers & ((1u << lane) - 1u));  // earlier lanes of this warp in the same group
    for (int j = threadIdx.x; j < kWarps * kGroups; j += kOrderThreads) counts[j / kGroups][j % kGroups] = 0;
    __syncthreads();  // also: the previous step's updates of next are done
    if (group < kGroups && rank == 0) counts[warp][group] = __popc(peers);
    __syncthreads();
    if (group < kGroups) {
      int at = next[group] + rank;
      for (int w = 0; w < warp; ++w) at += counts[w][group];
      order[begin + at] = static_cast<std::int32_t>(i);
    }
    __syncthreads();
    if (threadIdx.x < kGroups) {
      int n = 0;
      for (int w = 0; w < kWarps; ++w) n += counts[w][threadIdx.x];
      next[threadIdx.x] += n;
    }
    __syncthreads();  // counts read before the next step clears them
  }
}

/// Which query row of [T, Hq] tile row m is (token t0 + m / gq, head g gq + m % gq), or -1 past the last token.
struct TileRows {
  long long t0, tokens;
  int g, gq, query_heads;
  __device__ long long operator()(int m) const {
    const long long t = t0 + m / gq;
    return t < tokens ? t * query_heads + static_cast<long long>(g) * gq + m % gq : -1;
  }
};

__device__ inline TileRows tile_rows(const Params& p, long long segment) {
  const int gq = p.query_heads / p.kv_heads;
  return TileRows{(segment / p.kv_heads) * (kRows / gq), p.tokens, static_cast<int>(segment % p.kv_heads), gq,
                  p.query_heads};
}

/// Rows x W bf16 rows into shared memory (leading dimension ld), 16 bytes per copy, zeros where index(m) < 0; each
/// thread issues all of its loads before its stores.
template <int W, int Rows, typename Index>
__device__ void load_rows(__nv_bfloat16* dst, int ld, const __nv_bfloat16* src, Index index) {
  constexpr int kPer = Rows * (W / 8) / kThreads;
  static_assert(kPer * kThreads == Rows * (W / 8), "whole copies per thread");
  uint4 x[kPer];
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int i = threadIdx.x + j * kThreads;
    const long long r = index(i / (W / 8));
    x[j] = r >= 0 ? *reinterpret_cast<const uint4*>(src + r * W + (i % (W / 8)) * 8) : make_uint4(0, 0, 0, 0);
  }
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int i = threadIdx.x + j * kThreads;
    *reinterpret_cast<uint4*>(&dst[(i / (W / 8)) * ld + (i % (W / 8)) * 8]) = x[j];
  }
}

/// One chunk of a segment's union (positions c0.. of its order): its keys and token masks (-1 and 0 past len),
/// then their K and V rows of key head g. Starts with a barrier (the previous chunk's readers are done) and ends
/// with one.
template <int D, int DV>
__device__ void load_chunk(const Params& p, int g, const TiledUnions& unions, long long c0, int len, std::int32_t* key,
                           unsigned long long* mask, __nv_bfloat16* k, int ldk, __nv_bfloat16* v, int ldv) {
  __syncthreads();
  for (int c = threadIdx.x; c < kChunk; c += blockDim.x) {
    const std::int32_t slot = c < len ? unions.order[c0 + c] : 0;
    key[c] = c < len ? unions.union_key[slot] : -1;
    mask[c] = c < len ? unions.union_mask[slot] : 0ULL;
  }
  __syncthreads();
  const int kv_heads = p.kv_heads;
  const auto row_of = [&](int c) { return key[c] < 0 ? -1LL : static_cast<long long>(key[c]) * kv_heads + g; };
  load_rows<D, kChunk>(k, ldk, p.k, row_of);
  load_rows<DV, kChunk>(v, ldv, p.v, row_of);
  __syncthreads();
}

/// Adds a staged 16 x 16 block (keys key0.., channels 16 n..) into grad [N, Hkv, width] at key head g: four floats
/// per atomic where the GPU has vector atomics (sm_90), one otherwise.
__device__ inline void add_block(float* grad, int width, int kv_heads, int g, const std::int32_t* key, int key0,
                                 int len, int n, const float* stage, int lane) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  for (int i = lane; i < 64; i += 32) {  // 16 rows x 4 groups of 4 channels
    const int c = key0 + i / 4;
    if (c < len) {
      float4* at = reinterpret_cast<float4*>(grad + (static_cast<long long>(key[c]) * kv_heads + g) * width +
                                             n * 16 + (i % 4) * 4);
      atomicAdd(at, *reinterpret_cast<const float4*>(stage + (i / 4) * 16 + (i % 4) * 4));
    }
  }
#else
  for (int i = lane; i < 256; i += 32) {
    const int c = key0 + i / 16;
    if (c < len) atomicAdd(grad + (static_cast<long long>(key[c]) * kv_heads + g) * width + n * 16 + i % 16, stage[i]);
  }
#endif
}

using AccFragment = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
using RowFragment = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::row_major>;
using ColFragment = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::col_major>;
using KeysT = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::col_major>;
using RowsB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::row_major>;

/// The 16 x 16 blocks (row block b, this warp's 16 keys) for every row block b in `blocks`: out (leading dimension
/// ldo, the block's first element at out + 16 b ldo) = a[16 b.., K] keys[16, K]^T, bf16 in shared memory, fp32
/// out. The keys' fragments are loaded once for all row blocks.
template <int K>
__device__ void blocks_times_keys(unsigned blocks, const __nv_bfloat16* a, int lda, const __nv_bfloat16* keys, int ldk,
                                  float* out, int ldo) {
  using namespace nvcuda;
  KeysT kf[K / 16];
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) wmma::load_matrix_sync(kf[kk], keys + kk * 16, ldk);
#pragma unroll
  for (int b = 0; b < kRowBlocks; ++b) {
    if (((blocks >> b) & 1u) == 0) continue;
    AccFragment acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
      RowFragment fa;
      wmma::load_matrix_sync(fa, a + (b * 16) * lda + kk * 16, lda);
      wmma::mma_sync(acc, fa, kf[kk], acc);
    }
    wmma::store_matrix_sync(out + (b * 16) * ldo, acc, ldo, wmma::mem_row_major);
  }
}

/// This warp's 16 keys (key0..): grad rows += weights^T rows over the row blocks in `blocks`, with weights the
/// 16 x 16 blocks at weights + 16 b ldw (a row's weight per key, bf16) and rows [kRows][W] (ldr) bf16 in shared
/// memory; each 16 x 16 result staged and added (add_block).
template <int W>
__device__ void add_keys_product(unsigned blocks, const __nv_bfloat16* weights, int ldw, const __nv_bfloat16* rows,
                                 int ldr, float* grad, int kv_heads, int g, const std::int32_t* key, int key0, int len,
                                 float* stage, int lane) {
  using namespace nvcuda;
  ColFragment wf[kRowBlocks];  // weights^T: (key, row)
#pragma unroll
  for (int b = 0; b < kRowBlocks; ++b)
    if (((blocks >> b) & 1u) != 0) wmma::load_matrix_sync(wf[b], weights + (b * 16) * ldw, ldw);
  for (int n = 0; n < W / 16; ++n) {
    AccFragment acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int b = 0; b < kRowBlocks; ++b) {
      if (((blocks >> b) & 1u) == 0) continue;
      RowsB fb;  // rows: (row, channel)
      wmma::load_matrix_sync(fb, rows + (b * 16) * ldr + n * 16, ldr);
      wmma::mma_sync(acc, wf[b], fb, acc);
    }
    wmma::store_matrix_sync(stage, acc, 16, wmma::mem_row_major);
    __syncwarp();
    add_block(grad, W, kv_heads, g, key, key0, len, n, stage, lane);
    __syncwarp();
  }
}

/// Shared memory of the backward. P and scale dS (bf16) take the first half of their 16 x 16 blocks of S and dP
/// (fp32): the block (row block b, keys 16 w..) of P starts at bf16 element 16 b kLdP + 32 w of s, leading
/// dimension kLdP = 2 kLdS. 110 KB at D = Dv = 128: two blocks per SM on sm_80 and sm_90.
template <int D, int DV>
struct Smem {
  static constexpr int kLdQ = D + 8, kLdV = DV + 8, kLdS = kChunk + 4, kLdP = 2 * kLdS;
  __nv_bfloat16 q[kRows * kLdQ];
  __nv_bfloat16 go[kRows * kLdV];
  __nv_bfloat16 k[kChunk * kLdQ];
  __nv_bfloat16 v[kChunk * kLdV];
  float s[kRows * kLdS];
  float dp[kRows * kLdS];
  float stage[kThreads / 32][16 * 16];
  unsigned long long mask[kChunk];
  std::int32_t key[kChunk];
  float lse[kRows];
  float delta[kRows];
  unsigned blocks[kChunk / 16];  // per 16 keys: bit b where row block b selects one of them
};

// Work split of a chunk: warp w takes keys 16 w .. 16 w + 15 for S, dP, P, dS, dK and dV (over the row blocks that
// select any of them), and channels (D / 4) w .. of dQ for all 64 rows; so the warps share the work evenly however
// few row blocks a chunk concerns.
template <int D, int DV>
__global__ void __launch_bounds__(kThreads, 2) tile_kernel(Params p, const float* delta, TiledUnions unions) {
  using namespace nvcuda;
  using S = Smem<D, DV>;
  constexpr int kQBlocks = D / 16 / (kThreads / 32);  // dQ column blocks per warp
  extern __shared__ __align__(128) unsigned char raw[];
  S& sm = *reinterpret_cast<S*>(raw);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const long long segment = blockIdx.x;
  const TileRows row_index = tile_rows(p, segment);
  const int g = row_index.g, gq = row_index.gq;
  load_rows<D, kRows>(sm.q, S::kLdQ, p.q, row_index);
  load_rows<DV, kRows>(sm.go, S::kLdV, p.grad_out, row_index);
  for (int m = threadIdx.x; m < kRows; m += kThreads) {
    const long long r = row_index(m);
    sm.lse[m] = r >= 0 ? p.lse[r] : -INFINITY;
    sm.delta[m] = r >= 0 ? delta[r] : 0.0f;
  }
  __nv_bfloat16* const pb = reinterpret_cast<__nv_bfloat16*>(sm.s);
  __nv_bfloat16* const dsb = reinterpret_cast<__nv_bfloat16*>(sm.dp);

  AccFragment dq[kRowBlocks][kQBlocks];
#pragma unroll
  for (int b = 0; b < kRowBlocks; ++b)
#pragma unroll
    for (int j = 0; j < kQBlocks; ++j) wmma::fill_fragment(dq[b][j], 0.0f);

  const long long begin = unions.segment_begin[segment], end = unions.segment_end[segment];
  const int key0 = warp * 16;
  for (long long c0 = begin; c0 < end; c0 += kChunk) {
    const int len = end - c0 < kChunk ? static_cast<int>(end - c0) : kChunk;
    load_chunk<D, DV>(p, g, unions, c0, len, sm.key, sm.mask, sm.k, S::kLdQ, sm.v, S::kLdV);
    unsigned blocks = lane < 16 && key0 + lane < len ? row_blocks_of(sm.mask[key0 + lane], gq) : 0u;
    blocks = __reduce_or_sync(0xffffffffu, blocks);
    if (lane == 0) sm.blocks[warp] = blocks;

    // S and dP of this warp's keys
    blocks_times_keys<D>(blocks, sm.q, S::kLdQ, &sm.k[key0 * S::kLdQ], S::kLdQ, &sm.s[key0], S::kLdS);
    blocks_times_keys<DV>(blocks, sm.go, S::kLdV, &sm.v[key0 * S::kLdV], S::kLdV, &sm.dp[key0], S::kLdS);
    __syncwarp();
    // P and scale dS (zero where the row's token did not select the key), over S and dP in place: two rows per
    // step, all of a step's reads before its writes
#pragma unroll
    for (int b = 0; b < kRowBlocks; ++b) {
      if (((blocks >> b) & 1u) == 0) continue;
      for (int i = lane; i < 256; i += 32) {
        const int m = b * 16 + i / 16, c = key0 + i % 16;
        const bool selected = c < len && ((sm.mask[c] >> (m / gq)) & 1ULL) != 0 && sm.lse[m] != -INFINITY;
        const float prob = selected ? __expf(sm.s[m * S::kLdS + c] * p.scale - sm.lse[m]) : 0.0f;
        const float ds = prob * (sm.dp[m * S::kLdS + c] - sm.delta[m]) * p.scale;
        __syncwarp();
        pb[m * S::kLdP + 2 * key0 + i % 16] = __float2bfloat16(prob);
        dsb[m * S::kLdP + 2 * key0 + i % 16] = __float2bfloat16(ds);
      }
    }
    __syncwarp();
    // dK = (scale dS)^T Q and dV = P^T dO of this warp's keys, each 16 x 16 block staged and added atomically
    if (blocks != 0) {
      add_keys_product<D>(blocks, dsb + 2 * key0, S::kLdP, sm.q, S::kLdQ, p.grad_k, p.kv_heads, g, sm.key, key0, len,
                          sm.stage[warp], lane);
      add_keys_product<DV>(blocks, pb + 2 * key0, S::kLdP, sm.go, S::kLdV, p.grad_v, p.kv_heads, g, sm.key, key0, len,
                           sm.stage[warp], lane);
    }
    __syncthreads();  // every warp's dS and blocks before dQ

    // dQ (all rows, this warp's channels) += (scale dS) K over the (row block, key block) pairs that select keys
#pragma unroll
    for (int kb = 0; kb < kChunk / 16; ++kb) {
      const unsigned kb_blocks = sm.blocks[kb];
      if (kb_blocks == 0) continue;
      RowsB kf[kQBlocks];  // K rows 16 kb.., this warp's columns
#pragma unroll
      for (int j = 0; j < kQBlocks; ++j)
        wmma::load_matrix_sync(kf[j], &sm.k[(kb * 16) * S::kLdQ + (warp * kQBlocks + j) * 16], S::kLdQ);
#pragma unroll
      for (int b = 0; b < kRowBlocks; ++b) {
        if (((kb_blocks >> b) & 1u) == 0) continue;
        RowFragment a;
        wmma::load_matrix_sync(a, dsb + (b * 16) * S::kLdP + 32 * kb, S::kLdP);
#pragma unroll
        for (int j = 0; j < kQBlocks; ++j) wmma::mma_sync(dq[b][j], a, kf[j], dq[b][j]);
      }
    }
  }
  // dQ of this warp's channels (each row belongs to this tile alone)
  float* stage = sm.stage[warp];
#pragma unroll
  for (int b = 0; b < kRowBlocks; ++b) {
#pragma unroll
    for (int j = 0; j < kQBlocks; ++j) {
      wmma::store_matrix_sync(stage, dq[b][j], 16, wmma::mem_row_major);
      __syncwarp();
      const int n = warp * kQBlocks + j;
      for (int i = lane; i < 256; i += 32) {
        const long long r = row_index(b * 16 + i / 16);
        if (r >= 0) p.grad_q[r * D + n * 16 + i % 16] = stage[i];
      }
      __syncwarp();
    }
  }
}

/// Shared memory of the forward. P (bf16) takes the first half of its 16 x 16 blocks of S, as in the backward.
/// m holds the running row maxima of the chunk before and of this chunk (by the chunk's parity).
template <int D, int DV>
struct ForwardSmem {
  static constexpr int kLdQ = D + 8, kLdV = DV + 8, kLdS = kChunk + 4, kLdP = 2 * kLdS, kLdO = DV + 4;
  __nv_bfloat16 q[kRows * kLdQ];
  __nv_bfloat16 k[kChunk * kLdQ];
  __nv_bfloat16 v[kChunk * kLdV];
  float s[kRows * kLdS];
  float o[kRows * kLdO];
  unsigned long long mask[kChunk];
  std::int32_t key[kChunk];
  float part_max[kThreads / 32][kRows];  // per warp (16 keys) and row
  float part_sum[kThreads / 32][kRows];
  float m[2][kRows];
  float l[kRows];
  unsigned blocks[kChunk / 16];
};

/// out = softmax(scale q K^T) V over each row's selected keys (online softmax over the chunks, P rounded to bf16
/// before P V), lse = log sum exp (-inf and out = 0 for a row without keys); out bf16 or fp32, lse_out optional.
/// Work split of a chunk as in the backward: warp w takes keys 16 w.. for S and P (over the row blocks that select
/// any of them), and channels (Dv / 4) w.. of O for all rows; each row's maximum and sum are combined over the
/// warps in a fixed order.
template <int D, int DV>
__global__ void __launch_bounds__(kThreads, 2) forward_tile_kernel(Params p, void* out, bool out_bf16, float* lse_out,
                                                                    TiledUnions unions) {
  using namespace nvcuda;
  using S = ForwardSmem<D, DV>;
  constexpr int kWarps = kThreads / 32;
  constexpr int kOBlocks = DV / 16 / kWarps;  // O column blocks per warp
  extern __shared__ __align__(128) unsigned char raw[];
  S& sm = *reinterpret_cast<S*>(raw);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const long long segment = blockIdx.x;
  const TileRows row_index = tile_rows(p, segment);
  const int g = row_index.g, gq = row_index.gq;
  __nv_bfloat16* const pb = reinterpret_cast<__nv_bfloat16*>(sm.s);
  load_rows<D, kRows>(sm.q, S::kLdQ, p.q, row_index);
  for (int i = threadIdx.x; i < kRows * S::kLdO; i += kThreads) sm.o[i] = 0.0f;
  for (int m = threadIdx.x; m < kRows; m += kThreads) {
    sm.m[0][m] = -INFINITY;
    sm.l[m] = 0.0f;
  }
  const long long begin = unions.segment_begin[segment], end = unions.segment_end[segment];
  const int key0 = warp * 16;
  int parity = 0;
  for (long long c0 = begin; c0 < end; c0 += kChunk, parity ^= 1) {
    const int len = end - c0 < kChunk ? static_cast<int>(end - c0) : kChunk;
    load_chunk<D, DV>(p, g, unions, c0, len, sm.key, sm.mask, sm.k, S::kLdQ, sm.v, S::kLdV);
    unsigned blocks = lane < 16 && key0 + lane < len ? row_blocks_of(sm.mask[key0 + lane], gq) : 0u;
    blocks = __reduce_or_sync(0xffffffffu, blocks);
    if (lane == 0) sm.blocks[warp] = blocks;
    blocks_times_keys<D>(blocks, sm.q, S::kLdQ, &sm.k[key0 * S::kLdQ], S::kLdQ, &sm.s[key0], S::kLdS);
    __syncwarp();
    // each row's maximum over this warp's keys (two lanes per row, 8 keys each)
    const int half = lane / 16;
#pragma unroll
    for (int b = 0; b < kRowBlocks; ++b) {
      const int m = b * 16 + lane % 16;
      float mx = -INFINITY;
      if (((blocks >> b) & 1u) != 0) {
        const unsigned token_bit = static_cast<unsigned>(m / gq);
        for (int j = 0; j < 8; ++j) {
          const int c = key0 + half * 8 + j;
          if (c < len && ((sm.mask[c] >> token_bit) & 1ULL) != 0) mx = fmaxf(mx, sm.s[m * S::kLdS + c] * p.scale);
        }
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
      if (half == 0) sm.part_max[warp][m] = mx;
    }
    __syncthreads();  // every warp's maxima
    // P of this warp's blocks against the new maxima, in place over S, and its row sums
    const float* m_old = sm.m[parity];
    float* m_new = sm.m[parity ^ 1];
#pragma unroll
    for (int b = 0; b < kRowBlocks; ++b) {
      const int m = b * 16 + lane % 16;
      float mx = m_old[m];
#pragma unroll
      for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sm.part_max[w][m]);
      if (warp == 0 && half == 0) m_new[m] = mx;
      float sum = 0.0f;
      if (((blocks >> b) & 1u) != 0) {
        const unsigned token_bit = static_cast<unsigned>(m / gq);
        float pr[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int c = key0 + half * 8 + j;
          const bool selected = c < len && ((sm.mask[c] >> token_bit) & 1ULL) != 0;
          pr[j] = selected ? __expf(sm.s[m * S::kLdS + c] * p.scale - mx) : 0.0f;
          sum += pr[j];
        }
        __syncwarp();  // the block's S read by every lane before P overwrites it
#pragma unroll
        for (int j = 0; j < 8; ++j) pb[m * S::kLdP + 2 * key0 + half * 8 + j] = __float2bfloat16(pr[j]);
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 16);
      if (half == 0) sm.part_sum[warp][m] = sum;
    }
    __syncthreads();  // every warp's P, sums and blocks
    // O (this warp's channels) = O exp(m_old - m_new) + P V over the (row block, key block) pairs with keys
    unsigned any_blocks = 0;
#pragma unroll
    for (int kb = 0; kb < kChunk / 16; ++kb) any_blocks |= sm.blocks[kb];
    for (int i = lane; i < kRows * (DV / kWarps); i += 32) {
      const int m = i / (DV / kWarps), c = warp * (DV / kWarps) + i % (DV / kWarps);
      if (((any_blocks >> (m / 16)) & 1u) == 0) continue;
      const float factor = m_old[m] == -INFINITY ? 0.0f : __expf(m_old[m] - m_new[m]);
      sm.o[m * S::kLdO + c] *= factor;
    }
    if (warp == 0) {
      for (int m = lane; m < kRows; m += 32) {
        if (((any_blocks >> (m / 16)) & 1u) == 0) continue;  // m_new = m_old, l stays
        const float factor = m_old[m] == -INFINITY ? 0.0f : __expf(m_old[m] - m_new[m]);
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) sum += sm.part_sum[w][m];
        sm.l[m] = sm.l[m] * factor + sum;
      }
    }
    __syncwarp();
#pragma unroll
    for (int b = 0; b < kRowBlocks; ++b) {
      if (((any_blocks >> b) & 1u) == 0) continue;
#pragma unroll
      for (int j = 0; j < kOBlocks; ++j) {
        const int n = warp * kOBlocks + j;
        AccFragment acc;
        wmma::load_matrix_sync(acc, &sm.o[(b * 16) * S::kLdO + n * 16], S::kLdO, wmma::mem_row_major);
#pragma unroll
        for (int kb = 0; kb < kChunk / 16; ++kb) {
          if (((sm.blocks[kb] >> b) & 1u) == 0) continue;
          RowFragment a;
          wmma::load_matrix_sync(a, pb + (b * 16) * S::kLdP + 32 * kb, S::kLdP);
          RowsB vb;  // V: (key, channel)
          wmma::load_matrix_sync(vb, &sm.v[(kb * 16) * S::kLdV + n * 16], S::kLdV);
          wmma::mma_sync(acc, a, vb, acc);
        }
        wmma::store_matrix_sync(&sm.o[(b * 16) * S::kLdO + n * 16], acc, S::kLdO, wmma::mem_row_major);
      }
    }
  }
  __syncthreads();
  const float* m_final = sm.m[parity];
  for (int i = threadIdx.x; i < kRows * DV; i += kThreads) {
    const int m = i / DV, c = i % DV;
    const long long r = row_index(m);
    if (r < 0) continue;
    const float l = sm.l[m];
    const float value = l > 0.0f ? sm.o[m * S::kLdO + c] / l : 0.0f;
    if (out_bf16) {
      static_cast<__nv_bfloat16*>(out)[r * DV + c] = __float2bfloat16(value);
    } else {
      static_cast<float*>(out)[r * DV + c] = value;
    }
  }
  if (lse_out == nullptr) return;
  for (int m = threadIdx.x; m < kRows; m += kThreads) {
    const long long r = row_index(m);
    if (r >= 0) lse_out[r] = sm.l[m] > 0.0f ? m_final[m] + __logf(sm.l[m]) : -INFINITY;
  }
}

std::size_t aligned(std::size_t bytes) { return (bytes + 255) / 256 * 256; }

/// The union build's memory: two sort buffers of 8 bytes per entry (after the sort, the one not holding the sorted
/// keys holds the scan's flags and positions), the union keys and masks, the segment bounds, CUB's storage.
struct UnionLayout {
  long long entries = 0, segments = 0;
  int end_bit = 0;  // the sort keys' bits in use
  std::size_t buffer = 0, keys = 0, masks = 0, bounds = 0, sort = 0, scan = 0;
  std::size_t total() const { return 2 * buffer + keys + masks + 2 * bounds + aligned(sort) + aligned(scan); }
};

UnionLayout union_layout(std::string_view function, const TiledShape& shape) {
  UnionLayout l;
  l.entries = tiled_entry_count(shape);
  l.segments = tiled_segments(shape);
  // (segment N + key) < segments N (at most 2^57, tiled_refusal): bit_width(segments N) bits of it are in use, so
  // a valid key is never all ones over the sorted bits (it stays below kInvalid there).
  l.end_bit = 6 + static_cast<int>(std::bit_width(static_cast<unsigned long long>(l.segments) *
                                                  static_cast<unsigned long long>(shape.keys)));
  l.buffer = aligned(static_cast<std::size_t>(l.entries) * 8);
  l.keys = aligned(static_cast<std::size_t>(l.entries) * 4);
  l.masks = aligned(static_cast<std::size_t>(l.entries) * 8);
  l.bounds = aligned(static_cast<std::size_t>(l.segments) * 8);
  if (l.entries > 0) {
    cub::DoubleBuffer<unsigned long long> buffers(nullptr, nullptr);
    cuda_glue::check(cub::DeviceRadixSort::SortKeys(nullptr, l.sort, buffers, l.entries, 0, l.end_bit), function,
                     "cub::DeviceRadixSort::SortKeys (size)");
    cuda_glue::check(cub::DeviceScan::InclusiveSum(nullptr, l.scan, static_cast<const int*>(nullptr),
                                                   static_cast<int*>(nullptr), static_cast<int>(l.entries)),
                     function, "cub::DeviceScan::InclusiveSum (size)");
  }
  return l;
}

unsigned blocks_of(long long items, int per_block) {
  return static_cast<unsigned>((items + per_block - 1) / per_block);
}

/// Calls f.template operator()<D, DV>() for the head dims the tiled kernels take (tiled_refusal has checked them).
template <typename F>
void with_dims(int d, int dv, F&& f) {
  if (d == 128 && dv == 128) {
    f.template operator()<128, 128>();
  } else if (d == 64 && dv == 64) {
    f.template operator()<64, 64>();
  } else if (d == 128 && dv == 64) {
    f.template operator()<128, 64>();
  } else {
    f.template operator()<64, 128>();
  }
}

/// Lets `kernel` take `smem` bytes of dynamic shared memory, with the SM's carveout at its most shared memory
/// (two blocks of the backward per SM).
template <typename Kernel>
void allow_shared(std::string_view function, Kernel kernel, int smem, const char* name) {
  cuda_glue::check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), function, name);
  cuda_glue::check(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                        cudaSharedmemCarveoutMaxShared),
                   function, name);
}

std::size_t shared_bytes(int head_dim, int value_dim, bool backward) {
  std::size_t bytes = 0;
  with_dims(head_dim, value_dim,
            [&]<int D, int DV>() { bytes = backward ? sizeof(Smem<D, DV>) : sizeof(ForwardSmem<D, DV>); });
  return bytes;
}

}  // namespace

std::optional<TiledRefusal> tiled_refusal(const TiledShape& s, int shared_memory_optin, bool backward) {
  const auto refuse = [](const char* argument, std::string expected, std::string got) {
    return std::optional<TiledRefusal>(TiledRefusal{argument, std::move(expected), std::move(got)});
  };
  if (s.head_dim != 64 && s.head_dim != 128) {
    return refuse("q", "head dim D of 64 or 128 (the tiled kernels)", "D = " + std::to_string(s.head_dim));
  }
  if (s.value_dim != 64 && s.value_dim != 128) {
    return refuse("v", "value dim Dv of 64 or 128 (the tiled kernels)", "Dv = " + std::to_string(s.value_dim));
  }
  if (s.kv_heads < 1 || s.query_heads % s.kv_heads != 0 || kTiledRows % (s.query_heads / s.kv_heads) != 0) {
    return refuse("q", "Hq / Hkv dividing 64 (the tiled kernels' 64-row tiles)",
                  "Hq = " + std::to_string(s.query_heads) + ", Hkv = " + std::to_string(s.kv_heads));
  }
  if (s.groups != 1 && s.groups != s.kv_heads) {
    return refuse("granularity", "per_kv_head or per_token (per_head only where Hq == Hkv)",
                  "a selection row per query head with Hq = " + std::to_string(s.query_heads) +
                      ", Hkv = " + std::to_string(s.kv_heads));
  }
  // The scan counts entries in int, the sort keys hold (segment N + key) << 6, the grids count segments and rows.
  constexpr std::int64_t kIntMax = 0x7fffffff;
  const bool fits = s.tokens >= 0 && s.tokens <= kIntMax && s.keys >= 1 && s.keys <= kIntMax && s.width >= 0 &&
                    s.width <= kIntMax && s.query_heads <= kIntMax &&
                    (s.width == 0 || tiled_segments(s) * tiled_tile_tokens(s) <= kIntMax / s.width) &&
                    tiled_entry_count(s) <= kIntMax && tiled_segments(s) <= kIntMax &&
                    tiled_segments(s) <= (std::int64_t{1} << 57) / s.keys &&
                    s.tokens * s.query_heads / 4 < kIntMax;
  if (!fits) {
    return refuse("selection",
                  "fewer than 2^31 selection entries in tiles (ceil(T / (64 / g)) * Hkv * (64 / g) * W) and "
                  "(tiles * Hkv) * N below 2^57",
                  "T = " + std::to_string(s.tokens) + ", Hkv = " + std::to_string(s.kv_heads) +
                      ", W = " + std::to_string(s.width) + ", N = " + std::to_string(s.keys));
  }
  const std::size_t needed = shared_bytes(static_cast<int>(s.head_dim), static_cast<int>(s.value_dim), backward);
  if (shared_memory_optin < 0 || needed > static_cast<std::size_t>(shared_memory_optin)) {
    return refuse("q",
                  "a GPU with " + std::to_string(needed) + " bytes of shared memory per block (the tiled " +
                      (backward ? "backward" : "forward") + " at D = " + std::to_string(s.head_dim) +
                      ", Dv = " + std::to_string(s.value_dim) + ")",
                  "a GPU with " + std::to_string(shared_memory_optin));
  }
  return std::nullopt;
}

std::size_t tiled_union_bytes(std::string_view function, const TiledShape& shape) {
  return union_layout(function, shape).total();
}

TiledUnions build_tiled_unions(std::string_view function, const TiledShape& shape, const std::int32_t* selection,
                               void* memory, void* stream) {
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  const UnionLayout l = union_layout(function, shape);
  char* at = static_cast<char*>(memory);
  auto take = [&](std::size_t bytes) {
    char* here = at;
    at += aligned(bytes);
    return here;
  };
  unsigned long long* first = reinterpret_cast<unsigned long long*>(take(l.buffer));
  unsigned long long* second = reinterpret_cast<unsigned long long*>(take(l.buffer));
  std::int32_t* union_key = reinterpret_cast<std::int32_t*>(take(l.keys));
  unsigned long long* union_mask = reinterpret_cast<unsigned long long*>(take(l.masks));
  long long* segment_begin = reinterpret_cast<long long*>(take(l.bounds));
  long long* segment_end = reinterpret_cast<long long*>(take(l.bounds));
  void* sort_storage = take(l.sort);
  void* scan_storage = take(l.scan);
  TiledUnions unions{union_key, union_mask, nullptr, segment_begin, segment_end};
  if (l.segments == 0) return unions;
  // A segment without a valid entry keeps begin = end = 0.
  cuda_glue::check(cudaMemsetAsync(segment_begin, 0, 2 * l.bounds, cuda_stream), function, "cudaMemsetAsync");
  if (l.entries == 0) return unions;
  cuda_glue::check(cudaMemsetAsync(union_mask, 0, static_cast<std::size_t>(l.entries) * 8, cuda_stream), function,
                   "cudaMemsetAsync");
  Params p = params_of(shape);
  p.selection = selection;
  const unsigned blocks = blocks_of(l.entries, 256);
  entry_kernel<<<blocks, 256, 0, cuda_stream>>>(p, static_cast<int>(tiled_tile_tokens(shape)), first, l.entries);
  cuda_glue::check(cudaGetLastError(), function, "entry_kernel launch");
  cub::DoubleBuffer<unsigned long long> buffers(first, second);
  std::size_t sort_bytes = l.sort, scan_bytes = l.scan;
  cuda_glue::check(cub::DeviceRadixSort::SortKeys(sort_storage, sort_bytes, buffers, l.entries, 0, l.end_bit,
                                                  cuda_stream),
                   function, "cub::DeviceRadixSort::SortKeys");
  const unsigned long long* sorted = buffers.Current();
  int* flags = reinterpret_cast<int*>(buffers.Alternate());  // the other buffer: 8 bytes per entry, free now
  int* positions = flags + l.entries;
  flag_kernel<<<blocks, 256, 0, cuda_stream>>>(sorted, l.entries, flags);
  cuda_glue::check(cudaGetLastError(), function, "flag_kernel launch");
  cuda_glue::check(cub::DeviceScan::InclusiveSum(scan_storage, scan_bytes, flags, positions,
                                                 static_cast<int>(l.entries), cuda_stream),
                   function, "cub::DeviceScan::InclusiveSum");
  union_kernel<<<blocks, 256, 0, cuda_stream>>>(sorted, positions, l.entries, shape.keys, union_key, union_mask,
                                                segment_begin, segment_end);
  cuda_glue::check(cudaGetLastError(), function, "union_kernel launch");
  // The walking order, in the first sort buffer (4 bytes per union slot; no slot is more than an entry): both sort
  // buffers are free once union_kernel is done.
  std::int32_t* order = reinterpret_cast<std::int32_t*>(first);
  order_kernel<<<static_cast<unsigned>(l.segments), kOrderThreads, 0, cuda_stream>>>(
      union_mask, segment_begin, segment_end, static_cast<int>(shape.query_heads / shape.kv_heads), order);
  cuda_glue::check(cudaGetLastError(), function, "order_kernel launch");
  unions.order = order;
  return unions;
}

void launch_sparse_attention_tiled_forward(std::string_view function, const TiledForwardLaunch& in, void* stream,
                                           const TiledUnions* unions) {
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  const long long segments = tiled_segments(in.shape);
  if (segments == 0) return;  // no tokens
  std::optional<cuda_glue::Scratch> scratch;
  TiledUnions built;
  if (unions == nullptr) {
    scratch.emplace(function, tiled_union_bytes(function, in.shape), in.device, stream);
    built = build_tiled_unions(function, in.shape, in.selection, scratch->as<void>(), stream);
    unions = &built;
  }
  Params p = params_of(in.shape);
  p.q = static_cast<const __nv_bfloat16*>(in.q);
  p.k = static_cast<const __nv_bfloat16*>(in.k);
  p.v = static_cast<const __nv_bfloat16*>(in.v);
  p.selection = in.selection;
  p.scale = in.scale;
  with_dims(p.head_dim, p.value_dim, [&]<int D, int DV>() {
    const int smem = static_cast<int>(sizeof(ForwardSmem<D, DV>));
    allow_shared(function, forward_tile_kernel<D, DV>, smem, "cudaFuncSetAttribute (forward_tile_kernel)");
    forward_tile_kernel<D, DV><<<static_cast<unsigned>(segments), kThreads, smem, cuda_stream>>>(
        p, in.out, in.out_bf16, in.lse, *unions);
    cuda_glue::check(cudaGetLastError(), function, "forward_tile_kernel launch");
  });
  if (scratch) scratch->release();
}

void launch_sparse_attention_tiled_backward(std::string_view function, const TiledBackwardLaunch& in, void* stream,
                                            const TiledUnions* unions) {
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  const TiledShape& shape = in.shape;
  const std::size_t key_rows = static_cast<std::size_t>(shape.keys) * static_cast<std::size_t>(shape.kv_heads);
  cuda_glue::check(cudaMemsetAsync(in.grad_k, 0, key_rows * static_cast<std::size_t>(shape.head_dim) * 4, cuda_stream),
                   function, "cudaMemsetAsync");
  cuda_glue::check(cudaMemsetAsync(in.grad_v, 0, key_rows * static_cast<std::size_t>(shape.value_dim) * 4,
                                   cuda_stream),
                   function, "cudaMemsetAsync");
  const long long segments = tiled_segments(shape);
  if (segments == 0) return;  // no tokens: dK = dV = 0
  const long long rows = shape.tokens * shape.query_heads;
  const std::size_t delta_bytes = aligned(static_cast<std::size_t>(rows) * sizeof(float));
  const std::size_t union_bytes = unions == nullptr ? tiled_union_bytes(function, shape) : 0;
  cuda_glue::Scratch scratch(function, delta_bytes + union_bytes, in.device, stream);
  float* delta = scratch.as<float>();
  TiledUnions built;
  if (unions == nullptr) {
    built = build_tiled_unions(function, shape, in.selection, scratch.as<char>() + delta_bytes, stream);
    unions = &built;
  }
  Params p = params_of(shape);
  p.q = static_cast<const __nv_bfloat16*>(in.q);
  p.k = static_cast<const __nv_bfloat16*>(in.k);
  p.v = static_cast<const __nv_bfloat16*>(in.v);
  p.out = static_cast<const __nv_bfloat16*>(in.out);
  p.grad_out = static_cast<const __nv_bfloat16*>(in.grad_out);
  p.lse = in.lse;
  p.grad_lse = in.grad_lse;
  p.selection = in.selection;
  p.grad_q = in.grad_q;
  p.grad_k = in.grad_k;
  p.grad_v = in.grad_v;
  p.scale = in.scale;
  delta_kernel<<<blocks_of(rows, kThreads / 32), kThreads, 0, cuda_stream>>>(p, delta);
  cuda_glue::check(cudaGetLastError(), function, "delta_kernel launch");
  with_dims(p.head_dim, p.value_dim, [&]<int D, int DV>() {
    const int smem = static_cast<int>(sizeof(Smem<D, DV>));
    allow_shared(function, tile_kernel<D, DV>, smem, "cudaFuncSetAttribute (tile_kernel)");
    tile_kernel<D, DV><<<static_cast<unsigned>(segments), kThreads, smem, cuda_stream>>>(p, delta, *unions);
    cuda_glue::check(cudaGetLastError(), function, "tile_kernel launch");
  });
  scratch.release();
}

}  // namespace keysel::cuda_kernels
