// The double-precision reference gradients of a GPU backward test's problem, shared by
// test_cuda_sparse_attention_backward.cpp and test_cuda_sparse_attention_tiled.cpp, whose problems hold the fields
// read here.
#pragma once

#include <cstdint>
#include <vector>

#include "keysel/attention/reference.h"
#include "keysel/core/attention_inputs.h"
#include "keysel/core/tensor.h"

namespace keysel::testing {

struct ReferenceGradients {
  std::vector<double> q, k, v;
};

/// dQ, dK, dV of sparse_attention_backward_reference over problem `p`: its case `c` (T, N, Hq, Hkv, D, Dv, W,
/// granularity), q, k, v and grad_out (fp32 values `.f`), selection [T, groups, W], and with `with_lse` its
/// grad_lse [T, Hq]; every query may read every key (positions N - 1).
template <typename Problem>
ReferenceGradients reference_gradients(const Problem& p, bool with_lse) {
  const auto& c = p.c;
  const std::vector<std::int32_t> positions(static_cast<std::size_t>(c.T), static_cast<std::int32_t>(c.N - 1));
  const AttentionInputs in{TensorView(p.q.f.data(), DType::fp32, {c.T, c.Hq, c.D}),
                           TensorView(p.k.f.data(), DType::fp32, {c.N, c.Hkv, c.D}),
                           TensorView(p.v.f.data(), DType::fp32, {c.N, c.Hkv, c.Dv}),
                           TensorView(positions.data(), DType::int32, {c.T}), 0.0};
  ReferenceGradients g;
  g.q.resize(static_cast<std::size_t>(c.T * c.Hq * c.D));
  g.k.resize(static_cast<std::size_t>(c.N * c.Hkv * c.D));
  g.v.resize(static_cast<std::size_t>(c.N * c.Hkv * c.Dv));
  sparse_attention_backward_reference(in, TensorView(p.selection.data(), DType::int32, {c.T, p.groups, c.W}),
                                      c.granularity, TensorView(p.grad_out.f.data(), DType::fp32, {c.T, c.Hq, c.Dv}),
                                      TensorView(g.q.data(), DType::fp64, {c.T, c.Hq, c.D}),
                                      TensorView(g.k.data(), DType::fp64, {c.N, c.Hkv, c.D}),
                                      TensorView(g.v.data(), DType::fp64, {c.N, c.Hkv, c.Dv}),
                                      with_lse ? TensorView(p.grad_lse.data(), DType::fp32, {c.T, c.Hq})
                                               : TensorView());
  return g;
}

}  // namespace keysel::testing
