// The tiny language model's file side (tiny_lm.h): config JSON, loading and checking the weights, where the
// shipped model lives, and bits per byte. The forward passes are in tiny_lm_forward.cpp and
// tiny_lm_reference.cpp.
#include "keysel/recall/tiny_lm.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "loaders/loader_support.h"
#include "tiny_lm/tiny_lm_weights.h"

namespace keysel {
namespace {

using detail::throw_file_error;
using nlohmann::json;

constexpr std::string_view kIntegerFields[] = {"vocab",    "d_model", "layers",  "heads",       "kv_heads",
                                               "head_dim", "ffn_dim", "context", "index_heads", "index_dim"};
constexpr std::string_view kRealFields[] = {"rope_theta", "norm_eps"};

std::int64_t* integer_field(TinyLmConfig& c, std::string_view name) {
  if (name == "vocab") return &c.vocab;
  if (name == "d_model") return &c.d_model;
  if (name == "layers") return &c.layers;
  if (name == "heads") return &c.heads;
  if (name == "kv_heads") return &c.kv_heads;
  if (name == "head_dim") return &c.head_dim;
  if (name == "ffn_dim") return &c.ffn_dim;
  if (name == "context") return &c.context;
  if (name == "index_heads") return &c.index_heads;
  return &c.index_dim;
}

double* real_field(TinyLmConfig& c, std::string_view name) {
  return name == "rope_theta" ? &c.rope_theta : &c.norm_eps;
}

std::string shape_text(const std::vector<std::int64_t>& shape) { return detail::describe(shape); }

/// What the weights of one file are checked against: name -> expected shape, in the order they are checked.
struct ExpectedTensor {
  std::string name;
  std::vector<std::int64_t> shape;
};

std::vector<ExpectedTensor> expected_tensors(const TinyLmConfig& c) {
  const std::int64_t d = c.d_model, D = c.head_dim;
  std::vector<ExpectedTensor> out = {{"embed", {c.vocab, d}}, {"final_norm", {d}}, {"lm_head", {c.vocab, d}}};
  for (std::int64_t l = 0; l < c.layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    out.push_back({p + "attn_norm", {d}});
    out.push_back({p + "wq", {c.heads * D, d}});
    out.push_back({p + "wk", {c.kv_heads * D, d}});
    out.push_back({p + "wv", {c.kv_heads * D, d}});
    out.push_back({p + "wo", {d, c.heads * D}});
    out.push_back({p + "mlp_norm", {d}});
    out.push_back({p + "w_gate", {c.ffn_dim, d}});
    out.push_back({p + "w_up", {c.ffn_dim, d}});
    out.push_back({p + "w_down", {d, c.ffn_dim}});
    if (c.index_heads > 0) {
      out.push_back({p + "index_wq", {c.index_heads * c.index_dim, d}});
      out.push_back({p + "index_wk", {c.index_dim, d}});
      out.push_back({p + "index_ww", {c.index_heads, d}});
    }
  }
  return out;
}

/// Why a tensor the config does not describe is in the file, for the error message.
std::string unexpected_reason(const TinyLmConfig& c, const std::string& name) {
  if (name.rfind("layers.", 0) == 0) {
    if (name.find(".index_") != std::string::npos && c.index_heads == 0) {
      return "the config has index_heads 0 (no indexer)";
    }
    return "the config has " + std::to_string(c.layers) + " layers (0.." + std::to_string(c.layers - 1) +
           ") with tensors attn_norm, wq, wk, wv, wo, mlp_norm, w_gate, w_up, w_down" +
           (c.index_heads > 0 ? ", index_wq, index_wk, index_ww" : "");
  }
  return "not a tensor of the keysel-tiny-lm/1 layout";
}

/// The checked fp32 values of one tensor.
std::vector<float> checked_values(const SafetensorsFile& file, std::string_view source, const ExpectedTensor& e,
                                  const TinyLmConfig& config) {
  constexpr std::string_view function = "TinyLm::load";
  const LoadedTensor* t = file.find(e.name);
  if (t == nullptr) {
    throw_file_error(function, source, e.name,
                     "missing (the config asks for " + std::to_string(config.layers) + " layers" +
                         (config.index_heads > 0 ? " with an indexer" : "") + ")");
  }
  if (t->dtype != DType::fp32 && t->dtype != DType::fp16 && t->dtype != DType::bf16) {
    throw_file_error(function, source, e.name,
                     "expected dtype F32, F16 or BF16, found " + std::string(dtype_name(t->dtype)));
  }
  if (t->shape != e.shape) {
    throw_file_error(function, source, e.name,
                     "expected shape " + shape_text(e.shape) + " (from the config " + tiny_lm_config_json(config) +
                         "), found " + shape_text(t->shape));
  }
  std::vector<float> values = t->to_float();
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (!std::isfinite(values[i])) {
      throw_file_error(
          function, source, e.name,
          "expected finite values, found " + std::to_string(values[i]) + " at flat index " + std::to_string(i));
    }
  }
  return values;
}

void append(std::vector<float>& to, const std::vector<float>& from) { to.insert(to.end(), from.begin(), from.end()); }

}  // namespace

