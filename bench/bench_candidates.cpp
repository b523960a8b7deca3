// FAISS candidate searches against the exact top-k on the realistic synthetic workload (docs/performance.md).
//
// One workload (default N = 131072 cached keys, D = 128, 8 decode tokens, GQA 4 query heads over 1 key head,
// k = 2048, per_kv_head groups, 4 sinks and 64 local keys kept) is generated once; the exact attention is computed
// once in double (ExactReference). Each benchmark is one selector configuration: its index is built before the
// timed loop (build_s reports it), then select() is timed over every query token. Counters:
//   recall, mass        SPEC §4 means over the rows (query token x group), against the exact top-k
//   scored_frac         keys scored per row / allowed keys (index distance computations, IVF centroids
//                       included, per search query, plus the keys re-ranked exactly)
//   ms_per_row          select() wall time per row (the benchmark's own time covers all rows of one call)
//   build_s             train + add of every key head's index
// The peers of the same run: the exact path (make_exact_selector, double precision), the brute-force search
// (fp32, every key) and FAISS IndexFlatIP ("Flat"), both followed by the same re-rank.
//
// Flags before Google Benchmark's own: --keys=N --tokens=T --query-heads=H --k=K --seed=S --quick (a small sweep).
// --dump=PATH [--layer=L] runs the same sweep on one layer of a model dump (docs/dumps.md) instead of the synthetic
// workload: L is the model's layer number as in the tensor names "layer{L}.*" (default: the dump's first layer);
// --keys/--tokens/--query-heads (synthetic shape) are then ignored. A file that does not load or a layer the dump
// lacks prints the keysel::Error and exits with status 1. So that a small dump runs (at a small --k): IVF lists
// are capped at the largest power of two <= N / 39 (FAISS wants 39 training keys per list), nprobe is at least 1,
// k' of the wide-candidate rows is min(4096, N), PQ needs N >= 256, and the kept keys are min(4, k/4) sinks and
// min(64, k/4) local keys. On the default synthetic workload none of these caps changes anything.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "keysel/core/build_config.h"
#include "keysel/core/error.h"
#include "keysel/indexer/candidate_search.h"
#include "keysel/indexer/selector.h"
#include "keysel/recall/dump.h"
#include "keysel/recall/metrics.h"
#include "keysel/recall/synthetic.h"

