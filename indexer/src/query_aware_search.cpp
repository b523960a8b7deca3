// QueryAwareSearch: query-clustered inverted lists, scalar-quantised list codes, safe probing by per-list bounds.
#include "keysel/indexer/query_aware_search.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "keysel/core/error.h"

namespace keysel {
namespace {

constexpr std::string_view kGrammar = "QueryIVF{lists}[x{assignments}],{Flat|SQ8|SQ4}[,Radius]";

template <typename T>
void require(bool ok, std::string_view function, std::string_view argument, std::string_view expected,
             const T& received) {
  if (!ok) detail::throw_argument_error(function, argument, expected, detail::describe(received));
}

/// Reads a decimal number at s[pos...]; -1 when there is none (or it exceeds 2^31).
std::int64_t read_number(std::string_view s, std::size_t& pos) {
  std::int64_t value = -1;
  while (pos < s.size() && s[pos] >= '0' && s[pos] <= '9') {
    value = (value < 0 ? 0 : value) * 10 + (s[pos] - '0');
    if (value > (std::int64_t{1} << 31)) return -1;
    ++pos;
  }
  return value;
}

double dot_double(const float* a, const float* b, std::int64_t d) {
  double s = 0;
  for (std::int64_t c = 0; c < d; ++c) s += static_cast<double>(a[c]) * b[c];
  return s;
}

/// Inner product in fp32 over 8 partial sums (the compiler vectorises the independent lanes).
float dot_float(const float* a, const float* b, std::int64_t d) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::int64_t c = 0;
  for (; c + 8 <= d; c += 8)
    for (int u = 0; u < 8; ++u) acc[u] += a[c + u] * b[c + u];
  for (; c < d; ++c) acc[0] += a[c] * b[c];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

struct Scored {
  float score;
  std::int64_t id;
};

/// Higher score first; equal scores prefer the lower id (the brute-force search's rule).
bool better(const Scored& a, const Scored& b) { return a.score != b.score ? a.score > b.score : a.id < b.id; }

}  // namespace

bool parse_query_aware_spec(std::string_view spec, QueryAwareOptions& options) {
  constexpr std::string_view function = "make_candidate_search";
  constexpr std::string_view prefix = "QueryIVF";
  if (spec.substr(0, prefix.size()) != prefix) return false;
  const auto fail = [&](const std::string& why) {
    detail::throw_argument_error(function, "spec", std::string(kGrammar) + " with " + why, detail::describe(spec));
  };
  std::size_t pos = prefix.size();
  const std::int64_t lists = read_number(spec, pos);
  if (lists < 1 || lists > 65536) fail("1 <= lists <= 65536");
  std::int64_t assignments = 1;
  if (pos < spec.size() && spec[pos] == 'x') {
    ++pos;
    assignments = read_number(spec, pos);
    if (assignments < 1 || assignments > std::min<std::int64_t>(lists, 16)) fail("1 <= assignments <= min(lists, 16)");
  }
  if (pos >= spec.size() || spec[pos] != ',') fail("',' and the list codes after the numbers");
  std::string_view codes = spec.substr(pos + 1);
  constexpr std::string_view radius = ",Radius";
  const bool radius_bound = codes.size() > radius.size() && codes.substr(codes.size() - radius.size()) == radius;
  if (radius_bound) codes.remove_suffix(radius.size());
  if (codes == "Flat") {
    options.codes = ListCodes::fp32;
  } else if (codes == "SQ8") {
    options.codes = ListCodes::sq8;
  } else if (codes == "SQ4") {
    options.codes = ListCodes::sq4;
  } else {
    fail("list codes Flat, SQ8 or SQ4 (then optionally ,Radius)");
  }
  options.radius_bound = radius_bound;
  options.lists = lists;
  options.assignments = assignments;
  return true;
}

QueryAwareSearch::QueryAwareSearch(std::int64_t dim, const QueryAwareOptions& options)
    : CandidateSearch(dim), options_(options) {
  constexpr std::string_view function = "QueryAwareSearch";
  require(options.lists >= 1 && options.lists <= 65536, function, "options.lists", "in [1, 65536]", options.lists);
  require(options.assignments >= 1 && options.assignments <= options.lists, function, "options.assignments",
          "in [1, lists = " + std::to_string(options.lists) + "]", options.assignments);
  require(options.kmeans_iterations >= 0, function, "options.kmeans_iterations", ">= 0", options.kmeans_iterations);
  require(options.codes != ListCodes::sq4 || dim % 2 == 0, function, "dim", "an even dim for 4-bit codes", dim);
  lists_.resize(static_cast<std::size_t>(options.lists));
}

std::string QueryAwareSearch::name() const {
  std::string s = "QueryIVF" + std::to_string(options_.lists);
  if (options_.assignments > 1) s += "x" + std::to_string(options_.assignments);
  const std::string radius = options_.radius_bound ? ",Radius" : "";
  switch (options_.codes) {
    case ListCodes::fp32: return s + ",Flat" + radius;
    case ListCodes::sq8: return s + ",SQ8" + radius;
    case ListCodes::sq4: return s + ",SQ4" + radius;
  }
  return s + radius;
}

std::int64_t QueryAwareSearch::code_bytes() const {
  switch (options_.codes) {
    case ListCodes::fp32: return dim() * 4;
    case ListCodes::sq8: return dim();
    case ListCodes::sq4: return dim() / 2;
  }
  return dim();
}

std::int64_t QueryAwareSearch::entry_bytes() const { return code_bytes() + 4; }

std::int64_t QueryAwareSearch::bound_bytes() const {
  return 2 * code_bytes() + (options_.radius_bound ? code_bytes() + 4 : 0);
}

std::int64_t QueryAwareSearch::list_size(std::int64_t list) const {
  require(list >= 0 && list < options_.lists, "QueryAwareSearch::list_size", "list",
          "in [0, " + std::to_string(options_.lists) + ")", list);
  return static_cast<std::int64_t>(lists_[static_cast<std::size_t>(list)].ids.size());
}

std::int64_t QueryAwareSearch::bytes() const {
  std::int64_t total = 0;
  for (const List& l : lists_) total += static_cast<std::int64_t>(l.ids.size()) * entry_bytes() + bound_bytes();
  return total + static_cast<std::int64_t>(centroids_.size() * sizeof(float));
}

void QueryAwareSearch::set_training_queries(std::int64_t n, const float* queries) {
  constexpr std::string_view function = "QueryAwareSearch::set_training_queries";
  const std::int64_t d = dim();
  require(n >= 0, function, "n", ">= 0", n);
  require(n == 0 || queries != nullptr, function, "queries", "a pointer to n * dim floats", "nullptr");
  for (std::int64_t i = 0; i < n * d; ++i) {
    if (!std::isfinite(queries[i])) {
      detail::throw_argument_error(function, "queries", "finite values",
                                   "queries[" + std::to_string(i / d) + ", " + std::to_string(i % d) + "] = " +
                                       std::to_string(queries[i]));
    }
  }
  training_queries_.clear();
  training_queries_.reserve(static_cast<std::size_t>(n * d));
  for (std::int64_t i = 0; i < n; ++i) {
    const float* q = queries + i * d;
    const double norm = std::sqrt(dot_double(q, q, d));
    for (std::int64_t c = 0; c < d; ++c) {
      training_queries_.push_back(norm > 0 ? static_cast<float>(q[c] / norm) : 0.0f);
    }
  }
}

void QueryAwareSearch::reset() {
  for (List& l : lists_) l = List{};
  key_codes_.clear();
  key_values_.clear();
  count_ = 0;
  clamped_ = 0;
}

void QueryAwareSearch::do_train(std::int64_t n, const float* x) {
  constexpr std::string_view function = "QueryAwareSearch::train";
  const std::int64_t d = dim(), lists = options_.lists;
  const std::int64_t m = static_cast<std::int64_t>(training_queries_.size()) / d;
  require(m >= lists, function, "training queries",
          "at least lists = " + std::to_string(lists) + " queries given by set_training_queries()", m);
  require(n >= 1, function, "n", ">= 1 training key", n);

  // k-means over the unit queries, started from `lists` distinct queries of a seeded shuffle.
  std::vector<std::int64_t> order(static_cast<std::size_t>(m));
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(options_.seed);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<float> centroids(static_cast<std::size_t>(lists * d));
  for (std::int64_t j = 0; j < lists; ++j) {
    std::memcpy(centroids.data() + j * d, training_queries_.data() + order[static_cast<std::size_t>(j)] * d,
                static_cast<std::size_t>(d) * sizeof(float));
  }
  std::vector<std::int64_t> owner(static_cast<std::size_t>(m), 0);
  for (std::int64_t it = 0; it < options_.kmeans_iterations; ++it) {
#pragma omp parallel for schedule(static) if (!omp_in_parallel())
    for (std::int64_t i = 0; i < m; ++i) {
      const float* q = training_queries_.data() + i * d;
      double best = -std::numeric_limits<double>::infinity();
      std::int64_t arg = 0;
      for (std::int64_t j = 0; j < lists; ++j) {
        const float* c = centroids.data() + j * d;
        // Nearest in L2: largest q . c - |c|^2 / 2.
        const double s = dot_double(q, c, d) - 0.5 * dot_double(c, c, d);
        if (s > best) best = s, arg = j;
      }
      owner[static_cast<std::size_t>(i)] = arg;
    }
    std::vector<double> sum(static_cast<std::size_t>(lists * d), 0.0);
    std::vector<std::int64_t> members(static_cast<std::size_t>(lists), 0);
    for (std::int64_t i = 0; i < m; ++i) {
      const std::int64_t j = owner[static_cast<std::size_t>(i)];
      ++members[static_cast<std::size_t>(j)];
      for (std::int64_t c = 0; c < d; ++c) sum[static_cast<std::size_t>(j * d + c)] += training_queries_[i * d + c];
    }
    for (std::int64_t j = 0; j < lists; ++j) {
      if (members[static_cast<std::size_t>(j)] == 0) {  // an empty cluster restarts at a seeded query
        const std::int64_t i = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(m));
        std::memcpy(centroids.data() + j * d, training_queries_.data() + i * d,
                    static_cast<std::size_t>(d) * sizeof(float));
        continue;
      }
      for (std::int64_t c = 0; c < d; ++c) {
        centroids[static_cast<std::size_t>(j * d + c)] = static_cast<float>(
            sum[static_cast<std::size_t>(j * d + c)] / static_cast<double>(members[static_cast<std::size_t>(j)]));
      }
    }
  }

