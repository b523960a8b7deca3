// Sparse MLA on a GPU (keysel/attention/sparse_mla.h, sparse_mla_cuda): bf16
// tensor cores (mma.sync m16n8k16, sm_80 and later), the portable kernel.
//
// A thread block takes one query row and a block of kHeads heads (64, or 32
// where shared memory is small or h_q is), 8 warps, and walks the row's
// selected slots 32 at a time:
//   1. the 32 slots' latents are gathered into shared memory as bf16 (the V3.2
//   cache decoded: fp8 x its group's
//      scale, the RoPE part copied), invalid slots as zeros; the next 32 are
//      loaded into registers meanwhile;
//   2. S = Q K^T over 576 channels (Q stays in shared memory for the whole
//   row), each warp a 16-head x (32 /
//      token groups) tile, written to shared memory scaled into the log2
//      domain, invalid slots -inf;
//   3. each warp owns 16 heads x (512 / token groups) output channels: an
//   online softmax over its heads' rows of
//      S (max and sum per row, shared by the 4 lanes of a quad) and O += P V, V
//      being the first 512 channels of the same shared tile (ldmatrix.trans).
// Rows with few thread blocks split their slots across blocks; a second kernel
// merges the splits by log-sum-exp. The sink, max_logits and lse are applied or
// written by whichever kernel finishes the row.
//
// The sm_90a warpgroup-MMA kernel (sparse_mla_wgmma_kernel, below) takes either cache with h_q a multiple of 64
// unless KEYSEL_MLA_KERNEL=portable; it shares the splits, the merge kernel, the workspace and finish_head.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "cuda_glue.h"
#include "cuda_sparse_mla_launch.h"
#include "keysel/core/error.h"

namespace keysel::cuda_kernels {
namespace {

constexpr int kQk = 576;          // d_qk
constexpr int kLatent = 512;      // d_v
constexpr int kTokenBytes = 656;  // V3.2 token
constexpr int kRowPad = kQk + 8;  // bf16 elements per shared row: 1168 bytes, 16
                                  // mod 128 (ldmatrix conflict-free)
constexpr int kTile = 32;         // slots per step
constexpr int kThreads = 256;     // 8 warps
constexpr int kSPad = kTile + 4;  // floats per shared S row
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kMinTilesPerSplit = 2;
constexpr int kPartialStride = kLatent + 4;  // floats a partial row: o, lse2, max2, padding (16-byte rows)

struct MlaParams {
  const __nv_bfloat16* q;
  const std::uint8_t* kv;
  std::int64_t kv_stride;
  int page_size;
  std::int64_t slots;
  const std::int32_t* indices;
  std::int64_t index_stride;
  int topk;
  const std::int32_t* topk_length;
  const float* attn_sink;
  void* out;
  float* lse;
  float* max_logits;
  float* partial;  // [splits, rows, heads, 512 + 2]: o (normalised), lse2, max2
                   // (log2 domain)
  int rows, heads, splits, tiles_per_split;
  float scale_log2;
  bool out_bf16;
};

template <int kHeads>
constexpr std::size_t shared_bytes() {
  return static_cast<std::size_t>(kHeads + kTile) * kRowPad * 2 + static_cast<std::size_t>(kHeads) * kSPad * 4 +
         kTile * sizeof(int);
}

__device__ __forceinline__ std::uint32_t shared_address(const void* pointer) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(pointer));
}

__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], std::uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t (&r)[4], std::uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                         std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, "
      "%2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ std::uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&v);
}

/// Two e4m3 bytes (the low 16 bits of `pair`) times `scale`, as packed bf16.
__device__ __forceinline__ std::uint32_t fp8x2_to_bf16x2(std::uint32_t pair, float scale) {
  const __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(pair & 0xffffu), __NV_E4M3);
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&raw));
  return pack_bf16(f.x * scale, f.y * scale);
}

/// One thread's part of a 32-slot tile, in registers between the global load
/// and the shared store: 8 threads a slot. V3.2: chunk c (16 fp8 values) of
/// group g is chunk 8g + part; plus the part-th 16 bytes of RoPE and the four
/// scales. bf16 rows: 9 chunks of 16 bytes (72 a row).
struct TileLoad {
  uint4 data[9];
  float4 scales;
  bool valid;
};

template <bool kV32>
__device__ __forceinline__ void load_tile(const MlaParams& p, int row, int tile, TileLoad& load) {
  const int slot_in_tile = threadIdx.x >> 3, part = threadIdx.x & 7;
  const int position = tile * kTile + slot_in_tile;
  int limit = p.topk;
  if (p.topk_length != nullptr) limit = max(0, min(limit, __ldg(p.topk_length + row)));
  std::int64_t slot = -1;
  if (position < limit) slot = __ldg(p.indices + row * p.index_stride + position);
  load.valid = slot >= 0 && slot < p.slots;
  if (!load.valid) return;
  if constexpr (kV32) {
    const std::uint8_t* token =
        p.kv + (slot / p.page_size) * p.kv_stride + (slot % p.page_size) * static_cast<std::int64_t>(kTokenBytes);
#pragma unroll
    for (int g = 0; g < 4; ++g) load.data[g] = __ldg(reinterpret_cast<const uint4*>(token) + 8 * g + part);
    load.scales = __ldg(reinterpret_cast<const float4*>(token + kLatent));
    load.data[4] = __ldg(reinterpret_cast<const uint4*>(token + kLatent + 16) + part);
  } else {
    const uint4* token = reinterpret_cast<const uint4*>(p.kv + slot * p.kv_stride);
#pragma unroll
    for (int i = 0; i < 9; ++i) load.data[i] = __ldg(token + part + 8 * i);
  }
}

