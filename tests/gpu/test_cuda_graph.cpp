// Every public CUDA call can be captured in a CUDA graph (CudaGraph::capture on a CudaStream): nothing runs while
// it is recorded, a replay writes what a direct call writes (bit for bit for the indexer and top-k; to rounding
// for sparse attention, whose blocks sum partial results with shared-memory atomics in no fixed order), and a
// replay reads the buffers' contents at replay time. Top-k replays are also checked against the CPU select_topk.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "gpu_test_support.h"
#include "keysel/attention/cuda_sparse_attention.h"
#include "keysel/core/dtype.h"
#include "keysel/core/error.h"
#include "keysel/core/random.h"
#include "keysel/indexer/cuda_indexer.h"
#include "keysel/indexer/cuda_topk.h"
#include "keysel/indexer/topk.h"

namespace keysel {
namespace {

using keysel::testing::poisoned;
using keysel::testing::to_device;
using keysel::testing::to_host;

std::vector<float> normal_scores(RandomStream& rng, std::int64_t count) {
  std::vector<float> scores(static_cast<std::size_t>(count));
  rng.fill_normal(scores, 0.0, 3.0);
  return scores;
}

struct TopkShape {
  std::int64_t T, N, k, sinks, local;
};

TEST(CudaGraph, TopkReplayMatchesDirectCallAndCpu) {
  KEYSEL_REQUIRE_GPU();
  // B = 1 and 3 long rows (several blocks per row, the programmatic chain), 150 short rows (one block per row).
  for (const TopkShape& shape : {TopkShape{1, 131071, 2048, 0, 0}, TopkShape{3, 70001, 1000, 4, 64},
                                 TopkShape{150, 5003, 257, 1, 16}}) {
    SCOPED_TRACE("T=" + std::to_string(shape.T) + " N=" + std::to_string(shape.N));
    RandomStream rng(0x6a09e667u + static_cast<std::uint64_t>(shape.T * 7919 + shape.N));
    SelectionPolicy policy;
    policy.k = shape.k;
    policy.n_sink = shape.sinks;
    policy.n_local = shape.local;
    const std::int64_t width = policy.width();
    std::vector<std::int32_t> positions(static_cast<std::size_t>(shape.T));
    for (std::int64_t t = 0; t < shape.T; ++t) {
      positions[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(shape.N - 1 - (t * 131) % (shape.N / 3));
    }
    std::vector<float> scores = normal_scores(rng, shape.T * shape.N);
    CudaBuffer d_scores = to_device(scores);
    const CudaBuffer d_positions = to_device(positions);
    CudaBuffer d_selection = poisoned<std::int32_t>(shape.T * width, 0xA5);
    const TensorView sv(d_scores.data(), DType::fp32, {shape.T, 1, shape.N}, Device::cuda());
    const TensorView pv(d_positions.data(), DType::int32, {shape.T}, Device::cuda());
    const TensorView out(d_selection.data(), DType::int32, {shape.T, 1, width}, Device::cuda());
    const auto expected_for = [&](const std::vector<float>& s) {
      std::vector<std::int32_t> expected(static_cast<std::size_t>(shape.T * width));
      select_topk(TensorView(s.data(), DType::fp32, {shape.T, 1, shape.N}),
                  TensorView(positions.data(), DType::int32, {shape.T}), policy,
                  TensorView(expected.data(), DType::int32, {shape.T, 1, width}));
      return expected;
    };

    CudaStream stream;
    select_topk_cuda(sv, pv, policy, out, stream.handle());
    stream.synchronize();
    const std::vector<std::int32_t> direct = to_host<std::int32_t>(d_selection);
    EXPECT_EQ(direct, expected_for(scores));

    d_selection.fill_bytes(0x5A);
    const CudaGraph graph = CudaGraph::capture(stream, [&] { select_topk_cuda(sv, pv, policy, out, stream.handle()); });
    stream.synchronize();
    const std::vector<std::int32_t> after_capture = to_host<std::int32_t>(d_selection);
    EXPECT_TRUE(std::all_of(after_capture.begin(), after_capture.end(), [](std::int32_t v) { return v == 0x5A5A5A5A; }))
        << "the capture ran work";
    graph.launch(stream);
    stream.synchronize();
    EXPECT_EQ(to_host<std::int32_t>(d_selection), direct);

    // Fresh scores in the same buffer: the replay selects from them.
    scores = normal_scores(rng, shape.T * shape.N);
    d_scores.copy_from_host(scores.data());
    d_selection.fill_bytes(0xA5);
    graph.launch(stream);
    graph.launch(stream);  // twice back to back: the second replay's scratch and chain follow the first
    stream.synchronize();
    EXPECT_EQ(to_host<std::int32_t>(d_selection), expected_for(scores));
  }
}

TEST(CudaGraph, IndexerReplayMatchesDirectCall) {
  KEYSEL_REQUIRE_GPU();
  constexpr std::int64_t R = 3, HI = 64, DI = 128, N = 9001;
  constexpr std::int64_t blocks_per_sequence = (N + kIndexerCacheBlock - 1) / kIndexerCacheBlock;
  RandomStream rng(0xbb67ae85u);
  std::vector<std::uint8_t> q(static_cast<std::size_t>(R * HI * DI));
  for (auto& x : q) x = fp32_to_fp8_e4m3(static_cast<float>(rng.normal(0.0, 2.0)));
  std::vector<float> weights(static_cast<std::size_t>(R * HI));
  for (auto& w : weights) w = static_cast<float>(rng.normal(0.0, 0.2));
  const std::int64_t num_blocks = R * blocks_per_sequence;
  constexpr std::int64_t page_bytes = kIndexerCacheBlock * (DI + 4);  // 64 x DI fp8, then 64 fp32 scales
  std::vector<std::uint8_t> cache(static_cast<std::size_t>(num_blocks * page_bytes));
  for (std::size_t page = 0; page < cache.size(); page += page_bytes) {
    for (std::int64_t i = 0; i < kIndexerCacheBlock * DI; ++i) {
      cache[page + i] = fp32_to_fp8_e4m3(static_cast<float>(rng.normal(0.0, 1.0)));
    }
    for (std::int64_t t = 0; t < kIndexerCacheBlock; ++t) {
      const float scale = static_cast<float>(0.01 + rng.uniform());
      std::memcpy(&cache[page + kIndexerCacheBlock * DI + 4 * t], &scale, 4);
    }
  }
  const std::vector<std::int32_t> positions = {N - 1, N / 2, 77};
  const CudaBuffer d_q = to_device(q), d_w = to_device(weights), d_cache = to_device(cache),
                   d_positions = to_device(positions);
  CudaBuffer d_logits = poisoned<float>(R * N, 0xFF);
  SelectionPolicy policy;
  policy.k = 500;
  policy.n_local = 32;
  CudaBuffer d_selection = poisoned<std::int32_t>(R * policy.width(), 0xA5);
  const TensorView qv(d_q.data(), DType::fp8_e4m3, {R, HI, DI}, Device::cuda());
  const TensorView wv(d_w.data(), DType::fp32, {R, HI}, Device::cuda());
  const TensorView pv(d_positions.data(), DType::int32, {R}, Device::cuda());
  const TensorView lv(d_logits.data(), DType::fp32, {R, N}, Device::cuda());
  const TensorView sv(d_selection.data(), DType::int32, {R, 1, policy.width()}, Device::cuda());
  CudaIndexerKeyCache kc;
  kc.blocks = TensorView(d_cache.data(), DType::fp8_e4m3, {num_blocks, page_bytes}, Device::cuda());

  CudaStream stream;
  const auto record = [&] {
    lightning_indexer_logits_cuda(qv, wv, kc, pv, lv, {}, stream.handle());
    lightning_indexer_topk_cuda(qv, wv, kc, pv, N, policy, sv, {}, stream.handle());
  };
  record();
  stream.synchronize();
  const std::vector<float> direct_logits = to_host<float>(d_logits);
  const std::vector<std::int32_t> direct_selection = to_host<std::int32_t>(d_selection);
  // The direct selection is the CPU one on the direct logits (a check that the call did its work).
  std::vector<std::int32_t> expected(direct_selection.size());
  select_topk(TensorView(direct_logits.data(), DType::fp32, {R, 1, N}),
              TensorView(positions.data(), DType::int32, {R}), policy,
              TensorView(expected.data(), DType::int32, {R, 1, policy.width()}));
  EXPECT_EQ(direct_selection, expected);

  d_logits.fill_bytes(0xFF);
  d_selection.fill_bytes(0x5A);
  const CudaGraph graph = CudaGraph::capture(stream, record);
  graph.launch(stream);
  stream.synchronize();
  const std::vector<float> replay_logits = to_host<float>(d_logits);
  ASSERT_EQ(replay_logits.size(), direct_logits.size());
  EXPECT_EQ(std::memcmp(replay_logits.data(), direct_logits.data(), replay_logits.size() * sizeof(float)), 0);
  EXPECT_EQ(to_host<std::int32_t>(d_selection), direct_selection);
}

TEST(CudaGraph, SparseAttentionReplayMatchesDirectCall) {
  KEYSEL_REQUIRE_GPU();
  constexpr std::int64_t B = 3, Hq = 8, Hkv = 2, D = 128, block = 16, N = 1000, W = 300;
  constexpr std::int64_t blocks_per_sequence = (N + block - 1) / block;
  const std::int64_t num_blocks = B * blocks_per_sequence + 5;
  RandomStream rng(0x3c6ef372u);
  const auto bf16_values = [&](std::int64_t count) {
    std::vector<std::uint16_t> v(static_cast<std::size_t>(count));
    for (auto& x : v) x = fp32_to_bf16_bits(static_cast<float>(rng.normal(0.0, 1.0)));
    return v;
  };
  const std::vector<std::uint16_t> q = bf16_values(B * Hq * D);
  const std::vector<std::uint16_t> k = bf16_values(num_blocks * block * Hkv * D);
  const std::vector<std::uint16_t> v = bf16_values(num_blocks * block * Hkv * D);
  std::vector<std::int32_t> table(static_cast<std::size_t>(num_blocks));
  std::iota(table.begin(), table.end(), 0);
  for (std::size_t i = table.size(); i > 1; --i) std::swap(table[i - 1], table[rng.uniform_int(i)]);
  table.resize(static_cast<std::size_t>(B * blocks_per_sequence));
  std::vector<std::int32_t> selection(static_cast<std::size_t>(B * Hkv * W));
  std::vector<std::int32_t> all(static_cast<std::size_t>(N));
  for (std::int64_t r = 0; r < B * Hkv; ++r) {
    std::iota(all.begin(), all.end(), 0);
    for (std::int64_t i = 0; i < W; ++i) {
      std::swap(all[static_cast<std::size_t>(i)], all[static_cast<std::size_t>(i) + rng.uniform_int(static_cast<std::uint64_t>(N - i))]);
    }
    std::sort(all.begin(), all.begin() + W);
    std::copy_n(all.begin(), W, selection.begin() + r * W);
  }
  selection[5] = -1;
  const CudaBuffer d_q = to_device(q), d_k = to_device(k), d_v = to_device(v), d_table = to_device(table),
                   d_selection = to_device(selection);
  CudaBuffer d_out = poisoned<float>(B * Hq * D, 0xFF), d_lse = poisoned<float>(B * Hq, 0xFF);
  CudaKvCache cache;
  cache.k = TensorView(d_k.data(), DType::bf16, {num_blocks, block, Hkv, D}, Device::cuda());
  cache.v = TensorView(d_v.data(), DType::bf16, {num_blocks, block, Hkv, D}, Device::cuda());
  cache.block_table = TensorView(d_table.data(), DType::int32, {B, blocks_per_sequence}, Device::cuda());
  const TensorView qv(d_q.data(), DType::bf16, {B, Hq, D}, Device::cuda());
  const TensorView sv(d_selection.data(), DType::int32, {B, Hkv, W}, Device::cuda());
  const TensorView ov(d_out.data(), DType::fp32, {B, Hq, D}, Device::cuda());
  const TensorView lv(d_lse.data(), DType::fp32, {B, Hq}, Device::cuda());

  CudaStream stream;
  const auto record = [&] {
    sparse_attention_decode_cuda(qv, cache, sv, Granularity::per_kv_head, 0.0, ov, lv, stream.handle());
  };
  record();
  stream.synchronize();
  const std::vector<float> direct_out = to_host<float>(d_out), direct_lse = to_host<float>(d_lse);
  EXPECT_TRUE(std::none_of(direct_out.begin(), direct_out.end(), [](float x) { return x != x; }));
  d_out.fill_bytes(0xFF);
  d_lse.fill_bytes(0xFF);
  const CudaGraph graph = CudaGraph::capture(stream, record);
  graph.launch(stream);
  stream.synchronize();
  const std::vector<float> replay_out = to_host<float>(d_out), replay_lse = to_host<float>(d_lse);
  // Per head: |replay - direct| <= 1e-6 |direct| (fp32 sums in another order), lse within 1e-6 relative.
  for (std::int64_t h = 0; h < B * Hq; ++h) {
    double diff = 0.0, norm = 0.0;
    for (std::int64_t d = 0; d < D; ++d) {
      const double a = replay_out[static_cast<std::size_t>(h * D + d)], b = direct_out[static_cast<std::size_t>(h * D + d)];
      diff += (a - b) * (a - b);
      norm += b * b;
    }
    EXPECT_LE(std::sqrt(diff), 1e-6 * std::sqrt(norm)) << "head " << h;
    const float a = replay_lse[static_cast<std::size_t>(h)], b = direct_lse[static_cast<std::size_t>(h)];
    EXPECT_NEAR(a, b, 1e-6 * std::fabs(b)) << "head " << h;
  }
}

TEST(CudaGraph, FailedCaptureThrowsAndLeavesTheStreamUsable) {
  KEYSEL_REQUIRE_GPU();
  const std::vector<float> scores = {3.0f, 1.0f, 2.0f, 5.0f, 4.0f};
  const std::vector<std::int32_t> positions = {4};
  const CudaBuffer d_scores = to_device(scores), d_positions = to_device(positions);
  CudaBuffer d_selection = poisoned<std::int32_t>(2, 0xA5);
  const TensorView sv(d_scores.data(), DType::fp32, {1, 1, 5}, Device::cuda());
  const TensorView pv(d_positions.data(), DType::int32, {1}, Device::cuda());
  const TensorView out(d_selection.data(), DType::int32, {1, 1, 2}, Device::cuda());
  const TensorView host_scores(scores.data(), DType::fp32, {1, 1, 5}, Device::cuda());  // a host pointer
  SelectionPolicy policy;
  policy.k = 2;
  CudaStream stream;
  EXPECT_THROW(CudaGraph::capture(stream, [&] { select_topk_cuda(host_scores, pv, policy, out, stream.handle()); }),
               Error);
  EXPECT_THROW(CudaGraph::capture(stream, [] { throw std::runtime_error("not keysel"); }), std::runtime_error);
  select_topk_cuda(sv, pv, policy, out, stream.handle());
  stream.synchronize();
  EXPECT_EQ(to_host<std::int32_t>(d_selection), (std::vector<std::int32_t>{3, 4}));
  EXPECT_THROW(CudaGraph().launch(stream), Error);
}

}  // namespace
}  // namespace keysel
