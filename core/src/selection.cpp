#include "keysel/core/selection.h"

#include <string>
#include <vector>

namespace keysel {

std::string_view granularity_name(Granularity granularity) {
  switch (granularity) {
    case Granularity::per_head: return "per_head";
    case Granularity::per_kv_head: return "per_kv_head";
    case Granularity::per_token: return "per_token";
  }
  return "unknown";
}

Granularity parse_granularity(std::string_view name) {
  if (name == "per_head") return Granularity::per_head;
  if (name == "per_kv_head") return Granularity::per_kv_head;
  if (name == "per_token") return Granularity::per_token;
  KEYSEL_CHECK_ARG(false, "granularity", "per_head, per_kv_head or per_token", name);
  return Granularity::per_kv_head;
}

std::int64_t group_count(Granularity granularity, std::int64_t query_heads, std::int64_t kv_heads) {
  KEYSEL_CHECK_ARG(query_heads >= 1, "query_heads", ">= 1", query_heads);
  KEYSEL_CHECK_ARG(kv_heads >= 1 && query_heads % kv_heads == 0, "kv_heads",
                   "a divisor of query_heads = " + std::to_string(query_heads), kv_heads);
  switch (granularity) {
    case Granularity::per_head: return query_heads;
    case Granularity::per_kv_head: return kv_heads;
    case Granularity::per_token: return 1;
  }
  return 1;
}

std::int64_t group_of_head(Granularity granularity, std::int64_t head, std::int64_t query_heads,
                           std::int64_t kv_heads) {
  const std::int64_t groups = group_count(granularity, query_heads, kv_heads);
  KEYSEL_CHECK_ARG(head >= 0 && head < query_heads, "head", "0 <= head < " + std::to_string(query_heads), head);
  return head / (query_heads / groups);
}

HeadRange heads_of_group(Granularity granularity, std::int64_t group, std::int64_t query_heads,
                         std::int64_t kv_heads) {
  const std::int64_t groups = group_count(granularity, query_heads, kv_heads);
  KEYSEL_CHECK_ARG(group >= 0 && group < groups, "group", "0 <= group < " + std::to_string(groups), group);
  const std::int64_t per_group = query_heads / groups;
  return {group * per_group, per_group};
}

void SelectionPolicy::validate(std::string_view function) const {
  // Key positions are int32 (SPEC §2): no row holds more than 2^31 - 1 keys, so larger counts are mistakes,
  // and bounding each term keeps k + n_sink + n_local (the width) far inside int64.
  const auto check = [&](std::int64_t value, std::string_view argument, std::int64_t min_value) {
    if (value < min_value || value > kMaxKeyPositions) {
      detail::throw_argument_error(function, argument,
                                   "an integer in [" + std::to_string(min_value) + ", " +
                                       std::to_string(kMaxKeyPositions) + "] (key positions are int32)",
                                   std::to_string(value));
    }
  };
  check(k, "policy.k", 1);
  check(n_sink, "policy.n_sink", 0);
  check(n_local, "policy.n_local", 0);
  if (!kept_on_top && n_sink + n_local > k) {
    detail::throw_argument_error(function, "policy.n_sink + policy.n_local",
                                 "<= k = " + std::to_string(k) + " when kept keys count toward k",
                                 std::to_string(n_sink + n_local));
  }
}

void check_selection_output(std::string_view function, const TensorView& selection, std::int64_t tokens,
                            std::int64_t groups, std::int64_t width, Device device, std::string_view argument) {
  expect_shape(function, selection, argument, {tokens, groups, width});
  expect_dtype(function, selection, argument, {DType::int32});
  expect_device(function, selection, argument, device);
  expect_writable(function, selection, argument);
}

void validate_selection(std::string_view function, const TensorView& selection, std::string_view argument,
                        const TensorView& positions, std::int64_t n_keys, std::int64_t groups) {
  expect_shape(function, selection, argument, {positions.size(0), groups, kAnyExtent});
  expect_dtype(function, selection, argument, {DType::int32});
  expect_device(function, selection, argument, Device::cpu());
  const std::int64_t tokens = selection.size(0);
  const std::int64_t width = selection.size(2);
  std::vector<std::int64_t> last_seen(static_cast<std::size_t>(n_keys), -1);
  std::int64_t row_id = 0;
  for (std::int64_t t = 0; t < tokens; ++t) {
    const std::int64_t allowed = allowed_keys(static_cast<std::int64_t>(positions.load({t})), n_keys);
    for (std::int64_t g = 0; g < groups; ++g, ++row_id) {
      bool padding = false;
      for (std::int64_t i = 0; i < width; ++i) {
        const std::int64_t s = static_cast<std::int64_t>(selection.load({t, g, i}));
        const auto where = [&] {
          return std::string(argument) + "[" + std::to_string(t) + ", " + std::to_string(g) + ", " +
                 std::to_string(i) + "]";
        };
        if (s == -1) {
          padding = true;
          continue;
        }
        if (padding) {
          detail::throw_argument_error(function, argument, "-1 padding only at the end of a row",
                                       where() + " = " + std::to_string(s) + " after a -1");
        }
        if (s < 0 || s >= allowed) {
          detail::throw_argument_error(function, argument,
                                       "key positions in [0, " + std::to_string(allowed) + ") or -1",
                                       where() + " = " + std::to_string(s));
        }
        if (last_seen[static_cast<std::size_t>(s)] == row_id) {
          detail::throw_argument_error(function, argument, "distinct key positions in each row",
                                       where() + " = " + std::to_string(s) + " repeated");
        }
        last_seen[static_cast<std::size_t>(s)] = row_id;
      }
    }
  }
}

}  // namespace keysel
