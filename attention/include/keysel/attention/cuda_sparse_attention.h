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

/// The backward of attention over a selection (SPEC §9) on a GPU: dQ, dK, dV of sum(out * grad_out) +
/// sum(lse * grad_lse), the selection held fixed; the CUDA counterpart of keysel::sparse_attention_backward, one
/// sequence per call.
///   q:         [T, Hq, D] on Device::cuda(i), contiguous; q, k, v, out and grad_out all bf16 or all fp32
///   k, v:      [N, Hkv, D], [N, Hkv, Dv] on the same GPU, contiguous; D, Dv <= 256; Hq % Hkv == 0
///   selection: int32 [T, G, W], G = group_count(granularity, Hq, Hkv), contiguous. Entries are not read by the
///              host: an entry outside [0, N) (-1 padding included) is skipped, a repeated entry counts once per
///              occurrence; the caller keeps entries distinct and allowed (the forward's selection)
///   scale:     softmax scale; 0 means 1/sqrt(D)
///   out:       the forward's output [T, Hq, Dv];  lse: fp32 [T, Hq], the forward's (-inf: an empty row)
///   grad_out:  [T, Hq, Dv]
///   grad_q, grad_k, grad_v: fp32 [T, Hq, D], [N, Hkv, D], [N, Hkv, Dv], contiguous, written in full
///   stream:    a cudaStream_t (nullptr: the default stream); asynchronous with respect to the host.
///   grad_lse:  d loss / d lse, fp32 [T, Hq] contiguous on the same GPU, or empty (no lse term): adds P * grad_lse
///              to dS (d lse / d logit = P); it changes dQ and dK, never dV; rows with no selected key ignore it
/// fp32 arithmetic; deterministic (no atomics: each key's dK/dV is summed by one warp over the query tokens that
/// select it in ascending order). Scratch memory from keysel's stream-ordered pool: 16 bytes per selection entry
/// plus 16 per (key, key head) and 4 per query row. Throws keysel::Error (launching nothing) on a bad shape,
/// dtype, device or scale.
void sparse_attention_backward_cuda(const TensorView& q, const TensorView& k, const TensorView& v,
                                    const TensorView& selection, Granularity granularity, double scale,
                                    const TensorView& out, const TensorView& lse, const TensorView& grad_out,
                                    const TensorView& grad_q, const TensorView& grad_k, const TensorView& grad_v,
                                    void* stream = nullptr, const TensorView& grad_lse = {});

}  // namespace keysel
