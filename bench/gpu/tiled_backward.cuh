// A tiled tensor-core prototype of the sparse attention backward (SPEC §9), for bench/gpu/backward_profile.cu
// only: it is not part of the library until it has been measured and checked on a GPU.
//
// The library's CUDA backward gives each selection entry to a warp and gathers its key and value rows one at a
// time. Neighbouring query rows of a real model select mostly the same keys (docs/training.md, "GPU speed"), so
// this version takes a tile of R consecutive tokens of one key head (R Gq = 64 query rows, Gq = Hq / Hkv), the
// union of their selections, and runs the five products of the backward on tensor cores (WMMA, bf16 in, fp32
// accumulate) over chunks of 64 union keys, masking the keys a row did not select:
//   S = Q K^T, dP = dO V^T, P = exp(scale S - lse), dS = P (dP - Delta)       (64 rows x 64 keys)
//   dQ += scale dS K (kept in registers per tile), dK += scale dS^T Q, dV += P^T dO (added to memory atomically)
// P and dS are rounded to bf16 before the last three products (as flash attention's backward does), and dK, dV
// are summed with atomics, so the result is not bitwise reproducible: the library's kernel stays the
// deterministic one.
//
// forward_tile_kernel is the matching forward over the same unions (online softmax over the chunks).
//
// Union per (tile, key head): every valid entry becomes a 64-bit key (segment, key, token in tile), a radix sort
// groups them, a scan numbers the distinct (segment, key) pairs, and each pair gets the set of the tile's tokens
// that selected it as a 64-bit mask. Supports per_kv_head and per_token selections, bf16, D and Dv in {64, 128},
// Gq dividing 64.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

namespace tiled_backward {

constexpr int kRows = 64;   // query rows per tile (R tokens x Gq heads)
constexpr int kChunk = 64;  // union keys per step
constexpr int kThreads = 128;
constexpr unsigned long long kInvalid = ~0ULL;

struct Problem {
  const __nv_bfloat16 *q, *k, *v, *out, *grad_out;
  const float* lse;
  const std::int32_t* selection;  // [T, groups, width]
  float *grad_q, *grad_k, *grad_v;
  long long tokens, keys;
  int query_heads, kv_heads, head_dim, value_dim, groups, width;
  float scale;
};

struct Scratch {
  float* delta;                  // [T, Hq]
  unsigned long long* entries;   // [T_pad * Hkv * width]: sort input
  unsigned long long* sorted;    // same size
  int* flags;                    // [entries]: first entry of a distinct (segment, key)
  int* positions;                // [entries]: inclusive scan of flags
  std::int32_t* union_key;       // [entries] (at most): the union keys, segment after segment
  unsigned long long* union_mask;  // [entries]: tokens of the tile that selected the key
  long long* segment_begin;      // [segments]
  long long* segment_end;        // [segments]
  void* sort_temp;
  std::size_t sort_temp_bytes;
  void* scan_temp;
  std::size_t scan_temp_bytes;
};

inline int tile_tokens(const Problem& p) { return kRows / (p.query_heads / p.kv_heads); }
inline long long tiles(const Problem& p) { return (p.tokens + tile_tokens(p) - 1) / tile_tokens(p); }
inline long long segments(const Problem& p) { return tiles(p) * p.kv_heads; }
inline long long entry_count(const Problem& p) { return segments(p) * tile_tokens(p) * p.width; }

__global__ void delta_kernel(Problem p, float* delta) {
  const long long row = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.tokens * p.query_heads) return;
  float sum = 0.0f;
  for (int d = lane; d < p.value_dim; d += 32)
    sum += __bfloat162float(p.grad_out[row * p.value_dim + d]) * __bfloat162float(p.out[row * p.value_dim + d]);
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) delta[row] = sum;
}

// Entry e = ((segment * R) + token in tile) * width + j, segment = tile * Hkv + key head.
__global__ void entry_kernel(Problem p, int tile_len, unsigned long long* entries, long long count) {
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
      key = (static_cast<unsigned long long>(segment) << 38) | (static_cast<unsigned long long>(s) << 6) |
            static_cast<unsigned long long>(local);
  }
  entries[e] = key;
}

