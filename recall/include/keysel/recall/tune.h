// Tuning: search selector configurations for the cheapest one whose fidelity meets a target (SPEC §4 vs §5).
//
//   keysel::TuneTarget target = keysel::parse_tune_target("recall:p5>=0.9");
//   keysel::TuneSpaceOptions space;                     // indexer formats x scales x rotation (+ FAISS, over-fetch)
//   keysel::WorkloadTuneEvaluator evaluator(workload, policy, target);
//   keysel::TuneResult result = keysel::tune(keysel::tune_space(space), evaluator, target);
//   std::string spec = keysel::best_selector_spec(result); // load with make_selector_from_spec / load_selector_spec
//
// Cost is key bytes read per row (query token x group): what a decode step moves from memory to choose. The
// Pareto frontier holds the candidates no other candidate beats on both cost and fidelity.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

#include "keysel/core/selection.h"
#include "keysel/recall/study.h"
#include "keysel/recall/synthetic.h"

namespace keysel {

class ExactReference;

struct TuneTarget {
  std::string metric = "recall";    // a metric_names() entry
  std::string aggregate = "p5";     // mean, min, p5, p50, p95
  bool at_least = true;             // true: value >= threshold (recall, mass); false: value <= (kl, out_err)
  double threshold = 0.9;

  bool met_by(double value) const { return at_least ? value >= threshold : value <= threshold; }
  /// True when `a` is more faithful than `b` in the target's direction.
  bool better(double a, double b) const { return at_least ? a > b : a < b; }
  /// "recall:p5>=0.9".
  std::string str() const;
};

/// Parses "METRIC:AGGREGATE>=X" or "METRIC:AGGREGATE<=X" (AGGREGATE defaults to mean when left out:
/// "mass_ratio>=0.95"). Throws keysel::Error naming what is wrong.
TuneTarget parse_tune_target(std::string_view text);

/// One configuration to try: a label and the selector spec (selector_spec.h) that builds it.
struct TuneCandidate {
  std::string label;
  std::string spec_json;
};

struct TuneMeasurement {
  double cost = 0;   // key bytes read per row
  double value = 0;  // the target's metric aggregate
};

/// Measures one candidate. Tests use hand-made evaluators; WorkloadTuneEvaluator runs it on a workload.
class TuneEvaluator {
 public:
  virtual ~TuneEvaluator() = default;
  virtual TuneMeasurement evaluate(const TuneCandidate& candidate) = 0;
};

/// Runs candidates on one workload at one policy against its exact attention (computed once).
class WorkloadTuneEvaluator final : public TuneEvaluator {
 public:
  WorkloadTuneEvaluator(Workload workload, const SelectionPolicy& policy, const TuneTarget& target);
  ~WorkloadTuneEvaluator() override;
  TuneMeasurement evaluate(const TuneCandidate& candidate) override;
  const Workload& workload() const { return workload_; }

 private:
  Workload workload_;
  SelectionPolicy policy_;
  TuneTarget target_;
  std::unique_ptr<ExactReference> reference_;
};

struct TunePoint {
  TuneCandidate candidate;
  TuneMeasurement measurement;
  bool meets_target = false;
  bool on_frontier = false;
  /// Why the evaluator rejected the candidate (a keysel::Error's message, such as an IVF with more lists than
  /// keys); such a point has a NaN value and never meets the target.
  std::string error;
};

struct TuneResult {
  TuneTarget target;
  std::vector<TunePoint> points;      // in candidate order
  std::vector<std::size_t> frontier;  // indices into points, by increasing cost
  std::optional<std::size_t> best;    // the cheapest point meeting the target (ties: more faithful, then first)
};

/// What tune_space() searches.
struct TuneSpaceOptions {
  /// Indexer (proxy stand-in, selector_spec.h) key formats.
  std::vector<std::string> formats{"fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "int8", "int4"};
  /// Scale granularities: per_token, and per_group with this group size (0 leaves per_group out). fp32 and bf16
  /// are stored unscaled, so they are tried per_token only.
  std::int64_t group_size = 32;
  bool try_rotation = true;  // hadamard off and on
  /// Over-fetch factors f: the hybrid of a low-precision indexer with k' = f * k candidates, re-ranked exactly.
  std::vector<std::int64_t> overfetch{2, 4};
  /// FAISS IVF grids (used only when keysel::built_with_faiss()): "IVF<nlist>,Flat" x nprobe x over-fetch.
  bool faiss = true;
  std::vector<std::int64_t> nlist{16, 64};
  std::vector<std::int64_t> nprobe{1, 4, 16};
  std::vector<std::int64_t> faiss_overfetch{1, 2, 4};
  std::int64_t k = 2048;  // the k of the over-fetch factors
};

/// The candidates of a space, in a fixed order.
std::vector<TuneCandidate> tune_space(const TuneSpaceOptions& options);

using TuneProgress = ProgressCallback;  // study.h: (done, total, the candidate's label)

/// Evaluates every candidate, marks the Pareto frontier and the cheapest point meeting the target. A candidate
/// whose evaluation throws keysel::Error is kept with its message (TunePoint::error) and the search goes on.
TuneResult tune(const std::vector<TuneCandidate>& candidates, TuneEvaluator& evaluator, const TuneTarget& target,
                const TuneProgress& progress = {});

/// The frontier and the chosen configuration as a table.
void print_tune_result(const TuneResult& result, std::ostream& out);
/// Every point, the frontier and the best, as JSON.
std::string tune_result_json(const TuneResult& result);
/// The best point's selector spec (pretty JSON, loadable by load_selector_spec); throws keysel::Error when no
/// candidate met the target.
std::string best_selector_spec(const TuneResult& result);

}  // namespace keysel
