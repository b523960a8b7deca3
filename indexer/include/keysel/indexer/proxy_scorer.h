// Proxy scores for models without a trained indexer (SPEC §3): the main attention's own q . K, computed from
// low-precision (and optionally rank-reduced) copies of q and K, aggregated over the heads of each selection
// group.
//
//   l[t,h,s] = scale * q~[t,h] . K~[s,kv(h)]       (q~, K~: quantised copies; projected on r directions if rank)
//   max:        score[t,G,s] = max_{h in G} l[t,h,s]
//   mean:       score[t,G,s] = mean_{h in G} l[t,h,s]
//   logsumexp:  score[t,G,s] = log( (1/|G|) sum_{h in G} exp(l[t,h,s] - lse[t,h]) ),  lse[t,h] = log sum over
//               allowed s of exp(l[t,h,s]): the logarithm of the approximate pbar, so its top-k is the exact
//               top-k whenever q~ = q and K~ = K ("pbar-consistent").
// The copies use the same rows as a cache would: K per (token, key head), q per (token, head); products of codes
// accumulate in fp32 (integer codes: exactly, as int32 would) and are rescaled per scale group.
//
// Rank reduction: fit() takes a calibration sample of keys and keeps, per key head, the r leading eigenvectors
// P [D, r] of the uncentred second moment (1/M) sum_s K[s] K[s]^T (PCA without centring, which is what
// preserves dot products best on average: q . K ~ (P^T q) . (P^T K)); q and K are projected before quantising.
#pragma once

#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "keysel/core/attention_inputs.h"
#include "keysel/core/selection.h"
#include "keysel/indexer/quantization.h"
#include "keysel/indexer/selector.h"

namespace keysel {

enum class ProxyAggregation : std::uint8_t { max, mean, logsumexp };

/// "max", "mean", "logsumexp".
std::string_view proxy_aggregation_name(ProxyAggregation aggregation);
ProxyAggregation parse_proxy_aggregation(std::string_view name);

struct ProxyConfig {
  QuantizationConfig quantization;  // format, scales and rotation of the copies of q and K
  ProxyAggregation aggregation = ProxyAggregation::logsumexp;
  std::int64_t rank = 0;            // 0: full head dim; r >= 1: project on r fitted directions (fit() first)
};

class ProxyScorer {
 public:
  explicit ProxyScorer(const ProxyConfig& config);

  const ProxyConfig& config() const { return config_; }
  /// Fits the rank-r projection per key head.   calibration_keys: [M, Hkv, D] fp32/fp16/bf16, M >= 1.
  void fit(const TensorView& calibration_keys);
  bool fitted() const { return !projection_.empty(); }
  /// The fitted projection fp32 [Hkv, D, r] (columns orthonormal), empty before fit().
  const std::vector<float>& projection() const { return projection_; }

  /// scores: fp32 [T, G, N] (G = group_count(granularity, Hq, Hkv)); keys s > pos(t) get -infinity.
  SelectionCost score(const AttentionInputs& inputs, Granularity granularity, const TensorView& scores) const;
  /// selection: int32 [T, G, policy.width()] by select_topk over score().
  SelectionCost select(const AttentionInputs& inputs, const SelectionPolicy& policy,
                       const TensorView& selection) const;

 private:
  ProxyConfig config_;
  std::int64_t fitted_kv_heads_ = 0, fitted_dim_ = 0;
  std::vector<float> projection_;
};

/// The reference: the same aggregation of the exact logits scale * q . K, in double (no quantisation, no
/// projection).   scores: fp64 [T, G, N], disallowed keys -infinity.
void proxy_scores_reference(const AttentionInputs& inputs, Granularity granularity, ProxyAggregation aggregation,
                            const TensorView& scores);

/// A Selector over a proxy scorer (name "proxy-<aggregation>-<quantization>[-r<rank>]"). A rank > 0 scorer that
/// is not fitted yet is fitted on the K of its first select() call (an optimistic calibration: fit it on other
/// keys beforehand to measure the proxy honestly).
std::unique_ptr<Selector> make_proxy_selector(ProxyScorer scorer);

}  // namespace keysel