template <bool kV32>
__device__ __forceinline__ void store_tile(const TileLoad& load, __nv_bfloat16* tile_rows, int* valid) {
  const int slot_in_tile = threadIdx.x >> 3, part = threadIdx.x & 7;
  __nv_bfloat16* row = tile_rows + slot_in_tile * kRowPad;
  if (part == 0) valid[slot_in_tile] = load.valid ? 1 : 0;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  if constexpr (kV32) {
    const float scales[4] = {load.scales.x, load.scales.y, load.scales.z, load.scales.w};
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      uint4* dst = reinterpret_cast<uint4*>(row + (8 * g + part) * 16);
      if (!load.valid) {
        dst[0] = zero;
        dst[1] = zero;
        continue;
      }
      const uint4 v = load.data[g];
      const float s = scales[g];
      dst[0] = make_uint4(fp8x2_to_bf16x2(v.x, s), fp8x2_to_bf16x2(v.x >> 16, s), fp8x2_to_bf16x2(v.y, s),
                          fp8x2_to_bf16x2(v.y >> 16, s));
      dst[1] = make_uint4(fp8x2_to_bf16x2(v.z, s), fp8x2_to_bf16x2(v.z >> 16, s), fp8x2_to_bf16x2(v.w, s),
                          fp8x2_to_bf16x2(v.w >> 16, s));
    }
    *reinterpret_cast<uint4*>(row + kLatent + part * 8) = load.valid ? load.data[4] : zero;
  } else {
#pragma unroll
    for (int i = 0; i < 9; ++i) {
      *reinterpret_cast<uint4*>(row + (part + 8 * i) * 8) = load.valid ? load.data[i] : zero;
    }
  }
}

/// Writes one head's result once its slots are done. One split: out = o / (sum + the sink's term), with lse and
/// max_logits in natural log; several: the partial row o / sum with lse2 and max2 (log2 domain) for the merge
/// kernel. `pair(n)` gives the unnormalised outputs of channels column + 8n and column + 8n + 1 (n < kPairs), the
/// accumulator layout both kernels' MMAs leave; `writes_stats`: this thread writes the row's lse and max.
template <int kPairs, typename Pair>
__device__ __forceinline__ void finish_head(const MlaParams& p, int row, int h, int split, int column, float row_max,
                                            float row_sum, bool writes_stats, const Pair& pair) {
  const bool empty = row_sum == 0.0f;
  const float lse2 = empty ? -INFINITY : row_max + log2f(row_sum);
  const std::int64_t at = static_cast<std::int64_t>(row) * p.heads + h;
  if (p.splits == 1) {
    float denominator = row_sum;
    if (p.attn_sink != nullptr && !empty) denominator += exp2f(__ldg(p.attn_sink + h) * kLog2e - row_max);
    const float factor = empty ? 0.0f : 1.0f / denominator;
    if (p.out_bf16) {
      auto* out = static_cast<__nv_bfloat16*>(p.out) + at * kLatent + column;
#pragma unroll
      for (int n = 0; n < kPairs; ++n) {
        const float2 v = pair(n);
        *reinterpret_cast<__nv_bfloat162*>(out + 8 * n) = __floats2bfloat162_rn(v.x * factor, v.y * factor);
      }
    } else {
      auto* out = static_cast<float*>(p.out) + at * kLatent + column;
#pragma unroll
      for (int n = 0; n < kPairs; ++n) {
        const float2 v = pair(n);
        *reinterpret_cast<float2*>(out + 8 * n) = make_float2(v.x * factor, v.y * factor);
      }
    }
    if (writes_stats) {
      if (p.lse != nullptr) p.lse[at] = lse2 * kLn2;
      if (p.max_logits != nullptr) p.max_logits[at] = row_max * kLn2;
    }
  } else {
    float* part = p.partial + (static_cast<std::int64_t>(split) * p.rows * p.heads + at) * kPartialStride;
    const float factor = empty ? 0.0f : 1.0f / row_sum;
#pragma unroll
    for (int n = 0; n < kPairs; ++n) {
      const float2 v = pair(n);
      *reinterpret_cast<float2*>(part + column + 8 * n) = make_float2(v.x * factor, v.y * factor);
    }
    if (writes_stats) {
      part[kLatent] = lse2;
      part[kLatent + 1] = row_max;
    }
  }
}

