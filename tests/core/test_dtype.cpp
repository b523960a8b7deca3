// Element types: every fp8 code against the OCP spec, fp16/bf16 against independent references, integer
// quantisation, int4 packing and the dtype names (dtype.h).
#include <gtest/gtest.h>

#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "keysel/core/dtype.h"
#include "keysel/core/error.h"

namespace keysel {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// ---- fp8 reference tables --------------------------------------------------------------------------------
// The value of every fp8 code, written out by this Python script from the OCP definition alone (nothing from
// keysel), so that the decoder is checked against the format and not against itself:
//
//   from fractions import Fraction as F
//   def e4m3(c):  # None = NaN
//       s, e, m = c >> 7, (c >> 3) & 15, c & 7
//       if e == 15 and m == 7: return None
//       v = F(m, 8) * F(2) ** -6 if e == 0 else (1 + F(m, 8)) * F(2) ** (e - 7)
//       return -v if s else v
//   def e5m2(c):
//       s, e, m = c >> 7, (c >> 2) & 31, c & 3
//       if e == 31: return None if m else (-inf if s else inf)
//       v = F(m, 4) * F(2) ** -14 if e == 0 else (1 + F(m, 4)) * F(2) ** (e - 15)
//       return -v if s else v
//   print(", ".join(repr(float(v)) for v in map(e4m3, range(256))))  # likewise e5m2; -0.0 for the sign bit
//
// Each value has at most 4 significant bits, so every literal parses back to exactly that value.
constexpr std::array<double, 256> kE4m3Table = {
    0.0, 0.001953125, 0.00390625, 0.005859375, 0.0078125, 0.009765625, 0.01171875, 0.013671875,  // 0x00
    0.015625, 0.017578125, 0.01953125, 0.021484375, 0.0234375, 0.025390625, 0.02734375, 0.029296875,  // 0x08
    0.03125, 0.03515625, 0.0390625, 0.04296875, 0.046875, 0.05078125, 0.0546875, 0.05859375,  // 0x10
    0.0625, 0.0703125, 0.078125, 0.0859375, 0.09375, 0.1015625, 0.109375, 0.1171875,  // 0x18
    0.125, 0.140625, 0.15625, 0.171875, 0.1875, 0.203125, 0.21875, 0.234375,  // 0x20
    0.25, 0.28125, 0.3125, 0.34375, 0.375, 0.40625, 0.4375, 0.46875,  // 0x28
    0.5, 0.5625, 0.625, 0.6875, 0.75, 0.8125, 0.875, 0.9375,  // 0x30
    1.0, 1.125, 1.25, 1.375, 1.5, 1.625, 1.75, 1.875,  // 0x38
    2.0, 2.25, 2.5, 2.75, 3.0, 3.25, 3.5, 3.75,  // 0x40
    4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5,  // 0x48
    8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,  // 0x50
    16.0, 18.0, 20.0, 22.0, 24.0, 26.0, 28.0, 30.0,  // 0x58
    32.0, 36.0, 40.0, 44.0, 48.0, 52.0, 56.0, 60.0,  // 0x60
    64.0, 72.0, 80.0, 88.0, 96.0, 104.0, 112.0, 120.0,  // 0x68
    128.0, 144.0, 160.0, 176.0, 192.0, 208.0, 224.0, 240.0,  // 0x70
    256.0, 288.0, 320.0, 352.0, 384.0, 416.0, 448.0, kNaN,  // 0x78
    -0.0, -0.001953125, -0.00390625, -0.005859375, -0.0078125, -0.009765625, -0.01171875, -0.013671875,  // 0x80
    -0.015625, -0.017578125, -0.01953125, -0.021484375, -0.0234375, -0.025390625, -0.02734375, -0.029296875,  // 0x88
    -0.03125, -0.03515625, -0.0390625, -0.04296875, -0.046875, -0.05078125, -0.0546875, -0.05859375,  // 0x90
    -0.0625, -0.0703125, -0.078125, -0.0859375, -0.09375, -0.1015625, -0.109375, -0.1171875,  // 0x98
    -0.125, -0.140625, -0.15625, -0.171875, -0.1875, -0.203125, -0.21875, -0.234375,  // 0xA0
    -0.25, -0.28125, -0.3125, -0.34375, -0.375, -0.40625, -0.4375, -0.46875,  // 0xA8
    -0.5, -0.5625, -0.625, -0.6875, -0.75, -0.8125, -0.875, -0.9375,  // 0xB0
    -1.0, -1.125, -1.25, -1.375, -1.5, -1.625, -1.75, -1.875,  // 0xB8
    -2.0, -2.25, -2.5, -2.75, -3.0, -3.25, -3.5, -3.75,  // 0xC0
    -4.0, -4.5, -5.0, -5.5, -6.0, -6.5, -7.0, -7.5,  // 0xC8
    -8.0, -9.0, -10.0, -11.0, -12.0, -13.0, -14.0, -15.0,  // 0xD0
    -16.0, -18.0, -20.0, -22.0, -24.0, -26.0, -28.0, -30.0,  // 0xD8
    -32.0, -36.0, -40.0, -44.0, -48.0, -52.0, -56.0, -60.0,  // 0xE0
    -64.0, -72.0, -80.0, -88.0, -96.0, -104.0, -112.0, -120.0,  // 0xE8
    -128.0, -144.0, -160.0, -176.0, -192.0, -208.0, -224.0, -240.0,  // 0xF0
    -256.0, -288.0, -320.0, -352.0, -384.0, -416.0, -448.0, kNaN,  // 0xF8
};
constexpr std::array<double, 256> kE5m2Table = {
    0.0, 1.52587890625e-05, 3.0517578125e-05, 4.57763671875e-05,  // 0x00
    6.103515625e-05, 7.62939453125e-05, 9.1552734375e-05, 0.0001068115234375,  // 0x04
    0.0001220703125, 0.000152587890625, 0.00018310546875, 0.000213623046875,  // 0x08
    0.000244140625, 0.00030517578125, 0.0003662109375, 0.00042724609375,  // 0x0C
    0.00048828125, 0.0006103515625, 0.000732421875, 0.0008544921875,  // 0x10
    0.0009765625, 0.001220703125, 0.00146484375, 0.001708984375,  // 0x14
    0.001953125, 0.00244140625, 0.0029296875, 0.00341796875,  // 0x18
    0.00390625, 0.0048828125, 0.005859375, 0.0068359375,  // 0x1C
    0.0078125, 0.009765625, 0.01171875, 0.013671875,  // 0x20
    0.015625, 0.01953125, 0.0234375, 0.02734375,  // 0x24
    0.03125, 0.0390625, 0.046875, 0.0546875,  // 0x28
    0.0625, 0.078125, 0.09375, 0.109375,  // 0x2C
    0.125, 0.15625, 0.1875, 0.21875,  // 0x30
    0.25, 0.3125, 0.375, 0.4375,  // 0x34
    0.5, 0.625, 0.75, 0.875,  // 0x38
    1.0, 1.25, 1.5, 1.75,  // 0x3C
    2.0, 2.5, 3.0, 3.5,  // 0x40
    4.0, 5.0, 6.0, 7.0,  // 0x44
    8.0, 10.0, 12.0, 14.0,  // 0x48
    16.0, 20.0, 24.0, 28.0,  // 0x4C
    32.0, 40.0, 48.0, 56.0,  // 0x50
    64.0, 80.0, 96.0, 112.0,  // 0x54
    128.0, 160.0, 192.0, 224.0,  // 0x58
    256.0, 320.0, 384.0, 448.0,  // 0x5C
    512.0, 640.0, 768.0, 896.0,  // 0x60
    1024.0, 1280.0, 1536.0, 1792.0,  // 0x64
    2048.0, 2560.0, 3072.0, 3584.0,  // 0x68
    4096.0, 5120.0, 6144.0, 7168.0,  // 0x6C
    8192.0, 10240.0, 12288.0, 14336.0,  // 0x70
    16384.0, 20480.0, 24576.0, 28672.0,  // 0x74
    32768.0, 40960.0, 49152.0, 57344.0,  // 0x78
    kInf, kNaN, kNaN, kNaN,  // 0x7C
    -0.0, -1.52587890625e-05, -3.0517578125e-05, -4.57763671875e-05,  // 0x80
    -6.103515625e-05, -7.62939453125e-05, -9.1552734375e-05, -0.0001068115234375,  // 0x84
    -0.0001220703125, -0.000152587890625, -0.00018310546875, -0.000213623046875,  // 0x88
    -0.000244140625, -0.00030517578125, -0.0003662109375, -0.00042724609375,  // 0x8C
    -0.00048828125, -0.0006103515625, -0.000732421875, -0.0008544921875,  // 0x90
    -0.0009765625, -0.001220703125, -0.00146484375, -0.001708984375,  // 0x94
    -0.001953125, -0.00244140625, -0.0029296875, -0.00341796875,  // 0x98
    -0.00390625, -0.0048828125, -0.005859375, -0.0068359375,  // 0x9C
    -0.0078125, -0.009765625, -0.01171875, -0.013671875,  // 0xA0
    -0.015625, -0.01953125, -0.0234375, -0.02734375,  // 0xA4
    -0.03125, -0.0390625, -0.046875, -0.0546875,  // 0xA8
    -0.0625, -0.078125, -0.09375, -0.109375,  // 0xAC
    -0.125, -0.15625, -0.1875, -0.21875,  // 0xB0
    -0.25, -0.3125, -0.375, -0.4375,  // 0xB4
    -0.5, -0.625, -0.75, -0.875,  // 0xB8
    -1.0, -1.25, -1.5, -1.75,  // 0xBC
    -2.0, -2.5, -3.0, -3.5,  // 0xC0
    -4.0, -5.0, -6.0, -7.0,  // 0xC4
    -8.0, -10.0, -12.0, -14.0,  // 0xC8
    -16.0, -20.0, -24.0, -28.0,  // 0xCC
    -32.0, -40.0, -48.0, -56.0,  // 0xD0
    -64.0, -80.0, -96.0, -112.0,  // 0xD4
    -128.0, -160.0, -192.0, -224.0,  // 0xD8
    -256.0, -320.0, -384.0, -448.0,  // 0xDC
    -512.0, -640.0, -768.0, -896.0,  // 0xE0
    -1024.0, -1280.0, -1536.0, -1792.0,  // 0xE4
    -2048.0, -2560.0, -3072.0, -3584.0,  // 0xE8
    -4096.0, -5120.0, -6144.0, -7168.0,  // 0xEC
    -8192.0, -10240.0, -12288.0, -14336.0,  // 0xF0
    -16384.0, -20480.0, -24576.0, -28672.0,  // 0xF4
    -32768.0, -40960.0, -49152.0, -57344.0,  // 0xF8
    -kInf, kNaN, kNaN, kNaN,  // 0xFC
};

// ---- fp8 ---------------------------------------------------------------------------------------------------

struct Fp8Format {
  const char* name;
  const std::array<double, 256>& table;
  std::uint8_t (*encode)(float);
  float (*decode)(std::uint8_t);
};

const Fp8Format kE4m3{"e4m3", kE4m3Table, fp32_to_fp8_e4m3, fp8_e4m3_to_fp32};
const Fp8Format kE5m2{"e5m2", kE5m2Table, fp32_to_fp8_e5m2, fp8_e5m2_to_fp32};

void expect_every_code_decodes_to_the_table(const Fp8Format& format) {
  for (int code = 0; code < 256; ++code) {
    const double expected = format.table[code];
    const float got = format.decode(static_cast<std::uint8_t>(code));
    SCOPED_TRACE(std::string(format.name) + " code " + std::to_string(code));
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(got)) << got;
    } else {
      EXPECT_EQ(static_cast<double>(got), expected);
      EXPECT_EQ(std::signbit(got), std::signbit(expected));  // -0 for code 0x80
    }
  }
}

