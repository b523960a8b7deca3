// The CandidateSearch interface's checks, the brute-force search, and the attention-level CandidateSelector.
// Everything here builds without FAISS; the FAISS backend lives in faiss_search.cpp.
#include "keysel/indexer/candidate_search.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "keysel/core/build_config.h"
#include "keysel/core/dtype.h"
#include "keysel/core/error.h"
#include "keysel/core/tensor.h"

#if KEYSEL_FAISS
#include "keysel/indexer/faiss_search.h"
#endif

namespace keysel {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

template <typename T>
void require(bool ok, std::string_view function, std::string_view argument, std::string_view expected,
             const T& received) {
  if (!ok) detail::throw_argument_error(function, argument, expected, detail::describe(received));
}

/// Index of the first non-finite value of x (size count), or -1.
std::int64_t first_non_finite(const float* x, std::int64_t count) {
  for (std::int64_t i = 0; i < count; ++i) {
    if (!std::isfinite(x[i])) return i;
  }
  return -1;
}

void check_vectors(std::string_view function, std::int64_t n, const float* x, std::int64_t dim) {
  require(n >= 0, function, "n", ">= 0", n);
  require(n == 0 || x != nullptr, function, "x", "a pointer to n * dim floats", "nullptr");
  const std::int64_t bad = n > 0 ? first_non_finite(x, n * dim) : -1;
  if (bad >= 0) {
    detail::throw_argument_error(function, "x", "finite values",
                                 "x[" + std::to_string(bad / dim) + ", " + std::to_string(bad % dim) + "] = " +
                                     std::to_string(x[bad]));
  }
}

/// Inner product in fp32 over 8 partial sums (the compiler vectorises the independent lanes).
float dot(const float* a, const float* b, std::int64_t d) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < d; ++i) sum += a[i] * b[i];
  return sum;
}

template <typename T>
struct ScoredId {
  T score;
  std::int64_t id;
};
using Scored = ScoredId<float>;
using ScoredDouble = ScoredId<double>;

/// Higher score first; equal scores prefer the lower id (NaN scores are dropped before sorting).
template <typename T>
bool better(const ScoredId<T>& a, const ScoredId<T>& b) {
  if (a.score != b.score) return a.score > b.score;
  return a.id < b.id;
}

/// Keeps the best `k` of `items` (sorted best first) and writes them with -1 / -inf padding.
void write_top(std::vector<Scored>& items, std::int64_t k, float* scores, std::int64_t* ids) {
  const std::size_t take = std::min<std::size_t>(static_cast<std::size_t>(k), items.size());
  std::partial_sort(items.begin(), items.begin() + static_cast<std::ptrdiff_t>(take), items.end(), better<float>);
  for (std::int64_t j = 0; j < k; ++j) {
    const bool have = static_cast<std::size_t>(j) < take;
    scores[j] = have ? items[static_cast<std::size_t>(j)].score : -std::numeric_limits<float>::infinity();
    ids[j] = have ? items[static_cast<std::size_t>(j)].id : -1;
  }
}

}  // namespace

SearchCost& SearchCost::operator+=(const SearchCost& other) {
  vectors_scored += other.vectors_scored;
  centroids_scored += other.centroids_scored;
  bytes_read += other.bytes_read;
  macs += other.macs;
  seconds += other.seconds;
  queries += other.queries;
  return *this;
}

// ---- CandidateSearch: the checks every backend shares ----------------------------------------------------

CandidateSearch::CandidateSearch(std::int64_t dim) : dim_(dim) {
  require(dim >= 1, "CandidateSearch", "dim", ">= 1", dim);
}

void CandidateSearch::train(std::int64_t n, const float* x) {
  constexpr std::string_view function = "CandidateSearch::train";
  check_vectors(function, n, x, dim_);
  do_train(n, x);
}

void CandidateSearch::add(std::int64_t n, const float* x) {
  constexpr std::string_view function = "CandidateSearch::add";
  require(is_trained(), function, "this", "a trained index (call train() first)", name() + " (untrained)");
  check_vectors(function, n, x, dim_);
  const std::int64_t limit = std::numeric_limits<std::int32_t>::max();
  require(size() + n <= limit, function, "n", "size() + n <= 2^31 - 1 (key positions are int32)", size() + n);
  if (n > 0) do_add(n, x);
}

