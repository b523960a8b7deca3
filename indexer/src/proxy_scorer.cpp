#include "keysel/indexer/proxy_scorer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "keysel/core/error.h"
#include "keysel/indexer/topk.h"
#include "keysel/core/checked.h"
#include "quantize_rows.h"
#include "symmetric_eigen.h"

namespace keysel {
namespace {

std::vector<float> to_float_vector(const TensorView& view) {
  if (view.dtype() == DType::fp32 && view.is_contiguous()) {
    return std::vector<float>(view.data<float>(), view.data<float>() + view.numel());
  }
  const std::vector<double> values = to_double_vector(view);
  return std::vector<float>(values.begin(), values.end());
}

/// Rows quantised and decoded back to code values, with their scales: what the proxy's dot products read.
struct QuantizedCopy {
  std::int64_t padded = 0, groups = 0, group = 0, row_bytes = 0;
  std::vector<float> values;  // [rows, padded] code values
  std::vector<float> scales;  // [rows, groups]
};

QuantizedCopy quantized_copy(std::string_view function, std::string_view argument, const std::vector<float>& rows,
                             std::int64_t count, std::int64_t dim, const QuantizationConfig& config) {
  QuantizedCopy copy;
  copy.padded = padded_dim(dim);
  copy.groups = scale_groups(dim, config);
  copy.group = group_channels(dim, config);
  copy.row_bytes = row_code_bytes(dim, config);
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(count * copy.row_bytes));
  copy.scales.resize(static_cast<std::size_t>(count * copy.groups));
  quantize_rows(function, argument, rows.data(), count, dim, config, codes.data(), copy.scales.data());
  copy.values.resize(static_cast<std::size_t>(count * copy.padded));
#pragma omp parallel for schedule(static) if (count > 1024)
  for (std::int64_t r = 0; r < count; ++r) {
    decode_codes(codes.data() + r * copy.row_bytes, config.format, copy.padded, copy.values.data() + r * copy.padded);
  }
  return copy;
}

/// Projects rows [count, heads, D] on per-head directions P [heads, D, r] -> [count, heads, r].
std::vector<float> project(const std::vector<float>& x, std::int64_t count, std::int64_t heads, std::int64_t dim,
                           const std::vector<float>& projection, std::int64_t kv_heads, std::int64_t group,
                           std::int64_t rank) {
  std::vector<float> out(static_cast<std::size_t>(count * heads * rank), 0.0f);
#pragma omp parallel for schedule(static) if (count * heads > 256)
  for (std::int64_t row = 0; row < count * heads; ++row) {
    const std::int64_t kv = (row % heads) / group;
    const float* p = projection.data() + kv * dim * rank;
    const float* v = x.data() + row * dim;
    float* o = out.data() + row * rank;
    for (std::int64_t d = 0; d < dim; ++d)
      for (std::int64_t j = 0; j < rank; ++j) o[j] += v[d] * p[d * rank + j];
  }
  (void)kv_heads;
  return out;
}

/// Aggregates per-head logits [count, allowed] (row stride n) into out[0..allowed).
template <typename T>
void aggregate(ProxyAggregation aggregation, const T* logits, std::int64_t count, std::int64_t allowed,
               std::int64_t stride, T* out) {
  switch (aggregation) {
    case ProxyAggregation::max:
      for (std::int64_t s = 0; s < allowed; ++s) {
        T m = logits[s];
        for (std::int64_t h = 1; h < count; ++h) m = std::max(m, logits[h * stride + s]);
        out[s] = m;
      }
      break;
    case ProxyAggregation::mean:
      for (std::int64_t s = 0; s < allowed; ++s) {
        T sum = 0;
        for (std::int64_t h = 0; h < count; ++h) sum += logits[h * stride + s];
        out[s] = sum / static_cast<T>(count);
      }
      break;
    case ProxyAggregation::logsumexp: {
      // log((1/|G|) sum_h p_h[s]) with p_h = exp(l_h - lse_h): shift each head by its own lse, then a stable
      // log-sum-exp over heads.
      std::vector<T> lse(static_cast<std::size_t>(count));
      for (std::int64_t h = 0; h < count; ++h) {
        T m = -std::numeric_limits<T>::infinity();
        for (std::int64_t s = 0; s < allowed; ++s) m = std::max(m, logits[h * stride + s]);
        T sum = 0;
        for (std::int64_t s = 0; s < allowed; ++s) sum += std::exp(logits[h * stride + s] - m);
        lse[static_cast<std::size_t>(h)] = m + std::log(sum);
      }
      for (std::int64_t s = 0; s < allowed; ++s) {
        T m = -std::numeric_limits<T>::infinity();
        for (std::int64_t h = 0; h < count; ++h) m = std::max(m, logits[h * stride + s] - lse[static_cast<std::size_t>(h)]);
        T sum = 0;
        for (std::int64_t h = 0; h < count; ++h) sum += std::exp(logits[h * stride + s] - lse[static_cast<std::size_t>(h)] - m);
        out[s] = m + std::log(sum / static_cast<T>(count));
      }
      break;
    }
  }
}

void check_scores(std::string_view function, const TensorView& scores, const AttentionShape& shape,
                  std::int64_t groups, DType dtype) {
  expect_shape(function, scores, "scores", {shape.tokens, groups, shape.keys});
  expect_dtype(function, scores, "scores", {dtype});
  expect_device(function, scores, "scores", Device::cpu());
  expect_writable(function, scores, "scores");
  expect_contiguous(function, scores, "scores");
}

std::vector<std::int32_t> position_values(const AttentionInputs& inputs, std::int64_t tokens) {
  const std::vector<double> values = to_double_vector(inputs.positions);
  std::vector<std::int32_t> out(static_cast<std::size_t>(tokens));
  for (std::int64_t t = 0; t < tokens; ++t) out[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(values[static_cast<std::size_t>(t)]);
  return out;
}

}  // namespace

std::string_view proxy_aggregation_name(ProxyAggregation aggregation) {
  switch (aggregation) {
    case ProxyAggregation::max: return "max";
    case ProxyAggregation::mean: return "mean";
    case ProxyAggregation::logsumexp: return "logsumexp";
  }
  KEYSEL_CHECK_ARG(false, "aggregation", "max, mean or logsumexp", static_cast<int>(aggregation));
  return {};
}

ProxyAggregation parse_proxy_aggregation(std::string_view name) {
  if (name == "max") return ProxyAggregation::max;
  if (name == "mean") return ProxyAggregation::mean;
  if (name == "logsumexp") return ProxyAggregation::logsumexp;
  KEYSEL_CHECK_ARG(false, "name", "max, mean or logsumexp", name);
  return ProxyAggregation::max;
}

// ---- ProxyScorer -----------------------------------------------------------------------------------------------

ProxyScorer::ProxyScorer(const ProxyConfig& config) : config_(config) {
  config.quantization.validate("ProxyScorer");
  KEYSEL_CHECK_ARG(config.rank >= 0, "config.rank", ">= 0 (0: full head dim)", config.rank);
  proxy_aggregation_name(config.aggregation);  // rejects an out-of-range enumerator
}

void ProxyScorer::fit(const TensorView& calibration_keys) {
  constexpr std::string_view function = "ProxyScorer::fit";
  KEYSEL_CHECK_ARG(config_.rank >= 1, "config.rank", ">= 1 to fit a projection", config_.rank);
  expect_shape(function, calibration_keys, "calibration_keys", {kAnyExtent, kAnyExtent, kAnyExtent});
  expect_dtype(function, calibration_keys, "calibration_keys", {DType::fp32, DType::fp16, DType::bf16});
  expect_device(function, calibration_keys, "calibration_keys", Device::cpu());
  const std::int64_t m = calibration_keys.size(0), kv_heads = calibration_keys.size(1), dim = calibration_keys.size(2);
  KEYSEL_CHECK_ARG(m >= 1 && kv_heads >= 1 && dim >= 1, "calibration_keys", "[M >= 1, Hkv >= 1, D >= 1]",
                   calibration_keys.str());
  KEYSEL_CHECK_ARG(config_.rank <= dim, "config.rank", "<= D = " + std::to_string(dim), config_.rank);
  const std::vector<double> keys = to_double_vector(calibration_keys);
  for (std::size_t i = 0; i < keys.size(); ++i) {
    KEYSEL_CHECK_ARG(std::isfinite(keys[i]), "calibration_keys", "finite values", keys[i]);
  }
  const auto D = static_cast<std::size_t>(dim);
  std::vector<float> projection(static_cast<std::size_t>(kv_heads * dim * config_.rank));
  for (std::int64_t kv = 0; kv < kv_heads; ++kv) {
    std::vector<double> moment(D * D, 0.0), vectors(D * static_cast<std::size_t>(config_.rank));
    for (std::int64_t s = 0; s < m; ++s) {
      const double* k = keys.data() + (s * kv_heads + kv) * dim;
      for (std::size_t i = 0; i < D; ++i)
        for (std::size_t j = i; j < D; ++j) moment[i * D + j] += k[i] * k[j];
    }
    for (std::size_t i = 0; i < D; ++i)
      for (std::size_t j = i; j < D; ++j) moment[j * D + i] = moment[i * D + j] /= static_cast<double>(m);
    symmetric_eigenvectors(moment.data(), dim, config_.rank, vectors.data(), nullptr);
    for (std::size_t i = 0; i < vectors.size(); ++i) {
      projection[static_cast<std::size_t>(kv * dim * config_.rank) + i] = static_cast<float>(vectors[i]);
    }
  }
  projection_ = std::move(projection);
  fitted_kv_heads_ = kv_heads;
  fitted_dim_ = dim;
}

SelectionCost ProxyScorer::score(const AttentionInputs& inputs, Granularity granularity,
                                 const TensorView& scores) const {
  constexpr std::string_view function = "ProxyScorer::score";
  const auto start = std::chrono::steady_clock::now();
  const AttentionShape shape = inputs.validate(function, false);
  const std::int64_t groups = group_count(granularity, shape.query_heads, shape.kv_heads);
  check_scores(function, scores, shape, groups, DType::fp32);
  KEYSEL_CHECK_ARG(shape.keys >= 1, "inputs.k", "at least one cached key", inputs.k.str());
  if (config_.rank > 0) {
    KEYSEL_CHECK_ARG(fitted(), "config.rank", "a fitted projection (call fit() first) for rank > 0", config_.rank);
    KEYSEL_CHECK_ARG(fitted_kv_heads_ == shape.kv_heads && fitted_dim_ == shape.head_dim, "inputs.k",
                     "Hkv = " + std::to_string(fitted_kv_heads_) + ", D = " + std::to_string(fitted_dim_) +
                         " (the fitted projection)",
                     inputs.k.str());
  }
  const std::int64_t T = shape.tokens, N = shape.keys, Hq = shape.query_heads, Hkv = shape.kv_heads,
                     D = shape.head_dim, g = shape.group_size();
  const std::int64_t r = config_.rank > 0 ? config_.rank : D;
  std::vector<float> q = to_float_vector(inputs.q), k = to_float_vector(inputs.k);
  if (config_.rank > 0) {
    q = project(q, T, Hq, D, projection_, Hkv, g, r);
    k = project(k, N, Hkv, D, projection_, Hkv, 1, r);
  }
  const QuantizedCopy qc = quantized_copy(function, "inputs.q", q, T * Hq, r, config_.quantization);
  const QuantizedCopy kc = quantized_copy(function, "inputs.k", k, N * Hkv, r, config_.quantization);
  const std::vector<std::int32_t> positions = position_values(inputs, T);
  const auto softmax_scale = static_cast<float>(inputs.effective_scale());
  float* out = scores.mutable_data<float>();
  const std::int64_t pd = qc.padded;

#pragma omp parallel
  {
    std::vector<float> logits;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (std::int64_t t = 0; t < T; ++t) {
      for (std::int64_t G = 0; G < groups; ++G) {
        const HeadRange heads = heads_of_group(granularity, G, Hq, Hkv);
        const std::int64_t allowed = allowed_keys(positions[static_cast<std::size_t>(t)], N);
        logits.assign(static_cast<std::size_t>(heads.count * N), 0.0f);
        for (std::int64_t i = 0; i < heads.count; ++i) {
          const std::int64_t h = heads.first + i, kv = h / g;
          const float* qv = qc.values.data() + (t * Hq + h) * pd;
          const float* qs = qc.scales.data() + (t * Hq + h) * qc.groups;
          for (std::int64_t s = 0; s < allowed; ++s) {
            const float* kvals = kc.values.data() + (s * Hkv + kv) * pd;
            const float* ks = kc.scales.data() + (s * Hkv + kv) * kc.groups;
            float logit = 0.0f;
            for (std::int64_t grp = 0; grp < qc.groups; ++grp) {
              const std::int64_t d0 = grp * qc.group, d1 = std::min(d0 + qc.group, pd);
              float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
              for (std::int64_t d = d0; d < d1; ++d) dot += qv[d] * kvals[d];
              logit += dot * (qs[grp] * ks[grp]);
            }
            logits[static_cast<std::size_t>(i * N + s)] = softmax_scale * logit;
          }
        }
        float* row = out + (t * groups + G) * N;
        aggregate(config_.aggregation, logits.data(), heads.count, allowed, N, row);
        std::fill(row + allowed, row + N, -std::numeric_limits<float>::infinity());
      }
    }
  }
  SelectionCost cost;
  for (std::int64_t t = 0; t < T; ++t) {
    const auto allowed = static_cast<double>(allowed_keys(positions[static_cast<std::size_t>(t)], N));
    for (std::int64_t G = 0; G < groups; ++G) {
      const HeadRange heads = heads_of_group(granularity, G, Hq, Hkv);
      const std::int64_t kv_read = (heads.first + heads.count - 1) / g - heads.first / g + 1;
      cost.keys_scored += allowed;
      cost.key_bytes_read += allowed * static_cast<double>(kv_read * (kc.row_bytes + 4 * kc.groups));
      cost.macs += allowed * static_cast<double>(heads.count * r);
    }
  }
  cost.rows = T * groups;
  cost.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return cost;
}

SelectionCost ProxyScorer::select(const AttentionInputs& inputs, const SelectionPolicy& policy,
                                  const TensorView& selection) const {
  constexpr std::string_view function = "ProxyScorer::select";
  policy.validate(function);
  const AttentionShape shape = inputs.validate(function, false);
  const std::int64_t groups = group_count(policy.granularity, shape.query_heads, shape.kv_heads);
  expect_shape(function, selection, "selection", {shape.tokens, groups, policy.width()});
  expect_dtype(function, selection, "selection", {DType::int32});
  expect_writable(function, selection, "selection");
  std::vector<float> scores(static_cast<std::size_t>(
      checked_product({shape.tokens, groups, shape.keys}, "ProxySelector::select", "scores [T, G, N]")));
  const TensorView view(scores.data(), DType::fp32, {shape.tokens, groups, shape.keys});
  SelectionCost cost = score(inputs, policy.granularity, view);
  const auto start = std::chrono::steady_clock::now();
  select_topk(view, inputs.positions, policy, selection);
  cost.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return cost;
}

void proxy_scores_reference(const AttentionInputs& inputs, Granularity granularity, ProxyAggregation aggregation,
                            const TensorView& scores) {
  constexpr std::string_view function = "proxy_scores_reference";
  const AttentionShape shape = inputs.validate(function, false);
  const std::int64_t groups = group_count(granularity, shape.query_heads, shape.kv_heads);
  check_scores(function, scores, shape, groups, DType::fp64);
  const std::vector<double> q = to_double_vector(inputs.q), k = to_double_vector(inputs.k);
  const std::vector<std::int32_t> positions = position_values(inputs, shape.tokens);
  const double softmax_scale = inputs.effective_scale();
  const std::int64_t N = shape.keys, D = shape.head_dim, Hq = shape.query_heads, Hkv = shape.kv_heads,
                     g = shape.group_size();
  double* out = scores.mutable_data<double>();
  for (std::int64_t t = 0; t < shape.tokens; ++t) {
    for (std::int64_t G = 0; G < groups; ++G) {
      const HeadRange heads = heads_of_group(granularity, G, Hq, Hkv);
      const std::int64_t allowed = allowed_keys(positions[static_cast<std::size_t>(t)], N);
      std::vector<double> logits(static_cast<std::size_t>(heads.count * N), 0.0);
      for (std::int64_t i = 0; i < heads.count; ++i) {
        const std::int64_t h = heads.first + i, kv = h / g;
        for (std::int64_t s = 0; s < allowed; ++s) {
          double dot = 0.0;
          for (std::int64_t d = 0; d < D; ++d) dot += q[static_cast<std::size_t>((t * Hq + h) * D + d)] * k[static_cast<std::size_t>((s * Hkv + kv) * D + d)];
          logits[static_cast<std::size_t>(i * N + s)] = softmax_scale * dot;
        }
      }
      double* row = out + (t * groups + G) * N;
      aggregate(aggregation, logits.data(), heads.count, allowed, N, row);
      std::fill(row + allowed, row + N, -std::numeric_limits<double>::infinity());
    }
  }
}

// ---- Selector ------------------------------------------------------------------------------------------------

namespace {

class ProxySelector final : public Selector {
 public:
  explicit ProxySelector(ProxyScorer scorer) : scorer_(std::move(scorer)) {}
  std::string name() const override {
    const ProxyConfig& c = scorer_.config();
    std::string out = "proxy-" + std::string(proxy_aggregation_name(c.aggregation)) + "-" + c.quantization.str();
    if (c.rank > 0) out += "-r" + std::to_string(c.rank);
    return out;
  }

 protected:
  SelectionCost do_select(const SelectionRequest& request, const SelectionPolicy& policy,
                          const TensorView& selection) override {
    if (scorer_.config().rank > 0 && !scorer_.fitted()) scorer_.fit(request.attention.k);
    return scorer_.select(request.attention, policy, selection);
  }

 private:
  ProxyScorer scorer_;
};

}  // namespace

std::unique_ptr<Selector> make_proxy_selector(ProxyScorer scorer) {
  return std::make_unique<ProxySelector>(std::move(scorer));
}

}  // namespace keysel
