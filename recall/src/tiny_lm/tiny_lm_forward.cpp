// The tiny language model's fast forward pass (TinyLm::logits, TinyLm::trace): fp32, BLAS sgemm for every
// weight matrix, OpenMP over tokens for the element-wise steps, keysel's attention kernels for attention.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "keysel/attention/sparse_attention.h"
#include "keysel/core/error.h"
#include "keysel/recall/tiny_lm.h"
#include "tiny_lm/tiny_lm_weights.h"

namespace keysel {
namespace {

/// c[m, n] = a[m, k] . b[n, k]^T + beta * c (row-major; b as torch.nn.Linear stores a weight).
void matmul_transposed(std::int64_t m, std::int64_t n, std::int64_t k, const float* a, const float* b, float beta,
                       float* c) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
              1.0f, a, static_cast<int>(k), b, static_cast<int>(k), beta, c, static_cast<int>(n));
}

/// out[t] = in[t] / sqrt(mean(in[t]^2) + eps) * weight, rows of `width`; the mean in double.
void rms_norm(const std::vector<float>& in, const std::vector<float>& weight, double eps, std::int64_t rows,
              std::int64_t width, std::vector<float>& out) {
#pragma omp parallel for schedule(static)
  for (std::int64_t t = 0; t < rows; ++t) {
    const float* x = in.data() + t * width;
    float* y = out.data() + t * width;
    double sum = 0;
    for (std::int64_t i = 0; i < width; ++i) sum += static_cast<double>(x[i]) * x[i];
    const auto r = static_cast<float>(1.0 / std::sqrt(sum / static_cast<double>(width) + eps));
    for (std::int64_t i = 0; i < width; ++i) y[i] = (x[i] * r) * weight[static_cast<std::size_t>(i)];
  }
}

/// cos and sin of the RoPE angles pos * theta^(-2i/dim), i < dim/2, for positions 0..T-1: [T, dim/2] each.
struct RopeTable {
  std::int64_t half = 0;
  std::vector<float> cos, sin;

  RopeTable(std::int64_t tokens, std::int64_t dim, double theta) : half(dim / 2) {
    cos.resize(static_cast<std::size_t>(tokens * half));
    sin.resize(cos.size());
    for (std::int64_t t = 0; t < tokens; ++t) {
      for (std::int64_t i = 0; i < half; ++i) {
        const double angle =
            static_cast<double>(t) * std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(dim));
        cos[static_cast<std::size_t>(t * half + i)] = static_cast<float>(std::cos(angle));
        sin[static_cast<std::size_t>(t * half + i)] = static_cast<float>(std::sin(angle));
      }
    }
  }

  /// Rotates `count` vectors of length 2 * half at `in` (consecutive) for position t into `out`.
  void apply(std::int64_t t, std::int64_t count, const float* in, float* out) const {
    const float* c = cos.data() + t * half;
    const float* s = sin.data() + t * half;
    for (std::int64_t h = 0; h < count; ++h, in += 2 * half, out += 2 * half) {
      for (std::int64_t i = 0; i < half; ++i) {
        const float x1 = in[i], x2 = in[i + half];
        out[i] = x1 * c[i] - x2 * s[i];
        out[i + half] = x2 * c[i] + x1 * s[i];
      }
    }
  }
};

TensorView view_of(const std::vector<float>& data, std::initializer_list<std::int64_t> shape) {
  return TensorView(static_cast<const void*>(data.data()), DType::fp32, shape);
}


