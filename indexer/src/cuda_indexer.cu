// fp8 Lightning Indexer logits with tensor-core MMA (see keysel/indexer/cuda_indexer.h).
//
// Three kernels; launch() takes the first that fits:
//   indexer_logits_wgmma_kernel (sm_90a builds on sm_90 GPUs): warpgroup MMA on the fp8 values (QGMMA), bulk
//     copies of the cache blocks, decode (one query row per CTA) and prefill (256 / HI query rows share every
//     cache block). Described above the kernel.
//   indexer_logits_tokens_kernel (HI of 16, 32 or 64, other builds and GPUs): fp16 mma.sync on exactly converted fp8.
//   indexer_logits_kernel (HI = 128, other builds and GPUs):
// Grid (CTAs per row, R); HI/16 warps. Warp w holds the A fragments of heads [16w, 16w + 16) for all of DI in
// registers (fp8, loaded once). For each 64-token cache block of its row (blocks blockIdx.x, + gridDim.x, ...):
//   the block's 64 * (DI + 4) bytes (the engines' page: 64 tokens' DI fp8 values, then their 64 fp32 scales)
//   arrive by 4-byte cp.async in a three-stage ring, spread into shared memory with a padded token stride
//   (DI/4 + 4 words: the B-fragment reads are free of bank conflicts), then each warp runs
//   mma.m16n8k32.e4m3 (16 heads x 8 tokens x 32 channels, fp32 accumulate) over 8 token tiles x DI/32 steps,
//   applies ReLU and the head weights, sums its 16 heads by shuffles; warps add through shared memory and the
//   token's scale multiplies the sum.
#include <cuda_fp8.h>

#include <atomic>
#include <cstdint>

#include "cuda_indexer_launch.h"
#include "cuda_pdl.cuh"
#include "mtp_rows.h"

