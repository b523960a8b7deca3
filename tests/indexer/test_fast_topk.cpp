// fast_select_topk, StreamingTopK and inner_product_topk against the references: select_topk (equal
// selections, ties and NaN included, since the tie rule is fixed) and a double-precision brute-force
// inner-product search; every SIMD level this CPU has against scalar; bad input (SPEC §2, §6).
#include "keysel/indexer/fast_topk.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "keysel/core/build_config.h"
#include "keysel/core/random.h"
#include "keysel/core/threads.h"
#include "keysel/indexer/simd.h"
#include "keysel/indexer/topk.h"

#if KEYSEL_FAISS
#include <faiss/IndexFlat.h>
#endif

namespace keysel {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

std::vector<SimdLevel> supported_levels() {
  std::vector<SimdLevel> levels;
  for (SimdLevel level : {SimdLevel::scalar, SimdLevel::avx2, SimdLevel::avx512}) {
    if (simd_level_supported(level)) levels.push_back(level);
  }
  return levels;
}

void expect_error_naming(const std::function<void()>& call, const std::string& argument) {
  try {
    call();
    ADD_FAILURE() << "expected keysel::Error naming '" << argument << "'";
  } catch (const Error& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find("'" + argument + "'"), std::string::npos) << message;
  } catch (...) {
    ADD_FAILURE() << "expected keysel::Error, got another exception";
  }
}

enum class ScoreKind { distinct, ties, special };

/// Scores [T, G, N]: distinct normals, heavy ties (a few values, +0 and -0 mixed), or normals sprinkled with
/// NaN, +inf and -inf (and a whole NaN row).
std::vector<float> make_scores(std::int64_t count, ScoreKind kind, std::uint64_t seed) {
  RandomStream random(seed);
  std::vector<float> scores(static_cast<std::size_t>(count));
  for (float& score : scores) {
    const double u = random.uniform();
    switch (kind) {
      case ScoreKind::distinct: score = static_cast<float>(random.normal()); break;
      case ScoreKind::ties: {
        const int level = static_cast<int>(random.uniform_int(6));
        score = level == 0 ? (u < 0.5 ? -0.0f : 0.0f) : static_cast<float>(level - 3);
        break;
      }
      case ScoreKind::special:
        score = u < 0.05 ? kNaN : u < 0.08 ? kInf : u < 0.12 ? -kInf : static_cast<float>(random.normal());
        break;
    }
  }
  return scores;
}

struct Case {
  std::int64_t tokens, groups, keys, k, n_sink, n_local;
  bool kept_on_top;
};

