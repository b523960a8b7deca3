// Context parallelism over R ranks (keysel/indexer/context_parallel.h): the rank group, the exact global top-k
// from local candidates (all-gather or threshold exchange), attention merged by log-sum-exp, and the in-process
// simulation that CI runs.
#include "keysel/indexer/context_parallel.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "keysel/attention/sparse_attention.h"
#include "keysel/core/checked.h"
#include "keysel/core/error.h"
#include "keysel/core/row_plan.h"
#include "keysel/indexer/topk.h"

namespace keysel {
namespace {

/// A candidate as it travels between ranks: 8 bytes, position -1 for padding.
struct Candidate {
  float score;
  std::int32_t position;
};
static_assert(sizeof(Candidate) == 8);

/// select_topk's order: higher score first; equal scores prefer the lower position (NaN never enters).
bool better(const Candidate& a, const Candidate& b) {
  if (a.score != b.score) return a.score > b.score;
  return a.position < b.position;
}

/// The best `count` of `pool` (in place), in `better` order.
void best_first(std::vector<Candidate>& pool, std::size_t count) {
  count = std::min(count, pool.size());
  std::partial_sort(pool.begin(), pool.begin() + static_cast<std::ptrdiff_t>(count), pool.end(), better);
  pool.resize(count);
}

void all_gather_counted(RankGroup& group, int rank, const void* send, std::int64_t bytes, void* receive,
                        ExchangeCost& cost) {
  group.all_gather(rank, send, bytes, receive);
  cost.collectives += 1;
  cost.bytes_sent += bytes;
  cost.bytes_received += bytes * group.size();
}

}  // namespace

void ContextShards::validate(std::string_view function) const {
  KEYSEL_CHECK_ARG_IN(function, ranks >= 1 && ranks <= 4096, "shards.ranks", "1 to 4096 ranks", ranks);
  KEYSEL_CHECK_ARG_IN(function, page >= 1, "shards.page", "a page of at least one position", page);
}

std::int64_t ContextShards::owner(std::int64_t s, std::int64_t n) const {
  if (layout == Layout::round_robin) return (s / page) % ranks;
  const std::int64_t span = std::max<std::int64_t>(1, (n + ranks - 1) / ranks);
  return std::min(s / span, ranks - 1);
}

std::vector<std::int32_t> ContextShards::positions(std::int64_t rank, std::int64_t n) const {
  std::vector<std::int32_t> out;
  for (std::int64_t s = 0; s < n; ++s) {
    if (owner(s, n) == rank) out.push_back(static_cast<std::int32_t>(s));
  }
  return out;
}

std::string_view topk_exchange_name(TopkExchange exchange) {
  return exchange == TopkExchange::threshold ? "threshold" : "all_gather";
}

TopkExchange parse_topk_exchange(std::string_view name) {
  if (name == "all_gather") return TopkExchange::all_gather;
  if (name == "threshold") return TopkExchange::threshold;
  std::string got(1, '"');
  got.append(name).push_back('"');
  detail::throw_argument_error("parse_topk_exchange", "exchange", "\"all_gather\" or \"threshold\"", got);
}

// ---- SimulatedRanks ---------------------------------------------------------------------------------------

SimulatedRanks::SimulatedRanks(int ranks) : ranks_(ranks), sends_(static_cast<std::size_t>(std::max(ranks, 0))) {
  KEYSEL_CHECK_ARG(ranks >= 1 && ranks <= 4096, "ranks", "1 to 4096 ranks", ranks);
}

void SimulatedRanks::barrier() {
  std::unique_lock<std::mutex> lock(mutex_);
  if (failed_) detail::throw_error("SimulatedRanks", "another rank failed");
  const std::int64_t generation = generation_;
  if (++waiting_ == ranks_) {
    waiting_ = 0;
    ++generation_;
    changed_.notify_all();
    return;
  }
  changed_.wait(lock, [&] { return generation_ != generation || failed_; });
  if (generation_ == generation) detail::throw_error("SimulatedRanks", "another rank failed");
}

void SimulatedRanks::fail(int rank) {
  const std::lock_guard<std::mutex> lock(mutex_);
  if (first_failure_ < 0) first_failure_ = rank;
  failed_ = true;
  changed_.notify_all();
}

void SimulatedRanks::all_gather(int rank, const void* send, std::int64_t bytes, void* receive) {
  KEYSEL_CHECK_ARG(rank >= 0 && rank < ranks_, "rank", "a rank below " + std::to_string(ranks_), rank);
  {
    const std::lock_guard<std::mutex> lock(mutex_);
    sends_[static_cast<std::size_t>(rank)] = send;
    if (rank == 0) bytes_ = bytes;
  }
  barrier();  // every rank's buffer is posted
  {
    const std::lock_guard<std::mutex> lock(mutex_);
    KEYSEL_CHECK_ARG(bytes == bytes_, "bytes", "the same count on every rank (" + std::to_string(bytes_) + ")",
                     bytes);
  }
  for (int r = 0; r < ranks_; ++r) {
    if (bytes > 0) std::memcpy(static_cast<char*>(receive) + r * bytes, sends_[static_cast<std::size_t>(r)],
                               static_cast<std::size_t>(bytes));
  }
  barrier();  // every rank has read every buffer: the senders may reuse them
}

// ---- the selection ----------------------------------------------------------------------------------------

void select_topk_context_parallel(RankGroup& group, int rank, const TensorView& local_scores,
                                  const TensorView& local_positions, const TensorView& positions,
                                  std::int64_t n_keys, const SelectionPolicy& policy, TopkExchange exchange,
                                  const TensorView& selection, ExchangeCost* cost) {
  constexpr std::string_view function = "select_topk_context_parallel";
  policy.validate(function);
  const int ranks = group.size();
  KEYSEL_CHECK_ARG(rank >= 0 && rank < ranks, "rank", "a rank below " + std::to_string(ranks), rank);
  expect_shape(function, local_scores, "local_scores", {kAnyExtent, kAnyExtent, kAnyExtent});
  expect_dtype(function, local_scores, "local_scores", {DType::fp32});
  expect_device(function, local_scores, "local_scores", Device::cpu());
  const std::int64_t tokens = local_scores.size(0), groups = local_scores.size(1), n_local = local_scores.size(2);
  expect_shape(function, local_positions, "local_positions", {n_local});
  expect_dtype(function, local_positions, "local_positions", {DType::int32});
  expect_shape(function, positions, "positions", {tokens});
  expect_dtype(function, positions, "positions", {DType::int32});
  KEYSEL_CHECK_ARG(n_keys >= 0 && n_keys <= kMaxKeyPositions, "n_keys", "0 to 2^31 - 1 keys", n_keys);
  const auto* global = local_positions.data<std::int32_t>();
  for (std::int64_t j = 0; j < n_local; ++j) {
    const std::int64_t s = global[j * local_positions.stride(0)];
    const std::int64_t previous = j == 0 ? -1 : global[(j - 1) * local_positions.stride(0)];
    KEYSEL_CHECK_ARG(s > previous && s < n_keys, "local_positions",
                     "ascending positions below n_keys = " + std::to_string(n_keys),
                     "position " + std::to_string(s) + " at column " + std::to_string(j));
  }
  for (std::int64_t t = 0; t < tokens; ++t) {
    const std::int64_t p = positions.data<std::int32_t>()[t * positions.stride(0)];
    KEYSEL_CHECK_ARG(p >= 0, "positions", "positions >= 0", "position " + std::to_string(p) + " at query " +
                                                                 std::to_string(t));
  }
  const std::int64_t width = policy.width();
  check_selection_output(function, selection, tokens, groups, width);
  const std::int64_t rows = checked_mul(tokens, groups, function, "local_scores");
  const std::int64_t k = policy.k;
  ExchangeCost spent;

  // 1. Local candidates: this rank's best `fill` of each row.
  std::vector<std::vector<Candidate>> local(static_cast<std::size_t>(rows));
  std::vector<SelectionRowPlan> plans(static_cast<std::size_t>(rows));
  for (std::int64_t t = 0; t < tokens; ++t) {
    const SelectionRowPlan plan =
        SelectionRowPlan::make(policy, positions.data<std::int32_t>()[t * positions.stride(0)], n_keys);
    for (std::int64_t g = 0; g < groups; ++g) {
      const std::int64_t row = t * groups + g;
      plans[static_cast<std::size_t>(row)] = plan;
      std::vector<Candidate>& pool = local[static_cast<std::size_t>(row)];
      for (std::int64_t j = 0; j < n_local; ++j) {
        const std::int64_t s = global[j * local_positions.stride(0)];
        if (s < plan.sink_end || s >= plan.local_begin) continue;
        const float score = local_scores.data<float>()[t * local_scores.stride(0) + g * local_scores.stride(1) +
                                                       j * local_scores.stride(2)];
        if (!std::isnan(score)) pool.push_back({score, static_cast<std::int32_t>(s)});
      }
      best_first(pool, static_cast<std::size_t>(plan.fill));
    }
  }

  // 2. The exchange: every rank ends with a pool per row that contains the global best `fill`.
  std::vector<std::vector<Candidate>> pools(static_cast<std::size_t>(rows));
  const auto send_padded = [&](const std::vector<std::int64_t>& per_row, auto&& pick) {
    // per_row[i] slots for row i on every rank; pick(row, i) the i-th candidate this rank sends (or padding).
    std::int64_t total = 0;
    for (const std::int64_t c : per_row) total = checked_add(total, c, function, "local_scores");
    std::vector<Candidate> send(static_cast<std::size_t>(total), Candidate{0.0f, -1});
    std::int64_t at = 0;
    for (std::int64_t row = 0; row < rows; ++row) {
      for (std::int64_t i = 0; i < per_row[static_cast<std::size_t>(row)]; ++i) {
        send[static_cast<std::size_t>(at++)] = pick(row, i);
      }
    }
    std::vector<Candidate> received(static_cast<std::size_t>(checked_mul(total, ranks, function, "local_scores")));
    all_gather_counted(group, rank, send.data(), total * 8, received.data(), spent);
    for (int r = 0; r < ranks; ++r) {
      std::int64_t offset = r * total;
      for (std::int64_t row = 0; row < rows; ++row) {
        for (std::int64_t i = 0; i < per_row[static_cast<std::size_t>(row)]; ++i) {
          const Candidate c = received[static_cast<std::size_t>(offset + i)];
          if (c.position >= 0) pools[static_cast<std::size_t>(row)].push_back(c);
        }
        offset += per_row[static_cast<std::size_t>(row)];
      }
    }
  };
  const auto local_at = [&](std::int64_t row, std::int64_t i) {
    const std::vector<Candidate>& pool = local[static_cast<std::size_t>(row)];
    return i < static_cast<std::int64_t>(pool.size()) ? pool[static_cast<std::size_t>(i)] : Candidate{0.0f, -1};
  };
  if (exchange == TopkExchange::all_gather) {
    send_padded(std::vector<std::int64_t>(static_cast<std::size_t>(rows), k), local_at);
  } else {
    // Round 1: ceil(k / R) candidates a rank; the fill-th best of their union bounds the global fill-th best.
    const std::int64_t m = (k + ranks - 1) / ranks;
    send_padded(std::vector<std::int64_t>(static_cast<std::size_t>(rows), m), local_at);
    std::vector<Candidate> bound(static_cast<std::size_t>(rows), Candidate{0.0f, -1});  // -1: no bound
    for (std::int64_t row = 0; row < rows; ++row) {
      std::vector<Candidate>& pool = pools[static_cast<std::size_t>(row)];
      const std::int64_t fill = plans[static_cast<std::size_t>(row)].fill;
      if (fill > 0 && static_cast<std::int64_t>(pool.size()) >= fill) {
        std::nth_element(pool.begin(), pool.begin() + (fill - 1), pool.end(), better);
        bound[static_cast<std::size_t>(row)] = pool[static_cast<std::size_t>(fill - 1)];
      }
      pool.clear();
    }
    // Round 2: how many of this rank's candidates reach the bound, then those candidates, padded to the most.
    std::vector<std::int32_t> counts(static_cast<std::size_t>(rows));
    for (std::int64_t row = 0; row < rows; ++row) {
      const std::vector<Candidate>& pool = local[static_cast<std::size_t>(row)];
      const Candidate b = bound[static_cast<std::size_t>(row)];
      std::int64_t c = 0;  // the pool is sorted best first
      while (c < static_cast<std::int64_t>(pool.size()) &&
             (b.position < 0 || !better(b, pool[static_cast<std::size_t>(c)]))) {
        ++c;
      }
      counts[static_cast<std::size_t>(row)] = static_cast<std::int32_t>(c);
    }
    std::vector<std::int32_t> all_counts(static_cast<std::size_t>(rows * ranks));
    all_gather_counted(group, rank, counts.data(), rows * 4, all_counts.data(), spent);
    std::vector<std::int64_t> most(static_cast<std::size_t>(rows), 0);
    for (int r = 0; r < ranks; ++r) {
      for (std::int64_t row = 0; row < rows; ++row) {
        most[static_cast<std::size_t>(row)] =
            std::max<std::int64_t>(most[static_cast<std::size_t>(row)], all_counts[static_cast<std::size_t>(r * rows + row)]);
      }
    }
    send_padded(most, [&](std::int64_t row, std::int64_t i) {
      return i < counts[static_cast<std::size_t>(row)] ? local_at(row, i) : Candidate{0.0f, -1};
    });
  }

  // 3. The global best `fill` of each row, with the kept keys, ascending (select_topk's output).
  std::int32_t* out = selection.mutable_data<std::int32_t>();
  std::vector<std::int32_t> chosen;
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t g = 0; g < groups; ++g) {
      const std::int64_t row = t * groups + g;
      const SelectionRowPlan& plan = plans[static_cast<std::size_t>(row)];
      std::vector<Candidate>& pool = pools[static_cast<std::size_t>(row)];
      best_first(pool, static_cast<std::size_t>(plan.fill));
      chosen.clear();
      for (std::int64_t s = 0; s < plan.sink_end; ++s) chosen.push_back(static_cast<std::int32_t>(s));
      const std::size_t first_other = chosen.size();
      for (const Candidate& c : pool) chosen.push_back(c.position);
      std::sort(chosen.begin() + static_cast<std::ptrdiff_t>(first_other), chosen.end());
      for (std::int64_t s = plan.local_begin; s < plan.allowed; ++s) chosen.push_back(static_cast<std::int32_t>(s));
      for (std::int64_t i = 0; i < width; ++i) {
        out[t * selection.stride(0) + g * selection.stride(1) + i * selection.stride(2)] =
            i < static_cast<std::int64_t>(chosen.size()) ? chosen[static_cast<std::size_t>(i)] : -1;
      }
    }
  }
  if (cost != nullptr) *cost = spent;
}

