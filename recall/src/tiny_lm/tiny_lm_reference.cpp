// The tiny language model's reference forward pass (tiny_lm_reference_logits): every step of tiny_lm.h in
// double precision with straight loops, no BLAS and no threads, so that it reads as the model's definition.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "keysel/recall/tiny_lm.h"
#include "tiny_lm/tiny_lm_weights.h"

namespace keysel {
namespace {

using Matrix = std::vector<double>;  // row-major

/// out[t, o] = sum_j x[t, j] * weight[row0 + o, j], o < n (weight rows of length `width`).
Matrix project(const Matrix& x, std::int64_t tokens, std::int64_t width, const std::vector<float>& weight,
               std::int64_t row0, std::int64_t n) {
  Matrix out(static_cast<std::size_t>(tokens * n));
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t o = 0; o < n; ++o) {
      double sum = 0;
      for (std::int64_t j = 0; j < width; ++j) {
        sum += x[static_cast<std::size_t>(t * width + j)] *
               static_cast<double>(weight[static_cast<std::size_t>((row0 + o) * width + j)]);
      }
      out[static_cast<std::size_t>(t * n + o)] = sum;
    }
  }
  return out;
}

Matrix rms_norm(const Matrix& h, std::int64_t tokens, std::int64_t width, const std::vector<float>& weight,
                double eps) {
  Matrix out(h.size());
  for (std::int64_t t = 0; t < tokens; ++t) {
    double sum = 0;
    for (std::int64_t i = 0; i < width; ++i)
      sum += h[static_cast<std::size_t>(t * width + i)] * h[static_cast<std::size_t>(t * width + i)];
    const double r = 1.0 / std::sqrt(sum / static_cast<double>(width) + eps);
    for (std::int64_t i = 0; i < width; ++i) {
      out[static_cast<std::size_t>(t * width + i)] =
          h[static_cast<std::size_t>(t * width + i)] * r * static_cast<double>(weight[static_cast<std::size_t>(i)]);
    }
  }
  return out;
}

/// Rotate-half RoPE in place on m [T, heads * dim]: pairs (i, i + dim/2) of each head turn by t * theta^(-2i/dim).
void rope(Matrix& m, std::int64_t tokens, std::int64_t heads, std::int64_t dim, double theta) {
  const std::int64_t half = dim / 2;
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t h = 0; h < heads; ++h) {
      double* x = m.data() + (t * heads + h) * dim;
      for (std::int64_t i = 0; i < half; ++i) {
        const double angle =
            static_cast<double>(t) * std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(dim));
        const double x1 = x[i], x2 = x[i + half];
        x[i] = x1 * std::cos(angle) - x2 * std::sin(angle);
        x[i + half] = x2 * std::cos(angle) + x1 * std::sin(angle);
      }
    }
  }
}

std::vector<float> to_float(const Matrix& m) { return std::vector<float>(m.begin(), m.end()); }

}  // namespace

