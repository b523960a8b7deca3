// Quantising rows into codes and scales (the layout of keysel/indexer/quantization.h): what IndexerKeyCache,
// the Lightning Indexer's queries and the proxy scorer's copies share. Private to the indexer module.
#pragma once

#include <cstdint>
#include <string_view>

#include "keysel/indexer/quantization.h"

namespace keysel {

/// Quantises `rows` rows of `dim` channels (rotating them first when config.hadamard).
///   x:      fp32 [rows, dim], every value finite (checked; the error names `function`, `argument` and the row)
///   codes:  [rows, row_code_bytes(dim, config)] bytes
///   scales: fp32 [rows, scale_groups(dim, config)]
/// Nothing is written when a check fails.
void quantize_rows(std::string_view function, std::string_view argument, const float* x, std::int64_t rows,
                   std::int64_t dim, const QuantizationConfig& config, std::uint8_t* codes, float* scales);

}  // namespace keysel