namespace {

struct Setup {
  std::int64_t keys = 131072;
  std::int64_t tokens = 8;
  std::int64_t query_heads = 4;
  std::int64_t k = 2048;
  std::uint64_t seed = 1;
  bool quick = false;
  std::string dump;          // --dump=PATH: a model dump instead of the synthetic workload
  std::int64_t layer = -1;   // --layer=L: the model's layer number (-1: the dump's first layer)
  bool synthetic_shape_given = false;
};

Setup g_setup;
keysel::Workload* g_workload = nullptr;
keysel::ExactReference* g_reference = nullptr;

keysel::SelectionPolicy policy() {
  keysel::SelectionPolicy p;
  p.k = g_setup.k;
  p.granularity = keysel::Granularity::per_kv_head;
  p.n_sink = std::min<std::int64_t>(4, g_setup.k / 4);  // 4 and 64 for any k >= 256
  p.n_local = std::min<std::int64_t>(64, g_setup.k / 4);
  return p;
}

/// Runs a selector over the workload: one untimed call (builds the index), then the timed loop.
void run_selector(benchmark::State& state, keysel::Selector& selector, double build_seconds) {
  const keysel::AttentionInputs inputs = g_workload->inputs();
  const keysel::SelectionPolicy p = policy();
  const std::int64_t groups = keysel::group_count(p.granularity, g_workload->shape.query_heads, g_workload->shape.kv_heads);
  std::vector<std::int32_t> out(static_cast<std::size_t>(g_workload->shape.tokens * groups * p.width()));
  const keysel::TensorView view(out.data(), keysel::DType::int32, {g_workload->shape.tokens, groups, p.width()});
  keysel::SelectionCost cost;
  for (auto _ : state) {
    cost = selector.select(inputs, p, view);
    benchmark::DoNotOptimize(out.data());
  }
  const auto metrics = g_reference->evaluate(view, p.k);
  double recall = 0, mass = 0, mass_ratio = 0, allowed = 0;
  for (const auto& m : metrics) {
    recall += m.recall;
    mass += m.mass;
    mass_ratio += m.mass_ratio;
  }
  for (std::int64_t t = 0; t < g_workload->shape.tokens; ++t) allowed += static_cast<double>(g_reference->allowed(t));
  const double rows = static_cast<double>(metrics.size());
  state.counters["recall"] = recall / rows;
  state.counters["mass"] = mass / rows;
  state.counters["mass_ratio"] = mass_ratio / rows;
  state.counters["scored_frac"] = cost.keys_scored / (allowed * static_cast<double>(groups));
  state.counters["ms_per_row"] = 1e3 * cost.seconds / static_cast<double>(cost.rows);
  state.counters["MB_per_row"] = cost.key_bytes_read / static_cast<double>(cost.rows) / 1e6;
  state.counters["build_s"] = build_seconds;
}

/// A candidate selector built once and shared by the benchmarks that only change search-time knobs.
struct SharedSelector {
  std::unique_ptr<keysel::CandidateSelector> selector;
  double build_seconds = 0;
};

SharedSelector& shared(const std::string& spec, bool mips) {
  static std::vector<std::pair<std::string, SharedSelector>> cache;
  const std::string key = spec + (mips ? "+mips" : "");
  for (auto& [name, s] : cache) {
    if (name == key) return s;
  }
  // One selector per index: the first select() builds it (and is the measurement of build_s).
  keysel::CandidateSearchOptions search_options;
  search_options.mips_to_l2 = mips;
  SharedSelector s;
  s.selector = keysel::make_candidate_selector(spec, {}, search_options);
  const keysel::AttentionInputs inputs = g_workload->inputs();
  const keysel::SelectionPolicy p = policy();
  std::vector<std::int32_t> out(static_cast<std::size_t>(g_workload->shape.tokens * g_workload->shape.kv_heads * p.width()));
  s.selector->select(inputs, p,
                     keysel::TensorView(out.data(), keysel::DType::int32,
                                        {g_workload->shape.tokens, g_workload->shape.kv_heads, p.width()}));
  s.build_seconds = s.selector->last_build_seconds();
  cache.emplace_back(key, std::move(s));
  return cache.back().second;
}

struct Config {
  std::string spec;
  bool mips = false;
  std::int64_t nprobe = 0;
  std::int64_t ef_search = 0;
  std::int64_t candidates = 0;  // k' (0: k minus the kept keys)
  keysel::CandidateQueries queries = keysel::CandidateQueries::each_head;
};

std::string label(const Config& c) {
  std::string s = c.spec + (c.mips ? "+mips" : "");
  if (c.nprobe > 0) s += "/nprobe=" + std::to_string(c.nprobe);
  if (c.ef_search > 0) s += "/ef=" + std::to_string(c.ef_search);
  if (c.candidates > 0) s += "/k'=" + std::to_string(c.candidates);
  if (c.queries == keysel::CandidateQueries::group_mean) s += "/mean-query";
  return s;
}

void register_config(const Config& c) {
  benchmark::RegisterBenchmark(("candidates/" + label(c)).c_str(), [c](benchmark::State& state) {
    try {
      SharedSelector& s = shared(c.spec, c.mips);
      keysel::CandidateSelectorOptions options;
      options.candidates = c.candidates;
      options.search.nprobe = c.nprobe;
      options.search.ef_search = c.ef_search;
      options.queries = c.queries;
      s.selector->set_options(options);
      run_selector(state, *s.selector, s.build_seconds);
    } catch (const keysel::Error& e) {  // e.g. an index the workload is too small to train: report it, go on
      state.SkipWithError(e.what());
    }
  })->Unit(benchmark::kMillisecond)->Iterations(2);
}

bool parse_flag(const char* arg, const char* name, std::int64_t& value) {
  const std::size_t n = std::strlen(name);
  if (std::strncmp(arg, name, n) != 0 || arg[n] != '=') return false;
  value = std::atoll(arg + n + 1);
  return true;
}

bool parse_flag(const char* arg, const char* name, std::string& value) {
  const std::size_t n = std::strlen(name);
  if (std::strncmp(arg, name, n) != 0 || arg[n] != '=') return false;
  value = arg + n + 1;
  return true;
}

/// The workload: one layer of --dump, or the synthetic one. Throws keysel::Error for a bad file or layer.
keysel::Workload make_workload() {
  if (!g_setup.dump.empty()) {
    const keysel::Dump dump = keysel::load_dump(g_setup.dump);
    if (dump.layers.empty()) throw keysel::Error("dump '" + g_setup.dump + "' holds no layers");
    const std::int64_t wanted = g_setup.layer >= 0 ? g_setup.layer : dump.layers.front().index;
    const keysel::DumpLayer& layer = dump.layer(wanted);  // throws keysel::Error naming the layers present
    return dump.workload(static_cast<std::size_t>(&layer - dump.layers.data()));
  }
  if (g_setup.layer >= 0) throw keysel::Error("--layer needs --dump=PATH");
  keysel::SyntheticOptions options;
  options.keys = g_setup.keys;
  options.tokens = g_setup.tokens;
  options.query_heads = g_setup.query_heads;
  options.kv_heads = 1;
  options.head_dim = 128;
  options.value_dim = 128;
  options.seed = g_setup.seed;
  return keysel::make_synthetic_workload(options);
}

/// IVF lists for N keys: the sweep's 1024 (256 with --quick), capped at the largest power of two <= N / 39.
std::int64_t ivf_lists(std::int64_t keys) {
  std::int64_t nlist = g_setup.quick ? 256 : 1024;
  while (nlist > 1 && nlist * 39 > keys) nlist /= 2;
  return nlist;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<char*> rest{argv[0]};
  for (int i = 1; i < argc; ++i) {
    std::int64_t v = 0;
    if (parse_flag(argv[i], "--keys", v)) g_setup.keys = v, g_setup.synthetic_shape_given = true;
    else if (parse_flag(argv[i], "--tokens", v)) g_setup.tokens = v, g_setup.synthetic_shape_given = true;
    else if (parse_flag(argv[i], "--query-heads", v)) g_setup.query_heads = v, g_setup.synthetic_shape_given = true;
    else if (parse_flag(argv[i], "--dump", g_setup.dump)) {
    } else if (parse_flag(argv[i], "--layer", v)) {
      if (v < 0) {
        std::cerr << "bench_candidates: --layer must be >= 0, found '" << argv[i] << "'\n";
        return 1;
      }
      g_setup.layer = v;
    }
    else if (parse_flag(argv[i], "--k", v)) g_setup.k = v;
    else if (parse_flag(argv[i], "--seed", v)) g_setup.seed = static_cast<std::uint64_t>(v);
    else if (std::strcmp(argv[i], "--quick") == 0) g_setup.quick = true;
    else rest.push_back(argv[i]);
  }
  int rest_argc = static_cast<int>(rest.size());
  benchmark::Initialize(&rest_argc, rest.data());

  keysel::Workload workload;
  try {
    if (g_setup.k < 1) throw keysel::Error("--k must be >= 1, found " + std::to_string(g_setup.k));
    workload = make_workload();
  } catch (const keysel::Error& e) {
    std::cerr << "bench_candidates: " << e.what() << "\n";
    return 1;
  }
  if (!g_setup.dump.empty() && g_setup.synthetic_shape_given) {
    std::cerr << "bench_candidates: --keys/--tokens/--query-heads describe the synthetic workload; ignored with --dump\n";
  }
  g_workload = &workload;
  keysel::ExactReference reference(workload.inputs(), keysel::Granularity::per_kv_head);
  g_reference = &reference;
  const keysel::AttentionShape& shape = workload.shape;
  std::cerr << "workload: " << (g_setup.dump.empty() ? std::string("synthetic") : workload.name) << " N=" << shape.keys
            << " T=" << shape.tokens << " Hq=" << shape.query_heads << " Hkv=" << shape.kv_heads
            << " D=" << shape.head_dim << " k=" << g_setup.k << " per_kv_head, n_sink=" << policy().n_sink
            << ", n_local=" << policy().n_local << "\n";

  // The peers: the exact path, brute force and FAISS IndexFlatIP.
  benchmark::RegisterBenchmark("exact/double-reference", [](benchmark::State& state) {
    auto exact = keysel::make_exact_selector();
    run_selector(state, *exact, 0.0);
  })->Unit(benchmark::kMillisecond)->Iterations(1);
  register_config({"brute_force"});
  const bool faiss = KEYSEL_FAISS != 0;
  if (faiss) {
    register_config({"Flat"});
    const std::int64_t nlist = ivf_lists(shape.keys);
    const std::string ivf = "IVF" + std::to_string(nlist);
    const auto probes = [nlist](std::int64_t divisor) { return std::max<std::int64_t>(1, nlist / divisor); };
    for (const bool mips : {false, true}) {
      std::int64_t last = 0;
      for (const std::int64_t nprobe : {probes(64), probes(32), probes(16), probes(8)}) {
        if (nprobe != last) register_config({ivf + ",Flat", mips, nprobe});  // a small nlist repeats nprobe 1
        last = nprobe;
      }
    }
    const std::int64_t wide = std::min<std::int64_t>(4096, shape.keys);  // k' of the over-fetch rows
    register_config({ivf + ",Flat", true, probes(32), 0, wide});
    register_config({ivf + ",Flat", true, probes(32), 0, 0, keysel::CandidateQueries::group_mean});
    register_config({ivf + ",SQ8", true, probes(32)});
    if (shape.keys >= 256) register_config({ivf + ",PQ32", true, probes(32), 0, wide});
    if (!g_setup.quick) {
      for (const bool mips : {false, true}) {
        register_config({"HNSW32", mips, 0, 2048});
      }
    }
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