TEST(Fp8E4m3, EveryCodeDecodesToTheSpecValue) { expect_every_code_decodes_to_the_table(kE4m3); }
TEST(Fp8E5m2, EveryCodeDecodesToTheSpecValue) { expect_every_code_decodes_to_the_table(kE5m2); }

// For every pair of neighbouring positive finite values (lo, hi): lo itself, the float just below the midpoint,
// the midpoint and the float just above it, on both signs. The midpoint is an exact fp32 (one bit more than
// the fp8 mantissa), and a tie goes to the even code.
void expect_round_to_nearest_even(const Fp8Format& format) {
  std::vector<int> codes;  // positive finite codes, increasing in value
  for (int code = 0; code < 128; ++code) {
    if (std::isfinite(format.table[code])) codes.push_back(code);
  }
  for (std::size_t i = 0; i + 1 < codes.size(); ++i) {
    const int lo_code = codes[i], hi_code = codes[i + 1];
    const double lo = format.table[lo_code], hi = format.table[hi_code];
    ASSERT_LT(lo, hi);
    const double mid = (lo + hi) / 2;
    const auto mid_f = static_cast<float>(mid);
    ASSERT_EQ(static_cast<double>(mid_f), mid);
    const int even_code = lo_code % 2 == 0 ? lo_code : hi_code;
    const float below = std::nextafter(mid_f, 0.0f);
    const float above = std::nextafter(mid_f, std::numeric_limits<float>::infinity());
    SCOPED_TRACE(std::string(format.name) + " between " + std::to_string(lo) + " and " + std::to_string(hi));
    for (const int sign : {0, 0x80}) {
      const float s = sign != 0 ? -1.0f : 1.0f;
      EXPECT_EQ(format.encode(s * static_cast<float>(lo)), lo_code | sign);
      EXPECT_EQ(format.encode(s * below), lo_code | sign);
      EXPECT_EQ(format.encode(s * mid_f), even_code | sign);
      EXPECT_EQ(format.encode(s * above), hi_code | sign);
    }
  }
}

