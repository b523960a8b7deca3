// The backward of attention over a selection (SPEC §9): the double-precision reference against central finite
// differences of the reference forward, the fp32 kernel (every SIMD level, fp32/bf16/fp16 inputs) against the
// reference, determinism across thread counts, and bad input.
//
// Tolerances. Finite differences: the loss is L = sum(out * dOut); each input x is moved to the fp32 values
// x+ = fl(x + h) and x- = fl(x - h) (h = 2^-9) and the slope (L(x+) - L(x-)) / (x+ - x-) is exact up to the
// O(h^2) truncation (|L'''| h^2 / 6 < 1e-5 for these O(1) inputs) and the double rounding of L (1e-16 / h);
// the bound 2e-5 (1 + |g|) leaves a margin while any wrong term of §9 moves a gradient by O(0.1).
// Kernel: it reads the same stored bits as the reference and computes in fp32; P carries a relative error of
// about (D + 4) u B (logit of D products, B the largest |logit|, plus lse and exp), dP and Delta about Dv u,
// and the sums over the selection add count u; so every gradient is within about 64 (D + Dv + W) u of
// max|g| + 1 (a factor of 4 above the worst case seen, and far below the O(1e-2) an error in the formula makes).
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include "attention/gradient_check.h"
#include "keysel/attention/reference.h"
#include "keysel/attention/sparse_attention.h"
#include "keysel/core/random.h"

namespace keysel {
namespace {

using keysel::testing::expect_gradient_close;

constexpr double kUnitRoundoff = 1.0 / 16777216.0;  // 2^-24
constexpr float kSentinel = -12345.25f;

struct Shape {
  std::int64_t T, N, Hq, Hkv, D, Dv;
};

/// Values stored in one of the dtypes the kernel reads.
struct Stored {
  DType dtype = DType::fp32;
  std::vector<std::byte> bytes;

  void fill(RandomStream& rng, std::size_t count, double stddev) {
    bytes.resize(count * static_cast<std::size_t>(dtype_bits(dtype) / 8));
    for (std::size_t i = 0; i < count; ++i) {
      const float x = static_cast<float>(rng.normal(0.0, stddev));
      if (dtype == DType::fp32) {
        std::memcpy(bytes.data() + 4 * i, &x, 4);
      } else {
        const std::uint16_t bits = dtype == DType::bf16 ? fp32_to_bf16_bits(x) : fp32_to_fp16_bits(x);
        std::memcpy(bytes.data() + 2 * i, &bits, 2);
      }
    }
  }
  float* floats() { return reinterpret_cast<float*>(bytes.data()); }
  std::size_t size() const { return bytes.size() / static_cast<std::size_t>(dtype_bits(dtype) / 8); }
};

struct Case {
  Shape shape{};
  Stored q, k, v;
  std::vector<std::int32_t> positions;
  std::vector<double> grad_out;  // [T, Hq, Dv]
  std::vector<double> grad_lse;  // [T, Hq], or empty: no lse term
  double scale = 0.0;