  // How each training query ranks the training keys: z_i(k) = (q_i . k - mean_i) / spread_i.
  std::vector<double> mean(static_cast<std::size_t>(m), 0.0), spread(static_cast<std::size_t>(m), 0.0);
#pragma omp parallel for schedule(static) if (!omp_in_parallel())
  for (std::int64_t i = 0; i < m; ++i) {
    double s = 0, s2 = 0;
    for (std::int64_t r = 0; r < n; ++r) {
      const double v = dot_float(training_queries_.data() + i * d, x + r * d, d);
      s += v;
      s2 += v * v;
    }
    const double mu = s / static_cast<double>(n);
    mean[static_cast<std::size_t>(i)] = mu;
    const double var = std::max(s2 / static_cast<double>(n) - mu * mu, 0.0);
    spread[static_cast<std::size_t>(i)] = var > 0 ? std::sqrt(var) : 1.0;
  }

  // The scalar quantizer: each channel's range over the training keys in 255 (15) steps.
  std::vector<float> low(static_cast<std::size_t>(d)), step(static_cast<std::size_t>(d));
  const double levels = options_.codes == ListCodes::sq4 ? 15.0 : 255.0;
  for (std::int64_t c = 0; c < d; ++c) {
    float lo = x[c], hi = x[c];
    for (std::int64_t i = 1; i < n; ++i) lo = std::min(lo, x[i * d + c]), hi = std::max(hi, x[i * d + c]);
    low[static_cast<std::size_t>(c)] = lo;
    step[static_cast<std::size_t>(c)] = hi > lo ? static_cast<float>((static_cast<double>(hi) - lo) / levels) : 1.0f;
  }

