// Launch parameters of the tiled tensor-core sparse attention kernels (cuda_sparse_attention_tiled.cu): the
// prefill forward of sparse_attention_prefill_cuda (checks in cuda_sparse_attention_tiled.cpp) and the backward
// sparse_attention_backward_cuda runs with deterministic = false (checks in cuda_sparse_attention_backward.cpp).
// bench/gpu/backward_profile.cu builds the unions once and times the pieces.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "keysel/core/tensor.h"

namespace keysel::cuda_kernels {

/// Query rows per tile: 64 / g consecutive tokens x the g = Hq / Hkv query heads of one key head.
constexpr int kTiledRows = 64;

/// One sequence: bf16 q [T, Hq, D], K [N, Hkv, D], V [N, Hkv, Dv], out / grad_out [T, Hq, Dv], int32 selection
/// [T, G, W] with G = Hkv (a row per key head) or 1 (one row per token).
struct TiledShape {
  std::int64_t tokens = 0, keys = 0;
  std::int64_t query_heads = 0, kv_heads = 0, head_dim = 0, value_dim = 0, groups = 0, width = 0;
};

/// The shape of q [T, Hq, D], k [N, Hkv, D], v [N, Hkv, Dv] and selection [T, G, W], whose ranks and extents the
/// caller has checked.
inline TiledShape tiled_shape(const TensorView& q, const TensorView& k, const TensorView& v,
                              const TensorView& selection) {
  TiledShape shape;
  shape.tokens = q.size(0);
  shape.keys = k.size(0);
  shape.query_heads = q.size(1);
  shape.kv_heads = k.size(1);
  shape.head_dim = q.size(2);
  shape.value_dim = v.size(2);
  shape.groups = selection.size(1);
  shape.width = selection.size(2);
  return shape;
}

/// Tokens per tile (64 / g), tiles, segments (a tile and a key head: one thread block each) and selection
/// entries the union build sorts (every token of every tile, the last tile padded). Valid where tiled_refusal
/// returns nothing.
inline std::int64_t tiled_tile_tokens(const TiledShape& s) { return kTiledRows / (s.query_heads / s.kv_heads); }
inline std::int64_t tiled_segments(const TiledShape& s) {
  return (s.tokens + tiled_tile_tokens(s) - 1) / tiled_tile_tokens(s) * s.kv_heads;
}
inline std::int64_t tiled_entry_count(const TiledShape& s) {
  return tiled_segments(s) * tiled_tile_tokens(s) * s.width;
}

/// Why the tiled kernels cannot run `shape` on a GPU with `shared_memory_optin` bytes of shared memory per block
/// (cudaDevAttrMaxSharedMemoryPerBlockOptin): the argument to name, what it expects, what it got; nothing when
/// they can. `backward`: the backward's kernel (it needs more shared memory than the forward's). The shape's
/// own consistency (N >= 1, Hkv dividing Hq, extents of the tensors) is the caller's check.
struct TiledRefusal {
  std::string argument, expected, got;
};
std::optional<TiledRefusal> tiled_refusal(const TiledShape& shape, int shared_memory_optin, bool backward);

/// The unions of every segment: for segment i, union slots [segment_begin[i], segment_end[i]) list the distinct
/// keys its tokens select (ascending) and, per key, the tokens of the tile that select it (bit j: token j of the
/// tile). The kernels walk slot order[i] at position i of a segment: its slots grouped by which of the tile's
/// four 16-row blocks select the key (ascending group, then key), so that a 64-key chunk mostly concerns the same
/// row blocks and the kernels skip the blocks of rows that select none of a chunk's keys. Device memory.
struct TiledUnions {
  const std::int32_t* union_key = nullptr;
  const unsigned long long* union_mask = nullptr;
  const std::int32_t* order = nullptr;
  const long long* segment_begin = nullptr;
  const long long* segment_end = nullptr;
};

/// Device bytes build_tiled_unions needs for `shape` (28 per selection entry of tiled_entry_count, 16 per
/// segment, and CUB's temporary storage).
std::size_t tiled_union_bytes(std::string_view function, const TiledShape& shape);
/// Builds the unions of `selection` into `memory` (tiled_union_bytes of device memory, 256-byte aligned, kept
/// until the kernels that read the unions are done) on `stream` (a cudaStream_t); an entry outside [0, N) is
/// skipped. Throws keysel::Error of `function` when CUDA refuses.
TiledUnions build_tiled_unions(std::string_view function, const TiledShape& shape, const std::int32_t* selection,
                               void* memory, void* stream);

struct TiledForwardLaunch {
  TiledShape shape;
  const void* q;                  // bf16 [T, Hq, D], 16-byte aligned (as k and v)
  const void* k;                  // bf16 [N, Hkv, D]
  const void* v;                  // bf16 [N, Hkv, Dv]
  const std::int32_t* selection;  // [T, G, W]
  void* out;                      // [T, Hq, Dv], bf16 or fp32 (out_bf16)
  bool out_bf16;
  float* lse;                     // [T, Hq] or null
  float scale;
  int device;                     // the current GPU
};

/// The forward over the unions (built here from launch.selection, in scratch memory of keysel's pool, unless
/// `unions` gives them: built by build_tiled_unions for the same shape and selection). On `stream`; throws
/// keysel::Error of `function` when CUDA refuses.
void launch_sparse_attention_tiled_forward(std::string_view function, const TiledForwardLaunch& launch, void* stream,
                                           const TiledUnions* unions = nullptr);

struct TiledBackwardLaunch {
  TiledShape shape;
  const void* q;         // bf16 [T, Hq, D], 16-byte aligned (as k, v and grad_out)
  const void* k;         // bf16 [N, Hkv, D]
  const void* v;         // bf16 [N, Hkv, Dv]
  const void* out;       // bf16 [T, Hq, Dv]
  const void* grad_out;  // bf16 [T, Hq, Dv]
  const float* lse;      // [T, Hq]
  const float* grad_lse;  // [T, Hq] or null: d loss / d lse
  const std::int32_t* selection;  // [T, G, W]
  float* grad_q;         // [T, Hq, D]
  float* grad_k;         // [N, Hkv, D], 16-byte aligned (as grad_v): four floats per atomic on sm_90
  float* grad_v;         // [N, Hkv, Dv]
  float scale;
  int device;            // the current GPU
};

/// The backward (dQ, dK, dV written in full; dK and dV summed with atomics), over the unions as the forward.
void launch_sparse_attention_tiled_backward(std::string_view function, const TiledBackwardLaunch& launch,
                                            void* stream, const TiledUnions* unions = nullptr);

}  // namespace keysel::cuda_kernels
