// Candidate searches over the key cache, and the selector that turns one into a top-k selection.
//
// A CandidateSearch is a small vector index in the style of FAISS's Index: train, add (append), search with
// per-call parameters, reset, bytes, and a cost report from every search. Scores are inner products (higher
// is better), exact or approximate depending on the index. Two families implement it:
//   - the brute-force search below (always built): exact inner products over every vector in the id range;
//   - FAISS indexes built from factory strings (keysel/indexer/faiss_search.h, when built with FAISS).
// make_candidate_search() builds either from one spec string.
//
// CandidateSelector is the attention-level piece: one CandidateSearch per key head, queries from every head
// of a selection group, k' candidates over-fetched per query head, then a re-rank down to k (exact, or by a
// given score such as the Lightning Indexer's), plus the policy's always-kept keys, under the causal rule. It
// implements keysel::Selector so that studies can use it. docs/candidate-search.md explains every parameter.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "keysel/core/attention_inputs.h"
#include "keysel/core/selection.h"
#include "keysel/core/tensor.h"
#include "keysel/indexer/selector.h"
#include "keysel/indexer/selectors.h"

namespace keysel {

// ---- vector-level interface ------------------------------------------------------------------------------

/// Per-call knobs of one search. A backend ignores the knobs that do not apply to it.
struct SearchParameters {
  std::int64_t nprobe = 0;     // IVF: inverted lists scanned per query; 0 uses the index's default
  std::int64_t ef_search = 0;  // HNSW: size of the candidate list; 0 uses the index's default (at least k)
  std::int64_t id_begin = 0;   // only ids in [id_begin, id_end) are returned (causal rule, kept keys)
  std::int64_t id_end = -1;    // -1 means size()
  /// QueryIVF: the queries of one search() call share one pass over the lists (a GQA group's query heads): each
  /// list entry and bound is counted once per call in bytes_read, however many of the queries scan it. Results are
  /// those of searching each query alone; other indexes ignore it.
  bool shared_scan = false;
};

/// What searches cost, summed over their queries (SPEC §5).
struct SearchCost {
  double vectors_scored = 0;    // database vectors whose score against a query was computed
  double centroids_scored = 0;  // IVF coarse centroids compared with a query (summaries, not keys)
  double bytes_read = 0;        // bytes of codes, vectors, centroids (and HNSW links) read to score
  double macs = 0;              // multiply-accumulates (PQ: one table lookup counts as one)
  double seconds = 0;           // wall time
  std::int64_t queries = 0;

  SearchCost& operator+=(const SearchCost& other);
};

/// Optional knobs of a candidate search, fixed when it is built.
struct CandidateSearchOptions {
  /// Maximum-inner-product search through L2 (FAISS only): every vector x gets one extra coordinate
  /// sqrt(M^2 - |x|^2), where M = mips_norm_headroom * (largest norm seen by train()), and queries get 0, so
  /// that |q' - x'|^2 = |q|^2 + M^2 - 2 q.x and the L2 neighbours are the largest inner products. Use it with
  /// IVF and HNSW on unnormalised keys (docs/candidate-search.md); scores are still reported as q.x.
  bool mips_to_l2 = false;
  /// M as a multiple of the largest training norm (>= 1). Vectors added later with a larger norm get the extra
  /// coordinate 0 (they become harder to find) and are counted by norm_overflows(); retrain when it grows.
  double mips_norm_headroom = 1.0;
  /// Channel balancing (FAISS only): train() measures each channel's root-mean-square c_j over the training
  /// vectors; the index stores x_j / c_j and queries search with q_j * c_j, so inner products are unchanged
  /// (q.x exactly) while every stored channel has unit scale. Attention keys carry a few outlier channels whose
  /// large values the queries cancel with small weights; without balancing they dominate IVF's k-means and
  /// HNSW's neighbourhoods although they contribute little to q.x (docs/candidate-search.md). Applied before
  /// the MIPS transform.
  bool balance_channels = false;
  std::int64_t nprobe = 1;           // IVF default when SearchParameters::nprobe is 0
  std::int64_t ef_search = 16;       // HNSW default when SearchParameters::ef_search is 0
  std::int64_t ef_construction = 40; // HNSW build-time candidate list size
};

/// A vector index over one set of keys, dim-dimensional fp32 vectors with ids 0, 1, 2, ... in add order.
///
/// train() learns the index's structure (IVF centroids, PQ/SQ codebooks) from a sample; add() appends
/// vectors without retraining. search() is const and safe to call from several threads at once; train, add
/// and reset are not (callers serialise them against searches). Every entry point checks its arguments and
/// throws keysel::Error (naming the argument, what was expected and what came) before writing any output.
class CandidateSearch {
 public:
  virtual ~CandidateSearch() = default;