  // Unit centroids order the lists for a query (the query's nearest query clusters first).
  for (std::int64_t j = 0; j < lists; ++j) {
    const double norm = std::sqrt(dot_double(centroids.data() + j * d, centroids.data() + j * d, d));
    for (std::int64_t c = 0; c < d; ++c) {
      float& v = centroids[static_cast<std::size_t>(j * d + c)];
      v = norm > 0 ? static_cast<float>(v / norm) : 0.0f;
    }
  }
  centroids_ = std::move(centroids);
  owner_ = std::move(owner);
  mean_ = std::move(mean);
  spread_ = std::move(spread);
  low_ = std::move(low);
  step_ = std::move(step);
  trained_ = true;
  reset();
}

void QueryAwareSearch::encode(const float* x, std::uint8_t* code, float* value, bool count_clamped) {
  const std::int64_t d = dim();
  if (options_.codes == ListCodes::fp32) {
    std::memcpy(value, x, static_cast<std::size_t>(d) * sizeof(float));
    return;
  }
  const int top = options_.codes == ListCodes::sq4 ? 15 : 255;
  if (options_.codes == ListCodes::sq4) std::memset(code, 0, static_cast<std::size_t>(d / 2));
  for (std::int64_t c = 0; c < d; ++c) {
    const double level = std::nearbyint((static_cast<double>(x[c]) - low_[c]) / step_[c]);
    if (count_clamped && (level < 0 || level > top)) ++clamped_;
    const int q = static_cast<int>(std::clamp(level, 0.0, static_cast<double>(top)));
    if (options_.codes == ListCodes::sq8) {
      code[c] = static_cast<std::uint8_t>(q);
    } else {
      code[c / 2] = static_cast<std::uint8_t>(code[c / 2] | (q << (4 * (c % 2))));
    }
    value[c] = low_[c] + static_cast<float>(q) * step_[c];
  }
}