/// grid (rows, head blocks, splits); see the file comment.
template <int kHeads, bool kV32>
__global__ void __launch_bounds__(kThreads, 1) sparse_mla_kernel(const MlaParams p) {
  constexpr int kHeadGroups = kHeads / 16;         // 16-head slabs: 4 or 2
  constexpr int kTokenGroups = 8 / kHeadGroups;    // warps sharing a slab: 2 or 4
  constexpr int kQkTokens = kTile / kTokenGroups;  // a warp's slots in S: 16 or 8
  constexpr int kQkTiles = kQkTokens / 8;          // n8 tiles: 2 or 1
  constexpr int kDims = kLatent / kTokenGroups;    // a warp's output channels: 256 or 128
  constexpr int kDimTiles = kDims / 8;             // 32 or 16
  extern __shared__ __align__(16) unsigned char shared[];
  auto* s_q = reinterpret_cast<__nv_bfloat16*>(shared);
  auto* s_kv = s_q + kHeads * kRowPad;
  auto* s_s = reinterpret_cast<float*>(s_kv + kTile * kRowPad);
  auto* s_valid = reinterpret_cast<int*>(s_s + kHeads * kSPad);

  const int row = blockIdx.x, head0 = blockIdx.y * kHeads, split = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int slab = warp % kHeadGroups, token_group = warp / kHeadGroups;
  const int tiles = (p.topk + kTile - 1) / kTile;
  const int first_tile = split * p.tiles_per_split;
  const int end_tile = min(tiles, first_tile + p.tiles_per_split);

  // Q: kHeads rows of 576 bf16 (heads past h_q are zeros), 72 chunks of 16
  // bytes a row.
  for (int i = threadIdx.x; i < kHeads * (kQk / 8); i += kThreads) {
    const int h = i / (kQk / 8), chunk = i % (kQk / 8);
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (head0 + h < p.heads) {
      v = __ldg(reinterpret_cast<const uint4*>(p.q + (static_cast<std::int64_t>(row) * p.heads + head0 + h) * kQk) +
                chunk);
    }
    *reinterpret_cast<uint4*>(s_q + h * kRowPad + chunk * 8) = v;
  }

  float acc[kDimTiles][4];
#pragma unroll
  for (int n = 0; n < kDimTiles; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};  // rows g and g + 8 of the warp's slab, log2 domain
  float row_sum[2] = {0.0f, 0.0f};            // this lane's part of the sum (the quad's lanes add up at the end)
  const int g = lane >> 2, c = lane & 3;

  TileLoad load;
  if (first_tile < end_tile) load_tile<kV32>(p, row, first_tile, load);
  for (int tile = first_tile; tile < end_tile; ++tile) {
    __syncthreads();  // the previous tile's readers are done with s_kv and s_s
    store_tile<kV32>(load, s_kv, s_valid);
    __syncthreads();
    if (tile + 1 < end_tile) load_tile<kV32>(p, row, tile + 1,
                                             load);  // in flight during the math below

    // S = Q K^T: the warp's 16 heads x kQkTokens slots, into s_s in the log2
    // domain (invalid slots -inf).
    {
      float s[kQkTiles][4];
#pragma unroll
      for (int n = 0; n < kQkTiles; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
      const int token0 = token_group * kQkTokens;
      const std::uint32_t a_address = shared_address(s_q + (slab * 16 + (lane & 15)) * kRowPad + (lane >> 4) * 8);
      if constexpr (kQkTiles == 2) {
        // One x4 load: b0/b1 of slots token0 + 0..7, then of token0 + 8..15,
        // for one k step.
        const std::uint32_t b_address =
            shared_address(s_kv + (token0 + (lane & 7) + (lane >> 4) * 8) * kRowPad + ((lane >> 3) & 1) * 8);
#pragma unroll 6
        for (int k = 0; k < kQk / 16; ++k) {
          std::uint32_t a[4], b[4];
          ldmatrix_x4(a, a_address + k * 32);
          ldmatrix_x4(b, b_address + k * 32);
          mma_bf16(s[0], a, b[0], b[1]);
          mma_bf16(s[1], a, b[2], b[3]);
        }
      } else {
        // One x4 load: b0/b1 of slots token0 + 0..7 for two k steps.
        const std::uint32_t b_address = shared_address(s_kv + (token0 + (lane & 7)) * kRowPad + (lane >> 3) * 8);
#pragma unroll 6
        for (int k = 0; k < kQk / 16; k += 2) {
          std::uint32_t a0[4], a1[4], b[4];
          ldmatrix_x4(a0, a_address + k * 32);
          ldmatrix_x4(a1, a_address + (k + 1) * 32);
          ldmatrix_x4(b, b_address + k * 32);
          mma_bf16(s[0], a0, b[0], b[1]);
          mma_bf16(s[0], a1, b[2], b[3]);
        }
      }
#pragma unroll
      for (int n = 0; n < kQkTiles; ++n) {
        const int slot = token0 + n * 8 + 2 * c;
        const bool v0 = s_valid[slot] != 0, v1 = s_valid[slot + 1] != 0;
        float* top = s_s + (slab * 16 + g) * kSPad + slot;
        float* bottom = top + 8 * kSPad;
        top[0] = v0 ? s[n][0] * p.scale_log2 : -INFINITY;
        top[1] = v1 ? s[n][1] * p.scale_log2 : -INFINITY;
        bottom[0] = v0 ? s[n][2] * p.scale_log2 : -INFINITY;
        bottom[1] = v1 ? s[n][3] * p.scale_log2 : -INFINITY;
      }
    }
    __syncthreads();

    // Online softmax over the slab's rows g and g + 8, then O += P V over the
    // warp's channels.
    {
      float v[2][2][4];  // [row g / g + 8][k step][a-fragment order]
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float* srow = s_s + (slab * 16 + g + 8 * r) * kSPad;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          v[r][j][0] = srow[16 * j + 2 * c];
          v[r][j][1] = srow[16 * j + 2 * c + 1];
          v[r][j][2] = srow[16 * j + 2 * c + 8];
          v[r][j][3] = srow[16 * j + 2 * c + 9];
        }
      }
      float corr[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float m = row_max[r];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) m = fmaxf(m, v[r][j][e]);
        }
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
        const float base = m == -INFINITY ? 0.0f : m;
        corr[r] = exp2f(row_max[r] - base);
        row_max[r] = m;
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            v[r][j][e] = exp2f(v[r][j][e] - base);
            sum += v[r][j][e];
          }
        }
        row_sum[r] = row_sum[r] * corr[r] + sum;
      }
#pragma unroll
      for (int n = 0; n < kDimTiles; ++n) {
        acc[n][0] *= corr[0];
        acc[n][1] *= corr[0];
        acc[n][2] *= corr[1];
        acc[n][3] *= corr[1];
      }
      const int d0 = token_group * kDims;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const std::uint32_t a[4] = {pack_bf16(v[0][j][0], v[0][j][1]), pack_bf16(v[1][j][0], v[1][j][1]),
                                    pack_bf16(v[0][j][2], v[0][j][3]), pack_bf16(v[1][j][2], v[1][j][3])};
        const std::uint32_t b_address = shared_address(s_kv + (16 * j + (lane & 15)) * kRowPad + d0 + (lane >> 4) * 8);
#pragma unroll
        for (int n = 0; n < kDimTiles; n += 2) {
          std::uint32_t b[4];
          ldmatrix_x4_trans(b, b_address + n * 16);
          mma_bf16(acc[n], a, b[0], b[1]);
          mma_bf16(acc[n + 1], a, b[2], b[3]);
        }
      }
    }
  }

  // The quad's lanes hold parts of each row's sum.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
  }
  const int d0 = token_group * kDims;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int h = head0 + slab * 16 + g + 8 * r;
    if (h >= p.heads) continue;
    finish_head<kDimTiles>(p, row, h, split, d0 + 2 * c, row_max[r], row_sum[r], token_group == 0 && c == 0,
                           [&](int n) { return make_float2(acc[n][2 * r], acc[n][2 * r + 1]); });
  }
}

