#include "keysel/recall/metrics.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <exception>
#include <functional>
#include <limits>
#include <string>

#include "keysel/attention/reference.h"
#include "keysel/indexer/topk.h"

namespace keysel {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInfinity = std::numeric_limits<double>::infinity();

constexpr std::array<std::string_view, 8> kMetricNames = {
    "recall", "mass", "mass_ratio", "kl", "top1", "out_err", "entropy", "entropy_normalized"};

std::string metric_name_list() {
  std::string list;
  for (const std::string_view name : kMetricNames) {
    if (!list.empty()) list += ", ";
    list += name;
  }
  return list;
}

/// Throws unless 0 <= value < bound, naming `function` and `argument`.
void check_index(std::string_view function, std::string_view argument, std::int64_t value, std::int64_t bound) {
  if (value < 0 || value >= bound) {
    detail::throw_argument_error(function, argument, "0 <= " + std::string(argument) + " < " + std::to_string(bound),
                                 std::to_string(value));
  }
}

/// Percentile of sorted, NaN-free values with NumPy's default ("linear") method: virtual index (n - 1) * q,
/// interpolated between its two neighbours exactly as numpy's _lerp does (so results match NumPy bit for bit
/// on finite data). Infinite neighbours give their limit (kl is +inf for a row with no mass) instead of the
/// inf - inf = NaN that the formula would produce.
double percentile_of_sorted(const std::vector<double>& sorted, double quantile) {
  const std::size_t n = sorted.size();
  const double virtual_index = static_cast<double>(n - 1) * quantile;
  const double below_index = std::floor(virtual_index);
  const std::size_t below = static_cast<std::size_t>(below_index);
  const std::size_t above = std::min(below + 1, n - 1);
  const double gamma = virtual_index - below_index;
  const double a = sorted[below];
  const double b = sorted[above];
  if (gamma == 0.0 || a == b) return a;
  if (std::isinf(a) && std::isinf(b)) return kNaN;  // -inf and +inf: no limit
  if (std::isinf(a)) return a;
  if (std::isinf(b)) return b;
  const double difference = b - a;
  return gamma >= 0.5 ? b - difference * (1.0 - gamma) : a + difference * gamma;
}

}  // namespace

// ---- metric names ----------------------------------------------------------------------------------------

std::span<const std::string_view> metric_names() { return {kMetricNames.data(), kMetricNames.size()}; }

double metric_value(const SelectionMetrics& metrics, std::string_view name) {
  if (name == "recall") return metrics.recall;
  if (name == "mass") return metrics.mass;
  if (name == "mass_ratio") return metrics.mass_ratio;
  if (name == "kl") return metrics.kl;
  if (name == "top1") return metrics.top1;
  if (name == "out_err") return metrics.out_err;
  if (name == "entropy") return metrics.entropy;
  if (name == "entropy_normalized") return metrics.entropy_normalized;
  KEYSEL_CHECK_ARG(false, "name", "one of " + metric_name_list(), name);
  return kNaN;
}

// ---- aggregates ------------------------------------------------------------------------------------------

Aggregate aggregate(std::span<const double> values) {
  std::vector<double> sorted;
  sorted.reserve(values.size());
  for (const double value : values) {
    if (!std::isnan(value)) sorted.push_back(value);
  }
  Aggregate result;
  result.count = static_cast<std::int64_t>(sorted.size());
  if (sorted.empty()) {
    result.mean = result.min = result.p5 = result.p50 = result.p95 = kNaN;
    return result;
  }
  std::sort(sorted.begin(), sorted.end());
  double sum = 0.0;
  for (const double value : sorted) sum += value;
  result.mean = sum / static_cast<double>(sorted.size());
  result.min = sorted.front();
  result.p5 = percentile_of_sorted(sorted, 0.05);
  result.p50 = percentile_of_sorted(sorted, 0.50);
  result.p95 = percentile_of_sorted(sorted, 0.95);
  return result;
}

// ---- metrics of one selection row (SPEC §4) --------------------------------------------------------------

