// Context parallelism over simulated ranks: the selection equals select_topk on the whole row bit for bit (ties,
// NaN, -inf, kept keys, kept_on_top, short rows, uneven and empty shards; both layouts, both exchanges, 1 to 9
// ranks), the threshold exchange receives less than the all-gather, the GPU plan (its shard map, merge and assembly
// rules around select_topk) gives the same selection, and the attention merged by log-sum-exp equals
// sparse_attention on the whole cache.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "keysel/attention/sparse_attention.h"
#include "keysel/core/error.h"
#include "keysel/core/random.h"
#include "keysel/indexer/context_parallel.h"
#include "keysel/indexer/cuda_context_parallel.h"
#include "keysel/indexer/topk.h"

#include "cuda_context_parallel_launch.h"  // the GPU plan's per-element rules (indexer/src)

namespace keysel {
namespace {

struct Rows {
  std::int64_t T, G, N;
  std::vector<float> scores;
  std::vector<std::int32_t> positions;
};

/// Scores on a coarse grid (many exact ties), with NaN and -inf sprinkled in.
Rows make_rows(std::int64_t T, std::int64_t G, std::int64_t N, std::uint64_t seed) {
  RandomStream rng(seed);
  Rows r{T, G, N, std::vector<float>(static_cast<std::size_t>(T * G * N)), std::vector<std::int32_t>(static_cast<std::size_t>(T))};
  for (float& x : r.scores) {
    const double u = rng.uniform();
    x = u < 0.03   ? std::numeric_limits<float>::quiet_NaN()
        : u < 0.05 ? -std::numeric_limits<float>::infinity()
        : u < 0.07 ? -0.0f
                   : static_cast<float>(std::round(rng.normal(0.0, 3.0)) / 2.0);
  }
  for (std::int64_t t = 0; t < T; ++t) {
    r.positions[static_cast<std::size_t>(t)] =
        static_cast<std::int32_t>(t == 0 ? 0 : t == 1 ? N - 1 : static_cast<std::int64_t>(rng.uniform_int(static_cast<std::uint64_t>(N))));
  }
  return r;
}

std::vector<std::int32_t> single(const Rows& r, const SelectionPolicy& policy) {
  std::vector<std::int32_t> out(static_cast<std::size_t>(r.T * r.G * policy.width()), 7);
  select_topk(TensorView(r.scores.data(), DType::fp32, {r.T, r.G, r.N}),
              TensorView(r.positions.data(), DType::int32, {r.T}), policy,
              TensorView(out.data(), DType::int32, {r.T, r.G, policy.width()}));
  return out;
}

std::vector<std::int32_t> sharded(const Rows& r, const SelectionPolicy& policy, const ContextShards& shards,
                                  TopkExchange exchange, std::vector<ExchangeCost>* costs = nullptr) {
  std::vector<std::int32_t> out(static_cast<std::size_t>(r.T * r.G * policy.width()), 7);
  select_topk_simulated(TensorView(r.scores.data(), DType::fp32, {r.T, r.G, r.N}),
                        TensorView(r.positions.data(), DType::int32, {r.T}), policy, shards, exchange,
                        TensorView(out.data(), DType::int32, {r.T, r.G, policy.width()}), costs);
  return out;
}

TEST(ContextParallel, SelectionEqualsSelectTopkBitForBit) {
  std::uint64_t seed = 1;
  const SelectionPolicy policies[] = {
      {.k = 16},
      {.k = 40, .n_sink = 3, .n_local = 5},
      {.k = 7, .n_sink = 2, .n_local = 4, .kept_on_top = true},
      {.k = 500},  // above N: every allowed key
  };
  for (const std::int64_t N : {1, 37, 300}) {
    const Rows rows = make_rows(9, 2, N, seed++);
    for (const SelectionPolicy& policy : policies) {
      const std::vector<std::int32_t> want = single(rows, policy);
      for (const std::int64_t R : {1, 2, 3, 8, 9}) {
        for (const auto layout : {ContextShards::Layout::contiguous, ContextShards::Layout::round_robin}) {
          for (const TopkExchange exchange : {TopkExchange::all_gather, TopkExchange::threshold}) {
            ContextShards shards;
            shards.ranks = R;
            shards.layout = layout;
            shards.page = 8;
            EXPECT_EQ(sharded(rows, policy, shards, exchange), want)
                << "N=" << N << " k=" << policy.k << " R=" << R << " round_robin="
                << (layout == ContextShards::Layout::round_robin) << " " << topk_exchange_name(exchange);
          }
        }
      }
    }
  }
}

// The GPU plan (cuda_context_parallel.cu) run on the CPU: its shard map, its per-element merge and assembly rules
// (the same functions the kernels call) around the CPU select_topk, which select_topk_cuda equals bit for bit.
// Each rank keeps the best k of its scores with the non-free keys set to NaN; the merged row is k - fill leading
// +inf, then every rank's candidates in position order; its top-k gives the best fill, ties to the lower position.
std::vector<std::int32_t> gpu_plan(const Rows& r, const SelectionPolicy& policy, const ContextShards& shards) {
  using cuda_kernels::CandidateEntry;
  const std::int64_t R = shards.ranks, rows = r.T * r.G, k = policy.k, width = policy.width();
  const std::int64_t span = std::max<std::int64_t>(1, (r.N + R - 1) / R);
  SelectionPolicy candidates;
  candidates.k = k;
  std::vector<CandidateEntry> received(static_cast<std::size_t>(R * rows * k), CandidateEntry{0.0f, -1});
  for (std::int64_t rank = 0; rank < R; ++rank) {
    const cuda_kernels::ShardMap map{shards.layout == ContextShards::Layout::round_robin, R, rank, shards.page, span};
    const std::vector<std::int32_t> mine = shards.positions(rank, r.N);
    const auto n_local = static_cast<std::int64_t>(mine.size());
    EXPECT_EQ(context_shard_size(shards, rank, r.N), n_local);
    for (std::int64_t j = 0; j < n_local; ++j) {
      EXPECT_EQ(map.global(j), mine[static_cast<std::size_t>(j)]);
      EXPECT_EQ(map.local(mine[static_cast<std::size_t>(j)]), j);
    }
    for (std::int64_t s = 0; s < r.N; ++s) {
      if (!std::binary_search(mine.begin(), mine.end(), static_cast<std::int32_t>(s))) {
        EXPECT_EQ(map.local(s), -1) << "position " << s << " is not rank " << rank << "'s";
      }
    }
    if (n_local == 0) continue;
    std::vector<float> masked(static_cast<std::size_t>(rows * n_local));
    for (std::int64_t row = 0; row < rows; ++row) {
      const SelectionRowPlan plan = SelectionRowPlan::make(policy, r.positions[static_cast<std::size_t>(row / r.G)], r.N);
      for (std::int64_t j = 0; j < n_local; ++j) {
        const std::int64_t s = map.global(j);
        masked[static_cast<std::size_t>(row * n_local + j)] =
            s >= plan.sink_end && s < plan.local_begin ? r.scores[static_cast<std::size_t>(row * r.N + s)]
                                                       : std::numeric_limits<float>::quiet_NaN();
      }
    }
    std::vector<std::int32_t> last(static_cast<std::size_t>(r.T), static_cast<std::int32_t>(n_local - 1));
    std::vector<std::int32_t> chosen(static_cast<std::size_t>(rows * k));
    select_topk(TensorView(masked.data(), DType::fp32, {r.T, r.G, n_local}), TensorView(last.data(), DType::int32, {r.T}),
                candidates, TensorView(chosen.data(), DType::int32, {r.T, r.G, k}));
    for (std::int64_t i = 0; i < rows * k; ++i) {
      const std::int32_t column = chosen[static_cast<std::size_t>(i)];
      if (column < 0) continue;
      received[static_cast<std::size_t>(rank * rows * k + i)] = {
          masked[static_cast<std::size_t>((i / k) * n_local + column)], static_cast<std::int32_t>(map.global(column))};
    }
  }
  const std::int64_t columns = (R + 1) * k;
  std::vector<float> merged(static_cast<std::size_t>(rows * columns), std::numeric_limits<float>::quiet_NaN());
  std::vector<std::int32_t> merged_positions(static_cast<std::size_t>(rows * R * k), -1);
  std::vector<SelectionRowPlan> plans;
  for (std::int64_t row = 0; row < rows; ++row) {
    plans.push_back(SelectionRowPlan::make(policy, r.positions[static_cast<std::size_t>(row / r.G)], r.N));
    for (std::int64_t j = 0; j < k - plans.back().fill; ++j) {
      merged[static_cast<std::size_t>(row * columns + j)] = std::numeric_limits<float>::infinity();
    }
    for (std::int64_t rank = 0; rank < R; ++rank) {
      for (std::int64_t i = 0; i < k; ++i) {
        const CandidateEntry c = received[static_cast<std::size_t>((rank * rows + row) * k + i)];
        if (c.position < 0) continue;
        const std::int64_t slot = cuda_kernels::merged_slot(received.data(), R, rows, row, k, rank, i, c.position);
        EXPECT_TRUE(slot >= 0 && slot < R * k && merged_positions[static_cast<std::size_t>(row * R * k + slot)] == -1)
            << "slot " << slot << " of candidate " << i << " of rank " << rank;
        merged[static_cast<std::size_t>(row * columns + k + slot)] = c.score;
        merged_positions[static_cast<std::size_t>(row * R * k + slot)] = c.position;
      }
    }
  }
  std::vector<std::int32_t> last(static_cast<std::size_t>(r.T), static_cast<std::int32_t>(columns - 1));
  std::vector<std::int32_t> chosen(static_cast<std::size_t>(rows * k));
  select_topk(TensorView(merged.data(), DType::fp32, {r.T, r.G, columns}), TensorView(last.data(), DType::int32, {r.T}),
              candidates, TensorView(chosen.data(), DType::int32, {r.T, r.G, k}));
  std::vector<std::int32_t> out(static_cast<std::size_t>(rows * width));
  for (std::int64_t row = 0; row < rows; ++row) {
    for (std::int64_t e = 0; e < width; ++e) {
      out[static_cast<std::size_t>(row * width + e)] = cuda_kernels::assembled_entry(
          plans[static_cast<std::size_t>(row)], e, chosen.data() + row * k, k, merged_positions.data() + row * R * k);
    }
  }
  return out;
}

TEST(ContextParallel, GpuPlanEqualsSelectTopkBitForBit) {
  std::uint64_t seed = 100;
  const SelectionPolicy policies[] = {
      {.k = 16},
      {.k = 40, .n_sink = 3, .n_local = 5},
      {.k = 7, .n_sink = 2, .n_local = 4, .kept_on_top = true},
      {.k = 500},
  };
  for (const std::int64_t N : {1, 37, 300}) {
    Rows rows = make_rows(7, 2, N, seed++);
    for (std::size_t i = 0; i < rows.scores.size(); i += 11) rows.scores[i] = std::numeric_limits<float>::infinity();
    for (const SelectionPolicy& policy : policies) {
      const std::vector<std::int32_t> want = single(rows, policy);
      for (const std::int64_t R : {1, 2, 3, 8}) {
        for (const auto layout : {ContextShards::Layout::contiguous, ContextShards::Layout::round_robin}) {
          const ContextShards shards{R, layout, 8};
          SCOPED_TRACE("N=" + std::to_string(N) + " k=" + std::to_string(policy.k) + " R=" + std::to_string(R) +
                       " round_robin=" + std::to_string(layout == ContextShards::Layout::round_robin));
          EXPECT_EQ(gpu_plan(rows, policy, shards), want);
        }
      }
    }
  }
}

TEST(ContextParallel, ThresholdExchangeReceivesLessThanAllGather) {
  const Rows rows = make_rows(4, 1, 8192, 42);
  SelectionPolicy policy;
  policy.k = 256;
  ContextShards shards;
  shards.ranks = 8;
  shards.layout = ContextShards::Layout::round_robin;
  std::vector<ExchangeCost> gather, threshold;
  const auto a = sharded(rows, policy, shards, TopkExchange::all_gather, &gather);
  const auto b = sharded(rows, policy, shards, TopkExchange::threshold, &threshold);
  EXPECT_EQ(a, b);
  ASSERT_EQ(gather.size(), 8u);
  for (std::size_t r = 0; r < 8; ++r) {
    EXPECT_EQ(gather[r].collectives, 1);
    EXPECT_EQ(gather[r].bytes_received, 8 * 4 * 256 * 8);  // R ranks x T rows x k candidates x 8 bytes
    EXPECT_EQ(threshold[r].collectives, 3);
    EXPECT_LT(threshold[r].bytes_received, gather[r].bytes_received / 2);
  }
}

TEST(ContextParallel, AttentionMergedByLogSumExpEqualsTheWholeCache) {
  RandomStream rng(9);
  const std::int64_t T = 5, Hq = 8, Hkv = 2, D = 32, Dv = 24, N = 203;
  std::vector<float> q(static_cast<std::size_t>(T * Hq * D)), k(static_cast<std::size_t>(N * Hkv * D)),
      v(static_cast<std::size_t>(N * Hkv * Dv));
  rng.fill_normal(q, 0.0, 1.0);
  rng.fill_normal(k, 0.0, 1.0);
  rng.fill_normal(v, 0.0, 1.0);
  std::vector<std::int32_t> positions = {202, 150, 3, 0, 99};
  AttentionInputs inputs{TensorView(q.data(), DType::fp32, {T, Hq, D}), TensorView(k.data(), DType::fp32, {N, Hkv, D}),
                         TensorView(v.data(), DType::fp32, {N, Hkv, Dv}),
                         TensorView(positions.data(), DType::int32, {T}), 0.0};
  SelectionPolicy policy;
  policy.k = 40;
  policy.n_sink = 2;
  std::vector<std::int32_t> selection(static_cast<std::size_t>(T * Hkv * policy.k));
  const TensorView sel(selection.data(), DType::int32, {T, Hkv, policy.k});
  exact_topk(inputs, policy, sel);
  std::vector<float> want(static_cast<std::size_t>(T * Hq * Dv)), want_lse(static_cast<std::size_t>(T * Hq));
  sparse_attention(inputs, sel, Granularity::per_kv_head, TensorView(want.data(), DType::fp32, {T, Hq, Dv}),
                   TensorView(want_lse.data(), DType::fp32, {T, Hq}));
  for (const std::int64_t R : {1, 3, 8}) {
    for (const auto layout : {ContextShards::Layout::contiguous, ContextShards::Layout::round_robin}) {
      ContextShards shards;
      shards.ranks = R;
      shards.layout = layout;
      shards.page = 16;
      std::vector<float> got(want.size(), 9.0f), got_lse(want_lse.size(), 9.0f);
      sparse_attention_simulated(inputs, sel, Granularity::per_kv_head, shards,
                                 TensorView(got.data(), DType::fp32, {T, Hq, Dv}),
                                 TensorView(got_lse.data(), DType::fp32, {T, Hq}));
      for (std::size_t i = 0; i < want.size(); ++i) ASSERT_NEAR(got[i], want[i], 2e-5) << "R=" << R << " at " << i;
      for (std::size_t i = 0; i < want_lse.size(); ++i) ASSERT_NEAR(got_lse[i], want_lse[i], 2e-5) << "R=" << R;
    }
  }
}

TEST(ContextParallel, ShardsCoverEveryPositionOnce) {
  for (const auto layout : {ContextShards::Layout::contiguous, ContextShards::Layout::round_robin}) {
    ContextShards shards;
    shards.ranks = 5;
    shards.layout = layout;
    shards.page = 7;
    std::vector<int> seen(101, 0);
    for (std::int64_t r = 0; r < 5; ++r) {
      for (const std::int32_t s : shards.positions(r, 101)) {
        ++seen[static_cast<std::size_t>(s)];
        EXPECT_EQ(shards.owner(s, 101), r);
      }
    }
    for (const int c : seen) EXPECT_EQ(c, 1);
  }
}

TEST(ContextParallel, BadInputThrowsNamingTheArgument) {
  SimulatedRanks group(2);
  std::vector<float> scores(10);
  std::vector<std::int32_t> mine = {0, 2, 1, 3, 4, 5, 6, 7, 8, 9};  // not ascending
  std::vector<std::int32_t> positions = {9};
  std::vector<std::int32_t> out(4);
  SelectionPolicy policy;
  policy.k = 4;
  try {
    select_topk_context_parallel(group, 0, TensorView(scores.data(), DType::fp32, {1, 1, 10}),
                                 TensorView(mine.data(), DType::int32, {10}),
                                 TensorView(positions.data(), DType::int32, {1}), 10, policy,
                                 TopkExchange::all_gather, TensorView(out.data(), DType::int32, {1, 1, 4}));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("local_positions"), std::string::npos) << e.what();
  }
  EXPECT_THROW(parse_topk_exchange("ring"), Error);
  ContextShards shards;
  shards.ranks = 0;
  EXPECT_THROW(shards.validate("test"), Error);
  // A rank that throws releases the others: run() rethrows its error, not theirs.
  SimulatedRanks four(4);
  try {
    four.run([&](int r) {
      if (r == 2) detail::throw_error("rank_two", "broken");
      std::int32_t x = r, all[4];
      four.all_gather(r, &x, 4, all);
    });
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("broken"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace keysel
