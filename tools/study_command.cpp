// `keysel study`: baseline selectors against the exact top-k on a seeded synthetic workload.
#include <boost/program_options.hpp>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "commands.h"
#include "keysel/core/error.h"
#include "keysel/core/files.h"
#include "keysel/core/selection.h"
#include "keysel/core/threads.h"
#include "keysel/indexer/selector.h"
#include "keysel/recall/study.h"
#include "keysel/recall/study_config.h"
#include "keysel/recall/synthetic.h"

namespace keysel::cli {
namespace {

namespace po = boost::program_options;

constexpr std::int64_t kStreamingSinks = 4;

constexpr const char* kAbout = R"(Usage: keysel study [options]

Measures how well simple key selectors approximate exact top-k attention.

keysel generates a seeded synthetic decode workload: N cached keys, T query tokens at the last T positions,
GQA with Hq query heads over Hkv key/value heads. Its attention has the structure real decoders show: an
attention sink at position 0, a bias toward recent keys, and a few sharply attended "relevant" keys per head.
It computes exact attention in double precision, then asks each selector to pick k keys for every query token
and selection group (--granularity):
  exact      the exact top-k of the group's mean attention probabilities: the ceiling
  random     the kept keys plus uniformly random other keys: the floor
  streaming  StreamingLLM: the first 4 keys (attention sinks) plus the most recent keys

For each selector and k the table shows, averaged over query tokens and groups:
  recall       fraction of the exact top-k keys the selection found (1 = all of them)
  recall_p5    5th percentile of recall: how bad the worst rows are
  mass         attention probability the selected keys hold, in [0, 1]
  mass_ratio   mass / mass of the exact top-k (1 = as good as exact)
  kl           -log(mass): KL divergence of attention restricted to the selection from full attention, nats
  top1         fraction of rows whose single most-attended key was selected
  out_err      relative error |o_A - o| / |o| of the attention output computed on the selection
  out_err_p95  95th percentile of out_err
  select_ms    wall time the selector took for all rows, in milliseconds
The header gives the attention entropy (nats, and as a fraction of log of the allowed keys; 1 = uniform).

Examples:
  keysel study                                 the default workload (N=8192, T=16, Hq=32, Hkv=8, D=128)
  keysel study --keys 32768 --k 512,2048       a longer context, k near DeepSeek-V3.2's 2048
  keysel study --granularity per_token --sinks 4 --window 64
                                               one key set for all heads; always keep 4 sinks and 64 recent keys
  keysel study --seed 7 --json study.json      another workload; also write every aggregate as JSON

Study files (docs/studies.md): --config FILE runs the workloads, selectors (with parameter grids) and k values
a JSON study file names; --out DIR writes DIR/results.csv (one line per workload, selector, k and metric: the
same seed gives the same bytes), DIR/by_row.csv (every query token and group: recall by head and position),
DIR/results.json (with wall times) and DIR/report.html (self-contained, SVG charts: recall and mass vs k,
fidelity vs cost with the Pareto frontier, recall heatmaps by group and position, entropy vs recall).
--out without --config runs the built-in default study file (examples/studies/default.json).
  keysel study --config examples/studies/default.json --out study-out

A real model in the loop: --workload tiny-lm runs the built-in tiny-lm study (examples/studies/tiny_lm.json):
keysel's shipped tiny byte-level model (docs/tiny-lm.md) reads 1024 bytes of held-out Python source with
every layer's attention restricted to the keys each selector picks (one key set per token for all heads of a
layer, as DeepSeek's sparse attention), so the table adds the model's accuracy:
  bpb           bits per byte of the model's next-byte predictions (lower is better)
  bpb_increase  bpb minus full attention's (the header gives full attention's bits per byte)
The fidelity metrics then cover every layer's query tokens and groups. Selectors: exact, fidelity at
precision 0.5 .. 1, the model's trained Lightning Indexer in fp32 / fp8 / int4 (with and without Hadamard
rotation), the fp8 proxy, block top-k, streaming, random; k = 32, 128, 512. A few minutes on two cores.
  keysel study --workload tiny-lm --out tiny-lm-study
report.html then also plots bits per byte against recall and against mass, with the full-attention line.
--workload synthetic runs the built-in default study file (the same as --out without --config).

)";

