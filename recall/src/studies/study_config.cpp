// Study files (study_config.h): parsing with grid expansion, the runner and its CSV / JSON outputs.
#include "keysel/recall/study_config.h"

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <memory>
#include <cmath>
#include <optional>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "keysel/core/dtype.h"
#include "keysel/core/error.h"
#include "keysel/core/files.h"
#include "keysel/recall/dump.h"
#include "keysel/recall/loaders.h"
#include "keysel/recall/report.h"
#include "keysel/recall/retrieval.h"
#include "keysel/recall/tiny_lm.h"
#include "studies/selector_spec_json.h"

namespace keysel {
namespace {

using nlohmann::json;

[[noreturn]] void fail(const std::string& message) { throw Error("keysel::parse_study_config: " + message); }

void check_keys(const json& object, const std::string& where, const std::set<std::string>& allowed) {
  if (!object.is_object()) fail(where + ": expected a JSON object, got " + object.dump());
  for (const auto& [key, value] : object.items()) {
    if (!allowed.contains(key)) {
      std::string list;
      for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + a;
      fail(where + ": unknown key '" + key + "' (expected one of " + list + ")");
    }
  }
}

std::int64_t get_int(const json& object, const std::string& key, std::int64_t fallback, std::int64_t min_value,
                     const std::string& where) {
  const auto it = object.find(key);
  if (it == object.end()) return fallback;
  if (!it->is_number_integer() || it->get<std::int64_t>() < min_value) {
    fail(where + ": key '" + key + "': expected an integer >= " + std::to_string(min_value) + ", got " + it->dump());
  }
  return it->get<std::int64_t>();
}

double get_number(const json& object, const std::string& key, double fallback, const std::string& where) {
  const auto it = object.find(key);
  if (it == object.end()) return fallback;
  if (!it->is_number()) fail(where + ": key '" + key + "': expected a number, got " + it->dump());
  return it->get<double>();
}

std::string value_label(const json& value) { return value.is_string() ? value.get<std::string>() : value.dump(); }

StudyWorkloadSpec parse_workload(const json& w, const std::string& where, std::uint64_t default_seed) {
  StudyWorkloadSpec spec;
  if (!w.is_object()) fail(where + ": expected a JSON object, got " + w.dump());
  const auto type = w.find("type");
  if (type == w.end() || !type->is_string()) {
    fail(where + ": missing key 'type' (\"synthetic\", \"dump\" or \"tiny-lm\")");
  }
  spec.type = type->get<std::string>();
  if (spec.type == "synthetic") {
    check_keys(w, where, {"type", "name", "keys", "tokens", "query_heads", "kv_heads", "head_dim", "value_dim",
                          "seed", "sink_strength", "recency", "focus"});
    SyntheticOptions& o = spec.synthetic;
    o.keys = get_int(w, "keys", o.keys, 1, where);
    o.tokens = get_int(w, "tokens", o.tokens, 1, where);
    o.query_heads = get_int(w, "query_heads", o.query_heads, 1, where);
    o.kv_heads = get_int(w, "kv_heads", o.kv_heads, 1, where);
    o.head_dim = get_int(w, "head_dim", o.head_dim, 1, where);
    o.value_dim = get_int(w, "value_dim", o.head_dim, 1, where);
    o.seed = static_cast<std::uint64_t>(get_int(w, "seed", static_cast<std::int64_t>(default_seed), 0, where));
    o.sink_strength = get_number(w, "sink_strength", o.sink_strength, where);
    o.recency = get_number(w, "recency", o.recency, where);
    o.focus = get_number(w, "focus", o.focus, where);
    spec.name = "synthetic(N=" + std::to_string(o.keys) + ",T=" + std::to_string(o.tokens) +
                ",seed=" + std::to_string(o.seed) + ")";
  } else if (spec.type == "dump") {
    check_keys(w, where, {"type", "name", "path", "layer"});
    const auto path = w.find("path");
    if (path == w.end() || !path->is_string()) fail(where + ": missing key 'path' (the dump file)");
    spec.path = path->get<std::string>();
    spec.layer = get_int(w, "layer", -1, 0, where);
    spec.name = "";  // the dump names its layers: "dump(<model>, layer <index>)"
  } else if (spec.type == "tiny-lm") {
    check_keys(w, where, {"type", "name", "tokens", "offset", "model", "text", "mode", "query_sample", "sample_seed",
                          "bpb_from", "task", "prefill"});
    TinyLmWorkloadOptions& o = spec.tiny_lm;
    if (const auto it = w.find("mode"); it != w.end()) {
      if (*it == "forward") {
        o.study.mode = TinyLmStudyMode::forward;
      } else if (*it == "decode") {
        o.study.mode = TinyLmStudyMode::decode;
      } else {
        fail(where + ": key 'mode': expected \"forward\" or \"decode\", got " + it->dump());
      }
    }
    if (const auto it = w.find("bpb_from"); it != w.end()) {
      if (*it != "all" && *it != "sparse") {
        fail(where + ": key 'bpb_from': expected \"all\" or \"sparse\" (positions >= 2k as well), got " + it->dump());
      }
      o.study.bpb_sparse = *it == "sparse";
    }
    o.study.query_sample = get_int(w, "query_sample", 0, 0, where);
    o.study.sample_seed = static_cast<std::uint64_t>(get_int(w, "sample_seed", 1, 0, where));
    o.study.prefill = get_int(w, "prefill", 0, 0, where);
    if (const auto task = w.find("task"); task != w.end()) {
      const std::string at = where + ".task";
      check_keys(*task, at, {"retrieval", "contexts", "examples_per_context", "pick", "keys"});
      for (const char* key : {"tokens", "offset", "text"}) {
        if (w.contains(key)) fail(where + ": key '" + key + "': a task reads its examples, not a text");
      }
      if (o.study.mode != TinyLmStudyMode::decode) {
        fail(where + ": key 'task': needs \"mode\": \"decode\" (answers are decoded over a full-attention prefill)");
      }
      if (o.study.prefill != 0) fail(where + ": key 'prefill': a task's prefill is each example's prompt");
      o.task = true;
      if (const auto it = task->find("retrieval"); it != task->end()) {
        if (!it->is_string() || it->get<std::string>().empty()) {
          fail(at + ": key 'retrieval': expected a non-empty path, got " + it->dump());
        }
        o.retrieval = it->get<std::string>();
      }
      const auto integers = [&](const char* key, std::int64_t min_value, std::vector<std::int64_t>& out) {
        const auto it = task->find(key);
        if (it == task->end()) return false;
        if (!it->is_array() || it->empty()) fail(at + ": key '" + key + "': expected a non-empty list of integers");
        for (const json& v : *it) {
          if (!v.is_number_integer() || v.get<std::int64_t>() < min_value) {
            fail(at + ": key '" + key + "': expected integers >= " + std::to_string(min_value) + ", got " + v.dump());
          }
          out.push_back(v.get<std::int64_t>());
        }
        return true;
      };
      if (!integers("contexts", 2, o.contexts)) fail(at + ": missing key 'contexts' (the context lengths studied)");
      integers("keys", 1, o.keys);
      o.examples_per_context = get_int(*task, "examples_per_context", 0, 1, at);
      if (const auto it = task->find("pick"); it != task->end()) {
        if (*it != "first" && *it != "spread") {
          fail(at + ": key 'pick': expected \"first\" or \"spread\" (examples_per_context spread evenly over the "
                    "matching examples), got " + it->dump());
        }
        o.spread_examples = *it == "spread";
      }
    }
    o.tokens = get_int(w, "tokens", o.tokens, 2, where);
    o.offset = get_int(w, "offset", o.offset, 0, where);
    if (o.tokens > kMaxKeyPositions) {
      fail(where + ": key 'tokens': expected an integer in [2, " + std::to_string(kMaxKeyPositions) + "], got " +
           std::to_string(o.tokens));
    }
    if (o.offset > std::numeric_limits<std::int64_t>::max() - o.tokens) {
      fail(where + ": key 'offset': expected offset + tokens to fit in int64, got offset " + std::to_string(o.offset));
    }
    for (const auto& [key, field] : {std::pair{"model", &o.model}, std::pair{"text", &o.text}}) {
      if (const auto it = w.find(key); it != w.end()) {
        if (!it->is_string() || it->get<std::string>().empty()) {
          fail(where + ": key '" + key + "': expected a non-empty path, got " + it->dump());
        }
        *field = it->get<std::string>();
      }
    }
    const std::string text = o.text.empty() ? "eval.txt" : std::filesystem::path(o.text).filename().string();
    spec.name = "tiny-lm(" + text + "[" + std::to_string(o.offset) + ":" + std::to_string(o.offset + o.tokens) + "])";
    if (o.task) spec.name = "tiny-lm(retrieval)";
  } else {
    fail(where + ": unknown workload type \"" + spec.type + "\" (expected \"synthetic\", \"dump\" or \"tiny-lm\")");
  }
  if (const auto name = w.find("name"); name != w.end()) {
    if (!name->is_string()) fail(where + ": key 'name': expected a string");
    spec.name = name->get<std::string>();
  }
  return spec;
}

/// Expands one selector entry's arrays into grid points.
void expand_selector(const json& entry, const std::string& where, std::vector<StudySelectorSpec>& out) {
  if (!entry.is_object()) fail(where + ": expected a JSON object, got " + entry.dump());
  std::vector<std::string> grid_keys;
  for (const auto& [key, value] : entry.items()) {
    if (value.is_array()) {
      if (value.empty()) fail(where + ": key '" + key + "': a grid needs at least one value");
      grid_keys.push_back(key);
    }
  }
  std::string base_name;
  if (const auto name = entry.find("name"); name != entry.end()) {
    if (!name->is_string()) fail(where + ": key 'name': expected a string");
    base_name = name->get<std::string>();
  }
  std::vector<std::size_t> index(grid_keys.size(), 0);
  while (true) {
    json point = entry;
    std::string suffix;
    for (std::size_t i = 0; i < grid_keys.size(); ++i) {
      const json& value = entry.at(grid_keys[i])[index[i]];
      point[grid_keys[i]] = value;
      suffix += (suffix.empty() ? "" : ",") + grid_keys[i] + "=" + value_label(value);
    }
    point.erase("name");
    detail::check_selector_spec(point, where);
    std::string name = base_name.empty() ? detail::selector_default_name(point, where) : base_name;
    if (!suffix.empty()) name += "[" + suffix + "]";
    point["name"] = name;
    out.push_back({name, point.dump()});
    // Next grid point: the last key varies fastest.
    std::size_t i = grid_keys.size();
    while (i > 0) {
      --i;
      if (++index[i] < entry.at(grid_keys[i]).size()) break;
      index[i] = 0;
      if (i == 0) return;
    }
    if (grid_keys.empty()) return;
  }
}

std::string format_number(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  char buffer[40];
  std::snprintf(buffer, sizeof buffer, "%.9g", value);
  return buffer;
}

std::string csv_field(const std::string& text) {
  if (text.find_first_of(",\"\n") == std::string::npos) return text;
  std::string quoted = "\"";
  for (const char c : text) {
    if (c == '"') quoted += '"';
    quoted += c;
  }
  return quoted + "\"";
}

double per_row(double total, std::int64_t rows) { return rows > 0 ? total / static_cast<double>(rows) : 0.0; }

/// The weight file and directory of a tiny-lm workload's "model": a directory holding model.safetensors, or
/// the file itself; empty means tiny_lm_directory().
std::pair<std::filesystem::path, std::filesystem::path> tiny_lm_model_paths(const std::string& model) {
  const std::filesystem::path path =
      model.empty() ? std::filesystem::path(tiny_lm_directory()) : std::filesystem::path(model);
  if (std::filesystem::is_regular_file(path)) return {path, path.parent_path()};
  return {path / "model.safetensors", path};
}

/// Runs a selector in a decoder's order over a forward pass's layer (queries at positions 0..T-1 over their own T
/// keys): first the prefill's P rows over the prefill's P keys (a search that learns builds and trains there),
/// then each later row t alone over keys [0, t], declared appended, so the search holds exactly the keys a
/// decoder's would at that step (appended one by one, without retraining unless its own policy retrains on the
/// keys so far). Without this a search built once over the layer's T keys would let later keys steer an earlier
/// row's search (an IVF list's bounds, an HNSW graph's links), though it only ever returns allowed keys.
class DecoderOrderSelector final : public Selector {
 public:
  DecoderOrderSelector(std::unique_ptr<Selector> inner, std::int64_t prefill)
      : inner_(std::move(inner)), prefill_(prefill) {}
  std::string name() const override { return inner_->name(); }

