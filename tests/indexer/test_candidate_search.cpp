// Candidate searches (brute force and FAISS) and the attention-level CandidateSelector.
//
// Every FAISS index is checked against the brute-force search, and the brute-force selector against the exact
// top-k of SPEC §2. Data are small seeded Gaussians so that the whole program runs in seconds.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "keysel/core/build_config.h"
#include "keysel/core/error.h"
#include "keysel/core/random.h"
#include "keysel/indexer/candidate_search.h"
#include "keysel/indexer/lightning_indexer.h"
#include "keysel/indexer/query_aware_search.h"
#include "keysel/indexer/topk.h"

#if KEYSEL_FAISS
#include "keysel/indexer/faiss_search.h"
#endif

namespace keysel {
namespace {

/// n x d Gaussian vectors, each scaled by a random factor in [0.5, 2) so that norms differ (as keys' do).
std::vector<float> gaussian_vectors(std::int64_t n, std::int64_t d, std::uint64_t seed, bool vary_norms = true) {
  RandomStream random(seed);
  std::vector<float> x(static_cast<std::size_t>(n * d));
  random.fill_normal(x);
  if (vary_norms) {
    for (std::int64_t i = 0; i < n; ++i) {
      const auto f = static_cast<float>(random.uniform(0.5, 2.0));
      for (std::int64_t c = 0; c < d; ++c) x[static_cast<std::size_t>(i * d + c)] *= f;
    }
  }
  return x;
}

struct Results {
  std::vector<float> scores;
  std::vector<std::int64_t> ids;
  SearchCost cost;
};

Results run_search(const CandidateSearch& search, const std::vector<float>& queries, std::int64_t k,
                   const SearchParameters& params = {}) {
  const std::int64_t n = static_cast<std::int64_t>(queries.size()) / search.dim();
  Results r;
  r.scores.resize(static_cast<std::size_t>(n * k));
  r.ids.resize(static_cast<std::size_t>(n * k));
  r.cost = search.search(n, queries.data(), k, r.scores.data(), r.ids.data(), params);
  return r;
}

/// The k best ids of each query by inner product in double over ids [begin, end), lower id first on ties.
std::vector<std::int64_t> reference_top(const std::vector<float>& base, const std::vector<float>& queries,
                                        std::int64_t d, std::int64_t k, std::int64_t begin, std::int64_t end) {
  const std::int64_t n = static_cast<std::int64_t>(queries.size()) / d;
  std::vector<std::int64_t> out;
  for (std::int64_t i = 0; i < n; ++i) {
    std::vector<std::pair<double, std::int64_t>> all;
    for (std::int64_t id = begin; id < end; ++id) {
      double s = 0;
      for (std::int64_t c = 0; c < d; ++c) {
        s += static_cast<double>(queries[static_cast<std::size_t>(i * d + c)]) * base[static_cast<std::size_t>(id * d + c)];
      }
      all.push_back({-s, id});
    }
    std::sort(all.begin(), all.end());
    for (std::int64_t j = 0; j < k; ++j) {
      out.push_back(j < static_cast<std::int64_t>(all.size()) ? all[static_cast<std::size_t>(j)].second : -1);
    }
  }
  return out;
}

/// Fraction of reference ids (excluding -1) found among the same query's result ids.
[[maybe_unused]] double recall(const std::vector<std::int64_t>& result, const std::vector<std::int64_t>& reference, std::int64_t k) {
  std::int64_t hit = 0;
  std::int64_t total = 0;
  for (std::size_t q = 0; q < reference.size() / static_cast<std::size_t>(k); ++q) {
    const auto row = result.begin() + static_cast<std::ptrdiff_t>(q * static_cast<std::size_t>(k));
    for (std::int64_t j = 0; j < k; ++j) {
      const std::int64_t id = reference[q * static_cast<std::size_t>(k) + static_cast<std::size_t>(j)];
      if (id < 0) continue;
      ++total;
      if (std::find(row, row + k, id) != row + k) ++hit;
    }
  }
  return total == 0 ? 1.0 : static_cast<double>(hit) / static_cast<double>(total);
}

std::unique_ptr<CandidateSearch> built(std::string_view spec, const std::vector<float>& base, std::int64_t d,
                                       const CandidateSearchOptions& options = {}) {
  auto search = make_candidate_search(spec, d, options);
  const std::int64_t n = static_cast<std::int64_t>(base.size()) / d;
  search->train(n, base.data());
  search->add(n, base.data());
  return search;
}

constexpr std::int64_t kDim = 32;
constexpr std::int64_t kBase = 600;

// ---- brute force -------------------------------------------------------------------------------------------

TEST(BruteForceSearch, EqualsTheExactTopKOverTheIdRange) {
  const auto base = gaussian_vectors(kBase, kDim, 1);
  const auto queries = gaussian_vectors(7, kDim, 2);
  const auto search = built("brute_force", base, kDim);
  EXPECT_EQ(search->size(), kBase);
  const Results all = run_search(*search, queries, 20);
  EXPECT_EQ(all.ids, reference_top(base, queries, kDim, 20, 0, kBase));
  SearchParameters range;
  range.id_begin = 100;
  range.id_end = 130;
  const Results some = run_search(*search, queries, 40, range);  // more than the range holds: -1 padding
  EXPECT_EQ(some.ids, reference_top(base, queries, kDim, 40, 100, 130));
  EXPECT_EQ(some.scores[39], -std::numeric_limits<float>::infinity());
  for (std::size_t i = 1; i < 30; ++i) EXPECT_GE(some.scores[i - 1], some.scores[i]);
  // Cost: every key in the range, once per query.
  EXPECT_EQ(some.cost.vectors_scored, 7.0 * 30.0);
  EXPECT_EQ(some.cost.macs, 7.0 * 30.0 * kDim);
  EXPECT_EQ(some.cost.queries, 7);
  EXPECT_EQ(search->bytes(), kBase * kDim * 4);
}

TEST(BruteForceSearch, ResetDropsVectors) {
  const auto base = gaussian_vectors(50, kDim, 3);
  auto search = built("exact", base, kDim);
  search->reset();
  EXPECT_EQ(search->size(), 0);
  const Results r = run_search(*search, gaussian_vectors(1, kDim, 4), 3);
  EXPECT_EQ(r.ids, (std::vector<std::int64_t>{-1, -1, -1}));
}

// ---- attention-level: brute force equals the exact top-k -------------------------------------------------

struct TestAttention {
  std::int64_t tokens = 5, query_heads = 4, kv_heads = 2, dim = 16, keys = 257;
  std::vector<float> q, k;
  std::vector<std::int32_t> positions;
  AttentionInputs inputs() const {
    AttentionInputs in;
    in.q = TensorView(q.data(), DType::fp32, {tokens, query_heads, dim});
    in.k = TensorView(k.data(), DType::fp32, {keys, kv_heads, dim});
    in.positions = TensorView(positions.data(), DType::int32, {tokens});
    return in;
  }
};

TestAttention make_attention(std::uint64_t seed, std::int64_t keys = 257) {
  TestAttention a;
  a.keys = keys;
  RandomStream random(seed);
  a.q.resize(static_cast<std::size_t>(a.tokens * a.query_heads * a.dim));
  a.k.resize(static_cast<std::size_t>(a.keys * a.kv_heads * a.dim));
  random.fill_normal(a.q, 0.0, 1.5);
  random.fill_normal(a.k, 0.0, 1.5);
  // Causal positions: early ones, a middle one, the last ones.
  a.positions = {3, 40, static_cast<std::int32_t>(keys / 2), static_cast<std::int32_t>(keys - 2),
                 static_cast<std::int32_t>(keys - 1)};
  return a;
}

std::vector<std::int32_t> run_select(Selector& selector, const AttentionInputs& inputs, const SelectionPolicy& policy,
                                     SelectionCost* cost = nullptr) {
  const AttentionShape shape = inputs.validate("test", false);
  const std::int64_t groups = group_count(policy.granularity, shape.query_heads, shape.kv_heads);
  std::vector<std::int32_t> out(static_cast<std::size_t>(shape.tokens * groups * policy.width()), -7);
  const SelectionCost c =
      selector.select(inputs, policy, TensorView(out.data(), DType::int32, {shape.tokens, groups, policy.width()}));
  if (cost != nullptr) *cost = c;
  return out;
}

std::vector<std::int32_t> exact_selection(const AttentionInputs& inputs, const SelectionPolicy& policy) {
  const AttentionShape shape = inputs.validate("test", false);
  const std::int64_t groups = group_count(policy.granularity, shape.query_heads, shape.kv_heads);
  std::vector<std::int32_t> out(static_cast<std::size_t>(shape.tokens * groups * policy.width()));
  exact_topk(inputs, policy, TensorView(out.data(), DType::int32, {shape.tokens, groups, policy.width()}));
  return out;
}

TEST(CandidateSelector, BruteForceWithFullOverFetchEqualsExactTopK) {
  const TestAttention a = make_attention(11);
  for (const Granularity granularity : {Granularity::per_head, Granularity::per_kv_head, Granularity::per_token}) {
    for (const bool on_top : {false, true}) {
      SelectionPolicy policy;
      policy.k = 24;
      policy.granularity = granularity;
      policy.n_sink = 2;
      policy.n_local = 3;
      policy.kept_on_top = on_top;
      CandidateSelectorOptions options;
      options.candidates = a.keys;  // every free key: the re-rank sees the whole distribution
      auto selector = make_candidate_selector("brute_force", options);
      SelectionCost cost;
      const auto got = run_select(*selector, a.inputs(), policy, &cost);
      EXPECT_EQ(got, exact_selection(a.inputs(), policy))
          << granularity_name(granularity) << (on_top ? " kept on top" : "");
      const std::int64_t groups = group_count(granularity, a.query_heads, a.kv_heads);
      EXPECT_EQ(cost.rows, a.tokens * groups);
      EXPECT_GT(cost.keys_scored, 0);
      EXPECT_GT(cost.macs, 0);
      validate_selection("test", TensorView(got.data(), DType::int32, {a.tokens, groups, policy.width()}), "got",
                         a.inputs().positions, a.keys, groups);
    }
  }
}

TEST(CandidateSelector, OverFetchWithoutFullCoverageStillHonoursKeptKeysAndCausality) {
  const TestAttention a = make_attention(12);
  SelectionPolicy policy;
  policy.k = 16;
  policy.n_sink = 1;
  policy.n_local = 2;
  CandidateSelectorOptions options;
  options.candidates = 20;  // k' > k - kept, but far from N
  auto selector = make_candidate_selector("brute_force", options);
  const auto got = run_select(*selector, a.inputs(), policy);
  const std::int64_t groups = a.kv_heads;
  validate_selection("test", TensorView(got.data(), DType::int32, {a.tokens, groups, policy.k}), "got",
                     a.inputs().positions, a.keys, groups);
  // Per head granularity with one head per group: the best free keys by q.k are exact, re-rank or not.
  policy.granularity = Granularity::per_head;
  EXPECT_EQ(run_select(*selector, a.inputs(), policy), exact_selection(a.inputs(), policy));
}

TEST(CandidateSelector, NoFreeSlotsSelectsTheKeptKeysWithoutSearching) {
  // k = n_sink + n_local: rows with more keys than k have nothing to fill (the searches used to be asked for k = 0).
  const TestAttention a = make_attention(14);
  SelectionPolicy policy;
  policy.k = 5;
  policy.n_sink = 2;
  policy.n_local = 3;
  for (const std::int64_t candidates : {0, 8}) {
    CandidateSelectorOptions options;
    options.candidates = candidates;
    auto selector = make_candidate_selector("brute_force", options);
    EXPECT_EQ(run_select(*selector, a.inputs(), policy), exact_selection(a.inputs(), policy)) << candidates;
  }
}

TEST(CandidateSelector, AppendThenSelectEqualsBuildThenSelect) {
  const TestAttention full = make_attention(13, 300);
  TestAttention prefill = full;  // the first 200 keys, as the cache held them before decoding
  prefill.keys = 200;
  prefill.positions = {3, 40, 100, 198, 199};
  SelectionPolicy policy;
  policy.k = 20;
  policy.n_sink = 2;
  policy.n_local = 2;
  CandidateSelectorOptions options;
  options.candidates = 30;
  options.train_keys = 200;

  auto grown = make_candidate_selector("brute_force", options);
  run_select(*grown, prefill.inputs(), policy);  // builds over 200 keys
  EXPECT_EQ(grown->size(), 200);
  const auto appended = run_select(*grown, full.inputs(), policy);  // same memory, longer view: appends 100
  EXPECT_EQ(grown->size(), 300);
  EXPECT_EQ(grown->trained_size(), 200);
  EXPECT_EQ(grown->retrain_count(), 0);

  auto fresh = make_candidate_selector("brute_force", options);
  EXPECT_EQ(run_select(*fresh, full.inputs(), policy), appended);
}

TEST(CandidateSelector, RetrainsWhenTheCacheHasGrownByTheFactor) {
  const TestAttention a = make_attention(14, 300);
  CandidateSelectorOptions options;
  options.retrain_growth = 1.5;
  auto selector = make_candidate_selector("brute_force", options);
  selector->build(TensorView(a.k.data(), DType::fp32, {100, a.kv_heads, a.dim}));
  EXPECT_FALSE(selector->append(TensorView(a.k.data() + 100 * a.kv_heads * a.dim, DType::fp32, {40, a.kv_heads, a.dim})));
  EXPECT_TRUE(selector->append(TensorView(a.k.data() + 140 * a.kv_heads * a.dim, DType::fp32, {20, a.kv_heads, a.dim})));
  EXPECT_EQ(selector->size(), 160);
  EXPECT_EQ(selector->trained_size(), 160);
  EXPECT_EQ(selector->retrain_count(), 1);
}

TEST(CandidateSelector, OverFetchBelowKIsAClearError) {
  const TestAttention a = make_attention(15);
  SelectionPolicy policy;
  policy.k = 32;
  CandidateSelectorOptions options;
  options.candidates = 31;
  auto selector = make_candidate_selector("brute_force", options);
  std::vector<std::int32_t> out(static_cast<std::size_t>(a.tokens * a.kv_heads * policy.k), -7);
  try {
    selector->select(a.inputs(), policy, TensorView(out.data(), DType::int32, {a.tokens, a.kv_heads, policy.k}));
    FAIL() << "expected keysel::Error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("options.candidates"), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("31"), std::string::npos) << error.what();
  }
  EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](std::int32_t v) { return v == -7; }));
}

