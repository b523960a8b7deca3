// FAISS candidate searches against the exact top-k on synthetic or dumped attention (docs/candidate-search.md).
//
// One workload (default N = 131072 cached keys, D = 128, 8 decode tokens, GQA 4 query heads over 1 key head,
// k = 2048, per_kv_head groups, 4 sinks and 64 local keys kept) is generated once; the exact attention is computed
// once in double (ExactReference). Each benchmark is one selector configuration: its index is built before the
// timed loop (build_s reports it), then select() is timed over every query token. Counters:
//   recall, mass        SPEC §4 means over the rows (query token x group), against the exact top-k
//   recall64            fraction of each row's exact top-64 keys (by pbar) that the selection holds (SPEC §4 recall
//                       at k = 64, pooled over the rows): the keys that carry the mass, as opposed to the tail of
//                       the top-k
//   scored_frac         keys scored per row / allowed keys (index distance computations, IVF centroids
//                       included, per search query, plus the keys re-ranked)
//   ms_per_row          select() wall time per row (the benchmark's own time covers all rows of one call)
//   build_s             train + add of every key head's index
// The peers of the same run: the exact path (make_exact_selector, double precision), the brute-force search
// (fp32, every key) and FAISS IndexFlatIP ("Flat"), both followed by the same re-rank.
//
// Rows: IVF{nlist} (1024, 256 with --quick) over inner products and with the MIPS transform at nprobe nlist/64 ..
// nlist/8, with balanced channels, k' 4096, the group's mean query, SQ8 and PQ32; without --quick also HNSW32 (ef
// 2048; plain, MIPS, balanced, mean query), HNSW16 and HNSW8 (balanced), and IVF4096 (capped at N / 16) with the
// MIPS transform and balanced channels at nprobe 2, 3, 5 and 10% of the lists, k' 4096, mean query and SQ8. On a
// dump with indexer tensors (index_q, index_k, index_w), three rows re-rank by the Lightning Indexer instead of
// exactly (CandidateSelectorOptions::rerank); the brute-force one with k' = N is the indexer's own top-k.
//
// QueryIVF rows (query-aware lists, QueryAwareSearch) train on earlier queries: on the synthetic workload the
// generator makes --prefill-queries=P (default 512) more tokens before the T measured ones and keeps their queries
// for training only; on a dump, the queries of its first half of tokens. The fp8 Lightning Indexer (64 heads,
// DI = 128) + top-k over random indexer tensors of the same N is timed before the table (best of 3); every row
// reports x_fp8_bytes (bytes read per row over the indexer's 132 B per allowed key) and x_fp8_time (ms per row
// over the indexer's). With one key head, two rows build the same lists from 4 P evenly spaced keys instead of the
// queries ("key-trained"), which isolates what the queries add. The "shared-scan" rows search each query head alone
// but count a key head's list reads once per row (SearchParameters::shared_scan: the group shares one pass); the
// ",Radius" rows add the center-and-radius bound. On a dump with indexer tensors the "index-keys" rows search
// QueryIVF over the indexer keys kI with each token's weighted indexer query (one selection for all heads), without
// a re-rank or over-fetching 4x and re-ranking by the indexer or exactly (the re-rank's reads counted).
//
// Flags before Google Benchmark's own: --keys=N --tokens=T --query-heads=H --k=K --seed=S --quick (a small sweep).
// Workload realism (recall/include/keysel/recall/synthetic.h; all off by default, i.e. the default workload):
// --rope-base=B --key-rank=R --focus=F --temperature=X --key-shift=S --outliers=C --outlier-scale=A, or --realistic
// for the preset of docs/candidate-search.md (rope_base 10000, key_rank 32, 4 outlier channels x 8,
// temperature 0.85); flags after --realistic override its values. The workload's measured properties (entropy,
// top-k mass, key norms), its keys' principal-component spectrum and the attention that the kept keys hold (and the
// exact top-k's mass outside them: all that a candidate search can change) are printed before the table.
// --partition-bound also prints IVF's partition bound for nlist 1024 and 4096 (print_partition_bound below).
// --dump=PATH [--layer=L] runs the same sweep on one layer of a model dump (docs/dumps.md) instead of the synthetic
// workload: L is the model's layer number as in the tensor names "layer{L}.*" (default: the dump's first layer);
// --keys/--tokens/--query-heads (synthetic shape) are then ignored. --rows=R measures only R query tokens of the
// dump, evenly spaced over its second half and ending with its last token (the QueryIVF rows still train on the
// first half): a long dump's exact reference and searches then take minutes instead of hours. A file that does
// not load or a layer the dump lacks prints the keysel::Error and exits with status 1. So that a small dump runs
// (at a small --k): IVF lists are capped at the largest power of two <= N / 39 (FAISS wants 39 training keys per
// list), nprobe is at least 1, k' of the wide-candidate rows is min(4096, N), PQ needs N >= 256, and the kept keys
// are min(4, k/4) sinks and min(64, k/4) local keys. On the default synthetic workload none of these caps changes anything.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "keysel/core/build_config.h"
#if KEYSEL_FAISS
#include <faiss/Clustering.h>
#include <faiss/IndexFlat.h>
#endif
#include "keysel/core/error.h"
#include "keysel/indexer/candidate_search.h"
#include "keysel/indexer/lightning_indexer.h"
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
  bool partition_bound = false;      // --partition-bound: print IVF's partition bound before the table
  std::int64_t prefill_queries = 512;  // --prefill-queries=P: earlier tokens whose queries train QueryIVF
  std::int64_t rows = 0;     // --rows=R: measure R query tokens of the dump's second half (0: every token)
  keysel::SyntheticOptions realism;  // only the realism knobs and focus are read from it
};

/// The --realistic preset: post-RoPE keys of a low-rank content space with outlier channels, and attention
/// sharp enough that the top-2048 of 131072 keys holds 0.85 of the mass (real long-context heads: 0.7-0.9).
void apply_realistic_preset(keysel::SyntheticOptions& o) {
  o.rope_base = 10000;
  o.key_rank = 32;
  o.outlier_channels = 4;
  o.outlier_scale = 8;
  o.temperature = 0.85;
}

Setup g_setup;
keysel::Workload* g_workload = nullptr;
std::vector<float> g_training_queries;  // [P, Hq, D]: the queries QueryIVF indexes train on
std::int64_t g_training_tokens = 0;
double g_fp8_ms_per_row = 0;             // the fp8 Lightning Indexer + top-k of this run (64 heads, DI = 128)
constexpr double kFp8BytesPerKey = 132;  // one fp8 key of 128 channels and its fp32 scale
keysel::ExactReference* g_reference = nullptr;

