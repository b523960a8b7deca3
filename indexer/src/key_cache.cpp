#include "keysel/indexer/key_cache.h"

#include <vector>

#include "keysel/core/error.h"
#include "quantize_rows.h"

namespace keysel {

IndexerKeyCache::IndexerKeyCache(std::int64_t dim, const QuantizationConfig& config)
    : dim_(dim), config_(config) {
  KEYSEL_CHECK_ARG(dim >= 1, "dim", ">= 1", dim);
  config.validate("IndexerKeyCache");
  padded_dim_ = keysel::padded_dim(dim);
  groups_ = scale_groups(dim, config);
  row_bytes_ = row_code_bytes(dim, config);
}

void IndexerKeyCache::append(std::int64_t n, const float* keys) {
  KEYSEL_CHECK_ARG(n >= 0, "n", ">= 0", n);
  if (n == 0) return;
  KEYSEL_CHECK_ARG(keys != nullptr, "keys", "a non-null pointer", "nullptr");
  // Quantise into fresh buffers first: a rejected append leaves the cache as it was.
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(n * row_bytes_));
  std::vector<float> scales(static_cast<std::size_t>(n * groups_));
  quantize_rows("IndexerKeyCache::append", "keys", keys, n, dim_, config_, codes.data(), scales.data());
  codes_.insert(codes_.end(), codes.begin(), codes.end());
  scales_.insert(scales_.end(), scales.begin(), scales.end());
  size_ += n;
}

void IndexerKeyCache::append(const TensorView& keys) {
  constexpr std::string_view function = "IndexerKeyCache::append";
  expect_shape(function, keys, "keys", {kAnyExtent, dim_});
  expect_dtype(function, keys, "keys", {DType::fp32, DType::fp16, DType::bf16});
  expect_device(function, keys, "keys", Device::cpu());
  if (keys.dtype() == DType::fp32 && keys.is_contiguous()) {
    append(keys.size(0), keys.data<float>());
    return;
  }
  const std::vector<double> values = to_double_vector(keys);
  const std::vector<float> floats(values.begin(), values.end());
  append(keys.size(0), floats.data());
}

void IndexerKeyCache::clear() {
  codes_.clear();
  scales_.clear();
  size_ = 0;
}

void IndexerKeyCache::reserve(std::int64_t tokens) {
  KEYSEL_CHECK_ARG(tokens >= 0, "tokens", ">= 0", tokens);
  codes_.reserve(static_cast<std::size_t>(tokens * row_bytes_));
  scales_.reserve(static_cast<std::size_t>(tokens * groups_));
}

void IndexerKeyCache::dequantize(std::int64_t token, float* out) const {
  KEYSEL_CHECK_ARG(token >= 0 && token < size_, "token", "in [0, size())", token);
  dequantize_row(codes_.data() + token * row_bytes_, scales_.data() + token * groups_, dim_, config_, out);
}

}  // namespace keysel