__global__ void flag_kernel(const unsigned long long* sorted, long long count, int* flags) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const unsigned long long key = sorted[i];
  flags[i] = key != kInvalid && (i == 0 || (sorted[i - 1] >> 6) != (key >> 6)) ? 1 : 0;
}

__global__ void union_kernel(const unsigned long long* sorted, const int* positions, long long count,
                             std::int32_t* union_key, unsigned long long* union_mask, long long* segment_begin,
                             long long* segment_end) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const unsigned long long key = sorted[i];
  if (key == kInvalid) return;
  const long long u = positions[i] - 1;  // this entry's union slot
  const long long segment = static_cast<long long>(key >> 38);
  union_key[u] = static_cast<std::int32_t>((key >> 6) & 0xffffffffULL);
  atomicOr(union_mask + u, 1ULL << (key & 63));
  if (i == 0 || (sorted[i - 1] >> 38) != static_cast<unsigned long long>(segment)) segment_begin[segment] = u;
  if (i + 1 == count || sorted[i + 1] == kInvalid || (sorted[i + 1] >> 38) != static_cast<unsigned long long>(segment))
    segment_end[segment] = u + 1;
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

__device__ inline TileRows tile_rows(const Problem& p, long long segment) {
  const int gq = p.query_heads / p.kv_heads;
  return TileRows{(segment / p.kv_heads) * (kRows / gq), p.tokens, static_cast<int>(segment % p.kv_heads), gq,
                  p.query_heads};
}

/// rows x W bf16 rows into shared memory (leading dimension ld), 16 bytes per copy, zeros where index(m) < 0.
template <int W, typename Index>
__device__ void load_rows(__nv_bfloat16* dst, int ld, int rows, const __nv_bfloat16* src, Index index) {
  for (int i = threadIdx.x; i < rows * (W / 8); i += blockDim.x) {
    const int m = i / (W / 8), c = (i % (W / 8)) * 8;
    const long long r = index(m);
    uint4 x = make_uint4(0, 0, 0, 0);
    if (r >= 0) x = *reinterpret_cast<const uint4*>(src + r * W + c);
    *reinterpret_cast<uint4*>(&dst[m * ld + c]) = x;
  }
}

/// One chunk of a tile's union: its keys and token masks (-1 and 0 past len), then their K and V rows of key head
/// g. Ends with a barrier; starts with one, so the previous chunk's readers are done.
template <int D, int DV>
__device__ void load_chunk(const Problem& p, int g, const std::int32_t* union_key,
                           const unsigned long long* union_mask, long long c0, int len, std::int32_t* key,
                           unsigned long long* mask, __nv_bfloat16* k, int ldk, __nv_bfloat16* v, int ldv) {
  __syncthreads();
  for (int c = threadIdx.x; c < kChunk; c += blockDim.x) {
    key[c] = c < len ? union_key[c0 + c] : -1;
    mask[c] = c < len ? union_mask[c0 + c] : 0ULL;
  }
  __syncthreads();
  const int kv_heads = p.kv_heads;
  load_rows<D>(k, ldk, kChunk, p.k, [&](int c) { return key[c] < 0 ? -1LL : static_cast<long long>(key[c]) * kv_heads + g; });
  load_rows<DV>(v, ldv, kChunk, p.v, [&](int c) { return key[c] < 0 ? -1LL : static_cast<long long>(key[c]) * kv_heads + g; });
  __syncthreads();
}