SelectionMetrics selection_metrics(std::span<const double> pbar, std::int64_t allowed,
                                   std::span<const std::int32_t> selection, std::int64_t k) {
  const auto n_keys = static_cast<std::int64_t>(pbar.size());
  KEYSEL_CHECK_ARG(allowed >= 1 && allowed <= n_keys, "allowed",
                   "1 <= allowed <= pbar.size() = " + std::to_string(n_keys), allowed);
  KEYSEL_CHECK_ARG(k >= 1, "k", ">= 1", k);
  for (std::int64_t s = 0; s < allowed; ++s) {
    const double value = pbar[static_cast<std::size_t>(s)];
    if (!(std::isfinite(value) && value >= 0.0)) {
      detail::throw_argument_error("selection_metrics", "pbar", "finite non-negative probabilities",
                                   "pbar[" + std::to_string(s) + "] = " + detail::describe(value));
    }
  }
  std::vector<std::int32_t> selected;
  selected.reserve(selection.size());
  for (std::size_t i = 0; i < selection.size(); ++i) {
    const std::int32_t s = selection[i];
    if (s == -1) continue;
    if (s < 0 || s >= allowed) {
      detail::throw_argument_error("selection_metrics", "selection",
                                   "key positions in [0, " + std::to_string(allowed) + ") or -1",
                                   "selection[" + std::to_string(i) + "] = " + std::to_string(s));
    }
    selected.push_back(s);
  }
  std::sort(selected.begin(), selected.end());
  const auto repeated = std::adjacent_find(selected.begin(), selected.end());
  if (repeated != selected.end()) {
    detail::throw_argument_error("selection_metrics", "selection", "distinct key positions",
                                 std::to_string(*repeated) + " repeated");
  }

  const std::int64_t k_eff = std::min(k, allowed);
  // The k_eff largest allowed values, ascending; pbar_k is the smallest of them.
  std::vector<double> top(pbar.begin(), pbar.begin() + allowed);
  std::nth_element(top.begin(), top.begin() + (k_eff - 1), top.end(), std::greater<>());
  top.resize(static_cast<std::size_t>(k_eff));
  std::sort(top.begin(), top.end());
  const double pbar_k = top.front();
  const double pbar_max = top.back();

  // Selected values, ascending. Summing both masses in ascending order makes mass(A) and mass(E) bit-identical
  // whenever A holds the same values as the exact top-k (any tie-break), so mass_ratio is exactly 1 there.
  std::vector<double> selected_values;
  selected_values.reserve(selected.size());
  for (const std::int32_t s : selected) selected_values.push_back(pbar[static_cast<std::size_t>(s)]);
  std::sort(selected_values.begin(), selected_values.end());

  SelectionMetrics metrics;
  std::int64_t selected_above = 0;  // |{a in A : pbar[a] > pbar_k}|
  std::int64_t selected_tied = 0;   // |{a in A : pbar[a] = pbar_k}|
  double mass = 0.0;
  for (const double value : selected_values) {
    mass += value;
    if (value > pbar_k) {
      ++selected_above;
    } else if (value == pbar_k) {
      ++selected_tied;
    }
    if (value == pbar_max) metrics.top1 = 1.0;
  }
  double exact_mass = 0.0;
  for (const double value : top) exact_mass += value;

  // recall (SPEC §4) is the best overlap of A with E over every tie-break of E, / k_eff. Every E holds all the
  // allowed keys strictly above pbar_k (they are all among the k_eff largest, so `top` counts them) and fills the
  // k_eff - above slots they leave with keys tied at pbar_k: A's tied keys count only up to those slots. A
  // selection wider than k (kept keys on top of k) therefore still scores at most 1. Ties are equal doubles.
  const auto above = static_cast<std::int64_t>(top.end() - std::upper_bound(top.begin(), top.end(), pbar_k));
  const std::int64_t overlap = std::min(k_eff, selected_above + std::min(selected_tied, k_eff - above));
  metrics.recall = static_cast<double>(overlap) / static_cast<double>(k_eff);
  metrics.mass = mass;
  // mass(E) = 0 only when every allowed pbar is 0 (not a distribution): the ratio is then 0/0 = NaN.
  metrics.mass_ratio = mass / exact_mass;
  // KL is non-negative; a full selection can sum to 1 + a few ulps, which would give -log(mass) = -2e-16.
  metrics.kl = mass > 0.0 ? std::max(0.0, -std::log(mass)) : kInfinity;
  metrics.out_err = kNaN;

  double entropy = 0.0;
  for (std::int64_t s = 0; s < allowed; ++s) {
    const double value = pbar[static_cast<std::size_t>(s)];
    if (value > 0.0) entropy -= value * std::log(value);
  }
  metrics.entropy = entropy;
  metrics.entropy_normalized = allowed > 1 ? entropy / std::log(static_cast<double>(allowed)) : 0.0;
  return metrics;
}