keysel::SelectionPolicy policy() {
  keysel::SelectionPolicy p;
  p.k = g_setup.k;
  p.granularity = keysel::Granularity::per_kv_head;
  p.n_sink = std::min<std::int64_t>(4, g_setup.k / 4);  // 4 and 64 for any k >= 256
  p.n_local = std::min<std::int64_t>(64, g_setup.k / 4);
  return p;
}

void report_selection(benchmark::State& state, const std::vector<std::int32_t>& out, const keysel::SelectionCost& cost,
                      double build_seconds);

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
  report_selection(state, out, cost, build_seconds);
}

/// The counters of a selection out [T, groups, width] (groups: the workload's key heads) and its cost.
void report_selection(benchmark::State& state, const std::vector<std::int32_t>& out, const keysel::SelectionCost& cost,
                      double build_seconds) {
  const keysel::SelectionPolicy p = policy();
  const std::int64_t groups = keysel::group_count(p.granularity, g_workload->shape.query_heads, g_workload->shape.kv_heads);
  const keysel::TensorView view(out.data(), keysel::DType::int32,
                                {g_workload->shape.tokens, groups, p.width()});
  const auto metrics = g_reference->evaluate(view, p.k);
  double recall = 0, mass = 0, mass_ratio = 0, allowed = 0;
  for (const auto& m : metrics) {
    recall += m.recall;
    mass += m.mass;
    mass_ratio += m.mass_ratio;
  }
  for (std::int64_t t = 0; t < g_workload->shape.tokens; ++t) allowed += static_cast<double>(g_reference->allowed(t));
  const double rows = static_cast<double>(metrics.size());
  // recall64: SPEC §4 recall at k = 64 of each row's whole selection (tie-aware), as found / total keys.
  double found64 = 0, total64 = 0;
  for (std::int64_t row = 0; row < static_cast<std::int64_t>(metrics.size()); ++row) {
    const std::int64_t t = row / groups;
    const std::int64_t allowed = g_reference->allowed(t);
    const std::span<const std::int32_t> keys(out.data() + row * p.width(), static_cast<std::size_t>(p.width()));
    const double k64 = static_cast<double>(std::min<std::int64_t>(64, allowed));
    total64 += k64;
    const keysel::SelectionMetrics m64 =
        keysel::selection_metrics(g_reference->pbar(t, row % groups), allowed, keys, 64);
    found64 += std::round(k64 * m64.recall);
  }
  state.counters["recall64"] = total64 > 0 ? found64 / total64 : 1.0;
  state.counters["recall"] = recall / rows;
  state.counters["mass"] = mass / rows;
  state.counters["mass_ratio"] = mass_ratio / rows;
  state.counters["scored_frac"] = cost.keys_scored / (allowed * static_cast<double>(groups));
  state.counters["ms_per_row"] = 1e3 * cost.seconds / static_cast<double>(cost.rows);
  state.counters["MB_per_row"] = cost.key_bytes_read / static_cast<double>(cost.rows) / 1e6;
  state.counters["build_s"] = build_seconds;
  // Against the fp8 Lightning Indexer, which reads every allowed key at 132 bytes per row.
  const double fp8_bytes = allowed / static_cast<double>(g_workload->shape.tokens) * kFp8BytesPerKey;
  state.counters["x_fp8_bytes"] = cost.key_bytes_read / static_cast<double>(cost.rows) / fp8_bytes;
  if (g_fp8_ms_per_row > 0) state.counters["x_fp8_time"] = 1e3 * cost.seconds / static_cast<double>(cost.rows) / g_fp8_ms_per_row;
}

/// A candidate selector built once and shared by the benchmarks that only change search-time knobs.
struct SharedSelector {
  std::unique_ptr<keysel::CandidateSelector> selector;
  double build_seconds = 0;
};

SharedSelector& shared(const std::string& spec, bool mips, bool balance, bool key_trained) {
  static std::vector<std::pair<std::string, SharedSelector>> cache;
  const std::string key = spec + (mips ? "+mips" : "") + (balance ? "+balance" : "") + (key_trained ? "+keys" : "");
  for (auto& [name, s] : cache) {
    if (name == key) return s;
  }
  // One selector per index: the first select() builds it (and is the measurement of build_s).
  keysel::CandidateSearchOptions search_options;
  search_options.mips_to_l2 = mips;
  search_options.balance_channels = balance;
  SharedSelector s;
  s.selector = keysel::make_candidate_selector(spec, {}, search_options);
  if (key_trained) {
    // The same lists built from keys instead of queries (one key head): 4 x P keys spread evenly over the cache
    // stand in for the P tokens' queries, which isolates what the queries add.
    const std::int64_t d = g_workload->shape.head_dim, hq = g_workload->shape.query_heads;
    const std::int64_t count = std::max<std::int64_t>(1, g_training_tokens) * hq;
    std::vector<float> keys(static_cast<std::size_t>(count * d));
    for (std::int64_t i = 0; i < count; ++i) {
      const std::int64_t row = i * g_workload->shape.keys / count;
      std::copy(g_workload->k.begin() + row * d, g_workload->k.begin() + (row + 1) * d, keys.begin() + i * d);
    }
    s.selector->set_training_queries(keysel::TensorView(keys.data(), keysel::DType::fp32, {count / hq, hq, d}));
  } else if (g_training_tokens > 0) {
    s.selector->set_training_queries(keysel::TensorView(
        g_training_queries.data(), keysel::DType::fp32,
        {g_training_tokens, g_workload->shape.query_heads, g_workload->shape.head_dim}));
  }
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
  bool indexer_rerank = false;  // re-rank by the dump's Lightning Indexer instead of exactly
  bool balance = false;         // channel balancing (CandidateSearchOptions::balance_channels)
  bool rerank_stored = false;   // re-rank over the index's stored codes (CandidateSelectorOptions::rerank_stored)
  bool key_trained = false;     // QueryIVF lists built from keys instead of queries (one key head only)
  bool shared_scan = false;     // QueryIVF: a key head's query heads share one pass over the lists (bytes once)
};

keysel::CandidateScore g_indexer_score;  // the dump layer's indexer (empty when it has none)
std::vector<float> g_index_keys;         // [N, DI]: the dump layer's indexer keys kI (empty when it has none)
std::vector<float> g_index_query;        // [T, DI]: sum_j w[t, j] qI[t, j], the indexer score without its ReLU
std::vector<float> g_index_training_query;  // [g_training_tokens, DI]: the same for the training tokens

