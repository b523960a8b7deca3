// Shared by the tiny-lm study tests: a small random model in the tiny-lm weight layout, a snippet of text, and
// small helpers for selector factories and reading the files a study writes.
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "keysel/recall/loaders.h"
#include "keysel/recall/selector_spec.h"
#include "keysel/recall/study.h"
#include "keysel/recall/tiny_lm.h"

namespace keysel::tiny_lm_fixture {

inline constexpr const char* kText =
    "def mean(values):\n    total = 0.0\n    for v in values:\n        total += v\n    return total / len(values)\n"
    "\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n";

/// 2 layers, d = 32, Hq = 4 over Hkv = 2 heads of D = 8, an indexer of 2 heads x 32 channels, context 96.
inline TinyLmConfig small_config() {
  TinyLmConfig c;
  c.d_model = 32;
  c.layers = 2;
  c.heads = 4;
  c.kv_heads = 2;
  c.head_dim = 8;
  c.ffn_dim = 48;
  c.context = 96;
  c.index_heads = 2;
  c.index_dim = 32;
  return c;
}

/// A random weight file in the tiny-lm layout. Query and key projections are scaled up so that attention is
/// peaked and selectors differ.
inline SafetensorsFile random_model_file(const TinyLmConfig& c, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  SafetensorsFile file;
  const auto add = [&](const std::string& name, std::vector<std::int64_t> shape, double scale, double offset = 0.0) {
    std::int64_t count = 1;
    for (const std::int64_t e : shape) count *= e;
    std::vector<float> values(static_cast<std::size_t>(count));
    for (float& v : values) v = static_cast<float>(offset + scale * normal(rng));
    file.tensors.push_back(LoadedTensor::from_float(name, values, std::move(shape)));
  };
  const std::int64_t d = c.d_model;
  const double unit = 1.0 / std::sqrt(static_cast<double>(d));
  add("embed", {c.vocab, d}, 1.0);
  add("final_norm", {d}, 0.1, 1.0);
  add("lm_head", {c.vocab, d}, 2.0 * unit);
  for (std::int64_t l = 0; l < c.layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    add(p + "attn_norm", {d}, 0.1, 1.0);
    add(p + "wq", {c.heads * c.head_dim, d}, 3.0 * unit);
    add(p + "wk", {c.kv_heads * c.head_dim, d}, 3.0 * unit);
    add(p + "wv", {c.kv_heads * c.head_dim, d}, unit);
    add(p + "wo", {d, c.heads * c.head_dim}, 1.0 / std::sqrt(static_cast<double>(c.heads * c.head_dim)));
    add(p + "mlp_norm", {d}, 0.1, 1.0);
    add(p + "w_gate", {c.ffn_dim, d}, unit);
    add(p + "w_up", {c.ffn_dim, d}, unit);
    add(p + "w_down", {d, c.ffn_dim}, 1.0 / std::sqrt(static_cast<double>(c.ffn_dim)));
    add(p + "index_wq", {c.index_heads * c.index_dim, d}, 2.0 * unit);
    add(p + "index_wk", {c.index_dim, d}, 2.0 * unit);
    add(p + "index_ww", {c.index_heads, d}, unit);
  }
  file.metadata["format"] = std::string(kTinyLmFormat);
  file.metadata["config"] = tiny_lm_config_json(c);
  return file;
}

inline std::vector<std::uint8_t> text_bytes(std::size_t offset, std::size_t count) {
  const std::string text = kText;
  return {text.begin() + static_cast<std::ptrdiff_t>(offset),
          text.begin() + static_cast<std::ptrdiff_t>(offset + count)};
}

inline std::vector<SelectorFactory> factories(std::initializer_list<const char*> specs) {
  std::vector<SelectorFactory> out;
  for (const char* spec : specs) {
    out.push_back([text = std::string(spec)](const IndexerTensors* indexer) {
      return make_selector_from_spec(text, indexer);
    });
  }
  return out;
}

inline double mean_of(const StudyRow& row, const std::string& metric) { return row.metrics.at(metric).mean; }

inline std::string read_text(const std::filesystem::path& path) {
  std::ifstream file(path);
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

inline std::string json_string(const std::string& text) { return nlohmann::json(text).dump(); }

}  // namespace keysel::tiny_lm_fixture
