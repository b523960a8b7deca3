// tiny-lm studies over a small random model written here: the exact selector over every key gives full
// attention's bits per byte and recall 1, fidelity at precision 1 selects exactly what exact does, the
// "indexer" spec scores with each layer's trained indexer tensors (and a dump's), and a study file with a
// tiny-lm workload writes bits per byte into every output and a well-formed report with the recall-vs-accuracy
// charts.
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
#include "keysel/recall/selector_spec.h"
#include "keysel/recall/study.h"
#include "keysel/recall/study_config.h"
#include "keysel/recall/tiny_lm.h"
#include "recall/tiny_lm_fixture.h"
#include "recall/xml_check.h"

namespace keysel {
namespace {

using namespace tiny_lm_fixture;  // NOLINT(google-build-using-namespace): the shared fixture

TEST(TinyLmStudy, ExactOverEveryKeyGivesFullAttentionBitsPerByte) {
  const TinyLm model = TinyLm::from_safetensors(random_model_file(small_config(), 1));
  const std::vector<std::uint8_t> tokens = text_bytes(0, 48);
  StudyOptions options;
  options.k_values = {4, 48};
  options.keep_row_metrics = true;
  const StudyResult result = run_tiny_lm_study(model, tokens, factories({R"({"type": "exact"})"}), options, "small");

  EXPECT_EQ(result.workload, "small");
  EXPECT_EQ(result.layers, (std::vector<std::int64_t>{0, 1}));
  EXPECT_EQ(result.shape.tokens, 48);
  EXPECT_EQ(result.shape.keys, 48);
  EXPECT_EQ(result.shape.query_heads, 4);
  const double full = bits_per_byte(model.logits(tokens), tokens, 256);
  EXPECT_NEAR(result.full_bpb.mean, full, 1e-12);
  EXPECT_EQ(result.full_bpb.count, 47);
  ASSERT_EQ(result.rows.size(), 2u);
  for (const StudyRow& row : result.rows) {
    SCOPED_TRACE("k=" + std::to_string(row.k));
    EXPECT_EQ(row.selector, "exact");
    // Every layer's selection is that layer's exact top-k: recall 1 in every row of every layer.
    EXPECT_EQ(row.metrics.at("recall").mean, 1.0);
    EXPECT_EQ(row.metrics.at("recall").min, 1.0);
    EXPECT_EQ(row.row_metrics.size(), 2u * 48u * 2u);  // layers x tokens x key-head groups
    EXPECT_EQ(row.cost.rows, 2 * 48 * 2);
    EXPECT_EQ(row.metrics.at("bpb").count, 47);
    EXPECT_NEAR(mean_of(row, "bpb") - mean_of(row, "bpb_increase"), full, 1e-9);
  }
  // k = T: every allowed key, so the sparse forward is full attention (up to the order of fp32 sums).
  for (const std::size_t i : {1u}) {
    const StudyRow& row = result.rows[i];
    EXPECT_NEAR(mean_of(row, "bpb"), full, 1e-5) << row.k;
    EXPECT_NEAR(mean_of(row, "bpb_increase"), 0.0, 1e-5) << row.k;
    EXPECT_NEAR(mean_of(row, "mass"), 1.0, 1e-9) << row.k;
  }
  // k = 4 of up to 48 keys changes what the model predicts.
  EXPECT_GT(std::abs(mean_of(result.rows[0], "bpb_increase")), 1e-3);
  EXPECT_LT(mean_of(result.rows[0], "mass"), 0.99);

  // bits_per_token is the per-byte form of bits_per_byte.
  const std::vector<double> bits = bits_per_token(model.logits(tokens), tokens, 256);
  ASSERT_EQ(bits.size(), 47u);
  double sum = 0;
  for (const double b : bits) sum += b;
  EXPECT_NEAR(sum / 47.0, full, 1e-12);

  EXPECT_THROW(run_tiny_lm_study(model, text_bytes(0, 1), factories({R"({"type": "exact"})"}), options, "x"), Error);
  EXPECT_THROW(run_tiny_lm_study(model, text_bytes(0, 97), factories({R"({"type": "exact"})"}), options, "x"), Error);
  EXPECT_THROW(run_tiny_lm_study(model, tokens, {}, options, "x"), Error);
  // k above the keys the attention caches (T) is refused before anything runs, naming k and N.
  StudyOptions too_wide = options;
  too_wide.k_values = {4, 64};
  try {
    run_tiny_lm_study(model, tokens, factories({R"({"type": "exact"})"}), too_wide, "small");
    ADD_FAILURE() << "k = 64 > T = 48 was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("argument 'k'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("N = 48"), std::string::npos) << e.what();
  }
}

TEST(TinyLmStudy, FidelityAtPrecisionOneSelectsExactlyAsExact) {
  const TinyLm model = TinyLm::from_safetensors(random_model_file(small_config(), 2));
  const std::vector<std::uint8_t> tokens = text_bytes(5, 40);
  constexpr std::int64_t k = 6;
  // On the same layer inputs, the two selections are the same.
  int layers_checked = 0;
  TinyLmSparse sparse;
  sparse.granularity = Granularity::per_kv_head;
  sparse.width = k;
  sparse.select = [&](const TinyLmLayer& layer, const TensorView& selection) {
    SelectionPolicy policy;
    policy.k = k;
    policy.granularity = Granularity::per_kv_head;
    const std::int64_t t = layer.attention.q.size(0);
    std::vector<std::int32_t> exact(static_cast<std::size_t>(t * 2 * k)), fidelity(exact.size());
    make_selector_from_spec(R"({"type": "exact"})")
        ->select(layer.attention, policy, TensorView(exact.data(), DType::int32, {t, 2, k}));
    make_selector_from_spec(R"({"type": "fidelity", "precision": 1.0, "seed": 3})")
        ->select(layer.attention, policy, TensorView(fidelity.data(), DType::int32, {t, 2, k}));
    EXPECT_EQ(exact, fidelity) << "layer " << layer.layer;
    std::copy(exact.begin(), exact.end(), selection.mutable_data<std::int32_t>());
    ++layers_checked;
  };
  (void)model.logits(tokens, sparse);
  EXPECT_EQ(layers_checked, 2);

  // In a study: the same bits per byte and the same metrics in every row; precision 0.5 loses recall.
  StudyOptions options;
  options.k_values = {k, 16};
  options.keep_row_metrics = true;
  const StudyResult result = run_tiny_lm_study(
      model, tokens,
      factories({R"({"type": "exact"})", R"({"type": "fidelity", "precision": 1.0, "seed": 3})",
                 R"({"type": "fidelity", "precision": 0.5, "seed": 3})"}),
      options, "small");
  ASSERT_EQ(result.rows.size(), 6u);
  for (std::size_t i = 0; i < 2; ++i) {
    const StudyRow& exact = result.rows[i];
    const StudyRow& fidelity = result.rows[2 + i];
    EXPECT_EQ(fidelity.selector, make_selector_from_spec(R"({"type": "fidelity", "precision": 1.0})")->name());
    EXPECT_EQ(mean_of(exact, "bpb"), mean_of(fidelity, "bpb")) << exact.k;
    ASSERT_EQ(exact.row_metrics.size(), fidelity.row_metrics.size());
    for (std::size_t r = 0; r < exact.row_metrics.size(); ++r) {
      ASSERT_EQ(exact.row_metrics[r].recall, fidelity.row_metrics[r].recall) << r;
      ASSERT_EQ(exact.row_metrics[r].mass, fidelity.row_metrics[r].mass) << r;
    }
  }
  EXPECT_LT(mean_of(result.rows[5], "recall"), 0.95);
  EXPECT_NE(mean_of(result.rows[5], "bpb"), mean_of(result.rows[1], "bpb"));
}

TEST(TinyLmStudy, IndexerSpecScoresWithTheLayersTrainedIndexer) {
  const TinyLm model = TinyLm::from_safetensors(random_model_file(small_config(), 3));
  const std::vector<std::uint8_t> tokens = text_bytes(0, 64);
  constexpr std::int64_t k = 8;
  int layers_checked = 0;
  std::int64_t rows_unlike_stand_in = 0;
  TinyLmSparse sparse;
  sparse.granularity = Granularity::per_kv_head;
  sparse.width = k;
  sparse.select = [&](const TinyLmLayer& layer, const TensorView& selection) {
    ASSERT_FALSE(layer.index_q.empty());
    const IndexerTensors tensors{layer.index_q, layer.index_k, layer.index_w};
    SelectionPolicy policy;
    policy.k = k;
    policy.granularity = Granularity::per_kv_head;
    const std::int64_t t_count = layer.attention.q.size(0);
    const std::int64_t n = layer.attention.k.size(0);
    const auto run = [&](Selector& selector) {
      std::vector<std::int32_t> out(static_cast<std::size_t>(t_count * 2 * k), -1);
      selector.select(layer.attention, policy, TensorView(out.data(), DType::int32, {t_count, 2, k}));
      return out;
    };
    const std::unique_ptr<Selector> indexer = make_selector_from_spec(R"({"type": "indexer"})", &tensors);
    EXPECT_EQ(indexer->name(), "indexer(fp32)");
    const std::vector<std::int32_t> chosen = run(*indexer);

    // The top-k of the plain double-precision indexer scores of this layer, one selection for both groups.
    std::vector<double> scores(static_cast<std::size_t>(t_count * n));
    lightning_indexer_reference(layer.index_q, layer.index_w, layer.attention.positions, layer.index_k,
                                TensorView(scores.data(), DType::fp64, {t_count, n}));
    for (std::int64_t t = 0; t < t_count; ++t) {
      const std::int64_t allowed = t + 1;
      std::vector<double> row(scores.begin() + t * n, scores.begin() + t * n + allowed);
      std::sort(row.begin(), row.end(), std::greater<>());
      const double kth = row[static_cast<std::size_t>(std::min(k, allowed) - 1)];
      for (std::int64_t g = 0; g < 2; ++g) {
        std::int64_t selected = 0;
        for (std::int64_t i = 0; i < k; ++i) {
          const std::int32_t s = chosen[static_cast<std::size_t>((t * 2 + g) * k + i)];
          EXPECT_EQ(s, chosen[static_cast<std::size_t>(t * 2 * k + i)]) << "one selection for every group";
          if (s < 0) continue;
          ++selected;
          EXPECT_GE(scores[static_cast<std::size_t>(t * n + s)], kth - 1e-5 * (1.0 + std::abs(kth)))
              << "layer " << layer.layer << " token " << t << " key " << s;
        }
        EXPECT_EQ(selected, std::min(k, allowed));
      }
    }
    // Without the tensors the spec builds the stand-in, which scores something else.
    const std::unique_ptr<Selector> stand_in = make_selector_from_spec(R"({"type": "indexer"})", nullptr);
    const std::vector<std::int32_t> proxy = run(*stand_in);
    for (std::int64_t r = 0; r < t_count * 2; ++r) {
      rows_unlike_stand_in += !std::equal(chosen.begin() + r * k, chosen.begin() + (r + 1) * k, proxy.begin() + r * k);
    }
    // The spec's quantisation reaches the indexer: the same selection as a LightningIndexer built by hand.
    QuantizationConfig quantization;
    quantization.format = DType::int4;
    quantization.granularity = ScaleGranularity::per_group;
    quantization.group_size = 32;
    quantization.hadamard = true;
    auto by_hand = std::make_shared<LightningIndexer>(2, 32, quantization);
    by_hand->append_keys(layer.index_k);
    const std::unique_ptr<Selector> manual = make_indexer_selector(
        by_hand, std::vector<float>(layer.index_q.data<float>(), layer.index_q.data<float>() + layer.index_q.numel()),
        std::vector<float>(layer.index_w.data<float>(), layer.index_w.data<float>() + layer.index_w.numel()));
    const std::unique_ptr<Selector> from_spec = make_selector_from_spec(R"({"type": "indexer", "format": "int4",
        "scale_granularity": "per_group", "group_size": 32, "hadamard": true})", &tensors);
    EXPECT_EQ(from_spec->name(), "indexer(int4/g32/hadamard)");
    EXPECT_EQ(run(*from_spec), run(*manual));
    // Knobs of the stand-in only, and tensors that disagree, are errors.
    EXPECT_THROW(make_selector_from_spec(R"({"type": "indexer", "aggregation": "max"})", &tensors), Error);
    EXPECT_THROW(make_selector_from_spec(R"({"type": "indexer", "rank": 4})", &tensors), Error);
    const IndexerTensors wrong{layer.index_q, layer.index_k, layer.index_q};
    EXPECT_THROW(make_selector_from_spec(R"({"type": "indexer"})", &wrong), Error);
    // Other types ignore the tensors; a hybrid's candidates use them.
    EXPECT_EQ(run(*make_selector_from_spec(R"({"type": "exact"})", &tensors)),
              run(*make_selector_from_spec(R"({"type": "exact"})")));
    EXPECT_NE(make_selector_from_spec(R"({"type": "hybrid", "candidate_k": 16, "candidates": {"type": "indexer"}})",
                                      &tensors),
              nullptr);

    std::copy(chosen.begin(), chosen.end(), selection.mutable_data<std::int32_t>());
    ++layers_checked;
  };
  (void)model.logits(tokens, sparse);
  EXPECT_EQ(layers_checked, 2);
  EXPECT_GT(rows_unlike_stand_in, 0);

