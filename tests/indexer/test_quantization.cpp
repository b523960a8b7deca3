// Quantisation of indexer rows (formats, scales, ue8m0, groups, rotation), the Hadamard rotation, and the
// appendable key cache (SPEC §3, §6).
#include "keysel/indexer/quantization.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "keysel/core/random.h"
#include "keysel/indexer/hadamard.h"
#include "keysel/indexer/key_cache.h"
#include "quantize_rows.h"  // private (indexer/src)

namespace keysel {
namespace {

constexpr DType kFormats[] = {DType::fp32, DType::bf16, DType::fp16, DType::fp8_e4m3,
                              DType::fp8_e5m2, DType::int8, DType::int4};

/// Largest rounding error of one stored value whose unscaled magnitude is |v| (round to nearest even): half a
/// unit in the last place (u = 2^-(mantissa bits + 1) relative) or half the subnormal spacing; half a step for
/// the integer formats. Times the scale.
double element_error_bound(double value, DType format, double scale) {
  const double v = std::fabs(value) / scale;
  switch (format) {
    case DType::fp32: return 0.0;
    case DType::bf16: return scale * std::max(v * 0x1p-8, 0x1p-134);
    case DType::fp16: return scale * std::max(v * 0x1p-11, 0x1p-25);
    case DType::fp8_e4m3: return scale * std::max(v * 0x1p-4, 0x1p-10);
    case DType::fp8_e5m2: return scale * std::max(v * 0x1p-3, 0x1p-17);
    default: return scale * 0.5;
  }
}

std::vector<QuantizationConfig> configs_of(DType format) {
  std::vector<QuantizationConfig> out;
  out.push_back({format, ScaleGranularity::per_token, 128, false, false});
  out.push_back({format, ScaleGranularity::per_group, 32, false, false});
  out.push_back({format, ScaleGranularity::per_group, 64, true, false});
  out.push_back({format, ScaleGranularity::per_token, 128, true, true});
  out.push_back({format, ScaleGranularity::per_group, 128, false, true});
  return out;
}

std::vector<float> normal_values(std::int64_t count, std::uint64_t seed, double stddev = 1.0) {
  std::vector<float> x(static_cast<std::size_t>(count));
  RandomStream(seed).fill_normal(x, 0.0, stddev);
  return x;
}

TEST(QuantizationConfig, RejectsUnsupportedFormatAndGroupSize) {
  EXPECT_THROW((QuantizationConfig{DType::int32}).validate("test"), Error);
  EXPECT_THROW((QuantizationConfig{DType::fp64}).validate("test"), Error);
  EXPECT_THROW((QuantizationConfig{DType::int8, ScaleGranularity::per_group, 48}).validate("test"), Error);
  EXPECT_NO_THROW((QuantizationConfig{DType::int8, ScaleGranularity::per_group, 64}).validate("test"));
  try {
    (QuantizationConfig{DType::int8, ScaleGranularity::per_group, 16}).validate("test");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("group_size"), std::string::npos) << e.what();
  }
  EXPECT_EQ((QuantizationConfig{DType::int4, ScaleGranularity::per_group, 32, true, true}).str(),
            "int4/g32/ue8m0/hadamard");
}

TEST(Quantization, ScalesFollowTheFormatMaximum) {
  const QuantizationConfig e4m3{DType::fp8_e4m3};
  EXPECT_FLOAT_EQ(quantization_scale(448.0f * 3.0f, e4m3), 3.0f);
  EXPECT_FLOAT_EQ(quantization_scale(127.0f, {DType::int8}), 1.0f);
  EXPECT_FLOAT_EQ(quantization_scale(14.0f, {DType::int4}), 2.0f);
  EXPECT_FLOAT_EQ(quantization_scale(5.0f, {DType::fp32}), 1.0f);
  EXPECT_FLOAT_EQ(quantization_scale(5.0f, {DType::bf16}), 1.0f);
  // ue8m0 rounds up to a power of two, and keeps one.
  QuantizationConfig pow2{DType::int8};
  pow2.power_of_two_scales = true;
  EXPECT_FLOAT_EQ(quantization_scale(127.0f * 3.0f, pow2), 4.0f);
  EXPECT_FLOAT_EQ(quantization_scale(127.0f * 0.25f, pow2), 0.25f);
  // An all-zero row or group gets scale 1; a tiny one never a zero scale.
  EXPECT_FLOAT_EQ(quantization_scale(0.0f, e4m3), 1.0f);
  EXPECT_GT(quantization_scale(1e-45f, e4m3), 0.0f);
}

TEST(Quantization, RoundTripErrorWithinFormatBound) {
  for (const std::int64_t dim : {128, 100, 37}) {
    // Channels of very different magnitudes: outliers are what per-group scales and rotation are for.
    std::vector<float> x = normal_values(5 * dim, 7);
    for (std::int64_t r = 0; r < 5; ++r) x[static_cast<std::size_t>(r * dim + 3)] *= 40.0f;
    for (DType format : kFormats) {
      for (const QuantizationConfig& config : configs_of(format)) {
        SCOPED_TRACE(config.str() + " dim " + std::to_string(dim));
        const std::int64_t groups = scale_groups(dim, config);
        std::vector<std::uint8_t> codes(static_cast<std::size_t>(5 * row_code_bytes(dim, config)));
        std::vector<float> scales(static_cast<std::size_t>(5 * groups));
        quantize_rows("test", "x", x.data(), 5, dim, config, codes.data(), scales.data());
        for (std::int64_t r = 0; r < 5; ++r) {
          std::vector<float> rotated(x.begin() + r * dim, x.begin() + (r + 1) * dim), stored(static_cast<std::size_t>(dim));
          if (config.hadamard) hadamard_rotate(rotated.data(), dim);
          dequantize_row(codes.data() + r * row_code_bytes(dim, config), scales.data() + r * groups, dim, config,
                         stored.data());
          for (std::int64_t d = 0; d < dim; ++d) {
            const float scale = scales[static_cast<std::size_t>(r * groups + d / group_channels(dim, config))];
            ASSERT_TRUE(std::isfinite(scale) && scale > 0.0f);
            const double value = rotated[static_cast<std::size_t>(d)];
            // 1e-6 relative slack: the dequantised value is code * scale rounded to fp32.
            EXPECT_LE(std::fabs(stored[static_cast<std::size_t>(d)] - value),
                      element_error_bound(value, format, scale) * (1 + 1e-6) + 1e-6 * std::fabs(value))
                << "row " << r << " channel " << d;
          }
        }
      }
    }
  }
}

TEST(Quantization, AllZeroRowIsLegal) {
  const std::vector<float> zeros(64, 0.0f);
  for (DType format : kFormats) {
    const QuantizationConfig config{format, ScaleGranularity::per_group, 32};
    std::vector<std::uint8_t> codes(static_cast<std::size_t>(row_code_bytes(64, config)), 0xAB);
    std::vector<float> scales(2, -1.0f), stored(64, 1.0f);
    quantize_rows("test", "x", zeros.data(), 1, 64, config, codes.data(), scales.data());
    dequantize_row(codes.data(), scales.data(), 64, config, stored.data());
    EXPECT_EQ(scales[0], 1.0f);
    for (float v : stored) EXPECT_EQ(v, 0.0f);
  }
}

TEST(Quantization, RejectsNonFiniteValuesNamingTheArgument) {
  for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    std::vector<float> x = normal_values(64, 3);
    x[40] = bad;
    std::vector<std::uint8_t> codes(64, 0x5A);
    std::vector<float> scales(2, 7.0f);
    try {
      quantize_rows("test", "keys", x.data(), 2, 32, {DType::int8}, codes.data(), scales.data());
      FAIL() << "no throw";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("'keys'"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("row 1"), std::string::npos) << e.what();
    }
    for (std::uint8_t c : codes) EXPECT_EQ(c, 0x5A);  // nothing written
    EXPECT_EQ(scales[0], 7.0f);
  }
}

