#include "keysel/indexer/topk.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "keysel/attention/reference.h"
#include "keysel/core/checked.h"
#include "topk_arguments.h"

namespace keysel {
namespace {

struct Candidate {
  double score;
  std::int64_t position;
};

/// Higher score first; equal scores prefer the lower position. Callers drop NaN scores beforehand, so this is
/// a strict weak ordering.
bool better(const Candidate& a, const Candidate& b) {
  if (a.score != b.score) return a.score > b.score;
  return a.position < b.position;
}

/// One row of the selection: the kept keys plus the best `fill` other allowed keys with a non-NaN score, in
/// ascending position order. `row_scores(s)` is the score of key s.
template <typename ScoreAt>
void select_row(std::int64_t allowed, const SelectionPolicy& policy, ScoreAt&& score_at,
                std::vector<Candidate>& candidates, std::vector<std::int64_t>& chosen) {
  // Kept keys form two intervals: sinks [0, sink_end) and the local window [local_begin, allowed).
  const std::int64_t sink_end = std::min(policy.n_sink, allowed);
  const std::int64_t local_begin = std::max<std::int64_t>(std::max<std::int64_t>(allowed - policy.n_local, 0), sink_end);
  const std::int64_t kept = sink_end + (allowed - local_begin);
  const std::int64_t fill = policy.kept_on_top ? policy.k : std::min(policy.k, allowed) - kept;

  chosen.clear();
  for (std::int64_t s = 0; s < sink_end; ++s) chosen.push_back(s);
  candidates.clear();
  for (std::int64_t s = sink_end; s < local_begin; ++s) {
    const double score = score_at(s);
    if (!std::isnan(score)) candidates.push_back({score, s});
  }
  const std::size_t take = static_cast<std::size_t>(std::clamp<std::int64_t>(fill, 0, static_cast<std::int64_t>(candidates.size())));
  if (take < candidates.size()) {
    std::nth_element(candidates.begin(), candidates.begin() + static_cast<std::ptrdiff_t>(take), candidates.end(),
                     better);
  }
  const std::size_t first_other = chosen.size();
  for (std::size_t i = 0; i < take; ++i) chosen.push_back(candidates[i].position);
  std::sort(chosen.begin() + static_cast<std::ptrdiff_t>(first_other), chosen.end());
  for (std::int64_t s = local_begin; s < allowed; ++s) chosen.push_back(s);
}

}  // namespace

void select_topk(const TensorView& scores, const TensorView& positions, const SelectionPolicy& policy,
                 const TensorView& selection) {
  detail::check_topk_arguments("select_topk", scores, positions, policy, selection);
  const std::int64_t tokens = scores.size(0);
  const std::int64_t groups = scores.size(1);
  const std::int64_t keys = scores.size(2);
  const std::int64_t width = policy.width();
  const std::vector<double> position_values = to_double_vector(positions);

  const bool fp64 = scores.dtype() == DType::fp64;
  const std::int64_t score_strides[3] = {scores.stride(0), scores.stride(1), scores.stride(2)};
  const std::int64_t out_strides[3] = {selection.stride(0), selection.stride(1), selection.stride(2)};
  std::int32_t* out = selection.mutable_data<std::int32_t>();
#pragma omp parallel
  {
    std::vector<Candidate> candidates;
    std::vector<std::int64_t> chosen;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (std::int64_t t = 0; t < tokens; ++t) {
      for (std::int64_t g = 0; g < groups; ++g) {
        const std::int64_t allowed =
            allowed_keys(static_cast<std::int64_t>(position_values[static_cast<std::size_t>(t)]), keys);
        const std::int64_t row = t * score_strides[0] + g * score_strides[1];
        const auto score_at = [&](std::int64_t s) -> double {
          const std::int64_t off = row + s * score_strides[2];
          return fp64 ? scores.data<double>()[off] : static_cast<double>(scores.data<float>()[off]);
        };
        select_row(allowed, policy, score_at, candidates, chosen);
        std::int32_t* out_row = out + t * out_strides[0] + g * out_strides[1];
        for (std::int64_t i = 0; i < width; ++i) {
          const std::int64_t value = i < static_cast<std::int64_t>(chosen.size()) ? chosen[static_cast<std::size_t>(i)] : -1;
          out_row[i * out_strides[2]] = static_cast<std::int32_t>(value);
        }
      }
    }
  }
}

void exact_topk(const AttentionInputs& inputs, const SelectionPolicy& policy, const TensorView& selection) {
  constexpr std::string_view function = "exact_topk";
  const AttentionShape shape = inputs.validate(function, false);
  policy.validate(function);
  const std::int64_t groups = group_count(policy.granularity, shape.query_heads, shape.kv_heads);
  check_selection_output(function, selection, shape.tokens, groups, policy.width());

  std::vector<double> pbar(
      static_cast<std::size_t>(checked_product({shape.tokens, groups, shape.keys}, "exact_topk", "pbar [T, G, N]")));
  const TensorView pbar_view(pbar.data(), DType::fp64, {shape.tokens, groups, shape.keys});
  group_probabilities(inputs, policy.granularity, pbar_view);
  select_topk(pbar_view, inputs.positions, policy, selection);
}

}  // namespace keysel

namespace keysel::detail {

void check_topk_arguments(std::string_view function, const TensorView& scores, const TensorView& positions,
                          const SelectionPolicy& policy, const TensorView& selection) {
  policy.validate(function);
  expect_shape(function, scores, "scores", {kAnyExtent, kAnyExtent, kAnyExtent});
  expect_dtype(function, scores, "scores", {DType::fp32, DType::fp64});
  expect_device(function, scores, "scores", Device::cpu());
  const std::int64_t tokens = scores.size(0);
  expect_shape(function, positions, "positions", {tokens});
  expect_dtype(function, positions, "positions", {DType::int32});
  expect_device(function, positions, "positions", Device::cpu());
  const std::int32_t* position_data = positions.data<std::int32_t>();
  for (std::int64_t t = 0; t < tokens; ++t) {
    const std::int32_t pos = position_data[t * positions.stride(0)];
    if (pos < 0) {
      throw_argument_error(function, "positions", "positions >= 0",
                           "positions[" + std::to_string(t) + "] = " + std::to_string(pos));
    }
  }
  check_selection_output(function, selection, tokens, scores.size(1), policy.width());
}

}  // namespace keysel::detail
