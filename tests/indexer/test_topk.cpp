// select_topk against a sort-based reference written here, hand-made rows for the policy corner cases,
// exact_topk against select_topk over group_probabilities, and the argument checks (SPEC §2, §6).
#include "keysel/indexer/topk.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include "keysel/attention/reference.h"
#include "keysel/core/random.h"

namespace keysel {
namespace {

constexpr std::int32_t kSentinel = 123456;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

/// The expected row, by sorting every candidate: kept keys, then the best others by (score desc, pos asc).
std::vector<std::int32_t> reference_row(const std::vector<double>& scores, std::int64_t pos, const SelectionPolicy& policy) {
  const std::int64_t n = static_cast<std::int64_t>(scores.size());
  const std::int64_t allowed = std::min(pos + 1, n);
  std::set<std::int64_t> kept;
  for (std::int64_t s = 0; s < allowed; ++s) {
    if (s < policy.n_sink || s >= allowed - policy.n_local) kept.insert(s);
  }
  std::vector<std::int64_t> others;
  for (std::int64_t s = 0; s < allowed; ++s) {
    if (!kept.contains(s) && !std::isnan(scores[static_cast<std::size_t>(s)])) others.push_back(s);
  }
  std::sort(others.begin(), others.end(), [&](std::int64_t a, std::int64_t b) {
    const double sa = scores[static_cast<std::size_t>(a)], sb = scores[static_cast<std::size_t>(b)];
    return sa != sb ? sa > sb : a < b;
  });
  const std::int64_t budget =
      policy.kept_on_top ? policy.k : std::min(policy.k, allowed) - static_cast<std::int64_t>(kept.size());
  std::set<std::int64_t> chosen = kept;
  for (std::int64_t i = 0; i < budget && i < static_cast<std::int64_t>(others.size()); ++i) {
    chosen.insert(others[static_cast<std::size_t>(i)]);
  }
  std::vector<std::int32_t> row(chosen.begin(), chosen.end());
  row.resize(static_cast<std::size_t>(policy.width()), -1);
  return row;
}

void expect_error_naming(const std::function<void()>& call, const std::string& function,
                         const std::string& argument) {
  try {
    call();
    ADD_FAILURE() << "expected keysel::Error naming '" << argument << "'";
  } catch (const Error& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find("keysel::" + function), std::string::npos) << message;
    EXPECT_NE(message.find("argument '" + argument + "'"), std::string::npos) << message;
  }
}

bool all_sentinel(const std::vector<std::int32_t>& values) {
  return std::all_of(values.begin(), values.end(), [](std::int32_t x) { return x == kSentinel; });
}

/// Runs select_topk on one [1, 1, N] row of fp64 scores.
std::vector<std::int32_t> select_one_row(const std::vector<double>& scores, std::int32_t pos,
                                         const SelectionPolicy& policy) {
  const std::int64_t n = static_cast<std::int64_t>(scores.size());
  std::vector<std::int32_t> out(static_cast<std::size_t>(policy.width()), kSentinel);
  const std::int32_t positions[] = {pos};
  select_topk(TensorView(scores.data(), DType::fp64, {1, 1, n}), TensorView(positions, DType::int32, {1}), policy,
              TensorView(out.data(), DType::int32, {1, 1, policy.width()}));
  return out;
}

using Row = std::vector<std::int32_t>;

// ---- hand-made rows --------------------------------------------------------------------------------------

TEST(SelectTopk, PicksHighestScoresInPositionOrder) {
  const std::vector<double> scores = {0.1, 0.9, 0.3, 0.8, -1.0, 0.5};
  EXPECT_EQ(select_one_row(scores, 5, {.k = 3}), (Row{1, 3, 5}));
  EXPECT_EQ(select_one_row(scores, 5, {.k = 1}), (Row{1}));
}

TEST(SelectTopk, EqualScoresPreferLowerPositions) {
  const std::vector<double> scores(9, 2.0);
  EXPECT_EQ(select_one_row(scores, 8, {.k = 3}), (Row{0, 1, 2}));
  const std::vector<double> some_ties = {1, 3, 2, 3, 3, 1, 2};
  EXPECT_EQ(select_one_row(some_ties, 6, {.k = 2}), (Row{1, 3}));
  EXPECT_EQ(select_one_row(some_ties, 6, {.k = 4}), (Row{1, 2, 3, 4}));
}

TEST(SelectTopk, CausalRowsArePaddedWithMinusOne) {
  const std::vector<double> scores = {0.0, 1.0, 5.0, 7.0, 9.0};
  EXPECT_EQ(select_one_row(scores, 1, {.k = 4}), (Row{0, 1, -1, -1}));
  EXPECT_EQ(select_one_row(scores, 0, {.k = 2}), (Row{0, -1}));
  // A position past the end reads every key.
  EXPECT_EQ(select_one_row(scores, 99, {.k = 7}), (Row{0, 1, 2, 3, 4, -1, -1}));
}

TEST(SelectTopk, NaNIsNeverSelectedAndInfinityCanBe) {
  EXPECT_EQ(select_one_row({kNaN, kNaN, kNaN}, 2, {.k = 2}), (Row{-1, -1}));
  EXPECT_EQ(select_one_row({kNaN, 1.0, kNaN, -kInf, 0.5}, 4, {.k = 4}), (Row{1, 3, 4, -1}));
  EXPECT_EQ(select_one_row({-kInf, -kInf, -kInf, -kInf}, 3, {.k = 2}), (Row{0, 1}));
  EXPECT_EQ(select_one_row({1.0, kInf, 2.0, kInf}, 3, {.k = 2}), (Row{1, 3}));
}

// Kept keys are chosen by position, not by score: a sink or window key is kept even with a NaN score.
TEST(SelectTopk, KeptKeysIgnoreTheirScores) {
  const std::vector<double> scores = {kNaN, 0.0, 9.0, 1.0, 8.0, 0.0, kNaN};
  EXPECT_EQ(select_one_row(scores, 6, {.k = 4, .n_sink = 1, .n_local = 1}), (Row{0, 2, 4, 6}));
}

TEST(SelectTopk, SinksAndWindowCountTowardK) {
  const std::vector<double> scores = {0.0, 0.0, 0.0, 5.0, 1.0, 4.0, 0.0, 0.0, 0.0, 0.0};
  EXPECT_EQ(select_one_row(scores, 9, {.k = 4, .n_sink = 1, .n_local = 2}), (Row{0, 3, 8, 9}));
  // Only 4 keys allowed; sinks {0, 1, 2} and window {1, 2, 3} overlap and cover all of them.
  EXPECT_EQ(select_one_row(scores, 3, {.k = 8, .n_sink = 3, .n_local = 3}), (Row{0, 1, 2, 3, -1, -1, -1, -1}));
  // Sinks {0, 1, 2} and window {2, 3} share key 2: counted once, the row is short rather than padded twice.
  EXPECT_EQ(select_one_row(scores, 3, {.k = 6, .n_sink = 3, .n_local = 2}), (Row{0, 1, 2, 3, -1, -1}));
  EXPECT_EQ(select_one_row(scores, 6, {.k = 5, .n_sink = 2, .n_local = 2}), (Row{0, 1, 3, 5, 6}));
}

TEST(SelectTopk, KeptKeysOnTopOfK) {
  const std::vector<double> scores = {9.0, 0.0, 0.0, 5.0, 1.0, 4.0, 0.0, 0.0, 0.0, 9.0};
  EXPECT_EQ(select_one_row(scores, 9, {.k = 2, .n_sink = 1, .n_local = 1, .kept_on_top = true}),
            (Row{0, 3, 5, 9}));
  // n_sink + n_local may exceed k when on top.
  EXPECT_EQ(select_one_row(scores, 4, {.k = 1, .n_sink = 2, .n_local = 2, .kept_on_top = true}),
            (Row{0, 1, 2, 3, 4}));
}

// ---- random rows against the sort-based reference ---------------------------------------------------------

enum class ScoreKind { normal, few_integers, with_nan, with_neg_inf, mixed };

double draw_score(RandomStream& rng, ScoreKind kind) {
  switch (kind) {
    case ScoreKind::normal: return rng.normal();
    case ScoreKind::few_integers: return static_cast<double>(rng.uniform_int(4));
    case ScoreKind::with_nan: return rng.uniform() < 0.3 ? kNaN : static_cast<double>(rng.uniform_int(5));
    case ScoreKind::with_neg_inf: return rng.uniform() < 0.3 ? -kInf : rng.normal();
    case ScoreKind::mixed: {
      const double u = rng.uniform();
      return u < 0.15 ? kNaN : u < 0.3 ? -kInf : u < 0.35 ? kInf : static_cast<double>(rng.uniform_int(3));
    }
  }
  return 0.0;
}

TEST(SelectTopk, MatchesSortReferenceOnRandomRows) {
  const std::vector<SelectionPolicy> policies = {
      {.k = 1},
      {.k = 1, .n_sink = 1},
      {.k = 3, .n_local = 2},
      {.k = 3, .n_sink = 1, .n_local = 2},
      {.k = 64, .n_sink = 4, .n_local = 16},
      {.k = 64, .n_sink = 40, .n_local = 24},
      {.k = 3, .n_sink = 4, .n_local = 8, .kept_on_top = true},
      {.k = 64, .n_sink = 1, .n_local = 0, .kept_on_top = true},
      {.k = 1, .n_sink = 0, .n_local = 3, .kept_on_top = true},
  };
  const ScoreKind kinds[] = {ScoreKind::normal, ScoreKind::few_integers, ScoreKind::with_nan,
                             ScoreKind::with_neg_inf, ScoreKind::mixed};
  std::uint64_t stream = 0;
  int rows_checked = 0;
  for (const std::int64_t n : {1, 7, 100, 1031}) {
    for (std::int64_t k_extra : {0, 1}) {
      for (SelectionPolicy policy : policies) {
        if (k_extra == 1) policy.k = n + 5;  // more than any row allows
        if (!policy.kept_on_top && policy.n_sink + policy.n_local > policy.k) continue;
        for (const ScoreKind kind : kinds) {
          for (const DType dtype : {DType::fp64, DType::fp32}) {
            RandomStream rng(77, ++stream);
            const std::int64_t tokens = 4, groups = 3;
            std::vector<std::int32_t> positions(static_cast<std::size_t>(tokens));
            // Small positions (few allowed keys), anywhere, the last key, and past the end.
            positions[0] = static_cast<std::int32_t>(rng.uniform_int(4));
            positions[1] = static_cast<std::int32_t>(rng.uniform_int(static_cast<std::uint64_t>(n)));
            positions[2] = static_cast<std::int32_t>(n - 1);
            positions[3] = static_cast<std::int32_t>(n + 10);
            std::vector<double> scores(static_cast<std::size_t>(tokens * groups * n));
            for (double& x : scores) x = draw_score(rng, kind);
            std::vector<float> scores32(scores.begin(), scores.end());
            const TensorView score_view = dtype == DType::fp64
                                              ? TensorView(scores.data(), DType::fp64, {tokens, groups, n})
                                              : TensorView(scores32.data(), DType::fp32, {tokens, groups, n});
            const std::int64_t width = policy.width();
            std::vector<std::int32_t> out(static_cast<std::size_t>(tokens * groups * width), kSentinel);
            const TensorView pos_view(positions.data(), DType::int32, {tokens});
            const TensorView out_view(out.data(), DType::int32, {tokens, groups, width});
            select_topk(score_view, pos_view, policy, out_view);
            ASSERT_NO_THROW(validate_selection("test", out_view, "selection", pos_view, n, groups));
            for (std::int64_t t = 0; t < tokens; ++t) {
              for (std::int64_t g = 0; g < groups; ++g) {
                const std::vector<double> row_scores(scores.begin() + (t * groups + g) * n,
                                                     scores.begin() + (t * groups + g + 1) * n);
                const Row expected = reference_row(row_scores, positions[static_cast<std::size_t>(t)], policy);
                const Row got(out.begin() + (t * groups + g) * width, out.begin() + (t * groups + g + 1) * width);
                ASSERT_EQ(got, expected) << "N=" << n << " k=" << policy.k << " n_sink=" << policy.n_sink
                                         << " n_local=" << policy.n_local << " on_top=" << policy.kept_on_top
                                         << " kind=" << static_cast<int>(kind) << " dtype=" << dtype_name(dtype)
                                         << " t=" << t << " g=" << g;
                ++rows_checked;
              }
            }
          }
        }
      }
    }
  }
  EXPECT_GT(rows_checked, 4000);
}

TEST(SelectTopk, WritesStridedSelection) {
  const std::vector<double> scores = {0.1, 0.9, 0.3, 0.8, -1.0, 0.5, 0.2, 0.0};  // [2, 1, 4]
  const std::int32_t positions[] = {3, 2};
  // Selection [2, 1, 2] in every other int32 of a wider buffer.
  std::vector<std::int32_t> wide(8, kSentinel);
  const std::int64_t shape[] = {2, 1, 2};
  const std::int64_t strides[] = {4, 4, 2};
  const TensorView strided(wide.data(), DType::int32, shape, strides, Device::cpu(), false);
  select_topk(TensorView(scores.data(), DType::fp64, {2, 1, 4}), TensorView(positions, DType::int32, {2}),
              {.k = 2}, strided);
  EXPECT_EQ(wide, (std::vector<std::int32_t>{1, kSentinel, 3, kSentinel, 1, kSentinel, 2, kSentinel}));
}

// ---- exact_topk ------------------------------------------------------------------------------------------

struct AttentionProblem {
  std::int64_t T = 5, N = 37, Hq = 6, Hkv = 2, D = 13;
  std::vector<float> q, k;
  std::vector<std::int32_t> positions = {20, 36, 3, 0, 50};

