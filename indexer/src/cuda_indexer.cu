// fp8 Lightning Indexer logits with tensor-core MMA (see keysel/indexer/cuda_indexer.h).
//
// HI of 32 or 64: indexer_logits_tokens_kernel below (fp16 MMA on exactly converted fp8 values). HI = 128:
// Grid (CTAs per row, R); HI/16 warps. Warp w holds the A fragments of heads [16w, 16w + 16) for all of DI in
// registers (fp8, loaded once). For each 64-token cache block of its row (blocks blockIdx.x, + gridDim.x, ...):
//   the block's 64 * (DI + 4) bytes arrive as 16-byte loads into registers one block ahead (the next block's
//   loads are in flight while this one is computed), are spread into shared memory with a padded token stride
//   (DI/4 + 4 words: the B-fragment reads are free of bank conflicts), then each warp runs
//   mma.m16n8k32.e4m3 (16 heads x 8 tokens x 32 channels, fp32 accumulate) over 8 token tiles x DI/32 steps,
//   applies ReLU and the head weights, sums its 16 heads by shuffles; warps add through shared memory and the
//   token's scale multiplies the sum.
#include <cuda_fp8.h>

#include <cstdint>
#include <string>

#include "cuda_indexer_launch.h"

namespace keysel::cuda_kernels {
namespace {

constexpr int kBlock = 64;

struct IndexerParams {
  const std::uint8_t* q;            // [R, HI, DI]
  const float* weights;             // [R, HI]
  const std::uint8_t* cache;        // [num_blocks, 64, DI + 4]
  const std::int32_t* block_table;  // [S, max_blocks] or nullptr
  const std::int32_t* positions;    // [R]
  const std::int32_t* sequence_of_row;  // [R] or nullptr
  float* logits;                    // [R, N]
  std::int64_t n, num_blocks;
  int heads, sequences, max_blocks, blocks_per_sequence;
};

__device__ __forceinline__ void mma_e4m3(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                         std::uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  // The host refuses GPUs below sm_89; this branch only keeps the sm_80 build compiling.
  (void)a, (void)b0, (void)b1;
  c[0] = c[1] = c[2] = c[3] = __int_as_float(0x7fffffff);
#endif
}

template <int DI, int kWarps>
__global__ void __launch_bounds__(kWarps * 32, 16 / kWarps) indexer_logits_kernel(const IndexerParams p) {
  constexpr int kWords = DI / 4;              // key words per token
  constexpr int kStride = kWords + 4;         // padded shared-memory stride in words
  constexpr int kTokenWords = kWords + 1;     // key words + scale in the cache
  constexpr int kSteps = DI / 32;
  constexpr int kThreads = kWarps * 32;
  __shared__ __align__(16) std::uint32_t keys[3][kBlock * kStride];
  __shared__ float scales[3][kBlock];
  __shared__ float partial[kWarps][kBlock];

  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
  const std::int64_t r = blockIdx.y;
  const int seq = p.sequence_of_row ? p.sequence_of_row[r] : static_cast<int>(r);
  const std::int64_t pos = p.positions[r];
  std::int64_t allowed = pos < 0 ? 0 : (pos + 1 < p.n ? pos + 1 : p.n);
  bool row_ok = seq >= 0 && seq < p.sequences;
  if (!p.block_table && static_cast<std::int64_t>(seq + 1) * p.blocks_per_sequence > p.num_blocks) row_ok = false;
  if (!row_ok) allowed = 0;
  const std::int64_t row_blocks = (allowed + kBlock - 1) / kBlock;
  float* out = p.logits + r * p.n;

  // Beyond the last allowed block: -inf.
  for (std::int64_t s = row_blocks * kBlock + static_cast<std::int64_t>(blockIdx.x) * kThreads + tid; s < p.n;
       s += static_cast<std::int64_t>(gridDim.x) * kThreads) {
    out[s] = -INFINITY;
  }
  if (static_cast<std::int64_t>(blockIdx.x) >= row_blocks) return;

  std::uint32_t a[kSteps][4];
  {
    const std::uint8_t* q0 = p.q + (r * p.heads + warp * 16 + g) * DI;
    const std::uint8_t* q8 = q0 + 8 * DI;
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      a[ks][0] = __ldg(reinterpret_cast<const std::uint32_t*>(q0 + ks * 32 + tig * 4));
      a[ks][1] = __ldg(reinterpret_cast<const std::uint32_t*>(q8 + ks * 32 + tig * 4));
      a[ks][2] = __ldg(reinterpret_cast<const std::uint32_t*>(q0 + ks * 32 + 16 + tig * 4));
      a[ks][3] = __ldg(reinterpret_cast<const std::uint32_t*>(q8 + ks * 32 + 16 + tig * 4));
    }
  }
  const float w0 = __ldg(p.weights + r * p.heads + warp * 16 + g);
  const float w8 = __ldg(p.weights + r * p.heads + warp * 16 + g + 8);

