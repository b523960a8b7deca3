// The portable kernel: plain loops, std::exp. The SIMD kernels are tested against it and against the reference.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "sparse_attention_kernels.h"

namespace keysel::attention_kernels {
namespace {

float load_element(const std::byte* row, DType dtype, std::int64_t i) {
  if (dtype == DType::fp32) {
    float value;
    std::memcpy(&value, row + i * 4, 4);
    return value;
  }
  std::uint16_t bits;
  std::memcpy(&bits, row + i * 2, 2);
  return dtype == DType::bf16 ? bf16_bits_to_fp32(bits) : fp16_bits_to_fp32(bits);
}

}  // namespace

void attend_scalar(const Problem& p, const std::int32_t* keys, std::int64_t count, const State& state) {
  std::vector<float> row(static_cast<std::size_t>(std::max(p.dim, p.value_dim)));
  for (std::int64_t begin = 0; begin < count; begin += kBlock) {
    const std::int64_t n = std::min(kBlock, count - begin);
    for (std::int64_t j = 0; j < n; ++j) {
      const std::byte* krow = p.k + static_cast<std::int64_t>(keys[begin + j]) * p.k_row_bytes;
      for (std::int64_t d = 0; d < p.dim; ++d) row[static_cast<std::size_t>(d)] = load_element(krow, p.k_dtype, d);
      for (std::int64_t h = 0; h < p.heads; ++h) {
        const float* q = p.q + h * p.dim_padded;
        float dot = 0.0f;
        for (std::int64_t d = 0; d < p.dim; ++d) dot += q[d] * row[static_cast<std::size_t>(d)];
        state.logits[h * kBlock + j] = dot;
      }
    }
    for (std::int64_t h = 0; h < p.heads; ++h) {
      float* logits = state.logits + h * kBlock;
      float block_max = -std::numeric_limits<float>::infinity();
      for (std::int64_t j = 0; j < n; ++j) block_max = std::max(block_max, logits[j]);
      const float new_max = std::max(state.max[h], block_max);
      if (new_max > state.max[h]) {
        const float alpha = std::exp(state.max[h] - new_max);  // 0 when the old max is -inf
        state.sum[h] *= alpha;
        float* acc = state.acc + h * p.value_dim_padded;
        for (std::int64_t d = 0; d < p.value_dim; ++d) acc[d] *= alpha;
        state.max[h] = new_max;
      }
      float sum = 0.0f;
      for (std::int64_t j = 0; j < n; ++j) {
        logits[j] = std::exp(logits[j] - new_max);
        sum += logits[j];
      }
      state.sum[h] += sum;
    }
    for (std::int64_t j = 0; j < n; ++j) {
      const std::byte* vrow = p.v + static_cast<std::int64_t>(keys[begin + j]) * p.v_row_bytes;
      for (std::int64_t d = 0; d < p.value_dim; ++d) row[static_cast<std::size_t>(d)] = load_element(vrow, p.v_dtype, d);
      for (std::int64_t h = 0; h < p.heads; ++h) {
        const float weight = state.logits[h * kBlock + j];
        float* acc = state.acc + h * p.value_dim_padded;
        for (std::int64_t d = 0; d < p.value_dim; ++d) acc[d] += weight * row[static_cast<std::size_t>(d)];
      }
    }
  }
}

namespace {

void convert_scalar(float* dst, const std::byte* row, DType dtype, std::int64_t n, std::int64_t n_padded) {
  for (std::int64_t i = 0; i < n; ++i) dst[i] = load_element(row, dtype, i);
  for (std::int64_t i = n; i < n_padded; ++i) dst[i] = 0.0f;
}

float dot_scalar(const float* a, const float* b, std::int64_t n_padded) {
  float sum = 0.0f;
  for (std::int64_t i = 0; i < n_padded; ++i) sum += a[i] * b[i];
  return sum;
}

void axpy_scalar(float* acc, float alpha, const float* x, std::int64_t n_padded) {
  for (std::int64_t i = 0; i < n_padded; ++i) acc[i] += alpha * x[i];
}

}  // namespace

BackwardOps backward_ops_scalar() { return BackwardOps{&convert_scalar, &dot_scalar, &axpy_scalar}; }

void attend_shared_scalar(const Problem* problems, std::int64_t units, const std::int32_t* keys,
                          const std::int64_t* counts, const State* states) {
  for (std::int64_t i = 0; i < units; ++i) attend_scalar(problems[i], keys, counts[i], states[i]);
}

}  // namespace keysel::attention_kernels