 protected:
  SelectionCost do_select(const SelectionRequest& request, const SelectionPolicy& policy,
                          const TensorView& selection) override {
    constexpr std::string_view function = "run_study_config (decoder order)";
    const AttentionInputs& a = request.attention;
    const AttentionShape shape = a.shape();
    const std::int64_t T = shape.tokens;
    KEYSEL_CHECK_ARG_IN(function, shape.keys == T && a.positions.dtype() == DType::int32, "request",
                        "a forward pass's layer: T query rows over their own T keys", a.q.str() + " over " + a.k.str());
    const std::int32_t* positions = a.positions.data<std::int32_t>();
    for (std::int64_t t = 0; t < T; ++t) {
      KEYSEL_CHECK_ARG_IN(function, positions[t] == t, "request.attention.positions", "0 .. T-1",
                          "position " + std::to_string(positions[t]) + " at row " + std::to_string(t));
    }
    const auto rows_of = [](const TensorView& view, std::int64_t first, std::int64_t count) {
      std::vector<std::int64_t> dims(view.shape().begin(), view.shape().end());
      dims[0] = count;
      const auto* base = static_cast<const std::byte*>(view.raw_data()) + dtype_bytes(view.dtype(), first * view.stride(0));
      return TensorView(static_cast<const void*>(base), view.dtype(), std::span<const std::int64_t>(dims), view.strides());
    };
    const std::int64_t groups = selection.size(1), width = selection.size(2);
    std::int32_t* out = selection.mutable_data<std::int32_t>();
    SelectionCost cost;
    const auto run = [&](std::int64_t first, std::int64_t count, bool fresh) {
      SelectionRequest sub;
      sub.attention.q = rows_of(a.q, first, count);
      sub.attention.k = rows_of(a.k, 0, first + count);
      if (!a.v.empty()) sub.attention.v = rows_of(a.v, 0, first + count);
      sub.attention.positions = rows_of(a.positions, first, count);
      sub.attention.scale = a.scale;
      sub.cache = fresh ? CacheReuse::fresh : CacheReuse::appended;
      sub.unchanged_keys = fresh ? 0 : first;
      const TensorView part(out + first * groups * width, DType::int32, {count, groups, width});
      cost += inner_->select(sub, policy, part);
    };
    const std::int64_t head = std::min(prefill_, T);
    if (head > 0) run(0, head, true);
    for (std::int64_t t = head; t < T; ++t) run(t, 1, t == 0);
    return cost;
  }