void QueryAwareSearch::decoded(std::int64_t id, float* out) const {
  const std::int64_t d = dim();
  require(id >= 0 && id < count_, "QueryAwareSearch::decoded", "id", "in [0, size())", id);
  if (options_.codes == ListCodes::fp32) {
    std::memcpy(out, key_values_.data() + id * d, static_cast<std::size_t>(d) * sizeof(float));
    return;
  }
  const std::uint8_t* code = key_codes_.data() + id * code_bytes();
  for (std::int64_t c = 0; c < d; ++c) {
    const int q = options_.codes == ListCodes::sq8 ? code[c] : (code[c / 2] >> (4 * (c % 2))) & 15;
    out[c] = low_[c] + static_cast<float>(q) * step_[c];
  }
}

void QueryAwareSearch::entry_value(const List& list, std::size_t e, float* out) const {
  const std::int64_t d = dim();
  if (options_.codes == ListCodes::fp32) {
    std::memcpy(out, list.values.data() + e * static_cast<std::size_t>(d), static_cast<std::size_t>(d) * sizeof(float));
    return;
  }
  const std::uint8_t* code = list.codes.data() + e * static_cast<std::size_t>(code_bytes());
  for (std::int64_t c = 0; c < d; ++c) {
    const int q = options_.codes == ListCodes::sq8 ? code[c] : (code[c / 2] >> (4 * (c % 2))) & 15;
    out[c] = low_[c] + static_cast<float>(q) * step_[c];
  }
}

void QueryAwareSearch::update_center(List& l) {
  const std::int64_t d = dim();
  if (l.ids.empty()) return;
  // The mean of the stored values, put on the code grid (it is stored as a code); the radius is measured from that
  // point, so the bound holds whatever rounding moved it.
  std::vector<float> mean(static_cast<std::size_t>(d)), value(static_cast<std::size_t>(d));
  std::vector<std::uint8_t> code(static_cast<std::size_t>(code_bytes()));
  for (std::int64_t c = 0; c < d; ++c) {
    mean[static_cast<std::size_t>(c)] = static_cast<float>(l.sum[static_cast<std::size_t>(c)] / static_cast<double>(l.ids.size()));
  }
  l.center.resize(static_cast<std::size_t>(d));
  encode(mean.data(), code.data(), l.center.data(), false);
  double radius2 = 0;
  for (std::size_t e = 0; e < l.ids.size(); ++e) {
    entry_value(l, e, value.data());
    double r2 = 0;
    for (std::int64_t c = 0; c < d; ++c) {
      const double diff = static_cast<double>(value[static_cast<std::size_t>(c)]) - l.center[static_cast<std::size_t>(c)];
      r2 += diff * diff;
    }
    radius2 = std::max(radius2, r2);
  }
  l.radius = std::sqrt(radius2) * (1.0 + 1e-12);
}

