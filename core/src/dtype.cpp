#include "keysel/core/dtype.h"

#include <array>
#include <bit>
#include <cmath>

#include "keysel/core/error.h"

namespace keysel {

// ---- names and sizes -------------------------------------------------------------------------------------

std::string_view dtype_name(DType dtype) {
  switch (dtype) {
    case DType::fp32: return "fp32";
    case DType::fp16: return "fp16";
    case DType::bf16: return "bf16";
    case DType::fp8_e4m3: return "fp8_e4m3";
    case DType::fp8_e5m2: return "fp8_e5m2";
    case DType::int8: return "int8";
    case DType::int4: return "int4";
    case DType::int32: return "int32";
    case DType::fp64: return "fp64";
  }
  // Only reachable through a cast of an out-of-range integer to DType.
  KEYSEL_CHECK_ARG(false, "dtype", "a DType enumerator", static_cast<int>(dtype));
  return {};
}

DType parse_dtype(std::string_view name) {
  struct Alias {
    std::string_view name;
    DType dtype;
  };
  static constexpr std::array<Alias, 15> kNames = {{
      {"fp32", DType::fp32},         {"float32", DType::fp32},     {"fp16", DType::fp16},
      {"float16", DType::fp16},      {"bf16", DType::bf16},        {"bfloat16", DType::bf16},
      {"fp8_e4m3", DType::fp8_e4m3}, {"e4m3", DType::fp8_e4m3},    {"fp8_e5m2", DType::fp8_e5m2},
      {"e5m2", DType::fp8_e5m2},     {"int8", DType::int8},        {"int4", DType::int4},
      {"int32", DType::int32},       {"fp64", DType::fp64},        {"float64", DType::fp64},
  }};
  for (const Alias& alias : kNames) {
    if (alias.name == name) return alias.dtype;
  }
  KEYSEL_CHECK_ARG(false, "name",
                   "one of fp32, fp16, bf16, fp8_e4m3, fp8_e5m2, int8, int4, int32, fp64 "
                   "(or float32, float16, bfloat16, e4m3, e5m2, float64)",
                   name);
  return DType::fp32;
}

int dtype_bits(DType dtype) {
  switch (dtype) {
    case DType::fp32: return 32;
    case DType::fp16: return 16;
    case DType::bf16: return 16;
    case DType::fp8_e4m3: return 8;
    case DType::fp8_e5m2: return 8;
    case DType::int8: return 8;
    case DType::int4: return 4;
    case DType::int32: return 32;
    case DType::fp64: return 64;
  }
  KEYSEL_CHECK_ARG(false, "dtype", "a DType enumerator", static_cast<int>(dtype));
  return 0;
}

std::int64_t dtype_bytes(DType dtype, std::int64_t count) {
  KEYSEL_CHECK_ARG(count >= 0, "count", ">= 0", count);
  if (dtype == DType::int4) return (count + 1) / 2;  // two codes per byte, a trailing odd code takes a whole one
  return count * (dtype_bits(dtype) / 8);
}

bool is_floating(DType dtype) {
  switch (dtype) {
    case DType::fp32:
    case DType::fp16:
    case DType::bf16:
    case DType::fp8_e4m3:
    case DType::fp8_e5m2:
    case DType::fp64: return true;
    default: return false;
  }
}

bool is_integer(DType dtype) {
  switch (dtype) {
    case DType::int8:
    case DType::int4:
    case DType::int32: return true;
    default: return false;
  }
}

// ---- small binary floating formats ---------------------------------------------------------------------
//
// fp16, bf16, e4m3 and e5m2 are all "1 sign, E exponent, M mantissa bits, bias B" formats. One encoder and one
// decoder serve all of them; each public function only adds what its format does with NaN, infinity and
// overflow.

namespace {

struct SmallFloat {
  int exponent_bits;
  int mantissa_bits;
  int bias;
};

constexpr SmallFloat kFp16{5, 10, 15};
constexpr SmallFloat kBf16{8, 7, 127};
constexpr SmallFloat kE4m3{4, 3, 7};
constexpr SmallFloat kE5m2{5, 2, 15};

constexpr std::uint32_t kFp32SignBit = 0x80000000u;
constexpr std::uint32_t kFp32ExponentMask = 0x7F800000u;
constexpr std::uint32_t kFp32MantissaMask = 0x007FFFFFu;
constexpr int kFp32MantissaBits = 23;
constexpr int kFp32Bias = 127;

constexpr bool fp32_is_nan(std::uint32_t bits) {
  return (bits & kFp32ExponentMask) == kFp32ExponentMask && (bits & kFp32MantissaMask) != 0;
}
constexpr bool fp32_is_inf(std::uint32_t bits) { return (bits & ~kFp32SignBit) == kFp32ExponentMask; }

// Encodes the magnitude |x| (fp32 bits without the sign, finite) into `format`, rounding to nearest, ties to
// even, in one step from the exact fp32 value (so no double rounding through an intermediate format).
//
// The result is the code without its sign bit. It is not clamped: a value beyond the largest finite one rounds
// to a code at or above the format's infinity/NaN codes, and the caller decides what overflow means.
//
// Why one formula covers normals, subnormals and carries: with q the rounded significand counted in units of
// the target's ulp at exponent e (q includes the implicit leading 1 for normals), the code is
// ((e + bias - 1) << M) + q. For a normal, q in [2^M, 2^(M+1)) and the implicit 1 adds the missing 1 to the
// exponent field; for a subnormal e is the minimum exponent 1 - bias, the exponent term is 0 and the code is q.
// When rounding carries q up to the next power of two, the addition moves into the next binade (or from the
// largest subnormal into the smallest normal) by itself.
constexpr std::uint32_t encode_magnitude(std::uint32_t magnitude_bits, SmallFloat format) {
  const int m = format.mantissa_bits;
  const int min_exponent = 1 - format.bias;  // exponent of the smallest normal of the target format
  const std::uint32_t exponent_field = magnitude_bits >> kFp32MantissaBits;
  if (magnitude_bits == 0) return 0;

  // |x| = significand * 2^(exponent - 23) exactly.
  std::uint32_t significand = magnitude_bits & kFp32MantissaMask;
  int exponent = static_cast<int>(exponent_field) - kFp32Bias;
  if (exponent_field == 0) {
    exponent = 1 - kFp32Bias;  // fp32 subnormal: no implicit 1
  } else {
    significand |= 1u << kFp32MantissaBits;
  }

  // Target exponent: the value's own binade, or the target's minimum exponent for its subnormal range. Every
  // format here has min_exponent >= -126, so fp32 subnormals always land in the target's subnormal range.
  const int target_exponent = exponent > min_exponent ? exponent : min_exponent;
  // Bits of the fp32 significand below the target's ulp, to be rounded away.
  const int shift = (kFp32MantissaBits - m) + (target_exponent - exponent);
  // significand < 2^24, so from a shift of 25 on it is below half of the target's smallest subnormal.
  if (shift > 25) return 0;

  std::uint32_t q = significand >> shift;
  const std::uint32_t remainder = significand & ((1u << shift) - 1u);
  const std::uint32_t half = 1u << (shift - 1);
  if (remainder > half || (remainder == half && (q & 1u) != 0)) ++q;

  return (static_cast<std::uint32_t>(target_exponent + format.bias - 1) << m) + q;
}

// Decodes a finite code (sign, exponent, mantissa fields of `format`) exactly into fp32. The caller handles the
// format's infinity and NaN codes. Every fp16/e4m3/e5m2 value, subnormals included, is an fp32 normal (or 0),
// so the result is assembled from fields; bf16 has its own, simpler decoder.
constexpr float decode_finite(std::uint32_t code, SmallFloat format) {
  const int m = format.mantissa_bits;
  const std::uint32_t sign = (code >> (format.exponent_bits + m)) & 1u;
  const std::uint32_t exponent_field = (code >> m) & ((1u << format.exponent_bits) - 1u);
  std::uint32_t mantissa = code & ((1u << m) - 1u);

  std::uint32_t bits = sign << 31;
  if (exponent_field == 0 && mantissa == 0) return std::bit_cast<float>(bits);  // ±0

  int exponent = static_cast<int>(exponent_field) - format.bias;
  if (exponent_field == 0) {
    // Subnormal: mantissa * 2^(1 - bias - M). Shift the leading 1 up to the implicit-bit position, lowering the
    // exponent for each step, to write it as the fp32 normal it is.
    exponent = 1 - format.bias;
    while ((mantissa & (1u << m)) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    mantissa &= (1u << m) - 1u;
  }
  bits |= static_cast<std::uint32_t>(exponent + kFp32Bias) << kFp32MantissaBits;
  bits |= mantissa << (kFp32MantissaBits - m);
  return std::bit_cast<float>(bits);
}

constexpr float kQuietNan = std::bit_cast<float>(0x7FC00000u);

// fp8 decoding is a table lookup: 256 entries, built at compile time by the decoder above.
constexpr float decode_e4m3(std::uint8_t code) {
  // S.1111.111 is the only NaN; S.1111.000 to S.1111.110 are ordinary values (256 to 448).
  if ((code & 0x7Fu) == 0x7Fu) {
    return (code & 0x80u) != 0 ? -kQuietNan : kQuietNan;
  }
  return decode_finite(code, kE4m3);
}

constexpr float decode_e5m2(std::uint8_t code) {
  // Exponent field 11111 is IEEE-like: mantissa 0 is infinity, anything else NaN.
  if ((code & 0x7Cu) == 0x7Cu) {
    const bool negative = (code & 0x80u) != 0;
    if ((code & 0x03u) == 0) {
      const float inf = std::bit_cast<float>(kFp32ExponentMask);
      return negative ? -inf : inf;
    }
    return negative ? -kQuietNan : kQuietNan;
  }
  return decode_finite(code, kE5m2);
}

template <float (*decode)(std::uint8_t)>
constexpr std::array<float, 256> make_fp8_table() {
  std::array<float, 256> table{};
  for (std::size_t code = 0; code < table.size(); ++code) table[code] = decode(static_cast<std::uint8_t>(code));
  return table;
}

constexpr std::array<float, 256> kE4m3Values = make_fp8_table<decode_e4m3>();
constexpr std::array<float, 256> kE5m2Values = make_fp8_table<decode_e5m2>();

// Spot checks of the tables against the OCP spec (the tests check all 256 codes against an independent list).
static_assert(kE4m3Values[0x7E] == 448.0f && kE4m3Values[0x01] == 0x1p-9f && kE4m3Values[0x08] == 0x1p-6f);
static_assert(kE5m2Values[0x7B] == 57344.0f && kE5m2Values[0x01] == 0x1p-16f && kE5m2Values[0x04] == 0x1p-14f);

// Round half to even, independent of the floating-point environment's rounding mode. |value| <= 2^31.
double round_half_even(double value) {
  const double below = std::floor(value);
  const double fraction = value - below;  // exact: both are multiples of value's ulp, and it is below 1
  if (fraction > 0.5) return below + 1.0;
  if (fraction < 0.5) return below;
  return std::fmod(below, 2.0) == 0.0 ? below : below + 1.0;
}

// round_half_even(value / scale) clamped to [-limit, limit], NaN to 0. The division is the fp32 division the
// header promises; the clamp comes first so that a huge or infinite quotient needs no integer conversion.
double quantize(float value, float scale, double limit) {
  const float quotient = value / scale;
  if (std::isnan(quotient)) return 0.0;
  double q = static_cast<double>(quotient);
  if (q > limit) q = limit;
  if (q < -limit) q = -limit;
  return round_half_even(q);
}

}  // namespace

// ---- fp16 ------------------------------------------------------------------------------------------------

std::uint16_t fp32_to_fp16_bits(float value) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  const std::uint32_t sign = (bits & kFp32SignBit) >> 16;
  const std::uint32_t magnitude = bits & ~kFp32SignBit;
  constexpr std::uint32_t kInf = 0x7C00u;
  if (fp32_is_nan(bits)) {
    // Quiet NaN keeping the top payload bits, as the F16C instruction does.
    return static_cast<std::uint16_t>(sign | kInf | 0x0200u | ((magnitude & kFp32MantissaMask) >> 13));
  }
  if (fp32_is_inf(bits)) return static_cast<std::uint16_t>(sign | kInf);
  std::uint32_t code = encode_magnitude(magnitude, kFp16);
  // IEEE round to nearest: everything from 65520 (max + half an ulp) on rounds to infinity.
  if (code > kInf) code = kInf;
  return static_cast<std::uint16_t>(sign | code);
}

float fp16_bits_to_fp32(std::uint16_t bits) {
  if ((bits & 0x7C00u) == 0x7C00u) {
    // Infinity or NaN: widen the payload; the fp16 quiet bit lands on the fp32 quiet bit.
    const std::uint32_t sign = static_cast<std::uint32_t>(bits & 0x8000u) << 16;
    const std::uint32_t payload = static_cast<std::uint32_t>(bits & 0x03FFu) << 13;
    return std::bit_cast<float>(sign | kFp32ExponentMask | payload);
  }
  return decode_finite(bits, kFp16);
}

// ---- bf16 ------------------------------------------------------------------------------------------------

std::uint16_t fp32_to_bf16_bits(float value) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  if (fp32_is_nan(bits)) {
    // Truncation keeps sign and top payload bits; setting the quiet bit keeps it a NaN even when the payload
    // lived only in the dropped low bits.
    return static_cast<std::uint16_t>((bits >> 16) | 0x0040u);
  }
  if (fp32_is_inf(bits)) return static_cast<std::uint16_t>(bits >> 16);
  const std::uint32_t sign = (bits & kFp32SignBit) >> 16;
  // bf16 shares fp32's exponent range, so overflow past the largest finite value carries into exactly 0x7F80,
  // the infinity code, with no clamp needed.
  return static_cast<std::uint16_t>(sign | encode_magnitude(bits & ~kFp32SignBit, kBf16));
}

