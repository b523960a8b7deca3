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
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda_glue.h"
#include "cuda_sparse_mla_launch.h"

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
    const bool empty = row_sum[r] == 0.0f;
    const float lse2 = empty ? -INFINITY : row_max[r] + log2f(row_sum[r]);
    const std::int64_t at = static_cast<std::int64_t>(row) * p.heads + h;
    if (p.splits == 1) {
      float denominator = row_sum[r];
      if (p.attn_sink != nullptr && !empty) denominator += exp2f(__ldg(p.attn_sink + h) * kLog2e - row_max[r]);
      const float factor = empty ? 0.0f : 1.0f / denominator;
      if (p.out_bf16) {
        auto* out = static_cast<__nv_bfloat16*>(p.out) + at * kLatent + d0 + 2 * c;
#pragma unroll
        for (int n = 0; n < kDimTiles; ++n) {
          *reinterpret_cast<__nv_bfloat162*>(out + n * 8) =
              __floats2bfloat162_rn(acc[n][2 * r] * factor, acc[n][2 * r + 1] * factor);
        }
      } else {
        auto* out = static_cast<float*>(p.out) + at * kLatent + d0 + 2 * c;
#pragma unroll
        for (int n = 0; n < kDimTiles; ++n) {
          *reinterpret_cast<float2*>(out + n * 8) = make_float2(acc[n][2 * r] * factor, acc[n][2 * r + 1] * factor);
        }
      }
      if (token_group == 0 && c == 0) {
        if (p.lse != nullptr) p.lse[at] = lse2 * kLn2;
        if (p.max_logits != nullptr) p.max_logits[at] = row_max[r] * kLn2;
      }
    } else {
      float* part = p.partial + (static_cast<std::int64_t>(split) * p.rows * p.heads + at) * kPartialStride;
      const float factor = empty ? 0.0f : 1.0f / row_sum[r];
#pragma unroll
      for (int n = 0; n < kDimTiles; ++n) {
        *reinterpret_cast<float2*>(part + d0 + 2 * c + n * 8) =
            make_float2(acc[n][2 * r] * factor, acc[n][2 * r + 1] * factor);
      }
      if (token_group == 0 && c == 0) {
        part[kLatent] = lse2;
        part[kLatent + 1] = row_max[r];
      }
    }
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

Plan make_plan(int rows, int heads, int topk, int multiprocessors, int device) {
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) optin = 0;
  Plan plan;
  plan.heads_per_block = (heads > 32 && static_cast<std::size_t>(optin) >= shared_bytes<64>()) ? 64 : 32;
  plan.shared = plan.heads_per_block == 64 ? shared_bytes<64>() : shared_bytes<32>();
  plan.head_blocks = (heads + plan.heads_per_block - 1) / plan.heads_per_block;
  const int tiles = (topk + kTile - 1) / kTile;
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
  return plan;
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
  return make_plan(rows, heads, topk, multiprocessors, device).partial_bytes;
}

void launch_sparse_mla(std::string_view function, const SparseMlaLaunch& launch, void* stream) {
  if (launch.rows == 0 || launch.heads == 0) return;
  const Plan plan = make_plan(launch.rows, launch.heads, launch.topk, launch.multiprocessors, launch.device);
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
  if (plan.heads_per_block == 64) {
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
