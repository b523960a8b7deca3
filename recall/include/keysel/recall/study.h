// Studies: run selectors over a workload at several k and aggregate their fidelity (SPEC §4) and cost (§5).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "keysel/core/selection.h"
#include "keysel/indexer/selector.h"
#include "keysel/recall/metrics.h"
#include "keysel/recall/synthetic.h"

namespace keysel {

struct StudyOptions {
  std::vector<std::int64_t> k_values{64, 256, 1024};
  Granularity granularity = Granularity::per_kv_head;
  std::int64_t n_sink = 0;    // kept keys applied to every selector
  std::int64_t n_local = 0;
  bool kept_on_top = false;
  /// Keep every row's metrics in StudyRow::row_metrics (reports draw per-head, per-position and per-row
  /// charts from them); off keeps only the aggregates.
  bool keep_row_metrics = false;
  /// Called after each (selector, k) is done with (done, total, "selector k=K"); may be empty.
  std::function<void(std::size_t done, std::size_t total, const std::string& what)> progress;
};

/// One (selector, k) line of a study.
struct StudyRow {
  std::string selector;
  std::int64_t k = 0;
  std::map<std::string, Aggregate, std::less<>> metrics;  // by metric name (metric_names())
  SelectionCost cost;
  /// Metrics of each row, row-major over (query token t, group), when StudyOptions::keep_row_metrics.
  std::vector<SelectionMetrics> row_metrics;
};

struct StudyResult {
  std::string workload;
  AttentionShape shape;
  StudyOptions options;
  std::vector<StudyRow> rows;
};

/// Runs every selector at every k over the workload and evaluates it against the exact attention.
StudyResult run_study(const Workload& workload, const std::vector<std::unique_ptr<Selector>>& selectors,
                      const StudyOptions& options);

/// Human-readable table of a study (one line per selector and k).
void print_study_table(const StudyResult& result, std::ostream& out);
/// The same numbers as JSON text.
std::string study_to_json(const StudyResult& result);

}  // namespace keysel
