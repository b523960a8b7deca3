// Sparse attention decode over selected keys (see keysel/attention/cuda_sparse_attention.h).
//
// Grid (B, key-head chunks, splits), 256 threads = 16 half-warps. A half-warp owns whole K/V rows: each of its
// 16 lanes holds D/16 consecutive channels, so one row is one 16-byte load per lane (D = 128) and the
// q.k dot product is a 4-step shuffle reduction. Each half-warp takes kRows rows at a time (all loads issued
// before the first use) and keeps, for each of the up to 512/D heads that share those rows, an online softmax
// (running max and sum in the log2 domain) and an fp32 accumulator. Half-warps merge through shuffles and
// shared memory; splits merge in a second kernel by log-sum-exp.
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "cuda_glue.h"
#include "cuda_sparse_attention_launch.h"

namespace keysel::cuda_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kHalfWarps = kThreads / 16;
constexpr int kRows = 4;  // rows per half-warp per step
constexpr int kTile = 1024;  // selected keys whose offsets are resolved at once (shared memory)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct DecodeParams {
  const __nv_bfloat16* q;        // [B, Hq, D]
  const __nv_bfloat16* k;        // [num_blocks, block_size, Hkv, D]
  const __nv_bfloat16* v;        // [num_blocks, block_size, Hkv, D]
  const std::int32_t* block_table;  // [B, max_blocks] or nullptr (block b = sequence b)
  const std::int32_t* selection;    // [B, G, W]
  void* out;                     // [B, Hq, D] fp32 or bf16 (single split)
  float* lse;                    // [B, Hq] or nullptr (single split)
  float* partial_out;            // [B, Hq, splits, D] (several splits)
  float* partial_lse;            // [B, Hq, splits], log2 domain (several splits)
  int query_heads, kv_heads, head_dim, groups, width;
  int block_size, max_blocks, num_blocks;
  int heads_per_cta, chunks_per_kv, splits, split_len;
  int granularity;  // a Granularity, widened to int: the parameter layout the kernel's registers were tuned with
  bool out_bf16;
  float scale_log2;  // scale * log2(e)
};

template <int D>
struct RowLoad {
  static constexpr int kPerLane = D / 16;  // bf16 channels per lane
  static constexpr int kVectors = kPerLane / 8 > 0 ? kPerLane / 8 : 1;
  uint4 data[kVectors];
};

template <int D>
__device__ __forceinline__ void load_row(const __nv_bfloat16* row, int lane16, RowLoad<D>& r) {
  constexpr int kPerLane = D / 16;
  if constexpr (kPerLane >= 8) {
#pragma unroll
    for (int i = 0; i < kPerLane / 8; ++i) {
      r.data[i] = __ldg(reinterpret_cast<const uint4*>(row + lane16 * kPerLane) + i);
    }
  } else {  // D = 64: 4 channels, 8 bytes
    const uint2 half = __ldg(reinterpret_cast<const uint2*>(row + lane16 * kPerLane));
    r.data[0] = make_uint4(half.x, half.y, 0u, 0u);
  }
}

template <int D>
__device__ __forceinline__ void unpack_row(const RowLoad<D>& r, float (&x)[D / 16]) {
  constexpr int kPerLane = D / 16;
#pragma unroll
  for (int i = 0; i < kPerLane / 2; ++i) {
    const uint4& vec = r.data[i / 4];
    const std::uint32_t word = (i % 4 == 0) ? vec.x : (i % 4 == 1) ? vec.y : (i % 4 == 2) ? vec.z : vec.w;
    const float2 f = __bfloat1622float2(__halves2bfloat162(__ushort_as_bfloat16(static_cast<unsigned short>(word & 0xffffu)),
                                                           __ushort_as_bfloat16(static_cast<unsigned short>(word >> 16))));
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}

template <int D>
__global__ void __launch_bounds__(kThreads, 2) sparse_decode_kernel(const DecodeParams p) {
  constexpr int kPerLane = D / 16;
  constexpr int kMaxHeads = 512 / D;
  constexpr int kRowsD = D == 128 ? kRows : 2;  // rows per half-warp per step (registers; 4 measured faster than 3 at D = 128 despite a 28-byte spill)
  __shared__ float shared_acc[kMaxHeads][D];
  __shared__ float shared_m[kHalfWarps / 2][kMaxHeads];
  __shared__ float shared_l[kHalfWarps / 2][kMaxHeads];
  __shared__ std::int64_t row_offset[kTile];  // element offset of each K/V row of the tile, -1: skipped

  const int b = blockIdx.x;
  const int kv = blockIdx.y / p.chunks_per_kv;
  const int chunk = blockIdx.y % p.chunks_per_kv;
  const int split = blockIdx.z;
  const int g = p.query_heads / p.kv_heads;
  const int h0 = kv * g + chunk * p.heads_per_cta;
  const int nh = min(p.heads_per_cta, g - chunk * p.heads_per_cta);
  const int group = p.granularity == static_cast<int>(Granularity::per_token)     ? 0
                    : p.granularity == static_cast<int>(Granularity::per_kv_head) ? kv
                                                                                  : h0;
  const std::int32_t* sel = p.selection + (static_cast<std::int64_t>(b) * p.groups + group) * p.width;
  const int begin = split * p.split_len;
  const int end = min(p.width, begin + p.split_len);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int lane16 = lane & 15;
  const int half_warp = tid >> 4;
  const std::int64_t capacity = static_cast<std::int64_t>(p.block_size) * (p.block_table ? p.max_blocks : 1);

  float q[kMaxHeads][kPerLane];
#pragma unroll
  for (int h = 0; h < kMaxHeads; ++h) {
    if (h < nh) {
      RowLoad<D> r;
      load_row<D>(p.q + (static_cast<std::int64_t>(b) * p.query_heads + h0 + h) * D, lane16, r);
      unpack_row<D>(r, q[h]);
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) q[h][j] *= p.scale_log2;
    } else {
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) q[h][j] = 0.0f;
    }
  }
  float m[kMaxHeads], l[kMaxHeads], acc[kMaxHeads][kPerLane];
