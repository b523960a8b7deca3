// The backward of sparse MLA (SPEC §9.2): the double-precision reference against central finite differences of
// sparse_mla_reference (d_qk = 576 is fixed by the API, so few heads and tokens), the fp32 kernel (every SIMD level,
// fp32 / bf16 inputs) against the reference, determinism across thread counts, infinite sinks, and bad input.
//
// Tolerances. Finite differences: loss L = sum(out * dOut) + sum(lse * dLse) over the rows with a valid slot; each
// input x moves to the fp32 values x+ = fl(x + h), x- = fl(x - h) (h = 2^-9) and the slope (L(x+) - L(x-)) / (x+ -
// x-) is exact up to the O(h^2) truncation (|L'''| h^2 / 6 < 1e-6 for these inputs: logits of standard deviation
// about 1.4) and the rounding of L in double (1e-16 / h); 2e-5 (1 + |g|) leaves a margin while a wrong term of
// §9.2 moves a gradient by O(0.05) (the largest gradients here are above 0.2, checked).
// Kernel: the bound of sparse_attention_backward's test, 64 (D + Dv + k) u of 1 + max|g| with D = 576, Dv = 512
// (the logits sum 576 fp32 products, dP and Delta 512, dkv up to T H terms): about 4e-3 relative to the largest
// gradient, still a factor of ten below what one wrong term makes.
#include <gtest/gtest.h>
#include <omp.h>

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
#include "keysel/attention/sparse_mla.h"
#include "keysel/core/dtype.h"
#include "keysel/core/error.h"
#include "keysel/core/random.h"

namespace keysel {
namespace {

using keysel::testing::expect_gradient_close;

constexpr double kUnitRoundoff = 1.0 / 16777216.0;  // 2^-24
constexpr float kSentinel = -12345.25f;
constexpr double kInf = std::numeric_limits<double>::infinity();

std::size_t sz(std::int64_t n) { return static_cast<std::size_t>(n); }

/// One sparse MLA problem: q [T, H, 576] and kv [N, 576] in fp32 (rounded to bf16 when asked), indices with -1
/// anywhere, an empty row 0, topk_length, sinks and the incoming gradients.
struct Problem {
  std::int64_t T = 0, H = 0, N = 0, topk = 0;
  std::vector<float> q, kv;
  std::vector<std::uint16_t> q16, kv16;  // bf16 copies
  std::vector<std::int32_t> indices, topk_length;
  std::vector<float> sink;
  std::vector<double> grad_out, grad_lse;
  double scale = 0.06;