/// Parses "64,256,1024" into k values >= 1.
std::vector<std::int64_t> parse_k_values(const std::string& text) {
  std::vector<std::int64_t> values;
  std::size_t start = 0;
  while (true) {
    const std::size_t end = std::min(text.find(',', start), text.size());
    const char* first = text.data() + start;
    const char* last = text.data() + end;
    std::int64_t value = 0;
    const auto [ptr, ec] = std::from_chars(first, last, value);
    if (first == last || ec != std::errc() || ptr != last || value < 1) {
      throw Error("option '--k': expected a comma-separated list of integers >= 1 (such as 64,256,1024), got \"" +
                  text + "\"");
    }
    values.push_back(value);
    if (end == text.size()) break;
    start = end + 1;
  }
  return values;
}

std::uint64_t parse_seed(const std::string& text) {
  std::uint64_t value = 0;
  const auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (text.empty() || ec != std::errc() || ptr != text.data() + text.size()) {
    throw Error("option '--seed': expected an integer in [0, 2^64), got \"" + text + "\"");
  }
  return value;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

/// `keysel study --config FILE [--out DIR]` (or a built-in study file).
int run_config_study(const StudyConfig& config, const std::string& out_dir) {
  Progress progress("study");
  const auto start = std::chrono::steady_clock::now();
  const StudySuiteResult result =
      run_study_config(config, [&](std::size_t done, std::size_t total, const std::string& what) {
        progress.update(done, total, what);
      });
  progress.finish();
  for (std::size_t i = 0; i < result.studies.size(); ++i) {
    if (i > 0) std::cout << "\n";
    print_study_table(result.studies[i], std::cout);
  }
  if (!out_dir.empty()) {
    write_study_outputs(result, out_dir);
    std::cout << "\nwrote " << out_dir << "/results.csv, by_row.csv, results.json and report.html\n";
  }
  char timing[160];
  std::snprintf(timing, sizeof timing, "\nstudy (%zu workloads x %zu selectors x %zu k) in %.2f s on %d threads\n",
                result.studies.size(), config.selectors.size(), config.options.k_values.size(), seconds_since(start),
                num_threads());
  std::cout << timing;
  return 0;
}

}  // namespace

