// Selector specs: any selector keysel ships, described by a small JSON object, built by one call.
//
//   {"type": "exact"}
//   {"type": "random", "seed": 1}
//   {"type": "streaming", "n_sink": 4}
//   {"type": "block_topk", "block_size": 16, "oversample": 1.0}
//   {"type": "fidelity", "precision": 0.9, "fill": "random" | "next_ranked", "drop": "random" | "lowest", "seed": 0}
//   {"type": "hybrid", "candidates": {<spec>}, "candidate_k": 4096}
//   {"type": "proxy", "format": "fp8_e4m3", "scale_granularity": "per_token" | "per_group", "group_size": 128,
//    "power_of_two_scales": false, "hadamard": false, "aggregation": "logsumexp" | "max" | "mean", "rank": 0}
//   {"type": "indexer", ...the proxy keys...}
//   {"type": "faiss", "factory": "IVF64,Flat", "candidates": 0, "nprobe": 0, "ef_search": 0,
//    "queries": "each_head" | "group_mean", "mips_to_l2": false, "balance_channels": false, "train_keys": 0,
//    "rerank": "exact" | "indexer"}
//   ("rerank": "indexer" re-ranks the candidates by the workload's trained Lightning Indexer, which must then
//   have indexer tensors; "balance_channels" rescales outlier channels before indexing: candidate_search.h)
// Every spec may also carry "name" (the label in studies and reports). Unknown keys, wrong value types and
// unknown types throw keysel::Error naming the key. docs/studies.md explains every field.
//
// "indexer": given a workload's trained Lightning-Indexer tensors (IndexerTensors: the tiny-lm model's layers,
// dumps with index_q, index_k and index_w), the spec builds that indexer: a LightningIndexer with the spec's
// quantisation (format, scale granularity, group size, power-of-two scales, rotation) holding the indexer keys,
// queried with the indexer queries and head weights (make_indexer_selector, lightning_indexer.h). It selects per
// token, one selection written into every group. Without such tensors (synthetic workloads) it is stood in for
// by the proxy scorer of proxy_scorer.h with the same low-precision storage: the main attention's own q.K read
// from an indexer-style key cache. Its default name is "indexer(<quantization>)" either way; "aggregation" and
// "rank" apply to the stand-in only (non-default values with indexer tensors throw keysel::Error).
//
// `keysel tune` writes its cheapest configuration in this format; load_selector_spec() builds it back.
#pragma once

#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "keysel/core/tensor.h"
#include "keysel/indexer/selector.h"
#include "keysel/recall/synthetic.h"

namespace keysel {

/// A trained Lightning Indexer's tensors for one attention (SPEC §3), fp32, fp16 or bf16 on the CPU. The
/// selector built from them copies what it needs: the views need only outlive the make_selector_from_spec call.
struct IndexerTensors {
  TensorView queries;  // qI [T, HI, DI] (after RoPE where the model applies it)
  TensorView keys;     // kI [N, DI]
  TensorView weights;  // w  [T, HI]
};

/// Views of a workload's trained indexer tensors (Workload::index_q, index_k, index_w: a dump layer or a tiny-lm
/// layer that has them), valid while the workload lives; std::nullopt when it has none.
std::optional<IndexerTensors> workload_indexer_tensors(const Workload& workload);

/// Builds a selector from a JSON spec (text of one object, see above). Throws keysel::Error on a bad spec,
/// and for "faiss" when keysel was built without FAISS (keysel::built_with_faiss()).
std::unique_ptr<Selector> make_selector_from_spec(std::string_view spec_json);
/// The same for one attention that has trained indexer tensors: an "indexer" spec (also as a "hybrid"'s
/// candidates) scores with `indexer` (see above); other types do not use it. `indexer` may be nullptr (the
/// stand-in). Throws keysel::Error naming the tensor when the tensors' shapes disagree.
std::unique_ptr<Selector> make_selector_from_spec(std::string_view spec_json, const IndexerTensors* indexer);
/// Reads a spec file (such as the one `keysel tune --out FILE` writes) and builds its selector.
std::unique_ptr<Selector> load_selector_spec(const std::string& path);
/// The spec's text normalised: keys sorted, defaults not filled in, compact (checks it like make_selector).
std::string normalize_selector_spec(std::string_view spec_json);
/// The selector types make_selector_from_spec accepts, in the order above.
std::span<const std::string_view> selector_spec_types();

}  // namespace keysel
