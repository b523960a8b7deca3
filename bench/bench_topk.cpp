// Exact top-k: fast_select_topk against the reference select_topk, and the fused inner-product top-k
// (64 queries x 131072 keys x D = 128, k = 2048) in one run beside
//   - the peer a user would write: OpenBLAS sgemm of the whole [64, 131072] score matrix, then per row
//     std::nth_element + std::sort of (score, index) pairs (what torch.topk and numpy.argpartition do), with its
//     two halves also timed alone;
//   - faiss::IndexFlatIP::search;
//   - the CPU's multiply-accumulate ceilings: register-only loops of fp32 FMA (zmm and ymm), int8 vpdpbusd,
//     bf16 vdpbf16ps and int16 vpmaddwd (keysel/core/cpu_features.h), over the same threads.
// docs/performance.md and docs/topk.md have the tables and the commands.
//
//   bench_topk --benchmark_filter='InnerProduct|Blas|Faiss|Ceiling'
// Arguments: rows (query rows of N = 131072 scores, k = 2048); SIMD level 0 scalar, 1 avx2, 2 avx512 (3: avx512 with
// Intel Xeon's multiply-accumulate rates, i.e. the fp32 FMA scan where this CPU would pick the bf16 prefilter).
// Counters: GMAC/s over wall time; GMAC/cpu_s per CPU-second of all threads (process CPU time), the per-core
// rate, which other work sharing the cores depresses far less than the wall-time one.
#include <benchmark/benchmark.h>
#include <omp.h>
#include <time.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "keysel/core/build_config.h"
#include "keysel/core/cpu_features.h"
#include "keysel/core/random.h"
#include "keysel/core/threads.h"
#include "keysel/indexer/fast_topk.h"
#include "keysel/indexer/simd.h"
#include "keysel/indexer/topk.h"

#if KEYSEL_FAISS
#include <faiss/IndexFlat.h>
#endif

#if KEYSEL_BENCH_OPENBLAS
#include <cblas.h>
extern "C" void openblas_set_num_threads(int threads);
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

constexpr double kMacs = static_cast<double>(kQueries) * kKeys * kDim;

std::vector<std::int64_t>& keysel_ids() {
  static std::vector<std::int64_t> ids(static_cast<std::size_t>(kQueries * kK));
  return ids;
}

/// CPU seconds of every thread of the process so far.
double process_cpu_seconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

/// The rate counters of a benchmark that did `macs` multiply-accumulates per iteration.
void set_mac_counters(benchmark::State& state, double macs, double cpu_seconds) {
  const double total = macs * static_cast<double>(state.iterations());
  state.counters["GMAC/s"] = benchmark::Counter(total * 1e-9, benchmark::Counter::kIsRate);
  state.counters["GMAC/cpu_s"] = total * 1e-9 / std::max(cpu_seconds, 1e-12);
  state.counters["threads"] = keysel::num_threads();
}

/// The share of the reference ids (k per query) that `ids` also holds, per query as a set.
template <typename Id>
double shared_ids(const std::vector<std::int64_t>& reference, const std::vector<Id>& ids) {
  double shared = 0;
  for (std::int64_t q = 0; q < kQueries; ++q) {
    const std::set<std::int64_t> mine(reference.begin() + q * kK, reference.begin() + (q + 1) * kK);
    for (std::int64_t i = 0; i < kK; ++i) shared += static_cast<double>(mine.count(static_cast<std::int64_t>(ids[static_cast<std::size_t>(q * kK + i)])));
  }
  return shared / static_cast<double>(kQueries * kK);
}

/// Rates under which choose_kernel picks what it picks on Intel Sapphire/Emerald Rapids (fp32 FMA scans): run on a
/// CPU that would choose the bf16 prefilter, this times the other AVX-512 scan in the same run.
keysel::MacRates xeon_rates() {
  keysel::CpuFeatures xeon = keysel::cpu_features();
  xeon.vendor = "GenuineIntel";
  xeon.family = 6;
  xeon.model = 0x8F;
  return keysel::table_mac_rates(xeon);
}