  AttentionInputs inputs() const {
    AttentionInputs in;
    in.q = TensorView(q.bytes.data(), q.dtype, {shape.T, shape.Hq, shape.D});
    in.k = TensorView(k.bytes.data(), k.dtype, {shape.N, shape.Hkv, shape.D});
    in.v = TensorView(v.bytes.data(), v.dtype, {shape.N, shape.Hkv, shape.Dv});
    in.positions = TensorView(positions.data(), DType::int32, {shape.T});
    in.scale = scale;
    return in;
  }
  std::int64_t allowed(std::int64_t t) const {
    return std::min<std::int64_t>(positions[static_cast<std::size_t>(t)] + 1, shape.N);
  }
};

Case make_case(std::uint64_t seed, Shape shape, DType qt, DType kt, DType vt, std::vector<std::int32_t> positions) {
  Case c;
  c.shape = shape;
  c.q.dtype = qt;
  c.k.dtype = kt;
  c.v.dtype = vt;
  RandomStream rng(seed);
  c.q.fill(rng, static_cast<std::size_t>(shape.T * shape.Hq * shape.D), 1.5);
  c.k.fill(rng, static_cast<std::size_t>(shape.N * shape.Hkv * shape.D), 1.0);
  c.v.fill(rng, static_cast<std::size_t>(shape.N * shape.Hkv * shape.Dv), 1.0);
  c.grad_out.resize(static_cast<std::size_t>(shape.T * shape.Hq * shape.Dv));
  for (double& x : c.grad_out) x = static_cast<float>(rng.normal());  // representable in fp32
  c.positions = std::move(positions);
  return c;
}

/// A random selection [T, G, W]: per row a random number (0 .. min(W, allowed)) of distinct allowed keys in
/// random order, then -1; row (0, 0) is always empty.
std::vector<std::int32_t> random_selection(const Case& c, std::int64_t groups, std::int64_t width,
                                           std::uint64_t seed) {
  std::vector<std::int32_t> sel(static_cast<std::size_t>(c.shape.T * groups * width), -1);
  RandomStream rng(seed, 7);
  for (std::int64_t t = 0; t < c.shape.T; ++t) {
    const std::int64_t allowed = c.allowed(t);
    std::vector<std::int32_t> keys(static_cast<std::size_t>(allowed));
    std::iota(keys.begin(), keys.end(), 0);
    for (std::int64_t g = 0; g < groups; ++g) {
      if (t == 0 && g == 0) continue;
      rng.shuffle(std::span<std::int32_t>(keys));
      const std::int64_t most = std::min(width, allowed);
      const auto count = static_cast<std::int64_t>(rng.uniform_int(static_cast<std::uint64_t>(most + 1)));
      for (std::int64_t i = 0; i < count; ++i) {
        sel[static_cast<std::size_t>((t * groups + g) * width + i)] = keys[static_cast<std::size_t>(i)];
      }
    }
  }
  return sel;
}

struct Gradients {
  std::vector<double> q, k, v;
};

Gradients reference_gradients(const Case& c, const std::vector<std::int32_t>& sel, std::int64_t groups,
                              std::int64_t width, Granularity granularity) {
  const Shape& s = c.shape;
  Gradients g;
  g.q.assign(static_cast<std::size_t>(s.T * s.Hq * s.D), -1.0);
  g.k.assign(static_cast<std::size_t>(s.N * s.Hkv * s.D), -1.0);
  g.v.assign(static_cast<std::size_t>(s.N * s.Hkv * s.Dv), -1.0);
  sparse_attention_backward_reference(c.inputs(), TensorView(sel.data(), DType::int32, {s.T, groups, width}),
                                      granularity, TensorView(c.grad_out.data(), DType::fp64, {s.T, s.Hq, s.Dv}),
                                      TensorView(g.q.data(), DType::fp64, {s.T, s.Hq, s.D}),
                                      TensorView(g.k.data(), DType::fp64, {s.N, s.Hkv, s.D}),
                                      TensorView(g.v.data(), DType::fp64, {s.N, s.Hkv, s.Dv}),
                                      c.grad_lse.empty() ? TensorView()
                                                         : TensorView(c.grad_lse.data(), DType::fp64, {s.T, s.Hq}));
  return g;
}

/// sum(out * grad_out) (+ sum(lse * grad_lse) over rows with a selected key) of the reference forward.
double reference_loss(const Case& c, const std::vector<std::int32_t>& sel, std::int64_t groups, std::int64_t width,
                      Granularity granularity) {
  const Shape& s = c.shape;
  std::vector<double> out(static_cast<std::size_t>(s.T * s.Hq * s.Dv)), lse(static_cast<std::size_t>(s.T * s.Hq));
  sparse_attention_reference(c.inputs(), TensorView(sel.data(), DType::int32, {s.T, groups, width}), granularity,
                             TensorView(out.data(), DType::fp64, {s.T, s.Hq, s.Dv}),
                             TensorView(lse.data(), DType::fp64, {s.T, s.Hq}));
  double loss = 0.0;
  for (std::size_t i = 0; i < out.size(); ++i) loss += out[i] * c.grad_out[i];
  for (std::size_t i = 0; i < c.grad_lse.size(); ++i) {
    if (std::isfinite(lse[i])) loss += lse[i] * c.grad_lse[i];
  }
  return loss;
}

constexpr Granularity kGranularities[] = {Granularity::per_head, Granularity::per_kv_head, Granularity::per_token};

void expect_finite_differences(bool with_lse) {
  // Odd D and Dv, g = 3, positions past N and below, rows of every length including empty ones.
  const Shape shape{5, 23, 6, 2, 7, 5};
  const std::int64_t width = 9;
  for (const Granularity granularity : kGranularities) {
    SCOPED_TRACE(std::string(granularity_name(granularity)) + (with_lse ? " with grad_lse" : ""));
    Case c = make_case(11, shape, DType::fp32, DType::fp32, DType::fp32, {20, 40, 3, 0, 22});
    if (with_lse) {
      RandomStream rng(12);
      c.grad_lse.resize(static_cast<std::size_t>(shape.T * shape.Hq));
      for (double& x : c.grad_lse) x = static_cast<float>(rng.normal());
    }
    const std::int64_t groups = group_count(granularity, shape.Hq, shape.Hkv);
    const std::vector<std::int32_t> sel = random_selection(c, groups, width, 5);
    const Gradients g = reference_gradients(c, sel, groups, width, granularity);

    const double h = 1.0 / 512.0;
    double largest = 0.0;
    const auto check = [&](Stored& stored, const std::vector<double>& grad, const char* name) {
      ASSERT_EQ(stored.size(), grad.size());
      for (std::size_t i = 0; i < grad.size(); ++i) {
        float* x = stored.floats() + i;
        const float x0 = *x;
        const float plus = static_cast<float>(x0 + h), minus = static_cast<float>(x0 - h);
        *x = plus;
        const double l_plus = reference_loss(c, sel, groups, width, granularity);
        *x = minus;
        const double l_minus = reference_loss(c, sel, groups, width, granularity);
        *x = x0;
        const double slope = (l_plus - l_minus) / (static_cast<double>(plus) - static_cast<double>(minus));
        ASSERT_NEAR(grad[i], slope, 2e-5 * (1.0 + std::abs(slope))) << name << "[" << i << "]";
        largest = std::max(largest, std::abs(grad[i]));
      }
    };
    check(c.q, g.q, "grad_q");
    check(c.k, g.k, "grad_k");
    check(c.v, g.v, "grad_v");
    EXPECT_GT(largest, 0.1);  // the comparison is not between zeros
    // Row (0, 0) is empty: its heads get dQ = 0 exactly.
    const HeadRange heads = heads_of_group(granularity, 0, shape.Hq, shape.Hkv);
    for (std::int64_t hh = heads.first; hh < heads.first + heads.count; ++hh) {
      for (std::int64_t d = 0; d < shape.D; ++d) EXPECT_EQ(g.q[static_cast<std::size_t>(hh * shape.D + d)], 0.0);
    }
  }
}

TEST(SparseAttentionBackwardReference, MatchesCentralFiniteDifferencesOfTheForward) { expect_finite_differences(false); }

TEST(SparseAttentionBackwardReference, LseGradientMatchesCentralFiniteDifferences) {
  // loss = sum(out * dOut) + sum(lse * dLse): d lse / d logit = P adds P * dLse to dS.
  expect_finite_differences(true);
}

struct KernelGradients {
  std::vector<float> q, k, v;
};

KernelGradients kernel_gradients(const Case& c, const std::vector<std::int32_t>& sel, std::int64_t groups,
                                 std::int64_t width, Granularity granularity, AttentionKernel kernel, int threads,
                                 DType grad_dtype = DType::fp32) {
  const Shape& s = c.shape;
  const TensorView selection(sel.data(), DType::int32, {s.T, groups, width});
  std::vector<float> out(static_cast<std::size_t>(s.T * s.Hq * s.Dv)), lse(static_cast<std::size_t>(s.T * s.Hq));
  sparse_attention(c.inputs(), selection, granularity, TensorView(out.data(), DType::fp32, {s.T, s.Hq, s.Dv}),
                   TensorView(lse.data(), DType::fp32, {s.T, s.Hq}), {kernel, threads});
  // out and grad_out in the requested dtype (rounded from fp32), as a bf16/fp16 model hands them over.
  Stored out_stored, grad_stored;
  out_stored.dtype = grad_stored.dtype = grad_dtype;
  const auto store = [&](Stored& target, const auto& values) {
    target.bytes.resize(values.size() * static_cast<std::size_t>(dtype_bits(grad_dtype) / 8));
    for (std::size_t i = 0; i < values.size(); ++i) {
      const auto x = static_cast<float>(values[i]);
      if (grad_dtype == DType::fp32) {
        std::memcpy(target.bytes.data() + 4 * i, &x, 4);
      } else {
        const std::uint16_t bits = grad_dtype == DType::bf16 ? fp32_to_bf16_bits(x) : fp32_to_fp16_bits(x);
        std::memcpy(target.bytes.data() + 2 * i, &bits, 2);
      }
    }
  };
  store(out_stored, out);
  store(grad_stored, c.grad_out);
  const std::vector<float> grad_lse(c.grad_lse.begin(), c.grad_lse.end());
  KernelGradients g;
  g.q.assign(static_cast<std::size_t>(s.T * s.Hq * s.D), kSentinel);
  g.k.assign(static_cast<std::size_t>(s.N * s.Hkv * s.D), kSentinel);
  g.v.assign(static_cast<std::size_t>(s.N * s.Hkv * s.Dv), kSentinel);
  sparse_attention_backward(c.inputs(), selection, granularity,
                            TensorView(out_stored.bytes.data(), grad_dtype, {s.T, s.Hq, s.Dv}),
                            TensorView(lse.data(), DType::fp32, {s.T, s.Hq}),
                            TensorView(grad_stored.bytes.data(), grad_dtype, {s.T, s.Hq, s.Dv}),
                            TensorView(g.q.data(), DType::fp32, {s.T, s.Hq, s.D}),
                            TensorView(g.k.data(), DType::fp32, {s.N, s.Hkv, s.D}),
                            TensorView(g.v.data(), DType::fp32, {s.N, s.Hkv, s.Dv}), {kernel, threads},
                            grad_lse.empty() ? TensorView() : TensorView(grad_lse.data(), DType::fp32, {s.T, s.Hq}));
  return g;
}

TEST(SparseAttentionBackward, MatchesTheReferenceOnEveryKernelAndDtype) {
  const Shape shape{7, 61, 12, 4, 19, 21};  // g = 3, D and Dv past one register with a tail
  const std::int64_t width = 13;
  const DType dtypes[][3] = {{DType::fp32, DType::fp32, DType::fp32},
                             {DType::bf16, DType::bf16, DType::bf16},
                             {DType::fp16, DType::bf16, DType::fp32}};
  std::uint64_t seed = 100;
  for (const AttentionKernel kernel : available_attention_kernels()) {
    for (const auto& types : dtypes) {
      for (const Granularity granularity : kGranularities) {
        SCOPED_TRACE(std::string(attention_kernel_name(kernel)) + " " + std::string(granularity_name(granularity)) +
                     " " + std::string(dtype_name(types[1])));
        const Case c = make_case(++seed, shape, types[0], types[1], types[2], {60, 3, 100, 0, 33, 59, 17});
        const std::int64_t groups = group_count(granularity, shape.Hq, shape.Hkv);
        const std::vector<std::int32_t> sel = random_selection(c, groups, width, seed);
        const Gradients want = reference_gradients(c, sel, groups, width, granularity);
        const KernelGradients got = kernel_gradients(c, sel, groups, width, granularity, kernel, 0);
        const double tolerance = 64.0 * static_cast<double>(shape.D + shape.Dv + width) * kUnitRoundoff;
        expect_gradient_close(got.q, want.q, tolerance, "grad_q");
        expect_gradient_close(got.k, want.k, tolerance, "grad_k");
        expect_gradient_close(got.v, want.v, tolerance, "grad_v");
      }
    }
  }
}

TEST(SparseAttentionBackward, LseGradientMatchesTheReferenceOnEveryKernelAndThreadCount) {
  const Shape shape{8, 47, 6, 2, 17, 9};
  const std::int64_t width = 12;
  std::uint64_t seed = 300;
  for (const AttentionKernel kernel : available_attention_kernels()) {
    for (const Granularity granularity : kGranularities) {
      SCOPED_TRACE(std::string(attention_kernel_name(kernel)) + " " + std::string(granularity_name(granularity)));
      Case c = make_case(++seed, shape, DType::bf16, DType::fp32, DType::bf16, {46, 3, 20, 0, 46, 33, 46, 12});
      RandomStream rng(seed, 3);
      c.grad_lse.resize(static_cast<std::size_t>(shape.T * shape.Hq));
      for (double& x : c.grad_lse) x = static_cast<float>(rng.normal());
      const std::int64_t groups = group_count(granularity, shape.Hq, shape.Hkv);
      const std::vector<std::int32_t> sel = random_selection(c, groups, width, seed);
      const Gradients want = reference_gradients(c, sel, groups, width, granularity);
      const KernelGradients got = kernel_gradients(c, sel, groups, width, granularity, kernel, 0);
      const double tolerance = 64.0 * static_cast<double>(shape.D + shape.Dv + width) * kUnitRoundoff;
      expect_gradient_close(got.q, want.q, tolerance, "grad_q");
      expect_gradient_close(got.k, want.k, tolerance, "grad_k");
      expect_gradient_close(got.v, want.v, tolerance, "grad_v");
      // The lse term changes dQ and dK (not dV), and the result stays independent of the thread count.
      Case plain = c;
      plain.grad_lse.clear();
      const KernelGradients without = kernel_gradients(plain, sel, groups, width, granularity, kernel, 0);
      EXPECT_NE(without.q, got.q);
      EXPECT_EQ(without.v, got.v);
      const KernelGradients one = kernel_gradients(c, sel, groups, width, granularity, kernel, 1);
      const KernelGradients three = kernel_gradients(c, sel, groups, width, granularity, kernel, 3);
      EXPECT_EQ(0, std::memcmp(one.q.data(), three.q.data(), one.q.size() * 4));
      EXPECT_EQ(0, std::memcmp(one.k.data(), three.k.data(), one.k.size() * 4));
      EXPECT_EQ(0, std::memcmp(got.k.data(), three.k.data(), one.k.size() * 4));
    }
  }
}

TEST(SparseAttentionBackward, Bf16OutAndGradOutStayWithinTheirRounding) {
  // out and grad_out rounded to bf16 (8 bits): the gradients move by about 2^-8 relative, not more.
  const Shape shape{6, 40, 4, 1, 16, 16};
  const std::int64_t width = 11;
  const Case c = make_case(7, shape, DType::bf16, DType::bf16, DType::bf16, {39, 12, 5, 30, 0, 39});
  for (const Granularity granularity : kGranularities) {
    const std::int64_t groups = group_count(granularity, shape.Hq, shape.Hkv);
    const std::vector<std::int32_t> sel = random_selection(c, groups, width, 3);
    const Gradients want = reference_gradients(c, sel, groups, width, granularity);
    const KernelGradients got =
        kernel_gradients(c, sel, groups, width, granularity, AttentionKernel::automatic, 0, DType::bf16);
    expect_gradient_close(got.q, want.q, 0.02, "grad_q");
    expect_gradient_close(got.k, want.k, 0.02, "grad_k");
    expect_gradient_close(got.v, want.v, 0.02, "grad_v");
  }
}

TEST(SparseAttentionBackward, IsBitwiseIdenticalAcrossThreadCounts) {
  // Many query tokens select the same keys (per_token, MQA-like GQA), so dK and dV sum many terms.
  const Shape shape{33, 150, 8, 2, 64, 48};
  const std::int64_t width = 60;
  const Case c = make_case(9, shape, DType::fp32, DType::bf16, DType::fp32,
                           {149, 149, 120, 80, 60, 149, 149, 100, 90, 10, 149, 149, 149, 70, 149, 149, 149,
                            149, 30, 149, 149, 149, 149, 149, 140, 149, 149, 149, 149, 5, 149, 149, 149});
  const int saved_threads = omp_get_max_threads();
  for (const Granularity granularity : kGranularities) {
    const std::int64_t groups = group_count(granularity, shape.Hq, shape.Hkv);
    const std::vector<std::int32_t> sel = random_selection(c, groups, width, 4);
    omp_set_num_threads(1);
    const KernelGradients one = kernel_gradients(c, sel, groups, width, granularity, AttentionKernel::automatic, 0);
    omp_set_num_threads(2);
    const KernelGradients two = kernel_gradients(c, sel, groups, width, granularity, AttentionKernel::automatic, 0);
    const KernelGradients three = kernel_gradients(c, sel, groups, width, granularity, AttentionKernel::automatic, 3);
    EXPECT_EQ(0, std::memcmp(one.q.data(), two.q.data(), one.q.size() * 4));
    EXPECT_EQ(0, std::memcmp(one.k.data(), two.k.data(), one.k.size() * 4));
    EXPECT_EQ(0, std::memcmp(one.v.data(), two.v.data(), one.v.size() * 4));
    EXPECT_EQ(0, std::memcmp(one.k.data(), three.k.data(), one.k.size() * 4));
    EXPECT_EQ(0, std::memcmp(one.v.data(), three.v.data(), one.v.size() * 4));
  }
  omp_set_num_threads(saved_threads);
}

TEST(SparseAttentionBackward, RejectsBadInputNamingTheArgumentAndWritesNothing) {
  const Shape s{3, 10, 4, 2, 8, 6};
  const Case c = make_case(1, s, DType::fp32, DType::fp32, DType::fp32, {9, 4, 0});
  std::vector<std::int32_t> sel = {0, 1, -1, 2, 3, 4, 0, -1, -1, 0, 2, -1, 0, -1, -1, -1, -1, -1};  // [3, 2, 3]
  std::vector<float> out(static_cast<std::size_t>(s.T * s.Hq * s.Dv), 0.5f), lse(12, 0.0f);
  std::vector<float> go(out.size(), 1.0f), gq(static_cast<std::size_t>(s.T * s.Hq * s.D), kSentinel);
  std::vector<float> gk(static_cast<std::size_t>(s.N * s.Hkv * s.D), kSentinel);
  std::vector<float> gv(static_cast<std::size_t>(s.N * s.Hkv * s.Dv), kSentinel);
  const auto call = [&](const std::vector<std::int32_t>& selection, std::int64_t gq_heads, DType lse_dtype) {
    sparse_attention_backward(c.inputs(), TensorView(selection.data(), DType::int32, {s.T, 2, 3}),
                              Granularity::per_kv_head, TensorView(out.data(), DType::fp32, {s.T, s.Hq, s.Dv}),
                              TensorView(lse.data(), lse_dtype, {s.T, s.Hq}),
                              TensorView(go.data(), DType::fp32, {s.T, s.Hq, s.Dv}),
                              TensorView(gq.data(), DType::fp32, {s.T, gq_heads, s.D}),
                              TensorView(gk.data(), DType::fp32, {s.N, s.Hkv, s.D}),
                              TensorView(gv.data(), DType::fp32, {s.N, s.Hkv, s.Dv}));
  };
  const auto expect_error = [&](const auto& body, const std::string& argument) {
    try {
      body();
      ADD_FAILURE() << "no error for " << argument;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(argument), std::string::npos) << e.what();
    }
  };
  expect_error([&] { call(sel, 3, DType::fp32); }, "grad_q");
  expect_error([&] { call(sel, s.Hq, DType::fp16); }, "lse");
  std::vector<float> glse(12, 1.0f);
  expect_error(
      [&] {
        sparse_attention_backward(c.inputs(), TensorView(sel.data(), DType::int32, {s.T, 2, 3}),
                                  Granularity::per_kv_head, TensorView(out.data(), DType::fp32, {s.T, s.Hq, s.Dv}),
                                  TensorView(lse.data(), DType::fp32, {s.T, s.Hq}),
                                  TensorView(go.data(), DType::fp32, {s.T, s.Hq, s.Dv}),
                                  TensorView(gq.data(), DType::fp32, {s.T, s.Hq, s.D}),
                                  TensorView(gk.data(), DType::fp32, {s.N, s.Hkv, s.D}),
                                  TensorView(gv.data(), DType::fp32, {s.N, s.Hkv, s.Dv}), {},
                                  TensorView(glse.data(), DType::fp32, {s.Hq, s.T}));
      },
      "grad_lse");
  std::vector<std::int32_t> bad = sel;
  bad[9] = 5;  // token 1 (position 4) may read keys 0..4 only
  expect_error([&] { call(bad, s.Hq, DType::fp32); }, "selection");
  bad = sel;
  bad[10] = 0;  // repeated
  expect_error([&] { call(bad, s.Hq, DType::fp32); }, "selection");
  for (const float x : gq) ASSERT_EQ(x, kSentinel);
  for (const float x : gk) ASSERT_EQ(x, kSentinel);
  for (const float x : gv) ASSERT_EQ(x, kSentinel);
  call(sel, s.Hq, DType::fp32);  // the valid call goes through
  EXPECT_NE(gq[0], kSentinel);
}

}  // namespace
}  // namespace keysel
