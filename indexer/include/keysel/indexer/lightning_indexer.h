// The Lightning Indexer of DeepSeek-V3.2 (SPEC §3) in low precision, with its double-precision reference.
//
//   I[t,s] = sum_j  w[t,j] * ReLU( qI[t,j] . kI[s] )      j < HI, channels DI; keys s <= pos(t) only
//
// Queries and keys are quantised with one QuantizationConfig (same format, rotation and group size); query
// scales are per token-head (per_token) or per group of channels. Products of codes accumulate in fp32 (int32
// for int8/int4), are rescaled per group by query scale x key scale, then go through the ReLU:
//   logit[t,j,s] = sum_g  sq[t,j,g] * sk[s,g] * sum_{d in g} code_q[t,j,d] * code_k[s,d]
// (with one group the rescale is folded into the weight and the key's score: w*ReLU(sq*sk*x) = sk*(w*sq)*ReLU(x)
// as the scales are > 0).
//
//   keysel::LightningIndexer indexer(/*heads*/ 64, /*dim*/ 128, {.format = keysel::DType::fp8_e4m3});
//   indexer.append_keys(n, keys);                        // fp32 [n, 128], as decoding goes
//   indexer.score(queries, weights, positions, scores);  // [T,64,128], [T,64], [T] -> fp32 [T, N]
//   indexer.select(queries, weights, positions, policy, selection);  // int32 [T, 1, W]
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "keysel/core/selection.h"
#include "keysel/core/tensor.h"
#include "keysel/indexer/key_cache.h"
#include "keysel/indexer/quantization.h"
#include "keysel/indexer/selector.h"

namespace keysel {

/// Indexer queries quantised per token-head (or per group of channels within one), rotated when config says.
class IndexerQueries {
 public:
  /// queries: [T, HI, DI] fp32, fp16 or bf16 on the CPU, finite.
  IndexerQueries(const TensorView& queries, const QuantizationConfig& config);

  std::int64_t tokens() const { return tokens_; }  // T
  std::int64_t heads() const { return heads_; }    // HI
  std::int64_t dim() const { return dim_; }        // DI
  const QuantizationConfig& config() const { return config_; }
  std::int64_t row_bytes() const { return row_bytes_; }
  std::int64_t groups() const { return groups_; }
  /// Codes [T * HI, row_bytes()], row t * HI + j.
  const std::uint8_t* codes() const { return codes_.data(); }
  /// Scales fp32 [T * HI, groups()].
  const float* scales() const { return scales_.data(); }
  /// Stored value of query (t, head) (rotated when config.hadamard).   out: fp32 [dim]
  void dequantize(std::int64_t token, std::int64_t head, float* out) const;

 private:
  std::int64_t tokens_, heads_, dim_;
  QuantizationConfig config_;
  std::int64_t row_bytes_, groups_;
  std::vector<std::uint8_t> codes_;
  std::vector<float> scales_;
};

/// The fast scorer over quantised queries and a key cache (the configs' format, rotation and scale layout must
/// be equal, and so must DI).
///   weights:   fp32 [T, HI] (any finite values)
///   positions: int32 [T], >= 0
///   scores:    fp32 [T, N] with N = cache.size(); keys s > pos(t) get -infinity
/// Returns the cost of the call (SPEC §5). Throws keysel::Error, writing nothing, on bad arguments.
SelectionCost lightning_indexer_scores(const IndexerQueries& queries, const TensorView& weights,
                                       const TensorView& positions, const IndexerKeyCache& cache,
                                       const TensorView& scores);

/// Fused score-then-select: the top-k keys by I plus the policy's kept keys, as select_topk would pick them from
/// lightning_indexer_scores (the same selection, bit for bit), but scored block by block (2048 keys) into a
/// streaming top-k (fast_topk.h): no more than one block of scores per thread is ever held.
///   selection: int32 [T, 1, policy.width()], ascending positions then -1; policy.granularity is not used.
SelectionCost lightning_indexer_select(const IndexerQueries& queries, const TensorView& weights,
                                       const TensorView& positions, const IndexerKeyCache& cache,
                                       const SelectionPolicy& policy, const TensorView& selection);

/// The plain reference in double precision over given values (no quantisation):
///   queries fp32/fp64 [T, HI, DI], weights fp32/fp64 [T, HI], positions int32 [T], keys fp32/fp64 [N, DI],
///   scores fp64 [T, N] (disallowed keys -infinity).
/// Every test of the fast path compares against this, fed with the stored (dequantised) values or the originals.
void lightning_indexer_reference(const TensorView& queries, const TensorView& weights, const TensorView& positions,
                                 const TensorView& keys, const TensorView& scores);

class LightningIndexer {
 public:
  /// An indexer with `heads` (HI) query heads of `dim` (DI) channels and an empty key cache.
  LightningIndexer(std::int64_t heads, std::int64_t dim, const QuantizationConfig& config = {});

  std::int64_t heads() const { return heads_; }
  std::int64_t dim() const { return cache_.dim(); }
  const QuantizationConfig& config() const { return cache_.config(); }
  const IndexerKeyCache& cache() const { return cache_; }
  IndexerKeyCache& cache() { return cache_; }

  /// Appends n keys to the cache.   keys: fp32 [n, DI].
  void append_keys(std::int64_t n, const float* keys) { cache_.append(n, keys); }
  /// The former argument order.
  [[deprecated("use append_keys(n, keys)")]] void append_keys(const float* keys, std::int64_t n) {
    append_keys(n, keys);
  }
  void append_keys(const TensorView& keys) { cache_.append(keys); }

  /// I[t, s] for every cached key.
  ///   queries: [T, HI, DI] fp32/fp16/bf16; weights: fp32 [T, HI]; positions: int32 [T];
  ///   scores: fp32 [T, N], keys s > pos(t) get -infinity.
  SelectionCost score(const TensorView& queries, const TensorView& weights, const TensorView& positions,
                      const TensorView& scores) const;

  /// The top-k keys by I (plus the policy's kept keys), fused (lightning_indexer_select): scored block by block,
  /// never holding the [T, N] scores. The indexer is one selection group (DSA shares one selection among all
  /// heads), so policy.granularity is not used.
  ///   selection: int32 [T, 1, policy.width()], ascending positions then -1 (as select_topk writes it).
  SelectionCost select(const TensorView& queries, const TensorView& weights, const TensorView& positions,
                       const SelectionPolicy& policy, const TensorView& selection) const;

 private:
  std::int64_t heads_;
  IndexerKeyCache cache_;
};

/// A Selector over a trained indexer, as an engine drives it: the indexer's key cache holds the sequence's N keys
/// (the caller appends to it as decoding goes), and every request carries the step's indexer queries
/// qI [T, HI, DI] and weights w [T, HI] (SelectionRequest::indexer_queries, indexer_weights). select() reads
/// those, request.attention.positions and N (which must equal the cache's size), and writes the indexer's one
/// selection into every selection group (DSA shares one selection among all heads).
std::unique_ptr<Selector> make_indexer_selector(std::shared_ptr<const LightningIndexer> indexer,
                                                std::string name = "lightning-indexer");
/// The same for one fixed workload: `queries` [T, HI, DI] and `weights` [T, HI] (fp32, copied) serve every request
/// that carries no indexer inputs of its own (its T must then be this T).
std::unique_ptr<Selector> make_indexer_selector(std::shared_ptr<const LightningIndexer> indexer,
                                                std::vector<float> queries, std::vector<float> weights,
                                                std::string name = "lightning-indexer");

}  // namespace keysel