 private:
  std::unique_ptr<Selector> inner_;
  std::int64_t prefill_;
};

/// Whether a spec holds a candidate search that learns from the cache (train_on_prefill).
bool learns_from_cache(const json& spec) {
  if (!spec.is_object()) return false;
  const std::string type = spec.value("type", std::string());
  if (type == "hybrid") return spec.contains("candidates") && learns_from_cache(spec["candidates"]);
  const std::string factory = spec.value("factory", std::string());
  return type == "faiss" && factory != "brute_force" && factory != "exact";
}

/// A selector spec as a tiny-lm study over a text runs it: every candidate search that learns from the cache
/// ("faiss" with a factory other than brute_force, also inside "hybrid") trains on the workload's prefill only
/// ("train_keys" = the prefill: its keys, and for query-aware lists the queries of its tokens), never on the
/// scored rows' own or later queries and keys. Throws keysel::Error naming the key when that cannot hold: no
/// prefill, decode mode (whose requests hold only the scored rows' queries), or "train_keys" beyond the prefill.
json train_on_prefill(json spec, const TinyLmStudyOptions& tiny, const std::string& workload,
                      const std::string& selector) {
  if (!spec.is_object()) return spec;
  const std::string type = spec.value("type", std::string());
  if (type == "hybrid" && spec.contains("candidates")) {
    spec["candidates"] = train_on_prefill(spec["candidates"], tiny, workload, selector);
    return spec;
  }
  if (!learns_from_cache(spec)) return spec;
  const std::string factory = spec.value("factory", std::string());
  const std::string where = "keysel::run_study_config: " + workload + ", selector \"" + selector + "\" (factory \"" +
                            factory + "\"): ";
  if (tiny.mode == TinyLmStudyMode::decode) {
    throw Error(where + "a candidate search that trains needs \"mode\": \"forward\" (a decode pass hands the "
                        "selector only the scored rows' queries, not the prefill's)");
  }
  if (tiny.prefill <= 0) {
    throw Error(where + "a candidate search that trains needs the workload's key 'prefill' (>= 1): it trains on the "
                        "prefill's keys and queries, what a decoder has; without one it would train on the queries "
                        "and keys of the rows it is scored on and of later rows");
  }
  const auto it = spec.find("train_keys");
  const std::int64_t train_keys = it != spec.end() && it->is_number_integer() ? it->get<std::int64_t>() : 0;
  if (train_keys > tiny.prefill) {
    throw Error(where + "key 'train_keys': expected at most the workload's prefill (" + std::to_string(tiny.prefill) +
                ") or 0 (the prefill), got " + std::to_string(train_keys));
  }
  if (spec.value("rerank", std::string()) == "indexer") {
    throw Error(where + "key 'rerank': \"indexer\" is not run in a decoder's order yet (the indexer's score is "
                        "indexed by the request's rows); use \"exact\", or \"factory\": \"brute_force\"");
  }
  if (train_keys == 0) spec["train_keys"] = tiny.prefill;
  return spec;
}

/// Selector factories of a study's selectors (one fresh selector per call); over a tiny-lm text (`tiny` given),
/// candidate searches train on its prefill (train_on_prefill).
std::vector<SelectorFactory> selector_factories(const std::vector<StudySelectorSpec>& selectors,
                                                const TinyLmWorkloadOptions* tiny = nullptr,
                                                const std::string& workload = std::string()) {
  std::vector<SelectorFactory> factories;
  for (const StudySelectorSpec& s : selectors) {
    json spec = json::parse(s.spec_json);
    if (tiny != nullptr) spec = train_on_prefill(std::move(spec), tiny->study, workload, s.name);
    const std::int64_t decoder_order = tiny != nullptr && learns_from_cache(spec) ? tiny->study.prefill : 0;
    factories.push_back([spec = std::move(spec), name = s.name, decoder_order](const IndexerTensors* indexer) {
      std::unique_ptr<Selector> selector = detail::make_selector(spec, name, indexer);
      if (decoder_order > 0) selector = std::make_unique<DecoderOrderSelector>(std::move(selector), decoder_order);
      return selector;
    });
  }
  return factories;
}

}  // namespace

StudyConfig parse_study_config(std::string_view json_text) {
  const json doc = detail::parse_json_text(json_text, "study config");
  check_keys(doc, "study config",
             {"workloads", "selectors", "k", "granularity", "n_sink", "n_local", "kept_on_top", "seed"});
  StudyConfig config;
  const std::uint64_t seed = static_cast<std::uint64_t>(get_int(doc, "seed", 1, 0, "study config"));

  const auto workloads = doc.find("workloads");
  if (workloads == doc.end() || !workloads->is_array() || workloads->empty()) {
    fail("key 'workloads': expected a non-empty array of workloads");
  }
  for (std::size_t i = 0; i < workloads->size(); ++i) {
    const json& w = (*workloads)[i];
    const std::string where = "workloads[" + std::to_string(i) + "]";
    // A dump's "layer" may list several layers: one workload each.
    if (w.is_object() && w.contains("layer") && w.at("layer").is_array()) {
      for (const json& layer : w.at("layer")) {
        json one = w;
        one["layer"] = layer;
        StudyWorkloadSpec spec = parse_workload(one, where, seed);
        // A named dump keeps its layers apart (and the report finds the layer) as "<name> layer <index>".
        if (spec.type == "dump" && !spec.name.empty()) spec.name += " layer " + std::to_string(spec.layer);
        config.workloads.push_back(std::move(spec));
      }
    } else {
      config.workloads.push_back(parse_workload(w, where, seed));
    }
  }
  const auto selectors = doc.find("selectors");
  if (selectors == doc.end() || !selectors->is_array() || selectors->empty()) {
    fail("key 'selectors': expected a non-empty array of selector specs");
  }
  for (std::size_t i = 0; i < selectors->size(); ++i) {
    expand_selector((*selectors)[i], "selectors[" + std::to_string(i) + "]", config.selectors);
  }
  // Names label rows: make repeated ones distinct.
  std::map<std::string, int> seen;
  for (StudySelectorSpec& s : config.selectors) {
    const int n = ++seen[s.name];
    if (n > 1) {
      s.name += "#" + std::to_string(n);
      json spec = json::parse(s.spec_json);
      spec["name"] = s.name;
      s.spec_json = spec.dump();
    }
  }

  if (const auto k = doc.find("k"); k != doc.end()) {
    config.options.k_values.clear();
    const json values = k->is_array() ? *k : json::array({*k});
    for (const json& v : values) {
      if (!v.is_number_integer() || v.get<std::int64_t>() < 1) fail("key 'k': expected integers >= 1, got " + k->dump());
      config.options.k_values.push_back(v.get<std::int64_t>());
    }
    if (config.options.k_values.empty()) fail("key 'k': expected at least one value");
  }
  if (const auto g = doc.find("granularity"); g != doc.end()) {
    if (!g->is_string()) fail("key 'granularity': expected \"per_head\", \"per_kv_head\" or \"per_token\"");
    try {
      config.options.granularity = parse_granularity(g->get<std::string>());
    } catch (const Error& e) {
      fail(std::string("key 'granularity': ") + e.what());
    }
  }
  config.options.n_sink = get_int(doc, "n_sink", 0, 0, "study config");
  config.options.n_local = get_int(doc, "n_local", 0, 0, "study config");
  if (const auto top = doc.find("kept_on_top"); top != doc.end()) {
    if (!top->is_boolean()) fail("key 'kept_on_top': expected true or false");
    config.options.kept_on_top = top->get<bool>();
  }
  return config;
}

StudyConfig load_study_config(const std::string& path) {
  const std::string text = detail::read_text_file(path, "load_study_config");
  try {
    return parse_study_config(text);
  } catch (const Error& e) {
    throw Error(std::string(e.what()) + " (in \"" + path + "\")");
  }
}

std::string default_study_config_json() {
  return R"({
  "workloads": [
    {"type": "synthetic", "keys": 4096, "tokens": 8, "query_heads": 16, "kv_heads": 4, "head_dim": 64, "seed": 1}
  ],
  "selectors": [
    {"type": "exact"},
    {"type": "random", "seed": 1},
    {"type": "streaming", "n_sink": 4},
    {"type": "block_topk", "block_size": 16},
    {"name": "indexer", "type": "indexer", "format": ["fp8_e4m3", "int4"]}
  ],
  "k": [64, 256, 1024],
  "granularity": "per_kv_head"
}
)";
}

