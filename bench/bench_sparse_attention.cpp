// Sparse attention on the CPU against full attention of the same kernel and against the memory-copy bandwidth
// measured in the same run; then one decode step (select + attend) per selector.
//
// Decode shape: T = 1, Hq = 32, Hkv = 8, D = Dv = 128, bf16 K/V, N = 131072 cached tokens, k = 2048 per key
// head (per_kv_head). Counters:
//   gathered_GBps  bytes of K and V rows the selection names (k * Hkv * (D + Dv) * 2) per second
//   bytes_per_second on BM_MemoryCopy: bytes copied per second (each byte read once and written once)
//
//   nice -n -5 build-h9/bench/bench_sparse_attention --benchmark_min_time=2
//
// With FAISS (KEYSEL_FAISS), BM_DecodeStep/8 is the FAISS candidate selector (IVF1024,Flat + MIPS, nprobe 32); its
// 8 per-key-head indexes are built once, before the timed loop, and reported as build_s:
//   OMP_NUM_THREADS=1 build-h13/bench/bench_sparse_attention --benchmark_filter='BM_DecodeStep/8'
#include <benchmark/benchmark.h>

#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <new>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "keysel/attention/sparse_attention.h"
#include "keysel/core/build_config.h"
#include "keysel/core/random.h"
#include "keysel/core/threads.h"
#include "keysel/indexer/candidate_search.h"
#include "keysel/indexer/lightning_indexer.h"
#include "keysel/indexer/proxy_scorer.h"
#include "keysel/indexer/selector.h"
#include "keysel/indexer/selectors.h"

namespace {

constexpr std::int64_t kKeys = 131072, kQueryHeads = 32, kKvHeads = 8, kDim = 128, kTopK = 2048;

/// Memory for a large cache: 2 MiB aligned and, where the kernel allows (transparent huge pages in madvise
/// mode), backed by huge pages, as a serving engine allocates its KV cache. A gather of scattered rows then
/// misses the TLB far less often. KEYSEL_BENCH_SMALL_PAGES=1 keeps 4 KiB pages to measure the difference.
template <typename T>
struct CacheAllocator {
  using value_type = T;
  CacheAllocator() = default;
  template <typename U>
  CacheAllocator(const CacheAllocator<U>&) {}
  T* allocate(std::size_t n) {
    const std::size_t align = std::size_t{2} << 20;
    const std::size_t bytes = (n * sizeof(T) + align - 1) / align * align;
    void* p = std::aligned_alloc(align, bytes);
    if (p == nullptr) throw std::bad_alloc();
    if (std::getenv("KEYSEL_BENCH_SMALL_PAGES") == nullptr) madvise(p, bytes, MADV_HUGEPAGE);
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t) { std::free(p); }
  template <typename U>
  bool operator==(const CacheAllocator<U>&) const { return true; }
};
template <typename T>
using CacheVector = std::vector<T, CacheAllocator<T>>;

/// One sequence's bf16 KV cache and a decode query, built once (about 0.5 GiB).
struct DecodeCache {
  CacheVector<std::uint16_t> k, v;      // [N, Hkv, D] bf16
  CacheVector<std::uint16_t> q;         // [1, Hq, D] bf16
  std::vector<std::int32_t> positions;  // {N - 1}
  std::vector<std::int32_t> selection;  // [1, Hkv, k]: random distinct keys, ascending (a top-k is scattered)

  DecodeCache() {
    keysel::RandomStream rng(2024);
    const auto fill = [&](auto& out, std::size_t n) {
      out.resize(n);
#pragma omp parallel for schedule(static)
      for (std::int64_t block = 0; block < static_cast<std::int64_t>(n / 4096); ++block) {
        keysel::RandomStream local(7, static_cast<std::uint64_t>(block) + (n == q.size() ? 1u << 30 : 0));
        for (std::size_t i = 0; i < 4096; ++i) {
          out[static_cast<std::size_t>(block) * 4096 + i] = keysel::fp32_to_bf16_bits(static_cast<float>(local.normal()));
        }
      }
      for (std::size_t i = n / 4096 * 4096; i < n; ++i) out[i] = keysel::fp32_to_bf16_bits(static_cast<float>(rng.normal()));
    };
    fill(k, static_cast<std::size_t>(kKeys * kKvHeads * kDim));
    fill(v, static_cast<std::size_t>(kKeys * kKvHeads * kDim));
    fill(q, static_cast<std::size_t>(kQueryHeads * kDim));
    positions = {static_cast<std::int32_t>(kKeys - 1)};
    selection.resize(static_cast<std::size_t>(kKvHeads * kTopK));
    std::vector<std::int32_t> all(static_cast<std::size_t>(kKeys));
    for (std::int64_t g = 0; g < kKvHeads; ++g) {
      std::iota(all.begin(), all.end(), 0);
      rng.shuffle(std::span<std::int32_t>(all));
      std::sort(all.begin(), all.begin() + kTopK);
      std::copy_n(all.begin(), kTopK, selection.begin() + g * kTopK);
    }
  }

