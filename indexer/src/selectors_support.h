// What the pipeline selectors (selectors_block.cpp, selectors_fidelity.cpp, selectors_hybrid.cpp) share:
// argument checks, the layout of a selection row, reading K and q rows in double, the exact re-rank (also
// CandidateSelector's, candidate_selector.cpp). Private to the indexer module.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <span>
#include <string_view>
#include <vector>

#include "keysel/core/dtype.h"
#include "keysel/core/row_plan.h"
#include "keysel/core/selection.h"
#include "keysel/core/tensor.h"
#include "keysel/indexer/selector.h"
#include "topk_arguments.h"

namespace keysel::selector_support {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

/// The plan of a row whose token may read `allowed` keys (core's SelectionRowPlan, SPEC §2).
inline SelectionRowPlan row_layout(const SelectionPolicy& policy, std::int64_t allowed) {
  return SelectionRowPlan::make(policy, allowed - 1, allowed);
}

inline std::vector<std::int64_t> allowed_per_token(const AttentionInputs& inputs, const AttentionShape& shape) {
  std::vector<std::int64_t> allowed(static_cast<std::size_t>(shape.tokens));
  for (std::int64_t t = 0; t < shape.tokens; ++t) {
    allowed[static_cast<std::size_t>(t)] =
        allowed_keys(static_cast<std::int64_t>(inputs.positions.load({t})), shape.keys);
  }
  return allowed;
}

/// Writes the row: sinks, `chosen` (any order; sorted here), local window, then -1 up to the width.
inline void write_row(const TensorView& selection, std::int64_t t, std::int64_t group, const SelectionRowPlan& r,
                      std::vector<std::int32_t>& chosen) {
  std::sort(chosen.begin(), chosen.end());
  std::int32_t* base = selection.mutable_data<std::int32_t>() + t * selection.stride(0) + group * selection.stride(1);
  const std::int64_t step = selection.stride(2);
  const std::int64_t width = selection.size(2);
  std::int64_t i = 0;
  for (std::int64_t s = 0; s < r.sink_end; ++s) base[(i++) * step] = static_cast<std::int32_t>(s);
  for (const std::int32_t s : chosen) base[(i++) * step] = s;
  for (std::int64_t s = r.local_begin; s < r.allowed; ++s) base[(i++) * step] = static_cast<std::int32_t>(s);
  for (; i < width; ++i) base[i * step] = -1;
}

/// Decodes element `offset` (in elements) of a fp32/fp16/bf16 CPU view.
inline double element(const TensorView& view, std::int64_t offset) {
  switch (view.dtype()) {
    case DType::fp32: return view.data<float>()[offset];
    case DType::bf16: return bf16_bits_to_fp32(view.data<std::uint16_t>()[offset]);
    case DType::fp16: return fp16_bits_to_fp32(view.data<std::uint16_t>()[offset]);
    default: return 0.0;
  }
}

/// Row [i, j, :] of a rank-3 fp32/fp16/bf16 view in double.
inline void load_row(const TensorView& view, std::int64_t i, std::int64_t j, double* out) {
  const std::int64_t base = i * view.stride(0) + j * view.stride(1);
  for (std::int64_t d = 0; d < view.size(2); ++d) out[d] = element(view, base + d * view.stride(2));
}

/// Picks the `n` best of `keys` by `scores` (higher first, equal scores: lower position first, NaN never)
/// and returns them (unsorted).
inline std::vector<std::int32_t> best_by_score(std::span<const std::int32_t> keys, std::span<const double> scores,
                                               std::int64_t n) {
  std::vector<std::size_t> order;
  order.reserve(keys.size());
  for (std::size_t i = 0; i < keys.size(); ++i) {
    if (!std::isnan(scores[i])) order.push_back(i);
  }
  const auto better = [&](std::size_t a, std::size_t b) {
    if (scores[a] != scores[b]) return scores[a] > scores[b];
    return keys[a] < keys[b];
  };
  const std::size_t take = std::min(order.size(), static_cast<std::size_t>(std::max<std::int64_t>(n, 0)));
  std::nth_element(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(take), order.end(), better);
  std::vector<std::int32_t> chosen;
  chosen.reserve(take);
  for (std::size_t i = 0; i < take; ++i) chosen.push_back(keys[order[i]]);
  return chosen;
}

/// The queries of a group's heads in double: [count, D], plus each head's key head.
struct GroupQueries {
  std::int64_t first_head = 0, count = 0, dim = 0;
  std::vector<double> q;             // [count, D]
  std::vector<std::int64_t> kv;      // [count]
};

inline GroupQueries group_queries(const AttentionInputs& inputs, const AttentionShape& shape, Granularity granularity,
                                  std::int64_t t, std::int64_t group) {
  const HeadRange heads = heads_of_group(granularity, group, shape.query_heads, shape.kv_heads);
  GroupQueries g;
  g.first_head = heads.first;
  g.count = heads.count;
  g.dim = shape.head_dim;
  g.q.resize(static_cast<std::size_t>(heads.count * shape.head_dim));
  g.kv.resize(static_cast<std::size_t>(heads.count));
  for (std::int64_t i = 0; i < heads.count; ++i) {
    load_row(inputs.q, t, heads.first + i, g.q.data() + i * shape.head_dim);
    g.kv[static_cast<std::size_t>(i)] = (heads.first + i) / shape.group_size();
  }
  return g;
}

/// Exact pbar renormalised over `candidates` and `kept` (SPEC §2 restricted to those keys):
///   scores[i] = (1/|G|) sum_h exp(l[h, candidates[i]] - lse_h),  lse_h over candidates and kept keys,
/// l = scale * q.k in double, k read by key_row(s, kv, out) (key s of key head kv in double, out [D]) once per
/// key head. The exact re-rank of the hybrid selector and of CandidateSelector (which reads the keys it
/// indexed). Returns the multiply-accumulates spent.
template <typename KeyRow>
double renormalised_pbar(const GroupQueries& g, double scale, std::span<const std::int32_t> candidates,
                         std::span<const std::int32_t> kept, std::span<double> scores, KeyRow&& key_row) {
  const std::int64_t nc = static_cast<std::int64_t>(candidates.size());
  const std::int64_t total = nc + static_cast<std::int64_t>(kept.size());
  const auto T = static_cast<std::size_t>(total);
  std::vector<double> logits(static_cast<std::size_t>(g.count) * T);  // [head][key]
  std::vector<double> key(static_cast<std::size_t>(g.dim));
  for (std::int64_t j = 0; j < total; ++j) {
    const std::int32_t s = j < nc ? candidates[static_cast<std::size_t>(j)] : kept[static_cast<std::size_t>(j - nc)];
    std::int64_t loaded_kv = -1;
    for (std::int64_t i = 0; i < g.count; ++i) {
      const std::int64_t kv = g.kv[static_cast<std::size_t>(i)];
      if (kv != loaded_kv) {
        key_row(s, kv, key.data());
        loaded_kv = kv;
      }
      const double* q = g.q.data() + i * g.dim;
      double dot = 0.0;
      for (std::int64_t d = 0; d < g.dim; ++d) dot += q[d] * key[static_cast<std::size_t>(d)];
      logits[static_cast<std::size_t>(i) * T + static_cast<std::size_t>(j)] = scale * dot;
    }
  }
  std::fill(scores.begin(), scores.end(), 0.0);
  for (std::int64_t i = 0; i < g.count; ++i) {
    double* l = logits.data() + static_cast<std::size_t>(i) * T;
    double max = -INFINITY;
    for (std::size_t j = 0; j < T; ++j) max = std::max(max, l[j]);
    double sum = 0.0;
    for (std::size_t j = 0; j < T; ++j) {
      l[j] = std::exp(l[j] - max);
      sum += l[j];
    }
    const double factor = 1.0 / (sum * static_cast<double>(g.count));
    for (std::int64_t j = 0; j < nc; ++j) scores[static_cast<std::size_t>(j)] += l[j] * factor;
  }
  return static_cast<double>(total) * static_cast<double>(g.dim * g.count);
}

/// The same with the keys of the inputs (k [N, Hkv, D]).
inline double renormalised_pbar(const AttentionInputs& inputs, const GroupQueries& g, double scale,
                                std::span<const std::int32_t> candidates, std::span<const std::int32_t> kept,
                                std::span<double> scores) {
  return renormalised_pbar(g, scale, candidates, kept, scores, [&](std::int32_t s, std::int64_t kv, double* out) {
    load_row(inputs.k, s, kv, out);
  });
}

}  // namespace keysel::selector_support
