// SPEC §4 metrics: hand-computed rows for selection_metrics, NumPy-linear percentiles for aggregate, and the
// ExactReference on small seeded workloads (exact top-k is the ceiling, a full selection is exact, out_err by hand).
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "keysel/core/random.h"
#include "keysel/core/threads.h"
#include "keysel/recall/metrics.h"

namespace keysel {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

/// Runs `call`, expecting keysel::Error whose message contains every one of `fragments`.
template <typename Call>
void expect_error(Call&& call, std::initializer_list<std::string> fragments) {
  try {
    call();
    ADD_FAILURE() << "expected keysel::Error";
  } catch (const Error& error) {
    const std::string message = error.what();
    for (const std::string& fragment : fragments) {
      EXPECT_NE(message.find(fragment), std::string::npos) << "'" << fragment << "' not in: " << message;
    }
  }
}

// ---- selection_metrics: pbar = {0.5, 0.2, 0.2, 0.1}, k = 2 --------------------------------------------------
// k_eff = 2, pbar_k = 0.2 (tied between keys 1 and 2), mass(E) = 0.7, argmax = key 0.
// entropy = -(0.5 ln 0.5 + 2 * 0.2 ln 0.2 + 0.1 ln 0.1) = 1.2206072645530173; / ln 4 = 0.8804820237218406.
const std::vector<double> kPbar = {0.5, 0.2, 0.2, 0.1};

SelectionMetrics metrics_of(std::vector<std::int32_t> selection, std::int64_t k = 2) {
  return selection_metrics(kPbar, 4, selection, k);
}

TEST(MetricsSelection, ExactTopKRow) {
  const SelectionMetrics m = metrics_of({0, 1});
  EXPECT_DOUBLE_EQ(m.recall, 1.0);
  EXPECT_NEAR(m.mass, 0.7, 1e-15);
  EXPECT_DOUBLE_EQ(m.mass_ratio, 1.0);
  EXPECT_NEAR(m.kl, 0.35667494393873245, 1e-14);  // -ln 0.7
  EXPECT_DOUBLE_EQ(m.top1, 1.0);
  EXPECT_NEAR(m.entropy, 1.2206072645530173, 1e-14);
  EXPECT_NEAR(m.entropy_normalized, 0.8804820237218406, 1e-14);
  EXPECT_TRUE(std::isnan(m.out_err));
}

TEST(MetricsSelection, TieAtTheKthValueIsEitherWay) {
  // {0, 2} is the other tie-break of the exact top-k: every metric equals {0, 1}'s.
  const SelectionMetrics a = metrics_of({0, 1});
  const SelectionMetrics b = metrics_of({2, 0});
  EXPECT_DOUBLE_EQ(b.recall, 1.0);
  EXPECT_EQ(b.mass, a.mass);
  EXPECT_EQ(b.mass_ratio, 1.0);
  EXPECT_EQ(b.kl, a.kl);
  EXPECT_EQ(b.top1, 1.0);
}

TEST(MetricsSelection, BothTiedKeysWithoutTheTop) {
  // The issue 13 hole: both keys tied at pbar_k = 0.2 but not the largest key. Every exact top-k holds key 0
  // (0.5 > pbar_k) and one of the tied keys, so no tie-break of E shares more than one key with A. SPEC §4:
  //   above in A = |{a : pbar[a] > 0.2}| = 0, tied in A = |{a : pbar[a] = 0.2}| = 2,
  //   slots left for tied keys = k_eff - |{s allowed : pbar[s] > 0.2}| = 2 - 1 = 1,
  //   recall = min(2, 0 + min(2, 1)) / 2 = 1 / 2.
  // mass_ratio (0.4 / 0.7) and top1 (0) show the loss too.
  const SelectionMetrics m = metrics_of({1, 2});
  EXPECT_NE(m.recall, 1.0);
  EXPECT_DOUBLE_EQ(m.recall, 0.5);
  EXPECT_NEAR(m.mass, 0.4, 1e-15);
  EXPECT_NEAR(m.mass_ratio, 0.4 / 0.7, 1e-15);
  EXPECT_NEAR(m.kl, 0.916290731874155, 1e-14);  // -ln 0.4
  EXPECT_DOUBLE_EQ(m.top1, 0.0);
}

TEST(MetricsSelection, SmallestKeyWithPadding) {
  const SelectionMetrics m = metrics_of({3, -1});
  EXPECT_DOUBLE_EQ(m.recall, 0.0);
  EXPECT_NEAR(m.mass, 0.1, 1e-15);
  EXPECT_NEAR(m.mass_ratio, 1.0 / 7.0, 1e-15);
  EXPECT_NEAR(m.kl, 2.302585092994046, 1e-14);  // ln 10
  EXPECT_DOUBLE_EQ(m.top1, 0.0);
  // The row's entropy depends on pbar only.
  EXPECT_NEAR(m.entropy, 1.2206072645530173, 1e-14);
}

TEST(MetricsSelection, HalfRecallAndPaddingAnywhere) {
  // {0, 3}: one of two exact keys; -1 entries are ignored wherever they are.
  const SelectionMetrics m = metrics_of({-1, 3, -1, 0}, 2);
  EXPECT_DOUBLE_EQ(m.recall, 0.5);
  EXPECT_NEAR(m.mass, 0.6, 1e-15);
  EXPECT_NEAR(m.mass_ratio, 0.6 / 0.7, 1e-15);
  EXPECT_DOUBLE_EQ(m.top1, 1.0);
}

TEST(MetricsSelection, EmptySelection) {
  const SelectionMetrics m = metrics_of({-1, -1});
  EXPECT_DOUBLE_EQ(m.recall, 0.0);
  EXPECT_DOUBLE_EQ(m.mass, 0.0);
  EXPECT_DOUBLE_EQ(m.mass_ratio, 0.0);
  EXPECT_EQ(m.kl, kInf);
  EXPECT_DOUBLE_EQ(m.top1, 0.0);
}

TEST(MetricsSelection, FewerAllowedThanK) {
  // pbar = {0.6, 0.3, 0.1 | 0.7, 0.2}: only the first 3 keys are allowed, k = 8 -> k_eff = 3, mass(E) = 1.
  // entropy = -(0.6 ln 0.6 + 0.3 ln 0.3 + 0.1 ln 0.1) = 0.8979457248567797; / ln 3 = 0.81734542214651.
  const std::vector<double> pbar = {0.6, 0.3, 0.1, 0.7, 0.2};
  const std::vector<std::int32_t> two = {0, 1, -1, -1, -1, -1, -1, -1};
  const SelectionMetrics m = selection_metrics(pbar, 3, two, 8);
  EXPECT_NEAR(m.recall, 2.0 / 3.0, 1e-15);
  EXPECT_NEAR(m.mass, 0.9, 1e-15);
  EXPECT_NEAR(m.mass_ratio, 0.9, 1e-15);
  EXPECT_NEAR(m.kl, -std::log(0.9), 1e-14);
  EXPECT_DOUBLE_EQ(m.top1, 1.0);
  EXPECT_NEAR(m.entropy, 0.8979457248567797, 1e-14);
  EXPECT_NEAR(m.entropy_normalized, 0.81734542214651, 1e-14);

  const std::vector<std::int32_t> all = {2, 0, 1, -1, -1, -1, -1, -1};
  const SelectionMetrics full = selection_metrics(pbar, 3, all, 8);
  EXPECT_DOUBLE_EQ(full.recall, 1.0);
  EXPECT_NEAR(full.mass, 1.0, 1e-15);
  EXPECT_DOUBLE_EQ(full.mass_ratio, 1.0);
  EXPECT_NEAR(full.kl, 0.0, 1e-15);
  EXPECT_GE(full.kl, 0.0);
}

TEST(MetricsSelection, KeptKeysOnTopCapRecallAtOne) {
  // Uniform pbar, k = 1: pbar_k = 0.25 and the three selected keys all reach it; recall stops at 1 while mass
  // and mass_ratio (0.75 / 0.25 = 3) count every selected key.
  const std::vector<double> uniform = {0.25, 0.25, 0.25, 0.25};
  const std::vector<std::int32_t> selection = {0, 1, 2};
  const SelectionMetrics m = selection_metrics(uniform, 4, selection, 1);
  EXPECT_DOUBLE_EQ(m.recall, 1.0);
  EXPECT_DOUBLE_EQ(m.mass, 0.75);
  EXPECT_DOUBLE_EQ(m.mass_ratio, 3.0);
  EXPECT_DOUBLE_EQ(m.top1, 1.0);
  EXPECT_NEAR(m.entropy, std::log(4.0), 1e-15);
  EXPECT_NEAR(m.entropy_normalized, 1.0, 1e-15);
}

TEST(MetricsSelection, EntropyEdgeCases) {
  // One allowed key: entropy 0 and normalised entropy 0 (not 0 / 0).
  const std::vector<double> one = {1.0, 0.0};
  const std::vector<std::int32_t> first = {0};
  const SelectionMetrics single = selection_metrics(one, 1, first, 4);
  EXPECT_DOUBLE_EQ(single.entropy, 0.0);
  EXPECT_DOUBLE_EQ(single.entropy_normalized, 0.0);
  EXPECT_DOUBLE_EQ(single.recall, 1.0);
  EXPECT_DOUBLE_EQ(single.kl, 0.0);

  // 0 log 0 = 0: {0.5, 0.5, 0} has entropy ln 2, normalised ln 2 / ln 3 = 0.6309297535714574.
  const std::vector<double> halves = {0.5, 0.5, 0.0};
  const std::vector<std::int32_t> last = {2};
  const SelectionMetrics m = selection_metrics(halves, 3, last, 1);
  EXPECT_NEAR(m.entropy, std::log(2.0), 1e-15);
  EXPECT_NEAR(m.entropy_normalized, 0.6309297535714574, 1e-15);
  EXPECT_DOUBLE_EQ(m.mass, 0.0);
  EXPECT_EQ(m.kl, kInf);
  EXPECT_DOUBLE_EQ(m.recall, 0.0);
  EXPECT_DOUBLE_EQ(m.top1, 0.0);
}

TEST(MetricsSelection, TopOneIsTieAware) {
  const std::vector<double> pbar = {0.4, 0.1, 0.4, 0.1};
  const std::vector<std::int32_t> second_max = {2};
  EXPECT_DOUBLE_EQ(selection_metrics(pbar, 4, second_max, 1).top1, 1.0);
  EXPECT_DOUBLE_EQ(selection_metrics(pbar, 4, second_max, 1).recall, 1.0);
}

// ---- recall with ties (SPEC §4): tied keys count only up to the slots the keys above pbar_k leave -------------

double recall_of(const std::vector<double>& pbar, std::int64_t allowed, const std::vector<std::int32_t>& selection,
                 std::int64_t k) {
  return selection_metrics(pbar, allowed, selection, k).recall;
}

TEST(MetricsRecallTies, AllEqualPbar) {
  // Five keys at 0.2, k = 3: pbar_k = 0.2, no key above it, 3 slots; any m distinct keys score min(m, 3) / 3.
  const std::vector<double> pbar(5, 0.2);
  EXPECT_DOUBLE_EQ(recall_of(pbar, 5, {-1, -1, -1}, 3), 0.0);
  EXPECT_DOUBLE_EQ(recall_of(pbar, 5, {4, -1, -1}, 3), 1.0 / 3.0);
  EXPECT_DOUBLE_EQ(recall_of(pbar, 5, {3, 1, -1}, 3), 2.0 / 3.0);
  EXPECT_DOUBLE_EQ(recall_of(pbar, 5, {0, 2, 4}, 3), 1.0);
  EXPECT_DOUBLE_EQ(recall_of(pbar, 5, {0, 1, 2, 3, 4}, 3), 1.0);  // wider than k: min(5, 3) / 3
}

TEST(MetricsRecallTies, TiesStraddlingTheBoundary) {
  // pbar = {0.4, 0.15, 0.15, 0.15, 0.1, 0.05}, k = 3: pbar_k = 0.15, one key above it (key 0), so every exact
  // top-k is key 0 plus 2 of the 3 tied keys 1, 2, 3: 2 slots for tied keys.
  const std::vector<double> pbar = {0.4, 0.15, 0.15, 0.15, 0.1, 0.05};
  // A takes all three tied keys but not key 0: 0 + min(3, 2) = 2 -> 2/3 (the old >= count said 3/3).
  EXPECT_DOUBLE_EQ(recall_of(pbar, 6, {1, 2, 3}, 3), 2.0 / 3.0);
  // The key above plus some tied keys: 1 + min(1, 2) = 2 -> 2/3; 1 + min(2, 2) = 3 -> 1 (an exact top-k).
  EXPECT_DOUBLE_EQ(recall_of(pbar, 6, {0, 2, -1}, 3), 2.0 / 3.0);
  EXPECT_DOUBLE_EQ(recall_of(pbar, 6, {3, 0, 1}, 3), 1.0);
  EXPECT_DOUBLE_EQ(recall_of(pbar, 6, {2, 3, 0}, 3), 1.0);
  // Keys below pbar_k never count: 1 + min(1, 2) + 0 = 2 -> 2/3.
  EXPECT_DOUBLE_EQ(recall_of(pbar, 6, {0, 3, 4}, 3), 2.0 / 3.0);
  EXPECT_DOUBLE_EQ(recall_of(pbar, 6, {4, 5, -1}, 3), 0.0);
  // One tied key alone: 0 + min(1, 2) = 1 -> 1/3.
  EXPECT_DOUBLE_EQ(recall_of(pbar, 6, {2, 5, 4}, 3), 1.0 / 3.0);
}

TEST(MetricsRecallTies, KeptKeysOnTopAreCappedAtOne) {
  // pbar = {0.5, 0.2, 0.2, 0.1}, k = 2 (one slot for the tied keys 1, 2).
  //   {0, 1, 2, 3}: 1 + min(2, 1) = 2 -> 1, not 3/2.  {1, 2, 3}: 0 + min(2, 1) = 1 -> 1/2: a wider selection
  //   does not buy recall with more tied keys than E can hold.
  EXPECT_DOUBLE_EQ(recall_of(kPbar, 4, {0, 1, 2, 3}, 2), 1.0);
  EXPECT_DOUBLE_EQ(recall_of(kPbar, 4, {1, 2, 3}, 2), 0.5);
  // {0.3, 0.3, 0.2, 0.1, 0.1}, k = 2: pbar_k = 0.3 with nothing above it; all five keys: min(2, 0 + min(2, 2)) = 2.
  const std::vector<double> pbar = {0.3, 0.3, 0.2, 0.1, 0.1};
  EXPECT_DOUBLE_EQ(recall_of(pbar, 5, {4, 3, 2, 1, 0}, 2), 1.0);
  // k = 4: pbar_k = 0.1, 3 keys above, 1 slot; {0, 1, 2, 3, 4}: 3 + min(2, 1) = 4 -> 1; {3, 4}: 0 + 1 -> 1/4.
  EXPECT_DOUBLE_EQ(recall_of(pbar, 5, {0, 1, 2, 3, 4}, 4), 1.0);
  EXPECT_DOUBLE_EQ(recall_of(pbar, 5, {3, 4}, 4), 0.25);
}

TEST(MetricsRecallTies, ZeroProbabilityTail) {
  // pbar = {0.9, 0.1, 0, 0, 0}, k = 3: pbar_k = 0, keys 0 and 1 above it, 1 slot. Keys of zero probability fill
  // at most that slot: {2, 3, 4} scores 1/3, not 1.
  const std::vector<double> pbar = {0.9, 0.1, 0.0, 0.0, 0.0};
  EXPECT_DOUBLE_EQ(recall_of(pbar, 5, {2, 3, 4}, 3), 1.0 / 3.0);
  EXPECT_DOUBLE_EQ(recall_of(pbar, 5, {0, 3, 4}, 3), 2.0 / 3.0);
  EXPECT_DOUBLE_EQ(recall_of(pbar, 5, {1, 0, 4}, 3), 1.0);
}

TEST(MetricsRecallTies, OnlyAllowedKeysSetTheThreshold) {
  // pbar = {0.2, 0.2, 0.1 | 0.9, 0.9} with 3 allowed keys, k = 2: the disallowed 0.9s are not above pbar_k = 0.2,
  // so both slots are open to the tied keys and {0, 1} is an exact top-k.
  const std::vector<double> pbar = {0.2, 0.2, 0.1, 0.9, 0.9};
  EXPECT_DOUBLE_EQ(recall_of(pbar, 3, {0, 1}, 2), 1.0);
  EXPECT_DOUBLE_EQ(recall_of(pbar, 3, {1, 2}, 2), 0.5);
  // k = 8 > allowed: k_eff = 3, pbar_k = 0.1, two keys above it, one slot: {2} -> 1/3, {0, 2} -> 2/3.
  EXPECT_DOUBLE_EQ(recall_of(pbar, 3, {2, -1, -1}, 8), 1.0 / 3.0);
  EXPECT_DOUBLE_EQ(recall_of(pbar, 3, {0, -1, 2}, 8), 2.0 / 3.0);
}

/// SPEC §4 recall written out plainly: pbar_k from a full descending sort of the allowed values, then the three
/// counts of the formula by direct loops.
double spec_recall(const std::vector<double>& pbar, std::int64_t allowed, const std::vector<std::int32_t>& selection,
                   std::int64_t k) {
  const std::int64_t k_eff = std::min(k, allowed);
  std::vector<double> sorted(pbar.begin(), pbar.begin() + allowed);
  std::sort(sorted.begin(), sorted.end(), std::greater<>());
  const double pbar_k = sorted[static_cast<std::size_t>(k_eff - 1)];
  std::int64_t a_above = 0, a_tied = 0, all_above = 0;
  for (const std::int32_t a : selection) {
    if (a < 0) continue;
    if (pbar[static_cast<std::size_t>(a)] > pbar_k) ++a_above;
    if (pbar[static_cast<std::size_t>(a)] == pbar_k) ++a_tied;
  }
  for (std::int64_t s = 0; s < allowed; ++s) {
    if (pbar[static_cast<std::size_t>(s)] > pbar_k) ++all_above;
  }
  return static_cast<double>(std::min(k_eff, a_above + std::min(a_tied, k_eff - all_above))) /
         static_cast<double>(k_eff);
}

/// SPEC §4's meaning, by enumeration (allowed <= 12): the largest |A ∩ E| over every k_eff-subset E of the allowed
/// keys that is an exact top-k (no allowed key outside E larger than a key inside), / k_eff.
double best_overlap_recall(const std::vector<double>& pbar, std::int64_t allowed,
                           const std::vector<std::int32_t>& selection, std::int64_t k) {
  const std::int64_t k_eff = std::min(k, allowed);
  std::uint32_t a_mask = 0;
  for (const std::int32_t a : selection) {
    if (a >= 0) a_mask |= 1u << a;
  }
  int best = -1;
  for (std::uint32_t e = 0; e < (1u << allowed); ++e) {
    if (std::popcount(e) != k_eff) continue;
    double smallest_in = std::numeric_limits<double>::infinity(), largest_out = -1.0;
    for (std::int64_t s = 0; s < allowed; ++s) {
      const double value = pbar[static_cast<std::size_t>(s)];
      if ((e >> s) & 1u) {
        smallest_in = std::min(smallest_in, value);
      } else {
        largest_out = std::max(largest_out, value);
      }
    }
    if (largest_out > smallest_in) continue;  // not a top-k
    best = std::max(best, std::popcount(e & a_mask));
  }
  return static_cast<double>(best) / static_cast<double>(k_eff);
}

TEST(MetricsRecallTies, RandomTiesMatchTheSpecByBruteForce) {
  // Integer-valued pbar (multiples of 1/8 from {0, ..., levels - 1}: exact in double, so ties are equal doubles)
  // with few levels to force ties; awkward sizes; k below, at and above the allowed count; selections of any
  // size up to the allowed count, -1 padded anywhere. Small rows are also checked against the enumeration of
  // every tie-break of E.
  RandomStream random(20250613);
  const std::vector<std::int64_t> sizes = {1, 2, 3, 4, 5, 7, 8, 9, 11, 13, 16, 17, 31, 33, 64, 65, 127, 257};
  std::int64_t checked = 0, enumerated = 0, partial = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    const std::int64_t n = sizes[random.uniform_int(sizes.size())];
    const std::int64_t allowed = 1 + static_cast<std::int64_t>(random.uniform_int(static_cast<std::uint64_t>(n)));
    const std::uint64_t levels = 1 + random.uniform_int(5);
    std::vector<double> pbar(static_cast<std::size_t>(n));
    for (double& value : pbar) value = static_cast<double>(random.uniform_int(levels)) / 8.0;
    const std::int64_t k = 1 + static_cast<std::int64_t>(random.uniform_int(static_cast<std::uint64_t>(allowed + 3)));
    // A: a random subset of the allowed keys, in random order, with -1 entries mixed in.
    std::vector<std::int32_t> keys(static_cast<std::size_t>(allowed));
    for (std::size_t s = 0; s < keys.size(); ++s) keys[s] = static_cast<std::int32_t>(s);
    random.shuffle(std::span<std::int32_t>(keys));
    keys.resize(static_cast<std::size_t>(random.uniform_int(static_cast<std::uint64_t>(allowed + 1))));
    keys.resize(keys.size() + random.uniform_int(4), -1);
    random.shuffle(std::span<std::int32_t>(keys));

    const double recall = recall_of(pbar, allowed, keys, k);
    const double expected = spec_recall(pbar, allowed, keys, k);
    ASSERT_EQ(recall, expected) << "trial " << trial << ": n=" << n << " allowed=" << allowed << " k=" << k;
    ASSERT_GE(recall, 0.0);
    ASSERT_LE(recall, 1.0);
    ++checked;
    partial += recall > 0.0 && recall < 1.0 ? 1 : 0;
    if (allowed <= 12) {
      ASSERT_EQ(recall, best_overlap_recall(pbar, allowed, keys, k))
          << "trial " << trial << ": n=" << n << " allowed=" << allowed << " k=" << k;
      ++enumerated;
    }
  }
  EXPECT_EQ(checked, 3000);
  EXPECT_GT(enumerated, 1000);
  EXPECT_GT(partial, 500);  // not only the trivial 0 and 1
}

