// Studies: every selector at every k over one workload, scored against one exact reference (SPEC §4, §5).
#include "keysel/recall/study.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "keysel/core/checked.h"
#include "keysel/core/error.h"
#include "keysel/core/memory.h"
#include "keysel/core/random.h"
#include "keysel/recall/tiny_lm.h"

namespace keysel {
namespace {

SelectionPolicy policy_for(const StudyOptions& options, std::int64_t k) {
  SelectionPolicy policy;
  policy.k = k;
  policy.granularity = options.granularity;
  policy.n_sink = options.n_sink;
  policy.n_local = options.n_local;
  policy.kept_on_top = options.kept_on_top;
  return policy;
}

void check_study_arguments(const std::vector<std::int64_t>& k_values, const StudyOptions& options,
                           std::size_t selector_count, const std::function<bool(std::size_t)>& is_null) {
  KEYSEL_CHECK_ARG(!k_values.empty(), "options.k_values", "at least one k", k_values);
  for (const std::int64_t k : k_values) {
    KEYSEL_CHECK_ARG(k >= 1, "options.k_values", "every k >= 1", k_values);
    policy_for(options, k).validate("run_study");
  }
  KEYSEL_CHECK_ARG(selector_count > 0, "selectors", "at least one selector", "none");
  for (std::size_t i = 0; i < selector_count; ++i) {
    KEYSEL_CHECK_ARG(!is_null(i), "selectors", "non-null selectors", "nullptr at index " + std::to_string(i));
  }
}

/// Aggregates of every SPEC §4 metric over `metrics`.
void add_metric_aggregates(const std::vector<SelectionMetrics>& metrics, StudyRow& row) {
  std::vector<double> values(metrics.size());
  for (const std::string_view name : metric_names()) {
    for (std::size_t i = 0; i < metrics.size(); ++i) values[i] = metric_value(metrics[i], name);
    row.metrics.emplace(std::string(name), aggregate(values));
  }
}

}  // namespace

double estimate_study_bytes(const AttentionShape& shape, const StudyOptions& options, std::size_t selectors) {
  const auto T = static_cast<double>(shape.tokens), N = static_cast<double>(shape.keys);
  const auto Hq = static_cast<double>(shape.query_heads), Hkv = static_cast<double>(shape.kv_heads);
  const auto D = static_cast<double>(shape.head_dim), Dv = static_cast<double>(std::max<std::int64_t>(shape.value_dim, 1));
  const double G = options.granularity == Granularity::per_head      ? Hq
                   : options.granularity == Granularity::per_kv_head ? Hkv
                                                                     : 1.0;
  double width = 0;
  for (const std::int64_t k : options.k_values) {
    width = std::max(width, static_cast<double>(k) +
                                (options.kept_on_top ? static_cast<double>(options.n_sink) + static_cast<double>(options.n_local) : 0.0));
  }
  const double inputs = 4.0 * (T * Hq * D + N * Hkv * (D + Dv));
  const double reference = 8.0 * (T * Hq * N + T * G * N + T * Hq * Dv + N * Hkv * Dv);
  const double selection = 4.0 * T * G * width;
  const double rows = options.keep_row_metrics ? static_cast<double>(sizeof(SelectionMetrics)) * T * G *
                                                     static_cast<double>(selectors * options.k_values.size())
                                               : 0.0;
  return inputs + reference + selection + rows;
}

void check_k_values(const std::vector<std::int64_t>& k_values, std::int64_t keys, const std::string& workload,
                    std::string_view function) {
  KEYSEL_CHECK_ARG_IN(function, !k_values.empty(), "options.k_values", "at least one k", k_values);
  for (const std::int64_t k : k_values) {
    if (k < 1 || k > keys) {
      detail::throw_argument_error(function, "k",
                                   "every k in [1, N = " + std::to_string(keys) + "] (the keys cached in " +
                                       workload + ")",
                                   detail::describe(k_values));
    }
  }
}

void check_study_fits(const AttentionShape& shape, const StudyOptions& options, std::size_t selectors,
                      const std::string& workload) {
  constexpr std::string_view function = "run_study";
  check_k_values(options.k_values, shape.keys, workload, function);
  for (const std::int64_t k : options.k_values) policy_for(options, k).validate(function);
  check_memory(estimate_study_bytes(shape, options, selectors), available_memory_bytes(), function,
               "the study of " + workload);
}

void check_policy_fits(const AttentionShape& shape, const SelectionPolicy& policy, const std::string& workload) {
  StudyOptions options;
  options.k_values = {policy.k};
  options.granularity = policy.granularity;
  options.n_sink = policy.n_sink;
  options.n_local = policy.n_local;
  options.kept_on_top = policy.kept_on_top;
  check_study_fits(shape, options, 1, workload);
}

StudyResult run_study(const Workload& workload, const std::vector<std::unique_ptr<Selector>>& selectors,
                      const StudyOptions& options) {
  check_study_arguments(options.k_values, options, selectors.size(),
                        [&](std::size_t i) { return selectors[i] == nullptr; });
  const AttentionInputs inputs = workload.inputs();
  const AttentionShape shape = inputs.validate("run_study", /*need_v=*/false);
  check_study_fits(shape, options, selectors.size(), workload.name);
  const ExactReference reference(inputs, options.granularity);
  const std::int64_t groups = reference.groups();

  StudyResult result;
  result.workload = workload.name;
  result.shape = shape;
  result.options = options;
  // One request per call, as an engine makes them: the attention, the workload's trained-indexer inputs (when it
  // has them), and the cache state: new to each selector's first call, then unchanged (the next k reads the
  // same keys).
  SelectionRequest request = workload.request();
  const std::size_t total = selectors.size() * options.k_values.size();
  std::size_t done = 0;
  for (const auto& selector : selectors) {
    request.cache = CacheReuse::fresh;
    for (const std::int64_t k : options.k_values) {
      const SelectionPolicy policy = policy_for(options, k);

      std::vector<std::int32_t> buffer(
          static_cast<std::size_t>(checked_product({shape.tokens, groups, policy.width()}, "run_study", "selection")),
          -1);
      const TensorView selection(buffer.data(), DType::int32, {shape.tokens, groups, policy.width()});
      StudyRow row;
      row.selector = selector->name();
      row.k = k;
      row.cost += selector->select(request, policy, selection);
      request.cache = CacheReuse::appended;
      request.unchanged_keys = shape.keys;
      // A user selector may be wrong: say which one before the metrics trip over its output.
      validate_selection("run_study", selection, "selection of selector \"" + row.selector + "\"",
                         inputs.positions, shape.keys, groups);

      const std::vector<SelectionMetrics> metrics = reference.evaluate(selection, k);
      add_metric_aggregates(metrics, row);
      if (options.keep_row_metrics) row.row_metrics = metrics;
      const std::string what = row.selector + " k=" + std::to_string(k);
      result.rows.push_back(std::move(row));
      ++done;
      if (options.progress) options.progress(done, total, what);
    }
  }
  return result;
}

std::vector<double> bits_per_token(std::span<const float> logits, std::span<const std::uint8_t> tokens,
                                   std::int64_t vocab) {
  KEYSEL_CHECK_ARG(vocab >= 1, "vocab", ">= 1", vocab);
  const std::int64_t count = static_cast<std::int64_t>(tokens.size());
  KEYSEL_CHECK_ARG(static_cast<std::int64_t>(logits.size()) == count * vocab, "logits",
                   "T * vocab = " + std::to_string(count * vocab) + " values", logits.size());
  std::vector<double> bits;
  bits.reserve(tokens.size() > 0 ? tokens.size() - 1 : 0);
  for (std::int64_t i = 0; i + 1 < count; ++i) {
    const std::uint8_t next = tokens[static_cast<std::size_t>(i + 1)];
    KEYSEL_CHECK_ARG(next < vocab, "tokens", "bytes < vocab = " + std::to_string(vocab),
                     std::to_string(next) + " at " + std::to_string(i + 1));
    const float* row = logits.data() + i * vocab;
    double largest = row[0];
    for (std::int64_t v = 1; v < vocab; ++v) largest = std::max(largest, static_cast<double>(row[v]));
    double sum = 0.0;
    for (std::int64_t v = 0; v < vocab; ++v) sum += std::exp(static_cast<double>(row[v]) - largest);
    bits.push_back((largest + std::log(sum) - static_cast<double>(row[next])) / std::log(2.0));
  }
  return bits;
}

namespace {

/// n distinct rows of [first, end), uniformly at random from (seed, stream), ascending; every row when n is 0 or
/// at least end - first. (With first = 0 the sample of earlier versions, which had no first.)
std::vector<std::int64_t> sample_rows(std::int64_t first, std::int64_t end, std::int64_t n, std::uint64_t seed,
                                      std::uint64_t stream) {
  const std::int64_t count = std::max<std::int64_t>(end - first, 0);
  std::vector<std::int64_t> rows(static_cast<std::size_t>(count));
  std::iota(rows.begin(), rows.end(), first);
  if (n <= 0 || n >= count) return rows;
  RandomStream random(seed, stream);
  for (std::int64_t i = 0; i < n; ++i) {
    const auto j = i + static_cast<std::int64_t>(random.uniform_int(static_cast<std::uint64_t>(count - i)));
    std::swap(rows[static_cast<std::size_t>(i)], rows[static_cast<std::size_t>(j)]);
  }
  rows.resize(static_cast<std::size_t>(n));
  std::sort(rows.begin(), rows.end());
  return rows;
}

/// -log2 softmax(row)[next], in double.
double bits_of(const float* row, std::int64_t vocab, std::int64_t next) {
  double largest = row[0];
  for (std::int64_t v = 1; v < vocab; ++v) largest = std::max(largest, static_cast<double>(row[v]));
  double sum = 0.0;
  for (std::int64_t v = 0; v < vocab; ++v) sum += std::exp(static_cast<double>(row[v]) - largest);
  return (largest + std::log(sum) - static_cast<double>(row[next])) / std::log(2.0);
}

/// The first index of the largest logit.
std::int64_t argmax_of(const float* row, std::int64_t vocab) {
  std::int64_t best = 0;
  for (std::int64_t v = 1; v < vocab; ++v) {
    if (row[v] > row[best]) best = v;
  }
  return best;
}

/// The metrics of the rows `rows` of one layer's attention and selection [T, G, W] (a sampled study in forward
/// mode): the exact reference of those query rows only.
std::vector<SelectionMetrics> evaluate_rows(const AttentionInputs& attention, const TensorView& selection,
                                            const std::vector<std::int64_t>& rows, Granularity granularity,
                                            std::int64_t k) {
  const AttentionShape shape = attention.shape();
  const std::int64_t row_floats = shape.query_heads * shape.head_dim;
  const std::int64_t groups = selection.size(1), width = selection.size(2);
  const auto R = static_cast<std::int64_t>(rows.size());
  std::vector<float> q(static_cast<std::size_t>(R * row_floats));
  std::vector<std::int32_t> positions(static_cast<std::size_t>(R)), sub(static_cast<std::size_t>(R * groups * width));
  const float* all_q = attention.q.data<float>();
  const std::int32_t* all_positions = attention.positions.data<std::int32_t>();
  const std::int32_t* all_selection = selection.data<std::int32_t>();
  for (std::int64_t r = 0; r < R; ++r) {
    const std::int64_t t = rows[static_cast<std::size_t>(r)];
    std::copy_n(all_q + t * row_floats, row_floats, q.data() + r * row_floats);
    positions[static_cast<std::size_t>(r)] = all_positions[t];
    std::copy_n(all_selection + t * groups * width, groups * width, sub.data() + r * groups * width);
  }
  AttentionInputs inputs = attention;
  inputs.q = TensorView(static_cast<const void*>(q.data()), DType::fp32, {R, shape.query_heads, shape.head_dim});
  inputs.positions = TensorView(static_cast<const void*>(positions.data()), DType::int32, {R});
  const ExactReference reference(inputs, granularity);
  return reference.evaluate(TensorView(sub.data(), DType::int32, {R, groups, width}), k);
}

/// Bits per byte over the scored rows, split as a study reports them.
struct RowBits {
  std::vector<double> bits, increase, sparse_bits, sparse_increase, answer_bits, exact_match;
};

void add_bits_metrics(const RowBits& b, const TinyLmStudyOptions& tiny, bool task, StudyRow& row) {
  row.metrics.emplace(std::string(kBitsPerByteMetric), aggregate(b.bits));
  row.metrics.emplace(std::string(kBitsPerByteIncreaseMetric), aggregate(b.increase));
  if (tiny.bpb_sparse) {
    row.metrics.emplace(std::string(kSparseBitsPerByteMetric), aggregate(b.sparse_bits));
    row.metrics.emplace(std::string(kSparseBitsPerByteIncreaseMetric), aggregate(b.sparse_increase));
  }
  if (task) {
    row.metrics.emplace(std::string(kAnswerBitsMetric), aggregate(b.answer_bits));
    row.metrics.emplace(std::string(kExactMatchMetric), aggregate(b.exact_match));
  }
}

void check_tiny_options(std::string_view function, const TinyLmStudyOptions& tiny) {
  KEYSEL_CHECK_ARG_IN(function, tiny.query_sample >= 0, "tiny.query_sample", ">= 0 (0: every row)",
                      tiny.query_sample);
  KEYSEL_CHECK_ARG_IN(function, tiny.prefill >= 0, "tiny.prefill", ">= 0 (0: no prefill, every row scored)",
                      tiny.prefill);
}

/// Decode-mode study over sequences (a text: one sequence without an answer; a retrieval task: its examples).
StudyResult run_decode_study(std::string_view function, const TinyLm& model,
                             std::span<const TinyLmTaskExample> examples,
                             const std::vector<SelectorFactory>& selectors, const StudyOptions& options,
                             const TinyLmStudyOptions& tiny, std::string workload, bool task) {
  check_study_arguments(options.k_values, options, selectors.size(), [&](std::size_t i) { return !selectors[i]; });
  check_tiny_options(function, tiny);
  const TinyLmConfig& config = model.config();
  const std::int64_t groups = group_count(options.granularity, config.heads, config.kv_heads);
  KEYSEL_CHECK_ARG_IN(function, !examples.empty(), "examples", "at least one sequence", "none");

  // The scored rows of each sequence: a sample of the prompt rows, then the rows predicting the answer.
  std::vector<std::vector<std::int64_t>> scored(examples.size());
  std::vector<std::int64_t> prompt_rows(examples.size());
  std::int64_t shortest = std::numeric_limits<std::int64_t>::max(), longest = 0, total_rows = 0;
  for (std::size_t e = 0; e < examples.size(); ++e) {
    const auto L = static_cast<std::int64_t>(examples[e].bytes.size());
    const std::int64_t A = examples[e].answer_length;
    KEYSEL_CHECK_ARG_IN(function, L >= 2 && L <= config.context, "examples",
                        "sequences of 2 .. " + std::to_string(config.context) + " bytes (the model's context)",
                        "sequence " + std::to_string(e) + " of " + std::to_string(L) + " bytes");
    KEYSEL_CHECK_ARG_IN(function, A >= 0 && A < L - 1 + (task ? 0 : 1) && (!task || A >= 1), "examples",
                        task ? "answer_length in [1, length - 1)" : "no answer", 
                        "sequence " + std::to_string(e) + " with answer_length " + std::to_string(A));
    prompt_rows[e] = L - 1 - A;
    KEYSEL_CHECK_ARG_IN(function, tiny.prefill < prompt_rows[e], "tiny.prefill",
                        "fewer positions than the prompt rows (" + std::to_string(prompt_rows[e]) + " in sequence " +
                            std::to_string(e) + "), so that a row is scored",
                        tiny.prefill);
    scored[e] = sample_rows(tiny.prefill, prompt_rows[e], tiny.query_sample, tiny.sample_seed, e);
    for (std::int64_t r = L - 1 - A; r < L - 1; ++r) scored[e].push_back(r);
    shortest = std::min(shortest, L);
    longest = std::max(longest, L);
    total_rows += static_cast<std::int64_t>(scored[e].size());
  }
  check_k_values(options.k_values, shortest, workload, function);
  for (std::size_t e = 0; e < examples.size(); ++e) {
    const AttentionShape one{static_cast<std::int64_t>(scored[e].size()), static_cast<std::int64_t>(examples[e].bytes.size()),
                             config.heads, config.kv_heads, config.head_dim, config.head_dim};
    StudyOptions bare = options;
    bare.keep_row_metrics = false;
    check_study_fits(one, bare, 1, workload);
  }

  StudyResult result;
  result.workload = std::move(workload);
  result.shape = AttentionShape{total_rows, longest, config.heads, config.kv_heads, config.head_dim, config.head_dim};
  result.options = options;
  for (std::int64_t l = 0; l < config.layers; ++l) result.layers.push_back(l);
  for (const auto& rows : scored) result.row_positions.insert(result.row_positions.end(), rows.begin(), rows.end());

  struct Accumulator {
    StudyRow row;
    std::vector<std::vector<SelectionMetrics>> by_layer;
    RowBits bits;
  };
  std::vector<Accumulator> acc(selectors.size() * options.k_values.size());
  for (Accumulator& a : acc) a.by_layer.resize(static_cast<std::size_t>(config.layers));
  std::vector<double> full_bits, full_match;
  const std::size_t per_example = acc.size();
  const std::size_t steps = per_example * examples.size();
  std::size_t done = 0;
  for (std::size_t e = 0; e < examples.size(); ++e) {
    const std::span<const std::uint8_t> bytes = examples[e].bytes;
    const std::vector<std::int64_t>& rows = scored[e];
    const TinyLmPrefill prefill = model.prefill(bytes);
    // Full attention's bits and answers, from the prefill's logits at the scored rows.
    std::vector<double> full_row_bits(rows.size());
    bool full_correct = true;
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const float* logits = prefill.logits.data() + rows[i] * config.vocab;
      const std::int64_t next = bytes[static_cast<std::size_t>(rows[i] + 1)];
      full_row_bits[i] = bits_of(logits, config.vocab, next);
      if (rows[i] < prompt_rows[e]) {
        full_bits.push_back(full_row_bits[i]);
      } else {
        full_correct = full_correct && argmax_of(logits, config.vocab) == next;
      }
    }
    if (task) full_match.push_back(full_correct ? 1.0 : 0.0);
    // Layer 0's attention inputs do not depend on the selections (the scored rows' queries and K/V at layer 0 come
    // from their bytes alone, as the prefill's do), so its exact reference is computed once per sequence and shared
    // by every selector and k. (ExactReference keeps copies of what evaluate() reads.)
    std::unique_ptr<const ExactReference> first_layer;

    for (std::size_t i = 0; i < selectors.size(); ++i) {
      for (std::size_t j = 0; j < options.k_values.size(); ++j) {
        const std::int64_t k = options.k_values[j];
        Accumulator& a = acc[i * options.k_values.size() + j];
        a.row.k = k;
        const SelectionPolicy policy = policy_for(options, k);
        TinyLmSparse sparse;
        sparse.granularity = options.granularity;
        sparse.width = policy.width();
        sparse.select = [&](const TinyLmLayer& layer, const TensorView& selection) {
          const IndexerTensors indexer{layer.index_q, layer.index_k, layer.index_w};
          const std::unique_ptr<Selector> selector = selectors[i](layer.index_q.empty() ? nullptr : &indexer);
          KEYSEL_CHECK_ARG_IN(function, selector != nullptr, "selectors", "factories that build a selector",
                              "nullptr from factory " + std::to_string(i) + " in layer " + std::to_string(layer.layer));
          if (a.row.selector.empty()) a.row.selector = selector->name();
          a.row.cost += selector->select(layer.request(), policy, selection);
          validate_selection(function, selection,
                             "selection of selector \"" + a.row.selector + "\" in layer " + std::to_string(layer.layer),
                             layer.attention.positions, static_cast<std::int64_t>(bytes.size()), groups);
          std::unique_ptr<const ExactReference> own;
          if (layer.layer == 0 && first_layer == nullptr) {
            first_layer = std::make_unique<const ExactReference>(layer.attention, options.granularity);
          } else if (layer.layer != 0) {
            own = std::make_unique<const ExactReference>(layer.attention, options.granularity);
          }
          const ExactReference& reference = layer.layer == 0 ? *first_layer : *own;
          const std::vector<SelectionMetrics> metrics = reference.evaluate(selection, k);
          auto& out = a.by_layer[static_cast<std::size_t>(layer.layer)];
          out.insert(out.end(), metrics.begin(), metrics.end());
        };
        const std::vector<float> logits = model.decode(bytes, prefill, rows, &sparse);
        bool correct = true;
        for (std::size_t r = 0; r < rows.size(); ++r) {
          const float* row_logits = logits.data() + static_cast<std::int64_t>(r) * config.vocab;
          const std::int64_t next = bytes[static_cast<std::size_t>(rows[r] + 1)];
          const double b = bits_of(row_logits, config.vocab, next);
          if (rows[r] < prompt_rows[e]) {
            a.bits.bits.push_back(b);
            a.bits.increase.push_back(b - full_row_bits[r]);
            if (rows[r] >= 2 * k) {
              a.bits.sparse_bits.push_back(b);
              a.bits.sparse_increase.push_back(b - full_row_bits[r]);
            }
          } else {
            a.bits.answer_bits.push_back(b);
            correct = correct && argmax_of(row_logits, config.vocab) == next;
          }
        }
        if (task) a.bits.exact_match.push_back(correct ? 1.0 : 0.0);
        ++done;
        if (options.progress) {
          options.progress(done * per_example / steps, per_example,
                           a.row.selector + " k=" + std::to_string(k) + " (sequence " + std::to_string(e + 1) + "/" +
                               std::to_string(examples.size()) + ")");
        }
      }
    }
  }
  result.full_bpb = aggregate(full_bits);
  if (task) result.full_exact_match = aggregate(full_match);
  for (Accumulator& a : acc) {
    std::vector<SelectionMetrics> metrics;
    for (auto& layer : a.by_layer) metrics.insert(metrics.end(), layer.begin(), layer.end());
    add_metric_aggregates(metrics, a.row);
    add_bits_metrics(a.bits, tiny, task, a.row);
    if (options.keep_row_metrics) a.row.row_metrics = std::move(metrics);
    result.rows.push_back(std::move(a.row));
  }
  return result;
}

}  // namespace

