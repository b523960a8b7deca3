// The pipeline selectors (block top-k, controlled fidelity, hybrid) and the baselines, through the one Selector
// interface: valid selections on awkward shapes and policies, block size 1 = exact, precision hit exactly,
// k' = N = exact, bad input; and a batch of sequences of different lengths through select + sparse_attention.
#include "keysel/indexer/selectors.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "keysel/attention/reference.h"
#include "keysel/attention/sparse_attention.h"
#include "keysel/core/random.h"
#include "keysel/indexer/topk.h"
#include "keysel/recall/metrics.h"

namespace keysel {
namespace {

struct Workload {
  std::int64_t T, N, Hq, Hkv, D;
  std::vector<float> q, k, v;
  std::vector<std::int32_t> positions;

  AttentionInputs inputs() const {
    AttentionInputs in;
    in.q = TensorView(q.data(), DType::fp32, {T, Hq, D});
    in.k = TensorView(k.data(), DType::fp32, {N, Hkv, D});
    in.v = TensorView(v.data(), DType::fp32, {N, Hkv, D});
    in.positions = TensorView(positions.data(), DType::int32, {T});
    return in;
  }
  std::int64_t allowed(std::int64_t t) const {
    return std::min<std::int64_t>(positions[static_cast<std::size_t>(t)] + 1, N);
  }
};

Workload make_workload(std::uint64_t seed, std::int64_t N, std::int64_t Hq, std::int64_t Hkv, std::int64_t D,
                       std::vector<std::int32_t> positions) {
  Workload w{static_cast<std::int64_t>(positions.size()), N, Hq, Hkv, D, {}, {}, {}, std::move(positions)};
  RandomStream rng(seed);
  w.q.resize(static_cast<std::size_t>(w.T * Hq * D));
  w.k.resize(static_cast<std::size_t>(N * Hkv * D));
  w.v.resize(static_cast<std::size_t>(N * Hkv * D));
  rng.fill_normal(w.q, 0.0, 2.0);  // peaked attention, as in real heads
  rng.fill_normal(w.k);
  rng.fill_normal(w.v);
  return w;
}

/// The awkward workload most tests use: GQA with groups of 3, odd D, positions short, long and beyond N.
Workload awkward(std::uint64_t seed) { return make_workload(seed, 157, 6, 2, 11, {156, 3, 80, 400, 20}); }

std::vector<std::int32_t> run_selector(Selector& selector, const Workload& w, const SelectionPolicy& policy) {
  const std::int64_t groups = group_count(policy.granularity, w.Hq, w.Hkv);
  std::vector<std::int32_t> sel(static_cast<std::size_t>(w.T * groups * policy.width()), -7);
  selector.select(w.inputs(), policy, TensorView(sel.data(), DType::int32, {w.T, groups, policy.width()}));
  return sel;
}

std::vector<std::int32_t> run_exact(const Workload& w, const SelectionPolicy& policy) {
  const std::int64_t groups = group_count(policy.granularity, w.Hq, w.Hkv);
  std::vector<std::int32_t> sel(static_cast<std::size_t>(w.T * groups * policy.width()));
  exact_topk(w.inputs(), policy, TensorView(sel.data(), DType::int32, {w.T, groups, policy.width()}));
  return sel;
}

/// Valid: distinct allowed keys ascending, kept keys present, min(width, allowed) keys then -1 padding.
void expect_valid(const std::vector<std::int32_t>& sel, const Workload& w, const SelectionPolicy& policy,
                  const std::string& what) {
  const std::int64_t groups = group_count(policy.granularity, w.Hq, w.Hkv);
  const std::int64_t width = policy.width();
  validate_selection("test", TensorView(sel.data(), DType::int32, {w.T, groups, width}), "selection",
                     w.inputs().positions, w.N, groups);
  for (std::int64_t t = 0; t < w.T; ++t) {
    const std::int64_t allowed = w.allowed(t);
    for (std::int64_t g = 0; g < groups; ++g) {
      const std::int32_t* row = sel.data() + (t * groups + g) * width;
      const std::int64_t count = std::find(row, row + width, -1) - row;
      EXPECT_EQ(count, std::min(width, allowed)) << what << " t=" << t << " g=" << g;
      EXPECT_TRUE(std::is_sorted(row, row + count)) << what;
      const std::set<std::int32_t> keys(row, row + count);
      for (std::int64_t s = 0; s < std::min(policy.n_sink, allowed); ++s) {
        EXPECT_TRUE(keys.count(static_cast<std::int32_t>(s))) << what << " sink " << s << " t=" << t;
      }
      for (std::int64_t s = std::max<std::int64_t>(0, allowed - policy.n_local); s < allowed; ++s) {
        EXPECT_TRUE(keys.count(static_cast<std::int32_t>(s))) << what << " local " << s << " t=" << t;
      }
    }
  }
}

std::vector<SelectionPolicy> policies() {
  std::vector<SelectionPolicy> out;
  for (const Granularity g : {Granularity::per_head, Granularity::per_kv_head, Granularity::per_token}) {
    out.push_back({12, g, 0, 0, false});
    out.push_back({12, g, 2, 3, false});
    out.push_back({7, g, 1, 2, true});
    out.push_back({40, g, 4, 0, false});
  }
  return out;
}

std::vector<std::unique_ptr<Selector>> all_selectors() {
  std::vector<std::unique_ptr<Selector>> s;
  s.push_back(make_exact_selector());
  s.push_back(make_random_selector(3));
  s.push_back(make_streaming_selector(2));
  s.push_back(make_block_topk_selector({4, 1.0}));
  s.push_back(make_block_topk_selector({8, 2.5}));
  s.push_back(make_block_topk_selector({1, 1.0}));
  s.push_back(make_fidelity_selector({0.5, FidelityFill::random, 11}));
  s.push_back(make_fidelity_selector({0.25, FidelityFill::next_ranked, 11}));
  s.push_back(make_hybrid_selector(make_random_selector(5), 30));
  s.push_back(make_hybrid_selector(make_block_topk_selector({4, 1.0}), 24));
  return s;
}

TEST(PipelineSelectors, EverySelectorWritesAValidSelection) {
  const Workload w = awkward(1);
  for (auto& selector : all_selectors()) {
    for (const SelectionPolicy& policy : policies()) {
      const std::string what = selector->name() + " " + std::string(granularity_name(policy.granularity)) +
                               " k=" + std::to_string(policy.k);
      expect_valid(run_selector(*selector, w, policy), w, policy, what);
    }
  }
}

TEST(PipelineSelectors, BlockTopKWithBlockSizeOneEqualsExact) {
  for (const std::uint64_t seed : {2u, 3u}) {
    const Workload w = awkward(seed);
    auto block = make_block_topk_selector({1, 1.0});
    for (const SelectionPolicy& policy : policies()) {
      EXPECT_EQ(run_selector(*block, w, policy), run_exact(w, policy))
          << granularity_name(policy.granularity) << " k=" << policy.k << " seed " << seed;
    }
  }
}

TEST(PipelineSelectors, BlockTopKFindsTheBlocksThatHoldTheMass) {
  // Keys of blocks 3 and 9 (of 8 keys) point along the query: those blocks must be chosen.
  Workload w = make_workload(4, 128, 1, 1, 8, {127});
  for (std::int64_t d = 0; d < 8; ++d) w.q[static_cast<std::size_t>(d)] = d == 0 ? 4.0f : 0.0f;
  for (std::int64_t s = 0; s < 128; ++s) {
    const bool hot = s / 8 == 3 || s / 8 == 9;
    w.k[static_cast<std::size_t>(s * 8)] = hot ? 3.0f : -1.0f;
  }
  auto block = make_block_topk_selector({8, 1.0});
  const SelectionPolicy policy{16, Granularity::per_head, 0, 0, false};
  std::vector<std::int32_t> want;
  for (std::int32_t s = 24; s < 32; ++s) want.push_back(s);
  for (std::int32_t s = 72; s < 80; ++s) want.push_back(s);
  EXPECT_EQ(run_selector(*block, w, policy), want);
}

TEST(PipelineSelectors, BlockTopKReusedSummariesFollowAGrowingCache) {
  // One cache buffer, views of a growing N (decode): reusing the summaries gives what fresh ones give.
  const Workload full = make_workload(12, 200, 4, 2, 16, {199});
  auto reusing = make_block_topk_selector({8, 2.0, true});
  const SelectionPolicy policy{24, Granularity::per_kv_head, 2, 4, false};
  for (const std::int64_t n : {60, 61, 64, 65, 130, 200}) {
    Workload w = full;
    w.N = n;
    w.positions = {static_cast<std::int32_t>(n - 1)};
    AttentionInputs in = w.inputs();
    in.k = TensorView(full.k.data(), DType::fp32, {n, 2, 16});  // the same memory every step
    std::vector<std::int32_t> got(2 * 24), want(2 * 24);
    reusing->select(in, policy, TensorView(got.data(), DType::int32, {1, 2, 24}));
    make_block_topk_selector({8, 2.0, false})->select(in, policy, TensorView(want.data(), DType::int32, {1, 2, 24}));
    EXPECT_EQ(got, want) << "N = " << n;
  }
}

TEST(PipelineSelectors, ControlledFidelityHitsItsPrecisionExactly) {
  const Workload w = make_workload(5, 300, 8, 2, 16, {299, 150, 280, 99});
  for (const Granularity gr : {Granularity::per_head, Granularity::per_kv_head, Granularity::per_token}) {
    const ExactReference reference(w.inputs(), gr);
    for (const SelectionPolicy policy : {SelectionPolicy{40, gr, 0, 0, false}, SelectionPolicy{40, gr, 2, 4, false}}) {
      for (const double p : {0.0, 0.3, 0.5, 0.77, 1.0}) {
        for (const FidelityFill fill : {FidelityFill::random, FidelityFill::next_ranked}) {
          auto selector = make_fidelity_selector({p, fill, 17});
          const auto sel = run_selector(*selector, w, policy);
          expect_valid(sel, w, policy, selector->name());
          const auto metrics = reference.evaluate(
              TensorView(sel.data(), DType::int32, {w.T, reference.groups(), policy.width()}), policy.k);
          for (std::int64_t t = 0; t < w.T; ++t) {
            for (std::int64_t g = 0; g < reference.groups(); ++g) {
              // Kept keys stay in every row: those inside E count as hits, so p below that share is raised
              // to it, and those outside E take slots, so p above the rest is lowered.
              const auto pbar = reference.pbar(t, g);
              const std::int64_t allowed = w.allowed(t);
              std::vector<double> sorted(pbar.begin(), pbar.begin() + allowed);
              std::sort(sorted.begin(), sorted.end(), std::greater<>());
              const double threshold = sorted[39];
              const auto in_e = [&](std::int64_t s) { return pbar[static_cast<std::size_t>(s)] >= threshold; };
              std::int64_t kept_in = 0, kept_out = 0;
              for (std::int64_t s = 0; s < allowed; ++s) {
                const bool kept = s < policy.n_sink || s >= allowed - policy.n_local;
                if (kept) (in_e(s) ? kept_in : kept_out) += 1;
              }
              const double hits = std::clamp<double>(std::round(p * 40.0), static_cast<double>(kept_in),
                                                     static_cast<double>(40 - kept_out));
              EXPECT_DOUBLE_EQ(metrics[static_cast<std::size_t>(t * reference.groups() + g)].recall, hits / 40.0)
                  << selector->name() << " " << granularity_name(gr) << " t=" << t << " g=" << g;
              if (policy.n_sink + policy.n_local == 0) {
                EXPECT_DOUBLE_EQ(metrics[static_cast<std::size_t>(t * reference.groups() + g)].recall,
                                 std::round(p * 40.0) / 40.0);
              }
            }
          }
        }
      }
    }
  }
}

TEST(PipelineSelectors, ControlledFidelityNextRankedFillsWithTheFollowingRanks) {
  const Workload w = make_workload(6, 200, 4, 4, 16, {199});
  const SelectionPolicy policy{20, Granularity::per_head, 0, 0, false};
  auto selector = make_fidelity_selector({0.0, FidelityFill::next_ranked, 1});
  const auto sel = run_selector(*selector, w, policy);
  // With p = 0 the row is exactly ranks 21..40 of pbar, i.e. the exact top-40 minus the exact top-20.
  const auto top20 = run_exact(w, policy);
  SelectionPolicy wide = policy;
  wide.k = 40;
  const auto top40 = run_exact(w, wide);
  for (std::int64_t g = 0; g < 4; ++g) {
    std::vector<std::int32_t> want;
    std::set_difference(top40.begin() + g * 40, top40.begin() + (g + 1) * 40, top20.begin() + g * 20,
                        top20.begin() + (g + 1) * 20, std::back_inserter(want));
    EXPECT_EQ(std::vector<std::int32_t>(sel.begin() + g * 20, sel.begin() + (g + 1) * 20), want) << g;
  }
}

TEST(PipelineSelectors, ControlledFidelityDropLowestKeepsTheBestRanked) {
  // drop = lowest: the part of the exact top-k a row keeps is its best round(p k) keys, i.e. the exact
  // top-round(p k); the rest of the row lies outside the top-k (random or next-ranked fill).
  const Workload w = make_workload(9, 240, 6, 2, 16, {239, 120, 77});
  for (const Granularity gr : {Granularity::per_head, Granularity::per_kv_head, Granularity::per_token}) {
    const SelectionPolicy policy{24, gr, 0, 0, false};
    const auto top = run_exact(w, policy);
    const std::int64_t groups = group_count(gr, 6, 2);
    for (const double p : {0.0, 0.25, 0.5, 0.8, 1.0}) {
      const auto kept = static_cast<std::int64_t>(std::llround(p * 24.0));
      SelectionPolicy best_policy = policy;
      best_policy.k = std::max<std::int64_t>(kept, 1);
      const auto best = run_exact(w, best_policy);
      for (const FidelityFill fill : {FidelityFill::random, FidelityFill::next_ranked}) {
        FidelityOptions options{p, fill, 5};
        options.drop = FidelityDrop::lowest;
        auto selector = make_fidelity_selector(options);
        EXPECT_NE(selector->name().find("droplowest"), std::string::npos);
        const auto sel = run_selector(*selector, w, policy);
        expect_valid(sel, w, policy, selector->name());
        for (std::int64_t row = 0; row < w.T * groups; ++row) {
          std::vector<std::int32_t> row_sel(sel.begin() + row * 24, sel.begin() + (row + 1) * 24);
          std::vector<std::int32_t> row_top(top.begin() + row * 24, top.begin() + (row + 1) * 24);
          std::sort(row_sel.begin(), row_sel.end());
          std::sort(row_top.begin(), row_top.end());
          std::vector<std::int32_t> in_top;
          std::set_intersection(row_sel.begin(), row_sel.end(), row_top.begin(), row_top.end(),
                                std::back_inserter(in_top));
          std::vector<std::int32_t> want;
          if (kept > 0) {
            want.assign(best.begin() + row * best_policy.k, best.begin() + (row + 1) * best_policy.k);
            std::sort(want.begin(), want.end());
          }
          EXPECT_EQ(in_top, want) << selector->name() << " " << granularity_name(gr) << " row " << row;
        }
      }
      // The random protocol keeps a random part of the top-k: at p = 0.5 some row keeps another half.
      if (p == 0.5) {
        auto random_drop = make_fidelity_selector({p, FidelityFill::random, 5});
        const auto sel = run_selector(*random_drop, w, policy);
        bool differs = false;
        for (std::int64_t row = 0; row < w.T * groups && !differs; ++row) {
          std::vector<std::int32_t> row_sel(sel.begin() + row * 24, sel.begin() + (row + 1) * 24);
          std::vector<std::int32_t> want(best.begin() + row * 12, best.begin() + (row + 1) * 12);
          std::sort(row_sel.begin(), row_sel.end());
          std::sort(want.begin(), want.end());
          differs = !std::includes(row_sel.begin(), row_sel.end(), want.begin(), want.end());
        }
        EXPECT_TRUE(differs);
      }
    }
  }
}

TEST(PipelineSelectors, HybridWithAllKeysAsCandidatesEqualsExact) {
  const Workload w = awkward(7);
  auto hybrid = make_hybrid_selector(make_random_selector(1), 1000);
  for (const SelectionPolicy& policy : policies()) {
    EXPECT_EQ(run_selector(*hybrid, w, policy), run_exact(w, policy))
        << granularity_name(policy.granularity) << " k=" << policy.k;
  }
}

TEST(PipelineSelectors, HybridReRanksWithAGivenScore) {
  const Workload w = awkward(8);
  // Re-rank by lowest position: from the streaming candidates (sinks + recent keys) the earliest free keys win.
  auto hybrid = make_hybrid_selector(
      make_streaming_selector(0), 20,
      [](std::int64_t, std::int64_t, std::span<const std::int32_t> keys, std::span<double> scores) {
        for (std::size_t i = 0; i < keys.size(); ++i) scores[i] = -static_cast<double>(keys[i]);
      },
      "hybrid-test");
  EXPECT_EQ(hybrid->name(), "hybrid-test");
  const SelectionPolicy policy{5, Granularity::per_token, 0, 0, false};
  const auto sel = run_selector(*hybrid, w, policy);
  // Token 0 (allowed 157): candidates are keys 137..156; the 5 lowest are 137..141.
  EXPECT_EQ(std::vector<std::int32_t>(sel.begin(), sel.begin() + 5), (std::vector<std::int32_t>{137, 138, 139, 140, 141}));
}

// Parameters at the edge of int64 or double are meaningful (one block of every key; every free key a
// candidate) and must give what their sane equivalents give, not overflow (docs/reliability.md).
TEST(PipelineSelectors, HugeBlockSizeOversampleAndCandidateCountEqualTheirSaneEquivalents) {
  const Workload w = awkward(12);
  for (const SelectionPolicy& policy : policies()) {
    const std::string what = std::string(granularity_name(policy.granularity)) + " k=" + std::to_string(policy.k);
    // A block larger than the cache is one block of every key, as a block of exactly N keys.
    auto huge_block = make_block_topk_selector({INT64_MAX, 1.0});
    auto cache_block = make_block_topk_selector({w.N, 1.0});
    EXPECT_EQ(run_selector(*huge_block, w, policy), run_selector(*cache_block, w, policy)) << what;
    // Oversampling past every free key makes every free key a candidate, re-ranked exactly: the exact top-k.
    auto huge_oversample = make_block_topk_selector({4, 1e308});
    EXPECT_EQ(run_selector(*huge_oversample, w, policy), run_exact(w, policy)) << what;
    // k' above N candidates is k' = N.
    auto huge_pool = make_hybrid_selector(make_random_selector(5), INT64_MAX / 2);
    auto cache_pool = make_hybrid_selector(make_random_selector(5), w.N);
    EXPECT_EQ(run_selector(*huge_pool, w, policy), run_selector(*cache_pool, w, policy)) << what;
  }
}

TEST(PipelineSelectors, KeptKeyCountsThatOverflowAreRefusedWritingNothing) {
  const Workload w = awkward(13);
  for (auto& selector : all_selectors()) {
    for (const bool on_top : {false, true}) {
      // n_sink + n_local wraps int64 to a small number that would pass a "kept <= k" check.
      const SelectionPolicy wrap{4, Granularity::per_kv_head, INT64_MAX, 2, on_top};
      std::vector<std::int32_t> sel(static_cast<std::size_t>(w.T * 2 * 4), -7);
      try {
        selector->select(w.inputs(), wrap, TensorView(sel.data(), DType::int32, {w.T, 2, 4}));
        ADD_FAILURE() << selector->name() << ": n_sink = INT64_MAX accepted";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("policy.n_sink"), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("9223372036854775807"), std::string::npos) << e.what();
      }
      for (const std::int32_t x : sel) ASSERT_EQ(x, -7) << selector->name();
    }
  }
}

TEST(PipelineSelectors, RejectBadArgumentsWritingNothing) {
  EXPECT_THROW(make_block_topk_selector({0, 1.0}), Error);
  EXPECT_THROW(make_block_topk_selector({4, 0.5}), Error);
  EXPECT_THROW(make_fidelity_selector({1.5, FidelityFill::random, 0}), Error);
  EXPECT_THROW(make_fidelity_selector({-0.1, FidelityFill::random, 0}), Error);
  EXPECT_THROW(make_hybrid_selector(nullptr, 10), Error);
  EXPECT_THROW(make_hybrid_selector(make_exact_selector(), 0), Error);

  const Workload w = awkward(9);
  for (auto& selector : all_selectors()) {
    // k = 0.
    SelectionPolicy zero{0, Granularity::per_kv_head, 0, 0, false};
    std::vector<std::int32_t> sel(static_cast<std::size_t>(w.T * 2 * 1), -7);
    try {
      selector->select(w.inputs(), zero, TensorView(sel.data(), DType::int32, {w.T, 2, 0}));
      ADD_FAILURE() << selector->name() << ": no error for k = 0";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("policy.k"), std::string::npos) << e.what();
    }
    // Wrong group count for the granularity (per_head needs 6 groups).
    const SelectionPolicy policy{4, Granularity::per_head, 0, 0, false};
    std::vector<std::int32_t> small(static_cast<std::size_t>(w.T * 2 * 4), -7);
    EXPECT_THROW(selector->select(w.inputs(), policy, TensorView(small.data(), DType::int32, {w.T, 2, 4})), Error)
        << selector->name();
    for (const std::int32_t x : small) ASSERT_EQ(x, -7) << selector->name();
    // Kept keys beyond k.
    const SelectionPolicy too_many{4, Granularity::per_kv_head, 3, 3, false};
    EXPECT_THROW(selector->select(w.inputs(), too_many, TensorView(small.data(), DType::int32, {w.T, 2, 4})), Error)
        << selector->name();
    for (const std::int32_t x : small) ASSERT_EQ(x, -7) << selector->name();
  }
}

