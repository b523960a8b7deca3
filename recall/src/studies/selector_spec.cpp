// Selector specs (selector_spec.h): one JSON object per selector, checked key by key.
#include "keysel/recall/selector_spec.h"

#include <array>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <utility>

#include "keysel/core/device.h"
#include "keysel/core/dtype.h"
#include "keysel/core/error.h"
#include "keysel/core/tensor.h"
#include "keysel/indexer/candidate_search.h"
#include "keysel/indexer/lightning_indexer.h"
#include "keysel/indexer/proxy_scorer.h"
#include "keysel/indexer/quantization.h"
#include "keysel/indexer/selectors.h"
#include "loaders/loader_support.h"
#include "studies/selector_spec_json.h"

namespace keysel {
namespace {

/// Appended to the name of a candidate search re-ranked by the trained indexer.
constexpr std::string_view kIndexerRerankSuffix = " rerank=indexer";

using nlohmann::json;

constexpr std::array<std::string_view, 9> kTypes = {"exact",  "random",  "streaming", "block_topk", "fidelity",
                                                    "hybrid", "indexer", "proxy",     "faiss"};

/// A selector under another name (the spec's "name").
class NamedSelector final : public Selector {
 public:
  NamedSelector(std::unique_ptr<Selector> inner, std::string name) : inner_(std::move(inner)), name_(std::move(name)) {}
  std::string name() const override { return name_; }

 protected:
  SelectionCost do_select(const SelectionRequest& request, const SelectionPolicy& policy,
                          const TensorView& selection) override {
    return inner_->select(request, policy, selection);
  }

 private:
  std::unique_ptr<Selector> inner_;
  std::string name_;
};

[[noreturn]] void fail(const std::string& where, const std::string& message) {
  throw Error("keysel::make_selector_from_spec: " + where + ": " + message);
}

/// Reads the spec's keys, rejecting any key it was not asked about.
class SpecReader {
 public:
  SpecReader(const json& spec, std::string where) : spec_(spec), where_(std::move(where)) {
    if (!spec_.is_object()) fail(where_, "expected a JSON object, got " + spec_.dump());
  }

  const json* find(const std::string& key) {
    seen_.insert(key);
    const auto it = spec_.find(key);
    return it == spec_.end() ? nullptr : &*it;
  }
  std::string string(const std::string& key, std::string fallback) {
    const json* v = find(key);
    if (v == nullptr) return fallback;
    if (!v->is_string()) fail(where_, "key '" + key + "': expected a string, got " + v->dump());
    return v->get<std::string>();
  }
  std::int64_t integer(const std::string& key, std::int64_t fallback, std::int64_t min_value) {
    const json* v = find(key);
    if (v == nullptr) return fallback;
    if (!v->is_number_integer()) fail(where_, "key '" + key + "': expected an integer, got " + v->dump());
    const std::int64_t value = v->get<std::int64_t>();
    if (value < min_value) {
      fail(where_, "key '" + key + "': expected an integer >= " + std::to_string(min_value) + ", got " + v->dump());
    }
    return value;
  }
  std::uint64_t seed(const std::string& key, std::uint64_t fallback) {
    const json* v = find(key);
    if (v == nullptr) return fallback;
    if (!v->is_number_unsigned()) fail(where_, "key '" + key + "': expected an integer >= 0, got " + v->dump());
    return v->get<std::uint64_t>();
  }
  double number(const std::string& key, double fallback) {
    const json* v = find(key);
    if (v == nullptr) return fallback;
    if (!v->is_number()) fail(where_, "key '" + key + "': expected a number, got " + v->dump());
    return v->get<double>();
  }
  bool boolean(const std::string& key, bool fallback) {
    const json* v = find(key);
    if (v == nullptr) return fallback;
    if (!v->is_boolean()) fail(where_, "key '" + key + "': expected true or false, got " + v->dump());
    return v->get<bool>();
  }
  /// Throws naming the first key nobody asked for.
  void finish() const {
    for (const auto& [key, value] : spec_.items()) {
      if (!seen_.contains(key)) {
        fail(where_, "unknown key '" + key + "' for type \"" + spec_.value("type", std::string("?")) + "\"");
      }
    }
  }
  const std::string& where() const { return where_; }

