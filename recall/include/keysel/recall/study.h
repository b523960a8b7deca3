// Studies: run selectors over a workload at several k and aggregate their fidelity (SPEC §4) and cost (§5);
// over a real model (TinyLm, tiny_lm.h) also its accuracy, bits per byte, with every layer's attention sparse.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <ostream>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "keysel/core/selection.h"
#include "keysel/indexer/selector.h"
#include "keysel/recall/metrics.h"
#include "keysel/recall/selector_spec.h"
#include "keysel/recall/synthetic.h"

namespace keysel {

class TinyLm;

/// The model-accuracy metrics a study over a model adds to StudyRow::metrics beside metric_names(), each
/// aggregated over the predicted bytes (tokens 1 .. T-1):
///   "bpb"           bits of predicting the next byte with the sparse forward pass: -log2 p(next); the mean is
///                   bits_per_byte() (tiny_lm.h)
///   "bpb_increase"  the same minus the bits with full attention, byte by byte; the mean is bpb - full bpb
inline constexpr std::string_view kBitsPerByteMetric = "bpb";
inline constexpr std::string_view kBitsPerByteIncreaseMetric = "bpb_increase";

/// Metrics of a study over a model in the regime where selections are sparse, and of a retrieval task:
///   "bpb_sparse", "bpb_sparse_increase"  bpb and bpb_increase over the scored rows at positions >= 2k only
///                                        (TinyLmStudyOptions::bpb_sparse), where no row reads all its keys
///   "exact_match"                        per example of a retrieval task, 1 when the model's argmax predicts
///                                        every answer byte (teacher-forced), else 0: the mean is the accuracy
///   "answer_bpb"                         bits of each answer byte of a retrieval task
inline constexpr std::string_view kSparseBitsPerByteMetric = "bpb_sparse";
inline constexpr std::string_view kSparseBitsPerByteIncreaseMetric = "bpb_sparse_increase";
inline constexpr std::string_view kExactMatchMetric = "exact_match";
inline constexpr std::string_view kAnswerBitsMetric = "answer_bpb";

/// How a study over a model (tiny-lm) applies each selector.
enum class TinyLmStudyMode : std::uint8_t {
  /// Every row of every layer is sparse, one forward pass per (selector, k) (TinyLm::logits with a selection):
  /// errors compound through the layers as in a model that prefills sparsely.
  forward,
  /// Top-k decoding over a full-attention prefill (TinyLm::decode): one full forward pass per sequence builds
  /// every layer's K/V cache, shared by all selectors and k; only the scored rows run sparsely, each through
  /// every layer, reading the cache through the selector's keys.
  decode,
};

/// Options of a study over a model beside StudyOptions.
struct TinyLmStudyOptions {
  TinyLmStudyMode mode = TinyLmStudyMode::forward;
  /// The scored query rows: 0 scores every row; n > 0 a seeded uniform sample of n distinct rows among those
  /// that predict a byte (positions 0 .. T-2; all of them when there are no more). The SPEC §4 metrics, the exact
  /// reference and bits per byte cover the scored rows only, which keeps the exact reference affordable at long
  /// contexts. Decode mode runs only the scored rows.
  std::int64_t query_sample = 0;
  std::uint64_t sample_seed = 1;
  /// The first `prefill` positions are the prefill a decoder has before the scored rows: no row before it is
  /// scored (bits per byte, metrics, full attention's bits), and query_sample samples among the rows from it on.
  /// Selectors that learn from the cache (candidate searches, study files: "train_keys") train on the prefill's
  /// keys and queries only, so no scored row's selection depends on a query or key it could not have seen.
  /// 0: every row is scored. Must leave at least one row (prefill < T - 1; in decode mode, below the prompt).
  std::int64_t prefill = 0;
  /// Adds kSparseBitsPerByteMetric and kSparseBitsPerByteIncreaseMetric (positions >= 2k) beside bpb.
  bool bpb_sparse = false;
};

/// How long-running calls (studies, study files, tuning) report progress: called after each step with the steps
/// done, the total, and what just finished ("exact k=64").
using ProgressCallback = std::function<void(std::size_t done, std::size_t total, const std::string& what)>;

struct StudyOptions {
  std::vector<std::int64_t> k_values{64, 256, 1024};
  Granularity granularity = Granularity::per_kv_head;
  std::int64_t n_sink = 0;    // kept keys applied to every selector
  std::int64_t n_local = 0;
  bool kept_on_top = false;
  /// Keep every row's metrics in StudyRow::row_metrics (reports draw per-head, per-position and per-row
  /// charts from them); off keeps only the aggregates.
  bool keep_row_metrics = false;
  /// Called after each (selector, k) is done with (done, total, "selector k=K"); may be empty.
  ProgressCallback progress;
};

/// One (selector, k) line of a study.
struct StudyRow {
  std::string selector;
  std::int64_t k = 0;
  std::map<std::string, Aggregate, std::less<>> metrics;  // by metric name (metric_names())
  SelectionCost cost;
  /// Metrics of each row, row-major over (query token t, group), when StudyOptions::keep_row_metrics; over
  /// (layer, t, group) in a study of a model's forward pass (StudyResult::layers).
  std::vector<SelectionMetrics> row_metrics;
};

struct StudyResult {
  std::string workload;
  AttentionShape shape;
  StudyOptions options;
  std::vector<StudyRow> rows;
  /// A study of a model's forward pass (tiny-lm): the model's layers, in order; `shape` is one layer's
  /// attention, every row's metrics and cost cover all layers (row_metrics row-major over (layer, t, group)),
  /// and the rows also carry kBitsPerByteMetric and kBitsPerByteIncreaseMetric. Empty for one attention.
  std::vector<std::int64_t> layers;
  /// Bits per predicted byte with full attention, aggregated like "bpb" (count 0 without a model).
  Aggregate full_bpb;
  /// Full attention's exact-match accuracy of a retrieval task (count 0 otherwise).
  Aggregate full_exact_match;
  /// The positions of the query rows that row_metrics cover, in order, when they are not every token 0..T-1
  /// (a sampled or decode-mode study over a model; shape.tokens is their count); empty otherwise.
  std::vector<std::int64_t> row_positions;
};

/// Builds one fresh selector for one attention; `indexer` holds that attention's trained Lightning-Indexer
/// tensors, or is nullptr when it has none (make_selector_from_spec(spec, indexer) is such a factory).
using SelectorFactory = std::function<std::unique_ptr<Selector>(const IndexerTensors* indexer)>;

/// A study's peak memory, estimated from the largest terms (bytes): the workload's fp32 q, k and v, the exact
/// reference's double p [T, Hq, N], pbar [T, G, N], outputs and values, the largest selection [T, G, W], and the
/// metrics of every row that the study keeps (SelectionMetrics per row, selector and k, when keep_row_metrics).
double estimate_study_bytes(const AttentionShape& shape, const StudyOptions& options, std::size_t selectors);

/// Checks that every k is in [1, keys] (no row selects more keys than `workload` caches); keysel::Error of
/// `function` naming k otherwise.
void check_k_values(const std::vector<std::int64_t>& k_values, std::int64_t keys, const std::string& workload,
                    std::string_view function);

/// Checks a study before it runs: k values >= 1 and <= N (no row can select more keys than are cached), the
/// policy of every k (SelectionPolicy::validate), and that estimate_study_bytes fits in the machine's available
/// memory (available_memory_bytes()). Throws keysel::Error naming `workload` otherwise.
void check_study_fits(const AttentionShape& shape, const StudyOptions& options, std::size_t selectors,
                      const std::string& workload);

/// check_study_fits for one selection policy (a tuner's one k) and one selector.
void check_policy_fits(const AttentionShape& shape, const SelectionPolicy& policy, const std::string& workload);

/// Runs every selector at every k over the workload and evaluates it against the exact attention
/// (check_study_fits first).
StudyResult run_study(const Workload& workload, const std::vector<std::unique_ptr<Selector>>& selectors,
                      const StudyOptions& options);

/// Runs every selector at every k inside the model's sparse forward pass over `tokens` (TinyLm::logits with
/// TinyLmSparse, options.granularity and policy width): in each layer a fresh selector from its factory, given
/// the layer's indexer tensors, picks the keys that layer's attention reads, and its selection is scored
/// against the exact top-k of that layer's attention inputs (ExactReference; later layers see the inputs the
/// sparse layers before them produced). Each forward's bits per byte, and once full attention's, are measured
/// on the same bytes. 2 <= T <= the model's context. Rows are (selector, k) in order; the name is the first
/// layer's selector's.
StudyResult run_tiny_lm_study(const TinyLm& model, std::span<const std::uint8_t> tokens,
                              const std::vector<SelectorFactory>& selectors, const StudyOptions& options,
                              std::string workload);

/// The same with TinyLmStudyOptions: query-row sampling, decode mode (one full-attention prefill, only the
/// scored rows sparse) and bits per byte where the selection is sparse.
StudyResult run_tiny_lm_study(const TinyLm& model, std::span<const std::uint8_t> tokens,
                              const std::vector<SelectorFactory>& selectors, const StudyOptions& options,
                              const TinyLmStudyOptions& tiny, std::string workload);

/// One example of a retrieval task: a prompt followed by its answer, the last answer_length bytes.
struct TinyLmTaskExample {
  std::span<const std::uint8_t> bytes;
  std::int64_t answer_length = 0;
};

/// A retrieval task in decode mode (tiny.mode must be decode): per example one full-attention prefill, then per
/// selector and k the scored rows decoded sparsely: the rows that predict the answer bytes (teacher-forced) and
/// tiny.query_sample rows of the prompt (0: every prompt row). Rows carry the SPEC §4 metrics over every layer's
/// scored rows, "bpb" and "bpb_increase" over the prompt rows, "answer_bpb" over the answer bytes and
/// "exact_match" per example; full_exact_match and full_bpb give full attention's. Every k must be at most
/// every example's length; each example's length is at most the model's context.
StudyResult run_tiny_lm_task_study(const TinyLm& model, std::span<const TinyLmTaskExample> examples,
                                   const std::vector<SelectorFactory>& selectors, const StudyOptions& options,
                                   const TinyLmStudyOptions& tiny, std::string workload);

/// Bits of each prediction: -log2 softmax(logits[i])[tokens[i + 1]] for i < T - 1, in double.
///   logits: [T, vocab] row-major; tokens: T bytes (< vocab).   Their mean is bits_per_byte().
std::vector<double> bits_per_token(std::span<const float> logits, std::span<const std::uint8_t> tokens,
                                   std::int64_t vocab);

/// Human-readable table of a study (one line per selector and k).
void print_study_table(const StudyResult& result, std::ostream& out);
/// The same numbers as JSON text.
std::string study_to_json(const StudyResult& result);

}  // namespace keysel
