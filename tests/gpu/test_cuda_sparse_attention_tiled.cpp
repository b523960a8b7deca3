// The tiled tensor-core kernels (attention/src/cuda_sparse_attention_tiled.cu): sparse_attention_prefill_cuda and
// sparse_attention_backward_cuda with deterministic = false, against keysel::sparse_attention_reference and
// keysel::sparse_attention_backward_reference (double precision): T = 1, 63, 65, 200 tokens (partial tiles),
// Hq / Hkv = 1, 4, 8, D and Dv of 64 and 128, per_kv_head, per_token and per_head where Hq == Hkv, unions over
// more than one chunk of 64 keys, neighbouring tokens sharing most of their keys, rows with no valid key, -1
// padding and out-of-range entries anywhere in a row, with and without an lse gradient; the fallback to the
// deterministic kernel and the shapes the prefill refuses. Each test skips where no GPU is present.
//
// Bounds. The inputs are bf16 and the reference reads the same rounded values. The kernels round P (forward and
// backward) and scale dS (backward) to bf16, each with a relative error of at most u = 2^-8 (bf16's unit
// roundoff: 8 significant bits), accumulate in fp32, and the backward's Delta reads out rounded to bf16 (again at
// most u relative per product). With the sums of absolute terms of each output, in double from the reference's P
// over the selected keys s,
//   A_out = sum_s P |V_s|,  A_dV = sum P |dO|,  A_dQ = scale sum_s |dS|' |K_s|,  A_dK = scale sum |dS|' |q|,
//   |dS|' = P (|dP| + sum_d |dO_d O_d| + |dLse|),
// the errors are at most u A_out (+ u |out| when out is bf16), u A_dV, 2 u A_dQ and 2 u A_dK, plus fp32 rounding
// (n 2^-24 A for n below a few thousand terms: far smaller). Every element must lie within 4 u A + 1e-6 = 2^-6 A
// + 1e-6 of the reference (2 u |out| more for a bf16 out): at least twice those worst cases (an emulation of the
// kernels' roundings in PyTorch stayed below 0.27 of this bound on these shapes); lse within 1e-4 (1 + |lse|)
// (fp32 logits over 128 products and fast exp / log intrinsics). A wrong or missing term moves an element by O(A).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include "backward_reference.h"
#include "gpu_test_support.h"
#include "keysel/attention/cuda_sparse_attention.h"
#include "keysel/attention/reference.h"
#include "keysel/core/build_config.h"
#include "keysel/core/dtype.h"
#include "keysel/core/error.h"
#include "keysel/core/random.h"

#if KEYSEL_CUDA
#include <cuda_runtime.h>

#include "cuda_sparse_attention_tiled_launch.h"
#endif

