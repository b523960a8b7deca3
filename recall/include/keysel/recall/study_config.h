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

/// A "tiny-lm" workload: keysel's tiny byte-level model (tiny_lm.h) run over bytes [offset, offset + tokens)
/// of a text file, every layer's attention restricted to the keys each selector picks.
struct TinyLmWorkloadOptions {
  std::string model;         // directory holding model.safetensors; empty: tiny_lm_directory() when run
  std::string text;          // the bytes; empty: <model>/eval.txt
  std::int64_t tokens = 2048;
  std::int64_t offset = 0;
  /// "mode" ("forward" or "decode"), "query_sample", "sample_seed" and "bpb_from" ("all" or "sparse").
  TinyLmStudyOptions study;
  /// "task": a retrieval task (retrieval.h) instead of a text, one study per context length, in decode mode.
  bool task = false;
  std::string retrieval;                  // the directory of retrieval.json; empty: the model's directory
  std::vector<std::int64_t> contexts;     // the examples' "context" values studied, in this order (required)
  std::int64_t examples_per_context = 0;  // n matching examples of each context; 0: all of them
  bool spread_examples = false;           // "pick": "first" (false: the first n) or "spread" (true: n spread evenly
                                          // over the matching examples, the i-th of n at index
                                          // floor((2i + 1) M / 2n): the middle of the i-th of n equal runs)
  std::vector<std::int64_t> keys;         // only examples planting one of these numbers of keys; empty: any
};

struct StudyWorkloadSpec {
  std::string type = "synthetic";  // "synthetic", "dump" or "tiny-lm"
  std::string name;                // label in results; default "synthetic(N=..,T=..,seed=..)" / the dump's /
                                   // "tiny-lm(<text file>[offset:offset+tokens])"
  SyntheticOptions synthetic;      // type "synthetic"
  std::string path;                // type "dump": a safetensors dump (dump.h, docs/dumps.md)
  std::int64_t layer = -1;         // type "dump": the model's layer index; -1 runs every layer of the dump
  TinyLmWorkloadOptions tiny_lm;   // type "tiny-lm"
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
/// The built-in tiny-lm study (`keysel study --workload tiny-lm`): the shipped tiny model over 1024 bytes of
/// its held-out text, per-token selections; exact, fidelity at five precisions, the trained indexer in fp32,
/// fp8 and int4 (with and without rotation), the proxy in fp8, block top-k, streaming and random; k = 32, 128,
/// 512.
StudyConfig tiny_lm_study_config();
/// The study file text of tiny_lm_study_config() (examples/studies/tiny_lm.json holds the same).
std::string tiny_lm_study_config_json();

/// Generates a workload, or loads one layer of a dump (spec.layer >= 0). A dump layer's indexer tensors
/// (index_q, index_k, index_w) become the workload's. Not for "tiny-lm" (see run_study_config).
Workload make_study_workload(const StudyWorkloadSpec& spec);

/// The bytes of a "tiny-lm" workload: text[offset, offset + tokens). Throws keysel::Error naming the file
/// when it is shorter.
std::vector<std::uint8_t> read_tiny_lm_text(const TinyLmWorkloadOptions& options);

/// Results of every workload of a study config.
struct StudySuiteResult {
  StudyConfig config;
  std::vector<StudyResult> studies;                  // one per workload, rows (selector, k) with row_metrics
  std::vector<std::vector<std::int32_t>> positions;  // per workload: query token positions [T]
  std::vector<double> workload_seconds;              // per workload: generation or loading time
};

/// Progress of a suite (the one ProgressCallback of study.h).
using StudyProgress = ProgressCallback;

/// Runs every selector at every k over every workload (fresh selectors per workload); a dump workload with
/// layer -1 becomes one study per layer, in layer order. A "tiny-lm" workload is one study over the model's
/// forward pass (run_tiny_lm_study: fresh selectors per layer, rows over every layer, bits per byte); its
/// workload time covers loading the model and the text.
StudySuiteResult run_study_config(const StudyConfig& config, const StudyProgress& progress = {});

/// results.csv: one line per workload x selector x k x metric, columns
///   workload,selector,k,metric,count,mean,min,p5,p50,p95,key_bytes_per_row,macs_per_row,keys_scored_per_row
/// Deterministic: no wall times (those are in results.json), numbers printed with %.9g.
/// A study over a model (tiny-lm) adds lines for its accuracy metrics "bpb" and "bpb_increase" (study.h) after
/// the SPEC §4 ones; full attention's bits per byte is the difference of their means (and in results.json).
std::string study_suite_csv(const StudySuiteResult& result);
/// by_row.csv: one line per workload x selector x k x query token x group with every metric (the Lightning
/// Indexer precision analysis: recall by head group and position). The rows of a study over a model's layers
/// name their workload "<workload> layer <L>", as a dump run over its layers does.
std::string study_suite_rows_csv(const StudySuiteResult& result);
/// results.json: the config, and per workload study_to_json's document plus the workload's time.
std::string study_suite_json(const StudySuiteResult& result);
/// Writes DIR/results.csv, DIR/by_row.csv, DIR/results.json and DIR/report.html (creating DIR).
void write_study_outputs(const StudySuiteResult& result, const std::string& directory);

}  // namespace keysel
