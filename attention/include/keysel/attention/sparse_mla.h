// Sparse MLA attention on the CPU (SPEC §8): DeepSeek-V3.2's attention over the selected keys, in MQA form.
//
// One latent per cached token, d_qk = 576 (512 latent channels + 64 RoPE channels), d_v = 512 (the latent
// channels); h_q query heads share it. For query token t and head h, over the valid slots A[t] of indices[t]:
//   l[s]            = scale * q[t,h] . kv[s]                             (all 576 channels)
//   max_logits[t,h] = max_{s in A[t]} l[s]
//   lse[t,h]        = log sum_{s in A[t]} exp(l[s])                      (natural log; the sink never enters it)
//   o[t,h]          = sum_{s in A[t]} exp(l[s]) * kv[s, :512] / (exp(lse[t,h]) + exp(attn_sink[h]))
// (FlashMLA's convention: the sink, an extra logit per head, only scales the output down, so that lse stays the
// state of the keys and partial results still merge by log-sum-exp.) A slot is valid when it is >= 0 (-1 marks an
// invalid one, anywhere in the row) and, with topk_length, among the first topk_length[t] entries of the row. A
// row with no valid slot gets o = 0 and lse = max_logits = -inf.
//
// The cache is either a plain latent cache, fp32 / bf16 / fp16 [N, 576] (slot s = row s), or DeepSeek-V3.2's fp8
// cache: pages [P, page_size, 656] of bytes per token = 512 fp8 e4m3 values | 4 fp32 scales (one per 128 values)
// | 64 bf16 RoPE values (slot s = token s % page_size of page s / page_size). mla_v32_quantize writes it.
#pragma once

#include <cstdint>

#include "keysel/attention/sparse_attention.h"
#include "keysel/core/tensor.h"

