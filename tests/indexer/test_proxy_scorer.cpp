// Proxy scorers over the main attention's q . K: aggregations against their double reference, the
// pbar-consistent log-sum-exp selecting the exact top-k, quantised copies, rank reduction, the eigen-solver, the
// selector and bad input (SPEC §3, §6).
#include "keysel/indexer/proxy_scorer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include "keysel/attention/reference.h"
#include "keysel/core/random.h"
#include "keysel/indexer/topk.h"
#include "keysel/recall/metrics.h"
#include "keysel/recall/synthetic.h"
#include "symmetric_eigen.h"  // private (indexer/src)

namespace keysel {
namespace {

Workload small_workload(std::uint64_t seed, std::int64_t keys = 300, std::int64_t dim = 64) {
  SyntheticOptions options;
  options.keys = keys;
  options.tokens = 3;
  options.query_heads = 8;
  options.kv_heads = 2;
  options.head_dim = dim;
  options.value_dim = 16;
  options.seed = seed;
  return make_synthetic_workload(options);
}

std::vector<float> proxy_scores(const ProxyScorer& scorer, const AttentionInputs& inputs, Granularity granularity,
                                std::int64_t groups, const AttentionShape& shape) {
  std::vector<float> scores(static_cast<std::size_t>(shape.tokens * groups * shape.keys));
  scorer.score(inputs, granularity, TensorView(scores.data(), DType::fp32, {shape.tokens, groups, shape.keys}));
  return scores;
}

TEST(ProxyScorer, Fp32AggregationsMatchTheReference) {
  const Workload w = small_workload(1);
  const AttentionInputs inputs = w.inputs();
  for (Granularity granularity : {Granularity::per_head, Granularity::per_kv_head, Granularity::per_token}) {
    const std::int64_t groups = group_count(granularity, w.shape.query_heads, w.shape.kv_heads);
    for (ProxyAggregation aggregation : {ProxyAggregation::max, ProxyAggregation::mean, ProxyAggregation::logsumexp}) {
      SCOPED_TRACE(std::string(granularity_name(granularity)) + " " + std::string(proxy_aggregation_name(aggregation)));
      ProxyConfig config;
      config.aggregation = aggregation;
      const std::vector<float> fast = proxy_scores(ProxyScorer(config), inputs, granularity, groups, w.shape);
      std::vector<double> ref(fast.size());
      proxy_scores_reference(inputs, granularity, aggregation,
                             TensorView(ref.data(), DType::fp64, {w.shape.tokens, groups, w.shape.keys}));
      for (std::size_t i = 0; i < ref.size(); ++i) {
        if (std::isinf(ref[i])) {
          ASSERT_EQ(fast[i], -std::numeric_limits<float>::infinity()) << i;
        } else {
          ASSERT_NEAR(fast[i], ref[i], 1e-4 * (1 + std::fabs(ref[i]))) << i;
        }
      }
    }
  }
}

TEST(ProxyScorer, LogSumExpOfExactLogitsIsLogPbar) {
  const Workload w = small_workload(2);
  const AttentionInputs inputs = w.inputs();
  const std::int64_t groups = w.shape.kv_heads;
  std::vector<double> ref(static_cast<std::size_t>(w.shape.tokens * groups * w.shape.keys)), pbar(ref.size());
  proxy_scores_reference(inputs, Granularity::per_kv_head, ProxyAggregation::logsumexp,
                         TensorView(ref.data(), DType::fp64, {w.shape.tokens, groups, w.shape.keys}));
  group_probabilities(inputs, Granularity::per_kv_head, TensorView(pbar.data(), DType::fp64, {w.shape.tokens, groups, w.shape.keys}));
  for (std::size_t i = 0; i < ref.size(); ++i) {
    if (pbar[i] > 0) { EXPECT_NEAR(ref[i], std::log(pbar[i]), 1e-9); }
  }
}

TEST(ProxyScorer, Fp32LogSumExpSelectsTheExactTopK) {
  const Workload w = small_workload(3);
  const AttentionInputs inputs = w.inputs();
  SelectionPolicy policy;
  policy.k = 32;
  const std::int64_t groups = w.shape.kv_heads;
  std::vector<std::int32_t> exact(static_cast<std::size_t>(w.shape.tokens * groups * policy.k)), got(exact.size());
  exact_topk(inputs, policy, TensorView(exact.data(), DType::int32, {w.shape.tokens, groups, policy.k}));
  ProxyConfig config;
  ProxyScorer scorer(config);
  const SelectionCost cost = scorer.select(inputs, policy, TensorView(got.data(), DType::int32, {w.shape.tokens, groups, policy.k}));
  // Rows whose k-th and (k+1)-th pbar differ by less than fp32 rounding could swap; this seed has none.
  EXPECT_EQ(got, exact);
  EXPECT_GT(cost.macs, 0);
  EXPECT_GT(cost.key_bytes_read, 0);
}

TEST(ProxyScorer, QuantisedCopiesKeepHighRecall) {
  const Workload w = small_workload(4, 1024, 128);
  const AttentionInputs inputs = w.inputs();
  SelectionPolicy policy;
  policy.k = 64;
  const std::int64_t groups = w.shape.kv_heads;
  const ExactReference reference(inputs, policy.granularity);
  for (DType format : {DType::bf16, DType::fp8_e4m3, DType::int8, DType::int4}) {
    for (const bool hadamard : {false, true}) {
      ProxyConfig config;
      config.quantization.format = format;
      config.quantization.hadamard = hadamard;
      std::vector<std::int32_t> got(static_cast<std::size_t>(w.shape.tokens * groups * policy.k));
      ProxyScorer(config).select(inputs, policy, TensorView(got.data(), DType::int32, {w.shape.tokens, groups, policy.k}));
      double recall = 0;
      for (const SelectionMetrics& m : reference.evaluate(TensorView(got.data(), DType::int32, {w.shape.tokens, groups, policy.k}), policy.k))
        recall += m.recall / static_cast<double>(w.shape.tokens * groups);
      SCOPED_TRACE(config.quantization.str());
      EXPECT_GE(recall, format == DType::int4 ? 0.6 : format == DType::bf16 ? 0.97 : 0.85);
    }
  }
}

TEST(ProxyScorer, FullRankProjectionChangesNothing) {
  const Workload w = small_workload(5, 200, 32);
  const AttentionInputs inputs = w.inputs();
  ProxyConfig full;
  ProxyConfig projected;
  projected.rank = 32;
  ProxyScorer scorer(projected);
  scorer.fit(inputs.k);
  ASSERT_TRUE(scorer.fitted());
  const std::vector<float> a = proxy_scores(ProxyScorer(full), inputs, Granularity::per_kv_head, 2, w.shape);
  const std::vector<float> b = proxy_scores(scorer, inputs, Granularity::per_kv_head, 2, w.shape);
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::isinf(a[i])) {
      EXPECT_EQ(a[i], b[i]);
    } else {
      EXPECT_NEAR(a[i], b[i], 1e-3 * (1 + std::fabs(a[i])));
    }
  }
}

