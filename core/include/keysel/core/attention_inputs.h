// The inputs of one attention call and the shape they imply (SPEC §1).
//
// Layout (row-major, one row per cached token as a KV cache stores it):
//   q          [T, Hq, D]    query of each query token and head
//   k          [N, Hkv, D]   cached keys
//   v          [N, Hkv, Dv]  cached values (may be empty where only probabilities or a selection is needed)
//   positions  [T] int32     pos(t) >= 0; query t may read keys s <= pos(t) (causal); s < N always
// q, k, v: fp32, fp16 or bf16 on the CPU for the reference implementations.
#pragma once

#include <cstdint>

#include "keysel/core/tensor.h"

namespace keysel {

/// The most cached keys an attention may have, and the most keys a selection row may name: key positions are
/// int32 (SPEC §1, §2).
inline constexpr std::int64_t kMaxKeyPositions = 2147483647;

struct AttentionShape {
  std::int64_t tokens = 0;       // T
  std::int64_t keys = 0;         // N
  std::int64_t query_heads = 0;  // Hq
  std::int64_t kv_heads = 0;     // Hkv
  std::int64_t head_dim = 0;     // D
  std::int64_t value_dim = 0;    // Dv (0 when v is empty)

  /// g = Hq / Hkv.
  std::int64_t group_size() const { return query_heads / kv_heads; }
};

struct AttentionInputs {
  TensorView q;          // [T, Hq, D]
  TensorView k;          // [N, Hkv, D]
  TensorView v;          // [N, Hkv, Dv], may be empty
  TensorView positions;  // [T] int32
  double scale = 0.0;    // softmax scale; 0 means 1/sqrt(D)

  /// Checks shapes, dtypes, devices, Hq % Hkv == 0, 1 <= N <= kMaxKeyPositions, positions >= 0 and a finite positive scale; returns the
  /// shape. `function` names the caller in error messages. With `need_v`, v must be present.
  AttentionShape validate(std::string_view function, bool need_v) const;
  /// The shape the views imply, without checks (for inputs validate() already accepted).
  AttentionShape shape() const;
  /// The scale in use: `scale`, or 1/sqrt(D) when it is 0.
  double effective_scale() const;
};

/// Number of keys query token at position `pos` may read in a cache of `n_keys`: min(pos + 1, n_keys).
inline std::int64_t allowed_keys(std::int64_t pos, std::int64_t n_keys) {
  return pos + 1 < n_keys ? pos + 1 : n_keys;
}

}  // namespace keysel
