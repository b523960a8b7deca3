// CandidateSelector (candidate_search.h): one CandidateSearch per key head over the key cache, turned into a
// Selector; the Lightning Indexer score it can re-rank by; make_candidate_selector. The searches themselves
// are in candidate_search.cpp (brute force) and faiss_search.cpp.
//
// One select() call: keep the indexes in step with the request's cache (sync_indexes), prepare what every row
// reads (prepare_rows), then per row in parallel: gather the candidates (gather_candidates), re-rank them
// (rerank_by_score or rerank_exact) and write the row into a buffer (write_row); the buffer reaches the
// selection only once every row succeeded.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "keysel/core/build_config.h"
#include "keysel/core/dtype.h"
#include "keysel/core/error.h"
#include "keysel/core/tensor.h"
#include "keysel/indexer/candidate_search.h"
#include "keysel/indexer/query_aware_search.h"
#include "selectors_support.h"

#if KEYSEL_FAISS
#include "keysel/indexer/faiss_search.h"
#endif

namespace keysel {

namespace support = selector_support;
using support::Clock;
using support::seconds_since;

/// The indexes and the fp32 copy of the keys they hold (what a retrain trains on and the exact re-rank reads).
struct CandidateSelector::Cache {
  std::int64_t kv_heads = 0;
  std::int64_t dim = 0;
  std::int64_t size = 0;          // keys per key head
  std::int64_t trained_size = 0;  // keys the training used
  std::int64_t retrains = 0;
  std::int64_t overflows_at_training = 0;
  double last_build_seconds = 0;
  std::vector<std::vector<float>> keys;  // [Hkv][size * dim]
  std::vector<std::vector<float>> training_queries;  // [Hkv][m * dim]: what query-aware searches train on
  std::vector<std::unique_ptr<CandidateSearch>> indexes;
  // The view the keys came from, so that select() can tell a grown cache from a different one.
  const void* source = nullptr;
  DType source_dtype = DType::fp32;
  std::int64_t source_strides[3] = {0, 0, 0};
};

namespace {

/// Copies rows [first, first + count) of keys [N, Hkv, D] into per-head fp32 buffers (appending).
void append_key_rows(const TensorView& keys, std::int64_t first, std::int64_t count,
                     std::vector<std::vector<float>>& out) {
  const std::int64_t heads = keys.size(1);
  const std::int64_t d = keys.size(2);
  const std::int64_t s0 = keys.stride(0);
  const std::int64_t s1 = keys.stride(1);
  const std::int64_t s2 = keys.stride(2);
  for (std::int64_t h = 0; h < heads; ++h) {
    std::vector<float>& dst = out[static_cast<std::size_t>(h)];
    const std::size_t base = dst.size();
    dst.resize(base + static_cast<std::size_t>(count * d));
    float* o = dst.data() + base;
#pragma omp parallel for if (count * d > 65536 && !omp_in_parallel())
    for (std::int64_t r = 0; r < count; ++r) {
      const std::int64_t row = (first + r) * s0 + h * s1;
      for (std::int64_t c = 0; c < d; ++c) {
        const std::int64_t off = row + c * s2;
        float v = 0;
        switch (keys.dtype()) {
          case DType::fp32: v = keys.data<float>()[off]; break;
          case DType::fp16: v = fp16_bits_to_fp32(keys.data<std::uint16_t>()[off]); break;
          case DType::bf16: v = bf16_bits_to_fp32(keys.data<std::uint16_t>()[off]); break;
          default: break;  // rejected by the callers' dtype check
        }
        o[r * d + c] = v;
      }
    }
  }
}

/// Trains `index` on n keys x, with the key head's training queries when the search learns from queries.
void train_index(CandidateSearch& index, const std::vector<float>& queries, std::int64_t n, const float* x) {
  if (index.uses_queries()) {
    index.set_training_queries(static_cast<std::int64_t>(queries.size()) / index.dim(), queries.data());
  }
  index.train(n, x);
}

void check_keys(std::string_view function, const TensorView& keys, std::int64_t kv_heads, std::int64_t dim) {
  expect_shape(function, keys, "keys", {kAnyExtent, kv_heads, dim});
  expect_dtype(function, keys, "keys", {DType::fp32, DType::fp16, DType::bf16});
  expect_device(function, keys, "keys", Device::cpu());
}

void check_selector_options(std::string_view function, const CandidateSelectorOptions& options) {
  KEYSEL_CHECK_ARG_IN(function, options.candidates >= 0, "options.candidates",
                      ">= 0 (0: the selection's free slots)", options.candidates);
  KEYSEL_CHECK_ARG_IN(function,
                      options.retrain_growth == 0.0 ||
                          (options.retrain_growth > 1.0 && std::isfinite(options.retrain_growth)),
                      "options.retrain_growth", "0 (never) or a finite factor > 1", options.retrain_growth);
  KEYSEL_CHECK_ARG_IN(function, options.train_keys >= 0, "options.train_keys", ">= 0 (0: all keys)",
                      options.train_keys);
  KEYSEL_CHECK_ARG_IN(function, options.search.nprobe >= 0, "options.search.nprobe", ">= 0",
                      options.search.nprobe);
  KEYSEL_CHECK_ARG_IN(function, options.search.ef_search >= 0, "options.search.ef_search", ">= 0",
                      options.search.ef_search);
}

// ---- the rows of one select() ------------------------------------------------------------------------------

/// What every row of one select() call reads (query preparation: prepare_rows).
struct RowInputs {
  const AttentionInputs* inputs = nullptr;
  AttentionShape shape;
  const SelectionPolicy* policy = nullptr;
  const CandidateSelectorOptions* options = nullptr;
  const std::vector<std::unique_ptr<CandidateSearch>>* indexes = nullptr;  // one per key head
  const std::vector<std::vector<float>>* keys = nullptr;  // what the indexes hold: [Hkv][N * D] fp32
  std::int64_t groups = 0;
  std::int64_t width = 0;
  double scale = 0;
  std::vector<float> queries;         // fp32 [T, Hq, D]: what the searches take
  std::vector<std::int64_t> allowed;  // [T]: keys each token may read
};

RowInputs prepare_rows(const AttentionInputs& inputs, const SelectionPolicy& policy,
                       const CandidateSelectorOptions& options,
                       const std::vector<std::unique_ptr<CandidateSearch>>& indexes,
                       const std::vector<std::vector<float>>& keys) {
  RowInputs rows;
  rows.inputs = &inputs;
  rows.shape = inputs.shape();
  rows.policy = &policy;
  rows.options = &options;
  rows.indexes = &indexes;
  rows.keys = &keys;
  rows.groups = group_count(policy.granularity, rows.shape.query_heads, rows.shape.kv_heads);
  rows.width = policy.width();
  rows.scale = inputs.effective_scale();
  const std::vector<double> q = to_double_vector(inputs.q);
  rows.queries.assign(q.begin(), q.end());
  rows.allowed = support::allowed_per_token(inputs, rows.shape);
  return rows;
}

/// One thread's buffers, reused from row to row.
struct RowScratch {
  std::vector<float> search_queries;
  std::vector<float> scores;
  std::vector<std::int64_t> ids;
  std::vector<std::int64_t> pool;
  std::vector<std::int32_t> candidates;  // the row's candidate free keys U, ascending
  std::vector<std::int32_t> kept;
  std::vector<double> candidate_scores;
  std::vector<float> decoded;
};

/// Searches each key head the group of token t reads, with all of the group's queries on it in one batch, for
/// k' candidates among the free keys; leaves their union in scratch.candidates and adds the searches' cost.
void search_candidates(const RowInputs& rows, std::int64_t t, const HeadRange& heads, const SelectionRowPlan& plan,
                       RowScratch& scratch, SelectionCost& row_cost) {
  const CandidateSelectorOptions& options = *rows.options;
  const std::int64_t d = rows.shape.head_dim;
  const std::int64_t group_size = rows.shape.group_size();
  const std::int64_t fetch = std::min(options.candidates > 0 ? options.candidates : plan.fill, plan.free_keys());
  SearchParameters params = options.search;
  params.id_begin = plan.sink_end;
  params.id_end = plan.local_begin;
  SearchCost search_cost;
  std::vector<std::int64_t>& pool = scratch.pool;
  std::vector<float>& search_queries = scratch.search_queries;
  pool.clear();
  const std::int64_t kv_first = heads.first / group_size;
  const std::int64_t kv_last = (heads.first + heads.count - 1) / group_size;
  for (std::int64_t kv = kv_first; kv <= kv_last; ++kv) {
    const std::int64_t h_begin = std::max(heads.first, kv * group_size);
    const std::int64_t h_end = std::min(heads.first + heads.count, (kv + 1) * group_size);
    search_queries.clear();
    for (std::int64_t h = h_begin; h < h_end; ++h) {
      const float* q = rows.queries.data() + (t * rows.shape.query_heads + h) * d;
      search_queries.insert(search_queries.end(), q, q + d);
    }
    std::int64_t n_queries = h_end - h_begin;
    if (options.queries == CandidateQueries::group_mean && n_queries > 1) {
      // The mean query ranks keys by the group's mean logit, a proxy for its mean probability.
      for (std::int64_t c = 0; c < d; ++c) {
        float sum = 0;
        for (std::int64_t i = 0; i < n_queries; ++i) sum += search_queries[static_cast<std::size_t>(i * d + c)];
        search_queries[static_cast<std::size_t>(c)] = sum / static_cast<float>(n_queries);
      }
      n_queries = 1;
    }
    scratch.scores.resize(static_cast<std::size_t>(n_queries * fetch));
    scratch.ids.resize(static_cast<std::size_t>(n_queries * fetch));
    search_cost += (*rows.indexes)[static_cast<std::size_t>(kv)]->search(
        n_queries, search_queries.data(), fetch, scratch.scores.data(), scratch.ids.data(), params);
    for (const std::int64_t id : scratch.ids) {
      if (id >= 0) pool.push_back(id);
    }
  }
  std::sort(pool.begin(), pool.end());
  pool.erase(std::unique(pool.begin(), pool.end()), pool.end());
  scratch.candidates.assign(pool.begin(), pool.end());
  // Keys scored per search query (so that it compares with the exact path's `allowed` per row).
  row_cost.keys_scored +=
      (search_cost.vectors_scored + search_cost.centroids_scored) / static_cast<double>(search_cost.queries);
  row_cost.macs += search_cost.macs;
  row_cost.key_bytes_read += search_cost.bytes_read;
}

/// The row's candidate free keys U in scratch.candidates, ascending: every free key when they fit in the free
/// slots, none when there are no free slots to fill (k = kept keys), else the union of the searches' candidates.
void gather_candidates(const RowInputs& rows, std::int64_t t, const HeadRange& heads, const SelectionRowPlan& plan,
                       RowScratch& scratch, SelectionCost& row_cost) {
  scratch.candidates.clear();
  if (plan.free_keys() <= plan.fill) {
    for (std::int64_t s = plan.sink_end; s < plan.local_begin; ++s) {
      scratch.candidates.push_back(static_cast<std::int32_t>(s));
    }
    return;
  }
  if (plan.fill == 0) return;
  search_candidates(rows, t, heads, plan, scratch, row_cost);
}

/// The best plan.fill of U by options.rerank (one call per row, one thread at a time).
std::vector<std::int32_t> rerank_by_score(const RowInputs& rows, std::int64_t t, std::int64_t group,
                                          const SelectionRowPlan& plan, RowScratch& scratch,
                                          SelectionCost& row_cost) {
  const std::vector<std::int32_t>& candidates = scratch.candidates;
  scratch.candidate_scores.assign(candidates.size(), 0.0);
#pragma omp critical(keysel_candidate_rerank)
  rows.options->rerank(t, group, candidates, scratch.candidate_scores);
  // The score's own work is the caller's; the keys it scored are counted.
  row_cost.keys_scored += static_cast<double>(candidates.size());
  return support::best_by_score(candidates, scratch.candidate_scores, plan.fill);
}

/// The best plan.fill of U by the group's mean probability renormalised over U and the kept keys, in double
/// (selector_support::renormalised_pbar, the hybrid selector's exact re-rank), over the keys the indexes hold:
/// keys declared unchanged are the indexed ones (CacheReuse::appended).
std::vector<std::int32_t> rerank_exact(const RowInputs& rows, std::int64_t t, std::int64_t group,
                                       const SelectionRowPlan& plan, RowScratch& scratch, SelectionCost& row_cost) {
  const std::vector<std::int32_t>& candidates = scratch.candidates;
  std::vector<std::int32_t>& kept = scratch.kept;
  kept.clear();
  for (std::int64_t s = 0; s < plan.sink_end; ++s) kept.push_back(static_cast<std::int32_t>(s));
  for (std::int64_t s = plan.local_begin; s < plan.allowed; ++s) kept.push_back(static_cast<std::int32_t>(s));
  const support::GroupQueries g =
      support::group_queries(*rows.inputs, rows.shape, rows.policy->granularity, t, group);
  scratch.candidate_scores.assign(candidates.size(), 0.0);
  const std::int64_t d = rows.shape.head_dim;
  const std::vector<std::vector<float>>& keys = *rows.keys;
  const bool stored = rows.options->rerank_stored;
  std::vector<float>& decoded = scratch.decoded;
  decoded.resize(static_cast<std::size_t>(d));
  const double macs = support::renormalised_pbar(
      g, rows.scale, candidates, kept, scratch.candidate_scores, [&](std::int32_t s, std::int64_t kv, double* out) {
        const float* key = keys[static_cast<std::size_t>(kv)].data() + static_cast<std::int64_t>(s) * d;
        if (stored) {
          (*rows.indexes)[static_cast<std::size_t>(kv)]->reconstruct(s, decoded.data());
          key = decoded.data();
        }
        for (std::int64_t c = 0; c < d; ++c) out[c] = key[c];
      });
  const double keys_read = static_cast<double>(candidates.size() + kept.size());
  const std::int64_t group_size = rows.shape.group_size();
  const std::int64_t kv_heads_read = (g.first_head + g.count - 1) / group_size - g.first_head / group_size + 1;
  row_cost.keys_scored += keys_read;
  row_cost.macs += macs;
  const double key_bytes = stored ? static_cast<double>((*rows.indexes)[0]->stored_vector_bytes())
                                  : static_cast<double>(d) * sizeof(float);
  row_cost.key_bytes_read += keys_read * static_cast<double>(kv_heads_read) * key_bytes;
  return support::best_by_score(candidates, scratch.candidate_scores, plan.fill);
}

/// Selects row (t, group) into `output` (int32 [T, G, width], contiguous) and returns what it cost.
SelectionCost select_row(const RowInputs& rows, std::int64_t row, RowScratch& scratch, const TensorView& output) {
  const std::int64_t t = row / rows.groups;
  const std::int64_t group = row % rows.groups;
  const SelectionRowPlan plan = support::row_layout(*rows.policy, rows.allowed[static_cast<std::size_t>(t)]);
  const HeadRange heads =
      heads_of_group(rows.policy->granularity, group, rows.shape.query_heads, rows.shape.kv_heads);
  SelectionCost row_cost;
  gather_candidates(rows, t, heads, plan, scratch, row_cost);
  std::vector<std::int32_t> chosen;
  if (static_cast<std::int64_t>(scratch.candidates.size()) <= plan.fill) {
    chosen = scratch.candidates;
  } else if (rows.options->rerank) {
    chosen = rerank_by_score(rows, t, group, plan, scratch, row_cost);
  } else {
    chosen = rerank_exact(rows, t, group, plan, scratch, row_cost);
  }
  support::write_row(output, t, group, plan, chosen);
  return row_cost;
}

/// Copies the rows from `output` (int32 [T, G, width], contiguous) into `selection` and sums their costs.
void write_selection(const std::vector<std::int32_t>& output, const std::vector<SelectionCost>& row_costs,
                     std::int64_t groups, std::int64_t width, const TensorView& selection, SelectionCost& cost) {
  const std::int64_t rows = static_cast<std::int64_t>(row_costs.size());
  for (std::int64_t row = 0; row < rows; ++row) {
    std::int32_t* out = selection.mutable_data<std::int32_t>() + (row / groups) * selection.stride(0) +
                        (row % groups) * selection.stride(1);
    for (std::int64_t i = 0; i < width; ++i) {
      out[i * selection.stride(2)] = output[static_cast<std::size_t>(row * width + i)];
    }
    cost += row_costs[static_cast<std::size_t>(row)];
  }
}

}  // namespace

// ---- CandidateSelector: construction and the indexes -------------------------------------------------------

CandidateSelector::CandidateSelector(std::string name, SearchFactory factory, CandidateSelectorOptions options)
    : name_(std::move(name)), factory_(std::move(factory)), options_(options) {
  KEYSEL_CHECK_ARG_IN("CandidateSelector", static_cast<bool>(factory_), "factory", "a callable",
                      "an empty std::function");
  check_selector_options("CandidateSelector", options_);
}

void CandidateSelector::set_options(const CandidateSelectorOptions& options) {
  check_selector_options("CandidateSelector::set_options", options);
  std::lock_guard<std::mutex> lock(mutex_);
  options_ = options;
}

void CandidateSelector::build(const TensorView& keys) {
  expect_shape("CandidateSelector::build", keys, "keys", {kAnyExtent, kAnyExtent, kAnyExtent});
  check_keys("CandidateSelector::build", keys, keys.size(1), keys.size(2));
  std::lock_guard<std::mutex> lock(mutex_);
  build_locked(keys, nullptr);
}

void CandidateSelector::set_training_queries(const TensorView& queries) {
  constexpr std::string_view function = "CandidateSelector::set_training_queries";
  expect_shape(function, queries, "queries", {kAnyExtent, kAnyExtent, kAnyExtent});
  expect_dtype(function, queries, "queries", {DType::fp32, DType::fp16, DType::bf16});
  expect_device(function, queries, "queries", Device::cpu());
  const std::vector<double> q = to_double_vector(queries);
  std::lock_guard<std::mutex> lock(mutex_);
  training_queries_.assign(q.begin(), q.end());
  training_query_heads_ = queries.size(1);
  training_query_dim_ = queries.size(2);
}

std::vector<std::vector<float>> CandidateSelector::training_queries_locked(std::int64_t kv_heads, std::int64_t d,
                                                                           std::int64_t train_n,
                                                                           const AttentionInputs* inputs) const {
  constexpr std::string_view function = "CandidateSelector::build";
  std::vector<std::vector<float>> out(static_cast<std::size_t>(kv_heads));
  std::vector<float> q;
  std::int64_t heads = 0;
  std::vector<std::int64_t> tokens;
  if (!training_queries_.empty()) {
    KEYSEL_CHECK_ARG_IN(function, training_query_dim_ == d && training_query_heads_ % kv_heads == 0,
                        "training queries", "[T, Hq, " + std::to_string(d) + "] with Hq a multiple of the " +
                            std::to_string(kv_heads) + " key heads",
                        "[.., " + std::to_string(training_query_heads_) + ", " + std::to_string(training_query_dim_) +
                            "]");
    q = training_queries_;
    heads = training_query_heads_;
    for (std::int64_t t = 0; t < static_cast<std::int64_t>(q.size()) / (heads * d); ++t) tokens.push_back(t);
  } else if (inputs != nullptr) {
    // The prefill's queries: tokens whose position lies among the training keys; all when none does.
    const std::vector<double> all = to_double_vector(inputs->q);
    q.assign(all.begin(), all.end());
    heads = inputs->q.size(1);
    const std::int64_t t_count = inputs->q.size(0);
    const std::vector<std::int64_t> allowed = support::allowed_per_token(*inputs, inputs->shape());
    for (std::int64_t t = 0; t < t_count; ++t) {
      if (allowed[static_cast<std::size_t>(t)] <= train_n) tokens.push_back(t);
    }
    if (tokens.empty()) {
      for (std::int64_t t = 0; t < t_count; ++t) tokens.push_back(t);
    }
  } else {
    return out;
  }
  const std::int64_t group = heads / kv_heads;
  for (std::int64_t h = 0; h < kv_heads; ++h) {
    std::vector<float>& dst = out[static_cast<std::size_t>(h)];
    for (const std::int64_t t : tokens) {
      for (std::int64_t qh = h * group; qh < (h + 1) * group; ++qh) {
        const float* row = q.data() + (t * heads + qh) * d;
        dst.insert(dst.end(), row, row + d);
      }
    }
  }
  return out;
}

void CandidateSelector::build_locked(const TensorView& keys, const AttentionInputs* inputs) {
  const auto start = Clock::now();
  const std::int64_t n = keys.size(0);
  const std::int64_t heads = keys.size(1);
  const std::int64_t d = keys.size(2);
  KEYSEL_CHECK_ARG_IN("CandidateSelector::build", n >= 1, "keys", "at least one key row", keys.str());
  auto cache = std::make_shared<Cache>();
  cache->kv_heads = heads;
  cache->dim = d;
  cache->keys.resize(static_cast<std::size_t>(heads));
  append_key_rows(keys, 0, n, cache->keys);
  const std::int64_t train_n = options_.train_keys > 0 ? std::min(options_.train_keys, n) : n;
  for (std::int64_t h = 0; h < heads; ++h) {
    std::unique_ptr<CandidateSearch> index = factory_(d);
    KEYSEL_CHECK(index != nullptr && index->dim() == d,
                 "the search factory must return a search of dim " << d);
    if (h == 0) {  // only searches that learn from queries get them (the others would only copy them)
      cache->training_queries = index->uses_queries() ? training_queries_locked(heads, d, train_n, inputs)
                                                      : std::vector<std::vector<float>>(static_cast<std::size_t>(heads));
    }
    const float* data = cache->keys[static_cast<std::size_t>(h)].data();
    train_index(*index, cache->training_queries[static_cast<std::size_t>(h)], train_n, data);
    index->add(n, data);
    cache->overflows_at_training += index->norm_overflows();
    cache->indexes.push_back(std::move(index));
  }
  cache->size = n;
  cache->trained_size = train_n;
  cache->retrains = cache_ ? cache_->retrains : 0;
  cache->source = keys.raw_data();
  cache->source_dtype = keys.dtype();
  for (int i = 0; i < 3; ++i) cache->source_strides[i] = keys.stride(i);
  cache->last_build_seconds = seconds_since(start);
  cache_ = std::move(cache);
}

bool CandidateSelector::append(const TensorView& keys) {
  constexpr std::string_view function = "CandidateSelector::append";
  std::lock_guard<std::mutex> lock(mutex_);
  KEYSEL_CHECK_ARG_IN(function, cache_ != nullptr, "this", "a built selector (call build() or select() first)",
                      "not built");
  check_keys(function, keys, cache_->kv_heads, cache_->dim);
  return append_locked(keys, 0);
}

bool CandidateSelector::append_locked(const TensorView& keys, std::int64_t first_row) {
  const auto start = Clock::now();
  Cache& cache = *cache_;
  const std::int64_t count = keys.size(0) - first_row;
  if (count <= 0) return false;
  std::vector<std::vector<float>> fresh(static_cast<std::size_t>(cache.kv_heads));
  append_key_rows(keys, first_row, count, fresh);
  std::int64_t overflows = 0;
  for (std::int64_t h = 0; h < cache.kv_heads; ++h) {
    const std::vector<float>& rows = fresh[static_cast<std::size_t>(h)];
    cache.indexes[static_cast<std::size_t>(h)]->add(count, rows.data());
    std::vector<float>& all = cache.keys[static_cast<std::size_t>(h)];
    all.insert(all.end(), rows.begin(), rows.end());
    overflows += cache.indexes[static_cast<std::size_t>(h)]->norm_overflows();
  }
  cache.size += count;
  cache.last_build_seconds = seconds_since(start);
  // Retrain policy: the training sample no longer describes the cache once it has grown by the factor, or once
  // a key fell outside the MIPS norm bound (such keys are hard to find).
  const bool grown = options_.retrain_growth > 0.0 &&
                     static_cast<double>(cache.size) >= options_.retrain_growth * static_cast<double>(cache.trained_size);
  if (grown || overflows > cache.overflows_at_training) {
    retrain_locked();
    return true;
  }
  return false;
}

void CandidateSelector::retrain() {
  std::lock_guard<std::mutex> lock(mutex_);
  KEYSEL_CHECK_ARG_IN("CandidateSelector::retrain", cache_ != nullptr, "this", "a built selector", "not built");
  retrain_locked();
}

void CandidateSelector::retrain_locked() {
  const auto start = Clock::now();
  Cache& cache = *cache_;
  cache.overflows_at_training = 0;
  for (std::int64_t h = 0; h < cache.kv_heads; ++h) {
    std::unique_ptr<CandidateSearch> index = factory_(cache.dim);
    const float* data = cache.keys[static_cast<std::size_t>(h)].data();
    train_index(*index, cache.training_queries[static_cast<std::size_t>(h)], cache.size, data);
    index->add(cache.size, data);
    cache.overflows_at_training += index->norm_overflows();
    cache.indexes[static_cast<std::size_t>(h)] = std::move(index);
  }
  cache.trained_size = cache.size;
  ++cache.retrains;
  cache.last_build_seconds = seconds_since(start);
}

std::int64_t CandidateSelector::size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return cache_ ? cache_->size : 0;
}
std::int64_t CandidateSelector::trained_size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return cache_ ? cache_->trained_size : 0;
}
std::int64_t CandidateSelector::retrain_count() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return cache_ ? cache_->retrains : 0;
}
std::int64_t CandidateSelector::kv_heads() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return cache_ ? cache_->kv_heads : 0;
}
double CandidateSelector::last_build_seconds() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return cache_ ? cache_->last_build_seconds : 0.0;
}
const CandidateSearch& CandidateSelector::index(std::int64_t kv_head) const {
  std::lock_guard<std::mutex> lock(mutex_);
  KEYSEL_CHECK_ARG_IN("CandidateSelector::index", cache_ != nullptr, "this", "a built selector", "not built");
  KEYSEL_CHECK_ARG_IN("CandidateSelector::index", kv_head >= 0 && kv_head < cache_->kv_heads, "kv_head",
                      "in [0, " + std::to_string(cache_->kv_heads) + ")", kv_head);
  return *cache_->indexes[static_cast<std::size_t>(kv_head)];
}