namespace keysel::cuda_kernels {
namespace {

constexpr int kBlock = 64;

struct IndexerParams {
  const std::uint8_t* q;            // [R, HI, DI]
  const float* weights;             // [R, HI]
  const std::uint8_t* cache;        // [num_blocks, 64 * (DI + 4)]: per page 64 x DI fp8 values, then 64 fp32 scales
  const std::int32_t* block_table;  // [S, max_blocks] or nullptr
  const std::int32_t* positions;    // [R], or nullptr when context_lens is given
  const std::int32_t* sequence_of_row;  // [R] or nullptr
  const std::int32_t* context_lens;     // [S] or [S, next_n] (lens_per_row), or nullptr: row r = (r / next_n, i)
  const float* key_scales;          // [N] with ragged rows (cache: fp8 values [N, DI], one array), else nullptr
  const std::int32_t* starts;       // [R] with ragged rows (row r reads keys [starts[r], ends[r])), else nullptr
  const std::int32_t* ends;         // [R] or nullptr
  float* logits;                    // [R, N]
  std::int64_t rows, n, num_blocks;
  int heads, sequences, max_blocks, blocks_per_sequence, next_n;
  bool lens_per_row;
};

/// Row r's sequence (seq) and the end of the keys it may read, min(pos + 1, N); 0 for a negative position or a
/// sequence outside the cache (GPU values are not validated on the host: such a row gets only -inf). `first`: the
/// first key it reads (0 but for ragged rows: max(starts[r], 0); an empty range gives end 0). kRagged: the
/// kernels' compile-time switch between ragged rows (p.starts, p.ends, p.key_scales) and every other form, so the
/// paged and prefill kernels keep their registers.
template <bool kRagged>
__device__ __forceinline__ std::int64_t row_allowed_keys(const IndexerParams& p, std::int64_t r, int& seq,
                                                         std::int64_t& first) {
  first = 0;
  std::int64_t pos = 0;
  if constexpr (kRagged) {  // ragged rows over one key array
    seq = 0;
    const std::int64_t begin = p.starts[r] > 0 ? p.starts[r] : 0;
    const std::int64_t end = p.ends[r] < p.n ? p.ends[r] : p.n;
    if (end <= begin) return 0;
    first = begin;
    return end;
  }
  if (p.context_lens) {  // decode with next_n query tokens per sequence (multi-token prediction)
    seq = static_cast<int>(r / p.next_n);
    const int i = static_cast<int>(r % p.next_n);
    pos = p.lens_per_row ? static_cast<std::int64_t>(p.context_lens[r]) - 1
                         : detail::mtp_row_keys(p.context_lens[seq], p.next_n, i) - 1;
  } else {
    seq = p.sequence_of_row ? p.sequence_of_row[r] : static_cast<int>(r);
    pos = p.positions[r];
  }
  const bool row_ok = seq >= 0 && seq < p.sequences &&
                      (p.block_table || static_cast<std::int64_t>(seq + 1) * p.blocks_per_sequence <= p.num_blocks);
  if (!row_ok || pos < 0) return 0;
  return pos + 1 < p.n ? pos + 1 : p.n;
}

/// Keys of block `block` present in a ragged key array of n keys (64 but for the last block).
__device__ __forceinline__ int ragged_block_tokens(const IndexerParams& p, std::int64_t block) {
  const std::int64_t left = p.n - block * kBlock;
  return left < kBlock ? static_cast<int>(left) : kBlock;
}

/// -inf into out[from, n), spread over the grid's x dimension (kThreads threads per block).
template <int kThreads>
__device__ __forceinline__ void fill_minus_infinity(float* out, std::int64_t from, std::int64_t n) {
  for (std::int64_t s = from + static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x; s < n;
       s += static_cast<std::int64_t>(gridDim.x) * kThreads) {
    out[s] = -INFINITY;
  }
}

struct LaunchContext {
  int multiprocessors;
  int device;
  bool programmatic;                           // the wgmma kernel is launched as a programmatic dependent
  bool portable_only;                          // KEYSEL_CUDA_PORTABLE: never the wgmma kernel
  mutable cudaError_t error = cudaSuccess;     // of a launch through cudaLaunchKernelEx
};

/// Lane (g, tig)'s DI/16 consecutive fp8 words of one token row in shared memory (a page's token stride, DI
/// bytes), from word tig * DI/16: the words the MMA fragments below take. 16-byte loads. At DI = 128 a lane needs
/// two 16-byte chunks and rows lie 128 bytes apart, so lanes g and g + 1 of an eight-lane phase would hit the
/// same bank group; lanes of odd g load their two chunks in the other order, and every load is conflict-free.
template <int DI>
__device__ __forceinline__ void load_token_words(const std::uint32_t* row, int g, int tig,
                                                 std::uint32_t (&w)[DI / 16]) {
  const uint4* v = reinterpret_cast<const uint4*>(row) + tig * (DI / 64);
  if constexpr (DI == 128) {
    const int odd = g & 1;
    const uint4 first = v[odd];
    const uint4 second = v[1 - odd];
    const uint4 x = odd ? second : first;
    const uint4 y = odd ? first : second;
    w[0] = x.x, w[1] = x.y, w[2] = x.z, w[3] = x.w, w[4] = y.x, w[5] = y.y, w[6] = y.z, w[7] = y.w;
  } else {
    const uint4 x = v[0];
    w[0] = x.x, w[1] = x.y, w[2] = x.z, w[3] = x.w;
  }
}

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

template <int DI, int kWarps, bool kRagged>
__global__ void __launch_bounds__(kWarps * 32, 16 / kWarps) indexer_logits_kernel(const IndexerParams p) {
  constexpr int kWords = DI / 4;              // key words per token
  constexpr int kStride = kWords + 4;         // padded shared-memory stride in words
  constexpr int kPageWords = kBlock * (kWords + 1);  // a page: 64 tokens' key words, then their 64 scales
  constexpr int kSteps = DI / 32;
  constexpr int kThreads = kWarps * 32;
  __shared__ __align__(16) std::uint32_t keys[3][kBlock * kStride];
  __shared__ float scales[3][kBlock];
  __shared__ float partial[kWarps][kBlock];

  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
  const std::int64_t r = blockIdx.y;
  int seq = 0;
  std::int64_t first = 0;
  const std::int64_t allowed = row_allowed_keys<kRagged>(p, r, seq, first);
  const std::int64_t row_blocks = (allowed + kBlock - 1) / kBlock;
  const std::int64_t first_block = kRagged && allowed > 0 ? first / kBlock : 0;
  float* out = p.logits + r * p.n;

  fill_minus_infinity<kThreads>(out, row_blocks * kBlock, p.n);  // beyond the last allowed block
  if constexpr (kRagged) fill_minus_infinity<kThreads>(out, 0, first_block * kBlock);  // before the first
  if (first_block + static_cast<std::int64_t>(blockIdx.x) >= row_blocks) return;

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
    const std::uint32_t key_base = static_cast<std::uint32_t>(__cvta_generic_to_shared(keys[stage]));
    const std::uint32_t scale_base = static_cast<std::uint32_t>(__cvta_generic_to_shared(scales[stage]));
    if constexpr (kRagged) {  // values [N, DI] and scales [N] apart; keys past N are zero-filled
      const int tokens = ragged_block_tokens(p, block);
      const std::uint32_t* values = reinterpret_cast<const std::uint32_t*>(p.cache) + block * kBlock * kWords;
#pragma unroll 4
      for (int w = tid; w < kBlock * kWords; w += kThreads) {
        const int token = w / kWords;
        const int word = w % kWords;
        const std::uint32_t dst = key_base + 4u * static_cast<std::uint32_t>(token * kStride + word);
        const bool present = token < tokens;
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst),
                     "l"(present ? values + token * kWords + word : values), "r"(present ? 4 : 0)
                     : "memory");
      }
      if (tid < kBlock) {
        const bool present = tid < tokens;
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(scale_base + 4u * static_cast<std::uint32_t>(tid)),
                     "l"(p.key_scales + block * kBlock + (present ? tid : 0)), "r"(present ? 4 : 0)
                     : "memory");
      }
      return ok;
    }
    const std::uint32_t* src = reinterpret_cast<const std::uint32_t*>(p.cache) + block * kPageWords;
    // Key words: a warp copies whole tokens (kWords consecutive words each), no division by the token stride.