namespace keysel {
namespace {

using keysel::testing::DeviceValues;
using keysel::testing::poisoned;
using keysel::testing::random_device_values;
using keysel::testing::reference_gradients;
using keysel::testing::ReferenceGradients;
using keysel::testing::to_device;
using keysel::testing::to_host;

constexpr double kBf16Unit = 1.0 / 256.0;  // u = 2^-8

struct Case {
  std::int64_t T, N, Hq, Hkv, D, Dv, W;
  Granularity granularity;
};

std::string describe(const Case& c) {
  return std::string(granularity_name(c.granularity)) + " T=" + std::to_string(c.T) + " N=" + std::to_string(c.N) +
         " Hq=" + std::to_string(c.Hq) + " Hkv=" + std::to_string(c.Hkv) + " D=" + std::to_string(c.D) +
         " Dv=" + std::to_string(c.Dv) + " W=" + std::to_string(c.W);
}

struct Problem {
  Case c;
  std::int64_t groups = 0;
  DeviceValues q, k, v, grad_out;
  std::vector<float> grad_lse;
  std::vector<std::int32_t> selection;  // the reference's rule: distinct keys in [0, N), then -1
  std::vector<std::int32_t> scattered;  // the same keys at random slots; the other slots -1, other negatives,
                                        // keys >= N, or a repeat of one of the row's keys
  std::vector<double> out, lse;         // the reference forward
  DeviceValues out_bf16;                      // out rounded to bf16 (what a bf16 forward stores)
};

/// Selections as a real model's: the tokens of a block of 8 draw most of their keys from a pool of the block
/// (so a tile's union is much smaller than its entries), the rest anywhere; every 9th row has no key.
Problem make_problem(const Case& c, std::uint64_t seed) {
  Problem p;
  p.c = c;
  RandomStream rng(seed);
  p.groups = group_count(c.granularity, c.Hq, c.Hkv);
  p.q = random_device_values(rng, c.T * c.Hq * c.D, 1.5, true);
  p.k = random_device_values(rng, c.N * c.Hkv * c.D, 1.0, true);
  p.v = random_device_values(rng, c.N * c.Hkv * c.Dv, 1.0, true);
  p.grad_out = random_device_values(rng, c.T * c.Hq * c.Dv, 1.0, true);
  p.grad_lse.resize(static_cast<std::size_t>(c.T * c.Hq));
  for (float& x : p.grad_lse) x = static_cast<float>(rng.normal(0.0, 1.0));
  const std::size_t entries = static_cast<std::size_t>(c.T * p.groups * c.W);
  p.selection.assign(entries, -1);
  p.scattered.assign(entries, -1);
  std::vector<std::int32_t> all(static_cast<std::size_t>(c.N));
  std::iota(all.begin(), all.end(), 0);
  std::vector<std::vector<std::int32_t>> pools(static_cast<std::size_t>(p.groups));
  std::vector<char> used(static_cast<std::size_t>(c.N));
  for (std::int64_t t = 0; t < c.T; ++t) {
    for (std::int64_t g = 0; g < p.groups; ++g) {
      const std::int64_t row = t * p.groups + g;
      std::vector<std::int32_t>& pool = pools[static_cast<std::size_t>(g)];
      if (t % 8 == 0) {  // a new block of 8 tokens: a new pool of 1.5 W keys per group
        rng.shuffle(std::span<std::int32_t>(all));
        pool.assign(all.begin(), all.begin() + std::min(c.N, c.W + c.W / 2));
      }
      if (row % 9 == 4) {
        // no valid key: junk only
        for (std::int64_t j = 0; j < c.W; ++j) {
          p.scattered[row * c.W + j] = j % 3 == 0 ? static_cast<std::int32_t>(c.N + j) : (j % 3 == 1 ? -1 : -7);
        }
        continue;
      }
      const auto count = static_cast<std::int64_t>(rng.uniform_int(static_cast<std::uint64_t>(std::min(c.W, c.N))) + 1);
      std::fill(used.begin(), used.end(), 0);
      std::vector<std::int32_t> keys;
      std::vector<std::int32_t> shuffled_pool = pool;
      rng.shuffle(std::span<std::int32_t>(shuffled_pool));
      for (const std::int32_t s : shuffled_pool) {  // about 3/4 from the block's pool
        if (static_cast<std::int64_t>(keys.size()) >= count * 3 / 4) break;
        keys.push_back(s);
        used[static_cast<std::size_t>(s)] = 1;
      }
      while (static_cast<std::int64_t>(keys.size()) < count) {
        const auto s = static_cast<std::int32_t>(rng.uniform_int(static_cast<std::uint64_t>(c.N)));
        if (used[static_cast<std::size_t>(s)] != 0) continue;
        keys.push_back(s);
        used[static_cast<std::size_t>(s)] = 1;
      }
      std::copy(keys.begin(), keys.end(), p.selection.begin() + row * c.W);
      // The scattered row: the keys in the same order at random slots, junk in the others.
      std::vector<std::int64_t> slots(static_cast<std::size_t>(c.W));
      std::iota(slots.begin(), slots.end(), 0);
      rng.shuffle(std::span<std::int64_t>(slots));
      std::sort(slots.begin(), slots.begin() + count);
      std::vector<char> taken(static_cast<std::size_t>(c.W));
      for (std::int64_t i = 0; i < count; ++i) {
        p.scattered[row * c.W + slots[static_cast<std::size_t>(i)]] = keys[static_cast<std::size_t>(i)];
        taken[static_cast<std::size_t>(slots[static_cast<std::size_t>(i)])] = 1;
      }
      for (std::int64_t j = 0; j < c.W; ++j) {
        if (taken[static_cast<std::size_t>(j)] != 0) continue;
        const std::uint64_t kind = rng.uniform_int(4);
        p.scattered[row * c.W + j] = kind == 0   ? -1
                                     : kind == 1 ? -3
                                     : kind == 2 ? static_cast<std::int32_t>(c.N + static_cast<std::int64_t>(j))
                                                 : keys[0];  // a repeated key counts once in the tiled kernels
      }
    }
  }
  // The forward in double.
  const std::vector<std::int32_t> positions(static_cast<std::size_t>(c.T), static_cast<std::int32_t>(c.N - 1));
  const AttentionInputs in{TensorView(p.q.f.data(), DType::fp32, {c.T, c.Hq, c.D}),
                           TensorView(p.k.f.data(), DType::fp32, {c.N, c.Hkv, c.D}),
                           TensorView(p.v.f.data(), DType::fp32, {c.N, c.Hkv, c.Dv}),
                           TensorView(positions.data(), DType::int32, {c.T}), 0.0};
  p.out.resize(static_cast<std::size_t>(c.T * c.Hq * c.Dv));
  p.lse.resize(static_cast<std::size_t>(c.T * c.Hq));
  sparse_attention_reference(in, TensorView(p.selection.data(), DType::int32, {c.T, p.groups, c.W}), c.granularity,
                             TensorView(p.out.data(), DType::fp64, {c.T, c.Hq, c.Dv}),
                             TensorView(p.lse.data(), DType::fp64, {c.T, c.Hq}));
  p.out_bf16.f.resize(p.out.size());
  p.out_bf16.bits.resize(p.out.size());
  for (std::size_t i = 0; i < p.out.size(); ++i) {
    p.out_bf16.bits[i] = fp32_to_bf16_bits(static_cast<float>(p.out[i]));
    p.out_bf16.f[i] = bf16_bits_to_fp32(p.out_bf16.bits[i]);
  }
  return p;
}

std::int64_t group_of(const Problem& p, std::int64_t h) {
  if (p.groups == p.c.Hq) return h;
  return p.groups == 1 ? 0 : h / (p.c.Hq / p.c.Hkv);
}

/// The sums of absolute terms of the header's bounds, in double from the reference's lse.
struct Magnitudes {
  std::vector<double> out, dq, dk, dv;
};

Magnitudes magnitudes(const Problem& p, bool with_lse) {
  const Case& c = p.c;
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.D));
  Magnitudes m;
  m.out.assign(static_cast<std::size_t>(c.T * c.Hq * c.Dv), 0.0);
  m.dq.assign(static_cast<std::size_t>(c.T * c.Hq * c.D), 0.0);
  m.dk.assign(static_cast<std::size_t>(c.N * c.Hkv * c.D), 0.0);
  m.dv.assign(static_cast<std::size_t>(c.N * c.Hkv * c.Dv), 0.0);
  for (std::int64_t t = 0; t < c.T; ++t) {
    for (std::int64_t h = 0; h < c.Hq; ++h) {
      const std::int64_t r = t * c.Hq + h, kv = h / (c.Hq / c.Hkv);
      const double lse = p.lse[static_cast<std::size_t>(r)];
      if (std::isinf(lse)) continue;
      double delta_abs = 0.0;
      for (std::int64_t d = 0; d < c.Dv; ++d) {
        delta_abs += std::abs(static_cast<double>(p.grad_out.f[static_cast<std::size_t>(r * c.Dv + d)]) *
                              p.out_bf16.f[static_cast<std::size_t>(r * c.Dv + d)]);
      }
      const double dlse = with_lse ? std::abs(static_cast<double>(p.grad_lse[static_cast<std::size_t>(r)])) : 0.0;
      const std::int32_t* row = &p.selection[static_cast<std::size_t>((t * p.groups + group_of(p, h)) * c.W)];
      for (std::int64_t j = 0; j < c.W && row[j] >= 0; ++j) {
        const std::int64_t key = (row[j] * c.Hkv + kv);
        double logit = 0.0, dp = 0.0;
        for (std::int64_t d = 0; d < c.D; ++d) {
          logit += static_cast<double>(p.q.f[static_cast<std::size_t>(r * c.D + d)]) *
                   p.k.f[static_cast<std::size_t>(key * c.D + d)];
        }
        for (std::int64_t d = 0; d < c.Dv; ++d) {
          dp += static_cast<double>(p.grad_out.f[static_cast<std::size_t>(r * c.Dv + d)]) *
                p.v.f[static_cast<std::size_t>(key * c.Dv + d)];
        }
        const double prob = std::exp(scale * logit - lse);
        const double ds_abs = prob * (std::abs(dp) + delta_abs + dlse);
        for (std::int64_t d = 0; d < c.Dv; ++d) {
          const auto at_row = static_cast<std::size_t>(r * c.Dv + d), at_key = static_cast<std::size_t>(key * c.Dv + d);
          m.out[at_row] += prob * std::abs(p.v.f[at_key]);
          m.dv[at_key] += prob * std::abs(p.grad_out.f[at_row]);
        }
        for (std::int64_t d = 0; d < c.D; ++d) {
          const auto at_row = static_cast<std::size_t>(r * c.D + d), at_key = static_cast<std::size_t>(key * c.D + d);
          m.dq[at_row] += scale * ds_abs * std::abs(p.k.f[at_key]);
          m.dk[at_key] += scale * ds_abs * std::abs(p.q.f[at_row]);
        }
      }
    }
  }
  return m;
}