/// Adds a staged 16 x 16 block (keys key0.., channels 16 n..) into grad [N, Hkv, width] at key head g: four floats
/// per atomic where the GPU has vector atomics (sm_90), one otherwise.
__device__ inline void add_block(float* grad, int width, int kv_heads, int g, const std::int32_t* key, int key0, int len,
                                 int n, const float* stage, int lane) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  for (int i = lane; i < 64; i += 32) {  // 16 rows x 4 groups of 4 channels
    const int c = key0 + i / 4;
    if (c < len) {
      float4* at = reinterpret_cast<float4*>(grad + (static_cast<long long>(key[c]) * kv_heads + g) * width + n * 16 +
                                             (i % 4) * 4);
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

/// A warp's 16 rows against a chunk's keys: out[16][kChunk] (leading dimension ldo) = a[16][K] keys[kChunk][K]^T,
/// bf16 in shared memory (leading dimensions lda, ldk), fp32 out.
template <int K>
__device__ void rows_times_keys(const __nv_bfloat16* a, int lda, const __nv_bfloat16* keys, int ldk, float* out,
                                int ldo) {
  using namespace nvcuda;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kChunk / 16];
#pragma unroll
  for (int n = 0; n < kChunk / 16; ++n) wmma::fill_fragment(acc[n], 0.0f);
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, a + kk * 16, lda);
#pragma unroll
    for (int n = 0; n < kChunk / 16; ++n) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;  // keys^T
      wmma::load_matrix_sync(fb, keys + (n * 16) * ldk + kk * 16, ldk);
      wmma::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
#pragma unroll
  for (int n = 0; n < kChunk / 16; ++n) wmma::store_matrix_sync(out + n * 16, acc[n], ldo, wmma::mem_row_major);
}

/// The 16 keys key0.. of a chunk: grad rows += weights^T rows, with weights [kRows][kChunk] (ldw; a row's weight
/// per key) and rows [kRows][W] (ldr) bf16 in shared memory, each 16 x 16 block staged and added (add_block).
template <int W>
__device__ void add_keys_product(const __nv_bfloat16* weights, int ldw, const __nv_bfloat16* rows, int ldr,
                                 float* grad, int kv_heads, int g, const std::int32_t* key, int key0, int len,
                                 float* stage, int lane) {
  using namespace nvcuda;
  for (int n = 0; n < W / 16; ++n) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int kk = 0; kk < kRows / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::col_major> fa;  // weights^T: (key, row)
      wmma::load_matrix_sync(fa, weights + (kk * 16) * ldw + key0, ldw);
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb;  // rows: (row, channel)
      wmma::load_matrix_sync(fb, rows + (kk * 16) * ldr + n * 16, ldr);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(stage, acc, 16, wmma::mem_row_major);
    __syncwarp();
    add_block(grad, W, kv_heads, g, key, key0, len, n, stage, lane);
    __syncwarp();
  }
}

template <int D, int DV>
struct Smem {
  static constexpr int kLdQ = D + 8, kLdV = DV + 8, kLdS = kChunk + 4, kLdB = kChunk + 8;
  __nv_bfloat16 q[kRows * kLdQ];
  __nv_bfloat16 go[kRows * kLdV];
  __nv_bfloat16 k[kChunk * kLdQ];
  __nv_bfloat16 v[kChunk * kLdV];
  float s[kRows * kLdS];
  float dp[kRows * kLdS];
  __nv_bfloat16 p[kRows * kLdB];
  __nv_bfloat16 ds[kRows * kLdB];
  float stage[kThreads / 32][16 * 16];
  unsigned long long mask[kChunk];
  std::int32_t key[kChunk];
  float lse[kRows];
  float delta[kRows];
};

