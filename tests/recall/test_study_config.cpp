// Study files, selector specs and the report: grids expand, unknown keys are rejected, the same seed gives the
// same CSV bytes, the exact selector scores recall 1 and mass_ratio 1, and report.html is well-formed XML that
// names every selector.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "keysel/core/device.h"
#include "keysel/core/error.h"
#include "keysel/recall/report.h"
#include "recall/xml_check.h"
#include "keysel/recall/selector_spec.h"
#include "keysel/recall/study_config.h"
#include "keysel/recall/synthetic.h"

namespace keysel {
namespace {

constexpr const char* kSmallStudy = R"({
  "workloads": [{"type": "synthetic", "keys": 384, "tokens": 3, "query_heads": 4, "kv_heads": 2, "head_dim": 32,
                 "seed": SEED}],
  "selectors": [
    {"type": "exact"},
    {"type": "random", "seed": 3},
    {"name": "odd <name> & \"quotes\"", "type": "streaming", "n_sink": 2},
    {"name": "idx", "type": "indexer", "format": ["fp8_e4m3", "int4"], "hadamard": [false, true]}
  ],
  "k": [16, 64],
  "granularity": "per_kv_head"
})";

std::string small_study(int seed) {
  std::string text = kSmallStudy;
  text.replace(text.find("SEED"), 4, std::to_string(seed));
  return text;
}

/// Splits a CSV line whose quoted fields may hold commas and doubled quotes.
std::vector<std::string> csv_fields(const std::string& line) {
  std::vector<std::string> fields(1);
  bool quoted = false;
  for (std::size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (quoted) {
      if (c == '"' && i + 1 < line.size() && line[i + 1] == '"') {
        fields.back() += '"';
        ++i;
      } else if (c == '"') {
        quoted = false;
      } else {
        fields.back() += c;
      }
    } else if (c == '"') {
      quoted = true;
    } else if (c == ',') {
      fields.emplace_back();
    } else {
      fields.back() += c;
    }
  }
  return fields;
}


TEST(StudyConfig, GridsExpandInOrderWithNames) {
  const StudyConfig config = parse_study_config(small_study(1));
  ASSERT_EQ(config.workloads.size(), 1u);
  EXPECT_EQ(config.workloads[0].synthetic.keys, 384);
  EXPECT_EQ(config.workloads[0].synthetic.value_dim, 32);  // defaults to head_dim
  ASSERT_EQ(config.selectors.size(), 3u + 4u);
  EXPECT_EQ(config.selectors[0].name, "exact");
  EXPECT_EQ(config.selectors[3].name, "idx[format=fp8_e4m3,hadamard=false]");
  EXPECT_EQ(config.selectors[4].name, "idx[format=fp8_e4m3,hadamard=true]");
  EXPECT_EQ(config.selectors[5].name, "idx[format=int4,hadamard=false]");
  EXPECT_EQ(config.selectors[6].name, "idx[format=int4,hadamard=true]");
  EXPECT_EQ(config.options.k_values, (std::vector<std::int64_t>{16, 64}));
  // Every expanded spec builds a selector under its name.
  for (const StudySelectorSpec& s : config.selectors) {
    EXPECT_EQ(make_selector_from_spec(s.spec_json)->name(), s.name);
  }
}

