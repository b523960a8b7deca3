// Private: the argument checks shared by select_topk, fast_select_topk and exact_topk, so that every entry point
// checks the same things in the same order and reports its own name.
#pragma once

#include <cstdint>
#include <string_view>

#include "keysel/core/selection.h"
#include "keysel/core/tensor.h"

namespace keysel::detail {

/// The policy; scores: CPU fp32 or fp64 [T, G, N]; positions: CPU int32 [T], every entry >= 0; selection:
/// keysel::check_selection_output with width policy.width().
void check_topk_arguments(std::string_view function, const TensorView& scores, const TensorView& positions,
                          const SelectionPolicy& policy, const TensorView& selection);

}  // namespace keysel::detail
