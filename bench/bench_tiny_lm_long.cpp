// Cost of long-context studies over the tiny language model on the CPU: one full-attention prefill (the K/V cache
// of every layer) and one top-k decode of the scored rows over it, for a random model of the long-context
// model's planned shape (6 layers, d_model 352, 6 query heads over 2 key heads of 64 channels, a 4 x 32
// indexer, context 32768). docs/studies.md sizes the long-context example study from these times.
//
//   bench_tiny_lm_long --benchmark_filter=Prefill/32768
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <numeric>
#include <vector>

#include "keysel/core/random.h"
#include "keysel/indexer/selector.h"
#include "keysel/recall/loaders.h"
#include "keysel/recall/tiny_lm.h"

namespace {

using namespace keysel;

TinyLmConfig long_config() {
  TinyLmConfig c;
  c.vocab = 256;
  c.d_model = 352;
  c.layers = 6;
  c.heads = 6;
  c.kv_heads = 2;
  c.head_dim = 64;
  c.ffn_dim = 1024;
  c.context = 32768;
  c.index_heads = 4;
  c.index_dim = 32;
  return c;
}

const TinyLm& long_model() {
  static const TinyLm model = [] {
    const TinyLmConfig c = long_config();
    SafetensorsFile file;
    file.metadata["format"] = std::string(kTinyLmFormat);
    file.metadata["config"] = tiny_lm_config_json(c);
    RandomStream random(1);
    const auto add = [&](const std::string& name, std::vector<std::int64_t> shape) {
      std::int64_t n = 1;
      for (const std::int64_t e : shape) n *= e;
      std::vector<float> values(static_cast<std::size_t>(n));
      const bool norm = shape.size() == 1;
      random.fill_normal(std::span<float>(values), norm ? 1.0 : 0.0,
                         norm ? 0.1 : 1.0 / std::sqrt(static_cast<double>(shape.back())));
      file.tensors.push_back(LoadedTensor::from_float(name, values, std::move(shape), DType::fp16));
    };
    const std::int64_t d = c.d_model, D = c.head_dim;
    add("embed", {c.vocab, d});
    add("final_norm", {d});
    add("lm_head", {c.vocab, d});
    for (std::int64_t l = 0; l < c.layers; ++l) {
      const std::string p = "layers." + std::to_string(l) + ".";
      add(p + "attn_norm", {d});
      add(p + "wq", {c.heads * D, d});
      add(p + "wk", {c.kv_heads * D, d});
      add(p + "wv", {c.kv_heads * D, d});
      add(p + "wo", {d, c.heads * D});
      add(p + "mlp_norm", {d});
      add(p + "w_gate", {c.ffn_dim, d});
      add(p + "w_up", {c.ffn_dim, d});
      add(p + "w_down", {d, c.ffn_dim});
      add(p + "index_wq", {c.index_heads * c.index_dim, d});
      add(p + "index_wk", {c.index_dim, d});
      add(p + "index_ww", {c.index_heads, d});
    }
    return TinyLm::from_safetensors(file, "random long-context model");
  }();
  return model;
}

std::vector<std::uint8_t> text(std::int64_t n) {
  RandomStream random(2);
  std::vector<std::uint8_t> out(static_cast<std::size_t>(n));
  for (auto& b : out) b = static_cast<std::uint8_t>(32 + random.uniform_int(95));
  return out;
}

void Prefill(benchmark::State& state) {
  const std::vector<std::uint8_t> tokens = text(state.range(0));
  for (auto _ : state) {
    const TinyLmPrefill prefill = long_model().prefill(tokens);
    benchmark::DoNotOptimize(prefill.logits.data());
  }
}
BENCHMARK(Prefill)->Arg(8192)->Arg(16384)->Arg(32768)->Iterations(1)->Unit(benchmark::kSecond)->UseRealTime();

/// One decode of 72 scored rows (64 sampled, 8 answer bytes) with the exact top-k at k = 2048, per_token.
void DecodeExactTopk(benchmark::State& state) {
  const std::int64_t T = state.range(0);
  const std::vector<std::uint8_t> tokens = text(T);
  const TinyLmPrefill prefill = long_model().prefill(tokens);
  std::vector<std::int64_t> rows;
  for (std::int64_t i = 0; i < 64; ++i) rows.push_back(i * (T - 10) / 64);
  for (std::int64_t r = T - 9; r < T - 1; ++r) rows.push_back(r);
  const std::unique_ptr<Selector> exact = make_exact_selector();
  SelectionPolicy policy;
  policy.k = 2048;
  policy.granularity = Granularity::per_token;
  TinyLmSparse sparse;
  sparse.granularity = policy.granularity;
  sparse.width = policy.width();
  sparse.select = [&](const TinyLmLayer& layer, const TensorView& selection) {
    exact->select(layer.request(), policy, selection);
  };
  for (auto _ : state) {
    const std::vector<float> logits = long_model().decode(tokens, prefill, rows, &sparse);
    benchmark::DoNotOptimize(logits.data());
  }
}
BENCHMARK(DecodeExactTopk)->Arg(32768)->Iterations(2)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
