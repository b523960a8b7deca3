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

/// fp8 e4m3 indexer keys, one fp32 scale per token: kI[s] = scale[s] * decode(fp8[s]), in the serving engines'
/// paged layout (vLLM's and SGLang's DeepSeek-V3.2 indexer cache, DeepGEMM's kv_cache; docs/SPEC.md §7): a page
/// of 64 tokens is 64 * (DI + 4) bytes, the 64 tokens' DI fp8 values first (token i at bytes [i * DI, (i + 1) *
/// DI)), then their 64 fp32 scales (token i's at byte 64 * DI + 4 * i; finite and > 0).
struct CudaIndexerKeyCache {
  TensorView blocks;       // fp8_e4m3 (or uint8 reinterpreted) pages: [num_blocks, 64 * (DI + 4)], or the same
                           // bytes viewed as [num_blocks, 64, DI + 4] or [num_blocks, 64, 1, DI + 4]; contiguous,
                           // 16-byte aligned
  TensorView block_table;  // int32 [S, max_blocks]: token s of sequence q is row s % 64 of block
                           // block_table[q, s / 64]; empty view: contiguous, sequence q owns blocks
                           // [q * ceil(N / 64), (q + 1) * ceil(N / 64)) with N = logits.size(1)
};

/// I[r, s] = scale[s] * sum_j weights[r, j] * ReLU(q[r, j] . k[s]) for s <= positions[r] (SPEC §3, fp8 products
/// accumulated in fp32 by the tensor cores), over the keys of sequence sequence_of_row[r].
///   q:               fp8_e4m3 [R, HI, DI] on Device::cuda(i), contiguous, 16-byte aligned; HI 16, 32, 64
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

/// DeepSeek-V3.2's decode logits over the paged cache as DeepGEMM's fp8_paged_mqa_logits defines them (SPEC §7):
/// B sequences with next_n query tokens each (multi-token prediction).
///   q:            fp8_e4m3 [B, next_n, HI, DI], contiguous, 16-byte aligned; next_n 1 to 4, HI 16/32/64/128,
///                 DI 64/128
///   weights:      fp32 [B * next_n, HI] (the query scales folded in)
///   cache:        the paged cache; its block_table int32 [B, max_blocks] is required
///   context_lens: int32 [B]: row b * next_n + i reads keys s < context_lens[b] - next_n + i + 1 (the last token
///                 of a sequence reads all its keys), or [B, next_n]: row (b, i) reads s < context_lens[b, i]
///   logits:       fp32 [B * next_n, N], contiguous: I[r, s] as lightning_indexer_logits_cuda, -inf beyond each
///                 row's keys; N bounds the keys read.
void paged_mqa_logits_cuda(const TensorView& q, const TensorView& weights, const CudaIndexerKeyCache& cache,
                           const TensorView& context_lens, const TensorView& logits, void* stream = nullptr);

/// DeepSeek-V3.2's prefill logits as DeepGEMM's fp8_mqa_logits defines them (SPEC §7): M query tokens, each over
/// its own range of one contiguous key array (the keys of a ragged batch of sequences laid end to end).
///   q:          fp8_e4m3 [M, HI, DI], contiguous, 16-byte aligned; HI 16/32/64/128, DI 64/128
///   weights:    fp32 [M, HI] (the query scales folded in), contiguous
///   key_values: fp8_e4m3 [N, DI], contiguous, 16-byte aligned; key_scales: fp32 [N], contiguous
///   starts, ends: int32 [M]: row t reads keys [max(starts[t], 0), min(ends[t], N)) (empty when end <= start)
///   logits:     fp32 [M, N], contiguous: I[t, s] = key_scales[s] * sum_j weights[t, j] * ReLU(q[t, j] . k[s])
///               inside the row's range, -inf everywhere else (every element is written).
/// Runs the tensor-core indexer kernels (sm_90a wgmma on sm_90 GPUs with 256 / HI rows sharing every key block;
/// mma.sync elsewhere); needs compute capability 8.9+. starts / ends are not read by the host.
void ragged_mqa_logits_cuda(const TensorView& q, const TensorView& weights, const TensorView& key_values,
                            const TensorView& key_scales, const TensorView& starts, const TensorView& ends,
                            const TensorView& logits, void* stream = nullptr);

/// The decode selection of DeepSeek-V3.2: paged_mqa_logits_cuda's logits (into the workspace or stream-ordered
/// scratch; at small B they stay in L2), then per row the k keys of largest logit among its own.
///   selection: int32 [B * next_n, k] on the same GPU: key positions ascending, then -1 (rows with fewer than k
///              keys); equal logits prefer the lower position, NaN is never selected.
///   workspace: as lightning_indexer_topk_cuda (paged_mqa_topk_cuda_workspace_bytes = its bytes for R = B * next_n).
void paged_mqa_topk_cuda(const TensorView& q, const TensorView& weights, const CudaIndexerKeyCache& cache,
                         const TensorView& context_lens, std::int64_t n_keys, std::int64_t k,
                         const TensorView& selection, void* stream = nullptr, const TensorView& workspace = {});

/// Bytes of device memory lightning_indexer_topk_cuda may use for R rows of n_keys keys (fp32 logits, 256-byte
/// aligned, then the top-k's scratch); plain arithmetic, also without CUDA.
std::int64_t lightning_indexer_topk_cuda_workspace_bytes(std::int64_t rows, std::int64_t n_keys);

}  // namespace keysel