// Argument: SIMD level 0 scalar, 1 avx2, 2 avx512 (the scan this CPU's rates pick), 3 avx512 with Intel Xeon's
// rates (the fp32 FMA scan, where 2 picks the bf16 prefilter).
void BM_InnerProductTopk(benchmark::State& state) {
  const auto level = static_cast<keysel::SimdLevel>(std::min<std::int64_t>(state.range(0), 2));
  if (!keysel::simd_level_supported(level)) {
    state.SkipWithError("SIMD level not supported by this CPU");
    return;
  }
  keysel::ScopedSimdLevel scoped(level);
  const keysel::ScopedMacRates rates(state.range(0) == 3 ? xeon_rates() : keysel::mac_rates());
  const std::vector<float>& queries = bench_queries();
  const std::vector<float>& keys = bench_keys();
  std::vector<float> scores(static_cast<std::size_t>(kQueries * kK));
  std::vector<std::int64_t>& ids = keysel_ids();
  const double cpu_start = process_cpu_seconds();
  for (auto _ : state) {
    keysel::inner_product_topk(kQueries, queries.data(), kKeys, keys.data(), kDim, kK, scores.data(), ids.data());
    benchmark::DoNotOptimize(ids.data());
  }
  set_mac_counters(state, kMacs, process_cpu_seconds() - cpu_start);
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * kMacs, benchmark::Counter::kIsIterationInvariantRate,
                                                 benchmark::Counter::kIs1000);
  state.SetLabel(std::string(keysel::inner_product_kernel_name()));
}
BENCHMARK(BM_InnerProductTopk)->DenseRange(0, 3)->Unit(benchmark::kMillisecond)->UseRealTime();

#if KEYSEL_BENCH_OPENBLAS
// ---- the peer a user would write: BLAS sgemm of the score matrix, then nth_element + sort per row ----------

std::vector<float>& blas_scores() {
  static std::vector<float> scores(static_cast<std::size_t>(kQueries * kKeys));
  return scores;
}

/// scores [64, 131072] = queries [64, 128] x keys [131072, 128]^T, OpenBLAS with keysel's thread count.
void blas_score_matrix() {
  openblas_set_num_threads(keysel::num_threads());
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(kQueries), static_cast<int>(kKeys),
              static_cast<int>(kDim), 1.0f, bench_queries().data(), static_cast<int>(kDim), bench_keys().data(),
              static_cast<int>(kDim), 0.0f, blas_scores().data(), static_cast<int>(kKeys));
}

/// Per row, in parallel over rows: (score, index) pairs, std::nth_element to put the k best first, std::sort of
/// those k by score (torch.topk's CPU path: a vector of pairs, nth_element, then sort when sorted=True).
void nth_element_rows(std::vector<std::int64_t>& ids) {
  const std::vector<float>& scores = blas_scores();
#pragma omp parallel num_threads(keysel::num_threads())
  {
    std::vector<std::pair<float, std::int64_t>> row(static_cast<std::size_t>(kKeys));
#pragma omp for schedule(static)
    for (std::int64_t q = 0; q < kQueries; ++q) {
      for (std::int64_t j = 0; j < kKeys; ++j) row[static_cast<std::size_t>(j)] = {scores[static_cast<std::size_t>(q * kKeys + j)], j};
      const auto by_score = [](const auto& a, const auto& b) { return a.first > b.first; };
      std::nth_element(row.begin(), row.begin() + (kK - 1), row.end(), by_score);
      std::sort(row.begin(), row.begin() + kK, by_score);
      for (std::int64_t i = 0; i < kK; ++i) ids[static_cast<std::size_t>(q * kK + i)] = row[static_cast<std::size_t>(i)].second;
    }
  }
}

void BM_BlasNthElement(benchmark::State& state) {
  std::vector<std::int64_t> ids(static_cast<std::size_t>(kQueries * kK));
  const double cpu_start = process_cpu_seconds();
  for (auto _ : state) {
    blas_score_matrix();
    nth_element_rows(ids);
    benchmark::DoNotOptimize(ids.data());
  }
  set_mac_counters(state, kMacs, process_cpu_seconds() - cpu_start);
  keysel::inner_product_topk(kQueries, bench_queries().data(), kKeys, bench_keys().data(), kDim, kK, nullptr,
                             keysel_ids().data());
  state.counters["same_ids"] = shared_ids(keysel_ids(), ids);
  state.SetLabel("OpenBLAS sgemm + std::nth_element + std::sort");
}
BENCHMARK(BM_BlasNthElement)->Unit(benchmark::kMillisecond)->UseRealTime();

