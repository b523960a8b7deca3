// The backward pass's row primitives (BackwardOps, sparse_attention_kernels.h), written once over the same
// instruction-set traits type `Isa` as sparse_attention_simd.h (private; included only by
// sparse_attention_avx2.cpp and sparse_attention_avx512.cpp after their Isa is defined). Anonymous namespace:
// the copies compiled for different instruction sets never meet at link time.
#pragma once

#include <cstddef>
#include <cstdint>

#include "sparse_attention_kernels.h"

namespace keysel::attention_kernels {
namespace {

template <class Isa, DType T>
void convert_typed(float* dst, const std::byte* row, std::int64_t n, std::int64_t n_padded) {
  constexpr int W = Isa::W;
  std::int64_t i = 0;
  for (; i + W <= n; i += W) Isa::store(dst + i, Isa::template load_row<T>(row, i));
  if (i < n) {
    Isa::store(dst + i, Isa::template load_row_tail<T>(row, i, n - i));
    i += W;
  }
  for (; i < n_padded; i += W) Isa::store(dst + i, Isa::zero());
}

template <class Isa>
void convert_row(float* dst, const std::byte* row, DType dtype, std::int64_t n, std::int64_t n_padded) {
  switch (dtype) {
    case DType::bf16: convert_typed<Isa, DType::bf16>(dst, row, n, n_padded); break;
    case DType::fp16: convert_typed<Isa, DType::fp16>(dst, row, n, n_padded); break;
    default: convert_typed<Isa, DType::fp32>(dst, row, n, n_padded); break;
  }
}

template <class Isa>
float dot_rows(const float* a, const float* b, std::int64_t n_padded) {
  constexpr int W = Isa::W;
  typename Isa::V acc0 = Isa::zero(), acc1 = Isa::zero();
  std::int64_t i = 0;
  for (; i + 2 * W <= n_padded; i += 2 * W) {
    acc0 = Isa::fmadd(Isa::load(a + i), Isa::load(b + i), acc0);
    acc1 = Isa::fmadd(Isa::load(a + i + W), Isa::load(b + i + W), acc1);
  }
  for (; i < n_padded; i += W) acc0 = Isa::fmadd(Isa::load(a + i), Isa::load(b + i), acc0);
  return Isa::reduce_add(Isa::add(acc0, acc1));
}

template <class Isa>
void axpy_rows(float* acc, float alpha, const float* x, std::int64_t n_padded) {
  constexpr int W = Isa::W;
  const typename Isa::V a = Isa::set1(alpha);
  for (std::int64_t i = 0; i < n_padded; i += W) {
    Isa::store(acc + i, Isa::fmadd(a, Isa::load(x + i), Isa::load(acc + i)));
  }
}

template <class Isa>
BackwardOps backward_ops() {
  return BackwardOps{&convert_row<Isa>, &dot_rows<Isa>, &axpy_rows<Isa>};
}

}  // namespace
}  // namespace keysel::attention_kernels
