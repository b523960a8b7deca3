// The fast CPU sparse attention (and full_attention_fast) against the double-precision reference on awkward
// shapes, every SIMD kernel against the scalar one, strided views, the key-range split, and bad input.
//
// Tolerances: the reference reads the same fp32/bf16/fp16 bits as the kernel, so the only error is the kernel's
// fp32 arithmetic. With u = 2^-24 (fp32 unit roundoff), a logit of D products carries at most about
// (D + 2) u B, B = scale * max sum_d |q_d k_d|; the softmax adds about (count + 8) u (sums, exp); out errors are
// those relative errors times max |v|. The bounds below are those worst cases times a safety factor of 4.
#include "keysel/attention/sparse_attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "keysel/attention/reference.h"
#include "keysel/core/random.h"

namespace keysel {
namespace {

constexpr double kUnitRoundoff = 1.0 / 16777216.0;  // 2^-24
constexpr float kSentinel = -12345.25f;

/// Values stored in one of the dtypes the kernel reads, with the double value of every stored element.
struct Stored {
  DType dtype = DType::fp32;
  std::vector<std::byte> bytes;
  std::vector<double> values;

  void fill(RandomStream& rng, std::size_t count, double stddev) {
    values.resize(count);
    bytes.resize(count * static_cast<std::size_t>(dtype_bits(dtype) / 8));
    for (std::size_t i = 0; i < count; ++i) {
      const float x = static_cast<float>(rng.normal(0.0, stddev));
      if (dtype == DType::fp32) {
        std::memcpy(bytes.data() + 4 * i, &x, 4);
        values[i] = x;
      } else {
        const std::uint16_t bits = dtype == DType::bf16 ? fp32_to_bf16_bits(x) : fp32_to_fp16_bits(x);
        std::memcpy(bytes.data() + 2 * i, &bits, 2);
        values[i] = dtype == DType::bf16 ? bf16_bits_to_fp32(bits) : fp16_bits_to_fp32(bits);
      }
    }
  }
};

struct Shape {
  std::int64_t T, N, Hq, Hkv, D, Dv;
};

struct Case {
  Shape shape{};
  Stored q, k, v;
  std::vector<std::int32_t> positions;
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
  double effective_scale() const { return scale != 0.0 ? scale : 1.0 / std::sqrt(static_cast<double>(shape.D)); }
  /// B = scale * max over (t, h, s) of sum_d |q_d k_d|.
  double logit_magnitude() const {
    double best = 0.0;
    const std::int64_t g = shape.Hq / shape.Hkv;
    for (std::int64_t t = 0; t < shape.T; ++t) {
      for (std::int64_t h = 0; h < shape.Hq; ++h) {
        for (std::int64_t s = 0; s < shape.N; ++s) {
          double sum = 0.0;
          for (std::int64_t d = 0; d < shape.D; ++d) {
            sum += std::abs(q.values[static_cast<std::size_t>((t * shape.Hq + h) * shape.D + d)] *
                            k.values[static_cast<std::size_t>((s * shape.Hkv + h / g) * shape.D + d)]);
          }
          best = std::max(best, sum);
        }
      }
    }
    return effective_scale() * best;
  }
  double max_abs_v() const {
    double m = 0.0;
    for (const double x : v.values) m = std::max(m, std::abs(x));
    return m;
  }
};

Case make_case(std::uint64_t seed, Shape shape, DType qt, DType kt, DType vt, std::vector<std::int32_t> positions,
               double q_stddev = 1.0) {
  Case c;
  c.shape = shape;
  c.q.dtype = qt;
  c.k.dtype = kt;
  c.v.dtype = vt;
  RandomStream rng(seed);
  c.q.fill(rng, static_cast<std::size_t>(shape.T * shape.Hq * shape.D), q_stddev);
  c.k.fill(rng, static_cast<std::size_t>(shape.N * shape.Hkv * shape.D), 1.0);
  c.v.fill(rng, static_cast<std::size_t>(shape.N * shape.Hkv * shape.Dv), 1.0);
  c.positions = std::move(positions);
  return c;
}

/// A random selection [T, G, W]: per row a random number (0 .. min(W, allowed)) of distinct allowed keys in
/// random order, then -1. `full_rows` makes every row as full as allowed.
std::vector<std::int32_t> random_selection(const Case& c, std::int64_t groups, std::int64_t width, std::uint64_t seed,
                                           bool full_rows = false) {
  std::vector<std::int32_t> sel(static_cast<std::size_t>(c.shape.T * groups * width), -1);
  RandomStream rng(seed, 7);
  for (std::int64_t t = 0; t < c.shape.T; ++t) {
    const std::int64_t allowed = c.allowed(t);
    std::vector<std::int32_t> keys(static_cast<std::size_t>(allowed));
    std::iota(keys.begin(), keys.end(), 0);
    for (std::int64_t g = 0; g < groups; ++g) {
      rng.shuffle(std::span<std::int32_t>(keys));
      const std::int64_t most = std::min(width, allowed);
      const std::int64_t count =
          full_rows ? most : static_cast<std::int64_t>(rng.uniform_int(static_cast<std::uint64_t>(most + 1)));
      for (std::int64_t i = 0; i < count; ++i) {
        sel[static_cast<std::size_t>((t * groups + g) * width + i)] = keys[static_cast<std::size_t>(i)];
      }
    }
  }
  return sel;
}

struct Result {
  std::vector<float> out, lse;
};

Result run_sparse(const Case& c, const std::vector<std::int32_t>& sel, std::int64_t groups, std::int64_t width,
                  Granularity granularity, AttentionKernel kernel, int threads = 0) {
  Result r;
  r.out.assign(static_cast<std::size_t>(c.shape.T * c.shape.Hq * c.shape.Dv), kSentinel);
  r.lse.assign(static_cast<std::size_t>(c.shape.T * c.shape.Hq), kSentinel);
  const TensorView selection(sel.data(), DType::int32, {c.shape.T, groups, width});
  sparse_attention(c.inputs(), selection, granularity,
                   TensorView(r.out.data(), DType::fp32, {c.shape.T, c.shape.Hq, c.shape.Dv}),
                   TensorView(r.lse.data(), DType::fp32, {c.shape.T, c.shape.Hq}), {kernel, threads});
  return r;
}

struct Reference {
  std::vector<double> out, lse;
};

Reference run_reference(const Case& c, const std::vector<std::int32_t>& sel, std::int64_t groups,
                        std::int64_t width, Granularity granularity) {
  Reference r;
  r.out.assign(static_cast<std::size_t>(c.shape.T * c.shape.Hq * c.shape.Dv), 0.0);
  r.lse.assign(static_cast<std::size_t>(c.shape.T * c.shape.Hq), 0.0);
  const TensorView selection(sel.data(), DType::int32, {c.shape.T, groups, width});
  sparse_attention_reference(c.inputs(), selection, granularity,
                             TensorView(r.out.data(), DType::fp64, {c.shape.T, c.shape.Hq, c.shape.Dv}),
                             TensorView(r.lse.data(), DType::fp64, {c.shape.T, c.shape.Hq}));
  return r;
}

struct Tolerance {
  double lse = 0, out = 0;
};

Tolerance tolerance_for(const Case& c, std::int64_t count) {
  const double logit = (static_cast<double>(c.shape.D) + 2.0) * kUnitRoundoff * c.logit_magnitude();
  const double softmax = 2.0 * logit + (static_cast<double>(count) + 8.0) * kUnitRoundoff;
  return {4.0 * softmax, 4.0 * softmax * std::max(1.0, c.max_abs_v())};
}

void expect_close(const Result& got, const Reference& want, const Tolerance& tol, const std::string& what) {
  ASSERT_EQ(got.out.size(), want.out.size());
  for (std::size_t i = 0; i < want.out.size(); ++i) {
    ASSERT_NEAR(got.out[i], want.out[i], tol.out) << what << " out[" << i << "]";
  }
  for (std::size_t i = 0; i < want.lse.size(); ++i) {
    if (std::isinf(want.lse[i])) {
      ASSERT_TRUE(std::isinf(got.lse[i]) && got.lse[i] < 0) << what << " lse[" << i << "] = " << got.lse[i];
    } else {
      ASSERT_NEAR(got.lse[i], want.lse[i], tol.lse) << what << " lse[" << i << "]";
    }
  }
}

std::string describe(const Shape& s, DType qt, DType kt, DType vt, Granularity gr, AttentionKernel kernel) {
  return "T=" + std::to_string(s.T) + " N=" + std::to_string(s.N) + " Hq=" + std::to_string(s.Hq) +
         " Hkv=" + std::to_string(s.Hkv) + " D=" + std::to_string(s.D) + " Dv=" + std::to_string(s.Dv) + " q " +
         std::string(dtype_name(qt)) + " k " + std::string(dtype_name(kt)) + " v " + std::string(dtype_name(vt)) +
         " " + std::string(granularity_name(gr)) + " " + std::string(attention_kernel_name(kernel));
}

TEST(SparseAttention, MatchesReferenceOnAwkwardShapesEveryKernelAndDtype) {
  // MHA, GQA, MQA; D and Dv below, at and across register widths; selections crossing the 64-key block.
  const std::vector<std::pair<Shape, std::vector<std::int32_t>>> shapes = {
      {{5, 37, 6, 2, 13, 7}, {20, 36, 3, 0, 50}},
      {{3, 200, 8, 8, 33, 17}, {199, 150, 64}},
      {{4, 150, 12, 1, 16, 1}, {149, 10, 200, 65}},
      {{2, 300, 10, 2, 128, 128}, {299, 129}},
      {{2, 90, 9, 3, 1, 24}, {89, 45}},
  };
  const DType dtypes[3] = {DType::fp32, DType::bf16, DType::fp16};
  std::uint64_t seed = 1;
  for (const auto& [shape, positions] : shapes) {
    for (const Granularity gr : {Granularity::per_head, Granularity::per_kv_head, Granularity::per_token}) {
      const std::int64_t groups = group_count(gr, shape.Hq, shape.Hkv);
      for (int combo = 0; combo < 3; ++combo) {
        const DType qt = dtypes[combo], kt = dtypes[(combo + 1) % 3], vt = dtypes[(combo + 2) % 3];
        const Case c = make_case(++seed, shape, qt, kt, vt, positions);
        const std::int64_t width = std::min<std::int64_t>(shape.N, 150);
        const auto sel = random_selection(c, groups, width, seed);
        const Reference want = run_reference(c, sel, groups, width, gr);
        const Tolerance tol = tolerance_for(c, width);
        for (const AttentionKernel kernel : available_attention_kernels()) {
          expect_close(run_sparse(c, sel, groups, width, gr, kernel), want, tol, describe(shape, qt, kt, vt, gr, kernel));
        }
      }
    }
  }
}

TEST(SparseAttention, SimdKernelsMatchTheScalarKernel) {
  const Shape shape{3, 500, 16, 4, 128, 96};
  for (const DType kv : {DType::fp32, DType::bf16, DType::fp16}) {
    const Case c = make_case(77, shape, DType::fp32, kv, kv, {499, 300, 7});
    const auto sel = random_selection(c, 4, 400, 78, /*full_rows=*/true);
    const Result scalar = run_sparse(c, sel, 4, 400, Granularity::per_kv_head, AttentionKernel::scalar);
    Reference as_reference{{scalar.out.begin(), scalar.out.end()}, {scalar.lse.begin(), scalar.lse.end()}};
    const Tolerance tol = tolerance_for(c, 400);
    for (const AttentionKernel kernel : available_attention_kernels()) {
      expect_close(run_sparse(c, sel, 4, 400, Granularity::per_kv_head, kernel), as_reference, tol,
                   std::string(attention_kernel_name(kernel)) + " vs scalar, kv " + std::string(dtype_name(kv)));
    }
  }
}

TEST(SparseAttention, LargeLogitsRescaleTheRunningMax) {
  // scale 2 with |q| ~ 3: logits span hundreds, so the running max grows block after block and most weights
  // underflow; ascending rows put the largest logits late.
  const Shape shape{2, 400, 4, 2, 24, 8};
  Case c = make_case(5, shape, DType::fp32, DType::fp32, DType::fp32, {399, 250}, 3.0);
  c.scale = 2.0;
  std::vector<std::int32_t> sel = random_selection(c, 2, 300, 6, true);
  for (std::size_t row = 0; row < sel.size() / 300; ++row) {
    auto first = sel.begin() + static_cast<std::ptrdiff_t>(row * 300);
    std::sort(first, std::find(first, first + 300, -1));
  }
  const Reference want = run_reference(c, sel, 2, 300, Granularity::per_kv_head);
  for (const AttentionKernel kernel : available_attention_kernels()) {
    expect_close(run_sparse(c, sel, 2, 300, Granularity::per_kv_head, kernel), want, tolerance_for(c, 300),
                 std::string(attention_kernel_name(kernel)));
  }
}

TEST(SparseAttention, KeyRangeSplitForFewUnitsMatchesReference) {
  // One token, one key head, per_token: one unit, so with 4 threads its keys are split and merged.
  const Shape shape{1, 3000, 8, 1, 64, 64};
  const Case c = make_case(9, shape, DType::bf16, DType::bf16, DType::bf16, {2999});
  const auto sel = random_selection(c, 1, 2048, 10, true);
  const Reference want = run_reference(c, sel, 1, 2048, Granularity::per_token);
  for (const AttentionKernel kernel : available_attention_kernels()) {
    for (const int threads : {1, 4}) {
      expect_close(run_sparse(c, sel, 1, 2048, Granularity::per_token, kernel, threads), want,
                   tolerance_for(c, 2048),
                   std::string(attention_kernel_name(kernel)) + " threads " + std::to_string(threads));
    }
  }
}

TEST(SparseAttention, EmptyRowsGiveZerosAndMinusInfinity) {
  const Shape shape{2, 10, 4, 2, 8, 8};
  const Case c = make_case(3, shape, DType::fp32, DType::bf16, DType::fp16, {9, 4});
  std::vector<std::int32_t> sel(2 * 2 * 3, -1);
  sel[0] = 3;  // token 0, group 0 has one key; every other row is empty
  const Reference want = run_reference(c, sel, 2, 3, Granularity::per_kv_head);
  for (const AttentionKernel kernel : available_attention_kernels()) {
    const Result got = run_sparse(c, sel, 2, 3, Granularity::per_kv_head, kernel);
    expect_close(got, want, tolerance_for(c, 1), std::string(attention_kernel_name(kernel)));
    EXPECT_EQ(got.out[static_cast<std::size_t>((1 * 4 + 3) * 8 + 5)], 0.0f);
  }
}

TEST(SparseAttention, NoQueryTokensIsANoOp) {
  const Case c = make_case(4, {0, 10, 4, 2, 8, 8}, DType::fp32, DType::fp32, DType::fp32, {});
  std::vector<std::int32_t> sel;
  for (const AttentionKernel kernel : available_attention_kernels()) {
    const Result r = run_sparse(c, sel, 2, 3, Granularity::per_kv_head, kernel);
    EXPECT_TRUE(r.out.empty() && r.lse.empty());
  }
  std::vector<float> out, lse;
  full_attention_fast(c.inputs(), TensorView(out.data(), DType::fp32, {0, 4, 8}), TensorView(lse.data(), DType::fp32, {0, 4}));
}

TEST(SparseAttention, StridedViewsMatchContiguous) {
  const Shape shape{3, 70, 4, 2, 20, 12};
  const Case c = make_case(21, shape, DType::fp32, DType::bf16, DType::fp32, {69, 30, 50});
  const std::int64_t width = 40;
  const auto sel = random_selection(c, 2, width, 22);
  const Result contiguous = run_sparse(c, sel, 2, width, Granularity::per_kv_head, AttentionKernel::automatic);

  // Selection inside a wider buffer (row stride 2W), K with channels strided (a [N, Hkv, D] view over
  // [N, D, Hkv] memory), out and lse with every other element.
  std::vector<std::int32_t> wide(static_cast<std::size_t>(3 * 2 * 2 * width), 99);
  for (std::int64_t r = 0; r < 6; ++r) {
    std::copy_n(sel.begin() + r * width, width, wide.begin() + r * 2 * width);
  }
  const std::int64_t sel_shape[3] = {3, 2, width};
  const std::int64_t sel_strides[3] = {4 * width, 2 * width, 1};
  const TensorView selection(wide.data(), DType::int32, sel_shape, sel_strides);

  std::vector<std::uint16_t> k_t(static_cast<std::size_t>(shape.N * shape.Hkv * shape.D));
  for (std::int64_t s = 0; s < shape.N; ++s) {
    for (std::int64_t h = 0; h < shape.Hkv; ++h) {
      for (std::int64_t d = 0; d < shape.D; ++d) {
        std::memcpy(&k_t[static_cast<std::size_t>((s * shape.D + d) * shape.Hkv + h)],
                    c.k.bytes.data() + 2 * ((s * shape.Hkv + h) * shape.D + d), 2);
      }
    }
  }
  AttentionInputs in = c.inputs();
  const std::int64_t k_shape[3] = {shape.N, shape.Hkv, shape.D};
  const std::int64_t k_strides[3] = {shape.D * shape.Hkv, 1, shape.Hkv};
  in.k = TensorView(k_t.data(), DType::bf16, k_shape, k_strides);

  std::vector<float> out(static_cast<std::size_t>(2 * shape.T * shape.Hq * shape.Dv), kSentinel);
  std::vector<float> lse(static_cast<std::size_t>(2 * shape.T * shape.Hq), kSentinel);
  const std::int64_t o_shape[3] = {shape.T, shape.Hq, shape.Dv};
  const std::int64_t o_strides[3] = {2 * shape.Hq * shape.Dv, 2 * shape.Dv, 2};
  const std::int64_t l_shape[2] = {shape.T, shape.Hq};
  const std::int64_t l_strides[2] = {2 * shape.Hq, 2};
  sparse_attention(in, selection, Granularity::per_kv_head,
                   TensorView(out.data(), DType::fp32, o_shape, o_strides, Device::cpu(), false),
                   TensorView(lse.data(), DType::fp32, l_shape, l_strides, Device::cpu(), false));
  for (std::size_t i = 0; i < contiguous.out.size(); ++i) {
    ASSERT_EQ(out[2 * i], contiguous.out[i]) << i;
    ASSERT_EQ(out[2 * i + 1], kSentinel) << i;
  }
  for (std::size_t i = 0; i < contiguous.lse.size(); ++i) ASSERT_EQ(lse[2 * i], contiguous.lse[i]) << i;
}

TEST(FullAttentionFast, MatchesFullAttentionReference) {
  const std::vector<std::pair<Shape, std::vector<std::int32_t>>> shapes = {
      {{4, 100, 6, 2, 13, 7}, {99, 0, 64, 500}},
      {{1, 2500, 8, 1, 64, 32}, {2499}},  // one unit: split across threads
  };
  for (const auto& [shape, positions] : shapes) {
    const Case c = make_case(31, shape, DType::bf16, DType::bf16, DType::bf16, positions);
    std::vector<double> want_out(static_cast<std::size_t>(shape.T * shape.Hq * shape.Dv));
    std::vector<double> want_lse(static_cast<std::size_t>(shape.T * shape.Hq));
    full_attention(c.inputs(), TensorView(want_out.data(), DType::fp64, {shape.T, shape.Hq, shape.Dv}),
                   TensorView(want_lse.data(), DType::fp64, {shape.T, shape.Hq}));
    for (const AttentionKernel kernel : available_attention_kernels()) {
      for (const int threads : {1, 4}) {
        Result got;
        got.out.assign(want_out.size(), kSentinel);
        got.lse.assign(want_lse.size(), kSentinel);
        full_attention_fast(c.inputs(), TensorView(got.out.data(), DType::fp32, {shape.T, shape.Hq, shape.Dv}),
                            TensorView(got.lse.data(), DType::fp32, {shape.T, shape.Hq}), {kernel, threads});
        expect_close(got, {want_out, want_lse}, tolerance_for(c, shape.N), std::string(attention_kernel_name(kernel)));
      }
    }
  }
}

TEST(FullAttentionFast, TokenTilesEqualOneTokenAtATime) {
  // full_attention_fast attends tiles of consecutive tokens over the shared causal prefix; sparse_attention over
  // rows listing that prefix attends one token at a time. Same blocks, same operations: equal bit for bit.
  // 37 tokens (two whole tiles of 16 and a part), 300 keys (four whole blocks of 64 and a part), odd D, GQA,
  // positions both inside and beyond the keys.
  const Shape shape{37, 300, 6, 2, 13, 20};
  std::vector<std::int32_t> positions(static_cast<std::size_t>(shape.T));
  for (std::int64_t t = 0; t < shape.T; ++t) positions[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(t * 9);
  for (const DType kv : {DType::fp32, DType::bf16}) {
    const Case c = make_case(53, shape, DType::fp32, kv, kv, positions);
    const std::int64_t width = shape.N;
    std::vector<std::int32_t> prefix_rows(static_cast<std::size_t>(shape.T * shape.Hkv * width), -1);
    for (std::int64_t t = 0; t < shape.T; ++t) {
      for (std::int64_t g = 0; g < shape.Hkv; ++g) {
        for (std::int64_t s = 0; s < c.allowed(t); ++s) {
          prefix_rows[static_cast<std::size_t>((t * shape.Hkv + g) * width + s)] = static_cast<std::int32_t>(s);
        }
      }
    }
    for (const AttentionKernel kernel : available_attention_kernels()) {
      for (const int threads : {1, 3}) {
        const Result want = run_sparse(c, prefix_rows, shape.Hkv, width, Granularity::per_kv_head, kernel, threads);
        Result got;
        got.out.assign(want.out.size(), kSentinel);
        got.lse.assign(want.lse.size(), kSentinel);
        full_attention_fast(c.inputs(), TensorView(got.out.data(), DType::fp32, {shape.T, shape.Hq, shape.Dv}),
                            TensorView(got.lse.data(), DType::fp32, {shape.T, shape.Hq}), {kernel, threads});
        const std::string what = std::string(attention_kernel_name(kernel)) + " " + std::string(dtype_name(kv)) +
                                 " threads " + std::to_string(threads);
        for (std::size_t i = 0; i < want.out.size(); ++i) ASSERT_EQ(got.out[i], want.out[i]) << what << " out " << i;
        for (std::size_t i = 0; i < want.lse.size(); ++i) ASSERT_EQ(got.lse[i], want.lse[i]) << what << " lse " << i;
      }
    }
  }
}

// ---- bad input -----------------------------------------------------------------------------------------------

/// Runs sparse_attention expecting keysel::Error whose message contains every fragment, and checks that out
/// and lse still hold the sentinel.
void expect_rejected(const AttentionInputs& in, const std::vector<std::int32_t>& sel, std::vector<std::int64_t> sel_shape,
                     Granularity gr, std::vector<std::string> fragments, DType out_dtype = DType::fp32,
                     AttentionKernel kernel = AttentionKernel::automatic) {
  const std::int64_t T = in.q.size(0), Hq = in.q.size(1), Dv = in.v.size(2);
  std::vector<double> out(static_cast<std::size_t>(T * Hq * Dv), kSentinel);
  std::vector<float> lse(static_cast<std::size_t>(T * Hq), kSentinel);
  const TensorView selection(sel.data(), DType::int32, std::span<const std::int64_t>(sel_shape));
  try {
    sparse_attention(in, selection, gr, TensorView(out.data(), out_dtype, {T, Hq, Dv}),
                     TensorView(lse.data(), DType::fp32, {T, Hq}), {kernel, 0});
    FAIL() << "no error for " << fragments.front();
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("sparse_attention"), std::string::npos) << message;
    for (const std::string& f : fragments) EXPECT_NE(message.find(f), std::string::npos) << message;
  }
  for (const double x : out) ASSERT_EQ(x, kSentinel);
  for (const float x : lse) ASSERT_EQ(x, kSentinel);
}

TEST(SparseAttention, RejectsBadSelectionsAndShapesWritingNothing) {
  const Shape shape{2, 10, 4, 2, 8, 8};
  const Case c = make_case(41, shape, DType::fp32, DType::fp32, DType::fp32, {9, 4});
  const AttentionInputs in = c.inputs();
  const std::vector<std::int32_t> good = {0, 1, 2, 3, 4, -1, 0, 1, -1, 0, 2, 4};
  // Valid, to be sure the cases below fail for the reason they name.
  {
    std::vector<float> out(2 * 4 * 8), lse(8);
    sparse_attention(in, TensorView(good.data(), DType::int32, {2, 2, 3}), Granularity::per_kv_head,
                     TensorView(out.data(), DType::fp32, {2, 4, 8}), TensorView(lse.data(), DType::fp32, {2, 4}));
  }
  auto with = [&](std::size_t i, std::int32_t value) {
    std::vector<std::int32_t> s = good;
    s[i] = value;
    return s;
  };
  expect_rejected(in, with(0, 10), {2, 2, 3}, Granularity::per_kv_head, {"selection[0, 0, 0] = 10", "[0, 10)"});
  expect_rejected(in, with(9, 5), {2, 2, 3}, Granularity::per_kv_head, {"selection[1, 1, 0] = 5", "[0, 5)"});
  expect_rejected(in, with(1, 0), {2, 2, 3}, Granularity::per_kv_head, {"repeated", "distinct"});
  expect_rejected(in, with(4, -2), {2, 2, 3}, Granularity::per_kv_head, {"selection[0, 1, 1] = -2"});
  expect_rejected(in, with(6, -1), {2, 2, 3}, Granularity::per_kv_head, {"selection[1, 0, 1] = 1 after a -1"});
  // Wrong group shape: per_head needs G = Hq = 4.
  expect_rejected(in, good, {2, 2, 3}, Granularity::per_head, {"'selection'", "[2, 4, *]"});
  // Width 0 (k = 0).
  expect_rejected(in, {}, {2, 2, 0}, Granularity::per_kv_head, {"width W >= 1"});
  // fp64 output is the reference's, not this kernel's.
  expect_rejected(in, good, {2, 2, 3}, Granularity::per_kv_head, {"'out'", "fp32"}, DType::fp64);
}

TEST(SparseAttention, RejectsBadInputsAndOptions) {
  const Shape shape{1, 10, 4, 2, 8, 8};
  Case c = make_case(43, shape, DType::fp32, DType::fp32, DType::fp32, {9});
  const std::vector<std::int32_t> sel = {0, 1, 0, 2};
  std::vector<float> out(32), lse(4);
  const TensorView selection(sel.data(), DType::int32, {1, 2, 2});
  const TensorView out_view(out.data(), DType::fp32, {1, 4, 8});
  AttentionInputs in = c.inputs();
  in.v = TensorView();
  EXPECT_THROW(sparse_attention(in, selection, Granularity::per_kv_head, out_view), Error);
  in = c.inputs();
  in.scale = std::numeric_limits<double>::quiet_NaN();
  EXPECT_THROW(sparse_attention(in, selection, Granularity::per_kv_head, out_view), Error);
  in = c.inputs();
  EXPECT_THROW(sparse_attention(in, selection, Granularity::per_kv_head, TensorView(out.data(), DType::fp32, {1, 4, 7})),
               Error);
  EXPECT_THROW(sparse_attention(in, selection, Granularity::per_kv_head, out_view,
                                TensorView(lse.data(), DType::fp32, {1, 3})),
               Error);
  const float* read_only = out.data();
  EXPECT_THROW(sparse_attention(in, selection, Granularity::per_kv_head, TensorView(read_only, DType::fp32, {1, 4, 8})),
               Error);
  EXPECT_THROW(sparse_attention(in, selection, Granularity::per_kv_head, out_view, {}, {AttentionKernel::automatic, -1}),
               Error);
  // Wrong group shape of the heads themselves: Hq = 4 over Hkv = 3.
  std::vector<float> k3(10 * 3 * 8, 0.0f), v3(10 * 3 * 8, 0.0f);
  in.k = TensorView(k3.data(), DType::fp32, {10, 3, 8});
  in.v = TensorView(v3.data(), DType::fp32, {10, 3, 8});
  try {
    sparse_attention(in, selection, Granularity::per_kv_head, out_view);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("Hkv dividing Hq"), std::string::npos) << e.what();
  }
  EXPECT_THROW(parse_attention_kernel("sse"), Error);
  EXPECT_EQ(parse_attention_kernel("avx2"), AttentionKernel::avx2);
  const auto kernels = available_attention_kernels();
  ASSERT_FALSE(kernels.empty());
  EXPECT_EQ(kernels.front(), AttentionKernel::scalar);
  if (std::find(kernels.begin(), kernels.end(), AttentionKernel::avx512) == kernels.end()) {
    in = c.inputs();
    EXPECT_THROW(sparse_attention(in, selection, Granularity::per_kv_head, out_view, {}, {AttentionKernel::avx512, 0}),
                 Error);
  }
}

}  // namespace
}  // namespace keysel