void QueryAwareSearch::do_add(std::int64_t n, const float* x) {
  const std::int64_t d = dim(), lists = options_.lists, a = options_.assignments, cb = code_bytes();
  std::vector<std::uint8_t> code(static_cast<std::size_t>(cb));
  std::vector<float> value(static_cast<std::size_t>(d));
  // The lists of each key: the `a` query clusters whose members rank it highest, z_j(k) = max over the
  // cluster's training queries i of z_i(k) (computed in parallel; appended in id order below).
  const std::int64_t m = static_cast<std::int64_t>(owner_.size());
  std::vector<std::int64_t> chosen(static_cast<std::size_t>(n * a));
#pragma omp parallel if (n > 16 && !omp_in_parallel())
  {
    std::vector<std::pair<double, std::int64_t>> z(static_cast<std::size_t>(lists));
#pragma omp for schedule(static)
    for (std::int64_t i = 0; i < n; ++i) {
      const float* key = x + i * d;
      for (std::int64_t j = 0; j < lists; ++j) z[static_cast<std::size_t>(j)] = {std::numeric_limits<double>::infinity(), j};
      for (std::int64_t r = 0; r < m; ++r) {
        const double v = (dot_float(training_queries_.data() + r * d, key, d) - mean_[static_cast<std::size_t>(r)]) /
                         spread_[static_cast<std::size_t>(r)];
        double& best = z[static_cast<std::size_t>(owner_[static_cast<std::size_t>(r)])].first;
        best = std::min(best, -v);
      }
      std::partial_sort(z.begin(), z.begin() + a, z.end());  // largest z first, lower list on ties
      for (std::int64_t r = 0; r < a; ++r) chosen[static_cast<std::size_t>(i * a + r)] = z[static_cast<std::size_t>(r)].second;
    }
  }
  std::vector<std::uint8_t> changed(static_cast<std::size_t>(lists), 0);
  for (std::int64_t i = 0; i < n; ++i) {
    const float* key = x + i * d;
    const std::int64_t id = count_ + i;
    encode(key, code.data(), value.data());
    for (std::int64_t r = 0; r < a; ++r) {
      const std::int64_t j = chosen[static_cast<std::size_t>(i * a + r)];
      List& l = lists_[static_cast<std::size_t>(j)];
      changed[static_cast<std::size_t>(j)] = 1;
      const bool first = l.ids.empty();
      l.ids.push_back(static_cast<std::int32_t>(id));
      if (options_.codes == ListCodes::fp32) {
        l.values.insert(l.values.end(), value.begin(), value.end());
      } else {
        l.codes.insert(l.codes.end(), code.begin(), code.end());
      }
      if (first) l.sum.assign(static_cast<std::size_t>(d), 0.0);
      for (std::int64_t c = 0; c < d; ++c) l.sum[static_cast<std::size_t>(c)] += value[static_cast<std::size_t>(c)];
      if (first) {
        l.low = value;
        l.high = value;
      } else {
        for (std::int64_t c = 0; c < d; ++c) {
          l.low[c] = std::min(l.low[c], value[c]);
          l.high[c] = std::max(l.high[c], value[c]);
        }
      }
    }
    if (options_.codes == ListCodes::fp32) {
      key_values_.insert(key_values_.end(), value.begin(), value.end());
    } else {
      key_codes_.insert(key_codes_.end(), code.begin(), code.end());
    }
  }
  count_ += n;
  if (options_.radius_bound) {
#pragma omp parallel for schedule(dynamic, 1) if (n > 16 && !omp_in_parallel())
    for (std::int64_t j = 0; j < lists; ++j) {
      if (changed[static_cast<std::size_t>(j)]) update_center(lists_[static_cast<std::size_t>(j)]);
    }
  }
}