TEST(MetricsSelection, BadArguments) {
  const std::vector<std::int32_t> ok = {0, 1};
  expect_error([&] { selection_metrics(kPbar, 0, ok, 2); }, {"'allowed'", "got 0"});
  expect_error([&] { selection_metrics(kPbar, 5, ok, 2); }, {"'allowed'", "got 5"});
  expect_error([&] { selection_metrics(kPbar, 4, ok, 0); }, {"'k'", ">= 1"});
  const std::vector<std::int32_t> out_of_range = {0, 4};
  expect_error([&] { selection_metrics(kPbar, 4, out_of_range, 2); }, {"'selection'", "selection[1] = 4"});
  const std::vector<std::int32_t> beyond_allowed = {0, 2};
  expect_error([&] { selection_metrics(kPbar, 2, beyond_allowed, 2); }, {"'selection'", "[0, 2)"});
  const std::vector<std::int32_t> negative = {-2};
  expect_error([&] { selection_metrics(kPbar, 4, negative, 2); }, {"'selection'", "-2"});
  const std::vector<std::int32_t> repeated = {1, 3, 1};
  expect_error([&] { selection_metrics(kPbar, 4, repeated, 2); }, {"'selection'", "distinct"});
  const std::vector<double> nan_pbar = {0.5, kNaN, 0.5};
  expect_error([&] { selection_metrics(nan_pbar, 3, ok, 2); }, {"'pbar'", "pbar[1]"});
}

