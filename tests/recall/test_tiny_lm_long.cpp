// Long-context tiny-lm studies over a small random model written here: decode mode (one full-attention prefill,
// only the scored rows sparse), sampled query rows, bits per byte where selections are sparse, a retrieval task
// scored by exact match, the study-file keys of all of them, and the fidelity selector's drop protocols.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "keysel/core/error.h"
#include "keysel/indexer/candidate_search.h"
#include "keysel/indexer/lightning_indexer.h"
#include "keysel/indexer/selectors.h"
#include "keysel/indexer/topk.h"
#include "keysel/recall/dump.h"
#include "keysel/recall/loaders.h"
#include "keysel/recall/report.h"
#include "keysel/recall/retrieval.h"
#include "keysel/recall/selector_spec.h"
#include "keysel/recall/study.h"
#include "keysel/recall/study_config.h"
#include "keysel/recall/tiny_lm.h"
#include "recall/tiny_lm_fixture.h"
#include "recall/xml_check.h"

namespace keysel {
namespace {

using namespace tiny_lm_fixture;  // NOLINT(google-build-using-namespace): the shared fixture

double bits_at(const std::vector<float>& logits, std::int64_t row, std::uint8_t next) {
  const float* x = logits.data() + row * 256;
  double largest = x[0];
  for (int v = 1; v < 256; ++v) largest = std::max(largest, static_cast<double>(x[v]));
  double sum = 0;
  for (int v = 0; v < 256; ++v) sum += std::exp(static_cast<double>(x[v]) - largest);
  return (largest + std::log(sum) - x[next]) / std::log(2.0);
}

std::uint8_t argmax_at(const std::vector<float>& logits, std::int64_t row) {
  const float* x = logits.data() + row * 256;
  return static_cast<std::uint8_t>(std::max_element(x, x + 256) - x);
}

TEST(TinyLmLongStudy, DecodeWithExactOverEveryKeyIsFullAttention) {
  const TinyLm model = TinyLm::from_safetensors(random_model_file(small_config(), 11));
  const std::vector<std::uint8_t> tokens = text_bytes(0, 64);
  StudyOptions options;
  options.k_values = {4, 64};
  options.keep_row_metrics = true;
  options.granularity = Granularity::per_token;
  TinyLmStudyOptions tiny;
  tiny.mode = TinyLmStudyMode::decode;
  tiny.query_sample = 10;
  tiny.bpb_sparse = true;
  const StudyResult result =
      run_tiny_lm_study(model, tokens, factories({R"({"type": "exact"})"}), options, tiny, "decode");
  ASSERT_EQ(result.row_positions.size(), 10u);
  EXPECT_TRUE(std::is_sorted(result.row_positions.begin(), result.row_positions.end()));
  EXPECT_LT(result.row_positions.back(), 63);  // rows that predict a byte
  EXPECT_EQ(result.shape.tokens, 10);
  EXPECT_EQ(result.full_bpb.count, 10);
  // Full attention's bits at the sampled rows.
  const std::vector<float> full = model.logits(tokens);
  double sum = 0;
  for (const std::int64_t r : result.row_positions) sum += bits_at(full, r, tokens[static_cast<std::size_t>(r + 1)]);
  EXPECT_NEAR(result.full_bpb.mean, sum / 10.0, 1e-9);
  ASSERT_EQ(result.rows.size(), 2u);
  // k = 64 reads every key: full attention's bits and recall 1; k = 4 loses accuracy.
  const StudyRow& all = result.rows[1];
  EXPECT_NEAR(all.metrics.at("bpb").mean, result.full_bpb.mean, 1e-4);
  EXPECT_LT(std::abs(all.metrics.at("bpb_increase").mean), 1e-4);
  EXPECT_EQ(all.metrics.at("recall").min, 1.0);
  EXPECT_EQ(all.row_metrics.size(), 2u * 10u * 1u);  // layers x rows x groups
  EXPECT_EQ(all.metrics.at("bpb_sparse").count, 0);   // no row at position >= 128
  const StudyRow& few = result.rows[0];
  std::int64_t beyond = 0;
  for (const std::int64_t r : result.row_positions) beyond += r >= 8 ? 1 : 0;
  EXPECT_EQ(few.metrics.at("bpb_sparse").count, beyond);
  EXPECT_GT(std::abs(few.metrics.at("bpb_increase").mean), 1e-3);
  EXPECT_EQ(few.metrics.count("exact_match"), 0u);
  // The bits are those of TinyLm::decode over the prefill, row by row.
  const TinyLmPrefill prefill = model.prefill(tokens);
  const std::unique_ptr<Selector> exact = make_exact_selector();
  SelectionPolicy policy;
  policy.k = 4;
  policy.granularity = Granularity::per_token;
  TinyLmSparse sparse{Granularity::per_token, 4, [&](const TinyLmLayer& layer, const TensorView& selection) {
                        exact->select(layer.request(), policy, selection);
                      }};
  const std::vector<float> decoded = model.decode(tokens, prefill, result.row_positions, &sparse);
  double decoded_sum = 0;
  for (std::size_t i = 0; i < 10; ++i) {
    decoded_sum += bits_at(decoded, static_cast<std::int64_t>(i), tokens[static_cast<std::size_t>(result.row_positions[i] + 1)]);
  }
  EXPECT_NEAR(few.metrics.at("bpb").mean, decoded_sum / 10.0, 1e-9);
}

TEST(TinyLmLongStudy, SampledForwardStudyScoresTheSampledRowsOfTheFullStudy) {
  // In forward mode a sample changes what is scored, not the forward pass: the sampled rows' metrics are the
  // full study's at those rows, and the bits the full study's at those bytes.
  const TinyLm model = TinyLm::from_safetensors(random_model_file(small_config(), 12));
  const std::vector<std::uint8_t> tokens = text_bytes(5, 60);
  StudyOptions options;
  options.k_values = {6};
  options.keep_row_metrics = true;
  const auto selectors = factories({R"({"type": "indexer", "format": "int4"})", R"({"type": "random", "seed": 3})"});
  const StudyResult whole = run_tiny_lm_study(model, tokens, selectors, options, "whole");
  TinyLmStudyOptions tiny;
  tiny.query_sample = 13;
  tiny.sample_seed = 7;
  tiny.bpb_sparse = true;
  const StudyResult part = run_tiny_lm_study(model, tokens, selectors, options, tiny, "part");
  ASSERT_EQ(part.row_positions.size(), 13u);
  EXPECT_TRUE(whole.row_positions.empty());
  // Another seed draws other rows.
  tiny.sample_seed = 8;
  EXPECT_NE(run_tiny_lm_study(model, tokens, selectors, options, tiny, "other").row_positions, part.row_positions);
  const std::int64_t groups = 2;  // per_kv_head
  for (std::size_t s = 0; s < 2; ++s) {
    const StudyRow& w = whole.rows[s];
    const StudyRow& p = part.rows[s];
    ASSERT_EQ(p.row_metrics.size(), 2u * 13u * groups);
    for (std::int64_t l = 0; l < 2; ++l) {
      for (std::int64_t r = 0; r < 13; ++r) {
        for (std::int64_t g = 0; g < groups; ++g) {
          const SelectionMetrics& a = p.row_metrics[static_cast<std::size_t>((l * 13 + r) * groups + g)];
          const SelectionMetrics& b = w.row_metrics[static_cast<std::size_t>(
              (l * 60 + part.row_positions[static_cast<std::size_t>(r)]) * groups + g)];
          EXPECT_NEAR(a.recall, b.recall, 1e-12);
          EXPECT_NEAR(a.mass, b.mass, 1e-9);
          EXPECT_NEAR(a.entropy, b.entropy, 1e-9);
        }
      }
    }
    // bpb over the sampled bytes: 13 of them; over every byte in the whole study.
    EXPECT_EQ(p.metrics.at("bpb").count, 13);
    EXPECT_EQ(w.metrics.at("bpb").count, 59);
    EXPECT_EQ(w.metrics.count("bpb_sparse"), 0u);
    std::int64_t beyond = 0;
    for (const std::int64_t r : part.row_positions) beyond += r >= 12 ? 1 : 0;
    EXPECT_EQ(p.metrics.at("bpb_sparse").count, beyond);
  }
  const std::vector<double> bits = bits_per_token(model.logits(tokens), tokens, 256);
  double sum = 0;
  for (const std::int64_t r : part.row_positions) sum += bits[static_cast<std::size_t>(r)];
  EXPECT_NEAR(part.full_bpb.mean, sum / 13.0, 1e-12);
  TinyLmStudyOptions bad;
  bad.query_sample = -1;
  EXPECT_THROW(run_tiny_lm_study(model, tokens, selectors, options, bad, "bad"), Error);
}

/// Two retrieval examples over the text: the first's answer is what full attention predicts greedily (so full
/// attention answers it), the second's answer is bytes the model does not predict.
struct TaskFixture {
  std::vector<std::uint8_t> data;
  std::vector<RetrievalExample> examples;
};

TaskFixture make_task(const TinyLm& model) {
  TaskFixture f;
  for (int e = 0; e < 2; ++e) {
    std::vector<std::uint8_t> bytes = text_bytes(static_cast<std::size_t>(e * 7), 40);
    for (int a = 0; a < 4; ++a) {
      const std::vector<float> logits = model.logits(bytes);
      const std::uint8_t next = argmax_at(logits, static_cast<std::int64_t>(bytes.size()) - 1);
      bytes.push_back(e == 0 ? next : static_cast<std::uint8_t>(next ^ 0x55));
    }
    RetrievalExample x;
    x.offset = static_cast<std::int64_t>(f.data.size());
    x.length = 44;
    x.answer_length = 4;
    x.keys = 1 + e;
    x.depth = 0.5;
    x.context = 44;
    f.examples.push_back(x);
    f.data.insert(f.data.end(), bytes.begin(), bytes.end());
  }
  return f;
}

TEST(TinyLmLongStudy, RetrievalTaskScoresExactMatch) {
  const TinyLm model = TinyLm::from_safetensors(random_model_file(small_config(), 13));
  const TaskFixture f = make_task(model);
  std::vector<TinyLmTaskExample> examples;
  for (const RetrievalExample& x : f.examples) {
    examples.push_back({std::span<const std::uint8_t>(f.data).subspan(static_cast<std::size_t>(x.offset), 44), 4});
  }
  StudyOptions options;
  options.k_values = {2, 44};
  options.keep_row_metrics = true;
  TinyLmStudyOptions tiny;
  tiny.mode = TinyLmStudyMode::decode;
  tiny.query_sample = 5;
  const auto selectors = factories({R"({"type": "exact"})", R"({"type": "streaming", "n_sink": 1})"});
  const StudyResult result = run_tiny_lm_task_study(model, examples, selectors, options, tiny, "task");
  EXPECT_EQ(result.full_exact_match.count, 2);
  EXPECT_EQ(result.full_exact_match.mean, 0.5);  // the first example only
  EXPECT_EQ(result.full_bpb.count, 10);          // 5 prompt rows per example
  ASSERT_EQ(result.row_positions.size(), 2u * 9u);
  EXPECT_EQ(result.row_positions[5], 39);  // the rows predicting the answer: 39 .. 42
  EXPECT_EQ(result.row_positions[8], 42);
  ASSERT_EQ(result.rows.size(), 4u);
  const StudyRow& exact_all = result.rows[1];
  EXPECT_EQ(exact_all.k, 44);
  EXPECT_EQ(exact_all.metrics.at("exact_match").mean, 0.5);
  EXPECT_EQ(exact_all.metrics.at("exact_match").count, 2);
  EXPECT_EQ(exact_all.metrics.at("answer_bpb").count, 8);
  EXPECT_EQ(exact_all.metrics.at("recall").min, 1.0);
  EXPECT_EQ(exact_all.row_metrics.size(), 2u * 18u * 2u);
  // Exact match of a sparse selector is what TinyLm::decode's argmax gives on the answer rows.
  for (const std::size_t row : {0u, 2u, 3u}) {
    const StudyRow& r = result.rows[row];
    const auto spec = factories({row < 2 ? R"({"type": "exact"})" : R"({"type": "streaming", "n_sink": 1})"})[0];
    SelectionPolicy policy;
    policy.k = r.k;
    policy.granularity = options.granularity;
    double matches = 0;
    for (const TinyLmTaskExample& x : examples) {
      TinyLmSparse sparse{policy.granularity, policy.width(), [&](const TinyLmLayer& layer, const TensorView& sel) {
                            const IndexerTensors indexer{layer.index_q, layer.index_k, layer.index_w};
                            spec(&indexer)->select(layer.request(), policy, sel);
                          }};
      const TinyLmPrefill prefill = model.prefill(x.bytes);
      const std::vector<std::int64_t> rows = {39, 40, 41, 42};
      const std::vector<float> logits = model.decode(x.bytes, prefill, rows, &sparse);
      bool correct = true;
      for (std::int64_t i = 0; i < 4; ++i) correct = correct && argmax_at(logits, i) == x.bytes[static_cast<std::size_t>(40 + i)];
      matches += correct ? 1 : 0;
    }
    EXPECT_EQ(r.metrics.at("exact_match").mean, matches / 2.0) << r.selector << " k=" << r.k;
  }
  // Forward mode, answers longer than the prompt, and k beyond an example are errors.
  TinyLmStudyOptions forward = tiny;
  forward.mode = TinyLmStudyMode::forward;
  EXPECT_THROW(run_tiny_lm_task_study(model, examples, selectors, options, forward, "t"), Error);
  std::vector<TinyLmTaskExample> bad = examples;
  bad[1].answer_length = 44;
  EXPECT_THROW(run_tiny_lm_task_study(model, bad, selectors, options, tiny, "t"), Error);
  options.k_values = {45};
  EXPECT_THROW(run_tiny_lm_task_study(model, examples, selectors, options, tiny, "t"), Error);
}

TEST(TinyLmLongStudy, StudyFileWithATaskWritesAccuracyPerContext) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "keysel_test_tiny_lm_long_study";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir / "model");
  const SafetensorsFile file = random_model_file(small_config(), 14);
  write_safetensors(dir / "model" / "model.safetensors", file.tensors, file.metadata);
  const TinyLm model = TinyLm::from_safetensors(file);
  TaskFixture f = make_task(model);
  // A third example of another context: the first 30 bytes of the text and 3 answer bytes.
  const std::vector<std::uint8_t> extra = text_bytes(50, 30);
  f.examples.push_back({static_cast<std::int64_t>(f.data.size()), 30, 3, 2, 0.0, 30});
  f.data.insert(f.data.end(), extra.begin(), extra.end());
  nlohmann::json doc = {{"format", "keysel-retrieval/1"}, {"data", "retrieval.bin"}, {"examples", nlohmann::json::array()}};
  for (const RetrievalExample& x : f.examples) {
    doc["examples"].push_back({{"offset", x.offset}, {"length", x.length}, {"answer_length", x.answer_length},
                               {"keys", x.keys}, {"depth", x.depth}, {"context", x.context}});
  }
  std::ofstream(dir / "model" / "retrieval.json") << doc.dump();
  std::ofstream(dir / "model" / "retrieval.bin", std::ios::binary)
      .write(reinterpret_cast<const char*>(f.data.data()), static_cast<std::streamsize>(f.data.size()));