void expect_same_as_reference(const Case& c, ScoreKind kind, std::uint64_t seed) {
  SCOPED_TRACE("T=" + std::to_string(c.tokens) + " G=" + std::to_string(c.groups) + " N=" + std::to_string(c.keys) +
               " k=" + std::to_string(c.k) + " sink=" + std::to_string(c.n_sink) + " local=" +
               std::to_string(c.n_local) + " on_top=" + std::to_string(c.kept_on_top) + " kind=" +
               std::to_string(static_cast<int>(kind)));
  std::vector<float> scores = make_scores(c.tokens * c.groups * c.keys, kind, seed);
  if (kind == ScoreKind::special && c.keys > 0) {
    std::fill(scores.begin(), scores.begin() + c.keys, kNaN);  // the first row has no usable score
  }
  RandomStream random(seed, 1);
  std::vector<std::int32_t> positions(static_cast<std::size_t>(c.tokens));
  for (std::int64_t t = 0; t < c.tokens; ++t) {
    // Causal positions: some short prefixes, some past the end of the cache.
    positions[static_cast<std::size_t>(t)] =
        static_cast<std::int32_t>(t % 3 == 0 ? c.keys + 5 : random.uniform_int(static_cast<std::uint64_t>(c.keys + 2)));
  }
  SelectionPolicy policy;
  policy.k = c.k;
  policy.n_sink = c.n_sink;
  policy.n_local = c.n_local;
  policy.kept_on_top = c.kept_on_top;
  const std::int64_t width = policy.width();
  const TensorView score_view(scores.data(), DType::fp32, {c.tokens, c.groups, c.keys});
  const TensorView position_view(positions.data(), DType::int32, {c.tokens});
  std::vector<std::int32_t> expected(static_cast<std::size_t>(c.tokens * c.groups * width), 7);
  std::vector<std::int32_t> got(expected.size(), 9);
  select_topk(score_view, position_view, policy, TensorView(expected.data(), DType::int32, {c.tokens, c.groups, width}));
  for (SimdLevel level : supported_levels()) {
    ScopedSimdLevel scoped(level);
    std::fill(got.begin(), got.end(), 9);
    fast_select_topk(score_view, position_view, policy, TensorView(got.data(), DType::int32, {c.tokens, c.groups, width}));
    ASSERT_EQ(got, expected) << "level " << simd_level_name(level);
  }
  // The same scores in fp64 (a separate path: pairs instead of 64-bit words).
  const std::vector<double> wide(scores.begin(), scores.end());
  const TensorView wide_view(wide.data(), DType::fp64, {c.tokens, c.groups, c.keys});
  select_topk(wide_view, position_view, policy, TensorView(expected.data(), DType::int32, {c.tokens, c.groups, width}));
  std::fill(got.begin(), got.end(), 9);
  fast_select_topk(wide_view, position_view, policy, TensorView(got.data(), DType::int32, {c.tokens, c.groups, width}));
  ASSERT_EQ(got, expected) << "fp64";
}

// ---- fast_select_topk ----------------------------------------------------------------------------------

TEST(FastTopk, MatchesReferenceOnAwkwardSizes) {
  std::uint64_t seed = 1;
  for (std::int64_t keys : {1, 2, 7, 33, 1000, 4097, 16411, 100003}) {
    for (std::int64_t k : {std::int64_t{1}, std::int64_t{5}, std::int64_t{64}, std::int64_t{2048}, keys + 3}) {
      const std::int64_t tokens = keys > 20000 ? 3 : 5;
      expect_same_as_reference({tokens, 2, keys, k, 0, 0, false}, ScoreKind::distinct, seed++);
    }
  }
}

TEST(FastTopk, MatchesReferenceWithTies) {
  std::uint64_t seed = 100;
  for (std::int64_t keys : {3, 40, 5000, 70001}) {
    for (std::int64_t k : {std::int64_t{1}, std::int64_t{17}, std::int64_t{1000}, keys + 1}) {
      expect_same_as_reference({4, 3, keys, k, 0, 0, false}, ScoreKind::ties, seed++);
    }
  }
}

TEST(FastTopk, MatchesReferenceWithNanAndInfinities) {
  std::uint64_t seed = 200;
  for (std::int64_t keys : {1, 9, 3000, 50021}) {
    for (std::int64_t k : {std::int64_t{1}, std::int64_t{8}, std::int64_t{700}, keys + 2}) {
      expect_same_as_reference({4, 2, keys, k, 0, 0, false}, ScoreKind::special, seed++);
    }
  }
}

TEST(FastTopk, MatchesReferenceWithKeptKeys) {
  std::uint64_t seed = 300;
  for (bool on_top : {false, true}) {
    for (std::int64_t keys : {5, 300, 20011}) {
      for (ScoreKind kind : {ScoreKind::distinct, ScoreKind::ties, ScoreKind::special}) {
        expect_same_as_reference({5, 2, keys, 64, 4, 16, on_top}, kind, seed++);
        expect_same_as_reference({5, 2, keys, 20, 20, 0, on_top}, kind, seed++);
        expect_same_as_reference({5, 2, keys, 20, 0, 20, on_top}, kind, seed++);
        expect_same_as_reference({5, 1, keys, 3000, 1, 1, on_top}, kind, seed++);
      }
    }
  }
}

