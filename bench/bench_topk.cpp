// Exact top-k: fast_select_topk against the reference select_topk, and the fused inner-product top-k against
// faiss::IndexFlatIP::search on the same data in the same run (docs/topk.md has the table and the command).
//
//   bench_topk --benchmark_filter='Select|InnerProduct|Faiss'
// Arguments: rows (query rows of N = 131072 scores, k = 2048); SIMD level 0 scalar, 1 avx2, 2 avx512.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <set>
#include <vector>

#include "keysel/core/build_config.h"
#include "keysel/core/random.h"
#include "keysel/core/threads.h"
#include "keysel/indexer/fast_topk.h"
#include "keysel/indexer/simd.h"
#include "keysel/indexer/topk.h"

#if KEYSEL_FAISS
#include <faiss/IndexFlat.h>
#endif

namespace {

constexpr std::int64_t kKeys = 131072;
constexpr std::int64_t kK = 2048;
constexpr std::int64_t kQueries = 64;
constexpr std::int64_t kDim = 128;

const std::vector<float>& random_floats(std::int64_t count, std::uint64_t seed) {
  static std::vector<std::vector<float>> cache(8);
  std::vector<float>& data = cache[seed % cache.size()];
  if (static_cast<std::int64_t>(data.size()) != count) {
    data.resize(static_cast<std::size_t>(count));
    keysel::RandomStream(seed).fill_normal(data);
  }
  return data;
}

// ---- selection from materialised scores [rows, 1, N] ----------------------------------------------------

template <bool kFast>
void select_rows(benchmark::State& state) {
  const std::int64_t rows = state.range(0);
  const std::vector<float>& scores = random_floats(rows * kKeys, rows);
  std::vector<std::int32_t> positions(static_cast<std::size_t>(rows), static_cast<std::int32_t>(kKeys - 1));
  std::vector<std::int32_t> out(static_cast<std::size_t>(rows * kK));
  keysel::SelectionPolicy policy;
  policy.k = kK;
  const keysel::TensorView score_view(scores.data(), keysel::DType::fp32, {rows, 1, kKeys});
  const keysel::TensorView position_view(positions.data(), keysel::DType::int32, {rows});
  const keysel::TensorView out_view(out.data(), keysel::DType::int32, {rows, 1, kK});
  for (auto _ : state) {
    if constexpr (kFast) {
      keysel::fast_select_topk(score_view, position_view, policy, out_view);
    } else {
      keysel::select_topk(score_view, position_view, policy, out_view);
    }
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["rows/s"] = benchmark::Counter(static_cast<double>(rows), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["threads"] = keysel::num_threads();
}

void BM_SelectTopkReference(benchmark::State& state) { select_rows<false>(state); }
void BM_FastSelectTopk(benchmark::State& state) {
  const auto level = static_cast<keysel::SimdLevel>(state.range(1));
  if (!keysel::simd_level_supported(level)) {
    state.SkipWithError("SIMD level not supported by this CPU");
    return;
  }
  keysel::ScopedSimdLevel scoped(level);
  select_rows<true>(state);
  state.SetLabel(std::string(keysel::simd_level_name(level)));
}
BENCHMARK(BM_SelectTopkReference)->Arg(1)->Arg(64)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_FastSelectTopk)->ArgsProduct({{1, 64}, {0, 1, 2}})->Unit(benchmark::kMillisecond)->UseRealTime();

// ---- maximum inner product: 64 queries x 131072 keys x D = 128, k = 2048 --------------------------------

const std::vector<float>& bench_queries() { return random_floats(kQueries * kDim, 11); }
const std::vector<float>& bench_keys() { return random_floats(kKeys * kDim, 12); }

std::vector<std::int64_t>& keysel_ids() {
  static std::vector<std::int64_t> ids(static_cast<std::size_t>(kQueries * kK));
  return ids;
}

void BM_InnerProductTopk(benchmark::State& state) {
  const auto level = static_cast<keysel::SimdLevel>(state.range(0));
  if (!keysel::simd_level_supported(level)) {
    state.SkipWithError("SIMD level not supported by this CPU");
    return;
  }
  keysel::ScopedSimdLevel scoped(level);
  const std::vector<float>& queries = bench_queries();
  const std::vector<float>& keys = bench_keys();
  std::vector<float> scores(static_cast<std::size_t>(kQueries * kK));
  std::vector<std::int64_t>& ids = keysel_ids();
  for (auto _ : state) {
    keysel::inner_product_topk(kQueries, queries.data(), kKeys, keys.data(), kDim, kK, scores.data(), ids.data());
    benchmark::DoNotOptimize(ids.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * kQueries * kKeys * kDim, benchmark::Counter::kIsIterationInvariantRate,
                                                 benchmark::Counter::kIs1000);
  state.counters["threads"] = keysel::num_threads();
  state.SetLabel(std::string(keysel::simd_level_name(level)));
}
BENCHMARK(BM_InnerProductTopk)->DenseRange(0, 2)->Unit(benchmark::kMillisecond)->UseRealTime();

#if KEYSEL_FAISS
void BM_FaissIndexFlatIP(benchmark::State& state) {
  const std::vector<float>& queries = bench_queries();
  const std::vector<float>& keys = bench_keys();
  faiss::IndexFlatIP index(kDim);
  index.add(kKeys, keys.data());
  std::vector<float> scores(static_cast<std::size_t>(kQueries * kK));
  std::vector<faiss::Index::idx_t> ids(static_cast<std::size_t>(kQueries * kK));
  for (auto _ : state) {
    index.search(kQueries, queries.data(), kK, scores.data(), ids.data());
    benchmark::DoNotOptimize(ids.data());
  }
  // Agreement with keysel (run first, at the best level): the share of FAISS's ids keysel also returned.
  keysel::inner_product_topk(kQueries, queries.data(), kKeys, keys.data(), kDim, kK, nullptr, keysel_ids().data());
  double shared = 0;
  for (std::int64_t q = 0; q < kQueries; ++q) {
    const std::set<std::int64_t> mine(keysel_ids().begin() + q * kK, keysel_ids().begin() + (q + 1) * kK);
    for (std::int64_t i = 0; i < kK; ++i) shared += mine.count(ids[static_cast<std::size_t>(q * kK + i)]);
  }
  state.counters["same_ids"] = shared / static_cast<double>(kQueries * kK);
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * kQueries * kKeys * kDim, benchmark::Counter::kIsIterationInvariantRate,
                                                 benchmark::Counter::kIs1000);
  state.counters["threads"] = keysel::num_threads();
}
BENCHMARK(BM_FaissIndexFlatIP)->Unit(benchmark::kMillisecond)->UseRealTime();
#endif

}  // namespace

BENCHMARK_MAIN();
