// The selector interface: anything that picks, for each query token and group, which keys attention reads.
//
// Attention, studies and tuning take any Selector; users add their own by implementing select().
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "keysel/core/attention_inputs.h"
#include "keysel/core/selection.h"

namespace keysel {

/// What a selection cost (SPEC §5), summed over the call's query tokens and groups.
struct SelectionCost {
  double key_bytes_read = 0;  // bytes of keys (or key summaries) read to score
  double macs = 0;            // multiply-accumulates spent scoring
  double keys_scored = 0;     // keys whose score was computed
  double seconds = 0;         // wall time of select()
  std::int64_t rows = 0;      // query tokens x groups the totals cover

  SelectionCost& operator+=(const SelectionCost& other);
};

class Selector {
 public:
  virtual ~Selector() = default;
  /// Short name used in tables and reports ("exact", "random", "streaming", ...).
  virtual std::string name() const = 0;
  /// Writes selection int32 [T, G, policy.width()] for the inputs (q, k, positions; v unused) and returns
  /// what it cost. A selector that needs no attention inputs (random, streaming) reads only positions and N.
  virtual SelectionCost select(const AttentionInputs& inputs, const SelectionPolicy& policy,
                               const TensorView& selection) = 0;
};

/// The exact top-k of the main attention (SPEC §2), computed in double.
std::unique_ptr<Selector> make_exact_selector();
/// Kept keys plus uniformly random other allowed keys; the same seed gives the same selection.
std::unique_ptr<Selector> make_random_selector(std::uint64_t seed);
/// StreamingLLM-style: the policy's sinks (at least `n_sink`) plus the most recent allowed keys up to the width.
std::unique_ptr<Selector> make_streaming_selector(std::int64_t n_sink);

}  // namespace keysel