/// Every element within 4 u magnitude + value_share |want| + 1e-6 of want (NaN fails); want not all zeros.
void expect_within(const std::vector<float>& got, const std::vector<double>& want, const std::vector<double>& magnitude,
                   double value_share, const char* name) {
  ASSERT_EQ(got.size(), want.size()) << name;
  double largest = 0.0;
  for (const double x : want) largest = std::max(largest, std::abs(x));
  EXPECT_GT(largest, 0.05) << name << ": a comparison of (almost) zeros";
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double bound = 4.0 * kBf16Unit * magnitude[i] + value_share * std::abs(want[i]) + 1e-6;
    const double error = std::abs(static_cast<double>(got[i]) - want[i]);
    ASSERT_TRUE(error <= bound) << name << "[" << i << "]: got " << got[i] << ", reference " << want[i]
                                << ", bound " << bound;
  }
}

/// Whether this GPU has the shared memory the tiled kernels need for the case (forward and backward); false
/// without CUDA.
bool gpu_takes(const Problem& p) {
#if KEYSEL_CUDA
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0) != cudaSuccess) return false;
  cuda_kernels::TiledShape shape;
  shape.tokens = p.c.T;
  shape.keys = p.c.N;
  shape.query_heads = p.c.Hq;
  shape.kv_heads = p.c.Hkv;
  shape.head_dim = p.c.D;
  shape.value_dim = p.c.Dv;
  shape.groups = p.groups;
  shape.width = p.c.W;
  return !cuda_kernels::tiled_refusal(shape, optin, false) && !cuda_kernels::tiled_refusal(shape, optin, true);
