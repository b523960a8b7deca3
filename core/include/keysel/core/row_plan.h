// The layout of one selection row (SPEC §2), for host and device code alike.
//
// For query token t with allowed = min(pos(t) + 1, N) keys, a row holds, in ascending order:
//   the kept sinks       [0, sink_end)               sink_end    = min(n_sink, allowed)
//   `fill` chosen keys   from [sink_end, local_begin) by score
//   the kept window      [local_begin, allowed)      local_begin = max(allowed - n_local, sink_end)
// then -1 up to the width. fill = k when kept keys come on top of k, else min(k, allowed) - kept; never more than
// the free keys [sink_end, local_begin) hold, never negative.
//
// Every selector, top-k and kernel plans its rows with this one struct: `Int` is std::int64_t on the host and
// may be int in a CUDA kernel, where 32-bit registers matter (positions are int32 there anyway).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define KEYSEL_HOST_DEVICE __host__ __device__
#else
#define KEYSEL_HOST_DEVICE
#endif

namespace keysel {

template <typename Int>
struct BasicRowPlan {
  Int allowed = 0;      // keys the row may read: min(position + 1, n_keys), 0 for a negative position
  Int sink_end = 0;     // kept sinks are [0, sink_end)
  Int local_begin = 0;  // the kept window is [local_begin, allowed)
  Int fill = 0;         // keys chosen by score from the free keys [sink_end, local_begin)
  Int width = 0;        // entries of the row (the policy's width)

  KEYSEL_HOST_DEVICE constexpr Int free_keys() const { return local_begin - sink_end; }
  KEYSEL_HOST_DEVICE constexpr Int kept() const { return sink_end + (allowed - local_begin); }
  KEYSEL_HOST_DEVICE constexpr bool is_kept(Int s) const { return s < sink_end || (s >= local_begin && s < allowed); }

  /// The plan of one row. The policy's terms must be valid (SelectionPolicy::validate): 1 <= k, 0 <= n_sink,
  /// 0 <= n_local, and n_sink + n_local <= k unless kept_on_top.
  KEYSEL_HOST_DEVICE static constexpr BasicRowPlan make(Int k, Int n_sink, Int n_local, bool kept_on_top, Int width,
                                                        Int position, Int n_keys) {
    BasicRowPlan plan;
    plan.allowed = position < 0 ? 0 : (position < n_keys - 1 ? position + 1 : n_keys);
    plan.sink_end = n_sink < plan.allowed ? n_sink : plan.allowed;
    // max(max(allowed - n_local, 0), sink_end): the inner max keeps the CUDA top-k kernel at 53 registers.
    const Int window = plan.allowed - n_local > 0 ? plan.allowed - n_local : 0;
    plan.local_begin = window > plan.sink_end ? window : plan.sink_end;
    const Int wanted = kept_on_top ? k : (k < plan.allowed ? k : plan.allowed) - plan.kept();
    plan.fill = wanted < 0 ? 0 : (wanted < plan.free_keys() ? wanted : plan.free_keys());
    plan.width = width;
    return plan;
  }
  /// The same from a SelectionPolicy (host code: `policy` has k, n_sink, n_local, kept_on_top and width()).
  template <typename Policy>
  static constexpr BasicRowPlan make(const Policy& policy, Int position, Int n_keys) {
    return make(static_cast<Int>(policy.k), static_cast<Int>(policy.n_sink), static_cast<Int>(policy.n_local),
                policy.kept_on_top, static_cast<Int>(policy.width()), position, n_keys);
  }
};

/// The host's plan (64-bit counts).
using SelectionRowPlan = BasicRowPlan<std::int64_t>;

}  // namespace keysel