// ---- bad input -----------------------------------------------------------------------------------------------

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& error) {
    return error.what();
  }
  return "(no error)";
}

// ---- re-rank by the Lightning Indexer ---------------------------------------------------------------------------

/// Indexer tensors for a TestAttention: queries [T, HI, DI], weights [T, HI] of both signs, keys [N, DI].
struct TestIndexer {
  std::int64_t heads = 3, dim = 8;
  std::vector<float> q, w, k;
};

TestIndexer make_indexer_tensors(const TestAttention& a, std::uint64_t seed) {
  TestIndexer x;
  RandomStream random(seed);
  x.q.resize(static_cast<std::size_t>(a.tokens * x.heads * x.dim));
  x.w.resize(static_cast<std::size_t>(a.tokens * x.heads));
  x.k.resize(static_cast<std::size_t>(a.keys * x.dim));
  random.fill_normal(x.q);
  random.fill_normal(x.w);
  random.fill_normal(x.k);
  return x;
}

TEST(CandidateSelector, IndexerRerankWithFullOverFetchEqualsTheIndexersTopK) {
  const TestAttention a = make_attention(21, 263);
  const TestIndexer x = make_indexer_tensors(a, 22);
  const TensorView qi(x.q.data(), DType::fp32, {a.tokens, x.heads, x.dim});
  const TensorView wi(x.w.data(), DType::fp32, {a.tokens, x.heads});
  const TensorView ki(x.k.data(), DType::fp32, {a.keys, x.dim});
  std::vector<double> reference(static_cast<std::size_t>(a.tokens * a.keys));
  lightning_indexer_reference(qi, wi, a.inputs().positions, ki,
                              TensorView(reference.data(), DType::fp64, {a.tokens, a.keys}));
  struct Case {
    std::int64_t k, sinks, local;
    bool on_top;
  };
  for (const Case c : {Case{24, 0, 0, false}, Case{24, 2, 3, false}, Case{17, 1, 4, true}}) {
    for (const Granularity granularity : {Granularity::per_kv_head, Granularity::per_token, Granularity::per_head}) {
      SelectionPolicy policy;
      policy.k = c.k;
      policy.n_sink = c.sinks;
      policy.n_local = c.local;
      policy.kept_on_top = c.on_top;
      policy.granularity = granularity;
      const std::int64_t groups = group_count(granularity, a.query_heads, a.kv_heads);
      // The indexer's own top-k: select_topk over I (the same I for every group).
      std::vector<double> scores(static_cast<std::size_t>(a.tokens * groups * a.keys));
      for (std::int64_t t = 0; t < a.tokens; ++t) {
        for (std::int64_t g = 0; g < groups; ++g) {
          std::copy_n(reference.begin() + t * a.keys, a.keys, scores.begin() + (t * groups + g) * a.keys);
        }
      }
      std::vector<std::int32_t> expected(static_cast<std::size_t>(a.tokens * groups * policy.width()));
      select_topk(TensorView(scores.data(), DType::fp64, {a.tokens, groups, a.keys}), a.inputs().positions, policy,
                  TensorView(expected.data(), DType::int32, {a.tokens, groups, policy.width()}));

      CandidateSelectorOptions options;
      options.candidates = a.keys;  // every free key reaches the re-rank
      options.rerank = make_indexer_candidate_score(qi, wi, ki);
      auto selector = make_candidate_selector("brute_force", options);
      EXPECT_NE(selector->name().find("indexer-rerank"), std::string::npos) << selector->name();
      SelectionCost cost;
      EXPECT_EQ(run_select(*selector, a.inputs(), policy, &cost), expected)
          << granularity_name(granularity) << " k=" << c.k << " sinks=" << c.sinks << " local=" << c.local;
      EXPECT_GT(cost.keys_scored, 0);
      // The exact re-rank of the same candidates picks by attention, not by I: the two differ on these data.
      options.rerank = nullptr;
      auto exact = make_candidate_selector("brute_force", options);
      EXPECT_NE(run_select(*exact, a.inputs(), policy), expected) << granularity_name(granularity);
    }
  }
}