  // Three-stage cp.async ring: the copies of block j + 2 * gridDim.x fly while block j is computed.
  auto fetch = [&](std::int64_t j, int stage) -> bool {
    std::int64_t block = p.block_table ? __ldg(p.block_table + static_cast<std::int64_t>(seq) * p.max_blocks + j)
                                       : static_cast<std::int64_t>(seq) * p.blocks_per_sequence + j;
    const bool ok = block >= 0 && block < p.num_blocks;
    if (!ok) block = 0;
    const std::uint32_t* src =
        reinterpret_cast<const std::uint32_t*>(p.cache + block * (kBlock * kTokenWords * 4));
    const std::uint32_t key_base = static_cast<std::uint32_t>(__cvta_generic_to_shared(keys[stage]));
    const std::uint32_t scale_base = static_cast<std::uint32_t>(__cvta_generic_to_shared(scales[stage]));
    // Key words: a warp copies whole tokens (kWords consecutive words each), no division by the token stride.
#pragma unroll 4
    for (int w = tid; w < kBlock * kWords; w += kThreads) {
      const int token = w / kWords;  // a power of two
      const int word = w % kWords;
      const std::uint32_t dst = key_base + 4u * static_cast<std::uint32_t>(token * kStride + word);
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src + token * kTokenWords + word)
                   : "memory");
    }
    if (tid < kBlock) {
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(scale_base + 4u * static_cast<std::uint32_t>(tid)),
                   "l"(src + tid * kTokenWords + kWords)
                   : "memory");
    }
    return ok;
  };
  const auto commit = [] { asm volatile("cp.async.commit_group;\n" ::: "memory"); };

  unsigned ok_bits = 0;  // bit s: the block in stage s lies inside the cache
  const std::int64_t step = gridDim.x;
  std::int64_t j = blockIdx.x;
  if (fetch(j, 0)) ok_bits |= 1u;
  commit();
  if (j + step < row_blocks && fetch(j + step, 1)) ok_bits |= 2u;
  commit();
  for (int stage = 0; j < row_blocks; j += step, stage = stage == 2 ? 0 : stage + 1) {
    asm volatile("cp.async.wait_group 1;\n" ::: "memory");
    __syncthreads();
    const int next_stage = stage == 0 ? 2 : stage - 1;  // (stage + 2) % 3: read two iterations ago
    if (j + 2 * step < row_blocks) {
      if (fetch(j + 2 * step, next_stage)) {
        ok_bits |= 1u << next_stage;
      } else {
        ok_bits &= ~(1u << next_stage);
      }
    }
    commit();

    float acc[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
    const std::uint32_t* stage_keys = keys[stage];
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const std::uint32_t* token_row = stage_keys + (nt * 8 + g) * kStride + ks * 8 + tig;
        mma_e4m3(acc[nt], a[ks], token_row[0], token_row[4]);
      }
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      float v0 = fmaxf(acc[nt][0], 0.0f) * w0 + fmaxf(acc[nt][2], 0.0f) * w8;  // token nt*8 + 2*tig
      float v1 = fmaxf(acc[nt][1], 0.0f) * w0 + fmaxf(acc[nt][3], 0.0f) * w8;  // token nt*8 + 2*tig + 1
#pragma unroll
      for (int offset = 4; offset < 32; offset <<= 1) {
        v0 += __shfl_xor_sync(0xffffffffu, v0, offset);
        v1 += __shfl_xor_sync(0xffffffffu, v1, offset);
      }
      if (g == 0) {
        partial[warp][nt * 8 + 2 * tig] = v0;
        partial[warp][nt * 8 + 2 * tig + 1] = v1;
      }
    }
    __syncthreads();
    if (tid < kBlock) {
      const std::int64_t s = j * kBlock + tid;
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += partial[w][tid];
      if (s < allowed) {
        out[s] = (ok_bits >> stage) & 1u ? sum * scales[stage][tid] : __int_as_float(0x7fffffff);
      } else if (s < p.n) {
        out[s] = -INFINITY;
      }
    }
  }
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