// ---- config ---------------------------------------------------------------------------------------------

void TinyLmConfig::validate(std::string_view function) const {
  KEYSEL_CHECK_ARG_IN(function, vocab >= 1, "config.vocab", ">= 1", vocab);
  KEYSEL_CHECK_ARG_IN(function, d_model >= 1, "config.d_model", ">= 1", d_model);
  KEYSEL_CHECK_ARG_IN(function, layers >= 1, "config.layers", ">= 1", layers);
  KEYSEL_CHECK_ARG_IN(function, heads >= 1, "config.heads", ">= 1", heads);
  KEYSEL_CHECK_ARG_IN(function, kv_heads >= 1 && heads % kv_heads == 0, "config.kv_heads",
                      ">= 1 and dividing heads = " + std::to_string(heads), kv_heads);
  KEYSEL_CHECK_ARG_IN(function, head_dim >= 2 && head_dim % 2 == 0, "config.head_dim", "even and >= 2 (RoPE)",
                      head_dim);
  KEYSEL_CHECK_ARG_IN(function, ffn_dim >= 1, "config.ffn_dim", ">= 1", ffn_dim);
  KEYSEL_CHECK_ARG_IN(function, context >= 1 && context <= std::numeric_limits<std::int32_t>::max(), "config.context",
                      ">= 1 (and positions fitting int32)", context);
  KEYSEL_CHECK_ARG_IN(function, std::isfinite(rope_theta) && rope_theta > 0, "config.rope_theta", "finite and > 0",
                      rope_theta);
  KEYSEL_CHECK_ARG_IN(function, std::isfinite(norm_eps) && norm_eps >= 0, "config.norm_eps", "finite and >= 0",
                      norm_eps);
  KEYSEL_CHECK_ARG_IN(function, index_heads >= 0, "config.index_heads", ">= 0 (0: no indexer)", index_heads);
  if (index_heads > 0) {
    KEYSEL_CHECK_ARG_IN(function, index_dim >= 2 && index_dim % 2 == 0, "config.index_dim",
                        "even and >= 2 (RoPE) when index_heads > 0", index_dim);
  }
  // Matrix extents are BLAS ints: keep every one of them far from 2^31.
  constexpr std::int64_t kMaxExtent = std::int64_t{1} << 24;
  for (const std::int64_t extent : {vocab, d_model, heads * head_dim, ffn_dim * 2, index_heads * index_dim}) {
    KEYSEL_CHECK_ARG_IN(function, extent <= kMaxExtent, "config", "matrix extents <= 2^24", extent);
  }
}

std::string tiny_lm_config_json(const TinyLmConfig& config) {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  TinyLmConfig c = config;
  for (const std::string_view name : kIntegerFields) j[std::string(name)] = *integer_field(c, name);
  for (const std::string_view name : kRealFields) j[std::string(name)] = *real_field(c, name);
  return j.dump();
}

