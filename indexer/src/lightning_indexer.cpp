#include "keysel/indexer/lightning_indexer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "indexer_kernels.h"
#include "keysel/core/error.h"
#include "keysel/indexer/hadamard.h"
#include "keysel/indexer/fast_topk.h"
#include "keysel/indexer/topk.h"
#include "quantize_rows.h"

namespace keysel {
namespace {

constexpr std::int64_t kKeysPerWorkItem = 2048;

/// fp32 copy of a CPU view of fp32/fp16/bf16 (no copy needed when already contiguous fp32 is handled by callers).
std::vector<float> to_float_vector(const TensorView& view) {
  if (view.dtype() == DType::fp32 && view.is_contiguous()) {
    return std::vector<float>(view.data<float>(), view.data<float>() + view.numel());
  }
  const std::vector<double> values = to_double_vector(view);
  return std::vector<float>(values.begin(), values.end());
}

bool same_layout(const QuantizationConfig& a, const QuantizationConfig& b) {
  return a.format == b.format && a.granularity == b.granularity &&
         (a.granularity == ScaleGranularity::per_token || a.group_size == b.group_size) &&
         a.power_of_two_scales == b.power_of_two_scales && a.hadamard == b.hadamard;
}

std::vector<std::int32_t> checked_positions(std::string_view function, const TensorView& positions,
                                            std::int64_t tokens) {
  expect_shape(function, positions, "positions", {tokens});
  expect_dtype(function, positions, "positions", {DType::int32});
  expect_device(function, positions, "positions", Device::cpu());
  std::vector<std::int32_t> values(static_cast<std::size_t>(tokens));
  for (std::int64_t t = 0; t < tokens; ++t) {
    values[static_cast<std::size_t>(t)] = positions.data<std::int32_t>()[t * positions.stride(0)];
    if (values[static_cast<std::size_t>(t)] < 0) {
      detail::throw_argument_error(function, "positions", "positions >= 0",
                                   "positions[" + std::to_string(t) + "] = " +
                                       std::to_string(values[static_cast<std::size_t>(t)]));
    }
  }
  return values;
}

std::vector<float> checked_weights(std::string_view function, const TensorView& weights, std::int64_t tokens,
                                   std::int64_t heads) {
  expect_shape(function, weights, "weights", {tokens, heads});
  expect_dtype(function, weights, "weights", {DType::fp32});
  expect_device(function, weights, "weights", Device::cpu());
  std::vector<float> values = to_float_vector(weights);
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (!std::isfinite(values[i])) {
      detail::throw_argument_error(function, "weights", "finite values",
                                   std::to_string(values[i]) + " at index " + std::to_string(i));
    }
  }
  return values;
}

}  // namespace

// ---- IndexerQueries ----------------------------------------------------------------------------------------

IndexerQueries::IndexerQueries(const TensorView& queries, const QuantizationConfig& config) : config_(config) {
  constexpr std::string_view function = "IndexerQueries";
  config.validate(function);
  expect_shape(function, queries, "queries", {kAnyExtent, kAnyExtent, kAnyExtent});
  expect_dtype(function, queries, "queries", {DType::fp32, DType::fp16, DType::bf16});
  expect_device(function, queries, "queries", Device::cpu());
  tokens_ = queries.size(0);
  heads_ = queries.size(1);
  dim_ = queries.size(2);
  KEYSEL_CHECK_ARG(heads_ >= 1, "queries", "HI >= 1 heads", queries.str());
  KEYSEL_CHECK_ARG(dim_ >= 1, "queries", "DI >= 1 channels", queries.str());
  row_bytes_ = row_code_bytes(dim_, config);
  groups_ = scale_groups(dim_, config);
  const std::vector<float> values = to_float_vector(queries);
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(tokens_ * heads_ * row_bytes_));
  std::vector<float> scales(static_cast<std::size_t>(tokens_ * heads_ * groups_));
  quantize_rows(function, "queries", values.data(), tokens_ * heads_, dim_, config, codes.data(), scales.data());
  codes_ = std::move(codes);
  scales_ = std::move(scales);
}