TEST(StudyConfig, UnknownKeysAreRejectedByName) {
  const auto message_of = [](const std::string& text) {
    try {
      parse_study_config(text);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const std::string workloads = R"("workloads": [{"type": "synthetic", "keys": 128, "tokens": 2}])";
  const std::string selectors = R"("selectors": [{"type": "exact"}])";
  EXPECT_NE(message_of("{" + workloads + "," + selectors + R"(, "kk": [1]})").find("'kk'"), std::string::npos);
  EXPECT_NE(message_of(R"({"workloads": [{"type": "synthetic", "key": 128}],)" + selectors + "}").find("'key'"),
            std::string::npos);
  EXPECT_NE(message_of("{" + workloads + R"(, "selectors": [{"type": "random", "sead": 1}]})").find("'sead'"),
            std::string::npos);
  EXPECT_NE(message_of("{" + workloads + R"(, "selectors": [{"type": "magic"}]})").find("magic"), std::string::npos);
  EXPECT_NE(message_of("{" + workloads + R"(, "selectors": [{"type": "indexer", "format": "fp7"}]})").find("fp7"),
            std::string::npos);
  EXPECT_NE(message_of("{" + workloads + "," + selectors + R"(, "k": [0]})").find("'k'"), std::string::npos);
  EXPECT_NE(message_of("{" + selectors + "}").find("workloads"), std::string::npos);
  EXPECT_NE(message_of("{not json").find("JSON"), std::string::npos);
}

TEST(StudyConfig, SameSeedGivesTheSameCsvBytes) {
  const StudySuiteResult a = run_study_config(parse_study_config(small_study(5)));
  const StudySuiteResult b = run_study_config(parse_study_config(small_study(5)));
  const StudySuiteResult c = run_study_config(parse_study_config(small_study(6)));
  EXPECT_EQ(study_suite_csv(a), study_suite_csv(b));
  EXPECT_EQ(study_suite_rows_csv(a), study_suite_rows_csv(b));
  EXPECT_NE(study_suite_csv(a), study_suite_csv(c));
}

TEST(StudyConfig, ExactSelectorHasRecallOneAndMassRatioOne) {
  const StudySuiteResult result = run_study_config(parse_study_config(small_study(2)));
  std::istringstream csv(study_suite_csv(result));
  std::string line;
  std::getline(csv, line);
  const std::vector<std::string> header = csv_fields(line);
  ASSERT_EQ(header[1], "selector");
  ASSERT_EQ(header[3], "metric");
  ASSERT_EQ(header[5], "mean");
  ASSERT_EQ(header[6], "min");
  int checked = 0;
  std::map<std::string, int> lines_per_selector;
  while (std::getline(csv, line)) {
    const std::vector<std::string> f = csv_fields(line);
    ASSERT_EQ(f.size(), header.size()) << line;
    ++lines_per_selector[f[1]];
    if (f[1] == "exact" && (f[3] == "recall" || f[3] == "mass_ratio")) {
      EXPECT_EQ(std::stod(f[5]), 1.0) << line;
      EXPECT_EQ(std::stod(f[6]), 1.0) << line;
      ++checked;
    }
  }
  EXPECT_EQ(checked, 4);  // 2 k x (recall, mass_ratio)
  EXPECT_EQ(lines_per_selector.size(), 7u);
  EXPECT_EQ(lines_per_selector["odd <name> & \"quotes\""], 2 * 8);  // 2 k x 8 metrics
}

TEST(StudyReport, HtmlIsWellFormedAndNamesEverySelector) {
  const StudySuiteResult result = run_study_config(parse_study_config(small_study(3)));
  const std::string html = study_report_html(result);
  EXPECT_EQ(test::xml_problem(html), "");
  for (const char* external : {" src=", " href=", "<link", "@import", "url("}) {
    EXPECT_EQ(html.find(external), std::string::npos) << "no external assets: " << external;
  }
  for (const StudySelectorSpec& s : result.config.selectors) {
    EXPECT_NE(html.find(escape_html(s.name)), std::string::npos) << s.name;
  }
  EXPECT_EQ(html.find("odd <name>"), std::string::npos) << "names must be escaped";
  for (const char* chart : {"recall vs k", "mass vs k", "recall vs key bytes read", "entropy vs recall"}) {
    EXPECT_NE(html.find(chart), std::string::npos) << chart;
  }
  // The checker itself notices broken documents.
  EXPECT_NE(test::xml_problem("<a><b></a></b>"), "");
  EXPECT_NE(test::xml_problem("<a>x & y</a>"), "");
  EXPECT_NE(test::xml_problem("<a x=1></a>"), "");
  EXPECT_EQ(test::xml_problem("<a x=\"1\"><b/>&amp;</a>"), "");
}

TEST(StudyConfig, WritesEveryOutput) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "keysel_test_study_outputs";
  std::filesystem::remove_all(dir);
  const StudySuiteResult result = run_study_config(parse_study_config(small_study(4)));
  write_study_outputs(result, dir.string());
  for (const char* name : {"results.csv", "by_row.csv", "results.json", "report.html"}) {
    EXPECT_TRUE(std::filesystem::exists(dir / name)) << name;
    EXPECT_GT(std::filesystem::file_size(dir / name), 100u) << name;
  }
  // by_row.csv: one line per workload x selector x k x token x group.
  std::ifstream rows(dir / "by_row.csv");
  std::size_t lines = 0;
  for (std::string line; std::getline(rows, line);) ++lines;
  EXPECT_EQ(lines, 1u + 7u * 2u * 3u * 2u);
  std::filesystem::remove_all(dir);
}

TEST(StudyConfig, ShippedDumpAllLayersGivesLayerByHeadHeatmaps) {
  // tiny_llama_dump: 2 layers, T = N = 32 (prefill 24 + decode 8), Hq = 4, Hkv = 2, D = 16.
  const std::filesystem::path dump =
      std::filesystem::weakly_canonical(std::filesystem::path(__FILE__).parent_path() / "../data/tiny_llama_dump.safetensors");
  ASSERT_TRUE(std::filesystem::exists(dump)) << dump;
  std::string path_json;
  for (const char c : dump.generic_string()) {
    if (c == '"' || c == '\\') path_json += '\\';
    path_json += c;
  }
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "keysel_test_study_dump_layers";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const std::filesystem::path study_file = dir / "study.json";
  std::ofstream(study_file) << R"({"workloads": [{"type": "dump", "path": ")" + path_json + R"("}],
    "selectors": [{"type": "exact"}, {"type": "random", "seed": 2}, {"type": "streaming", "n_sink": 2}],
    "k": [4, 8], "granularity": "per_head"})";
  const StudySuiteResult result = run_study_config(load_study_config(study_file.string()));
  ASSERT_EQ(result.studies.size(), 2u);  // every layer of the dump
  EXPECT_LT(8, result.studies[0].shape.keys);
  write_study_outputs(result, (dir / "out").string());

  // results.csv: exact has recall 1 and mass_ratio 1 (mean and min) at every k of every layer.
  std::ifstream csv(dir / "out" / "results.csv");
  std::string line;
  std::getline(csv, line);
  const std::vector<std::string> header = csv_fields(line);
  ASSERT_EQ(header[0], "workload");
  ASSERT_EQ(header[5], "mean");
  ASSERT_EQ(header[6], "min");
  std::map<std::string, int> checked_per_layer;
  while (std::getline(csv, line)) {
    const std::vector<std::string> f = csv_fields(line);
    ASSERT_EQ(f.size(), header.size()) << line;
    if (f[1] == "exact" && (f[3] == "recall" || f[3] == "mass_ratio")) {
      EXPECT_EQ(std::stod(f[5]), 1.0) << line;
      EXPECT_EQ(std::stod(f[6]), 1.0) << line;
      ++checked_per_layer[f[0]];
    }
  }
  ASSERT_EQ(checked_per_layer.size(), 2u);
  for (const auto& [workload, checked] : checked_per_layer) {
    EXPECT_NE(workload.find("layer"), std::string::npos) << workload;
    EXPECT_EQ(checked, 4) << workload;  // 2 k x (recall, mass_ratio)
  }

  // report.html: well-formed, with one layer x head heatmap per selector (rows layers 0 and 1, 4 heads).
  std::ifstream report(dir / "out" / "report.html");
  std::stringstream text;
  text << report.rdbuf();
  const std::string html = text.str();
  EXPECT_EQ(test::xml_problem(html), "");
  EXPECT_NE(html.find("Recall by layer and group (head): dump(tiny-random-llama)"), std::string::npos);
  for (const StudySelectorSpec& s : result.config.selectors) {
    const std::string title = escape_html(s.name + ": recall by layer and head");
    std::size_t count = 0;
    for (std::size_t at = html.find(title); at != std::string::npos; at = html.find(title, at + 1)) ++count;
    EXPECT_EQ(count, 2u) << title;  // the SVG's <title> and its caption
  }
  for (const char* cell : {"layer 0, group 0: ", "layer 0, group 3: ", "layer 1, group 0: ", "layer 1, group 3: "}) {
    EXPECT_NE(html.find(cell), std::string::npos) << cell;
  }
  EXPECT_EQ(html.find("layer 2, group"), std::string::npos);
  EXPECT_EQ(html.find("layer 0, group 4: "), std::string::npos);
  // The existing per-workload charts are still there, and a synthetic study gets no layer heatmap.
  EXPECT_NE(html.find("Recall by group (head) and query position"), std::string::npos);
  EXPECT_EQ(study_report_html(run_study_config(parse_study_config(small_study(3)))).find("Recall by layer"),
            std::string::npos);

  // A named dump over a list of layers: one workload per layer, "<name> layer <index>", and the same heatmaps.
  const StudyConfig named = parse_study_config(R"({"workloads": [{"type": "dump", "name": "tiny <&>", "path": ")" +
                                               path_json + R"(", "layer": [1, 0]}],
    "selectors": [{"type": "exact"}], "k": 8, "granularity": "per_kv_head"})");
  ASSERT_EQ(named.workloads.size(), 2u);
  EXPECT_EQ(named.workloads[0].name, "tiny <&> layer 1");
  EXPECT_EQ(named.workloads[1].name, "tiny <&> layer 0");
  const std::string named_html = study_report_html(run_study_config(named));
  EXPECT_EQ(test::xml_problem(named_html), "");
  EXPECT_NE(named_html.find("Recall by layer and group (head): tiny &lt;&amp;&gt;"), std::string::npos);
  EXPECT_NE(named_html.find("layer 1, group 1: 1<"), std::string::npos);  // exact, 2 key heads
  EXPECT_EQ(named_html.find("layer 0, group 2: "), std::string::npos);
  std::filesystem::remove_all(dir);
}