  // A study's indexer row runs the same selector in every layer: its bits per byte are those of the forward
  // pass above.
  StudyOptions options;
  options.k_values = {k};
  const StudyResult result = run_tiny_lm_study(model, tokens, factories({R"({"type": "indexer"})"}), options, "x");
  sparse.select = [&](const TinyLmLayer& layer, const TensorView& selection) {
    const IndexerTensors tensors{layer.index_q, layer.index_k, layer.index_w};
    SelectionPolicy policy;
    policy.k = k;
    make_selector_from_spec(R"({"type": "indexer"})", &tensors)->select(layer.attention, policy, selection);
  };
  EXPECT_NEAR(mean_of(result.rows[0], "bpb"), bits_per_byte(model.logits(tokens, sparse), tokens, 256), 1e-12);
}

TEST(TinyLmStudy, CandidateSpecRerankedByTheLayersIndexer) {
  const TinyLm model = TinyLm::from_safetensors(random_model_file(small_config(), 5));
  const std::vector<std::uint8_t> tokens = text_bytes(0, 48);
  constexpr std::int64_t k = 6;
  int layers_checked = 0;
  TinyLmSparse sparse;
  sparse.granularity = Granularity::per_kv_head;
  sparse.width = k;
  sparse.select = [&](const TinyLmLayer& layer, const TensorView& selection) {
    const IndexerTensors tensors{layer.index_q, layer.index_k, layer.index_w};
    SelectionPolicy policy;
    policy.k = k;
    policy.n_sink = 1;
    const std::int64_t t_count = layer.attention.q.size(0);
    const auto run = [&](Selector& selector) {
      std::vector<std::int32_t> out(static_cast<std::size_t>(t_count * 2 * k), -1);
      selector.select(layer.attention, policy, TensorView(out.data(), DType::int32, {t_count, 2, k}));
      return out;
    };
    // The spec's "rerank": "indexer" gives what a CandidateSelector re-ranked by the indexer gives when built by
    // hand, and differs from the exact re-rank (k' = 12 candidates per search, so the re-rank matters).
    const char* spec = R"({"type": "faiss", "factory": "brute_force", "candidates": 12, "rerank": "indexer"})";
    const std::unique_ptr<Selector> from_spec = make_selector_from_spec(spec, &tensors);
    EXPECT_NE(from_spec->name().find("rerank=indexer"), std::string::npos) << from_spec->name();
    CandidateSelectorOptions options;
    options.candidates = 12;
    options.rerank = make_indexer_candidate_score(layer.index_q, layer.index_w, layer.index_k);
    const std::unique_ptr<Selector> by_hand = make_candidate_selector("brute_force", options);
    const std::vector<std::int32_t> chosen = run(*from_spec);
    EXPECT_EQ(chosen, run(*by_hand));
    const std::vector<std::int32_t> exact_rerank =
        run(*make_selector_from_spec(R"({"type": "faiss", "factory": "brute_force", "candidates": 12})", &tensors));
    EXPECT_NE(chosen, exact_rerank);
    // Without indexer tensors, or with an unknown re-rank, the spec is an error naming the key.
    try {
      (void)make_selector_from_spec(spec, nullptr);
      ADD_FAILURE() << "rerank by the indexer without indexer tensors";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("rerank"), std::string::npos) << e.what();
    }
    EXPECT_THROW(make_selector_from_spec(R"({"type": "faiss", "factory": "brute_force", "rerank": "bm25"})", &tensors),
                 Error);
    EXPECT_EQ(normalize_selector_spec(R"({"type": "faiss", "factory": "brute_force", "balance_channels": true})"),
              R"({"balance_channels":true,"factory":"brute_force","type":"faiss"})");
    std::copy(chosen.begin(), chosen.end(), selection.mutable_data<std::int32_t>());
    ++layers_checked;
  };
  (void)model.logits(tokens, sparse);
  EXPECT_EQ(layers_checked, 2);
  // A study file names such a spec without building it (it needs a layer's tensors to be built).
  const StudyConfig config = parse_study_config(R"({"workloads": [{"type": "tiny-lm", "tokens": 8}],
      "selectors": [{"type": "faiss", "factory": "brute_force", "rerank": "indexer"}], "k": [4]})");
  ASSERT_EQ(config.selectors.size(), 1u);
  EXPECT_NE(config.selectors[0].name.find("rerank=indexer"), std::string::npos) << config.selectors[0].name;
}