StudyResult run_tiny_lm_study(const TinyLm& model, std::span<const std::uint8_t> tokens,
                              const std::vector<SelectorFactory>& selectors, const StudyOptions& options,
                              std::string workload) {
  return run_tiny_lm_study(model, tokens, selectors, options, TinyLmStudyOptions{}, std::move(workload));
}

StudyResult run_tiny_lm_task_study(const TinyLm& model, std::span<const TinyLmTaskExample> examples,
                                   const std::vector<SelectorFactory>& selectors, const StudyOptions& options,
                                   const TinyLmStudyOptions& tiny, std::string workload) {
  constexpr std::string_view function = "run_tiny_lm_task_study";
  KEYSEL_CHECK_ARG_IN(function, tiny.mode == TinyLmStudyMode::decode, "tiny.mode",
                      "decode (a retrieval task scores its answers over a full-attention prefill)", "forward");
  return run_decode_study(function, model, examples, selectors, options, tiny, std::move(workload), true);
}

StudyResult run_tiny_lm_study(const TinyLm& model, std::span<const std::uint8_t> tokens,
                              const std::vector<SelectorFactory>& selectors, const StudyOptions& options,
                              const TinyLmStudyOptions& tiny, std::string workload) {
  constexpr std::string_view function = "run_tiny_lm_study";
  check_study_arguments(options.k_values, options, selectors.size(), [&](std::size_t i) { return !selectors[i]; });
  check_tiny_options(function, tiny);
  const TinyLmConfig& config = model.config();
  const std::int64_t tokens_count = static_cast<std::int64_t>(tokens.size());
  KEYSEL_CHECK_ARG(tokens_count >= 2 && tokens_count <= config.context, "tokens",
                   "2 .. " + std::to_string(config.context) + " bytes (the model's context)", tokens.size());
  if (tiny.mode == TinyLmStudyMode::decode) {
    const TinyLmTaskExample text{tokens, 0};
    return run_decode_study(function, model, std::span<const TinyLmTaskExample>(&text, 1), selectors, options, tiny,
                            std::move(workload), false);
  }
  const std::int64_t groups = group_count(options.granularity, config.heads, config.kv_heads);
  KEYSEL_CHECK_ARG(tiny.prefill < tokens_count - 1, "tiny.prefill",
                   "fewer than T - 1 = " + std::to_string(tokens_count - 1) + " positions, so that a row is scored",
                   tiny.prefill);
  // Sampled rows, or the rows after the prefill (neither: every row, and bits over every predicted byte).
  const bool sampled = tiny.query_sample > 0 || tiny.prefill > 0;
  const std::vector<std::int64_t> rows =
      sampled ? sample_rows(tiny.prefill, tokens_count - 1, tiny.query_sample, tiny.sample_seed, 0)
              : std::vector<std::int64_t>{};
  const std::int64_t scored = sampled ? static_cast<std::int64_t>(rows.size()) : tokens_count;

  const AttentionShape shape{scored, tokens_count, config.heads, config.kv_heads, config.head_dim, config.head_dim};
  // Every layer's rows are kept: as many as selectors x layers studies of one attention.
  check_study_fits(shape, options, selectors.size() * static_cast<std::size_t>(config.layers), workload);

  StudyResult result;
  result.workload = std::move(workload);
  result.shape = shape;
  result.options = options;
  result.row_positions = rows;
  for (std::int64_t l = 0; l < config.layers; ++l) result.layers.push_back(l);
  const std::vector<double> full_bits = bits_per_token(model.logits(tokens), tokens, config.vocab);
  if (sampled) {
    std::vector<double> picked;
    for (const std::int64_t r : rows) picked.push_back(full_bits[static_cast<std::size_t>(r)]);
    result.full_bpb = aggregate(picked);
  } else {
    result.full_bpb = aggregate(full_bits);
  }

  const std::size_t total = selectors.size() * options.k_values.size();
  std::size_t done = 0;
  for (std::size_t i = 0; i < selectors.size(); ++i) {
    for (const std::int64_t k : options.k_values) {
      const SelectionPolicy policy = policy_for(options, k);
      StudyRow row;
      row.k = k;
      std::vector<SelectionMetrics> metrics;
      metrics.reserve(static_cast<std::size_t>(config.layers * scored * groups));
      TinyLmSparse sparse;
      sparse.granularity = options.granularity;
      sparse.width = policy.width();
      sparse.select = [&](const TinyLmLayer& layer, const TensorView& selection) {
        const IndexerTensors indexer{layer.index_q, layer.index_k, layer.index_w};
        const std::unique_ptr<Selector> selector = selectors[i](layer.index_q.empty() ? nullptr : &indexer);
        KEYSEL_CHECK_ARG(selector != nullptr, "selectors", "factories that build a selector",
                         "nullptr from factory " + std::to_string(i) + " in layer " + std::to_string(layer.layer));
        if (row.selector.empty()) row.selector = selector->name();
        row.cost += selector->select(layer.request(), policy, selection);
        validate_selection(function, selection,
                           "selection of selector \"" + row.selector + "\" in layer " + std::to_string(layer.layer),
                           layer.attention.positions, tokens_count, groups);
        if (sampled) {
          const std::vector<SelectionMetrics> layer_metrics =
              evaluate_rows(layer.attention, selection, rows, options.granularity, k);
          metrics.insert(metrics.end(), layer_metrics.begin(), layer_metrics.end());
          return;
        }
        const ExactReference reference(layer.attention, options.granularity);
        const std::vector<SelectionMetrics> layer_metrics = reference.evaluate(selection, k);
        metrics.insert(metrics.end(), layer_metrics.begin(), layer_metrics.end());
      };
      const std::vector<double> bits = bits_per_token(model.logits(tokens, sparse), tokens, config.vocab);
      add_metric_aggregates(metrics, row);
      RowBits b;
      const auto add = [&](std::int64_t r) {
        const double x = bits[static_cast<std::size_t>(r)], increase = x - full_bits[static_cast<std::size_t>(r)];
        b.bits.push_back(x);
        b.increase.push_back(increase);
        if (r >= 2 * k) {
          b.sparse_bits.push_back(x);
          b.sparse_increase.push_back(increase);
        }
      };
      if (sampled) {
        for (const std::int64_t r : rows) add(r);
      } else {
        for (std::int64_t r = 0; r + 1 < tokens_count; ++r) add(r);
      }
      add_bits_metrics(b, tiny, false, row);
      if (options.keep_row_metrics) row.row_metrics = std::move(metrics);
      const std::string what = row.selector + " k=" + std::to_string(k);
      result.rows.push_back(std::move(row));
      ++done;
      if (options.progress) options.progress(done, total, what);
    }
  }
  return result;
}

