// Selection groups and the selection policy shared by every selector (SPEC §2).
//
// A selection is an int32 tensor [T, G, W]: for query token t and group G, W distinct allowed key positions in
// ascending order, then -1 padding. W = policy.width() (k, or k + n_sink + n_local when the always-kept keys
// come on top of k).
#pragma once

#include <cstdint>
#include <string_view>

#include "keysel/core/attention_inputs.h"

namespace keysel {

enum class Granularity : std::uint8_t {
  per_head,     // each query head alone: G = Hq
  per_kv_head,  // the g query heads of one key head: G = Hkv
  per_token,    // all Hq heads share one set: G = 1
};

/// "per_head", "per_kv_head", "per_token".
std::string_view granularity_name(Granularity granularity);
/// Parses one of the names above; throws keysel::Error otherwise.
Granularity parse_granularity(std::string_view name);

/// Number of selection groups for a head layout.
std::int64_t group_count(Granularity granularity, std::int64_t query_heads, std::int64_t kv_heads);
/// Group of query head `head`.
std::int64_t group_of_head(Granularity granularity, std::int64_t head, std::int64_t query_heads,
                           std::int64_t kv_heads);
/// The query heads of group `group` are [first, first + count).
struct HeadRange {
  std::int64_t first = 0;
  std::int64_t count = 0;
};
HeadRange heads_of_group(Granularity granularity, std::int64_t group, std::int64_t query_heads,
                         std::int64_t kv_heads);

struct SelectionPolicy {
  std::int64_t k = 2048;                          // keys per query token and group
  Granularity granularity = Granularity::per_kv_head;
  std::int64_t n_sink = 0;                        // always keep positions 0 .. n_sink-1 (when allowed)
  std::int64_t n_local = 0;                       // always keep the last n_local allowed positions
  bool kept_on_top = false;                       // false: kept keys count toward k; true: k more keys besides

  /// Selection width W: k, or k + n_sink + n_local when kept keys come on top.
  /// Saturates at INT64_MAX instead of wrapping when called on a policy validate() would refuse.
  std::int64_t width() const {
    if (!kept_on_top) return k;
    std::int64_t w = 0;
    if (__builtin_add_overflow(k, n_sink, &w) || __builtin_add_overflow(w, n_local, &w)) return INT64_MAX;
    return w;
  }
  /// Checks 1 <= k, 0 <= n_sink, 0 <= n_local (each <= kMaxKeyPositions) and, when kept keys count toward k,
  /// n_sink + n_local <= k.
  void validate(std::string_view function) const;
};

/// The one check of a selection output before anything is written: a writable int32 [tokens, groups, width]
/// view on `device`. Throws keysel::Error of `function` naming `argument`.
void check_selection_output(std::string_view function, const TensorView& selection, std::int64_t tokens,
                            std::int64_t groups, std::int64_t width, Device device = Device::cpu(),
                            std::string_view argument = "selection");

/// Checks a selection tensor: int32 [T, G, W] on the CPU, every entry -1 or an allowed key position for its
/// query token, no position twice in a row, padding only at the end. Throws keysel::Error naming `argument`.
void validate_selection(std::string_view function, const TensorView& selection, std::string_view argument,
                        const TensorView& positions, std::int64_t n_keys, std::int64_t groups);

}  // namespace keysel