// ---- attention --------------------------------------------------------------------------------------------

void sparse_attention_context_parallel(RankGroup& group, int rank, const AttentionInputs& local,
                                       const TensorView& local_positions, std::int64_t n_keys,
                                       const TensorView& selection, Granularity granularity, const TensorView& out,
                                       const TensorView& lse, ExchangeCost* cost) {
  constexpr std::string_view function = "sparse_attention_context_parallel";
  const int ranks = group.size();
  KEYSEL_CHECK_ARG(rank >= 0 && rank < ranks, "rank", "a rank below " + std::to_string(ranks), rank);
  const AttentionShape shape = local.validate(function, true);
  expect_shape(function, local_positions, "local_positions", {shape.keys});
  expect_dtype(function, local_positions, "local_positions", {DType::int32});
  const std::int64_t groups = group_count(granularity, shape.query_heads, shape.kv_heads);
  expect_shape(function, selection, "selection", {shape.tokens, groups, kAnyExtent});
  expect_dtype(function, selection, "selection", {DType::int32});
  const std::int64_t width = selection.size(2);
  expect_shape(function, out, "out", {shape.tokens, shape.query_heads, shape.value_dim});
  expect_dtype(function, out, "out", {DType::fp32});
  expect_contiguous(function, out, "out");
  expect_writable(function, out, "out");
  if (!lse.empty()) {
    expect_shape(function, lse, "lse", {shape.tokens, shape.query_heads});
    expect_dtype(function, lse, "lse", {DType::fp32});
    expect_contiguous(function, lse, "lse");
    expect_writable(function, lse, "lse");
  }
  std::vector<std::int32_t> mine(static_cast<std::size_t>(shape.keys));
  for (std::int64_t j = 0; j < shape.keys; ++j) {
    mine[static_cast<std::size_t>(j)] = local_positions.data<std::int32_t>()[j * local_positions.stride(0)];
    KEYSEL_CHECK_ARG(mine[static_cast<std::size_t>(j)] < n_keys && (j == 0 || mine[static_cast<std::size_t>(j)] >
                                                                                 mine[static_cast<std::size_t>(j - 1)]),
                     "local_positions", "ascending positions below n_keys", mine[static_cast<std::size_t>(j)]);
  }
  // This rank's part of each selection row, as local rows, and each query's last local row it may read.
  std::vector<std::int32_t> local_selection(static_cast<std::size_t>(checked_product({shape.tokens, groups,
                                                                                      std::max<std::int64_t>(width, 1)},
                                                                                     function, "selection")),
                                            -1);
  std::vector<std::int32_t> local_query_positions(static_cast<std::size_t>(shape.tokens), 0);
  for (std::int64_t t = 0; t < shape.tokens; ++t) {
    const std::int32_t p = local.positions.data<std::int32_t>()[t * local.positions.stride(0)];
    const auto last = std::upper_bound(mine.begin(), mine.end(), p) - mine.begin() - 1;
    local_query_positions[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(std::max<std::int64_t>(last, 0));
    for (std::int64_t g = 0; g < groups; ++g) {
      std::int64_t filled = 0;
      for (std::int64_t i = 0; i < width; ++i) {
        const std::int32_t s = selection.data<std::int32_t>()[t * selection.stride(0) + g * selection.stride(1) +
                                                              i * selection.stride(2)];
        if (s < 0) continue;
        const auto it = std::lower_bound(mine.begin(), mine.end(), s);
        if (it == mine.end() || *it != s) continue;  // another rank's key
        local_selection[static_cast<std::size_t>((t * groups + g) * std::max<std::int64_t>(width, 1) + filled++)] =
            static_cast<std::int32_t>(it - mine.begin());
      }
    }
  }
  // The partial result: [out (T*Hq*Dv) | lse (T*Hq)] floats, natural log, -inf and 0 where this rank has none.
  const std::int64_t out_count = shape.tokens * shape.query_heads * shape.value_dim;
  const std::int64_t lse_count = shape.tokens * shape.query_heads;
  std::vector<float> partial(static_cast<std::size_t>(out_count + lse_count), 0.0f);
  std::fill(partial.begin() + out_count, partial.end(), -std::numeric_limits<float>::infinity());
  if (shape.keys > 0 && shape.tokens > 0) {
    AttentionInputs inputs = local;
    inputs.positions = TensorView(local_query_positions.data(), DType::int32, {shape.tokens});
    sparse_attention(inputs,
                     TensorView(local_selection.data(), DType::int32,
                                {shape.tokens, groups, std::max<std::int64_t>(width, 1)}),
                     granularity, TensorView(partial.data(), DType::fp32, {shape.tokens, shape.query_heads,
                                                                           shape.value_dim}),
                     TensorView(partial.data() + out_count, DType::fp32, {shape.tokens, shape.query_heads}));
  }
  std::vector<float> all(static_cast<std::size_t>(checked_mul(out_count + lse_count, ranks, function, "out")));
  ExchangeCost spent;
  all_gather_counted(group, rank, partial.data(), (out_count + lse_count) * 4, all.data(), spent);
  float* o = out.mutable_data<float>();
  const std::int64_t stride = out_count + lse_count;
  for (std::int64_t th = 0; th < lse_count; ++th) {
    double top = -std::numeric_limits<double>::infinity();
    for (int r = 0; r < ranks; ++r) top = std::max<double>(top, all[static_cast<std::size_t>(r * stride + out_count + th)]);
    double total = 0.0;
    if (top > -std::numeric_limits<double>::infinity()) {
      for (int r = 0; r < ranks; ++r) total += std::exp(all[static_cast<std::size_t>(r * stride + out_count + th)] - top);
    }
    const double merged = total > 0.0 ? top + std::log(total) : -std::numeric_limits<double>::infinity();
    for (std::int64_t d = 0; d < shape.value_dim; ++d) {
      double value = 0.0;
      for (int r = 0; r < ranks; ++r) {
        const float l = all[static_cast<std::size_t>(r * stride + out_count + th)];
        if (l == -std::numeric_limits<float>::infinity()) continue;
        value += std::exp(l - merged) * all[static_cast<std::size_t>(r * stride + th * shape.value_dim + d)];
      }
      o[th * shape.value_dim + d] = static_cast<float>(value);
    }
    if (!lse.empty()) lse.mutable_data<float>()[th] = static_cast<float>(merged);
  }
  if (cost != nullptr) *cost = spent;
}

// ---- simulations ------------------------------------------------------------------------------------------

void select_topk_simulated(const TensorView& scores, const TensorView& positions, const SelectionPolicy& policy,
                           const ContextShards& shards, TopkExchange exchange, const TensorView& selection,
                           std::vector<ExchangeCost>* costs) {
  constexpr std::string_view function = "select_topk_simulated";
  shards.validate(function);
  policy.validate(function);
  expect_shape(function, scores, "scores", {kAnyExtent, kAnyExtent, kAnyExtent});
  expect_dtype(function, scores, "scores", {DType::fp32});
  const std::int64_t tokens = scores.size(0), groups = scores.size(1), n = scores.size(2);
  expect_shape(function, positions, "positions", {tokens});
  check_selection_output(function, selection, tokens, groups, policy.width());
  const int ranks = static_cast<int>(shards.ranks);
  const std::int64_t width = policy.width();
  std::vector<std::vector<std::int32_t>> results(static_cast<std::size_t>(ranks),
                                                 std::vector<std::int32_t>(static_cast<std::size_t>(
                                                     checked_product({tokens, groups, width}, function, "selection"))));
  std::vector<ExchangeCost> spent(static_cast<std::size_t>(ranks));
  SimulatedRanks group(ranks);
  group.run([&](int r) {
    const std::vector<std::int32_t> mine = shards.positions(r, n);
    const auto local_n = static_cast<std::int64_t>(mine.size());
    std::vector<float> local(static_cast<std::size_t>(tokens * groups * local_n));
    for (std::int64_t t = 0; t < tokens; ++t) {
      for (std::int64_t g = 0; g < groups; ++g) {
        for (std::int64_t j = 0; j < local_n; ++j) {
          local[static_cast<std::size_t>((t * groups + g) * local_n + j)] =
              scores.data<float>()[t * scores.stride(0) + g * scores.stride(1) +
                                   mine[static_cast<std::size_t>(j)] * scores.stride(2)];
        }
      }
    }
    select_topk_context_parallel(group, r, TensorView(local.data(), DType::fp32, {tokens, groups, local_n}),
                                 TensorView(mine.data(), DType::int32, {local_n}), positions, n, policy, exchange,
                                 TensorView(results[static_cast<std::size_t>(r)].data(), DType::int32,
                                            {tokens, groups, width}),
                                 &spent[static_cast<std::size_t>(r)]);
  });
  for (int r = 1; r < ranks; ++r) {
    KEYSEL_ASSERT(results[static_cast<std::size_t>(r)] == results[0]);  // every rank holds the same selection
  }
  std::int32_t* out = selection.mutable_data<std::int32_t>();
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t g = 0; g < groups; ++g) {
      for (std::int64_t i = 0; i < width; ++i) {
        out[t * selection.stride(0) + g * selection.stride(1) + i * selection.stride(2)] =
            results[0][static_cast<std::size_t>((t * groups + g) * width + i)];
      }
    }
  }
  if (costs != nullptr) *costs = spent;
}