// ---- CandidateSelector: select() ---------------------------------------------------------------------------

/// Whether the indexes over keys [0, cache.size) may stay for keys `k` [N, Hkv, D] when the request says nothing
/// of its cache: the same view (pointer, dtype, strides) over at least as many keys, and the first and last
/// indexed rows unchanged (a cheap check that catches a reused buffer).
bool CandidateSelector::verified_same_cache(const TensorView& k, const AttentionShape& shape) const {
  bool same_view = cache_ && cache_->source == k.raw_data() && cache_->source_dtype == k.dtype() &&
                   cache_->kv_heads == shape.kv_heads && cache_->dim == shape.head_dim &&
                   cache_->size <= shape.keys;
  for (int i = 0; same_view && i < 3; ++i) same_view = cache_->source_strides[i] == k.stride(i);
  if (!same_view) return false;
  std::vector<std::vector<float>> probe(static_cast<std::size_t>(shape.kv_heads));
  append_key_rows(k, 0, 1, probe);
  append_key_rows(k, cache_->size - 1, 1, probe);
  for (std::int64_t h = 0; same_view && h < shape.kv_heads; ++h) {
    const std::vector<float>& held = cache_->keys[static_cast<std::size_t>(h)];
    const std::vector<float>& now = probe[static_cast<std::size_t>(h)];
    const std::size_t d = static_cast<std::size_t>(shape.head_dim);
    same_view = std::memcmp(held.data(), now.data(), d * sizeof(float)) == 0 &&
                std::memcmp(held.data() + (held.size() - d), now.data() + d, d * sizeof(float)) == 0;
  }
  return same_view;
}