TEST(FastTopk, Fp64AndStridedViewsMatchReference) {
  const std::int64_t tokens = 3, groups = 2, keys = 9001;
  const std::vector<float> scores = make_scores(tokens * groups * keys, ScoreKind::distinct, 400);
  std::vector<double> wide(scores.begin(), scores.end());
  std::vector<std::int32_t> positions = {9000, 4000, 100000};
  SelectionPolicy policy;
  policy.k = 257;
  policy.n_sink = 2;
  const TensorView position_view(positions.data(), DType::int32, {tokens});
  const std::int64_t width = policy.width();
  std::vector<std::int32_t> expected(static_cast<std::size_t>(tokens * groups * width));
  std::vector<std::int32_t> got(expected.size());
  select_topk(TensorView(wide.data(), DType::fp64, {tokens, groups, keys}), position_view, policy,
              TensorView(expected.data(), DType::int32, {tokens, groups, width}));
  fast_select_topk(TensorView(wide.data(), DType::fp64, {tokens, groups, keys}), position_view, policy,
                   TensorView(got.data(), DType::int32, {tokens, groups, width}));
  EXPECT_EQ(got, expected);

  // The same scores stored [N, G, T] and viewed as [T, G, N] through strides; output strided too.
  std::vector<float> transposed(scores.size());
  for (std::int64_t t = 0; t < tokens; ++t)
    for (std::int64_t g = 0; g < groups; ++g)
      for (std::int64_t s = 0; s < keys; ++s)
        transposed[static_cast<std::size_t>((s * groups + g) * tokens + t)] =
            scores[static_cast<std::size_t>((t * groups + g) * keys + s)];
  const std::int64_t shape[3] = {tokens, groups, keys};
  const std::int64_t strides[3] = {1, tokens, groups * tokens};
  std::vector<std::int32_t> out_t(expected.size());
  const std::int64_t out_shape[3] = {tokens, groups, width};
  const std::int64_t out_strides[3] = {1, tokens, groups * tokens};
  fast_select_topk(TensorView(transposed.data(), DType::fp32, shape, strides), position_view, policy,
                   TensorView(out_t.data(), DType::int32, out_shape, out_strides, Device::cpu(), false));
  for (std::int64_t t = 0; t < tokens; ++t)
    for (std::int64_t g = 0; g < groups; ++g)
      for (std::int64_t i = 0; i < width; ++i)
        ASSERT_EQ(out_t[static_cast<std::size_t>((i * groups + g) * tokens + t)],
                  expected[static_cast<std::size_t>((t * groups + g) * width + i)]);
}

TEST(FastTopk, RowFunctionMatchesReference) {
  const std::int64_t keys = 40000;
  const std::vector<float> scores = make_scores(keys, ScoreKind::distinct, 500);
  SelectionPolicy policy;
  policy.k = 2048;
  policy.n_sink = 4;
  policy.n_local = 64;
  for (std::int32_t pos : {0, 10, 100, 3000, 39999}) {
    std::vector<std::int32_t> expected(static_cast<std::size_t>(policy.width()));
    std::vector<std::int32_t> got(expected.size());
    std::vector<std::int32_t> position = {pos};
    select_topk(TensorView(scores.data(), DType::fp32, {1, 1, keys}), TensorView(position.data(), DType::int32, {1}),
                policy, TensorView(expected.data(), DType::int32, {1, 1, policy.width()}));
    fast_select_topk_row(scores.data(), SelectionRowPlan::make(policy, pos, keys), got.data());
    EXPECT_EQ(got, expected) << "pos " << pos;
  }
}