 private:
  const json& spec_;
  std::string where_;
  std::set<std::string> seen_;
};

ProxyConfig read_proxy_config(SpecReader& reader) {
  ProxyConfig config;
  const std::string format = reader.string("format", "fp32");
  try {
    config.quantization.format = parse_dtype(format);
    config.quantization.granularity =
        parse_scale_granularity(reader.string("scale_granularity", "per_token"));
    config.aggregation = parse_proxy_aggregation(reader.string("aggregation", "logsumexp"));
  } catch (const Error& e) {
    fail(reader.where(), e.what());
  }
  config.quantization.group_size = reader.integer("group_size", 128, 1);
  config.quantization.power_of_two_scales = reader.boolean("power_of_two_scales", false);
  config.quantization.hadamard = reader.boolean("hadamard", false);
  config.rank = reader.integer("rank", 0, 0);
  try {
    config.quantization.validate("make_selector_from_spec");
  } catch (const Error& e) {
    fail(reader.where(), e.what());
  }
  return config;
}

std::vector<float> to_float_vector(const TensorView& view) {
  const std::vector<double> values = to_double_vector(view);
  return {values.begin(), values.end()};
}

/// The trained indexer of one attention with the spec's quantisation (selector_spec.h).
std::unique_ptr<Selector> make_trained_indexer(const IndexerTensors& tensors, const QuantizationConfig& quantization,
                                               const std::string& name) {
  constexpr std::string_view function = "make_selector_from_spec";
  expect_shape(function, tensors.queries, "indexer.queries", {kAnyExtent, kAnyExtent, kAnyExtent});
  const std::int64_t tokens = tensors.queries.size(0);
  const std::int64_t heads = tensors.queries.size(1);
  const std::int64_t dim = tensors.queries.size(2);
  expect_shape(function, tensors.keys, "indexer.keys", {kAnyExtent, dim});
  expect_shape(function, tensors.weights, "indexer.weights", {tokens, heads});
  for (const auto& [view, argument] : {std::pair{&tensors.queries, "indexer.queries"},
                                       std::pair{&tensors.keys, "indexer.keys"},
                                       std::pair{&tensors.weights, "indexer.weights"}}) {
    expect_dtype(function, *view, argument, {DType::fp32, DType::fp16, DType::bf16});
    expect_device(function, *view, argument, Device::cpu());
  }
  auto indexer = std::make_shared<LightningIndexer>(heads, dim, quantization);
  indexer->append_keys(tensors.keys);
  return make_indexer_selector(std::move(indexer), to_float_vector(tensors.queries),
                               to_float_vector(tensors.weights), name);
}

/// How deep "hybrid" specs may nest their candidate selectors: one level is the use; a few allow experiments;
/// thousands (a hostile spec) would only recurse.
constexpr int kMaxHybridDepth = 8;

std::unique_ptr<Selector> build(const json& spec, const std::string& where, bool construct,
                                const IndexerTensors* indexer, int depth = 0) {
  SpecReader reader(spec, where);
  const std::string type = reader.string("type", "");
  if (type.empty()) fail(where, "missing key 'type' (one of exact, random, streaming, block_topk, fidelity, "
                                "hybrid, indexer, proxy, faiss)");
  const std::string name = reader.string("name", "");
  std::unique_ptr<Selector> selector;
  std::string default_name;

  if (type == "exact") {
    reader.finish();
    if (construct) selector = make_exact_selector();
  } else if (type == "random") {
    const std::uint64_t seed = reader.seed("seed", 1);
    reader.finish();
    if (construct) selector = make_random_selector(seed);
  } else if (type == "streaming") {
    const std::int64_t n_sink = reader.integer("n_sink", 4, 0);
    reader.finish();
    if (construct) selector = make_streaming_selector(n_sink);
  } else if (type == "block_topk") {
    BlockTopKOptions options;
    options.block_size = reader.integer("block_size", options.block_size, 1);
    options.oversample = reader.number("oversample", options.oversample);
    if (!(options.oversample >= 1)) fail(where, "key 'oversample': expected a number >= 1");
    reader.finish();
    if (construct) selector = make_block_topk_selector(options);
    default_name = "block_topk(b" + std::to_string(options.block_size) + ")";
  } else if (type == "fidelity") {
    FidelityOptions options;
    options.precision = reader.number("precision", 1.0);
    if (!(options.precision >= 0 && options.precision <= 1)) fail(where, "key 'precision': expected a number in [0, 1]");
    const std::string fill = reader.string("fill", "random");
    if (fill == "random") {
      options.fill = FidelityFill::random;
    } else if (fill == "next_ranked") {
      options.fill = FidelityFill::next_ranked;
    } else {
      fail(where, "key 'fill': expected \"random\" or \"next_ranked\", got \"" + fill + "\"");
    }
    const std::string drop = reader.string("drop", "random");
    if (drop == "random") {
      options.drop = FidelityDrop::random;
    } else if (drop == "lowest") {
      options.drop = FidelityDrop::lowest;
    } else {
      fail(where, "key 'drop': expected \"random\" or \"lowest\", got \"" + drop + "\"");
    }
    options.seed = reader.seed("seed", 0);
    reader.finish();
    if (construct) selector = make_fidelity_selector(options);
    std::ostringstream os;
    os << "fidelity(" << options.precision << (options.drop == FidelityDrop::lowest ? ", drop lowest" : "") << ")";
    default_name = os.str();
  } else if (type == "hybrid") {
    const json* candidates = reader.find("candidates");
    if (candidates == nullptr) fail(where, "missing key 'candidates' (the spec of the candidate selector)");
    const std::int64_t candidate_k = reader.integer("candidate_k", 0, 1);
    if (candidate_k == 0) fail(where, "missing key 'candidate_k' (k' candidates re-ranked, >= 1)");
    reader.finish();
    if (depth >= kMaxHybridDepth) {
      fail(where, "key 'candidates': expected hybrid selectors nested at most " + std::to_string(kMaxHybridDepth) +
                      " deep, got deeper nesting");
    }
    std::unique_ptr<Selector> inner = build(*candidates, where + ".candidates", construct, indexer, depth + 1);
    if (construct) selector = make_hybrid_selector(std::move(inner), candidate_k);
  } else if (type == "proxy" || type == "indexer") {
    const ProxyConfig config = read_proxy_config(reader);
    reader.finish();
    if (type == "indexer") default_name = "indexer(" + config.quantization.str() + ")";
    if (construct && type == "indexer" && indexer != nullptr) {
      // A trained indexer has its own head weights and dimensions: the stand-in's knobs have no meaning.
      if (config.aggregation != ProxyConfig().aggregation) {
        fail(where, "key 'aggregation' applies to the proxy stand-in only; this workload has trained indexer tensors");
      }
      if (config.rank != 0) {
        fail(where, "key 'rank' applies to the proxy stand-in only; this workload has trained indexer tensors");
      }
      selector = make_trained_indexer(*indexer, config.quantization, default_name);
    } else if (construct) {
      selector = make_proxy_selector(ProxyScorer(config));
    }
  } else if (type == "faiss") {
    const std::string factory = reader.string("factory", "");
    if (factory.empty()) fail(where, "missing key 'factory' (a FAISS factory string such as \"IVF64,Flat\")");
    CandidateSelectorOptions options;
    CandidateSearchOptions search_options;
    options.candidates = reader.integer("candidates", 0, 0);
    options.search.nprobe = reader.integer("nprobe", 0, 0);
    options.search.ef_search = reader.integer("ef_search", 0, 0);
    options.train_keys = reader.integer("train_keys", 0, 0);
    const std::string queries = reader.string("queries", "each_head");
    if (queries == "each_head") {
      options.queries = CandidateQueries::each_head;
    } else if (queries == "group_mean") {
      options.queries = CandidateQueries::group_mean;
    } else {
      fail(where, "key 'queries': expected \"each_head\" or \"group_mean\", got \"" + queries + "\"");
    }
    search_options.mips_to_l2 = reader.boolean("mips_to_l2", false);
    search_options.balance_channels = reader.boolean("balance_channels", false);
    options.rerank_stored = reader.boolean("rerank_stored", false);
    options.search.shared_scan = reader.boolean("shared_scan", false);
    if (options.search.nprobe > 0) search_options.nprobe = options.search.nprobe;
    if (options.search.ef_search > 0) search_options.ef_search = options.search.ef_search;
    const std::string rerank = reader.string("rerank", "exact");
    if (rerank != "exact" && rerank != "indexer") {
      fail(where, "key 'rerank': expected \"exact\" or \"indexer\", got \"" + rerank + "\"");
    }
    reader.finish();
    if (construct && rerank == "indexer") {
      if (indexer == nullptr) {
        fail(where, "key 'rerank': \"indexer\" needs a workload with trained indexer tensors (a tiny-lm layer, or "
                    "a dump layer with index_q, index_k and index_w); this one has none");
      }
      options.rerank = make_indexer_candidate_score(indexer->queries, indexer->weights, indexer->keys);
    }
    if (!built_with_faiss() && factory != "brute_force" && factory.rfind("QueryIVF", 0) != 0) {
      fail(where, "type \"faiss\" needs keysel built with FAISS (KEYSEL_FAISS=ON); this build has none "
                  "(only \"factory\": \"brute_force\" works without it)");
    }
    if (construct) {
      selector = make_candidate_selector(factory, options, search_options);
      if (rerank == "indexer") default_name = selector->name() + std::string(kIndexerRerankSuffix);
    }
  } else {
    fail(where, "unknown selector type \"" + type +
                    "\" (expected one of exact, random, streaming, block_topk, fidelity, hybrid, indexer, proxy, faiss)");
  }
  if (!construct) return nullptr;
  if (!name.empty()) return std::make_unique<NamedSelector>(std::move(selector), name);
  if (!default_name.empty() && (type == "indexer" || type == "faiss")) {
    return std::make_unique<NamedSelector>(std::move(selector), default_name);
  }
  return selector;
}

}  // namespace

namespace detail {

nlohmann::json parse_json_text(std::string_view text, const std::string& what) {
  if (json_nesting_depth(text) > kMaxJsonDepth) {
    throw Error("keysel: " + what + ": expected JSON nested at most " + std::to_string(kMaxJsonDepth) +
                " levels deep, got deeper nesting");
  }
  try {
    return nlohmann::json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::exception& e) {
    // Syntax errors, and numbers JSON allows but a double cannot hold (1e309).
    throw Error("keysel: " + what + ": not valid JSON: " + e.what());
  }
}

std::string read_text_file(const std::string& path, std::string_view function) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    throw Error("keysel::" + std::string(function) + ": expected a file, got \"" + path + "\", which is a directory");
  }
  std::ifstream file(path, std::ios::binary);
  if (!file) throw Error("keysel::" + std::string(function) + ": cannot read \"" + path + "\"");
  std::ostringstream text;
  text << file.rdbuf();
  if (file.bad()) throw Error("keysel::" + std::string(function) + ": cannot read \"" + path + "\"");
  return text.str();
}

