// The baseline selectors: exact top-k, random keys, and StreamingLLM-style sinks plus recent keys.
//
// Every selector writes rows the way select_topk does: the policy's kept keys (sinks 0..n_sink-1 and the last
// n_local allowed positions) plus other allowed keys, min(policy.width(), allowed) keys in all, in ascending
// position order, then -1 padding. All arguments are checked before anything is written.
#include "keysel/indexer/selector.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "keysel/core/dtype.h"
#include "keysel/core/error.h"
#include "keysel/core/random.h"
#include "keysel/indexer/topk.h"
#include "selectors_support.h"

namespace keysel {

SelectionCost& SelectionCost::operator+=(const SelectionCost& other) {
  key_bytes_read += other.key_bytes_read;
  macs += other.macs;
  keys_scored += other.keys_scored;
  seconds += other.seconds;
  rows += other.rows;
  return *this;
}

SelectionCost Selector::select(const SelectionRequest& request, const SelectionPolicy& policy,
                              const TensorView& selection) {
  constexpr std::string_view function = "Selector::select";
  const AttentionShape shape = request.attention.validate(function, /*need_v=*/false);
  policy.validate(function);
  const std::int64_t groups = group_count(policy.granularity, shape.query_heads, shape.kv_heads);
  check_selection_output(function, selection, shape.tokens, groups, policy.width());
  if (!request.indexer_queries.empty() || !request.indexer_weights.empty()) {
    expect_shape(function, request.indexer_queries, "request.indexer_queries", {shape.tokens, kAnyExtent, kAnyExtent});
    expect_dtype(function, request.indexer_queries, "request.indexer_queries", {DType::fp32, DType::fp16, DType::bf16});
    expect_device(function, request.indexer_queries, "request.indexer_queries", Device::cpu());
    KEYSEL_CHECK_ARG_IN(function, request.indexer_queries.size(1) >= 1 && request.indexer_queries.size(2) >= 1,
                        "request.indexer_queries", "[T, HI, DI] with HI, DI >= 1", request.indexer_queries.str());
    expect_shape(function, request.indexer_weights, "request.indexer_weights",
                 {shape.tokens, request.indexer_queries.size(1)});
    expect_dtype(function, request.indexer_weights, "request.indexer_weights", {DType::fp32});
    expect_device(function, request.indexer_weights, "request.indexer_weights", Device::cpu());
  }
  if (request.cache == CacheReuse::appended) {
    KEYSEL_CHECK_ARG_IN(function, request.unchanged_keys >= 0 && request.unchanged_keys <= shape.keys,
                        "request.unchanged_keys", "0 <= unchanged_keys <= N = " + std::to_string(shape.keys),
                        request.unchanged_keys);
  }
  return do_select(request, policy, selection);
}

SelectionCost Selector::select(const AttentionInputs& inputs, const SelectionPolicy& policy,
                              const TensorView& selection) {
  return select(SelectionRequest::of(inputs), policy, selection);
}

namespace {

using selector_support::Clock;
using selector_support::seconds_since;

using selector_support::allowed_per_token;
using selector_support::row_layout;
using selector_support::write_row;

// ---- exact -----------------------------------------------------------------------------------------------

class ExactSelector final : public Selector {
 public:
  std::string name() const override { return "exact"; }

  SelectionCost do_select(const SelectionRequest& request, const SelectionPolicy& policy,
                          const TensorView& selection) override {
    const auto start = Clock::now();
    const AttentionInputs& inputs = request.attention;
    const AttentionShape shape = inputs.shape();
    exact_topk(inputs, policy, selection);

    // Cost of scoring every allowed key of a row with the main attention, as a dense kernel would:
    //   keys_scored    = allowed                                      (every allowed key, once per row)
    //   macs           = allowed * D * (query heads in the group)      (one q.k per head and key)
    //   key_bytes_read = allowed * D * bytes(k element) * (key heads the group's query heads read)
    // per_head and per_kv_head groups read one key head; a per_token group reads all Hkv of them.
    const std::int64_t groups = group_count(policy.granularity, shape.query_heads, shape.kv_heads);
    const std::int64_t heads_per_group = shape.query_heads / groups;
    const std::int64_t key_heads_per_group = policy.granularity == Granularity::per_token ? shape.kv_heads : 1;
    const double bytes_per_key =
        static_cast<double>(dtype_bytes(inputs.k.dtype(), shape.head_dim)) * static_cast<double>(key_heads_per_group);
    SelectionCost cost;
    for (const std::int64_t allowed : allowed_per_token(inputs, shape)) {
      const double a = static_cast<double>(allowed) * static_cast<double>(groups);
      cost.keys_scored += a;
      cost.macs += a * static_cast<double>(shape.head_dim * heads_per_group);
      cost.key_bytes_read += a * bytes_per_key;
    }
    cost.rows = shape.tokens * groups;
    cost.seconds = seconds_since(start);
    return cost;
  }
};

// ---- random ----------------------------------------------------------------------------------------------

class RandomSelector final : public Selector {
 public:
  explicit RandomSelector(std::uint64_t seed) : seed_(seed) {}
  std::string name() const override { return "random"; }