namespace keysel {

inline constexpr std::int64_t kMlaLatentDim = 512;     // d_v: the latent channels
inline constexpr std::int64_t kMlaRopeDim = 64;        // the RoPE channels after them
inline constexpr std::int64_t kMlaQkDim = 576;         // d_qk = 512 + 64
inline constexpr std::int64_t kMlaV32TokenBytes = 656;  // 512 fp8 + 4 x fp32 scale + 64 x bf16
inline constexpr std::int64_t kMlaV32ScaleGroup = 128;  // latent values per scale

/// Optional parts of a sparse MLA call.
struct SparseMlaOptions {
  double scale = 0.0;      // softmax scale; 0 means 1/sqrt(576)
  TensorView attn_sink;    // fp32 [h_q] or empty: an extra logit per head in the denominator
  TensorView topk_length;  // int32 [T] or empty: only the first topk_length[t] entries of row t count
};

/// Writes latents into the fp8 V3.2 cache: each row t of kv (fp32, bf16 or fp16 [T, 576]) goes to slot
/// slot_mapping[t] (int32 [T]; negative: skipped). Per group of 128 latent values scale = max(amax, 1e-4) / 448
/// rounded up to a power of two, values fp8 e4m3 of x / scale (round to nearest even, saturating); the 64 RoPE
/// values are stored as bf16 (round to nearest even). cache: fp8_e4m3 bytes [P, page_size, 656], CPU, contiguous.
/// Every slot is checked before anything is written.
void mla_v32_quantize(const TensorView& kv, const TensorView& cache, const TensorView& slot_mapping);

/// The V3.2 cache decoded exactly (fp8 x scale, bf16) into fp32 [P * page_size, 576].
void mla_v32_dequantize(const TensorView& cache, const TensorView& out);

/// Sparse MLA in double precision (the reference).
///   q:       fp32 / bf16 / fp16 [T, h_q, 576]
///   kv:      a latent cache [N, 576] or V3.2 pages [P, page_size, 656] (see above)
///   indices: int32 [T, topk]: slots, -1 invalid; valid slots are < N (P * page_size) and distinct in a row
///   out:     fp32 or fp64 [T, h_q, 512]; lse, max_logits: fp32 or fp64 [T, h_q], or empty
void sparse_mla_reference(const TensorView& q, const TensorView& kv, const TensorView& indices,
                          const TensorView& out, const TensorView& lse = {}, const SparseMlaOptions& options = {},
                          const TensorView& max_logits = {});

/// Sparse MLA in fp32 through keysel's CPU sparse attention (SIMD, OpenMP; the V3.2 cache decoded first):
/// the same contract, out fp32 [T, h_q, 512], lse and max_logits fp32 [T, h_q] or empty.
void sparse_mla(const TensorView& q, const TensorView& kv, const TensorView& indices, const TensorView& out,
                const TensorView& lse = {}, const SparseMlaOptions& options = {},
                const SparseAttentionOptions& attention = {}, const TensorView& max_logits = {});

/// The gradients sparse_mla_backward writes (SPEC §9.2).
struct SparseMlaGradients {
  TensorView q;          // [T, h_q, 576]: d loss / d q
  TensorView kv;         // [N, 576]: d loss / d kv (the key gradient plus, on channels 0..511, the value gradient)
  TensorView attn_sink;  // [h_q] or empty: d loss / d attn_sink (needs options.attn_sink)
};

/// Gradients of sparse MLA (SPEC §9.2) in double precision (the reference): given grad_out = d loss / d out and
/// optionally grad_lse = d loss / d lse, the gradients of loss = sum(out * grad_out) + sum(lse * grad_lse) with
/// respect to q, the latent cache and the attention sink, the indices and topk_length held fixed. Recomputes the
/// forward from the inputs.
///   q, indices, options: as sparse_mla_reference
///   kv:         a latent cache fp32 / bf16 / fp16 [N, 576] (the fp8 V3.2 pages are not differentiated)
///   grad_out:   fp32, bf16, fp16 or fp64 [T, h_q, 512]; grad_lse: fp32 or fp64 [T, h_q], or empty
///   gradients:  q fp32 or fp64 [T, h_q, 576]; kv fp32 or fp64 [N, 576] (zeros on slots no row reads); attn_sink
///               fp32 or fp64 [h_q] or empty
/// Rows with no valid slot contribute nothing (their grad_q is 0). Throws keysel::Error, writing nothing, on bad
/// input (as sparse_mla_reference, and a gradient view of the wrong shape, dtype or device).
void sparse_mla_backward_reference(const TensorView& q, const TensorView& kv, const TensorView& indices,
                                   const TensorView& grad_out, const TensorView& grad_lse,
                                   const SparseMlaGradients& gradients, const SparseMlaOptions& options = {});

/// Gradients of sparse MLA on the CPU in fp32 through sparse_attention_backward's kernel (SIMD, OpenMP): the
/// contract of sparse_mla_backward_reference, given also the forward's results.
///   out:        sparse_mla's output, fp32, bf16 or fp16 [T, h_q, 512] (any strides)
///   lse:        sparse_mla's lse, fp32 [T, h_q] (any strides)
///   grad_out:   fp32, bf16 or fp16 [T, h_q, 512]; grad_lse: fp32 [T, h_q] or empty
///   gradients:  q fp32 [T, h_q, 576], kv fp32 [N, 576], attn_sink fp32 [h_q] or empty; writable, any strides
/// Deterministic: grad_q[t, h] sums its row's valid slots in row order; each grad_kv row is summed by one thread
/// over the rows that read it, tokens ascending then heads ascending; grad_attn_sink[h] sums the tokens in
/// ascending order (in double). The bits do not depend on attention.threads. Throws keysel::Error, writing
/// nothing, on bad input.
void sparse_mla_backward(const TensorView& q, const TensorView& kv, const TensorView& indices, const TensorView& out,
                         const TensorView& lse, const TensorView& grad_out, const TensorView& grad_lse,
                         const SparseMlaGradients& gradients, const SparseMlaOptions& options = {},
                         const SparseAttentionOptions& attention = {});

/// Gradients of sparse MLA on a GPU (SPEC §9.2; declared in every build, without CUDA it throws): the contract of
/// sparse_mla_backward, computed by sparse_attention_backward_cuda's kernels (portable, sm_80 and later) over the
/// latent cache, with
///   q:          bf16 or fp32 [T, h_q, 576] on Device::cuda(i), contiguous
///   kv:         a latent cache [N, 576] of q's dtype on the same GPU, contiguous (the fp8 V3.2 pages are not
///               differentiated)
///   indices:    int32 [T, topk] (channels contiguous, any row stride). Values are not read by the host: a slot
///               outside [0, N) counts as invalid (like -1); the caller keeps the valid slots of a row distinct
///               (a repeated slot counts once per entry)
///   out:        the forward's output, bf16 or fp32 [T, h_q, 512], contiguous; lse: fp32 [T, h_q], contiguous
///   grad_out:   bf16 or fp32 [T, h_q, 512], contiguous; grad_lse: fp32 [T, h_q] contiguous, or empty
///   gradients:  q fp32 [T, h_q, 576], kv fp32 [N, 576] (zeros on slots no row reads), attn_sink fp32 [h_q] or
///               empty (needs options.attn_sink); contiguous, on the GPU, written in full
///   options:    scale, attn_sink (fp32 [h_q] on the GPU), topk_length (int32 [T] on the GPU)
///   stream:     a cudaStream_t (nullptr: the default stream); asynchronous with respect to the host.
/// fp32 arithmetic; deterministic (no atomics): grad_q[t, h] sums its row's valid slots in row order, each
/// grad_kv row is summed by one warp over the rows that read it (tokens ascending, then heads ascending),
/// grad_attn_sink[h] by one thread over the tokens in ascending order (in double). Scratch memory from keysel's
/// stream-ordered pool: 20 bytes per index entry, up to 12 per (token, head), 16 per slot. Throws keysel::Error
/// (launching nothing) on a bad shape, dtype, device or pointer.
void sparse_mla_backward_cuda(const TensorView& q, const TensorView& kv, const TensorView& indices,
                              const TensorView& out, const TensorView& lse, const TensorView& grad_out,
                              const TensorView& grad_lse, const SparseMlaGradients& gradients,
                              const SparseMlaOptions& options = {}, void* stream = nullptr);

/// Sparse MLA on a GPU (bf16 tensor cores, sm_80 and later; declared in every build, without CUDA it throws):
/// the contract of sparse_mla_reference, with
///   q:          bf16 [T, h_q, 576] on Device::cuda(i), contiguous (1 <= h_q <= 65535)
///   kv:         V3.2 pages fp8_e4m3 / int8 bytes [P, page_size, 656] (a page's tokens contiguous, any page stride
///               that is a multiple of 16 bytes), or a bf16 latent cache [N, 576] (channels contiguous, a row
///               stride that is a multiple of 8), on the same GPU
///   indices:    int32 [T, topk] (channels contiguous, any row stride). Values are not read by the host: a slot
///               outside [0, N) counts as invalid (like -1); the caller keeps the valid slots of a row distinct
///               (a repeated slot counts once per entry)
///   out:        bf16 or fp32 [T, h_q, 512], contiguous; lse, max_logits: fp32 [T, h_q] contiguous, or empty
///   options:    scale, attn_sink (fp32 [h_q] on the GPU), topk_length (int32 [T] on the GPU)
///   stream:     a cudaStream_t (nullptr: the default stream); nothing synchronises the host
///   workspace:  empty (keysel's stream-ordered pool) or device memory of sparse_mla_cuda_workspace_bytes: then
///               nothing is allocated, so the call can be captured in a CUDA graph without memory nodes.
/// Latents are multiplied in bf16 (the V3.2 cache decoded as fp8 x scale rounded to bf16) with fp32
/// accumulation and an fp32 online softmax; rows with few thread blocks split their slots across blocks and
/// merge by log-sum-exp. Throws keysel::Error (launching nothing) on a bad shape, dtype, device or pointer.
void sparse_mla_cuda(const TensorView& q, const TensorView& kv, const TensorView& indices, const TensorView& out,
                     const TensorView& lse = {}, const SparseMlaOptions& options = {},
                     const TensorView& max_logits = {}, void* stream = nullptr, const TensorView& workspace = {});

/// Bytes of workspace sparse_mla_cuda needs for T rows, h_q heads and topk slots on GPU `device` (0 when the
/// call does not split rows; the split depends on the GPU's multiprocessor count).
std::int64_t sparse_mla_cuda_workspace_bytes(std::int64_t rows, std::int64_t heads, std::int64_t topk,
                                             int device = 0);

}  // namespace keysel
