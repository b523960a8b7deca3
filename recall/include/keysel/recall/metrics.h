// Fidelity of a selection against the exact top-k (SPEC §4) and the aggregates studies report.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "keysel/core/attention_inputs.h"
#include "keysel/core/selection.h"

namespace keysel {

/// The SPEC §4 metrics of one selection A for one query token t and group G.
struct SelectionMetrics {
  double recall = 0;              // best |A ∩ E| over every tie-break of E, / k_eff (tie-aware, <= 1)
  double mass = 0;                // sum_{a in A} pbar[a]
  double mass_ratio = 0;          // mass(A) / mass(E)
  double kl = 0;                  // -log(mass), nats (infinity when mass is 0)
  double top1 = 0;                // 1 if a key with the largest pbar is in A
  double out_err = 0;             // mean over heads of ||o_A - o|| / ||o|| (NaN when v was not given)
  double entropy = 0;             // -sum pbar log pbar, nats
  double entropy_normalized = 0;  // entropy / log|allowed| (0 when one key is allowed)
};

/// Names of the metrics, in the order of metric_values(): recall, mass, mass_ratio, kl, top1, out_err,
/// entropy, entropy_normalized.
std::span<const std::string_view> metric_names();
/// Value of metric `name` in `metrics`; throws keysel::Error for an unknown name.
double metric_value(const SelectionMetrics& metrics, std::string_view name);

/// Mean, minimum and percentiles (linear interpolation between closest ranks, as NumPy's default) of values.
/// NaN values are left out and `count` says how many were used; with no values every field is NaN.
struct Aggregate {
  double mean = 0;
  double min = 0;
  double p5 = 0;
  double p50 = 0;
  double p95 = 0;
  std::int64_t count = 0;
};
Aggregate aggregate(std::span<const double> values);

/// Metrics of one selection row from its ingredients (the plain definition; ExactReference uses it).
///   pbar:      the group's distribution over the first `allowed` keys (length >= allowed)
///   selection: key positions, -1 entries ignored; positions must be < allowed and distinct
///   k:         requested k (k_eff = min(k, allowed))
/// out_err is left NaN; ExactReference fills it.
SelectionMetrics selection_metrics(std::span<const double> pbar, std::int64_t allowed,
                                   std::span<const std::int32_t> selection, std::int64_t k);

/// The exact attention of one workload, computed once (in double) and used to evaluate any number of
/// selections against it. Keeps references to the inputs' tensors: they must outlive this object.
class ExactReference {
 public:
  /// Computes p[t,h,s], pbar[t,G,s] and the full outputs o[t,h] (when inputs.v is given).
  ExactReference(const AttentionInputs& inputs, Granularity granularity);

  const AttentionShape& shape() const { return shape_; }
  Granularity granularity() const { return granularity_; }
  std::int64_t groups() const { return groups_; }
  /// Keys query token t may read.
  std::int64_t allowed(std::int64_t t) const;
  /// pbar[t, group, 0..N-1].
  std::span<const double> pbar(std::int64_t t, std::int64_t group) const;
  /// p[t, head, 0..N-1].
  std::span<const double> probabilities(std::int64_t t, std::int64_t head) const;

  /// The exact top-k with the policy's kept keys (policy.granularity must equal granularity()).
  ///   selection: int32 [T, G, policy.width()]
  void exact_topk(const SelectionPolicy& policy, const TensorView& selection) const;

  /// Metrics of one row.
  SelectionMetrics evaluate(std::int64_t t, std::int64_t group, std::span<const std::int32_t> selection,
                            std::int64_t k) const;
  /// Metrics of every row of a selection int32 [T, G, W], row-major over (t, G).
  std::vector<SelectionMetrics> evaluate(const TensorView& selection, std::int64_t k) const;

 private:
  AttentionInputs inputs_;
  AttentionShape shape_;
  Granularity granularity_;
  std::int64_t groups_ = 0;
  std::vector<double> probabilities_;  // [T, Hq, N]
  std::vector<double> pbar_;           // [T, G, N]
  std::vector<double> outputs_;        // [T, Hq, Dv]
  std::vector<double> values_;         // [N, Hkv, Dv]
  std::vector<std::int32_t> positions_;
};

}  // namespace keysel