SearchCost CandidateSearch::search(std::int64_t n, const float* x, std::int64_t k, float* scores,
                                   std::int64_t* ids, const SearchParameters& params) const {
  constexpr std::string_view function = "CandidateSearch::search";
  const auto start = Clock::now();
  require(is_trained(), function, "this", "a trained index (call train() first)", name() + " (untrained)");
  require(k >= 1, function, "k", ">= 1", k);
  check_vectors(function, n, x, dim_);
  require(n == 0 || scores != nullptr, function, "scores", "a pointer to n * k floats", "nullptr");
  require(n == 0 || ids != nullptr, function, "ids", "a pointer to n * k ids", "nullptr");
  require(params.nprobe >= 0, function, "params.nprobe", ">= 0 (0: the index default)", params.nprobe);
  require(params.ef_search >= 0, function, "params.ef_search", ">= 0 (0: the index default)", params.ef_search);
  require(params.id_begin >= 0, function, "params.id_begin", ">= 0", params.id_begin);
  const std::int64_t id_end = params.id_end < 0 ? size() : params.id_end;
  require(params.id_end == -1 || (params.id_end >= params.id_begin && params.id_end <= size()), function,
          "params.id_end", "-1 or in [id_begin, size()] = [" + std::to_string(params.id_begin) + ", " +
                               std::to_string(size()) + "]",
          params.id_end);
  require(params.id_begin <= id_end, function, "params.id_begin", "<= id_end = " + std::to_string(id_end),
          params.id_begin);
  SearchParameters resolved = params;
  resolved.id_end = id_end;
  if (n == 0) return {};
  SearchCost cost = do_search(n, x, k, scores, ids, resolved);
  cost.queries = n;
  cost.seconds = seconds_since(start);
  return cost;
}

// ---- brute force -------------------------------------------------------------------------------------------

BruteForceSearch::BruteForceSearch(std::int64_t dim) : CandidateSearch(dim) {}

std::int64_t BruteForceSearch::size() const { return static_cast<std::int64_t>(vectors_.size()) / dim(); }

std::int64_t BruteForceSearch::bytes() const {
  return static_cast<std::int64_t>(vectors_.size() * sizeof(float));
}

void BruteForceSearch::do_add(std::int64_t n, const float* x) { vectors_.insert(vectors_.end(), x, x + n * dim()); }

SearchCost BruteForceSearch::do_search(std::int64_t n, const float* x, std::int64_t k, float* scores,
                                       std::int64_t* ids, const SearchParameters& params) const {
  const std::int64_t d = dim();
  const std::int64_t begin = params.id_begin;
  const std::int64_t end = params.id_end;
#pragma omp parallel if (n > 1 && !omp_in_parallel())
  {
    std::vector<Scored> items;
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t i = 0; i < n; ++i) {
      items.clear();
      const float* query = x + i * d;
      for (std::int64_t id = begin; id < end; ++id) {
        const float s = dot(query, vectors_.data() + id * d, d);
        if (!std::isnan(s)) items.push_back({s, id});
      }
      write_top(items, k, scores + i * k, ids + i * k);
    }
  }
  SearchCost cost;
  const double scored = static_cast<double>(end - begin) * static_cast<double>(n);
  cost.vectors_scored = scored;
  cost.macs = scored * static_cast<double>(d);
  cost.bytes_read = scored * static_cast<double>(d) * sizeof(float);
  return cost;
}

std::unique_ptr<CandidateSearch> make_candidate_search(std::string_view spec, std::int64_t dim,
                                                       const CandidateSearchOptions& options) {
  constexpr std::string_view function = "make_candidate_search";
  require(dim >= 1, function, "dim", ">= 1", dim);
  require(!spec.empty(), function, "spec", "\"brute_force\", \"exact\" or a FAISS factory string", spec);
  require(options.mips_norm_headroom >= 1.0 && std::isfinite(options.mips_norm_headroom), function,
          "options.mips_norm_headroom", "a finite value >= 1", options.mips_norm_headroom);
  require(options.nprobe >= 1, function, "options.nprobe", ">= 1", options.nprobe);
  require(options.ef_search >= 1, function, "options.ef_search", ">= 1", options.ef_search);
  require(options.ef_construction >= 1, function, "options.ef_construction", ">= 1", options.ef_construction);
  // The exact search needs no transform: its inner products are exact either way.
  if (spec == "brute_force" || spec == "exact") return std::make_unique<BruteForceSearch>(dim);
#if KEYSEL_FAISS
  return make_faiss_search(spec, dim, options);
#else
  detail::throw_argument_error(function, "spec",
                               "\"brute_force\" or \"exact\" (this keysel was built without FAISS: "
                               "configure with -DKEYSEL_FAISS=ON for FAISS factory strings)",
                               detail::describe(spec));
#endif
}

