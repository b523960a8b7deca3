// sparse_attention_backward_cuda against keysel::sparse_attention_backward_reference (double precision): fp32 and
// bf16 inputs, every granularity, GQA / MHA / MQA, odd head dims, padded and empty selection rows, with and
// without an lse gradient, bitwise equal results on a second run (no atomics), and bad input. Each test skips
// where no GPU is present.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include "backward_reference.h"
#include "gpu_test_support.h"
#include "attention/gradient_check.h"
#include "keysel/attention/cuda_sparse_attention.h"
#include "keysel/attention/reference.h"
#include "keysel/attention/sparse_attention.h"
#include "keysel/core/dtype.h"
#include "keysel/core/error.h"
#include "keysel/core/random.h"

namespace keysel {
namespace {

using keysel::testing::expect_gradient_close;

using keysel::testing::device_values;
using keysel::testing::DeviceValues;
using keysel::testing::poisoned;
using keysel::testing::random_device_values;
using keysel::testing::reference_gradients;
using keysel::testing::ReferenceGradients;
using keysel::testing::to_device;
using keysel::testing::to_host;
using keysel::testing::upload;

struct Case {
  std::int64_t T, N, Hq, Hkv, D, Dv, W;
  Granularity granularity;
  bool bf16;
};

struct Gradients {
  std::vector<float> q, k, v;
};

struct Problem {
  Case c;
  DeviceValues q, k, v, out, grad_out;
  std::vector<float> lse, grad_lse;  // grad_lse: d loss / d lse, used where a call asks for it
  std::vector<std::int32_t> selection;
  std::int64_t groups = 0;
};

Problem make_problem(const Case& c, std::uint64_t seed) {
  Problem p;
  p.c = c;
  RandomStream rng(seed);
  p.groups = group_count(c.granularity, c.Hq, c.Hkv);
  p.q = random_device_values(rng, c.T * c.Hq * c.D, 1.5, c.bf16);
  p.k = random_device_values(rng, c.N * c.Hkv * c.D, 1.0, c.bf16);
  p.v = random_device_values(rng, c.N * c.Hkv * c.Dv, 1.0, c.bf16);
  const DeviceValues grad = random_device_values(rng, c.T * c.Hq * c.Dv, 1.0, c.bf16);
  p.grad_out = grad;
  p.grad_lse = random_device_values(rng, c.T * c.Hq, 1.0, false).f;
  // Random distinct keys per row (any order), then -1; row (0, 0) empty.
  p.selection.assign(static_cast<std::size_t>(c.T * p.groups * c.W), -1);
  std::vector<std::int32_t> all(static_cast<std::size_t>(c.N));
  std::iota(all.begin(), all.end(), 0);
  for (std::int64_t r = 1; r < c.T * p.groups; ++r) {
    rng.shuffle(std::span<std::int32_t>(all));
    const auto count = static_cast<std::int64_t>(rng.uniform_int(static_cast<std::uint64_t>(std::min(c.W, c.N) + 1)));
    std::copy_n(all.begin(), count, p.selection.begin() + r * c.W);
  }
  // The forward on the CPU (every query may read every key), out rounded to the device dtype.
  std::vector<float> out(static_cast<std::size_t>(c.T * c.Hq * c.Dv));
  p.lse.resize(static_cast<std::size_t>(c.T * c.Hq));
  const std::vector<std::int32_t> positions(static_cast<std::size_t>(c.T), static_cast<std::int32_t>(c.N - 1));
  AttentionInputs in{TensorView(p.q.f.data(), DType::fp32, {c.T, c.Hq, c.D}),
                     TensorView(p.k.f.data(), DType::fp32, {c.N, c.Hkv, c.D}),
                     TensorView(p.v.f.data(), DType::fp32, {c.N, c.Hkv, c.Dv}),
                     TensorView(positions.data(), DType::int32, {c.T}), 0.0};
  sparse_attention(in, TensorView(p.selection.data(), DType::int32, {c.T, p.groups, c.W}), c.granularity,
                   TensorView(out.data(), DType::fp32, {c.T, c.Hq, c.Dv}),
                   TensorView(p.lse.data(), DType::fp32, {c.T, c.Hq}));
  p.out = device_values(out, c.bf16);
  return p;
}

Gradients run_cuda(const Problem& p, bool with_lse = false) {
  const Case& c = p.c;
  const DType dtype = c.bf16 ? DType::bf16 : DType::fp32;
  const CudaBuffer d_q = upload(p.q, c.bf16), d_k = upload(p.k, c.bf16), d_v = upload(p.v, c.bf16);
  const CudaBuffer d_out = upload(p.out, c.bf16), d_grad = upload(p.grad_out, c.bf16);
  const CudaBuffer d_lse = to_device(p.lse), d_sel = to_device(p.selection), d_grad_lse = to_device(p.grad_lse);
  CudaBuffer d_gq = poisoned<float>(c.T * c.Hq * c.D, 0xFF);
  CudaBuffer d_gk = poisoned<float>(c.N * c.Hkv * c.D, 0xFF);
  CudaBuffer d_gv = poisoned<float>(c.N * c.Hkv * c.Dv, 0xFF);
  const Device gpu = Device::cuda();
  sparse_attention_backward_cuda(
      TensorView(d_q.data(), dtype, {c.T, c.Hq, c.D}, gpu), TensorView(d_k.data(), dtype, {c.N, c.Hkv, c.D}, gpu),
      TensorView(d_v.data(), dtype, {c.N, c.Hkv, c.Dv}, gpu),
      TensorView(d_sel.data(), DType::int32, {c.T, p.groups, c.W}, gpu), c.granularity, 0.0,
      TensorView(d_out.data(), dtype, {c.T, c.Hq, c.Dv}, gpu), TensorView(d_lse.data(), DType::fp32, {c.T, c.Hq}, gpu),
      TensorView(d_grad.data(), dtype, {c.T, c.Hq, c.Dv}, gpu),
      TensorView(d_gq.data(), DType::fp32, {c.T, c.Hq, c.D}, gpu),
      TensorView(d_gk.data(), DType::fp32, {c.N, c.Hkv, c.D}, gpu),
      TensorView(d_gv.data(), DType::fp32, {c.N, c.Hkv, c.Dv}, gpu), nullptr,
      with_lse ? TensorView(d_grad_lse.data(), DType::fp32, {c.T, c.Hq}, gpu) : TensorView());
  cuda_synchronize();
  return {to_host<float>(d_gq), to_host<float>(d_gk), to_host<float>(d_gv)};
}

/// The double reference's gradients of the problem's (device-rounded) inputs, with the lse term when asked.
TEST(CudaSparseAttentionBackward, MatchesTheDoubleReference) {
  KEYSEL_REQUIRE_GPU();
  const Case cases[] = {
      {7, 61, 6, 2, 19, 21, 13, Granularity::per_head, false},
      {7, 61, 6, 2, 19, 21, 13, Granularity::per_kv_head, false},
      {7, 61, 6, 2, 19, 21, 13, Granularity::per_token, false},
      {5, 300, 8, 1, 128, 64, 100, Granularity::per_token, true},   // MQA
      {9, 40, 4, 4, 256, 256, 40, Granularity::per_kv_head, true},  // MHA, every key of a short cache
  };
  std::uint64_t seed = 1;
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string(granularity_name(c.granularity)) + (c.bf16 ? " bf16" : " fp32") +
                 " D=" + std::to_string(c.D));
    const Problem p = make_problem(c, ++seed);
    // The reference differentiates the forward of the same (device-rounded) inputs in double precision.
    const ReferenceGradients want = reference_gradients(p, false);
    const Gradients got = run_cuda(p);
    // fp32: the CPU kernel's bound (tests/attention/test_sparse_attention_backward.cpp); bf16: out rounded to
    // 8 bits moves Delta by about 2^-8 relative.
    const double tolerance = c.bf16 ? 0.02 : 64.0 * static_cast<double>(c.D + c.Dv + c.W) / 16777216.0;
    expect_gradient_close(got.q, want.q, tolerance, "grad_q");
    expect_gradient_close(got.k, want.k, tolerance, "grad_k");
    expect_gradient_close(got.v, want.v, tolerance, "grad_v");
    // No atomics: a second run gives the same bits.
    const Gradients again = run_cuda(p);
    EXPECT_EQ(0, std::memcmp(got.k.data(), again.k.data(), got.k.size() * sizeof(float)));
    EXPECT_EQ(0, std::memcmp(got.v.data(), again.v.data(), got.v.size() * sizeof(float)));
    EXPECT_EQ(0, std::memcmp(got.q.data(), again.q.data(), got.q.size() * sizeof(float)));
  }
}