  explicit AttentionProblem(std::uint64_t seed, std::int64_t kv_heads = 2) : Hkv(kv_heads) {
    RandomStream rng(seed);
    q.resize(static_cast<std::size_t>(T * Hq * D));
    k.resize(static_cast<std::size_t>(N * Hkv * D));
    rng.fill_normal(q, 0.0, 2.0);
    rng.fill_normal(k);
  }
  AttentionInputs inputs() const {
    AttentionInputs in;
    in.q = TensorView(q.data(), DType::fp32, {T, Hq, D});
    in.k = TensorView(k.data(), DType::fp32, {N, Hkv, D});
    in.positions = TensorView(positions.data(), DType::int32, {T});
    return in;
  }
};

TEST(ExactTopk, EqualsSelectTopkOverGroupProbabilities) {
  for (const std::int64_t kv_heads : {6, 2, 1}) {
    const AttentionProblem p(31, kv_heads);
    for (const Granularity granularity : {Granularity::per_head, Granularity::per_kv_head, Granularity::per_token}) {
      for (const SelectionPolicy base : {SelectionPolicy{.k = 5}, SelectionPolicy{.k = 8, .n_sink = 2, .n_local = 3},
                                         SelectionPolicy{.k = 4, .n_sink = 1, .n_local = 2, .kept_on_top = true},
                                         SelectionPolicy{.k = 40}}) {
        SelectionPolicy policy = base;
        policy.granularity = granularity;
        SCOPED_TRACE("Hkv=" + std::to_string(kv_heads) + " " + std::string(granularity_name(granularity)) +
                     " k=" + std::to_string(policy.k));
        const std::int64_t groups = group_count(granularity, p.Hq, p.Hkv);
        std::vector<double> pbar(static_cast<std::size_t>(p.T * groups * p.N));
        const TensorView pbar_view(pbar.data(), DType::fp64, {p.T, groups, p.N});
        group_probabilities(p.inputs(), granularity, pbar_view);

        const std::int64_t width = policy.width();
        std::vector<std::int32_t> expected(static_cast<std::size_t>(p.T * groups * width), kSentinel);
        std::vector<std::int32_t> got(expected.size(), kSentinel);
        select_topk(pbar_view, p.inputs().positions, policy,
                    TensorView(expected.data(), DType::int32, {p.T, groups, width}));
        exact_topk(p.inputs(), policy, TensorView(got.data(), DType::int32, {p.T, groups, width}));
        EXPECT_EQ(got, expected);
        for (std::int64_t t = 0; t < p.T; ++t) {
          for (std::int64_t g = 0; g < groups; ++g) {
            const std::vector<double> row(pbar.begin() + (t * groups + g) * p.N,
                                          pbar.begin() + (t * groups + g + 1) * p.N);
            EXPECT_EQ(Row(got.begin() + (t * groups + g) * width, got.begin() + (t * groups + g + 1) * width),
                      reference_row(row, p.positions[static_cast<std::size_t>(t)], policy));
          }
        }
      }
    }
  }
}

// ---- bad input -------------------------------------------------------------------------------------------

TEST(SelectTopkBadInput, NamesTheArgumentAndWritesNothing) {
  const std::int64_t T = 2, G = 3, N = 10;
  std::vector<double> scores(static_cast<std::size_t>(T * G * N), 1.0);
  std::vector<float> scores32(scores.begin(), scores.end());
  std::vector<std::uint16_t> scores16(scores.size(), 0);
  std::vector<std::int32_t> positions = {9, 4};
  std::vector<std::int32_t> negative = {9, -3};
  std::vector<float> float_positions = {9, 4};
  const TensorView score_view(scores.data(), DType::fp64, {T, G, N});
  const TensorView pos_view(positions.data(), DType::int32, {T});
  const SelectionPolicy good{.k = 4};

  struct Case {
    std::string name, argument;
    TensorView scores, positions;
    SelectionPolicy policy;
    std::vector<std::int64_t> out_shape;
    DType out_dtype = DType::int32;
    bool read_only = false;
  };
  const std::vector<std::int64_t> good_shape = {T, G, 4};
  const std::vector<Case> cases = {
      {"k = 0", "policy.k", score_view, pos_view, {.k = 0}, {T, G, 0}},
      {"k < 0", "policy.k", score_view, pos_view, {.k = -2}, good_shape},
      {"n_sink < 0", "policy.n_sink", score_view, pos_view, {.k = 4, .n_sink = -1}, good_shape},
      {"n_local < 0", "policy.n_local", score_view, pos_view, {.k = 4, .n_local = -1}, good_shape},
      {"kept keys exceed k", "policy.n_sink + policy.n_local", score_view, pos_view,
       {.k = 4, .n_sink = 2, .n_local = 3}, good_shape},
      {"scores rank 2", "scores", TensorView(scores.data(), DType::fp64, {T, G * N}), pos_view, good, good_shape},
      {"scores empty", "scores", TensorView(), pos_view, good, good_shape},
      {"scores fp16", "scores", TensorView(scores16.data(), DType::fp16, {T, G, N}), pos_view, good, good_shape},
      {"scores int32", "scores", TensorView(positions.data(), DType::int32, {T, 1, 1}), pos_view, good, {T, 1, 4}},
      {"scores on cuda", "scores", TensorView(scores.data(), DType::fp64, {T, G, N}, Device::cuda()), pos_view, good,
       good_shape},
      {"positions wrong length", "positions", score_view, TensorView(positions.data(), DType::int32, {1}), good,
       good_shape},
      {"positions fp32", "positions", score_view, TensorView(float_positions.data(), DType::fp32, {T}), good,
       good_shape},
      {"negative position", "positions", score_view, TensorView(negative.data(), DType::int32, {T}), good, good_shape},
      {"selection width", "selection", score_view, pos_view, good, {T, G, 5}},
      {"selection width ignores kept on top", "selection", score_view, pos_view,
       {.k = 4, .n_sink = 1, .n_local = 1, .kept_on_top = true}, good_shape},
      {"selection groups", "selection", score_view, pos_view, good, {T, G - 1, 4}},
      {"selection rank", "selection", score_view, pos_view, good, {T, G * 4}},
      {"selection fp32", "selection", score_view, pos_view, good, good_shape, DType::fp32},
      {"selection read-only", "selection", score_view, pos_view, good, good_shape, DType::int32, true},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    std::vector<std::int32_t> out(64, kSentinel);
    const TensorView out_view = c.read_only ? TensorView(static_cast<const void*>(out.data()), c.out_dtype, c.out_shape)
                                            : TensorView(out.data(), c.out_dtype, c.out_shape);
    expect_error_naming([&] { select_topk(c.scores, c.positions, c.policy, out_view); }, "select_topk", c.argument);
    EXPECT_TRUE(all_sentinel(out));
  }
  // fp32 scores are accepted.
  std::vector<std::int32_t> out(static_cast<std::size_t>(T * G * 4), kSentinel);
  select_topk(TensorView(scores32.data(), DType::fp32, {T, G, N}), pos_view, good,
              TensorView(out.data(), DType::int32, {T, G, 4}));
  EXPECT_EQ(Row(out.begin(), out.begin() + 4), (Row{0, 1, 2, 3}));
}

TEST(ExactTopkBadInput, NamesTheArgumentAndWritesNothing) {
  const AttentionProblem p(41);
  const SelectionPolicy good{.k = 4, .granularity = Granularity::per_kv_head};
  std::vector<std::int32_t> negative = p.positions;
  negative[2] = -1;
  const auto run = [&](const AttentionInputs& in, const SelectionPolicy& policy, std::vector<std::int64_t> shape,
                       const std::string& argument, bool read_only = false) {
    std::vector<std::int32_t> out(static_cast<std::size_t>(p.T * p.Hq * 16), kSentinel);
    const TensorView view = read_only ? TensorView(static_cast<const void*>(out.data()), DType::int32, shape)
                                      : TensorView(out.data(), DType::int32, shape);
    expect_error_naming([&] { exact_topk(in, policy, view); }, "exact_topk", argument);
    EXPECT_TRUE(all_sentinel(out));
  };
  const std::vector<std::int64_t> good_shape = {p.T, p.Hkv, 4};
  AttentionInputs in = p.inputs();
  in.q = TensorView(p.q.data(), DType::fp32, {p.T, p.Hq * p.D});
  run(in, good, good_shape, "q");
  in = p.inputs();
  in.k = TensorView(p.k.data(), DType::fp32, {p.N, p.Hkv, p.D - 1});
  run(in, good, good_shape, "k");
  in = p.inputs();
  in.positions = TensorView(negative.data(), DType::int32, {p.T});
  run(in, good, good_shape, "positions");
  run(p.inputs(), {.k = 0}, {p.T, p.Hkv, 0}, "policy.k");
  run(p.inputs(), {.k = 2, .n_sink = 2, .n_local = 1}, {p.T, p.Hkv, 2}, "policy.n_sink + policy.n_local");
  run(p.inputs(), good, {p.T, p.Hkv, 5}, "selection");
  run(p.inputs(), {.k = 4, .granularity = Granularity::per_head}, good_shape, "selection");
  run(p.inputs(), good, good_shape, "selection", true);
}

}  // namespace
}  // namespace keysel
