// sparse_attention_decode_cuda against keysel::sparse_attention_reference (double precision) on bf16 inputs:
// paged and contiguous caches, every granularity, GQA / MHA / MQA group sizes, D of 64, 128 and 256, padded and
// empty selections, and selections long enough to be split across thread blocks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "gpu_test_support.h"
#include "keysel/attention/cuda_sparse_attention.h"
#include "keysel/attention/reference.h"
#include "keysel/core/dtype.h"
#include "keysel/core/random.h"

namespace keysel {
namespace {

using keysel::testing::poisoned;
using keysel::testing::to_device;
using keysel::testing::to_host;

struct Case {
  std::int64_t B, Hq, Hkv, D, N, W;
  Granularity granularity;
  std::int64_t block_size;  // 0: contiguous cache
  bool out_bf16;
  double fill = 0.8;        // fraction of W holding keys (the rest -1); 0: every row empty
};

std::vector<std::uint16_t> random_bf16(RandomStream& rng, std::int64_t count, double stddev) {
  std::vector<std::uint16_t> bits(static_cast<std::size_t>(count));
  for (auto& b : bits) b = fp32_to_bf16_bits(static_cast<float>(rng.normal(0.0, stddev)));
  return bits;
}

std::vector<float> decode_bf16(const std::vector<std::uint16_t>& bits) {
  std::vector<float> out(bits.size());
  for (std::size_t i = 0; i < bits.size(); ++i) out[i] = bf16_bits_to_fp32(bits[i]);
  return out;
}

void check_case(const Case& c, std::uint64_t seed) {
  SCOPED_TRACE("B=" + std::to_string(c.B) + " Hq=" + std::to_string(c.Hq) + " Hkv=" + std::to_string(c.Hkv) +
               " D=" + std::to_string(c.D) + " N=" + std::to_string(c.N) + " W=" + std::to_string(c.W) +
               " granularity=" + std::string(granularity_name(c.granularity)) +
               " block_size=" + std::to_string(c.block_size) + " bf16_out=" + std::to_string(c.out_bf16));
  RandomStream rng(seed);
  const std::int64_t G = group_count(c.granularity, c.Hq, c.Hkv);
  const std::vector<std::uint16_t> q = random_bf16(rng, c.B * c.Hq * c.D, 1.5);
  // Per-sequence contiguous K/V [B, N, Hkv, D] (what the reference reads) ...
  const std::vector<std::uint16_t> k = random_bf16(rng, c.B * c.N * c.Hkv * c.D, 1.0);
  const std::vector<std::uint16_t> v = random_bf16(rng, c.B * c.N * c.Hkv * c.D, 1.0);
  // ... and, when paged, the same rows scattered over shuffled blocks.
  std::vector<std::uint16_t> k_cache = k, v_cache = v;
  std::vector<std::int32_t> table;
  std::int64_t num_blocks = c.B, block_size = c.N, max_blocks = 0;
  const std::int64_t row = c.Hkv * c.D;
  if (c.block_size > 0) {
    block_size = c.block_size;
    max_blocks = (c.N + block_size - 1) / block_size;
    num_blocks = c.B * max_blocks + 3;  // a few blocks nobody owns
    std::vector<std::int32_t> order(static_cast<std::size_t>(num_blocks));
    std::iota(order.begin(), order.end(), 0);
    rng.shuffle(std::span<std::int32_t>(order));
    table.assign(order.begin(), order.begin() + c.B * max_blocks);
    k_cache.assign(static_cast<std::size_t>(num_blocks * block_size * row), fp32_to_bf16_bits(1e4f));
    v_cache = k_cache;
    for (std::int64_t b = 0; b < c.B; ++b) {
      for (std::int64_t s = 0; s < c.N; ++s) {
        const std::int64_t block = table[static_cast<std::size_t>(b * max_blocks + s / block_size)];
        const std::int64_t dst = (block * block_size + s % block_size) * row;
        const std::int64_t src = (b * c.N + s) * row;
        std::copy_n(k.begin() + src, row, k_cache.begin() + dst);
        std::copy_n(v.begin() + src, row, v_cache.begin() + dst);
      }
    }
  }
  // Selections: distinct ascending positions, then -1.
  std::vector<std::int32_t> selection(static_cast<std::size_t>(c.B * G * c.W), -1);
  std::vector<std::int32_t> all(static_cast<std::size_t>(c.N));
  std::iota(all.begin(), all.end(), 0);
  for (std::int64_t r = 0; r < c.B * G; ++r) {
    const std::int64_t count = std::min<std::int64_t>(c.N, static_cast<std::int64_t>(c.fill * static_cast<double>(c.W)));
    rng.shuffle(std::span<std::int32_t>(all));
    std::vector<std::int32_t> chosen(all.begin(), all.begin() + count);
    std::sort(chosen.begin(), chosen.end());
    std::copy(chosen.begin(), chosen.end(), selection.begin() + r * c.W);
  }

  // Reference, one sequence at a time (T = 1, pos = N - 1).
  const std::vector<float> qf = decode_bf16(q), kf = decode_bf16(k), vf = decode_bf16(v);
  std::vector<double> ref_out(static_cast<std::size_t>(c.B * c.Hq * c.D));
  std::vector<double> ref_lse(static_cast<std::size_t>(c.B * c.Hq));
  for (std::int64_t b = 0; b < c.B; ++b) {
    const std::int32_t position = static_cast<std::int32_t>(c.N - 1);
    AttentionInputs inputs;
    inputs.q = TensorView(qf.data() + b * c.Hq * c.D, DType::fp32, {1, c.Hq, c.D});
    inputs.k = TensorView(kf.data() + b * c.N * row, DType::fp32, {c.N, c.Hkv, c.D});
    inputs.v = TensorView(vf.data() + b * c.N * row, DType::fp32, {c.N, c.Hkv, c.D});
    inputs.positions = TensorView(&position, DType::int32, {1});
    sparse_attention_reference(inputs, TensorView(selection.data() + b * G * c.W, DType::int32, {1, G, c.W}),
                               c.granularity, TensorView(ref_out.data() + b * c.Hq * c.D, DType::fp64, {1, c.Hq, c.D}),
                               TensorView(ref_lse.data() + b * c.Hq, DType::fp64, {1, c.Hq}));
  }

  const CudaBuffer d_q = to_device(q), d_k = to_device(k_cache), d_v = to_device(v_cache);
  const CudaBuffer d_sel = to_device(selection);
  CudaBuffer d_table;
  if (!table.empty()) d_table = to_device(table);
  CudaKvCache cache;
  cache.k = TensorView(d_k.data(), DType::bf16, {num_blocks, block_size, c.Hkv, c.D}, Device::cuda());
  cache.v = TensorView(d_v.data(), DType::bf16, {num_blocks, block_size, c.Hkv, c.D}, Device::cuda());
  if (!table.empty()) cache.block_table = TensorView(d_table.data(), DType::int32, {c.B, max_blocks}, Device::cuda());
  const DType out_dtype = c.out_bf16 ? DType::bf16 : DType::fp32;
  const std::int64_t out_count = c.B * c.Hq * c.D;
  CudaBuffer d_out = c.out_bf16 ? poisoned<std::uint16_t>(out_count, 0xFF) : poisoned<float>(out_count, 0xFF);
  CudaBuffer d_lse = poisoned<float>(c.B * c.Hq, 0xFF);
  sparse_attention_decode_cuda(TensorView(d_q.data(), DType::bf16, {c.B, c.Hq, c.D}, Device::cuda()), cache,
                               TensorView(d_sel.data(), DType::int32, {c.B, G, c.W}, Device::cuda()), c.granularity,
                               0.0, TensorView(d_out.data(), out_dtype, {c.B, c.Hq, c.D}, Device::cuda()),
                               TensorView(d_lse.data(), DType::fp32, {c.B, c.Hq}, Device::cuda()));
  cuda_synchronize();
  std::vector<float> out(static_cast<std::size_t>(out_count));
  if (c.out_bf16) {
    const std::vector<std::uint16_t> bits = to_host<std::uint16_t>(d_out);
    out = decode_bf16(bits);
  } else {
    out = to_host<float>(d_out);
  }
  const std::vector<float> lse = to_host<float>(d_lse);

  // Tolerances: inputs are exact bf16 values, arithmetic fp32 -> relative error ~1e-5 of the output norm;
  // bf16 output adds half an ulp (2^-9 relative) per element.
  const double rel_tol = c.out_bf16 ? 4e-3 : 2e-5;
  for (std::int64_t h = 0; h < c.B * c.Hq; ++h) {
    double err2 = 0.0, ref2 = 0.0;
    for (std::int64_t d = 0; d < c.D; ++d) {
      const double got = out[static_cast<std::size_t>(h * c.D + d)];
      const double want = ref_out[static_cast<std::size_t>(h * c.D + d)];
      ASSERT_TRUE(std::isfinite(got)) << "head " << h << " channel " << d << " not written or not finite";
      err2 += (got - want) * (got - want);
      ref2 += want * want;
    }
    const double want_lse = ref_lse[static_cast<std::size_t>(h)];
    const double got_lse = lse[static_cast<std::size_t>(h)];
    if (std::isinf(want_lse)) {
      EXPECT_TRUE(std::isinf(got_lse) && got_lse < 0) << "head " << h << ": empty selection gives lse " << got_lse;
      EXPECT_EQ(err2, 0.0) << "head " << h << ": empty selection must give zeros";
    } else {
      ASSERT_LE(std::sqrt(err2), rel_tol * std::sqrt(ref2) + 1e-7) << "head " << h;
      ASSERT_NEAR(got_lse, want_lse, 2e-5 * std::max(1.0, std::abs(want_lse))) << "head " << h;
    }
  }
}

TEST(CudaSparseAttention, MatchesReferencePaged) {
  KEYSEL_REQUIRE_GPU();
  std::uint64_t seed = 11;
  check_case({3, 8, 2, 128, 777, 300, Granularity::per_kv_head, 16, false}, seed++);
  check_case({2, 12, 2, 128, 1000, 257, Granularity::per_kv_head, 64, false}, seed++);  // g = 6: two head chunks
  check_case({2, 16, 1, 64, 513, 200, Granularity::per_token, 32, false}, seed++);     // MQA, D = 64
  check_case({2, 4, 4, 256, 300, 100, Granularity::per_kv_head, 7, false}, seed++);    // MHA, D = 256, odd block
  check_case({2, 8, 2, 128, 400, 150, Granularity::per_head, 16, true}, seed++);       // per head, bf16 out
  check_case({1, 32, 8, 128, 5000, 2048, Granularity::per_kv_head, 64, true, 1.0}, seed++);  // split across blocks
}

TEST(CudaSparseAttention, MatchesReferenceContiguous) {
  KEYSEL_REQUIRE_GPU();
  std::uint64_t seed = 31;
  check_case({4, 8, 2, 128, 3001, 1111, Granularity::per_kv_head, 0, false, 0.9}, seed++);
  check_case({2, 6, 3, 64, 999, 77, Granularity::per_token, 0, false}, seed++);
  check_case({3, 4, 2, 128, 50, 100, Granularity::per_kv_head, 0, false, 0.0}, seed++);  // every row empty
  check_case({2, 8, 8, 256, 4100, 3000, Granularity::per_kv_head, 0, false, 1.0}, seed++);
}

TEST(CudaSparseAttention, RejectsBadArguments) {
  KEYSEL_REQUIRE_GPU();
  CudaBuffer q = poisoned<std::uint16_t>(2 * 8 * 128, 0);
  CudaBuffer kv = poisoned<std::uint16_t>(2 * 64 * 2 * 128, 0);
  CudaBuffer sel = poisoned<std::int32_t>(2 * 2 * 16, 0);
  CudaBuffer out = poisoned<float>(2 * 8 * 128, 0xFF);
  CudaKvCache cache;
  cache.k = TensorView(kv.data(), DType::bf16, {2, 64, 2, 128}, Device::cuda());
  cache.v = cache.k;
  const TensorView qv(q.data(), DType::bf16, {2, 8, 128}, Device::cuda());
  const TensorView sv(sel.data(), DType::int32, {2, 2, 16}, Device::cuda());
  const TensorView ov(out.data(), DType::fp32, {2, 8, 128}, Device::cuda());
  EXPECT_THROW(sparse_attention_decode_cuda(qv, cache, sv, Granularity::per_token, 0.0, ov), Error);  // G mismatch
  EXPECT_THROW(sparse_attention_decode_cuda(qv, cache, sv, Granularity::per_kv_head, -1.0, ov), Error);  // scale
  const TensorView q96(q.data(), DType::bf16, {2, 8, 96}, Device::cuda());
  EXPECT_THROW(sparse_attention_decode_cuda(q96, cache, sv, Granularity::per_kv_head, 0.0, ov), Error);  // D
  std::vector<float> host(2 * 8 * 128);
  const TensorView host_out(host.data(), DType::fp32, {2, 8, 128}, Device::cuda());
  EXPECT_THROW(sparse_attention_decode_cuda(qv, cache, sv, Granularity::per_kv_head, 0.0, host_out), Error);
  const std::vector<float> untouched = to_host<float>(out);
  for (float x : untouched) EXPECT_TRUE(std::isnan(x));
}

}  // namespace
}  // namespace keysel