/// QueryIVF over the indexer keys kI, searched with each token's weighted indexer query sum_j w_j qI_j (one search
/// per row: DSA shares one selection among the heads) and re-ranked by the Lightning Indexer's own score; the
/// selection is given to every key head and scored against the attention's exact top-k. Its bytes add the
/// re-rank's reads of the candidates' fp8 indexer keys. Trains on the first
/// g_training_tokens tokens' weighted queries (a dump's first half, as the QueryIVF rows over the keys).
/// The exact re-rank of a selection shared by all heads: each candidate's mean over every query head of its
/// probability renormalised over the candidates and the row's kept keys (in double).
keysel::CandidateScore exact_shared_score() {
  return [](std::int64_t t, std::int64_t, std::span<const std::int32_t> keys, std::span<double> scores) {
    const keysel::AttentionShape& shape = g_workload->shape;
    const std::int64_t d = shape.head_dim, hq = shape.query_heads, group = shape.query_heads / shape.kv_heads;
    const keysel::SelectionPolicy p = policy();
    const double scale = g_workload->inputs().effective_scale();
    const std::int64_t allowed = g_reference->allowed(t);
    std::vector<std::int32_t> all(keys.begin(), keys.end());
    const std::int64_t sink_end = std::min(p.n_sink, allowed);
    for (std::int64_t s = 0; s < sink_end; ++s) all.push_back(static_cast<std::int32_t>(s));
    for (std::int64_t s = std::max(allowed - p.n_local, sink_end); s < allowed; ++s) all.push_back(static_cast<std::int32_t>(s));
    std::fill(scores.begin(), scores.end(), 0.0);
    std::vector<double> logit(all.size());
    for (std::int64_t h = 0; h < hq; ++h) {
      const float* q = g_workload->q.data() + (t * hq + h) * d;
      double top = -1e300;
      for (std::size_t i = 0; i < all.size(); ++i) {
        const float* k = g_workload->k.data() + (static_cast<std::int64_t>(all[i]) * shape.kv_heads + h / group) * d;
        double l = 0;
        for (std::int64_t c = 0; c < d; ++c) l += static_cast<double>(q[c]) * k[c];
        logit[i] = scale * l;
        top = std::max(top, logit[i]);
      }
      double sum = 0;
      for (const double l : logit) sum += std::exp(l - top);
      for (std::size_t i = 0; i < keys.size(); ++i) scores[i] += std::exp(logit[i] - top) / sum / static_cast<double>(hq);
    }
  };
}

/// `overfetch` > 1 fetches k' = overfetch (k - kept) candidates so that the re-rank chooses among them; with
/// overfetch 1 (k' = k - kept) every candidate is selected whatever the re-rank, so none is counted.
void register_index_key_config(const std::string& spec, std::int64_t nprobe, std::int64_t overfetch, bool exact = false) {
  const std::string name = "index-keys/" + spec + (nprobe > 0 ? "/nprobe=" + std::to_string(nprobe) : "") +
                           (overfetch == 1 ? std::string("/no-rerank")
                                           : "/k'=" + std::to_string(overfetch) + "x" + (exact ? "/exact-rerank" : "/indexer-rerank"));
  benchmark::RegisterBenchmark(name.c_str(), [spec, nprobe, overfetch, exact](benchmark::State& state) {
    try {
      const std::int64_t di = static_cast<std::int64_t>(g_index_query.size()) / g_workload->shape.tokens;
      const std::int64_t n = g_workload->shape.keys, t = g_workload->shape.tokens, hkv = g_workload->shape.kv_heads;
      static std::vector<std::pair<std::string, SharedSelector>> cache;
      SharedSelector* s = nullptr;
      for (auto& [key, entry] : cache) {
        if (key == spec) s = &entry;
      }
      keysel::AttentionInputs proxy = g_workload->inputs();
      proxy.q = keysel::TensorView(g_index_query.data(), keysel::DType::fp32, {t, 1, di});
      proxy.k = keysel::TensorView(g_index_keys.data(), keysel::DType::fp32, {n, 1, di});
      proxy.v = keysel::TensorView();
      proxy.scale = 0.0;
      const keysel::SelectionPolicy p = policy();
      std::vector<std::int32_t> one(static_cast<std::size_t>(t * p.width()));
      const keysel::TensorView one_view(one.data(), keysel::DType::int32, {t, 1, p.width()});
      if (s == nullptr) {
        SharedSelector fresh;
        fresh.selector = keysel::make_candidate_selector(spec);
        fresh.selector->set_training_queries(
            keysel::TensorView(g_index_training_query.data(), keysel::DType::fp32, {g_training_tokens, 1, di}));
        fresh.selector->select(proxy, p, one_view);
        fresh.build_seconds = fresh.selector->last_build_seconds();
        cache.emplace_back(spec, std::move(fresh));
        s = &cache.back().second;
      }
      keysel::CandidateSelectorOptions options;
      options.search.nprobe = nprobe;
      options.rerank = exact ? exact_shared_score() : g_indexer_score;
      const keysel::SelectionPolicy fill_policy = policy();
      options.candidates = overfetch * (fill_policy.k - fill_policy.n_sink - fill_policy.n_local);
      s->selector->set_options(options);
      keysel::SelectionCost cost;
      for (auto _ : state) {
        cost = s->selector->select(proxy, p, one_view);
        benchmark::DoNotOptimize(one.data());
      }
      // The re-rank's reads (the selector leaves a score's reads to it), for up to min(k - kept, free keys)
      // candidates per row: the indexer reads each one's fp8 indexer key at the peer's 132 bytes; the exact re-rank
      // reads each candidate's and kept key's fp16 key (2 D bytes) in every key head.
      const double exact_bytes = 2.0 * static_cast<double>(g_workload->shape.head_dim * hkv);
      for (std::int64_t r = 0; r < t && overfetch > 1; ++r) {
        const std::int64_t allowed = g_reference->allowed(r);
        const std::int64_t free_keys = std::max<std::int64_t>(0, allowed - p.n_sink - p.n_local);
        const double candidates = static_cast<double>(std::min(overfetch * (p.k - p.n_sink - p.n_local), free_keys));
        cost.key_bytes_read += exact ? (candidates + static_cast<double>(std::min(allowed, p.n_sink + p.n_local))) * exact_bytes
                                     : candidates * kFp8BytesPerKey;
      }
      std::vector<std::int32_t> out(static_cast<std::size_t>(t * hkv * p.width()));
      for (std::int64_t r = 0; r < t; ++r) {
        for (std::int64_t g = 0; g < hkv; ++g) {
          std::copy(one.begin() + r * p.width(), one.begin() + (r + 1) * p.width(), out.begin() + (r * hkv + g) * p.width());
        }
      }
      report_selection(state, out, cost, s->build_seconds);
    } catch (const keysel::Error& e) {
      state.SkipWithError(e.what());
    }
  })->Unit(benchmark::kMillisecond)->Iterations(2);
}

