// keysel::make_selector_from_spec (recall/include/keysel/recall/selector_spec.h) on arbitrary text, and the
// selector it builds run on a small synthetic workload: N = 64 keys, T = 3 query tokens, 4 query heads over 2
// key heads, D = Dv = 16. The selection must pass validate_selection (a selector that writes an invalid one is
// a finding).
//
// Input: the spec's JSON text, optionally followed by a NUL byte and up to three policy bytes (a plain JSON
// file is a valid input and runs with k = 8, per_kv_head, no kept keys, decode positions, no indexer tensors):
//   byte 0: k = 1 + byte % 80 (k > N = 64 included)
//   byte 1: bits 0-1 granularity (0 per_head, 1 per_kv_head, 2-3 per_token); bit 2 kept keys on top of k;
//           bits 3-4 n_sink; bits 5-6 n_local; bit 7 the trained-indexer tensors (an "indexer" spec scores with
//           them instead of the stand-in)
//   byte 2: bit 0 prefill positions {0, 9, 63} (few allowed keys for the first token) instead of {61, 62, 63};
//           bits 1-2 what the second call's request says about the key cache (the keys are the same, so every
//           choice is true): 0 unknown, 1 fresh, 2 appended with all N keys unchanged, 3 appended with the first
//           N/2 unchanged
// With bit 7 of byte 1 the requests also carry the indexer queries and weights (SelectionRequest).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_support.h"
#include "keysel/core/random.h"
#include "keysel/core/selection.h"
#include "keysel/indexer/selector.h"
#include "keysel/recall/selector_spec.h"
#include "keysel/recall/synthetic.h"

using keysel::fuzz::finding;

namespace {

constexpr std::int64_t kKeys = 64, kTokens = 3, kQueryHeads = 4, kKvHeads = 2, kDim = 16;
constexpr std::int64_t kIndexHeads = 2, kIndexDim = 8;

struct Fixture {
  keysel::Workload workload;
  std::vector<std::int32_t> prefill_positions{0, 9, 63};
  std::vector<float> index_q, index_k, index_w;
  keysel::IndexerTensors indexer;

  Fixture() {
    keysel::SyntheticOptions o;
    o.keys = kKeys;
    o.tokens = kTokens;
    o.query_heads = kQueryHeads;
    o.kv_heads = kKvHeads;
    o.head_dim = kDim;
    o.value_dim = kDim;
    o.seed = 7;
    workload = keysel::make_synthetic_workload(o);
    index_q.resize(kTokens * kIndexHeads * kIndexDim);
    index_k.resize(kKeys * kIndexDim);
    index_w.resize(kTokens * kIndexHeads);
    keysel::RandomStream random(11);
    random.fill_normal(std::span<float>(index_q));
    random.fill_normal(std::span<float>(index_k));
    random.fill_normal(std::span<float>(index_w));
    indexer.queries = keysel::TensorView(index_q.data(), keysel::DType::fp32, {kTokens, kIndexHeads, kIndexDim});
    indexer.keys = keysel::TensorView(index_k.data(), keysel::DType::fp32, {kKeys, kIndexDim});
    indexer.weights = keysel::TensorView(index_w.data(), keysel::DType::fp32, {kTokens, kIndexHeads});
  }
};

const Fixture& fixture() {
  static const Fixture f;
  return f;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  keysel::fuzz::single_threaded();
  (void)fixture();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const Fixture& f = fixture();
  const char* text = reinterpret_cast<const char*>(data);
  const void* nul = std::memchr(data, 0, size);
  const std::size_t text_size = nul != nullptr ? static_cast<std::size_t>(static_cast<const std::uint8_t*>(nul) - data) : size;
  std::uint8_t policy_bytes[3] = {7, 1, 0};
  for (std::size_t i = 0; i < 3 && text_size + 1 + i < size; ++i) policy_bytes[i] = data[text_size + 1 + i];
  const std::string_view spec(text, text_size);

  keysel::SelectionPolicy policy;
  policy.k = 1 + policy_bytes[0] % 80;
  const int g = policy_bytes[1] & 3;
  policy.granularity = g == 0 ? keysel::Granularity::per_head
                       : g == 1 ? keysel::Granularity::per_kv_head
                                : keysel::Granularity::per_token;
  policy.kept_on_top = (policy_bytes[1] & 4) != 0;
  policy.n_sink = (policy_bytes[1] >> 3) & 3;
  policy.n_local = (policy_bytes[1] >> 5) & 3;
  if (!policy.kept_on_top) {  // kept keys count toward k: keep the policy valid
    policy.n_sink = std::min(policy.n_sink, policy.k);
    policy.n_local = std::min(policy.n_local, policy.k - policy.n_sink);
  }
  const bool with_indexer = (policy_bytes[1] & 128) != 0;
  const bool prefill = (policy_bytes[2] & 1) != 0;

  keysel::fuzz::fuzz_one([&] {
    const std::unique_ptr<keysel::Selector> selector =
        keysel::make_selector_from_spec(spec, with_indexer ? &f.indexer : nullptr);
    if (!selector) finding("make_selector_from_spec returned null");
    (void)selector->name();
    (void)keysel::normalize_selector_spec(spec);

    keysel::AttentionInputs inputs = f.workload.inputs();
    if (prefill) {
      inputs.positions = keysel::TensorView(f.prefill_positions.data(), keysel::DType::int32, {kTokens});
    }
    keysel::SelectionRequest request = keysel::SelectionRequest::of(inputs);
    if (with_indexer) {
      request.indexer_queries = f.indexer.queries;
      request.indexer_weights = f.indexer.weights;
    }
    const std::int64_t groups = keysel::group_count(policy.granularity, kQueryHeads, kKvHeads);
    const std::int64_t width = policy.width();
    std::vector<std::int32_t> selection(static_cast<std::size_t>(kTokens * groups * width), 12345);
    const keysel::TensorView view(selection.data(), keysel::DType::int32, {kTokens, groups, width});
    (void)selector->select(request, policy, view);
    try {
      keysel::validate_selection("fuzz_selector_spec", view, "selection", inputs.positions, kKeys, groups);
    } catch (const keysel::Error& e) {
      finding(std::string("selector ") + selector->name() + " wrote an invalid selection: " + e.what());
    }
    // A second call on the same selector, which may reuse state over the keys as the request allows.
    switch ((policy_bytes[2] >> 1) & 3) {
      case 0: request.cache = keysel::CacheReuse::unknown; break;
      case 1: request.cache = keysel::CacheReuse::fresh; break;
      case 2: request.cache = keysel::CacheReuse::appended; request.unchanged_keys = kKeys; break;
      default: request.cache = keysel::CacheReuse::appended; request.unchanged_keys = kKeys / 2; break;
    }
    std::fill(selection.begin(), selection.end(), 12345);
    (void)selector->select(request, policy, view);
    try {
      keysel::validate_selection("fuzz_selector_spec", view, "selection", inputs.positions, kKeys, groups);
    } catch (const keysel::Error& e) {
      finding(std::string("selector ") + selector->name() + " wrote an invalid selection on its second call: " +
              e.what());
    }
  });
  return 0;
}