TEST(CandidateSelector, IndexerRerankSeesOnlyTheRowsFreeCandidates) {
  const TestAttention a = make_attention(23);
  const TestIndexer x = make_indexer_tensors(a, 24);
  const CandidateScore indexer = make_indexer_candidate_score(
      TensorView(x.q.data(), DType::fp32, {a.tokens, x.heads, x.dim}),
      TensorView(x.w.data(), DType::fp32, {a.tokens, x.heads}), TensorView(x.k.data(), DType::fp32, {a.keys, x.dim}));
  SelectionPolicy policy;
  policy.k = 16;
  policy.n_sink = 2;
  policy.n_local = 3;
  std::int64_t calls = 0, outside = 0;
  CandidateSelectorOptions options;
  options.candidates = 20;  // more than the free slots, far fewer than N: the re-rank decides
  options.rerank = [&](std::int64_t t, std::int64_t group, std::span<const std::int32_t> keys,
                       std::span<double> scores) {
    ++calls;  // serialised by the selector
    const std::int64_t allowed = a.positions[static_cast<std::size_t>(t)] + 1;
    for (const std::int32_t s : keys) {
      if (s < policy.n_sink || s >= allowed - policy.n_local) ++outside;
    }
    indexer(t, group, keys, scores);
  };
  auto selector = make_candidate_selector("brute_force", options);
  const auto got = run_select(*selector, a.inputs(), policy);
  EXPECT_GT(calls, 0);
  EXPECT_EQ(outside, 0);
  validate_selection("test", TensorView(got.data(), DType::int32, {a.tokens, a.kv_heads, policy.width()}), "got",
                     a.inputs().positions, a.keys, a.kv_heads);
}

TEST(CandidateSelector, IndexerScoreChecksItsTensorsAndCalls) {
  const TestAttention a = make_attention(25);
  TestIndexer x = make_indexer_tensors(a, 26);
  const TensorView qi(x.q.data(), DType::fp32, {a.tokens, x.heads, x.dim});
  const TensorView ki(x.k.data(), DType::fp32, {a.keys, x.dim});
  const std::string shape_error = error_of([&] {
    make_indexer_candidate_score(qi, TensorView(x.w.data(), DType::fp32, {a.tokens, x.heads - 1}), ki);
  });
  EXPECT_NE(shape_error.find("weights"), std::string::npos) << shape_error;
  const CandidateScore score =
      make_indexer_candidate_score(qi, TensorView(x.w.data(), DType::fp32, {a.tokens, x.heads}), ki);
  const std::vector<std::int32_t> keys = {0, 5, static_cast<std::int32_t>(a.keys)};
  std::vector<double> out(keys.size(), -7.0);
  const std::string key_error = error_of([&] { score(0, 0, keys, out); });
  EXPECT_NE(key_error.find("keys"), std::string::npos) << key_error;
  EXPECT_NE(key_error.find(std::to_string(a.keys)), std::string::npos) << key_error;
  EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](double v) { return v == -7.0; }));
  const std::string token_error =
      error_of([&] { score(a.tokens, 0, std::span(keys).first(2), std::span(out).first(2)); });
  EXPECT_NE(token_error.find("in [0, " + std::to_string(a.tokens) + ")"), std::string::npos) << token_error;
  x.k[3] = std::nanf("");
  const std::string nan_error = error_of([&] {
    make_indexer_candidate_score(qi, TensorView(x.w.data(), DType::fp32, {a.tokens, x.heads}), ki);
  });
  EXPECT_NE(nan_error.find("finite"), std::string::npos) << nan_error;
}

TEST(CandidateSearchErrors, NameTheArgumentAndLeaveOutputsUntouched) {
  const auto base = gaussian_vectors(20, kDim, 5);
  auto search = built("brute_force", base, kDim);
  std::vector<float> scores(4, 7.0f);
  std::vector<std::int64_t> ids(4, 7);
  const auto q = gaussian_vectors(1, kDim, 6);
  EXPECT_NE(error_of([&] { search->search(1, q.data(), 0, scores.data(), ids.data()); }).find("'k'"), std::string::npos);
  SearchParameters bad;
  bad.id_end = 21;
  EXPECT_NE(error_of([&] { search->search(1, q.data(), 4, scores.data(), ids.data(), bad); }).find("params.id_end"),
            std::string::npos);
  EXPECT_NE(error_of([&] { search->search(1, nullptr, 4, scores.data(), ids.data()); }).find("'x'"), std::string::npos);
  EXPECT_TRUE(std::all_of(scores.begin(), scores.end(), [](float v) { return v == 7.0f; }));
  EXPECT_TRUE(std::all_of(ids.begin(), ids.end(), [](std::int64_t v) { return v == 7; }));
  std::vector<float> nan_vector(kDim, std::nanf(""));
  EXPECT_NE(error_of([&] { search->add(1, nan_vector.data()); }).find("finite"), std::string::npos);
  EXPECT_EQ(search->size(), 20);
  EXPECT_NE(error_of([&] { make_candidate_search("brute_force", 0); }).find("'dim'"), std::string::npos);
  EXPECT_NE(error_of([&] { make_candidate_search("", 8); }).find("'spec'"), std::string::npos);
  // Keys of the wrong head dim for a built selector.
  auto selector = make_candidate_selector("brute_force");
  std::vector<float> keys(10 * 2 * 8, 1.0f);
  selector->build(TensorView(keys.data(), DType::fp32, {10, 2, 8}));
  std::vector<float> wrong(3 * 2 * 4, 1.0f);
  EXPECT_NE(error_of([&] { selector->append(TensorView(wrong.data(), DType::fp32, {3, 2, 4})); }).find("'keys'"),
            std::string::npos);
  EXPECT_EQ(selector->size(), 10);
}

#if !KEYSEL_FAISS
TEST(CandidateSearchErrors, FactoryStringsNeedFaiss) {
  const std::string message = error_of([] { make_candidate_search("IVF16,Flat", 8); });
  EXPECT_NE(message.find("KEYSEL_FAISS"), std::string::npos) << message;
}
#endif

// ---- FAISS ---------------------------------------------------------------------------------------------------
#if KEYSEL_FAISS

TEST(FaissSearch, FlatEqualsBruteForce) {
  const auto base = gaussian_vectors(kBase, kDim, 21);
  const auto queries = gaussian_vectors(9, kDim, 22);
  const auto brute = built("brute_force", base, kDim);
  const auto flat = built("Flat", base, kDim);
  for (const std::int64_t begin : {0, 57}) {
    SearchParameters params;
    params.id_begin = begin;
    params.id_end = begin == 0 ? -1 : 400;
    const Results a = run_search(*brute, queries, 25, params);
    const Results b = run_search(*flat, queries, 25, params);
    EXPECT_EQ(a.ids, b.ids);
    for (std::size_t i = 0; i < a.scores.size(); ++i) EXPECT_NEAR(a.scores[i], b.scores[i], 1e-3);
    EXPECT_EQ(a.cost.vectors_scored, b.cost.vectors_scored);
  }
}

TEST(FaissSearch, IvfWithEveryListProbedEqualsBruteForce) {
  const auto base = gaussian_vectors(kBase, kDim, 23);
  const auto queries = gaussian_vectors(9, kDim, 24);
  const auto brute = built("brute_force", base, kDim);
  const Results reference = run_search(*brute, queries, 30);
  for (const bool mips : {false, true}) {
    CandidateSearchOptions options;
    options.mips_to_l2 = mips;
    const auto ivf = built("IVF16,Flat", base, kDim, options);
    SearchParameters all_lists;
    all_lists.nprobe = 16;
    const Results r = run_search(*ivf, queries, 30, all_lists);
    EXPECT_EQ(r.ids, reference.ids) << ivf->name();
    for (std::size_t i = 0; i < r.scores.size(); ++i) EXPECT_NEAR(r.scores[i], reference.scores[i], 2e-3);
    EXPECT_EQ(r.cost.vectors_scored, 9.0 * kBase);
    EXPECT_EQ(r.cost.centroids_scored, 9.0 * 16);
    // Fewer lists: fewer keys scored, as counted from the probed lists.
    SearchParameters two_lists;
    two_lists.nprobe = 2;
    const Results few = run_search(*ivf, queries, 30, two_lists);
    EXPECT_LT(few.cost.vectors_scored, 9.0 * kBase);
    EXPECT_GT(few.cost.vectors_scored, 0);
  }
}