StudyConfig default_study_config() { return parse_study_config(default_study_config_json()); }

std::string tiny_lm_study_config_json() {
  return R"({
  "workloads": [
    {"type": "tiny-lm", "tokens": 1024, "offset": 0}
  ],
  "selectors": [
    {"type": "exact"},
    {"name": "fidelity", "type": "fidelity", "precision": [0.5, 0.8, 0.9, 0.95, 1.0], "fill": ["random", "next_ranked"]},
    {"type": "indexer", "format": "fp32"},
    {"type": "indexer", "format": "fp8_e4m3"},
    {"type": "indexer", "format": "fp8_e4m3", "hadamard": true},
    {"type": "indexer", "format": "int4"},
    {"type": "indexer", "format": "int4", "hadamard": true},
    {"type": "proxy", "format": "fp8_e4m3"},
    {"type": "block_topk", "block_size": 16},
    {"type": "streaming", "n_sink": 4},
    {"type": "random", "seed": 1}
  ],
  "k": [32, 128, 512],
  "granularity": "per_token"
}
)";
}

StudyConfig tiny_lm_study_config() { return parse_study_config(tiny_lm_study_config_json()); }

std::vector<std::uint8_t> read_tiny_lm_text(const TinyLmWorkloadOptions& options) {
  KEYSEL_CHECK_ARG(options.tokens >= 2, "options.tokens", ">= 2", options.tokens);
  KEYSEL_CHECK_ARG(options.offset >= 0, "options.offset", ">= 0", options.offset);
  const std::filesystem::path path = options.text.empty() ? tiny_lm_model_paths(options.model).second / "eval.txt"
                                                           : std::filesystem::path(options.text);
  const std::vector<std::byte> bytes = detail::read_file_bytes("read_tiny_lm_text", path);
  const auto size = static_cast<std::int64_t>(bytes.size());
  if (options.offset > size || options.tokens > size - options.offset) {  // offset + tokens could overflow
    throw Error("keysel::read_tiny_lm_text: \"" + path.string() + "\" holds " + std::to_string(size) +
                " bytes; the workload needs " + std::to_string(options.tokens) + " bytes from offset " +
                std::to_string(options.offset));
  }
  std::vector<std::uint8_t> tokens(static_cast<std::size_t>(options.tokens));
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    tokens[i] = static_cast<std::uint8_t>(bytes[static_cast<std::size_t>(options.offset) + i]);
  }
  return tokens;
}