TEST(Hadamard, OrthonormalAndSelfInverse) {
  for (const std::int64_t n : {1, 2, 8, 96, 100, 128, 37}) {
    SCOPED_TRACE(n);
    const std::vector<double> x0 = [&] {
      std::vector<double> v(static_cast<std::size_t>(n));
      RandomStream(11).fill_normal(v);
      return v;
    }();
    std::vector<double> y0(x0.size());
    RandomStream(12).fill_normal(y0);
    std::vector<double> x = x0, y = y0;
    hadamard_rotate(x.data(), n);
    hadamard_rotate(y.data(), n);
    double dot0 = 0, dot = 0;
    for (std::size_t i = 0; i < x.size(); ++i) {
      dot0 += x0[i] * y0[i];
      dot += x[i] * y[i];
    }
    EXPECT_NEAR(dot, dot0, 1e-12 * n);
    hadamard_rotate(x.data(), n);
    for (std::size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(x[i], x0[i], 1e-12);
  }
  // Sylvester H_2 / sqrt(2) on a basis vector.
  float e[2] = {1.0f, 0.0f};
  hadamard_rotate(e, 2);
  EXPECT_FLOAT_EQ(e[0], std::sqrt(0.5f));
  EXPECT_FLOAT_EQ(e[1], std::sqrt(0.5f));
  EXPECT_THROW(hadamard_rotate(e, 0), Error);
}

TEST(KeyCache, AppendingInPiecesEqualsAppendingAtOnce) {
  const std::int64_t dim = 100, n = 23;
  const std::vector<float> keys = normal_values(n * dim, 5);
  for (DType format : kFormats) {
    for (const QuantizationConfig& config : configs_of(format)) {
      SCOPED_TRACE(config.str());
      IndexerKeyCache whole(dim, config), pieces(dim, config);
      whole.append(keys.data(), n);
      std::int64_t done = 0;
      for (const std::int64_t piece : {1, 1, 5, 0, 16}) {
        pieces.append(keys.data() + done * dim, piece);
        done += piece;
      }
      ASSERT_EQ(done, n);
      ASSERT_EQ(pieces.size(), n);
      EXPECT_EQ(std::memcmp(whole.codes(), pieces.codes(), static_cast<std::size_t>(n * whole.row_bytes())), 0);
      EXPECT_EQ(std::memcmp(whole.scales(), pieces.scales(), static_cast<std::size_t>(n * whole.groups() * 4)), 0);
    }
  }
}

TEST(KeyCache, ReportsBytesPerToken) {
  EXPECT_EQ(IndexerKeyCache(128, {DType::fp32}).bytes_per_token(), 516);
  EXPECT_EQ(IndexerKeyCache(128, {DType::bf16}).bytes_per_token(), 260);
  EXPECT_EQ(IndexerKeyCache(128, {DType::fp16}).bytes_per_token(), 260);
  EXPECT_EQ(IndexerKeyCache(128, {DType::fp8_e4m3}).bytes_per_token(), 132);
  EXPECT_EQ(IndexerKeyCache(128, {DType::int8}).bytes_per_token(), 132);
  EXPECT_EQ(IndexerKeyCache(128, {DType::int4}).bytes_per_token(), 68);
  EXPECT_EQ(IndexerKeyCache(128, {DType::int4, ScaleGranularity::per_group, 32}).bytes_per_token(), 64 + 16);
  // An awkward dim is stored padded to 32 channels.
  EXPECT_EQ(IndexerKeyCache(100, {DType::int8}).bytes_per_token(), 128 + 4);
}

TEST(KeyCache, RejectedAppendLeavesTheCacheUnchanged) {
  IndexerKeyCache cache(32, {DType::fp8_e4m3});
  const std::vector<float> good = normal_values(2 * 32, 1);
  cache.append(good.data(), 2);
  std::vector<float> bad = normal_values(3 * 32, 2);
  bad[70] = std::numeric_limits<float>::infinity();
  EXPECT_THROW(cache.append(bad.data(), 3), Error);
  EXPECT_EQ(cache.size(), 2);
  EXPECT_THROW(cache.append(nullptr, 1), Error);
  EXPECT_THROW(cache.append(good.data(), -1), Error);
  const std::vector<float> wrong(3 * 31, 0.0f);
  EXPECT_THROW(cache.append(TensorView(wrong.data(), DType::fp32, {3, 31})), Error);
  EXPECT_THROW(IndexerKeyCache(0, {DType::int8}), Error);
  EXPECT_THROW(cache.dequantize(2, bad.data()), Error);
  EXPECT_EQ(cache.size(), 2);
  cache.clear();
  EXPECT_EQ(cache.size(), 0);
}

TEST(KeyCache, RejectsKeysThatOverflowWhenRotated) {
  // Finite keys whose rotation overflows fp32 would give an infinite scale: rejected, cache unchanged.
  QuantizationConfig config{DType::fp8_e4m3};
  config.hadamard = true;
  IndexerKeyCache cache(64, config);
  std::vector<float> keys(64, 3e38f);
  try {
    cache.append(keys.data(), 1);
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("keys"), std::string::npos) << e.what();
  }
  EXPECT_EQ(cache.size(), 0);
  // Without rotation the same keys are fine: scale = 3e38 / 448.
  IndexerKeyCache plain(64, {DType::fp8_e4m3});
  plain.append(keys.data(), 1);
  EXPECT_TRUE(std::isfinite(plain.scales()[0]) && plain.scales()[0] > 0.0f);
}

TEST(KeyCache, AcceptsHalfPrecisionViews) {
  const std::vector<float> keys = normal_values(4 * 32, 9);
  std::vector<std::uint16_t> bf16(keys.size());
  std::vector<float> rounded(keys.size());
  for (std::size_t i = 0; i < keys.size(); ++i) {
    bf16[i] = fp32_to_bf16_bits(keys[i]);
    rounded[i] = bf16_bits_to_fp32(bf16[i]);
  }
  IndexerKeyCache a(32, {DType::int8}), b(32, {DType::int8});
  a.append(TensorView(bf16.data(), DType::bf16, {4, 32}));
  b.append(rounded.data(), 4);
  EXPECT_EQ(std::memcmp(a.codes(), b.codes(), static_cast<std::size_t>(4 * a.row_bytes())), 0);
}

}  // namespace
}  // namespace keysel