#pragma unroll
  for (int h = 0; h < kMaxHeads; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.0f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) acc[h][j] = 0.0f;
  }

  // Rows are taken in tiles of kTile selected keys: all threads first resolve the tile's selection entries and
  // block-table lookups into element offsets in shared memory (many independent loads in flight), so the main
  // loop waits on one global round trip per step (the K/V rows) instead of three dependent ones.
  for (int tile_begin = begin; tile_begin < end; tile_begin += kTile) {
    const int tile_end = min(end, tile_begin + kTile);
    if (tile_begin != begin) __syncthreads();  // the previous tile's offsets are read
    for (int i = tile_begin + tid; i < tile_end; i += kThreads) {
      const std::int64_t s = __ldg(sel + i);
      std::int64_t block = -1;
      if (s >= 0 && s < capacity) block = p.block_table ? __ldg(p.block_table + static_cast<std::int64_t>(b) * p.max_blocks + s / p.block_size) : b;
      row_offset[i - tile_begin] = block >= 0 && block < p.num_blocks
                                       ? ((block * p.block_size + s % p.block_size) * p.kv_heads + kv) * static_cast<std::int64_t>(D)
                                       : -1;
    }
    __syncthreads();
  // The trip count is uniform per warp (the shuffles below need both half-warps).
  for (int warp_base = tile_begin + (tid >> 5) * 2 * kRowsD; warp_base < tile_end; warp_base += kHalfWarps * kRowsD) {
    const int base = warp_base + (half_warp & 1) * kRowsD;
    RowLoad<D> kr[kRowsD], vr[kRowsD];
    bool valid[kRowsD];
#pragma unroll
    for (int r = 0; r < kRowsD; ++r) {
      const int i = base + r;
      const std::int64_t offset = i < tile_end ? row_offset[i - tile_begin] : -1;
      valid[r] = offset >= 0;
      if (valid[r]) {
        load_row<D>(p.k + offset, lane16, kr[r]);
        load_row<D>(p.v + offset, lane16, vr[r]);
      } else {
#pragma unroll
        for (int j = 0; j < RowLoad<D>::kVectors; ++j) kr[r].data[j] = vr[r].data[j] = make_uint4(0u, 0u, 0u, 0u);
      }
    }
    float score[kMaxHeads][kRowsD];
#pragma unroll
    for (int r = 0; r < kRowsD; ++r) {
      float kf[kPerLane];
      unpack_row<D>(kr[r], kf);
#pragma unroll
      for (int h = 0; h < kMaxHeads; ++h) {
        float dot = 0.0f;
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) dot = fmaf(q[h][j], kf[j], dot);
        score[h][r] = dot;
      }
    }
#pragma unroll
    for (int h = 0; h < kMaxHeads; ++h) {
#pragma unroll
      for (int r = 0; r < kRowsD; ++r) {
#pragma unroll
        for (int offset = 8; offset >= 1; offset >>= 1) {
          score[h][r] += __shfl_xor_sync(0xffffffffu, score[h][r], offset);
        }
      }
    }
    // Online softmax: rescale once per step, then add the rows one at a time (one V row unpacked at a time).
    float weight[kMaxHeads][kRowsD];
#pragma unroll
    for (int h = 0; h < kMaxHeads; ++h) {
      float block_max = -INFINITY;
#pragma unroll
      for (int r = 0; r < kRowsD; ++r) block_max = valid[r] ? fmaxf(block_max, score[h][r]) : block_max;
      const float m_new = fmaxf(m[h], block_max);
      const bool any = m_new != -INFINITY;  // uniform across the half-warp
      const float correction = any ? exp2f(m[h] - m_new) : 1.0f;
      float sum = 0.0f;
#pragma unroll
      for (int r = 0; r < kRowsD; ++r) {
        weight[h][r] = valid[r] && any ? exp2f(score[h][r] - m_new) : 0.0f;
        sum += weight[h][r];
      }
      l[h] = l[h] * correction + sum;
      m[h] = m_new;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) acc[h][j] *= correction;
    }