TEST(CudaSparseAttentionBackward, TakesAnLseGradient) {
  KEYSEL_REQUIRE_GPU();
  // dS = P (dP - Delta + dLse): against the reference's lse term (SPEC §9), every granularity, both dtypes.
  const Case cases[] = {
      {37, 61, 6, 2, 19, 21, 13, Granularity::per_head, false},
      {37, 61, 6, 2, 19, 21, 13, Granularity::per_kv_head, true},
      {37, 61, 6, 2, 19, 21, 13, Granularity::per_token, false},
      {11, 300, 8, 1, 128, 64, 100, Granularity::per_token, true},  // MQA
  };
  std::uint64_t seed = 40;
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string(granularity_name(c.granularity)) + (c.bf16 ? " bf16" : " fp32") +
                 " D=" + std::to_string(c.D));
    const Problem p = make_problem(c, ++seed);
    const ReferenceGradients want = reference_gradients(p, true);
    const Gradients got = run_cuda(p, true);
    const double tolerance = c.bf16 ? 0.02 : 64.0 * static_cast<double>(c.D + c.Dv + c.W) / 16777216.0;
    expect_gradient_close(got.q, want.q, tolerance, "grad_q");
    expect_gradient_close(got.k, want.k, tolerance, "grad_k");
    expect_gradient_close(got.v, want.v, tolerance, "grad_v");
    // The lse term moves dQ by far more than the fp32 bound (the comparison sees it) and leaves dV's bits alone.
    if (!c.bf16) {
      const ReferenceGradients without = reference_gradients(p, false);
      double moved = 0.0, largest = 0.0;
      for (std::size_t i = 0; i < want.q.size(); ++i) {
        moved = std::max(moved, std::abs(want.q[i] - without.q[i]));
        largest = std::max(largest, std::abs(want.q[i]));
      }
      EXPECT_GT(moved, 10.0 * tolerance * (1.0 + largest));
    }
    const Gradients plain = run_cuda(p, false);
    EXPECT_EQ(0, std::memcmp(got.v.data(), plain.v.data(), got.v.size() * sizeof(float)));
    const Gradients again = run_cuda(p, true);
    EXPECT_EQ(0, std::memcmp(got.k.data(), again.k.data(), got.k.size() * sizeof(float)));
    EXPECT_EQ(0, std::memcmp(got.q.data(), again.q.data(), got.q.size() * sizeof(float)));
  }
}

