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
/// `factory` must follow keysel's grammar (checked before FAISS sees it; docs/candidate-search.md lists every limit):
///   Flat | HNSW{M}[,Flat|,SQ{4|6|8|fp16}|,PQ{m}] | IVF{nlist}[_HNSW{M}],{Flat|SQ{4|6|8|fp16}|PQ{m}[x{nbits}]}
/// with 1 <= nlist <= 2^20, 2 <= M <= 256, 1 <= nbits <= 8, m dividing dim (with the MIPS transform: m <= dim + 1,
/// the vector then padded with zeros to a multiple of m), and HNSW over PQ codes only with the MIPS transform.
/// train() further needs at least nlist vectors (IVF) and 2^nbits (PQ). Each family has per-call parameters and
/// exact, thread-safe cost counts:
///   "Flat"                          exhaustive, exact scores (vectors_scored = keys in the id range)
///   "IVF{nlist},Flat" / ",SQ8" /    inverted lists over k-means centroids; SearchParameters::nprobe lists are
///   ",PQ{m}" / ",SQ4" ...           scanned; vectors_scored = the probed lists' lengths, centroids_scored =
///                                   nlist (a flat coarse quantizer compares the query with every centroid)
///   "HNSW{M}" / "HNSW{M},SQ8" ...   graph search with SearchParameters::ef_search; vectors_scored counts
///                                   every distance the graph walk computed (counted by keysel, not by
///                                   FAISS, whose 1.7.3 statistics are process-wide globals)
/// Anything else (FAISS "fast scan" PQ{m}x4fs, pre-transforms such as OPQ or PCA, refinements) is rejected with a
/// keysel::Error naming the argument "factory", the accepted grammar and the string; so is anything a FAISS call
/// throws (FaissException, std::bad_alloc), at build, train, add or search.
std::unique_ptr<CandidateSearch> make_faiss_search(std::string_view factory, std::int64_t dim,
                                                   const CandidateSearchOptions& options = {});

/// Checks `factory` against the grammar above without building anything (the limits that need the dim or the
/// training keys wait for make_faiss_search and train); throws keysel::Error naming the argument "factory".
/// For callers that learn the dim later, such as make_candidate_selector, to fail early on a bad string.
void check_faiss_factory(std::string_view factory);

}  // namespace keysel