TEST(FaissSearch, ChannelBalancingKeepsInnerProductsAndHelpsIvfOnOutlierChannels) {
  // Two outlier channels: keys x8, queries / 8, so inner products are those of the plain data.
  auto base = gaussian_vectors(kBase, kDim, 41);
  auto queries = gaussian_vectors(12, kDim, 42);
  for (const std::int64_t c : {3, 17}) {
    for (std::int64_t i = 0; i < kBase; ++i) base[static_cast<std::size_t>(i * kDim + c)] *= 8.0f;
    for (std::int64_t i = 0; i < 12; ++i) queries[static_cast<std::size_t>(i * kDim + c)] /= 8.0f;
  }
  const auto brute = built("brute_force", base, kDim);
  const Results reference = run_search(*brute, queries, 20);
  SearchParameters all;
  all.nprobe = 16;
  for (const std::string spec : {"Flat", "IVF16,Flat"}) {  // exact searches (every list probed)
    for (const bool mips : {false, true}) {
      CandidateSearchOptions options;
      options.balance_channels = true;
      options.mips_to_l2 = mips;
      const auto search = built(spec, base, kDim, options);
      EXPECT_NE(search->name().find("+balance"), std::string::npos) << search->name();
      const Results r = run_search(*search, queries, 20, all);
      EXPECT_EQ(r.ids, reference.ids) << search->name();
      for (std::size_t i = 0; i < r.scores.size(); ++i) {
        EXPECT_NEAR(r.scores[i], reference.scores[i], 1e-3 * (1 + std::fabs(reference.scores[i]))) << search->name();
      }
    }
  }
  // Few lists probed: lists cut along every channel find more of the true neighbours than lists cut along the
  // two outlier channels.
  SearchParameters few;
  few.nprobe = 2;
  CandidateSearchOptions plain, balanced;
  plain.mips_to_l2 = balanced.mips_to_l2 = true;
  balanced.balance_channels = true;
  const double plain_recall =
      recall(run_search(*built("IVF16,Flat", base, kDim, plain), queries, 20, few).ids, reference.ids, 20);
  const double balanced_recall =
      recall(run_search(*built("IVF16,Flat", base, kDim, balanced), queries, 20, few).ids, reference.ids, 20);
  EXPECT_GT(balanced_recall, plain_recall + 0.05) << plain_recall << " -> " << balanced_recall;
}

TEST(FaissSearch, MipsTransformPreservesTheRanking) {
  // Norms vary by 4x: plain L2 would rank differently, the transform must not.
  const auto base = gaussian_vectors(kBase, kDim, 25);
  const auto queries = gaussian_vectors(9, kDim, 26);
  const auto brute = built("brute_force", base, kDim);
  CandidateSearchOptions options;
  options.mips_to_l2 = true;
  options.mips_norm_headroom = 1.25;
  const auto flat = built("Flat", base, kDim, options);
  EXPECT_EQ(flat->name(), "Flat+mips");
  const Results reference = run_search(*brute, queries, kBase);
  const Results r = run_search(*flat, queries, kBase);
  // The full ranking, not just the top: position j holds a key whose exact score is the j-th best score up to
  // fp32 rounding of |q|^2 + M^2 - 2 q.x (so near-ties may swap), and the top 50 agree exactly.
  for (std::int64_t q = 0; q < 9; ++q) {
    std::vector<float> exact_score(kBase);
    for (std::int64_t j = 0; j < kBase; ++j) {
      exact_score[static_cast<std::size_t>(reference.ids[static_cast<std::size_t>(q * kBase + j)])] =
          reference.scores[static_cast<std::size_t>(q * kBase + j)];
    }
    for (std::int64_t j = 0; j < kBase; ++j) {
      const std::size_t at = static_cast<std::size_t>(q * kBase + j);
      ASSERT_GE(r.ids[at], 0);
      EXPECT_NEAR(exact_score[static_cast<std::size_t>(r.ids[at])], reference.scores[at], 2e-3);
      EXPECT_NEAR(r.scores[at], reference.scores[at], 2e-3);
      if (j < 50) {
        EXPECT_EQ(r.ids[at], reference.ids[at]);
      }
    }
  }
  EXPECT_EQ(flat->norm_overflows(), 0);
  // A key beyond the bound is counted (it can no longer be found reliably).
  std::vector<float> big(kDim, 10.0f);
  auto grown = built("Flat", base, kDim, options);
  grown->add(1, big.data());
  EXPECT_EQ(grown->norm_overflows(), 1);
}

TEST(FaissSearch, ApproximateIndexesFindMostNeighboursAndCountTheirWork) {
  const std::int64_t n = 2000;
  const auto base = gaussian_vectors(n, kDim, 27);
  const auto queries = gaussian_vectors(8, kDim, 28);
  const std::int64_t k = 10;
  const auto reference = reference_top(base, queries, kDim, k, 0, n);
  struct Case {
    const char* spec;
    bool mips;
    SearchParameters params;
    double min_recall;
  };
  SearchParameters ivf_params;
  ivf_params.nprobe = 8;
  SearchParameters hnsw_params;
  hnsw_params.ef_search = 128;
  const Case cases[] = {
      {"IVF16,Flat", false, ivf_params, 0.7}, {"IVF16,SQ8", true, ivf_params, 0.7},
      {"IVF16,PQ8", true, ivf_params, 0.3},   {"HNSW16", false, hnsw_params, 0.7},
      // HNSW over the transformed vectors navigates poorly on keys whose norms vary 4x (the small-norm keys
      // crowd around the extra axis); docs/candidate-search.md reports it. Here it must only run and count.
      {"HNSW16", true, hnsw_params, 0.0},
  };
  for (const Case& c : cases) {
    CandidateSearchOptions options;
    options.mips_to_l2 = c.mips;
    const auto search = built(c.spec, base, kDim, options);
    const Results r = run_search(*search, queries, k, c.params);
    EXPECT_GE(recall(r.ids, reference, k), c.min_recall) << search->name();
    EXPECT_GT(r.cost.vectors_scored, 0) << search->name();
    EXPECT_LT(r.cost.vectors_scored, 8.0 * n) << search->name();
    EXPECT_GT(r.cost.bytes_read, 0) << search->name();
    EXPECT_GT(search->bytes(), 0) << search->name();
    for (std::size_t i = 0; i < r.ids.size(); ++i) {
      EXPECT_TRUE(r.ids[i] >= 0 && r.ids[i] < n) << search->name();
    }
    // The id range holds for approximate indexes too.
    SearchParameters range = c.params;
    range.id_begin = 500;
    range.id_end = 900;
    const Results ranged = run_search(*search, queries, k, range);
    for (const std::int64_t id : ranged.ids) EXPECT_TRUE(id == -1 || (id >= 500 && id < 900)) << search->name();
  }
}

TEST(FaissSearch, AppendThenSearchEqualsBuildThenSearch) {
  const auto base = gaussian_vectors(kBase, kDim, 29);
  const auto queries = gaussian_vectors(9, kDim, 30);
  for (const char* spec : {"Flat", "IVF16,Flat", "IVF16,SQ8"}) {
    auto once = make_candidate_search(spec, kDim);
    auto twice = make_candidate_search(spec, kDim);
    once->train(400, base.data());  // the prefill
    twice->train(400, base.data());
    once->add(kBase, base.data());
    twice->add(400, base.data());
    twice->add(kBase - 400, base.data() + 400 * kDim);  // decoded keys, no retraining
    SearchParameters params;
    params.nprobe = 4;
    const Results a = run_search(*once, queries, 20, params);
    const Results b = run_search(*twice, queries, 20, params);
    EXPECT_EQ(a.ids, b.ids) << spec;
    EXPECT_EQ(a.scores, b.scores) << spec;
    EXPECT_EQ(a.cost.vectors_scored, b.cost.vectors_scored) << spec;
  }
}