TEST(MetricsNames, OrderAndValues) {
  const std::vector<std::string_view> expected = {"recall", "mass",    "mass_ratio", "kl",
                                                  "top1",   "out_err", "entropy",    "entropy_normalized"};
  const auto names = metric_names();
  ASSERT_EQ(names.size(), expected.size());
  SelectionMetrics m;
  m.recall = 1;
  m.mass = 2;
  m.mass_ratio = 3;
  m.kl = 4;
  m.top1 = 5;
  m.out_err = 6;
  m.entropy = 7;
  m.entropy_normalized = 8;
  for (std::size_t i = 0; i < names.size(); ++i) {
    EXPECT_EQ(names[i], expected[i]);
    EXPECT_EQ(metric_value(m, names[i]), static_cast<double>(i + 1));
  }
  expect_error([&] { metric_value(m, "precision"); }, {"'name'", "\"precision\"", "recall", "entropy_normalized"});
}

// ---- aggregate ---------------------------------------------------------------------------------------------

TEST(Aggregate, KnownValues) {
  // np.percentile([1, 2, 3, 4, 5], [5, 50, 95]) = [1.2, 3.0, 4.8] (virtual index (n - 1) q = 0.2, 2, 3.8).
  const std::vector<double> values = {5, 1, 4, 2, 3};
  const Aggregate a = aggregate(values);
  EXPECT_EQ(a.count, 5);
  EXPECT_DOUBLE_EQ(a.mean, 3.0);
  EXPECT_DOUBLE_EQ(a.min, 1.0);
  EXPECT_NEAR(a.p5, 1.2, 1e-14);
  EXPECT_DOUBLE_EQ(a.p50, 3.0);
  EXPECT_NEAR(a.p95, 4.8, 1e-14);
}

