// The FAISS backend of CandidateSearch (compiled only with KEYSEL_FAISS).
//
// Three families are driven per query so that every call carries its own parameters and its own, exact cost
// count (FAISS 1.7.3 keeps its statistics in process-wide globals, indexIVF_stats and hnsw_stats, which
// concurrent searches would corrupt, and its HNSW search does not count distances at all):
//   flat  IndexFlat::search with an IDSelectorRange; every key in the range is scored.
//   ivf   the coarse quantizer's search, then IndexIVF::search_preassigned with a per-call IndexIVFStats.
//   hnsw  HNSW::search (the single-query, single-thread entry point) over a distance computer that counts.
// The MIPS transform is applied here: vectors get sqrt(M^2 - |x|^2) as an extra coordinate, queries get 0.
// Factory strings are parsed and bounded by faiss_factory.h before FAISS sees them, and whatever a FAISS call still
// throws (FaissException, std::bad_alloc) leaves as keysel::Error.
#include "keysel/indexer/faiss_search.h"

#include <faiss/Index.h>
#include <faiss/IndexFlat.h>
#include <faiss/IndexHNSW.h>
#include <faiss/IndexIVF.h>
#include <faiss/IndexIVFPQ.h>
#include <faiss/IndexPQ.h>
#include <faiss/impl/AuxIndexStructures.h>
#include <faiss/impl/DistanceComputer.h>
#include <faiss/impl/FaissException.h>
#include <faiss/impl/IDSelector.h>
#include <faiss/index_factory.h>
#include <faiss/utils/Heap.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "faiss_factory.h"
#include "keysel/core/error.h"

namespace keysel {
namespace {

using faiss_id = faiss::Index::idx_t;

using Family = detail::FaissFactory::Family;

/// The largest dim handed to FAISS, which takes it as an int: the MIPS coordinate and PQ's padding can double it.
constexpr std::int64_t kMaxFaissDim = std::int64_t{1} << 24;

/// What a FAISS call threw, for keysel's messages (FaissException's text names FAISS's file and line).
std::string faiss_reason(const std::exception& error) {
  if (const auto* faiss_error = dynamic_cast<const faiss::FaissException*>(&error)) return faiss_error->msg;
  if (dynamic_cast<const std::bad_alloc*>(&error) != nullptr) return "out of memory";
  return error.what();
}

/// Wraps a distance computer: counts every distance and, for inner product, negates it so that HNSW (which
/// minimises) finds the largest products. One per query, so the count is private to the calling thread.
class CountingDistance final : public faiss::DistanceComputer {
 public:
  CountingDistance(faiss::DistanceComputer* base, bool negate) : base_(base), negate_(negate) {}
  void set_query(const float* x) override { base_->set_query(x); }
  float operator()(idx_t i) override {
    ++count_;
    const float v = (*base_)(i);
    return negate_ ? -v : v;
  }
  float symmetric_dis(idx_t i, idx_t j) override {
    ++count_;
    const float v = base_->symmetric_dis(i, j);
    return negate_ ? -v : v;
  }
  std::size_t count() const { return count_; }