TEST(CudaSparseAttentionBackward, RejectsBadInputNamingTheArgument) {
  KEYSEL_REQUIRE_GPU();
  const Problem p = make_problem({3, 10, 4, 2, 8, 8, 4, Granularity::per_kv_head, false}, 3);
  const CudaBuffer d_q = to_device(p.q.f), d_k = to_device(p.k.f), d_v = to_device(p.v.f);
  const CudaBuffer d_sel = to_device(p.selection), d_lse = to_device(p.lse), d_out = to_device(p.out.f);
  CudaBuffer d_gq = poisoned<float>(3 * 4 * 8, 0xFF), d_gk = poisoned<float>(10 * 2 * 8, 0xFF);
  CudaBuffer d_gv = poisoned<float>(10 * 2 * 8, 0xFF);
  const Device gpu = Device::cuda();
  const auto call = [&](std::int64_t gq_heads, DType k_dtype) {
    sparse_attention_backward_cuda(
        TensorView(d_q.data(), DType::fp32, {3, 4, 8}, gpu), TensorView(d_k.data(), k_dtype, {10, 2, 8}, gpu),
        TensorView(d_v.data(), DType::fp32, {10, 2, 8}, gpu), TensorView(d_sel.data(), DType::int32, {3, 2, 4}, gpu),
        Granularity::per_kv_head, 0.0, TensorView(d_out.data(), DType::fp32, {3, 4, 8}, gpu),
        TensorView(d_lse.data(), DType::fp32, {3, 4}, gpu), TensorView(d_out.data(), DType::fp32, {3, 4, 8}, gpu),
        TensorView(d_gq.data(), DType::fp32, {3, gq_heads, 8}, gpu),
        TensorView(d_gk.data(), DType::fp32, {10, 2, 8}, gpu), TensorView(d_gv.data(), DType::fp32, {10, 2, 8}, gpu));
  };
  const auto expect_error = [](const auto& body, const std::string& argument) {
    try {
      body();
      ADD_FAILURE() << "no error for " << argument;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(argument), std::string::npos) << e.what();
    }
  };
  expect_error([&] { call(3, DType::fp32); }, "grad_q");
  expect_error([&] { call(4, DType::bf16); }, "'k'");
  const CudaBuffer d_grad_lse = to_device(p.lse);
  const auto call_with_lse = [&](const TensorView& grad_lse) {
    sparse_attention_backward_cuda(
        TensorView(d_q.data(), DType::fp32, {3, 4, 8}, gpu), TensorView(d_k.data(), DType::fp32, {10, 2, 8}, gpu),
        TensorView(d_v.data(), DType::fp32, {10, 2, 8}, gpu), TensorView(d_sel.data(), DType::int32, {3, 2, 4}, gpu),
        Granularity::per_kv_head, 0.0, TensorView(d_out.data(), DType::fp32, {3, 4, 8}, gpu),
        TensorView(d_lse.data(), DType::fp32, {3, 4}, gpu), TensorView(d_out.data(), DType::fp32, {3, 4, 8}, gpu),
        TensorView(d_gq.data(), DType::fp32, {3, 4, 8}, gpu), TensorView(d_gk.data(), DType::fp32, {10, 2, 8}, gpu),
        TensorView(d_gv.data(), DType::fp32, {10, 2, 8}, gpu), nullptr, grad_lse);
  };
  expect_error([&] { call_with_lse(TensorView(d_grad_lse.data(), DType::fp32, {4, 3}, gpu)); }, "grad_lse");
  expect_error([&] { call_with_lse(TensorView(d_grad_lse.data(), DType::bf16, {3, 4}, gpu)); }, "grad_lse");
  expect_error([&] { call_with_lse(TensorView(p.lse.data(), DType::fp32, {3, 4})); }, "grad_lse");
}

}  // namespace
}  // namespace keysel