TEST(FaissSearch, ConcurrentSearchesAgreeWithSerialOnes) {
  const std::int64_t n = 1500;
  const auto base = gaussian_vectors(n, kDim, 31);
  const auto queries = gaussian_vectors(16, kDim, 32);
  for (const char* spec : {"brute_force", "Flat", "IVF16,Flat", "IVF16,PQ8", "HNSW16"}) {
    CandidateSearchOptions options;
    options.mips_to_l2 = std::string(spec) == "HNSW16";
    const auto search = built(spec, base, kDim, options);
    SearchParameters params;
    params.nprobe = 3;
    params.ef_search = 40;
    params.id_begin = 10;
    params.id_end = 1400;
    // Serial, one query at a time.
    std::vector<Results> serial;
    for (std::int64_t i = 0; i < 16; ++i) {
      serial.push_back(run_search(*search, std::vector<float>(queries.begin() + i * kDim, queries.begin() + (i + 1) * kDim), 15, params));
    }
    std::atomic<int> mismatches{0};
    std::vector<std::thread> threads;
    for (int w = 0; w < 4; ++w) {
      threads.emplace_back([&, w] {
        for (int round = 0; round < 3; ++round) {
          for (std::int64_t i = w; i < 16; i += 2) {
            const Results r = run_search(
                *search, std::vector<float>(queries.begin() + i * kDim, queries.begin() + (i + 1) * kDim), 15, params);
            const Results& s = serial[static_cast<std::size_t>(i)];
            if (r.ids != s.ids || r.scores != s.scores || r.cost.vectors_scored != s.cost.vectors_scored) ++mismatches;
          }
        }
      });
    }
    for (auto& t : threads) t.join();
    EXPECT_EQ(mismatches.load(), 0) << spec;
    // A batched call (parallel inside) agrees too.
    const Results batch = run_search(*search, queries, 15, params);
    for (std::int64_t i = 0; i < 16; ++i) {
      EXPECT_TRUE(std::equal(batch.ids.begin() + i * 15, batch.ids.begin() + (i + 1) * 15,
                             serial[static_cast<std::size_t>(i)].ids.begin()))
          << spec;
    }
  }
}

TEST(FaissSearch, BadInputGivesAClearError) {
  auto ivf = make_candidate_search("IVF16,Flat", kDim);
  const auto base = gaussian_vectors(100, kDim, 33);
  std::vector<float> scores(5);
  std::vector<std::int64_t> ids(5);
  EXPECT_NE(error_of([&] { ivf->search(1, base.data(), 5, scores.data(), ids.data()); }).find("untrained"),
            std::string::npos);
  EXPECT_NE(error_of([&] { ivf->add(1, base.data()); }).find("untrained"), std::string::npos);
  EXPECT_NE(error_of([&] { ivf->train(8, base.data()); }).find("nlist = 16"), std::string::npos);
  CandidateSearchOptions mips;
  mips.mips_to_l2 = true;
  auto flat = make_candidate_search("Flat", kDim, mips);  // the transform needs its norm bound first
  EXPECT_NE(error_of([&] { flat->add(1, base.data()); }).find("untrained"), std::string::npos);
  for (const char* spec : {"NoSuchIndex", "IVF16,PQ8x4fs", "PQ8", "IVF16,Flat,Extra"}) {
    const std::string message = error_of([&] { make_candidate_search(spec, kDim); });
    EXPECT_NE(message.find("factory"), std::string::npos) << spec << ": " << message;
    EXPECT_NE(message.find(spec), std::string::npos) << spec << ": " << message;
  }
  // A PQ that does not divide the dim: FAISS's reason is passed on.
  EXPECT_NE(error_of([&] { make_candidate_search("IVF4,PQ5", kDim); }).find("IVF4,PQ5"), std::string::npos);
  CandidateSearchOptions headroom;
  headroom.mips_norm_headroom = 0.5;
  EXPECT_NE(error_of([&] { make_candidate_search("Flat", kDim, headroom); }).find("mips_norm_headroom"),
            std::string::npos);
}

TEST(CandidateSelector, IvfWithEveryListProbedEqualsExactTopK) {
  const TestAttention a = make_attention(41);
  SelectionPolicy policy;
  policy.k = 24;
  policy.n_sink = 1;
  policy.n_local = 4;
  for (const bool mips : {false, true}) {
    CandidateSelectorOptions options;
    options.candidates = a.keys;
    options.search.nprobe = 8;
    CandidateSearchOptions search_options;
    search_options.mips_to_l2 = mips;
    auto selector = make_candidate_selector("IVF8,Flat", options, search_options);
    EXPECT_NE(selector->name().find("IVF8,Flat"), std::string::npos);
    for (const Granularity granularity : {Granularity::per_kv_head, Granularity::per_token}) {
      policy.granularity = granularity;
      EXPECT_EQ(run_select(*selector, a.inputs(), policy), exact_selection(a.inputs(), policy))
          << selector->name() << " " << granularity_name(granularity);
    }
    EXPECT_EQ(selector->kv_heads(), a.kv_heads);
  }
}

TEST(CandidateSelector, ApproximateSelectionsAreValidAndCheaperThanExact) {
  const TestAttention a = make_attention(42, 2000);
  SelectionPolicy policy;
  policy.k = 64;
  policy.n_sink = 2;
  policy.n_local = 8;
  CandidateSelectorOptions options;
  options.candidates = 128;
  options.search.nprobe = 4;
  options.search.ef_search = 128;
  for (const char* spec : {"IVF32,Flat", "HNSW16"}) {
    for (const CandidateQueries queries : {CandidateQueries::each_head, CandidateQueries::group_mean}) {
      options.queries = queries;
      auto selector = make_candidate_selector(spec, options);
      SelectionCost cost;
      const auto got = run_select(*selector, a.inputs(), policy, &cost);
      validate_selection("test", TensorView(got.data(), DType::int32, {a.tokens, a.kv_heads, policy.k}), "got",
                         a.inputs().positions, a.keys, a.kv_heads);
      // Keys scored per row stay well below the allowed keys of the long rows.
      EXPECT_GT(cost.keys_scored, 0) << selector->name();
      EXPECT_LT(cost.keys_scored / static_cast<double>(cost.rows), 0.6 * static_cast<double>(a.keys)) << selector->name();
    }
  }
}


// ---- FAISS factory grammar: every string is parsed and bounded before FAISS sees it ----------------------------
// Each probe below crashed FAISS 1.7.3 or grew without bound before keysel checked the string; now each is a
// keysel::Error naming the argument, the rule and the value.

/// The error make_candidate_search(spec, kDim) throws; it must name the argument, the string and `detail`.
void expect_factory_error(const std::string& spec, const std::string& detail,
                          const CandidateSearchOptions& options = {}) {
  const std::string message = error_of([&] { make_candidate_search(spec, kDim, options); });
  EXPECT_NE(message.find("argument 'factory'"), std::string::npos) << spec << ": " << message;
  EXPECT_NE(message.find("\"" + spec + "\""), std::string::npos) << spec << ": " << message;
  EXPECT_NE(message.find(detail), std::string::npos) << spec << ": " << message;
}

TEST(FaissFactory, RejectsPqWithNoSubquantizers) {  // SIGFPE in FAISS
  expect_factory_error("IVF4,PQ0", "m = 0");
  expect_factory_error("IVF4,PQ0", "PQ{m} with m >= 1");
}

TEST(FaissFactory, RejectsIvfWithNoLists) {  // assertion abort in FAISS
  expect_factory_error("IVF0,Flat", "nlist = 0");
  expect_factory_error("IVF0,Flat", "1 <= nlist <= 1048576");
}

TEST(FaissFactory, RejectsHnswWithNoLinks) {  // SIGSEGV in FAISS
  expect_factory_error("HNSW0", "M = 0");
  expect_factory_error("HNSW0", "2 <= M <= 256");
}

TEST(FaissFactory, RejectsIvfHnswQuantizerWithNoLinks) {  // SIGSEGV in FAISS
  expect_factory_error("IVF4_HNSW0,Flat", "M = 0");
  expect_factory_error("IVF4_HNSW1,Flat", "M = 1");
}

TEST(FaissFactory, RejectsPqWithNoBits) {  // out-of-bounds read in FAISS's search
  expect_factory_error("IVF4,PQ4x0", "nbits = 0");
  expect_factory_error("IVF4,PQ4x0", "1 <= nbits <= 8");
  expect_factory_error("IVF4,PQ4x12", "nbits = 12");  // FAISS 1.7.3's IVF-PQ refuses > 8 (and leaks)
}

TEST(FaissFactory, RejectsMoreListsThanTheCapAtBuild) {  // grew to 24 GB in FAISS before any key was seen
  expect_factory_error("IVF1000000000,Flat", "nlist = 1000000000");
  // A count past int64 is reported as written, not overflowed.
  expect_factory_error("IVF123456789012345678901234567890,Flat", "nlist = 123456789012345678901234567890");
}

TEST(FaissFactory, RejectsMoreListsThanTrainingKeysAtTrain) {
  // nlist within the cap, but more lists than keys: the check runs at train(), before FAISS's k-means.
  auto ivf = make_candidate_search("IVF1024,Flat", kDim);
  const auto base = gaussian_vectors(256, kDim, 51);
  const std::string message = error_of([&] { ivf->train(256, base.data()); });
  EXPECT_NE(message.find("argument 'n'"), std::string::npos) << message;
  EXPECT_NE(message.find("nlist = 1024"), std::string::npos) << message;
  EXPECT_NE(message.find("got 256"), std::string::npos) << message;
  // PQ's codebooks need one training vector per centroid (2^nbits).
  auto pq = make_candidate_search("IVF4,PQ4", kDim);
  const std::string pq_message = error_of([&] { pq->train(100, base.data()); });
  EXPECT_NE(pq_message.find("argument 'n'"), std::string::npos) << pq_message;
  EXPECT_NE(pq_message.find("2^nbits = 256"), std::string::npos) << pq_message;
  EXPECT_NE(pq_message.find("got 100"), std::string::npos) << pq_message;
}