 private:
  std::unique_ptr<faiss::DistanceComputer> base_;
  bool negate_;
  std::size_t count_ = 0;
};

class FaissCandidateSearch final : public CandidateSearch {
 public:
  /// `parsed` is `factory` checked against keysel's grammar and `dim` (faiss_factory.h), so FAISS only ever sees
  /// strings it handles and numbers within their limits.
  FaissCandidateSearch(std::string_view factory, const detail::FaissFactory& parsed, std::int64_t dim,
                       const CandidateSearchOptions& options)
      : CandidateSearch(dim), factory_(factory), parsed_(parsed), options_(options) {
    constexpr std::string_view function = "make_faiss_search";
    mips_ = options.mips_to_l2;
    index_dim_ = detail::faiss_index_dim(parsed_, dim, mips_);
    const faiss::MetricType metric = mips_ ? faiss::METRIC_L2 : faiss::METRIC_INNER_PRODUCT;
    try {
      index_.reset(faiss::index_factory(static_cast<int>(index_dim_), parsed_.text().c_str(), metric));
    } catch (const std::exception& error) {
      detail::throw_argument_error(function, "factory", detail::kFaissGrammar,
                                   detail::describe(factory_) + " (FAISS: " + faiss_reason(error) + ")");
    }
    if (auto* ivf = dynamic_cast<faiss::IndexIVF*>(index_.get())) {
      family_ = Family::ivf;
      ivf_ = ivf;
      // Small caches train on fewer than FAISS's 39 points per centroid; the result is fine, the warning noise.
      ivf_->cp.min_points_per_centroid = 1;
      if (auto* ivfpq = dynamic_cast<faiss::IndexIVFPQ*>(ivf)) {
        ivfpq->pq.cp.min_points_per_centroid = 1;
        // Polysemous training (a Hamming-distance reordering of PQ codes) costs minutes and serves Hamming
        // filtering, which keysel never uses.
        ivfpq->do_polysemous_training = false;
      }
    } else if (auto* hnsw = dynamic_cast<faiss::IndexHNSW*>(index_.get())) {
      family_ = Family::hnsw;
      hnsw_ = hnsw;
      hnsw_->hnsw.efConstruction = static_cast<int>(options.ef_construction);
      hnsw_->hnsw.efSearch = static_cast<int>(options.ef_search);
      // As for IVF-PQ: few training points per centroid are fine, and no Hamming reordering is needed.
      if (auto* pq = dynamic_cast<faiss::IndexPQ*>(hnsw_->storage)) {
        pq->pq.cp.min_points_per_centroid = 1;
        pq->do_polysemous_training = false;
      }
    } else {
      // The grammar admits Flat, IVF and HNSW only.
      KEYSEL_ASSERT(dynamic_cast<faiss::IndexFlat*>(index_.get()) != nullptr);
      family_ = Family::flat;
    }
  }

  std::string name() const override {
    return factory_ + (mips_ ? "+mips" : "") + (options_.balance_channels ? "+balance" : "");
  }
  std::int64_t size() const override { return index_->ntotal; }
  bool is_trained() const override {
    return index_->is_trained && (!mips_ || bound_ready_) && (!options_.balance_channels || !channel_scale_.empty());
  }
  std::int64_t norm_overflows() const override { return overflows_; }

  std::int64_t bytes() const override {
    const double n = static_cast<double>(index_->ntotal);
    double total = 0;
    switch (family_) {
      case Family::flat:
        total = n * static_cast<double>(index_dim_) * sizeof(float);
        break;
      case Family::ivf: {
        total = n * static_cast<double>(ivf_->code_size + sizeof(faiss_id)) +
                static_cast<double>(ivf_->quantizer->ntotal) * static_cast<double>(index_dim_) * sizeof(float);
        if (auto* ivfpq = dynamic_cast<const faiss::IndexIVFPQ*>(ivf_)) {
          total += static_cast<double>(ivfpq->pq.centroids.size()) * sizeof(float);
        }
        break;
      }
      case Family::hnsw: {
        const auto* storage = dynamic_cast<const faiss::IndexFlatCodes*>(hnsw_->storage);
        const double code = storage ? static_cast<double>(storage->code_size)
                                    : static_cast<double>(index_dim_) * sizeof(float);
        total = n * code + static_cast<double>(hnsw_->hnsw.neighbors.size()) * sizeof(int) +
                static_cast<double>(hnsw_->hnsw.levels.size()) * sizeof(int) +
                static_cast<double>(hnsw_->hnsw.offsets.size()) * sizeof(std::size_t);
        break;
      }
    }
    total += static_cast<double>(channel_scale_.size() * sizeof(float));
    return static_cast<std::int64_t>(total);
  }

  void reset() override {
    index_->reset();
    overflows_ = 0;
  }

