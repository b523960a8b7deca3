// The Lightning Indexer in decode (T = 1, HI = 64, DI = 128, N = 131072) for each key format, beside the
// machine's own ceilings measured in the same run, and (with --fidelity) the recall@2048 / mass of each format
// against the fp32 indexer.
//   nice -n -5 ./build/bench/bench_indexer                      # throughput
//   ./build/bench/bench_indexer --fidelity                       # fidelity table, then exit
//   KEYSEL_SIMD=avx2 ./build/bench/bench_indexer ...             # a lower SIMD level
// GCC 12 flags its own _mm512_undefined_* placeholders inside the intrinsic headers (a known false positive).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <benchmark/benchmark.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "keysel/core/random.h"
#include "keysel/core/threads.h"
#include "keysel/indexer/lightning_indexer.h"
#include "keysel/indexer/simd.h"
#include "keysel/indexer/topk.h"
#include "keysel/recall/metrics.h"

namespace {

constexpr std::int64_t kHeads = 64, kDim = 128, kKeys = 131072;

/// Indexer keys and queries with the structure that makes low precision hard: a few outlier channels.
std::vector<float> indexer_vectors(std::int64_t rows, std::uint64_t seed) {
  std::vector<float> x(static_cast<std::size_t>(rows * kDim));
  keysel::RandomStream(seed).fill_normal(x);
  for (std::int64_t r = 0; r < rows; ++r)
    for (const std::int64_t d : {5, 37, 64, 100}) x[static_cast<std::size_t>(r * kDim + d)] *= 10.0f;
  return x;
}

const std::vector<float>& bench_keys() {
  static const std::vector<float> keys = indexer_vectors(kKeys, 1);
  return keys;
}

keysel::QuantizationConfig config_of(int index, bool hadamard) {
  static const keysel::DType formats[] = {keysel::DType::fp32, keysel::DType::bf16, keysel::DType::fp16,
                                          keysel::DType::fp8_e4m3, keysel::DType::fp8_e5m2, keysel::DType::int8,
                                          keysel::DType::int4};
  keysel::QuantizationConfig config;
  config.format = formats[index];
  config.hadamard = hadamard;
  return config;
}

const keysel::LightningIndexer& bench_indexer(int index) {
  static std::map<int, std::unique_ptr<keysel::LightningIndexer>> indexers;
  auto& slot = indexers[index];
  if (!slot) {
    slot = std::make_unique<keysel::LightningIndexer>(kHeads, kDim, config_of(index, false));
    slot->append_keys(kKeys, bench_keys().data());
  }
  return *slot;
}

void BM_IndexerDecode(benchmark::State& state) {
  const keysel::LightningIndexer& indexer = bench_indexer(static_cast<int>(state.range(0)));
  const std::vector<float> queries = indexer_vectors(kHeads, 2);
  std::vector<float> weights(kHeads);
  keysel::RandomStream(3).fill_normal(weights, 0.0, 0.125);
  std::vector<std::int32_t> positions{static_cast<std::int32_t>(kKeys - 1)};
  std::vector<float> scores(kKeys);
  const keysel::TensorView q(queries.data(), keysel::DType::fp32, {1, kHeads, kDim});
  const keysel::TensorView w(weights.data(), keysel::DType::fp32, {1, kHeads});
  const keysel::TensorView pos(positions.data(), keysel::DType::int32, {1});
  const keysel::TensorView out(scores.data(), keysel::DType::fp32, {1, kKeys});
  for (auto _ : state) {
    indexer.score(q, w, pos, out);
    benchmark::DoNotOptimize(scores.data());
  }
  const double n = static_cast<double>(state.iterations()) * kKeys;
  state.counters["keys/s"] = benchmark::Counter(n, benchmark::Counter::kIsRate);
  state.counters["key_GB/s"] =
      benchmark::Counter(n * static_cast<double>(indexer.cache().bytes_per_token()) * 1e-9, benchmark::Counter::kIsRate);
  state.counters["GMAC/s"] = benchmark::Counter(n * kHeads * kDim * 1e-9, benchmark::Counter::kIsRate);
  state.SetLabel(std::string(keysel::dtype_name(indexer.config().format)) + " " +
                 std::string(keysel::simd_level_name(keysel::simd_level())) + " " +
                 std::to_string(indexer.cache().bytes_per_token()) + " B/token");
}
BENCHMARK(BM_IndexerDecode)->DenseRange(0, 6)->Unit(benchmark::kMillisecond)->UseRealTime();

// Score then select k = 2048 (select_topk over the full score row).
void BM_IndexerDecodeSelect(benchmark::State& state) {
  const keysel::LightningIndexer& indexer = bench_indexer(static_cast<int>(state.range(0)));
  const std::vector<float> queries = indexer_vectors(kHeads, 2);
  std::vector<float> weights(kHeads, 0.125f);
  std::vector<std::int32_t> positions{static_cast<std::int32_t>(kKeys - 1)};
  keysel::SelectionPolicy policy;
  policy.k = 2048;
  std::vector<std::int32_t> selection(static_cast<std::size_t>(policy.k));
  for (auto _ : state) {
    indexer.select(keysel::TensorView(queries.data(), keysel::DType::fp32, {1, kHeads, kDim}),
                   keysel::TensorView(weights.data(), keysel::DType::fp32, {1, kHeads}),
                   keysel::TensorView(positions.data(), keysel::DType::int32, {1}), policy,
                   keysel::TensorView(selection.data(), keysel::DType::int32, {1, 1, policy.k}));
    benchmark::DoNotOptimize(selection.data());
  }
  state.counters["keys/s"] = benchmark::Counter(static_cast<double>(state.iterations()) * kKeys, benchmark::Counter::kIsRate);
  state.SetLabel(std::string(keysel::dtype_name(indexer.config().format)));
}
BENCHMARK(BM_IndexerDecodeSelect)->Arg(3)->Arg(5)->Unit(benchmark::kMillisecond)->UseRealTime();

// ---- the machine's ceilings ---------------------------------------------------------------------------------

// Memory copy over all threads, 256 MiB each way: bytes copied per second (read + write is twice that).
void BM_CeilingMemcpy(benchmark::State& state) {
  const std::size_t bytes = std::size_t{256} << 20;
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  for (auto _ : state) {
#pragma omp parallel
    {
      const std::size_t threads = static_cast<std::size_t>(omp_get_num_threads());
      const std::size_t id = static_cast<std::size_t>(omp_get_thread_num());
      const std::size_t chunk = bytes / threads;
      std::memcpy(dst.data() + id * chunk, src.data() + id * chunk, chunk);
    }
    benchmark::DoNotOptimize(dst.data());
  }
  state.counters["copy_GB/s"] =
      benchmark::Counter(static_cast<double>(state.iterations()) * static_cast<double>(bytes) * 1e-9, benchmark::Counter::kIsRate);
}
BENCHMARK(BM_CeilingMemcpy)->Unit(benchmark::kMillisecond)->UseRealTime();

// Peak multiply-accumulate loops over all threads: 12 independent accumulators as named locals (GCC keeps an
// array of vectors in memory), no memory traffic.
#define KEYSEL_PEAK_12(op) op(0) op(1) op(2) op(3) op(4) op(5) op(6) op(7) op(8) op(9) op(10) op(11)
template <int Kind>
__attribute__((target("avx512f,avx512bw,avx512vnni,avx512bf16,fma,avx2"))) double peak_loop(std::int64_t iterations) {
#define KEYSEL_DECLARE_F(a) __m512 f##a = _mm512_set1_ps(1e-3f * a);
#define KEYSEL_DECLARE_I(a) __m512i i##a = _mm512_set1_epi32(a);
  KEYSEL_PEAK_12(KEYSEL_DECLARE_F)
  KEYSEL_PEAK_12(KEYSEL_DECLARE_I)
  const __m512 x = _mm512_set1_ps(0.999f), y = _mm512_set1_ps(1e-6f);
  const __m512i bx = _mm512_set1_epi8(1), by = _mm512_set1_epi8(2);
#define KEYSEL_FMA(a) f##a = _mm512_fmadd_ps(f##a, x, y);
#define KEYSEL_VNNI(a) i##a = _mm512_dpbusd_epi32(i##a, bx, by);
#define KEYSEL_BF16(a) f##a = _mm512_dpbf16_ps(f##a, (__m512bh)bx, (__m512bh)by);
  for (std::int64_t it = 0; it < iterations; ++it) {
    if constexpr (Kind == 0) { KEYSEL_PEAK_12(KEYSEL_FMA) }
    if constexpr (Kind == 1) { KEYSEL_PEAK_12(KEYSEL_VNNI) }
    if constexpr (Kind == 2) { KEYSEL_PEAK_12(KEYSEL_BF16) }
  }
  double sum = 0;
#define KEYSEL_SUM(a) sum += _mm512_reduce_add_ps(f##a) + _mm512_reduce_add_epi32(i##a);
  KEYSEL_PEAK_12(KEYSEL_SUM)
  return sum;
}

template <int Kind>
void BM_CeilingPeak(benchmark::State& state) {
  const keysel::CpuFeatures& cpu = keysel::cpu_features();
  if (!keysel::cpu_runs(cpu, keysel::MacOp::dpbusd_zmm) || !keysel::cpu_runs(cpu, keysel::MacOp::dpbf16_zmm)) {
    state.SkipWithError("the peak loops need AVX-512 with VNNI and BF16");
    return;
  }
  constexpr std::int64_t kIterations = 1 << 20;
  const double macs_per_instruction = Kind == 0 ? 16 : Kind == 1 ? 64 : 32;
  double sink = 0;
  int threads = 1;
  for (auto _ : state) {
#pragma omp parallel reduction(+ : sink)
    {
      sink += peak_loop<Kind>(kIterations);
#pragma omp single
      threads = omp_get_num_threads();
    }
  }
  benchmark::DoNotOptimize(sink);
  state.counters["GMAC/s"] = benchmark::Counter(static_cast<double>(state.iterations()) * threads * kIterations * 12 *
                                                    macs_per_instruction * 1e-9,
                                                benchmark::Counter::kIsRate);
  state.SetLabel(Kind == 0 ? "fp32 FMA (vfmadd, 16 MAC)" : Kind == 1 ? "int8 vpdpbusd (64 MAC)" : "bf16 vdpbf16ps (32 MAC)");
}
BENCHMARK(BM_CeilingPeak<0>)->Name("BM_CeilingPeakFma")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_CeilingPeak<1>)->Name("BM_CeilingPeakInt8Vnni")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_CeilingPeak<2>)->Name("BM_CeilingPeakBf16Dot")->Unit(benchmark::kMillisecond)->UseRealTime();

