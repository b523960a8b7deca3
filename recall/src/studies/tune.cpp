// Tuning (tune.h): candidates, evaluation against one exact reference, Pareto frontier, the cheapest choice.
#include "keysel/recall/tune.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <optional>

#include <nlohmann/json.hpp>

#include "keysel/core/device.h"
#include "keysel/core/checked.h"
#include "keysel/core/error.h"
#include "keysel/recall/metrics.h"
#include "keysel/recall/study.h"
#include "studies/selector_spec_json.h"

namespace keysel {
namespace {

using nlohmann::ordered_json;

double aggregate_field(const Aggregate& a, const std::string& name) {
  if (name == "mean") return a.mean;
  if (name == "min") return a.min;
  if (name == "p5") return a.p5;
  if (name == "p50") return a.p50;
  if (name == "p95") return a.p95;
  throw Error("keysel::tune: unknown aggregate \"" + name + "\" (expected mean, min, p5, p50 or p95)");
}

std::string format(const char* f, double v) {
  char buffer[48];
  std::snprintf(buffer, sizeof buffer, f, v);
  return buffer;
}

}  // namespace

std::string TuneTarget::str() const {
  return metric + ":" + aggregate + (at_least ? ">=" : "<=") + format("%g", threshold);
}

TuneTarget parse_tune_target(std::string_view text) {
  const auto bad = [&](const std::string& why) -> TuneTarget {
    throw Error("keysel::parse_tune_target: argument 'target': expected METRIC:AGGREGATE>=X or <=X (such as "
                "\"recall:p5>=0.9\"), got \"" + std::string(text) + "\": " + why);
  };
  TuneTarget target;
  std::size_t op = text.find(">=");
  if (op != std::string_view::npos) {
    target.at_least = true;
  } else if ((op = text.find("<=")) != std::string_view::npos) {
    target.at_least = false;
  } else {
    return bad("no >= or <=");
  }
  const std::string_view left = text.substr(0, op);
  const std::string_view right = text.substr(op + 2);
  const std::size_t colon = left.find(':');
  target.metric = std::string(left.substr(0, colon));
  target.aggregate = colon == std::string_view::npos ? "mean" : std::string(left.substr(colon + 1));
  const auto names = metric_names();
  if (std::find(names.begin(), names.end(), target.metric) == names.end()) return bad("unknown metric '" + target.metric + "'");
  const std::string aggregates[] = {"mean", "min", "p5", "p50", "p95"};
  if (std::find(std::begin(aggregates), std::end(aggregates), target.aggregate) == std::end(aggregates)) {
    return bad("unknown aggregate '" + target.aggregate + "'");
  }
  const std::string number(right);
  std::size_t used = 0;
  try {
    target.threshold = std::stod(number, &used);
  } catch (const std::exception&) {
    return bad("the threshold is not a number");
  }
  if (used != number.size() || !std::isfinite(target.threshold)) return bad("the threshold is not a number");
  return target;
}

WorkloadTuneEvaluator::WorkloadTuneEvaluator(Workload workload, const SelectionPolicy& policy,
                                             const TuneTarget& target)
    : workload_(std::move(workload)), policy_(policy), target_(target) {
  policy_.validate("WorkloadTuneEvaluator");
  // The checks of a study of this workload at this k: k <= N, and memory.
  check_policy_fits(workload_.inputs().validate("WorkloadTuneEvaluator", false), policy_, workload_.name);
  aggregate_field(Aggregate{}, target_.aggregate);
  reference_ = std::make_unique<ExactReference>(workload_.inputs(), policy_.granularity);
}

WorkloadTuneEvaluator::~WorkloadTuneEvaluator() = default;

TuneMeasurement WorkloadTuneEvaluator::evaluate(const TuneCandidate& candidate) {
  const std::optional<IndexerTensors> indexer = workload_indexer_tensors(workload_);
  const auto selector = detail::make_selector(detail::parse_json_text(candidate.spec_json, candidate.label),
                                              candidate.label, indexer ? &*indexer : nullptr);
  const AttentionInputs inputs = workload_.inputs();
  const std::int64_t tokens = workload_.shape.tokens;
  std::vector<std::int32_t> buffer(
      static_cast<std::size_t>(checked_product({tokens, reference_->groups(), policy_.width()}, "tune", "selection")),
      -1);
  const TensorView selection(buffer.data(), DType::int32, {tokens, reference_->groups(), policy_.width()});
  SelectionRequest request = workload_.request();
  request.cache = CacheReuse::fresh;  // a new selector
  const SelectionCost cost = selector->select(request, policy_, selection);
  validate_selection("tune", selection, "selection of \"" + candidate.label + "\"", inputs.positions,
                     workload_.shape.keys, reference_->groups());
  const std::vector<SelectionMetrics> metrics = reference_->evaluate(selection, policy_.k);
  std::vector<double> values(metrics.size());
  for (std::size_t i = 0; i < metrics.size(); ++i) values[i] = metric_value(metrics[i], target_.metric);
  TuneMeasurement m;
  m.value = aggregate_field(aggregate(values), target_.aggregate);
  m.cost = cost.rows > 0 ? cost.key_bytes_read / static_cast<double>(cost.rows) : cost.key_bytes_read;
  return m;
}

std::vector<TuneCandidate> tune_space(const TuneSpaceOptions& options) {
  KEYSEL_CHECK_ARG(options.k >= 1 && options.k <= kMaxKeyPositions, "options.k",
                   "an integer in [1, " + std::to_string(kMaxKeyPositions) + "]", options.k);
  KEYSEL_CHECK_ARG(options.group_size >= 0, "options.group_size", ">= 0 (0: per-token scales only)",
                   options.group_size);
  for (const auto& [values, name] : {std::pair{&options.overfetch, "options.overfetch"},
                                     std::pair{&options.faiss_overfetch, "options.faiss_overfetch"},
                                     std::pair{&options.nlist, "options.nlist"},
                                     std::pair{&options.nprobe, "options.nprobe"}}) {
    for (const std::int64_t v : *values) {
      // Candidate counts f x k are positions too: they must stay int32-sized.
      KEYSEL_CHECK_ARG(v >= 1 && v <= kMaxKeyPositions, name, "entries in [1, " + std::to_string(kMaxKeyPositions) + "]",
                       *values);
    }
  }
  std::vector<TuneCandidate> out;
  const auto add = [&](const ordered_json& spec) {
    out.push_back({spec.at("name").get<std::string>(), spec.dump()});
  };
  const auto indexer_spec = [](const std::string& format, std::int64_t group, bool rotation) {
    ordered_json spec = {{"type", "indexer"}, {"format", format}};
    std::string name = "indexer(" + format;
    if (group > 0) {
      spec["scale_granularity"] = "per_group";
      spec["group_size"] = group;
      name += "/g" + std::to_string(group);
    }
    if (rotation) {
      spec["hadamard"] = true;
      name += "/hadamard";
    }
    spec["name"] = name + ")";
    return spec;
  };
  for (const std::string& format : options.formats) {
    const bool unscaled = format == "fp32" || format == "bf16";
    std::vector<std::int64_t> groups{0};
    if (!unscaled && options.group_size > 0) groups.push_back(options.group_size);
    for (const std::int64_t group : groups) {
      for (const bool rotation : options.try_rotation ? std::vector<bool>{false, true} : std::vector<bool>{false}) {
        add(indexer_spec(format, group, rotation));
      }
    }
  }
  // Over-fetch: the cheapest low-precision indexers with k' = f k candidates re-ranked exactly.
  for (const std::int64_t f : options.overfetch) {
    for (const std::string format : {"int4", "fp8_e4m3"}) {
      if (std::find(options.formats.begin(), options.formats.end(), format) == options.formats.end()) continue;
      ordered_json inner = indexer_spec(format, 0, options.try_rotation);
      inner.erase("name");
      const std::string name = "hybrid(" + indexer_spec(format, 0, options.try_rotation)["name"].get<std::string>() +
                               ",x" + std::to_string(f) + ")";
      add({{"type", "hybrid"}, {"candidates", inner}, {"candidate_k", checked_mul(f, options.k, "tune_space", "overfetch x k")},
           {"name", name}});
    }
  }
  if (options.faiss && built_with_faiss()) {
    for (const std::int64_t nlist : options.nlist) {
      for (const std::int64_t nprobe : options.nprobe) {
        if (nprobe > nlist) continue;
        for (const std::int64_t f : options.faiss_overfetch) {
          const std::string factory = "IVF" + std::to_string(nlist) + ",Flat";
          add({{"type", "faiss"}, {"factory", factory}, {"nprobe", nprobe},
               {"candidates", checked_mul(f, options.k, "tune_space", "faiss_overfetch x k")},
               {"name", "faiss(" + factory + ",nprobe=" + std::to_string(nprobe) + ",x" + std::to_string(f) + ")"}});
        }
      }
    }
  }
  return out;
}

TuneResult tune(const std::vector<TuneCandidate>& candidates, TuneEvaluator& evaluator, const TuneTarget& target,
                const TuneProgress& progress) {
  KEYSEL_CHECK_ARG(!candidates.empty(), "candidates", "at least one candidate", "none");
  TuneResult result;
  result.target = target;
  for (std::size_t i = 0; i < candidates.size(); ++i) {
    TunePoint point;
    point.candidate = candidates[i];
    try {
      point.measurement = evaluator.evaluate(candidates[i]);
    } catch (const Error& e) {
      point.measurement = {std::nan(""), std::nan("")};
      point.error = e.what();
    }
    point.meets_target = std::isfinite(point.measurement.value) && target.met_by(point.measurement.value);
    result.points.push_back(std::move(point));
    if (progress) progress(i + 1, candidates.size(), candidates[i].label);
  }
  // By increasing cost; equal cost: the more faithful first; then candidate order.
  std::vector<std::size_t> order(result.points.size());
  std::iota(order.begin(), order.end(), 0);
  const auto& pts = result.points;
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    const TuneMeasurement& ma = pts[a].measurement;
    const TuneMeasurement& mb = pts[b].measurement;
    // Points that could not be measured go last (NaN would break the ordering).
    const bool fa = std::isfinite(ma.cost) && std::isfinite(ma.value);
    const bool fb = std::isfinite(mb.cost) && std::isfinite(mb.value);
    if (fa != fb) return fa;
    if (!fa) return false;
    if (ma.cost != mb.cost) return ma.cost < mb.cost;
    return target.better(ma.value, mb.value);
  });
  bool have = false;
  double best_value = 0;
  for (const std::size_t i : order) {
    const double v = pts[i].measurement.value;
    if (!std::isfinite(v) || !std::isfinite(pts[i].measurement.cost)) continue;
    if (!have || target.better(v, best_value)) {
      result.frontier.push_back(i);
      result.points[i].on_frontier = true;
      best_value = v;
      have = true;
    }
    if (!result.best && pts[i].meets_target) result.best = i;
  }
  return result;
}

