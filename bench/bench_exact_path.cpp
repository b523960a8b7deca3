// The exact path's reference implementations, timed so later fast paths have a baseline to beat.
//   ./build/bench/bench_exact_path --benchmark_filter=.
#include <benchmark/benchmark.h>

#include <vector>

#include "keysel/keysel.h"

namespace {

keysel::Workload make_workload(std::int64_t keys) {
  keysel::SyntheticOptions options;
  options.keys = keys;
  options.tokens = 1;
  return keysel::make_synthetic_workload(options);
}

// select_topk over precomputed scores: T=1, G=8 rows of N keys.
void BM_SelectTopkReference(benchmark::State& state) {
  const std::int64_t keys = state.range(0), k = state.range(1), groups = 8;
  keysel::RandomStream rng(1);
  std::vector<float> scores(static_cast<std::size_t>(groups * keys));
  rng.fill_normal(scores);
  std::vector<std::int32_t> positions{static_cast<std::int32_t>(keys - 1)};
  std::vector<std::int32_t> selection(static_cast<std::size_t>(groups * k));
  keysel::TensorView scores_view(scores.data(), keysel::DType::fp32, {1, groups, keys});
  keysel::TensorView positions_view(positions.data(), keysel::DType::int32, {1});
  keysel::TensorView selection_view(selection.data(), keysel::DType::int32, {1, groups, k});
  keysel::SelectionPolicy policy;
  policy.k = k;
  for (auto _ : state) {
    keysel::select_topk(scores_view, positions_view, policy, selection_view);
    benchmark::DoNotOptimize(selection.data());
  }
  state.SetItemsProcessed(state.iterations() * groups * keys);
}
BENCHMARK(BM_SelectTopkReference)->Args({8192, 256})->Args({131072, 2048})->Unit(benchmark::kMillisecond);

// exact_topk of the main attention (double-precision probabilities, then selection): one decode token.
void BM_ExactTopkReference(benchmark::State& state) {
  const keysel::Workload workload = make_workload(state.range(0));
  const auto inputs = workload.inputs();
  keysel::SelectionPolicy policy;
  policy.k = 256;
  std::vector<std::int32_t> selection(static_cast<std::size_t>(workload.shape.kv_heads * policy.k));
  keysel::TensorView selection_view(selection.data(), keysel::DType::int32,
                                    {1, workload.shape.kv_heads, policy.k});
  for (auto _ : state) {
    keysel::exact_topk(inputs, policy, selection_view);
    benchmark::DoNotOptimize(selection.data());
  }
  state.SetItemsProcessed(state.iterations() * workload.shape.keys);
}
BENCHMARK(BM_ExactTopkReference)->Arg(8192)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
