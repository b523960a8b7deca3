// A query-aware inverted index over keys, with low-bit list codes and safe probing (docs/candidate-search.md,
// "Query-aware lists").
//
// Key-only partitions (IVF's k-means over keys) cannot order their lists by the attention a query pays: queries
// and keys have different distributions. QueryAwareSearch partitions the keys by the queries instead:
//   1. train: k-means over the prefill's (unit-normalised) training queries q_i gives `lists` query clusters with
//      unit centroids c_j; for every training query, the mean mu_i and spread sd_i of q_i . k over the training keys;
//   2. add: key k joins the `assignments` lists j with the largest z_j(k) = max over the cluster's queries i of
//      (q_i . k - mu_i) / sd_i: the query clusters whose queries rank it highest among the keys (a function of the
//      key and the training alone, so appending keys gives the same index as adding them at once);
//   3. lists store the keys as fp32, 8-bit or 4-bit codes of one per-channel scalar quantizer (trained on the
//      training keys' channel ranges) and, per list, each channel's smallest and largest stored value;
//   4. search: lists are visited in the order of the query's nearest query clusters (largest q . c_j); every
//      list's upper bound of q . k, the tighter of sum_c max(q_c lo_jc, q_c hi_jc) (Quest's per-block bound) and
//      q . m_j + |q| r_j (the list's center m_j, on the code grid, and radius r_j = max |k - m_j| over its stored
//      keys; Cauchy-Schwarz), skips a list that cannot beat the current k-th score and stops the search when no
//      unscanned list can (safe probing: run to the end, the exact top-k of the stored values);
//      SearchParameters::nprobe > 0 stops after that many lists were scanned (a cut-short search: the recall/cost
//      curve).
// A key held by several lists has the same code in each (one quantizer), so duplicates carry equal scores and
// are dropped at the second sighting.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "keysel/indexer/candidate_search.h"

namespace keysel {

/// How a query-aware index stores the keys in its lists.
enum class ListCodes : std::uint8_t {
  fp32,   // the keys themselves: 4 D bytes per entry, exact scores
  sq8,    // one byte per channel: D bytes per entry
  sq4,    // four bits per channel: D / 2 bytes per entry (D even)
};

struct QueryAwareOptions {
  std::int64_t lists = 256;        // query clusters (inverted lists); train() needs at least this many queries
  std::int64_t assignments = 1;    // lists each key joins (1 .. lists); every copy is read when its list is
  ListCodes codes = ListCodes::sq8;
  bool radius_bound = false;       // also bound each list by its center and radius (the tighter bound is used);
                                   // add() then re-reads every list it changed to recompute its radius
  std::int64_t kmeans_iterations = 12;
  std::uint64_t seed = 1;
};

/// Parses "QueryIVF{lists}[x{assignments}],{Flat|SQ8|SQ4}[,Radius]" (e.g. "QueryIVF256x2,SQ4"; ",Radius" sets
/// radius_bound); false when `spec` does not start with "QueryIVF". Throws keysel::Error naming the argument "spec" when it does but breaks the grammar
/// (1 <= lists <= 65536, 1 <= assignments <= min(lists, 16)).
bool parse_query_aware_spec(std::string_view spec, QueryAwareOptions& options);

/// The query-aware index described above. Ids are positions in add order; scores are q . k over the stored
/// (decoded) keys. search() is const and safe from several threads; set_training_queries, train, add and reset
/// are not.
///
/// Costs per search query: centroids_scored = lists (one bound each), vectors_scored = list entries scanned in the
/// id range, bytes_read = the bounds (per list: the low and high codes, and with radius_bound the center's code
/// and a 4-byte radius) + each scanned entry's code and 4-byte id. With SearchParameters::shared_scan the bounds
/// and each list scanned by any of the call's queries count once per call.
class QueryAwareSearch final : public CandidateSearch {
 public:
  QueryAwareSearch(std::int64_t dim, const QueryAwareOptions& options = {});

  std::string name() const override;
  std::int64_t size() const override { return count_; }
  bool is_trained() const override { return trained_; }
  std::int64_t bytes() const override;
  bool uses_queries() const override { return true; }
  void set_training_queries(std::int64_t n, const float* queries) override;
  void reset() override;

  const QueryAwareOptions& options() const { return options_; }
  /// Bytes one list entry occupies (code + 4-byte id).
  std::int64_t entry_bytes() const;
  /// Bytes of one list's bounds that a search reads: low and high codes (+ center code and radius).
  std::int64_t bound_bytes() const;
  /// Keys held by list j (copies included), for balance reports.
  std::int64_t list_size(std::int64_t list) const;
  /// Added key channels outside the trained quantizer range (stored clamped); 0 for fp32 lists.
  std::int64_t clamped_values() const { return clamped_; }
  /// The stored (decoded) value of key `id`: what scores are computed from.   out: size dim
  void decoded(std::int64_t id, float* out) const;
  bool can_reconstruct() const override { return true; }
  void reconstruct(std::int64_t id, float* out) const override { decoded(id, out); }
  std::int64_t stored_vector_bytes() const override { return code_bytes(); }

 protected:
  void do_train(std::int64_t n, const float* x) override;
  void do_add(std::int64_t n, const float* x) override;
  SearchCost do_search(std::int64_t n, const float* x, std::int64_t k, float* scores, std::int64_t* ids,
                       const SearchParameters& params) const override;

 private:
  struct List {
    std::vector<std::int32_t> ids;     // ascending (add order)
    std::vector<std::uint8_t> codes;   // [ids.size(), code_bytes] for sq8/sq4
    std::vector<float> values;         // [ids.size(), dim] for fp32
    std::vector<float> low, high;      // [dim] smallest / largest stored value per channel (empty list: none)
    std::vector<double> sum;           // [dim] sum of the stored values (add order)
    std::vector<float> center;         // [dim] the stored values' mean, rounded to the code grid
    double radius = 0;                 // largest |stored value - center| (rounded up)
  };
  /// Recomputes list j's center and radius from its stored entries.
  void update_center(List& list);
  std::int64_t code_bytes() const;
  void encode(const float* x, std::uint8_t* code, float* value, bool count_clamped = true);
  /// Entry e of `list`, decoded.   out: size dim
  void entry_value(const List& list, std::size_t e, float* out) const;

  QueryAwareOptions options_;
  std::vector<float> training_queries_;  // [m, dim], unit-normalised
  bool trained_ = false;
  std::vector<float> centroids_;         // [lists, dim]
  std::vector<std::int64_t> owner_;      // [m]: the query cluster of each training query
  std::vector<double> mean_, spread_;    // [m]: q_i . k over the training keys
  std::vector<float> low_, step_;        // [dim]: quantizer value = low + code * step
  std::vector<List> lists_;
  std::vector<std::uint8_t> key_codes_;  // [count, code_bytes] (sq*), for decoded()
  std::vector<float> key_values_;        // [count, dim] (fp32)
  std::int64_t count_ = 0;
  std::int64_t clamped_ = 0;
};

}  // namespace keysel