 protected:
  void do_train(std::int64_t n, const float* x) override {
    constexpr std::string_view function = "CandidateSearch::train";
    if (options_.balance_channels) {
      // Channel scales c_j = rms over the training vectors (1 for a channel that is always 0).
      std::vector<double> sum_sq(static_cast<std::size_t>(dim()), 0.0);
      for (std::int64_t i = 0; i < n; ++i) {
        for (std::int64_t c = 0; c < dim(); ++c)
          sum_sq[static_cast<std::size_t>(c)] += static_cast<double>(x[i * dim() + c]) * x[i * dim() + c];
      }
      channel_scale_.assign(static_cast<std::size_t>(dim()), 1.0f);
      for (std::int64_t c = 0; c < dim(); ++c) {
        const double rms = n > 0 ? std::sqrt(sum_sq[static_cast<std::size_t>(c)] / static_cast<double>(n)) : 0.0;
        if (rms > 0 && std::isfinite(rms)) channel_scale_[static_cast<std::size_t>(c)] = static_cast<float>(rms);
      }
    }
    if (mips_) {
      std::vector<float> row(static_cast<std::size_t>(dim()));
      double max_norm_sq = 0;
      for (std::int64_t i = 0; i < n; ++i)
        max_norm_sq = std::max(max_norm_sq, norm_sq(balanced(x + i * dim(), row.data())));
      const double bound = options_.mips_norm_headroom * std::sqrt(max_norm_sq);
      bound_sq_ = bound > 0 ? bound * bound : 1.0;
      bound_ready_ = true;
    }
    if (index_->is_trained) return;  // Flat and HNSW-Flat learn nothing else
    // FAISS's k-means aborts with fewer points than centroids (IVF's nlist lists, PQ's 2^nbits codes per
    // sub-quantizer); an IVF with more lists than keys would also hold mostly empty lists.
    const std::int64_t needed = detail::faiss_min_training_vectors(parsed_);
    if (n < needed) {
      const bool lists = family_ == Family::ivf && needed == static_cast<std::int64_t>(ivf_->nlist);
      const std::string expected = lists ? ">= nlist = " + std::to_string(needed) + " training vectors for " + name()
                                         : ">= 2^nbits = " + std::to_string(needed) +
                                               " training vectors (one per PQ centroid) for " + name();
      detail::throw_argument_error(function, "n", expected, std::to_string(n));
    }
    const std::vector<float> xt = transform(n, x, nullptr);
    try {
      index_->train(n, xt.data());
    } catch (const std::exception& error) {
      detail::throw_argument_error(function, "n", "enough training vectors for " + name(),
                                   std::to_string(n) + " (FAISS: " + faiss_reason(error) + ")");
    }
  }

  void do_add(std::int64_t n, const float* x) override {
    std::int64_t overflows = 0;
    const std::vector<float> xt = transform(n, x, &overflows);
    try {
      index_->add(n, xt.data());
    } catch (const std::exception& error) {
      KEYSEL_CHECK(false, "FAISS rejected add() on " << name() << ": " << faiss_reason(error));
    }
    overflows_ += overflows;
  }

  SearchCost do_search(std::int64_t n, const float* x, std::int64_t k, float* scores, std::int64_t* ids,
                       const SearchParameters& params) const override {
    std::vector<SearchCost> costs(static_cast<std::size_t>(n));
    std::string failure;
#pragma omp parallel if (n > 1 && !omp_in_parallel())
    {
      std::vector<float> query(static_cast<std::size_t>(index_dim_), 0.0f);
      std::vector<float> distances(static_cast<std::size_t>(k));
      std::vector<faiss_id> labels(static_cast<std::size_t>(k));
#pragma omp for schedule(dynamic, 1)
      for (std::int64_t i = 0; i < n; ++i) {
        try {
          const float* q = x + i * dim();
          std::copy(q, q + dim(), query.begin());  // the MIPS coordinate stays 0
          if (options_.balance_channels) {
            // q_j * c_j against stored x_j / c_j: the same inner product.
            for (std::int64_t c = 0; c < dim(); ++c)
              query[static_cast<std::size_t>(c)] *= channel_scale_[static_cast<std::size_t>(c)];
          }
          costs[static_cast<std::size_t>(i)] = search_one(query.data(), k, distances.data(), labels.data(), params);
          const double q_norm_sq = mips_ ? norm_sq(query.data()) : 0.0;
          for (std::int64_t j = 0; j < k; ++j) {
            const faiss_id label = labels[static_cast<std::size_t>(j)];
            float score = -std::numeric_limits<float>::infinity();
            if (label >= 0) {
              const double dist = distances[static_cast<std::size_t>(j)];
              // |q' - x'|^2 = |q|^2 + M^2 - 2 q.x, so q.x = (|q|^2 + M^2 - dist) / 2.
              score = mips_ ? static_cast<float>(0.5 * (q_norm_sq + bound_sq_ - dist)) : static_cast<float>(dist);
            }
            scores[i * k + j] = score;
            ids[i * k + j] = label >= 0 ? label : -1;
          }
        } catch (const std::exception& error) {
#pragma omp critical(keysel_faiss_search_failure)
          if (failure.empty()) failure = faiss_reason(error);
        }
      }
    }
    KEYSEL_CHECK(failure.empty(), "FAISS search on " << name() << " failed: " << failure);
    SearchCost total;
    for (const SearchCost& c : costs) total += c;
    return total;
  }