TEST(StudyConfig, DefaultStudyParses) {
  const StudyConfig config = default_study_config();
  EXPECT_GE(config.selectors.size(), 5u);
  EXPECT_EQ(config.selectors[0].name, "exact");
}

TEST(SelectorSpec, BuildsEveryTypeAndRejectsBadSpecs) {
  for (const char* spec : {R"({"type": "exact"})", R"({"type": "random", "seed": 2})",
                           R"({"type": "streaming", "n_sink": 4})", R"({"type": "block_topk", "block_size": 8})",
                           R"({"type": "fidelity", "precision": 0.5, "fill": "next_ranked"})",
                           R"({"type": "hybrid", "candidates": {"type": "indexer", "format": "int4"}, "candidate_k": 64})",
                           R"({"type": "proxy", "format": "int8", "scale_granularity": "per_group", "group_size": 32})",
                           R"({"type": "indexer", "format": "fp8_e4m3", "hadamard": true})",
                           R"({"type": "faiss", "factory": "brute_force", "candidates": 64})"}) {
    EXPECT_NE(make_selector_from_spec(spec), nullptr) << spec;
  }
  EXPECT_EQ(make_selector_from_spec(R"({"type": "indexer", "format": "int4"})")->name(), "indexer(int4)");
  EXPECT_EQ(make_selector_from_spec(R"({"type": "exact", "name": "ceiling"})")->name(), "ceiling");
  EXPECT_THROW(make_selector_from_spec(R"({"type": "exact", "k": 3})"), Error);
  EXPECT_THROW(make_selector_from_spec(R"({"format": "int4"})"), Error);
  EXPECT_THROW(make_selector_from_spec(R"({"type": "fidelity", "precision": 2})"), Error);
  EXPECT_THROW(make_selector_from_spec(R"({"type": "hybrid", "candidates": {"type": "exact"}})"), Error);
  EXPECT_THROW(make_selector_from_spec(R"({"type": "random", "seed": -1})"), Error);
  EXPECT_THROW(make_selector_from_spec("[1]"), Error);
  if (!built_with_faiss()) {
    EXPECT_THROW(make_selector_from_spec(R"({"type": "faiss", "factory": "IVF16,Flat"})"), Error);
  } else {
    EXPECT_NE(make_selector_from_spec(R"({"type": "faiss", "factory": "IVF16,Flat", "nprobe": 4})"), nullptr);
  }
  // The query-aware lists need no FAISS; a bad QueryIVF string fails when the spec is read.
  EXPECT_EQ(make_selector_from_spec(
                R"({"type": "faiss", "factory": "QueryIVF16x2,SQ4", "nprobe": 4, "rerank_stored": true})")
                ->name(),
            "QueryIVF16x2,SQ4 nprobe=4 rerank-stored");
  EXPECT_THROW(make_selector_from_spec(R"({"type": "faiss", "factory": "QueryIVF0,SQ4"})"), Error);
  EXPECT_THROW(make_selector_from_spec(R"({"type": "faiss", "factory": "QueryIVF8", "rerank_stored": 1})"), Error);
}

TEST(SelectorSpec, LoadedSpecSelectsLikeTheSpecText) {
  const std::filesystem::path path = std::filesystem::temp_directory_path() / "keysel_test_selector_spec.json";
  const std::string spec = R"({"type": "indexer", "format": "int4", "hadamard": true})";
  std::ofstream(path) << spec;
  SyntheticOptions o;
  o.keys = 256;
  o.tokens = 2;
  o.query_heads = 4;
  o.kv_heads = 2;
  o.head_dim = 32;
  o.value_dim = 32;
  const Workload w = make_synthetic_workload(o);
  SelectionPolicy policy;
  policy.k = 32;
  std::vector<std::int32_t> a(2 * 2 * 32), b(2 * 2 * 32);
  load_selector_spec(path.string())->select(w.inputs(), policy, TensorView(a.data(), DType::int32, {2, 2, 32}));
  make_selector_from_spec(spec)->select(w.inputs(), policy, TensorView(b.data(), DType::int32, {2, 2, 32}));
  EXPECT_EQ(a, b);
  std::filesystem::remove(path);
  EXPECT_THROW(load_selector_spec(path.string()), Error);
}

}  // namespace
}  // namespace keysel