TEST(Aggregate, SevenValues) {
  // Sorted {0.1, 0.2, 0.3, 0.4, 0.5, 0.8, 0.9}; index 6 q: p5 at 0.3 -> 0.13, p50 at 3 -> 0.4,
  // p95 at 5.7 -> 0.8 + 0.7 * 0.1 = 0.87; mean 3.2 / 7.
  const std::vector<double> values = {0.1, 0.4, 0.2, 0.9, 0.3, 0.8, 0.5};
  const Aggregate a = aggregate(values);
  EXPECT_EQ(a.count, 7);
  EXPECT_NEAR(a.mean, 3.2 / 7.0, 1e-15);
  EXPECT_DOUBLE_EQ(a.min, 0.1);
  EXPECT_NEAR(a.p5, 0.13, 1e-15);
  EXPECT_DOUBLE_EQ(a.p50, 0.4);
  EXPECT_NEAR(a.p95, 0.87, 1e-15);
}

TEST(Aggregate, SkipsNaN) {
  // NaN left out: sorted {0, 3, 7, 10}; p5 at 0.15 -> 0.45, p50 at 1.5 -> 5, p95 at 2.85 -> 7 + 0.85 * 3 = 9.55.
  const std::vector<double> values = {10, kNaN, 0, 7, kNaN, 3};
  const Aggregate a = aggregate(values);
  EXPECT_EQ(a.count, 4);
  EXPECT_DOUBLE_EQ(a.mean, 5.0);
  EXPECT_DOUBLE_EQ(a.min, 0.0);
  EXPECT_NEAR(a.p5, 0.45, 1e-14);
  EXPECT_DOUBLE_EQ(a.p50, 5.0);
  EXPECT_NEAR(a.p95, 9.55, 1e-14);
}