  SelectionCost do_select(const SelectionRequest& request, const SelectionPolicy& policy,
                          const TensorView& selection) override {
    const auto start = Clock::now();
    const AttentionInputs& inputs = request.attention;
    const AttentionShape shape = inputs.shape();
    const std::int64_t groups = group_count(policy.granularity, shape.query_heads, shape.kv_heads);
    const std::vector<std::int64_t> allowed = allowed_per_token(inputs, shape);
    const std::int64_t rows = shape.tokens * groups;

    // One random stream per (t, group), so the result does not depend on the thread count or schedule.
#pragma omp parallel
    {
      std::vector<std::int32_t> keys;
      std::vector<std::int64_t> picked;
      std::vector<char> taken;  // taken[offset]: offset already picked in this row
#pragma omp for schedule(dynamic, 4)
      for (std::int64_t row = 0; row < rows; ++row) {
        const std::int64_t t = row / groups;
        const std::int64_t group = row % groups;
        const SelectionRowPlan r = row_layout(policy, allowed[static_cast<std::size_t>(t)]);

        // Floyd's algorithm: r.fill distinct positions, uniform over the free keys [sink_end, local_begin).
        const std::int64_t range = r.free_keys();
        picked.clear();
        if (static_cast<std::int64_t>(taken.size()) < range) taken.resize(static_cast<std::size_t>(range), 0);
        RandomStream random(seed_, static_cast<std::uint64_t>(row));
        for (std::int64_t j = range - r.fill; j < range; ++j) {
          const auto candidate =
              static_cast<std::int64_t>(random.uniform_int(static_cast<std::uint64_t>(j + 1)));
          const std::int64_t pick = taken[static_cast<std::size_t>(candidate)] ? j : candidate;
          taken[static_cast<std::size_t>(pick)] = 1;
          picked.push_back(pick);
        }
        keys.clear();
        for (const std::int64_t offset : picked) {
          taken[static_cast<std::size_t>(offset)] = 0;
          keys.push_back(static_cast<std::int32_t>(r.sink_end + offset));
        }
        write_row(selection, t, group, r, keys);
      }
    }
    SelectionCost cost;
    cost.rows = rows;
    cost.seconds = seconds_since(start);
    return cost;
  }

 private:
  std::uint64_t seed_;
};

// ---- streaming -------------------------------------------------------------------------------------------

class StreamingSelector final : public Selector {
 public:
  explicit StreamingSelector(std::int64_t n_sink) : n_sink_(n_sink) {}
  std::string name() const override { return "streaming"; }

  SelectionCost do_select(const SelectionRequest& request, const SelectionPolicy& policy,
                          const TensorView& selection) override {
    const auto start = Clock::now();
    const AttentionInputs& inputs = request.attention;
    const AttentionShape shape = inputs.shape();
    const std::int64_t groups = group_count(policy.granularity, shape.query_heads, shape.kv_heads);
    const std::vector<std::int64_t> allowed = allowed_per_token(inputs, shape);
    const std::int64_t sinks = std::max(n_sink_, policy.n_sink);

    std::vector<std::int32_t> keys;
    for (std::int64_t t = 0; t < shape.tokens; ++t) {
      const SelectionRowPlan r = row_layout(policy, allowed[static_cast<std::size_t>(t)]);
      // The policy's kept keys, then the selector's extra sinks, then the most recent free keys. The row is
      // [0, sink_end) and [recent_start, allowed): the kept window sits inside the recent block.
      const std::int64_t extra_sinks =
          std::min(std::max<std::int64_t>(0, std::min(sinks, r.local_begin) - r.sink_end), r.fill);
      const std::int64_t recent_start = r.local_begin - (r.fill - extra_sinks);
      keys.clear();
      for (std::int64_t s = r.sink_end; s < r.sink_end + extra_sinks; ++s) keys.push_back(static_cast<std::int32_t>(s));
      for (std::int64_t s = recent_start; s < r.local_begin; ++s) keys.push_back(static_cast<std::int32_t>(s));
      // Every group gets the same keys: streaming looks at positions only.
      for (std::int64_t group = 0; group < groups; ++group) write_row(selection, t, group, r, keys);
    }
    SelectionCost cost;
    cost.rows = shape.tokens * groups;
    cost.seconds = seconds_since(start);
    return cost;
  }

 private:
  std::int64_t n_sink_;
};

}  // namespace

std::unique_ptr<Selector> make_exact_selector() { return std::make_unique<ExactSelector>(); }

std::unique_ptr<Selector> make_random_selector(std::uint64_t seed) { return std::make_unique<RandomSelector>(seed); }

std::unique_ptr<Selector> make_streaming_selector(std::int64_t n_sink) {
  KEYSEL_CHECK_ARG(n_sink >= 0, "n_sink", ">= 0", n_sink);
  return std::make_unique<StreamingSelector>(n_sink);
}

}  // namespace keysel