TEST(Fp8E4m3, EncodingRoundsToNearestEvenBetweenEveryNeighbourPair) { expect_round_to_nearest_even(kE4m3); }
TEST(Fp8E5m2, EncodingRoundsToNearestEvenBetweenEveryNeighbourPair) { expect_round_to_nearest_even(kE5m2); }

void expect_round_trip(const Fp8Format& format) {
  for (int code = 0; code < 256; ++code) {
    if (std::isnan(format.table[code])) continue;
    EXPECT_EQ(format.encode(format.decode(static_cast<std::uint8_t>(code))), code) << format.name << " " << code;
  }
}

TEST(Fp8E4m3, EveryNonNanCodeRoundTrips) { expect_round_trip(kE4m3); }
TEST(Fp8E5m2, EveryNonNanCodeRoundTrips) { expect_round_trip(kE5m2); }

TEST(Fp8E4m3, SaturatesAtAndBeyond448) {
  const float inf = std::numeric_limits<float>::infinity();
  for (const float v : {448.0f, 449.0f, 464.0f, 480.0f, 1e9f, 3.4e38f, inf}) {
    EXPECT_EQ(fp32_to_fp8_e4m3(v), 0x7E) << v;
    EXPECT_EQ(fp32_to_fp8_e4m3(-v), 0xFE) << -v;
  }
  EXPECT_EQ(fp8_e4m3_to_fp32(0x7E), 448.0f);
  EXPECT_EQ(round_to_dtype(-inf, DType::fp8_e4m3), -448.0f);
}

TEST(Fp8E5m2, SaturatesFiniteOverflowAndKeepsInfinity) {
  const float inf = std::numeric_limits<float>::infinity();
  // 61440 is the midpoint between 57344 and the (infinite) next step: IEEE would give inf, satfinite does not.
  for (const float v : {57344.0f, 57345.0f, 61440.0f, 61441.0f, 65536.0f, 1e9f, 3.4e38f}) {
    EXPECT_EQ(fp32_to_fp8_e5m2(v), 0x7B) << v;
    EXPECT_EQ(fp32_to_fp8_e5m2(-v), 0xFB) << -v;
  }
  EXPECT_EQ(fp32_to_fp8_e5m2(inf), 0x7C);
  EXPECT_EQ(fp32_to_fp8_e5m2(-inf), 0xFC);
  EXPECT_EQ(fp8_e5m2_to_fp32(0x7C), inf);
  EXPECT_EQ(fp8_e5m2_to_fp32(0xFC), -inf);
}