/// Merges the splits of (row, head) = (blockIdx.x, blockIdx.y) by log-sum-exp;
/// 128 threads, 4 channels each.
__global__ void __launch_bounds__(128) merge_mla_splits_kernel(const MlaParams p) {
  const int row = blockIdx.x, h = blockIdx.y;
  const std::int64_t at = static_cast<std::int64_t>(row) * p.heads + h;
  const std::int64_t split_stride = static_cast<std::int64_t>(p.rows) * p.heads * kPartialStride;
  const float* first = p.partial + at * kPartialStride;
  float top = -INFINITY, max2 = -INFINITY;
  for (int i = 0; i < p.splits; ++i) {
    top = fmaxf(top, first[i * split_stride + kLatent]);
    max2 = fmaxf(max2, first[i * split_stride + kLatent + 1]);
  }
  float total = 0.0f;
  for (int i = 0; i < p.splits; ++i) {
    const float l = first[i * split_stride + kLatent];
    if (l != -INFINITY) total += exp2f(l - top);
  }
  const bool empty = total == 0.0f;
  const float lse2 = empty ? -INFINITY : top + log2f(total);
  float factor = 1.0f;
  if (p.attn_sink != nullptr && !empty) factor = 1.0f / (1.0f + exp2f(__ldg(p.attn_sink + h) * kLog2e - lse2));
  float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  for (int i = 0; i < p.splits && !empty; ++i) {
    const float l = first[i * split_stride + kLatent];
    if (l == -INFINITY) continue;
    const float w = exp2f(l - lse2) * factor;
    const float4 x = *reinterpret_cast<const float4*>(first + i * split_stride + 4 * threadIdx.x);
    o.x += w * x.x;
    o.y += w * x.y;
    o.z += w * x.z;
    o.w += w * x.w;
  }
  if (p.out_bf16) {
    auto* out = static_cast<__nv_bfloat16*>(p.out) + at * kLatent + 4 * threadIdx.x;
    reinterpret_cast<__nv_bfloat162*>(out)[0] = __floats2bfloat162_rn(o.x, o.y);
    reinterpret_cast<__nv_bfloat162*>(out)[1] = __floats2bfloat162_rn(o.z, o.w);
  } else {
    *reinterpret_cast<float4*>(static_cast<float*>(p.out) + at * kLatent + 4 * threadIdx.x) = o;
  }
  if (threadIdx.x == 0) {
    if (p.lse != nullptr) p.lse[at] = lse2 * kLn2;
    if (p.max_logits != nullptr) p.max_logits[at] = max2 * kLn2;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// sm_90a: warpgroup MMA (wgmma m64nNk16 bf16, HGMMA in SASS) on the fp8 V3.2 cache or the bf16 latent cache (the
// kV32 template flag), h_q a multiple of 64.
//
// A thread block takes one query row and 64 heads, two warpgroups (256 threads), and walks the row's selected
// slots 64 at a time. Shared memory (V3.2: 193 KB of 227): Q [64 heads x 576] bf16 (72 KB, laid out once), the
// tile's K [64 slots x 576] bf16 (72 KB), P [64 heads x 64 slots] bf16 (8 KB) and the next tile's raw 656-byte
// tokens (41 KB); bf16 cache (224 KB): Q, two K buffers, P. All bf16 operands are in the no-swizzle core-matrix
// layout (8 rows x 16 bytes, 128 contiguous bytes a core matrix) that the wgmma descriptors name: Q and K as
// [row group][channel group] (72 core matrices, 9216 bytes, per 8 rows), P as [head group][slot group]. Per tile:
//   1. the raw tokens (requested by cp.async one tile ahead, zero-filled for invalid slots) are decoded, fp8 x
//      the group's scale -> bf16 with the RoPE part copied, into K by all 256 threads;
//   2. S = Q K^T: warpgroup w takes slots 32w..32w+31 (m64n32k16, 36 k steps, both operands from shared
//      memory), so the QK^T work is split, not repeated;
//   3. online softmax: each warpgroup's row maxima meet in shared memory, so both hold the same running maximum
//      (natural-log state kept in the log2 domain as in the portable kernel); each writes its 32 columns of P
//      as bf16; each keeps the row sums of its own slots (added up at the end);
//   4. O += P V: warpgroup w owns channels 256w..256w+255 (m64n256k16, 128 fp32 accumulators a thread, 4 k
//      steps); V is the same K tile read MN-major (wgmma's transposed B), so no second copy is made.
// The raw tokens of tile t + 1 are in flight during steps 2-4 of tile t. What bounds it: steps 1 and 2-4 do not
// overlap (one K buffer: a second 72 KB one does not fit beside Q and the raw tokens), so the decode time adds to
// the MMA time; the next step is a producer warpgroup decoding into a second, smaller (32-slot) K stage.
// The bf16 cache has no step 1: cp.async copies each row's 72 chunks of 16 bytes straight into the K buffer's
// core matrices (zero-filled for invalid slots), one tile ahead into the other K buffer, so tile t + 1's gather
// overlaps steps 2-4 of tile t and a tile costs Q K^T + P V plus one barrier.
// Splits, the merge kernel and the workspace are the portable kernel's (tiles of 64 instead of 32).
constexpr int kWgTile = 64;                              // slots per step
constexpr int kWgThreads = 256;                          // two warpgroups
constexpr int kWgQBytes = 64 * kQk * 2;
constexpr int kWgKBytes = kWgTile * kQk * 2;
constexpr int kWgPBytes = 64 * kWgTile * 2;
constexpr int kWgRawBytes = kWgTile * kTokenBytes;
/// Dynamic shared memory: the V3.2 cache's Q, K, P and raw tokens (197,632 bytes), or the bf16 cache's Q, two K
/// buffers and P (229,376 bytes; with the 1 KB of static flags 230,400 of the 232,448 an sm_90 block may have).
constexpr int wgmma_shared_bytes(bool v32) {
  return v32 ? kWgQBytes + kWgKBytes + kWgPBytes + kWgRawBytes : kWgQBytes + 2 * kWgKBytes + kWgPBytes;
}
// The B operand of P V is K read MN-major. PTX's canonical MN-major layout without swizzling,
// ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO)), puts core matrices adjacent along N (the channels: 128 bytes apart
// here) at the stride byte offset and those adjacent along K (the slots: 9216 bytes apart) at the leading byte
// offset, as for the K-major operands.

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
constexpr int kCoreBytes = 128;                              // a core matrix: 8 rows x 16 bytes
constexpr int kChannelGroups = kQk / 8;                      // 72 core matrices along 576 channels
constexpr int kRowGroupBytes = kChannelGroups * kCoreBytes;  // 9216: 8 heads or slots x 576 channels
constexpr int kTokenChunks = kTokenBytes / 16;               // 41 chunks of 16 bytes a V3.2 token

__device__ __forceinline__ void wgmma_bf16_n32(float (&d)[16], std::uint64_t desc_a, std::uint64_t desc_b,
                                               int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
      "}, %16, %17, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

__device__ __forceinline__ void wgmma_bf16_n256_vt(float (&d)[128], std::uint64_t desc_a, std::uint64_t desc_b,
                                               int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, %128, %129, p, 1, 1, 0, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

/// Keeps the compiler from moving accumulator reads or writes across the asynchronous MMA's fence and wait.
template <int M>
__device__ __forceinline__ void fence_accumulators(float (&d)[M]) {
#pragma unroll
  for (int i = 0; i < M; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

/// A no-swizzle shared-memory matrix descriptor: start address, leading (K-direction) and stride byte offsets.
__device__ __forceinline__ std::uint64_t matrix_descriptor(std::uint32_t address, std::uint32_t leading,
                                                           std::uint32_t stride) {
  return static_cast<std::uint64_t>((address & 0x3FFFFu) >> 4) | (static_cast<std::uint64_t>(leading >> 4) << 16) |
         (static_cast<std::uint64_t>(stride >> 4) << 32);
}

__device__ __forceinline__ void cp_async_16(std::uint32_t destination, const void* source, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(destination), "l"(source),
               "r"(valid ? 16 : 0)
               : "memory");
}

/// Requests the raw tokens of `tile` (656 bytes each, zeros for invalid slots) into `raw`; valid[t] says which.
/// Four threads a token, each its chunks part, part + 4, ...: one address computation a thread and tile.
__device__ __forceinline__ void request_raw_tile(const MlaParams& p, int row, int limit, int tile, std::uint32_t raw,
                                                 int* valid) {
  static_assert(kWgThreads == 4 * kWgTile, "four threads a slot");
  const int t = threadIdx.x >> 2, part = threadIdx.x & 3;
  const int position = tile * kWgTile + t;
  std::int64_t slot = -1;
  if (position < limit) slot = __ldg(p.indices + row * p.index_stride + position);
  const bool ok = slot >= 0 && slot < p.slots;
  const std::uint8_t* token = p.kv;
  if (ok) {
    const auto s = static_cast<unsigned>(slot), page_size = static_cast<unsigned>(p.page_size);
    token = p.kv + static_cast<std::int64_t>(s / page_size) * p.kv_stride +
            static_cast<std::int64_t>(s % page_size) * kTokenBytes;
  }
  const std::uint32_t destination = raw + static_cast<std::uint32_t>(t * kTokenBytes);
  for (int chunk = part; chunk < kTokenChunks; chunk += 4) {
    cp_async_16(destination + chunk * 16, token + (ok ? chunk * 16 : 0), ok);
  }
  if (part == 0) valid[t] = ok ? 1 : 0;
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

/// Requests the bf16 rows of `tile` straight into the K buffer at `k_tile`, in its core-matrix layout (zeros for
/// invalid slots); valid[t] says which. Four threads a slot, each its chunks part, part + 4, ... (72 of 16 bytes a
/// row): a warp's 32 copies fill 4 whole core matrices (8 slots x 16 bytes, 512 contiguous shared bytes, free of
/// bank conflicts) and read 64 contiguous bytes of each of 8 rows.
__device__ __forceinline__ void request_bf16_tile(const MlaParams& p, int row, int limit, int tile,
                                                  std::uint32_t k_tile, int* valid) {
  static_assert(kWgThreads == 4 * kWgTile, "four threads a slot");
  const int t = threadIdx.x >> 2, part = threadIdx.x & 3;
  const int position = tile * kWgTile + t;
  std::int64_t slot = -1;
  if (position < limit) slot = __ldg(p.indices + row * p.index_stride + position);
  const bool ok = slot >= 0 && slot < p.slots;
  const std::uint8_t* latent = ok ? p.kv + slot * p.kv_stride : p.kv;
  const std::uint32_t destination = k_tile + static_cast<std::uint32_t>((t >> 3) * kRowGroupBytes + (t & 7) * 16);
#pragma unroll 6
  for (int chunk = part; chunk < kChannelGroups; chunk += 4) {
    cp_async_16(destination + chunk * kCoreBytes, latent + (ok ? chunk * 16 : 0), ok);
  }
  if (part == 0) valid[t] = ok ? 1 : 0;
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

/// Decodes the raw tokens into the K tile's core matrices: thread i writes row i % 8 of core matrix i / 8
/// (8 consecutive threads fill one 128-byte core matrix, free of bank conflicts).
__device__ __forceinline__ void decode_raw_tile(const unsigned char* raw, unsigned char* k_tile) {
  for (int i = threadIdx.x; i < kWgTile * kChannelGroups; i += kWgThreads) {
    const int r = i & 7, group = (i >> 3) % kChannelGroups, slot_group = (i >> 3) / kChannelGroups;
    const unsigned char* token = raw + (slot_group * 8 + r) * kTokenBytes;
    uint4 v;
    if (group < kLatent / 8) {
      const uint2 bytes = *reinterpret_cast<const uint2*>(token + group * 8);
      const float s = *reinterpret_cast<const float*>(token + kLatent + (group / 16) * 4);
      v = make_uint4(fp8x2_to_bf16x2(bytes.x, s), fp8x2_to_bf16x2(bytes.x >> 16, s), fp8x2_to_bf16x2(bytes.y, s),
                     fp8x2_to_bf16x2(bytes.y >> 16, s));
    } else {
      v = *reinterpret_cast<const uint4*>(token + kLatent + 16 + (group - kLatent / 8) * 16);
    }
    *reinterpret_cast<uint4*>(k_tile + (slot_group * kChannelGroups + group) * kCoreBytes + r * 16) = v;
  }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

/// grid (rows, h_q / 64, splits); see the comment above kWgTile. Built only into sm_90a code: elsewhere the body
/// is empty, uses no static shared memory, and the host takes the portable kernel.
template <bool kV32>
__global__ void __launch_bounds__(kWgThreads, 1) sparse_mla_wgmma_kernel(const MlaParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(16) unsigned char shared[];
  __shared__ int s_valid[2][kWgTile];  // by tile parity: tile t's flags while tile t + 1's are written
  __shared__ float s_rows[2][64];      // per warpgroup: a tile's row maxima; at the end the row sums
  unsigned char* s_q = shared;
  unsigned char* s_k = s_q + kWgQBytes;
  unsigned char* s_p = s_k + (kV32 ? 1 : 2) * kWgKBytes;  // bf16 cache: K buffers by tile parity
  unsigned char* s_raw = s_p + kWgPBytes;                  // V3.2 cache only
  const std::uint32_t q_address = shared_address(s_q), k_address = shared_address(s_k),
                      p_address = shared_address(s_p), raw_address = shared_address(s_raw);

  const int row = blockIdx.x, head0 = blockIdx.y * 64, split = blockIdx.z;
  const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int g = lane >> 2, c = lane & 3;
  const int r0 = warp * 16 + g;  // this thread's rows (heads) r0 and r0 + 8 of the accumulators
  const int tiles = (p.topk + kWgTile - 1) / kWgTile;
  const int first_tile = split * p.tiles_per_split;
  const int end_tile = min(tiles, first_tile + p.tiles_per_split);
  int limit = p.topk;
  if (p.topk_length != nullptr) limit = max(0, min(limit, __ldg(p.topk_length + row)));

  if (first_tile < end_tile) {
    if constexpr (kV32) {
      request_raw_tile(p, row, limit, first_tile, raw_address, s_valid[0]);
    } else {
      request_bf16_tile(p, row, limit, first_tile, k_address, s_valid[0]);
    }
  }
  // Q: thread i writes row i % 8 (a head) of core matrix i / 8.
  for (int i = threadIdx.x; i < 64 * kChannelGroups; i += kWgThreads) {
    const int r = i & 7, group = (i >> 3) % kChannelGroups, head_group = (i >> 3) / kChannelGroups;
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(
                              p.q + (static_cast<std::int64_t>(row) * p.heads + head0 + head_group * 8 + r) * kQk) +
                          group);
    *reinterpret_cast<uint4*>(s_q + (head_group * kChannelGroups + group) * kCoreBytes + r * 16) = v;
  }

  float o[128];  // O [64 heads x 256 channels of this warpgroup]: o[4j + e] is row r0 (+8 for e >= 2), column
                 // 8j + 2c + (e & 1)
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 domain, the same in both warpgroups
  float row_sum[2] = {0.0f, 0.0f};            // this thread's part: its warpgroup's slots, its quad lane's columns

#pragma unroll 1
  for (int tile = first_tile; tile < end_tile; ++tile) {
    const int parity = (tile - first_tile) & 1;
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    if constexpr (kV32) {
      __syncthreads();  // the raw tile has landed for every thread; the last P V (waited) is done with s_k
      decode_raw_tile(s_raw, s_k);
    }
    // s_k (written by decode_raw_tile or cp.async) and s_q are read by the tensor cores.
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();  // bf16 cache: this tile's K buffer has landed; the last P V (waited) is done with the other
    const std::uint32_t k_tile = k_address + (kV32 ? 0 : parity * kWgKBytes);
    if (tile + 1 < end_tile) {
      if constexpr (kV32) {
        request_raw_tile(p, row, limit, tile + 1, raw_address, s_valid[parity ^ 1]);
      } else {
        request_bf16_tile(p, row, limit, tile + 1, k_address + (parity ^ 1) * kWgKBytes, s_valid[parity ^ 1]);
      }
    }

    // S = Q K^T over this warpgroup's 32 slots.
    float s[16] = {};
    fence_accumulators(s);
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
    for (int k = 0; k < kQk / 16; ++k) {
      const std::uint64_t a = matrix_descriptor(q_address + k * 2 * kCoreBytes, kCoreBytes, kRowGroupBytes);
      const std::uint64_t b =
          matrix_descriptor(k_tile + wg * 4 * kRowGroupBytes + k * 2 * kCoreBytes, kCoreBytes, kRowGroupBytes);
      wgmma_bf16_n32(s, a, b, k > 0 ? 1 : 0);
    }
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    fence_accumulators(s);

    // Online softmax: scale into the log2 domain, invalid slots -inf, the tile's row maxima shared.
    const int* valid = s_valid[parity];
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int slot = wg * 32 + 8 * j + 2 * c + (e & 1);
        s[4 * j + e] = valid[slot] != 0 ? s[4 * j + e] * p.scale_log2 : -INFINITY;
        tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[4 * j + e]);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      if (c == 0) s_rows[wg][r0 + 8 * r] = tile_max[r];
    }
    __syncthreads();
    float base[2], corr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m = fmaxf(row_max[r], fmaxf(s_rows[0][r0 + 8 * r], s_rows[1][r0 + 8 * r]));
      base[r] = m == -INFINITY ? 0.0f : m;
      corr[r] = exp2f(row_max[r] - base[r]);
      row_max[r] = m;
    }
    float sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[4 * j + e] = exp2f(s[4 * j + e] - base[e >> 1]);
        sum[e >> 1] += s[4 * j + e];
      }
      // P [heads x slots] as bf16: slot group 4wg + j, head groups 2warp (row r0) and 2warp + 1 (row r0 + 8).
      unsigned char* at = s_p + ((2 * warp) * 8 + 4 * wg + j) * kCoreBytes + g * 16 + c * 4;
      *reinterpret_cast<std::uint32_t*>(at) = pack_bf16(s[4 * j], s[4 * j + 1]);
      *reinterpret_cast<std::uint32_t*>(at + 8 * kCoreBytes) = pack_bf16(s[4 * j + 2], s[4 * j + 3]);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) row_sum[r] = row_sum[r] * corr[r] + sum[r];
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      o[4 * j] *= corr[0];
      o[4 * j + 1] *= corr[0];
      o[4 * j + 2] *= corr[1];
      o[4 * j + 3] *= corr[1];
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // P is read by the tensor cores
    __syncthreads();  // both halves of P written; s_rows read

    // O += P V over this warpgroup's 256 channels.
    fence_accumulators(o);
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
    for (int k = 0; k < kWgTile / 16; ++k) {
      const std::uint64_t a = matrix_descriptor(p_address + k * 2 * kCoreBytes, kCoreBytes, 8 * kCoreBytes);
      const std::uint64_t b = matrix_descriptor(k_tile + wg * 32 * kCoreBytes + k * 2 * kRowGroupBytes,
                                                kRowGroupBytes, kCoreBytes);
      wgmma_bf16_n256_vt(o, a, b, 1);
    }
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    fence_accumulators(o);
  }

  // Row sums: the quad's lanes, then the two warpgroups.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
  }
  __syncthreads();
  if (c == 0) {
    s_rows[wg][r0] = row_sum[0];
    s_rows[wg][r0 + 8] = row_sum[1];
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < 2; ++r) row_sum[r] = s_rows[0][r0 + 8 * r] + s_rows[1][r0 + 8 * r];

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    finish_head<32>(p, row, head0 + r0 + 8 * r, split, wg * 256 + 2 * c, row_max[r], row_sum[r], wg == 0 && c == 0,
                    [&](int j) { return make_float2(o[4 * j + 2 * r], o[4 * j + 2 * r + 1]); });
  }
#else
  (void)p;
#endif
}