/// The second half of a decoder block for `rows` query rows, shared by TinyLm::forward and TinyLm::decode, once
/// `view` holds the layer's q, k, v (and the indexer's tensors) over `keys` keys: the attention (over the
/// selector's keys with `sparse`, else every allowed key) into `attended`, h += wo . attended, then the MLP
/// h += w_down (silu(w_gate x) * (w_up x)). `Layer` is TinyLm::Weights::Layer; x, gate_up, activated and
/// selection are scratch of the sizes the callers allocate.
template <typename Layer>
void finish_block(std::string_view function, const Layer& layer, const TinyLmConfig& c, const TinyLmLayer& view,
                  const TinyLmSparse* sparse, std::int64_t rows, std::int64_t keys, std::int64_t groups,
                  std::vector<std::int32_t>& selection, std::vector<float>& attended, std::vector<float>& x,
                  std::vector<float>& gate_up, std::vector<float>& activated, std::vector<float>& h) {
  const std::int64_t d = c.d_model, D = c.head_dim, Hq = c.heads, F = c.ffn_dim;
  const TensorView attended_view(static_cast<void*>(attended.data()), DType::fp32, {rows, Hq, D});
  if (sparse != nullptr) {
    std::fill(selection.begin(), selection.end(), -1);
    const TensorView selection_view(static_cast<void*>(selection.data()), DType::int32, {rows, groups, sparse->width});
    sparse->select(view, selection_view);
    validate_selection(function, selection_view, "layer " + std::to_string(view.layer) + " selection",
                       view.attention.positions, keys, groups);
    sparse_attention(view.attention, selection_view, sparse->granularity, attended_view);
  } else {
    full_attention_fast(view.attention, attended_view);
  }
  matmul_transposed(rows, d, Hq * D, attended.data(), layer.wo.data(), 1.0f, h.data());

  rms_norm(h, layer.mlp_norm, c.norm_eps, rows, d, x);
  matmul_transposed(rows, 2 * F, d, x.data(), layer.gate_up.data(), 0.0f, gate_up.data());
#pragma omp parallel for schedule(static)
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* gate = gate_up.data() + r * 2 * F;
    const float* up = gate + F;
    float* out = activated.data() + r * F;
    for (std::int64_t i = 0; i < F; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
  }
  matmul_transposed(rows, d, F, activated.data(), layer.w_down.data(), 1.0f, h.data());
}

/// Logits fp32 [rows, vocab] of the residual stream h [rows, d]: the final RMSNorm, then the LM head.
std::vector<float> output_logits(const std::vector<float>& h, const std::vector<float>& final_norm,
                                 const std::vector<float>& lm_head, const TinyLmConfig& c, std::int64_t rows,
                                 std::vector<float>& x) {
  rms_norm(h, final_norm, c.norm_eps, rows, c.d_model, x);
  std::vector<float> logits(static_cast<std::size_t>(rows * c.vocab));
  matmul_transposed(rows, c.vocab, c.d_model, x.data(), lm_head.data(), 0.0f, logits.data());
  return logits;
}

}  // namespace

std::vector<float> TinyLm::logits(std::span<const std::uint8_t> tokens) const {
  return forward(tokens, nullptr, nullptr);
}

std::vector<float> TinyLm::logits(std::span<const std::uint8_t> tokens, const TinyLmSparse& sparse) const {
  return forward(tokens, &sparse, nullptr);
}

TinyLmTrace TinyLm::trace(std::span<const std::uint8_t> tokens) const {
  TinyLmTrace trace;
  trace.logits = forward(tokens, nullptr, &trace);
  return trace;
}

TinyLmPrefill TinyLm::prefill(std::span<const std::uint8_t> tokens) const {
  TinyLmPrefill prefill;
  prefill.logits = forward(tokens, nullptr, nullptr, &prefill);
  prefill.tokens = static_cast<std::int64_t>(tokens.size());
  return prefill;
}