int study_command(int argc, const char* const* argv) {
  SyntheticOptions workload_options;
  StudyOptions study_options;
  std::string k_text = "64,256,1024";
  std::string granularity_text(granularity_name(study_options.granularity));
  std::string seed_text = "1";
  int threads = 0;
  std::string json_path;
  std::string config_path;
  std::string out_dir;
  std::string builtin_study;

  po::options_description options("Options", 110, 50);
  // clang-format off
  options.add_options()
      ("help,h", "show this help")
      ("keys", po::value(&workload_options.keys)->value_name("N")->default_value(workload_options.keys),
       "N: cached keys (tokens) in the sequence")
      ("tokens", po::value(&workload_options.tokens)->value_name("T")->default_value(workload_options.tokens),
       "T: query tokens, at positions N-T .. N-1")
      ("heads", po::value(&workload_options.query_heads)->value_name("HQ")->default_value(workload_options.query_heads),
       "Hq: query heads")
      ("kv-heads", po::value(&workload_options.kv_heads)->value_name("HKV")->default_value(workload_options.kv_heads),
       "Hkv: key/value heads (must divide Hq)")
      ("dim", po::value(&workload_options.head_dim)->value_name("D")->default_value(workload_options.head_dim),
       "D: head dim of keys, queries and values")
      ("k", po::value(&k_text)->value_name("LIST")->default_value(k_text), "keys to select per token and group, comma-separated")
      ("granularity", po::value(&granularity_text)->value_name("NAME")->default_value(granularity_text),
       "who shares a selection: per_head, per_kv_head (GQA) or per_token (DSA)")
      ("sinks", po::value(&study_options.n_sink)->value_name("COUNT")->default_value(study_options.n_sink),
       "keep keys 0..COUNT-1 in every selection (they count toward k)")
      ("window", po::value(&study_options.n_local)->value_name("COUNT")->default_value(study_options.n_local),
       "keep the last COUNT allowed keys in every selection (count toward k)")
      ("seed", po::value(&seed_text)->value_name("SEED")->default_value(seed_text), "seed of the workload and the random selector")
      ("sink-strength", po::value(&workload_options.sink_strength)->value_name("X")->default_value(workload_options.sink_strength),
       "workload: how strongly position 0 attracts attention (0: no sink)")
      ("recency", po::value(&workload_options.recency)->value_name("X")->default_value(workload_options.recency),
       "workload: strength of the bias toward recent keys (0: none)")
      ("focus", po::value(&workload_options.focus)->value_name("X")->default_value(workload_options.focus),
       "workload: how sharply heads attend to a few relevant keys (0: diffuse)")
      ("threads", po::value(&threads)->value_name("COUNT"), "threads to use (default: all logical processors)")
      ("json", po::value(&json_path)->value_name("FILE"), "also write the results as JSON to this file")
      ("config", po::value(&config_path)->value_name("FILE"), "run the JSON study file FILE instead (docs/studies.md)")
      ("workload", po::value(&builtin_study)->value_name("NAME"),
       "run a built-in study file instead: synthetic (examples/studies/default.json) or tiny-lm "
       "(examples/studies/tiny_lm.json: the shipped tiny model, with bits per byte)")
      ("out", po::value(&out_dir)->value_name("DIR"),
       "write results.csv, by_row.csv, results.json and report.html to DIR (default study file without --config)");
  // clang-format on

  po::variables_map vm;
  const po::positional_options_description no_positional;  // every word must belong to an option
  po::store(po::command_line_parser(argc, argv).options(options).positional(no_positional).run(), vm);
  if (vm.count("help")) {
    std::cout << kAbout << options << "\n";
    return 0;
  }
  po::notify(vm);

  workload_options.value_dim = workload_options.head_dim;
  workload_options.seed = parse_seed(seed_text);
  study_options.k_values = parse_k_values(k_text);
  study_options.granularity = parse_granularity(granularity_text);
  if (vm.count("threads")) {
    if (threads < 1 || threads > max_threads()) {
      throw Error("option '--threads': expected an integer in [1, " + std::to_string(max_threads()) + "], got " +
                  std::to_string(threads));
    }
    set_num_threads(threads);
  }
  // Destinations are checked before any work, and written whole at the end (temporary name, then rename).
  if (vm.count("out")) check_output_path(out_dir, OutputKind::directory, "study", "--out");
  if (vm.count("json")) check_output_path(json_path, OutputKind::file, "study", "--json");

  if (vm.count("workload")) {
    if (builtin_study != "synthetic" && builtin_study != "tiny-lm") {
      throw Error("option '--workload': expected \"synthetic\" or \"tiny-lm\", got \"" + builtin_study + "\"");
    }
    if (vm.count("config")) throw Error("option '--workload' cannot be combined with --config: pick one study file");
  }
  if (vm.count("config") || vm.count("out") || vm.count("workload")) {
    // A study file names its own workloads, selectors and k: the command-line versions would be ignored.
    for (const char* name : {"keys", "tokens", "heads", "kv-heads", "dim", "k", "granularity", "sinks", "window",
                             "seed", "sink-strength", "recency", "focus", "json"}) {
      if (vm.count(name) && !vm[name].defaulted()) {
        throw Error(std::string("option '--") + name +
                    "' cannot be combined with --config/--out/--workload: set it in the study file");
      }
    }
    return run_config_study(builtin_study == "tiny-lm" ? tiny_lm_study_config()
                            : config_path.empty()  ? default_study_config()
                                                   : load_study_config(config_path),
                            out_dir);
  }

  // Everything that can be refused is refused before the workload is generated: the policy of every k, k <= N,
  // and the memory the study needs.
  check_study_fits(workload_options.shape(), study_options, 3, "the synthetic workload");

  const auto start = std::chrono::steady_clock::now();
  const Workload workload = make_synthetic_workload(workload_options);
  const double workload_seconds = seconds_since(start);
  // What the generated data looks like (entropy, sink mass, mass of the exact top-k), so users see what they get.
  print_workload_properties(measure_workload(workload, study_options.granularity, study_options.k_values), std::cout);
  std::cout << "\n";

  std::vector<std::unique_ptr<Selector>> selectors;
  selectors.push_back(make_exact_selector());
  selectors.push_back(make_random_selector(workload_options.seed));
  selectors.push_back(make_streaming_selector(kStreamingSinks));
  const auto study_start = std::chrono::steady_clock::now();
  const StudyResult result = run_study(workload, selectors, study_options);
  const double study_seconds = seconds_since(study_start);

  print_study_table(result, std::cout);
  if (!json_path.empty()) {
    write_file_atomically(json_path, study_to_json(result), "study", "--json");
    std::cout << "\nwrote " << json_path << "\n";
  }
  char timing[200];
  std::snprintf(timing, sizeof timing, "\nworkload generated in %.2f s; study (%zu selectors x %zu k) in %.2f s on %d threads\n",
                workload_seconds, selectors.size(), study_options.k_values.size(), study_seconds, num_threads());
  std::cout << timing;
  return 0;
}

}  // namespace keysel::cli