  /// The spec it was built from ("brute_force", "IVF1024,Flat", ...), plus "+mips" with the transform and
  /// "+balance" with channel balancing.
  virtual std::string name() const = 0;
  std::int64_t dim() const { return dim_; }
  /// Vectors held (the next id add() assigns).
  virtual std::int64_t size() const = 0;
  virtual bool is_trained() const = 0;
  /// Bytes of memory the index holds (vectors or codes, centroids, links), not counting its own object.
  virtual std::int64_t bytes() const = 0;
  /// Vectors added with a norm above the MIPS bound (0 without the transform).
  virtual std::int64_t norm_overflows() const { return 0; }
  /// Whether train() learns from queries given by set_training_queries (QueryAwareSearch); false for the rest.
  virtual bool uses_queries() const { return false; }
  /// Queries (size n * dim, finite) that the next train() learns the index's structure from, such as the
  /// prefill's queries of the heads that search this index. Searches that do not use queries ignore them.
  virtual void set_training_queries(std::int64_t n, const float* queries) { (void)n, (void)queries; }
  /// Whether reconstruct() gives the stored vectors (brute force, QueryAwareSearch; not the FAISS searches).
  virtual bool can_reconstruct() const { return false; }
  /// The vector of `id` as the index stores it (decoded codes), what its scores are computed from.  out: size dim
  /// Throws keysel::Error where can_reconstruct() is false.
  virtual void reconstruct(std::int64_t id, float* out) const;
  /// Bytes one stored vector occupies (its code), what reading it for a re-rank costs.
  virtual std::int64_t stored_vector_bytes() const { return dim_ * 4; }

  /// Trains on n vectors x (size n * dim). Indexes that need no training accept it and do nothing but record
  /// the norm bound of the MIPS transform. Throws when n is below what the index needs (IVF: nlist).
  void train(std::int64_t n, const float* x);
  /// Appends n vectors x (size n * dim) with ids size() .. size() + n - 1. The index must be trained.
  void add(std::int64_t n, const float* x);
  /// For each of n queries x (size n * dim), the k vectors with the largest (approximate) inner product among
  /// ids in [params.id_begin, params.id_end):
  ///   scores: size n * k, best first;  ids: size n * k, -1 (with score -infinity) where fewer were found.
  /// Returns the cost summed over the n queries.
  SearchCost search(std::int64_t n, const float* x, std::int64_t k, float* scores, std::int64_t* ids,
                    const SearchParameters& params = {}) const;
  /// Drops every vector; keeps what training learnt.
  virtual void reset() = 0;

 protected:
  explicit CandidateSearch(std::int64_t dim);
  virtual void do_train(std::int64_t n, const float* x) = 0;
  virtual void do_add(std::int64_t n, const float* x) = 0;
  /// Arguments are checked; id_end is resolved (>= id_begin, <= size()).
  virtual SearchCost do_search(std::int64_t n, const float* x, std::int64_t k, float* scores, std::int64_t* ids,
                               const SearchParameters& params) const = 0;

 private:
  std::int64_t dim_;
};

/// Exact inner products against every vector in the id range; the ground truth of every other search.
/// Needs no training. Scores accumulate in fp32 over 8 partial sums; equal scores prefer the lower id.
class BruteForceSearch final : public CandidateSearch {
 public:
  explicit BruteForceSearch(std::int64_t dim);
  std::string name() const override { return "brute_force"; }
  std::int64_t size() const override;
  bool is_trained() const override { return true; }
  std::int64_t bytes() const override;
  bool can_reconstruct() const override { return true; }
  void reconstruct(std::int64_t id, float* out) const override;
  void reset() override { vectors_.clear(); }

 protected:
  void do_train(std::int64_t, const float*) override {}
  void do_add(std::int64_t n, const float* x) override;
  SearchCost do_search(std::int64_t n, const float* x, std::int64_t k, float* scores, std::int64_t* ids,
                       const SearchParameters& params) const override;

