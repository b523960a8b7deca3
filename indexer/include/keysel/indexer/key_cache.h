// The Lightning Indexer's low-precision key cache: one indexer key kI[s] per cached token (SPEC §3).
//
// Keys are rotated (config.hadamard) and quantised when appended; the cache grows by whole tokens. Appending
// n keys in any number of pieces gives the same codes and scales as appending them at once (quantisation is
// row by row: per token, or per group of channels within a token).
#pragma once

#include <cstdint>
#include <vector>

#include "keysel/core/tensor.h"
#include "keysel/indexer/quantization.h"

namespace keysel {

class IndexerKeyCache {
 public:
  /// An empty cache of keys with `dim` channels (DI >= 1) stored as `config` says. Throws on a bad config.
  IndexerKeyCache(std::int64_t dim, const QuantizationConfig& config);

  /// Appends n keys.   keys: fp32 [n, dim], finite (a non-finite value throws; the cache is then unchanged).
  /// (count, pointer) like CandidateSearch::add and FAISS's Index::add.
  void append(std::int64_t n, const float* keys);
  /// The former argument order.
  [[deprecated("use append(n, keys)")]] void append(const float* keys, std::int64_t n) { append(n, keys); }
  /// Appends keys [n, dim] (fp32, fp16 or bf16, CPU, any strides).
  void append(const TensorView& keys);
  /// Removes every key (keeps the configuration).
  void clear();
  void reserve(std::int64_t tokens);

  std::int64_t size() const { return size_; }  // N
  std::int64_t dim() const { return dim_; }    // DI
  const QuantizationConfig& config() const { return config_; }
  /// Channels stored per key (dim rounded up to 32; the extra channels are zero).
  std::int64_t padded_dim() const { return padded_dim_; }
  /// Scales per key.
  std::int64_t groups() const { return groups_; }
  /// Bytes of codes per key.
  std::int64_t row_bytes() const { return row_bytes_; }
  /// Bytes stored per cached token: codes (padded row) + 4 bytes per scale. DI = 128: fp32 516, bf16 and
  /// fp16 260, fp8 and int8 132, int4 68 with one scale per token.
  std::int64_t bytes_per_token() const { return row_bytes_ + 4 * groups_; }

  /// Codes [size(), row_bytes()].
  const std::uint8_t* codes() const { return codes_.data(); }
  /// Scales fp32 [size(), groups()].
  const float* scales() const { return scales_.data(); }
  /// Stored value of key `token` (in the rotated space when config.hadamard).   out: fp32 [dim]
  void dequantize(std::int64_t token, float* out) const;

 private:
  std::int64_t dim_;
  QuantizationConfig config_;
  std::int64_t padded_dim_;
  std::int64_t groups_;
  std::int64_t row_bytes_;
  std::int64_t size_ = 0;
  std::vector<std::uint8_t> codes_;
  std::vector<float> scales_;
};

}  // namespace keysel
