// Context parallelism (SPEC §10): one sequence's keys sharded by position over R ranks, each rank scoring and
// attending over its own shard, with the exact global top-k and the attention output assembled by collectives.
//
// The algorithm, per query row (token t, group G):
//   1. rank r holds the scores of its positions (its shard of the indexer cache) and picks its local candidates:
//      its best `fill` allowed, non-kept, non-NaN keys as (score, global position), the tie rule of select_topk
//      (higher score first, then the lower position);
//   2. the ranks exchange candidates and every rank selects the global best `fill` among them, which is the
//      global top-`fill` because each member of it is among its own rank's local top-`fill`; the kept keys
//      (sinks, local window) are added by position. The result equals select_topk on the whole row, bit for bit;
//   3. each rank attends over the selected keys it holds (sparse_attention on its shard) and the R partial
//      results merge by log-sum-exp: lse = log sum_r exp(lse_r), o = sum_r exp(lse_r - lse) o_r.
//
// Exchanges (TopkExchange): all_gather sends every rank's `fill` candidates to every rank (R * fill per rank
// received); threshold sends m = ceil(fill / R) candidates per rank first, whose fill-th best bounds the global
// fill-th best from below, then only the candidates at or above that bound (a count, then the candidates padded
// to the largest count, as a collective without variable sizes does): about 2 * fill received when the shards
// are balanced. Both give the same selection.
//
// The collective is a RankGroup: SimulatedRanks runs R ranks as R threads of this process (CI tests the
// algorithm on CPUs with it); a NCCL communicator on GPUs is the same interface (not built yet: no multi-GPU
// machine to test it on).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <string_view>
#include <thread>
#include <vector>

#include "keysel/core/attention_inputs.h"
#include "keysel/core/selection.h"
#include "keysel/core/tensor.h"

namespace keysel {

/// How R ranks share positions 0..N-1 of a sequence.
struct ContextShards {
  enum class Layout : std::uint8_t {
    contiguous,  // rank r holds [r * ceil(N / R), (r + 1) * ceil(N / R))
    round_robin  // page p = positions [p * page, (p + 1) * page) lives on rank p % R (balanced as N grows)
  };
  std::int64_t ranks = 1;
  Layout layout = Layout::contiguous;
  std::int64_t page = 64;

  /// Throws keysel::Error of `function` unless 1 <= ranks <= 4096 and page >= 1.
  void validate(std::string_view function) const;
  /// The rank that holds position s of a sequence of n positions.
  std::int64_t owner(std::int64_t s, std::int64_t n) const;
  /// Rank r's positions among 0..n-1, ascending.
  std::vector<std::int32_t> positions(std::int64_t rank, std::int64_t n) const;
};

enum class TopkExchange : std::uint8_t { all_gather, threshold };

/// "all_gather", "threshold"; parse_topk_exchange throws keysel::Error naming the accepted names.
std::string_view topk_exchange_name(TopkExchange exchange);
TopkExchange parse_topk_exchange(std::string_view name);

/// The collective the ranks of a context-parallel group run: every rank calls all_gather with its own `bytes`
/// bytes (the same count on every rank) and receives all ranks' bytes, concatenated in rank order.
class RankGroup {
 public:
  virtual ~RankGroup() = default;
  virtual int size() const = 0;
  virtual void all_gather(int rank, const void* send, std::int64_t bytes, void* receive) = 0;
};

/// R ranks as R threads of one process, exchanging through this object's memory (a barrier per collective).
/// run(body) calls body(rank) on R threads and rethrows the first exception after all have finished; a rank that
/// throws releases the others (their pending collectives throw too).
class SimulatedRanks final : public RankGroup {
 public:
  explicit SimulatedRanks(int ranks);
  int size() const override { return ranks_; }
  void all_gather(int rank, const void* send, std::int64_t bytes, void* receive) override;
  template <typename Body>
  void run(Body&& body);