std::string label(const Config& c) {
  std::string s = c.spec + (c.mips ? "+mips" : "") + (c.balance ? "+balance" : "");
  if (c.nprobe > 0) s += "/nprobe=" + std::to_string(c.nprobe);
  if (c.ef_search > 0) s += "/ef=" + std::to_string(c.ef_search);
  if (c.candidates > 0) s += "/k'=" + std::to_string(c.candidates);
  if (c.queries == keysel::CandidateQueries::group_mean) s += "/mean-query";
  if (c.indexer_rerank) s += "/indexer-rerank";
  if (c.rerank_stored) s += "/rerank-stored";
  if (c.key_trained) s += "/key-trained";
  if (c.shared_scan) s += "/shared-scan";
  return s;
}

void register_config(const Config& c) {
  benchmark::RegisterBenchmark(("candidates/" + label(c)).c_str(), [c](benchmark::State& state) {
    try {
      SharedSelector& s = shared(c.spec, c.mips, c.balance, c.key_trained);
      keysel::CandidateSelectorOptions options;
      options.candidates = c.candidates;
      options.search.nprobe = c.nprobe;
      options.search.ef_search = c.ef_search;
      options.search.shared_scan = c.shared_scan;
      options.queries = c.queries;
      if (c.indexer_rerank) options.rerank = g_indexer_score;
      options.rerank_stored = c.rerank_stored;
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

bool parse_flag(const char* arg, const char* name, double& value) {
  const std::size_t n = std::strlen(name);
  if (std::strncmp(arg, name, n) != 0 || arg[n] != '=') return false;
  value = std::atof(arg + n + 1);
  return true;
}

bool parse_flag(const char* arg, const char* name, std::string& value) {
  const std::size_t n = std::strlen(name);
  if (std::strncmp(arg, name, n) != 0 || arg[n] != '=') return false;
  value = arg + n + 1;
  return true;
}

/// sum_j w[t, j] qI[t, j] for the tokens [begin, end) of a workload with indexer tensors: [end - begin, DI].
std::vector<float> weighted_index_queries(const keysel::Workload& w, std::int64_t begin, std::int64_t end) {
  const std::int64_t heads = w.index_heads, di = w.index_dim;
  std::vector<float> out(static_cast<std::size_t>((end - begin) * di), 0.0f);
  for (std::int64_t r = begin; r < end; ++r) {
    for (std::int64_t j = 0; j < heads; ++j) {
      const float weight = w.index_w[static_cast<std::size_t>(r * heads + j)];
      for (std::int64_t c = 0; c < di; ++c) {
        out[static_cast<std::size_t>((r - begin) * di + c)] += weight * w.index_q[static_cast<std::size_t>((r * heads + j) * di + c)];
      }
    }
  }
  return out;
}

/// The rows that --rows=R keeps of a dump of T tokens: R tokens evenly spaced over its second half [T/2, T), the
/// last token always among them (all of the second half when R >= its size).
std::vector<std::int64_t> sampled_rows(std::int64_t tokens, std::int64_t rows) {
  const std::int64_t begin = tokens / 2, size = tokens - begin;
  const std::int64_t r = std::min(rows, size);
  std::vector<std::int64_t> out(static_cast<std::size_t>(r));
  for (std::int64_t i = 0; i < r; ++i) out[static_cast<std::size_t>(i)] = begin + (i + 1) * size / r - 1;
  return out;
}

/// Keeps only the query tokens `rows` of a workload (q, positions and the indexer's queries and weights; the keys,
/// values and indexer keys stay whole).
void keep_rows(keysel::Workload& w, const std::vector<std::int64_t>& rows) {
  const auto gather = [&rows](std::vector<float>& values, std::int64_t width) {
    if (values.empty()) return;
    std::vector<float> kept(rows.size() * static_cast<std::size_t>(width));
    for (std::size_t i = 0; i < rows.size(); ++i) {
      std::copy_n(values.begin() + rows[i] * width, width, kept.begin() + static_cast<std::int64_t>(i) * width);
    }
    values = std::move(kept);
  };
  gather(w.q, w.shape.query_heads * w.shape.head_dim);
  gather(w.index_q, w.index_heads * w.index_dim);
  gather(w.index_w, w.index_heads);
  std::vector<std::int32_t> positions(rows.size());
  for (std::size_t i = 0; i < rows.size(); ++i) positions[i] = w.positions[static_cast<std::size_t>(rows[i])];
  w.positions = std::move(positions);
  w.shape.tokens = static_cast<std::int64_t>(rows.size());
}

/// The workload: one layer of --dump, or the synthetic one. Throws keysel::Error for a bad file or layer.
/// On a dump, QueryIVF trains on the queries of its first half of tokens; the measured rows are all its tokens, or
/// with --rows=R, R of its second half (sampled_rows).
keysel::Workload make_workload() {
  if (!g_setup.dump.empty()) {
    const keysel::Dump dump = keysel::load_dump(g_setup.dump);
    if (dump.layers.empty()) throw keysel::Error("dump '" + g_setup.dump + "' holds no layers");
    const std::int64_t wanted = g_setup.layer >= 0 ? g_setup.layer : dump.layers.front().index;
    const keysel::DumpLayer& layer = dump.layer(wanted);  // throws keysel::Error naming the layers present
    keysel::Workload w = dump.workload(static_cast<std::size_t>(&layer - dump.layers.data()));
    g_training_tokens = std::max<std::int64_t>(1, w.shape.tokens / 2);
    g_training_queries.assign(w.q.begin(), w.q.begin() + g_training_tokens * w.shape.query_heads * w.shape.head_dim);
    const bool indexer = w.index_heads > 0;
    if (indexer) g_index_training_query = weighted_index_queries(w, 0, g_training_tokens);
    if (g_setup.rows > 0) {
      const std::int64_t tokens = w.shape.tokens;
      const std::vector<std::int64_t> rows = sampled_rows(tokens, g_setup.rows);
      keep_rows(w, rows);
      std::cerr << "measured rows: " << rows.size() << " of " << tokens << " tokens, positions " << w.positions.front()
                << ".." << w.positions.back() << " (evenly spaced over the second half); QueryIVF trains on tokens 0.."
                << g_training_tokens - 1 << "\n";
    }
    if (indexer) {
      const std::int64_t t = w.shape.tokens, hi = w.index_heads, di = w.index_dim;
      g_indexer_score = keysel::make_indexer_candidate_score(
          keysel::TensorView(w.index_q.data(), keysel::DType::fp32, {t, hi, di}),
          keysel::TensorView(w.index_w.data(), keysel::DType::fp32, {t, hi}),
          keysel::TensorView(w.index_k.data(), keysel::DType::fp32, {w.shape.keys, di}));
      g_index_keys = w.index_k;
      g_index_query = weighted_index_queries(w, 0, t);
    }
    return w;
  }
  if (g_setup.layer >= 0) throw keysel::Error("--layer needs --dump=PATH");
  if (g_setup.rows > 0) throw keysel::Error("--rows needs --dump=PATH (the synthetic workload's rows are --tokens)");
  keysel::SyntheticOptions options = g_setup.realism;
  options.keys = g_setup.keys;
  options.tokens = g_setup.tokens + g_setup.prefill_queries;
  options.query_heads = g_setup.query_heads;
  options.kv_heads = 1;
  options.head_dim = 128;
  options.value_dim = 128;
  options.seed = g_setup.seed;
  keysel::Workload w = keysel::make_synthetic_workload(options);
  // The first P tokens are the earlier queries that QueryIVF trains on; the last T are the measured rows.
  const std::int64_t p = g_setup.prefill_queries, row = w.shape.query_heads * w.shape.head_dim;
  g_training_queries.assign(w.q.begin(), w.q.begin() + p * row);
  g_training_tokens = p;
  w.q.erase(w.q.begin(), w.q.begin() + p * row);
  w.positions.erase(w.positions.begin(), w.positions.begin() + p);
  w.shape.tokens = g_setup.tokens;
  return w;
}

/// Times the fp8 Lightning Indexer (64 heads, DI = 128, SPEC §3) + its fused top-k over N random keys for the
/// workload's T tokens and positions: the peer every candidate search must beat in time and bytes.
void measure_fp8_indexer(const keysel::Workload& w, const keysel::SelectionPolicy& p) {
  constexpr std::int64_t heads = 64, dim = 128;
  keysel::QuantizationConfig config;
  config.format = keysel::DType::fp8_e4m3;
  keysel::LightningIndexer indexer(heads, dim, config);
  const std::int64_t n = w.shape.keys, t = w.shape.tokens;
  std::vector<float> keys(static_cast<std::size_t>(n * dim)), queries(static_cast<std::size_t>(t * heads * dim));
  std::vector<float> weights(static_cast<std::size_t>(t * heads), 1.0f / heads);
  std::uint64_t state = 12345;
  const auto uniform = [&state] {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<float>(static_cast<double>(state >> 11) / 9007199254740992.0 - 0.5);
  };
  for (float& v : keys) v = uniform();
  for (float& v : queries) v = uniform();
  indexer.append_keys(n, keys.data());
  std::vector<std::int32_t> out(static_cast<std::size_t>(t * p.width()));
  std::vector<std::int32_t> positions(w.positions.begin(), w.positions.end());
  const keysel::TensorView qv(queries.data(), keysel::DType::fp32, {t, heads, dim});
  const keysel::TensorView wv(weights.data(), keysel::DType::fp32, {t, heads});
  const keysel::TensorView pv(positions.data(), keysel::DType::int32, {t});
  const keysel::TensorView sv(out.data(), keysel::DType::int32, {t, 1, p.width()});
  double best = 1e30, bytes = 0;
  for (int repeat = 0; repeat < 3; ++repeat) {
    const keysel::SelectionCost cost = indexer.select(qv, wv, pv, p, sv);
    best = std::min(best, cost.seconds);
    bytes = cost.key_bytes_read / static_cast<double>(t);
  }
  g_fp8_ms_per_row = 1e3 * best / static_cast<double>(t);
  std::cerr << "fp8 Lightning Indexer (64 heads, DI 128) + top-k: " << g_fp8_ms_per_row << " ms/row (best of 3), "
            << bytes / 1e6 << " MB/row read (" << bytes / static_cast<double>(n) << " B/key)\n";
}

/// IVF lists for N keys: the sweep's 1024 (256 with --quick), capped at the largest power of two <= N / 39.
std::int64_t ivf_lists(std::int64_t keys) {
  std::int64_t nlist = g_setup.quick ? 256 : 1024;
  while (nlist > 1 && nlist * 39 > keys) nlist /= 2;
  return nlist;
}

/// Eigenvalues of the symmetric matrix a (n x n, row-major; destroyed), by cyclic Jacobi rotations, descending.
std::vector<double> symmetric_eigenvalues(std::vector<double> a, std::int64_t n) {
  const auto at = [&](std::int64_t i, std::int64_t j) -> double& { return a[static_cast<std::size_t>(i * n + j)]; };
  for (int sweep = 0; sweep < 50; ++sweep) {
    double off = 0;
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t j = i + 1; j < n; ++j) off += at(i, j) * at(i, j);
    if (off < 1e-22) break;
    for (std::int64_t p = 0; p < n; ++p) {
      for (std::int64_t q = p + 1; q < n; ++q) {
        if (at(p, q) == 0) continue;
        const double theta = (at(q, q) - at(p, p)) / (2 * at(p, q));
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1));
        const double c = 1 / std::sqrt(t * t + 1), s = t * c;
        for (std::int64_t k = 0; k < n; ++k) {  // columns p, q
          const double kp = at(k, p), kq = at(k, q);
          at(k, p) = c * kp - s * kq;
          at(k, q) = s * kp + c * kq;
        }
        for (std::int64_t k = 0; k < n; ++k) {  // rows p, q
          const double pk = at(p, k), qk = at(q, k);
          at(p, k) = c * pk - s * qk;
          at(q, k) = s * pk + c * qk;
        }
      }
    }
  }
  std::vector<double> values(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) values[static_cast<std::size_t>(i)] = at(i, i);
  std::sort(values.rbegin(), values.rend());
  return values;
}

/// "keys of kv head h: 50/90/99% of the (centred) variance in a/b/c of D principal components", the structure
/// that IVF and HNSW can exploit: few components mean low intrinsic dimension.
void print_key_spectrum(const keysel::Workload& w, std::ostream& out) {
  const std::int64_t n = w.shape.keys, heads = w.shape.kv_heads, d = w.shape.head_dim;
  for (std::int64_t h = 0; h < heads; ++h) {
    std::vector<double> mean(static_cast<std::size_t>(d), 0.0), cov(static_cast<std::size_t>(d * d), 0.0);
    for (std::int64_t s = 0; s < n; ++s) {
      for (std::int64_t c = 0; c < d; ++c)
        mean[static_cast<std::size_t>(c)] += w.k[static_cast<std::size_t>((s * heads + h) * d + c)];
    }
    for (double& m : mean) m /= static_cast<double>(n);
    std::vector<double> x(static_cast<std::size_t>(d));
    for (std::int64_t s = 0; s < n; ++s) {
      for (std::int64_t c = 0; c < d; ++c)
        x[static_cast<std::size_t>(c)] =
            w.k[static_cast<std::size_t>((s * heads + h) * d + c)] - mean[static_cast<std::size_t>(c)];
      for (std::int64_t i = 0; i < d; ++i)
        for (std::int64_t j = i; j < d; ++j)
          cov[static_cast<std::size_t>(i * d + j)] += x[static_cast<std::size_t>(i)] * x[static_cast<std::size_t>(j)];
    }
    for (std::int64_t i = 0; i < d; ++i)
      for (std::int64_t j = 0; j < i; ++j)
        cov[static_cast<std::size_t>(i * d + j)] = cov[static_cast<std::size_t>(j * d + i)];
    const std::vector<double> values = symmetric_eigenvalues(std::move(cov), d);
    double total = 0;
    for (const double v : values) total += std::max(v, 0.0);
    out << "keys of kv head " << h << ": 50/90/99% of the centred variance in";
    const char* sep = " ";
    for (const double share : {0.5, 0.9, 0.99}) {
      double acc = 0;
      std::int64_t r = 0;
      while (r < d && acc < share * total) acc += std::max(values[static_cast<std::size_t>(r++)], 0.0);
      out << sep << r;
      sep = "/";
    }
    out << " of " << d << " principal components\n";
  }
}

/// "kept keys hold X of the attention; the exact top-64/256/k keys outside them hold Y": how much of each row's
/// attention (pbar, means over the rows) a candidate search can affect at all.
void print_kept_mass(const keysel::ExactReference& reference, const keysel::SelectionPolicy& p, std::ostream& out) {
  const std::vector<std::int64_t> ks{64, 256, p.k};
  double kept_sum = 0;
  std::vector<double> free_sum(ks.size(), 0.0);
  std::int64_t rows = 0;
  for (std::int64_t t = 0; t < reference.shape().tokens; ++t) {
    const std::int64_t allowed = reference.allowed(t);
    const std::int64_t sink_end = std::min(p.n_sink, allowed), local_start = std::max(allowed - p.n_local, sink_end);
    const auto kept = [&](std::int64_t s) { return s < sink_end || s >= local_start; };
    for (std::int64_t g = 0; g < reference.groups(); ++g) {
      const std::span<const double> pbar = reference.pbar(t, g);
      std::vector<std::int64_t> order(static_cast<std::size_t>(allowed));
      for (std::int64_t s = 0; s < allowed; ++s) {
        order[static_cast<std::size_t>(s)] = s;
        if (kept(s)) kept_sum += pbar[static_cast<std::size_t>(s)];
      }
      std::sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
        return pbar[static_cast<std::size_t>(a)] != pbar[static_cast<std::size_t>(b)]
                   ? pbar[static_cast<std::size_t>(a)] > pbar[static_cast<std::size_t>(b)]
                   : a < b;
      });
      for (std::size_t i = 0; i < ks.size(); ++i) {
        for (std::int64_t r = 0; r < std::min(ks[i], allowed); ++r) {
          const std::int64_t s = order[static_cast<std::size_t>(r)];
          if (!kept(s)) free_sum[i] += pbar[static_cast<std::size_t>(s)];
        }
      }
      ++rows;
    }
  }
  out << "kept keys (" << p.n_sink << " sinks, " << p.n_local << " local) hold " << kept_sum / static_cast<double>(rows)
      << " of the attention; the exact top-64/256/" << p.k << " keys outside them hold";
  const char* sep = " ";
  for (const double m : free_sum) {
    out << sep << m / static_cast<double>(rows);
    sep = "/";
  }
  out << "\n";
}

