// Portable kernel: decodes each key and accumulates in fp32 (int32 for the integer formats).
#include <algorithm>
#include <cmath>
#include <vector>

#include "indexer_kernels.h"
#include "keysel/indexer/quantization.h"

namespace keysel::indexer_detail {

void score_keys_scalar(const IndexerProblem& p, std::int64_t begin, std::int64_t end, float* out) {
  const bool integer = p.format == DType::int8 || p.format == DType::int4;
  std::vector<float> key(static_cast<std::size_t>(p.padded_dim));
  std::vector<float> logits(static_cast<std::size_t>(p.heads));
  for (std::int64_t s = begin; s < end; ++s) {
    decode_codes(p.key_codes + s * p.row_bytes, p.format, p.padded_dim, key.data());
    const float* key_scales = p.key_scales + s * p.groups;
    float score = 0.0f;
    for (std::int64_t h = 0; h < p.heads; ++h) {
      const float* q = p.query_values + h * p.padded_dim;
      float logit = 0.0f;
      for (std::int64_t g = 0; g < p.groups; ++g) {
        const std::int64_t d0 = g * p.group_channels, d1 = std::min(d0 + p.group_channels, p.padded_dim);
        float dot = 0.0f;
        if (integer) {
          std::int32_t acc = 0;
          for (std::int64_t d = d0; d < d1; ++d) {
            acc += static_cast<std::int32_t>(q[d]) * static_cast<std::int32_t>(key[static_cast<std::size_t>(d)]);
          }
          dot = static_cast<float>(acc);
        } else {
          for (std::int64_t d = d0; d < d1; ++d) dot += q[d] * key[static_cast<std::size_t>(d)];
        }
        logit += dot * (p.query_scales[h * p.groups + g] * key_scales[g]);
      }
      score += p.weights[h] * std::max(logit, 0.0f);
    }
    out[s - begin] = score;
  }
}

}  // namespace keysel::indexer_detail