__device__ __forceinline__ void mma_f16(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                        std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/// Two e4m3 values (the low and high byte of a 16-bit word) as an f16x2 word, exactly (e4m3 is a subset of fp16).
__device__ __forceinline__ std::uint32_t fp8x2_to_f16x2(std::uint32_t word16) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(word16 & 0xffffu), __NV_E4M3);
  return static_cast<std::uint32_t>(h.x) | (static_cast<std::uint32_t>(h.y) << 16);
}

/// Tokens on the MMA's M side (HI of 32 or 64), fp16 tensor cores. Hopper has no fp8 mma.sync (the compiler
/// emulates it with conversions around HMMA for every instruction); here each fp8 value is converted once to
/// fp16 (exact), then m16n8k16 HMMA with fp32 accumulation (the products are exact as before).
///
/// 128 * kSplit threads: warp w takes the 16 tokens (w % 4) * 16.. of each 64-token cache block and the heads
/// [(w / 4) * HI / kSplit, + HI / kSplit), whose fp16 B fragments stay in registers for the whole kernel; the
/// kSplit warps of a token tile add their weighted ReLU sums through shared memory behind a named barrier. K order
/// inside each MMA step is permuted identically for A and B (lane tig's fp8 word goes to f16 slots 2 * tig and
/// 8 + 2 * tig), which the dot product does not see. Cache blocks arrive as raw 16-byte cp.async.cg copies into a
/// kStages-deep ring, one block-wide barrier per cache block. A persistent grid (two CTAs per SM in all rows)
/// walks the blocks of its row with stride gridDim.x.
template <int DI, int HI, int kSplit>
__global__ void __launch_bounds__(128 * kSplit, 2) indexer_logits_tokens_kernel(const IndexerParams p) {
  constexpr int kWords = DI / 4;
  constexpr int kTokenWords = kWords + 1;  // the cache's token stride, kept in shared memory
  constexpr int kBlockVectors = kBlock * kTokenWords / 4;  // 16-byte pieces of one cache block
  constexpr int kChunks = DI / 16;          // f16 k16 steps
  constexpr int kHeads = HI / kSplit;       // heads per warp
  constexpr int kHeadTiles = kHeads / 8;
  constexpr int kThreads = 128 * kSplit;
  constexpr int kStages = 4;
  __shared__ __align__(16) std::uint32_t keys[kStages][kBlock * kTokenWords];  // raw cache blocks, scales included
  __shared__ float partial[kStages][kSplit - 1][kBlock];

  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
  const int tile = warp & 3, head_half = warp >> 2;
  const std::int64_t r = blockIdx.y;
  const int seq = p.sequence_of_row ? p.sequence_of_row[r] : static_cast<int>(r);
  const std::int64_t pos = p.positions[r];
  std::int64_t allowed = pos < 0 ? 0 : (pos + 1 < p.n ? pos + 1 : p.n);
  bool row_ok = seq >= 0 && seq < p.sequences;
  if (!p.block_table && static_cast<std::int64_t>(seq + 1) * p.blocks_per_sequence > p.num_blocks) row_ok = false;
  if (!row_ok) allowed = 0;
  const std::int64_t row_blocks = (allowed + kBlock - 1) / kBlock;
  float* out = p.logits + r * p.n;
  for (std::int64_t s = row_blocks * kBlock + static_cast<std::int64_t>(blockIdx.x) * kThreads + tid; s < p.n;
       s += static_cast<std::int64_t>(gridDim.x) * kThreads) {
    out[s] = -INFINITY;
  }
  if (static_cast<std::int64_t>(blockIdx.x) >= row_blocks) return;

  auto fetch = [&](std::int64_t j, int stage) -> bool {
    std::int64_t block = p.block_table ? __ldg(p.block_table + static_cast<std::int64_t>(seq) * p.max_blocks + j)
                                       : static_cast<std::int64_t>(seq) * p.blocks_per_sequence + j;
    const bool ok = block >= 0 && block < p.num_blocks;
    if (!ok) block = 0;
    const uint4* src16 = reinterpret_cast<const uint4*>(p.cache + block * (kBlock * kTokenWords * 4));
    const std::uint32_t key_base = static_cast<std::uint32_t>(__cvta_generic_to_shared(keys[stage]));
#pragma unroll
    for (int v = tid; v < kBlockVectors; v += kThreads) {
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(key_base + 16u * static_cast<std::uint32_t>(v)),
                   "l"(src16 + v)
                   : "memory");
    }
    return ok;
  };
  const auto commit = [] { asm volatile("cp.async.commit_group;\n" ::: "memory"); };

  // The first kStages - 1 blocks are requested before the query is read.
  unsigned ok_bits = 0;  // bit s: the block in stage s lies inside the cache
  const std::int64_t step = gridDim.x;
  std::int64_t j = blockIdx.x;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (j + s * step < row_blocks && fetch(j + s * step, s)) ok_bits |= 1u << s;
    commit();
  }

  // B fragments of this warp's heads, f16. Lane tig owns the fp8 words [tig * kChunks, + kChunks) of a token
  // (channels 32tig.. at DI = 128): MMA step c takes word tig * kChunks + c, so b[nt][c][0] = its channels
  // {0, 1} of head nt*8 + g and b[nt][c][1] = channels {2, 3}. The A reads below use the same words of the
  // keys, whose banks (token stride DI/4 + 1 words) are then distinct across the warp at DI = 128.
  const int head0 = head_half * kHeads;
  std::uint32_t b[kHeadTiles][kChunks][2];
