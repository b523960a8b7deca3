#include "keysel/indexer/quantization.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "keysel/core/error.h"
#include "keysel/indexer/hadamard.h"
#include "quantize_rows.h"

namespace keysel {

std::string_view scale_granularity_name(ScaleGranularity granularity) {
  switch (granularity) {
    case ScaleGranularity::per_token: return "per_token";
    case ScaleGranularity::per_group: return "per_group";
  }
  KEYSEL_CHECK_ARG(false, "granularity", "per_token or per_group", static_cast<int>(granularity));
  return {};
}

ScaleGranularity parse_scale_granularity(std::string_view name) {
  if (name == "per_token") return ScaleGranularity::per_token;
  if (name == "per_group") return ScaleGranularity::per_group;
  KEYSEL_CHECK_ARG(false, "name", "per_token or per_group", name);
  return ScaleGranularity::per_token;
}

void QuantizationConfig::validate(std::string_view function) const {
  const bool format_ok = format == DType::fp32 || format == DType::bf16 || format == DType::fp16 ||
                         format == DType::fp8_e4m3 || format == DType::fp8_e5m2 || format == DType::int8 ||
                         format == DType::int4;
  if (!format_ok) {
    detail::throw_argument_error(function, "config.format", "fp32, bf16, fp16, fp8_e4m3, fp8_e5m2, int8 or int4",
                                 format == DType::int32 || format == DType::fp64
                                     ? std::string(dtype_name(format))
                                     : std::to_string(static_cast<int>(format)));
  }
  if (granularity != ScaleGranularity::per_token && granularity != ScaleGranularity::per_group) {
    detail::throw_argument_error(function, "config.granularity", "per_token or per_group",
                                 std::to_string(static_cast<int>(granularity)));
  }
  if (granularity == ScaleGranularity::per_group && group_size != 32 && group_size != 64 && group_size != 128) {
    detail::throw_argument_error(function, "config.group_size", "32, 64 or 128 with per_group scales",
                                 std::to_string(group_size));
  }
}

std::string QuantizationConfig::str() const {
  std::string out(dtype_name(format));
  if (granularity == ScaleGranularity::per_group) out += "/g" + std::to_string(group_size);
  if (power_of_two_scales) out += "/ue8m0";
  if (hadamard) out += "/hadamard";
  return out;
}

float format_max(DType format) {
  switch (format) {
    case DType::fp16: return kFp16Max;
    case DType::fp8_e4m3: return kFp8E4m3Max;
    case DType::fp8_e5m2: return kFp8E5m2Max;
    case DType::int8: return static_cast<float>(kInt8Max);
    case DType::int4: return static_cast<float>(kInt4Max);
    default: return 1.0f;
  }
}

std::int64_t padded_dim(std::int64_t dim) { return (dim + 31) / 32 * 32; }

std::int64_t scale_groups(std::int64_t dim, const QuantizationConfig& config) {
  if (config.granularity == ScaleGranularity::per_token) return 1;
  return (dim + config.group_size - 1) / config.group_size;
}

std::int64_t group_channels(std::int64_t dim, const QuantizationConfig& config) {
  return config.granularity == ScaleGranularity::per_token ? padded_dim(dim) : config.group_size;
}

std::int64_t row_code_bytes(std::int64_t dim, const QuantizationConfig& config) {
  return dtype_bytes(config.format, padded_dim(dim));
}

float quantization_scale(float amax, const QuantizationConfig& config) {
  if (config.format == DType::fp32 || config.format == DType::bf16) return 1.0f;
  if (!(amax > 0.0f)) return 1.0f;  // all-zero row or group: every code is 0 whatever the scale
  float scale = std::max(amax / format_max(config.format), FLT_MIN);
  if (config.power_of_two_scales) {
    int exponent = 0;
    const float mantissa = std::frexp(scale, &exponent);  // scale = mantissa * 2^exponent, mantissa in [0.5, 1)
    scale = mantissa == 0.5f ? scale : std::ldexp(1.0f, exponent);
  }
  return scale;
}

namespace {

void encode_row(const float* x, std::int64_t padded, const float* scales, std::int64_t group,
                DType format, std::uint8_t* codes) {
  for (std::int64_t d = 0; d < padded; ++d) {
    const float scale = scales[d / group];
    const float value = x[d];
    switch (format) {
      case DType::fp32: std::memcpy(codes + 4 * d, &value, 4); break;
      case DType::bf16: {
        const std::uint16_t bits = fp32_to_bf16_bits(value);
        std::memcpy(codes + 2 * d, &bits, 2);
        break;
      }
      case DType::fp16: {
        const std::uint16_t bits = fp32_to_fp16_bits(value / scale);
        std::memcpy(codes + 2 * d, &bits, 2);
        break;
      }
      case DType::fp8_e4m3: codes[d] = fp32_to_fp8_e4m3(value / scale); break;
      case DType::fp8_e5m2: codes[d] = fp32_to_fp8_e5m2(value / scale); break;
      case DType::int8: codes[d] = static_cast<std::uint8_t>(quantize_int8(value, scale)); break;
      case DType::int4: {
        const std::int8_t code = quantize_int4(value, scale);
        const std::uint8_t nibble = static_cast<std::uint8_t>(code) & 0x0Fu;
        std::uint8_t& byte = codes[d / 2];
        byte = (d % 2 == 0) ? nibble : static_cast<std::uint8_t>(byte | (nibble << 4));
        break;
      }
      default: KEYSEL_ASSERT(false);
    }
  }
}

}  // namespace

void quantize_rows(std::string_view function, std::string_view argument, const float* x, std::int64_t rows,
                   std::int64_t dim, const QuantizationConfig& config, std::uint8_t* codes, float* scales) {
  config.validate(function);
  KEYSEL_CHECK_ARG(dim >= 1, "dim", ">= 1", dim);
  KEYSEL_CHECK_ARG(rows >= 0, "rows", ">= 0", rows);
  if (rows == 0) return;
  KEYSEL_CHECK_ARG(x != nullptr, argument, "a non-null pointer", "nullptr");
  for (std::int64_t i = 0; i < rows * dim; ++i) {
    if (!std::isfinite(x[i])) {
      detail::throw_argument_error(function, argument, "finite values",
                                   std::to_string(x[i]) + " at row " + std::to_string(i / dim) + ", channel " +
                                       std::to_string(i % dim));
    }
  }
  const std::int64_t padded = padded_dim(dim);
  const std::int64_t groups = scale_groups(dim, config);
  const std::int64_t group = group_channels(dim, config);
  const std::int64_t row_bytes = row_code_bytes(dim, config);
  bool overflow = false;
#pragma omp parallel if (rows * dim > 65536) reduction(||: overflow)
  {
    std::vector<float> row(static_cast<std::size_t>(padded));
#pragma omp for schedule(static)
    for (std::int64_t r = 0; r < rows; ++r) {
      std::fill(row.begin(), row.end(), 0.0f);
      std::copy(x + r * dim, x + (r + 1) * dim, row.begin());
      if (config.hadamard) hadamard_rotate(row.data(), dim);
      float* row_scales = scales + r * groups;
      for (std::int64_t g = 0; g < groups; ++g) {
        float amax = 0.0f;
        for (std::int64_t d = g * group; d < std::min((g + 1) * group, padded); ++d) {
          amax = std::max(amax, std::fabs(row[static_cast<std::size_t>(d)]));
        }
        // Finite inputs can still rotate or square into infinity near FLT_MAX.
        if (!std::isfinite(amax)) overflow = true;
        row_scales[g] = quantization_scale(amax, config);
      }
      encode_row(row.data(), padded, row_scales, group, config.format, codes + r * row_bytes);
    }
  }
  KEYSEL_CHECK(!overflow, "argument '" << argument << "': values overflow fp32 after the Hadamard rotation");
}

void decode_codes(const std::uint8_t* codes, DType format, std::int64_t padded_channels, float* out) {
  for (std::int64_t d = 0; d < padded_channels; ++d) {
    switch (format) {
      case DType::fp32: std::memcpy(out + d, codes + 4 * d, 4); break;
      case DType::bf16:
      case DType::fp16: {
        std::uint16_t bits = 0;
        std::memcpy(&bits, codes + 2 * d, 2);
        out[d] = format == DType::bf16 ? bf16_bits_to_fp32(bits) : fp16_bits_to_fp32(bits);
        break;
      }
      case DType::fp8_e4m3: out[d] = fp8_e4m3_to_fp32(codes[d]); break;
      case DType::fp8_e5m2: out[d] = fp8_e5m2_to_fp32(codes[d]); break;
      case DType::int8: out[d] = static_cast<float>(static_cast<std::int8_t>(codes[d])); break;
      case DType::int4: out[d] = static_cast<float>(unpack_int4(codes[d / 2], static_cast<int>(d % 2))); break;
      default: KEYSEL_ASSERT(false);
    }
  }
}

void dequantize_row(const std::uint8_t* codes, const float* scales, std::int64_t dim,
                    const QuantizationConfig& config, float* out) {
  const std::int64_t padded = padded_dim(dim);
  const std::int64_t group = group_channels(dim, config);
  std::vector<float> values(static_cast<std::size_t>(padded));
  decode_codes(codes, config.format, padded, values.data());
  for (std::int64_t d = 0; d < dim; ++d) out[d] = values[static_cast<std::size_t>(d)] * scales[d / group];
}

}  // namespace keysel