namespace {

/// Mean of metric `name` in `row`, NaN when absent.
double mean_of(const StudyRow& row, std::string_view name, double Aggregate::*field = &Aggregate::mean) {
  const auto it = row.metrics.find(name);
  return it == row.metrics.end() ? std::nan("") : it->second.*field;
}

std::string format_number(const char* format, double value) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, format, value);
  return buffer;
}

std::string pad_left(const std::string& text, std::size_t width) {
  return text.size() >= width ? text : std::string(width - text.size(), ' ') + text;
}
std::string pad_right(const std::string& text, std::size_t width) {
  return text.size() >= width ? text : text + std::string(width - text.size(), ' ');
}

}  // namespace

void print_study_table(const StudyResult& result, std::ostream& out) {
  const AttentionShape& s = result.shape;
  out << "workload: " << result.workload << "\n";
  out << "shape: T=" << s.tokens << " query tokens, N=" << s.keys << " keys, Hq=" << s.query_heads
      << ", Hkv=" << s.kv_heads << ", D=" << s.head_dim << ", Dv=" << s.value_dim
      << "; granularity " << granularity_name(result.options.granularity) << ", kept keys: " << result.options.n_sink
      << " sinks + " << result.options.n_local << " local" << (result.options.kept_on_top ? " on top of k" : "")
      << "\n";
  const bool model = !result.layers.empty();
  if (model) {
    out << "model: " << result.layers.size() << " layers, metrics over every layer's query tokens and groups; "
        << "full attention " << format_number("%.4f", result.full_bpb.mean) << " bits per byte over "
        << result.full_bpb.count << " predicted bytes";
    if (result.full_exact_match.count > 0) {
      out << ", exact match " << format_number("%.3f", result.full_exact_match.mean) << " of "
          << result.full_exact_match.count << " examples";
    }
    if (!result.row_positions.empty()) out << "; " << result.row_positions.size() << " scored query rows";
    out << "\n";
  }
  if (!result.rows.empty()) {
    // Entropy depends on the workload only, so every row holds the same value (in a model, the layers after
    // the first see what the sparse layers before them produced: the first row's forward pass is shown).
    out << "attention entropy" << (model ? " (" + result.rows.front().selector + " k=" +
                                               std::to_string(result.rows.front().k) + ")" : std::string())
        << ": " << format_number("%.3f", mean_of(result.rows.front(), "entropy"))
        << " nats mean, " << format_number("%.3f", mean_of(result.rows.front(), "entropy_normalized"))
        << " of log(allowed keys)\n";
  }
  out << "\n";

  struct Column {
    const char* title;
    const char* metric;
    double Aggregate::*field;
    const char* format;
  };
  static const Column columns[] = {
      {"recall", "recall", &Aggregate::mean, "%.4f"},        {"recall_p5", "recall", &Aggregate::p5, "%.4f"},
      {"mass", "mass", &Aggregate::mean, "%.4f"},            {"mass_ratio", "mass_ratio", &Aggregate::mean, "%.4f"},
      {"kl", "kl", &Aggregate::mean, "%.4f"},                {"top1", "top1", &Aggregate::mean, "%.4f"},
      {"out_err", "out_err", &Aggregate::mean, "%.4f"},      {"out_err_p95", "out_err", &Aggregate::p95, "%.4f"},
  };
  std::size_t name_width = 8;
  for (const StudyRow& row : result.rows) name_width = std::max(name_width, row.selector.size());
  constexpr std::size_t kWidth = 8;
  constexpr std::size_t kNumberWidth = 12;

  // A model adds its accuracy: bits per byte and the increase over full attention.
  static const Column model_columns[] = {{"bpb", "bpb", &Aggregate::mean, "%.4f"},
                                         {"bpb_increase", "bpb_increase", &Aggregate::mean, "%.4f"}};
  static const Column task_columns[] = {{"bpb", "bpb", &Aggregate::mean, "%.4f"},
                                        {"bpb_increase", "bpb_increase", &Aggregate::mean, "%.4f"},
                                        {"exact_match", "exact_match", &Aggregate::mean, "%.4f"}};
  const bool task = result.full_exact_match.count > 0;
  const std::span<const Column> extra = task    ? std::span<const Column>(task_columns)
                                        : model ? std::span<const Column>(model_columns)
                                                : std::span<const Column>();
  std::string header = pad_right("selector", name_width) + pad_left("k", kWidth);
  for (const Column& c : columns) header += pad_left(c.title, kNumberWidth);
  // Wider than the number columns where the title needs it, so that titles stay apart.
  const auto width_of = [&](const Column& c) { return std::max(kNumberWidth, std::string_view(c.title).size() + 2); };
  for (const Column& c : extra) header += pad_left(c.title, width_of(c));
  header += pad_left("select_ms", kNumberWidth);
  out << header << "\n" << std::string(header.size(), '-') << "\n";
  for (const StudyRow& row : result.rows) {
    std::string line = pad_right(row.selector, name_width) + pad_left(std::to_string(row.k), kWidth);
    for (const Column& c : columns) line += pad_left(format_number(c.format, mean_of(row, c.metric, c.field)), kNumberWidth);
    for (const Column& c : extra) {
      line += pad_left(format_number(c.format, mean_of(row, c.metric, c.field)), width_of(c));
    }
    line += pad_left(format_number("%.2f", row.cost.seconds * 1e3), kNumberWidth);
    out << line << "\n";
  }
}