TEST(Aggregate, EmptyAndAllNaN) {
  for (const std::vector<double>& values : {std::vector<double>{}, std::vector<double>{kNaN, kNaN}}) {
    const Aggregate a = aggregate(values);
    EXPECT_EQ(a.count, 0);
    EXPECT_TRUE(std::isnan(a.mean));
    EXPECT_TRUE(std::isnan(a.min));
    EXPECT_TRUE(std::isnan(a.p5));
    EXPECT_TRUE(std::isnan(a.p50));
    EXPECT_TRUE(std::isnan(a.p95));
  }
}

TEST(Aggregate, SingleValue) {
  const std::vector<double> values = {2.5};
  const Aggregate a = aggregate(values);
  EXPECT_EQ(a.count, 1);
  EXPECT_EQ(a.mean, 2.5);
  EXPECT_EQ(a.min, 2.5);
  EXPECT_EQ(a.p5, 2.5);
  EXPECT_EQ(a.p50, 2.5);
  EXPECT_EQ(a.p95, 2.5);
}

TEST(Aggregate, InfinityStaysInfinity) {
  // kl is +inf for a row with no mass; percentiles next to it are +inf, not inf - inf = NaN.
  const std::vector<double> values = {1.0, kInf, kInf};
  const Aggregate a = aggregate(values);
  EXPECT_EQ(a.count, 3);
  EXPECT_EQ(a.mean, kInf);
  EXPECT_EQ(a.min, 1.0);
  EXPECT_EQ(a.p5, kInf);  // between 1 and inf at index 0.1
  EXPECT_EQ(a.p50, kInf);
  EXPECT_EQ(a.p95, kInf);
  const std::vector<double> two = {1.0, kInf};
  EXPECT_EQ(aggregate(two).p50, kInf);
  EXPECT_EQ(aggregate(two).p5, kInf);
}

// ---- ExactReference ----------------------------------------------------------------------------------------

/// A seeded random workload that owns its tensors. Query t sits at position n_keys - tokens + t, so the rows
/// allow n_keys - tokens + 1 .. n_keys keys.
struct Workload {
  std::int64_t tokens, keys, query_heads, kv_heads, head_dim, value_dim;
  std::vector<float> q, k, v;
  std::vector<std::int32_t> positions;

  Workload(std::int64_t tokens_, std::int64_t keys_, std::int64_t query_heads_, std::int64_t kv_heads_,
           std::int64_t head_dim_, std::int64_t value_dim_, std::uint64_t seed)
      : tokens(tokens_), keys(keys_), query_heads(query_heads_), kv_heads(kv_heads_), head_dim(head_dim_),
        value_dim(value_dim_) {
    RandomStream random(seed);
    q.resize(static_cast<std::size_t>(tokens * query_heads * head_dim));
    k.resize(static_cast<std::size_t>(keys * kv_heads * head_dim));
    v.resize(static_cast<std::size_t>(keys * kv_heads * value_dim));
    random.fill_normal(std::span<float>(q), 0.0, 2.0);  // peaked distributions, like real attention
    random.fill_normal(std::span<float>(k));
    random.fill_normal(std::span<float>(v));
    for (std::int64_t t = 0; t < tokens; ++t) positions.push_back(static_cast<std::int32_t>(keys - tokens + t));
  }

  AttentionInputs inputs(bool with_v = true) const {
    AttentionInputs in;
    in.q = TensorView(q.data(), DType::fp32, {tokens, query_heads, head_dim});
    in.k = TensorView(k.data(), DType::fp32, {keys, kv_heads, head_dim});
    if (with_v) in.v = TensorView(v.data(), DType::fp32, {keys, kv_heads, value_dim});
    in.positions = TensorView(positions.data(), DType::int32, {tokens});
    return in;
  }
};

/// Every allowed key of each row, -1 after: width N.
std::vector<std::int32_t> full_selection(const ExactReference& reference) {
  const std::int64_t n = reference.shape().keys;
  std::vector<std::int32_t> selection;
  for (std::int64_t t = 0; t < reference.shape().tokens; ++t) {
    for (std::int64_t g = 0; g < reference.groups(); ++g) {
      for (std::int64_t s = 0; s < n; ++s) {
        selection.push_back(s < reference.allowed(t) ? static_cast<std::int32_t>(s) : -1);
      }
    }
  }
  return selection;
}