#pragma unroll
  for (int nt = 0; nt < kHeadTiles; ++nt) {
    const std::uint32_t* qh =
        reinterpret_cast<const std::uint32_t*>(p.q + (r * p.heads + head0 + nt * 8 + g) * DI) + tig * kChunks;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const std::uint32_t word = __ldg(qh + c);
      b[nt][c][0] = fp8x2_to_f16x2(word);
      b[nt][c][1] = fp8x2_to_f16x2(word >> 16);
    }
  }
  float2 w[kHeadTiles];  // weights of heads nt*8 + 2tig and + 1
#pragma unroll
  for (int nt = 0; nt < kHeadTiles; ++nt) {
    const float* wp = p.weights + r * p.heads + head0 + nt * 8 + 2 * tig;
    w[nt] = make_float2(__ldg(wp), __ldg(wp + 1));
  }

  for (int stage = 0; j < row_blocks; j += step, stage = stage == kStages - 1 ? 0 : stage + 1) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kStages - 2) : "memory");
    __syncthreads();  // stage ready for all; the stage refilled below was last read an iteration ago
    const int next_stage = stage == 0 ? kStages - 1 : stage - 1;
    const std::int64_t ahead = j + (kStages - 1) * step;
    if (ahead < row_blocks) {
      if (fetch(ahead, next_stage)) {
        ok_bits |= 1u << next_stage;
      } else {
        ok_bits &= ~(1u << next_stage);
      }
    }
    commit();

    const std::uint32_t* rows = keys[stage] + (tile * 16 + g) * kTokenWords + tig * kChunks;
    float acc[kHeadTiles][4];
#pragma unroll
    for (int nt = 0; nt < kHeadTiles; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const std::uint32_t lo = rows[c];                    // token g, word tig * kChunks + c
      const std::uint32_t hi = rows[8 * kTokenWords + c];  // token g + 8
      const std::uint32_t a[4] = {fp8x2_to_f16x2(lo), fp8x2_to_f16x2(hi), fp8x2_to_f16x2(lo >> 16),
                                  fp8x2_to_f16x2(hi >> 16)};
#pragma unroll
      for (int nt = 0; nt < kHeadTiles; ++nt) mma_f16(acc[nt], a, b[nt][c][0], b[nt][c][1]);
    }
    float sum_lo = 0.0f, sum_hi = 0.0f;  // tokens g and g + 8 of this tile
