#include "keysel/indexer/indexer_training.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "keysel/core/attention_inputs.h"
#include "keysel/core/error.h"
#include "keysel/core/selection.h"

namespace keysel {
namespace {

/// Writes a row-major fp64 buffer into a checked fp64 view of the same shape (any strides).
void write_view(const TensorView& view, const std::vector<double>& values) {
  double* data = view.mutable_data<double>();
  const int rank = view.rank();
  std::vector<std::int64_t> index(static_cast<std::size_t>(rank), 0);
  for (const double value : values) {
    std::int64_t offset = 0;
    for (int d = 0; d < rank; ++d) offset += index[static_cast<std::size_t>(d)] * view.stride(d);
    data[offset] = value;
    for (int d = rank - 1; d >= 0; --d) {
      if (++index[static_cast<std::size_t>(d)] < view.size(d)) break;
      index[static_cast<std::size_t>(d)] = 0;
    }
  }
}

void check_gradient(std::string_view function, const TensorView& view, std::string_view argument,
                    std::initializer_list<std::int64_t> shape) {
  if (view.empty()) return;
  expect_shape(function, view, argument, shape);
  expect_dtype(function, view, argument, {DType::fp64});
  expect_device(function, view, argument, Device::cpu());
  expect_writable(function, view, argument);
}

}  // namespace

double indexer_kl_loss_reference(const TensorView& target, const TensorView& queries, const TensorView& weights,
                                 const TensorView& keys, const TensorView& positions, const TensorView& selection,
                                 LossReduction reduction, const IndexerLossGradients& gradients) {
  constexpr std::string_view function = "indexer_kl_loss_reference";
  const auto floats = {DType::fp32, DType::fp64};
  expect_shape(function, queries, "queries", {kAnyExtent, kAnyExtent, kAnyExtent});
  expect_dtype(function, queries, "queries", floats);
  expect_device(function, queries, "queries", Device::cpu());
  const std::int64_t tokens = queries.size(0), heads = queries.size(1), dim = queries.size(2);
  expect_shape(function, keys, "keys", {kAnyExtent, dim});
  expect_dtype(function, keys, "keys", floats);
  expect_device(function, keys, "keys", Device::cpu());
  const std::int64_t n_keys = keys.size(0);
  KEYSEL_CHECK_ARG_IN(function, n_keys >= 1 && n_keys <= kMaxKeyPositions, "keys",
                      "1 <= N <= 2^31 - 1 keys", keys.str());
  expect_shape(function, weights, "weights", {tokens, heads});
  expect_dtype(function, weights, "weights", floats);
  expect_device(function, weights, "weights", Device::cpu());
  expect_shape(function, target, "target", {tokens, n_keys});
  expect_dtype(function, target, "target", floats);
  expect_device(function, target, "target", Device::cpu());
  expect_shape(function, positions, "positions", {tokens});
  expect_dtype(function, positions, "positions", {DType::int32});
  expect_device(function, positions, "positions", Device::cpu());
  for (std::int64_t t = 0; t < tokens; ++t) {
    KEYSEL_CHECK_ARG_IN(function, positions.load({t}) >= 0, "positions", "positions >= 0",
                        "positions[" + std::to_string(t) + "] = " + std::to_string(positions.load({t})));
  }
  if (!selection.empty()) validate_selection(function, selection, "selection", positions, n_keys, 1);
  check_gradient(function, gradients.queries, "gradients.queries", {tokens, heads, dim});
  check_gradient(function, gradients.weights, "gradients.weights", {tokens, heads});
  check_gradient(function, gradients.keys, "gradients.keys", {n_keys, dim});

  const std::vector<double> q = to_double_vector(queries);  // [T, HI, DI]
  const std::vector<double> w = to_double_vector(weights);  // [T, HI]
  const std::vector<double> k = to_double_vector(keys);     // [N, DI]
  const std::vector<double> p = to_double_vector(target);   // [T, N]
  const std::vector<double> sel = selection.empty() ? std::vector<double>() : to_double_vector(selection);
  const std::int64_t width = selection.empty() ? 0 : selection.size(2);

  // The key set of each token.
  std::vector<std::vector<std::int64_t>> key_sets(static_cast<std::size_t>(tokens));
  for (std::int64_t t = 0; t < tokens; ++t) {
    auto& set = key_sets[static_cast<std::size_t>(t)];
    if (selection.empty()) {
      const std::int64_t allowed = allowed_keys(static_cast<std::int64_t>(positions.load({t})), n_keys);
      for (std::int64_t s = 0; s < allowed; ++s) set.push_back(s);
    } else {
      for (std::int64_t i = 0; i < width && sel[static_cast<std::size_t>(t * width + i)] >= 0; ++i) {
        set.push_back(static_cast<std::int64_t>(sel[static_cast<std::size_t>(t * width + i)]));
      }
    }
    for (const std::int64_t s : set) {
      const double value = p[static_cast<std::size_t>(t * n_keys + s)];
      KEYSEL_CHECK_ARG_IN(function, std::isfinite(value) && value >= 0.0, "target",
                          "finite values >= 0 on the keys a row reads",
                          "target[" + std::to_string(t) + ", " + std::to_string(s) + "] = " + std::to_string(value));
    }
  }

  // Per token: the loss and dL/dI on its key set (unscaled by the reduction).
  std::vector<double> losses(static_cast<std::size_t>(tokens), 0.0);
  std::vector<std::vector<double>> d_scores(static_cast<std::size_t>(tokens));
  std::int64_t rows = 0;
  for (std::int64_t t = 0; t < tokens; ++t) {
    const auto& set = key_sets[static_cast<std::size_t>(t)];
    double mass = 0.0;
    for (const std::int64_t s : set) mass += p[static_cast<std::size_t>(t * n_keys + s)];
    if (set.empty() || !(mass > 0.0)) continue;
    ++rows;
    std::vector<double> scores(set.size(), 0.0);
    for (std::size_t i = 0; i < set.size(); ++i) {
      for (std::int64_t j = 0; j < heads; ++j) {
        double dot = 0.0;
        for (std::int64_t d = 0; d < dim; ++d) {
          dot += q[static_cast<std::size_t>((t * heads + j) * dim + d)] * k[static_cast<std::size_t>(set[i] * dim + d)];
        }
        scores[i] += w[static_cast<std::size_t>(t * heads + j)] * std::max(dot, 0.0);
      }
    }
    const double max_score = *std::max_element(scores.begin(), scores.end());
    double sum = 0.0;
    for (const double x : scores) sum += std::exp(x - max_score);
    const double log_sum = max_score + std::log(sum);
    double loss = 0.0;
    auto& grad = d_scores[static_cast<std::size_t>(t)];
    grad.resize(set.size());
    for (std::size_t i = 0; i < set.size(); ++i) {
      const double ptilde = p[static_cast<std::size_t>(t * n_keys + set[i])] / mass;
      const double log_q = scores[i] - log_sum;
      if (ptilde > 0.0) loss += ptilde * (std::log(ptilde) - log_q);
      grad[i] = std::exp(log_q) - ptilde;
    }
    losses[static_cast<std::size_t>(t)] = loss;
  }
  const double factor = reduction == LossReduction::mean && rows > 0 ? 1.0 / static_cast<double>(rows) : 1.0;
  double total = 0.0;
  for (const double x : losses) total += x;

  const bool any_gradient = !gradients.queries.empty() || !gradients.weights.empty() || !gradients.keys.empty();
  if (any_gradient) {
    std::vector<double> dq(q.size(), 0.0), dw(w.size(), 0.0), dk(k.size(), 0.0);
    for (std::int64_t t = 0; t < tokens; ++t) {
      const auto& set = key_sets[static_cast<std::size_t>(t)];
      const auto& grad = d_scores[static_cast<std::size_t>(t)];
      if (grad.empty()) continue;
      for (std::size_t i = 0; i < set.size(); ++i) {
        const double g = grad[i] * factor;
        const std::int64_t s = set[i];
        for (std::int64_t j = 0; j < heads; ++j) {
          const double* qv = q.data() + (t * heads + j) * dim;
          const double* kv = k.data() + s * dim;
          double dot = 0.0;
          for (std::int64_t d = 0; d < dim; ++d) dot += qv[d] * kv[d];
          if (dot <= 0.0) continue;  // ReLU'(x) = 0 for x <= 0
          const double wj = w[static_cast<std::size_t>(t * heads + j)];
          dw[static_cast<std::size_t>(t * heads + j)] += g * dot;
          for (std::int64_t d = 0; d < dim; ++d) {
            dq[static_cast<std::size_t>((t * heads + j) * dim + d)] += g * wj * kv[d];
            dk[static_cast<std::size_t>(s * dim + d)] += g * wj * qv[d];
          }
        }
      }
    }
    if (!gradients.queries.empty()) write_view(gradients.queries, dq);
    if (!gradients.weights.empty()) write_view(gradients.weights, dw);
    if (!gradients.keys.empty()) write_view(gradients.keys, dk);
  }
  return total * factor;
}

}  // namespace keysel