/// k distinct random allowed keys per row (fewer when fewer are allowed), ascending, then -1.
std::vector<std::int32_t> random_selection(const ExactReference& reference, std::int64_t k, std::uint64_t seed) {
  RandomStream random(seed);
  std::vector<std::int32_t> selection;
  for (std::int64_t t = 0; t < reference.shape().tokens; ++t) {
    for (std::int64_t g = 0; g < reference.groups(); ++g) {
      std::vector<std::int32_t> keys(static_cast<std::size_t>(reference.allowed(t)));
      for (std::size_t s = 0; s < keys.size(); ++s) keys[s] = static_cast<std::int32_t>(s);
      random.shuffle(std::span<std::int32_t>(keys));
      keys.resize(std::min(keys.size(), static_cast<std::size_t>(k)));
      std::sort(keys.begin(), keys.end());
      keys.resize(static_cast<std::size_t>(k), -1);
      selection.insert(selection.end(), keys.begin(), keys.end());
    }
  }
  return selection;
}

std::vector<std::int32_t> exact_selection(const ExactReference& reference, std::int64_t k) {
  SelectionPolicy policy;
  policy.k = k;
  policy.granularity = reference.granularity();
  std::vector<std::int32_t> selection(static_cast<std::size_t>(reference.shape().tokens * reference.groups() * k));
  reference.exact_topk(policy, TensorView(selection.data(), DType::int32,
                                          {reference.shape().tokens, reference.groups(), k}));
  return selection;
}

std::vector<SelectionMetrics> evaluate_rows(const ExactReference& reference, const std::vector<std::int32_t>& selection,
                                            std::int64_t width, std::int64_t k) {
  return reference.evaluate(
      TensorView(selection.data(), DType::int32, {reference.shape().tokens, reference.groups(), width}), k);
}

TEST(ExactReference, ShapeAndDistributions) {
  const Workload w(3, 10, 4, 2, 8, 5, 11);
  for (const Granularity granularity : {Granularity::per_head, Granularity::per_kv_head, Granularity::per_token}) {
    const ExactReference reference(w.inputs(), granularity);
    EXPECT_EQ(reference.shape().tokens, 3);
    EXPECT_EQ(reference.shape().keys, 10);
    EXPECT_EQ(reference.shape().value_dim, 5);
    EXPECT_EQ(reference.granularity(), granularity);
    EXPECT_EQ(reference.groups(), group_count(granularity, 4, 2));
    for (std::int64_t t = 0; t < 3; ++t) {
      EXPECT_EQ(reference.allowed(t), 8 + t);
      for (std::int64_t g = 0; g < reference.groups(); ++g) {
        const HeadRange heads = heads_of_group(granularity, g, 4, 2);
        const auto pbar = reference.pbar(t, g);
        ASSERT_EQ(pbar.size(), 10u);
        double total = 0;
        for (std::int64_t s = 0; s < 10; ++s) {
          double mean = 0;
          for (std::int64_t h = heads.first; h < heads.first + heads.count; ++h) {
            mean += reference.probabilities(t, h)[s];
          }
          mean /= static_cast<double>(heads.count);
          EXPECT_NEAR(pbar[s], mean, 1e-15);
          if (s >= reference.allowed(t)) {
            EXPECT_EQ(pbar[s], 0.0);
          }
          total += pbar[s];
        }
        EXPECT_NEAR(total, 1.0, 1e-12);
      }
    }
  }
}

TEST(ExactReference, ExactTopKIsTheCeiling) {
  // Rows allow 33..40 keys; k = 8 < allowed everywhere, k = 64 > allowed everywhere.
  const Workload w(8, 40, 4, 2, 16, 8, 21);
  const ExactReference reference(w.inputs(), Granularity::per_kv_head);
  for (const std::int64_t k : {8, 64}) {
    const auto exact = evaluate_rows(reference, exact_selection(reference, k), k, k);
    const auto random = evaluate_rows(reference, random_selection(reference, k, 5), k, k);
    double exact_err = 0, random_err = 0;
    for (std::size_t r = 0; r < exact.size(); ++r) {
      EXPECT_DOUBLE_EQ(exact[r].recall, 1.0);
      EXPECT_NEAR(exact[r].mass_ratio, 1.0, 1e-12);
      EXPECT_DOUBLE_EQ(exact[r].top1, 1.0);
      EXPECT_GE(exact[r].mass, random[r].mass - 1e-12);
      if (k < 33) {
        EXPECT_LT(exact[r].mass, 1.0 - 1e-9);
        EXPECT_GT(exact[r].kl, 0.0);
        EXPECT_GT(exact[r].out_err, 0.0);
      } else {
        EXPECT_NEAR(exact[r].mass, 1.0, 1e-12);
        EXPECT_NEAR(exact[r].kl, 0.0, 1e-12);
        EXPECT_LT(exact[r].out_err, 1e-12);
      }
      EXPECT_TRUE(std::isfinite(exact[r].out_err));
      exact_err += exact[r].out_err;
      random_err += random[r].out_err;
    }
    if (k < 33) {
      EXPECT_LT(exact_err, random_err);  // the largest probabilities reproduce the output best
    }
  }
}

TEST(ExactReference, FullSelectionIsExact) {
  const Workload w(5, 24, 6, 2, 8, 4, 31);
  for (const Granularity granularity : {Granularity::per_head, Granularity::per_kv_head, Granularity::per_token}) {
    const ExactReference reference(w.inputs(), granularity);
    const auto rows = evaluate_rows(reference, full_selection(reference), 24, 24);
    ASSERT_EQ(rows.size(), static_cast<std::size_t>(5 * reference.groups()));
    for (const SelectionMetrics& m : rows) {
      EXPECT_DOUBLE_EQ(m.recall, 1.0);
      EXPECT_NEAR(m.mass, 1.0, 1e-12);
      EXPECT_NEAR(m.mass_ratio, 1.0, 1e-12);
      EXPECT_NEAR(m.kl, 0.0, 1e-12);
      EXPECT_DOUBLE_EQ(m.top1, 1.0);
      EXPECT_LT(m.out_err, 1e-12);
      EXPECT_GT(m.entropy, 0.0);
      EXPECT_GT(m.entropy_normalized, 0.0);
      EXPECT_LE(m.entropy_normalized, 1.0 + 1e-12);
    }
  }
}

