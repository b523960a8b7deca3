// The selector interface: anything that picks, for each query token and group, which keys attention reads.
//
// Attention, studies and tuning take any Selector; users add their own by implementing select().
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "keysel/core/attention_inputs.h"
#include "keysel/core/selection.h"
#include "keysel/core/tensor.h"

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

/// What the caller knows about the key cache since this selector's previous select() call. A selector that
/// keeps state over the keys (FAISS indexes, block summaries) reuses it only as this says.
enum class CacheReuse : std::uint8_t {
  /// Nothing is said (the default): a selector keeps state only where it can verify it, and says how in its
  /// documentation (CandidateSelector checks the view and two rows; block top-k only with reuse_summaries).
  unknown,
  /// Keys [0, unchanged_keys) are those of the previous call, unchanged; later keys are new (a decode step
  /// appended them). State over the unchanged keys is kept without checks; the rest is computed.
  appended,
  /// A different cache (another sequence, or rewritten rows): no state is kept.
  fresh,
};

/// One select() call: everything a selector may need, per call. Views are read during the call only.
struct SelectionRequest {
  /// The main attention: q [T, Hq, D], k [N, Hkv, D] (fp32, fp16 or bf16), positions int32 [T]; v unused.
  AttentionInputs attention;
  /// The Lightning Indexer's per-step inputs, for selectors that score with a trained indexer (SPEC §3); empty
  /// views otherwise. The indexer's keys live in the selector's own key cache (IndexerKeyCache), which the
  /// caller appends to as the main cache grows.
  TensorView indexer_queries;  // qI [T, HI, DI]: fp32, fp16 or bf16
  TensorView indexer_weights;  // w  [T, HI]: fp32
  /// The key cache's state since the previous call (see CacheReuse).
  CacheReuse cache = CacheReuse::unknown;
  std::int64_t unchanged_keys = 0;  // with CacheReuse::appended: 0 <= unchanged_keys <= N

  /// A request over the main attention only, cache state unknown.
  static SelectionRequest of(const AttentionInputs& attention) {
    SelectionRequest request;
    request.attention = attention;
    return request;
  }
};

class Selector {
 public:
  virtual ~Selector() = default;
  /// Short name used in tables and reports ("exact", "random", "streaming", ...).
  virtual std::string name() const = 0;

  /// Writes selection int32 [T, G, policy.width()] (G = group_count(policy.granularity, Hq, Hkv)) for the
  /// request and returns what it cost. One check serves every selector and runs before anything is written:
  /// the attention inputs (AttentionInputs::validate), the policy, the selection (a writable CPU int32
  /// [T, G, width] view), the indexer inputs when given (qI [T, HI, DI] with HI, DI >= 1; w [T, HI]) and the
  /// cache state (0 <= unchanged_keys <= N). A selector that needs no attention inputs (random, streaming) reads
  /// only positions and N.
  SelectionCost select(const SelectionRequest& request, const SelectionPolicy& policy, const TensorView& selection);
  /// select(SelectionRequest::of(inputs), policy, selection): the main attention only, cache state unknown.
  SelectionCost select(const AttentionInputs& inputs, const SelectionPolicy& policy, const TensorView& selection);

 protected:
  /// The selector's work, on a request, policy and selection that passed select()'s checks.
  virtual SelectionCost do_select(const SelectionRequest& request, const SelectionPolicy& policy,
                                  const TensorView& selection) = 0;
};

/// The exact top-k of the main attention (SPEC §2), computed in double.
std::unique_ptr<Selector> make_exact_selector();
/// Kept keys plus uniformly random other allowed keys; the same seed gives the same selection.
std::unique_ptr<Selector> make_random_selector(std::uint64_t seed);
/// StreamingLLM-style: the policy's sinks (at least `n_sink`) plus the most recent allowed keys up to the width.
std::unique_ptr<Selector> make_streaming_selector(std::int64_t n_sink);

}  // namespace keysel
