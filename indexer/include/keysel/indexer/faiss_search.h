// FAISS-backed candidate searches (compiled only when keysel is built with FAISS: keysel::built_with_faiss()).
//
// This header names no FAISS type, so it installs and compiles either way; without FAISS the function below is
// not defined, and make_candidate_search() (keysel/indexer/candidate_search.h) reports a clear keysel::Error
// instead. Prefer make_candidate_search() unless you need the FAISS-only entry point.
#pragma once

#include <cstdint>
#include <memory>
#include <string_view>

#include "keysel/indexer/candidate_search.h"

namespace keysel {

/// A CandidateSearch over a FAISS index built by faiss::index_factory(dim, factory, metric), where metric is
/// inner product, or L2 over dim + 1 coordinates with options.mips_to_l2 (the MIPS transform).
/// Supported families, each with per-call parameters and exact, thread-safe cost counts:
///   "Flat"                          exhaustive, exact scores (vectors_scored = keys in the id range)
///   "IVF{nlist},Flat" / ",SQ8" /    inverted lists over k-means centroids; SearchParameters::nprobe lists are
///   ",PQ{m}" / ",SQ4" ...           scanned; vectors_scored = the probed lists' lengths, centroids_scored =
///                                   nlist (a flat coarse quantizer compares the query with every centroid)
///   "HNSW{M}" / "HNSW{M},SQ8" ...   graph search with SearchParameters::ef_search; vectors_scored counts
///                                   every distance the graph walk computed (counted by keysel, not by
///                                   FAISS, whose 1.7.3 statistics are process-wide globals)
/// FAISS "fast scan" indexes (PQ{m}x4fs) take no per-call parameters in FAISS 1.7.3 and are rejected, as is
/// any factory string FAISS does not parse; the error names the string.
std::unique_ptr<CandidateSearch> make_faiss_search(std::string_view factory, std::int64_t dim,
                                                   const CandidateSearchOptions& options = {});

}  // namespace keysel