TinyLmConfig parse_tiny_lm_config(std::string_view text) {
  constexpr std::string_view function = "parse_tiny_lm_config";
  const json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  KEYSEL_CHECK_ARG_IN(function, !j.is_discarded(), "config", "valid JSON", std::string(text));
  KEYSEL_CHECK_ARG_IN(function, j.is_object(), "config", "a JSON object", std::string(text));
  std::set<std::string, std::less<>> known;
  for (const std::string_view name : kIntegerFields) known.emplace(name);
  for (const std::string_view name : kRealFields) known.emplace(name);
  for (const auto& [key, value] : j.items()) {
    KEYSEL_CHECK_ARG_IN(
        function, known.contains(key), "config." + key,
        "one of the TinyLmConfig fields " + detail::describe(std::vector<std::string>(known.begin(), known.end())),
        "an unknown key");
  }
  TinyLmConfig c;
  for (const std::string_view name : kIntegerFields) {
    const std::string key(name);
    const auto it = j.find(key);
    KEYSEL_CHECK_ARG_IN(function, it != j.end(), "config." + key, "present", "no such key");
    KEYSEL_CHECK_ARG_IN(function, it->is_number_integer(), "config." + key, "an integer", it->dump());
    if (it->is_number_unsigned()) {
      const auto u = it->get<std::uint64_t>();
      KEYSEL_CHECK_ARG_IN(function, u <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()),
                          "config." + key, "an int64", it->dump());
    }
    *integer_field(c, name) = it->get<std::int64_t>();
  }
  for (const std::string_view name : kRealFields) {
    const std::string key(name);
    const auto it = j.find(key);
    KEYSEL_CHECK_ARG_IN(function, it != j.end(), "config." + key, "present", "no such key");
    KEYSEL_CHECK_ARG_IN(function, it->is_number(), "config." + key, "a number", it->dump());
    *real_field(c, name) = it->get<double>();
  }
  c.validate(function);
  return c;
}

// ---- loading --------------------------------------------------------------------------------------------

TinyLm::TinyLm(TinyLmConfig config, std::shared_ptr<const Weights> weights)
    : config_(config), weights_(std::move(weights)) {}

TinyLm TinyLm::load(const std::string& path) { return from_safetensors(read_safetensors(path), path); }

TinyLm TinyLm::from_safetensors(const SafetensorsFile& file, std::string_view source) {
  constexpr std::string_view function = "TinyLm::load";
  const auto format = file.metadata.find("format");
  if (format == file.metadata.end()) {
    throw_file_error(function, source, "",
                     "missing metadata \"format\" (expected \"" + std::string(kTinyLmFormat) + "\")");
  }
  if (format->second != kTinyLmFormat) {
    throw_file_error(
        function, source, "",
        "expected metadata format \"" + std::string(kTinyLmFormat) + "\", found \"" + format->second + "\"");
  }
  const auto config_text = file.metadata.find("config");
  if (config_text == file.metadata.end()) throw_file_error(function, source, "", "missing metadata \"config\"");
  TinyLmConfig config;
  try {
    config = parse_tiny_lm_config(config_text->second);
  } catch (const Error& e) {
    throw_file_error(function, source, "", std::string("bad metadata \"config\": ") + e.what());
  }

  const std::vector<ExpectedTensor> expected = expected_tensors(config);
  std::set<std::string, std::less<>> expected_names;
  for (const ExpectedTensor& e : expected) expected_names.insert(e.name);
  for (const LoadedTensor& t : file.tensors) {
    if (!expected_names.contains(t.name)) {
      throw_file_error(function, source, t.name, "unexpected tensor: " + unexpected_reason(config, t.name));
    }
  }

  auto weights = std::make_shared<Weights>();
  std::size_t next = 0;
  const auto take = [&] { return checked_values(file, source, expected[next++], config); };
  weights->embed = take();
  weights->final_norm = take();
  weights->lm_head = take();
  const TinyLmInputRows rows(config);
  weights->layers.resize(static_cast<std::size_t>(config.layers));
  for (Weights::Layer& layer : weights->layers) {
    layer.attn_norm = take();
    layer.input.reserve(static_cast<std::size_t>(rows.total * config.d_model));
    append(layer.input, take());  // wq
    append(layer.input, take());  // wk
    append(layer.input, take());  // wv
    layer.wo = take();
    layer.mlp_norm = take();
    layer.gate_up = take();
    append(layer.gate_up, take());  // w_up below w_gate
    layer.w_down = take();
    if (config.index_heads > 0) {
      append(layer.input, take());  // index_wq
      append(layer.input, take());  // index_wk
      append(layer.input, take());  // index_ww
    }
  }
  return TinyLm(config, std::move(weights));
}

// ---- traces ---------------------------------------------------------------------------------------------

SelectionRequest TinyLmLayer::request() const {
  SelectionRequest request = SelectionRequest::of(attention);
  request.indexer_queries = index_q;
  request.indexer_weights = index_w;
  request.cache = CacheReuse::fresh;
  return request;
}