void IndexerQueries::dequantize(std::int64_t token, std::int64_t head, float* out) const {
  KEYSEL_CHECK_ARG(token >= 0 && token < tokens_, "token", "in [0, tokens())", token);
  KEYSEL_CHECK_ARG(head >= 0 && head < heads_, "head", "in [0, heads())", head);
  const std::int64_t row = token * heads_ + head;
  dequantize_row(codes_.data() + row * row_bytes_, scales_.data() + row * groups_, dim_, config_, out);
}

// ---- the fast scorer ---------------------------------------------------------------------------------------

namespace {

/// Everything a scoring call needs after its checks: weights, positions and the decoded queries.
struct ScoringSetup {
  std::vector<float> weights;           // [T, HI]
  std::vector<std::int32_t> positions;  // [T]
  std::vector<float> query_values;      // [T, HI, padded_dim] decoded code values
};

ScoringSetup check_and_prepare(std::string_view function, const IndexerQueries& queries, const TensorView& weights,
                               const TensorView& positions, const IndexerKeyCache& cache) {
  KEYSEL_CHECK_ARG(same_layout(queries.config(), cache.config()), "queries",
                   "the key cache's quantization (" + cache.config().str() + ")", queries.config().str());
  KEYSEL_CHECK_ARG(queries.dim() == cache.dim(), "queries", "DI = " + std::to_string(cache.dim()) + " channels",
                   queries.dim());
  KEYSEL_CHECK_ARG(cache.size() >= 1, "cache", "at least one cached key", "an empty cache");
  ScoringSetup setup;
  setup.weights = checked_weights(function, weights, queries.tokens(), queries.heads());
  setup.positions = checked_positions(function, positions, queries.tokens());
  return setup;
}

void decode_queries(const IndexerQueries& queries, const IndexerKeyCache& cache, ScoringSetup& setup) {
  const std::int64_t rows = queries.tokens() * queries.heads(), padded = cache.padded_dim();
  setup.query_values.resize(static_cast<std::size_t>(rows * padded));
  for (std::int64_t r = 0; r < rows; ++r) {
    decode_codes(queries.codes() + r * queries.row_bytes(), cache.config().format, padded,
                 setup.query_values.data() + r * padded);
  }
}

indexer_detail::IndexerProblem make_problem(const IndexerQueries& queries, const IndexerKeyCache& cache,
                                            const ScoringSetup& setup, std::int64_t t) {
  const std::int64_t heads = queries.heads(), groups = cache.groups();
  indexer_detail::IndexerProblem problem;
  problem.format = cache.config().format;
  problem.heads = heads;
  problem.padded_dim = cache.padded_dim();
  problem.groups = groups;
  problem.group_channels = group_channels(cache.dim(), cache.config());
  problem.row_bytes = cache.row_bytes();
  problem.key_codes = cache.codes();
  problem.key_scales = cache.scales();
  problem.query_values = setup.query_values.data() + t * heads * cache.padded_dim();
  problem.query_scales = queries.scales() + t * heads * groups;
  problem.weights = setup.weights.data() + t * heads;
  return problem;
}

SelectionCost scoring_cost(const IndexerQueries& queries, const IndexerKeyCache& cache,
                           const std::vector<std::int32_t>& positions) {
  SelectionCost cost;
  for (std::int64_t t = 0; t < queries.tokens(); ++t) {
    const auto allowed = static_cast<double>(allowed_keys(positions[static_cast<std::size_t>(t)], cache.size()));
    cost.keys_scored += allowed;
    cost.key_bytes_read += allowed * static_cast<double>(cache.bytes_per_token());
    cost.macs += allowed * static_cast<double>(queries.heads() * cache.dim());
  }
  cost.rows = queries.tokens();
  return cost;
}

}  // namespace

