// Which SIMD code paths the indexer kernels use.
//
// The fast scorers are compiled for several instruction sets and pick the best one the CPU supports at run
// time. The environment variable KEYSEL_SIMD=scalar|avx2|avx512 (read once, at first use) or set_simd_level()
// forces a lower level, so that every path can be tested and compared on one machine.
//   scalar  portable C++ (the fallback on any CPU)
//   avx2    AVX2 + FMA + F16C: fp32 FMA for the float formats, 16-bit multiply-add for int8/int4
//   avx512  AVX-512 F/BW/VL with VNNI (int8/int4: vpdpbusd) and BF16 (bf16/fp8: vdpbf16ps)
#pragma once

#include <cstdint>
#include <string_view>

namespace keysel {

enum class SimdLevel : std::uint8_t { scalar, avx2, avx512 };

/// "scalar", "avx2", "avx512".
std::string_view simd_level_name(SimdLevel level);
/// Parses a name above; throws keysel::Error otherwise.
SimdLevel parse_simd_level(std::string_view name);
/// The best level this CPU supports.
SimdLevel best_simd_level();
/// True when this CPU can run `level`.
bool simd_level_supported(SimdLevel level);
/// The level in use: best_simd_level(), lowered by KEYSEL_SIMD or set_simd_level().
SimdLevel simd_level();
/// Forces a level for the whole process; throws keysel::Error if the CPU cannot run it.
void set_simd_level(SimdLevel level);

/// Sets the level for its lifetime (tests), then restores the previous one.
class ScopedSimdLevel {
 public:
  explicit ScopedSimdLevel(SimdLevel level);
  ~ScopedSimdLevel();
  ScopedSimdLevel(const ScopedSimdLevel&) = delete;
  ScopedSimdLevel& operator=(const ScopedSimdLevel&) = delete;

 private:
  SimdLevel previous_;
};

}  // namespace keysel