std::unique_ptr<Selector> make_selector(const nlohmann::json& spec, const std::string& where,
                                        const IndexerTensors* indexer) {
  return build(spec, where, /*construct=*/true, indexer);
}

std::string selector_default_name(const nlohmann::json& spec, const std::string& where) {
  if (spec.is_object() && spec.value("type", "") == "faiss" && spec.value("rerank", "") == "indexer") {
    check_selector_spec(spec, where);
    nlohmann::json search = spec;
    search.erase("rerank");
    return make_selector(search, where)->name() + std::string(kIndexerRerankSuffix);
  }
  return make_selector(spec, where)->name();
}

void check_selector_spec(const nlohmann::json& spec, const std::string& where) {
  build(spec, where, /*construct=*/false, nullptr);
}

}  // namespace detail

std::unique_ptr<Selector> make_selector_from_spec(std::string_view spec_json) {
  return detail::make_selector(detail::parse_json_text(spec_json, "selector spec"));
}

std::unique_ptr<Selector> make_selector_from_spec(std::string_view spec_json, const IndexerTensors* indexer) {
  return detail::make_selector(detail::parse_json_text(spec_json, "selector spec"), "selector spec", indexer);
}

std::unique_ptr<Selector> load_selector_spec(const std::string& path) {
  const std::string text = detail::read_text_file(path, "load_selector_spec");
  return detail::make_selector(detail::parse_json_text(text, "selector spec \"" + path + "\""), path);
}

std::string normalize_selector_spec(std::string_view spec_json) {
  const nlohmann::json spec = detail::parse_json_text(spec_json, "selector spec");
  detail::check_selector_spec(spec);
  return spec.dump();
}

std::span<const std::string_view> selector_spec_types() { return kTypes; }

std::optional<IndexerTensors> workload_indexer_tensors(const Workload& workload) {
  if (workload.index_heads <= 0) return std::nullopt;
  const std::int64_t tokens = workload.shape.tokens;
  IndexerTensors tensors;
  tensors.queries =
      TensorView(workload.index_q.data(), DType::fp32, {tokens, workload.index_heads, workload.index_dim});
  tensors.keys = TensorView(workload.index_k.data(), DType::fp32, {workload.shape.keys, workload.index_dim});
  tensors.weights = TensorView(workload.index_w.data(), DType::fp32, {tokens, workload.index_heads});
  return tensors;
}

}  // namespace keysel
