// Sparse attention on a GPU: the decode (one query token per sequence over its selected keys), the tiled prefill
// forward of one sequence, and the backward (SPEC §9).
//
// Declared in every build; without CUDA they throw keysel::Error("... built without CUDA") (and
// sparse_attention_prefill_cuda_supported returns false).
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

/// o[t,h] = sum_{s in A} softmax(scale * q[t,h] . K[s,kv(h)]) V[s,kv(h)] and its lse for every token of one
/// sequence (the o_A of SPEC §4, as keysel::sparse_attention_reference computes it): the tiled tensor-core forward
/// for prefills, where many neighbouring tokens share selected keys.
///   q:         bf16 [T, Hq, D] on Device::cuda(i), contiguous, 16-byte aligned (as k and v); D of 64 or 128
///   k, v:      bf16 [N, Hkv, D], [N, Hkv, Dv] on the same GPU, contiguous; Dv of 64 or 128; N >= 1; Hkv dividing
///              Hq and Hq / Hkv dividing 64
///   selection: int32 [T, G, W], G = group_count(granularity, Hq, Hkv), contiguous; granularity per_kv_head or
///              per_token (per_head only where Hq == Hkv, where it is per_kv_head). Entries are not read by the
///              host: an entry outside [0, N) (-1 padding included) is skipped and a key repeated in a row counts
///              once; the caller keeps entries allowed (s <= the token's position for a causal prefill)
///   scale:     softmax scale; 0 means 1/sqrt(D)
///   out:       bf16 or fp32 [T, Hq, Dv], contiguous; a row with no selected key gets zeros
///   lse:       fp32 [T, Hq] natural-log log-sum-exp of scale * q.k over the selection (-inf when empty),
///              contiguous; may be an empty view
///   stream:    a cudaStream_t (nullptr: the default stream); asynchronous with respect to the host.
/// A thread block takes a tile of 64 query rows (64 / g consecutive tokens x the g = Hq / Hkv heads of one key
/// head) and the union of their selections, in chunks of 64 keys: S = q K^T and P V on tensor cores (bf16 in, fp32
/// accumulate), an online softmax in fp32 with P rounded to bf16 before P V (as flash attention does). Each key
/// row of the union is read once per tile. Deterministic (no atomics). Scratch memory from keysel's stream-ordered
/// pool: 28 bytes per selection entry of whole tiles (T rounded up to a multiple of 64 / g) plus 16 per tile and
/// key head; fewer than 2^31 such entries. Shared memory per block: 72 KB at D = Dv = 64, 112 KB at D = Dv = 128
/// (sm_80 and sm_90 take every shape, sm_86 and sm_89 the smaller ones). A shape these kernels do not take
/// (another head dim, Hq / Hkv not dividing 64, per_head with g > 1, fp32 inputs, too many entries, too little
/// shared memory) throws keysel::Error naming the argument, so that a caller can run sparse_attention_decode_cuda
/// instead (one query row per "sequence" over a one-page cache); see sparse_attention_prefill_cuda_supported.
/// Throws keysel::Error (launching nothing) on a bad shape, dtype, device, pointer or scale.
void sparse_attention_prefill_cuda(const TensorView& q, const TensorView& k, const TensorView& v,
                                   const TensorView& selection, Granularity granularity, double scale,
                                   const TensorView& out, const TensorView& lse = {}, void* stream = nullptr);

/// Whether sparse_attention_prefill_cuda takes these tensors (with a bf16 out of the right shape): false where it
/// would throw for the tensors or the shape (the sizes, the GPU's shared memory included), true otherwise. Never
/// throws; false without CUDA.
bool sparse_attention_prefill_cuda_supported(const TensorView& q, const TensorView& k, const TensorView& v,
                                             const TensorView& selection, Granularity granularity);

/// Options of sparse_attention_backward_cuda.
struct CudaBackwardOptions {
  /// true: the deterministic kernel (the same bits on every run). false: the tiled tensor-core kernel where it
  /// takes the call (bf16 inputs; D and Dv of 64 or 128; Hq / Hkv dividing 64; per_kv_head or per_token, or
  /// per_head where Hq == Hkv; q, k, v, grad_out, grad_k, grad_v 16-byte aligned; fewer than 2^31 selection
  /// entries of whole tiles; 125 KB of shared memory per block at D = Dv = 128, 93 KB at 64), the deterministic
  /// kernel otherwise. The tiled kernel takes the tiles of sparse_attention_prefill_cuda: S, dP = dO V^T and the
  /// three products on tensor cores (bf16 in, fp32 accumulate), P and dS rounded to bf16 before dQ = scale dS K,
  /// dK = scale dS^T Q and dV = P^T dO (as flash attention's backward does), dK and dV added to memory with
  /// atomics. So it is NOT bitwise reproducible (the order of the atomics changes from run to run), an output's
  /// error is that of bf16 P and dS (at most 2^-7 of the sum of the absolute values of its terms), and a key
  /// repeated in one selection row counts once there. Scratch: 28 bytes per selection entry of whole tiles, 16
  /// per tile and key head, 4 per query row.
  bool deterministic = true;
};

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
///   options:   deterministic (default) or the tiled tensor-core kernel (CudaBackwardOptions)
/// The deterministic kernel: fp32 arithmetic, no atomics (each key's dK/dV is summed by one warp over the query
/// tokens that select it in ascending order). Scratch memory from keysel's stream-ordered pool: 16 bytes per
/// selection entry plus 16 per (key, key head) and 4 per query row. Throws keysel::Error (launching nothing) on
/// a bad shape, dtype, device or scale.
void sparse_attention_backward_cuda(const TensorView& q, const TensorView& k, const TensorView& v,
                                    const TensorView& selection, Granularity granularity, double scale,
                                    const TensorView& out, const TensorView& lse, const TensorView& grad_out,
                                    const TensorView& grad_q, const TensorView& grad_k, const TensorView& grad_v,
                                    void* stream = nullptr, const TensorView& grad_lse = {},
                                    const CudaBackwardOptions& options = {});

}  // namespace keysel