#pragma unroll 4
    for (int w = tid; w < kBlock * kWords; w += kThreads) {
      const int token = w / kWords;  // a power of two
      const int word = w % kWords;
      const std::uint32_t dst = key_base + 4u * static_cast<std::uint32_t>(token * kStride + word);
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src + token * kWords + word)
                   : "memory");
    }
    if (tid < kBlock) {
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(scale_base + 4u * static_cast<std::uint32_t>(tid)),
                   "l"(src + kBlock * kWords + tid)
                   : "memory");
    }
    return ok;
  };
  const auto commit = [] { asm volatile("cp.async.commit_group;\n" ::: "memory"); };

  unsigned ok_bits = 0;  // bit s: the block in stage s lies inside the cache
  const std::int64_t step = gridDim.x;
  std::int64_t j = first_block + blockIdx.x;
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
      if (s < allowed && (!kRagged || s >= first)) {
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
template <int DI, int HI, int kSplit, bool kRagged>
__global__ void __launch_bounds__(128 * kSplit, 2) indexer_logits_tokens_kernel(const IndexerParams p) {
  constexpr int kWords = DI / 4;
  constexpr int kPageWords = kBlock * (kWords + 1);  // a page as it is in the cache: key words, then 64 scales
  constexpr int kBlockVectors = kPageWords / 4;        // 16-byte pieces of one page
  constexpr int kChunks = DI / 16;          // f16 k16 steps
  constexpr int kHeads = HI / kSplit;       // heads per warp
  constexpr int kHeadTiles = kHeads / 8;
  constexpr int kThreads = 128 * kSplit;
  constexpr int kStages = 4;
  __shared__ __align__(16) std::uint32_t keys[kStages][kPageWords];  // raw pages, scales included
  __shared__ float partial[kStages][kSplit - 1][kBlock];

  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
  const int tile = warp & 3, head_half = warp >> 2;
  const std::int64_t r = blockIdx.y;
  int seq = 0;
  std::int64_t first = 0;
  const std::int64_t allowed = row_allowed_keys<kRagged>(p, r, seq, first);
  const std::int64_t row_blocks = (allowed + kBlock - 1) / kBlock;
  const std::int64_t first_block = kRagged && allowed > 0 ? first / kBlock : 0;
  float* out = p.logits + r * p.n;
  fill_minus_infinity<kThreads>(out, row_blocks * kBlock, p.n);  // beyond the last allowed block
  if constexpr (kRagged) fill_minus_infinity<kThreads>(out, 0, first_block * kBlock);  // before the first
  if (first_block + static_cast<std::int64_t>(blockIdx.x) >= row_blocks) return;

  auto fetch = [&](std::int64_t j, int stage) -> bool {
    std::int64_t block = p.block_table ? __ldg(p.block_table + static_cast<std::int64_t>(seq) * p.max_blocks + j)
                                       : static_cast<std::int64_t>(seq) * p.blocks_per_sequence + j;
    const bool ok = block >= 0 && block < p.num_blocks;
    if (!ok) block = 0;
    const std::uint32_t key_base = static_cast<std::uint32_t>(__cvta_generic_to_shared(keys[stage]));
    if constexpr (kRagged) {  // values [N, DI] and scales [N] apart, laid out as a page; past N: zeros
      const int tokens = ragged_block_tokens(p, block);
      constexpr int kValueVectors = kBlock * DI / 16;
      const uint4* values = reinterpret_cast<const uint4*>(p.cache + block * kBlock * DI);
#pragma unroll
      for (int v = tid; v < kValueVectors; v += kThreads) {
        const bool present = v < tokens * (DI / 16);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(key_base + 16u * static_cast<std::uint32_t>(v)),
                     "l"(present ? values + v : values), "r"(present ? 16 : 0)
                     : "memory");
      }
      if (tid < kBlock) {
        const bool present = tid < tokens;
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(key_base + static_cast<std::uint32_t>(
                                                                          kBlock * DI + 4 * tid)),
                     "l"(p.key_scales + block * kBlock + (present ? tid : 0)), "r"(present ? 4 : 0)
                     : "memory");
      }
      return ok;
    }
    const uint4* src16 = reinterpret_cast<const uint4*>(p.cache) + block * kBlockVectors;
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
  std::int64_t j = first_block + blockIdx.x;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (j + s * step < row_blocks && fetch(j + s * step, s)) ok_bits |= 1u << s;
    commit();
  }

  // B fragments of this warp's heads, f16. Lane tig owns the fp8 words [tig * kChunks, + kChunks) of a token
  // (channels 32tig.. at DI = 128): MMA step c takes word tig * kChunks + c, so b[nt][c][0] = its channels
  // {0, 1} of head nt*8 + g and b[nt][c][1] = channels {2, 3}. The A reads below take the same words of the
  // keys with 16-byte loads (load_token_words).
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

    const std::uint32_t* row = keys[stage] + (tile * 16 + g) * kWords;
    std::uint32_t words_lo[kChunks], words_hi[kChunks];  // tokens g and g + 8: words tig * kChunks + c
    load_token_words<DI>(row, g, tig, words_lo);
    load_token_words<DI>(row + 8 * kWords, g, tig, words_hi);
    float acc[kHeadTiles][4];
#pragma unroll
    for (int nt = 0; nt < kHeadTiles; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const std::uint32_t lo = words_lo[c];
      const std::uint32_t hi = words_hi[c];
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
      if (s < allowed && (!kRagged || s >= first)) {
        float total = sum;
#pragma unroll
        for (int h = 0; h < kSplit - 1; ++h) total += partial[stage][h][token];
        out[s] = (ok_bits >> stage) & 1u ? total * __uint_as_float(keys[stage][kBlock * kWords + token])
                                         : __int_as_float(0x7fffffff);
      } else if (s < p.n) {
        out[s] = -INFINITY;
      }
    }
  }
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