#else
  (void)p;
  return false;
#endif
}

struct Forward {
  std::vector<float> out, lse;  // out as fp32 (bf16 widened where out is bf16)
};

Forward run_prefill(const Problem& p, const std::vector<std::int32_t>& selection, bool out_bf16) {
  const Case& c = p.c;
  const Device gpu = Device::cuda();
  const CudaBuffer d_q = to_device(p.q.bits), d_k = to_device(p.k.bits), d_v = to_device(p.v.bits);
  const CudaBuffer d_sel = to_device(selection);
  const std::int64_t out_count = c.T * c.Hq * c.Dv;
  CudaBuffer d_out = out_bf16 ? poisoned<std::uint16_t>(out_count, 0xFF) : poisoned<float>(out_count, 0xFF);
  CudaBuffer d_lse = poisoned<float>(c.T * c.Hq, 0xFF);
  sparse_attention_prefill_cuda(TensorView(d_q.data(), DType::bf16, {c.T, c.Hq, c.D}, gpu),
                                TensorView(d_k.data(), DType::bf16, {c.N, c.Hkv, c.D}, gpu),
                                TensorView(d_v.data(), DType::bf16, {c.N, c.Hkv, c.Dv}, gpu),
                                TensorView(d_sel.data(), DType::int32, {c.T, p.groups, c.W}, gpu), c.granularity,
                                0.0,
                                TensorView(d_out.data(), out_bf16 ? DType::bf16 : DType::fp32, {c.T, c.Hq, c.Dv}, gpu),
                                TensorView(d_lse.data(), DType::fp32, {c.T, c.Hq}, gpu));
  cuda_synchronize();
  Forward f;
  if (out_bf16) {
    for (const std::uint16_t bits : to_host<std::uint16_t>(d_out)) f.out.push_back(bf16_bits_to_fp32(bits));
  } else {
    f.out = to_host<float>(d_out);
  }
  f.lse = to_host<float>(d_lse);
  return f;
}

struct Gradients {
  std::vector<float> q, k, v;
};