#pragma unroll
    for (int nt = 0; nt < kHeadTiles; ++nt) {
      sum_lo += fmaxf(acc[nt][0], 0.0f) * w[nt].x + fmaxf(acc[nt][1], 0.0f) * w[nt].y;
      sum_hi += fmaxf(acc[nt][2], 0.0f) * w[nt].x + fmaxf(acc[nt][3], 0.0f) * w[nt].y;
    }
    sum_lo += __shfl_xor_sync(0xffffffffu, sum_lo, 1);
    sum_hi += __shfl_xor_sync(0xffffffffu, sum_hi, 1);
    sum_lo += __shfl_xor_sync(0xffffffffu, sum_lo, 2);
    sum_hi += __shfl_xor_sync(0xffffffffu, sum_hi, 2);
    const int token = tile * 16 + g + tig * 8;  // lanes with tig < 2
    const float sum = tig == 0 ? sum_lo : sum_hi;
    if (head_half != 0 && tig < 2) partial[stage][head_half - 1][token] = sum;
    // The kSplit warps of this token tile: named barrier 1 + tile over their 32 * kSplit threads.
    asm volatile("bar.sync %0, %1;\n" ::"r"(1 + tile), "n"(32 * kSplit) : "memory");
    if (head_half == 0 && tig < 2) {
      const std::int64_t s = j * kBlock + token;
      if (s < allowed) {
        float total = sum;
#pragma unroll
        for (int h = 0; h < kSplit - 1; ++h) total += partial[stage][h][token];
        out[s] = (ok_bits >> stage) & 1u ? total * __uint_as_float(keys[stage][token * kTokenWords + kWords])
                                         : __int_as_float(0x7fffffff);
      } else if (s < p.n) {
        out[s] = -INFINITY;
      }
    }
  }
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

void launch(const IndexerParams& p, std::int64_t rows, int dim, int multiprocessors, cudaStream_t stream) {
  if (rows == 0) return;
  const std::int64_t blocks = (p.n + kBlock - 1) / kBlock;
  // One wave: two resident CTAs of 8 warps per SM over all rows; each CTA walks several cache blocks, prefetching.
  // Whole waves only: rounding up would leave a partial second wave (320 CTAs for 264 slots at B = 64).
  std::int64_t per_row = (2LL * multiprocessors) / rows;
  per_row = per_row < blocks ? per_row : blocks;
  per_row = per_row < 1 ? 1 : (per_row > 65535 ? 65535 : per_row);
  const dim3 grid(static_cast<unsigned>(per_row), static_cast<unsigned>(rows));
  if (p.heads == 64 || p.heads == 32) {
    // Two warps per token tile (kSplit = 2). kSplit = 4 (16 warps per CTA at 64 registers, twice the occupancy)
    // measured slower on the H100: 18.7 against 15.5 us at B = 1 (each key fragment converted by 4 warps).
    if (dim == 128) {
      if (p.heads == 64) indexer_logits_tokens_kernel<128, 64, 2><<<grid, 256, 0, stream>>>(p);
      else indexer_logits_tokens_kernel<128, 32, 2><<<grid, 256, 0, stream>>>(p);
    } else {
      if (p.heads == 64) indexer_logits_tokens_kernel<64, 64, 2><<<grid, 256, 0, stream>>>(p);
      else indexer_logits_tokens_kernel<64, 32, 2><<<grid, 256, 0, stream>>>(p);
    }
    return;
  }
  if (dim == 128) {
    indexer_logits_kernel<128, 8><<<grid, 256, 0, stream>>>(p);  // HI = 128
  } else {
    indexer_logits_kernel<64, 8><<<grid, 256, 0, stream>>>(p);  // HI = 128
  }
}

}  // namespace

std::string launch_indexer_logits(const IndexerLaunch& in, void* stream) {
  IndexerParams p{};
  p.q = in.q;
  p.weights = in.weights;
  p.cache = in.cache;
  p.block_table = in.block_table;
  p.positions = in.positions;
  p.sequence_of_row = in.sequence_of_row;
  p.logits = in.logits;
  p.n = in.n;
  p.num_blocks = in.num_blocks;
  p.heads = in.heads;
  p.sequences = in.sequences;
  p.max_blocks = in.max_blocks;
  p.blocks_per_sequence = in.blocks_per_sequence;
  launch(p, in.rows, in.dim, in.multiprocessors, static_cast<cudaStream_t>(stream));
  const cudaError_t status = cudaGetLastError();
  if (status == cudaSuccess) return {};
  return std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status) + " in indexer_logits_kernel launch";
}

}  // namespace keysel::cuda_kernels