#if KEYSEL_FAISS
/// The partition bound of IVF (--partition-bound): k-means into nlist lists over the keys as the "+mips+balance"
/// index stores them, then for every row the share of the keys that the lists must hold to cover 90% of the
/// row's exact top-k free keys, (a) taking the lists in the best possible order (an oracle that knows where the
/// top-k keys are: most top-k keys per key first) and (b) in the order the queries' centroid distances give
/// (each head's ranking, interleaved: what nprobe does). (a) bounds every probe rule over that partition.
void print_partition_bound(const keysel::Workload& w, const keysel::ExactReference& reference,
                           const keysel::SelectionPolicy& p, std::int64_t nlist, std::ostream& out) {
  const std::int64_t n = w.shape.keys, heads = w.shape.kv_heads, d = w.shape.head_dim, e = d + 1;
  const std::int64_t group_size = w.shape.query_heads / heads;
  std::vector<std::int32_t> exact(static_cast<std::size_t>(w.shape.tokens * heads * p.width()));
  reference.exact_topk(p, keysel::TensorView(exact.data(), keysel::DType::int32, {w.shape.tokens, heads, p.width()}));
  double oracle_sum = 0, probe_sum = 0;
  std::int64_t rows = 0;
  for (std::int64_t h = 0; h < heads; ++h) {
    // Balance the channels, then the MIPS coordinate (as faiss_search.cpp stores keys).
    std::vector<double> rms(static_cast<std::size_t>(d), 0.0);
    for (std::int64_t s = 0; s < n; ++s)
      for (std::int64_t c = 0; c < d; ++c)
        rms[c] += std::pow(w.k[static_cast<std::size_t>((s * heads + h) * d + c)], 2);
    for (double& r : rms) r = r > 0 ? std::sqrt(r / static_cast<double>(n)) : 1.0;
    std::vector<float> x(static_cast<std::size_t>(n * e));
    double bound = 0;
    for (std::int64_t s = 0; s < n; ++s) {
      double norm = 0;
      for (std::int64_t c = 0; c < d; ++c) {
        const double v = w.k[static_cast<std::size_t>((s * heads + h) * d + c)] / rms[c];
        x[static_cast<std::size_t>(s * e + c)] = static_cast<float>(v);
        norm += v * v;
      }
      bound = std::max(bound, norm);
    }
    for (std::int64_t s = 0; s < n; ++s) {
      double norm = 0;
      for (std::int64_t c = 0; c < d; ++c) norm += std::pow(x[static_cast<std::size_t>(s * e + c)], 2);
      x[static_cast<std::size_t>(s * e + d)] = static_cast<float>(std::sqrt(std::max(bound - norm, 0.0)));
    }
    std::vector<float> centroids(static_cast<std::size_t>(nlist * e));
    faiss::kmeans_clustering(static_cast<std::size_t>(e), static_cast<std::size_t>(n), static_cast<std::size_t>(nlist),
                             x.data(), centroids.data());
    faiss::IndexFlatL2 coarse(e);
    coarse.add(nlist, centroids.data());
    std::vector<float> distance(static_cast<std::size_t>(n));
    std::vector<faiss::Index::idx_t> list(static_cast<std::size_t>(n));
    coarse.search(n, x.data(), 1, distance.data(), list.data());
    std::vector<double> size(static_cast<std::size_t>(nlist), 0.0);
    for (std::int64_t t = 0; t < w.shape.tokens; ++t) {
      const std::int64_t allowed = reference.allowed(t);
      const std::int64_t sink_end = std::min(p.n_sink, allowed), local_start = std::max(allowed - p.n_local, sink_end);
      std::vector<double> hits(static_cast<std::size_t>(nlist), 0.0);
      double targets = 0;
      for (std::int64_t i = 0; i < p.width(); ++i) {
        const std::int32_t key = exact[static_cast<std::size_t>((t * heads + h) * p.width() + i)];
        if (key < sink_end || key >= local_start) continue;  // -1 padding and kept keys
        hits[static_cast<std::size_t>(list[static_cast<std::size_t>(key)])] += 1;
        targets += 1;
      }
      if (targets == 0) continue;
      // List sizes over the row's free keys (the causal rule and the kept keys bound what a search scans).
      std::fill(size.begin(), size.end(), 0.0);
      for (std::int64_t key = sink_end; key < local_start; ++key)
        size[static_cast<std::size_t>(list[static_cast<std::size_t>(key)])] += 1;
      const auto scanned_for = [&](const std::vector<std::int64_t>& order) {
        double covered = 0, scanned = 0;
        for (const std::int64_t l : order) {
          if (covered >= 0.9 * targets) break;
          covered += hits[static_cast<std::size_t>(l)];
          scanned += size[static_cast<std::size_t>(l)];
        }
        return scanned / static_cast<double>(allowed);
      };
      std::vector<std::int64_t> order(static_cast<std::size_t>(nlist));
      for (std::int64_t l = 0; l < nlist; ++l) order[static_cast<std::size_t>(l)] = l;
      std::vector<std::int64_t> oracle = order;
      std::vector<double> density(static_cast<std::size_t>(nlist));
      for (std::int64_t l = 0; l < nlist; ++l) density[l] = size[l] > 0 ? hits[l] / size[l] : -1.0;
      std::sort(oracle.begin(), oracle.end(), [&](std::int64_t a, std::int64_t b) {
        return density[a] != density[b] ? density[a] > density[b] : a < b;  // most top-k keys per key first
      });
      // Each head's centroid ranking (queries get the balancing scales and a 0 MIPS coordinate).
      std::vector<std::int64_t> best_rank(static_cast<std::size_t>(nlist), nlist);
      for (std::int64_t qh = h * group_size; qh < (h + 1) * group_size; ++qh) {
        std::vector<float> q(static_cast<std::size_t>(e), 0.0f);
        for (std::int64_t c = 0; c < d; ++c) {
          q[static_cast<std::size_t>(c)] =
              static_cast<float>(w.q[static_cast<std::size_t>((t * w.shape.query_heads + qh) * d + c)] * rms[c]);
        }
        std::vector<float> cd(static_cast<std::size_t>(nlist));
        std::vector<faiss::Index::idx_t> cl(static_cast<std::size_t>(nlist));
        coarse.search(1, q.data(), nlist, cd.data(), cl.data());
        for (std::int64_t r = 0; r < nlist; ++r) {
          auto& b = best_rank[static_cast<std::size_t>(cl[static_cast<std::size_t>(r)])];
          b = std::min(b, r);
        }
      }
      std::vector<std::int64_t> probe = order;
      std::stable_sort(probe.begin(), probe.end(),
                       [&](std::int64_t a, std::int64_t b) { return best_rank[a] < best_rank[b]; });
      oracle_sum += scanned_for(oracle);
      probe_sum += scanned_for(probe);
      ++rows;
    }
  }
  out << "partition bound, IVF" << nlist << " over balanced MIPS keys: keys that must be scanned to hold 90% of the"
      << " exact top-k free keys: " << 100 * oracle_sum / static_cast<double>(rows)
      << "% with the best lists (oracle), " << 100 * probe_sum / static_cast<double>(rows)
      << "% in the queries' centroid order\n";
}
#endif