TinyLmLayer TinyLmLayerRecord::view(const TinyLmConfig& config) const {
  const std::int64_t T = tokens;
  KEYSEL_CHECK_ARG(q.size() == static_cast<std::size_t>(T * config.heads * config.head_dim) &&
                       k.size() == static_cast<std::size_t>(T * config.kv_heads * config.head_dim) &&
                       v.size() == k.size() && positions.size() == static_cast<std::size_t>(T),
                   "config", "the shape this record was made with", tiny_lm_config_json(config));
  TinyLmLayer out;
  out.layer = layer;
  out.attention.q = TensorView(static_cast<const void*>(q.data()), DType::fp32, {T, config.heads, config.head_dim});
  out.attention.k = TensorView(static_cast<const void*>(k.data()), DType::fp32, {T, config.kv_heads, config.head_dim});
  out.attention.v = TensorView(static_cast<const void*>(v.data()), DType::fp32, {T, config.kv_heads, config.head_dim});
  out.attention.positions = TensorView(static_cast<const void*>(positions.data()), DType::int32, {T});
  out.attention.scale = 1.0 / std::sqrt(static_cast<double>(config.head_dim));
  if (config.index_heads > 0 && !index_q.empty()) {
    KEYSEL_CHECK_ARG(index_q.size() == static_cast<std::size_t>(T * config.index_heads * config.index_dim) &&
                         index_k.size() == static_cast<std::size_t>(T * config.index_dim) &&
                         index_w.size() == static_cast<std::size_t>(T * config.index_heads),
                     "config", "the indexer shape this record was made with", tiny_lm_config_json(config));
    out.index_q =
        TensorView(static_cast<const void*>(index_q.data()), DType::fp32, {T, config.index_heads, config.index_dim});
    out.index_k = TensorView(static_cast<const void*>(index_k.data()), DType::fp32, {T, config.index_dim});
    out.index_w = TensorView(static_cast<const void*>(index_w.data()), DType::fp32, {T, config.index_heads});
  }
  return out;
}

// ---- bits per byte --------------------------------------------------------------------------------------

namespace {

/// Sum over i < T - 1 of -log2 softmax(logits[i])[tokens[i + 1]], in double.
double total_bits(std::string_view function, std::span<const float> logits, std::span<const std::uint8_t> tokens,
                  std::int64_t vocab) {
  KEYSEL_CHECK_ARG_IN(function, vocab >= 1, "vocab", ">= 1", vocab);
  const auto T = static_cast<std::int64_t>(tokens.size());
  KEYSEL_CHECK_ARG_IN(function, logits.size() == static_cast<std::size_t>(T * vocab), "logits",
                      "tokens.size() * vocab = " + std::to_string(T * vocab) + " values", logits.size());
  double bits = 0;
  for (std::int64_t i = 0; i + 1 < T; ++i) {
    const std::int64_t next = tokens[static_cast<std::size_t>(i + 1)];
    KEYSEL_CHECK_ARG_IN(function, next < vocab, "tokens", "values < vocab = " + std::to_string(vocab),
                        "tokens[" + std::to_string(i + 1) + "] = " + std::to_string(next));
    const float* row = logits.data() + i * vocab;
    double max = -std::numeric_limits<double>::infinity();
    for (std::int64_t j = 0; j < vocab; ++j) max = std::max(max, static_cast<double>(row[j]));
    KEYSEL_CHECK_ARG_IN(function, std::isfinite(max), "logits", "finite values",
                        "row " + std::to_string(i) + " with maximum " + std::to_string(max));
    double sum = 0;
    for (std::int64_t j = 0; j < vocab; ++j) sum += std::exp(static_cast<double>(row[j]) - max);
    bits += (max + std::log(sum) - static_cast<double>(row[next])) / std::log(2.0);
  }
  return bits;
}

double windowed(std::string_view function, const TinyLm& model, std::span<const std::uint8_t> text, std::int64_t window,
                const TinyLmSparse* sparse) {
  KEYSEL_CHECK_ARG_IN(function, model.loaded(), "model", "a loaded model", "a default-constructed TinyLm");
  const TinyLmConfig& c = model.config();
  KEYSEL_CHECK_ARG_IN(function, window >= 1 && window <= c.context, "window",
                      "in [1, context = " + std::to_string(c.context) + "]", window);
  const auto n = static_cast<std::int64_t>(text.size());
  const std::int64_t windows = (n + window - 1) / window;
  KEYSEL_CHECK_ARG_IN(function, n - windows >= 1, "text",
                      "at least one byte to predict in windows of " + std::to_string(window),
                      std::to_string(n) + " bytes");
  double bits = 0;
  for (std::int64_t start = 0; start < n; start += window) {
    const std::span<const std::uint8_t> part =
        text.subspan(static_cast<std::size_t>(start), static_cast<std::size_t>(std::min(window, n - start)));
    if (part.size() < 2) continue;
    const std::vector<float> logits = sparse ? model.logits(part, *sparse) : model.logits(part);
    bits += total_bits(function, logits, part, c.vocab);
  }
  return bits / static_cast<double>(n - windows);
}

}  // namespace

