// The per-ISA kernels behind sparse_attention (private to the attention module).
//
// One call attends the query heads of one work unit (heads that share a key head and a selection row) over a
// list of keys, updating an online-softmax state. The driver (sparse_attention.cpp) validates, prepares the
// queries and merges states; sparse_attention_{scalar,avx2,avx512}.cpp implement the same function, each
// compiled with its own instruction-set flags (attention/CMakeLists.txt).
#pragma once

#include <cstddef>
#include <cstdint>

#include "keysel/core/dtype.h"

namespace keysel::attention_kernels {

/// Keys scored per block before the softmax update and the V accumulation.
inline constexpr std::int64_t kBlock = 64;
/// Query and accumulator rows are padded to a multiple of this many floats (one AVX-512 register).
inline constexpr std::int64_t kPad = 16;

inline std::int64_t padded(std::int64_t n) { return (n + kPad - 1) / kPad * kPad; }

struct Problem {
  const float* q = nullptr;        // [heads, dim_padded] fp32, pre-multiplied by the scale, zero padded
  std::int64_t heads = 0;          // query heads of the unit
  std::int64_t dim = 0;            // D
  std::int64_t dim_padded = 0;     // padded(D)
  std::int64_t value_dim = 0;      // Dv
  std::int64_t value_dim_padded = 0;
  DType k_dtype = DType::fp32;     // fp32, bf16 or fp16
  DType v_dtype = DType::fp32;
  const std::byte* k = nullptr;    // row of key s: k + s * k_row_bytes (D contiguous elements)
  std::int64_t k_row_bytes = 0;
  const std::byte* v = nullptr;    // row of key s: v + s * v_row_bytes (Dv contiguous elements)
  std::int64_t v_row_bytes = 0;
};

/// Online-softmax state of the unit's heads, relative to the running max:
///   max[h] = largest logit seen (-inf before any), sum[h] = sum exp(logit - max[h]),
///   acc[h * value_dim_padded + d] = sum exp(logit - max[h]) v[d].
struct State {
  float* max = nullptr;     // [heads]
  float* sum = nullptr;     // [heads]
  float* acc = nullptr;     // [heads, value_dim_padded]
  float* logits = nullptr;  // scratch [heads, kBlock]
};

/// Attends keys[0 .. count) (valid positions) and folds them into `state`.
void attend_scalar(const Problem& problem, const std::int32_t* keys, std::int64_t count, const State& state);
void attend_avx2(const Problem& problem, const std::int32_t* keys, std::int64_t count, const State& state);
void attend_avx512(const Problem& problem, const std::int32_t* keys, std::int64_t count, const State& state);

/// Attends several units over one key list: unit i (problems[i], states[i]) over keys[0 .. counts[i]), every
/// unit reading the same K and V rows (one key head; full attention's causal prefix). Each state equals what
/// attend_<isa>(problems[i], keys, counts[i], states[i]) makes, bit for bit; the SIMD kernels interleave the
/// units block by block so that each block of K/V rows comes from memory once for all of them.
void attend_shared_scalar(const Problem* problems, std::int64_t units, const std::int32_t* keys,
                          const std::int64_t* counts, const State* states);
void attend_shared_avx2(const Problem* problems, std::int64_t units, const std::int32_t* keys,
                        const std::int64_t* counts, const State* states);
void attend_shared_avx512(const Problem* problems, std::int64_t units, const std::int32_t* keys,
                          const std::int64_t* counts, const State* states);

/// Row primitives of the backward pass (sparse_attention_backward). Every fp32 row they touch is zero padded to
/// a multiple of kPad floats, so no call handles a tail except `convert`, which reads n elements and zero fills
/// dst up to n_padded.
struct BackwardOps {
  /// dst[0 .. n) = row[0 .. n) widened to fp32 (row: n contiguous fp32, bf16 or fp16), dst[n .. n_padded) = 0.
  void (*convert)(float* dst, const std::byte* row, DType dtype, std::int64_t n, std::int64_t n_padded);
  /// sum_i a[i] * b[i] over n_padded floats.
  float (*dot)(const float* a, const float* b, std::int64_t n_padded);
  /// acc[i] += alpha * x[i] over n_padded floats.
  void (*axpy)(float* acc, float alpha, const float* x, std::int64_t n_padded);
};

BackwardOps backward_ops_scalar();
BackwardOps backward_ops_avx2();
BackwardOps backward_ops_avx512();

}  // namespace keysel::attention_kernels