/// Keeps the indexes in step with the cache as the request says: keys already indexed and declared (or, when
/// nothing is declared, verified) unchanged stay; the new ones are appended; anything else rebuilds.
void CandidateSelector::sync_indexes_locked(const SelectionRequest& request) {
  const TensorView& k = request.attention.k;
  const AttentionShape shape = request.attention.shape();
  bool keep = false;
  switch (request.cache) {
    case CacheReuse::appended:
      keep = cache_ && cache_->kv_heads == shape.kv_heads && cache_->dim == shape.head_dim &&
             cache_->size <= request.unchanged_keys;
      break;
    case CacheReuse::unknown:
      keep = verified_same_cache(k, shape);
      break;
    case CacheReuse::fresh:
      break;
  }
  if (!keep) {
    build_locked(k, &request.attention);
  } else if (cache_->size < shape.keys) {
    append_locked(k, cache_->size);
  }
}

SelectionCost CandidateSelector::do_select(const SelectionRequest& request, const SelectionPolicy& policy,
                                           const TensorView& selection) {
  const auto start = Clock::now();
  const std::int64_t free_slots_max = policy.kept_on_top ? policy.k : policy.k - policy.n_sink - policy.n_local;
  KEYSEL_CHECK_ARG_IN("CandidateSelector::select", options_.candidates == 0 || options_.candidates >= free_slots_max,
                      "options.candidates",
                      "0 or k' >= k - kept keys = " + std::to_string(free_slots_max) + " (over-fetch at least k)",
                      options_.candidates);

  std::lock_guard<std::mutex> lock(mutex_);
  sync_indexes_locked(request);
  KEYSEL_CHECK_ARG_IN("CandidateSelector::select",
                      !options_.rerank_stored || options_.rerank || cache_->indexes.front()->can_reconstruct(),
                      "options.rerank_stored", "searches that store their vectors (brute force, QueryIVF)",
                      cache_->indexes.front()->name());
  const RowInputs rows = prepare_rows(request.attention, policy, options_, cache_->indexes, cache_->keys);
  const std::int64_t row_count = rows.shape.tokens * rows.groups;
  std::vector<SelectionCost> row_costs(static_cast<std::size_t>(row_count));
  // Rows are written here first, so that a failing row leaves the selection untouched.
  std::vector<std::int32_t> output(static_cast<std::size_t>(row_count * rows.width), -1);
  const TensorView output_view(output.data(), DType::int32, {rows.shape.tokens, rows.groups, rows.width});

  std::string failure;
#pragma omp parallel
  {
    RowScratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t row = 0; row < row_count; ++row) {
      try {
        row_costs[static_cast<std::size_t>(row)] = select_row(rows, row, scratch, output_view);
      } catch (const std::exception& error) {
#pragma omp critical(keysel_candidate_select_failure)
        if (failure.empty()) failure = error.what();
      }
    }
  }
  if (!failure.empty()) throw Error(failure);

  SelectionCost cost;
  write_selection(output, row_costs, rows.groups, rows.width, selection, cost);
  cost.rows = row_count;
  cost.seconds = seconds_since(start);
  return cost;
}

