// Element types keysel stores and computes with, and their bit-exact conversions.
//
// Floating formats round to nearest, ties to even. fp8 follows the OCP 8-bit floating point specification:
//   e4m3: 1 sign, 4 exponent (bias 7), 3 mantissa bits; largest finite ±448; no infinities; NaN = S.1111.111.
//         Encoding saturates: finite values beyond ±448 and ±infinity become ±448. NaN becomes S.1111.111.
//   e5m2: 1 sign, 5 exponent (bias 15), 2 mantissa bits; largest finite ±57344; ±infinity = S.11111.00;
//         NaN = S.11111.{01,10,11}. Encoding saturates finite overflow to ±57344 (the "satfinite" mode that
//         quantised caches use), keeps ±infinity as ±infinity, and maps NaN to S.11111.11.
// Integer formats are symmetric: int8 codes in [-127, 127], int4 codes in [-7, 7] (two per byte, the element
// with the lower index in the low nibble). Quantisation divides by a scale, rounds to nearest even and clamps.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace keysel {

enum class DType : std::uint8_t {
  fp32,
  fp16,
  bf16,
  fp8_e4m3,
  fp8_e5m2,
  int8,
  int4,
  // Auxiliary types for indices, positions and double-precision reference outputs.
  int32,
  fp64,
};

/// Canonical lowercase name: "fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "int8", "int4", "int32", "fp64".
std::string_view dtype_name(DType dtype);
/// Parses a canonical name (also accepts "e4m3", "e5m2", "float32", "float16", "bfloat16", "float64").
/// Throws keysel::Error naming the accepted names otherwise.
DType parse_dtype(std::string_view name);
/// Storage bits of one element (int4: 4).
int dtype_bits(DType dtype);
/// Bytes needed for `count` elements (int4 rounds up to whole bytes).
std::int64_t dtype_bytes(DType dtype, std::int64_t count);
bool is_floating(DType dtype);
bool is_integer(DType dtype);

inline constexpr float kFp8E4m3Max = 448.0f;
inline constexpr float kFp8E5m2Max = 57344.0f;
inline constexpr float kFp16Max = 65504.0f;
inline constexpr int kInt8Max = 127;
inline constexpr int kInt4Max = 7;

// ---- scalar conversions (bit-exact, round to nearest even) ---------------------------------------------
std::uint16_t fp32_to_fp16_bits(float value);
float fp16_bits_to_fp32(std::uint16_t bits);
std::uint16_t fp32_to_bf16_bits(float value);
float bf16_bits_to_fp32(std::uint16_t bits);
std::uint8_t fp32_to_fp8_e4m3(float value);
float fp8_e4m3_to_fp32(std::uint8_t bits);
std::uint8_t fp32_to_fp8_e5m2(float value);
float fp8_e5m2_to_fp32(std::uint8_t bits);

/// round_half_even(value / scale) clamped to [-127, 127]; NaN maps to 0. `scale` must be finite and > 0.
std::int8_t quantize_int8(float value, float scale);
/// round_half_even(value / scale) clamped to [-7, 7]; NaN maps to 0. `scale` must be finite and > 0.
std::int8_t quantize_int4(float value, float scale);
/// Packs two int4 codes in [-8, 7] into one byte (`low` in bits 0..3, `high` in bits 4..7).
std::uint8_t pack_int4(std::int8_t low, std::int8_t high);
/// Sign-extended int4 code of nibble `which` (0 = low, 1 = high) of `byte`.
std::int8_t unpack_int4(std::uint8_t byte, int which);

/// Rounds `value` to the nearest value representable in `dtype` and returns it as a float (for fp32 the value
/// itself; for the integer formats the quantised code times `scale`).
float round_to_dtype(float value, DType dtype, float scale = 1.0f);

}  // namespace keysel