// ---- CandidateSelector -------------------------------------------------------------------------------------

/// The indexes and the fp32 copy of the keys they hold (also read by the exact re-rank).
struct CandidateSelector::Cache {
  std::int64_t kv_heads = 0;
  std::int64_t dim = 0;
  std::int64_t size = 0;          // keys per key head
  std::int64_t trained_size = 0;  // keys the training used
  std::int64_t retrains = 0;
  std::int64_t overflows_at_training = 0;
  double last_build_seconds = 0;
  std::vector<std::vector<float>> keys;  // [Hkv][size * dim]
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

void check_keys(std::string_view function, const TensorView& keys, std::int64_t kv_heads, std::int64_t dim) {
  expect_shape(function, keys, "keys", {kAnyExtent, kv_heads, dim});
  expect_dtype(function, keys, "keys", {DType::fp32, DType::fp16, DType::bf16});
  expect_device(function, keys, "keys", Device::cpu());
}

}  // namespace

namespace {
void check_selector_options(std::string_view function, const CandidateSelectorOptions& options) {
  require(options.candidates >= 0, function, "options.candidates", ">= 0 (0: the selection's free slots)",
          options.candidates);
  require(options.retrain_growth == 0.0 || (options.retrain_growth > 1.0 && std::isfinite(options.retrain_growth)),
          function, "options.retrain_growth", "0 (never) or a finite factor > 1", options.retrain_growth);
  require(options.train_keys >= 0, function, "options.train_keys", ">= 0 (0: all keys)", options.train_keys);
  require(options.search.nprobe >= 0, function, "options.search.nprobe", ">= 0", options.search.nprobe);
  require(options.search.ef_search >= 0, function, "options.search.ef_search", ">= 0", options.search.ef_search);
}
}  // namespace

CandidateSelector::CandidateSelector(std::string name, SearchFactory factory, CandidateSelectorOptions options)
    : name_(std::move(name)), factory_(std::move(factory)), options_(options) {
  require(static_cast<bool>(factory_), "CandidateSelector", "factory", "a callable", "an empty std::function");
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
  build_locked(keys);
}

void CandidateSelector::build_locked(const TensorView& keys) {
  const auto start = Clock::now();
  const std::int64_t n = keys.size(0);
  const std::int64_t heads = keys.size(1);
  const std::int64_t d = keys.size(2);
  require(n >= 1, "CandidateSelector::build", "keys", "at least one key row", keys.str());
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
    const float* data = cache->keys[static_cast<std::size_t>(h)].data();
    index->train(train_n, data);
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
  require(cache_ != nullptr, function, "this", "a built selector (call build() or select() first)", "not built");
  check_keys(function, keys, cache_->kv_heads, cache_->dim);
  return append_locked(keys, 0);
}

bool CandidateSelector::append_locked(const TensorView& keys, std::int64_t first_row) {
  const auto start = Clock::now();
  Cache& cache = *cache_;
  const std::int64_t count = keys.size(0) - first_row;
  if (count <= 0) return false;
  const std::int64_t d = cache.dim;
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
  (void)d;
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
  require(cache_ != nullptr, "CandidateSelector::retrain", "this", "a built selector", "not built");
  retrain_locked();
}

