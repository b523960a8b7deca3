// Checked size arithmetic: every sum or product that sizes an allocation or bounds a loop goes through these,
// so that a hostile extent (n_sink = 2^63 - 1, a shape of 2^40 x 2^40) ends in keysel::Error instead of a
// wrapped value that passes a check and then overruns a buffer.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>

#include "keysel/core/error.h"

namespace keysel {

/// a + b, or keysel::Error of `function` naming `argument` when the sum leaves int64.
inline std::int64_t checked_add(std::int64_t a, std::int64_t b, std::string_view function, std::string_view argument) {
  std::int64_t sum = 0;
  if (__builtin_add_overflow(a, b, &sum)) {
    detail::throw_argument_error(function, argument, "a sum that fits in int64",
                                 std::to_string(a) + " + " + std::to_string(b));
  }
  return sum;
}

/// a * b, or keysel::Error of `function` naming `argument` when the product leaves int64.
inline std::int64_t checked_mul(std::int64_t a, std::int64_t b, std::string_view function, std::string_view argument) {
  std::int64_t product = 0;
  if (__builtin_mul_overflow(a, b, &product)) {
    detail::throw_argument_error(function, argument, "a product that fits in int64",
                                 std::to_string(a) + " x " + std::to_string(b));
  }
  return product;
}

/// The product of non-negative `factors` (an element count), or keysel::Error naming `argument` when it leaves
/// int64 or a factor is negative.
inline std::int64_t checked_product(std::initializer_list<std::int64_t> factors, std::string_view function,
                                    std::string_view argument) {
  std::int64_t product = 1;
  for (const std::int64_t f : factors) {
    if (f < 0) detail::throw_argument_error(function, argument, "non-negative extents", detail::describe(factors));
    if (__builtin_mul_overflow(product, f, &product)) {
      detail::throw_argument_error(function, argument, "an element count that fits in int64",
                                   detail::describe(factors));
    }
  }
  return product;
}

/// ceil(a / b) for a >= 0, b >= 1, without forming a + b - 1 (which overflows for b near 2^63).
constexpr std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return a / b + (a % b != 0 ? 1 : 0); }

/// min(a * b, limit) for a, b >= 0: a product used only as a bound, saturated instead of wrapped.
constexpr std::int64_t saturating_mul(std::int64_t a, std::int64_t b, std::int64_t limit) {
  std::int64_t product = 0;
  if (__builtin_mul_overflow(a, b, &product) || product > limit) return limit;
  return product;
}

}  // namespace keysel
