// sparse_mla_backward_cuda against keysel::sparse_mla_backward_reference (double precision, SPEC §9.2): tokens 37,
// heads 3 and 16, topk 61 with -1, negative and out-of-range slots (invalid on the GPU; -1 for the reference, which
// rejects them) and topk_length (negative, short, past topk), an indices row stride, empty rows, with and without
// a sink and an lse gradient, fp32 and bf16 q and kv, bf16 or fp32 out and grad_out of their own; bitwise equal
// results on a second run (no atomics), sink = -inf bitwise equal to no sink, and bad input. Each test skips where
// no GPU is present.
//
// Tolerances (of 1 + max |reference|, as expect_gradient_close): fp32, the CPU kernel's bound 64 (576 + 512 + topk)
// u (tests/attention/test_sparse_mla_backward.cpp); a bf16 out (the forward's output rounded to 8 bits) moves Delta
// by about 2^-9 relative, so 0.02 as the attention backward's bf16 test.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include "attention/gradient_check.h"
#include "gpu_test_support.h"
#include "keysel/attention/sparse_mla.h"
#include "keysel/core/dtype.h"
#include "keysel/core/error.h"
#include "keysel/core/random.h"

namespace keysel {
namespace {

using keysel::testing::expect_gradient_close;
using keysel::testing::device_values;
using keysel::testing::DeviceValues;
using keysel::testing::poisoned;
using keysel::testing::to_device;
using keysel::testing::to_host;
using keysel::testing::upload;

constexpr double kUnitRoundoff = 1.0 / 16777216.0;  // 2^-24
constexpr std::int64_t kIndexPad = 3;               // the device indices' row stride is topk + kIndexPad

std::size_t sz(std::int64_t n) { return static_cast<std::size_t>(n); }

struct Case {
  std::int64_t T, H, N, topk;
  bool bf16;       // q and kv
  bool out_bf16;   // out and grad_out
  bool sink, lse, lengths;
};

struct Problem {
  Case c;
  DeviceValues q, kv, out, grad_out;
  std::vector<float> lse, grad_lse, sink;
  std::vector<std::int32_t> indices;         // [T, topk] for the reference: invalid entries -1
  std::vector<std::int32_t> device_indices;  // [T, topk + kIndexPad]: -1, -7 and slots >= N where invalid
  std::vector<std::int32_t> lengths;
  double scale = 0.06;