/// How a call is cut: heads a block, splits of the slots, and the scratch the
/// splits need.
struct Plan {
  int heads_per_block = 64;
  int head_blocks = 1;
  int splits = 1;
  int tiles_per_split = 1;
  std::size_t partial_bytes = 0;
  std::size_t shared = 0;
};

/// Splits of the slots (tiles of `tile` slots) when the row x head-block grid is below one wave.
void plan_splits(Plan& plan, int rows, int heads, int topk, int multiprocessors, int tile) {
  const int tiles = (topk + tile - 1) / tile;
  const std::int64_t blocks = static_cast<std::int64_t>(rows) * plan.head_blocks;
  if (blocks < multiprocessors && tiles >= 2 * kMinTilesPerSplit) {
    const int wanted = static_cast<int>(std::min<std::int64_t>(multiprocessors / blocks, tiles / kMinTilesPerSplit));
    if (wanted > 1) {
      plan.tiles_per_split = (tiles + wanted - 1) / wanted;
      plan.splits = (tiles + plan.tiles_per_split - 1) / plan.tiles_per_split;
    }
  }
  if (plan.splits == 1) plan.tiles_per_split = std::max(tiles, 1);
  if (plan.splits > 1) {
    plan.partial_bytes = static_cast<std::size_t>(plan.splits) * static_cast<std::size_t>(rows) *
                         static_cast<std::size_t>(heads) * kPartialStride * sizeof(float);
  }
}

