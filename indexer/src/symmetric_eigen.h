// Eigenvectors of a small symmetric matrix: what ProxyScorer::fit needs for its rank-r projection (the leading
// eigenvectors of the keys' uncentred second moment). Private to the indexer module.
#pragma once

#include <cstdint>

namespace keysel {

/// Leading eigenvectors of a symmetric matrix (cyclic Jacobi, double precision).
///   matrix: [n, n] row-major symmetric; vectors: [n, r] written, columns by decreasing eigenvalue;
///   values: [r] written (may be nullptr).
/// Throws keysel::Error on n < 1 or r outside [1, n].
void symmetric_eigenvectors(const double* matrix, std::int64_t n, std::int64_t r, double* vectors, double* values);

}  // namespace keysel
