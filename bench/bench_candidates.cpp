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
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "keysel/core/build_config.h"
#include "keysel/indexer/candidate_search.h"
#include "keysel/indexer/selector.h"
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
};

Setup g_setup;
keysel::Workload* g_workload = nullptr;
keysel::ExactReference* g_reference = nullptr;

keysel::SelectionPolicy policy() {
  keysel::SelectionPolicy p;
  p.k = g_setup.k;
  p.granularity = keysel::Granularity::per_kv_head;
  p.n_sink = 4;
  p.n_local = 64;
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
    SharedSelector& s = shared(c.spec, c.mips);
    keysel::CandidateSelectorOptions options;
    options.candidates = c.candidates;
    options.search.nprobe = c.nprobe;
    options.search.ef_search = c.ef_search;
    options.queries = c.queries;
    s.selector->set_options(options);
    run_selector(state, *s.selector, s.build_seconds);
  })->Unit(benchmark::kMillisecond)->Iterations(2);
}

bool parse_flag(const char* arg, const char* name, std::int64_t& value) {
  const std::size_t n = std::strlen(name);
  if (std::strncmp(arg, name, n) != 0 || arg[n] != '=') return false;
  value = std::atoll(arg + n + 1);
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<char*> rest{argv[0]};
  for (int i = 1; i < argc; ++i) {
    std::int64_t v = 0;
    if (parse_flag(argv[i], "--keys", v)) g_setup.keys = v;
    else if (parse_flag(argv[i], "--tokens", v)) g_setup.tokens = v;
    else if (parse_flag(argv[i], "--query-heads", v)) g_setup.query_heads = v;
    else if (parse_flag(argv[i], "--k", v)) g_setup.k = v;
    else if (parse_flag(argv[i], "--seed", v)) g_setup.seed = static_cast<std::uint64_t>(v);
    else if (std::strcmp(argv[i], "--quick") == 0) g_setup.quick = true;
    else rest.push_back(argv[i]);
  }
  int rest_argc = static_cast<int>(rest.size());
  benchmark::Initialize(&rest_argc, rest.data());

  keysel::SyntheticOptions options;
  options.keys = g_setup.keys;
  options.tokens = g_setup.tokens;
  options.query_heads = g_setup.query_heads;
  options.kv_heads = 1;
  options.head_dim = 128;
  options.value_dim = 128;
  options.seed = g_setup.seed;
  keysel::Workload workload = keysel::make_synthetic_workload(options);
  g_workload = &workload;
  keysel::ExactReference reference(workload.inputs(), keysel::Granularity::per_kv_head);
  g_reference = &reference;
  std::cerr << "workload: N=" << g_setup.keys << " T=" << g_setup.tokens << " Hq=" << g_setup.query_heads
            << " Hkv=1 D=128 k=" << g_setup.k << " per_kv_head, n_sink=4, n_local=64\n";

  // The peers: the exact path, brute force and FAISS IndexFlatIP.
  benchmark::RegisterBenchmark("exact/double-reference", [](benchmark::State& state) {
    auto exact = keysel::make_exact_selector();
    run_selector(state, *exact, 0.0);
  })->Unit(benchmark::kMillisecond)->Iterations(1);
  register_config({"brute_force"});
  const bool faiss = KEYSEL_FAISS != 0;
  if (faiss) {
    register_config({"Flat"});
    const std::int64_t nlist = g_setup.quick ? 256 : 1024;
    const std::string ivf = "IVF" + std::to_string(nlist);
    for (const bool mips : {false, true}) {
      for (const std::int64_t nprobe : {nlist / 64, nlist / 32, nlist / 16, nlist / 8}) {
        register_config({ivf + ",Flat", mips, nprobe});
      }
    }
    register_config({ivf + ",Flat", true, nlist / 32, 0, 4096});
    register_config({ivf + ",Flat", true, nlist / 32, 0, 0, keysel::CandidateQueries::group_mean});
    register_config({ivf + ",SQ8", true, nlist / 32});
    register_config({ivf + ",PQ32", true, nlist / 32, 0, 4096});
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