Workload make_study_workload(const StudyWorkloadSpec& spec) {
  if (spec.type == "synthetic") {
    Workload workload = make_synthetic_workload(spec.synthetic);
    workload.name = spec.name;
    return workload;
  }
  if (spec.type == "dump") {
    KEYSEL_CHECK_ARG(spec.layer >= 0, "spec.layer", "a layer index >= 0 (run_study_config expands -1)", spec.layer);
    const Dump dump = load_dump(spec.path);
    const DumpLayer& layer = dump.layer(spec.layer);
    const std::size_t i = static_cast<std::size_t>(&layer - dump.layers.data());
    Workload workload = dump.workload(i);
    if (!spec.name.empty()) workload.name = spec.name;
    return workload;
  }
  if (spec.type == "tiny-lm") {
    throw Error("keysel::make_study_workload: a \"tiny-lm\" workload is a model's forward pass, not one attention: "
                "run it with run_study_config or run_tiny_lm_study");
  }
  throw Error("keysel::make_study_workload: unknown workload type \"" + spec.type + "\"");
}

StudySuiteResult run_study_config(const StudyConfig& config, const StudyProgress& progress) {
  KEYSEL_CHECK_ARG(!config.workloads.empty(), "config.workloads", "at least one workload", "none");
  KEYSEL_CHECK_ARG(!config.selectors.empty(), "config.selectors", "at least one selector", "none");
  StudySuiteResult result;
  result.config = config;
  // A dump without a layer runs every layer.
  std::vector<StudyWorkloadSpec> specs;
  for (const StudyWorkloadSpec& spec : config.workloads) {
    if (spec.type == "dump" && spec.layer < 0) {
      const Dump dump = load_dump(spec.path);
      for (const DumpLayer& layer : dump.layers) {
        StudyWorkloadSpec one = spec;
        one.layer = layer.index;
        if (!spec.name.empty()) one.name = spec.name + " layer " + std::to_string(layer.index);
        specs.push_back(one);
      }
    } else {
      specs.push_back(spec);
    }
  }
  // What can be checked without generating or loading anything is checked before any workload runs: k against
  // N, and the memory a synthetic workload's study needs (dumps are checked once loaded, in run_study).
  StudyOptions checked = config.options;
  checked.keep_row_metrics = true;
  for (const StudyWorkloadSpec& spec : specs) {
    if (spec.type == "synthetic") {
      check_study_fits(spec.synthetic.shape(), checked, config.selectors.size(), spec.name);
    } else if (spec.type == "tiny-lm" && !spec.tiny_lm.task) {
      // Its attention caches one key per token (the model's heads are known once it is loaded).
      check_k_values(config.options.k_values, spec.tiny_lm.tokens, spec.name, "run_study_config");
      (void)selector_factories(config.selectors, &spec.tiny_lm, spec.name);
    } else if (spec.type == "tiny-lm") {
      // A task runs in decode mode, where a candidate search that trains would see only the scored rows.
      TinyLmWorkloadOptions decode = spec.tiny_lm;
      decode.study.mode = TinyLmStudyMode::decode;
      (void)selector_factories(config.selectors, &decode, spec.name);
    }
  }
  const std::size_t per_workload = config.selectors.size() * config.options.k_values.size();
  // A task is one study per context length.
  std::vector<std::size_t> first_study(specs.size() + 1, 0);
  for (std::size_t w = 0; w < specs.size(); ++w) {
    first_study[w + 1] = first_study[w] + (specs[w].tiny_lm.task ? specs[w].tiny_lm.contexts.size() : 1);
  }
  const std::size_t total = per_workload * first_study.back();
  for (std::size_t w = 0; w < specs.size(); ++w) {
    const auto start = std::chrono::steady_clock::now();
    const auto seconds = [&] {
      return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    };
    StudyOptions options = config.options;
    options.keep_row_metrics = true;
    const auto report_progress = [&](const std::string& name, std::size_t study) {
      if (!progress) return;
      options.progress = [&, study, name](std::size_t done, std::size_t, const std::string& what) {
        progress(study * per_workload + done, total, name + ": " + what);
      };
    };
    const auto scored_positions = [](const StudyResult& study) {
      std::vector<std::int32_t> positions(static_cast<std::size_t>(study.shape.tokens));
      for (std::size_t t = 0; t < positions.size(); ++t) {
        positions[t] = static_cast<std::int32_t>(study.row_positions.empty() ? static_cast<std::int64_t>(t)
                                                                             : study.row_positions[t]);
      }
      return positions;
    };
    if (specs[w].type == "tiny-lm" && specs[w].tiny_lm.task) {
      const TinyLmWorkloadOptions& tiny = specs[w].tiny_lm;
      const auto [model_file, directory] = tiny_lm_model_paths(tiny.model);
      const TinyLm model = TinyLm::load(model_file.string());
      const RetrievalSet set =
          load_retrieval_set(tiny.retrieval.empty() ? directory.string() : tiny.retrieval, model.config().context);
      const double load_seconds = seconds();
      for (std::size_t c = 0; c < tiny.contexts.size(); ++c) {
        const std::int64_t context = tiny.contexts[c];
        std::vector<std::size_t> matching;
        for (std::size_t e = 0; e < set.examples.size(); ++e) {
          const RetrievalExample& x = set.examples[e];
          if (x.context != context) continue;
          if (!tiny.keys.empty() && std::find(tiny.keys.begin(), tiny.keys.end(), x.keys) == tiny.keys.end()) continue;
          matching.push_back(e);
        }
        const auto M = static_cast<std::int64_t>(matching.size());
        const std::int64_t n = tiny.examples_per_context > 0 ? std::min(tiny.examples_per_context, M) : M;
        std::vector<TinyLmTaskExample> examples;
        for (std::int64_t i = 0; i < n; ++i) {
          // "spread": the i-th of n at floor((2i + 1) M / 2n), the middle of the i-th of n equal runs of the
          // matching examples, so the examples cover the file's order of keys and depths.
          const std::size_t e = matching[static_cast<std::size_t>(tiny.spread_examples ? (2 * i + 1) * M / (2 * n) : i)];
          examples.push_back({set.bytes(e), set.examples[e].answer_length});
        }
        if (examples.empty()) {
          throw Error("keysel::run_study_config: " + specs[w].name + ": " + set.source +
                      " holds no example of context " + std::to_string(context) +
                      (tiny.keys.empty() ? std::string() : " with the keys asked for"));
        }
        const std::string name = specs[w].name + " context " + std::to_string(context);
        result.workload_seconds.push_back(c == 0 ? load_seconds : 0.0);
        report_progress(name, first_study[w] + c);
        TinyLmWorkloadOptions decode = tiny;
        decode.study.mode = TinyLmStudyMode::decode;
        result.studies.push_back(run_tiny_lm_task_study(model, examples, selector_factories(config.selectors, &decode, name),
                                                        options, tiny.study, name));
        result.positions.push_back(scored_positions(result.studies.back()));
      }
      continue;
    }
    if (specs[w].type == "tiny-lm") {
      TinyLmWorkloadOptions tiny = specs[w].tiny_lm;
      const auto [model_file, directory] = tiny_lm_model_paths(tiny.model);
      tiny.model = directory.string();
      const TinyLm model = TinyLm::load(model_file.string());
      const std::vector<std::uint8_t> tokens = read_tiny_lm_text(tiny);
      result.workload_seconds.push_back(seconds());
      report_progress(specs[w].name, first_study[w]);
      result.studies.push_back(run_tiny_lm_study(model, tokens, selector_factories(config.selectors, &tiny, specs[w].name),
                                                 options, tiny.study, specs[w].name));
      result.positions.push_back(scored_positions(result.studies.back()));
      continue;
    }
    const Workload workload = make_study_workload(specs[w]);
    result.workload_seconds.push_back(seconds());
    const std::optional<IndexerTensors> indexer_tensors = workload_indexer_tensors(workload);
    const IndexerTensors* indexer = indexer_tensors ? &*indexer_tensors : nullptr;
    std::vector<std::unique_ptr<Selector>> selectors;
    for (const StudySelectorSpec& s : config.selectors) {
      selectors.push_back(detail::make_selector(json::parse(s.spec_json), s.name, indexer));
    }
    report_progress(workload.name, first_study[w]);
    result.studies.push_back(run_study(workload, selectors, options));
    result.positions.push_back(workload.positions);
  }
  return result;
}