  TensorView q_view(DType dtype) const {
    return dtype == DType::bf16 ? TensorView(q16.data(), dtype, {T, H, kMlaQkDim})
                                : TensorView(q.data(), dtype, {T, H, kMlaQkDim});
  }
  TensorView kv_view(DType dtype) const {
    return dtype == DType::bf16 ? TensorView(kv16.data(), dtype, {N, kMlaQkDim})
                                : TensorView(kv.data(), dtype, {N, kMlaQkDim});
  }
  TensorView index_view() const { return TensorView(indices.data(), DType::int32, {T, topk}); }
  SparseMlaOptions options(bool with_length, bool with_sink) const {
    SparseMlaOptions o;
    o.scale = scale;
    if (with_length) o.topk_length = TensorView(topk_length.data(), DType::int32, {T});
    if (with_sink) o.attn_sink = TensorView(sink.data(), DType::fp32, {H});
    return o;
  }
};

Problem make(std::int64_t T, std::int64_t H, std::int64_t N, std::int64_t topk, std::uint64_t seed) {
  RandomStream rng(seed);
  Problem p;
  p.T = T, p.H = H, p.N = N, p.topk = topk;
  p.q.resize(sz(T * H * kMlaQkDim));
  for (auto& x : p.q) x = static_cast<float>(rng.normal(0.0, 1.0));
  p.kv.resize(sz(N * kMlaQkDim));
  for (auto& x : p.kv) x = static_cast<float>(rng.normal(0.0, 1.0));
  p.q16.resize(p.q.size());
  for (std::size_t i = 0; i < p.q.size(); ++i) p.q16[i] = fp32_to_bf16_bits(p.q[i]);
  p.kv16.resize(p.kv.size());
  for (std::size_t i = 0; i < p.kv.size(); ++i) p.kv16[i] = fp32_to_bf16_bits(p.kv[i]);
  p.indices.assign(sz(T * topk), -1);
  std::vector<std::int32_t> order(sz(N));
  for (std::int64_t t = 1; t < T; ++t) {  // row 0: nothing valid
    std::iota(order.begin(), order.end(), 0);
    rng.shuffle(std::span<std::int32_t>(order));
    for (std::int64_t i = 0; i < topk && i < N; ++i) {
      p.indices[sz(t * topk + i)] = rng.uniform() < 0.2 ? -1 : order[sz(i)];
    }
  }
  p.topk_length.resize(sz(T));
  for (auto& x : p.topk_length) x = static_cast<std::int32_t>(rng.uniform_int(static_cast<std::uint64_t>(topk + 3)));
  if (T > 1) p.topk_length[1] = -2;  // a negative length: nothing valid
  p.sink.resize(sz(H));
  for (auto& x : p.sink) x = static_cast<float>(rng.normal(0.5, 1.0));  // about as large as a row's lse
  p.grad_out.resize(sz(T * H * kMlaLatentDim));
  for (double& x : p.grad_out) x = static_cast<float>(rng.normal());
  p.grad_lse.resize(sz(T * H));
  for (double& x : p.grad_lse) x = static_cast<float>(rng.normal());
  return p;
}

struct Gradients {
  std::vector<double> q, kv, sink;
};

Gradients reference_gradients(const Problem& p, DType dtype, const SparseMlaOptions& options, bool with_lse) {
  Gradients g;
  g.q.assign(sz(p.T * p.H * kMlaQkDim), -1.0);
  g.kv.assign(sz(p.N * kMlaQkDim), -1.0);
  g.sink.assign(sz(p.H), -1.0);
  SparseMlaGradients views{TensorView(g.q.data(), DType::fp64, {p.T, p.H, kMlaQkDim}),
                           TensorView(g.kv.data(), DType::fp64, {p.N, kMlaQkDim}), TensorView()};
  if (!options.attn_sink.empty()) views.attn_sink = TensorView(g.sink.data(), DType::fp64, {p.H});
  sparse_mla_backward_reference(p.q_view(dtype), p.kv_view(dtype), p.index_view(),
                                TensorView(p.grad_out.data(), DType::fp64, {p.T, p.H, kMlaLatentDim}),
                                with_lse ? TensorView(p.grad_lse.data(), DType::fp64, {p.T, p.H}) : TensorView(),
                                views, options);
  return g;
}

/// sum(out * dOut) + sum(lse * dLse) of the reference forward (rows with lse = -inf have no lse term).
double reference_loss(const Problem& p, const SparseMlaOptions& options) {
  std::vector<double> out(sz(p.T * p.H * kMlaLatentDim)), lse(sz(p.T * p.H));
  sparse_mla_reference(p.q_view(DType::fp32), p.kv_view(DType::fp32), p.index_view(),
                       TensorView(out.data(), DType::fp64, {p.T, p.H, kMlaLatentDim}),
                       TensorView(lse.data(), DType::fp64, {p.T, p.H}), options);
  double loss = 0.0;
  for (std::size_t i = 0; i < out.size(); ++i) loss += out[i] * p.grad_out[i];
  for (std::size_t i = 0; i < lse.size(); ++i) {
    if (std::isfinite(lse[i])) loss += lse[i] * p.grad_lse[i];
  }
  return loss;
}

TEST(SparseMlaBackwardReference, MatchesCentralFiniteDifferencesOfTheForward) {
  Problem p = make(4, 3, 7, 6, 21);
  p.sink[2] = -std::numeric_limits<float>::infinity();  // a head without a sink: its gradient is 0
  for (const bool with_sink : {false, true}) {
    SCOPED_TRACE(with_sink ? "with sinks" : "without sinks");
    const SparseMlaOptions options = p.options(true, with_sink);
    const Gradients g = reference_gradients(p, DType::fp32, options, true);
    const double h = 1.0 / 512.0;
    double largest = 0.0;
    // Every 5th coordinate (5 is prime to 576: every row, latent and RoPE channels alike), shifted between the
    // two passes, and every sink.
    const auto check = [&](float* values, const std::vector<double>& grad, const char* name, std::size_t step) {
      for (std::size_t i = with_sink && step > 1 ? 2 : 0; i < grad.size(); i += step) {
        float* x = values + i;
        const float x0 = *x;
        if (!std::isfinite(x0)) continue;
        const float plus = static_cast<float>(x0 + h), minus = static_cast<float>(x0 - h);
        *x = plus;
        const double l_plus = reference_loss(p, options);
        *x = minus;
        const double l_minus = reference_loss(p, options);
        *x = x0;
        const double slope = (l_plus - l_minus) / (static_cast<double>(plus) - static_cast<double>(minus));
        ASSERT_NEAR(grad[i], slope, 2e-5 * (1.0 + std::abs(slope))) << name << "[" << i << "]";
        largest = std::max(largest, std::abs(grad[i]));
      }
    };
    check(p.q.data(), g.q, "grad_q", 5);
    check(p.kv.data(), g.kv, "grad_kv", 5);
    if (with_sink) {
      check(p.sink.data(), g.sink, "grad_attn_sink", 1);
      EXPECT_EQ(g.sink[2], 0.0);
      EXPECT_GT(std::abs(g.sink[0]), 1e-3);
    }
    EXPECT_GT(largest, 0.2);  // the comparison is not between zeros
    // Rows 0 (all -1) and 1 (topk_length < 0) read nothing: grad_q = 0 exactly.
    for (std::size_t i = 0; i < sz(2 * p.H * kMlaQkDim); ++i) ASSERT_EQ(g.q[i], 0.0);
  }
}

struct KernelGradients {
  std::vector<float> q, kv, sink;
};

/// The kernel's gradients, from the fp32 forward's out and lse.
KernelGradients kernel_gradients(const Problem& p, DType dtype, const SparseMlaOptions& options, bool with_lse,
                                 AttentionKernel kernel, int threads) {
  std::vector<float> out(sz(p.T * p.H * kMlaLatentDim)), lse(sz(p.T * p.H));
  sparse_mla(p.q_view(dtype), p.kv_view(dtype), p.index_view(),
             TensorView(out.data(), DType::fp32, {p.T, p.H, kMlaLatentDim}), TensorView(lse.data(), DType::fp32, {p.T, p.H}),
             options, {kernel, threads});
  const std::vector<float> grad_out(p.grad_out.begin(), p.grad_out.end());
  const std::vector<float> grad_lse(p.grad_lse.begin(), p.grad_lse.end());
  KernelGradients g;
  g.q.assign(sz(p.T * p.H * kMlaQkDim), kSentinel);
  g.kv.assign(sz(p.N * kMlaQkDim), kSentinel);
  g.sink.assign(sz(p.H), kSentinel);
  SparseMlaGradients views{TensorView(g.q.data(), DType::fp32, {p.T, p.H, kMlaQkDim}),
                           TensorView(g.kv.data(), DType::fp32, {p.N, kMlaQkDim}), TensorView()};
  if (!options.attn_sink.empty()) views.attn_sink = TensorView(g.sink.data(), DType::fp32, {p.H});
  sparse_mla_backward(p.q_view(dtype), p.kv_view(dtype), p.index_view(),
                      TensorView(out.data(), DType::fp32, {p.T, p.H, kMlaLatentDim}),
                      TensorView(lse.data(), DType::fp32, {p.T, p.H}),
                      TensorView(grad_out.data(), DType::fp32, {p.T, p.H, kMlaLatentDim}),
                      with_lse ? TensorView(grad_lse.data(), DType::fp32, {p.T, p.H}) : TensorView(), views, options,
                      {kernel, threads});
  return g;
}

TEST(SparseMlaBackward, MatchesTheReferenceOnEveryKernelAndDtype) {
  const Problem p = make(9, 5, 70, 23, 5);
  const double tolerance = 64.0 * static_cast<double>(kMlaQkDim + kMlaLatentDim + p.topk) * kUnitRoundoff;
  for (const AttentionKernel kernel : available_attention_kernels()) {
    for (const DType dtype : {DType::fp32, DType::bf16}) {
      for (const bool with_sink : {false, true}) {
        for (const bool with_lse : {false, true}) {
          SCOPED_TRACE(std::string(attention_kernel_name(kernel)) + " " + std::string(dtype_name(dtype)) +
                       (with_sink ? " sink" : "") + (with_lse ? " grad_lse" : ""));
          const SparseMlaOptions options = p.options(with_sink, with_sink);
          const Gradients want = reference_gradients(p, dtype, options, with_lse);
          const KernelGradients got = kernel_gradients(p, dtype, options, with_lse, kernel, 0);
          expect_gradient_close(got.q, want.q, tolerance, "grad_q");
          expect_gradient_close(got.kv, want.kv, tolerance, "grad_kv");
          if (with_sink) expect_gradient_close(got.sink, want.sink, tolerance, "grad_attn_sink");
          if (!with_sink) {
            EXPECT_EQ(got.sink[0], kSentinel);  // no sink gradient asked: none written
          }
        }
      }
    }
  }
}

TEST(SparseMlaBackward, IsBitwiseIdenticalAcrossThreadCounts) {
  // Many rows read the same slots, so each grad_kv row sums many terms.
  const Problem p = make(40, 8, 90, 64, 9);
  const SparseMlaOptions options = p.options(true, true);
  const int saved_threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const KernelGradients one = kernel_gradients(p, DType::bf16, options, true, AttentionKernel::automatic, 0);
  omp_set_num_threads(2);
  const KernelGradients two = kernel_gradients(p, DType::bf16, options, true, AttentionKernel::automatic, 0);
  const KernelGradients three = kernel_gradients(p, DType::bf16, options, true, AttentionKernel::automatic, 3);
  omp_set_num_threads(saved_threads);
  for (const KernelGradients* other : {&two, &three}) {
    EXPECT_EQ(0, std::memcmp(one.q.data(), other->q.data(), one.q.size() * 4));
    EXPECT_EQ(0, std::memcmp(one.kv.data(), other->kv.data(), one.kv.size() * 4));
    EXPECT_EQ(0, std::memcmp(one.sink.data(), other->sink.data(), one.sink.size() * 4));
  }
}

TEST(SparseMlaBackward, InfiniteSinksAreTheirLimits) {
  Problem p = make(5, 2, 30, 12, 3);
  // sink = -inf is no sink: the same bits as a call without one.
  std::fill(p.sink.begin(), p.sink.end(), -std::numeric_limits<float>::infinity());
  const KernelGradients none = kernel_gradients(p, DType::fp32, p.options(true, false), true, AttentionKernel::automatic, 0);
  const KernelGradients minus = kernel_gradients(p, DType::fp32, p.options(true, true), true, AttentionKernel::automatic, 0);
  EXPECT_EQ(0, std::memcmp(none.q.data(), minus.q.data(), none.q.size() * 4));
  EXPECT_EQ(0, std::memcmp(none.kv.data(), minus.kv.data(), none.kv.size() * 4));
  for (const float x : minus.sink) EXPECT_EQ(x, 0.0f);
  // sink = +inf: out = 0 whatever q and kv, so only the lse term is left.
  std::fill(p.sink.begin(), p.sink.end(), std::numeric_limits<float>::infinity());
  const SparseMlaOptions plus_options = p.options(true, true);
  const Gradients plus = reference_gradients(p, DType::fp32, plus_options, false);
  for (const double x : plus.q) ASSERT_EQ(x, 0.0);
  for (const double x : plus.kv) ASSERT_EQ(x, 0.0);
  for (const double x : plus.sink) ASSERT_EQ(x, 0.0);
  const Gradients lse_only = reference_gradients(p, DType::fp32, plus_options, true);
  const Gradients lse_no_sink = reference_gradients(p, DType::fp32, p.options(true, false), true);
  std::vector<double> no_out(p.grad_out.size(), 0.0);
  Problem silent = p;
  silent.grad_out = no_out;
  const Gradients lse_term = reference_gradients(silent, DType::fp32, p.options(true, false), true);
  for (std::size_t i = 0; i < lse_only.q.size(); ++i) ASSERT_NEAR(lse_only.q[i], lse_term.q[i], 1e-12);
  for (std::size_t i = 0; i < lse_only.kv.size(); ++i) ASSERT_NEAR(lse_only.kv[i], lse_term.kv[i], 1e-12);
  EXPECT_NE(lse_no_sink.q, lse_term.q);  // dOut matters without the sink
  const KernelGradients kernel_plus = kernel_gradients(p, DType::fp32, plus_options, true, AttentionKernel::automatic, 0);
  expect_gradient_close(kernel_plus.q, lse_only.q, 1e-5, "grad_q");
  expect_gradient_close(kernel_plus.kv, lse_only.kv, 1e-5, "grad_kv");
}

TEST(SparseMlaBackward, RejectsBadInputNamingTheArgumentAndWritesNothing) {
  const Problem p = make(3, 2, 10, 4, 1);
  std::vector<std::int32_t> indices = {0, 1, -1, 2, 3, -1, 9, 4, -1, -1, -1, -1};  // [3, 4]
  std::vector<float> out(sz(p.T * p.H * kMlaLatentDim), 0.25f), lse(sz(p.T * p.H), 1.0f);
  std::vector<float> go(out.size(), 1.0f), glse(lse.size(), 1.0f);
  std::vector<float> gq(sz(p.T * p.H * kMlaQkDim), kSentinel), gkv(sz(p.N * kMlaQkDim), kSentinel);
  std::vector<float> gsink(sz(p.H), kSentinel);
  std::vector<std::uint8_t> pages(sz(1 * 16 * kMlaV32TokenBytes), 0);
  struct Call {
    std::vector<std::int32_t> indices;
    TensorView kv, lse, grad_lse, grad_kv, grad_sink;
    bool sink = true;
    bool reference = false;
  };
  const auto run = [&](const Call& c) {
    SparseMlaOptions options = p.options(false, c.sink);
    const TensorView idx(c.indices.data(), DType::int32, {p.T, 4});
    const SparseMlaGradients grads{TensorView(gq.data(), DType::fp32, {p.T, p.H, kMlaQkDim}), c.grad_kv, c.grad_sink};
    const TensorView grad_out(go.data(), DType::fp32, {p.T, p.H, kMlaLatentDim});
    if (c.reference) {
      sparse_mla_backward_reference(p.q_view(DType::fp32), c.kv, idx, grad_out, c.grad_lse, grads, options);
    } else {
      sparse_mla_backward(p.q_view(DType::fp32), c.kv, idx, TensorView(out.data(), DType::fp32, {p.T, p.H, kMlaLatentDim}),
                          c.lse, grad_out, c.grad_lse, grads, options);
    }
  };
  const Call good{indices,
                  p.kv_view(DType::fp32),
                  TensorView(lse.data(), DType::fp32, {p.T, p.H}),
                  TensorView(glse.data(), DType::fp32, {p.T, p.H}),
                  TensorView(gkv.data(), DType::fp32, {p.N, kMlaQkDim}),
                  TensorView(gsink.data(), DType::fp32, {p.H})};
  const auto expect_error = [&](const Call& c, const std::string& argument) {
    for (const bool reference : {false, true}) {
      Call call = c;
      call.reference = reference;
      try {
        run(call);
        ADD_FAILURE() << "no error for " << argument;
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find(argument), std::string::npos) << e.what();
      }
    }
  };
  Call c = good;
  c.kv = TensorView(pages.data(), DType::fp8_e4m3, {1, 16, kMlaV32TokenBytes});
  expect_error(c, "kv");
  c = good;
  c.indices[6] = 10;  // past the cache
  expect_error(c, "indices");
  c = good;
  c.indices[7] = 9;  // repeated in row 1
  expect_error(c, "indices");
  c = good;
  c.grad_kv = TensorView(gkv.data(), DType::fp32, {p.N - 1, kMlaQkDim});
  expect_error(c, "gradients.kv");
  c = good;
  c.sink = false;  // a sink gradient without a sink
  expect_error(c, "gradients.attn_sink");
  c = good;
  c.grad_lse = TensorView(glse.data(), DType::fp32, {p.H, p.T});
  expect_error(c, "grad_lse");
  c = good;
  c.lse = TensorView(lse.data(), DType::fp16, {p.T, p.H});
  c.reference = false;
  try {
    run(c);
    ADD_FAILURE() << "no error for lse";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("lse"), std::string::npos) << e.what();
  }
  for (const float x : gq) ASSERT_EQ(x, kSentinel);
  for (const float x : gkv) ASSERT_EQ(x, kSentinel);
  for (const float x : gsink) ASSERT_EQ(x, kSentinel);
  run(good);  // the valid call goes through
  EXPECT_NE(gq[sz(p.H * kMlaQkDim)], kSentinel);
  EXPECT_EQ(gkv[sz(5 * kMlaQkDim)], 0.0f);  // slot 5 is read by no row
  EXPECT_NE(gsink[0], kSentinel);
}

}  // namespace
}  // namespace keysel