// The peer's two halves alone: the matrix product, and the selection from the materialised matrix.
void BM_BlasSgemmOnly(benchmark::State& state) {
  const double cpu_start = process_cpu_seconds();
  for (auto _ : state) {
    blas_score_matrix();
    benchmark::DoNotOptimize(blas_scores().data());
  }
  set_mac_counters(state, kMacs, process_cpu_seconds() - cpu_start);
  state.SetLabel("OpenBLAS sgemm [64, 131072, 128]");
}
BENCHMARK(BM_BlasSgemmOnly)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_BlasNthElementOnly(benchmark::State& state) {
  blas_score_matrix();
  std::vector<std::int64_t> ids(static_cast<std::size_t>(kQueries * kK));
  for (auto _ : state) {
    nth_element_rows(ids);
    benchmark::DoNotOptimize(ids.data());
  }
  state.counters["threads"] = keysel::num_threads();
  state.SetLabel("std::nth_element + std::sort of 64 rows");
}
BENCHMARK(BM_BlasNthElementOnly)->Unit(benchmark::kMillisecond)->UseRealTime();
#endif

// ---- the machine's multiply-accumulate ceilings, same threads -----------------------------------------------

void BM_Ceiling(benchmark::State& state) {
  const auto op = static_cast<keysel::MacOp>(state.range(0));
  if (!keysel::cpu_runs(keysel::cpu_features(), op)) {
    state.SkipWithError("this CPU lacks the instruction");
    return;
  }
  keysel::PeakRate best;
  for (auto _ : state) {
    const keysel::PeakRate peak = keysel::measure_peak(op, keysel::num_threads(), 0.1);
    best.gmacs = std::max(best.gmacs, peak.gmacs);
    best.gmacs_per_core = std::max(best.gmacs_per_core, peak.gmacs_per_core);
  }
  state.counters["GMAC/s"] = best.gmacs;
  state.counters["GMAC/cpu_s"] = best.gmacs_per_core;
  state.counters["threads"] = keysel::num_threads();
  state.SetLabel(std::string(keysel::mac_op_name(op)) + " (" + std::to_string(keysel::mac_op_width(op)) +
                 " MAC), best of the iterations; " + keysel::cpu_features().model_name);
}
BENCHMARK(BM_Ceiling)
    ->Arg(static_cast<int>(keysel::MacOp::fma_zmm))
    ->Arg(static_cast<int>(keysel::MacOp::fma_ymm))
    ->Arg(static_cast<int>(keysel::MacOp::dpbusd_zmm))
    ->Arg(static_cast<int>(keysel::MacOp::dpbf16_zmm))
    ->Arg(static_cast<int>(keysel::MacOp::madd16_ymm))
    ->Iterations(5)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

#if KEYSEL_FAISS
void BM_FaissIndexFlatIP(benchmark::State& state) {
  const std::vector<float>& queries = bench_queries();
  const std::vector<float>& keys = bench_keys();
  faiss::IndexFlatIP index(kDim);
  index.add(kKeys, keys.data());
  std::vector<float> scores(static_cast<std::size_t>(kQueries * kK));
  std::vector<faiss::Index::idx_t> ids(static_cast<std::size_t>(kQueries * kK));
  const double cpu_start = process_cpu_seconds();
  for (auto _ : state) {
    index.search(kQueries, queries.data(), kK, scores.data(), ids.data());
    benchmark::DoNotOptimize(ids.data());
  }
  set_mac_counters(state, kMacs, process_cpu_seconds() - cpu_start);
  // Agreement with keysel (at the best level): the share of FAISS's ids keysel also returned.
  keysel::inner_product_topk(kQueries, queries.data(), kKeys, keys.data(), kDim, kK, nullptr, keysel_ids().data());
  state.counters["same_ids"] = shared_ids(keysel_ids(), ids);
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * kMacs, benchmark::Counter::kIsIterationInvariantRate,
                                                 benchmark::Counter::kIs1000);
}
BENCHMARK(BM_FaissIndexFlatIP)->Unit(benchmark::kMillisecond)->UseRealTime();
#endif

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("cpu", keysel::cpu_features().str());
  benchmark::AddCustomContext("simd_level", std::string(keysel::simd_level_name(keysel::simd_level())));
  benchmark::AddCustomContext("mac_rates", keysel::mac_rates().source);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