TEST(Fp8, NanMapsToTheAllOnesCode) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float signalling = std::numeric_limits<float>::signaling_NaN();
  const float payload = std::bit_cast<float>(0x7F800001u);  // NaN whose payload sits in the lowest bit only
  for (const float v : {nan, signalling, payload}) {
    EXPECT_EQ(fp32_to_fp8_e4m3(v), 0x7F);
    EXPECT_EQ(fp32_to_fp8_e4m3(-v), 0xFF);
    EXPECT_EQ(fp32_to_fp8_e5m2(v), 0x7F);
    EXPECT_EQ(fp32_to_fp8_e5m2(-v), 0xFF);
  }
  EXPECT_TRUE(std::isnan(round_to_dtype(nan, DType::fp8_e4m3)));
  EXPECT_TRUE(std::isnan(round_to_dtype(nan, DType::fp8_e5m2)));
}

TEST(Fp8, SignedZeroAndValuesBelowHalfTheSmallestSubnormal) {
  EXPECT_EQ(fp32_to_fp8_e4m3(0.0f), 0x00);
  EXPECT_EQ(fp32_to_fp8_e4m3(-0.0f), 0x80);
  EXPECT_EQ(fp32_to_fp8_e5m2(0.0f), 0x00);
  EXPECT_EQ(fp32_to_fp8_e5m2(-0.0f), 0x80);
  EXPECT_TRUE(std::signbit(fp8_e4m3_to_fp32(0x80)));
  EXPECT_TRUE(std::signbit(fp8_e5m2_to_fp32(0x80)));
  const float fp32_min_subnormal = std::numeric_limits<float>::denorm_min();
  const float fp32_min_normal = std::numeric_limits<float>::min();
  for (const float v : {fp32_min_subnormal, fp32_min_normal, 1e-30f}) {
    EXPECT_EQ(fp32_to_fp8_e5m2(v), 0x00) << v;
    EXPECT_EQ(fp32_to_fp8_e5m2(-v), 0x80) << v;
    EXPECT_EQ(fp32_to_fp8_e4m3(v), 0x00) << v;
    EXPECT_EQ(fp32_to_fp8_e4m3(-v), 0x80) << v;
  }
  // Half the smallest subnormal is a tie with zero, which is even.
  EXPECT_EQ(fp32_to_fp8_e4m3(0x1p-10f), 0x00);
  EXPECT_EQ(fp32_to_fp8_e4m3(-0x1p-10f), 0x80);
  EXPECT_EQ(fp32_to_fp8_e5m2(0x1p-17f), 0x00);
  EXPECT_EQ(fp32_to_fp8_e5m2(-0x1p-17f), 0x80);
  // Smallest subnormals and the subnormal/normal boundary.
  EXPECT_EQ(fp32_to_fp8_e4m3(0x1p-9f), 0x01);
  EXPECT_EQ(fp32_to_fp8_e4m3(std::nextafter(0x1p-10f, 1.0f)), 0x01);
  EXPECT_EQ(fp32_to_fp8_e4m3(0x1.cp-7f), 0x07);  // largest subnormal 7/8 * 2^-6
  EXPECT_EQ(fp32_to_fp8_e4m3(0x1.ep-7f), 0x08);  // tie between 0x07 and 0x08 goes to the even one
  EXPECT_EQ(fp32_to_fp8_e5m2(0x1p-16f), 0x01);
  EXPECT_EQ(fp32_to_fp8_e5m2(0x1.8p-16f), 0x02);  // 1.5 * 2^-16: tie between 0x01 and 0x02
  EXPECT_EQ(fp32_to_fp8_e5m2(0x1.2p-14f), 0x04);  // 1.125 * 2^-14: tie between 0x04 and 0x05 goes down
  EXPECT_EQ(fp32_to_fp8_e5m2(0x1.cp-15f), 0x04);  // 0.875 * 2^-14: tie between 0x03 and 0x04 goes up
}

// ---- fp16 ------------------------------------------------------------------------------------------------

// An fp16 code's value from its fields, by the IEEE 754 binary16 definition.
double fp16_reference_value(std::uint16_t code) {
  const int sign = code >> 15, exponent = (code >> 10) & 0x1F, mantissa = code & 0x3FF;
  double magnitude;
  if (exponent == 0x1F) {
    magnitude = mantissa == 0 ? kInf : kNaN;
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<double>(mantissa), -24);
  } else {
    magnitude = std::ldexp(static_cast<double>(mantissa + 1024), exponent - 25);
  }
  return sign != 0 ? -magnitude : magnitude;
}

bool fp16_is_nan(std::uint16_t code) { return (code & 0x7C00) == 0x7C00 && (code & 0x3FF) != 0; }

TEST(Fp16, EveryCodeDecodesToItsFieldValue) {
  for (int code = 0; code < 65536; ++code) {
    const double expected = fp16_reference_value(static_cast<std::uint16_t>(code));
    const float got = fp16_bits_to_fp32(static_cast<std::uint16_t>(code));
    if (std::isnan(expected)) {
      ASSERT_TRUE(std::isnan(got)) << code;
    } else {
      ASSERT_EQ(static_cast<double>(got), expected) << code;
      ASSERT_EQ(std::signbit(got), std::signbit(expected)) << code;
    }
  }
}