#pragma unroll
    for (int r = 0; r < kRowsD; ++r) {
      float vf[kPerLane];
      unpack_row<D>(vr[r], vf);
#pragma unroll
      for (int h = 0; h < kMaxHeads; ++h) {
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) acc[h][j] = fmaf(weight[h][r], vf[j], acc[h][j]);
      }
    }
  }
  }

  // Merge the two half-warps of each warp (lanes i and i + 16 hold the same channels).
#pragma unroll
  for (int h = 0; h < kMaxHeads; ++h) {
    const float m_other = __shfl_xor_sync(0xffffffffu, m[h], 16);
    const float l_other = __shfl_xor_sync(0xffffffffu, l[h], 16);
    const float m_new = fmaxf(m[h], m_other);
    const float a = m_new == -INFINITY ? 0.0f : exp2f(m[h] - m_new);
    const float c = m_new == -INFINITY ? 0.0f : exp2f(m_other - m_new);
    l[h] = l[h] * a + l_other * c;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const float other = __shfl_xor_sync(0xffffffffu, acc[h][j], 16);
      acc[h][j] = acc[h][j] * a + other * c;
    }
    m[h] = m_new;
  }
  // Across warps: every warp rescales to the block-wide max and adds into shared memory.
  const int warp = tid >> 5;
  for (int i = tid; i < kMaxHeads * D; i += kThreads) (&shared_acc[0][0])[i] = 0.0f;
  if (lane == 0) {
#pragma unroll
    for (int h = 0; h < kMaxHeads; ++h) {
      shared_m[warp][h] = m[h];
      shared_l[warp][h] = l[h];
    }
  }
  __syncthreads();
#pragma unroll
  for (int h = 0; h < kMaxHeads; ++h) {
    float block_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < kHalfWarps / 2; ++w) block_max = fmaxf(block_max, shared_m[w][h]);
    if (h < nh && block_max != -INFINITY && lane < 16) {
      const float a = exp2f(m[h] - block_max);
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) atomicAdd(&shared_acc[h][lane16 * kPerLane + j], acc[h][j] * a);
    }
  }
  __syncthreads();
  for (int i = tid; i < nh * D; i += kThreads) {
    const int h = i / D;
    const int d = i % D;
    float block_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < kHalfWarps / 2; ++w) block_max = fmaxf(block_max, shared_m[w][h]);
    float total = 0.0f;
    if (block_max != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kHalfWarps / 2; ++w) total += shared_l[w][h] * exp2f(shared_m[w][h] - block_max);
    }
    const float value = total > 0.0f ? shared_acc[h][d] / total : 0.0f;
    const float lse2 = total > 0.0f ? block_max + log2f(total) : -INFINITY;
    const std::int64_t head = static_cast<std::int64_t>(b) * p.query_heads + h0 + h;
    if (p.splits == 1) {
      if (p.out_bf16) {
        static_cast<__nv_bfloat16*>(p.out)[head * D + d] = __float2bfloat16_rn(value);
      } else {
        static_cast<float*>(p.out)[head * D + d] = value;
      }
      if (d == 0 && p.lse != nullptr) p.lse[head] = lse2 * kLn2;
    } else {
      p.partial_out[(head * p.splits + split) * D + d] = value;
      if (d == 0) p.partial_lse[head * p.splits + split] = lse2;
    }
  }
}