TEST(FastTopk, SameResultForAnyThreadCount) {
  const Case c{16, 2, 30011, 511, 1, 8, false};
  std::vector<float> scores = make_scores(c.tokens * c.groups * c.keys, ScoreKind::ties, 600);
  std::vector<std::int32_t> positions(static_cast<std::size_t>(c.tokens));
  std::iota(positions.begin(), positions.end(), 29990);
  SelectionPolicy policy{c.k, Granularity::per_kv_head, c.n_sink, c.n_local, false};
  std::vector<std::int32_t> one(static_cast<std::size_t>(c.tokens * c.groups * c.k));
  std::vector<std::int32_t> many(one.size());
  const TensorView score_view(scores.data(), DType::fp32, {c.tokens, c.groups, c.keys});
  const TensorView position_view(positions.data(), DType::int32, {c.tokens});
  {
    ScopedThreads threads(1);
    fast_select_topk(score_view, position_view, policy, TensorView(one.data(), DType::int32, {c.tokens, c.groups, c.k}));
  }
  {
    ScopedThreads threads(3);
    fast_select_topk(score_view, position_view, policy, TensorView(many.data(), DType::int32, {c.tokens, c.groups, c.k}));
  }
  EXPECT_EQ(one, many);
}

TEST(FastTopk, BadInputThrowsAndWritesNothing) {
  std::vector<float> scores(2 * 10, 1.0f);
  std::vector<std::int32_t> positions = {3, 9};
  std::vector<std::int32_t> out(2 * 4, 55);
  std::vector<std::int32_t> ints(2 * 10, 0);
  SelectionPolicy policy;
  policy.k = 4;
  const TensorView scores_view(scores.data(), DType::fp32, {2, 1, 10});
  const TensorView positions_view(positions.data(), DType::int32, {2});
  const TensorView out_view(out.data(), DType::int32, {2, 1, 4});
  expect_error_naming([&] { fast_select_topk(TensorView(ints.data(), DType::int32, {2, 1, 10}), positions_view, policy, out_view); },
                      "scores");
  expect_error_naming([&] { fast_select_topk(TensorView(scores.data(), DType::fp32, {2, 10}), positions_view, policy, out_view); },
                      "scores");
  expect_error_naming([&] { fast_select_topk(scores_view, TensorView(positions.data(), DType::int32, {1}), policy, out_view); },
                      "positions");
  std::vector<std::int32_t> negative = {3, -1};
  expect_error_naming([&] { fast_select_topk(scores_view, TensorView(negative.data(), DType::int32, {2}), policy, out_view); },
                      "positions");
  expect_error_naming([&] { fast_select_topk(scores_view, positions_view, policy, TensorView(out.data(), DType::int32, {2, 1, 3})); },
                      "selection");
  expect_error_naming([&] {
    fast_select_topk(scores_view, positions_view, policy, TensorView(static_cast<const std::int32_t*>(out.data()), DType::int32, {2, 1, 4}));
  }, "selection");
  SelectionPolicy bad = policy;
  bad.k = 0;
  expect_error_naming([&] { fast_select_topk(scores_view, positions_view, bad, out_view); }, "policy.k");
  bad = policy;
  bad.n_sink = 3;
  bad.n_local = 2;
  expect_error_naming([&] { fast_select_topk(scores_view, positions_view, bad, out_view); },
                      "policy.n_sink + policy.n_local");
  EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](std::int32_t v) { return v == 55; }));
}

// ---- StreamingTopK -------------------------------------------------------------------------------------

