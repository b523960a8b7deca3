// The Lightning Indexer on a GPU: fp8 e4m3 logits (SPEC §3) from a paged fp8 key cache, for decode (one query
// token per sequence) and prefill (many query tokens of one sequence), with tensor-core MMA; and the decode
// selection (logits + top-k).
//
// Declared in every build; without CUDA these throw keysel::Error("... built without CUDA").
#pragma once

#include "keysel/core/selection.h"
#include "keysel/core/tensor.h"

namespace keysel {

/// Tokens per block of the fp8 indexer key cache (as serving engines page it).
inline constexpr int kIndexerCacheBlock = 64;

/// fp8 e4m3 indexer keys, one fp32 scale per token: kI[s] = scale[s] * decode(fp8[s]).
struct CudaIndexerKeyCache {
  TensorView blocks;       // fp8_e4m3 [num_blocks, 64, DI + 4]: each token's DI fp8 values, then its fp32 scale
                           // (4 little-endian bytes, finite and > 0); the buffer must be 16-byte aligned
  TensorView block_table;  // int32 [S, max_blocks]: token s of sequence q is row s % 64 of block
                           // block_table[q, s / 64]; empty view: contiguous, sequence q owns blocks
                           // [q * ceil(N / 64), (q + 1) * ceil(N / 64)) with N = logits.size(1)
};

/// I[r, s] = scale[s] * sum_j weights[r, j] * ReLU(q[r, j] . k[s]) for s <= positions[r] (SPEC §3, fp8 products
/// accumulated in fp32 by the tensor cores), over the keys of sequence sequence_of_row[r].
///   q:               fp8_e4m3 [R, HI, DI] on Device::cuda(i), contiguous, 16-byte aligned; HI 32, 64
///                    or 128, DI 64 or 128
///   weights:         fp32 [R, HI]: the per-head weights with q's per-head scale (and any softmax scale)
///                    folded in
///   cache:           as above, on the same GPU, with the same DI
///   positions:       int32 [R]: row r scores keys 0 .. min(positions[r], N - 1) (decode: length - 1)
///   logits:          fp32 [R, N], contiguous; every element is written: -inf beyond the row's allowed keys,
///                    NaN for keys whose block index in block_table lies outside the cache
///   sequence_of_row: int32 [R] or empty (row r reads sequence r, decode). Prefill: R query tokens, each
///                    naming its sequence (all 0 for one sequence), positions = pos(t); consecutive tokens of
///                    one sequence share every cache block read (sm_90a builds on sm_90 GPUs).
///   stream:          a cudaStream_t (nullptr: default stream); asynchronous with respect to the host.
/// Needs a GPU of compute capability 8.9 or newer (fp8 MMA). Positions, table entries and sequence indices are
/// not read by the host; out-of-range ones give -inf / NaN rows instead of out-of-bounds reads.
void lightning_indexer_logits_cuda(const TensorView& q, const TensorView& weights, const CudaIndexerKeyCache& cache,
                                   const TensorView& positions, const TensorView& logits,
                                   const TensorView& sequence_of_row = {}, void* stream = nullptr);

/// Decode selection: the logits above into scratch memory, then select_topk_cuda with `policy`.
///   selection: int32 [R, 1, policy.width()] on the same GPU (one selection group per token: DeepSeek Sparse
///              Attention shares it across heads).
///   workspace: empty (scratch from a stream-ordered pool) or the caller's device memory of at least
///              lightning_indexer_topk_cuda_workspace_bytes(R, n_keys) bytes, as select_topk_cuda takes it.
void lightning_indexer_topk_cuda(const TensorView& q, const TensorView& weights, const CudaIndexerKeyCache& cache,
                                 const TensorView& positions, std::int64_t n_keys, const SelectionPolicy& policy,
                                 const TensorView& selection, const TensorView& sequence_of_row = {},
                                 void* stream = nullptr, const TensorView& workspace = {});

/// Bytes of device memory lightning_indexer_topk_cuda may use for R rows of n_keys keys (fp32 logits, 256-byte
/// aligned, then the top-k's scratch); plain arithmetic, also without CUDA.
std::int64_t lightning_indexer_topk_cuda_workspace_bytes(std::int64_t rows, std::int64_t n_keys);

}  // namespace keysel
