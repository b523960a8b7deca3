// The comparison the backward tests share: every element of a kernel's fp32 gradient within
// tolerance * (1 + max |reference|) of the double-precision reference (gradients sum many terms, so the bound
// scales with the largest one rather than with each element).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

namespace keysel::testing {

inline void expect_gradient_close(const std::vector<float>& got, const std::vector<double>& want, double tolerance,
                                  const char* name) {
  ASSERT_EQ(got.size(), want.size()) << name;
  double largest = 0.0;
  for (const double x : want) largest = std::max(largest, std::abs(x));
  const double bound = tolerance * (1.0 + largest);
  for (std::size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], want[i], bound) << name << "[" << i << "]";
}

}  // namespace keysel::testing