Gradients run_backward(const Problem& p, const std::vector<std::int32_t>& selection, bool with_lse,
                       bool deterministic) {
  const Case& c = p.c;
  const Device gpu = Device::cuda();
  const CudaBuffer d_q = to_device(p.q.bits), d_k = to_device(p.k.bits), d_v = to_device(p.v.bits);
  const CudaBuffer d_out = to_device(p.out_bf16.bits), d_grad = to_device(p.grad_out.bits);
  std::vector<float> lse(p.lse.begin(), p.lse.end());
  const CudaBuffer d_lse = to_device(lse), d_sel = to_device(selection), d_grad_lse = to_device(p.grad_lse);
  CudaBuffer d_gq = poisoned<float>(c.T * c.Hq * c.D, 0xFF);
  CudaBuffer d_gk = poisoned<float>(c.N * c.Hkv * c.D, 0xFF);
  CudaBuffer d_gv = poisoned<float>(c.N * c.Hkv * c.Dv, 0xFF);
  CudaBackwardOptions options;
  options.deterministic = deterministic;
  sparse_attention_backward_cuda(
      TensorView(d_q.data(), DType::bf16, {c.T, c.Hq, c.D}, gpu),
      TensorView(d_k.data(), DType::bf16, {c.N, c.Hkv, c.D}, gpu),
      TensorView(d_v.data(), DType::bf16, {c.N, c.Hkv, c.Dv}, gpu),
      TensorView(d_sel.data(), DType::int32, {c.T, p.groups, c.W}, gpu), c.granularity, 0.0,
      TensorView(d_out.data(), DType::bf16, {c.T, c.Hq, c.Dv}, gpu),
      TensorView(d_lse.data(), DType::fp32, {c.T, c.Hq}, gpu),
      TensorView(d_grad.data(), DType::bf16, {c.T, c.Hq, c.Dv}, gpu),
      TensorView(d_gq.data(), DType::fp32, {c.T, c.Hq, c.D}, gpu),
      TensorView(d_gk.data(), DType::fp32, {c.N, c.Hkv, c.D}, gpu),
      TensorView(d_gv.data(), DType::fp32, {c.N, c.Hkv, c.Dv}, gpu), nullptr,
      with_lse ? TensorView(d_grad_lse.data(), DType::fp32, {c.T, c.Hq}, gpu) : TensorView(), options);
  cuda_synchronize();
  return {to_host<float>(d_gq), to_host<float>(d_gk), to_host<float>(d_gv)};
}

const Case kCases[] = {
    {1, 50, 8, 2, 64, 64, 13, Granularity::per_kv_head},    // one token in a tile of 16
    {63, 90, 4, 4, 128, 64, 40, Granularity::per_token},    // g = 1: one partial tile of 64 tokens
    {65, 130, 8, 1, 64, 128, 70, Granularity::per_token},   // g = 8: tiles of 8 tokens; unions of several chunks
    {200, 200, 8, 2, 128, 128, 33, Granularity::per_kv_head},  // g = 4: 13 tiles, the last partial
    {200, 300, 4, 1, 128, 64, 64, Granularity::per_kv_head},   // g = 4, one key head
    {65, 70, 2, 2, 64, 64, 21, Granularity::per_head},       // per_head with Hq == Hkv: per_kv_head's rows
};

TEST(CudaSparseAttentionTiled, PrefillMatchesTheDoubleReference) {
  KEYSEL_REQUIRE_GPU();
  std::uint64_t seed = 100;
  for (const Case& c : kCases) {
    SCOPED_TRACE(describe(c));
    const Problem p = make_problem(c, ++seed);
    if (!gpu_takes(p)) {
      std::cout << "[ SKIPPED  ] " << describe(c) << ": this GPU lacks the tiled kernels' shared memory\n";
      continue;
    }
    const Magnitudes m = magnitudes(p, false);
    for (const bool out_bf16 : {false, true}) {
      const Forward got = run_prefill(p, p.scattered, out_bf16);
      expect_within(got.out, p.out, m.out, out_bf16 ? 2.0 * kBf16Unit : 0.0, out_bf16 ? "out (bf16)" : "out");
      for (std::size_t i = 0; i < p.lse.size(); ++i) {
        if (std::isinf(p.lse[i])) {
          ASSERT_TRUE(std::isinf(got.lse[i]) && got.lse[i] < 0) << "lse[" << i << "] of an empty row: " << got.lse[i];
        } else {
          ASSERT_NEAR(got.lse[i], p.lse[i], 1e-4 * (1.0 + std::abs(p.lse[i]))) << "lse[" << i << "]";
        }
      }
      // Padding, out-of-range entries, repeats and the slots of the keys change nothing: the unions hold the same
      // (key, token) pairs, so the bits are the same; and no atomics, so a second run gives them again.
      const Forward compact = run_prefill(p, p.selection, out_bf16);
      EXPECT_EQ(0, std::memcmp(got.out.data(), compact.out.data(), got.out.size() * sizeof(float)));
      EXPECT_EQ(0, std::memcmp(got.lse.data(), compact.lse.data(), got.lse.size() * sizeof(float)));
      const Forward again = run_prefill(p, p.scattered, out_bf16);
      EXPECT_EQ(0, std::memcmp(got.out.data(), again.out.data(), got.out.size() * sizeof(float)));
    }
  }
}