TEST(FaissFactory, RejectsHnswWithOneLink) {  // more than 6 GB for 256 keys in FAISS
  expect_factory_error("HNSW1", "M = 1");
  expect_factory_error("HNSW1,Flat", "M = 1");
}

TEST(FaissFactory, RejectsHnswWithTooManyLinks) {  // std::length_error (vector::_M_fill_insert) in FAISS
  expect_factory_error("HNSW2000000000", "M = 2000000000");
  expect_factory_error("HNSW257", "2 <= M <= 256");
}

TEST(FaissFactory, RejectsStringsOutsideTheGrammarWithTheGrammar) {
  for (const char* spec : {"NoSuchIndex", "HNSW", "HNSW16_Flat", "HNSW16,PQ8x4", "IVF16", "IVF16,", "IVF16,FlatDedup",
                           "IVF16,SQ7", "IVF16,PQ8np", "IVF16,PQ8x4fs", "IVF16_NSG32,Flat", "OPQ8,IVF16,PQ8",
                           "PCA16,Flat", "Flat,RFlat", "IDMap,Flat", "IVF16,Flat,Extra", "ivf16,flat", " Flat"}) {
    expect_factory_error(spec, "keysel's grammar: Flat | HNSW{M}");
  }
  // check_faiss_factory checks the grammar without a dim.
  EXPECT_NO_THROW(check_faiss_factory("IVF16_HNSW32,PQ8x4"));
  const std::string message = error_of([] { check_faiss_factory("IVF0,Flat"); });
  EXPECT_NE(message.find("check_faiss_factory: argument 'factory'"), std::string::npos) << message;
  EXPECT_NE(message.find("nlist = 0"), std::string::npos) << message;
}

TEST(FaissFactory, PqMustFitTheDim) {
  expect_factory_error("IVF4,PQ5", "m dividing the dim 32");
  CandidateSearchOptions mips;
  mips.mips_to_l2 = true;
  expect_factory_error("IVF4,PQ34", "m <= 33", mips);  // dim + 1 = 33 coordinates under the transform
  // FAISS's HNSW over PQ codes measures L2 only: it ranks inner products only through the transform.
  expect_factory_error("HNSW16,PQ8", "options.mips_to_l2");
}

TEST(FaissFactory, SelectorsReportBadSpecsAsErrors) {
  // make_candidate_selector checks the grammar when it is made; what depends on the dim fires at the first
  // select(). Either way a bad string is a keysel::Error naming it.
  const TestAttention a = make_attention(52);
  SelectionPolicy policy;
  policy.k = 16;
  for (const char* spec : {"IVF4,PQ0", "IVF0,Flat", "HNSW0", "HNSW1", "IVF4,PQ4x0", "IVF1000000000,Flat"}) {
    const std::string message = error_of([&] {
      auto selector = make_candidate_selector(spec, CandidateSelectorOptions{});
      run_select(*selector, a.inputs(), policy);
    });
    EXPECT_NE(message.find("argument 'factory'"), std::string::npos) << spec << ": " << message;
    EXPECT_NE(message.find(spec), std::string::npos) << spec << ": " << message;
  }
  // More lists than the 257 keys of a head: an error at training, not a FAISS abort.
  auto selector = make_candidate_selector("IVF1024,Flat", CandidateSelectorOptions{});
  const std::string message = error_of([&] { run_select(*selector, a.inputs(), policy); });
  EXPECT_NE(message.find("nlist = 1024"), std::string::npos) << message;
}

TEST(FaissFactory, ValidStringsBuildAndSearch) {
  const std::int64_t n = 300;  // enough for PQ's 256 centroids; small, because PQ training dominates the time
  const auto base = gaussian_vectors(n, kDim, 53);
  const auto queries = gaussian_vectors(4, kDim, 54);
  struct Case {
    const char* spec;
    bool mips;
  };
  const Case cases[] = {
      {"Flat", false},        {"IVF16,Flat", false},   {"IVF16,PQ8", false},         {"IVF16,PQ8x8", false},
      {"IVF16,PQ8x4", false}, {"IVF16,PQ4x4", true},  // MIPS: 33 coordinates padded to 36
      {"IVF16,SQ8", false},   {"IVF16,SQ4", false},    {"IVF16,SQ6", false},         {"IVF16,SQfp16", false},
      {"HNSW32", false},      {"HNSW2", false},        {"HNSW256", false},           {"HNSW16,Flat", false},
      {"HNSW16,SQ8", false},  {"HNSW16,PQ4", true},    {"IVF16_HNSW32,Flat", false}, {"IVF16_HNSW32,SQ8", true},
      {"IVF1,Flat", false},   {"IVF300,Flat", false},  // one list; as many lists as keys
  };
  SearchParameters params;
  params.nprobe = 16;
  params.ef_search = 64;
  for (const Case& c : cases) {
    CandidateSearchOptions options;
    options.mips_to_l2 = c.mips;
    std::unique_ptr<CandidateSearch> search;
    ASSERT_NO_THROW(search = built(c.spec, base, kDim, options)) << c.spec << (c.mips ? "+mips" : "");
    EXPECT_EQ(search->size(), n) << search->name();
    const Results r = run_search(*search, queries, 10, params);
    for (const std::int64_t id : r.ids) EXPECT_TRUE(id >= 0 && id < n) << search->name();
    EXPECT_GT(r.cost.vectors_scored, 0) << search->name();
  }
}

#endif  // KEYSEL_FAISS

// ---- query-aware lists (always built) ---------------------------------------------------------------------

/// Keys in 8 tight clusters along scaled basis directions and queries near the same directions: the case where
/// query clusters and per-list bounds can skip most lists.
void clustered(std::int64_t n, std::int64_t d, std::uint64_t seed, double scale, double noise, std::vector<float>& x) {
  RandomStream random(seed);
  x.resize(static_cast<std::size_t>(n * d));
  random.fill_normal(x, 0.0, noise);
  for (std::int64_t i = 0; i < n; ++i) x[static_cast<std::size_t>(i * d + (i * 7 + 3) % 8)] += static_cast<float>(scale);
}

std::unique_ptr<QueryAwareSearch> query_aware(const std::vector<float>& base, const std::vector<float>& train_queries,
                                              std::int64_t d, const QueryAwareOptions& options) {
  auto search = std::make_unique<QueryAwareSearch>(d, options);
  search->set_training_queries(static_cast<std::int64_t>(train_queries.size()) / d, train_queries.data());
  const std::int64_t n = static_cast<std::int64_t>(base.size()) / d;
  search->train(n, base.data());
  search->add(n, base.data());
  return search;
}

/// What the search stores: every key decoded.
std::vector<float> stored_keys(const QueryAwareSearch& search) {
  std::vector<float> out(static_cast<std::size_t>(search.size() * search.dim()));
  for (std::int64_t id = 0; id < search.size(); ++id) search.decoded(id, out.data() + id * search.dim());
  return out;
}

TEST(QueryAwareSearch, ProbedToTheEndEqualsTheExactTopKOfTheStoredKeys) {
  const auto base = gaussian_vectors(kBase, kDim, 31);
  const auto train_queries = gaussian_vectors(120, kDim, 32);
  const auto queries = gaussian_vectors(9, kDim, 33);
  for (const ListCodes codes : {ListCodes::fp32, ListCodes::sq8, ListCodes::sq4}) {
    for (const std::int64_t assignments : {1, 3}) {
      for (const bool radius : {false, true}) {
        QueryAwareOptions options;
        options.lists = 16;
        options.assignments = assignments;
        options.codes = codes;
        options.radius_bound = radius;
        const auto search = query_aware(base, train_queries, kDim, options);
        const std::vector<float> stored = stored_keys(*search);
        if (codes == ListCodes::fp32) EXPECT_EQ(stored, base);
        std::int64_t held = 0;
        for (std::int64_t j = 0; j < options.lists; ++j) held += search->list_size(j);
        EXPECT_EQ(held, kBase * assignments) << search->name();
        for (const auto& [begin, end] : {std::pair<std::int64_t, std::int64_t>{0, kBase}, {100, 350}}) {
          SearchParameters params;  // nprobe 0: safe probing to the end
          params.id_begin = begin;
          params.id_end = end;
          const Results r = run_search(*search, queries, 25, params);
          EXPECT_EQ(r.ids, reference_top(stored, queries, kDim, 25, begin, end)) << search->name() << " " << begin;
          for (std::size_t i = 0; i < r.scores.size(); ++i) {
            if (i % 25 != 0) EXPECT_GE(r.scores[i - 1], r.scores[i]);
          }
          // Cost: a bound per list, then entries of the scanned lists (never more than all copies in the range).
          EXPECT_EQ(r.cost.centroids_scored, 9.0 * 16.0);
          EXPECT_GT(r.cost.vectors_scored, 9.0 * 25.0);
          EXPECT_LE(r.cost.vectors_scored, 9.0 * static_cast<double>((end - begin) * assignments));
          // low and high codes, with the radius bound the center's code and the radius
          EXPECT_EQ(search->bound_bytes(), (radius ? 3 * (search->entry_bytes() - 4) + 4 : 2 * (search->entry_bytes() - 4)));
          EXPECT_DOUBLE_EQ(r.cost.bytes_read,
                           r.cost.vectors_scored * static_cast<double>(search->entry_bytes()) +
                               9.0 * 16.0 * static_cast<double>(search->bound_bytes()));
        }
      }
    }
  }
}