Plan make_plan(int rows, int heads, int topk, int multiprocessors, int device) {
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) optin = 0;
  Plan plan;
  plan.heads_per_block = (heads > 32 && static_cast<std::size_t>(optin) >= shared_bytes<64>()) ? 64 : 32;
  plan.shared = plan.heads_per_block == 64 ? shared_bytes<64>() : shared_bytes<32>();
  plan.head_blocks = (heads + plan.heads_per_block - 1) / plan.heads_per_block;
  plan_splits(plan, rows, heads, topk, multiprocessors, kTile);
  return plan;
}

/// The wgmma kernel's cut: 64 heads a block, tiles of 64 slots.
Plan make_wgmma_plan(int rows, int heads, int topk, int multiprocessors, bool v32) {
  Plan plan;
  plan.heads_per_block = 64;
  plan.shared = wgmma_shared_bytes(v32);
  plan.head_blocks = heads / 64;
  plan_splits(plan, rows, heads, topk, multiprocessors, kWgTile);
  return plan;
}

/// Whether this binary has sm_90a code of the wgmma kernel for `device` (its static shared memory is empty
/// elsewhere) and the device grants its shared memory, for the V3.2 (`v32`) or the bf16 cache; read once per device
/// and cache and cached (value + 1).
bool wgmma_kernel_available(int device, bool v32) {
  static std::atomic<int> cache[2][64];
  const bool cached = device >= 0 && device < 64;
  if (cached) {
    const int known = cache[v32 ? 1 : 0][device].load(std::memory_order_acquire);
    if (known != 0) return known == 2;
  }
  const bool available = [v32] {
    const auto kernel = v32 ? sparse_mla_wgmma_kernel<true> : sparse_mla_wgmma_kernel<false>;
    cudaFuncAttributes attributes{};
    if (cudaFuncGetAttributes(&attributes, kernel) != cudaSuccess || attributes.sharedSizeBytes == 0) {
      cudaGetLastError();
      return false;
    }
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, wgmma_shared_bytes(v32)) !=
        cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return true;
  }();
  if (cached) cache[v32 ? 1 : 0][device].store(available ? 2 : 1, std::memory_order_release);
  return available;
}