TEST(StreamingTopK, RandomBlocksInAnyOrderMatchReference) {
  std::uint64_t seed = 700;
  for (ScoreKind kind : {ScoreKind::distinct, ScoreKind::ties, ScoreKind::special}) {
    for (std::int64_t keys : {1, 50, 6000, 65537}) {
      for (std::int64_t k : {std::int64_t{1}, std::int64_t{31}, std::int64_t{2048}, keys + 4}) {
        SelectionPolicy policy;
        policy.k = std::max<std::int64_t>(k, 6);
        policy.n_sink = 2;
        policy.n_local = 4;
        const std::vector<float> scores = make_scores(keys, kind, seed++);
        RandomStream random(seed++);
        const std::int32_t pos = static_cast<std::int32_t>(random.uniform_int(static_cast<std::uint64_t>(keys + 3)));
        std::vector<std::int32_t> expected(static_cast<std::size_t>(policy.width()));
        std::vector<std::int32_t> position = {pos};
        select_topk(TensorView(scores.data(), DType::fp32, {1, 1, keys}), TensorView(position.data(), DType::int32, {1}),
                    policy, TensorView(expected.data(), DType::int32, {1, 1, policy.width()}));
        const SelectionRowPlan plan = SelectionRowPlan::make(policy, pos, keys);
        // Random blocks of [sink_end, local_begin), pushed in a shuffled order, half into a second
        // accumulator that is merged at the end.
        std::vector<std::pair<std::int64_t, std::int64_t>> blocks;
        for (std::int64_t b = plan.sink_end; b < plan.local_begin;) {
          const std::int64_t n = std::min<std::int64_t>(1 + static_cast<std::int64_t>(random.uniform_int(9000)), plan.local_begin - b);
          blocks.emplace_back(b, n);
          b += n;
        }
        random.shuffle(std::span<std::pair<std::int64_t, std::int64_t>>(blocks));
        for (SimdLevel level : supported_levels()) {
          ScopedSimdLevel scoped(level);
          StreamingTopK top(plan.fill);
          StreamingTopK other(plan.fill);
          for (std::size_t i = 0; i < blocks.size(); ++i) {
            (i % 2 == 0 ? top : other).push(scores.data() + blocks[i].first, blocks[i].first, blocks[i].second);
          }
          top.merge(other);
          std::vector<std::int32_t> got(static_cast<std::size_t>(plan.width), 99);
          top.finish_row(plan, got.data());
          ASSERT_EQ(got, expected) << "N=" << keys << " k=" << k << " pos=" << pos << " level " << simd_level_name(level);
          EXPECT_EQ(top.size(), 0);  // finish resets
        }
      }
    }
  }
}

TEST(StreamingTopK, FinishByScoreIsDescendingWithLowerPositionFirst) {
  const std::vector<float> scores = {1.0f, 3.0f, kNaN, 3.0f, -kInf, 2.0f, -0.0f, 0.0f};
  StreamingTopK top(6);
  top.push(scores.data() + 4, 4, 4);
  top.push(scores.data(), 0, 4);
  EXPECT_EQ(top.size(), 6);
  std::vector<std::int64_t> ids(6);
  std::vector<float> values(6);
  EXPECT_EQ(top.finish_by_score(ids.data(), values.data()), 6);
  EXPECT_EQ(ids, (std::vector<std::int64_t>{1, 3, 5, 0, 6, 7}));
  EXPECT_EQ(values[0], 3.0f);
  EXPECT_EQ(values[3], 1.0f);

  StreamingTopK few(5);
  few.push(scores.data(), 0, 3);  // one NaN: two usable scores
  EXPECT_EQ(few.finish_by_score(ids.data(), values.data()), 2);
  EXPECT_EQ(ids[0], 1);
  EXPECT_EQ(ids[1], 0);
  EXPECT_EQ(ids[2], -1);
  EXPECT_EQ(values[4], -kInf);
}

TEST(StreamingTopK, ThresholdRisesAndZeroKeepsNothing) {
  StreamingTopK top(2);
  EXPECT_EQ(top.threshold(), -kInf);
  std::vector<float> scores(10000);
  std::iota(scores.begin(), scores.end(), 0.0f);
  top.push(scores.data(), 0, 10000);
  EXPECT_GT(top.threshold(), 1000.0f);  // after a compaction
  EXPECT_TRUE(top.can_skip_block_max(10.0f));
  std::vector<std::int32_t> out(4);
  EXPECT_EQ(top.finish(out.data(), 4), 2);
  EXPECT_EQ(out, (std::vector<std::int32_t>{9998, 9999, -1, -1}));

  StreamingTopK none(0);
  none.push(scores.data(), 0, 10);
  EXPECT_EQ(none.finish(out.data(), 2), 0);
  EXPECT_EQ(out[0], -1);
}