/// One block per (b, h): out = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max).
__global__ void merge_splits_kernel(const float* __restrict__ partial_out, const float* __restrict__ partial_lse,
                                    int splits, int dim, bool out_bf16, void* out, float* lse) {
  const std::int64_t head = blockIdx.x;
  const float* lses = partial_lse + head * splits;
  float max_lse = -INFINITY;
  for (int s = 0; s < splits; ++s) max_lse = fmaxf(max_lse, lses[s]);
  float total = 0.0f;
  if (max_lse != -INFINITY) {
    for (int s = 0; s < splits; ++s) total += exp2f(lses[s] - max_lse);
  }
  for (int d = threadIdx.x; d < dim; d += blockDim.x) {
    float value = 0.0f;
    if (total > 0.0f) {
      for (int s = 0; s < splits; ++s) {
        value += exp2f(lses[s] - max_lse) * partial_out[(head * splits + s) * dim + d];
      }
      value /= total;
    }
    if (out_bf16) {
      static_cast<__nv_bfloat16*>(out)[head * dim + d] = __float2bfloat16_rn(value);
    } else {
      static_cast<float*>(out)[head * dim + d] = value;
    }
  }
  if (threadIdx.x == 0 && lse != nullptr) lse[head] = total > 0.0f ? (max_lse + log2f(total)) * kLn2 : -INFINITY;
}

}  // namespace

void launch_sparse_attention_decode(std::string_view function, const SparseDecodeLaunch& in, void* stream) {
  if (in.batch == 0 || in.query_heads == 0) return;
  DecodeParams p{};
  p.q = static_cast<const __nv_bfloat16*>(in.q);
  p.k = static_cast<const __nv_bfloat16*>(in.k);
  p.v = static_cast<const __nv_bfloat16*>(in.v);
  p.block_table = in.block_table;
  p.selection = in.selection;
  p.out = in.out;
  p.lse = in.lse;
  p.query_heads = in.query_heads;
  p.kv_heads = in.kv_heads;
  p.head_dim = in.head_dim;
  p.groups = in.groups;
  p.width = in.width;
  p.block_size = in.block_size;
  p.max_blocks = in.block_table ? in.max_blocks : 1;
  p.num_blocks = in.num_blocks;
  p.granularity = static_cast<int>(in.granularity);
  p.out_bf16 = in.out_bf16;
  p.scale_log2 = in.scale * kLog2e;
  const int g = in.query_heads / in.kv_heads;
  const int max_heads = 512 / in.head_dim;
  p.heads_per_cta = in.granularity == Granularity::per_head ? 1 : (g < max_heads ? g : max_heads);
  p.chunks_per_kv = (g + p.heads_per_cta - 1) / p.heads_per_cta;

  // Enough blocks for several waves (two resident per SM), each with at least 256 selected keys.
  const std::int64_t base_blocks = static_cast<std::int64_t>(in.batch) * in.kv_heads * p.chunks_per_kv;
  const std::int64_t target = 8LL * in.multiprocessors;
  std::int64_t splits = (target + base_blocks - 1) / base_blocks;
  const std::int64_t max_splits = (static_cast<std::int64_t>(in.width) + 255) / 256;
  splits = splits < max_splits ? splits : max_splits;
  splits = splits < 1 ? 1 : (splits > 65535 ? 65535 : splits);
  const std::int64_t step = kHalfWarps * kRows;
  std::int64_t split_len = ((in.width + splits - 1) / splits + step - 1) / step * step;
  if (split_len == 0) split_len = step;
  splits = (in.width + split_len - 1) / split_len;
  if (splits < 1) splits = 1;
  p.split_len = static_cast<int>(split_len);
  p.splits = static_cast<int>(splits);

  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  const std::int64_t heads = static_cast<std::int64_t>(in.batch) * in.query_heads;
  // Partial results of the splits (none for a single split).
  const std::size_t workspace_bytes =
      p.splits > 1 ? static_cast<std::size_t>(heads * p.splits * (in.head_dim + 1)) * sizeof(float) : 0;
  cuda_glue::Scratch workspace(function, workspace_bytes, in.device, stream);
  if (p.splits > 1) {
    p.partial_out = workspace.as<float>();
    p.partial_lse = p.partial_out + heads * p.splits * in.head_dim;
  }
  const dim3 grid(static_cast<unsigned>(in.batch), static_cast<unsigned>(in.kv_heads * p.chunks_per_kv),
                  static_cast<unsigned>(p.splits));
  switch (in.head_dim) {
    case 64: sparse_decode_kernel<64><<<grid, kThreads, 0, cuda_stream>>>(p); break;
    case 128: sparse_decode_kernel<128><<<grid, kThreads, 0, cuda_stream>>>(p); break;
    default: sparse_decode_kernel<256><<<grid, kThreads, 0, cuda_stream>>>(p); break;
  }
  cuda_glue::check(cudaGetLastError(), function, "sparse_decode_kernel launch");
  if (p.splits > 1) {
    merge_splits_kernel<<<static_cast<unsigned>(heads), 128, 0, cuda_stream>>>(
        p.partial_out, p.partial_lse, p.splits, in.head_dim, p.out_bf16, p.out, p.lse);
    cuda_glue::check(cudaGetLastError(), function, "merge_splits_kernel launch");
  }
  workspace.release();
}

}  // namespace keysel::cuda_kernels