TEST(Fp16, EdgeCases) {
  EXPECT_EQ(fp32_to_fp16_bits(65504.0f), 0x7BFF);
  EXPECT_EQ(fp32_to_fp16_bits(65519.99f), 0x7BFF);
  EXPECT_EQ(fp32_to_fp16_bits(65520.0f), 0x7C00);  // max + half an ulp: the tie goes to the even code, infinity
  EXPECT_EQ(fp32_to_fp16_bits(-65520.0f), 0xFC00);
  EXPECT_EQ(fp32_to_fp16_bits(65600.0f), 0x7C00);  // 1025 * 2^6 would be code 0x7C01, a NaN, without the clamp
  EXPECT_EQ(fp32_to_fp16_bits(1e9f), 0x7C00);
  EXPECT_EQ(fp32_to_fp16_bits(std::numeric_limits<float>::infinity()), 0x7C00);
  EXPECT_EQ(fp32_to_fp16_bits(-std::numeric_limits<float>::infinity()), 0xFC00);
  EXPECT_EQ(fp32_to_fp16_bits(1.0f), 0x3C00);
  EXPECT_EQ(fp32_to_fp16_bits(1.0f + 0x1p-11f), 0x3C00);    // tie, down to even
  EXPECT_EQ(fp32_to_fp16_bits(1.0f + 0x1.8p-10f), 0x3C02);  // tie, up to even
  EXPECT_EQ(fp32_to_fp16_bits(-0.0f), 0x8000);
  // Subnormals: the smallest is 2^-24.
  EXPECT_EQ(fp32_to_fp16_bits(0x1p-24f), 0x0001);
  EXPECT_EQ(fp32_to_fp16_bits(0x1p-25f), 0x0000);    // tie with 0
  EXPECT_EQ(fp32_to_fp16_bits(-0x1p-25f), 0x8000);
  EXPECT_EQ(fp32_to_fp16_bits(std::nextafter(0x1p-25f, 1.0f)), 0x0001);
  EXPECT_EQ(fp32_to_fp16_bits(0x1.8p-24f), 0x0002);  // tie between 1 and 2
  EXPECT_EQ(fp32_to_fp16_bits(0x1.4p-23f), 0x0002);  // 2.5 * 2^-24: tie between 2 and 3
  EXPECT_EQ(fp32_to_fp16_bits(0x1.ffcp-15f), 0x0400);  // 1023.5 * 2^-24: largest subnormal rounds up to min normal
  EXPECT_EQ(fp32_to_fp16_bits(std::numeric_limits<float>::denorm_min()), 0x0000);
  // NaN stays NaN, with its sign.
  EXPECT_TRUE(fp16_is_nan(fp32_to_fp16_bits(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_TRUE(fp16_is_nan(fp32_to_fp16_bits(std::bit_cast<float>(0x7F800001u))));
  EXPECT_EQ(fp32_to_fp16_bits(std::bit_cast<float>(0xFF800001u)) & 0x8000, 0x8000);
  EXPECT_TRUE(std::isnan(fp16_bits_to_fp32(fp32_to_fp16_bits(std::numeric_limits<float>::quiet_NaN()))));
}

#if defined(__FLT16_MAX__)
// The compiler's own conversion (F16C or libgcc's soft-float, both IEEE round to nearest even).
std::uint16_t compiler_fp16_bits(float value) { return std::bit_cast<std::uint16_t>(static_cast<_Float16>(value)); }

void expect_matches_compiler(float value) {
  const std::uint16_t got = fp32_to_fp16_bits(value);
  const std::uint16_t expected = compiler_fp16_bits(value);
  if (std::isnan(value)) {
    ASSERT_TRUE(fp16_is_nan(got)) << std::hex << std::bit_cast<std::uint32_t>(value);
    ASSERT_EQ(got & 0x8000, expected & 0x8000);
  } else {
    ASSERT_EQ(got, expected) << std::hexfloat << value;
  }
}
#endif

TEST(Fp16, EncodingMatchesTheCompilerOnRandomFloats) {
#if defined(__FLT16_MAX__)
  std::mt19937 rng(20240601u);
  std::uniform_int_distribution<std::uint32_t> bits;
  std::uniform_int_distribution<std::uint32_t> fp16_exponents(127 - 27, 127 + 16);  // around fp16's range
  for (int i = 0; i < 1'000'000; ++i) {
    expect_matches_compiler(std::bit_cast<float>(bits(rng)));
    // Same sign and mantissa, exponent where fp16 has normals, subnormals, ties and overflow.
    const std::uint32_t r = bits(rng);
    expect_matches_compiler(std::bit_cast<float>((r & 0x807FFFFFu) | (fp16_exponents(rng) << 23)));
  }
#else
  GTEST_SKIP() << "this compiler has no _Float16 to compare with";
#endif
}

TEST(Fp16, NeighbourMidpointsRoundToNearestEven) {
  // Every pair of neighbouring finite fp16 values, at the value, the midpoint and the floats next to it.
  for (std::uint16_t lo_code = 0; lo_code < 0x7BFF; ++lo_code) {
    const std::uint16_t hi_code = lo_code + 1;
    const double lo = fp16_reference_value(lo_code), hi = fp16_reference_value(hi_code);
    const auto mid = static_cast<float>((lo + hi) / 2);
    ASSERT_EQ(static_cast<double>(mid), (lo + hi) / 2);
    const std::uint16_t even_code = lo_code % 2 == 0 ? lo_code : hi_code;
    ASSERT_EQ(fp32_to_fp16_bits(static_cast<float>(lo)), lo_code);
    ASSERT_EQ(fp32_to_fp16_bits(std::nextafter(mid, 0.0f)), lo_code) << lo;
    ASSERT_EQ(fp32_to_fp16_bits(mid), even_code) << lo;
    ASSERT_EQ(fp32_to_fp16_bits(-mid), even_code | 0x8000) << lo;
    ASSERT_EQ(fp32_to_fp16_bits(std::nextafter(mid, 1e30f)), hi_code) << lo;
  }
}

// ---- bf16 ------------------------------------------------------------------------------------------------

// A bf16 code's value from its fields (1 sign, 8 exponent bits with bias 127, 7 mantissa bits). With
// `unbounded_exponent` the all-ones exponent is read as an ordinary binade (0x7F80 -> 2^128), which is where
// IEEE rounding places the overflow threshold.
double bf16_reference_value(std::uint16_t code, bool unbounded_exponent = false) {
  const int sign = code >> 15, exponent = (code >> 7) & 0xFF, mantissa = code & 0x7F;
  double magnitude;
  if (exponent == 0xFF && !unbounded_exponent) {
    magnitude = mantissa == 0 ? kInf : kNaN;
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<double>(mantissa), -126 - 7);
  } else {
    magnitude = std::ldexp(static_cast<double>(mantissa + 128), exponent - 127 - 7);
  }
  return sign != 0 ? -magnitude : magnitude;
}

// Reference encoder for finite x: the nearer of the two bf16 values around |x| (measured exactly in double),
// ties to the even code.
std::uint16_t bf16_reference_encode(float x) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(x);
  const auto sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  const double magnitude = std::fabs(static_cast<double>(x));
  // The bf16 value at or below |x| (bf16 is fp32 with 16 fewer mantissa bits) and the next one above it.
  const auto lo_code = static_cast<std::uint16_t>((bits >> 16) & 0x7FFFu);
  const auto hi_code = static_cast<std::uint16_t>(lo_code + 1);
  const double lo = bf16_reference_value(lo_code, true), hi = bf16_reference_value(hi_code, true);
  EXPECT_LE(lo, magnitude);
  if (magnitude == lo) return sign | lo_code;
  EXPECT_LT(magnitude, hi);
  const double below = magnitude - lo, above = hi - magnitude;
  if (below < above) return sign | lo_code;
  if (above < below) return sign | hi_code;
  return sign | (lo_code % 2 == 0 ? lo_code : hi_code);
}

TEST(Bf16, EveryCodeDecodesToItsFieldValue) {
  for (int code = 0; code < 65536; ++code) {
    const double expected = bf16_reference_value(static_cast<std::uint16_t>(code));
    const float got = bf16_bits_to_fp32(static_cast<std::uint16_t>(code));
    if (std::isnan(expected)) {
      ASSERT_TRUE(std::isnan(got)) << code;
    } else {
      ASSERT_EQ(static_cast<double>(got), expected) << code;
      ASSERT_EQ(std::signbit(got), std::signbit(expected)) << code;
    }
  }
}

TEST(Bf16, EncodingMatchesTheReferenceOnRandomFloatsAndTies) {
  std::mt19937 rng(7u);
  std::uniform_int_distribution<std::uint32_t> bits;
  int nan_count = 0;
  for (int i = 0; i < 1'000'000; ++i) {
    const std::uint32_t r = bits(rng);
    // A random float, then the same high half with the low half at the tie and one unit either side of it.
    for (const std::uint32_t pattern : {r, (r & 0xFFFF0000u) | 0x8000u, (r & 0xFFFF0000u) | 0x7FFFu,
                                        (r & 0xFFFF0000u) | 0x8001u}) {
      const float x = std::bit_cast<float>(pattern);
      const std::uint16_t got = fp32_to_bf16_bits(x);
      if (std::isnan(x)) {
        ++nan_count;
        ASSERT_TRUE(std::isnan(bf16_bits_to_fp32(got))) << std::hex << pattern;
        ASSERT_EQ(got & 0x8000, (pattern >> 16) & 0x8000);
      } else if (std::isinf(x)) {
        ASSERT_EQ(got, pattern >> 16);
      } else {
        ASSERT_EQ(got, bf16_reference_encode(x)) << std::hex << pattern;
      }
    }
  }
  EXPECT_GT(nan_count, 0);  // the random patterns did reach the NaN branch
}

TEST(Bf16, EdgeCases) {
  EXPECT_EQ(fp32_to_bf16_bits(1.0f), 0x3F80);
  EXPECT_EQ(fp32_to_bf16_bits(std::bit_cast<float>(0x3F808000u)), 0x3F80);  // tie, down to even
  EXPECT_EQ(fp32_to_bf16_bits(std::bit_cast<float>(0x3F818000u)), 0x3F82);  // tie, up to even
  EXPECT_EQ(fp32_to_bf16_bits(std::numeric_limits<float>::max()), 0x7F80);  // rounds past the largest bf16
  EXPECT_EQ(fp32_to_bf16_bits(std::bit_cast<float>(0x7F7F7FFFu)), 0x7F7F);
  EXPECT_EQ(fp32_to_bf16_bits(-0.0f), 0x8000);
  EXPECT_EQ(fp32_to_bf16_bits(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(fp32_to_bf16_bits(std::bit_cast<float>(0x00008001u)), 0x0001);  // fp32 subnormal rounding up
  EXPECT_EQ(fp32_to_bf16_bits(std::bit_cast<float>(0x007FFFFFu)), 0x0080);  // into the smallest normal
  // A NaN whose payload lies only in the bits bf16 drops is still a NaN.
  for (const std::uint32_t nan : {0x7F800001u, 0xFF800001u, 0x7FC00000u, 0x7F80FFFFu}) {
    const std::uint16_t code = fp32_to_bf16_bits(std::bit_cast<float>(nan));
    EXPECT_TRUE(std::isnan(bf16_bits_to_fp32(code))) << std::hex << nan;
    EXPECT_EQ(code & 0x8000, (nan >> 16) & 0x8000);
  }
}

// ---- integer formats -------------------------------------------------------------------------------------

TEST(Int8, RoundsHalfToEvenAndClamps) {
  EXPECT_EQ(quantize_int8(2.5f, 1.0f), 2);
  EXPECT_EQ(quantize_int8(3.5f, 1.0f), 4);
  EXPECT_EQ(quantize_int8(-2.5f, 1.0f), -2);
  EXPECT_EQ(quantize_int8(-3.5f, 1.0f), -4);
  EXPECT_EQ(quantize_int8(0.5f, 1.0f), 0);
  EXPECT_EQ(quantize_int8(1.5f, 1.0f), 2);
  EXPECT_EQ(quantize_int8(2.4999998f, 1.0f), 2);
  EXPECT_EQ(quantize_int8(2.5000002f, 1.0f), 3);
  EXPECT_EQ(quantize_int8(5.0f, 2.0f), 2);  // 2.5
  EXPECT_EQ(quantize_int8(7.0f, 2.0f), 4);  // 3.5
  EXPECT_EQ(quantize_int8(-0.3f, 0.1f), -3);
  EXPECT_EQ(quantize_int8(126.5f, 1.0f), 126);
  EXPECT_EQ(quantize_int8(127.5f, 1.0f), 127);  // would round to 128; clamped
  EXPECT_EQ(quantize_int8(1000.0f, 1.0f), 127);
  EXPECT_EQ(quantize_int8(-1000.0f, 1.0f), -127);
  EXPECT_EQ(quantize_int8(3e38f, 1e-30f), 127);  // the quotient overflows to infinity
  EXPECT_EQ(quantize_int8(std::numeric_limits<float>::infinity(), 1.0f), 127);
  EXPECT_EQ(quantize_int8(-std::numeric_limits<float>::infinity(), 1.0f), -127);
  EXPECT_EQ(quantize_int8(std::numeric_limits<float>::quiet_NaN(), 1.0f), 0);
  EXPECT_EQ(quantize_int8(-0.0f, 1.0f), 0);
}

TEST(Int4, RoundsHalfToEvenAndClamps) {
  EXPECT_EQ(quantize_int4(2.5f, 1.0f), 2);
  EXPECT_EQ(quantize_int4(3.5f, 1.0f), 4);
  EXPECT_EQ(quantize_int4(-3.5f, 1.0f), -4);
  EXPECT_EQ(quantize_int4(6.5f, 1.0f), 6);
  EXPECT_EQ(quantize_int4(7.4f, 1.0f), 7);
  EXPECT_EQ(quantize_int4(7.5f, 1.0f), 7);
  EXPECT_EQ(quantize_int4(100.0f, 1.0f), 7);
  EXPECT_EQ(quantize_int4(-100.0f, 1.0f), -7);  // symmetric: -8 is never produced
  EXPECT_EQ(quantize_int4(1.0f, 0.25f), 4);
  EXPECT_EQ(quantize_int4(std::numeric_limits<float>::quiet_NaN(), 0.5f), 0);
}

TEST(IntQuantisation, BadScaleThrowsNamingScale) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  for (const float scale : {0.0f, -0.0f, -1.0f, nan, inf, -inf}) {
    const std::string int8_message = message_of([&] { quantize_int8(1.0f, scale); });
    EXPECT_NE(int8_message.find("quantize_int8"), std::string::npos) << int8_message;
    EXPECT_NE(int8_message.find("'scale'"), std::string::npos) << int8_message;
    const std::string int4_message = message_of([&] { quantize_int4(1.0f, scale); });
    EXPECT_NE(int4_message.find("quantize_int4"), std::string::npos) << int4_message;
    EXPECT_NE(int4_message.find("'scale'"), std::string::npos) << int4_message;
    const std::string round_message = message_of([&] { round_to_dtype(1.0f, DType::int8, scale); });
    EXPECT_NE(round_message.find("round_to_dtype"), std::string::npos) << round_message;
    EXPECT_NE(round_message.find("'scale'"), std::string::npos) << round_message;
  }
  EXPECT_NE(message_of([] { quantize_int8(1.0f, -2.0f); }).find("got -2"), std::string::npos);
}

TEST(Int4, PackAndUnpackEveryNibblePair) {
  for (int low = -8; low <= 7; ++low) {
    for (int high = -8; high <= 7; ++high) {
      const std::uint8_t byte = pack_int4(static_cast<std::int8_t>(low), static_cast<std::int8_t>(high));
      EXPECT_EQ(byte & 0x0F, low & 0x0F);  // low index in the low nibble, two's complement
      EXPECT_EQ(byte >> 4, high & 0x0F);
      EXPECT_EQ(unpack_int4(byte, 0), low);
      EXPECT_EQ(unpack_int4(byte, 1), high);
    }
  }
  for (int byte = 0; byte < 256; ++byte) {
    const auto b = static_cast<std::uint8_t>(byte);
    EXPECT_EQ(pack_int4(unpack_int4(b, 0), unpack_int4(b, 1)), b);
  }
  EXPECT_EQ(pack_int4(-1, 0), 0x0F);
  EXPECT_EQ(pack_int4(0, -8), 0x80);
  EXPECT_EQ(pack_int4(7, -7), 0x97);
}

TEST(Int4, OutOfRangeCodesThrowNamingTheArgument) {
  const std::string low = message_of([] { pack_int4(8, 0); });
  EXPECT_NE(low.find("'low'"), std::string::npos) << low;
  EXPECT_NE(low.find("got 8"), std::string::npos) << low;
  const std::string high = message_of([] { pack_int4(0, -9); });
  EXPECT_NE(high.find("'high'"), std::string::npos) << high;
  EXPECT_NE(high.find("got -9"), std::string::npos) << high;
  const std::string which = message_of([] { unpack_int4(0x12, 2); });
  EXPECT_NE(which.find("'which'"), std::string::npos) << which;
}

TEST(RoundToDtype, EachFormat) {
  EXPECT_EQ(round_to_dtype(0.1f, DType::fp32), 0.1f);
  EXPECT_EQ(round_to_dtype(0.1f, DType::fp64), 0.1f);
  EXPECT_EQ(round_to_dtype(1.0f + 0x1p-11f, DType::fp16), 1.0f);
  EXPECT_EQ(round_to_dtype(70000.0f, DType::fp16), std::numeric_limits<float>::infinity());
  EXPECT_EQ(round_to_dtype(1.0f + 0x1p-8f, DType::bf16), 1.0f);
  EXPECT_EQ(round_to_dtype(1.0f + 0x1.8p-7f, DType::bf16), 1.0f + 0x1p-6f);
  EXPECT_EQ(round_to_dtype(449.0f, DType::fp8_e4m3), 448.0f);
  EXPECT_EQ(round_to_dtype(17.0f, DType::fp8_e4m3), 16.0f);  // tie between 16 and 18
  EXPECT_EQ(round_to_dtype(1e9f, DType::fp8_e5m2), 57344.0f);
  EXPECT_EQ(round_to_dtype(1.3f, DType::int8, 0.5f), 1.5f);  // 2.6 -> 3
  EXPECT_EQ(round_to_dtype(1.25f, DType::int8, 0.5f), 1.0f);  // 2.5 -> 2
  EXPECT_EQ(round_to_dtype(100.0f, DType::int8, 0.5f), 63.5f);
  EXPECT_EQ(round_to_dtype(-100.0f, DType::int4, 0.5f), -3.5f);
  EXPECT_EQ(round_to_dtype(std::numeric_limits<float>::quiet_NaN(), DType::int4, 0.5f), 0.0f);
  EXPECT_EQ(round_to_dtype(2.5f, DType::int32), 2.0f);
  // The floating formats carry their own exponent; the scale only applies to the integer formats.
  EXPECT_EQ(round_to_dtype(3.0f, DType::fp8_e4m3, 7.0f), 3.0f);
}

// ---- names and sizes -------------------------------------------------------------------------------------

constexpr std::array<DType, 9> kAllDTypes = {DType::fp32, DType::fp16,  DType::bf16,  DType::fp8_e4m3, DType::fp8_e5m2,
                                             DType::int8, DType::int4, DType::int32, DType::fp64};

TEST(DTypeNames, EveryNameRoundTrips) {
  for (const DType d : kAllDTypes) EXPECT_EQ(parse_dtype(dtype_name(d)), d) << dtype_name(d);
  EXPECT_EQ(dtype_name(DType::fp8_e4m3), "fp8_e4m3");
  EXPECT_EQ(dtype_name(DType::int4), "int4");
  EXPECT_EQ(parse_dtype("e4m3"), DType::fp8_e4m3);
  EXPECT_EQ(parse_dtype("e5m2"), DType::fp8_e5m2);
  EXPECT_EQ(parse_dtype("float32"), DType::fp32);
  EXPECT_EQ(parse_dtype("float16"), DType::fp16);
  EXPECT_EQ(parse_dtype("bfloat16"), DType::bf16);
  EXPECT_EQ(parse_dtype("float64"), DType::fp64);
}

TEST(DTypeNames, UnknownNameThrowsListingTheAcceptedNames) {
  const std::string message = message_of([] { parse_dtype("fp12"); });
  EXPECT_NE(message.find("parse_dtype"), std::string::npos) << message;
  EXPECT_NE(message.find("'name'"), std::string::npos) << message;
  EXPECT_NE(message.find("\"fp12\""), std::string::npos) << message;
  for (const DType d : kAllDTypes) EXPECT_NE(message.find(dtype_name(d)), std::string::npos) << message;
  EXPECT_THROW(parse_dtype(""), Error);
  EXPECT_THROW(parse_dtype("FP32"), Error);
}

TEST(DTypeSizes, BitsBytesAndKinds) {
  EXPECT_EQ(dtype_bits(DType::fp32), 32);
  EXPECT_EQ(dtype_bits(DType::fp16), 16);
  EXPECT_EQ(dtype_bits(DType::bf16), 16);
  EXPECT_EQ(dtype_bits(DType::fp8_e4m3), 8);
  EXPECT_EQ(dtype_bits(DType::fp8_e5m2), 8);
  EXPECT_EQ(dtype_bits(DType::int8), 8);
  EXPECT_EQ(dtype_bits(DType::int4), 4);
  EXPECT_EQ(dtype_bits(DType::int32), 32);
  EXPECT_EQ(dtype_bits(DType::fp64), 64);
  EXPECT_EQ(dtype_bytes(DType::fp16, 3), 6);
  EXPECT_EQ(dtype_bytes(DType::fp64, 3), 24);
  EXPECT_EQ(dtype_bytes(DType::fp8_e5m2, 5), 5);
  EXPECT_EQ(dtype_bytes(DType::int4, 0), 0);
  EXPECT_EQ(dtype_bytes(DType::int4, 7), 4);
  EXPECT_EQ(dtype_bytes(DType::int4, 8), 4);
  EXPECT_THROW(dtype_bytes(DType::fp32, -1), Error);
  for (const DType d : kAllDTypes) EXPECT_NE(is_floating(d), is_integer(d)) << dtype_name(d);
  EXPECT_TRUE(is_floating(DType::fp8_e4m3));
  EXPECT_TRUE(is_floating(DType::fp64));
  EXPECT_TRUE(is_integer(DType::int4));
  EXPECT_TRUE(is_integer(DType::int32));
  EXPECT_FALSE(is_integer(DType::bf16));
}

}  // namespace
}  // namespace keysel