// A batch of sequences with different lengths is a loop over sequences, each with its own views: this is
// the pattern docs/attention.md describes.
TEST(PipelineSelectors, BatchOfSequencesWithDifferentLengths) {
  const std::vector<std::int64_t> lengths = {1, 37, 300, 129};
  auto selector = make_block_topk_selector({4, 2.0});
  const SelectionPolicy policy{32, Granularity::per_kv_head, 2, 8, false};
  for (std::size_t i = 0; i < lengths.size(); ++i) {
    const std::int64_t n = lengths[i];
    const Workload w = make_workload(100 + i, n, 8, 2, 32, {static_cast<std::int32_t>(n - 1)});
    std::vector<std::int32_t> sel(static_cast<std::size_t>(2 * policy.width()));
    const TensorView selection(sel.data(), DType::int32, {1, 2, policy.width()});
    selector->select(w.inputs(), policy, selection);
    std::vector<float> out(8 * 32), lse(8);
    sparse_attention(w.inputs(), selection, policy.granularity, TensorView(out.data(), DType::fp32, {1, 8, 32}),
                     TensorView(lse.data(), DType::fp32, {1, 8}));
    std::vector<double> want(8 * 32), want_lse(8);
    sparse_attention_reference(w.inputs(), selection, policy.granularity,
                               TensorView(want.data(), DType::fp64, {1, 8, 32}),
                               TensorView(want_lse.data(), DType::fp64, {1, 8}));
    for (std::size_t j = 0; j < out.size(); ++j) ASSERT_NEAR(out[j], want[j], 1e-4) << "sequence " << i;
    for (std::size_t j = 0; j < lse.size(); ++j) ASSERT_NEAR(lse[j], want_lse[j], 1e-4) << "sequence " << i;
  }
}

}  // namespace
}  // namespace keysel