void CandidateSelector::retrain_locked() {
  const auto start = Clock::now();
  Cache& cache = *cache_;
  cache.overflows_at_training = 0;
  for (std::int64_t h = 0; h < cache.kv_heads; ++h) {
    std::unique_ptr<CandidateSearch> index = factory_(cache.dim);
    const float* data = cache.keys[static_cast<std::size_t>(h)].data();
    index->train(cache.size, data);
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
  require(cache_ != nullptr, "CandidateSelector::index", "this", "a built selector", "not built");
  require(kv_head >= 0 && kv_head < cache_->kv_heads, "CandidateSelector::index", "kv_head",
          "in [0, " + std::to_string(cache_->kv_heads) + ")", kv_head);
  return *cache_->indexes[static_cast<std::size_t>(kv_head)];
}

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

SelectionCost CandidateSelector::do_select(const SelectionRequest& request, const SelectionPolicy& policy,
                                           const TensorView& selection) {
  constexpr std::string_view function = "CandidateSelector::select";
  const auto start = Clock::now();
  const AttentionInputs& inputs = request.attention;
  const AttentionShape shape = inputs.shape();
  const std::int64_t groups = group_count(policy.granularity, shape.query_heads, shape.kv_heads);
  const std::int64_t width = policy.width();
  const std::int64_t free_slots_max = policy.kept_on_top ? policy.k : policy.k - policy.n_sink - policy.n_local;
  require(options_.candidates == 0 || options_.candidates >= free_slots_max, function, "options.candidates",
          "0 or k' >= k - kept keys = " + std::to_string(free_slots_max) + " (over-fetch at least k)",
          options_.candidates);

  std::lock_guard<std::mutex> lock(mutex_);
  // Keep the indexes in step with the cache as the request says: keys already indexed and declared (or, when
  // nothing is declared, verified) unchanged stay; the new ones are appended; anything else rebuilds.
  SelectionCost cost;
  const TensorView& k = inputs.k;
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
    build_locked(k);
  } else if (cache_->size < shape.keys) {
    append_locked(k, cache_->size);
  }
  const Cache& cache = *cache_;

  // Queries as fp32 [T, Hq, D].
  const std::int64_t d = shape.head_dim;
  std::vector<float> queries(static_cast<std::size_t>(shape.tokens * shape.query_heads * d));
  {
    const std::vector<double> q = to_double_vector(inputs.q);
    for (std::size_t i = 0; i < q.size(); ++i) queries[i] = static_cast<float>(q[i]);
  }
  std::vector<std::int64_t> allowed(static_cast<std::size_t>(shape.tokens));
  for (std::int64_t t = 0; t < shape.tokens; ++t) {
    allowed[static_cast<std::size_t>(t)] =
        allowed_keys(static_cast<std::int64_t>(inputs.positions.load({t})), shape.keys);
  }
  const double scale = inputs.effective_scale();
  const std::int64_t group_size = shape.group_size();
  const std::int64_t rows = shape.tokens * groups;
  std::vector<SelectionCost> row_costs(static_cast<std::size_t>(rows));
  std::vector<std::int32_t> output(static_cast<std::size_t>(rows * width), -1);

  std::string failure;
#pragma omp parallel
  {
    std::vector<float> search_queries;
    std::vector<float> scores;
    std::vector<std::int64_t> ids;
    std::vector<std::int64_t> pool;
    std::vector<std::int64_t> scored;  // keys whose exact logits the re-rank computes: kept keys, then U
    std::vector<double> logits;
    std::vector<double> mean_probability;
    std::vector<Scored> ranked;
    std::vector<std::int32_t> candidate_keys;
    std::vector<double> candidate_scores;
    std::vector<ScoredDouble> ranked_by_score;
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t row = 0; row < rows; ++row) {
      try {
        const std::int64_t t = row / groups;
        const std::int64_t group = row % groups;
        const std::int64_t allowed_t = allowed[static_cast<std::size_t>(t)];
        // The row layout of select_topk: kept sinks, free keys, kept local window.
        const std::int64_t sink_end = std::min(policy.n_sink, allowed_t);
        const std::int64_t local_start = std::max(allowed_t - policy.n_local, sink_end);
        const std::int64_t kept = sink_end + (allowed_t - local_start);
        const std::int64_t free_slots =
            std::max<std::int64_t>(0, policy.kept_on_top ? policy.k : std::min(policy.k, allowed_t) - kept);
        const std::int64_t free_keys = local_start - sink_end;
        const HeadRange heads = heads_of_group(policy.granularity, group, shape.query_heads, shape.kv_heads);
        SelectionCost& row_cost = row_costs[static_cast<std::size_t>(row)];

        pool.clear();
        if (free_keys <= free_slots) {
          for (std::int64_t s = sink_end; s < local_start; ++s) pool.push_back(s);
        } else {
          // Search each key head the group reads, with all of the group's queries on it in one batch.
          const std::int64_t fetch = std::min(options_.candidates > 0 ? options_.candidates : free_slots, free_keys);
          SearchParameters params = options_.search;
          params.id_begin = sink_end;
          params.id_end = local_start;
          SearchCost search_cost;
          const std::int64_t kv_first = heads.first / group_size;
          const std::int64_t kv_last = (heads.first + heads.count - 1) / group_size;
          for (std::int64_t kv = kv_first; kv <= kv_last; ++kv) {
            const std::int64_t h_begin = std::max(heads.first, kv * group_size);
            const std::int64_t h_end = std::min(heads.first + heads.count, (kv + 1) * group_size);
            search_queries.clear();
            for (std::int64_t h = h_begin; h < h_end; ++h) {
              const float* q = queries.data() + (t * shape.query_heads + h) * d;
              search_queries.insert(search_queries.end(), q, q + d);
            }
            std::int64_t n_queries = h_end - h_begin;
            if (options_.queries == CandidateQueries::group_mean && n_queries > 1) {
              // The mean query ranks keys by the group's mean logit, a proxy for its mean probability.
              for (std::int64_t c = 0; c < d; ++c) {
                float sum = 0;
                for (std::int64_t i = 0; i < n_queries; ++i) sum += search_queries[static_cast<std::size_t>(i * d + c)];
                search_queries[static_cast<std::size_t>(c)] = sum / static_cast<float>(n_queries);
              }
              n_queries = 1;
            }
            scores.resize(static_cast<std::size_t>(n_queries * fetch));
            ids.resize(static_cast<std::size_t>(n_queries * fetch));
            search_cost += cache.indexes[static_cast<std::size_t>(kv)]->search(
                n_queries, search_queries.data(), fetch, scores.data(), ids.data(), params);
            for (std::int64_t i = 0; i < n_queries * fetch; ++i) {
              if (ids[static_cast<std::size_t>(i)] >= 0) pool.push_back(ids[static_cast<std::size_t>(i)]);
            }
          }
          std::sort(pool.begin(), pool.end());
          pool.erase(std::unique(pool.begin(), pool.end()), pool.end());
          // Keys scored per search query (so that it compares with the exact path's `allowed` per row).
          row_cost.keys_scored +=
              (search_cost.vectors_scored + search_cost.centroids_scored) / static_cast<double>(search_cost.queries);
          row_cost.macs += search_cost.macs;
          row_cost.key_bytes_read += search_cost.bytes_read;
        }

        std::vector<std::int32_t> chosen;
        for (std::int64_t s = 0; s < sink_end; ++s) chosen.push_back(static_cast<std::int32_t>(s));
        if (static_cast<std::int64_t>(pool.size()) <= free_slots) {
          for (const std::int64_t s : pool) chosen.push_back(static_cast<std::int32_t>(s));
        } else if (options_.rerank) {
          // Re-rank by the given score (e.g. the Lightning Indexer), one call per row, one thread at a time.
          candidate_keys.assign(pool.begin(), pool.end());
          candidate_scores.assign(pool.size(), 0.0);
#pragma omp critical(keysel_candidate_rerank)
          options_.rerank(t, group, candidate_keys, candidate_scores);
          ranked_by_score.clear();
          for (std::size_t i = 0; i < pool.size(); ++i) {
            if (!std::isnan(candidate_scores[i])) ranked_by_score.push_back({candidate_scores[i], pool[i]});
          }
          const std::size_t take = std::min(ranked_by_score.size(), static_cast<std::size_t>(free_slots));
          std::partial_sort(ranked_by_score.begin(), ranked_by_score.begin() + static_cast<std::ptrdiff_t>(take),
                            ranked_by_score.end(), better<double>);
          const std::size_t first_free = chosen.size();
          for (std::size_t i = 0; i < take; ++i) chosen.push_back(static_cast<std::int32_t>(ranked_by_score[i].id));
          std::sort(chosen.begin() + static_cast<std::ptrdiff_t>(first_free), chosen.end());
          // The score's own work is the caller's; the keys it scored are counted.
          row_cost.keys_scored += static_cast<double>(pool.size());
        } else {
          // Exact re-rank of U by the group's mean probability renormalised over the scored keys (see header).
          scored.clear();
          for (std::int64_t s = 0; s < sink_end; ++s) scored.push_back(s);
          for (std::int64_t s = local_start; s < allowed_t; ++s) scored.push_back(s);
          const std::size_t first_candidate = scored.size();
          scored.insert(scored.end(), pool.begin(), pool.end());
          const std::size_t m = scored.size();
          mean_probability.assign(pool.size(), 0.0);
          logits.resize(m);
          for (std::int64_t h = heads.first; h < heads.first + heads.count; ++h) {
            const float* q = queries.data() + (t * shape.query_heads + h) * d;
            const std::vector<float>& keys = cache.keys[static_cast<std::size_t>(h / group_size)];
            double max_logit = -std::numeric_limits<double>::infinity();
            for (std::size_t i = 0; i < m; ++i) {
              logits[i] = scale * static_cast<double>(dot(q, keys.data() + scored[i] * d, d));
              max_logit = std::max(max_logit, logits[i]);
            }
            double sum = 0;
            for (std::size_t i = 0; i < m; ++i) sum += std::exp(logits[i] - max_logit);
            const double lse = max_logit + std::log(sum);
            for (std::size_t i = first_candidate; i < m; ++i) {
              mean_probability[i - first_candidate] += std::exp(logits[i] - lse);
            }
          }
          ranked.clear();
          for (std::size_t i = 0; i < pool.size(); ++i) {
            ranked.push_back({static_cast<float>(mean_probability[i] / static_cast<double>(heads.count)), pool[i]});
          }
          std::partial_sort(ranked.begin(), ranked.begin() + free_slots, ranked.end(), better<float>);
          const std::size_t first_free = chosen.size();
          for (std::int64_t i = 0; i < free_slots; ++i) {
            chosen.push_back(static_cast<std::int32_t>(ranked[static_cast<std::size_t>(i)].id));
          }
          std::sort(chosen.begin() + static_cast<std::ptrdiff_t>(first_free), chosen.end());
          const double keys_read = static_cast<double>(m);
          const std::int64_t kv_heads_read = (heads.first + heads.count - 1) / group_size - heads.first / group_size + 1;
          row_cost.keys_scored += keys_read;
          row_cost.macs += keys_read * static_cast<double>(d * heads.count);
          row_cost.key_bytes_read += keys_read * static_cast<double>(d * kv_heads_read) * sizeof(float);
        }
        for (std::int64_t s = local_start; s < allowed_t; ++s) chosen.push_back(static_cast<std::int32_t>(s));
        std::copy(chosen.begin(), chosen.end(), output.begin() + row * width);
      } catch (const std::exception& error) {
#pragma omp critical(keysel_candidate_select_failure)
        if (failure.empty()) failure = error.what();
      }
    }
  }
  if (!failure.empty()) throw Error(failure);

  for (std::int64_t row = 0; row < rows; ++row) {
    std::int32_t* out = selection.mutable_data<std::int32_t>() + (row / groups) * selection.stride(0) +
                        (row % groups) * selection.stride(1);
    for (std::int64_t i = 0; i < width; ++i) out[i * selection.stride(2)] = output[static_cast<std::size_t>(row * width + i)];
    cost += row_costs[static_cast<std::size_t>(row)];
  }
  cost.rows = rows;
  cost.seconds = seconds_since(start);
  return cost;
}

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
    require(t >= 0 && t < x.tokens, call, "t", "in [0, " + std::to_string(x.tokens) + ")", t);
    require(scores.size() == candidates.size(), call, "scores",
            "one score per key (" + std::to_string(candidates.size()) + ")", scores.size());
    for (const std::int32_t s : candidates) {
      require(s >= 0 && s < x.keys, call, "keys", "positions in [0, " + std::to_string(x.keys) + ")", s);
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
  require(!spec.empty(), "make_candidate_selector", "spec", "\"brute_force\", \"exact\" or a FAISS factory string",
          spec);
  std::string name = spec_text;
  const bool exact = spec == "brute_force" || spec == "exact";
#if KEYSEL_FAISS
  // The grammar is checked now, so that a study file with a bad factory string fails when it is loaded; what
  // depends on D or the key count (PQ m dividing D, nlist <= keys) is checked when the index is built.
  if (!exact) check_faiss_factory(spec);
#endif
  if (search_options.mips_to_l2 && !exact) name += "+mips";
  if (search_options.balance_channels && !exact) name += "+balance";
  if (spec.find("IVF") != std::string_view::npos) {
    name += " nprobe=" + std::to_string(options.search.nprobe > 0 ? options.search.nprobe : search_options.nprobe);
  }
  if (spec.find("HNSW") != std::string_view::npos) {
    name += " ef=" + std::to_string(options.search.ef_search > 0 ? options.search.ef_search : search_options.ef_search);
  }
  if (options.candidates > 0) name += " k'=" + std::to_string(options.candidates);
  if (options.queries == CandidateQueries::group_mean) name += " mean-query";
  if (options.rerank) name += " indexer-rerank";
  auto factory = [spec_text, search_options](std::int64_t dim) {
    return make_candidate_search(spec_text, dim, search_options);
  };
  return std::make_unique<CandidateSelector>(name, factory, options);
}

}  // namespace keysel
