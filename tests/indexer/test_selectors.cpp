// The baseline selectors (exact, random, streaming): valid selections on awkward shapes, the keys each one is
// defined to pick, determinism, cost, and argument checks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "keysel/core/error.h"
#include "keysel/core/random.h"
#include "keysel/core/selection.h"
#include "keysel/core/threads.h"
#include "keysel/indexer/selector.h"
#include "keysel/indexer/topk.h"

namespace keysel {
namespace {

/// Random q and k (v empty) with chosen positions.
struct Inputs {
  std::int64_t tokens, keys, query_heads, kv_heads, dim;
  std::vector<float> q, k;
  std::vector<std::int32_t> positions;

  Inputs(std::int64_t n_keys, std::vector<std::int32_t> pos, std::int64_t hq, std::int64_t hkv, std::int64_t d,
         std::uint64_t seed = 3)
      : tokens(static_cast<std::int64_t>(pos.size())), keys(n_keys), query_heads(hq), kv_heads(hkv), dim(d),
        positions(std::move(pos)) {
    q.resize(static_cast<std::size_t>(tokens * hq * d));
    k.resize(static_cast<std::size_t>(n_keys * hkv * d));
    RandomStream random(seed);
    random.fill_normal(std::span<float>(q));
    random.fill_normal(std::span<float>(k));
  }
  AttentionInputs view() const {
    AttentionInputs in;
    in.q = TensorView(q.data(), DType::fp32, {tokens, query_heads, dim});
    in.k = TensorView(k.data(), DType::fp32, {keys, kv_heads, dim});
    in.positions = TensorView(positions.data(), DType::int32, {tokens});
    return in;
  }
  std::int64_t groups(Granularity g) const { return group_count(g, query_heads, kv_heads); }
  std::int64_t allowed(std::int64_t t) const { return allowed_keys(positions[static_cast<std::size_t>(t)], keys); }
};

struct Selection {
  std::vector<std::int32_t> data;
  TensorView view;
  std::int64_t groups, width;
  Selection(std::int64_t tokens, std::int64_t g, std::int64_t w, std::int32_t fill = 12345)
      : data(static_cast<std::size_t>(tokens * g * w), fill), groups(g), width(w) {
    view = TensorView(data.data(), DType::int32, {tokens, g, w});
  }
  std::vector<std::int32_t> row(std::int64_t t, std::int64_t g) const {
    const auto first = data.begin() + (t * groups + g) * width;
    std::vector<std::int32_t> out(first, first + width);
    out.erase(std::remove(out.begin(), out.end(), -1), out.end());
    return out;
  }
};

SelectionPolicy make_policy(std::int64_t k, Granularity g, std::int64_t n_sink = 0, std::int64_t n_local = 0,
                            bool on_top = false) {
  SelectionPolicy p;
  p.k = k;
  p.granularity = g;
  p.n_sink = n_sink;
  p.n_local = n_local;
  p.kept_on_top = on_top;
  return p;
}

std::vector<std::unique_ptr<Selector>> all_selectors() {
  std::vector<std::unique_ptr<Selector>> out;
  out.push_back(make_exact_selector());
  out.push_back(make_random_selector(11));
  out.push_back(make_streaming_selector(3));
  return out;
}

/// The SPEC §2 rules every selector's output follows: valid (distinct, allowed, padding at the end), ascending,
/// min(width, allowed) keys per row, and the policy's kept keys present.
void expect_well_formed(const Inputs& in, const SelectionPolicy& policy, const Selection& sel, const std::string& who) {
  SCOPED_TRACE(who + " k=" + std::to_string(policy.k) + " sinks=" + std::to_string(policy.n_sink) +
               " local=" + std::to_string(policy.n_local) + (policy.kept_on_top ? " on top " : " ") +
               std::string(granularity_name(policy.granularity)));
  const AttentionInputs view = in.view();
  ASSERT_NO_THROW(validate_selection("test", sel.view, "selection", view.positions, in.keys, sel.groups));
  for (std::int64_t t = 0; t < in.tokens; ++t) {
    const std::int64_t allowed = in.allowed(t);
    for (std::int64_t g = 0; g < sel.groups; ++g) {
      const std::vector<std::int32_t> row = sel.row(t, g);
      EXPECT_EQ(static_cast<std::int64_t>(row.size()), std::min(policy.width(), allowed)) << "t=" << t << " g=" << g;
      EXPECT_TRUE(std::is_sorted(row.begin(), row.end())) << "t=" << t << " g=" << g;
      for (std::int64_t s = 0; s < std::min(policy.n_sink, allowed); ++s) {
        EXPECT_NE(std::find(row.begin(), row.end(), s), row.end()) << "sink " << s << " t=" << t;
      }
      for (std::int64_t s = std::max<std::int64_t>(0, allowed - policy.n_local); s < allowed; ++s) {
        EXPECT_NE(std::find(row.begin(), row.end(), s), row.end()) << "local key " << s << " t=" << t;
      }
    }
  }
}

TEST(Selectors, NamesAreTheTableNames) {
  const auto selectors = all_selectors();
  EXPECT_EQ(selectors[0]->name(), "exact");
  EXPECT_EQ(selectors[1]->name(), "random");
  EXPECT_EQ(selectors[2]->name(), "streaming");
}

TEST(Selectors, EveryOutputIsAValidSelectionOnAwkwardShapes) {
  // N = 37 keys; positions from the first key to the last, in no order; Hq = 6 over Hkv = 2 (g = 3); D = 7.
  const Inputs in(37, {0, 36, 1, 3, 20, 35}, 6, 2, 7);
  const auto selectors = all_selectors();
  for (const Granularity gran : {Granularity::per_head, Granularity::per_kv_head, Granularity::per_token}) {
    for (const SelectionPolicy& policy :
         {make_policy(1, gran), make_policy(5, gran), make_policy(64, gran), make_policy(5, gran, 2, 3),
          make_policy(8, gran, 4, 0), make_policy(8, gran, 0, 8), make_policy(3, gran, 2, 3, true),
          make_policy(16, gran, 1, 2, true), make_policy(40, gran, 2, 2, true)}) {
      for (const auto& selector : selectors) {
        Selection sel(in.tokens, in.groups(gran), policy.width());
        const SelectionCost cost = selector->select(in.view(), policy, sel.view);
        expect_well_formed(in, policy, sel, selector->name());
        EXPECT_EQ(cost.rows, in.tokens * in.groups(gran));
        EXPECT_GE(cost.seconds, 0.0);
      }
    }
  }
}

TEST(Selectors, ExactEqualsExactTopk) {
  const Inputs in(53, {52, 10, 0, 33}, 8, 2, 16);
  for (const Granularity gran : {Granularity::per_head, Granularity::per_kv_head, Granularity::per_token}) {
    for (const SelectionPolicy& policy : {make_policy(7, gran), make_policy(9, gran, 2, 3), make_policy(4, gran, 1, 1, true)}) {
      Selection expected(in.tokens, in.groups(gran), policy.width());
      Selection got(in.tokens, in.groups(gran), policy.width());
      exact_topk(in.view(), policy, expected.view);
      make_exact_selector()->select(in.view(), policy, got.view);
      EXPECT_EQ(got.data, expected.data) << granularity_name(gran) << " k=" << policy.k;
    }
  }
}

TEST(Selectors, ExactCostCountsEveryAllowedKey) {
  // Hq = 8, Hkv = 2, D = 16, fp32 keys; positions 52 and 9 allow 53 + 10 keys.
  const Inputs in(53, {52, 9}, 8, 2, 16);
  const double allowed = 53 + 10;
  {
    Selection sel(2, 2, 4);
    const SelectionCost c = make_exact_selector()->select(in.view(), make_policy(4, Granularity::per_kv_head), sel.view);
    EXPECT_EQ(c.rows, 4);
    EXPECT_DOUBLE_EQ(c.keys_scored, allowed * 2);
    EXPECT_DOUBLE_EQ(c.macs, allowed * 2 * 16 * 4);            // 4 query heads per group
    EXPECT_DOUBLE_EQ(c.key_bytes_read, allowed * 2 * 16 * 4);  // one key head, 4 bytes per element
  }
  {
    Selection sel(2, 1, 4);
    const SelectionCost c = make_exact_selector()->select(in.view(), make_policy(4, Granularity::per_token), sel.view);
    EXPECT_EQ(c.rows, 2);
    EXPECT_DOUBLE_EQ(c.keys_scored, allowed);
    EXPECT_DOUBLE_EQ(c.macs, allowed * 16 * 8);
    EXPECT_DOUBLE_EQ(c.key_bytes_read, allowed * 16 * 4 * 2);  // both key heads
  }
}

TEST(Selectors, RandomAndStreamingScoreNothing) {
  const Inputs in(40, {39, 20}, 4, 2, 8);
  std::vector<std::unique_ptr<Selector>> selectors;
  selectors.push_back(make_random_selector(1));
  selectors.push_back(make_streaming_selector(4));
  for (const auto& selector : selectors) {
    Selection sel(2, 2, 8);
    const SelectionCost c = selector->select(in.view(), make_policy(8, Granularity::per_kv_head), sel.view);
    EXPECT_EQ(c.keys_scored, 0.0) << selector->name();
    EXPECT_EQ(c.macs, 0.0) << selector->name();
    EXPECT_EQ(c.key_bytes_read, 0.0) << selector->name();
    EXPECT_EQ(c.rows, 4) << selector->name();
  }
}

TEST(Selectors, CostsAdd) {
  SelectionCost a{1, 2, 3, 4, 5};
  const SelectionCost b{10, 20, 30, 40, 50};
  a += b;
  EXPECT_EQ(a.key_bytes_read, 11);
  EXPECT_EQ(a.macs, 22);
  EXPECT_EQ(a.keys_scored, 33);
  EXPECT_EQ(a.seconds, 44);
  EXPECT_EQ(a.rows, 55);
}

TEST(Selectors, RandomIsDeterministicPerSeedAndIndependentOfThreads) {
  const Inputs in(1000, {999, 998, 500, 100}, 8, 4, 4);
  const SelectionPolicy policy = make_policy(32, Granularity::per_head, 2, 4);
  const auto run = [&](std::uint64_t seed, int threads) {
    ScopedThreads scoped(threads);
    Selection sel(in.tokens, in.groups(policy.granularity), policy.width());
    make_random_selector(seed)->select(in.view(), policy, sel.view);
    return sel.data;
  };
  const auto first = run(5, 1);
  EXPECT_EQ(run(5, 1), first);
  EXPECT_EQ(run(5, 2), first);
  EXPECT_EQ(run(5, 3), first);
  EXPECT_NE(run(6, 1), first);
  // Rows differ from each other too: each (t, group) has its own stream.
  Selection sel(in.tokens, in.groups(policy.granularity), policy.width());
  make_random_selector(5)->select(in.view(), policy, sel.view);
  EXPECT_NE(sel.row(0, 0), sel.row(0, 1));
  EXPECT_NE(sel.row(0, 0), sel.row(1, 0));
}

TEST(Selectors, RandomSpreadsOverTheFreeKeys) {
  // 1 sink, 1 local key, free keys 1 .. 98 of N = 100; 2 of them per row over 4000 rows.
  const std::int64_t rows = 4000;
  const Inputs in(100, std::vector<std::int32_t>(static_cast<std::size_t>(rows), 99), 1, 1, 1);
  const SelectionPolicy policy = make_policy(4, Granularity::per_head, 1, 1);
  Selection sel(rows, 1, 4);
  make_random_selector(9)->select(in.view(), policy, sel.view);
  std::vector<int> hits(100, 0);
  for (std::int64_t t = 0; t < rows; ++t) {
    for (const std::int32_t s : sel.row(t, 0)) ++hits[static_cast<std::size_t>(s)];
  }
  EXPECT_EQ(hits[0], rows);
  EXPECT_EQ(hits[99], rows);
  // 8000 picks over 98 keys: about 81.6 each, stddev about 9.
  for (int s = 1; s < 99; ++s) {
    EXPECT_GT(hits[static_cast<std::size_t>(s)], 40) << s;
    EXPECT_LT(hits[static_cast<std::size_t>(s)], 130) << s;
  }
}

TEST(Selectors, StreamingPicksSinksAndTheMostRecentKeys) {
  const Inputs in(100, {99, 50, 9, 2}, 4, 2, 8);
  const auto streaming = make_streaming_selector(4);
  const auto range = [](std::int32_t first, std::int32_t last) {  // [first, last)
    std::vector<std::int32_t> out;
    for (std::int32_t s = first; s < last; ++s) out.push_back(s);
    return out;
  };
  const auto concat = [](std::vector<std::int32_t> a, const std::vector<std::int32_t>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  };
  {
    Selection sel(4, 2, 10);
    streaming->select(in.view(), make_policy(10, Granularity::per_kv_head), sel.view);
    for (std::int64_t g = 0; g < 2; ++g) {
      EXPECT_EQ(sel.row(0, g), concat(range(0, 4), range(94, 100)));
      EXPECT_EQ(sel.row(1, g), concat(range(0, 4), range(45, 51)));
      EXPECT_EQ(sel.row(2, g), range(0, 10));
      EXPECT_EQ(sel.row(3, g), range(0, 3));
    }
  }
  {
    // The policy's 6 sinks win over the selector's 4; a local window of 2 is inside the recent block.
    Selection sel(4, 1, 10);
    streaming->select(in.view(), make_policy(10, Granularity::per_token, 6, 2), sel.view);
    EXPECT_EQ(sel.row(0, 0), concat(range(0, 6), range(96, 100)));
  }
  {
    // k = 3 < 4 sinks: the first 3 keys. With a local window of 1 the window stays and the sinks shrink.
    Selection a(4, 1, 3), b(4, 1, 3);
    streaming->select(in.view(), make_policy(3, Granularity::per_token), a.view);
    streaming->select(in.view(), make_policy(3, Granularity::per_token, 0, 1), b.view);
    EXPECT_EQ(a.row(0, 0), range(0, 3));
    EXPECT_EQ(b.row(0, 0), concat(range(0, 2), range(99, 100)));
  }
  {
    // Kept keys on top: width k + n_sink + n_local = 5 + 1 + 2.
    Selection sel(4, 1, 8);
    streaming->select(in.view(), make_policy(5, Granularity::per_token, 1, 2, true), sel.view);
    EXPECT_EQ(sel.row(0, 0), concat(range(0, 4), range(96, 100)));
  }
  {
    // No sinks at all: only the most recent keys.
    Selection sel(4, 1, 5);
    make_streaming_selector(0)->select(in.view(), make_policy(5, Granularity::per_token), sel.view);
    EXPECT_EQ(sel.row(0, 0), range(95, 100));
    EXPECT_EQ(sel.row(3, 0), range(0, 3));
  }
}

TEST(Selectors, BadInputThrowsAndWritesNothing) {
  const Inputs in(30, {29, 10}, 4, 2, 8);
  for (const auto& selector : all_selectors()) {
    SCOPED_TRACE(selector->name());
    {
      SelectionPolicy zero = make_policy(1, Granularity::per_kv_head);
      zero.k = 0;
      Selection sel(2, 2, 1);
      EXPECT_THROW(selector->select(in.view(), zero, sel.view), Error);
      EXPECT_TRUE(std::all_of(sel.data.begin(), sel.data.end(), [](std::int32_t x) { return x == 12345; }));
    }
    {
      Selection wrong_width(2, 2, 5);
      EXPECT_THROW(selector->select(in.view(), make_policy(4, Granularity::per_kv_head), wrong_width.view), Error);
      EXPECT_TRUE(std::all_of(wrong_width.data.begin(), wrong_width.data.end(), [](std::int32_t x) { return x == 12345; }));
      Selection wrong_groups(2, 4, 4);
      EXPECT_THROW(selector->select(in.view(), make_policy(4, Granularity::per_kv_head), wrong_groups.view), Error);
      Selection wrong_tokens(3, 2, 4);
      EXPECT_THROW(selector->select(in.view(), make_policy(4, Granularity::per_kv_head), wrong_tokens.view), Error);
    }
    {
      std::vector<float> as_float(16, 0.0f);
      const TensorView float_view(as_float.data(), DType::fp32, {2, 2, 4});
      EXPECT_THROW(selector->select(in.view(), make_policy(4, Granularity::per_kv_head), float_view), Error);
      std::vector<std::int32_t> buffer(16, 7);
      const TensorView read_only(static_cast<const void*>(buffer.data()), DType::int32, {2, 2, 4});
      EXPECT_THROW(selector->select(in.view(), make_policy(4, Granularity::per_kv_head), read_only), Error);
      EXPECT_TRUE(std::all_of(buffer.begin(), buffer.end(), [](std::int32_t x) { return x == 7; }));
    }
    {
      // Kept keys that do not fit in k, and a negative position.
      Selection sel(2, 2, 4);
      EXPECT_THROW(selector->select(in.view(), make_policy(4, Granularity::per_kv_head, 3, 2), sel.view), Error);
      Inputs negative(30, {29, -1}, 4, 2, 8);
      EXPECT_THROW(selector->select(negative.view(), make_policy(4, Granularity::per_kv_head), sel.view), Error);
      EXPECT_TRUE(std::all_of(sel.data.begin(), sel.data.end(), [](std::int32_t x) { return x == 12345; }));
    }
  }
  EXPECT_THROW(make_streaming_selector(-1), Error);
}

TEST(Selectors, ErrorsNameTheArgument) {
  const Inputs in(30, {29, 10}, 4, 2, 8);
  Selection sel(2, 2, 5);
  try {
    make_random_selector(1)->select(in.view(), make_policy(4, Granularity::per_kv_head), sel.view);
    FAIL() << "no error";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("selection"), std::string::npos) << message;
    EXPECT_NE(message.find("[2, 2, 4]"), std::string::npos) << message;
  }
}

}  // namespace
}  // namespace keysel
