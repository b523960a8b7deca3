// The per-call selection contract (selector.h): one request per call with the step's indexer inputs and an
// explicit cache state, checked once for every selector before anything is written.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "keysel/core/random.h"
#include "keysel/indexer/candidate_search.h"
#include "keysel/indexer/lightning_indexer.h"
#include "keysel/indexer/selector.h"
#include "keysel/indexer/selectors.h"

namespace keysel {
namespace {

/// A decode-shaped attention over its own buffers: q [T, Hq, D], k [N, Hkv, D], positions [T].
struct Attention {
  std::int64_t T, N, Hq, Hkv, D;
  std::vector<float> q, k;
  std::vector<std::int32_t> positions;

  Attention(std::uint64_t seed, std::int64_t tokens, std::int64_t keys, std::int64_t hq, std::int64_t hkv,
            std::int64_t dim)
      : T(tokens), N(keys), Hq(hq), Hkv(hkv), D(dim) {
    RandomStream rng(seed);
    q.resize(static_cast<std::size_t>(T * Hq * D));
    k.resize(static_cast<std::size_t>(N * Hkv * D));
    rng.fill_normal(q, 0.0, 2.0);
    rng.fill_normal(k);
    for (std::int64_t t = 0; t < T; ++t) positions.push_back(static_cast<std::int32_t>(N - T + t));
  }
  /// The attention over the first n keys (the queries at the last positions of those n).
  SelectionRequest request(std::int64_t n, const float* keys = nullptr) const {
    AttentionInputs in;
    in.q = TensorView(q.data(), DType::fp32, {T, Hq, D});
    in.k = TensorView(keys != nullptr ? keys : k.data(), DType::fp32, {n, Hkv, D});
    in.positions = TensorView(positions_for(n).data(), DType::int32, {T});
    return SelectionRequest::of(in);
  }
  const std::vector<std::int32_t>& positions_for(std::int64_t n) const {
    shifted.clear();
    for (std::int64_t t = 0; t < T; ++t) shifted.push_back(static_cast<std::int32_t>(n - T + t));
    return shifted;
  }
  mutable std::vector<std::int32_t> shifted;
};

std::vector<std::int32_t> run(Selector& selector, const SelectionRequest& request, const SelectionPolicy& policy) {
  const std::int64_t groups = group_count(policy.granularity, request.attention.q.size(1), request.attention.k.size(1));
  std::vector<std::int32_t> out(static_cast<std::size_t>(request.attention.q.size(0) * groups * policy.width()), -7);
  selector.select(request, policy,
                  TensorView(out.data(), DType::int32, {request.attention.q.size(0), groups, policy.width()}));
  return out;
}

std::string error_of(const std::function<void()>& call) {
  try {
    call();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no keysel::Error";
  return "";
}

TEST(SelectionRequest, EverySelectorChecksTheRequestOnceBeforeWriting) {
  const Attention a(1, 3, 64, 4, 2, 8);
  const SelectionPolicy policy{8, Granularity::per_kv_head, 1, 1, false};
  std::vector<float> queries(3 * 2 * 4, 0.5f), weights(3 * 2, 1.0f), short_weights(3, 1.0f);
  std::vector<std::unique_ptr<Selector>> selectors;
  selectors.push_back(make_exact_selector());
  selectors.push_back(make_random_selector(1));
  selectors.push_back(make_streaming_selector(2));
  selectors.push_back(make_block_topk_selector({8, 1.0}));
  selectors.push_back(make_hybrid_selector(make_random_selector(2), 16));
  selectors.push_back(make_candidate_selector("brute_force"));
  for (auto& selector : selectors) {
    std::vector<std::int32_t> out(3 * 2 * 8, -7);
    const TensorView selection(out.data(), DType::int32, {3, 2, 8});
    SelectionRequest bad = a.request(64);
    bad.indexer_queries = TensorView(queries.data(), DType::fp32, {3, 2, 4});
    bad.indexer_weights = TensorView(short_weights.data(), DType::fp32, {3, 1});
    EXPECT_NE(error_of([&] { selector->select(bad, policy, selection); }).find("request.indexer_weights"),
              std::string::npos)
        << selector->name();
    SelectionRequest wrong_t = a.request(64);
    wrong_t.indexer_queries = TensorView(queries.data(), DType::fp32, {2, 3, 4});
    wrong_t.indexer_weights = TensorView(weights.data(), DType::fp32, {2, 3});
    EXPECT_NE(error_of([&] { selector->select(wrong_t, policy, selection); }).find("request.indexer_queries"),
              std::string::npos)
        << selector->name();
    SelectionRequest beyond = a.request(64);
    beyond.cache = CacheReuse::appended;
    beyond.unchanged_keys = 65;
    EXPECT_NE(error_of([&] { selector->select(beyond, policy, selection); }).find("request.unchanged_keys"),
              std::string::npos)
        << selector->name();
    for (const std::int32_t x : out) ASSERT_EQ(x, -7) << selector->name();
  }
}

TEST(SelectionRequest, AnIndexerSelectorTakesEachStepsQueriesAsAnEngineDecodes) {
  // An engine's loop: append the step's indexer key, then select with the step's indexer queries and weights.
  constexpr std::int64_t HI = 3, DI = 16, steps = 40, first = 25;
  RandomStream rng(5);
  std::vector<float> keys(static_cast<std::size_t>((first + steps) * DI));
  std::vector<float> queries(static_cast<std::size_t>(steps * HI * DI)), weights(static_cast<std::size_t>(steps * HI));
  rng.fill_normal(keys);
  rng.fill_normal(queries);
  rng.fill_normal(weights);
  auto indexer = std::make_shared<LightningIndexer>(HI, DI);
  indexer->append_keys(keys.data(), first);
  auto selector = make_indexer_selector(indexer, "engine");
  const Attention main(6, 1, first + steps, 4, 2, 8);
  const SelectionPolicy policy{12, Granularity::per_token, 2, 3, false};
  for (std::int64_t step = 0; step < steps; ++step) {
    indexer->append_keys(keys.data() + (first + step) * DI, 1);
    const std::int64_t n = first + step + 1;
    SelectionRequest request = main.request(n);
    request.indexer_queries = TensorView(queries.data() + step * HI * DI, DType::fp32, {1, HI, DI});
    request.indexer_weights = TensorView(weights.data() + step * HI, DType::fp32, {1, HI});
    request.cache = CacheReuse::appended;
    request.unchanged_keys = n - 1;
    const std::vector<std::int32_t> got = run(*selector, request, policy);
    // The same step through the indexer itself.
    std::vector<std::int32_t> want(static_cast<std::size_t>(policy.width()), -7);
    indexer->select(request.indexer_queries, request.indexer_weights, request.attention.positions, policy,
                    TensorView(want.data(), DType::int32, {1, 1, policy.width()}));
    ASSERT_EQ(got, want) << "step " << step;
  }
  // Without the step's indexer inputs there is nothing to score with.
  EXPECT_NE(error_of([&] { run(*selector, main.request(first + steps), policy); }).find("request.indexer_queries"),
            std::string::npos);
}

TEST(SelectionRequest, CandidateIndexesFollowTheDeclaredCacheState) {
  const Attention a(7, 2, 300, 4, 2, 16);
  CandidateSelectorOptions options;
  options.candidates = 40;
  const SelectionPolicy policy{20, Granularity::per_kv_head, 0, 0, false};
  auto fresh_result = [&](const SelectionRequest& request) {
    return run(*make_candidate_selector("brute_force", options), request, policy);
  };

  // Declared unchanged: the 200 indexed keys stay even though this cache lives in other memory.
  std::vector<float> copy = a.k;
  auto selector = make_candidate_selector("brute_force", options);
  run(*selector, a.request(200), policy);
  SelectionRequest grown = a.request(300, copy.data());
  grown.cache = CacheReuse::appended;
  grown.unchanged_keys = 200;
  EXPECT_EQ(run(*selector, grown, policy), fresh_result(grown));
  EXPECT_EQ(selector->size(), 300);

  // A declaration is trusted: rewritten keys declared unchanged keep their old vectors (this is what makes the
  // reuse free), so the result is the one over the old keys...
  std::fill(copy.begin(), copy.begin() + 100 * 2 * 16, 0.25f);
  SelectionRequest lied = a.request(300, copy.data());
  lied.cache = CacheReuse::appended;
  lied.unchanged_keys = 300;
  EXPECT_EQ(run(*selector, lied, policy), fresh_result(a.request(300)));
  // ...and CacheReuse::fresh rebuilds over what is there now.
  SelectionRequest told = a.request(300, copy.data());
  told.cache = CacheReuse::fresh;
  EXPECT_EQ(run(*selector, told, policy), fresh_result(told));
  EXPECT_NE(run(*selector, told, policy), fresh_result(a.request(300)));
}

TEST(SelectionRequest, BlockSummariesFollowTheDeclaredCacheState) {
  const Attention a(8, 1, 200, 4, 2, 16);
  const SelectionPolicy policy{24, Granularity::per_kv_head, 2, 4, false};
  auto fresh_result = [&](const SelectionRequest& request) {
    return run(*make_block_topk_selector({8, 2.0}), request, policy);
  };
  // Decode steps over a cache whose memory moves every step: declared appends give what fresh summaries give.
  auto selector = make_block_topk_selector({8, 2.0});  // reuse_summaries off: only declarations reuse
  std::int64_t previous = 0;
  for (const std::int64_t n : {60, 61, 64, 65, 130, 200}) {
    std::vector<float> moved(a.k.begin(), a.k.begin() + n * 2 * 16);
    SelectionRequest request = a.request(n, moved.data());
    request.cache = previous == 0 ? CacheReuse::fresh : CacheReuse::appended;
    request.unchanged_keys = previous;
    EXPECT_EQ(run(*selector, request, policy), fresh_result(request)) << "N = " << n;
    previous = n;
  }
  // A declaration is trusted: keys rewritten but declared unchanged keep their old summaries.
  std::vector<float> rewritten = a.k;
  for (std::int64_t i = 0; i < 96 * 2 * 16; ++i) rewritten[static_cast<std::size_t>(i)] *= -3.0f;
  SelectionRequest lied = a.request(200, rewritten.data());
  lied.cache = CacheReuse::appended;
  lied.unchanged_keys = 200;
  const auto stale = run(*selector, lied, policy);
  lied.cache = CacheReuse::fresh;
  EXPECT_EQ(run(*selector, lied, policy), fresh_result(lied));
  EXPECT_NE(stale, fresh_result(lied));
}

}  // namespace
}  // namespace keysel
