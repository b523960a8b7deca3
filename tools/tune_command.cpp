// `keysel tune`: the cheapest indexer / FAISS configuration whose fidelity meets a target, on a workload.
#include <boost/program_options.hpp>

#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <utility>
#include <iostream>
#include <string>
#include <vector>

#include "commands.h"
#include "keysel/core/device.h"
#include "keysel/core/error.h"
#include "keysel/core/files.h"
#include "keysel/core/selection.h"
#include "keysel/core/threads.h"
#include "keysel/recall/study.h"
#include "keysel/recall/study_config.h"
#include "keysel/recall/synthetic.h"
#include "keysel/recall/tune.h"

namespace keysel::cli {
namespace {

namespace po = boost::program_options;

constexpr const char* kAbout = R"(Usage: keysel tune [options]

Searches selector configurations for the cheapest one whose fidelity meets a target, on a seeded synthetic
workload (the options of `keysel study`) or one layer of a dump (--dump FILE --layer L).

The search space:
  indexer formats   fp32, bf16, fp16, fp8_e4m3, fp8_e5m2, int8, int4 (--formats) for the indexer's key cache
                    (keysel's proxy scorer stands in for a trained Lightning Indexer: the main attention's q.K
                    read from the low-precision cache; docs/studies.md)
  scale granularity one scale per token, or per group of --group-size channels (scaled formats only)
  rotation          Hadamard rotation off and on
  over-fetch        int4 and fp8 indexers fetching f x k candidates, re-ranked exactly (--overfetch)
  FAISS             IVF<nlist>,Flat x nprobe x over-fetch, when keysel is built with FAISS (--no-faiss skips it)
Cost is the key bytes read per row (query token and selection group, SPEC section 5). The command prints
the Pareto frontier (configurations no other beats on both cost and fidelity) and the cheapest configuration
that meets the target, and writes that configuration as a selector spec (--out) that
keysel::load_selector_spec() builds directly.

The default workload (N=8192, T=16, Hq=32) and space (46 configurations with FAISS) take a few minutes on a
few cores; shrink --keys, --tokens or the space (--formats, --no-faiss) for a quick look.

Targets: METRIC:AGGREGATE>=X or <=X, with METRIC one of recall, mass, mass_ratio, kl, top1, out_err and
AGGREGATE one of mean, min, p5, p50, p95 (over query tokens and groups):
  recall:p5>=0.9        95% of rows find at least 90% of the exact top-k
  mass_ratio:mean>=0.98
  out_err:p95<=0.05

Examples:
  keysel tune --target recall:p5>=0.9 --k 2048 --out tuned.json
  keysel tune --keys 4096 --tokens 4 --k 256 --formats fp8_e4m3,int4 --no-faiss

)";

std::vector<std::string> split(const std::string& text) {
  std::vector<std::string> out;
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t end = std::min(text.find(',', start), text.size());
    if (end > start) out.push_back(text.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

std::vector<std::int64_t> parse_integers(const std::string& option, const std::string& text, std::int64_t min_value) {
  std::vector<std::int64_t> out;
  for (const std::string& item : split(text)) {
    std::int64_t v = 0;
    const auto [ptr, ec] = std::from_chars(item.data(), item.data() + item.size(), v);
    if (ec != std::errc() || ptr != item.data() + item.size() || v < min_value) {
      throw Error("option '--" + option + "': expected comma-separated integers >= " + std::to_string(min_value) +
                  ", got \"" + text + "\"");
    }
    out.push_back(v);
  }
  return out;
}

}  // namespace

int tune_command(int argc, const char* const* argv) {
  SyntheticOptions workload_options;
  SelectionPolicy policy;
  std::string target_text = "recall:p5>=0.9";
  std::string granularity_text(granularity_name(policy.granularity));
  std::string formats_text = "fp32,bf16,fp16,fp8_e4m3,fp8_e5m2,int8,int4";
  std::string overfetch_text = "2,4";
  std::string nlist_text = "16,64", nprobe_text = "1,4,16", faiss_overfetch_text = "1,2,4";
  std::int64_t group_size = 32;
  std::uint64_t seed = 1;
  int threads = 0;
  std::string out_path, json_path, dump_path;
  std::int64_t layer = 0;

  po::options_description options("Options", 110, 50);
  // clang-format off
  options.add_options()
      ("help,h", "show this help")
      ("target", po::value(&target_text)->value_name("TARGET")->default_value(target_text), "fidelity to reach, METRIC:AGGREGATE>=X")
      ("k", po::value(&policy.k)->value_name("K")->default_value(policy.k), "keys selected per token and group")
      ("granularity", po::value(&granularity_text)->value_name("NAME")->default_value(granularity_text),
       "per_head, per_kv_head or per_token")
      ("sinks", po::value(&policy.n_sink)->value_name("COUNT")->default_value(0), "always keep keys 0..COUNT-1")
      ("window", po::value(&policy.n_local)->value_name("COUNT")->default_value(0), "always keep the last COUNT keys")
      ("keys", po::value(&workload_options.keys)->value_name("N")->default_value(workload_options.keys), "N: cached keys")
      ("tokens", po::value(&workload_options.tokens)->value_name("T")->default_value(workload_options.tokens), "T: query tokens")
      ("heads", po::value(&workload_options.query_heads)->value_name("HQ")->default_value(workload_options.query_heads), "Hq")
      ("kv-heads", po::value(&workload_options.kv_heads)->value_name("HKV")->default_value(workload_options.kv_heads), "Hkv")
      ("dim", po::value(&workload_options.head_dim)->value_name("D")->default_value(workload_options.head_dim), "D")
      ("seed", po::value(&seed)->value_name("SEED")->default_value(seed), "seed of the workload")
      ("dump", po::value(&dump_path)->value_name("FILE"), "tune on one layer of this dump instead (docs/dumps.md)")
      ("layer", po::value(&layer)->value_name("L")->default_value(layer), "the dump's layer (model layer index)")
      ("formats", po::value(&formats_text)->value_name("LIST")->default_value(formats_text), "indexer key formats to try")
      ("group-size", po::value(&group_size)->value_name("G")->default_value(group_size),
       "channels per scale of the per_group variants (32, 64, 128; 0: per_token only)")
      ("no-rotation", "do not try the Hadamard rotation")
      ("overfetch", po::value(&overfetch_text)->value_name("LIST")->default_value(overfetch_text),
       "over-fetch factors of the re-ranked int4/fp8 indexers (empty: none)")
      ("no-faiss", "do not try FAISS IVF searches")
      ("nlist", po::value(&nlist_text)->value_name("LIST")->default_value(nlist_text), "FAISS IVF lists")
      ("nprobe", po::value(&nprobe_text)->value_name("LIST")->default_value(nprobe_text), "FAISS lists probed")
      ("faiss-overfetch", po::value(&faiss_overfetch_text)->value_name("LIST")->default_value(faiss_overfetch_text),
       "FAISS candidates per search as multiples of k")
      ("threads", po::value(&threads)->value_name("COUNT"), "threads to use (default: all logical processors)")
      ("out", po::value(&out_path)->value_name("FILE"), "write the cheapest configuration as a selector spec (JSON)")
      ("json", po::value(&json_path)->value_name("FILE"), "write every configuration tried, the frontier and the choice (only when one meets the target)");
  // clang-format on
  po::variables_map vm;
  const po::positional_options_description no_positional;
  po::store(po::command_line_parser(argc, argv).options(options).positional(no_positional).run(), vm);
  if (vm.count("help")) {
    std::cout << kAbout << options << "\n";
    return 0;
  }
  po::notify(vm);

  const TuneTarget target = parse_tune_target(target_text);
  policy.granularity = parse_granularity(granularity_text);
  policy.validate("keysel tune");
  if (vm.count("threads")) {
    if (threads < 1 || threads > max_threads()) {
      throw Error("option '--threads': expected an integer in [1, " + std::to_string(max_threads()) + "], got " +
                  std::to_string(threads));
    }
    set_num_threads(threads);
  }
  if (group_size < 0) {
    throw Error("option '--group-size': expected an integer >= 0 (0: per-token scales only), got " +
                std::to_string(group_size));
  }
  // Destinations are checked before any work and written whole at the end: a failed run, or one that meets no
  // target, leaves what was there.
  if (vm.count("out")) check_output_path(out_path, OutputKind::file, "tune", "--out");
  if (vm.count("json")) check_output_path(json_path, OutputKind::file, "tune", "--json");
  TuneSpaceOptions space;
  space.formats = split(formats_text);
  if (space.formats.empty()) throw Error("option '--formats': expected at least one format");
  space.group_size = group_size;
  space.try_rotation = vm.count("no-rotation") == 0;
  space.overfetch = parse_integers("overfetch", overfetch_text, 1);
  space.faiss = vm.count("no-faiss") == 0;
  space.nlist = parse_integers("nlist", nlist_text, 1);
  space.nprobe = parse_integers("nprobe", nprobe_text, 1);
  space.faiss_overfetch = parse_integers("faiss-overfetch", faiss_overfetch_text, 1);
  space.k = policy.k;
  const std::vector<TuneCandidate> candidates = tune_space(space);

  StudyWorkloadSpec workload_spec;
  if (!dump_path.empty()) {
    workload_spec.type = "dump";
    workload_spec.path = dump_path;
    workload_spec.layer = layer;
  } else {
    workload_options.value_dim = workload_options.head_dim;
    workload_options.seed = seed;
    workload_spec.synthetic = workload_options;
    workload_spec.name = "synthetic(N=" + std::to_string(workload_options.keys) + ",T=" +
                         std::to_string(workload_options.tokens) + ",seed=" + std::to_string(seed) + ")";
    // k <= N and the memory, before the workload is generated (a dump is checked once loaded).
    check_policy_fits(workload_options.shape(), policy, workload_spec.name);
  }
  const auto start = std::chrono::steady_clock::now();
  Workload workload = make_study_workload(workload_spec);
  std::cout << "workload: " << workload.name << "; k = " << policy.k << ", granularity "
            << granularity_name(policy.granularity) << "; " << candidates.size() << " configurations"
            << (space.faiss && !built_with_faiss() ? " (FAISS not built in: IVF searches skipped)" : "") << "\n";
  WorkloadTuneEvaluator evaluator(std::move(workload), policy, target);
  Progress progress("tune");
  const TuneResult result = tune(candidates, evaluator, target, [&](std::size_t done, std::size_t total, const std::string& what) {
    progress.update(done, total, what);
  });
  progress.finish();
  print_tune_result(result, std::cout);

  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  char timing[96];
  std::snprintf(timing, sizeof timing, "tuned in %.2f s on %d threads\n", seconds, num_threads());
  if (!result.best) {
    // A failed run changes no file: what --out and --json held stays (the table above is the record).
    if (!out_path.empty() || !json_path.empty()) std::cout << "no configuration met the target: nothing written\n";
    std::cout << timing;
    return 1;  // nothing met the target: a script should notice
  }
  // Both files together: either both are replaced or neither is.
  std::vector<std::pair<std::filesystem::path, std::string>> files;
  if (!json_path.empty()) files.emplace_back(json_path, tune_result_json(result));
  if (!out_path.empty()) files.emplace_back(out_path, best_selector_spec(result));
  if (!files.empty()) {
    write_files_atomically(files, "tune", !out_path.empty() ? "--out" : "--json");
    if (!json_path.empty()) std::cout << "wrote " << json_path << "\n";
    if (!out_path.empty()) std::cout << "wrote " << out_path << " (keysel::load_selector_spec builds it)\n";
  }
  std::cout << timing;
  return 0;
}

}  // namespace keysel::cli
