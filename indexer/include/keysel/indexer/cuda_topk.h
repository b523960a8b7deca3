// Top-k selection on a GPU: the CUDA version of keysel::select_topk (indexer/topk.h), same semantics.
//
// Declared in every build; without CUDA it throws keysel::Error("... built without CUDA").
#pragma once

#include "keysel/core/selection.h"
#include "keysel/core/tensor.h"

namespace keysel {

/// Per row (t, G): the kept keys (sinks 0..n_sink-1 and the last n_local allowed positions) and the
/// highest-scoring other allowed keys, distinct, ascending by position, then -1 padding. Equal scores prefer the
/// lower position; NaN is never selected; -inf can be; -0.0 equals +0.0. The result is identical to select_topk.
///   scores:    fp32 [T, G, N] on Device::cuda(i), contiguous; higher is better.
///   positions: int32 [T] on the same GPU; row t may read keys s <= positions[t] (allowed = min(pos + 1, N)).
///              A batch of sequences of different lengths is T rows with positions[t] = length[t] - 1.
///              Positions live on the GPU and are not read by the host: a negative one gives an empty row.
///   selection: int32 [T, G, policy.width()] on the same GPU, contiguous; every element is written.
///   stream:    a cudaStream_t (nullptr: the default stream); the call is asynchronous with respect to the host.
///   workspace: empty, or device memory on the same GPU (any dtype, contiguous, writable, 16-byte aligned) of at
///              least select_topk_cuda_workspace_bytes(T, G, N) bytes: the call then allocates nothing (for CUDA
///              graph capture without memory nodes, and for callers that own their memory). Empty: scratch, when
///              needed, comes from a stream-ordered pool. Its contents need no initialisation and are left undefined.
/// Any k and N (k above N pads with -1). A radix select (a coarse 11-bit histogram, the threshold bucket refined
/// by three radix rounds) and one ordered compaction pass that writes the row in position order; one thread
/// block per row when there are many rows, several per row (five launches, a stream-ordered scratch buffer)
/// when there are fewer rows than SMs and N >= 16384. See docs/cuda.md.
/// Throws keysel::Error (launching nothing) on a bad shape, dtype, device, pointer or policy.
void select_topk_cuda(const TensorView& scores, const TensorView& positions, const SelectionPolicy& policy,
                      const TensorView& selection, void* stream = nullptr, const TensorView& workspace = {});

/// Bytes of device memory select_topk_cuda may use for scores [tokens, groups, n]: an upper bound valid on every
/// GPU (the several-blocks-per-row path at its most segments, plus one 32-bit key per score). Plain arithmetic,
/// also in builds without CUDA; keysel::Error on negative extents or int64 overflow.
std::int64_t select_topk_cuda_workspace_bytes(std::int64_t tokens, std::int64_t groups, std::int64_t n);

}  // namespace keysel