void print_tune_result(const TuneResult& result, std::ostream& out) {
  out << "target: " << result.target.str() << "; cost: key bytes read per row\n\nPareto frontier ("
      << result.frontier.size() << " of " << result.points.size() << " configurations):\n";
  std::size_t width = 13;
  for (const TunePoint& p : result.points) width = std::max(width, p.candidate.label.size());
  const std::string metric = result.target.metric + ":" + result.target.aggregate;
  auto pad = [](std::string s, std::size_t w) { return s.size() >= w ? s : s + std::string(w - s.size(), ' '); };
  out << "  " << pad("configuration", width) << "  " << pad("bytes/row", 12) << "  " << pad(metric, 12) << "  meets\n";
  for (const std::size_t i : result.frontier) {
    const TunePoint& p = result.points[i];
    out << "  " << pad(p.candidate.label, width) << "  " << pad(format("%.1f", p.measurement.cost), 12) << "  "
        << pad(format("%.4f", p.measurement.value), 12) << "  " << (p.meets_target ? "yes" : "no") << "\n";
  }
  std::size_t failed = 0;
  for (const TunePoint& p : result.points) {
    if (p.error.empty()) continue;
    if (failed++ == 0) out << "\nconfigurations that could not run:\n";
    out << "  " << p.candidate.label << ": " << p.error << "\n";
  }
  if (result.best) {
    const TunePoint& p = result.points[*result.best];
    out << "\ncheapest configuration meeting " << result.target.str() << ": " << p.candidate.label << " ("
        << format("%.1f", p.measurement.cost) << " key bytes per row, " << metric << " = "
        << format("%.4f", p.measurement.value) << ")\n  spec: " << p.candidate.spec_json << "\n";
  } else {
    out << "\nno configuration meets " << result.target.str() << "\n";
  }
}

std::string tune_result_json(const TuneResult& result) {
  ordered_json doc;
  doc["target"] = result.target.str();
  ordered_json points = ordered_json::array();
  for (const TunePoint& p : result.points) {
    points.push_back({{"label", p.candidate.label},
                      {"spec", ordered_json::parse(p.candidate.spec_json)},
                      {"key_bytes_per_row", std::isfinite(p.measurement.cost) ? ordered_json(p.measurement.cost) : ordered_json(nullptr)},
                      {"value", std::isfinite(p.measurement.value) ? ordered_json(p.measurement.value) : ordered_json(nullptr)},
                      {"meets_target", p.meets_target},
                      {"on_frontier", p.on_frontier}});
    if (!p.error.empty()) points.back()["error"] = p.error;
  }
  doc["points"] = std::move(points);
  doc["frontier"] = result.frontier;
  doc["best"] = result.best ? ordered_json(*result.best) : ordered_json(nullptr);
  return doc.dump(2) + "\n";
}

std::string best_selector_spec(const TuneResult& result) {
  if (!result.best) throw Error("keysel::best_selector_spec: no configuration meets " + result.target.str());
  return ordered_json::parse(result.points[*result.best].candidate.spec_json).dump(2) + "\n";
}

}  // namespace keysel