TEST(QueryAwareSearch, SafeProbingStopsEarlyWhereTheBoundsAllow) {
  std::vector<float> base, train_queries, queries;
  clustered(800, kDim, 41, 6.0, 0.2, base);
  clustered(160, kDim, 42, 1.0, 0.05, train_queries);
  clustered(8, kDim, 43, 1.0, 0.05, queries);
  QueryAwareOptions options;
  options.lists = 8;
  options.codes = ListCodes::sq8;
  const auto search = query_aware(base, train_queries, kDim, options);
  const Results r = run_search(*search, queries, 10);
  EXPECT_EQ(r.ids, reference_top(stored_keys(*search), queries, kDim, 10, 0, 800));
  // Each query's top 10 sit in its own direction's list: the safe stop scans about one list of eight.
  EXPECT_LT(r.cost.vectors_scored, 8.0 * 800.0 / 4.0);
}

/// `per_cluster` keys around each of `clusters` random unit directions times `scale`, with isotropic noise 1 in
/// every channel (directions [clusters, d] out), and `queries_per_cluster` queries near each direction.
void dense_clusters(std::int64_t clusters, std::int64_t per_cluster, std::int64_t queries_per_cluster, std::int64_t d,
                    double scale, std::uint64_t seed, std::vector<float>& keys, std::vector<float>& queries) {
  RandomStream random(seed);
  std::vector<float> directions(static_cast<std::size_t>(clusters * d));
  random.fill_normal(directions);
  for (std::int64_t j = 0; j < clusters; ++j) {
    double norm = 0;
    for (std::int64_t c = 0; c < d; ++c) norm += std::pow(directions[static_cast<std::size_t>(j * d + c)], 2);
    for (std::int64_t c = 0; c < d; ++c) directions[static_cast<std::size_t>(j * d + c)] /= static_cast<float>(std::sqrt(norm));
  }
  keys.resize(static_cast<std::size_t>(clusters * per_cluster * d));
  random.fill_normal(keys);
  for (std::int64_t i = 0; i < clusters * per_cluster; ++i) {
    for (std::int64_t c = 0; c < d; ++c) {
      keys[static_cast<std::size_t>(i * d + c)] += static_cast<float>(scale) * directions[static_cast<std::size_t>((i % clusters) * d + c)];
    }
  }
  queries.resize(static_cast<std::size_t>(clusters * queries_per_cluster * d));
  random.fill_normal(queries, 0.0, 0.01);
  for (std::int64_t i = 0; i < clusters * queries_per_cluster; ++i) {
    for (std::int64_t c = 0; c < d; ++c) {
      queries[static_cast<std::size_t>(i * d + c)] += directions[static_cast<std::size_t>((i % clusters) * d + c)];
    }
  }
}

TEST(QueryAwareSearch, CenterRadiusBoundStopsWhereChannelBoxesCannot) {
  // Dense directions in 128 channels: a list's channel box adds about 3 |q|_1 (27 |q|) of noise to its bound, its
  // radius about 13 |q|, while the top-10 scores sit at about 16 + 1.6 and other clusters' centers at |q.c| < 5.
  constexpr std::int64_t d = 128, clusters = 8, per_cluster = 400;
  std::vector<float> keys, train_queries, queries;
  // One training query per direction, so that the query clusters are the directions whatever k-means' start.
  dense_clusters(clusters, per_cluster, 1, d, 16.0, 71, keys, train_queries);
  std::vector<float> unused;
  dense_clusters(clusters, 1, 3, d, 16.0, 71, unused, queries);  // three queries per direction (same directions)
  constexpr std::int64_t n = clusters * per_cluster, k = 10;
  for (const ListCodes codes : {ListCodes::fp32, ListCodes::sq8, ListCodes::sq4}) {
    for (const bool radius : {false, true}) {
      QueryAwareOptions options;
      options.lists = clusters;
      options.codes = codes;
      options.radius_bound = radius;
      const auto search = query_aware(keys, train_queries, d, options);
      for (std::int64_t j = 0; j < clusters; ++j) EXPECT_EQ(search->list_size(j), per_cluster) << search->name();
      const Results r = run_search(*search, queries, k);
      // Safe probing stays exact whichever bound stops it.
      EXPECT_EQ(r.ids, reference_top(stored_keys(*search), queries, d, k, 0, n)) << search->name() << " " << radius;
      const double scanned_lists = r.cost.vectors_scored / (static_cast<double>(clusters) * per_cluster);
      if (radius) {
        EXPECT_LE(scanned_lists, 3 * 1.5) << search->name();  // about each query's own list
      } else {
        EXPECT_GE(scanned_lists, 3 * 6.0) << search->name();  // the boxes skip almost nothing
      }
    }
  }
}

TEST(QueryAwareSearch, SharedScanEqualsSearchingEachQueryAloneAndReadsEachListOnce) {
  const auto base = gaussian_vectors(kBase, kDim, 81);
  const auto train_queries = gaussian_vectors(90, kDim, 82);
  const auto group = gaussian_vectors(4, kDim, 83);  // a GQA group's four query heads
  QueryAwareOptions options;
  options.lists = 12;
  options.codes = ListCodes::sq4;
  const auto search = query_aware(base, train_queries, kDim, options);
  for (const std::int64_t nprobe : {0, 2, 5}) {
    SearchParameters alone;
    alone.nprobe = nprobe;
    alone.id_begin = 20;
    alone.id_end = 500;
    SearchParameters shared = alone;
    shared.shared_scan = true;
    const Results a = run_search(*search, group, 7, alone), b = run_search(*search, group, 7, shared);
    EXPECT_EQ(a.ids, b.ids) << nprobe;
    EXPECT_EQ(a.scores, b.scores) << nprobe;
    EXPECT_EQ(a.cost.vectors_scored, b.cost.vectors_scored) << nprobe;
    EXPECT_LT(b.cost.bytes_read, a.cost.bytes_read) << nprobe;
    // At least what any one query reads alone, at most the sum of a single pass over each list.
    double most = 0;
    for (std::int64_t i = 0; i < 4; ++i) {
      const std::vector<float> one(group.begin() + i * kDim, group.begin() + (i + 1) * kDim);
      most = std::max(most, run_search(*search, one, 7, alone).cost.bytes_read);
    }
    EXPECT_GE(b.cost.bytes_read, most) << nprobe;
    EXPECT_LE(b.cost.bytes_read, static_cast<double>(480 * search->entry_bytes() + 12 * search->bound_bytes()));
    // Four copies of one query read what one reads.
    std::vector<float> copies;
    for (int i = 0; i < 4; ++i) copies.insert(copies.end(), group.begin(), group.begin() + kDim);
    const std::vector<float> first(group.begin(), group.begin() + kDim);
    EXPECT_DOUBLE_EQ(run_search(*search, copies, 7, shared).cost.bytes_read,
                     run_search(*search, first, 7, alone).cost.bytes_read) << nprobe;
  }
}

TEST(QueryAwareSearch, CutShortSearchesTradeRecallForCost) {
  const auto base = gaussian_vectors(kBase, kDim, 51);
  const auto train_queries = gaussian_vectors(100, kDim, 52);
  const auto queries = gaussian_vectors(6, kDim, 53);
  QueryAwareOptions options;
  options.lists = 12;
  options.assignments = 2;
  const auto search = query_aware(base, train_queries, kDim, options);
  const auto reference = run_search(*search, queries, 20).ids;
  double last_cost = 0;
  for (const std::int64_t nprobe : {1, 3, 6, 12}) {
    SearchParameters params;
    params.nprobe = nprobe;
    const Results r = run_search(*search, queries, 20, params);
    EXPECT_GE(r.cost.vectors_scored, last_cost) << nprobe;
    last_cost = r.cost.vectors_scored;
    if (nprobe == 1) EXPECT_LT(recall(r.ids, reference, 20), 1.0);
    if (nprobe == 12) EXPECT_EQ(r.ids, reference);
  }
}