TEST(StreamingTopK, BadInput) {
  expect_error_naming([] { StreamingTopK top(-1); }, "k");
  StreamingTopK top(3);
  StreamingTopK other(4);
  expect_error_naming([&] { top.merge(other); }, "other");
  const float score = 1.0f;
  expect_error_naming([&] { top.push(&score, -1, 1); }, "first_position");
  std::vector<float> scores(5, 1.0f);
  top.push(scores.data(), 0, 5);
  std::vector<std::int32_t> out(2);
  expect_error_naming([&] { top.finish(out.data(), 2); }, "width");
}

// ---- inner_product_topk --------------------------------------------------------------------------------

struct Search {
  std::vector<float> scores;
  std::vector<std::int64_t> ids;
};

Search run_search(const std::vector<float>& queries, const std::vector<float>& keys, std::int64_t nq, std::int64_t n,
                  std::int64_t dim, std::int64_t k) {
  Search result{std::vector<float>(static_cast<std::size_t>(nq * k)), std::vector<std::int64_t>(static_cast<std::size_t>(nq * k))};
  inner_product_topk(queries.data(), nq, keys.data(), n, dim, k, result.scores.data(), result.ids.data());
  return result;
}

/// Checks a search against double-precision brute force: ids are valid and distinct, scores descending and
/// equal (within the fp32 rounding bound) to the exact score of their id, and the id at rank r is the exact
/// one wherever the exact scores around rank r are further apart than that bound.
void expect_matches_brute_force(const Search& got, const std::vector<float>& queries, const std::vector<float>& keys,
                                std::int64_t nq, std::int64_t n, std::int64_t dim, std::int64_t k) {
  for (std::int64_t q = 0; q < nq; ++q) {
    std::vector<double> exact(static_cast<std::size_t>(n));
    double bound = 0.0;
    for (std::int64_t j = 0; j < n; ++j) {
      double sum = 0.0, magnitude = 0.0;
      for (std::int64_t d = 0; d < dim; ++d) {
        const double product = static_cast<double>(queries[static_cast<std::size_t>(q * dim + d)]) *
                               static_cast<double>(keys[static_cast<std::size_t>(j * dim + d)]);
        sum += product;
        magnitude += std::abs(product);
      }
      exact[static_cast<std::size_t>(j)] = sum;
      bound = std::max(bound, magnitude);
    }
    const double tolerance = 2.0 * static_cast<double>(dim + 2) * std::numeric_limits<float>::epsilon() * bound;
    std::vector<std::int64_t> order(static_cast<std::size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
      return exact[static_cast<std::size_t>(a)] > exact[static_cast<std::size_t>(b)];
    });
    std::vector<bool> seen(static_cast<std::size_t>(n), false);
    for (std::int64_t r = 0; r < k; ++r) {
      const std::int64_t id = got.ids[static_cast<std::size_t>(q * k + r)];
      const float score = got.scores[static_cast<std::size_t>(q * k + r)];
      if (r >= n) {
        EXPECT_EQ(id, -1);
        EXPECT_EQ(score, -kInf);
        continue;
      }
      ASSERT_GE(id, 0);
      ASSERT_LT(id, n);
      EXPECT_FALSE(seen[static_cast<std::size_t>(id)]) << "id " << id << " twice";
      seen[static_cast<std::size_t>(id)] = true;
      EXPECT_NEAR(score, exact[static_cast<std::size_t>(id)], tolerance);
      if (r > 0) {
        EXPECT_LE(score, got.scores[static_cast<std::size_t>(q * k + r - 1)]);
      }
      const double here = exact[static_cast<std::size_t>(order[static_cast<std::size_t>(r)])];
      const bool above_clear = r == 0 || exact[static_cast<std::size_t>(order[static_cast<std::size_t>(r - 1)])] - here > 2 * tolerance;
      const bool below_clear = r + 1 >= n || here - exact[static_cast<std::size_t>(order[static_cast<std::size_t>(r + 1)])] > 2 * tolerance;
      if (above_clear && below_clear) {
        EXPECT_EQ(id, order[static_cast<std::size_t>(r)]) << "query " << q << " rank " << r;
      }
    }
  }
}