  const std::string model_dir = json_string((dir / "model").string());
  const StudyConfig config = parse_study_config(R"({"workloads": [{"type": "tiny-lm", "model": )" + model_dir +
      R"(, "mode": "decode", "query_sample": 4, "bpb_from": "sparse",
        "task": {"contexts": [30, 44], "examples_per_context": 2}}],
      "selectors": [{"type": "exact"}, {"type": "fidelity", "precision": 0.5, "drop": ["random", "lowest"]}],
      "k": [2, 8], "granularity": "per_token"})");
  ASSERT_EQ(config.workloads.size(), 1u);
  EXPECT_TRUE(config.workloads[0].tiny_lm.task);
  EXPECT_EQ(config.selectors.size(), 3u);
  std::vector<std::size_t> progress;
  const StudySuiteResult result =
      run_study_config(config, [&](std::size_t done, std::size_t total, const std::string&) {
        EXPECT_EQ(total, 2u * 3u * 2u);
        progress.push_back(done);
      });
  EXPECT_TRUE(std::is_sorted(progress.begin(), progress.end()));
  EXPECT_EQ(progress.back(), 12u);
  ASSERT_EQ(result.studies.size(), 2u);
  EXPECT_EQ(result.studies[0].workload, "tiny-lm(retrieval) context 30");
  EXPECT_EQ(result.studies[1].workload, "tiny-lm(retrieval) context 44");
  EXPECT_EQ(result.studies[0].full_exact_match.count, 1);
  EXPECT_EQ(result.studies[1].full_exact_match.count, 2);
  EXPECT_EQ(result.positions[1].size(), 2u * (4u + 4u));
  for (const StudyResult& study : result.studies) {
    for (const StudyRow& row : study.rows) {
      EXPECT_TRUE(row.metrics.contains("exact_match"));
      EXPECT_TRUE(row.metrics.contains("bpb_sparse"));
    }
  }
  // The two drop protocols at the same precision keep the same recall, not the same keys: dropping the
  // lowest-ranked keys of the top-k keeps more of its mass.
  const StudyRow& random_drop = result.studies[1].rows[3];
  const StudyRow& lowest_drop = result.studies[1].rows[5];
  EXPECT_NE(random_drop.selector, lowest_drop.selector);
  EXPECT_NEAR(random_drop.metrics.at("recall").mean, lowest_drop.metrics.at("recall").mean, 1e-12);
  EXPECT_GT(lowest_drop.metrics.at("mass").mean, random_drop.metrics.at("mass").mean);

  write_study_outputs(result, (dir / "out").string());
  const std::string csv = read_text(dir / "out" / "results.csv");
  EXPECT_NE(csv.find("tiny-lm(retrieval) context 44,exact,8,exact_match,2,"), std::string::npos);
  const std::string html = read_text(dir / "out" / "report.html");
  EXPECT_EQ(test::xml_problem(html), "");
  // Charts against k are ticked at the k studied (2 and 8) and nowhere else; every title fits its chart (titles
  // are 14 px bold, at most 0.6 em a character, from x = 12).
  for (const char* title : {"bits per byte vs k", "exact match vs k", "recall vs k"}) {
    const std::size_t at = html.find(std::string("<title>") + title + "</title>");
    ASSERT_NE(at, std::string::npos) << title;
    const std::string svg = html.substr(at, html.find("</svg>", at) - at);
    std::vector<std::string> ticks;
    const std::string mark = "text-anchor=\"middle\" class=\"a\">";
    for (std::size_t t = svg.find(mark); t != std::string::npos; t = svg.find(mark, t + 1)) {
      const std::size_t from = t + mark.size();
      const std::string label = svg.substr(from, svg.find('<', from) - from);
      if (label.find(' ') == std::string::npos) ticks.push_back(label);  // the axis caption has spaces
    }
    EXPECT_EQ(ticks, (std::vector<std::string>{"2", "8"})) << title;
  }
  for (std::size_t at = html.find("<svg"); at != std::string::npos; at = html.find("<svg", at + 1)) {
    const std::size_t w = html.find("width=\"", at) + 7;
    const double width = std::stod(html.substr(w, html.find('"', w) - w));
    const std::size_t t = html.find("class=\"t\">", at);
    ASSERT_NE(t, std::string::npos);
    const std::size_t from = t + 11;
    const std::string title = html.substr(from, html.find('<', from) - from);
    EXPECT_LE(12.0 + 0.6 * 14.0 * static_cast<double>(title.size()), width) << title;
  }
  const nlohmann::json out = nlohmann::json::parse(read_text(dir / "out" / "results.json"));
  EXPECT_EQ(out["studies"][1]["full_attention"]["exact_match"]["count"], 2);

  // Keys the task needs, and keys that clash with it, are errors naming them.
  const auto parse_error = [&](const std::string& workload, const std::string& part) {
    try {
      parse_study_config(R"({"workloads": [)" + workload + R"(], "selectors": [{"type": "exact"}]})");
      ADD_FAILURE() << "expected an error for " << workload;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  parse_error(R"({"type": "tiny-lm", "task": {"contexts": [30]}})", "\"mode\": \"decode\"");
  parse_error(R"({"type": "tiny-lm", "mode": "decode", "task": {"contexts": [30], "pick": "last"}})", "'pick'");
  parse_error(R"({"type": "tiny-lm", "mode": "decode", "task": {}})", "contexts");
  parse_error(R"({"type": "tiny-lm", "mode": "decode", "task": {"contexts": []}})", "contexts");
  parse_error(R"({"type": "tiny-lm", "mode": "decode", "task": {"contexts": [30], "depth": 1}})", "'depth'");
  parse_error(R"({"type": "tiny-lm", "mode": "decode", "tokens": 30, "task": {"contexts": [30]}})", "'tokens'");
  parse_error(R"({"type": "tiny-lm", "mode": "fast"})", "'mode'");
  parse_error(R"({"type": "tiny-lm", "bpb_from": 2})", "'bpb_from'");
  parse_error(R"({"type": "tiny-lm", "query_sample": -2})", "'query_sample'");
  // A context the set does not hold.
  EXPECT_THROW(run_study_config(parse_study_config(R"({"workloads": [{"type": "tiny-lm", "model": )" + model_dir +
                                                   R"(, "mode": "decode", "task": {"contexts": [50]}}],
                                                   "selectors": [{"type": "exact"}], "k": 2})")),
               Error);
  std::filesystem::remove_all(dir);
}

TEST(TinyLmLongStudy, PickSpreadTakesExamplesEvenlyOverTheSet) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "keysel_test_tiny_lm_long_pick";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const SafetensorsFile file = random_model_file(small_config(), 14);
  write_safetensors(dir / "model.safetensors", file.tensors, file.metadata);
  const TinyLm model = TinyLm::from_safetensors(file);
  TaskFixture f = make_task(model);
  // Four examples of context 44: answered by full attention, not, answered, not (copies of the first two).
  for (int copy = 0; copy < 2; ++copy) {
    RetrievalExample x = f.examples[static_cast<std::size_t>(copy)];
    const std::vector<std::uint8_t> bytes(f.data.begin() + x.offset, f.data.begin() + x.offset + x.length);
    x.offset = static_cast<std::int64_t>(f.data.size());
    f.examples.push_back(x);
    f.data.insert(f.data.end(), bytes.begin(), bytes.end());
  }
  nlohmann::json doc = {{"format", "keysel-retrieval/1"}, {"data", "retrieval.bin"}, {"examples", nlohmann::json::array()}};
  for (const RetrievalExample& x : f.examples) {
    doc["examples"].push_back({{"offset", x.offset}, {"length", x.length}, {"answer_length", x.answer_length},
                               {"keys", x.keys}, {"depth", x.depth}, {"context", x.context}});
  }
  std::ofstream(dir / "retrieval.json") << doc.dump();
  std::ofstream(dir / "retrieval.bin", std::ios::binary)
      .write(reinterpret_cast<const char*>(f.data.data()), static_cast<std::streamsize>(f.data.size()));
  const auto full_exact_match = [&](const std::string& pick) {
    const StudyConfig config = parse_study_config(R"({"workloads": [{"type": "tiny-lm", "model": )" +
        json_string(dir.string()) + R"(, "mode": "decode", "query_sample": 2,
        "task": {"contexts": [44], "examples_per_context": 2)" + pick + R"(}}],
        "selectors": [{"type": "exact"}], "k": 2, "granularity": "per_token"})");
    const StudySuiteResult result = run_study_config(config);
    EXPECT_EQ(result.studies.at(0).full_exact_match.count, 2);
    return result.studies.at(0).full_exact_match.mean;
  };
  EXPECT_EQ(full_exact_match(""), 0.5);                      // the first two: answered, not
  EXPECT_EQ(full_exact_match(R"(, "pick": "first")"), 0.5);
  EXPECT_EQ(full_exact_match(R"(, "pick": "spread")"), 0.0);  // indices 1 and 3 (the middles of 0-1 and 2-3): not
  std::filesystem::remove_all(dir);
}