  keysel::AttentionInputs inputs() const {
    keysel::AttentionInputs in;
    in.q = keysel::TensorView(q.data(), keysel::DType::bf16, {1, kQueryHeads, kDim});
    in.k = keysel::TensorView(k.data(), keysel::DType::bf16, {kKeys, kKvHeads, kDim});
    in.v = keysel::TensorView(v.data(), keysel::DType::bf16, {kKeys, kKvHeads, kDim});
    in.positions = keysel::TensorView(positions.data(), keysel::DType::int32, {1});
    return in;
  }
};

const DecodeCache& cache() {
  static const DecodeCache instance;
  return instance;
}

constexpr double kGatheredBytes = double(kTopK) * kKvHeads * kDim * 2 /*bytes*/ * 2 /*K and V*/;

keysel::AttentionKernel kernel_arg(std::int64_t i) { return static_cast<keysel::AttentionKernel>(i); }

bool runs(keysel::AttentionKernel kernel) {
  const auto all = keysel::available_attention_kernels();
  return kernel == keysel::AttentionKernel::automatic || std::find(all.begin(), all.end(), kernel) != all.end();
}

// Memory-copy bandwidth with keysel's threads, each copying its share of a 512 MiB buffer (far beyond caches).
void BM_MemoryCopy(benchmark::State& state) {
  const std::size_t bytes = std::size_t{512} << 20;
  CacheVector<char> src(bytes, 1), dst(bytes, 0);
  const int threads = keysel::num_threads();
  for (auto _ : state) {
#pragma omp parallel num_threads(threads)
    {
      const std::size_t parts = static_cast<std::size_t>(omp_get_num_threads());
      const std::size_t part = static_cast<std::size_t>(omp_get_thread_num());
      const std::size_t begin = bytes * part / parts, end = bytes * (part + 1) / parts;
      std::memcpy(dst.data() + begin, src.data() + begin, end - begin);
    }
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(bytes));
  state.counters["threads"] = threads;
}
BENCHMARK(BM_MemoryCopy)->Unit(benchmark::kMillisecond)->UseRealTime();

// Sparse attention over k = 2048 keys per key head; argument: kernel (0 automatic, 1 scalar, 2 avx2, 3 avx512).
void BM_SparseAttention(benchmark::State& state) {
  const auto kernel = kernel_arg(state.range(0));
  if (!runs(kernel)) {
    state.SkipWithError("kernel not supported by this CPU");
    return;
  }
  const DecodeCache& c = cache();
  std::vector<float> out(kQueryHeads * kDim), lse(kQueryHeads);
  const keysel::TensorView selection(c.selection.data(), keysel::DType::int32, {1, kKvHeads, kTopK});
  const keysel::TensorView out_view(out.data(), keysel::DType::fp32, {1, kQueryHeads, kDim});
  const keysel::TensorView lse_view(lse.data(), keysel::DType::fp32, {1, kQueryHeads});
  const auto inputs = c.inputs();
  for (auto _ : state) {
    keysel::sparse_attention(inputs, selection, keysel::Granularity::per_kv_head, out_view, lse_view, {kernel, 0});
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["gathered_GBps"] =
      benchmark::Counter(kGatheredBytes * 1e-9 * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.SetLabel(std::string(keysel::attention_kernel_name(kernel)));
}
BENCHMARK(BM_SparseAttention)->DenseRange(0, 3)->Unit(benchmark::kMicrosecond)->UseRealTime();

// The same amount of work over the k most recent keys (contiguous rows): the kernel's compute-bound floor.
void BM_SparseAttentionContiguousKeys(benchmark::State& state) {
  const auto kernel = kernel_arg(state.range(0));
  if (!runs(kernel)) {
    state.SkipWithError("kernel not supported by this CPU");
    return;
  }
  const DecodeCache& c = cache();
  std::vector<std::int32_t> recent(static_cast<std::size_t>(kKvHeads * kTopK));
  for (std::int64_t g = 0; g < kKvHeads; ++g) {
    std::iota(recent.begin() + g * kTopK, recent.begin() + (g + 1) * kTopK, static_cast<std::int32_t>(kKeys - kTopK));
  }
  std::vector<float> out(kQueryHeads * kDim), lse(kQueryHeads);
  const keysel::TensorView selection(recent.data(), keysel::DType::int32, {1, kKvHeads, kTopK});
  const auto inputs = c.inputs();
  for (auto _ : state) {
    keysel::sparse_attention(inputs, selection, keysel::Granularity::per_kv_head,
                             keysel::TensorView(out.data(), keysel::DType::fp32, {1, kQueryHeads, kDim}),
                             keysel::TensorView(lse.data(), keysel::DType::fp32, {1, kQueryHeads}), {kernel, 0});
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["gathered_GBps"] =
      benchmark::Counter(kGatheredBytes * 1e-9 * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.SetLabel(std::string(keysel::attention_kernel_name(kernel)));
}
BENCHMARK(BM_SparseAttentionContiguousKeys)->Arg(0)->Unit(benchmark::kMicrosecond)->UseRealTime();

// Full causal attention over all N keys with the same kernel.
void BM_FullAttention(benchmark::State& state) {
  const auto kernel = kernel_arg(state.range(0));
  if (!runs(kernel)) {
    state.SkipWithError("kernel not supported by this CPU");
    return;
  }
  const DecodeCache& c = cache();
  std::vector<float> out(kQueryHeads * kDim), lse(kQueryHeads);
  const auto inputs = c.inputs();
  for (auto _ : state) {
    keysel::full_attention_fast(inputs, keysel::TensorView(out.data(), keysel::DType::fp32, {1, kQueryHeads, kDim}),
                                keysel::TensorView(lse.data(), keysel::DType::fp32, {1, kQueryHeads}), {kernel, 0});
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["read_GBps"] = benchmark::Counter(
      double(kKeys) * kKvHeads * kDim * 4 * 1e-9 * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.SetLabel(std::string(keysel::attention_kernel_name(kernel)));
}
BENCHMARK(BM_FullAttention)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();

// ---- one decode step per selector ------------------------------------------------------------------------

/// A Lightning Indexer over the cache (HI = 64, DI = 128, fp8 keys; indexer key of a token = mean of its key
/// heads, as examples/decode_with_indexer.cpp does) with random indexer queries, built once.
std::shared_ptr<const keysel::LightningIndexer> bench_indexer() {
  static const std::shared_ptr<const keysel::LightningIndexer> indexer = [] {
    auto built = std::make_shared<keysel::LightningIndexer>(64, kDim, keysel::QuantizationConfig{.format = keysel::DType::fp8_e4m3});
    const DecodeCache& c = cache();
    std::vector<float> keys(static_cast<std::size_t>(kKeys * kDim), 0.0f);
    for (std::int64_t s = 0; s < kKeys; ++s) {
      for (std::int64_t i = 0; i < kKvHeads * kDim; ++i) {
        keys[static_cast<std::size_t>(s * kDim + i % kDim)] +=
            keysel::bf16_bits_to_fp32(c.k[static_cast<std::size_t>(s * kKvHeads * kDim + i)]) / kKvHeads;
      }
    }
    built->append_keys(kKeys, keys.data());
    return built;
  }();
  return indexer;
}

using SelectorFactory = std::function<std::unique_ptr<keysel::Selector>()>;

struct NamedSelector {
  const char* name;
  SelectorFactory make;
  keysel::Granularity granularity;
  bool stateful = false;  // keeps block summaries between steps: time it warm
  bool build_once = false;  // builds an index on its first select(): build it once per process, outside the
                            // timed loop (Google Benchmark calls BM_DecodeStep several times), report build_s
};

const std::vector<NamedSelector>& decode_selectors() {
  static const std::vector<NamedSelector> selectors = {
      {"exact", [] { return keysel::make_exact_selector(); }, keysel::Granularity::per_kv_head},
      {"random", [] { return keysel::make_random_selector(1); }, keysel::Granularity::per_kv_head},
      {"streaming", [] { return keysel::make_streaming_selector(4); }, keysel::Granularity::per_kv_head},
      {"block-topk-b16", [] { return keysel::make_block_topk_selector({16, 1.0, true}); }, keysel::Granularity::per_kv_head,
       true},
      {"block-topk-b16-x4", [] { return keysel::make_block_topk_selector({16, 4.0, true}); },
       keysel::Granularity::per_kv_head, true},
      {"hybrid(block-topk-b16,k'=8192)",
       [] { return keysel::make_hybrid_selector(keysel::make_block_topk_selector({16, 1.0, true}), 4 * kTopK); },
       keysel::Granularity::per_kv_head, true},
      {"proxy-fp8-logsumexp",
       [] {
         keysel::ProxyConfig config;
         config.quantization.format = keysel::DType::fp8_e4m3;
         return keysel::make_proxy_selector(keysel::ProxyScorer(config));
       },
       keysel::Granularity::per_kv_head},
      {"lightning-indexer-fp8 (HI=64, per_token)",
       [] {
         keysel::RandomStream rng(5);
         std::vector<float> queries(64 * kDim), weights(64);
         rng.fill_normal(queries);
         rng.fill_normal(weights, 0.0, 0.1);
         return keysel::make_indexer_selector(bench_indexer(), queries, weights);
       },
       keysel::Granularity::per_token},
#if KEYSEL_FAISS
      // FAISS candidates (keysel::built_with_faiss()): one IVF1024,Flat index per key head over the MIPS transform,
      // trained on and holding all N keys; nprobe 32 lists per search, each of the group's 4 query heads searches,
      // k' = the free slots, exact re-rank of the union (docs/candidate-search.md).
      {"faiss IVF1024,Flat+mips, nprobe 32",
       [] {
         keysel::CandidateSelectorOptions options;
         options.search.nprobe = 32;
         keysel::CandidateSearchOptions index_options;
         index_options.mips_to_l2 = true;
         return keysel::make_candidate_selector("IVF1024,Flat", options, index_options);
       },
       keysel::Granularity::per_kv_head, true, true},
#endif
  };
  return selectors;
}

// select + sparse attention for one decode token; argument: index into decode_selectors().
void BM_DecodeStep(benchmark::State& state) {
  const NamedSelector& entry = decode_selectors()[static_cast<std::size_t>(state.range(0))];
  const DecodeCache& c = cache();
  // Selectors built once per process (an index over the cache), with the seconds their build took.
  static std::map<std::size_t, std::pair<std::shared_ptr<keysel::Selector>, double>> built;
  std::shared_ptr<keysel::Selector> selector;
  if (entry.build_once) {
    auto found = built.find(static_cast<std::size_t>(state.range(0)));
    if (found != built.end()) selector = found->second.first;
  }
  const bool fresh = selector == nullptr;
  if (fresh) selector = entry.make();
  keysel::SelectionPolicy policy;
  policy.k = kTopK;
  policy.granularity = entry.granularity;
  policy.n_sink = 4;
  policy.n_local = 64;
  const std::int64_t groups = keysel::group_count(policy.granularity, kQueryHeads, kKvHeads);
  std::vector<std::int32_t> selection(static_cast<std::size_t>(groups * policy.width()));
  const keysel::TensorView selection_view(selection.data(), keysel::DType::int32, {1, groups, policy.width()});
  std::vector<float> out(kQueryHeads * kDim), lse(kQueryHeads);
  auto inputs = c.inputs();
  auto select_inputs = inputs;
  select_inputs.v = keysel::TensorView();  // selectors read q, k and positions only
  // Selectors that keep state across decode steps (block summaries) start warm, as after the prefill.
  // Selectors that build an index do it here, once, before the timed loop.
  if (entry.stateful && fresh) {
    const auto t0 = std::chrono::steady_clock::now();
    selector->select(select_inputs, policy, selection_view);
    double build_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (const auto* candidates = dynamic_cast<const keysel::CandidateSelector*>(selector.get())) {
      build_s = candidates->last_build_seconds();  // train + add only, without the first select's search
    }
    if (entry.build_once) built[static_cast<std::size_t>(state.range(0))] = {selector, build_s};
  } else if (entry.stateful) {
    selector->select(select_inputs, policy, selection_view);
  }
  double select_s = 0, attend_s = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    selector->select(select_inputs, policy, selection_view);
    const auto t1 = std::chrono::steady_clock::now();
    keysel::sparse_attention(inputs, selection_view, policy.granularity,
                             keysel::TensorView(out.data(), keysel::DType::fp32, {1, kQueryHeads, kDim}),
                             keysel::TensorView(lse.data(), keysel::DType::fp32, {1, kQueryHeads}));
    const auto t2 = std::chrono::steady_clock::now();
    select_s += std::chrono::duration<double>(t1 - t0).count();
    attend_s += std::chrono::duration<double>(t2 - t1).count();
    benchmark::DoNotOptimize(out.data());
  }
  const double n = static_cast<double>(state.iterations());
  state.counters["select_ms"] = select_s / n * 1e3;
  state.counters["attention_ms"] = attend_s / n * 1e3;
  if (entry.build_once) state.counters["build_s"] = built[static_cast<std::size_t>(state.range(0))].second;
  state.SetLabel(entry.name);
}
BENCHMARK(BM_DecodeStep)
    ->DenseRange(0, static_cast<int>(decode_selectors().size()) - 1)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(0.5);

}  // namespace

BENCHMARK_MAIN();