 private:
  double norm_sq(const float* v) const {
    double s = 0;
    for (std::int64_t c = 0; c < dim(); ++c) s += static_cast<double>(v[c]) * v[c];
    return s;
  }

  /// v (dim floats) divided channel by channel by the balancing scales, written to `out`; v itself without them.
  const float* balanced(const float* v, float* out) const {
    if (!options_.balance_channels) return v;
    for (std::int64_t c = 0; c < dim(); ++c) out[c] = v[c] / channel_scale_[static_cast<std::size_t>(c)];
    return out;
  }

  /// x (n * dim) as the index stores it: balanced, then with the MIPS coordinate appended.
  std::vector<float> transform(std::int64_t n, const float* x, std::int64_t* overflows) const {
    if (!mips_ && !options_.balance_channels) return std::vector<float>(x, x + n * dim());
    std::vector<float> out(static_cast<std::size_t>(n * index_dim_), 0.0f);
    std::vector<float> row(static_cast<std::size_t>(dim()));
    for (std::int64_t i = 0; i < n; ++i) {
      const float* v = balanced(x + i * dim(), row.data());
      if (!mips_) {
        std::copy(v, v + dim(), out.begin() + i * index_dim_);
        continue;
      }
      std::copy(v, v + dim(), out.begin() + i * index_dim_);
      const double rest = bound_sq_ - norm_sq(v);
      if (rest < -1e-6 * bound_sq_ && overflows != nullptr) ++*overflows;
      out[static_cast<std::size_t>(i * index_dim_ + dim())] = static_cast<float>(std::sqrt(std::max(rest, 0.0)));
    }
    return out;
  }

  /// One query (index_dim_ floats); distances/labels: k each, in FAISS's metric.
  SearchCost search_one(const float* query, std::int64_t k, float* distances, faiss_id* labels,
                        const SearchParameters& params) const {
    const bool whole_range = params.id_begin == 0 && params.id_end == index_->ntotal;
    faiss::IDSelectorRange range(params.id_begin, params.id_end, /*assume_sorted=*/true);
    faiss::IDSelector* selector = whole_range ? nullptr : &range;
    SearchCost cost;
    const double d = static_cast<double>(index_dim_);
    switch (family_) {
      case Family::flat: {
        faiss::SearchParameters p;
        p.sel = selector;
        index_->search(1, query, k, distances, labels, &p);
        cost.vectors_scored = static_cast<double>(params.id_end - params.id_begin);
        cost.macs = cost.vectors_scored * d;
        cost.bytes_read = cost.vectors_scored * d * sizeof(float);
        break;
      }
      case Family::ivf: {
        const std::int64_t nlist = static_cast<std::int64_t>(ivf_->nlist);
        const std::int64_t nprobe = std::min(params.nprobe > 0 ? params.nprobe : options_.nprobe, nlist);
        std::vector<float> coarse_distances(static_cast<std::size_t>(nprobe));
        std::vector<faiss_id> coarse_lists(static_cast<std::size_t>(nprobe));
        ivf_->quantizer->search(1, query, nprobe, coarse_distances.data(), coarse_lists.data());
        faiss::SearchParametersIVF p;
        p.nprobe = static_cast<std::size_t>(nprobe);
        p.sel = selector;
        faiss::IndexIVFStats stats;
        ivf_->search_preassigned(1, query, k, coarse_lists.data(), coarse_distances.data(), distances, labels,
                                 /*store_pairs=*/false, &p, &stats);
        const double centroids = static_cast<double>(ivf_->quantizer->ntotal);
        cost.vectors_scored = static_cast<double>(stats.ndis);
        cost.centroids_scored = centroids;
        cost.bytes_read = cost.vectors_scored * static_cast<double>(ivf_->code_size) + centroids * d * sizeof(float);
        if (const auto* ivfpq = dynamic_cast<const faiss::IndexIVFPQ*>(ivf_)) {
          // One table lookup per sub-quantizer and code, plus the query's distance tables.
          cost.macs = cost.vectors_scored * static_cast<double>(ivfpq->pq.M) +
                      static_cast<double>(nprobe) * static_cast<double>(ivfpq->pq.ksub) * d + centroids * d;
        } else {
          cost.macs = (cost.vectors_scored + centroids) * d;
        }
        break;
      }
      case Family::hnsw: {
        faiss::SearchParametersHNSW p;
        const std::int64_t ef = params.ef_search > 0 ? params.ef_search : options_.ef_search;
        p.efSearch = static_cast<int>(std::max(ef, k));
        p.sel = selector;
        const bool negate = index_->metric_type == faiss::METRIC_INNER_PRODUCT;
        CountingDistance distance(hnsw_->storage->get_distance_computer(), negate);
        distance.set_query(query);
        faiss::VisitedTable visited(static_cast<int>(index_->ntotal));
        faiss::maxheap_heapify(static_cast<std::size_t>(k), distances, labels);
        if (index_->ntotal > 0) hnsw_->hnsw.search(distance, static_cast<int>(k), labels, distances, visited, &p);
        faiss::maxheap_reorder(static_cast<std::size_t>(k), distances, labels);
        if (negate) {
          for (std::int64_t j = 0; j < k; ++j) distances[j] = -distances[j];
        }
        const auto* storage = dynamic_cast<const faiss::IndexFlatCodes*>(hnsw_->storage);
        const double code = storage ? static_cast<double>(storage->code_size) : d * sizeof(float);
        cost.vectors_scored = static_cast<double>(distance.count());
        cost.macs = cost.vectors_scored * d;
        // Each distance reads one code and the link that led to it.
        cost.bytes_read = cost.vectors_scored * (code + sizeof(int));
        break;
      }
    }
    return cost;
  }