template <int D, int DV>
__global__ void __launch_bounds__(kThreads) tile_kernel(Problem p, const float* delta, const std::int32_t* union_key,
                                                         const unsigned long long* union_mask,
                                                         const long long* segment_begin,
                                                         const long long* segment_end) {
  using namespace nvcuda;
  using S = Smem<D, DV>;
  extern __shared__ __align__(128) unsigned char raw[];
  S& sm = *reinterpret_cast<S*>(raw);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const long long segment = blockIdx.x;
  const TileRows row_index = tile_rows(p, segment);
  const int g = row_index.g, gq = row_index.gq;
  load_rows<D>(sm.q, S::kLdQ, kRows, p.q, row_index);
  load_rows<DV>(sm.go, S::kLdV, kRows, p.grad_out, row_index);
  for (int m = threadIdx.x; m < kRows; m += kThreads) {
    const long long r = row_index(m);
    sm.lse[m] = r >= 0 ? p.lse[r] : -INFINITY;
    sm.delta[m] = r >= 0 ? delta[r] : 0.0f;
  }

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dq[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(dq[n], 0.0f);

  const long long begin = segment_begin[segment], end = segment_end[segment];
  for (long long c0 = begin; c0 < end; c0 += kChunk) {
    const int len = end - c0 < kChunk ? static_cast<int>(end - c0) : kChunk;
    load_chunk<D, DV>(p, g, union_key, union_mask, c0, len, sm.key, sm.mask, sm.k, S::kLdQ, sm.v, S::kLdV);

    // S and dP for this warp's 16 rows
    rows_times_keys<D>(&sm.q[(warp * 16) * S::kLdQ], S::kLdQ, sm.k, S::kLdQ, &sm.s[(warp * 16) * S::kLdS], S::kLdS);
    rows_times_keys<DV>(&sm.go[(warp * 16) * S::kLdV], S::kLdV, sm.v, S::kLdV, &sm.dp[(warp * 16) * S::kLdS],
                        S::kLdS);
    __syncwarp();
    // P and scale * dS of the warp's rows (zero where the row's token did not select the key)
    for (int i = lane; i < 16 * kChunk; i += 32) {
      const int m = warp * 16 + i / kChunk, c = i % kChunk;
      const bool selected = c < len && ((sm.mask[c] >> (m / gq)) & 1ULL) != 0 && sm.lse[m] != -INFINITY;
      const float prob = selected ? __expf(sm.s[m * S::kLdS + c] * p.scale - sm.lse[m]) : 0.0f;
      const float ds = prob * (sm.dp[m * S::kLdS + c] - sm.delta[m]) * p.scale;
      sm.p[m * S::kLdB + c] = __float2bfloat16(prob);
      sm.ds[m * S::kLdB + c] = __float2bfloat16(ds);
    }
    __syncthreads();  // every row's P and dS before the key-side products

    // dQ (this warp's rows) += (scale dS) K
#pragma unroll
    for (int kk = 0; kk < kChunk / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
      wmma::load_matrix_sync(a, &sm.ds[(warp * 16) * S::kLdB + kk * 16], S::kLdB);
#pragma unroll
      for (int n = 0; n < D / 16; ++n) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> b;  // K rows kk*16.., cols n*16..
        wmma::load_matrix_sync(b, &sm.k[(kk * 16) * S::kLdQ + n * 16], S::kLdQ);
        wmma::mma_sync(dq[n], a, b, dq[n]);
      }
    }
    // dK of this warp's 16 keys = (scale dS)^T Q and dV = P^T dO, each 16 x 16 block staged and added atomically
    const int key0 = warp * 16;
    if (key0 < len) {
      add_keys_product<D>(sm.ds, S::kLdB, sm.q, S::kLdQ, p.grad_k, p.kv_heads, g, sm.key, key0, len, sm.stage[warp],
                          lane);
      add_keys_product<DV>(sm.p, S::kLdB, sm.go, S::kLdV, p.grad_v, p.kv_heads, g, sm.key, key0, len,
                           sm.stage[warp], lane);
    }
  }
  // dQ rows of this warp (each row belongs to this tile alone)
  float* stage = sm.stage[warp];
  for (int n = 0; n < D / 16; ++n) {
    wmma::store_matrix_sync(stage, dq[n], 16, wmma::mem_row_major);
    __syncwarp();
    for (int i = lane; i < 256; i += 32) {
      const long long r = row_index(warp * 16 + i / 16);
      if (r >= 0) p.grad_q[r * D + n * 16 + i % 16] = stage[i];
    }
    __syncwarp();
  }
}

inline std::size_t aligned(std::size_t bytes) { return (bytes + 255) / 256 * 256; }

