// Fast exact attention over selected keys on the CPU (the kernel top-k sparse attention runs after selection).
//
//   o[t,h] = sum_{s in A[t,G(h)]} softmax_A(scale * q[t,h] . k[s,kv(h)]) v[s,kv(h)]       (SPEC §4 o_A)
//   lse[t,h] = log sum_{s in A} exp(scale * q[t,h] . k[s,kv(h)])
//
// The same contract as sparse_attention_reference (reference.h), computed in fp32:
//   - K/V in fp32, bf16 or fp16 (each independently), converted to fp32 in registers; products and sums in fp32;
//   - one pass over the selected keys with an online softmax (running max and sum per head);
//   - the K and V rows a selection row names are read once for all query heads that share them: per_kv_head
//     and per_token selections read each selected row of a key head once for its g query heads (GQA/MQA);
//   - OpenMP over query tokens and key heads (and over key ranges, merged by log-sum-exp, when there are fewer
//     of those than threads, as in single-token decode with one key head);
//   - AVX-512 or AVX2 kernels chosen at run time (options.kernel, or the environment variable
//     KEYSEL_SIMD=scalar|avx2|avx512 to force a lower level), with a portable scalar kernel as fallback.
//
// Selection rows list distinct allowed positions in any order, then -1 padding (validate_selection); rows are
// read in the order given, so ascending rows (what keysel's selectors write) read memory front to back.
// Errors: keysel::Error naming the argument, thrown before anything is written (SPEC §6).
//
// Batches of sequences with different lengths: call sparse_attention once per sequence with that sequence's
// views (its own N and positions); every call parallelises internally. docs/attention.md shows the loop.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "keysel/core/attention_inputs.h"
#include "keysel/core/selection.h"

namespace keysel {

/// Which instruction set the attention kernels use. `automatic` is the best this CPU runs (AVX-512 needs
/// F+BW+VL+DQ; AVX2 needs AVX2+FMA+F16C), lowered by KEYSEL_SIMD when that is set.
enum class AttentionKernel : std::uint8_t { automatic, scalar, avx2, avx512 };

/// "automatic", "scalar", "avx2", "avx512".
std::string_view attention_kernel_name(AttentionKernel kernel);
/// Parses a name above; throws keysel::Error naming the accepted names otherwise.
AttentionKernel parse_attention_kernel(std::string_view name);
/// The kernels this CPU can run, scalar first (never contains `automatic`).
std::vector<AttentionKernel> available_attention_kernels();
/// What `automatic` resolves to on this machine (honours KEYSEL_SIMD).
AttentionKernel default_attention_kernel();

struct SparseAttentionOptions {
  /// Kernel to run; a level the CPU lacks is an error (tests and benchmarks force levels with this).
  AttentionKernel kernel = AttentionKernel::automatic;
  /// Threads to use; 0 means keysel::num_threads().
  int threads = 0;
};

/// Attention restricted to a selection, renormalised on it.
///   inputs:    q [T, Hq, D], k [N, Hkv, D], v [N, Hkv, Dv] (fp32, bf16 or fp16; any strides, but a K or V whose
///              channels are not contiguous is copied whole first), positions int32 [T]
///   selection: int32 [T, G, W], G = group_count(granularity, Hq, Hkv); per row distinct allowed positions
///              (s <= pos(t), s < N) in any order, then -1 padding, which is ignored
///   out:       fp32 [T, Hq, Dv], writable (any strides); a query with no selected key gets zeros
///   lse:       fp32 [T, Hq], writable, or an empty view; a query with no selected key gets -infinity
/// Throws keysel::Error, writing nothing, on a bad shape, dtype, device, scale, position or selection entry.
void sparse_attention(const AttentionInputs& inputs, const TensorView& selection, Granularity granularity,
                      const TensorView& out, const TensorView& lse = {}, const SparseAttentionOptions& options = {});

/// Full causal attention (every allowed key s <= pos(t)) through the same kernel: the dense baseline that
/// sparse attention is compared against in benchmarks, and a fast fp32 stand-in for full_attention.
///   out: fp32 [T, Hq, Dv]; lse: fp32 [T, Hq] or empty.
void full_attention_fast(const AttentionInputs& inputs, const TensorView& out, const TensorView& lse = {},
                         const SparseAttentionOptions& options = {});

/// Gradients of sparse_attention (SPEC §9): dQ, dK, dV of loss = sum(out * grad_out) + sum(lse * grad_lse), the
/// selection held fixed.
///   inputs, selection, granularity: the forward's (v required)
///   out:      the forward's output, fp32, bf16 or fp16 [T, Hq, Dv] (any strides)
///   lse:      the forward's log-sum-exp, fp32 [T, Hq] (any strides)
///   grad_out: d loss / d out, fp32, bf16 or fp16 [T, Hq, Dv] (any strides)
///   grad_q:   fp32 [T, Hq, D], writable; a query with no selected key gets zeros
///   grad_k:   fp32 [N, Hkv, D], writable; a key no row selects gets zeros
///   grad_v:   fp32 [N, Hkv, Dv], writable
///   grad_lse: d loss / d lse, fp32 [T, Hq] (any strides), or empty (no lse term): adds P * grad_lse to dS
///             (d lse / d logit = P); ignored on rows with no selected key
/// fp32 arithmetic. Deterministic: dQ[t,h] sums its row's keys in row order, and each dK[s,kv], dV[s,kv] is
/// summed by one thread over the query tokens that select s in ascending order (then heads ascending), so the
/// result does not depend on options.threads (it does depend on options.kernel). Memory: besides fp32 copies of
/// q and grad_out, an index of (query, key) pairs, 4 bytes per selected entry and key head it reaches.
/// Throws keysel::Error, writing nothing, on a bad shape, dtype, device, scale, position or selection entry.
void sparse_attention_backward(const AttentionInputs& inputs, const TensorView& selection, Granularity granularity,
                               const TensorView& out, const TensorView& lse, const TensorView& grad_out,
                               const TensorView& grad_q, const TensorView& grad_k, const TensorView& grad_v,
                               const SparseAttentionOptions& options = {}, const TensorView& grad_lse = {});

}  // namespace keysel