TEST(ProxyScorer, RankReducedKeysOfLowRankDataAreExact) {
  // Keys living in a 4-dimensional subspace: a rank-4 projection fitted on them loses nothing.
  const std::int64_t n = 120, hkv = 1, hq = 2, d = 16, t = 2;
  RandomStream rng(6);
  std::vector<float> basis(static_cast<std::size_t>(4 * d)), k(static_cast<std::size_t>(n * d), 0.0f),
      q(static_cast<std::size_t>(t * hq * d));
  rng.fill_normal(basis);
  rng.fill_normal(q);
  for (std::int64_t s = 0; s < n; ++s)
    for (int b = 0; b < 4; ++b) {
      const auto c = static_cast<float>(rng.normal());
      for (std::int64_t i = 0; i < d; ++i) k[static_cast<std::size_t>(s * d + i)] += c * basis[static_cast<std::size_t>(b * d + i)];
    }
  std::vector<std::int32_t> positions{static_cast<std::int32_t>(n - 2), static_cast<std::int32_t>(n - 1)};
  AttentionInputs inputs;
  inputs.q = TensorView(q.data(), DType::fp32, {t, hq, d});
  inputs.k = TensorView(k.data(), DType::fp32, {n, hkv, d});
  inputs.positions = TensorView(positions.data(), DType::int32, {t});
  ProxyConfig config;
  config.rank = 4;
  config.aggregation = ProxyAggregation::mean;
  ProxyScorer scorer(config);
  scorer.fit(inputs.k);
  const AttentionShape shape = inputs.validate("test", false);
  const std::vector<float> reduced = proxy_scores(scorer, inputs, Granularity::per_kv_head, 1, shape);
  std::vector<double> ref(reduced.size());
  proxy_scores_reference(inputs, Granularity::per_kv_head, ProxyAggregation::mean, TensorView(ref.data(), DType::fp64, {t, 1, n}));
  for (std::size_t i = 0; i < ref.size(); ++i) {
    if (!std::isinf(ref[i])) { EXPECT_NEAR(reduced[i], ref[i], 1e-3 * (1 + std::fabs(ref[i]))); }
  }
}