namespace {

// ordered_json keeps the keys in the order written: workload, shape, options, rows; metrics in metric_names() order.
using Json = nlohmann::ordered_json;

Json number(double value) { return std::isfinite(value) ? Json(value) : Json(nullptr); }

Json aggregate_json(const Aggregate& a) {
  return {{"mean", number(a.mean)}, {"min", number(a.min)}, {"p5", number(a.p5)},
          {"p50", number(a.p50)},   {"p95", number(a.p95)}, {"count", a.count}};
}

}  // namespace

std::string study_to_json(const StudyResult& result) {
  const AttentionShape& s = result.shape;
  Json doc;
  doc["workload"] = result.workload;
  doc["shape"] = {{"tokens", s.tokens},           {"keys", s.keys},         {"query_heads", s.query_heads},
                  {"kv_heads", s.kv_heads},       {"head_dim", s.head_dim}, {"value_dim", s.value_dim}};
  doc["options"] = {{"k_values", result.options.k_values},
                    {"granularity", std::string(granularity_name(result.options.granularity))},
                    {"n_sink", result.options.n_sink},
                    {"n_local", result.options.n_local},
                    {"kept_on_top", result.options.kept_on_top}};
  if (!result.layers.empty()) {
    doc["layers"] = result.layers;
    doc["full_attention"] = {{"bpb", aggregate_json(result.full_bpb)}};
    if (result.full_exact_match.count > 0) {
      doc["full_attention"]["exact_match"] = aggregate_json(result.full_exact_match);
    }
    if (!result.row_positions.empty()) doc["scored_rows"] = result.row_positions.size();
  }
  Json rows = Json::array();
  for (const StudyRow& row : result.rows) {
    Json metrics = Json::object();
    for (const std::string_view name : metric_names()) {
      const auto it = row.metrics.find(name);
      if (it != row.metrics.end()) metrics[std::string(name)] = aggregate_json(it->second);
    }
    for (const auto& [name, a] : row.metrics) {
      if (!metrics.contains(name)) metrics[name] = aggregate_json(a);
    }
    Json cost = {{"key_bytes_read", number(row.cost.key_bytes_read)},
                 {"macs", number(row.cost.macs)},
                 {"keys_scored", number(row.cost.keys_scored)},
                 {"seconds", number(row.cost.seconds)},
                 {"rows", row.cost.rows}};
    rows.push_back({{"selector", row.selector}, {"k", row.k}, {"metrics", std::move(metrics)}, {"cost", std::move(cost)}});
  }
  doc["rows"] = std::move(rows);
  return doc.dump(2) + "\n";
}

}  // namespace keysel