/// KEYSEL_MLA_KERNEL: "wgmma" (the sm_90a kernel where it applies), "portable", or unset (kWgmmaByDefault: the
/// wgmma kernel, 1.25-1.33x faster than the portable one at B = 64 on an H200, within 7% of it at B = 1).
constexpr bool kWgmmaByDefault = true;

bool wgmma_requested(std::string_view function) {
  const char* value = std::getenv("KEYSEL_MLA_KERNEL");
  if (value == nullptr || *value == '\0') return kWgmmaByDefault;
  const std::string_view name(value);
  if (name == "wgmma") return true;
  if (name == "portable") return false;
  detail::throw_error(function, "KEYSEL_MLA_KERNEL: expected wgmma or portable, got " + std::string(name));
}

/// Whether the call goes to the wgmma kernel: asked for, h_q a multiple of 64, sm_90a code (either cache).
bool use_wgmma(std::string_view function, bool v32, int heads, int device) {
  return wgmma_requested(function) && heads % 64 == 0 && wgmma_kernel_available(device, v32);
}

template <int kHeads, bool kV32>
void launch_kernel(std::string_view function, const MlaParams& params, const Plan& plan, cudaStream_t stream) {
  const auto kernel = sparse_mla_kernel<kHeads, kV32>;
  cuda_glue::check(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.shared)),
      function, "cudaFuncSetAttribute(sparse_mla_kernel)");
  const dim3 grid(static_cast<unsigned>(params.rows), static_cast<unsigned>(plan.head_blocks),
                  static_cast<unsigned>(plan.splits));
  kernel<<<grid, kThreads, plan.shared, stream>>>(params);
}

}  // namespace