SelectionCost lightning_indexer_scores(const IndexerQueries& queries, const TensorView& weights,
                                       const TensorView& positions, const IndexerKeyCache& cache,
                                       const TensorView& scores) {
  constexpr std::string_view function = "lightning_indexer_scores";
  const auto start = std::chrono::steady_clock::now();
  ScoringSetup setup = check_and_prepare(function, queries, weights, positions, cache);
  const std::int64_t tokens = queries.tokens(), keys = cache.size();
  expect_shape(function, scores, "scores", {tokens, keys});
  expect_dtype(function, scores, "scores", {DType::fp32});
  expect_device(function, scores, "scores", Device::cpu());
  expect_writable(function, scores, "scores");
  expect_contiguous(function, scores, "scores");
  decode_queries(queries, cache, setup);

  float* out = scores.mutable_data<float>();
  const std::int64_t chunks = (keys + kKeysPerWorkItem - 1) / kKeysPerWorkItem;
  // Chosen once, outside the parallel region (a bad KEYSEL_SIMD throws here, not inside OpenMP).
  const indexer_detail::IndexerKernel kernel = indexer_detail::choose_indexer_kernel(cache.config().format);
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t c = 0; c < chunks; ++c) {
      const std::int64_t allowed = allowed_keys(setup.positions[static_cast<std::size_t>(t)], keys);
      const std::int64_t begin = c * kKeysPerWorkItem, end = std::min(begin + kKeysPerWorkItem, keys);
      float* row = out + t * keys;
      const std::int64_t scored_end = std::min(end, allowed);
      std::fill(row + std::max(begin, scored_end), row + end, -std::numeric_limits<float>::infinity());
      if (begin >= scored_end) continue;
      indexer_detail::score_keys_with(kernel, make_problem(queries, cache, setup, t), begin, scored_end, row + begin);
    }
  }
  SelectionCost cost = scoring_cost(queries, cache, setup.positions);
  cost.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return cost;
}

SelectionCost lightning_indexer_select(const IndexerQueries& queries, const TensorView& weights,
                                       const TensorView& positions, const IndexerKeyCache& cache,
                                       const SelectionPolicy& policy, const TensorView& selection) {
  constexpr std::string_view function = "lightning_indexer_select";
  const auto start = std::chrono::steady_clock::now();
  policy.validate(function);
  ScoringSetup setup = check_and_prepare(function, queries, weights, positions, cache);
  const std::int64_t tokens = queries.tokens(), keys = cache.size(), width = policy.width();
  expect_shape(function, selection, "selection", {tokens, 1, width});
  expect_dtype(function, selection, "selection", {DType::int32});
  expect_device(function, selection, "selection", Device::cpu());
  expect_writable(function, selection, "selection");
  decode_queries(queries, cache, setup);

  std::vector<std::int32_t> row(static_cast<std::size_t>(width));
  std::int32_t* out = selection.mutable_data<std::int32_t>();
  // Chosen once, outside the parallel regions (a bad KEYSEL_SIMD throws here, not inside OpenMP).
  const indexer_detail::IndexerKernel kernel = indexer_detail::choose_indexer_kernel(cache.config().format);
  (void)simd_level();
  for (std::int64_t t = 0; t < tokens; ++t) {
    const SelectionRowPlan plan = SelectionRowPlan::make(policy, setup.positions[static_cast<std::size_t>(t)], keys);
    const indexer_detail::IndexerProblem problem = make_problem(queries, cache, setup, t);
    const std::int64_t first = plan.sink_end, chunks = (plan.local_begin - first + kKeysPerWorkItem - 1) / kKeysPerWorkItem;
    StreamingTopK best(plan.fill);
    // Each thread scores blocks of keys into its own buffer and keeps its own top-k; they merge at the end.
#pragma omp parallel if (chunks > 1)
    {
      StreamingTopK local(plan.fill);
      std::vector<float> block(static_cast<std::size_t>(kKeysPerWorkItem));
#pragma omp for schedule(dynamic, 1)
      for (std::int64_t c = 0; c < chunks; ++c) {
        const std::int64_t begin = first + c * kKeysPerWorkItem, end = std::min(begin + kKeysPerWorkItem, plan.local_begin);
        indexer_detail::score_keys_with(kernel, problem, begin, end, block.data());
        local.push(block.data(), begin, end - begin);
      }
#pragma omp critical(keysel_indexer_merge)
      best.merge(local);
    }
    best.finish_row(plan, row.data());
    for (std::int64_t i = 0; i < width; ++i) {
      out[t * selection.stride(0) + i * selection.stride(2)] = row[static_cast<std::size_t>(i)];
    }
  }
  // Kept keys (sinks, local window) are taken without being scored.
  SelectionCost cost;
  for (std::int64_t t = 0; t < tokens; ++t) {
    const SelectionRowPlan plan = SelectionRowPlan::make(policy, setup.positions[static_cast<std::size_t>(t)], keys);
    const auto scored = static_cast<double>(plan.local_begin - plan.sink_end);
    cost.keys_scored += scored;
    cost.key_bytes_read += scored * static_cast<double>(cache.bytes_per_token());
    cost.macs += scored * static_cast<double>(queries.heads() * cache.dim());
  }
  cost.rows = tokens;
  cost.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return cost;
}