double bits_per_byte(std::span<const float> logits, std::span<const std::uint8_t> tokens, std::int64_t vocab) {
  KEYSEL_CHECK_ARG(tokens.size() >= 2, "tokens", "at least 2 tokens (one prediction)", tokens.size());
  return total_bits("bits_per_byte", logits, tokens, vocab) / static_cast<double>(tokens.size() - 1);
}

double windowed_bits_per_byte(const TinyLm& model, std::span<const std::uint8_t> text, std::int64_t window) {
  return windowed("windowed_bits_per_byte", model, text, window, nullptr);
}

double windowed_bits_per_byte(const TinyLm& model, std::span<const std::uint8_t> text, std::int64_t window,
                              const TinyLmSparse& sparse) {
  return windowed("windowed_bits_per_byte", model, text, window, &sparse);
}

// ---- the shipped model ----------------------------------------------------------------------------------

std::string tiny_lm_directory() {
  namespace fs = std::filesystem;
  const auto holds_model = [](const fs::path& dir) {
    std::error_code ec;
    return fs::is_regular_file(dir / "model.safetensors", ec);
  };
  if (const char* env = std::getenv("KEYSEL_TINY_LM_DIR"); env != nullptr && *env != '\0') {
    KEYSEL_CHECK(holds_model(env), "KEYSEL_TINY_LM_DIR = '" << env
                                                            << "' holds no model.safetensors (when it is "
                                                               "set, it is the only place looked at)");
    return env;
  }
  std::vector<std::string> tried;
#ifdef KEYSEL_TINY_LM_SOURCE_DIR
  tried.emplace_back(KEYSEL_TINY_LM_SOURCE_DIR);
#endif
#ifdef KEYSEL_TINY_LM_INSTALL_DIR
  tried.emplace_back(KEYSEL_TINY_LM_INSTALL_DIR);
#endif
  for (const std::string& dir : tried) {
    if (holds_model(dir)) return dir;
  }
  std::ostringstream places;
  places << "$KEYSEL_TINY_LM_DIR (not set)";
  for (const std::string& dir : tried) places << ", '" << dir << "'";
  KEYSEL_CHECK(false, "no model.safetensors of the tiny language model found; looked in " << places.str());
  return {};
}

std::int64_t check_tiny_lm_forward(std::string_view function, const TinyLmConfig& config, bool loaded,
                                   std::span<const std::uint8_t> tokens, const TinyLmSparse* sparse) {
  KEYSEL_CHECK_ARG_IN(function, loaded, "model", "a loaded model", "a default-constructed TinyLm");
  const auto T = static_cast<std::int64_t>(tokens.size());
  KEYSEL_CHECK_ARG_IN(function, T >= 1 && T <= config.context, "tokens",
                      "1 to context = " + std::to_string(config.context) + " tokens", T);
  for (std::int64_t t = 0; t < T; ++t) {
    KEYSEL_CHECK_ARG_IN(function, tokens[static_cast<std::size_t>(t)] < config.vocab, "tokens",
                        "values < vocab = " + std::to_string(config.vocab),
                        "tokens[" + std::to_string(t) + "] = " + std::to_string(tokens[static_cast<std::size_t>(t)]));
  }
  std::int64_t groups = 0;
  if (sparse != nullptr) {
    KEYSEL_CHECK_ARG_IN(function, sparse->width >= 1, "sparse.width", ">= 1", sparse->width);
    KEYSEL_CHECK_ARG_IN(function, static_cast<bool>(sparse->select), "sparse.select", "a callback", "an empty one");
    groups = group_count(sparse->granularity, config.heads, config.kv_heads);
  }
  return groups;
}

}  // namespace keysel