std::vector<float> TinyLm::forward(std::span<const std::uint8_t> tokens, const TinyLmSparse* sparse,
                                   TinyLmTrace* trace, TinyLmPrefill* prefill) const {
  constexpr std::string_view function = "TinyLm::logits";
  const TinyLmConfig& c = config_;
  const std::int64_t groups = check_tiny_lm_forward(function, c, weights_ != nullptr, tokens, sparse);
  const auto T = static_cast<std::int64_t>(tokens.size());

  const Weights& w = *weights_;
  const std::int64_t d = c.d_model, D = c.head_dim, Hq = c.heads, Hkv = c.kv_heads, F = c.ffn_dim;
  const std::int64_t HI = c.index_heads, DI = HI > 0 ? c.index_dim : 0;
  const TinyLmInputRows rows(c);
  const auto size = [](std::int64_t n) { return static_cast<std::size_t>(n); };

  std::vector<float> h(size(T * d)), x(size(T * d)), projected(size(T * rows.total));
  std::vector<float> q(size(T * Hq * D)), k(size(T * Hkv * D)), v(size(T * Hkv * D)), attended(size(T * Hq * D));
  std::vector<float> index_q(size(T * HI * DI)), index_k(size(T * DI)), index_w(size(T * HI));
  std::vector<float> gate_up(size(T * 2 * F)), activated(size(T * F));
  std::vector<std::int32_t> positions(size(T));
  std::iota(positions.begin(), positions.end(), 0);
  std::vector<std::int32_t> selection;
  if (sparse != nullptr) selection.resize(size(T * groups * sparse->width));

  const RopeTable rope(T, D, c.rope_theta);
  const RopeTable index_rope(T, HI > 0 ? DI : 0, c.rope_theta);

  TinyLmLayer layer_view;
  layer_view.attention.q = view_of(q, {T, Hq, D});
  layer_view.attention.k = view_of(k, {T, Hkv, D});
  layer_view.attention.v = view_of(v, {T, Hkv, D});
  layer_view.attention.positions = TensorView(static_cast<const void*>(positions.data()), DType::int32, {T});
  layer_view.attention.scale = 1.0 / std::sqrt(static_cast<double>(D));
  if (HI > 0) {
    layer_view.index_q = view_of(index_q, {T, HI, DI});
    layer_view.index_k = view_of(index_k, {T, DI});
    layer_view.index_w = view_of(index_w, {T, HI});
  }

  for (std::int64_t t = 0; t < T; ++t) {
    std::copy_n(w.embed.data() + tokens[size(t)] * d, d, h.data() + t * d);
  }
  if (trace != nullptr) trace->layers.clear();
  if (prefill != nullptr) {
    prefill->k.clear();
    prefill->v.clear();
    prefill->index_k.clear();
  }

  for (std::int64_t l = 0; l < c.layers; ++l) {
    const Weights::Layer& layer = w.layers[size(l)];
    // Attention block: one product for q, k, v and the indexer's qI, kI, w; RoPE on q, k, qI, kI.
    rms_norm(h, layer.attn_norm, c.norm_eps, T, d, x);
    matmul_transposed(T, rows.total, d, x.data(), layer.input.data(), 0.0f, projected.data());
#pragma omp parallel for schedule(static)
    for (std::int64_t t = 0; t < T; ++t) {
      const float* row = projected.data() + t * rows.total;
      rope.apply(t, Hq, row + rows.q, q.data() + t * Hq * D);
      rope.apply(t, Hkv, row + rows.k, k.data() + t * Hkv * D);
      std::copy_n(row + rows.v, Hkv * D, v.data() + t * Hkv * D);
      if (HI > 0) {
        index_rope.apply(t, HI, row + rows.index_q, index_q.data() + t * HI * DI);
        index_rope.apply(t, 1, row + rows.index_k, index_k.data() + t * DI);
        std::copy_n(row + rows.index_w, HI, index_w.data() + t * HI);
      }
    }
    layer_view.layer = l;
    if (trace != nullptr) {
      TinyLmLayerRecord record;
      record.layer = l;
      record.tokens = T;
      record.q = q;
      record.k = k;
      record.v = v;
      record.index_q = index_q;
      record.index_k = index_k;
      record.index_w = index_w;
      record.positions = positions;
      trace->layers.push_back(std::move(record));
    }
    if (prefill != nullptr) {
      prefill->k.push_back(k);
      prefill->v.push_back(v);
      prefill->index_k.push_back(index_k);
    }
    finish_block(function, layer, c, layer_view, sparse, T, T, groups, selection, attended, x, gate_up, activated, h);
  }
  return output_logits(h, w.final_norm, w.lm_head, c, T, x);
}