TEST(TinyLmStudy, DumpIndexerTensorsReachTheIndexerSpec) {
  // One dump layer with random q, k, v and unrelated random indexer tensors: the indexer spec scores with them
  // (recall near chance), while the proxy over the same q.K is near exact.
  constexpr std::int64_t t_count = 8, n = 256, hq = 4, hkv = 2, d = 32, hi = 2, di = 32;
  std::mt19937_64 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const auto random = [&](std::string name, std::vector<std::int64_t> shape, float scale) {
    std::int64_t count = 1;
    for (const std::int64_t e : shape) count *= e;
    std::vector<float> values(static_cast<std::size_t>(count));
    for (float& v : values) v = scale * normal(rng);
    return LoadedTensor::from_float(std::move(name), values, std::move(shape));
  };
  Dump dump;
  dump.model = "random";
  DumpLayer layer;
  layer.index = 3;
  layer.q = random("q", {t_count, hq, d}, 1.0f);
  layer.k = random("k", {n, hkv, d}, 1.0f);
  layer.v = random("v", {n, hkv, d}, 1.0f);
  std::vector<std::int32_t> positions(t_count);
  for (std::int64_t t = 0; t < t_count; ++t) {
    positions[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(n - t_count + t);
  }
  layer.positions = LoadedTensor::from_int32("positions", positions, {t_count});
  layer.index_q = random("index_q", {t_count, hi, di}, 1.0f);
  layer.index_k = random("index_k", {n, di}, 1.0f);
  layer.index_w = random("index_w", {t_count, hi}, 1.0f);
  dump.layers.push_back(layer);
  const std::filesystem::path path = std::filesystem::temp_directory_path() / "keysel_test_indexer_dump.safetensors";
  write_dump(path, dump);

  StudyWorkloadSpec spec;
  spec.type = "dump";
  spec.path = path.string();
  spec.layer = 3;
  const Workload workload = make_study_workload(spec);
  EXPECT_EQ(workload.index_heads, hi);
  EXPECT_EQ(workload.index_dim, di);
  EXPECT_EQ(workload.index_k, layer.index_k->to_float());

  const StudySuiteResult result = run_study_config(parse_study_config(
      R"({"workloads": [{"type": "dump", "path": )" + json_string(path.string()) + R"(}],
          "selectors": [{"type": "indexer"}, {"type": "proxy"}], "k": 16})"));
  ASSERT_EQ(result.studies.size(), 1u);
  ASSERT_EQ(result.studies[0].rows.size(), 2u);
  const double indexer_recall = mean_of(result.studies[0].rows[0], "recall");
  EXPECT_LT(indexer_recall, 0.6);
  EXPECT_GT(mean_of(result.studies[0].rows[1], "recall"), 0.95);
  // The same as the spec built by hand over the workload's tensors.
  const IndexerTensors tensors{TensorView(workload.index_q.data(), DType::fp32, {t_count, hi, di}),
                               TensorView(workload.index_k.data(), DType::fp32, {n, di}),
                               TensorView(workload.index_w.data(), DType::fp32, {t_count, hi})};
  std::vector<std::unique_ptr<Selector>> selectors;
  selectors.push_back(make_selector_from_spec(R"({"type": "indexer"})", &tensors));
  StudyOptions options;
  options.k_values = {16};
  EXPECT_EQ(mean_of(run_study(workload, selectors, options).rows[0], "recall"), indexer_recall);
  std::filesystem::remove(path);
}

TEST(TinyLmStudy, StudyFileWritesBitsPerByteAndRecallVsAccuracyCharts) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "keysel_test_tiny_lm_study";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir / "model");
  const SafetensorsFile file = random_model_file(small_config(), 4);
  write_safetensors(dir / "model" / "model.safetensors", file.tensors, file.metadata);
  std::ofstream(dir / "code.txt") << kText;

  const std::string workload = R"({"type": "tiny-lm", "model": )" + json_string((dir / "model").string()) +
                               R"(, "text": )" + json_string((dir / "code.txt").string()) +
                               R"(, "tokens": 40, "offset": 3})";
  const StudyConfig config = parse_study_config(R"({"workloads": [)" + workload + R"(],
    "selectors": [{"type": "exact"}, {"name": "fid", "type": "fidelity", "precision": 0.5},
                  {"type": "indexer", "format": "fp8_e4m3"}, {"type": "streaming", "n_sink": 2}],
    "k": [4, 16]})");
  ASSERT_EQ(config.workloads.size(), 1u);
  EXPECT_EQ(config.workloads[0].name, "tiny-lm(code.txt[3:43])");
  const StudySuiteResult result = run_study_config(config);
  ASSERT_EQ(result.studies.size(), 1u);
  const StudyResult& study = result.studies[0];
  EXPECT_EQ(study.layers.size(), 2u);
  EXPECT_EQ(study.rows.size(), 8u);
  const TinyLm model = TinyLm::from_safetensors(file);
  const std::vector<std::uint8_t> tokens = text_bytes(3, 40);
  EXPECT_NEAR(study.full_bpb.mean, bits_per_byte(model.logits(tokens), tokens, 256), 1e-12);
  EXPECT_EQ(study.rows[0].metrics.at("recall").min, 1.0);
  EXPECT_EQ(result.positions[0].size(), 40u);

  write_study_outputs(result, (dir / "out").string());
  // results.csv: bpb and bpb_increase for every selector and k, after the SPEC §4 metrics.
  std::map<std::string, int> metric_lines;
  std::istringstream csv(read_text(dir / "out" / "results.csv"));
  std::string line;
  std::getline(csv, line);
  while (std::getline(csv, line)) {
    const std::size_t k_end = line.find(',', line.find(',', line.find(',') + 1) + 1);
    ++metric_lines[line.substr(k_end + 1, line.find(',', k_end + 1) - k_end - 1)];
  }
  EXPECT_EQ(metric_lines["bpb"], 8);
  EXPECT_EQ(metric_lines["bpb_increase"], 8);
  EXPECT_EQ(metric_lines["recall"], 8);
  // by_row.csv: every layer's rows, labelled by layer as a dump's layers are.
  std::istringstream rows(read_text(dir / "out" / "by_row.csv"));
  std::map<std::string, int> rows_per_workload;
  std::getline(rows, line);
  while (std::getline(rows, line)) ++rows_per_workload[line.substr(0, line.find(','))];
  ASSERT_EQ(rows_per_workload.size(), 2u);
  EXPECT_EQ(rows_per_workload["tiny-lm(code.txt[3:43]) layer 0"], 8 * 40 * 2);
  EXPECT_EQ(rows_per_workload["tiny-lm(code.txt[3:43]) layer 1"], 8 * 40 * 2);
  // results.json: the layers and full attention's bits per byte.
  const nlohmann::json doc = nlohmann::json::parse(read_text(dir / "out" / "results.json"));
  EXPECT_EQ(doc["studies"][0]["layers"], nlohmann::json::array({0, 1}));
  EXPECT_NEAR(doc["studies"][0]["full_attention"]["bpb"]["mean"].get<double>(), study.full_bpb.mean, 1e-12);
  EXPECT_TRUE(doc["studies"][0]["rows"][3]["metrics"].contains("bpb_increase"));

  // report.html: well-formed, with bits per byte against recall and against mass, and the layer heatmaps.
  const std::string html = read_text(dir / "out" / "report.html");
  EXPECT_EQ(test::xml_problem(html), "");
  for (const char* part : {"Accuracy against fidelity", "bits per byte vs recall", "bits per byte vs mass",
                           "bpb increase vs recall", "bpb increase vs mass",
                           "full attention", "Recall by layer and group (head): tiny-lm(code.txt[3:43])",
                           "exact: recall by layer and head", "layer 1, group 1: ", "<th>bits per byte</th>"}) {
    EXPECT_NE(html.find(part), std::string::npos) << part;
  }
  // One dot per selector and k in each accuracy chart, with the bits per byte in its tooltip.
  const std::size_t at = html.find("bits per byte vs recall</title>");
  const std::size_t end = html.find("</svg>", at);
  ASSERT_NE(at, std::string::npos);
  std::size_t dots = 0;
  for (std::size_t c = html.find("<circle", at); c < end; c = html.find("<circle", c + 1)) ++dots;
  EXPECT_EQ(dots, 8u);
  char expected[64];
  std::snprintf(expected, sizeof expected, ", %.4g)", mean_of(study.rows[2], "bpb"));
  EXPECT_NE(html.find(expected, at), std::string::npos) << expected;

  // A text shorter than the workload, and a workload longer than the model's context, fail naming them.
  const auto run_with = [&](const std::string& extra) {
    const std::string original = R"("tokens": 40, "offset": 3)";
    std::string w = workload;
    w.replace(w.find(original), original.size(), extra);
    return run_study_config(parse_study_config(R"({"workloads": [)" + w + R"(], "selectors": [{"type": "exact"}]})"));
  };
  try {
    run_with(R"("tokens": 90, "offset": 100)");
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("code.txt"), std::string::npos) << e.what();
  }
  EXPECT_THROW(run_with(R"("tokens": 120, "offset": 0)"), Error);
  for (const char* bad : {R"({"type": "tiny-lm", "tokens": 1})", R"({"type": "tiny-lm", "layer": 1})",
                          R"({"type": "tiny-lm", "model": ""})", R"({"type": "tiny-lm", "text": 3})"}) {
    EXPECT_THROW(parse_study_config(R"({"workloads": [)" + std::string(bad) + R"(], "selectors": [{"type": "exact"}]})"),
                 Error)
        << bad;
  }
  StudyWorkloadSpec tiny;
  tiny.type = "tiny-lm";
  EXPECT_THROW(make_study_workload(tiny), Error);
  std::filesystem::remove_all(dir);
}