std::vector<double> tiny_lm_reference_logits(const TinyLm& model, std::span<const std::uint8_t> tokens,
                                             const TinyLmSparse* sparse) {
  constexpr std::string_view function = "tiny_lm_reference_logits";
  const TinyLmConfig& c = model.config_;
  const std::int64_t groups = check_tiny_lm_forward(function, c, model.weights_ != nullptr, tokens, sparse);
  const auto T = static_cast<std::int64_t>(tokens.size());
  const TinyLm::Weights& w = *model.weights_;
  const std::int64_t d = c.d_model, D = c.head_dim, Hq = c.heads, Hkv = c.kv_heads, F = c.ffn_dim;
  const std::int64_t HI = c.index_heads, DI = HI > 0 ? c.index_dim : 0;
  const TinyLmInputRows rows(c);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<std::int32_t> positions(static_cast<std::size_t>(T));
  std::iota(positions.begin(), positions.end(), 0);

  Matrix h(static_cast<std::size_t>(T * d));
  for (std::int64_t t = 0; t < T; ++t) {
    for (std::int64_t i = 0; i < d; ++i) {
      h[static_cast<std::size_t>(t * d + i)] =
          w.embed[static_cast<std::size_t>(tokens[static_cast<std::size_t>(t)] * d + i)];
    }
  }

  for (std::int64_t l = 0; l < c.layers; ++l) {
    const TinyLm::Weights::Layer& layer = w.layers[static_cast<std::size_t>(l)];
    const Matrix x = rms_norm(h, T, d, layer.attn_norm, c.norm_eps);
    Matrix q = project(x, T, d, layer.input, rows.q, Hq * D);
    Matrix k = project(x, T, d, layer.input, rows.k, Hkv * D);
    const Matrix v = project(x, T, d, layer.input, rows.v, Hkv * D);
    rope(q, T, Hq, D, c.rope_theta);
    rope(k, T, Hkv, D, c.rope_theta);

    // The keys each query token and head reads: all s <= t, or the selection row of its group.
    std::vector<std::int32_t> selection;
    if (sparse != nullptr) {
      Matrix index_q, index_k, index_w;
      if (HI > 0) {
        index_q = project(x, T, d, layer.input, rows.index_q, HI * DI);
        index_k = project(x, T, d, layer.input, rows.index_k, DI);
        index_w = project(x, T, d, layer.input, rows.index_w, HI);
        rope(index_q, T, HI, DI, c.rope_theta);
        rope(index_k, T, 1, DI, c.rope_theta);
      }
      TinyLmLayerRecord record;
      record.layer = l;
      record.tokens = T;
      record.q = to_float(q);
      record.k = to_float(k);
      record.v = to_float(v);
      record.index_q = to_float(index_q);
      record.index_k = to_float(index_k);
      record.index_w = to_float(index_w);
      record.positions = positions;
      const TinyLmLayer view = record.view(c);
      selection.assign(static_cast<std::size_t>(T * groups * sparse->width), -1);
      const TensorView selection_view(static_cast<void*>(selection.data()), DType::int32, {T, groups, sparse->width});
      sparse->select(view, selection_view);
      validate_selection(function, selection_view, "layer " + std::to_string(l) + " selection",
                         view.attention.positions, T, groups);
    }

    Matrix attended(static_cast<std::size_t>(T * Hq * D), 0.0);
    std::vector<std::int64_t> keys;
    std::vector<double> scores;
    for (std::int64_t t = 0; t < T; ++t) {
      for (std::int64_t head = 0; head < Hq; ++head) {
        const std::int64_t kv = head / (Hq / Hkv);
        keys.clear();
        if (sparse == nullptr) {
          for (std::int64_t s = 0; s <= t; ++s) keys.push_back(s);
        } else {
          const std::int64_t g = group_of_head(sparse->granularity, head, Hq, Hkv);
          for (std::int64_t i = 0; i < sparse->width; ++i) {
            const std::int32_t s = selection[static_cast<std::size_t>((t * groups + g) * sparse->width + i)];
            if (s >= 0) keys.push_back(s);
          }
        }
        if (keys.empty()) continue;  // no key: zero output, as sparse_attention gives
        scores.assign(keys.size(), 0.0);
        double max = -INFINITY;
        for (std::size_t j = 0; j < keys.size(); ++j) {
          double dot = 0;
          for (std::int64_t i = 0; i < D; ++i) {
            dot += q[static_cast<std::size_t>((t * Hq + head) * D + i)] *
                   k[static_cast<std::size_t>((keys[j] * Hkv + kv) * D + i)];
          }
          scores[j] = dot * scale;
          max = std::max(max, scores[j]);
        }
        double sum = 0;
        for (double& s : scores) {
          s = std::exp(s - max);
          sum += s;
        }
        for (std::size_t j = 0; j < keys.size(); ++j) {
          for (std::int64_t i = 0; i < D; ++i) {
            attended[static_cast<std::size_t>((t * Hq + head) * D + i)] +=
                scores[j] / sum * v[static_cast<std::size_t>((keys[j] * Hkv + kv) * D + i)];
          }
        }
      }
    }
    const Matrix out = project(attended, T, Hq * D, layer.wo, 0, d);
    for (std::size_t i = 0; i < h.size(); ++i) h[i] += out[i];

    const Matrix y = rms_norm(h, T, d, layer.mlp_norm, c.norm_eps);
    const Matrix gate = project(y, T, d, layer.gate_up, 0, F);
    const Matrix up = project(y, T, d, layer.gate_up, F, F);
    Matrix activated(gate.size());
    for (std::size_t i = 0; i < gate.size(); ++i) activated[i] = gate[i] / (1.0 + std::exp(-gate[i])) * up[i];
    const Matrix down = project(activated, T, F, layer.w_down, 0, d);
    for (std::size_t i = 0; i < h.size(); ++i) h[i] += down[i];
  }
  const Matrix x = rms_norm(h, T, d, w.final_norm, c.norm_eps);
  return project(x, T, d, w.lm_head, 0, c.vocab);
}

}  // namespace keysel