// ---------------------------------------------------------------------------------------------------------------
// sm_90a: warpgroup MMA on the fp8 values themselves (wgmma m64nNk32 e4m3, QGMMA in SASS), decode and prefill.
//
// One warpgroup (128 threads) per CTA, several CTAs per SM (5 at HI = 64, DI = 128 decode). A CTA serves a group
// of kRows query rows (1 for decode; 256 / HI for prefill, so the group's kRows x HI heads fill the MMA's N = 256)
// and walks the 64-token cache blocks blockIdx.x, + gridDim.x, ... of its rows. Per cache block:
//   A = the block's 64 tokens x DI (M = 64: warp w owns tokens 16w..16w+15), read from the raw page in shared
//       memory (token stride DI bytes, the scales after the 64 tokens) into registers by 16-byte loads free of
//       bank conflicts (load_token_words);
//   B = the group's kRows x HI query heads x DI, written once per CTA into shared memory in the K-major core-matrix
//       layout (8 heads x 16 bytes per core matrix, no swizzle) that the descriptor names;
//   D = fp32 [64 tokens, kRows x HI] in registers; ReLU, the head weights (shared memory) and the sum over a row's
//       heads stay in the thread (plus two shuffles): no cross-warp reduction.
// K order inside each k32 step is permuted identically for A and B (lane tig takes the words tig * DI/16 + ..
// of a token, so its A words come from DI/16 consecutive words), which the dot product does not see.
// Cache blocks arrive by bulk copy (cp.async.bulk, the TMA engine: one instruction per block, completion on an
// mbarrier) into a ring of stages, all but one of them in flight per CTA, the first ones requested before the
// query is laid out. Prefill (several rows per group) uses four stages. Decode (one row per group) uses two: the
// smaller ring lets about twice as many CTAs share an SM, and with more CTAs in flight the short one-wave decode
// kernel ramps up and drains faster (H100, B=1, N=131072: 8.7 us with 2 stages, 9.6 with 3, 10.5 with 4, as CUDA
// graphs; B=64 unchanged at 400 us). -DKEYSEL_INDEXER_DECODE_STAGES=N (2 <= N <= 4) sets the decode ring.
// Rows of a group on different sequences (possible only in prefill) are served one row per pass.
#ifndef KEYSEL_INDEXER_DECODE_STAGES
#define KEYSEL_INDEXER_DECODE_STAGES 2
#endif
static_assert(KEYSEL_INDEXER_DECODE_STAGES >= 2 && KEYSEL_INDEXER_DECODE_STAGES <= 4, "decode ring of 2 to 4 stages");
template <int DI, int HI, int kRows>
struct WgmmaShape {
  static constexpr int kStages = kRows == 1 ? KEYSEL_INDEXER_DECODE_STAGES : 4;
  static constexpr int kSharedBytes = HI * kRows * (DI + 4) + kStages * kBlock * (DI + 4);  // B, weights, ring
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void wgmma_e4m3_n32(float (&d)[16], const std::uint32_t (&a)[4], std::uint64_t desc_b,
                                               int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
      "{%16, %17, %18, %19}, %20, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
}

__device__ __forceinline__ void wgmma_e4m3_n64(float (&d)[32], const std::uint32_t (&a)[4], std::uint64_t desc_b,
                                               int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
}

__device__ __forceinline__ void wgmma_e4m3_n16(float (&d)[8], const std::uint32_t (&a)[4], std::uint64_t desc_b,
                                               int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7}, "
      "{%8, %9, %10, %11}, %12, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
}

template <int N>
__device__ __forceinline__ void wgmma_tile(float (&d)[N / 2], const std::uint32_t (&a)[4], std::uint64_t desc_b,
                                           int accumulate) {
  if constexpr (N == 64) {
    wgmma_e4m3_n64(d, a, desc_b, accumulate);
  } else if constexpr (N == 32) {
    wgmma_e4m3_n32(d, a, desc_b, accumulate);
  } else {
    wgmma_e4m3_n16(d, a, desc_b, accumulate);
  }
}