void sparse_attention_simulated(const AttentionInputs& inputs, const TensorView& selection, Granularity granularity,
                                const ContextShards& shards, const TensorView& out, const TensorView& lse) {
  constexpr std::string_view function = "sparse_attention_simulated";
  shards.validate(function);
  const AttentionShape shape = inputs.validate(function, true);
  const int ranks = static_cast<int>(shards.ranks);
  const std::int64_t out_count = shape.tokens * shape.query_heads * shape.value_dim;
  std::vector<std::vector<float>> outs(static_cast<std::size_t>(ranks), std::vector<float>(static_cast<std::size_t>(out_count)));
  std::vector<std::vector<float>> lses(static_cast<std::size_t>(ranks),
                                       std::vector<float>(static_cast<std::size_t>(shape.tokens * shape.query_heads)));
  const auto k_row = shape.kv_heads * shape.head_dim, v_row = shape.kv_heads * shape.value_dim;
  SimulatedRanks group(ranks);
  group.run([&](int r) {
    const std::vector<std::int32_t> mine = shards.positions(r, shape.keys);
    const auto local_n = static_cast<std::int64_t>(mine.size());
    std::vector<float> k(static_cast<std::size_t>(local_n * k_row)), v(static_cast<std::size_t>(local_n * v_row));
    for (std::int64_t j = 0; j < local_n; ++j) {
      const std::int64_t s = mine[static_cast<std::size_t>(j)];
      for (std::int64_t h = 0; h < shape.kv_heads; ++h) {
        for (std::int64_t d = 0; d < shape.head_dim; ++d) {
          k[static_cast<std::size_t>(j * k_row + h * shape.head_dim + d)] = static_cast<float>(inputs.k.load({s, h, d}));
        }
        for (std::int64_t d = 0; d < shape.value_dim; ++d) {
          v[static_cast<std::size_t>(j * v_row + h * shape.value_dim + d)] = static_cast<float>(inputs.v.load({s, h, d}));
        }
      }
    }
    AttentionInputs local = inputs;
    local.k = TensorView(k.data(), DType::fp32, {local_n, shape.kv_heads, shape.head_dim});
    local.v = TensorView(v.data(), DType::fp32, {local_n, shape.kv_heads, shape.value_dim});
    sparse_attention_context_parallel(
        group, r, local, TensorView(mine.data(), DType::int32, {local_n}), shape.keys, selection, granularity,
        TensorView(outs[static_cast<std::size_t>(r)].data(), DType::fp32,
                   {shape.tokens, shape.query_heads, shape.value_dim}),
        TensorView(lses[static_cast<std::size_t>(r)].data(), DType::fp32, {shape.tokens, shape.query_heads}));
  });
  for (int r = 1; r < ranks; ++r) {
    KEYSEL_ASSERT(outs[static_cast<std::size_t>(r)] == outs[0] && lses[static_cast<std::size_t>(r)] == lses[0]);
  }
  expect_shape(function, out, "out", {shape.tokens, shape.query_heads, shape.value_dim});
  expect_dtype(function, out, "out", {DType::fp32});
  expect_contiguous(function, out, "out");
  std::copy(outs[0].begin(), outs[0].end(), out.mutable_data<float>());
  if (!lse.empty()) {
    expect_shape(function, lse, "lse", {shape.tokens, shape.query_heads});
    expect_contiguous(function, lse, "lse");
    std::copy(lses[0].begin(), lses[0].end(), lse.mutable_data<float>());
  }
}

}  // namespace keysel
