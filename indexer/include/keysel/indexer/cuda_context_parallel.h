// Context parallelism on GPUs (SPEC §10): one sequence's keys sharded by position over the R ranks of a NCCL
// communicator the caller created, one GPU per rank. The per-rank steps are keysel's CUDA top-k and sparse
// attention on the rank's shard; the ranks exchange candidates and partial outputs with ncclAllGather.
//
// Every call is asynchronous on `stream` and reads nothing back to the host (positions, counts and candidates stay
// on the GPU), so a decode step can be captured in a CUDA graph where NCCL allows it (NCCL 2.9.6+ collectives on a
// capturing stream). Every rank of the communicator makes the same calls in the same order, with consistent shapes.
//
// Declared in every build; without CUDA and NCCL (KEYSEL_NCCL in keysel/core/build_config.h) the calls throw
// keysel::Error("... built without NCCL").
#pragma once

#include <cstdint>

#include "keysel/attention/cuda_sparse_attention.h"
#include "keysel/core/selection.h"
#include "keysel/core/tensor.h"
#include "keysel/indexer/context_parallel.h"

typedef struct ncclComm* ncclComm_t;  // NCCL's own declaration (nccl.h): this header needs no NCCL header

namespace keysel {

/// The number of positions rank `rank` holds among 0..n-1 under `shards` (plain arithmetic; ContextShards::positions
/// lists them): the extent of that rank's local scores and cache.
std::int64_t context_shard_size(const ContextShards& shards, std::int64_t rank, std::int64_t n);

/// This rank's part of a context-parallel select_topk on its GPU (the all-gather exchange of SPEC §10):
///   comm:         the caller's communicator of R ranks, one per GPU; this rank is ncclCommUserRank(comm)
///   shards:       how positions 0..n_keys-1 are spread (shards.ranks == R)
///   local_scores: fp32 [T, G, n_local] on this rank's GPU, contiguous: the scores of this rank's positions
///                 (context_shard_size of them, ascending), e.g. keysel's CUDA Lightning Indexer over its shard
///   positions:    int32 [T] on the same GPU: row t may read keys s <= positions[t]; a batch of B sequences
///                 decoding one token each is T = B rows (positions[b] = length[b] - 1, every sequence sharded
///                 by the same n_keys), prefill is T rows of one sequence
///   selection:    int32 [T, G, policy.width()] on the same GPU, contiguous: on every rank exactly select_topk's
///                 output on the whole score rows (the same keys, in the same order, -1 padding)
///   workspace:    empty (stream-ordered scratch from keysel's pool) or device memory of at least
///                 select_topk_context_parallel_cuda_workspace_bytes bytes, 16-byte aligned (nothing allocated)
/// Steps: the free keys' scores are masked (kept keys and keys past the row's end become NaN), select_topk_cuda
/// picks each row's best k as candidates (score, global position), ncclAllGather brings every rank's candidates
/// (R x k x 8 bytes per row received), and select_topk_cuda over the candidates merged in position order picks
/// the row's best `fill`. Throws keysel::Error (launching nothing) on bad arguments.
void select_topk_context_parallel_cuda(ncclComm_t comm, const ContextShards& shards, const TensorView& local_scores,
                                       const TensorView& positions, std::int64_t n_keys,
                                       const SelectionPolicy& policy, const TensorView& selection,
                                       void* stream = nullptr, const TensorView& workspace = {});

/// Workspace bytes of select_topk_context_parallel_cuda (plain arithmetic, every build).
std::int64_t select_topk_context_parallel_cuda_workspace_bytes(std::int64_t tokens, std::int64_t groups,
                                                               std::int64_t n_local, const SelectionPolicy& policy,
                                                               std::int64_t ranks);

/// This rank's part of context-parallel sparse attention on its GPU: sparse_attention_decode_cuda over the
/// selected keys this rank holds, then the R partial (o, lse) are all-gathered and merged by log-sum-exp in rank
/// order (the same result on every rank).
///   q:           bf16 [B, Hq, D] on this rank's GPU (every rank the same queries)
///   local_cache: this rank's rows of the K/V cache, row j = its j-th position (ascending): contiguous
///                [B, n_local, Hkv, D] or paged. Prefill rows of one sequence: a paged cache whose block_table
///                [T, max_blocks] repeats the sequence's blocks on every row
///   selection:   int32 [B, G, W] of global positions (select_topk_context_parallel_cuda's output)
///   out:         fp32 [B, Hq, Dv];  lse: fp32 [B, Hq] or empty
/// Throws keysel::Error on bad arguments, before any NCCL call.
void sparse_attention_context_parallel_cuda(ncclComm_t comm, const ContextShards& shards, std::int64_t n_keys,
                                            const TensorView& q, const CudaKvCache& local_cache,
                                            const TensorView& selection, Granularity granularity, double scale,
                                            const TensorView& out, const TensorView& lse = {},
                                            void* stream = nullptr, const TensorView& workspace = {});

/// Workspace bytes of sparse_attention_context_parallel_cuda (plain arithmetic, every build).
std::int64_t sparse_attention_context_parallel_cuda_workspace_bytes(std::int64_t batch, std::int64_t query_heads,
                                                                    std::int64_t value_dim, std::int64_t groups,
                                                                    std::int64_t width, std::int64_t ranks);

}  // namespace keysel