  std::string factory_;  // as the caller wrote it (name() shows it)
  detail::FaissFactory parsed_;
  CandidateSearchOptions options_;
  bool mips_ = false;
  std::int64_t index_dim_ = 0;
  std::unique_ptr<faiss::Index> index_;
  Family family_ = Family::flat;
  faiss::IndexIVF* ivf_ = nullptr;
  faiss::IndexHNSW* hnsw_ = nullptr;
  std::vector<float> channel_scale_;  // c_j of channel balancing (empty until trained, or without it)
  double bound_sq_ = 0;  // M^2 of the MIPS transform
  bool bound_ready_ = false;
  std::int64_t overflows_ = 0;
};

}  // namespace

std::unique_ptr<CandidateSearch> make_faiss_search(std::string_view factory, std::int64_t dim,
                                                   const CandidateSearchOptions& options) {
  KEYSEL_CHECK_ARG(dim >= 1, "dim", ">= 1", dim);
  // FAISS takes the dim as an int (with room for the MIPS coordinate and PQ padding).
  KEYSEL_CHECK_ARG(dim <= kMaxFaissDim, "dim", "<= " + std::to_string(kMaxFaissDim) + " for a FAISS index", dim);
  KEYSEL_CHECK_ARG(options.mips_norm_headroom >= 1.0 && std::isfinite(options.mips_norm_headroom),
                   "options.mips_norm_headroom", "a finite value >= 1", options.mips_norm_headroom);
  KEYSEL_CHECK_ARG(options.nprobe >= 1, "options.nprobe", ">= 1", options.nprobe);
  KEYSEL_CHECK_ARG(options.ef_search >= 1, "options.ef_search", ">= 1", options.ef_search);
  KEYSEL_CHECK_ARG(options.ef_construction >= 1, "options.ef_construction", ">= 1", options.ef_construction);
  const detail::FaissFactory parsed = detail::parse_faiss_factory("make_faiss_search", factory);
  detail::check_faiss_factory_for("make_faiss_search", factory, parsed, dim, options.mips_to_l2);
  return std::make_unique<FaissCandidateSearch>(factory, parsed, dim, options);
}

void check_faiss_factory(std::string_view factory) {
  detail::parse_faiss_factory("check_faiss_factory", factory);
}

}  // namespace keysel