 private:
  std::vector<float> vectors_;  // [size, dim]
};

/// Builds a candidate search from a spec:
///   "brute_force" (or "exact")  BruteForceSearch, always available;
///   anything else               a FAISS factory string ("Flat", "IVF1024,Flat", "IVF1024,PQ32", "IVF1024,SQ8",
///                               "HNSW32", ...) over inner products; throws keysel::Error when keysel was built
///                               without FAISS or FAISS rejects the string;
///   "QueryIVF{lists}[x{a}],{Flat|SQ8|SQ4}"  QueryAwareSearch (keysel/indexer/query_aware_search.h), always
///                               available; the MIPS and balancing options do not apply to it.
std::unique_ptr<CandidateSearch> make_candidate_search(std::string_view spec, std::int64_t dim,
                                                       const CandidateSearchOptions& options = {});

// ---- attention-level selector ----------------------------------------------------------------------------

/// Which queries search the index of a key head.
enum class CandidateQueries : std::uint8_t {
  each_head,   // every query head of the group searches with its own query (k' candidates each)
  group_mean,  // one search per (token, key head) with the mean query of the group's heads on that key head
};

struct CandidateSelectorOptions {
  /// k': candidates fetched per search before the exact re-rank; 0 means the selection's free slots (k minus
  /// kept keys). Must be >= that number when given (checked in select()).
  std::int64_t candidates = 0;
  CandidateQueries queries = CandidateQueries::each_head;
  SearchParameters search;  // nprobe / ef_search of every search (the id range is set per row)
  /// Retrain policy: when the cache has grown to retrain_growth times the size the indexes were trained on
  /// (or a key exceeded the MIPS norm bound), append() retrains on every key and rebuilds. 0 never retrains.
  double retrain_growth = 4.0;
  /// Train on at most this many leading keys (the prefill); 0 trains on every key present at build time.
  std::int64_t train_keys = 0;
  /// Re-rank the candidates by this score instead of exactly (higher is better; NaN never selected; equal
  /// scores prefer the lower position), e.g. the Lightning Indexer's I[t, s] (make_indexer_candidate_score).
  /// It is called once per row with the row's candidate free keys, from one thread at a time. Empty: the exact
  /// re-rank described at CandidateSelector.
  CandidateScore rerank;
  /// Re-rank (the exact formula above) over the vectors the indexes store, their codes decoded
  /// (CandidateSearch::reconstruct), instead of the fp32 keys: reads each candidate's code (e.g. 64 bytes at
  /// 4 bits for D = 128) instead of 4 D bytes, and ranks by the same approximate keys the search scored. Needs
  /// searches that can reconstruct (brute force, QueryIVF); ignored when `rerank` is set.
  bool rerank_stored = false;
};

/// One CandidateSearch per key head over the cache of keys [N, Hkv, D], turned into a Selector.
///
/// select(request, policy, selection) keeps the indexes in step with request.attention.k: the first call builds
/// them (train on the leading train_keys keys, add all). A later call keeps them and appends the new rows
/// (decoded tokens) without retraining when the request declares the indexed keys unchanged
/// (CacheReuse::appended with unchanged_keys >= size()); when it says nothing (CacheReuse::unknown), when the
/// k view has the same data pointer, strides and dtype, a larger or equal N and the same first and last indexed
/// rows; CacheReuse::fresh and anything else rebuilds. Then, for each query token t and group G:
///   1. the allowed keys [0, allowed) split into kept sinks [0, sink_end), free keys [sink_end, local_start)
///      and the kept local window [local_start, allowed), exactly as select_topk defines them;
///   2. each query (per options.queries) searches its key head's index for k' candidates among the free keys;
///   3. the union U of candidates is re-ranked (exactly, or by options.rerank) and the best free_slots join the
///      kept keys, ascending, then -1 padding (select_topk's layout). When the free keys fit in the free slots,
///      all are taken. With k' >= N and a re-rank by score S, the selection is select_topk over S.
/// The re-rank score of a candidate s is the group's mean attention probability renormalised over the keys it
/// scored, pbar_U[s] = (1/|G|) sum_h exp(scale q_h.k_s - lse_h), lse_h = log sum over U and the kept keys of
/// exp(scale q_h.k), computed in double from q and the keys the indexes hold (the hybrid selector's exact
/// re-rank; equal scores prefer the lower position). It orders U exactly as pbar does when U and the kept keys
/// hold (nearly) all of each head's mass, and exactly in every case for a group of one head. A row with no free
/// slots (k = kept keys) searches nothing.
///
/// select() and build()/append() are serialised by an internal mutex; rows of one select() run in parallel.
class CandidateSelector final : public Selector {
 public:
  using SearchFactory = std::function<std::unique_ptr<CandidateSearch>(std::int64_t dim)>;

