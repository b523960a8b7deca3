// Low-precision storage of indexer (and proxy) vectors: format, scales, rotation (SPEC §3).
//
// A row of `dim` channels (one key, or one query head) is stored as
//   codes   padded_dim(dim) channels in `format` (dim rounded up to a multiple of 32, zero channels appended,
//           so every kernel works in whole 32-channel blocks); int4 packs two codes per byte, low nibble first
//   scales  scale_groups(dim, config) fp32 scales: one per row (per_token) or one per group of `group_size`
//           consecutive channels (per_group; the last group may be shorter)
// The stored value of channel d is decode(code[d]) * scale[group of d]. Conversions are the ones of
// keysel/core/dtype.h (round to nearest even; fp8 saturating; integers symmetric).
//
// Scale of a row or group with largest magnitude amax:
//   fp16, fp8_e4m3, fp8_e5m2, int8, int4:  amax / format_max(format)   (448, 57344, 65504, 127, 7)
//   fp32, bf16:                           1 (they have fp32's range; scaling would only add a rounding)
// With power_of_two_scales ("ue8m0", as DeepSeek-V3.2 stores them) the scale is rounded up to the next power
// of two, so nothing saturates. An all-zero row or group gets scale 1 (all codes 0); a scale that would
// underflow is floored at FLT_MIN, so a scale is always finite and > 0.
//
// With `hadamard`, each row is first multiplied by an orthonormal Walsh-Hadamard matrix (see hadamard.h). The
// same rotation is applied to queries and keys, so exact dot products are unchanged, while outlier channels
// are spread over all channels and quantise with less error.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "keysel/core/dtype.h"

namespace keysel {

enum class ScaleGranularity : std::uint8_t {
  per_token,  // one scale per stored row: per token for keys, per token and head for queries
  per_group,  // one scale per group of group_size consecutive channels of a row
};

/// "per_token" or "per_group".
std::string_view scale_granularity_name(ScaleGranularity granularity);
/// Parses "per_token" / "per_group"; throws keysel::Error otherwise.
ScaleGranularity parse_scale_granularity(std::string_view name);

struct QuantizationConfig {
  DType format = DType::fp32;  // fp32, bf16, fp16, fp8_e4m3, fp8_e5m2, int8 or int4
  ScaleGranularity granularity = ScaleGranularity::per_token;
  std::int64_t group_size = 128;     // channels per scale with per_group: 32, 64 or 128
  bool power_of_two_scales = false;  // ue8m0: round each scale up to a power of two
  bool hadamard = false;             // rotate the channel axis before quantising

  /// Throws keysel::Error naming the field (format, group_size) when the configuration is not supported.
  void validate(std::string_view function) const;
  /// Short description: "fp8_e4m3", "int4/g32/ue8m0/hadamard", ...
  std::string str() const;
};

/// Largest magnitude a format's codes reach: 448, 57344, 65504, 127, 7; 1 for fp32 and bf16 (stored unscaled).
float format_max(DType format);
/// Channels stored per row: dim rounded up to a multiple of 32.
std::int64_t padded_dim(std::int64_t dim);
/// Scales per row: 1 (per_token) or ceil(dim / group_size) (per_group).
std::int64_t scale_groups(std::int64_t dim, const QuantizationConfig& config);
/// Channels covered by one scale group in the padded row (per_token: the whole padded row).
std::int64_t group_channels(std::int64_t dim, const QuantizationConfig& config);
/// Bytes of the codes of one row: dtype_bytes(format, padded_dim(dim)).
std::int64_t row_code_bytes(std::int64_t dim, const QuantizationConfig& config);
/// The scale for a row or group whose largest magnitude is `amax` (finite, >= 0); see above.
float quantization_scale(float amax, const QuantizationConfig& config);

/// Decodes one row's codes to their unscaled values (integer codes as exact floats).
///   codes: row_code_bytes(dim, config) bytes; out: fp32 [padded_dim(dim)]
void decode_codes(const std::uint8_t* codes, DType format, std::int64_t padded_channels, float* out);

/// The stored values of one row, in the rotated space when config.hadamard: code value * scale.
///   out: fp32 [dim]
void dequantize_row(const std::uint8_t* codes, const float* scales, std::int64_t dim,
                    const QuantizationConfig& config, float* out);

}  // namespace keysel