TEST(TinyLmLongStudy, LongContextExampleStudyParses) {
  const std::filesystem::path example =
      std::filesystem::path(__FILE__).parent_path() / "../../examples/studies/tiny_lm_32k.json";
  const StudyConfig config = parse_study_config(read_text(example));
  ASSERT_EQ(config.workloads.size(), 1u);
  const TinyLmWorkloadOptions& tiny = config.workloads[0].tiny_lm;
  EXPECT_TRUE(tiny.task);
  EXPECT_EQ(tiny.study.mode, TinyLmStudyMode::decode);
  EXPECT_EQ(tiny.contexts, (std::vector<std::int64_t>{8192, 16384, 32768}));
  EXPECT_EQ(tiny.examples_per_context, 2);
  EXPECT_TRUE(tiny.spread_examples);
  EXPECT_EQ(tiny.study.query_sample, 32);
  // Its per-head companion: the same model and contexts, entropy and indexer recall per layer and head.
  const StudyConfig heads = parse_study_config(read_text(example.parent_path() / "tiny_lm_32k_heads.json"));
  EXPECT_EQ(heads.options.granularity, Granularity::per_head);
  EXPECT_EQ(heads.workloads.at(0).tiny_lm.contexts, tiny.contexts);
  EXPECT_EQ(heads.options.k_values, config.options.k_values);
  EXPECT_EQ(config.options.k_values, (std::vector<std::int64_t>{64, 256, 1024, 2048}));
  EXPECT_EQ(config.options.granularity, Granularity::per_token);
  EXPECT_EQ(config.selectors.size(), 13u);
  std::size_t lowest = 0;
  for (const StudySelectorSpec& spec : config.selectors) lowest += spec.name.find("drop=lowest") != std::string::npos;
  EXPECT_EQ(lowest, 2u);
}

TEST(TinyLmLongStudy, FidelitySpecTakesTheDropProtocol) {
  EXPECT_EQ(make_selector_from_spec(R"({"type": "fidelity", "precision": 0.5, "drop": "lowest"})")->name(),
            "fidelity-p50-random-droplowest");
  EXPECT_EQ(make_selector_from_spec(R"({"type": "fidelity", "precision": 0.5})")->name(), "fidelity-p50-random");
  EXPECT_THROW(make_selector_from_spec(R"({"type": "fidelity", "drop": "highest"})"), Error);
  EXPECT_THROW(make_selector_from_spec(R"({"type": "fidelity", "drop": 1})"), Error);
}

}  // namespace
}  // namespace keysel