  /// `name` labels the selector in studies; `factory` makes one empty search per key head.
  CandidateSelector(std::string name, SearchFactory factory, CandidateSelectorOptions options = {});

  std::string name() const override { return name_; }
  const CandidateSelectorOptions& options() const { return options_; }
  /// Replaces the options without rebuilding: candidates, queries and search take effect at the next select()
  /// (tuning k', nprobe or ef_search over one built index); train_keys at the next build, retrain_growth at the
  /// next append. Checked like the constructor's.
  void set_options(const CandidateSelectorOptions& options);

  using Selector::select;

  /// Builds one index per key head over keys [N, Hkv, D] (fp32, fp16 or bf16): trains on the leading
  /// train_keys keys (all when 0) and adds all N. Forgets the view: a following select() rebuilds unless its
  /// k is this same view (same pointer and strides) or a longer one over the same memory.
  void build(const TensorView& keys);
  /// Queries [Tq, Hq, D] (fp32, fp16 or bf16; Hq a multiple of the key heads) that searches learning from
  /// queries (QueryAwareSearch) train on at every later build and retrain: each key head gets the queries of the
  /// heads that read it. Without them, a build inside select() takes the request's queries of the tokens whose
  /// allowed keys lie among the training keys (the prefill), or all of the request's queries when none does; an
  /// explicit build() without them leaves such searches untrained, which throws.
  void set_training_queries(const TensorView& queries);
  /// Appends keys [n, Hkv, D] (the tokens decoded since) to every index without retraining, then applies the
  /// retrain policy. Returns true when it retrained.
  bool append(const TensorView& keys);
  /// Retrains every index on all keys held (the policy's action, callable directly).
  void retrain();

  /// Keys indexed per key head.
  std::int64_t size() const;
  /// Keys the current training used.
  std::int64_t trained_size() const;
  /// Times the indexes were (re)built by the retrain policy or retrain().
  std::int64_t retrain_count() const;
  std::int64_t kv_heads() const;
  /// The index of key head `kv_head` (built).
  const CandidateSearch& index(std::int64_t kv_head) const;
  /// Cost of the last build or append (train + add), for reports.
  double last_build_seconds() const;

 protected:
  SelectionCost do_select(const SelectionRequest& request, const SelectionPolicy& policy,
                          const TensorView& selection) override;

 private:
  struct Cache;
  bool verified_same_cache(const TensorView& k, const AttentionShape& shape) const;
  void sync_indexes_locked(const SelectionRequest& request);
  void build_locked(const TensorView& keys, const AttentionInputs* inputs);
  std::vector<std::vector<float>> training_queries_locked(std::int64_t kv_heads, std::int64_t d, std::int64_t train_n,
                                                          const AttentionInputs* inputs) const;
  bool append_locked(const TensorView& keys, std::int64_t first_row);
  void retrain_locked();

  std::string name_;
  SearchFactory factory_;
  CandidateSelectorOptions options_;
  mutable std::mutex mutex_;
  std::shared_ptr<Cache> cache_;
  std::vector<float> training_queries_;  // [Tq, Hq, D] given by set_training_queries (empty: none)
  std::int64_t training_query_heads_ = 0, training_query_dim_ = 0;
};

/// A CandidateScore that re-ranks by the Lightning Indexer (SPEC §3) in double over given indexer tensors, the
/// formula of lightning_indexer_reference for the candidate keys only (no quantisation):
///   I[t, s] = sum_j weights[t, j] * ReLU(queries[t, j] . keys[s])
///   queries [T, HI, DI], weights [T, HI], keys [N, DI]: fp32, fp64, fp16 or bf16 on the CPU, finite; copied
///   into double.
/// The score ignores its group argument (DSA shares one indexer selection among all heads). Calling it with a
/// token outside [0, T) or a key outside [0, N) throws keysel::Error. Costs HI * DI multiply-adds per key.
CandidateScore make_indexer_candidate_score(const TensorView& queries, const TensorView& weights,
                                            const TensorView& keys);

/// A CandidateSelector over make_candidate_search(spec, D, search_options) for each key head; its name is
/// the spec (with "+mips" when the transform is on) and the main search parameter.
std::unique_ptr<CandidateSelector> make_candidate_selector(std::string_view spec,
                                                           const CandidateSelectorOptions& options = {},
                                                           const CandidateSearchOptions& search_options = {});

}  // namespace keysel