/// Keeps the compiler from moving accumulator reads or writes across the asynchronous MMA's fence and wait.
template <int M>
__device__ __forceinline__ void fence_registers(float (&d)[M]) {
#pragma unroll
  for (int i = 0; i < M; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

/// mbarrier and bulk-copy (TMA, cp.async.bulk) helpers: one instruction moves a whole cache block; the barrier's
/// phase completes when its bytes have landed.
__device__ __forceinline__ void mbarrier_init(std::uint32_t bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void bulk_copy_block(std::uint32_t dst, const void* src, unsigned bytes, std::uint32_t bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}
__device__ __forceinline__ void mbarrier_wait(std::uint32_t bar, unsigned parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <int DI, int HI, int kRows, bool kRagged>
__global__ void __launch_bounds__(128) indexer_logits_wgmma_kernel(const IndexerParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kWords = DI / 4;
  constexpr int kBlockWords = kBlock * (kWords + 1);  // a page: 64 tokens' key words, then their 64 scales
  constexpr int kSteps = DI / 32;
  constexpr int kN = HI * kRows;
  constexpr int kTileN = HI < 64 ? HI : 64;
  constexpr int kTiles = kN / kTileN;
  constexpr int kStages = WgmmaShape<DI, HI, kRows>::kStages;
  constexpr int kSbo = DI * 8;  // bytes between the 8-head core-matrix rows of B
  constexpr int kTilesPerRow = HI / kTileN;
  extern __shared__ __align__(128) std::uint8_t smem[];
  std::uint8_t* b_tile = smem;                                                      // [kN/8][DI/16][8][16] fp8
  float* w_s = reinterpret_cast<float*>(smem + kN * DI);                            // [kN]
  std::uint32_t* keys = reinterpret_cast<std::uint32_t*>(smem + kN * DI + kN * 4);  // [kStages][kBlockWords]
  __shared__ std::int64_t allowed_s[kRows];
  __shared__ std::int64_t first_s[kRagged ? kRows : 1];  // first key of each row (ragged rows only)
  __shared__ int seq_s[kRows];
  __shared__ __align__(8) std::uint64_t full_bar[kStages];  // stage s's block has landed (phase parity)

  // Programmatic dependent launch: the CTAs of the next kernel may take this grid's place as its CTAs exit; this
  // grid may be resident before the stream's previous kernel ends, and reads or writes global memory only after it.
  pdl_trigger();
  pdl_wait();
  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
  const std::int64_t group = static_cast<std::int64_t>(gridDim.y) - 1 - blockIdx.y;  // longest prefill rows first
  const std::int64_t r0 = group * kRows;
  const int rows_here = static_cast<int>(p.rows - r0 < kRows ? p.rows - r0 : kRows);
  if (tid < kRows) {
    std::int64_t allowed = 0, first = 0;
    int seq = 0;
    if (tid < rows_here) {
      allowed = row_allowed_keys<kRagged>(p, r0 + tid, seq, first);
    }
    allowed_s[tid] = allowed;
    if constexpr (kRagged) first_s[tid] = first;
    seq_s[tid] = seq;
  }
  const std::uint32_t bar_base = static_cast<std::uint32_t>(__cvta_generic_to_shared(full_bar));
  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) mbarrier_init(bar_base + 8u * s, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  // Beyond each row's last allowed block and before its first (ragged rows): -inf.
#pragma unroll 1
  for (int rr = 0; rr < rows_here; ++rr) {
    float* out = p.logits + (r0 + rr) * p.n;
    const std::int64_t row_blocks = (allowed_s[rr] + kBlock - 1) / kBlock;
    for (std::int64_t s = row_blocks * kBlock + static_cast<std::int64_t>(blockIdx.x) * 128 + tid; s < p.n;
         s += static_cast<std::int64_t>(gridDim.x) * 128) {
      out[s] = -INFINITY;
    }
    if constexpr (kRagged) {
      const std::int64_t first_key = allowed_s[rr] > 0 ? first_s[rr] / kBlock * kBlock : 0;
      for (std::int64_t s = static_cast<std::int64_t>(blockIdx.x) * 128 + tid; s < first_key;
           s += static_cast<std::int64_t>(gridDim.x) * 128) {
        out[s] = -INFINITY;
      }
    }
  }

  // One pass when every row that reads keys is on the same sequence, else one pass per row.
  bool shared_sequence = true;
  int first_seq = -1;
  for (int rr = 0; rr < rows_here; ++rr) {
    if (allowed_s[rr] == 0) continue;
    if (first_seq < 0) first_seq = seq_s[rr];
    else if (seq_s[rr] != first_seq) shared_sequence = false;
  }
  const int passes = shared_sequence ? 1 : rows_here;

  const std::uint32_t b_base = static_cast<std::uint32_t>(__cvta_generic_to_shared(b_tile));
  const std::uint32_t key_base = static_cast<std::uint32_t>(__cvta_generic_to_shared(keys));
  unsigned mask = 0;              // rows of the current pass
  int seq = 0;                    // their sequence
  std::int64_t pass_first = 0;    // first cache block the pass reads (ragged rows; else 0)
  std::int64_t pass_blocks = 0;   // end of the cache blocks the pass reads
  unsigned ok_bits = 0;           // bit s: the block in stage s lies inside the cache
  unsigned phase_bits = 0;        // bit s: parity of stage s's next barrier phase
  const std::int64_t step = gridDim.x;

  // Block j of the pass into stage `stage`: one bulk copy issued by thread 0; every thread learns whether the
  // block lies inside the cache (else block 0 is read and the logits become NaN).
  const auto fetch = [&](std::int64_t j, int stage) -> bool {
    std::int64_t block = p.block_table ? __ldg(p.block_table + static_cast<std::int64_t>(seq) * p.max_blocks + j)
                                       : static_cast<std::int64_t>(seq) * p.blocks_per_sequence + j;
    const bool ok = block >= 0 && block < p.num_blocks;
    if (!ok) block = 0;
    if (tid == 0) {
      if constexpr (kRagged) {
        // Ragged rows: the block's values only (its tokens x DI bytes, a multiple of 16 that stops at key N); the
        // scales are read from global memory beside the MMA. Rows past N keep stale bytes whose logits are unused.
        bulk_copy_block(key_base + static_cast<std::uint32_t>(stage * kBlockWords * 4), p.cache + block * (kBlock * DI),
                        static_cast<unsigned>(ragged_block_tokens(p, block) * DI), bar_base + 8u * stage);
      } else {
        bulk_copy_block(key_base + static_cast<std::uint32_t>(stage * kBlockWords * 4),
                        p.cache + block * (kBlockWords * 4), kBlockWords * 4, bar_base + 8u * stage);
      }
    }
    return ok;
  };
  // Sets up pass `pass` and requests its first kStages - 1 cache blocks.
  const auto begin_pass = [&](int pass) {
    mask = shared_sequence ? (1u << rows_here) - 1u : 1u << pass;
    seq = shared_sequence ? (first_seq < 0 ? 0 : first_seq) : seq_s[pass];
    pass_blocks = 0;
    for (int rr = 0; rr < rows_here; ++rr) {
      const std::int64_t b = (allowed_s[rr] + kBlock - 1) / kBlock;
      if (((mask >> rr) & 1u) && b > pass_blocks) pass_blocks = b;
    }
    if constexpr (kRagged) {  // from the lowest first block of the pass's rows that read keys
      pass_first = -1;
      for (int rr = 0; rr < rows_here; ++rr) {
        if (!((mask >> rr) & 1u) || allowed_s[rr] == 0) continue;
        const std::int64_t f = first_s[rr] / kBlock;
        if (pass_first < 0 || f < pass_first) pass_first = f;
      }
      if (pass_first < 0) pass_first = 0;
    }
    ok_bits = 0;
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      const std::int64_t j = pass_first + static_cast<std::int64_t>(blockIdx.x) + s * step;
      if (j < pass_blocks && fetch(j, s)) ok_bits |= 1u << s;
    }
  };
  begin_pass(0);  // the first cache blocks fly while the query is laid out

  // B: head n of the group (row n / HI) in core matrix (n / 8, kc) at byte (n % 8) * 16 + t * 4, where the
  // query's fp8 word `word` = t * 2kSteps + 2ks + half lands in k32 step ks at k = half * 16 + 4t, i.e. core
  // matrix kc = 2ks + half = word % 2kSteps. 16-byte loads, all issued before the first store.
  {
    constexpr int kVectorsPerHead = DI / 16;
    constexpr int kVectors = kN * kVectorsPerHead;
    constexpr int kPerThread = (kVectors + 127) / 128;  // HI = 16, DI = 64 decode: 64 vectors, half the threads
    uint4 v[kPerThread];
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int vec = tid + u * 128;
      const int n = vec / kVectorsPerHead, rr = n / HI;
      v[u] = vec < kVectors && rr < rows_here ? __ldg(reinterpret_cast<const uint4*>(p.q + ((r0 + rr) * HI + n % HI) * DI) +
                                    vec % kVectorsPerHead)
                            : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int vec = tid + u * 128;
      if (vec >= kVectors) break;
      const int n = vec / kVectorsPerHead;
      const std::uint32_t words[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int word = (vec % kVectorsPerHead) * 4 + e;
        const int kc = word % (2 * kSteps), t = word / (2 * kSteps);
        *reinterpret_cast<std::uint32_t*>(b_tile + (n / 8) * kSbo + kc * 128 + (n % 8) * 16 + t * 4) = words[e];
      }
    }
  }
  for (int n = tid; n < kN; n += 128) {
    const int rr = n / HI;
    w_s[n] = rr < rows_here ? __ldg(p.weights + (r0 + rr) * HI + n % HI) : 0.0f;
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // B is read by the tensor cores (async proxy)
  __syncthreads();

#pragma unroll 1
  for (int pass = 0; pass < passes; ++pass) {
    if (pass > 0) begin_pass(pass);
    if (pass_first + static_cast<std::int64_t>(blockIdx.x) >= pass_blocks) continue;  // nothing was requested
    std::int64_t j = pass_first + blockIdx.x;
#pragma unroll 1
    for (int stage = 0; j < pass_blocks; j += step, stage = stage == kStages - 1 ? 0 : stage + 1) {
      __syncthreads();  // every warp is done with the stage refilled below (read an iteration ago)
      const int next_stage = stage == 0 ? kStages - 1 : stage - 1;
      const std::int64_t ahead = j + (kStages - 1) * step;
      if (ahead < pass_blocks) {
        if (fetch(ahead, next_stage)) {
          ok_bits |= 1u << next_stage;
        } else {
          ok_bits &= ~(1u << next_stage);
        }
      }
      float ragged_scale = 0.0f;  // ragged rows: token warp * 16 + g + 8 * tig's scale (lanes with tig < 2)
      if constexpr (kRagged) {
        const std::int64_t key = j * kBlock + warp * 16 + g + 8 * tig;
        if (tig < 2 && key < p.n) ragged_scale = __ldg(p.key_scales + key);
      }
      mbarrier_wait(bar_base + 8u * stage, (phase_bits >> stage) & 1u);
      phase_bits ^= 1u << stage;

      const std::uint32_t* block_words = keys + stage * kBlockWords;
      const std::uint32_t* row = block_words + (warp * 16 + g) * kWords;
      std::uint32_t words_lo[2 * kSteps], words_hi[2 * kSteps];  // tokens g and g + 8: words tig * 2kSteps + ..
      load_token_words<DI>(row, g, tig, words_lo);
      load_token_words<DI>(row + 8 * kWords, g, tig, words_hi);
      std::uint32_t a[kSteps][4];
#pragma unroll
      for (int ks = 0; ks < kSteps; ++ks) {
        a[ks][0] = words_lo[2 * ks];      // token g, k 4tig..
        a[ks][1] = words_hi[2 * ks];      // token g + 8
        a[ks][2] = words_lo[2 * ks + 1];  // token g, k 16 + 4tig..
        a[ks][3] = words_hi[2 * ks + 1];  // token g + 8
      }
      const float scale_lo =
          kRagged ? ragged_scale : __uint_as_float(block_words[kBlock * kWords + warp * 16 + g]);
      const float scale_hi =
          kRagged ? ragged_scale : __uint_as_float(block_words[kBlock * kWords + warp * 16 + g + 8]);

      float acc[kTiles][kTileN / 2];
#pragma unroll
      for (int t = 0; t < kTiles; ++t) fence_registers(acc[t]);
      asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
      for (int ks = 0; ks < kSteps; ++ks) {
#pragma unroll
        for (int t = 0; t < kTiles; ++t) {
          const std::uint32_t addr = b_base + static_cast<std::uint32_t>(t * (kTileN / 8) * kSbo + ks * 256);
          const std::uint64_t desc = static_cast<std::uint64_t>((addr & 0x3FFFFu) >> 4) |
                                     (static_cast<std::uint64_t>(128 >> 4) << 16) |
                                     (static_cast<std::uint64_t>(kSbo >> 4) << 32);
          wgmma_tile<kTileN>(acc[t], a[ks], desc, ks > 0 ? 1 : 0);
        }
      }
      asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
      asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#pragma unroll
      for (int t = 0; t < kTiles; ++t) fence_registers(acc[t]);

      const bool ok = (ok_bits >> stage) & 1u;
      const int token = warp * 16 + g + 8 * tig;  // lanes with tig < 2
      const std::int64_t s = j * kBlock + token;
#pragma unroll
      for (int rr = 0; rr < kRows; ++rr) {
        if (!((mask >> rr) & 1u)) continue;
        float lo = 0.0f, hi = 0.0f;  // tokens g and g + 8 of this warp's 16
#pragma unroll
        for (int t = rr * kTilesPerRow; t < (rr + 1) * kTilesPerRow; ++t) {
#pragma unroll
          for (int i = 0; i < kTileN / 8; ++i) {
            const float2 w = *reinterpret_cast<const float2*>(w_s + t * kTileN + i * 8 + 2 * tig);
            lo += fmaxf(acc[t][4 * i], 0.0f) * w.x + fmaxf(acc[t][4 * i + 1], 0.0f) * w.y;
            hi += fmaxf(acc[t][4 * i + 2], 0.0f) * w.x + fmaxf(acc[t][4 * i + 3], 0.0f) * w.y;
          }
        }
        lo += __shfl_xor_sync(0xffffffffu, lo, 1);
        hi += __shfl_xor_sync(0xffffffffu, hi, 1);
        lo += __shfl_xor_sync(0xffffffffu, lo, 2);
        hi += __shfl_xor_sync(0xffffffffu, hi, 2);
        if (tig < 2) {
          float* out = p.logits + (r0 + rr) * p.n;
          if (s < allowed_s[rr] && (!kRagged || s >= first_s[rr])) {
            out[s] = ok ? (tig == 0 ? lo * scale_lo : hi * scale_hi) : __int_as_float(0x7fffffff);
          } else if (s < p.n) {
            out[s] = -INFINITY;
          }
        }
      }
    }
    __syncthreads();  // the next pass refills the stages
  }
#else
  (void)p;  // not built for sm_90a: the host sees no static shared memory here and takes the other kernels
#endif
}

/// CTAs per SM of the wgmma kernel, or 0 when this binary has no sm_90a code for the GPU; read once per GPU (the
/// shared-memory limit is raised there) and cached (stored as value + 1; a race stores the same value twice).
template <int DI, int HI, int kRows, bool kRagged>
int wgmma_ctas_per_sm(int device) {
  static std::atomic<int> cache[64];
  const bool cached = device >= 0 && device < 64;
  if (cached) {
    const int known = cache[device].load(std::memory_order_acquire);
    if (known != 0) return known - 1;
  }
  const int ctas = [] {
    const auto kernel = indexer_logits_wgmma_kernel<DI, HI, kRows, kRagged>;
    cudaFuncAttributes attributes{};
    if (cudaFuncGetAttributes(&attributes, kernel) != cudaSuccess || attributes.sharedSizeBytes == 0) {
      cudaGetLastError();
      return 0;
    }
    constexpr int bytes = WgmmaShape<DI, HI, kRows>::kSharedBytes;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    int per_sm = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, 128, bytes) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return per_sm;
  }();
  if (cached) cache[device].store(ctas + 1, std::memory_order_release);
  return ctas;
}

template <int DI, int HI, int kRows, bool kRagged = false>
bool launch_wgmma(const IndexerParams& p, const LaunchContext& context, cudaStream_t stream) {
  const int multiprocessors = context.multiprocessors;
  const int per_sm = wgmma_ctas_per_sm<DI, HI, kRows, kRagged>(context.device);
  if (per_sm == 0) return false;
  const std::int64_t blocks = (p.n + kBlock - 1) / kBlock;
  const std::int64_t groups = (p.rows + kRows - 1) / kRows;
  // Whole waves: every CTA slot of the GPU over the groups, at most one CTA per cache block.
  std::int64_t per_group = (static_cast<std::int64_t>(per_sm) * multiprocessors) / groups;
  per_group = per_group < blocks ? per_group : blocks;
  per_group = per_group < 1 ? 1 : (per_group > 65535 ? 65535 : per_group);
  const dim3 grid(static_cast<unsigned>(per_group), static_cast<unsigned>(groups));
  const cudaError_t status = launch_kernel(indexer_logits_wgmma_kernel<DI, HI, kRows, kRagged>, grid, dim3(128),
                                          WgmmaShape<DI, HI, kRows>::kSharedBytes, stream, context.programmatic, p);
  if (status != cudaSuccess) context.error = status;
  return true;
}

template <int DI, int HI>
bool launch_wgmma_rows(const IndexerParams& p, const LaunchContext& context, cudaStream_t stream) {
  // Prefill (rows mapped onto sequences) and decode of next_n > 1 tokens per sequence: 256 / HI query rows share
  // each cache block; decode of one token per sequence: one row per CTA.
  if (p.ends) return launch_wgmma<DI, HI, 256 / HI, true>(p, context, stream);  // ragged rows (prefill)
  if (p.sequence_of_row || (p.context_lens && p.next_n > 1)) return launch_wgmma<DI, HI, 256 / HI>(p, context, stream);
  return launch_wgmma<DI, HI, 1>(p, context, stream);
}

bool launch_wgmma_any(const IndexerParams& p, int dim, const LaunchContext& context, cudaStream_t stream) {
  if (dim == 128) {
    if (p.heads == 16) return launch_wgmma_rows<128, 16>(p, context, stream);
    if (p.heads == 32) return launch_wgmma_rows<128, 32>(p, context, stream);
    if (p.heads == 64) return launch_wgmma_rows<128, 64>(p, context, stream);
    return launch_wgmma_rows<128, 128>(p, context, stream);
  }
  if (p.heads == 16) return launch_wgmma_rows<64, 16>(p, context, stream);
  if (p.heads == 32) return launch_wgmma_rows<64, 32>(p, context, stream);
  if (p.heads == 64) return launch_wgmma_rows<64, 64>(p, context, stream);
  return launch_wgmma_rows<64, 128>(p, context, stream);
}

/// The mma.sync kernels (other builds and GPUs, or KEYSEL_CUDA_PORTABLE), one row per CTA row of `grid`.
template <bool kRagged>
void launch_portable(const IndexerParams& p, int dim, dim3 grid, cudaStream_t stream) {
  if (p.heads <= 64) {
    // Two warps per token tile (kSplit = 2). kSplit = 4 (16 warps per CTA at 64 registers, twice the occupancy)
    // measured slower on the H100: 18.7 against 15.5 us at B = 1 (each key fragment converted by 4 warps).
    if (dim == 128) {
      if (p.heads == 64) indexer_logits_tokens_kernel<128, 64, 2, kRagged><<<grid, 256, 0, stream>>>(p);
      else if (p.heads == 32) indexer_logits_tokens_kernel<128, 32, 2, kRagged><<<grid, 256, 0, stream>>>(p);
      else indexer_logits_tokens_kernel<128, 16, 2, kRagged><<<grid, 256, 0, stream>>>(p);
    } else {
      if (p.heads == 64) indexer_logits_tokens_kernel<64, 64, 2, kRagged><<<grid, 256, 0, stream>>>(p);
      else if (p.heads == 32) indexer_logits_tokens_kernel<64, 32, 2, kRagged><<<grid, 256, 0, stream>>>(p);
      else indexer_logits_tokens_kernel<64, 16, 2, kRagged><<<grid, 256, 0, stream>>>(p);
    }
    return;
  }
  if (dim == 128) {
    indexer_logits_kernel<128, 8, kRagged><<<grid, 256, 0, stream>>>(p);  // HI = 128
  } else {
    indexer_logits_kernel<64, 8, kRagged><<<grid, 256, 0, stream>>>(p);  // HI = 128
  }
}

void launch(const IndexerParams& p, std::int64_t rows, int dim, const LaunchContext& context, cudaStream_t stream) {
  if (rows == 0) return;
  if (!context.portable_only && launch_wgmma_any(p, dim, context, stream)) return;  // sm_90a build, sm_90 GPU
  const int multiprocessors = context.multiprocessors;
  const std::int64_t blocks = (p.n + kBlock - 1) / kBlock;
  // One wave: two resident CTAs of 8 warps per SM over all rows; each CTA walks several cache blocks, prefetching.
  // Whole waves only: rounding up would leave a partial second wave (320 CTAs for 264 slots at B = 64).
  std::int64_t per_row = (2LL * multiprocessors) / rows;
  per_row = per_row < blocks ? per_row : blocks;
  per_row = per_row < 1 ? 1 : (per_row > 65535 ? 65535 : per_row);
  const dim3 grid(static_cast<unsigned>(per_row), static_cast<unsigned>(rows));
  if (p.ends) {
    launch_portable<true>(p, dim, grid, stream);  // ragged rows over one key array
  } else {
    launch_portable<false>(p, dim, grid, stream);
  }
}

}  // namespace

void launch_indexer_logits(std::string_view function, const IndexerLaunch& in, void* stream) {
  IndexerParams p{};
  p.q = in.q;
  p.weights = in.weights;
  p.cache = in.cache;
  p.block_table = in.block_table;
  p.positions = in.positions;
  p.sequence_of_row = in.sequence_of_row;
  p.context_lens = in.context_lens;
  p.next_n = in.next_n > 0 ? in.next_n : 1;
  p.lens_per_row = in.lens_per_row;
  p.key_scales = in.key_scales;
  p.starts = in.starts;
  p.ends = in.ends;
  p.logits = in.logits;
  p.rows = in.rows;
  p.n = in.n;
  p.num_blocks = in.num_blocks;
  p.heads = in.heads;
  p.sequences = in.sequences;
  p.max_blocks = in.max_blocks;
  p.blocks_per_sequence = in.blocks_per_sequence;
  const LaunchContext context{in.facts.multiprocessors, in.device, in.facts.programmatic, in.facts.portable_only};
  launch(p, in.rows, in.dim, context, static_cast<cudaStream_t>(stream));
  cudaError_t status = cudaGetLastError();
  if (status == cudaSuccess) status = context.error;
  cuda_glue::check(status, function, "indexer_logits_kernel launch");
}

}  // namespace keysel::cuda_kernels
