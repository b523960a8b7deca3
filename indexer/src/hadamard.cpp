#include "keysel/indexer/hadamard.h"

#include <cmath>

#include "keysel/core/error.h"

namespace keysel {
namespace {

// In-place orthonormal Walsh-Hadamard transform of a power-of-two block. Each butterfly carries its own factor
// 1/sqrt(2), so intermediate values never exceed the largest possible output (no spurious overflow near FLT_MAX).
template <typename T>
void rotate_block(T* x, std::int64_t n) {
  const T r = static_cast<T>(0.70710678118654752440);
  for (std::int64_t half = 1; half < n; half *= 2) {
    for (std::int64_t base = 0; base < n; base += 2 * half) {
      for (std::int64_t i = base; i < base + half; ++i) {
        const T a = x[i] * r, b = x[i + half] * r;
        x[i] = a + b;
        x[i + half] = a - b;
      }
    }
  }
}

template <typename T>
void rotate(T* x, std::int64_t n) {
  KEYSEL_CHECK_ARG(n >= 1, "n", ">= 1", n);
  std::int64_t offset = 0;
  // Binary decomposition, largest block first.
  for (std::int64_t block = std::int64_t{1} << 62; block >= 1; block >>= 1) {
    if ((n - offset) >= block) {
      rotate_block(x + offset, block);
      offset += block;
    }
  }
}

}  // namespace

void hadamard_rotate(float* x, std::int64_t n) { rotate(x, n); }
void hadamard_rotate(double* x, std::int64_t n) { rotate(x, n); }

}  // namespace keysel