// ---- the Lightning Indexer re-rank score and the factory ---------------------------------------------------

CandidateScore make_indexer_candidate_score(const TensorView& queries, const TensorView& weights,
                                            const TensorView& keys) {
  constexpr std::string_view function = "make_indexer_candidate_score";
  expect_shape(function, queries, "queries", {kAnyExtent, kAnyExtent, kAnyExtent});
  expect_dtype(function, queries, "queries", {DType::fp32, DType::fp64, DType::fp16, DType::bf16});
  expect_device(function, queries, "queries", Device::cpu());
  const std::int64_t tokens = queries.size(0), heads = queries.size(1), dim = queries.size(2);
  expect_shape(function, weights, "weights", {tokens, heads});
  expect_dtype(function, weights, "weights", {DType::fp32, DType::fp64, DType::fp16, DType::bf16});
  expect_device(function, weights, "weights", Device::cpu());
  expect_shape(function, keys, "keys", {kAnyExtent, dim});
  expect_dtype(function, keys, "keys", {DType::fp32, DType::fp64, DType::fp16, DType::bf16});
  expect_device(function, keys, "keys", Device::cpu());
  struct Tensors {
    std::int64_t tokens, heads, dim, keys;
    std::vector<double> q, w, k;
  };
  auto data = std::make_shared<Tensors>(Tensors{tokens, heads, dim, keys.size(0), to_double_vector(queries),
                                                to_double_vector(weights), to_double_vector(keys)});
  for (const auto* values : {&data->q, &data->w, &data->k}) {
    const auto bad = std::find_if(values->begin(), values->end(), [](double v) { return !std::isfinite(v); });
    if (bad != values->end()) {
      const char* name = values == &data->q ? "queries" : values == &data->w ? "weights" : "keys";
      detail::throw_argument_error(function, name, "finite values",
                                   "element " + std::to_string(bad - values->begin()) + " = " + std::to_string(*bad));
    }
  }
  return [data](std::int64_t t, std::int64_t, std::span<const std::int32_t> candidates, std::span<double> scores) {
    constexpr std::string_view call = "indexer candidate score";
    const Tensors& x = *data;
    KEYSEL_CHECK_ARG_IN(call, t >= 0 && t < x.tokens, "t", "in [0, " + std::to_string(x.tokens) + ")", t);
    KEYSEL_CHECK_ARG_IN(call, scores.size() == candidates.size(), "scores",
                        "one score per key (" + std::to_string(candidates.size()) + ")", scores.size());
    for (const std::int32_t s : candidates) {
      KEYSEL_CHECK_ARG_IN(call, s >= 0 && s < x.keys, "keys", "positions in [0, " + std::to_string(x.keys) + ")", s);
    }
    // lightning_indexer_reference's formula and summation order.
    for (std::size_t i = 0; i < candidates.size(); ++i) {
      const double* key = x.k.data() + static_cast<std::int64_t>(candidates[i]) * x.dim;
      double score = 0.0;
      for (std::int64_t j = 0; j < x.heads; ++j) {
        const double* q = x.q.data() + (t * x.heads + j) * x.dim;
        double dot = 0.0;
        for (std::int64_t d = 0; d < x.dim; ++d) dot += q[d] * key[d];
        score += x.w[static_cast<std::size_t>(t * x.heads + j)] * std::max(dot, 0.0);
      }
      scores[i] = score;
    }
  };
}