TEST(CudaSparseAttentionTiled, BackwardMatchesTheDoubleReference) {
  KEYSEL_REQUIRE_GPU();
  std::uint64_t seed = 200;
  for (const Case& c : kCases) {
    const Problem p = make_problem(c, ++seed);
    if (!gpu_takes(p)) {
      std::cout << "[ SKIPPED  ] " << describe(c) << ": this GPU lacks the tiled kernels' shared memory\n";
      continue;
    }
    for (const bool with_lse : {false, true}) {
      SCOPED_TRACE(describe(c) + (with_lse ? " with grad_lse" : ""));
      const ReferenceGradients want = reference_gradients(p, with_lse);
      const Magnitudes m = magnitudes(p, with_lse);
      const Gradients got = run_backward(p, p.scattered, with_lse, false);
      expect_within(got.q, want.q, m.dq, 0.0, "grad_q");
      expect_within(got.k, want.k, m.dk, 0.0, "grad_k");
      expect_within(got.v, want.v, m.dv, 0.0, "grad_v");
      // The tiled kernel ran (not the deterministic one): its P is rounded to bf16, so dV's bits differ.
      const Gradients exact = run_backward(p, p.selection, with_lse, true);
      EXPECT_NE(0, std::memcmp(got.v.data(), exact.v.data(), got.v.size() * sizeof(float)));
    }
  }
}

TEST(CudaSparseAttentionTiled, BackwardFallsBackToTheDeterministicKernel) {
  KEYSEL_REQUIRE_GPU();
  // Calls the tiled kernel does not take run the deterministic kernel with deterministic = false: the same bits.
  const Case cases[] = {
      {40, 60, 6, 2, 64, 64, 13, Granularity::per_kv_head},   // Hq / Hkv = 3 does not divide 64
      {40, 60, 8, 2, 64, 64, 13, Granularity::per_head},      // per_head with g = 4
      {40, 60, 8, 2, 32, 64, 13, Granularity::per_kv_head},   // D = 32
      {40, 60, 8, 2, 64, 96, 13, Granularity::per_token},     // Dv = 96
  };
  std::uint64_t seed = 300;
  for (const Case& c : cases) {
    SCOPED_TRACE(describe(c));
    const Problem p = make_problem(c, ++seed);
    const Gradients fast = run_backward(p, p.selection, true, false);
    const Gradients exact = run_backward(p, p.selection, true, true);
    EXPECT_EQ(0, std::memcmp(fast.q.data(), exact.q.data(), fast.q.size() * sizeof(float)));
    EXPECT_EQ(0, std::memcmp(fast.k.data(), exact.k.data(), fast.k.size() * sizeof(float)));
    EXPECT_EQ(0, std::memcmp(fast.v.data(), exact.v.data(), fast.v.size() * sizeof(float)));
  }
}