  SparseMlaOptions host_options(bool with_sink) const {
    SparseMlaOptions o;
    o.scale = scale;
    if (c.lengths) o.topk_length = TensorView(lengths.data(), DType::int32, {c.T});
    if (with_sink) o.attn_sink = TensorView(sink.data(), DType::fp32, {c.H});
    return o;
  }
};

Problem make_problem(const Case& c, std::uint64_t seed) {
  Problem p;
  p.c = c;
  RandomStream rng(seed);
  std::vector<float> q(sz(c.T * c.H * kMlaQkDim)), kv(sz(c.N * kMlaQkDim));
  for (auto& x : q) x = static_cast<float>(rng.normal(0.0, 1.0));
  for (auto& x : kv) x = static_cast<float>(rng.normal(0.0, 1.0));
  p.q = device_values(q, c.bf16);
  p.kv = device_values(kv, c.bf16);
  // Distinct slots per row; 20% invalid as -1, -7 or a slot past the cache (the device sees those, the reference
  // -1); row 0 has nothing valid; the last 10 slots of a large enough cache are never read.
  p.indices.assign(sz(c.T * c.topk), -1);
  p.device_indices.assign(sz(c.T * (c.topk + kIndexPad)), 12345);  // padding the device never reads
  std::vector<std::int32_t> order(sz(c.N >= c.topk + 20 ? c.N - 10 : c.N));
  for (std::int64_t t = 0; t < c.T; ++t) {
    std::iota(order.begin(), order.end(), 0);
    rng.shuffle(std::span<std::int32_t>(order));
    for (std::int64_t i = 0; i < c.topk; ++i) {
      std::int32_t slot = i < static_cast<std::int64_t>(order.size()) ? order[sz(i)] : -1;
      std::int32_t device_slot = slot;
      const double u = rng.uniform();
      if (t == 0 || u < 0.1) {
        slot = device_slot = -1;
      } else if (u < 0.15) {
        slot = -1;
        device_slot = -7;
      } else if (u < 0.2) {
        slot = -1;
        device_slot = static_cast<std::int32_t>(c.N + static_cast<std::int64_t>(rng.uniform_int(100)));
      }
      p.indices[sz(t * c.topk + i)] = slot;
      p.device_indices[sz(t * (c.topk + kIndexPad) + i)] = device_slot;
    }
  }
  p.lengths.resize(sz(c.T));
  for (auto& x : p.lengths) x = static_cast<std::int32_t>(rng.uniform_int(static_cast<std::uint64_t>(c.topk + 8)));
  if (c.T > 2) p.lengths[1] = -3;  // nothing valid
  if (c.T > 3) p.lengths[2] = 0;
  p.sink.resize(sz(c.H));
  for (auto& x : p.sink) x = static_cast<float>(rng.normal(0.5, 1.0));  // about as large as a row's lse
  p.grad_lse.resize(sz(c.T * c.H));
  for (auto& x : p.grad_lse) x = static_cast<float>(rng.normal());
  std::vector<float> grad_out(sz(c.T * c.H * kMlaLatentDim));
  for (auto& x : grad_out) x = static_cast<float>(rng.normal());
  p.grad_out = device_values(grad_out, c.out_bf16);
  // The forward on the CPU (fp32) from the device's inputs; out rounded to the device's dtype.
  std::vector<float> out(sz(c.T * c.H * kMlaLatentDim));
  p.lse.resize(sz(c.T * c.H));
  sparse_mla(TensorView(p.q.f.data(), DType::fp32, {c.T, c.H, kMlaQkDim}),
             TensorView(p.kv.f.data(), DType::fp32, {c.N, kMlaQkDim}),
             TensorView(p.indices.data(), DType::int32, {c.T, c.topk}),
             TensorView(out.data(), DType::fp32, {c.T, c.H, kMlaLatentDim}),
             TensorView(p.lse.data(), DType::fp32, {c.T, c.H}), p.host_options(c.sink));
  p.out = device_values(out, c.out_bf16);
  return p;
}

struct Reference {
  std::vector<double> q, kv, sink;
};

Reference reference(const Problem& p) {
  const Case& c = p.c;
  Reference g;
  g.q.resize(sz(c.T * c.H * kMlaQkDim));
  g.kv.resize(sz(c.N * kMlaQkDim));
  g.sink.resize(sz(c.H));
  SparseMlaGradients views{TensorView(g.q.data(), DType::fp64, {c.T, c.H, kMlaQkDim}),
                           TensorView(g.kv.data(), DType::fp64, {c.N, kMlaQkDim}), TensorView()};
  if (c.sink) views.attn_sink = TensorView(g.sink.data(), DType::fp64, {c.H});
  sparse_mla_backward_reference(TensorView(p.q.f.data(), DType::fp32, {c.T, c.H, kMlaQkDim}),
                                TensorView(p.kv.f.data(), DType::fp32, {c.N, kMlaQkDim}),
                                TensorView(p.indices.data(), DType::int32, {c.T, c.topk}),
                                TensorView(p.grad_out.f.data(), DType::fp32, {c.T, c.H, kMlaLatentDim}),
                                c.lse ? TensorView(p.grad_lse.data(), DType::fp32, {c.T, c.H}) : TensorView(), views,
                                p.host_options(c.sink));
  return g;
}

struct Gradients {
  std::vector<float> q, kv, sink;
};

/// The GPU's gradients; `sink` overrides the problem's sinks when given (same length).
Gradients run_cuda(const Problem& p, const std::vector<float>* sink = nullptr) {
  const Case& c = p.c;
  const Device gpu = Device::cuda();
  const DType dtype = c.bf16 ? DType::bf16 : DType::fp32;
  const DType out_dtype = c.out_bf16 ? DType::bf16 : DType::fp32;
  const CudaBuffer d_q = upload(p.q, c.bf16), d_kv = upload(p.kv, c.bf16);
  const CudaBuffer d_out = upload(p.out, c.out_bf16), d_grad = upload(p.grad_out, c.out_bf16);
  const CudaBuffer d_lse = to_device(p.lse), d_grad_lse = to_device(p.grad_lse);
  const CudaBuffer d_idx = to_device(p.device_indices), d_len = to_device(p.lengths);
  const CudaBuffer d_sink = to_device(sink != nullptr ? *sink : p.sink);
  CudaBuffer d_gq = poisoned<float>(c.T * c.H * kMlaQkDim, 0xFF);
  CudaBuffer d_gkv = poisoned<float>(c.N * kMlaQkDim, 0xFF);
  CudaBuffer d_gsink = poisoned<float>(c.H, 0xFF);
  SparseMlaOptions options;
  options.scale = p.scale;
  if (c.lengths) options.topk_length = TensorView(d_len.data(), DType::int32, {c.T}, gpu);
  if (c.sink) options.attn_sink = TensorView(d_sink.data(), DType::fp32, {c.H}, gpu);
  const std::int64_t index_shape[] = {c.T, c.topk}, index_strides[] = {c.topk + kIndexPad, 1};
  const SparseMlaGradients gradients{TensorView(d_gq.data(), DType::fp32, {c.T, c.H, kMlaQkDim}, gpu),
                                     TensorView(d_gkv.data(), DType::fp32, {c.N, kMlaQkDim}, gpu),
                                     c.sink ? TensorView(d_gsink.data(), DType::fp32, {c.H}, gpu) : TensorView()};
  sparse_mla_backward_cuda(TensorView(d_q.data(), dtype, {c.T, c.H, kMlaQkDim}, gpu),
                           TensorView(d_kv.data(), dtype, {c.N, kMlaQkDim}, gpu),
                           TensorView(d_idx.data(), DType::int32, index_shape, index_strides, gpu),
                           TensorView(d_out.data(), out_dtype, {c.T, c.H, kMlaLatentDim}, gpu),
                           TensorView(d_lse.data(), DType::fp32, {c.T, c.H}, gpu),
                           TensorView(d_grad.data(), out_dtype, {c.T, c.H, kMlaLatentDim}, gpu),
                           c.lse ? TensorView(d_grad_lse.data(), DType::fp32, {c.T, c.H}, gpu) : TensorView(),
                           gradients, options);
  cuda_synchronize();
  return {to_host<float>(d_gq), to_host<float>(d_gkv), to_host<float>(d_gsink)};
}

/// Whether some row reads slot s (a valid entry within the row's topk_length).
std::vector<bool> read_slots(const Problem& p) {
  std::vector<bool> read(sz(p.c.N), false);
  for (std::int64_t t = 0; t < p.c.T; ++t) {
    const std::int64_t length =
        p.c.lengths ? std::clamp<std::int64_t>(p.lengths[sz(t)], 0, p.c.topk) : p.c.topk;
    for (std::int64_t i = 0; i < length; ++i) {
      const std::int32_t s = p.indices[sz(t * p.c.topk + i)];
      if (s >= 0) read[sz(s)] = true;
    }
  }
  return read;
}

std::string describe(const Case& c) {
  return "T=" + std::to_string(c.T) + " H=" + std::to_string(c.H) + (c.bf16 ? " bf16" : " fp32") +
         (c.out_bf16 ? " out bf16" : " out fp32") + (c.sink ? " sink" : "") + (c.lse ? " grad_lse" : "") +
         (c.lengths ? " topk_length" : "");
}

TEST(CudaSparseMlaBackward, MatchesTheDoubleReference) {
  KEYSEL_REQUIRE_GPU();
  std::uint64_t seed = 70;
  for (const std::int64_t heads : {3, 16}) {
    for (const bool bf16 : {false, true}) {
      for (const bool sink : {false, true}) {
        for (const bool lse : {false, true}) {
          const Case c{37, heads, 150, 61, bf16, bf16, sink, lse, heads == 3 || sink};
          SCOPED_TRACE(describe(c));
          const Problem p = make_problem(c, ++seed);
          const Reference want = reference(p);
          const Gradients got = run_cuda(p);
          const double tolerance =
              c.out_bf16 ? 0.02 : 64.0 * static_cast<double>(kMlaQkDim + kMlaLatentDim + c.topk) * kUnitRoundoff;
          expect_gradient_close(got.q, want.q, tolerance, "grad_q");
          expect_gradient_close(got.kv, want.kv, tolerance, "grad_kv");
          if (sink) {
            expect_gradient_close(got.sink, want.sink, tolerance, "grad_attn_sink");
          } else {
            for (const float x : got.sink) ASSERT_TRUE(std::isnan(x));  // not asked: not written
          }
          // Row 0 (nothing valid) gets grad_q = 0; slots no row reads get grad_kv = 0 (some are, checked).
          for (std::size_t i = 0; i < sz(c.H * kMlaQkDim); ++i) ASSERT_EQ(got.q[i], 0.0f);
          const std::vector<bool> read = read_slots(p);
          EXPECT_NE(std::count(read.begin(), read.end(), false), 0);
          for (std::int64_t s = 0; s < c.N; ++s) {
            if (read[sz(s)]) continue;
            for (std::size_t d = 0; d < sz(kMlaQkDim); ++d) ASSERT_EQ(got.kv[sz(s * kMlaQkDim) + d], 0.0f);
          }
          // No atomics: a second run gives the same bits.
          const Gradients again = run_cuda(p);
          EXPECT_EQ(0, std::memcmp(got.q.data(), again.q.data(), got.q.size() * sizeof(float)));
          EXPECT_EQ(0, std::memcmp(got.kv.data(), again.kv.data(), got.kv.size() * sizeof(float)));
          EXPECT_EQ(0, std::memcmp(got.sink.data(), again.sink.data(), got.sink.size() * sizeof(float)));
        }
      }
    }
  }
}

TEST(CudaSparseMlaBackward, TakesOutAndGradOutOfTheirOwnDtype) {
  KEYSEL_REQUIRE_GPU();
  // bf16 q and kv with an fp32 out and grad_out (keysel.sparse_mla's default output), and fp32 q and kv with bf16
  // ones.
  const Case cases[] = {{37, 16, 150, 61, true, false, true, true, true},
                        {37, 3, 150, 61, false, true, true, true, true}};
  std::uint64_t seed = 90;
  for (const Case& c : cases) {
    SCOPED_TRACE(describe(c));
    const Problem p = make_problem(c, ++seed);
    const Reference want = reference(p);
    const Gradients got = run_cuda(p);
    const double tolerance =
        c.out_bf16 ? 0.02 : 64.0 * static_cast<double>(kMlaQkDim + kMlaLatentDim + c.topk) * kUnitRoundoff;
    expect_gradient_close(got.q, want.q, tolerance, "grad_q");
    expect_gradient_close(got.kv, want.kv, tolerance, "grad_kv");
    expect_gradient_close(got.sink, want.sink, tolerance, "grad_attn_sink");
  }
}

TEST(CudaSparseMlaBackward, InfiniteSinksAreTheirLimits) {
  KEYSEL_REQUIRE_GPU();
  Case c{37, 16, 150, 61, false, false, false, true, true};
  const Problem none = make_problem(c, 5);
  const Gradients without = run_cuda(none);
  // sink = -inf is no sink: the same bits, and a zero sink gradient.
  c.sink = true;
  Problem minus = none;
  minus.c = c;
  const std::vector<float> minus_inf(sz(c.H), -std::numeric_limits<float>::infinity());
  const Gradients with = run_cuda(minus, &minus_inf);
  EXPECT_EQ(0, std::memcmp(without.q.data(), with.q.data(), with.q.size() * sizeof(float)));
  EXPECT_EQ(0, std::memcmp(without.kv.data(), with.kv.data(), with.kv.size() * sizeof(float)));
  for (const float x : with.sink) EXPECT_EQ(x, 0.0f);
  // sink = +inf: out = 0 whatever q and kv, so only the dLse term is left (the reference's, with the forward's
  // out = 0 and the keys' lse).
  Problem plus = none;
  plus.c = c;
  std::fill(plus.sink.begin(), plus.sink.end(), std::numeric_limits<float>::infinity());
  std::fill(plus.out.f.begin(), plus.out.f.end(), 0.0f);
  const Reference want = reference(plus);
  const Gradients got = run_cuda(plus);
  const double tolerance = 64.0 * static_cast<double>(kMlaQkDim + kMlaLatentDim + c.topk) * kUnitRoundoff;
  expect_gradient_close(got.q, want.q, tolerance, "grad_q");
  expect_gradient_close(got.kv, want.kv, tolerance, "grad_kv");
  for (const float x : got.sink) EXPECT_EQ(x, 0.0f);
}

TEST(CudaSparseMlaBackward, RejectsBadInputNamingTheArgument) {
  KEYSEL_REQUIRE_GPU();
  const Case c{5, 2, 10, 4, false, false, true, true, false};
  const Problem p = make_problem(c, 1);
  const Device gpu = Device::cuda();
  const CudaBuffer d_q = to_device(p.q.f), d_kv = to_device(p.kv.f), d_out = to_device(p.out.f);
  const CudaBuffer d_grad = to_device(p.grad_out.f), d_lse = to_device(p.lse), d_idx = to_device(p.indices);
  const CudaBuffer d_sink = to_device(p.sink);
  CudaBuffer d_gq = poisoned<float>(c.T * c.H * kMlaQkDim, 0xFF), d_gkv = poisoned<float>(c.N * kMlaQkDim, 0xFF);
  CudaBuffer d_gsink = poisoned<float>(c.H, 0xFF);
  struct Call {
    TensorView kv, lse, grad_lse, grad_kv, grad_sink;
    bool sink = true;
  };
  const Call good{TensorView(d_kv.data(), DType::fp32, {c.N, kMlaQkDim}, gpu),
                  TensorView(d_lse.data(), DType::fp32, {c.T, c.H}, gpu), TensorView(),
                  TensorView(d_gkv.data(), DType::fp32, {c.N, kMlaQkDim}, gpu),
                  TensorView(d_gsink.data(), DType::fp32, {c.H}, gpu)};
  const auto run = [&](const Call& call) {
    SparseMlaOptions options;
    if (call.sink) options.attn_sink = TensorView(d_sink.data(), DType::fp32, {c.H}, gpu);
    sparse_mla_backward_cuda(TensorView(d_q.data(), DType::fp32, {c.T, c.H, kMlaQkDim}, gpu), call.kv,
                             TensorView(d_idx.data(), DType::int32, {c.T, c.topk}, gpu),
                             TensorView(d_out.data(), DType::fp32, {c.T, c.H, kMlaLatentDim}, gpu), call.lse,
                             TensorView(d_grad.data(), DType::fp32, {c.T, c.H, kMlaLatentDim}, gpu), call.grad_lse,
                             {TensorView(d_gq.data(), DType::fp32, {c.T, c.H, kMlaQkDim}, gpu), call.grad_kv,
                              call.grad_sink},
                             options);
  };
  const auto expect_error = [&](const Call& call, const std::string& argument) {
    try {
      run(call);
      ADD_FAILURE() << "no error for " << argument;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(argument), std::string::npos) << e.what();
    }
  };
  Call bad = good;
  bad.kv = TensorView(d_kv.data(), DType::fp8_e4m3, {1, 8, kMlaV32TokenBytes}, gpu);  // V3.2 pages
  expect_error(bad, "kv");
  bad = good;
  bad.kv = TensorView(d_kv.data(), DType::bf16, {c.N, kMlaQkDim}, gpu);  // not q's dtype
  expect_error(bad, "kv");
  bad = good;
  bad.kv = TensorView(p.kv.f.data(), DType::fp32, {c.N, kMlaQkDim});  // on the host
  expect_error(bad, "kv");
  bad = good;
  bad.grad_kv = TensorView(d_gkv.data(), DType::fp32, {c.N - 1, kMlaQkDim}, gpu);
  expect_error(bad, "gradients.kv");
  bad = good;
  bad.sink = false;  // a sink gradient without a sink
  expect_error(bad, "gradients.attn_sink");
  bad = good;
  bad.grad_lse = TensorView(d_lse.data(), DType::fp32, {c.H, c.T}, gpu);
  expect_error(bad, "grad_lse");
  bad = good;
  bad.lse = TensorView(d_lse.data(), DType::bf16, {c.T, c.H}, gpu);
  expect_error(bad, "lse");
  // Nothing was written.
  for (const float x : to_host<float>(d_gq)) ASSERT_TRUE(std::isnan(x));
  for (const float x : to_host<float>(d_gkv)) ASSERT_TRUE(std::isnan(x));
  for (const float x : to_host<float>(d_gsink)) ASSERT_TRUE(std::isnan(x));
  run(good);  // the valid call goes through
  cuda_synchronize();
  EXPECT_FALSE(std::isnan(to_host<float>(d_gsink)[0]));
}

}  // namespace
}  // namespace keysel
