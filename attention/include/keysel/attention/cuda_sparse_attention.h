// Sparse attention decode on a GPU: exact attention of one query token per sequence over its selected keys.
//
// Declared in every build; without CUDA it throws keysel::Error("... built without CUDA").
#pragma once

#include "keysel/core/selection.h"
#include "keysel/core/tensor.h"

namespace keysel {

/// A bf16 KV cache of a batch of sequences, paged as serving engines page it, or contiguous.
struct CudaKvCache {
  TensorView k;            // bf16 [num_blocks, block_size, Hkv, D]; contiguous: [B, N, Hkv, D] (block b = sequence b)
  TensorView v;            // bf16 [num_blocks, block_size, Hkv, Dv], same layout as k
  TensorView block_table;  // int32 [B, max_blocks]: token s of sequence b is row s % block_size of block
                           // block_table[b, s / block_size]; empty view: contiguous cache (num_blocks == B)
};

/// o[b,h] = sum_{s in A} softmax(scale * q[b,h] . K[s,kv(h)]) V[s,kv(h)] over the selection A of h's group,
/// renormalised on A (the o_A of SPEC §4, as keysel::sparse_attention_reference computes it for T = 1).
///   q:         bf16 [B, Hq, D] on Device::cuda(i), contiguous
///   cache:     bf16 K/V on the same GPU (D == Dv, one of 64, 128, 256); Hq % Hkv == 0
///   selection: int32 [B, G, W], G = group_count(granularity, Hq, Hkv); -1 entries are skipped. Entries are not
///              read by the host: an entry outside the cache (>= max_blocks * block_size, or a block index out
///              of range) is skipped rather than read; the caller keeps entries distinct and allowed.
///   scale:     softmax scale; 0 means 1/sqrt(D)
///   out:       fp32 or bf16 [B, Hq, Dv], contiguous; a head with no selected key gets zeros
///   lse:       fp32 [B, Hq] natural-log log-sum-exp of scale * q.k over the selection (-inf when empty);
///              may be an empty view
///   stream:    a cudaStream_t (nullptr: the default stream); asynchronous with respect to the host.
/// The heads of a group that share a key head and a selection (GQA, per_kv_head or per_token) load each K/V row
/// once; the selected keys are split across thread blocks and the partial results merged by log-sum-exp.
/// Throws keysel::Error (launching nothing) on a bad shape, dtype, device, pointer or scale.
void sparse_attention_decode_cuda(const TensorView& q, const CudaKvCache& cache, const TensorView& selection,
                                  Granularity granularity, double scale, const TensorView& out,
                                  const TensorView& lse = {}, void* stream = nullptr);

}  // namespace keysel