/// The workload-realism flags (and --realistic, --partition-bound); false when `arg` is none of them.
bool parse_realism_flag(const char* arg) {
  keysel::SyntheticOptions& r = g_setup.realism;
  std::int64_t v = 0;
  if (std::strcmp(arg, "--realistic") == 0) {
    apply_realistic_preset(r);
  } else if (std::strcmp(arg, "--partition-bound") == 0) {
    g_setup.partition_bound = true;
  } else if (parse_flag(arg, "--key-rank", v)) {
    r.key_rank = v;
  } else if (parse_flag(arg, "--outliers", v)) {
    r.outlier_channels = v;
  } else if (!parse_flag(arg, "--rope-base", r.rope_base) && !parse_flag(arg, "--focus", r.focus) &&
             !parse_flag(arg, "--temperature", r.temperature) && !parse_flag(arg, "--key-shift", r.key_shift) &&
             !parse_flag(arg, "--outlier-scale", r.outlier_scale)) {
    return false;
  }
  return true;
}

/// IVF lists of the many-lists rows: 4096, capped at the largest power of two <= N / 16.
std::int64_t ivf_lists_large(std::int64_t keys) {
  std::int64_t nlist = 4096;
  while (nlist > 1 && nlist * 16 > keys) nlist /= 2;
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
    else if (parse_flag(argv[i], "--prefill-queries", v)) g_setup.prefill_queries = std::max<std::int64_t>(v, 0);
    else if (parse_flag(argv[i], "--rows", v)) {
      if (v < 1) {
        std::cerr << "bench_candidates: --rows must be >= 1, found '" << argv[i] << "'\n";
        return 1;
      }
      g_setup.rows = v;
    }
    else if (!parse_realism_flag(argv[i]))
      rest.push_back(argv[i]);
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
  std::cerr << "workload: " << workload.name << " N=" << shape.keys << " T=" << shape.tokens
            << " Hq=" << shape.query_heads << " Hkv=" << shape.kv_heads << " D=" << shape.head_dim << " k=" << g_setup.k
            << " per_kv_head, n_sink=" << policy().n_sink << ", n_local=" << policy().n_local << "\n";
  {
    keysel::print_workload_properties(
        keysel::measure_workload(workload, keysel::Granularity::per_kv_head, {64, 256, g_setup.k}), std::cerr);
    std::cerr << "\n";
    print_key_spectrum(workload, std::cerr);
    print_kept_mass(reference, policy(), std::cerr);
#if KEYSEL_FAISS
    if (g_setup.partition_bound) {
      for (const std::int64_t nlist : {ivf_lists(shape.keys), ivf_lists_large(shape.keys)}) {
        print_partition_bound(workload, reference, policy(), nlist, std::cerr);
      }
    }
#endif
  }

  measure_fp8_indexer(workload, policy());
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
    for (const std::int64_t nprobe : {probes(32), probes(8)}) {
      register_config({ivf + ",Flat", true, nprobe, 0, 0, {}, false, true});
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
      // Many short lists: nlist 4096 (capped at N / 16), nprobe about 2, 3, 5 and 10% of the lists; balanced
      // channels and the MIPS transform (the best IVF setting at nlist 1024), one row without balancing.
      const std::int64_t big = ivf_lists_large(shape.keys);
      const std::string ivf_big = "IVF" + std::to_string(big) + ",Flat";
      const auto share = [big](double fraction) {
        return std::max<std::int64_t>(1, static_cast<std::int64_t>(std::llround(static_cast<double>(big) * fraction)));
      };
      const auto each = keysel::CandidateQueries::each_head;
      const auto mean_query = keysel::CandidateQueries::group_mean;
      register_config({ivf_big, true, share(0.05)});
      for (const double f : {0.02, 0.03, 0.05, 0.10})
        register_config({ivf_big, true, share(f), 0, 0, each, false, true});
      register_config({ivf_big, true, share(0.05), 0, wide, each, false, true});
      for (const double f : {0.05, 0.10, 0.20}) {
        register_config({ivf_big, true, share(f), 0, 0, mean_query, false, true});
      }
      register_config({"IVF" + std::to_string(big) + ",SQ8", true, share(0.05), 0, wide, each, false, true});
      // HNSW on balanced channels, one graph walk per query head or per key head (the group's mean query).
      register_config({"HNSW32", false, 0, 2048, 0, each, false, true});
      register_config({"HNSW32", false, 0, 2048, 0, mean_query, false, true});
      // Sparser graphs: a walk computes up to 2M distances per expanded node and expands about ef >= k' nodes.
      register_config({"HNSW16", false, 0, 2048, 0, each, false, true});
      register_config({"HNSW8", false, 0, 2048, 0, each, false, true});
    }
    if (g_indexer_score) {
      // Re-rank by the dump's Lightning Indexer. With k' = N this is the indexer's own top-k.
      const auto each = keysel::CandidateQueries::each_head;
      register_config({"brute_force", false, 0, 0, shape.keys, each, true});
      register_config({ivf + ",Flat", true, probes(8), 0, wide, each, true});
      register_config({"HNSW32", false, 0, 2048, wide, each, true});
    }
  }
  // Query-aware lists (QueryIVF): 4-bit codes re-ranked over the stored codes, nprobe cut short or safe (0).
  if (g_training_tokens * (shape.query_heads / shape.kv_heads) >= 64) {
    const std::int64_t train = g_training_tokens * (shape.query_heads / shape.kv_heads);
    const std::int64_t keys = shape.keys;
    const auto lists = [train, keys](std::int64_t wanted) {  // at most the training queries and N / 16
      std::int64_t l = wanted;
      while (l > 1 && (l > train || l * 16 > keys)) l /= 2;
      return l;
    };
    const auto each = keysel::CandidateQueries::each_head;
    const auto mean_query = keysel::CandidateQueries::group_mean;
    const std::string qa = "QueryIVF" + std::to_string(lists(256));
    const std::string qa_big = "QueryIVF" + std::to_string(lists(1024)) + (lists(1024) == lists(256) ? "x2" : "");
    for (const std::int64_t nprobe : {4, 8, 16, 32, 0}) {
      register_config({qa + ",SQ4", false, nprobe, 0, 0, each, false, false, true});
    }
    for (const std::int64_t nprobe : {8, 16, 32}) {
      register_config({qa + ",SQ4", false, nprobe, 0, 0, mean_query, false, false, true});
      register_config({qa + "x2,SQ4", false, nprobe, 0, 0, each, false, false, true});
    }
    for (const std::int64_t nprobe : {16, 32, 64, 128}) {
      register_config({qa_big + ",SQ4", false, nprobe, 0, 0, each, false, false, true});
    }
    // The group's query heads share one pass over the lists: each head's own search, list reads counted once.
    for (const std::int64_t nprobe : {2, 4, 8, 16, 32}) {
      register_config({qa + ",SQ4", false, nprobe, 0, 0, each, false, false, true, false, true});
    }
    for (const std::int64_t nprobe : {16, 64, 128}) {
      register_config({qa_big + ",SQ4", false, nprobe, 0, 0, each, false, false, true, false, true});
    }
    register_config({qa + ",SQ8", false, 16, 0, 0, each, false, false, true});
    // The center-and-radius bound beside the channel boxes: what safe probing scans, and its bytes when cut short.
    for (const std::int64_t nprobe : {4, 0}) {
      register_config({qa + ",SQ4,Radius", false, nprobe, 0, 0, each, false, false, true});
    }
    if (shape.kv_heads == 1) {  // the same lists trained on keys: what the queries add
      for (const std::int64_t nprobe : {4, 16}) {
        register_config({qa + ",SQ4", false, nprobe, 0, 0, each, false, false, true, true});
      }
    }
    register_config({qa + ",Flat", false, 16, 0, 0, each, false, false, false});
    register_config({qa + ",Flat", false, 0, 0, 0, each, false, false, false});
    if (!g_index_keys.empty() && g_training_tokens >= lists(256)) {
      for (const std::int64_t nprobe : {2, 4, 8, 16, 32, 0}) register_index_key_config(qa + ",SQ4", nprobe, 1);
      for (const bool exact : {false, true}) {
        for (const std::int64_t nprobe : {4, 16, 0}) register_index_key_config(qa + ",SQ4", nprobe, 4, exact);
        register_index_key_config("brute_force", 0, 4, exact);
      }
    }
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