float bf16_bits_to_fp32(std::uint16_t bits) {
  // bf16 is the top half of an fp32: exact for every code, infinities, NaNs and subnormals included.
  return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
}

// ---- fp8 -------------------------------------------------------------------------------------------------

std::uint8_t fp32_to_fp8_e4m3(float value) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  const std::uint32_t sign = (bits & kFp32SignBit) >> 24;
  constexpr std::uint32_t kMaxCode = 0x7Eu;  // S.1111.110 = 448
  if (fp32_is_nan(bits)) return static_cast<std::uint8_t>(sign | 0x7Fu);
  // No infinities in e4m3: infinity and every finite overflow saturate to ±448.
  if (fp32_is_inf(bits)) return static_cast<std::uint8_t>(sign | kMaxCode);
  std::uint32_t code = encode_magnitude(bits & ~kFp32SignBit, kE4m3);
  if (code > kMaxCode) code = kMaxCode;
  return static_cast<std::uint8_t>(sign | code);
}

float fp8_e4m3_to_fp32(std::uint8_t bits) { return kE4m3Values[bits]; }

std::uint8_t fp32_to_fp8_e5m2(float value) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  const std::uint32_t sign = (bits & kFp32SignBit) >> 24;
  constexpr std::uint32_t kMaxCode = 0x7Bu;  // S.11110.11 = 57344
  if (fp32_is_nan(bits)) return static_cast<std::uint8_t>(sign | 0x7Fu);
  if (fp32_is_inf(bits)) return static_cast<std::uint8_t>(sign | 0x7Cu);
  // "satfinite": finite values never become infinity.
  std::uint32_t code = encode_magnitude(bits & ~kFp32SignBit, kE5m2);
  if (code > kMaxCode) code = kMaxCode;
  return static_cast<std::uint8_t>(sign | code);
}

