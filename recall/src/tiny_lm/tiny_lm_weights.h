// Private to the tiny language model (tiny_lm*.cpp): the weights in fp32, laid out for the forward pass.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "keysel/recall/tiny_lm.h"

namespace keysel {

/// Rows of a layer's stacked input projection: wq, wk, wv, index_wq, index_wk, index_ww, one above the other,
/// so that one matrix product gives every vector the attention and the indexer need.
struct TinyLmInputRows {
  std::int64_t q = 0, k = 0, v = 0, index_q = 0, index_k = 0, index_w = 0, total = 0;

  explicit TinyLmInputRows(const TinyLmConfig& c) {
    const std::int64_t index_heads = c.index_heads;
    const std::int64_t index_dim = index_heads > 0 ? c.index_dim : 0;
    k = q + c.heads * c.head_dim;
    v = k + c.kv_heads * c.head_dim;
    index_q = v + c.kv_heads * c.head_dim;
    index_k = index_q + index_heads * index_dim;
    index_w = index_k + index_dim;
    total = index_w + index_heads;
  }
};

/// The argument checks every forward pass (fast and reference) makes: a loaded model, 1 <= T <= context tokens
/// below vocab, and, when `sparse` is given, its width and callback. Returns the selection groups of `sparse`
/// (0 without it). `function` names the caller in the keysel::Error.
std::int64_t check_tiny_lm_forward(std::string_view function, const TinyLmConfig& config, bool loaded,
                                   std::span<const std::uint8_t> tokens, const TinyLmSparse* sparse);

struct TinyLm::Weights {
  struct Layer {
    std::vector<float> attn_norm;  // [d]
    std::vector<float> input;      // [TinyLmInputRows::total, d]
    std::vector<float> wo;         // [d, Hq*D]
    std::vector<float> mlp_norm;   // [d]
    std::vector<float> gate_up;    // [2F, d]: w_gate rows, then w_up rows
    std::vector<float> w_down;     // [d, F]
  };
  std::vector<float> embed;       // [V, d]
  std::vector<float> final_norm;  // [d]
  std::vector<float> lm_head;     // [V, d]
  std::vector<Layer> layers;
};

}  // namespace keysel