TEST(InnerProductTopK, MatchesDoublePrecisionBruteForce) {
  struct Shape {
    std::int64_t nq, n, dim, k;
  };
  std::uint64_t seed = 800;
  for (const Shape& s : {Shape{1, 1, 1, 1}, Shape{3, 10, 5, 20}, Shape{13, 3001, 37, 100}, Shape{70, 2500, 128, 64},
                         Shape{5, 9000, 64, 2048}, Shape{2, 1030, 8, 1030}}) {
    RandomStream random(seed++);
    std::vector<float> queries(static_cast<std::size_t>(s.nq * s.dim));
    std::vector<float> keys(static_cast<std::size_t>(s.n * s.dim));
    random.fill_normal(queries);
    random.fill_normal(keys);
    for (SimdLevel level : supported_levels()) {
      ScopedSimdLevel scoped(level);
      SCOPED_TRACE("nq=" + std::to_string(s.nq) + " N=" + std::to_string(s.n) + " D=" + std::to_string(s.dim) +
                   " k=" + std::to_string(s.k) + " level " + std::string(simd_level_name(level)));
      expect_matches_brute_force(run_search(queries, keys, s.nq, s.n, s.dim, s.k), queries, keys, s.nq, s.n, s.dim, s.k);
    }
  }
}

TEST(InnerProductTopK, EverySimdLevelAgreesWithScalar) {
  const std::int64_t nq = 9, n = 20000, dim = 96, k = 300;
  RandomStream random(900);
  std::vector<float> queries(static_cast<std::size_t>(nq * dim));
  std::vector<float> keys(static_cast<std::size_t>(n * dim));
  random.fill_normal(queries);
  random.fill_normal(keys);
  Search scalar;
  {
    ScopedSimdLevel scoped(SimdLevel::scalar);
    scalar = run_search(queries, keys, nq, n, dim, k);
  }
  for (SimdLevel level : supported_levels()) {
    ScopedSimdLevel scoped(level);
    const Search got = run_search(queries, keys, nq, n, dim, k);
    std::int64_t same = 0;
    for (std::size_t i = 0; i < got.ids.size(); ++i) {
      EXPECT_NEAR(got.scores[i], scalar.scores[i], 1e-4f) << simd_level_name(level);
      same += got.ids[i] == scalar.ids[i];
    }
    // Summation order differs between levels; ids may swap only where scores are within rounding.
    EXPECT_GE(same, static_cast<std::int64_t>(got.ids.size()) - 4) << simd_level_name(level);
  }
}

TEST(InnerProductTopK, TensorViewOverloadAndThreads) {
  const std::int64_t nq = 4, n = 5000, dim = 16, k = 50;
  RandomStream random(950);
  std::vector<float> queries(static_cast<std::size_t>(nq * dim));
  std::vector<float> keys(static_cast<std::size_t>(n * dim));
  random.fill_normal(queries);
  random.fill_normal(keys);
  const Search wide = run_search(queries, keys, nq, n, dim, k);
  std::vector<float> scores(static_cast<std::size_t>(nq * k));
  std::vector<std::int32_t> ids(static_cast<std::size_t>(nq * k));
  for (int threads : {1, 2, 5}) {
    ScopedThreads scoped(threads);
    inner_product_topk(TensorView(queries.data(), DType::fp32, {nq, dim}), TensorView(keys.data(), DType::fp32, {n, dim}), k,
                       TensorView(scores.data(), DType::fp32, {nq, k}), TensorView(ids.data(), DType::int32, {nq, k}));
    for (std::size_t i = 0; i < ids.size(); ++i) {
      ASSERT_EQ(ids[i], wide.ids[i]) << threads << " threads";
      ASSERT_EQ(scores[i], wide.scores[i]);
    }
  }
}