TEST(CudaSparseAttentionTiled, PrefillRejectsWhatItDoesNotTakeNamingTheArgument) {
  KEYSEL_REQUIRE_GPU();
  const Device gpu = Device::cuda();
  const std::int64_t T = 20, N = 30, W = 5;
  CudaBuffer q = poisoned<float>(T * 8 * 128, 0), k = poisoned<float>(N * 8 * 128, 0),
             v = poisoned<float>(N * 8 * 128, 0);
  CudaBuffer sel = poisoned<std::int32_t>(T * 8 * W, 0xFF), out = poisoned<float>(T * 8 * 128, 0xFF),
             lse = poisoned<float>(T * 8, 0xFF);
  struct Call {
    std::int64_t hq = 8, hkv = 2, d = 64, dv = 64, groups = 2;
    Granularity granularity = Granularity::per_kv_head;
    DType q_dtype = DType::bf16, out_dtype = DType::bf16, lse_dtype = DType::fp32;
    std::int64_t q_offset = 0;  // bytes
    std::int64_t out_tokens = T;
  };
  const auto views = [&](const Call& c) {
    struct Views {
      TensorView q, k, v, selection, out, lse;
    } w{TensorView(static_cast<char*>(q.data()) + c.q_offset, c.q_dtype, {T, c.hq, c.d}, gpu),
        TensorView(k.data(), DType::bf16, {N, c.hkv, c.d}, gpu),
        TensorView(v.data(), DType::bf16, {N, c.hkv, c.dv}, gpu),
        TensorView(sel.data(), DType::int32, {T, c.groups, W}, gpu),
        TensorView(out.data(), c.out_dtype, {c.out_tokens, c.hq, c.dv}, gpu),
        TensorView(lse.data(), c.lse_dtype, {T, c.hq}, gpu)};
    return w;
  };
  const auto run = [&](const Call& c) {
    const auto w = views(c);
    sparse_attention_prefill_cuda(w.q, w.k, w.v, w.selection, c.granularity, 0.0, w.out, w.lse);
  };
  const auto supported = [&](const Call& c) {
    const auto w = views(c);
    return sparse_attention_prefill_cuda_supported(w.q, w.k, w.v, w.selection, c.granularity);
  };
  const auto expect_error = [&](const Call& c, const std::string& argument) {
    // supported() looks at the inputs only: a bad out or lse is a caller's error, not a shape the kernel lacks.
    if (argument != "out" && argument != "lse") {
      EXPECT_FALSE(supported(c)) << argument;
    }
    try {
      run(c);
      ADD_FAILURE() << "no error for " << argument;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("'" + argument + "'"), std::string::npos) << e.what();
    }
  };
  const Call good;
  EXPECT_TRUE(supported(good));
  EXPECT_NO_THROW(run(good));  // every selection entry is -1: out = 0, lse = -inf
  cuda_synchronize();
  const std::vector<std::uint16_t> written = to_host<std::uint16_t>(out);
  for (std::size_t i = 0; i < static_cast<std::size_t>(T * 8 * 64); ++i) ASSERT_EQ(0, written[i]) << "out[" << i << "]";
  const std::vector<float> lse_written = to_host<float>(lse);
  for (const float x : lse_written) ASSERT_TRUE(std::isinf(x) && x < 0) << x;
  Call c = good;
  c.q_dtype = DType::fp32;
  expect_error(c, "q");  // fp32 inputs
  c = good;
  c.d = 32;
  expect_error(c, "q");  // D = 32
  c = good;
  c.dv = 96;
  expect_error(c, "v");  // Dv = 96
  c = good;
  c.hq = 6;
  expect_error(c, "q");  // Hq / Hkv = 3
  c = good;
  c.granularity = Granularity::per_head;
  c.groups = 8;
  expect_error(c, "granularity");  // per_head with g = 4
  c = good;
  c.groups = 1;
  expect_error(c, "selection");  // per_kv_head rows for per_token
  c = good;
  c.out_tokens = T - 1;
  expect_error(c, "out");
  c = good;
  c.out_dtype = DType::fp16;
  expect_error(c, "out");
  c = good;
  c.lse_dtype = DType::bf16;
  expect_error(c, "lse");
  c = good;
  c.q_offset = 2;  // one bf16 element past a 16-byte boundary
  expect_error(c, "q");
  // No tokens: nothing to do, no error.
  EXPECT_NO_THROW(sparse_attention_prefill_cuda(
      TensorView(q.data(), DType::bf16, {0, 8, 64}, gpu), TensorView(k.data(), DType::bf16, {N, 2, 64}, gpu),
      TensorView(v.data(), DType::bf16, {N, 2, 64}, gpu), TensorView(sel.data(), DType::int32, {0, 2, W}, gpu),
      Granularity::per_kv_head, 0.0, TensorView(out.data(), DType::bf16, {0, 8, 64}, gpu)));
  cuda_synchronize();
}

}  // namespace
}  // namespace keysel