TEST(QueryAwareSearch, AppendThenSearchEqualsBuildThenSearch) {
  const auto base = gaussian_vectors(kBase, kDim, 61);
  const auto train_queries = gaussian_vectors(80, kDim, 62);
  const auto queries = gaussian_vectors(5, kDim, 63);
  QueryAwareOptions options;
  options.lists = 10;
  options.assignments = 2;
  options.codes = ListCodes::sq4;
  options.radius_bound = true;  // the centers and radii follow the appended keys
  const auto once = query_aware(base, train_queries, kDim, options);
  QueryAwareSearch grown(kDim, options);
  grown.set_training_queries(80, train_queries.data());
  grown.train(250, base.data());  // the prefill
  grown.add(250, base.data());
  grown.add(kBase - 250, base.data() + 250 * kDim);  // decoded tokens
  QueryAwareSearch prefill_trained(kDim, options);
  prefill_trained.set_training_queries(80, train_queries.data());
  prefill_trained.train(250, base.data());
  prefill_trained.add(kBase, base.data());
  EXPECT_EQ(grown.size(), kBase);
  for (std::int64_t j = 0; j < options.lists; ++j) EXPECT_EQ(grown.list_size(j), prefill_trained.list_size(j));
  EXPECT_EQ(grown.clamped_values(), prefill_trained.clamped_values());
  EXPECT_GT(grown.clamped_values(), 0);  // keys after the prefill leave its channel ranges
  for (const std::int64_t nprobe : {0, 3}) {
    SearchParameters params;
    params.nprobe = nprobe;
    const Results a = run_search(grown, queries, 15, params), b = run_search(prefill_trained, queries, 15, params);
    EXPECT_EQ(a.ids, b.ids);
    EXPECT_EQ(a.scores, b.scores);
    EXPECT_EQ(a.cost.bytes_read, b.cost.bytes_read);
  }
  // Trained on every key, the same queries find the exact top-k of what it stores.
  EXPECT_EQ(run_search(*once, queries, 15).ids, reference_top(stored_keys(*once), queries, kDim, 15, 0, kBase));
}

TEST(QueryAwareSearch, ConcurrentSearchesAgreeWithSerialOnes) {
  const auto base = gaussian_vectors(kBase, kDim, 71);
  const auto train_queries = gaussian_vectors(64, kDim, 72);
  const auto queries = gaussian_vectors(16, kDim, 73);
  QueryAwareOptions options;
  options.lists = 8;
  options.assignments = 2;
  const auto search = query_aware(base, train_queries, kDim, options);
  SearchParameters params;
  params.nprobe = 3;
  params.id_begin = 40;
  const Results serial = run_search(*search, queries, 12, params);
  std::atomic<int> mismatches{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int repeat = 0; repeat < 5; ++repeat) {
        const Results r = run_search(*search, queries, 12, params);  // 16 queries: parallel inside as well
        if (r.ids != serial.ids || r.scores != serial.scores) ++mismatches;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(mismatches.load(), 0);
}

TEST(QueryAwareSearch, BadInputGivesAClearError) {
  const auto base = gaussian_vectors(100, kDim, 81);
  const auto expect_error = [](auto&& call, const std::string& needle) {
    try {
      call();
      ADD_FAILURE() << "expected keysel::Error containing " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  QueryAwareOptions options;
  options.lists = 8;
  expect_error([&] { QueryAwareSearch(kDim, options).train(100, base.data()); }, "training queries");
  expect_error([&] {
    QueryAwareSearch s(kDim, options);
    s.set_training_queries(4, base.data());  // 4 queries for 8 lists
    s.train(100, base.data());
  }, "training queries");
  expect_error([&] { make_candidate_search("QueryIVF0,SQ8", kDim); }, "lists");
  expect_error([&] { make_candidate_search("QueryIVF8x9,SQ8", kDim); }, "assignments");
  expect_error([&] { make_candidate_search("QueryIVF8,PQ8", kDim); }, "SQ4");
  expect_error([&] { make_candidate_search("QueryIVF8,SQ4", 7); }, "even dim");
  std::vector<float> bad(kDim, 1.0f);
  bad[3] = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { QueryAwareSearch(kDim, options).set_training_queries(1, bad.data()); }, "queries[0, 3]");
  EXPECT_EQ(make_candidate_search("QueryIVF8x2,SQ4", kDim)->name(), "QueryIVF8x2,SQ4");
  EXPECT_EQ(make_candidate_search("QueryIVF8,SQ8,Radius", kDim)->name(), "QueryIVF8,SQ8,Radius");
  expect_error([&] { make_candidate_search("QueryIVF8,SQ8,Box", kDim); }, "Radius");
}

TEST(CandidateSelector, QueryAwareAppendThenSelectEqualsBuildThenSelect) {
  const TestAttention full = make_attention(93, 300);
  TestAttention prefill = full;  // the first 200 keys, as the cache held them before decoding
  prefill.keys = 200;
  prefill.positions = {3, 40, 100, 198, 199};
  const TensorView training(full.q.data(), DType::fp32, {full.tokens, full.query_heads, full.dim});
  SelectionPolicy policy;
  policy.k = 20;
  policy.n_sink = 2;
  policy.n_local = 2;
  CandidateSelectorOptions options;
  options.train_keys = 200;
  options.search.nprobe = 2;
  options.rerank_stored = true;
  auto grown = make_candidate_selector("QueryIVF4x2,SQ4", options);
  grown->set_training_queries(training);
  run_select(*grown, prefill.inputs(), policy);  // builds over 200 keys
  const auto appended = run_select(*grown, full.inputs(), policy);  // same memory, longer view: appends 100
  EXPECT_EQ(grown->size(), 300);
  EXPECT_EQ(grown->retrain_count(), 0);
  auto fresh = make_candidate_selector("QueryIVF4x2,SQ4", options);
  fresh->set_training_queries(training);
  EXPECT_EQ(run_select(*fresh, full.inputs(), policy), appended);
  // Retraining keeps the training queries (a retrain without them would throw).
  grown->retrain();
  EXPECT_EQ(grown->retrain_count(), 1);
  EXPECT_EQ(grown->trained_size(), 300);
  EXPECT_NO_THROW(run_select(*grown, full.inputs(), policy));
}

TEST(CandidateSelector, QueryAwareWithFullOverFetchEqualsExactTopK) {
  const TestAttention a = make_attention(91);
  SelectionPolicy policy;
  policy.k = 24;
  policy.n_sink = 2;
  policy.n_local = 3;
  CandidateSelectorOptions options;
  options.candidates = a.keys;
  // Trained on the request's queries (5 tokens x 2 heads per key head: 10 per index).
  auto selector = make_candidate_selector("QueryIVF4x2,Flat", options);
  EXPECT_EQ(run_select(*selector, a.inputs(), policy), exact_selection(a.inputs(), policy));
  EXPECT_TRUE(selector->index(0).uses_queries());
  // Trained on given queries instead; 4-bit codes re-ranked exactly over every free key: still exact.
  const TestAttention other = make_attention(92);
  auto coded = make_candidate_selector("QueryIVF4,SQ4", options);
  coded->set_training_queries(TensorView(other.q.data(), DType::fp32, {other.tokens, other.query_heads, other.dim}));
  EXPECT_EQ(run_select(*coded, a.inputs(), policy), exact_selection(a.inputs(), policy));
  // Cut short at one list with k' = free slots: a valid, cheaper selection.
  options.candidates = 0;
  options.search.nprobe = 1;
  auto cheap = make_candidate_selector("QueryIVF4,SQ8", options);
  SelectionCost cost;
  const auto got = run_select(*cheap, a.inputs(), policy, &cost);
  validate_selection("test", TensorView(got.data(), DType::int32, {a.tokens, a.kv_heads, policy.k}), "got",
                     a.inputs().positions, a.keys, a.kv_heads);
  EXPECT_GT(cost.key_bytes_read, 0);
  // The re-rank over the stored vectors: exact with fp32 lists, and it reads codes, not fp32 keys.
  options.candidates = a.keys;
  options.search.nprobe = 0;
  options.rerank_stored = true;
  auto stored = make_candidate_selector("QueryIVF4x2,Flat", options);
  EXPECT_EQ(run_select(*stored, a.inputs(), policy), exact_selection(a.inputs(), policy));
  SelectionCost fp32_cost, code_cost;
  auto plain_options = options;
  plain_options.rerank_stored = false;
  run_select(*make_candidate_selector("QueryIVF4,SQ4", plain_options), a.inputs(), policy, &fp32_cost);
  run_select(*make_candidate_selector("QueryIVF4,SQ4", options), a.inputs(), policy, &code_cost);
  EXPECT_LT(code_cost.key_bytes_read, fp32_cost.key_bytes_read);
  EXPECT_EQ(code_cost.keys_scored, fp32_cost.keys_scored);
}

}  // namespace
}  // namespace keysel
