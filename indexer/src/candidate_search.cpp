// The CandidateSearch interface's checks, the brute-force search and make_candidate_search (candidate_search.h).
// Everything here builds without FAISS; the FAISS backend lives in faiss_search.cpp, the attention-level
// CandidateSelector in candidate_selector.cpp.
#include "keysel/indexer/candidate_search.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "keysel/core/build_config.h"
#include "keysel/core/error.h"
#include "keysel/indexer/query_aware_search.h"

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

struct Scored {
  float score;
  std::int64_t id;
};

/// Higher score first; equal scores prefer the lower id (NaN scores are dropped before sorting).
bool better(const Scored& a, const Scored& b) {
  if (a.score != b.score) return a.score > b.score;
  return a.id < b.id;
}

/// Keeps the best `k` of `items` (sorted best first) and writes them with -1 / -inf padding.
void write_top(std::vector<Scored>& items, std::int64_t k, float* scores, std::int64_t* ids) {
  const std::size_t take = std::min<std::size_t>(static_cast<std::size_t>(k), items.size());
  std::partial_sort(items.begin(), items.begin() + static_cast<std::ptrdiff_t>(take), items.end(), better);
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

void CandidateSearch::reconstruct(std::int64_t id, float* out) const {
  (void)id, (void)out;
  detail::throw_argument_error("CandidateSearch::reconstruct", "this",
                               "a search that stores its vectors (brute force, QueryIVF)", name());
}

void BruteForceSearch::reconstruct(std::int64_t id, float* out) const {
  require(id >= 0 && id < size(), "BruteForceSearch::reconstruct", "id", "in [0, size())", id);
  std::copy(vectors_.begin() + id * dim(), vectors_.begin() + (id + 1) * dim(), out);
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
  QueryAwareOptions query_aware;
  if (parse_query_aware_spec(spec, query_aware)) return std::make_unique<QueryAwareSearch>(dim, query_aware);
#if KEYSEL_FAISS
  return make_faiss_search(spec, dim, options);
#else
  detail::throw_argument_error(function, "spec",
                               "\"brute_force\" or \"exact\" (this keysel was built without FAISS: "
                               "configure with -DKEYSEL_FAISS=ON for FAISS factory strings)",
                               detail::describe(spec));
#endif
}

}  // namespace keysel
