// The cyclic Jacobi eigensolver (symmetric_eigen.h).
#include "symmetric_eigen.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>
#include <vector>

#include "keysel/core/error.h"

namespace keysel {

void symmetric_eigenvectors(const double* matrix, std::int64_t n, std::int64_t r, double* vectors, double* values) {
  KEYSEL_CHECK_ARG(n >= 1, "n", ">= 1", n);
  KEYSEL_CHECK_ARG(r >= 1 && r <= n, "r", "in [1, n = " + std::to_string(n) + "]", r);
  const auto N = static_cast<std::size_t>(n);
  std::vector<double> a(matrix, matrix + N * N), v(N * N, 0.0);
  for (std::size_t i = 0; i < N; ++i) v[i * N + i] = 1.0;
  double total = 0.0;
  for (double x : a) total += x * x;
  for (int sweep = 0; sweep < 100; ++sweep) {
    double off = 0.0;
    for (std::size_t i = 0; i < N; ++i)
      for (std::size_t j = i + 1; j < N; ++j) off += a[i * N + j] * a[i * N + j];
    if (off <= 1e-26 * total || off == 0.0) break;
    for (std::size_t p = 0; p < N; ++p) {
      for (std::size_t q = p + 1; q < N; ++q) {
        const double apq = a[p * N + q];
        if (std::fabs(apq) < 1e-300) continue;
        // Rotation zeroing a[p][q] (Golub & Van Loan, symmetric Schur decomposition).
        const double theta = (a[q * N + q] - a[p * N + p]) / (2.0 * apq);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1.0));
        const double c = 1.0 / std::sqrt(t * t + 1.0), s = t * c;
        for (std::size_t k = 0; k < N; ++k) {  // columns p, q
          const double akp = a[k * N + p], akq = a[k * N + q];
          a[k * N + p] = c * akp - s * akq;
          a[k * N + q] = s * akp + c * akq;
        }
        for (std::size_t k = 0; k < N; ++k) {  // rows p, q
          const double apk = a[p * N + k], aqk = a[q * N + k];
          a[p * N + k] = c * apk - s * aqk;
          a[q * N + k] = s * apk + c * aqk;
        }
        for (std::size_t k = 0; k < N; ++k) {
          const double vkp = v[k * N + p], vkq = v[k * N + q];
          v[k * N + p] = c * vkp - s * vkq;
          v[k * N + q] = s * vkp + c * vkq;
        }
      }
    }
  }
  std::vector<std::size_t> order(N);
  for (std::size_t i = 0; i < N; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](std::size_t x, std::size_t y) { return a[x * N + x] > a[y * N + y]; });
  for (std::int64_t j = 0; j < r; ++j) {
    const std::size_t col = order[static_cast<std::size_t>(j)];
    for (std::size_t k = 0; k < N; ++k) vectors[k * static_cast<std::size_t>(r) + static_cast<std::size_t>(j)] = v[k * N + col];
    if (values != nullptr) values[j] = a[col * N + col];
  }
}

}  // namespace keysel