std::unique_ptr<CandidateSelector> make_candidate_selector(std::string_view spec,
                                                           const CandidateSelectorOptions& options,
                                                           const CandidateSearchOptions& search_options) {
  // A bad spec (or one FAISS rejects for the head dim) fails at the first select() or build(), where D is known.
  const std::string spec_text(spec);
  KEYSEL_CHECK_ARG_IN("make_candidate_selector", !spec.empty(), "spec",
                      "\"brute_force\", \"exact\" or a FAISS factory string", spec);
  std::string name = spec_text;
  const bool exact = spec == "brute_force" || spec == "exact";
  QueryAwareOptions query_aware;
  const bool keysel_index = exact || parse_query_aware_spec(spec, query_aware);  // checks a QueryIVF spec now
#if KEYSEL_FAISS
  // The grammar is checked now, so that a study file with a bad factory string fails when it is loaded; what
  // depends on D or the key count (PQ m dividing D, nlist <= keys) is checked when the index is built.
  if (!keysel_index) check_faiss_factory(spec);
#endif
  if (search_options.mips_to_l2 && !keysel_index) name += "+mips";
  if (search_options.balance_channels && !keysel_index) name += "+balance";
  if (keysel_index && !exact) {
    // Safe probing: 0 lists means "until no list can beat the k-th score".
    name += " nprobe=" + (options.search.nprobe > 0 ? std::to_string(options.search.nprobe) : std::string("safe"));
  } else if (spec.find("IVF") != std::string_view::npos) {
    name += " nprobe=" + std::to_string(options.search.nprobe > 0 ? options.search.nprobe : search_options.nprobe);
  }
  if (spec.find("HNSW") != std::string_view::npos) {
    name += " ef=" + std::to_string(options.search.ef_search > 0 ? options.search.ef_search : search_options.ef_search);
  }
  if (options.candidates > 0) name += " k'=" + std::to_string(options.candidates);
  if (options.queries == CandidateQueries::group_mean) name += " mean-query";
  if (options.rerank) name += " indexer-rerank";
  if (options.rerank_stored && !options.rerank) name += " rerank-stored";
  if (options.search.shared_scan) name += " shared-scan";
  auto factory = [spec_text, search_options](std::int64_t dim) {
    return make_candidate_search(spec_text, dim, search_options);
  };
  return std::make_unique<CandidateSelector>(name, factory, options);
}

}  // namespace keysel
