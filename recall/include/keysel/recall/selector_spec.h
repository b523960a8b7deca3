// Selector specs: any selector keysel ships, described by a small JSON object, built by one call.
//
//   {"type": "exact"}
//   {"type": "random", "seed": 1}
//   {"type": "streaming", "n_sink": 4}
//   {"type": "block_topk", "block_size": 16, "oversample": 1.0}
//   {"type": "fidelity", "precision": 0.9, "fill": "random" | "next_ranked", "seed": 0}
//   {"type": "hybrid", "candidates": {<spec>}, "candidate_k": 4096}
//   {"type": "proxy", "format": "fp8_e4m3", "scale_granularity": "per_token" | "per_group", "group_size": 128,
//    "power_of_two_scales": false, "hadamard": false, "aggregation": "logsumexp" | "max" | "mean", "rank": 0}
//   {"type": "indexer", ...the proxy keys...}
//   {"type": "faiss", "factory": "IVF64,Flat", "candidates": 0, "nprobe": 0, "ef_search": 0,
//    "queries": "each_head" | "group_mean", "mips_to_l2": false, "train_keys": 0}
// Every spec may also carry "name" (the label in studies and reports). Unknown keys, wrong value types and
// unknown types throw keysel::Error naming the key. docs/studies.md explains every field.
//
// "indexer": keysel's synthetic workloads and dumps carry no trained Lightning Indexer tensors (indexer
// queries, weights, keys), so the indexer selector is stood in for by the proxy scorer of proxy_scorer.h with
// the same low-precision storage (format, scale granularity, rotation): the main attention's own q.K read
// from an indexer-style key cache. Its default name is "indexer(<quantization>)".
//
// `keysel tune` writes its cheapest configuration in this format; load_selector_spec() builds it back.
#pragma once

#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "keysel/indexer/selector.h"

namespace keysel {

/// Builds a selector from a JSON spec (text of one object, see above). Throws keysel::Error on a bad spec,
/// and for "faiss" when keysel was built without FAISS (keysel::built_with_faiss()).
std::unique_ptr<Selector> make_selector_from_spec(std::string_view spec_json);
/// Reads a spec file (such as the one `keysel tune --out FILE` writes) and builds its selector.
std::unique_ptr<Selector> load_selector_spec(const std::string& path);
/// The spec's text normalised: keys sorted, defaults not filled in, compact (checks it like make_selector).
std::string normalize_selector_spec(std::string_view spec_json);
/// The selector types make_selector_from_spec accepts, in the order above.
std::span<const std::string_view> selector_spec_types();

}  // namespace keysel
