// DeepSeek-V3.2 (DSA) selection in the serving engines' own formats (docs/SPEC.md §7): the paged fp8 indexer
// cache's writer and reference logits on the CPU, and the engines' top-k over ranged rows on the CPU and on a GPU.
// The CUDA logits are in keysel/indexer/cuda_indexer.h (paged_mqa_logits_cuda, paged_mqa_topk_cuda,
// ragged_mqa_logits_cuda).
//
// Declared in every build; the CUDA functions throw keysel::Error("... built without CUDA") without CUDA.
#pragma once

#include <cstdint>

#include "keysel/core/tensor.h"

namespace keysel {

/// Where each row of a top-k over ranged rows lies (vLLM's top_k_per_row_prefill / _decode, SGLang's
/// fast_topk_v2): row r's keys begin at start = starts[r] (0 when `starts` is empty) and end, exclusive, at
///   ends[r]                                              when `ends` is given (int32 [R]);
///   start + lengths[r / next_n] - next_n + r % next_n + 1 when `lengths` is given (int32 [R / next_n]; with
///                                                        next_n = 1 simply start + lengths[r]).
/// Exactly one of ends and lengths. Bounds are clamped to the row: [max(start, 0), min(end, L)).
struct TopkRowBounds {
  TensorView starts;
  TensorView ends;
  TensorView lengths;
  std::int64_t next_n = 1;
};

/// Per row r of `logits` (fp32 [R, L], unit stride along L, any row stride): the k keys of its range with the
/// largest logits, as indices from the row's start, ascending, then -1 where the range holds fewer than k keys.
/// Equal logits prefer the lower index; NaN is never selected; -inf can be. The result is exactly select_topk's
/// (SPEC §2) over each row's range. selection: int32 [R, k], contiguous. CPU tensors.
void topk_rows(const TensorView& logits, const TopkRowBounds& bounds, std::int64_t k, const TensorView& selection);

/// topk_rows on a GPU (keysel's CUDA top-k; identical results). All tensors on one GPU; asynchronous on
/// `stream`; `workspace` as select_topk_cuda takes it, of topk_rows_cuda_workspace_bytes(R, L) bytes or more.
void topk_rows_cuda(const TensorView& logits, const TopkRowBounds& bounds, std::int64_t k,
                    const TensorView& selection, void* stream = nullptr, const TensorView& workspace = {});

/// Bytes of device memory topk_rows_cuda may use for R rows of L logits (an upper bound for every GPU).
std::int64_t topk_rows_cuda_workspace_bytes(std::int64_t rows, std::int64_t n);

/// The engines' indexer-cache writer (vLLM's indexer_k_quant_and_cache), on the CPU: each row t of k (fp32,
/// bf16 or fp16 [T, DI], DI 64 or 128) is quantised with one scale per token, scale = max(amax, 1e-4) / 448,
/// rounded up to a power of two when `power_of_two_scale` (the "ue8m0" scale format), values = fp8 e4m3 of
/// k / scale (round to nearest even, saturating), and written into page slot_mapping[t] / 64, row
/// slot_mapping[t] % 64 of `cache` (fp8_e4m3 pages as CudaIndexerKeyCache::blocks; a negative slot skips the
/// row). Every slot is checked before anything is written.
void indexer_k_quant_and_cache(const TensorView& k, const TensorView& cache, const TensorView& slot_mapping,
                               bool power_of_two_scale = true);

/// The paged decode logits in double precision (the reference of paged_mqa_logits_cuda): q fp8_e4m3 [B, next_n,
/// HI, DI], weights fp32 [B * next_n, HI], cache pages and block_table int32 [B, max_blocks], context_lens int32
/// [B] or [B, next_n] with paged_mqa_logits_cuda's meaning; logits fp32 or fp64 [B * next_n, N] (-inf beyond each
/// row's keys). CPU tensors.
void paged_mqa_logits_reference(const TensorView& q, const TensorView& weights, const TensorView& cache,
                                const TensorView& block_table, const TensorView& context_lens,
                                const TensorView& logits);

/// The ragged prefill logits in double precision (the reference of ragged_mqa_logits_cuda, same arguments): q
/// fp8_e4m3 [M, HI, DI], weights fp32 [M, HI], key_values fp8_e4m3 [N, DI], key_scales fp32 [N], starts / ends
/// int32 [M]; logits fp32 or fp64 [M, N], -inf outside [max(starts[t], 0), min(ends[t], N)). CPU tensors.
void ragged_mqa_logits_reference(const TensorView& q, const TensorView& weights, const TensorView& key_values,
                                 const TensorView& key_scales, const TensorView& starts, const TensorView& ends,
                                 const TensorView& logits);

/// The decode selection on the CPU (the reference of paged_mqa_topk_cuda): paged_mqa_logits_reference's logits
/// over n_keys keys rounded to float32, then topk_rows of each row over its own keys. selection: int32
/// [B * next_n, k], contiguous.
void paged_mqa_topk_reference(const TensorView& q, const TensorView& weights, const TensorView& cache,
                              const TensorView& block_table, const TensorView& context_lens, std::int64_t n_keys,
                              std::int64_t k, const TensorView& selection);

}  // namespace keysel