// ---- the reference -----------------------------------------------------------------------------------------

void lightning_indexer_reference(const TensorView& queries, const TensorView& weights, const TensorView& positions,
                                 const TensorView& keys, const TensorView& scores) {
  constexpr std::string_view function = "lightning_indexer_reference";
  expect_shape(function, queries, "queries", {kAnyExtent, kAnyExtent, kAnyExtent});
  expect_dtype(function, queries, "queries", {DType::fp32, DType::fp64});
  const std::int64_t tokens = queries.size(0), heads = queries.size(1), dim = queries.size(2);
  expect_shape(function, keys, "keys", {kAnyExtent, dim});
  expect_dtype(function, keys, "keys", {DType::fp32, DType::fp64});
  expect_shape(function, weights, "weights", {tokens, heads});
  expect_dtype(function, weights, "weights", {DType::fp32, DType::fp64});
  const std::int64_t n = keys.size(0);
  const std::vector<std::int32_t> position_values = checked_positions(function, positions, tokens);
  expect_shape(function, scores, "scores", {tokens, n});
  expect_dtype(function, scores, "scores", {DType::fp64});
  expect_writable(function, scores, "scores");
  const std::vector<double> q = to_double_vector(queries), k = to_double_vector(keys), w = to_double_vector(weights);
  double* out = scores.mutable_data<double>();
  const std::int64_t s0 = scores.stride(0), s1 = scores.stride(1);
#pragma omp parallel for collapse(2) schedule(static)
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t s = 0; s < n; ++s) {
      double score = -std::numeric_limits<double>::infinity();
      if (s <= position_values[static_cast<std::size_t>(t)]) {
        score = 0.0;
        for (std::int64_t j = 0; j < heads; ++j) {
          double dot = 0.0;
          for (std::int64_t d = 0; d < dim; ++d) {
            dot += q[static_cast<std::size_t>((t * heads + j) * dim + d)] * k[static_cast<std::size_t>(s * dim + d)];
          }
          score += w[static_cast<std::size_t>(t * heads + j)] * std::max(dot, 0.0);
        }
      }
      out[t * s0 + s * s1] = score;
    }
  }
}

// ---- LightningIndexer ----------------------------------------------------------------------------------------

LightningIndexer::LightningIndexer(std::int64_t heads, std::int64_t dim, const QuantizationConfig& config)
    : heads_(heads), cache_(dim, config) {
  KEYSEL_CHECK_ARG(heads >= 1, "heads", ">= 1", heads);
}

SelectionCost LightningIndexer::score(const TensorView& queries, const TensorView& weights,
                                      const TensorView& positions, const TensorView& scores) const {
  constexpr std::string_view function = "LightningIndexer::score";
  expect_shape(function, queries, "queries", {kAnyExtent, heads_, cache_.dim()});
  const IndexerQueries quantized(queries, cache_.config());
  return lightning_indexer_scores(quantized, weights, positions, cache_, scores);
}

SelectionCost LightningIndexer::select(const TensorView& queries, const TensorView& weights,
                                       const TensorView& positions, const SelectionPolicy& policy,
                                       const TensorView& selection) const {
  constexpr std::string_view function = "LightningIndexer::select";
  policy.validate(function);
  expect_shape(function, queries, "queries", {kAnyExtent, heads_, cache_.dim()});
  const IndexerQueries quantized(queries, cache_.config());
  return lightning_indexer_select(quantized, weights, positions, cache_, policy, selection);
}

// ---- Selector ------------------------------------------------------------------------------------------------

