// The tuner: targets parse, a constructed case with hand-set costs and fidelities gives the known Pareto
// frontier and the known cheapest configuration, and a real small run returns a spec that builds the selector
// it measured.
#include <gtest/gtest.h>

#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "keysel/core/error.h"
#include "keysel/recall/selector_spec.h"
#include "keysel/recall/synthetic.h"
#include "keysel/recall/tune.h"

namespace keysel {
namespace {

/// Hands back the measurement set for each label.
class TableEvaluator final : public TuneEvaluator {
 public:
  explicit TableEvaluator(std::map<std::string, TuneMeasurement> table) : table_(std::move(table)) {}
  TuneMeasurement evaluate(const TuneCandidate& candidate) override {
    ++calls;
    if (candidate.label == "broken") throw Error("cannot run broken");
    return table_.at(candidate.label);
  }
  int calls = 0;

 private:
  std::map<std::string, TuneMeasurement> table_;
};

std::vector<TuneCandidate> candidates_of(const std::vector<std::string>& labels) {
  std::vector<TuneCandidate> out;
  for (const std::string& label : labels) out.push_back({label, R"({"type": "exact", "name": ")" + label + "\"}"});
  return out;
}

TEST(TuneTarget, Parses) {
  const TuneTarget a = parse_tune_target("recall:p5>=0.9");
  EXPECT_EQ(a.metric, "recall");
  EXPECT_EQ(a.aggregate, "p5");
  EXPECT_TRUE(a.at_least);
  EXPECT_DOUBLE_EQ(a.threshold, 0.9);
  EXPECT_EQ(a.str(), "recall:p5>=0.9");
  const TuneTarget b = parse_tune_target("out_err:p95<=0.05");
  EXPECT_FALSE(b.at_least);
  EXPECT_TRUE(b.met_by(0.05));
  EXPECT_FALSE(b.met_by(0.06));
  EXPECT_EQ(parse_tune_target("mass_ratio>=0.95").aggregate, "mean");
  for (const char* bad : {"recall:p5>0.9", "recal:p5>=0.9", "recall:p7>=0.9", "recall:p5>=x", "recall:p5>=0.9x", ""}) {
    EXPECT_THROW(parse_tune_target(bad), Error) << bad;
  }
}

TEST(Tune, FindsTheKnownCheapestConfigurationAndFrontier) {
  // Costs and fidelities set by hand. Meeting recall >= 0.9: C, D, G (cost 150), B (200), E (300); the cheapest
  // are C, D and G at 150, of which D and G are the most faithful and D comes first.
  TableEvaluator evaluator({{"A", {100, 0.80}},
                            {"B", {200, 0.95}},
                            {"C", {150, 0.91}},
                            {"D", {150, 0.93}},
                            {"E", {300, 0.99}},
                            {"F", {50, 0.50}},
                            {"G", {150, 0.93}},
                            {"H", {400, 0.97}}});
  const auto candidates = candidates_of({"A", "B", "C", "D", "E", "F", "G", "H"});
  const TuneResult result = tune(candidates, evaluator, parse_tune_target("recall:mean>=0.9"));
  EXPECT_EQ(evaluator.calls, 8);
  ASSERT_TRUE(result.best.has_value());
  EXPECT_EQ(result.points[*result.best].candidate.label, "D");
  std::vector<std::string> frontier;
  for (const std::size_t i : result.frontier) frontier.push_back(result.points[i].candidate.label);
  EXPECT_EQ(frontier, (std::vector<std::string>{"F", "A", "D", "B", "E"}));
  EXPECT_TRUE(result.points[3].on_frontier);
  EXPECT_FALSE(result.points[7].on_frontier);  // H: dearer and worse than E
  EXPECT_EQ(make_selector_from_spec(best_selector_spec(result))->name(), "D");

  std::ostringstream table;
  print_tune_result(result, table);
  EXPECT_NE(table.str().find("cheapest configuration meeting recall:mean>=0.9: D"), std::string::npos) << table.str();
  EXPECT_NE(tune_result_json(result).find("\"best\": 3"), std::string::npos);
}

TEST(Tune, LowerIsBetterTargetsAndUnmetTargets) {
  TableEvaluator evaluator({{"cheap", {10, 0.30}}, {"mid", {20, 0.08}}, {"dear", {40, 0.02}}});
  const auto candidates = candidates_of({"dear", "mid", "broken", "cheap"});
  const TuneResult result = tune(candidates, evaluator, parse_tune_target("out_err:p95<=0.1"));
  ASSERT_TRUE(result.best.has_value());
  EXPECT_EQ(result.points[*result.best].candidate.label, "mid");
  EXPECT_EQ(result.frontier.size(), 3u);
  EXPECT_EQ(result.points[2].error, "cannot run broken");  // kept, reported, never chosen
  EXPECT_FALSE(result.points[2].meets_target);

  const TuneResult unmet = tune(candidates, evaluator, parse_tune_target("out_err:p95<=0.01"));
  EXPECT_FALSE(unmet.best.has_value());
  EXPECT_THROW(best_selector_spec(unmet), Error);
}

TEST(Tune, SpaceCoversFormatsScalesRotationAndOverfetch) {
  TuneSpaceOptions space;
  space.faiss = false;
  space.k = 64;
  const auto candidates = tune_space(space);
  // fp32, bf16: per_token x rotation (4); five scaled formats x 2 scales x rotation (20); 2 factors x 2 formats.
  EXPECT_EQ(candidates.size(), 4u + 20u + 4u);
  for (const TuneCandidate& c : candidates) {
    EXPECT_EQ(make_selector_from_spec(c.spec_json)->name(), c.label) << c.spec_json;
  }
}

TEST(Tune, RealSmallRunPicksALoadableCheaperSpec) {
  SyntheticOptions o;
  o.keys = 512;
  o.tokens = 3;
  o.query_heads = 4;
  o.kv_heads = 2;
  o.head_dim = 64;
  o.value_dim = 64;
  SelectionPolicy policy;
  policy.k = 32;
  const TuneTarget target = parse_tune_target("recall:mean>=0.5");
  TuneSpaceOptions space;
  space.formats = {"fp32", "int8", "int4"};
  space.group_size = 0;
  space.try_rotation = false;
  space.overfetch = {};
  space.faiss = false;
  space.k = policy.k;
  const auto candidates = tune_space(space);
  ASSERT_EQ(candidates.size(), 3u);
  WorkloadTuneEvaluator evaluator(make_synthetic_workload(o), policy, target);
  const TuneResult result = tune(candidates, evaluator, target);
  // Costs follow the bytes per key: int4 < int8 < fp32; the fp32 copy ranks keys as exact attention does.
  EXPECT_LT(result.points[2].measurement.cost, result.points[1].measurement.cost);
  EXPECT_LT(result.points[1].measurement.cost, result.points[0].measurement.cost);
  EXPECT_GT(result.points[0].measurement.value, 0.99);
  ASSERT_TRUE(result.best.has_value());
  EXPECT_LE(result.points[*result.best].measurement.cost, result.points[0].measurement.cost);
  // The written spec builds the selector that was measured: re-measuring it gives the same numbers.
  const std::string spec = best_selector_spec(result);
  const TuneMeasurement again = evaluator.evaluate({"again", spec});
  EXPECT_EQ(again.cost, result.points[*result.best].measurement.cost);
  EXPECT_EQ(again.value, result.points[*result.best].measurement.value);
}

}  // namespace
}  // namespace keysel