SearchCost QueryAwareSearch::do_search(std::int64_t n, const float* x, std::int64_t k, float* scores,
                                       std::int64_t* ids, const SearchParameters& params) const {
  const std::int64_t d = dim(), lists = options_.lists, cb = code_bytes();
  const std::int64_t max_probe = params.nprobe > 0 ? std::min(params.nprobe, lists) : lists;
  std::vector<double> scanned_per_query(static_cast<std::size_t>(n), 0.0);
  std::vector<double> probed_per_query(static_cast<std::size_t>(n), 0.0);
  // The lists each query scanned (for the shared scan's count of list reads).
  std::vector<std::uint8_t> scanned_lists(static_cast<std::size_t>(params.shared_scan ? n * lists : 0), 0);
#pragma omp parallel if (n > 1 && !omp_in_parallel())
  {
    std::vector<std::pair<double, std::int64_t>> bounds(static_cast<std::size_t>(lists));
    std::vector<std::pair<double, std::int64_t>> order(static_cast<std::size_t>(lists));
    std::vector<double> list_bound(static_cast<std::size_t>(lists));
    std::vector<Scored> heap;  // min-heap by `better`: heap.front() is the current k-th best
    std::vector<std::uint8_t> seen;
    std::vector<float> weight(static_cast<std::size_t>(d));
    std::vector<std::uint8_t> visited_lists;
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t i = 0; i < n; ++i) {
      const float* q = x + i * d;
      // The per-list upper bounds (in double, with a relative slack that covers the fp32 score's rounding).
      double magnitude = 0;
      const double q_norm = std::sqrt(dot_double(q, q, d));
      for (std::int64_t j = 0; j < lists; ++j) {
        const List& l = lists_[static_cast<std::size_t>(j)];
        double b = -std::numeric_limits<double>::infinity();
        if (!l.ids.empty()) {
          b = 0;
          for (std::int64_t c = 0; c < d; ++c) {
            const double lo = static_cast<double>(q[c]) * l.low[c], hi = static_cast<double>(q[c]) * l.high[c];
            b += std::max(lo, hi);
            magnitude = std::max(magnitude, std::max(std::fabs(lo), std::fabs(hi)));
          }
          if (options_.radius_bound) b = std::min(b, dot_double(q, l.center.data(), d) + q_norm * l.radius);
        }
        bounds[static_cast<std::size_t>(j)] = {-b, j};
        list_bound[static_cast<std::size_t>(j)] = b;
        order[static_cast<std::size_t>(j)] = {l.ids.empty() ? std::numeric_limits<double>::infinity()
                                                             : -dot_double(centroids_.data() + j * d, q, d), j};
      }
      const double slack = 1e-5 * magnitude * static_cast<double>(d) + 1e-30;
      std::sort(order.begin(), order.end());  // the query's nearest query clusters first
      // Scores of codes: q . (low + code * step) = q . low + (q * step) . code.
      double offset = 0;
      if (options_.codes != ListCodes::fp32) {
        for (std::int64_t c = 0; c < d; ++c) {
          offset += static_cast<double>(q[c]) * low_[c];
          weight[c] = q[c] * step_[c];
        }
      }
      heap.clear();
      seen.assign(static_cast<std::size_t>(count_), 0);
      const auto cmp = [](const Scored& a, const Scored& b) { return better(a, b); };
      double scanned = 0;
      std::int64_t probed = 0;
      // Safe probing: the largest bound of the lists not yet visited (bounds sorted descending, visited marked).
      std::sort(bounds.begin(), bounds.end());
      std::vector<std::uint8_t>& visited = visited_lists;
      visited.assign(static_cast<std::size_t>(lists), 0);
      std::size_t top_unvisited = 0;
      for (std::int64_t r = 0; r < lists && probed < max_probe; ++r) {
        const std::int64_t j = order[static_cast<std::size_t>(r)].second;
        if (!std::isfinite(order[static_cast<std::size_t>(r)].first) &&
            order[static_cast<std::size_t>(r)].first > 0) break;  // empty lists come last
        visited[static_cast<std::size_t>(j)] = 1;
        if (static_cast<std::int64_t>(heap.size()) == k) {
          const float kth = heap.front().score;
          while (top_unvisited < bounds.size() && visited[static_cast<std::size_t>(bounds[top_unvisited].second)] &&
                 bounds[top_unvisited].second != j) {
            ++top_unvisited;
          }
          // No list left (this one included) can beat the k-th score: done; this one alone cannot: skip it.
          if (top_unvisited >= bounds.size() || -bounds[top_unvisited].first + slack < kth) break;
          if (list_bound[static_cast<std::size_t>(j)] + slack < kth) continue;
        }
        const List& l = lists_[static_cast<std::size_t>(j)];
        ++probed;
        if (params.shared_scan) scanned_lists[static_cast<std::size_t>(i * lists + j)] = 1;
        const auto first = std::lower_bound(l.ids.begin(), l.ids.end(), params.id_begin);
        const auto last = std::lower_bound(first, l.ids.end(), params.id_end);
        for (auto it = first; it != last; ++it) {
          const std::size_t e = static_cast<std::size_t>(it - l.ids.begin());
          const std::int64_t id = *it;
          scanned += 1;
          if (seen[static_cast<std::size_t>(id)]) continue;
          seen[static_cast<std::size_t>(id)] = 1;
          float s = 0;
          if (options_.codes == ListCodes::fp32) {
            const float* v = l.values.data() + e * static_cast<std::size_t>(d);
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            std::int64_t c = 0;
            for (; c + 8 <= d; c += 8)
              for (int u = 0; u < 8; ++u) acc[u] += q[c + u] * v[c + u];
            for (; c < d; ++c) acc[0] += q[c] * v[c];
            s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
          } else {
            const std::uint8_t* code = l.codes.data() + e * static_cast<std::size_t>(cb);
            float acc = 0;
            if (options_.codes == ListCodes::sq8) {
              for (std::int64_t c = 0; c < d; ++c) acc += weight[c] * static_cast<float>(code[c]);
            } else {
              for (std::int64_t c = 0; c < d; c += 2) {
                acc += weight[c] * static_cast<float>(code[c / 2] & 15) +
                       weight[c + 1] * static_cast<float>(code[c / 2] >> 4);
              }
            }
            s = static_cast<float>(offset + acc);
          }
          if (std::isnan(s)) continue;
          const Scored item{s, id};
          if (static_cast<std::int64_t>(heap.size()) < k) {
            heap.push_back(item);
            std::push_heap(heap.begin(), heap.end(), cmp);
          } else if (better(item, heap.front())) {
            std::pop_heap(heap.begin(), heap.end(), cmp);
            heap.back() = item;
            std::push_heap(heap.begin(), heap.end(), cmp);
          }
        }
      }
      std::sort(heap.begin(), heap.end(), cmp);
      for (std::int64_t r = 0; r < k; ++r) {
        const bool have = r < static_cast<std::int64_t>(heap.size());
        scores[i * k + r] = have ? heap[static_cast<std::size_t>(r)].score : -std::numeric_limits<float>::infinity();
        ids[i * k + r] = have ? heap[static_cast<std::size_t>(r)].id : -1;
      }
      scanned_per_query[static_cast<std::size_t>(i)] = scanned;
      probed_per_query[static_cast<std::size_t>(i)] = static_cast<double>(probed);
    }
  }
  SearchCost cost;
  const double scanned = std::accumulate(scanned_per_query.begin(), scanned_per_query.end(), 0.0);
  const double bound_bytes = static_cast<double>(this->bound_bytes());
  cost.vectors_scored = scanned;
  cost.centroids_scored = static_cast<double>(n * lists);
  cost.macs = (scanned + static_cast<double>(n * lists) * 2) * static_cast<double>(d);
  cost.bytes_read = scanned * static_cast<double>(entry_bytes()) + static_cast<double>(n * lists) * bound_bytes;
  if (params.shared_scan && n > 0) {
    // One pass per call: the bounds once, and each list any query scanned once (its entries in the id range).
    const std::int64_t id_end = params.id_end < 0 ? count_ : params.id_end;
    double entries = 0;
    for (std::int64_t j = 0; j < lists; ++j) {
      bool any = false;
      for (std::int64_t i = 0; i < n && !any; ++i) any = scanned_lists[static_cast<std::size_t>(i * lists + j)] != 0;
      if (!any) continue;
      const List& l = lists_[static_cast<std::size_t>(j)];
      const auto first = std::lower_bound(l.ids.begin(), l.ids.end(), params.id_begin);
      entries += static_cast<double>(std::lower_bound(first, l.ids.end(), id_end) - first);
    }
    cost.bytes_read = entries * static_cast<double>(entry_bytes()) + static_cast<double>(lists) * bound_bytes;
  }
  return cost;
}

}  // namespace keysel