namespace {

class IndexerSelector final : public Selector {
 public:
  /// `queries` [T, HI, DI] and `weights` [T, HI] (fp32, copied) are the defaults a request without indexer
  /// inputs uses; both may be empty (every request must then carry them).
  IndexerSelector(std::shared_ptr<const LightningIndexer> indexer, std::vector<float> queries,
                  std::vector<float> weights, std::string name)
      : indexer_(std::move(indexer)), queries_(std::move(queries)), weights_(std::move(weights)), name_(std::move(name)) {
    KEYSEL_CHECK_ARG(indexer_ != nullptr, "indexer", "an indexer", "nullptr");
    if (queries_.empty() && weights_.empty()) return;
    const std::int64_t per_token = indexer_->heads() * indexer_->dim();
    KEYSEL_CHECK_ARG(!queries_.empty() && static_cast<std::int64_t>(queries_.size()) % per_token == 0, "queries",
                     "T * HI * DI values with HI * DI = " + std::to_string(per_token), queries_.size());
    tokens_ = static_cast<std::int64_t>(queries_.size()) / per_token;
    KEYSEL_CHECK_ARG(static_cast<std::int64_t>(weights_.size()) == tokens_ * indexer_->heads(), "weights",
                     "T * HI = " + std::to_string(tokens_ * indexer_->heads()) + " values", weights_.size());
  }

  std::string name() const override { return name_; }

 protected:
  SelectionCost do_select(const SelectionRequest& request, const SelectionPolicy& policy,
                          const TensorView& selection) override {
    const std::string function = "IndexerSelector::select";
    const AttentionShape shape = request.attention.shape();
    KEYSEL_CHECK_ARG(shape.keys == indexer_->cache().size(), "request.attention.k",
                     "N = " + std::to_string(indexer_->cache().size()) + " keys (the indexer's key cache)", shape.keys);
    // The request's indexer inputs, or the ones given at construction.
    TensorView queries = request.indexer_queries;
    TensorView weights = request.indexer_weights;
    if (queries.empty()) {
      KEYSEL_CHECK_ARG(tokens_ > 0, "request.indexer_queries",
                       "the indexer queries [T, HI, DI] and weights [T, HI] of this step (this selector holds none)",
                       "none");
      KEYSEL_CHECK_ARG(shape.tokens == tokens_, "request.attention.q",
                       "T = " + std::to_string(tokens_) + " query tokens (the indexer queries it holds)", shape.tokens);
      queries = TensorView(queries_.data(), DType::fp32, {tokens_, indexer_->heads(), indexer_->dim()});
      weights = TensorView(weights_.data(), DType::fp32, {tokens_, indexer_->heads()});
    } else {
      expect_shape(function, queries, "request.indexer_queries", {shape.tokens, indexer_->heads(), indexer_->dim()});
    }
    const std::int64_t tokens = shape.tokens;
    const std::int64_t groups = group_count(policy.granularity, shape.query_heads, shape.kv_heads);
    std::vector<std::int32_t> one(static_cast<std::size_t>(tokens * policy.width()));
    SelectionCost cost = indexer_->select(queries, weights, request.attention.positions, policy,
                                          TensorView(one.data(), DType::int32, {tokens, 1, policy.width()}));
    // DSA shares the indexer's one selection among all heads: every group gets it.
    std::int32_t* out = selection.mutable_data<std::int32_t>();
    for (std::int64_t t = 0; t < tokens; ++t) {
      for (std::int64_t g = 0; g < groups; ++g) {
        for (std::int64_t i = 0; i < policy.width(); ++i) {
          out[t * selection.stride(0) + g * selection.stride(1) + i * selection.stride(2)] =
              one[static_cast<std::size_t>(t * policy.width() + i)];
        }
      }
    }
    cost.rows = tokens * groups;
    return cost;
  }

 private:
  std::shared_ptr<const LightningIndexer> indexer_;
  std::vector<float> queries_, weights_;
  std::string name_;
  std::int64_t tokens_ = 0;  // T of the held queries (0: none held)
};

}  // namespace

std::unique_ptr<Selector> make_indexer_selector(std::shared_ptr<const LightningIndexer> indexer, std::string name) {
  return std::make_unique<IndexerSelector>(std::move(indexer), std::vector<float>{}, std::vector<float>{},
                                           std::move(name));
}

std::unique_ptr<Selector> make_indexer_selector(std::shared_ptr<const LightningIndexer> indexer,
                                                std::vector<float> queries, std::vector<float> weights,
                                                std::string name) {
  return std::make_unique<IndexerSelector>(std::move(indexer), std::move(queries), std::move(weights),
                                           std::move(name));
}

}  // namespace keysel