/// Device bytes of the scratch for `p` (a caller allocates them once and passes them to run()).
inline std::size_t scratch_bytes(const Problem& p) {
  const long long n = entry_count(p);
  std::size_t sort_bytes = 0, scan_bytes = 0;
  cub::DeviceRadixSort::SortKeys(nullptr, sort_bytes, static_cast<const unsigned long long*>(nullptr),
                                 static_cast<unsigned long long*>(nullptr), n);
  cub::DeviceScan::InclusiveSum(nullptr, scan_bytes, static_cast<const int*>(nullptr), static_cast<int*>(nullptr),
                                static_cast<int>(n));
  return aligned(p.tokens * p.query_heads * 4) + 2 * aligned(n * 8) + 2 * aligned(n * 4) + aligned(n * 4) +
         aligned(n * 8) + 2 * aligned(segments(p) * 8) + aligned(sort_bytes) + aligned(scan_bytes);
}

inline Scratch carve(const Problem& p, void* base) {
  const long long n = entry_count(p);
  char* at = static_cast<char*>(base);
  auto take = [&](std::size_t bytes) {
    char* here = at;
    at += aligned(bytes);
    return here;
  };
  Scratch s{};
  s.delta = reinterpret_cast<float*>(take(p.tokens * p.query_heads * 4));
  s.entries = reinterpret_cast<unsigned long long*>(take(n * 8));
  s.sorted = reinterpret_cast<unsigned long long*>(take(n * 8));
  s.flags = reinterpret_cast<int*>(take(n * 4));
  s.positions = reinterpret_cast<int*>(take(n * 4));
  s.union_key = reinterpret_cast<std::int32_t*>(take(n * 4));
  s.union_mask = reinterpret_cast<unsigned long long*>(take(n * 8));
  s.segment_begin = reinterpret_cast<long long*>(take(segments(p) * 8));
  s.segment_end = reinterpret_cast<long long*>(take(segments(p) * 8));
  cub::DeviceRadixSort::SortKeys(nullptr, s.sort_temp_bytes, s.entries, s.sorted, n);
  s.sort_temp = take(s.sort_temp_bytes);
  cub::DeviceScan::InclusiveSum(nullptr, s.scan_temp_bytes, s.flags, s.positions, static_cast<int>(n));
  s.scan_temp = take(s.scan_temp_bytes);
  return s;
}

/// The unions of every (tile, key head): entries, sort, distinct (segment, key) pairs and their token masks.
inline cudaError_t build_union(const Problem& p, const Scratch& s, cudaStream_t stream) {
  const long long n = entry_count(p);
  cudaMemsetAsync(s.union_mask, 0, n * 8, stream);
  cudaMemsetAsync(s.segment_begin, 0, segments(p) * 8, stream);
  cudaMemsetAsync(s.segment_end, 0, segments(p) * 8, stream);
  const unsigned blocks = static_cast<unsigned>((n + 255) / 256);
  entry_kernel<<<blocks, 256, 0, stream>>>(p, tile_tokens(p), s.entries, n);
  std::size_t sort_bytes = s.sort_temp_bytes, scan_bytes = s.scan_temp_bytes;
  cub::DeviceRadixSort::SortKeys(s.sort_temp, sort_bytes, s.entries, s.sorted, n, 0, 64, stream);
  flag_kernel<<<blocks, 256, 0, stream>>>(s.sorted, n, s.flags);
  cub::DeviceScan::InclusiveSum(s.scan_temp, scan_bytes, s.flags, s.positions, static_cast<int>(n), stream);
  union_kernel<<<blocks, 256, 0, stream>>>(s.sorted, s.positions, n, s.union_key, s.union_mask, s.segment_begin,
                                           s.segment_end);
  return cudaGetLastError();
}