std::string study_suite_csv(const StudySuiteResult& result) {
  std::string csv =
      "workload,selector,k,metric,count,mean,min,p5,p50,p95,key_bytes_per_row,macs_per_row,keys_scored_per_row\n";
  for (const StudyResult& study : result.studies) {
    for (const StudyRow& row : study.rows) {
      const std::string cost = format_number(per_row(row.cost.key_bytes_read, row.cost.rows)) + "," +
                               format_number(per_row(row.cost.macs, row.cost.rows)) + "," +
                               format_number(per_row(row.cost.keys_scored, row.cost.rows));
      const auto line = [&](std::string_view name, const Aggregate& a) {
        csv += csv_field(study.workload) + "," + csv_field(row.selector) + "," + std::to_string(row.k) + "," +
               std::string(name) + "," + std::to_string(a.count) + "," + format_number(a.mean) + "," +
               format_number(a.min) + "," + format_number(a.p5) + "," + format_number(a.p50) + "," +
               format_number(a.p95) + "," + cost + "\n";
      };
      const auto names = metric_names();
      for (const std::string_view name : names) {
        if (const auto it = row.metrics.find(name); it != row.metrics.end()) line(name, it->second);
      }
      // Then any other metric (a model's bpb and bpb_increase), by name.
      for (const auto& [name, a] : row.metrics) {
        if (std::find(names.begin(), names.end(), name) == names.end()) line(name, a);
      }
    }
  }
  return csv;
}