TEST(ExactReference, RandomSelectionIsBounded) {
  const Workload w(6, 32, 4, 1, 8, 8, 41);
  const ExactReference reference(w.inputs(), Granularity::per_token);
  const auto rows = evaluate_rows(reference, random_selection(reference, 6, 9), 6, 6);
  for (const SelectionMetrics& m : rows) {
    EXPECT_GE(m.recall, 0.0);
    EXPECT_LE(m.recall, 1.0);
    EXPECT_GE(m.mass, 0.0);
    EXPECT_LE(m.mass, 1.0 + 1e-12);
    EXPECT_LE(m.mass_ratio, 1.0 + 1e-12);
    EXPECT_GE(m.kl, 0.0);
    EXPECT_TRUE(m.top1 == 0.0 || m.top1 == 1.0);
    EXPECT_GE(m.out_err, 0.0);
  }
}

TEST(ExactReference, OutErrByHand) {
  // T = 1, N = 2, one head, D = Dv = 1, scale 1: scores q.k = {0, ln 3} -> p = {1/4, 3/4}.
  // v = {2, 6}: o = 0.25 * 2 + 0.75 * 6 = 5.
  //   A = {1}: o_A = 6, out_err = |6 - 5| / 5 = 0.2;  A = {0}: o_A = 2, out_err = 3 / 5 = 0.6;
  //   A = {0, 1}: out_err 0;  A = {}: o_A = 0, out_err = 5 / 5 = 1.
  // (k is stored in fp32, so ln 3 and hence p carry ~1e-8 relative error.)
  const std::vector<float> q = {1.0f};
  const std::vector<float> k = {0.0f, static_cast<float>(std::log(3.0))};
  std::vector<float> v = {2.0f, 6.0f};
  const std::vector<std::int32_t> positions = {1};
  AttentionInputs inputs;
  inputs.q = TensorView(q.data(), DType::fp32, {1, 1, 1});
  inputs.k = TensorView(k.data(), DType::fp32, {2, 1, 1});
  inputs.v = TensorView(v.data(), DType::fp32, {2, 1, 1});
  inputs.positions = TensorView(positions.data(), DType::int32, {1});
  inputs.scale = 1.0;
  {
    const ExactReference reference(inputs, Granularity::per_head);
    EXPECT_NEAR(reference.probabilities(0, 0)[0], 0.25, 1e-7);
    EXPECT_NEAR(reference.pbar(0, 0)[1], 0.75, 1e-7);
    const auto err = [&](std::vector<std::int32_t> a) { return reference.evaluate(0, 0, a, 1).out_err; };
    EXPECT_NEAR(err({1, -1}), 0.2, 1e-6);
    EXPECT_NEAR(err({0, -1}), 0.6, 1e-6);
    EXPECT_NEAR(err({0, 1}), 0.0, 1e-6);
    EXPECT_DOUBLE_EQ(err({-1, -1}), 1.0);
    const SelectionMetrics m = reference.evaluate(0, 0, std::vector<std::int32_t>{1, -1}, 1);
    EXPECT_NEAR(m.mass, 0.75, 1e-7);
    EXPECT_NEAR(m.kl, 0.2876820724517809, 1e-6);  // -ln 0.75
    EXPECT_DOUBLE_EQ(m.recall, 1.0);
  }
  // Equal scores (k = {0, 0}) give p = {1/2, 1/2} exactly; v = {-2, 2}: o = 0 exactly, so out_err is the
  // absolute error |o_A - 0| = 2 for {0} and for {1}, and 0 for {0, 1}.
  const std::vector<float> k_equal = {0.0f, 0.0f};
  inputs.k = TensorView(k_equal.data(), DType::fp32, {2, 1, 1});
  v = {-2.0f, 2.0f};
  {
    const ExactReference reference(inputs, Granularity::per_head);
    EXPECT_DOUBLE_EQ(reference.evaluate(0, 0, std::vector<std::int32_t>{1}, 1).out_err, 2.0);
    EXPECT_DOUBLE_EQ(reference.evaluate(0, 0, std::vector<std::int32_t>{0}, 1).out_err, 2.0);
    EXPECT_DOUBLE_EQ(reference.evaluate(0, 0, std::vector<std::int32_t>{0, 1}, 1).out_err, 0.0);
  }
}

TEST(ExactReference, GroupOutErrIsTheMeanOverItsHeads) {
  // Hq = 4, Hkv = 2: per_kv_head group 1 = heads 2, 3; per_token group 0 = heads 0..3.
  const Workload w(2, 16, 4, 2, 8, 6, 51);
  const ExactReference per_head(w.inputs(), Granularity::per_head);
  const ExactReference per_kv_head(w.inputs(), Granularity::per_kv_head);
  const ExactReference per_token(w.inputs(), Granularity::per_token);
  EXPECT_EQ(per_head.groups(), 4);
  EXPECT_EQ(per_kv_head.groups(), 2);
  EXPECT_EQ(per_token.groups(), 1);
  const std::vector<std::int32_t> a = {0, 3, 7, 12, 14};
  for (std::int64_t t = 0; t < 2; ++t) {
    double head_err[4];
    for (std::int64_t h = 0; h < 4; ++h) head_err[h] = per_head.evaluate(t, h, a, 5).out_err;
    EXPECT_NEAR(per_kv_head.evaluate(t, 0, a, 5).out_err, (head_err[0] + head_err[1]) / 2, 1e-14);
    EXPECT_NEAR(per_kv_head.evaluate(t, 1, a, 5).out_err, (head_err[2] + head_err[3]) / 2, 1e-14);
    EXPECT_NEAR(per_token.evaluate(t, 0, a, 5).out_err,
                (head_err[0] + head_err[1] + head_err[2] + head_err[3]) / 4, 1e-14);
  }
  // Each granularity's own exact top-k has recall 1.
  for (const ExactReference* reference : {&per_head, &per_kv_head, &per_token}) {
    for (const SelectionMetrics& m : evaluate_rows(*reference, exact_selection(*reference, 4), 4, 4)) {
      EXPECT_DOUBLE_EQ(m.recall, 1.0);
      EXPECT_DOUBLE_EQ(m.top1, 1.0);
    }
  }
}

