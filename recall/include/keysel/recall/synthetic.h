// Seeded synthetic attention workloads with the structure real decoders show.
#pragma once

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "keysel/core/attention_inputs.h"
#include "keysel/core/selection.h"
#include "keysel/indexer/selector.h"

namespace keysel {

struct SyntheticOptions {
  std::int64_t keys = 8192;        // N
  std::int64_t tokens = 16;        // T query tokens, at the last T positions (decode of T consecutive tokens)
  std::int64_t query_heads = 32;   // Hq
  std::int64_t kv_heads = 8;       // Hkv
  std::int64_t head_dim = 128;     // D
  std::int64_t value_dim = 128;    // Dv
  std::uint64_t seed = 1;
  double sink_strength = 4.0;      // extra logit mass on position 0 (attention sink); 0 for none
  double recency = 1.0;            // strength of the bias toward recent keys; 0 for none
  double focus = 1.0;              // how peaked attention is on a few relevant keys; 0 gives diffuse attention

  // Realism knobs, each off by default (the defaults above give the same bits as before they existed).
  // See recall/src/synthetic.cpp for the generative model.
  double rope_base = 0.0;          // > 0: rotate q and k by their positions as RoPE does (rotate-half pairs
                                   // (i, i + D/2), angle pos * rope_base^(-2i/D); Llama: 10000, 500000)
  std::int64_t outlier_channels = 0;  // channels per key head whose keys are multiplied by outlier_scale and
  double outlier_scale = 1.0;         // queries divided by it: logits unchanged, magnitudes as in real caches
  std::int64_t key_rank = 0;       // 1..D: the keys' background and recency parts lie in a random rank-r subspace
  double key_shift = 0.0;          // adds key_shift * sqrt(D) along a random direction to every key of a head:
                                   // attention is unchanged (softmax ignores a per-query constant) but keys and
                                   // queries no longer share a distribution (what hurts nearest-neighbour search)
  double temperature = 1.0;        // attention entropy knob: every logit is divided by it (> 1: flatter)

  /// The attention shape a workload of these options has (T, N, Hq, Hkv, D, Dv), before it is generated.
  AttentionShape shape() const { return {tokens, keys, query_heads, kv_heads, head_dim, value_dim}; }
};

/// q, k, v in fp32 with their positions, owned.
struct Workload {
  std::string name;
  AttentionShape shape;
  std::vector<float> q;                 // [T, Hq, D]
  std::vector<float> k;                 // [N, Hkv, D]
  std::vector<float> v;                 // [N, Hkv, Dv]
  std::vector<std::int32_t> positions;  // [T]
  double scale = 0.0;                   // softmax scale for inputs(); 0 means 1/sqrt(D)

  // A trained Lightning Indexer's tensors, when the workload has them (a dump layer with index_q, index_k and
  // index_w); empty otherwise. The "indexer" selector spec of a study scores with them (selector_spec.h).
  std::int64_t index_heads = 0;  // HI (0: no indexer tensors)
  std::int64_t index_dim = 0;    // DI
  std::vector<float> index_q;    // [T, HI, DI]
  std::vector<float> index_k;    // [N, DI]
  std::vector<float> index_w;    // [T, HI]

  /// Views over the owned data (valid while the workload lives and is not resized).
  AttentionInputs inputs() const;
  /// A selection request over inputs(), with the indexer tensors' queries and weights when the workload has
  /// them (cache state unknown).
  SelectionRequest request() const;
};

/// Generates a workload; the same options give the same bits. Throws keysel::Error on bad options.
Workload make_synthetic_workload(const SyntheticOptions& options);

/// Measured properties of a workload's attention (SPEC §2 group distributions pbar, exact in double), so users
/// see what a generator setting gives them.
struct WorkloadProperties {
  Granularity granularity = Granularity::per_kv_head;
  double entropy = 0;             // mean over (t, G) of -sum pbar log pbar, nats
  double entropy_normalized = 0;  // mean of entropy / log|allowed|
  double sink_mass = 0;           // mean pbar of position 0
  std::vector<std::int64_t> k_values;
  std::vector<double> topk_mass;  // mean mass of the exact top-k, per k_values entry
  double key_norm = 0;            // root-mean-square |k[s, kv]|
  double query_norm = 0;          // root-mean-square |q[t, h]|
  double max_abs_key = 0;         // largest |key channel| (outliers show here)
};
WorkloadProperties measure_workload(const Workload& workload, Granularity granularity = Granularity::per_kv_head,
                                    std::vector<std::int64_t> k_values = {64, 256, 1024});
/// One paragraph of text: "entropy 4.21 nats (0.58 of log N), sink 0.25, top-64 mass 0.60, ...".
void print_workload_properties(const WorkloadProperties& properties, std::ostream& out);

}  // namespace keysel
