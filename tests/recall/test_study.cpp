// Synthetic workloads (seeded, structured, checked) and studies (exact is the ceiling, baselines below it,
// deterministic JSON and a table naming every selector).
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "keysel/core/error.h"
#include "keysel/core/threads.h"
#include "keysel/indexer/selector.h"
#include "keysel/recall/metrics.h"
#include "keysel/recall/study.h"
#include "keysel/recall/synthetic.h"

namespace keysel {
namespace {

SyntheticOptions small_options(std::uint64_t seed = 1) {
  SyntheticOptions o;
  o.keys = 512;
  o.tokens = 4;
  o.query_heads = 8;
  o.kv_heads = 2;
  o.head_dim = 32;
  o.value_dim = 24;
  o.seed = seed;
  return o;
}

template <typename T>
bool same_bytes(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

bool same_workload(const Workload& a, const Workload& b) {
  return a.name == b.name && same_bytes(a.q, b.q) && same_bytes(a.k, b.k) && same_bytes(a.v, b.v) &&
         same_bytes(a.positions, b.positions);
}

/// Mean over rows of the attention mass of the exact top-k (per_kv_head groups).
double exact_topk_mass(const Workload& w, std::int64_t k) {
  const ExactReference reference(w.inputs(), Granularity::per_kv_head);
  SelectionPolicy policy;
  policy.k = k;
  std::vector<std::int32_t> buffer(static_cast<std::size_t>(w.shape.tokens * reference.groups() * k));
  const TensorView selection(buffer.data(), DType::int32, {w.shape.tokens, reference.groups(), k});
  reference.exact_topk(policy, selection);
  double total = 0;
  const auto rows = reference.evaluate(selection, k);
  for (const auto& m : rows) total += m.mass;
  return total / static_cast<double>(rows.size());
}

/// Mean over rows of the attention mass on keys [first, last) of every query's allowed range.
double mass_on(const Workload& w, std::int64_t first_from_end, std::int64_t last_from_end) {
  const ExactReference reference(w.inputs(), Granularity::per_kv_head);
  double total = 0;
  std::int64_t rows = 0;
  for (std::int64_t t = 0; t < w.shape.tokens; ++t) {
    const std::int64_t allowed = reference.allowed(t);
    for (std::int64_t g = 0; g < reference.groups(); ++g, ++rows) {
      const auto pbar = reference.pbar(t, g);
      for (std::int64_t s = allowed - first_from_end; s < allowed - last_from_end; ++s) {
        total += pbar[static_cast<std::size_t>(s)];
      }
    }
  }
  return total / static_cast<double>(rows);
}

double sink_mass(const Workload& w) {
  const ExactReference reference(w.inputs(), Granularity::per_kv_head);
  double total = 0;
  for (std::int64_t t = 0; t < w.shape.tokens; ++t) {
    for (std::int64_t g = 0; g < reference.groups(); ++g) total += reference.pbar(t, g)[0];
  }
  return total / static_cast<double>(w.shape.tokens * reference.groups());
}

// ---- synthetic workloads ---------------------------------------------------------------------------------

TEST(Synthetic, ShapeAndPositions) {
  const Workload w = make_synthetic_workload(small_options());
  EXPECT_EQ(w.shape.tokens, 4);
  EXPECT_EQ(w.shape.keys, 512);
  EXPECT_EQ(w.shape.query_heads, 8);
  EXPECT_EQ(w.shape.kv_heads, 2);
  EXPECT_EQ(w.shape.head_dim, 32);
  EXPECT_EQ(w.shape.value_dim, 24);
  EXPECT_EQ(w.q.size(), 4u * 8 * 32);
  EXPECT_EQ(w.k.size(), 512u * 2 * 32);
  EXPECT_EQ(w.v.size(), 512u * 2 * 24);
  EXPECT_EQ(w.positions, (std::vector<std::int32_t>{508, 509, 510, 511}));
  EXPECT_FALSE(w.name.empty());
  for (const float x : w.q) ASSERT_TRUE(std::isfinite(x));
  for (const float x : w.k) ASSERT_TRUE(std::isfinite(x));
  for (const float x : w.v) ASSERT_TRUE(std::isfinite(x));

  const AttentionInputs in = w.inputs();
  const AttentionShape shape = in.validate("test", true);
  EXPECT_EQ(shape.value_dim, 24);
  EXPECT_EQ(in.q.dtype(), DType::fp32);
  EXPECT_EQ(in.effective_scale(), 1.0 / std::sqrt(32.0));
}

TEST(Synthetic, SameSeedSameBytesAtAnyThreadCount) {
  const Workload a = [] { ScopedThreads one(1); return make_synthetic_workload(small_options(7)); }();
  const Workload b = [] { ScopedThreads two(2); return make_synthetic_workload(small_options(7)); }();
  const Workload c = [] { ScopedThreads three(3); return make_synthetic_workload(small_options(7)); }();
  EXPECT_TRUE(same_workload(a, b));
  EXPECT_TRUE(same_workload(a, c));
}

TEST(Synthetic, DifferentSeedsDiffer) {
  const Workload a = make_synthetic_workload(small_options(1));
  const Workload b = make_synthetic_workload(small_options(2));
  EXPECT_FALSE(same_bytes(a.q, b.q));
  EXPECT_FALSE(same_bytes(a.k, b.k));
  EXPECT_FALSE(same_bytes(a.v, b.v));
  EXPECT_EQ(a.positions, b.positions);
}

TEST(Synthetic, TinyShapesWork) {
  // One key and one token: no room for relevant keys; MQA and MHA layouts.
  for (const auto& [keys, tokens, hq, hkv] :
       std::vector<std::array<std::int64_t, 4>>{{1, 1, 1, 1}, {2, 2, 3, 1}, {5, 1, 4, 4}, {17, 17, 2, 1}}) {
    SyntheticOptions o;
    o.keys = keys;
    o.tokens = tokens;
    o.query_heads = hq;
    o.kv_heads = hkv;
    o.head_dim = 3;
    o.value_dim = 1;
    const Workload w = make_synthetic_workload(o);
    EXPECT_NO_THROW(w.inputs().validate("test", true)) << keys << " " << tokens;
    EXPECT_EQ(w.positions.back(), keys - 1);
    for (const float x : w.q) ASSERT_TRUE(std::isfinite(x));
  }
}

TEST(Synthetic, EachStructureShowsInTheAttention) {
  SyntheticOptions base = small_options();
  base.keys = 2048;
  base.head_dim = 64;
  SyntheticOptions none = base;
  none.sink_strength = 0;
  none.recency = 0;
  none.focus = 0;

  // (a) the sink holds a large share with the default strength and none without it.
  SyntheticOptions sink_only = none;
  sink_only.sink_strength = base.sink_strength;
  EXPECT_GT(sink_mass(make_synthetic_workload(sink_only)), 0.2);
  EXPECT_LT(sink_mass(make_synthetic_workload(none)), 0.01);

  // (b) recency puts more mass on the 32 most recent keys.
  SyntheticOptions recency_only = none;
  recency_only.recency = base.recency;
  EXPECT_GT(mass_on(make_synthetic_workload(recency_only), 32, 0), 3 * mass_on(make_synthetic_workload(none), 32, 0));

  // (c) focus concentrates attention on a few keys.
  SyntheticOptions focus_only = none;
  focus_only.focus = base.focus;
  EXPECT_GT(exact_topk_mass(make_synthetic_workload(focus_only), 16),
            exact_topk_mass(make_synthetic_workload(none), 16) + 0.2);
}

TEST(Synthetic, DefaultTopKCoversPartOfTheMass) {
  // The default shape (N = 8192, D = 128, GQA 32/8) on 2 tokens: the exact top-64 covers roughly half the mass,
  // so selection matters but attention is not one-hot.
  SyntheticOptions o;
  o.tokens = 2;
  const Workload w = make_synthetic_workload(o);
  const double mass = exact_topk_mass(w, 64);
  EXPECT_GT(mass, 0.4);
  EXPECT_LT(mass, 0.8);
}

TEST(Synthetic, BadOptionsThrow) {
  const auto bad = [](auto change) {
    SyntheticOptions o = small_options();
    change(o);
    return o;
  };
  constexpr double nan = std::numeric_limits<double>::quiet_NaN();
  constexpr double inf = std::numeric_limits<double>::infinity();
  EXPECT_THROW(make_synthetic_workload(bad([](SyntheticOptions& o) { o.keys = 0; })), Error);
  EXPECT_THROW(make_synthetic_workload(bad([](SyntheticOptions& o) { o.tokens = 0; })), Error);
  EXPECT_THROW(make_synthetic_workload(bad([](SyntheticOptions& o) { o.tokens = 513; })), Error);
  EXPECT_THROW(make_synthetic_workload(bad([](SyntheticOptions& o) { o.query_heads = 0; })), Error);
  EXPECT_THROW(make_synthetic_workload(bad([](SyntheticOptions& o) { o.kv_heads = 0; })), Error);
  EXPECT_THROW(make_synthetic_workload(bad([](SyntheticOptions& o) { o.kv_heads = 3; })), Error);
  EXPECT_THROW(make_synthetic_workload(bad([](SyntheticOptions& o) { o.head_dim = 0; })), Error);
  EXPECT_THROW(make_synthetic_workload(bad([](SyntheticOptions& o) { o.value_dim = -1; })), Error);
  EXPECT_THROW(make_synthetic_workload(bad([](SyntheticOptions& o) { o.sink_strength = -1; })), Error);
  EXPECT_THROW(make_synthetic_workload(bad([](SyntheticOptions& o) { o.recency = nan; })), Error);
  EXPECT_THROW(make_synthetic_workload(bad([](SyntheticOptions& o) { o.focus = inf; })), Error);
  try {
    make_synthetic_workload(bad([](SyntheticOptions& o) { o.kv_heads = 3; }));
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("kv_heads"), std::string::npos) << e.what();
  }
  // A workload whose buffers do not match its shape is refused.
  Workload broken = make_synthetic_workload(small_options());
  broken.k.pop_back();
  EXPECT_THROW(broken.inputs(), Error);
}

// ---- studies ---------------------------------------------------------------------------------------------

std::vector<std::unique_ptr<Selector>> baseline_selectors(std::uint64_t seed = 1) {
  std::vector<std::unique_ptr<Selector>> selectors;
  selectors.push_back(make_exact_selector());
  selectors.push_back(make_random_selector(seed));
  selectors.push_back(make_streaming_selector(4));
  return selectors;
}

StudyOptions small_study() {
  StudyOptions o;
  o.k_values = {16, 64};
  return o;
}

const StudyRow& row_of(const StudyResult& result, const std::string& selector, std::int64_t k) {
  for (const StudyRow& row : result.rows) {
    if (row.selector == selector && row.k == k) return row;
  }
  throw std::runtime_error("no row " + selector + " k=" + std::to_string(k));
}

double mean(const StudyRow& row, const std::string& metric) { return row.metrics.at(metric).mean; }

/// JSON text without its wall-time lines, the only numbers that differ between identical runs.
std::string without_seconds(const std::string& json) {
  std::istringstream in(json);
  std::string line, out;
  while (std::getline(in, line)) {
    if (line.find("\"seconds\"") == std::string::npos) out += line + "\n";
  }
  return out;
}

TEST(Study, RowsInSelectorThenKOrder) {
  const Workload w = make_synthetic_workload(small_options());
  const StudyResult result = run_study(w, baseline_selectors(), small_study());
  ASSERT_EQ(result.rows.size(), 6u);
  const char* names[] = {"exact", "exact", "random", "random", "streaming", "streaming"};
  for (std::size_t i = 0; i < 6; ++i) {
    EXPECT_EQ(result.rows[i].selector, names[i]);
    EXPECT_EQ(result.rows[i].k, i % 2 == 0 ? 16 : 64);
    for (const std::string_view name : metric_names()) {
      ASSERT_TRUE(result.rows[i].metrics.count(name)) << name;
      EXPECT_EQ(result.rows[i].metrics.find(name)->second.count, 4 * 2) << name;  // T x Hkv rows
    }
    EXPECT_EQ(result.rows[i].cost.rows, 4 * 2);
  }
  EXPECT_EQ(result.workload, w.name);
  EXPECT_EQ(result.shape.keys, 512);
  EXPECT_EQ(result.shape.value_dim, 24);
}

TEST(Study, ExactIsTheCeilingAndRandomTheFloor) {
  const Workload w = make_synthetic_workload(small_options());
  const StudyResult result = run_study(w, baseline_selectors(), small_study());
  for (const std::int64_t k : {16, 64}) {
    SCOPED_TRACE("k=" + std::to_string(k));
    const StudyRow& exact = row_of(result, "exact", k);
    const StudyRow& random = row_of(result, "random", k);
    const StudyRow& streaming = row_of(result, "streaming", k);
    EXPECT_DOUBLE_EQ(mean(exact, "recall"), 1.0);
    EXPECT_DOUBLE_EQ(exact.metrics.at("recall").min, 1.0);
    EXPECT_NEAR(mean(exact, "mass_ratio"), 1.0, 1e-12);
    EXPECT_DOUBLE_EQ(mean(exact, "top1"), 1.0);
    EXPECT_LT(mean(random, "recall"), mean(exact, "recall"));
    EXPECT_LT(mean(random, "recall"), mean(streaming, "recall"));
    EXPECT_LT(mean(random, "mass"), mean(streaming, "mass"));
    EXPECT_LT(mean(streaming, "mass"), mean(exact, "mass"));
    EXPECT_LT(mean(exact, "out_err"), mean(random, "out_err"));
    // Entropy belongs to the workload: the same in every row.
    EXPECT_DOUBLE_EQ(mean(random, "entropy"), mean(exact, "entropy"));
    // Exact scores every allowed key; the baselines score none.
    EXPECT_GT(exact.cost.keys_scored, 0);
    EXPECT_EQ(random.cost.keys_scored, 0);
    EXPECT_EQ(streaming.cost.macs, 0);
  }
}

TEST(Study, SameSeedSameJsonDifferentSeedDifferentJson) {
  const auto json_for = [](std::uint64_t seed) {
    const Workload w = make_synthetic_workload(small_options(seed));
    return study_to_json(run_study(w, baseline_selectors(seed), small_study()));
  };
  const std::string a = json_for(3);
  EXPECT_EQ(without_seconds(a), without_seconds(json_for(3)));
  EXPECT_NE(without_seconds(a), without_seconds(json_for(4)));
  EXPECT_NE(a.find("\"seconds\""), std::string::npos);
}

TEST(Study, JsonNamesEverySelectorMetricAndShape) {
  const Workload w = make_synthetic_workload(small_options());
  const std::string json = study_to_json(run_study(w, baseline_selectors(), small_study()));
  ASSERT_FALSE(json.empty());
  EXPECT_EQ(json.front(), '{');
  for (const char* needle :
       {"\"workload\"", "\"shape\"", "\"options\"", "\"rows\"", "\"selector\": \"exact\"", "\"selector\": \"random\"",
        "\"selector\": \"streaming\"", "\"metrics\"", "\"cost\"", "\"keys_scored\"", "\"macs\"", "\"key_bytes_read\"",
        "\"k_values\"", "\"granularity\": \"per_kv_head\"", "\"keys\": 512", "\"p5\"", "\"p50\"", "\"p95\"", "\"min\"",
        "\"count\": 8"}) {
    EXPECT_NE(json.find(needle), std::string::npos) << needle;
  }
  for (const std::string_view name : metric_names()) {
    std::string needle = "\"";
    needle.append(name).append("\": {");
    EXPECT_NE(json.find(needle), std::string::npos) << name;
  }
  EXPECT_EQ(json.find("nan"), std::string::npos);
  EXPECT_EQ(json.find("inf"), std::string::npos);
}

TEST(Study, JsonWritesNaNAsNull) {
  StudyResult result;
  result.workload = "hand-made";
  StudyRow row;
  row.selector = "nothing";
  row.k = 4;
  row.metrics.emplace("out_err", aggregate(std::vector<double>{}));  // no values: every field NaN
  row.metrics.emplace("kl", aggregate(std::vector<double>{std::numeric_limits<double>::infinity()}));
  result.rows.push_back(row);
  const std::string json = study_to_json(result);
  EXPECT_NE(json.find("\"mean\": null"), std::string::npos) << json;
  EXPECT_EQ(json.find("nan"), std::string::npos) << json;
  EXPECT_NE(json.find("\"selector\": \"nothing\""), std::string::npos) << json;
}

TEST(Study, TableNamesEverySelectorAndTheWorkload) {
  const Workload w = make_synthetic_workload(small_options());
  std::ostringstream out;
  print_study_table(run_study(w, baseline_selectors(), small_study()), out);
  const std::string table = out.str();
  for (const char* needle : {"exact", "random", "streaming", "recall", "recall_p5", "mass", "mass_ratio", "kl",
                             "top1", "out_err", "out_err_p95", "entropy", "N=512", "per_kv_head"}) {
    EXPECT_NE(table.find(needle), std::string::npos) << needle << "\n" << table;
  }
  EXPECT_NE(table.find(w.name), std::string::npos) << table;
  // One line per row after the header and its rule, all the same width.
  std::istringstream lines(table);
  std::string line;
  std::vector<std::string> body;
  bool after_rule = false;
  while (std::getline(lines, line)) {
    if (after_rule) body.push_back(line);
    if (!line.empty() && line.find_first_not_of('-') == std::string::npos) after_rule = true;
  }
  ASSERT_EQ(body.size(), 6u) << table;
  for (const std::string& l : body) EXPECT_EQ(l.size(), body.front().size()) << table;
}

TEST(Study, KeptKeysAndGranularityTravelToEverySelector) {
  const Workload w = make_synthetic_workload(small_options());
  StudyOptions o = small_study();
  o.granularity = Granularity::per_token;
  o.n_sink = 2;
  o.n_local = 8;
  const StudyResult result = run_study(w, baseline_selectors(), o);
  for (const StudyRow& row : result.rows) {
    EXPECT_EQ(row.metrics.at("recall").count, 4) << row.selector;  // T x 1 group
  }
  // Kept keys count toward k, so even the exact selector may miss part of the pure top-k (SPEC §2).
  EXPECT_LE(mean(row_of(result, "exact", 16), "recall"), 1.0);
  EXPECT_GE(mean(row_of(result, "exact", 16), "recall"), mean(row_of(result, "streaming", 16), "recall"));
  const std::string json = study_to_json(result);
  EXPECT_NE(json.find("\"n_local\": 8"), std::string::npos);
  EXPECT_NE(json.find("\"per_token\""), std::string::npos);

  // On top of k, the kept keys plus the best k others contain the pure top-k.
  o.kept_on_top = true;
  const StudyResult on_top = run_study(w, baseline_selectors(), o);
  EXPECT_DOUBLE_EQ(mean(row_of(on_top, "exact", 16), "recall"), 1.0);
  EXPECT_DOUBLE_EQ(mean(row_of(on_top, "exact", 64), "recall"), 1.0);
}

TEST(Study, BadOptionsThrow) {
  const Workload w = make_synthetic_workload(small_options());
  StudyOptions o = small_study();
  o.k_values = {};
  EXPECT_THROW(run_study(w, baseline_selectors(), o), Error);
  o.k_values = {16, 0};
  EXPECT_THROW(run_study(w, baseline_selectors(), o), Error);
  o.k_values = {16};
  o.n_sink = 10;
  o.n_local = 10;
  EXPECT_THROW(run_study(w, baseline_selectors(), o), Error);
  o.n_sink = -1;
  o.n_local = 0;
  EXPECT_THROW(run_study(w, baseline_selectors(), o), Error);
  EXPECT_THROW(run_study(w, {}, small_study()), Error);
  std::vector<std::unique_ptr<Selector>> with_null = baseline_selectors();
  with_null.push_back(nullptr);
  EXPECT_THROW(run_study(w, with_null, small_study()), Error);
}

/// A selector that writes a repeated key: the study names it instead of producing numbers.
class BrokenSelector final : public Selector {
 public:
  std::string name() const override { return "broken"; }

 protected:
  SelectionCost do_select(const SelectionRequest&, const SelectionPolicy&, const TensorView& selection) override {
    std::int32_t* out = selection.mutable_data<std::int32_t>();
    std::fill(out, out + selection.numel(), 3);
    return {};
  }
};

TEST(Study, AnInvalidSelectionIsReportedWithTheSelectorsName) {
  const Workload w = make_synthetic_workload(small_options());
  std::vector<std::unique_ptr<Selector>> selectors;
  selectors.push_back(std::make_unique<BrokenSelector>());
  try {
    run_study(w, selectors, small_study());
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("broken"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace keysel