std::vector<float> TinyLm::decode(std::span<const std::uint8_t> tokens, const TinyLmPrefill& prefill,
                                  std::span<const std::int64_t> rows, const TinyLmSparse* sparse) const {
  constexpr std::string_view function = "TinyLm::decode";
  const TinyLmConfig& c = config_;
  const std::int64_t groups = check_tiny_lm_forward(function, c, weights_ != nullptr, tokens, sparse);
  const auto T = static_cast<std::int64_t>(tokens.size());
  const auto R = static_cast<std::int64_t>(rows.size());
  const Weights& w = *weights_;
  const std::int64_t d = c.d_model, D = c.head_dim, Hq = c.heads, Hkv = c.kv_heads, F = c.ffn_dim;
  const std::int64_t HI = c.index_heads, DI = HI > 0 ? c.index_dim : 0;
  const auto size = [](std::int64_t n) { return static_cast<std::size_t>(n); };

  KEYSEL_CHECK_ARG_IN(function, prefill.tokens == T, "prefill", "the prefill of these " + std::to_string(T) + " tokens",
                      "a prefill of " + std::to_string(prefill.tokens) + " tokens");
  const auto layers = size(c.layers);
  KEYSEL_CHECK_ARG_IN(function, prefill.k.size() == layers && prefill.v.size() == layers &&
                                    prefill.index_k.size() == layers,
                      "prefill", "one cache per layer (" + std::to_string(c.layers) + ")",
                      std::to_string(prefill.k.size()) + " key caches");
  for (std::size_t l = 0; l < layers; ++l) {
    KEYSEL_CHECK_ARG_IN(function, prefill.k[l].size() == size(T * Hkv * D) && prefill.v[l].size() == size(T * Hkv * D) &&
                                      prefill.index_k[l].size() == size(T * DI),
                        "prefill", "caches of this model's shape", "layer " + std::to_string(l) + " of another shape");
  }
  KEYSEL_CHECK_ARG_IN(function, R >= 1, "rows", "at least one scored row", "none");
  for (std::int64_t r = 0; r < R; ++r) {
    const std::int64_t p = rows[size(r)];
    KEYSEL_CHECK_ARG_IN(function, p >= 0 && p < T && (r == 0 || p > rows[size(r - 1)]), "rows",
                        "strictly ascending positions in [0, T = " + std::to_string(T) + ")",
                        "rows[" + std::to_string(r) + "] = " + std::to_string(p));
  }

  const TinyLmInputRows input_rows(c);
  std::vector<float> h(size(R * d)), x(size(R * d)), projected(size(R * input_rows.total));
  std::vector<float> q(size(R * Hq * D)), own_k(size(R * Hkv * D)), own_v(size(R * Hkv * D));
  std::vector<float> attended(size(R * Hq * D));
  std::vector<float> index_q(size(R * HI * DI)), own_index_k(size(R * DI)), index_w(size(R * HI));
  std::vector<float> gate_up(size(R * 2 * F)), activated(size(R * F));
  std::vector<float> k, v, index_k;  // this layer's cache with the scored rows' own K/V
  std::vector<std::int32_t> positions(size(R));
  for (std::int64_t r = 0; r < R; ++r) positions[size(r)] = static_cast<std::int32_t>(rows[size(r)]);
  std::vector<std::int32_t> selection;
  if (sparse != nullptr) selection.resize(size(R * groups * sparse->width));

  const RopeTable rope(T, D, c.rope_theta);
  const RopeTable index_rope(T, HI > 0 ? DI : 0, c.rope_theta);

  for (std::int64_t r = 0; r < R; ++r) {
    std::copy_n(w.embed.data() + tokens[size(rows[size(r)])] * d, d, h.data() + r * d);
  }
  for (std::int64_t l = 0; l < c.layers; ++l) {
    const Weights::Layer& layer = w.layers[size(l)];
    rms_norm(h, layer.attn_norm, c.norm_eps, R, d, x);
    matmul_transposed(R, input_rows.total, d, x.data(), layer.input.data(), 0.0f, projected.data());
#pragma omp parallel for schedule(static)
    for (std::int64_t r = 0; r < R; ++r) {
      const float* row = projected.data() + r * input_rows.total;
      const std::int64_t p = rows[size(r)];
      rope.apply(p, Hq, row + input_rows.q, q.data() + r * Hq * D);
      rope.apply(p, Hkv, row + input_rows.k, own_k.data() + r * Hkv * D);
      std::copy_n(row + input_rows.v, Hkv * D, own_v.data() + r * Hkv * D);
      if (HI > 0) {
        index_rope.apply(p, HI, row + input_rows.index_q, index_q.data() + r * HI * DI);
        index_rope.apply(p, 1, row + input_rows.index_k, own_index_k.data() + r * DI);
        std::copy_n(row + input_rows.index_w, HI, index_w.data() + r * HI);
      }
    }
    // The cache of this layer, with each scored position's K/V its own row's (a decoder's cache).
    k = prefill.k[size(l)];
    v = prefill.v[size(l)];
    index_k = prefill.index_k[size(l)];
    for (std::int64_t r = 0; r < R; ++r) {
      const std::int64_t p = rows[size(r)];
      std::copy_n(own_k.data() + r * Hkv * D, Hkv * D, k.data() + p * Hkv * D);
      std::copy_n(own_v.data() + r * Hkv * D, Hkv * D, v.data() + p * Hkv * D);
      if (HI > 0) std::copy_n(own_index_k.data() + r * DI, DI, index_k.data() + p * DI);
    }
    TinyLmLayer layer_view;
    layer_view.layer = l;
    layer_view.attention.q = view_of(q, {R, Hq, D});
    layer_view.attention.k = view_of(k, {T, Hkv, D});
    layer_view.attention.v = view_of(v, {T, Hkv, D});
    layer_view.attention.positions = TensorView(static_cast<const void*>(positions.data()), DType::int32, {R});
    layer_view.attention.scale = 1.0 / std::sqrt(static_cast<double>(D));
    if (HI > 0) {
      layer_view.index_q = view_of(index_q, {R, HI, DI});
      layer_view.index_k = view_of(index_k, {T, DI});
      layer_view.index_w = view_of(index_w, {R, HI});
    }
    finish_block(function, layer, c, layer_view, sparse, R, T, groups, selection, attended, x, gate_up, activated, h);
  }
  return output_logits(h, w.final_norm, w.lm_head, c, R, x);
}

}  // namespace keysel