float fp8_e5m2_to_fp32(std::uint8_t bits) { return kE5m2Values[bits]; }

// ---- integer formats -------------------------------------------------------------------------------------

std::int8_t quantize_int8(float value, float scale) {
  KEYSEL_CHECK_ARG(std::isfinite(scale) && scale > 0.0f, "scale", "a finite value > 0", scale);
  return static_cast<std::int8_t>(quantize(value, scale, kInt8Max));
}

std::int8_t quantize_int4(float value, float scale) {
  KEYSEL_CHECK_ARG(std::isfinite(scale) && scale > 0.0f, "scale", "a finite value > 0", scale);
  return static_cast<std::int8_t>(quantize(value, scale, kInt4Max));
}

std::uint8_t pack_int4(std::int8_t low, std::int8_t high) {
  KEYSEL_CHECK_ARG(low >= -8 && low <= 7, "low", "an int4 code in [-8, 7]", low);
  KEYSEL_CHECK_ARG(high >= -8 && high <= 7, "high", "an int4 code in [-8, 7]", high);
  // The conversion to unsigned is modular, so the low nibble is the two's complement code.
  const auto low_nibble = static_cast<std::uint8_t>(static_cast<std::uint8_t>(low) & 0x0Fu);
  const auto high_nibble = static_cast<std::uint8_t>(static_cast<std::uint8_t>(high) & 0x0Fu);
  return static_cast<std::uint8_t>(low_nibble | (high_nibble << 4));
}