TEST(ProxyScorer, SymmetricEigenvectorsOfAKnownMatrix) {
  // A = V diag(5, 3, 1, 0.5) V^T with V a Hadamard-like orthonormal basis.
  const double h = 0.5;
  const double v[4][4] = {{h, h, h, h}, {h, -h, h, -h}, {h, h, -h, -h}, {h, -h, -h, h}};
  const double lambda[4] = {1, 5, 0.5, 3};
  double a[16] = {};
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j)
      for (int m = 0; m < 4; ++m) a[i * 4 + j] += v[i][m] * lambda[m] * v[j][m];
  double vectors[8], values[2];
  symmetric_eigenvectors(a, 4, 2, vectors, values);
  EXPECT_NEAR(values[0], 5, 1e-12);
  EXPECT_NEAR(values[1], 3, 1e-12);
  for (int i = 0; i < 4; ++i) {
    EXPECT_NEAR(std::fabs(vectors[i * 2 + 0]), std::fabs(v[i][1]), 1e-12);
    EXPECT_NEAR(std::fabs(vectors[i * 2 + 1]), std::fabs(v[i][3]), 1e-12);
  }
  EXPECT_THROW(symmetric_eigenvectors(a, 4, 5, vectors, values), Error);
}

TEST(ProxyScorer, SelectorNamesItselfAndFitsOnFirstUse) {
  const Workload w = small_workload(7, 200, 32);
  ProxyConfig config;
  config.quantization.format = DType::fp8_e4m3;
  config.aggregation = ProxyAggregation::max;
  config.rank = 8;
  auto selector = make_proxy_selector(ProxyScorer(config));
  EXPECT_EQ(selector->name(), "proxy-max-fp8_e4m3-r8");
  SelectionPolicy policy;
  policy.k = 16;
  std::vector<std::int32_t> selection(static_cast<std::size_t>(w.shape.tokens * w.shape.kv_heads * policy.k));
  const TensorView view(selection.data(), DType::int32, {w.shape.tokens, w.shape.kv_heads, policy.k});
  const SelectionCost cost = selector->select(w.inputs(), policy, view);
  EXPECT_NO_THROW(validate_selection("test", view, "selection", w.inputs().positions, w.shape.keys, w.shape.kv_heads));
  EXPECT_EQ(cost.rows, w.shape.tokens * w.shape.kv_heads);
}

TEST(ProxyScorer, RejectsBadInput) {
  const Workload w = small_workload(8, 50, 32);
  const AttentionInputs inputs = w.inputs();
  std::vector<float> scores(static_cast<std::size_t>(w.shape.tokens * 2 * w.shape.keys), 3.0f);
  const TensorView out(scores.data(), DType::fp32, {w.shape.tokens, 2, w.shape.keys});
  ProxyConfig ranked;
  ranked.rank = 4;
  EXPECT_THROW(ProxyScorer(ranked).score(inputs, Granularity::per_kv_head, out), Error);  // not fitted
  ProxyScorer fitted(ranked);
  EXPECT_THROW(fitted.fit(TensorView(w.k.data(), DType::fp32, {w.shape.keys, 2, 2})), Error);  // rank > D
  ProxyConfig bad_rank;
  bad_rank.rank = -1;
  EXPECT_THROW(ProxyScorer{bad_rank}, Error);
  ProxyConfig bad_format;
  bad_format.quantization.format = DType::int32;
  EXPECT_THROW(ProxyScorer{bad_format}, Error);
  EXPECT_THROW(ProxyScorer(ProxyConfig{}).score(inputs, Granularity::per_token, out), Error);  // G = 1 expected
  std::vector<double> scores64(scores.size());
  EXPECT_THROW(ProxyScorer(ProxyConfig{}).score(inputs, Granularity::per_kv_head,
                                                TensorView(scores64.data(), DType::fp64, {w.shape.tokens, 2, w.shape.keys})),
               Error);
  for (float v : scores) ASSERT_EQ(v, 3.0f);
  std::vector<float> q_bad = w.q;
  q_bad[5] = std::numeric_limits<float>::quiet_NaN();
  AttentionInputs nan_inputs = inputs;
  nan_inputs.q = TensorView(q_bad.data(), DType::fp32, {w.shape.tokens, w.shape.query_heads, w.shape.head_dim});
  try {
    ProxyScorer(ProxyConfig{}).score(nan_inputs, Granularity::per_kv_head, out);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("inputs.q"), std::string::npos) << e.what();
  }
  for (float v : scores) ASSERT_EQ(v, 3.0f);
  EXPECT_THROW(parse_proxy_aggregation("median"), Error);
}

}  // namespace
}  // namespace keysel