std::string study_suite_rows_csv(const StudySuiteResult& result) {
  std::string csv = "workload,selector,k,token,position,group";
  for (const std::string_view name : metric_names()) {
    csv += ',';
    csv += name;
  }
  csv += '\n';
  for (std::size_t w = 0; w < result.studies.size(); ++w) {
    const StudyResult& study = result.studies[w];
    // A study over a model's layers labels each layer's rows as a dump run over its layers does.
    const std::size_t layers = std::max<std::size_t>(study.layers.size(), 1);
    std::vector<std::string> labels;
    for (std::size_t l = 0; l < layers; ++l) {
      labels.push_back(csv_field(study.layers.empty() ? study.workload
                                                      : study.workload + " layer " + std::to_string(study.layers[l])));
    }
    const std::size_t tokens = static_cast<std::size_t>(std::max<std::int64_t>(study.shape.tokens, 1));
    for (const StudyRow& row : study.rows) {
      const std::size_t groups = row.row_metrics.size() / (layers * tokens);
      for (std::size_t i = 0; i < row.row_metrics.size(); ++i) {
        const std::size_t l = groups > 0 ? i / (tokens * groups) : 0;
        const std::size_t t = groups > 0 ? i / groups % tokens : 0;
        const std::size_t g = groups > 0 ? i % groups : 0;
        for (const std::string& field :
             {labels[l], csv_field(row.selector), std::to_string(row.k), std::to_string(t),
              std::to_string(result.positions[w][t])}) {
          csv += field;
          csv += ',';
        }
        csv += std::to_string(g);
        for (const std::string_view name : metric_names()) {
          csv += ',';
          csv += format_number(metric_value(row.row_metrics[i], name));
        }
        csv += "\n";
      }
    }
  }
  return csv;
}

