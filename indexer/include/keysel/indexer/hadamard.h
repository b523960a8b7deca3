// Orthonormal Walsh-Hadamard rotation of a vector's channels (fast Walsh-Hadamard transform, O(n log n)).
//
// For a power-of-two length n the rotation is H_n / sqrt(n) (Sylvester order). Any other length is split into
// its binary decomposition, largest block first (e.g. 96 = 64 + 32, 100 = 64 + 32 + 4), and each block is
// rotated by its own H / sqrt(block): the result is still orthonormal (block diagonal), so dot products between
// vectors rotated alike are unchanged, and it is its own inverse.
#pragma once

#include <cstdint>

namespace keysel {

/// Rotates x [n] in place; n >= 1. Applying it twice restores x (up to rounding).
void hadamard_rotate(float* x, std::int64_t n);
/// The same in double precision (used by references).
void hadamard_rotate(double* x, std::int64_t n);

}  // namespace keysel