std::size_t sparse_mla_workspace_bytes(int rows, int heads, int topk, int multiprocessors, int device) {
  // Enough for either kernel, so that a workspace sized once serves whichever KEYSEL_MLA_KERNEL picks.
  std::size_t bytes = make_plan(rows, heads, topk, multiprocessors, device).partial_bytes;
  if (heads % 64 == 0) {
    bytes = std::max(bytes, make_wgmma_plan(rows, heads, topk, multiprocessors, true).partial_bytes);
  }
  return bytes;
}

bool sparse_mla_wgmma_kernel_available(int device, bool v32) { return wgmma_kernel_available(device, v32); }

void launch_sparse_mla(std::string_view function, const SparseMlaLaunch& launch, void* stream) {
  if (launch.rows == 0 || launch.heads == 0) return;
  const bool wgmma = use_wgmma(function, launch.v32, launch.heads, launch.device);
  const Plan plan = wgmma ? make_wgmma_plan(launch.rows, launch.heads, launch.topk, launch.multiprocessors, launch.v32)
                          : make_plan(launch.rows, launch.heads, launch.topk, launch.multiprocessors, launch.device);
  auto* cuda_stream = static_cast<cudaStream_t>(stream);
  cuda_glue::Scratch scratch(function, plan.partial_bytes, launch.device, stream, launch.workspace);
  MlaParams params{};
  params.q = static_cast<const __nv_bfloat16*>(launch.q);
  params.kv = launch.kv;
  params.kv_stride = launch.kv_stride;
  params.page_size = launch.page_size;
  params.slots = launch.slots;
  params.indices = launch.indices;
  params.index_stride = launch.index_stride;
  params.topk = launch.topk;
  params.topk_length = launch.topk_length;
  params.attn_sink = launch.attn_sink;
  params.out = launch.out;
  params.lse = launch.lse;
  params.max_logits = launch.max_logits;
  params.partial = scratch.as<float>();
  params.rows = launch.rows;
  params.heads = launch.heads;
  params.splits = plan.splits;
  params.tiles_per_split = plan.tiles_per_split;
  params.scale_log2 = launch.scale * kLog2e;
  params.out_bf16 = launch.out_bf16;
  if (wgmma) {
    const dim3 grid(static_cast<unsigned>(params.rows), static_cast<unsigned>(plan.head_blocks),
                    static_cast<unsigned>(plan.splits));
    if (launch.v32) {
      sparse_mla_wgmma_kernel<true><<<grid, kWgThreads, plan.shared, cuda_stream>>>(params);
    } else {
      sparse_mla_wgmma_kernel<false><<<grid, kWgThreads, plan.shared, cuda_stream>>>(params);
    }
  } else if (plan.heads_per_block == 64) {
    if (launch.v32) {
      launch_kernel<64, true>(function, params, plan, cuda_stream);
    } else {
      launch_kernel<64, false>(function, params, plan, cuda_stream);
    }
  } else if (launch.v32) {
    launch_kernel<32, true>(function, params, plan, cuda_stream);
  } else {
    launch_kernel<32, false>(function, params, plan, cuda_stream);
  }
  cuda_glue::check(cudaGetLastError(), function, "sparse_mla_kernel launch");
  if (plan.splits > 1) {
    const dim3 grid(static_cast<unsigned>(launch.rows), static_cast<unsigned>(launch.heads));
    merge_mla_splits_kernel<<<grid, 128, 0, cuda_stream>>>(params);
    cuda_glue::check(cudaGetLastError(), function, "merge_mla_splits_kernel launch");
  }
  scratch.release();
}

}  // namespace keysel::cuda_kernels