std::string study_suite_json(const StudySuiteResult& result) {
  nlohmann::ordered_json doc;
  nlohmann::ordered_json selectors = nlohmann::ordered_json::array();
  for (const StudySelectorSpec& s : result.config.selectors) {
    selectors.push_back({{"name", s.name}, {"spec", nlohmann::ordered_json::parse(s.spec_json)}});
  }
  doc["selectors"] = std::move(selectors);
  nlohmann::ordered_json studies = nlohmann::ordered_json::array();
  for (std::size_t w = 0; w < result.studies.size(); ++w) {
    nlohmann::ordered_json study = nlohmann::ordered_json::parse(study_to_json(result.studies[w]));
    study["workload_seconds"] = result.workload_seconds[w];
    studies.push_back(std::move(study));
  }
  doc["studies"] = std::move(studies);
  return doc.dump(2) + "\n";
}

void write_study_outputs(const StudySuiteResult& result, const std::string& directory) {
  constexpr std::string_view function = "write_study_outputs";
  check_output_path(directory, OutputKind::directory, function, "directory");
  // Every file is rendered before anything is written, then the four are written together (temporary names,
  // then renames): a failure leaves the directory as it was.
  const std::filesystem::path dir(directory);
  std::vector<std::pair<std::filesystem::path, std::string>> files;
  files.emplace_back(dir / "results.csv", study_suite_csv(result));
  files.emplace_back(dir / "by_row.csv", study_suite_rows_csv(result));
  files.emplace_back(dir / "results.json", study_suite_json(result));
  files.emplace_back(dir / "report.html", study_report_html(result));
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    detail::throw_argument_error(function, "directory", "a directory keysel can create",
                                 "\"" + directory + "\" (" + ec.message() + ")");
  }
  write_files_atomically(files, function, "directory");
}

}  // namespace keysel