/// A study file over a random model in `dir` and a text file of `text`: one tiny-lm workload (`extra` keys
/// added to it) and the given selectors, run.
StudySuiteResult run_small_study(const std::filesystem::path& dir, const std::string& text, const std::string& extra,
                                 const std::string& selectors, const std::string& options) {
  std::ofstream(dir / "text.txt", std::ios::binary) << text;
  const std::string workload = R"({"type": "tiny-lm", "model": )" + json_string((dir / "model").string()) +
                               R"(, "text": )" + json_string((dir / "text.txt").string()) + ", " + extra + "}";
  return run_study_config(
      parse_study_config(R"({"workloads": [)" + workload + R"(], "selectors": )" + selectors + ", " + options + "}"));
}

TEST(TinyLmStudy, CandidateSearchesTrainOnThePrefillOnly) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "keysel_test_tiny_lm_prefill";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir / "model");
  const SafetensorsFile file = random_model_file(small_config(), 7);
  write_safetensors(dir / "model" / "model.safetensors", file.tensors, file.metadata);
  constexpr int kTokens = 90, kPrefill = 40, kChanged = 64;
  const std::string text(kText, kTokens);
  const std::string selectors = R"([{"type": "exact"},
      {"type": "faiss", "factory": "QueryIVF8,Flat", "nprobe": 0, "candidates": 96},
      {"type": "faiss", "factory": "QueryIVF8,SQ4", "nprobe": 1, "rerank_stored": true, "shared_scan": true},
      {"type": "faiss", "factory": "IVF4,Flat", "nprobe": 1}])";
  const std::string options = R"("k": [6, 12], "granularity": "per_kv_head", "n_sink": 1, "n_local": 2)";
  const std::string prefill = R"("tokens": 90, "prefill": 40)";
  const StudySuiteResult result = run_small_study(dir, text, prefill, selectors, options);
  ASSERT_EQ(result.studies.size(), 1u);
  const StudyResult& study = result.studies[0];
  ASSERT_EQ(study.rows.size(), 8u);
  // Only the rows after the prefill are scored: bits per byte, full attention's bits and every metric.
  ASSERT_EQ(study.row_positions.size(), static_cast<std::size_t>(kTokens - 1 - kPrefill));
  EXPECT_EQ(study.row_positions.front(), kPrefill);
  EXPECT_EQ(study.row_positions.back(), kTokens - 2);
  EXPECT_EQ(study.full_bpb.count, kTokens - 1 - kPrefill);
  const TinyLm model = TinyLm::from_safetensors(file);
  const std::vector<std::uint8_t> tokens(text.begin(), text.end());
  const std::vector<double> full_bits = bits_per_token(model.logits(tokens), tokens, 256);
  double sum = 0;
  for (int r = kPrefill; r < kTokens - 1; ++r) sum += full_bits[static_cast<std::size_t>(r)];
  EXPECT_NEAR(study.full_bpb.mean, sum / (kTokens - 1 - kPrefill), 1e-12);
  for (std::size_t i = 0; i < 2; ++i) {
    // Query-aware lists probed safely to the end over every free key (k' = the context): the exact top-k in
    // every layer, so exactly the exact selector's bits per byte and recall (below 1 for both: the kept sink
    // and local keys take slots of k whatever their rank).
    const StudyRow& exact = study.rows[i];
    const StudyRow& safe = study.rows[2 + i];
    SCOPED_TRACE("k=" + std::to_string(exact.k));
    EXPECT_EQ(safe.k, exact.k);
    EXPECT_NE(safe.selector.find("QueryIVF8,Flat nprobe=safe"), std::string::npos) << safe.selector;
    EXPECT_EQ(mean_of(safe, "recall"), mean_of(exact, "recall"));
    EXPECT_EQ(safe.metrics.at("recall").min, exact.metrics.at("recall").min);
    EXPECT_EQ(mean_of(safe, "bpb"), mean_of(exact, "bpb"));
    EXPECT_EQ(safe.metrics.at("bpb").count, kTokens - 1 - kPrefill);
    // One list of eight: fewer keys found, a different forward pass.
    const StudyRow& cut = study.rows[4 + i];
    EXPECT_NE(cut.selector.find("shared-scan"), std::string::npos) << cut.selector;
    EXPECT_LT(mean_of(cut, "recall"), mean_of(exact, "recall"));
    EXPECT_NE(mean_of(cut, "bpb"), mean_of(exact, "bpb"));
    EXPECT_GT(cut.cost.key_bytes_read, 0.0);
  }

  // No scored row's selection depends on a later byte: changing the bytes from position 64 on leaves every
  // metric of every row before it unchanged, in every layer, for the searches trained on the prefill.
  std::string changed = text;
  for (int i = kChanged; i < kTokens; ++i) changed[static_cast<std::size_t>(i)] = changed[static_cast<std::size_t>(i)] == 'x' ? 'y' : 'x';
  const StudySuiteResult other = run_small_study(dir, changed, prefill, selectors, options);
  const auto same_before_change = [&](const StudyRow& a, const StudyRow& b) {
    // row_metrics: per layer, per scored row (positions kPrefill .. kTokens - 2), per group.
    const std::size_t rows = static_cast<std::size_t>(kTokens - 1 - kPrefill), groups = 2;
    EXPECT_EQ(a.row_metrics.size(), 2 * rows * groups);
    EXPECT_EQ(b.row_metrics.size(), a.row_metrics.size());
    int compared = 0, differing_after = 0;
    for (std::size_t layer = 0; layer < 2; ++layer) {
      for (std::size_t r = 0; r < rows; ++r) {
        for (std::size_t g = 0; g < groups; ++g) {
          const std::size_t i = (layer * rows + r) * groups + g;
          const bool before = static_cast<int>(r) + kPrefill < kChanged;
          for (const char* metric : {"recall", "mass", "out_err"}) {
            const bool equal = metric_value(a.row_metrics[i], metric) == metric_value(b.row_metrics[i], metric);
            if (before) {
              EXPECT_TRUE(equal) << a.selector << " layer " << layer << " row " << r + kPrefill << " " << metric;
              ++compared;
            } else if (!equal) {
              ++differing_after;
            }
          }
        }
      }
    }
    EXPECT_GT(compared, 0);
    EXPECT_GT(differing_after, 0) << a.selector;  // the change does reach the later rows
  };
  for (std::size_t i = 0; i < study.rows.size(); ++i) same_before_change(study.rows[i], other.studies[0].rows[i]);

  // The same lists trained on every query of the window (what the study did before it had a prefill) do let
  // the later bytes move earlier rows' selections: the check above can fail.
  TinyLmStudyOptions tiny;
  tiny.prefill = kPrefill;
  StudyOptions study_options;
  study_options.k_values = {6};
  study_options.granularity = Granularity::per_kv_head;
  study_options.n_sink = 1;
  study_options.n_local = 2;
  study_options.keep_row_metrics = true;
  const auto leaky = factories({R"({"type": "faiss", "factory": "QueryIVF8,SQ4", "nprobe": 1, "rerank_stored": true})"});
  const std::vector<std::uint8_t> changed_tokens(changed.begin(), changed.end());
  const StudyResult a = run_tiny_lm_study(model, tokens, leaky, study_options, tiny, "a");
  const StudyResult b = run_tiny_lm_study(model, changed_tokens, leaky, study_options, tiny, "b");
  int moved = 0;
  const std::size_t rows = static_cast<std::size_t>(kTokens - 1 - kPrefill);
  for (std::size_t layer = 0; layer < 2; ++layer) {
    for (std::size_t r = 0; r + kPrefill < kChanged; ++r) {
      for (std::size_t g = 0; g < 2; ++g) {
        const std::size_t i = (layer * rows + r) * 2 + g;
        moved += metric_value(a.rows[0].row_metrics[i], "recall") != metric_value(b.rows[0].row_metrics[i], "recall");
      }
    }
  }
  EXPECT_GT(moved, 0);

  // A search that trains needs a prefill, forward mode, and train_keys within the prefill; the prefill must
  // leave a row to score. Each is refused before anything runs, naming the key.
  const auto expect_refused = [&](const std::string& extra, const std::string& spec, const std::string& needle) {
    try {
      run_small_study(dir, text, extra, "[" + spec + "]", options);
      ADD_FAILURE() << "accepted " << extra << " " << spec;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  const std::string query_ivf = R"({"type": "faiss", "factory": "QueryIVF8,SQ4", "nprobe": 1})";
  expect_refused(R"("tokens": 90)", query_ivf, "prefill");
  expect_refused(R"("tokens": 90)", R"({"type": "faiss", "factory": "IVF4,Flat", "nprobe": 1})", "prefill");
  expect_refused(R"("tokens": 90)", R"({"type": "hybrid", "candidate_k": 8, "candidates": )" + query_ivf + "}",
                 "prefill");
  expect_refused(R"("tokens": 90, "prefill": 40, "mode": "decode")", query_ivf, "forward");
  expect_refused(prefill, R"({"type": "faiss", "factory": "QueryIVF8,SQ4", "train_keys": 41})", "train_keys");
  expect_refused(R"("tokens": 90, "prefill": 89)", R"({"type": "exact"})", "prefill");
  // Brute force learns nothing: no prefill needed. train_keys below the prefill is kept.
  EXPECT_NO_THROW(run_small_study(dir, text, R"("tokens": 20)",
                                  R"([{"type": "faiss", "factory": "brute_force", "candidates": 16}])", options));
  EXPECT_NO_THROW(run_small_study(dir, text, R"("tokens": 60, "prefill": 40)",
                                  R"([{"type": "faiss", "factory": "QueryIVF4,SQ4", "train_keys": 30}])", options));
  std::filesystem::remove_all(dir);
}

TEST(TinyLmStudy, CandidatesExampleFileRunsReduced) {
  // examples/studies/candidates_tiny_lm.json on the shipped model, cut to 512 bytes (a prefill of 256, 64
  // scored rows) and k = 64: every selector runs, and the query-aware lists probed to the end over every
  // free key give exactly the exact top-k's bits per byte.
  const std::filesystem::path example =
      std::filesystem::path(__FILE__).parent_path() / "../../examples/studies/candidates_tiny_lm.json";
  nlohmann::json doc = nlohmann::json::parse(read_text(example));
  ASSERT_EQ(doc["workloads"].size(), 1u);
  EXPECT_EQ(doc["workloads"][0]["tokens"], 4096);
  EXPECT_EQ(doc["workloads"][0]["prefill"], 2048);
  doc["workloads"][0]["tokens"] = 512;
  doc["workloads"][0]["prefill"] = 256;
  doc["workloads"][0]["query_sample"] = 64;
  doc["k"] = nlohmann::json::array({64});
  for (nlohmann::json& s : doc["selectors"]) {
    if (s.contains("candidates")) s["candidates"] = 512;
  }
  const StudyConfig config = parse_study_config(doc.dump());
  const StudySuiteResult result = run_study_config(config);
  ASSERT_EQ(result.studies.size(), 1u);
  const StudyResult& study = result.studies[0];
  ASSERT_EQ(study.rows.size(), config.selectors.size());
  EXPECT_EQ(study.row_positions.size(), 64u);
  EXPECT_GE(study.row_positions.front(), 256);
  const StudyRow* exact = nullptr;
  const StudyRow* safe = nullptr;
  const StudyRow* indexer = nullptr;
  std::vector<const StudyRow*> coded;  // QueryIVF64,SQ4 in grid order: nprobe 2, 4, 8, 16, safe
  for (const StudyRow& row : study.rows) {
    SCOPED_TRACE(row.selector);
    EXPECT_TRUE(std::isfinite(mean_of(row, "bpb")));
    EXPECT_EQ(row.metrics.at("bpb").count, 64);
    if (row.selector == "exact") exact = &row;
    if (row.selector.find("QueryIVF64,Flat nprobe=safe") != std::string::npos) safe = &row;
    if (row.selector.find("indexer(") == 0) indexer = &row;
    if (row.selector.find("QueryIVF64,SQ4") != std::string::npos) coded.push_back(&row);
  }
  ASSERT_NE(exact, nullptr);
  ASSERT_NE(safe, nullptr);
  ASSERT_NE(indexer, nullptr);
  ASSERT_EQ(coded.size(), 5u);
  EXPECT_EQ(mean_of(*safe, "bpb"), mean_of(*exact, "bpb"));
  EXPECT_EQ(mean_of(*safe, "recall"), mean_of(*exact, "recall"));
  EXPECT_LT(mean_of(*indexer, "recall"), mean_of(*exact, "recall"));
  // More lists probed read more bytes and find more of the top-k.
  for (std::size_t i = 1; i < 4; ++i) {
    EXPECT_GT(coded[i]->cost.key_bytes_read, coded[i - 1]->cost.key_bytes_read) << coded[i]->selector;
  }
  EXPECT_GT(mean_of(*coded[3], "recall"), mean_of(*coded[0], "recall"));
  EXPECT_GT(mean_of(*coded[4], "recall"), mean_of(*coded[0], "recall"));
}

TEST(TinyLmStudy, ShippedModelsTrainedIndexerBeatsRandomInRecallAndAccuracy) {
  // 256 bytes of the shipped held-out text at per-token granularity (what the indexers were trained for).
  const std::string directory = tiny_lm_directory();
  const TinyLm model = TinyLm::load(directory + "/model.safetensors");
  TinyLmWorkloadOptions text;
  text.model = directory;
  text.tokens = 256;
  const std::vector<std::uint8_t> tokens = read_tiny_lm_text(text);
  StudyOptions options;
  options.k_values = {32};
  options.granularity = Granularity::per_token;
  const StudyResult result = run_tiny_lm_study(
      model, tokens,
      factories({R"({"type": "exact"})", R"({"type": "indexer"})", R"({"type": "random", "seed": 5})"}), options,
      "shipped");
  ASSERT_EQ(result.rows.size(), 3u);
  EXPECT_EQ(result.layers.size(), 6u);
  EXPECT_LT(result.full_bpb.mean, 3.0);  // a trained model on code; untrained weights give about 8
  EXPECT_EQ(mean_of(result.rows[0], "recall"), 1.0);
  const double indexer_recall = mean_of(result.rows[1], "recall");
  const double random_recall = mean_of(result.rows[2], "recall");
  EXPECT_GT(indexer_recall, random_recall + 0.2);
  EXPECT_LT(mean_of(result.rows[1], "bpb_increase"), mean_of(result.rows[2], "bpb_increase"));
  EXPECT_LT(mean_of(result.rows[0], "bpb_increase"), mean_of(result.rows[2], "bpb_increase"));
}

TEST(TinyLmStudy, BuiltInStudyParsesAndMatchesTheExampleFile) {
  const StudyConfig builtin = tiny_lm_study_config();
  ASSERT_EQ(builtin.workloads.size(), 1u);
  EXPECT_EQ(builtin.workloads[0].type, "tiny-lm");
  EXPECT_TRUE(builtin.workloads[0].tiny_lm.model.empty());  // the shipped model, found when run
  EXPECT_EQ(builtin.options.k_values, (std::vector<std::int64_t>{32, 128, 512}));
  std::vector<std::string> names;
  for (const StudySelectorSpec& s : builtin.selectors) names.push_back(s.name);
  for (const char* name : {"exact", "fidelity[fill=random,precision=1.0]", "fidelity[fill=next_ranked,precision=0.9]", "indexer(fp32)", "indexer(int4/hadamard)", "random"}) {
    EXPECT_NE(std::find(names.begin(), names.end(), name), names.end()) << name;
  }
  // examples/studies/tiny_lm.json is the same study file.
  const std::filesystem::path example =
      std::filesystem::path(__FILE__).parent_path() / "../../examples/studies/tiny_lm.json";
  EXPECT_EQ(read_text(example), tiny_lm_study_config_json());
}

}  // namespace
}  // namespace keysel