#if KEYSEL_FAISS
TEST(InnerProductTopK, SameIdsAsFaissIndexFlatIP) {
  const std::int64_t nq = 6, n = 7000, dim = 32, k = 128;
  RandomStream random(970);
  std::vector<float> queries(static_cast<std::size_t>(nq * dim));
  std::vector<float> keys(static_cast<std::size_t>(n * dim));
  random.fill_normal(queries);
  random.fill_normal(keys);
  const Search mine = run_search(queries, keys, nq, n, dim, k);
  faiss::IndexFlatIP index(dim);
  index.add(n, keys.data());
  std::vector<float> scores(static_cast<std::size_t>(nq * k));
  std::vector<faiss::Index::idx_t> ids(static_cast<std::size_t>(nq * k));
  index.search(nq, queries.data(), k, scores.data(), ids.data());
  std::int64_t same = 0;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    EXPECT_NEAR(mine.scores[i], scores[i], 1e-4f);
    same += mine.ids[i] == ids[i];
  }
  EXPECT_GE(same, static_cast<std::int64_t>(ids.size()) - 4);  // only near-equal scores may swap
}
#endif

TEST(InnerProductTopK, BadInput) {
  std::vector<float> queries(2 * 4, 1.0f), keys(3 * 4, 1.0f), scores(2 * 2, 5.0f);
  std::vector<std::int64_t> ids(2 * 2, 5);
  expect_error_naming([&] { inner_product_topk(queries.data(), -1, keys.data(), 3, 4, 2, scores.data(), ids.data()); }, "nq");
  expect_error_naming([&] { inner_product_topk(queries.data(), 2, keys.data(), -3, 4, 2, scores.data(), ids.data()); }, "n_keys");
  expect_error_naming([&] { inner_product_topk(queries.data(), 2, keys.data(), 3, 0, 2, scores.data(), ids.data()); }, "dim");
  expect_error_naming([&] { inner_product_topk(queries.data(), 2, keys.data(), 3, 4, 0, scores.data(), ids.data()); }, "k");
  expect_error_naming([&] { inner_product_topk(nullptr, 2, keys.data(), 3, 4, 2, scores.data(), ids.data()); }, "queries");
  expect_error_naming([&] { inner_product_topk(queries.data(), 2, nullptr, 3, 4, 2, scores.data(), ids.data()); }, "keys");
  EXPECT_TRUE(std::all_of(scores.begin(), scores.end(), [](float v) { return v == 5.0f; }));
  std::vector<std::int32_t> ids32(2 * 2, 5);
  const TensorView q(queries.data(), DType::fp32, {2, 4});
  const TensorView kv(keys.data(), DType::fp32, {3, 4});
  expect_error_naming([&] {
    inner_product_topk(q, TensorView(keys.data(), DType::fp32, {4, 3}), 2, TensorView(scores.data(), DType::fp32, {2, 2}), TensorView());
  }, "keys");
  expect_error_naming([&] {
    inner_product_topk(TensorView(ids32.data(), DType::int32, {2, 2}), kv, 2, TensorView(), TensorView());
  }, "queries");
  expect_error_naming([&] { inner_product_topk(q, kv, 2, TensorView(scores.data(), DType::fp32, {2, 3}), TensorView()); }, "scores");
  expect_error_naming([&] { inner_product_topk(q, kv, 2, TensorView(), TensorView(scores.data(), DType::fp32, {2, 2})); }, "ids");
  expect_error_naming([&] { inner_product_topk(q, kv, 0, TensorView(), TensorView()); }, "k");
  EXPECT_TRUE(std::all_of(ids32.begin(), ids32.end(), [](std::int32_t v) { return v == 5; }));
}

}  // namespace
}  // namespace keysel