 private:
  void barrier();
  void fail(int rank);
  int ranks_;
  int first_failure_ = -1;  // the rank whose exception run() rethrows (the others' are consequences)
  std::mutex mutex_;
  std::condition_variable changed_;
  int waiting_ = 0;
  std::int64_t generation_ = 0;
  bool failed_ = false;
  std::vector<const void*> sends_;
  std::int64_t bytes_ = -1;
};

/// What one rank sent and received in a context-parallel selection, summed over its rows.
struct ExchangeCost {
  std::int64_t collectives = 0;        // all_gather calls
  std::int64_t bytes_sent = 0;         // this rank's contributions
  std::int64_t bytes_received = 0;     // what the collectives delivered to this rank (its own part included)
};

/// One rank's part of a context-parallel select_topk (every rank of `group` calls it with the same arguments
/// except its own shard):
///   local_scores:    fp32 [T, G, n_local] the scores of this rank's positions (what it computed on its shard)
///   local_positions: int32 [n_local], the global position of each local column, ascending
///   positions:       int32 [T], query t may read keys s <= positions[t] (of n_keys in the whole sequence)
///   selection:       int32 [T, G, policy.width()], written on every rank: exactly select_topk's output on the
///                    whole score row (kept keys, the best others, ascending, -1 padding)
/// Throws keysel::Error (writing nothing) on bad arguments; all ranks must pass consistent shapes.
void select_topk_context_parallel(RankGroup& group, int rank, const TensorView& local_scores,
                                  const TensorView& local_positions, const TensorView& positions,
                                  std::int64_t n_keys, const SelectionPolicy& policy, TopkExchange exchange,
                                  const TensorView& selection, ExchangeCost* cost = nullptr);

/// One rank's part of context-parallel sparse attention: attends over the keys of `selection` (global positions,
/// as select_topk_context_parallel writes it) that this rank holds, then merges every rank's partial result.
///   local: q [T, Hq, D] (every rank the same queries), k/v [n_local, Hkv, D / Dv] this rank's rows, in
///          local_positions order; positions and scale as for sparse_attention
///   out:   fp32 [T, Hq, Dv] and lse fp32 [T, Hq] (or empty), written on every rank: sparse_attention's result on
///          the whole cache up to float rounding (the sums are regrouped by rank)
void sparse_attention_context_parallel(RankGroup& group, int rank, const AttentionInputs& local,
                                       const TensorView& local_positions, std::int64_t n_keys,
                                       const TensorView& selection, Granularity granularity, const TensorView& out,
                                       const TensorView& lse = {}, ExchangeCost* cost = nullptr);

/// The whole computation over R simulated ranks in this process, for tests and studies: scores fp32 [T, G, N]
/// split by `shards`, each rank running select_topk_context_parallel on its columns. `costs` (optional) gets
/// one ExchangeCost per rank.
void select_topk_simulated(const TensorView& scores, const TensorView& positions, const SelectionPolicy& policy,
                           const ContextShards& shards, TopkExchange exchange, const TensorView& selection,
                           std::vector<ExchangeCost>* costs = nullptr);

/// Sparse attention over R simulated ranks: the cache of `inputs` split by `shards`, each rank attending over its
/// selected rows, merged by log-sum-exp (what sparse_attention_context_parallel does on every rank).
void sparse_attention_simulated(const AttentionInputs& inputs, const TensorView& selection, Granularity granularity,
                                const ContextShards& shards, const TensorView& out, const TensorView& lse = {});

// ---- implementation ----------------------------------------------------------------------------------------

template <typename Body>
void SimulatedRanks::run(Body&& body) {
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(ranks_));
  std::vector<std::thread> threads;
  threads.reserve(static_cast<std::size_t>(ranks_));
  for (int r = 0; r < ranks_; ++r) {
    threads.emplace_back([this, r, &body, &errors] {
      try {
        body(r);
      } catch (...) {
        errors[static_cast<std::size_t>(r)] = std::current_exception();
        fail(r);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  if (first_failure_ >= 0) {
    const int first = first_failure_;
    first_failure_ = -1;
    failed_ = false;
    std::rethrow_exception(errors[static_cast<std::size_t>(first)]);
  }
}

}  // namespace keysel
