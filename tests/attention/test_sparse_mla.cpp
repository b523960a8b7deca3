// Sparse MLA on the CPU (SPEC §8): the fp32 path (sparse_mla) against the double reference on fresh random inputs
// with -1 slots anywhere, topk_length, attention sinks and empty rows, over a bf16 latent cache and the fp8 V3.2
// cache; the V3.2 writer against its formula; the reference against an independent softmax of one row; errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "keysel/attention/sparse_mla.h"
#include "keysel/core/dtype.h"
#include "keysel/core/error.h"
#include "keysel/core/random.h"

namespace keysel {
namespace {

struct Problem {
  std::int64_t T, H, N, topk;
  std::vector<std::uint16_t> q;     // bf16 [T, H, 576]
  std::vector<std::uint16_t> kv;    // bf16 [N, 576]
  std::vector<std::int32_t> indices;
  std::vector<std::int32_t> topk_length;
  std::vector<float> sink;
};

Problem make(std::int64_t T, std::int64_t H, std::int64_t N, std::int64_t topk, std::uint64_t seed) {
  RandomStream rng(seed);
  Problem p{T, H, N, topk, {}, {}, {}, {}, {}};
  p.q.resize(static_cast<std::size_t>(T * H * kMlaQkDim));
  for (auto& x : p.q) x = fp32_to_bf16_bits(static_cast<float>(rng.normal(0.0, 1.0)));
  p.kv.resize(static_cast<std::size_t>(N * kMlaQkDim));
  for (auto& x : p.kv) x = fp32_to_bf16_bits(static_cast<float>(rng.normal(0.0, 1.0)));
  p.indices.assign(static_cast<std::size_t>(T * topk), -1);
  std::vector<std::int32_t> order(static_cast<std::size_t>(N));
  for (std::int64_t t = 0; t < T; ++t) {
    std::iota(order.begin(), order.end(), 0);
    rng.shuffle(std::span<std::int32_t>(order));
    for (std::int64_t i = 0; i < topk && i < N; ++i) {
      p.indices[static_cast<std::size_t>(t * topk + i)] = rng.uniform() < 0.15 ? -1 : order[static_cast<std::size_t>(i)];
    }
  }
  for (std::int64_t i = 0; i < topk; ++i) p.indices[static_cast<std::size_t>(i)] = -1;  // row 0: nothing valid
  p.topk_length.resize(static_cast<std::size_t>(T));
  for (auto& x : p.topk_length) x = static_cast<std::int32_t>(rng.uniform_int(static_cast<std::uint64_t>(topk + 3)));
  p.sink.resize(static_cast<std::size_t>(H));
  for (auto& x : p.sink) x = static_cast<float>(rng.normal(0.0, 2.0));
  return p;
}

void expect_close(const std::vector<float>& got, const std::vector<double>& want, double tolerance,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (std::isinf(want[i])) {
      ASSERT_TRUE(std::isinf(got[i]) && (got[i] < 0) == (want[i] < 0)) << what << " at " << i;
    } else {
      ASSERT_NEAR(got[i], want[i], tolerance * (1.0 + std::abs(want[i]))) << what << " at " << i;
    }
  }
}

void check(const Problem& p, bool v32, bool with_length, bool with_sink) {
  SCOPED_TRACE("T=" + std::to_string(p.T) + " H=" + std::to_string(p.H) + " N=" + std::to_string(p.N) +
               " topk=" + std::to_string(p.topk) + " v32=" + std::to_string(v32) +
               " length=" + std::to_string(with_length) + " sink=" + std::to_string(with_sink));
  const TensorView q(p.q.data(), DType::bf16, {p.T, p.H, kMlaQkDim});
  std::vector<std::uint8_t> pages;
  TensorView kv(p.kv.data(), DType::bf16, {p.N, kMlaQkDim});
  if (v32) {
    constexpr std::int64_t page = 64;
    const std::int64_t num_pages = (p.N + page - 1) / page;
    pages.assign(static_cast<std::size_t>(num_pages * page * kMlaV32TokenBytes), 0);
    std::vector<std::int32_t> slots(static_cast<std::size_t>(p.N));
    std::iota(slots.begin(), slots.end(), 0);
    mla_v32_quantize(kv, TensorView(pages.data(), DType::fp8_e4m3, {num_pages, page, kMlaV32TokenBytes}),
                     TensorView(slots.data(), DType::int32, {p.N}));
    kv = TensorView(pages.data(), DType::fp8_e4m3, {num_pages, page, kMlaV32TokenBytes});
  }
  SparseMlaOptions options;
  if (with_length) options.topk_length = TensorView(p.topk_length.data(), DType::int32, {p.T});
  if (with_sink) options.attn_sink = TensorView(p.sink.data(), DType::fp32, {p.H});
  const TensorView indices(p.indices.data(), DType::int32, {p.T, p.topk});
  std::vector<double> ref_out(static_cast<std::size_t>(p.T * p.H * kMlaLatentDim)), ref_lse(static_cast<std::size_t>(p.T * p.H));
  std::vector<double> ref_max(ref_lse.size());
  sparse_mla_reference(q, kv, indices, TensorView(ref_out.data(), DType::fp64, {p.T, p.H, kMlaLatentDim}),
                       TensorView(ref_lse.data(), DType::fp64, {p.T, p.H}), options,
                       TensorView(ref_max.data(), DType::fp64, {p.T, p.H}));
  std::vector<float> out(ref_out.size(), 7.0f), lse(ref_lse.size(), 7.0f), max_logits(ref_lse.size(), 7.0f);
  sparse_mla(q, kv, indices, TensorView(out.data(), DType::fp32, {p.T, p.H, kMlaLatentDim}),
             TensorView(lse.data(), DType::fp32, {p.T, p.H}), options, {},
             TensorView(max_logits.data(), DType::fp32, {p.T, p.H}));
  // fp32 products over 576 channels and an online softmax over <= topk keys, against double.
  expect_close(out, ref_out, 2e-5, "out");
  expect_close(lse, ref_lse, 2e-5, "lse");
  expect_close(max_logits, ref_max, 2e-5, "max_logits");
  for (std::int64_t h = 0; h < p.H; ++h) {  // row 0 has no valid slot, sink or not
    EXPECT_EQ(ref_lse[static_cast<std::size_t>(h)], -std::numeric_limits<double>::infinity());
    EXPECT_EQ(ref_max[static_cast<std::size_t>(h)], -std::numeric_limits<double>::infinity());
    EXPECT_EQ(ref_out[static_cast<std::size_t>(h * kMlaLatentDim)], 0.0);
  }
  if (!with_sink) return;
  // The sink scales the output by exp(lse) / (exp(lse) + exp(sink)) and leaves lse alone.
  std::vector<double> plain_out(ref_out.size()), plain_lse(ref_lse.size());
  SparseMlaOptions plain = options;
  plain.attn_sink = {};
  sparse_mla_reference(q, kv, indices, TensorView(plain_out.data(), DType::fp64, {p.T, p.H, kMlaLatentDim}),
                       TensorView(plain_lse.data(), DType::fp64, {p.T, p.H}), plain);
  for (std::int64_t t = 1; t < p.T; ++t) {
    for (std::int64_t h = 0; h < p.H; ++h) {
      const auto i = static_cast<std::size_t>(t * p.H + h);
      EXPECT_EQ(ref_lse[i], plain_lse[i]);
      if (std::isinf(plain_lse[i])) continue;
      const double factor = 1.0 / (1.0 + std::exp(p.sink[static_cast<std::size_t>(h)] - plain_lse[i]));
      for (std::int64_t d = 0; d < kMlaLatentDim; d += 61) {
        const auto j = static_cast<std::size_t>(i * kMlaLatentDim + d);
        EXPECT_NEAR(ref_out[j], plain_out[j] * factor, 1e-12 * (1.0 + std::abs(plain_out[j])));
      }
    }
  }
}

TEST(SparseMla, Fp32PathMatchesReference) {
  std::uint64_t seed = 11;
  for (const bool v32 : {false, true}) {
    check(make(5, 16, 300, 77, seed++), v32, false, false);
    check(make(3, 64, 130, 128, seed++), v32, true, false);
    check(make(4, 8, 1000, 200, seed++), v32, true, true);
    check(make(2, 128, 64, 70, seed++), v32, false, true);  // topk above N: the tail is -1
  }
}

TEST(SparseMla, ReferenceIsTheSoftmaxOfOneRow) {
  const Problem p = make(2, 2, 50, 9, 77);
  const std::int32_t row[] = {4, -1, 17, 3, -1, 40, 0, -1, 9};
  std::vector<std::int32_t> indices(row, row + 9);
  indices.insert(indices.end(), row, row + 9);
  std::vector<double> out(static_cast<std::size_t>(2 * 2 * kMlaLatentDim)), lse(4);
  SparseMlaOptions options;
  options.scale = 0.1;
  sparse_mla_reference(TensorView(p.q.data(), DType::bf16, {2, 2, kMlaQkDim}),
                       TensorView(p.kv.data(), DType::bf16, {50, kMlaQkDim}),
                       TensorView(indices.data(), DType::int32, {2, 9}),
                       TensorView(out.data(), DType::fp64, {2, 2, kMlaLatentDim}),
                       TensorView(lse.data(), DType::fp64, {2, 2}), options);
  const std::int32_t valid[] = {4, 17, 3, 40, 0, 9};
  for (std::int64_t h = 0; h < 2; ++h) {
    std::vector<double> logits;
    for (std::int32_t s : valid) {
      double dot = 0.0;
      for (std::int64_t d = 0; d < kMlaQkDim; ++d) {
        dot += static_cast<double>(bf16_bits_to_fp32(p.q[static_cast<std::size_t>((1 * 2 + h) * kMlaQkDim + d)])) *
               bf16_bits_to_fp32(p.kv[static_cast<std::size_t>(s * kMlaQkDim + d)]);
      }
      logits.push_back(0.1 * dot);
    }
    double sum = 0.0;
    for (double l : logits) sum += std::exp(l);
    EXPECT_NEAR(lse[static_cast<std::size_t>(2 + h)], std::log(sum), 1e-12);
    for (std::int64_t d = 0; d < kMlaLatentDim; d += 37) {
      double o = 0.0;
      for (std::size_t i = 0; i < logits.size(); ++i) {
        o += std::exp(logits[i]) / sum * bf16_bits_to_fp32(p.kv[static_cast<std::size_t>(valid[i] * kMlaQkDim + d)]);
      }
      EXPECT_NEAR(out[static_cast<std::size_t>((2 + h) * kMlaLatentDim + d)], o, 1e-12);
    }
  }
}

TEST(MlaV32Cache, WriterFollowsTheFormat) {
  RandomStream rng(5);
  const std::int64_t T = 40, page = 16, pages = 4;
  std::vector<float> kv(static_cast<std::size_t>(T * kMlaQkDim));
  rng.fill_normal(kv, 0.0, 4.0);
  for (std::int64_t d = 0; d < kMlaV32ScaleGroup; ++d) kv[static_cast<std::size_t>(d)] = 0.0f;  // a zero group
  std::vector<std::int32_t> slots(static_cast<std::size_t>(T));
  for (std::int64_t t = 0; t < T; ++t) slots[static_cast<std::size_t>(t)] = t % 7 == 3 ? -1 : static_cast<std::int32_t>(63 - t);
  std::vector<std::uint8_t> cache(static_cast<std::size_t>(pages * page * kMlaV32TokenBytes), 0xEE);
  mla_v32_quantize(TensorView(kv.data(), DType::fp32, {T, kMlaQkDim}),
                   TensorView(cache.data(), DType::fp8_e4m3, {pages, page, kMlaV32TokenBytes}),
                   TensorView(slots.data(), DType::int32, {T}));
  std::vector<float> decoded(static_cast<std::size_t>(pages * page * kMlaQkDim));
  mla_v32_dequantize(TensorView(cache.data(), DType::fp8_e4m3, {pages, page, kMlaV32TokenBytes}),
                     TensorView(decoded.data(), DType::fp32, {pages * page, kMlaQkDim}));
  for (std::int64_t t = 0; t < T; ++t) {
    const std::int32_t slot = slots[static_cast<std::size_t>(t)];
    if (slot < 0) continue;
    const std::uint8_t* token = cache.data() + slot * kMlaV32TokenBytes;
    for (std::int64_t g = 0; g < 4; ++g) {
      float amax = 0.0f;
      for (std::int64_t d = g * 128; d < (g + 1) * 128; ++d) amax = std::max(amax, std::abs(kv[static_cast<std::size_t>(t * kMlaQkDim + d)]));
      float scale = 0.0f;
      std::memcpy(&scale, token + 512 + 4 * g, 4);
      const double needed = std::max(amax, 1e-4f) / 448.0f;
      int exponent = 0;
      EXPECT_EQ(std::frexp(scale, &exponent), 0.5f) << "a power of two";
      EXPECT_GE(scale, needed);
      EXPECT_LT(scale, 2 * needed);
      for (std::int64_t d = g * 128; d < (g + 1) * 128; ++d) {
        EXPECT_EQ(token[d], fp32_to_fp8_e4m3(kv[static_cast<std::size_t>(t * kMlaQkDim + d)] / scale));
      }
    }
    for (std::int64_t d = 512; d < kMlaQkDim; ++d) {
      const float x = kv[static_cast<std::size_t>(t * kMlaQkDim + d)];
      EXPECT_EQ(decoded[static_cast<std::size_t>(slot * kMlaQkDim + d)], bf16_bits_to_fp32(fp32_to_bf16_bits(x)));
    }
  }
  EXPECT_EQ(cache[static_cast<std::size_t>(63 - 3) * kMlaV32TokenBytes], 0xEE);  // token 3 was skipped
}

TEST(SparseMla, RejectsBadArguments) {
  const Problem p = make(2, 4, 30, 5, 3);
  const TensorView q(p.q.data(), DType::bf16, {2, 4, kMlaQkDim});
  const TensorView kv(p.kv.data(), DType::bf16, {30, kMlaQkDim});
  std::vector<float> out(static_cast<std::size_t>(2 * 4 * kMlaLatentDim), 5.0f);
  const TensorView o(out.data(), DType::fp32, {2, 4, kMlaLatentDim});
  std::vector<std::int32_t> bad = {1, 2, 30, -1, 4, 0, 0, 0, 0, 0};  // 30 is out of range; row 1 repeats 0
  EXPECT_THROW(sparse_mla(q, kv, TensorView(bad.data(), DType::int32, {2, 5}), o), Error);
  bad[2] = 3;
  EXPECT_THROW(sparse_mla(q, kv, TensorView(bad.data(), DType::int32, {2, 5}), o), Error);
  const std::vector<std::int32_t> good = {1, 2, 3, -1, 4, 0, 5, 6, 7, 8};
  const TensorView gi(good.data(), DType::int32, {2, 5});
  EXPECT_THROW(sparse_mla(TensorView(p.q.data(), DType::bf16, {2, 8, 288}), kv, gi, o), Error);  // d_qk 288
  std::vector<float> sink(3);
  SparseMlaOptions options;
  options.attn_sink = TensorView(sink.data(), DType::fp32, {3});  // h_q is 4
  EXPECT_THROW(sparse_mla(q, kv, gi, o, {}, options), Error);
  options = {};
  options.scale = -1.0;
  EXPECT_THROW(sparse_mla(q, kv, gi, o, {}, options), Error);
  for (float x : out) EXPECT_EQ(x, 5.0f);
}

}  // namespace
}  // namespace keysel