// ---- fidelity -------------------------------------------------------------------------------------------------

int fidelity_table() {
  constexpr std::int64_t n = 32768, tokens = 8, k = 2048;
  const std::vector<float> keys = indexer_vectors(n, 11);
  const std::vector<float> queries = indexer_vectors(tokens * kHeads, 12);
  std::vector<float> weights(static_cast<std::size_t>(tokens * kHeads));
  keysel::RandomStream(13).fill_normal(weights, 0.0, 0.125);
  std::vector<std::int32_t> positions(tokens);
  for (std::int64_t t = 0; t < tokens; ++t) positions[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(n - tokens + t);
  const keysel::TensorView q(queries.data(), keysel::DType::fp32, {tokens, kHeads, kDim});
  const keysel::TensorView w(weights.data(), keysel::DType::fp32, {tokens, kHeads});
  const keysel::TensorView pos(positions.data(), keysel::DType::int32, {tokens});
  keysel::SelectionPolicy policy;
  policy.k = k;

  // The fp32 indexer's own distribution softmax(I) is the reference the recall and mass refer to.
  keysel::LightningIndexer reference(kHeads, kDim, config_of(0, false));
  reference.append_keys(n, keys.data());
  std::vector<float> scores(static_cast<std::size_t>(tokens * n));
  reference.score(q, w, pos, keysel::TensorView(scores.data(), keysel::DType::fp32, {tokens, n}));
  // The indexer's distribution softmax(c * I): raw indexer scores are far too peaked for a mass to say anything,
  // so c is set per token such that the fp32 top-k holds 90% of the probability (bisection on log c).
  std::vector<std::vector<double>> pbar(tokens);
  for (std::int64_t t = 0; t < tokens; ++t) {
    const std::int64_t allowed = positions[static_cast<std::size_t>(t)] + 1;
    std::vector<double> row(scores.begin() + t * n, scores.begin() + t * n + allowed);
    std::vector<double> sorted = row;
    std::sort(sorted.begin(), sorted.end(), std::greater<>());
    const auto distribution = [&](double c) {
      std::vector<double> p(static_cast<std::size_t>(n), 0.0);
      double sum = 0;
      for (std::int64_t s = 0; s < allowed; ++s) sum += p[static_cast<std::size_t>(s)] = std::exp(c * (row[static_cast<std::size_t>(s)] - sorted[0]));
      for (double& v : p) v /= sum;
      return p;
    };
    const auto top_mass = [&](double c) {
      double top = 0, sum = 0;
      for (std::size_t i = 0; i < sorted.size(); ++i) {
        const double e = std::exp(c * (sorted[i] - sorted[0]));
        sum += e;
        if (i < static_cast<std::size_t>(k)) top += e;
      }
      return top / sum;
    };
    double lo = -30, hi = 30;  // log c
    for (int it = 0; it < 100; ++it) {
      const double mid = 0.5 * (lo + hi);
      (top_mass(std::exp(mid)) < 0.9 ? lo : hi) = mid;
    }
    pbar[static_cast<std::size_t>(t)] = distribution(std::exp(0.5 * (lo + hi)));
  }

  std::printf("Fidelity of each indexer key/query format against the fp32 indexer (synthetic: N = %lld, T = %lld,\n"
              "HI = %lld, DI = %lld, 4 outlier channels x10; k = %lld; mass under softmax(c * I_fp32) with c such that the\n"
              "fp32 top-k holds 90%%; mean over tokens)\n\n",
              static_cast<long long>(n), static_cast<long long>(tokens), static_cast<long long>(kHeads),
              static_cast<long long>(kDim), static_cast<long long>(k));
  std::printf("| format | scales | B/token | recall@2048 | mass ratio | recall@2048, Hadamard | mass ratio, Hadamard |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  for (int index = 0; index < 7; ++index) {
    for (const std::int64_t group : {std::int64_t{0}, std::int64_t{32}}) {
      if (group != 0 && index < 3) continue;  // fp32/bf16/fp16: per-group scales change nothing worth showing
      double recall[2] = {}, mass[2] = {};
      std::int64_t bytes = 0;
      for (int rotated = 0; rotated < 2; ++rotated) {
        keysel::QuantizationConfig config = config_of(index, rotated == 1);
        if (group != 0) {
          config.granularity = keysel::ScaleGranularity::per_group;
          config.group_size = group;
        }
        keysel::LightningIndexer indexer(kHeads, kDim, config);
        indexer.append_keys(n, keys.data());
        bytes = indexer.cache().bytes_per_token();
        std::vector<std::int32_t> selection(static_cast<std::size_t>(tokens * k));
        indexer.select(q, w, pos, policy, keysel::TensorView(selection.data(), keysel::DType::int32, {tokens, 1, k}));
        for (std::int64_t t = 0; t < tokens; ++t) {
          const keysel::SelectionMetrics m = keysel::selection_metrics(
              pbar[static_cast<std::size_t>(t)], positions[static_cast<std::size_t>(t)] + 1,
              std::span<const std::int32_t>(selection.data() + t * k, static_cast<std::size_t>(k)), k);
          recall[rotated] += m.recall / tokens;
          mass[rotated] += m.mass_ratio / tokens;
        }
      }
      std::printf("| %s | %s | %lld | %.4f | %.4f | %.4f | %.4f |\n", std::string(keysel::dtype_name(config_of(index, false).format)).c_str(),
                  group == 0 ? "per token" : "per 32 channels", static_cast<long long>(bytes), recall[0], mass[0],
                  recall[1], mass[1]);
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--fidelity") == 0) return fidelity_table();
  }
  std::printf("keysel indexer benchmark: SIMD level %s, %d threads\n",
              std::string(keysel::simd_level_name(keysel::simd_level())).c_str(), keysel::num_threads());
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