std::int8_t unpack_int4(std::uint8_t byte, int which) {
  KEYSEL_CHECK_ARG(which == 0 || which == 1, "which", "0 (low nibble) or 1 (high nibble)", which);
  const int nibble = (byte >> (4 * which)) & 0x0F;
  // Sign-extend by arithmetic rather than a shift of a negative value.
  return static_cast<std::int8_t>(nibble >= 8 ? nibble - 16 : nibble);
}

float round_to_dtype(float value, DType dtype, float scale) {
  if (is_integer(dtype)) {
    KEYSEL_CHECK_ARG(std::isfinite(scale) && scale > 0.0f, "scale", "a finite value > 0", scale);
  }
  switch (dtype) {
    case DType::fp32:
    case DType::fp64: return value;
    case DType::fp16: return fp16_bits_to_fp32(fp32_to_fp16_bits(value));
    case DType::bf16: return bf16_bits_to_fp32(fp32_to_bf16_bits(value));
    case DType::fp8_e4m3: return fp8_e4m3_to_fp32(fp32_to_fp8_e4m3(value));
    case DType::fp8_e5m2: return fp8_e5m2_to_fp32(fp32_to_fp8_e5m2(value));
    case DType::int8: return static_cast<float>(quantize(value, scale, kInt8Max)) * scale;
    case DType::int4: return static_cast<float>(quantize(value, scale, kInt4Max)) * scale;
    // int32 as a symmetric integer format too, clamped to ±(2^31 - 1).
    case DType::int32: return static_cast<float>(quantize(value, scale, 2147483647.0) * scale);
  }
  KEYSEL_CHECK_ARG(false, "dtype", "a DType enumerator", static_cast<int>(dtype));
  return value;
}

}  // namespace keysel
