// Hostile files and parameters through the recall library's entry points (the command line's are in
// tests/cli/hostile_inputs.py): each ends in keysel::Error naming what was wrong, and nothing is written.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "keysel/core/error.h"
#include "keysel/indexer/selectors.h"
#include "keysel/recall/dump.h"
#include "keysel/recall/loaders.h"
#include "keysel/recall/selector_spec.h"
#include "keysel/recall/study.h"
#include "keysel/recall/study_config.h"
#include "keysel/recall/synthetic.h"
#include "keysel/recall/tune.h"

namespace keysel {
namespace {

namespace fs = std::filesystem;

/// The message of the keysel::Error `call` throws; fails the test when it throws nothing (any other exception
/// escapes and fails it too).
std::string error_of(const std::function<void()>& call) {
  try {
    call();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no keysel::Error";
  return "";
}

#define EXPECT_MENTIONS(message, needle) EXPECT_NE((message).find(needle), std::string::npos) << (message)

fs::path scratch(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("keysel_hostile_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

void write_text(const fs::path& path, const std::string& text) { std::ofstream(path, std::ios::binary) << text; }

std::string nested_hybrid(int depth) {
  std::string text;
  for (int i = 0; i < depth; ++i) text += R"({"type": "hybrid", "candidate_k": 4, "candidates": )";
  text += R"({"type": "exact"})";
  return text + std::string(static_cast<std::size_t>(depth), '}');
}

TEST(HostileInputs, DeepNestingIsRefusedBeforeParsing) {
  EXPECT_MENTIONS(error_of([] { parse_study_config(std::string(100000, '[')); }), "nested at most 64");
  EXPECT_MENTIONS(error_of([] { make_selector_from_spec(nested_hybrid(20000)); }), "nested at most 64");
  // Within the JSON limit, hybrid specs still nest at most 8 deep.
  EXPECT_MENTIONS(error_of([] { make_selector_from_spec(nested_hybrid(9)); }), "hybrid selectors nested at most 8");
  EXPECT_NE(make_selector_from_spec(nested_hybrid(8)), nullptr);
  // Brackets inside strings are text, not nesting.
  EXPECT_MENTIONS(error_of([] { make_selector_from_spec(R"({"type": ")" + std::string(1000, '[') + R"("})"); }),
                  "unknown selector type");
  // A safetensors header nested 100 000 deep.
  const std::string header = std::string(100000, '[') + std::string(100000, ']');
  std::vector<std::byte> bytes(8 + header.size());
  const std::uint64_t length = header.size();
  std::memcpy(bytes.data(), &length, 8);
  std::memcpy(bytes.data() + 8, header.data(), header.size());
  EXPECT_MENTIONS(error_of([&] { parse_safetensors(bytes, "deep.safetensors"); }), "nested");
}

TEST(HostileInputs, NumbersNoDoubleHoldsAreKeyselErrorsNamingTheFile) {
  EXPECT_MENTIONS(error_of([] { make_selector_from_spec(R"({"type": "block_topk", "oversample": 1e309})"); }),
                  "not valid JSON");
  EXPECT_MENTIONS(error_of([] { parse_study_config(R"({"workloads": [{"type": "synthetic", "focus": -1e400}]})"); }),
                  "not valid JSON");
  const fs::path dir = scratch("numbers");
  write_text(dir / "spec.json", R"({"type": "fidelity", "precision": 1e309})");
  EXPECT_MENTIONS(error_of([&] { load_selector_spec((dir / "spec.json").string()); }), "spec.json");
  EXPECT_MENTIONS(error_of([&] { load_selector_spec(dir.string()); }), "which is a directory");
  EXPECT_MENTIONS(error_of([&] { load_study_config(dir.string()); }), "which is a directory");
}

TEST(HostileInputs, TinyLmByteRangesThatOverflowAreRefused) {
  const fs::path dir = scratch("tiny");
  write_text(dir / "text.txt", std::string(100, 'x'));
  TinyLmWorkloadOptions options;
  options.text = (dir / "text.txt").string();
  options.tokens = 16;
  options.offset = INT64_MAX - 4;
  EXPECT_MENTIONS(error_of([&] { read_tiny_lm_text(options); }), "holds 100 bytes");
  options.offset = 90;
  EXPECT_MENTIONS(error_of([&] { read_tiny_lm_text(options); }), "16 bytes from offset 90");
  options.offset = 84;
  EXPECT_EQ(read_tiny_lm_text(options).size(), 16u);
  const std::string config = R"({"workloads": [{"type": "tiny-lm", "tokens": 16, "offset": 9223372036854775800}],
                                 "selectors": [{"type": "exact"}], "k": [4]})";
  EXPECT_MENTIONS(error_of([&] { parse_study_config(config); }), "key 'offset'");
}

TEST(HostileInputs, StudiesRefuseKAboveTheCacheAndWhatCannotFitBeforeRunning) {
  SyntheticOptions o;
  o.keys = 64;
  o.tokens = 2;
  o.query_heads = 4;
  o.kv_heads = 2;
  o.head_dim = 8;
  o.value_dim = 8;
  const Workload w = make_synthetic_workload(o);
  std::vector<std::unique_ptr<Selector>> selectors;
  selectors.push_back(make_exact_selector());
  StudyOptions options;
  options.k_values = {8, 65};
  const std::string m = error_of([&] { run_study(w, selectors, options); });
  EXPECT_MENTIONS(m, "argument 'k'");
  EXPECT_MENTIONS(m, "N = 64");
  options.k_values = {64};
  EXPECT_EQ(run_study(w, selectors, options).rows.size(), 1u);

  // The estimate holds its largest terms; a 1M-key, 1000-token, 64-head study needs about half a terabyte.
  const AttentionShape shape{1000, 1000000, 64, 1, 128, 128};
  const double bytes = estimate_study_bytes(shape, options, 3);
  EXPECT_GT(bytes, 8.0 * 1000 * 64 * 1000000);  // p alone: T x Hq x N doubles
  EXPECT_LT(bytes, 1e12);
  EXPECT_MENTIONS(error_of([&] { check_study_fits(shape, options, 3, "w"); }), "needs an estimated");
}

TEST(HostileInputs, StudyOutputsAreWholeOrAbsent) {
  const fs::path dir = scratch("outputs");
  write_text(dir / "file", "keep");
  StudySuiteResult empty;
  EXPECT_MENTIONS(error_of([&] { write_study_outputs(empty, (dir / "file").string()); }), "not a directory");
  EXPECT_MENTIONS(error_of([&] { write_study_outputs(empty, ""); }), "an empty path");
  std::ifstream kept(dir / "file");
  std::string text;
  kept >> text;
  EXPECT_EQ(text, "keep");
}

TEST(HostileInputs, TuneSpaceRefusesNegativeGroupsAndOverflowingCandidateCounts) {
  TuneSpaceOptions space;
  space.group_size = -1;
  EXPECT_MENTIONS(error_of([&] { tune_space(space); }), "options.group_size");
  space.group_size = 32;
  space.overfetch = {INT64_MAX};
  EXPECT_MENTIONS(error_of([&] { tune_space(space); }), "options.overfetch");
  space.overfetch = {2};
  space.k = 0;
  EXPECT_MENTIONS(error_of([&] { tune_space(space); }), "options.k");
}

}  // namespace
}  // namespace keysel