template <int D, int DV>
cudaError_t backward_typed(const Problem& p, const Scratch& s, cudaStream_t stream) {
  cudaMemsetAsync(p.grad_k, 0, p.keys * p.kv_heads * D * 4, stream);
  cudaMemsetAsync(p.grad_v, 0, p.keys * p.kv_heads * DV * 4, stream);
  delta_kernel<<<static_cast<unsigned>((p.tokens * p.query_heads + 3) / 4), 128, 0, stream>>>(p, s.delta);
  const int smem = static_cast<int>(sizeof(Smem<D, DV>));
  cudaFuncSetAttribute(tile_kernel<D, DV>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  tile_kernel<D, DV><<<static_cast<unsigned>(segments(p)), kThreads, smem, stream>>>(
      p, s.delta, s.union_key, s.union_mask, s.segment_begin, s.segment_end);
  return cudaGetLastError();
}

template <int D, int DV>
struct ForwardSmem {
  static constexpr int kLdQ = D + 8, kLdV = DV + 8, kLdS = kChunk + 4, kLdB = kChunk + 8, kLdO = DV + 4;
  __nv_bfloat16 q[kRows * kLdQ];
  __nv_bfloat16 k[kChunk * kLdQ];
  __nv_bfloat16 v[kChunk * kLdV];
  float s[kRows * kLdS];
  float o[kRows * kLdO];
  __nv_bfloat16 p[kRows * kLdB];
  unsigned long long mask[kChunk];
  std::int32_t key[kChunk];
  float m[kRows];
  float l[kRows];
  float factor[kRows];
};

/// The forward over the same unions: out = softmax(scale q K^T) V over each row's selected keys (online softmax
/// over the chunks, P rounded to bf16 before P V), lse = log sum exp (-inf and out = 0 for a row without keys).
template <int D, int DV>
__global__ void __launch_bounds__(kThreads) forward_tile_kernel(Problem p, __nv_bfloat16* out, float* lse_out,
                                                                 const std::int32_t* union_key,
                                                                 const unsigned long long* union_mask,
                                                                 const long long* segment_begin,
                                                                 const long long* segment_end) {
  using namespace nvcuda;
  using S = ForwardSmem<D, DV>;
  extern __shared__ __align__(128) unsigned char raw[];
  S& sm = *reinterpret_cast<S*>(raw);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const long long segment = blockIdx.x;
  const TileRows row_index = tile_rows(p, segment);
  const int g = row_index.g, gq = row_index.gq;
  load_rows<D>(sm.q, S::kLdQ, kRows, p.q, row_index);
  for (int i = threadIdx.x; i < kRows * S::kLdO; i += kThreads) sm.o[i] = 0.0f;
  for (int m = threadIdx.x; m < kRows; m += kThreads) {
    sm.m[m] = -INFINITY;
    sm.l[m] = 0.0f;
  }
  const long long begin = segment_begin[segment], end = segment_end[segment];
  for (long long c0 = begin; c0 < end; c0 += kChunk) {
    const int len = end - c0 < kChunk ? static_cast<int>(end - c0) : kChunk;
    load_chunk<D, DV>(p, g, union_key, union_mask, c0, len, sm.key, sm.mask, sm.k, S::kLdQ, sm.v, S::kLdV);
    rows_times_keys<D>(&sm.q[(warp * 16) * S::kLdQ], S::kLdQ, sm.k, S::kLdQ, &sm.s[(warp * 16) * S::kLdS], S::kLdS);
    __syncwarp();
    // online softmax of the warp's 16 rows: lanes hold columns lane and lane + 32
    for (int rr = 0; rr < 16; ++rr) {
      const int m = warp * 16 + rr;
      const unsigned token_bit = static_cast<unsigned>(m / gq);
      float x[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int c = lane + 32 * h;
        const bool selected = c < len && ((sm.mask[c] >> token_bit) & 1ULL) != 0;
        x[h] = selected ? sm.s[m * S::kLdS + c] * p.scale : -INFINITY;
      }
      float mx = fmaxf(x[0], x[1]);
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_old = sm.m[m];
      const float m_new = fmaxf(m_old, mx);
      float pr[2] = {0.0f, 0.0f};
      float factor = 1.0f;
      if (m_new != -INFINITY) {
#pragma unroll
        for (int h = 0; h < 2; ++h) pr[h] = x[h] == -INFINITY ? 0.0f : __expf(x[h] - m_new);
        factor = m_old == -INFINITY ? 0.0f : __expf(m_old - m_new);
      }
      float sum = pr[0] + pr[1];
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      sm.p[m * S::kLdB + lane] = __float2bfloat16(pr[0]);
      sm.p[m * S::kLdB + lane + 32] = __float2bfloat16(pr[1]);
      __syncwarp();
      if (lane == 0) {
        sm.l[m] = sm.l[m] * factor + sum;
        sm.m[m] = m_new;
        sm.factor[m] = factor;
      }
    }
    __syncwarp();
    for (int i = lane; i < 16 * DV; i += 32) {
      const int m = warp * 16 + i / DV;
      sm.o[m * S::kLdO + i % DV] *= sm.factor[m];
    }
    __syncwarp();
#pragma unroll
    for (int n = 0; n < DV / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, &sm.o[(warp * 16) * S::kLdO + n * 16], S::kLdO, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kChunk / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
        wmma::load_matrix_sync(a, &sm.p[(warp * 16) * S::kLdB + kk * 16], S::kLdB);
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> b;  // V: (key, channel)
        wmma::load_matrix_sync(b, &sm.v[(kk * 16) * S::kLdV + n * 16], S::kLdV);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(&sm.o[(warp * 16) * S::kLdO + n * 16], acc, S::kLdO, wmma::mem_row_major);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kRows * DV; i += kThreads) {
    const int m = i / DV, c = i % DV;
    const long long r = row_index(m);
    if (r < 0) continue;
    const float l = sm.l[m];
    out[r * DV + c] = __float2bfloat16(l > 0.0f ? sm.o[m * S::kLdO + c] / l : 0.0f);
  }
  for (int m = threadIdx.x; m < kRows; m += kThreads) {
    const long long r = row_index(m);
    if (r >= 0) lse_out[r] = sm.l[m] > 0.0f ? sm.m[m] + __logf(sm.l[m]) : -INFINITY;
  }
}

template <int D, int DV>
cudaError_t forward_typed(const Problem& p, const Scratch& s, __nv_bfloat16* out, float* lse, cudaStream_t stream) {
  const int smem = static_cast<int>(sizeof(ForwardSmem<D, DV>));
  cudaFuncSetAttribute(forward_tile_kernel<D, DV>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  forward_tile_kernel<D, DV><<<static_cast<unsigned>(segments(p)), kThreads, smem, stream>>>(
      p, out, lse, s.union_key, s.union_mask, s.segment_begin, s.segment_end);
  return cudaGetLastError();
}

/// Whether the prototype takes this shape.
inline bool supports(const Problem& p) {
  const int gq = p.kv_heads > 0 ? p.query_heads / p.kv_heads : 0;
  return gq > 0 && p.query_heads % p.kv_heads == 0 && kRows % gq == 0 && (p.head_dim == 64 || p.head_dim == 128) &&
         (p.value_dim == 64 || p.value_dim == 128) && (p.groups == 1 || p.groups == p.kv_heads) &&
         entry_count(p) < (1LL << 31);
}

/// The backward over unions already built (build_union): dQ, dK, dV of p.
inline cudaError_t backward(const Problem& p, const Scratch& s, cudaStream_t stream) {
  if (p.head_dim == 128 && p.value_dim == 128) return backward_typed<128, 128>(p, s, stream);
  if (p.head_dim == 64 && p.value_dim == 64) return backward_typed<64, 64>(p, s, stream);
  if (p.head_dim == 128 && p.value_dim == 64) return backward_typed<128, 64>(p, s, stream);
  return backward_typed<64, 128>(p, s, stream);
}

/// The forward over unions already built: out (bf16 [T, Hq, Dv]) and lse ([T, Hq]) of p's q, k, v, selection.
inline cudaError_t forward(const Problem& p, const Scratch& s, __nv_bfloat16* out, float* lse, cudaStream_t stream) {
  if (p.head_dim == 128 && p.value_dim == 128) return forward_typed<128, 128>(p, s, out, lse, stream);
  if (p.head_dim == 64 && p.value_dim == 64) return forward_typed<64, 64>(p, s, out, lse, stream);
  if (p.head_dim == 128 && p.value_dim == 64) return forward_typed<128, 64>(p, s, out, lse, stream);
  return forward_typed<64, 128>(p, s, out, lse, stream);
}

/// Unions, then the backward.
inline cudaError_t run(const Problem& p, const Scratch& s, cudaStream_t stream) {
  const cudaError_t e = build_union(p, s, stream);
  return e != cudaSuccess ? e : backward(p, s, stream);
}

}  // namespace tiled_backward
