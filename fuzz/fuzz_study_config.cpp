// keysel::parse_study_config (recall/include/keysel/recall/study_config.h) on arbitrary text. An accepted study
// whose workloads are all small synthetic ones is also run (run_study_config) and written to text
// (results.csv, by_row.csv, results.json), as `keysel study --config FILE` does minus the files.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "fuzz_support.h"
#include "keysel/recall/study_config.h"

using keysel::fuzz::finding;

namespace {

/// Whether running the study stays cheap (a few milliseconds): small synthetic workloads only (dump and
/// tiny-lm workloads name files, which a fuzzer must not open), few selectors and k values.
bool small_enough_to_run(const keysel::StudyConfig& config) {
  if (config.selectors.size() > 6 || config.options.k_values.size() > 3) return false;
  for (const std::int64_t k : config.options.k_values) {
    if (k > 256) return false;
  }
  // n_sink and n_local are not bounded here: the library must refuse kept-key counts it cannot hold.
  if (config.workloads.size() > 2) return false;
  for (const keysel::StudyWorkloadSpec& w : config.workloads) {
    if (w.type != "synthetic") return false;
    const keysel::SyntheticOptions& o = w.synthetic;
    if (o.keys > 256 || o.tokens > 8 || o.query_heads > 8 || o.kv_heads > 8 || o.head_dim > 32 ||
        o.value_dim > 32) {
      return false;
    }
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  keysel::fuzz::single_threaded();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  keysel::fuzz::fuzz_one([&] {
    const std::string_view text(reinterpret_cast<const char*>(data), size);
    const keysel::StudyConfig config = keysel::parse_study_config(text);
    if (config.workloads.empty() || config.selectors.empty() || config.options.k_values.empty()) {
      finding("parse_study_config accepted a study without workloads, selectors or k");
    }
    for (const keysel::StudySelectorSpec& s : config.selectors) {
      // Every expanded grid point was checked by the parser: it must check again on its own.
      try {
        (void)keysel::normalize_selector_spec(s.spec_json);
      } catch (const keysel::Error& e) {
        finding("an accepted study's selector spec " + s.spec_json + " is refused on its own: " + e.what());
      }
    }
    if (!small_enough_to_run(config)) return;
    const keysel::StudySuiteResult result = keysel::run_study_config(config);
    if (result.studies.size() != config.workloads.size()) finding("one study per synthetic workload expected");
    (void)keysel::study_suite_csv(result);
    (void)keysel::study_suite_rows_csv(result);
    (void)keysel::study_suite_json(result);
  });
  return 0;
}