// ---- ExactReference --------------------------------------------------------------------------------------

ExactReference::ExactReference(const AttentionInputs& inputs, Granularity granularity)
    : inputs_(inputs), shape_(inputs.validate("ExactReference", false)), granularity_(granularity) {
  groups_ = group_count(granularity_, shape_.query_heads, shape_.kv_heads);
  const std::int64_t tokens = shape_.tokens;
  const std::int64_t keys = shape_.keys;

  positions_.resize(static_cast<std::size_t>(tokens));
  for (std::int64_t t = 0; t < tokens; ++t) {
    positions_[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(inputs.positions.load({t}));
  }

  probabilities_.assign(static_cast<std::size_t>(tokens * shape_.query_heads * keys), 0.0);
  pbar_.assign(static_cast<std::size_t>(tokens * groups_ * keys), 0.0);
  // p, pbar and o from one pass over the logits (exact_attention: the same values as attention_probabilities,
  // group_probabilities and full_attention called one by one).
  TensorView outputs;
  if (!inputs.v.empty()) {
    outputs_.assign(static_cast<std::size_t>(tokens * shape_.query_heads * shape_.value_dim), 0.0);
    outputs = TensorView(outputs_.data(), DType::fp64, {tokens, shape_.query_heads, shape_.value_dim});
  }
  exact_attention(inputs, granularity_, TensorView(probabilities_.data(), DType::fp64, {tokens, shape_.query_heads, keys}),
                  TensorView(pbar_.data(), DType::fp64, {tokens, groups_, keys}), outputs);
  if (!inputs.v.empty()) values_ = to_double_vector(inputs.v);
}

std::int64_t ExactReference::allowed(std::int64_t t) const {
  check_index("ExactReference::allowed", "t", t, shape_.tokens);
  return allowed_keys(positions_[static_cast<std::size_t>(t)], shape_.keys);
}

std::span<const double> ExactReference::pbar(std::int64_t t, std::int64_t group) const {
  check_index("ExactReference::pbar", "t", t, shape_.tokens);
  check_index("ExactReference::pbar", "group", group, groups_);
  const std::size_t keys = static_cast<std::size_t>(shape_.keys);
  return {pbar_.data() + static_cast<std::size_t>(t * groups_ + group) * keys, keys};
}

std::span<const double> ExactReference::probabilities(std::int64_t t, std::int64_t head) const {
  check_index("ExactReference::probabilities", "t", t, shape_.tokens);
  check_index("ExactReference::probabilities", "head", head, shape_.query_heads);
  const std::size_t keys = static_cast<std::size_t>(shape_.keys);
  return {probabilities_.data() + static_cast<std::size_t>(t * shape_.query_heads + head) * keys, keys};
}

void ExactReference::exact_topk(const SelectionPolicy& policy, const TensorView& selection) const {
  if (policy.granularity != granularity_) {
    detail::throw_argument_error("ExactReference::exact_topk", "policy.granularity",
                                 std::string(granularity_name(granularity_)) + " (the reference's granularity)",
                                 std::string(granularity_name(policy.granularity)));
  }
  const TensorView scores(pbar_.data(), DType::fp64, {shape_.tokens, groups_, shape_.keys});
  const TensorView positions(positions_.data(), DType::int32, {shape_.tokens});
  select_topk(scores, positions, policy, selection);
}

SelectionMetrics ExactReference::evaluate(std::int64_t t, std::int64_t group, std::span<const std::int32_t> selection,
                                          std::int64_t k) const {
  check_index("ExactReference::evaluate", "t", t, shape_.tokens);
  check_index("ExactReference::evaluate", "group", group, groups_);
  SelectionMetrics metrics = selection_metrics(pbar(t, group), allowed(t), selection, k);
  if (values_.empty()) return metrics;

  // out_err: o_A[h] = sum_{a in A} p[h,a] v[a] / sum_{a in A} p[h,a] against the full output o[h].
  const std::int64_t value_dim = shape_.value_dim;
  const std::int64_t group_size = shape_.group_size();
  const HeadRange heads = heads_of_group(granularity_, group, shape_.query_heads, shape_.kv_heads);
  std::vector<double> partial(static_cast<std::size_t>(value_dim));
  double error_sum = 0.0;
  for (std::int64_t h = heads.first; h < heads.first + heads.count; ++h) {
    const std::span<const double> p = probabilities(t, h);
    const std::int64_t kv_head = h / group_size;
    std::fill(partial.begin(), partial.end(), 0.0);
    double weight = 0.0;
    for (const std::int32_t s : selection) {
      if (s < 0) continue;
      const double p_s = p[static_cast<std::size_t>(s)];
      if (p_s == 0.0) continue;
      weight += p_s;
      const double* v = values_.data() + static_cast<std::size_t>((s * shape_.kv_heads + kv_head) * value_dim);
      for (std::int64_t d = 0; d < value_dim; ++d) partial[static_cast<std::size_t>(d)] += p_s * v[d];
    }
    // With no probability on A, o_A is taken as 0 (the error is then all of o).
    const double inverse_weight = weight > 0.0 ? 1.0 / weight : 0.0;
    const double* o = outputs_.data() + static_cast<std::size_t>((t * shape_.query_heads + h) * value_dim);
    double difference_norm2 = 0.0;
    double output_norm2 = 0.0;
    for (std::int64_t d = 0; d < value_dim; ++d) {
      const double difference = partial[static_cast<std::size_t>(d)] * inverse_weight - o[d];
      difference_norm2 += difference * difference;
      output_norm2 += o[d] * o[d];
    }
    const double difference_norm = std::sqrt(difference_norm2);
    const double output_norm = std::sqrt(output_norm2);
    // A zero output has no relative error: report the absolute one.
    error_sum += output_norm > 0.0 ? difference_norm / output_norm : difference_norm;
  }
  metrics.out_err = error_sum / static_cast<double>(heads.count);
  return metrics;
}

std::vector<SelectionMetrics> ExactReference::evaluate(const TensorView& selection, std::int64_t k) const {
  if (k < 1) detail::throw_argument_error("ExactReference::evaluate", "k", ">= 1", std::to_string(k));
  const TensorView positions(positions_.data(), DType::int32, {shape_.tokens});
  validate_selection("ExactReference::evaluate", selection, "selection", positions, shape_.keys, groups_);

  const std::int64_t tokens = shape_.tokens;
  const std::int64_t width = selection.size(2);
  const std::int64_t rows = tokens * groups_;
  std::vector<SelectionMetrics> results(static_cast<std::size_t>(rows));
  const std::int32_t* data = selection.data<std::int32_t>();
  const std::int64_t stride_t = selection.stride(0);
  const std::int64_t stride_g = selection.stride(1);
  const std::int64_t stride_w = selection.stride(2);

  // Exceptions cannot leave an OpenMP region: the first one is kept and rethrown after it.
  std::exception_ptr failure;
#pragma omp parallel
  {
    std::vector<std::int32_t> row(static_cast<std::size_t>(width));
#pragma omp for schedule(dynamic, 4)
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t t = r / groups_;
      const std::int64_t g = r % groups_;
      try {
        const std::int32_t* first = data + t * stride_t + g * stride_g;
        for (std::int64_t i = 0; i < width; ++i) row[static_cast<std::size_t>(i)] = first[i * stride_w];
        results[static_cast<std::size_t>(r)] = evaluate(t, g, row, k);
      } catch (...) {
#pragma omp critical(keysel_exact_reference_evaluate)
        if (!failure) failure = std::current_exception();
      }
    }
  }
  if (failure) std::rethrow_exception(failure);
  return results;
}

}  // namespace keysel
