// Study files: workloads x selectors (with parameter grids) x k values, run together and written as
// results.csv, results.json, by_row.csv and a self-contained report.html (docs/studies.md).
//
//   {
//     "workloads": [{"type": "synthetic", "keys": 4096, "tokens": 8, "seed": 1}],
//     "selectors": [{"type": "exact"},
//                   {"name": "proxy", "type": "proxy", "format": ["fp8_e4m3", "int4"], "hadamard": [false, true]}],
//     "k": [64, 256],
//     "granularity": "per_kv_head", "n_sink": 0, "n_local": 0, "kept_on_top": false, "seed": 1
//   }
// A selector entry is a selector spec (selector_spec.h); any value given as an array is a grid: the entry
// expands to the cartesian product of its arrays (keys in alphabetical order, the last varying fastest), each
// point named "<name>[key=value,...]". Unknown keys anywhere throw keysel::Error naming the key.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "keysel/recall/study.h"
#include "keysel/recall/synthetic.h"

namespace keysel {

struct StudyWorkloadSpec {
  std::string type = "synthetic";  // "synthetic" or "dump"
  std::string name;                // label in results; default "synthetic(N=..,T=..,seed=..)" / the dump's
  SyntheticOptions synthetic;      // type "synthetic"
  std::string path;                // type "dump": a safetensors dump (dump.h, docs/dumps.md)
  std::int64_t layer = -1;         // type "dump": the model's layer index; -1 runs every layer of the dump
};

/// One selector of a study after grid expansion: its label and the spec that builds it.
struct StudySelectorSpec {
  std::string name;
  std::string spec_json;  // a selector spec whose "name" is `name`
};

struct StudyConfig {
  std::vector<StudyWorkloadSpec> workloads;
  std::vector<StudySelectorSpec> selectors;
  StudyOptions options;  // k values, granularity, kept keys (progress and keep_row_metrics are set by the runner)
};

/// Parses a study file's text; throws keysel::Error naming the offending key or value.
StudyConfig parse_study_config(std::string_view json_text);
/// Reads and parses a study file.
StudyConfig load_study_config(const std::string& path);
/// The built-in default study (`keysel study --out DIR` without --config): one small synthetic workload;
/// exact, random, streaming, block top-k and the fp8 / int4 indexer stand-ins; k = 64, 256, 1024.
StudyConfig default_study_config();
/// The study file text of default_study_config() (examples/studies/default.json holds the same).
std::string default_study_config_json();

/// Generates a workload, or loads one layer of a dump (spec.layer >= 0).
Workload make_study_workload(const StudyWorkloadSpec& spec);

/// Results of every workload of a study config.
struct StudySuiteResult {
  StudyConfig config;
  std::vector<StudyResult> studies;                  // one per workload, rows (selector, k) with row_metrics
  std::vector<std::vector<std::int32_t>> positions;  // per workload: query token positions [T]
  std::vector<double> workload_seconds;              // per workload: generation or loading time
};

/// Progress of a suite: (steps done, total steps, what just finished).
using StudyProgress = std::function<void(std::size_t done, std::size_t total, const std::string& what)>;

/// Runs every selector at every k over every workload (fresh selectors per workload); a dump workload with
/// layer -1 becomes one study per layer, in layer order.
StudySuiteResult run_study_config(const StudyConfig& config, const StudyProgress& progress = {});

/// results.csv: one line per workload x selector x k x metric, columns
///   workload,selector,k,metric,count,mean,min,p5,p50,p95,key_bytes_per_row,macs_per_row,keys_scored_per_row
/// Deterministic: no wall times (those are in results.json), numbers printed with %.9g.
std::string study_suite_csv(const StudySuiteResult& result);
/// by_row.csv: one line per workload x selector x k x query token x group with every metric (the Lightning
/// Indexer precision analysis: recall by head group and position).
std::string study_suite_rows_csv(const StudySuiteResult& result);
/// results.json: the config, and per workload study_to_json's document plus the workload's time.
std::string study_suite_json(const StudySuiteResult& result);
/// Writes DIR/results.csv, DIR/by_row.csv, DIR/results.json and DIR/report.html (creating DIR).
void write_study_outputs(const StudySuiteResult& result, const std::string& directory);

}  // namespace keysel