TEST(ExactReference, TensorEvaluateMatchesRowsAndThreadCounts) {
  const Workload w(7, 20, 4, 2, 8, 4, 61);
  const ExactReference reference(w.inputs(), Granularity::per_head);
  const std::int64_t k = 5;
  const auto selection = random_selection(reference, k, 3);
  std::vector<SelectionMetrics> one_thread, two_threads;
  {
    ScopedThreads threads(1);
    one_thread = evaluate_rows(reference, selection, k, k);
  }
  {
    ScopedThreads threads(2);
    two_threads = evaluate_rows(reference, selection, k, k);
  }
  ASSERT_EQ(one_thread.size(), static_cast<std::size_t>(7 * 4));
  for (std::int64_t t = 0; t < 7; ++t) {
    for (std::int64_t g = 0; g < 4; ++g) {
      const std::size_t r = static_cast<std::size_t>(t * 4 + g);
      const std::span<const std::int32_t> row(selection.data() + r * k, static_cast<std::size_t>(k));
      const SelectionMetrics m = reference.evaluate(t, g, row, k);
      for (const std::string_view name : metric_names()) {
        EXPECT_EQ(metric_value(one_thread[r], name), metric_value(m, name)) << name;
        EXPECT_EQ(metric_value(two_threads[r], name), metric_value(m, name)) << name;
      }
    }
  }
}

TEST(ExactReference, KeptKeysOnTop) {
  // Sinks and the local window on top of k: the selection is wider than k, recall stays 1 and mass(A) >= mass(E).
  const Workload w(4, 30, 2, 2, 8, 4, 71);
  const ExactReference reference(w.inputs(), Granularity::per_kv_head);
  SelectionPolicy policy;
  policy.k = 4;
  policy.granularity = Granularity::per_kv_head;
  policy.n_sink = 2;
  policy.n_local = 3;
  policy.kept_on_top = true;
  std::vector<std::int32_t> selection(static_cast<std::size_t>(4 * 2 * policy.width()));
  reference.exact_topk(policy, TensorView(selection.data(), DType::int32, {4, 2, policy.width()}));
  for (const SelectionMetrics& m : evaluate_rows(reference, selection, policy.width(), policy.k)) {
    EXPECT_DOUBLE_EQ(m.recall, 1.0);
    EXPECT_GE(m.mass_ratio, 1.0 - 1e-12);
  }
}

TEST(ExactReference, WithoutValuesOutErrIsNaN) {
  const Workload w(2, 12, 2, 1, 8, 4, 81);
  const ExactReference reference(w.inputs(false), Granularity::per_token);
  EXPECT_EQ(reference.shape().value_dim, 0);
  for (const SelectionMetrics& m : evaluate_rows(reference, exact_selection(reference, 3), 3, 3)) {
    EXPECT_TRUE(std::isnan(m.out_err));
    EXPECT_DOUBLE_EQ(m.recall, 1.0);
  }
}

TEST(ExactReference, BadInput) {
  const Workload w(3, 10, 4, 2, 8, 4, 91);
  const ExactReference reference(w.inputs(), Granularity::per_kv_head);  // G = 2, rows allow 8, 9, 10 keys

  // Wrong selection shape: [T, G + 1, W], [T + 1, G, W], wrong rank, wrong dtype.
  std::vector<std::int32_t> buffer(64, -1);
  expect_error([&] { reference.evaluate(TensorView(buffer.data(), DType::int32, {3, 3, 2}), 2); }, {"'selection'"});
  expect_error([&] { reference.evaluate(TensorView(buffer.data(), DType::int32, {4, 2, 2}), 2); }, {"'selection'"});
  expect_error([&] { reference.evaluate(TensorView(buffer.data(), DType::int32, {6, 2}), 2); }, {"'selection'"});
  std::vector<float> floats(12, 0.0f);
  expect_error([&] { reference.evaluate(TensorView(floats.data(), DType::fp32, {3, 2, 2}), 2); }, {"'selection'"});

  // Out of range for its row (token 0 allows keys 0..7) and duplicated entries.
  std::vector<std::int32_t> selection = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1};  // [3, 2, 2]
  const TensorView view(selection.data(), DType::int32, {3, 2, 2});
  EXPECT_NO_THROW(reference.evaluate(view, 2));
  selection[1] = 8;  // token 0 may read keys < 8
  expect_error([&] { reference.evaluate(view, 2); }, {"'selection'", "8"});
  selection[1] = 0;
  expect_error([&] { reference.evaluate(view, 2); }, {"'selection'", "distinct"});
  selection[1] = 1;
  expect_error([&] { reference.evaluate(view, 0); }, {"'k'"});

  // Single rows: t, group and entries are checked.
  const std::vector<std::int32_t> row = {0, 1};
  expect_error([&] { reference.evaluate(3, 0, row, 2); }, {"'t'"});
  expect_error([&] { reference.evaluate(0, 2, row, 2); }, {"'group'"});
  const std::vector<std::int32_t> beyond = {0, 9};
  expect_error([&] { reference.evaluate(0, 0, beyond, 2); }, {"'selection'"});
  const std::vector<std::int32_t> twice = {4, 4};
  expect_error([&] { reference.evaluate(0, 0, twice, 2); }, {"'selection'", "distinct"});
  expect_error([&] { reference.pbar(0, 5); }, {"'group'"});
  expect_error([&] { reference.probabilities(0, 4); }, {"'head'"});
  expect_error([&] { reference.allowed(-1); }, {"'t'"});

  // The exact top-k must use the reference's granularity.
  SelectionPolicy policy;
  policy.k = 2;
  policy.granularity = Granularity::per_token;
  std::vector<std::int32_t> out(6, 123);
  expect_error([&] { reference.exact_topk(policy, TensorView(out.data(), DType::int32, {3, 1, 2})); },
               {"'policy.granularity'", "per_kv_head", "per_token"});
  EXPECT_EQ(out, std::vector<std::int32_t>(6, 123));  // nothing written

  // Unknown metric name.
  expect_error([&] { metric_value(SelectionMetrics{}, "recall@k"); }, {"'name'", "recall, mass"});

  // Bad inputs: positions of the wrong shape, v with the wrong number of keys.
  AttentionInputs bad = w.inputs();
  bad.positions = TensorView(w.positions.data(), DType::int32, {2});
  expect_error([&] { ExactReference(bad, Granularity::per_head); }, {"'positions'"});
  bad = w.inputs();
  bad.v = TensorView(w.v.data(), DType::fp32, {9, 2, 4});
  expect_error([&] { ExactReference(bad, Granularity::per_head); }, {"'v'"});
}

}  // namespace
}  // namespace keysel
