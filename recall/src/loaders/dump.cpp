// Attention dumps: the layout of docs/dumps.md on top of the safetensors reader and writer.
#include "keysel/recall/dump.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <map>
#include <optional>
#include <sstream>

#include "loaders/loader_support.h"

namespace keysel {
namespace {

using detail::throw_file_error;

std::string shape_text(const std::vector<std::int64_t>& shape) { return detail::describe(shape); }

/// Parses "layer{L}.{name}" into L and name; false for other names.
bool split_layer_name(std::string_view full, std::int64_t& layer, std::string_view& name) {
  constexpr std::string_view kPrefix = "layer";
  if (full.substr(0, kPrefix.size()) != kPrefix) return false;
  const std::size_t dot = full.find('.', kPrefix.size());
  if (dot == std::string_view::npos || dot == kPrefix.size() || dot - kPrefix.size() > 9) return false;
  const std::string_view digits = full.substr(kPrefix.size(), dot - kPrefix.size());
  for (const char c : digits) {
    if (c < '0' || c > '9') return false;
  }
  const auto [ptr, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), layer);
  if (ec != std::errc() || ptr != digits.data() + digits.size()) return false;
  name = full.substr(dot + 1);
  return true;
}

bool is_attention_float(DType d) {
  return d == DType::fp32 || d == DType::fp16 || d == DType::bf16 || d == DType::fp8_e4m3 || d == DType::fp8_e5m2 ||
         d == DType::fp64;
}

struct Checker {
  std::string_view function;
  std::string_view source;

  void float_tensor(const LoadedTensor& t, std::size_t rank) const {
    if (!is_attention_float(t.dtype)) {
      throw_file_error(function, source, t.name,
                       "expected a floating dtype (fp32, fp16, bf16, fp8_e4m3, fp8_e5m2, fp64), found " +
                           std::string(dtype_name(t.dtype)));
    }
    if (t.shape.size() != rank) {
      throw_file_error(function, source, t.name,
                       "expected rank " + std::to_string(rank) + ", found shape " + shape_text(t.shape));
    }
  }
  /// NaN or an infinity in a dump is a broken capture: say which tensor and where, before any study uses it.
  void finite(const LoadedTensor& t) const {
    const std::vector<float> values = t.to_float();
    for (std::size_t i = 0; i < values.size(); ++i) {
      if (!std::isfinite(values[i])) {
        throw_file_error(function, source, t.name,
                         "expected finite values, found " + std::to_string(values[i]) + " at flat index " +
                             std::to_string(i));
      }
    }
  }
  void extent(const LoadedTensor& t, std::size_t dim, std::int64_t expected, std::string_view what) const {
    if (t.shape[dim] != expected) {
      throw_file_error(function, source, t.name,
                       "expected dimension " + std::to_string(dim) + " = " + std::to_string(expected) + " (" +
                           std::string(what) + "), found shape " + shape_text(t.shape));
    }
  }
};

void validate_layer(const DumpLayer& layer, const Checker& check) {
  check.float_tensor(layer.q, 3);
  check.float_tensor(layer.k, 3);
  check.float_tensor(layer.v, 3);
  const std::int64_t T = layer.q.shape[0], Hq = layer.q.shape[1], D = layer.q.shape[2];
  const std::int64_t N = layer.k.shape[0], Hkv = layer.k.shape[1];
  if (T < 1 || Hq < 1 || D < 1)
    throw_file_error(check.function, check.source, layer.q.name,
                     "expected non-empty [T, Hq, D], found " + shape_text(layer.q.shape));
  if (N < 1 || Hkv < 1)
    throw_file_error(check.function, check.source, layer.k.name,
                     "expected non-empty [N, Hkv, D], found " + shape_text(layer.k.shape));
  check.extent(layer.k, 2, D, "D of q");
  if (Hq % Hkv != 0) {
    throw_file_error(check.function, check.source, layer.k.name,
                     "expected Hkv dividing Hq = " + std::to_string(Hq) + ", found Hkv = " + std::to_string(Hkv));
  }
  check.extent(layer.v, 0, N, "N of k");
  check.extent(layer.v, 1, Hkv, "Hkv of k");
  if (layer.v.shape[2] < 1) throw_file_error(check.function, check.source, layer.v.name, "expected Dv >= 1");
  if (layer.positions.dtype != DType::int32 || layer.positions.shape.size() != 1 || layer.positions.shape[0] != T) {
    throw_file_error(check.function, check.source, layer.positions.name,
                     "expected int32 (or int64) [T = " + std::to_string(T) + "], found " +
                         std::string(dtype_name(layer.positions.dtype)) + " " + shape_text(layer.positions.shape));
  }
  for (std::int64_t t = 0; t < T; ++t) {
    std::int32_t pos = 0;
    std::memcpy(&pos, layer.positions.data.data() + t * 4, 4);
    if (pos < 0 || pos >= N) {
      throw_file_error(check.function, check.source, layer.positions.name,
                       "expected positions >= 0 and < N = " + std::to_string(N) + ", found " + std::to_string(pos) +
                           " at query " + std::to_string(t));
    }
  }
  if (layer.index_q) {
    check.float_tensor(*layer.index_q, 3);
    check.extent(*layer.index_q, 0, T, "T of q");
  }
  if (layer.index_k) {
    check.float_tensor(*layer.index_k, 2);
    check.extent(*layer.index_k, 0, N, "N of k");
    if (layer.index_q) check.extent(*layer.index_k, 1, layer.index_q->shape[2], "DI of index_q");
  }
  if (layer.index_w) {
    check.float_tensor(*layer.index_w, 2);
    check.extent(*layer.index_w, 0, T, "T of q");
    if (layer.index_q) check.extent(*layer.index_w, 1, layer.index_q->shape[1], "HI of index_q");
  }
  // The indexer's tensors come as a set: one or two of them is a capture that lost the others.
  const int indexer_tensors = (layer.index_q ? 1 : 0) + (layer.index_k ? 1 : 0) + (layer.index_w ? 1 : 0);
  if (indexer_tensors != 0 && indexer_tensors != 3) {
    const LoadedTensor& present = layer.index_q ? *layer.index_q : layer.index_k ? *layer.index_k : *layer.index_w;
    throw_file_error(check.function, check.source, present.name,
                     std::string("expected index_q, index_k and index_w together (docs/dumps.md), found only ") +
                         (layer.index_q ? "index_q " : "") + (layer.index_k ? "index_k " : "") +
                         (layer.index_w ? "index_w" : ""));
  }
  if (layer.probabilities) {
    check.float_tensor(*layer.probabilities, 3);
    check.extent(*layer.probabilities, 0, T, "T of q");
    check.extent(*layer.probabilities, 1, Hq, "Hq of q");
    check.extent(*layer.probabilities, 2, N, "N of k");
  }
  for (const LoadedTensor* t : {&layer.q, &layer.k, &layer.v, layer.index_q ? &*layer.index_q : nullptr,
                                layer.index_k ? &*layer.index_k : nullptr, layer.index_w ? &*layer.index_w : nullptr,
                                layer.probabilities ? &*layer.probabilities : nullptr}) {
    if (t != nullptr) check.finite(*t);
  }
}

Dump dump_from_file(SafetensorsFile file, std::string_view source, std::string_view function) {
  Dump dump;
  dump.source = std::string(source);
  dump.metadata = std::move(file.metadata);
  if (const auto it = dump.metadata.find("format"); it != dump.metadata.end() && it->second != kDumpFormat) {
    throw_file_error(function, source, "",
                     "expected metadata format \"" + std::string(kDumpFormat) + "\", found \"" + it->second + "\"");
  }
  if (const auto it = dump.metadata.find("model"); it != dump.metadata.end()) dump.model = it->second;
  if (const auto it = dump.metadata.find("scale"); it != dump.metadata.end()) {
    double scale = 0;
    std::istringstream in(it->second);
    in.imbue(std::locale::classic());
    in >> scale;
    if (in.fail() || !(in >> std::ws).eof() || !std::isfinite(scale) || scale < 0) {
      throw_file_error(function, source, "",
                       "expected metadata scale to be a finite number >= 0, found \"" + it->second + "\"");
    }
    dump.scale = scale;
  }

  std::map<std::int64_t, DumpLayer> layers;
  std::map<std::int64_t, int> required;  // bit mask of q, k, v, positions seen
  std::map<std::int64_t, std::pair<std::optional<LoadedTensor>, std::optional<LoadedTensor>>> latents;  // MLA form
  for (LoadedTensor& t : file.tensors) {
    std::int64_t index = 0;
    std::string_view name;
    if (!split_layer_name(t.name, index, name)) continue;  // other tensors are allowed and ignored
    DumpLayer& layer = layers[index];
    layer.index = index;
    int& mask = required[index];
    if (name == "q") {
      layer.q = std::move(t), mask |= 1;
    } else if (name == "k") {
      layer.k = std::move(t), mask |= 2;
    } else if (name == "v") {
      layer.v = std::move(t), mask |= 4;
    } else if (name == "positions") {
      layer.positions = std::move(t), mask |= 8;
    } else if (name == "index_q") {
      layer.index_q = std::move(t);
    } else if (name == "index_k") {
      layer.index_k = std::move(t);
    } else if (name == "index_w") {
      layer.index_w = std::move(t);
    } else if (name == "probs") {
      layer.probabilities = std::move(t);
    } else if (name == "kv_latent") {
      latents[index].first = std::move(t);
    } else if (name == "k_rope") {
      latents[index].second = std::move(t);
    }
  }
  // The MLA form (docs/dumps.md): kv_latent [N, Dc] and k_rope [N, Dr] instead of k and v become the MQA shape
  // k = [kv_latent | k_rope] [N, 1, Dc + Dr], v = kv_latent [N, 1, Dc], in fp32 (both decode exactly).
  for (auto& [index, parts] : latents) {
    DumpLayer& layer = layers[index];
    const std::string prefix = "layer" + std::to_string(index) + ".";
    if (!parts.first || !parts.second) {
      throw_file_error(function, source, prefix + (parts.first ? "k_rope" : "kv_latent"),
                       "is missing (the MLA form needs kv_latent and k_rope together)");
    }
    if (required[index] & 6) {
      throw_file_error(function, source, prefix + "kv_latent",
                       "expected either k and v or the MLA form (kv_latent, k_rope), found both");
    }
    const Checker check{function, source};
    check.float_tensor(*parts.first, 2);
    check.float_tensor(*parts.second, 2);
    const std::int64_t n = parts.first->shape[0], dc = parts.first->shape[1], dr = parts.second->shape[1];
    check.extent(*parts.second, 0, n, "N of kv_latent");
    if (n < 1 || dc < 1) {
      throw_file_error(function, source, parts.first->name,
                       "expected non-empty [N, Dc], found " + shape_text(parts.first->shape));
    }
    const std::vector<float> latent = parts.first->to_float(), rope = parts.second->to_float();
    std::vector<float> k(static_cast<std::size_t>(n * (dc + dr)));
    for (std::int64_t s = 0; s < n; ++s) {
      std::copy_n(latent.begin() + s * dc, dc, k.begin() + s * (dc + dr));
      std::copy_n(rope.begin() + s * dr, dr, k.begin() + s * (dc + dr) + dc);
    }
    layer.k = LoadedTensor::from_float(prefix + "k", k, {n, 1, dc + dr});
    layer.v = LoadedTensor::from_float(prefix + "v", latent, {n, 1, dc});
    required[index] |= 6;
  }
  if (layers.empty()) {
    throw_file_error(function, source, "",
                     "expected tensors named layer{L}.q, .k, .v, .positions (docs/dumps.md), found none");
  }
  const Checker check{function, source};
  for (auto& [index, layer] : layers) {
    const int mask = required[index];
    constexpr const char* kNames[] = {"q", "k", "v", "positions"};
    for (int bit = 0; bit < 4; ++bit) {
      if (!(mask & (1 << bit))) {
        throw_file_error(function, source, "layer" + std::to_string(index) + "." + kNames[bit],
                         "is missing (layer " + std::to_string(index) + " has other tensors)");
      }
    }
    validate_layer(layer, check);
    dump.layers.push_back(std::move(layer));
  }
  return dump;
}

}  // namespace

AttentionShape DumpLayer::shape() const {
  return {q.shape.at(0), k.shape.at(0), q.shape.at(1), k.shape.at(1), q.shape.at(2), v.shape.at(2)};
}

Workload Dump::workload(std::size_t i) const {
  KEYSEL_CHECK_ARG(i < layers.size(), "i", "< layers.size() = " + std::to_string(layers.size()), i);
  const DumpLayer& layer = layers[i];
  Workload w;
  std::ostringstream name;
  name << "dump(" << (model.empty() ? source : model) << ", layer " << layer.index << ")";
  w.name = name.str();
  w.shape = layer.shape();
  w.q = layer.q.to_float();
  w.k = layer.k.to_float();
  w.v = layer.v.to_float();
  w.positions.resize(static_cast<std::size_t>(w.shape.tokens));
  std::memcpy(w.positions.data(), layer.positions.data.data(), w.positions.size() * 4);
  w.scale = scale;
  if (layer.index_q && layer.index_k && layer.index_w) {
    w.index_heads = layer.index_q->shape[1];
    w.index_dim = layer.index_q->shape[2];
    w.index_q = layer.index_q->to_float();
    w.index_k = layer.index_k->to_float();
    w.index_w = layer.index_w->to_float();
  }
  return w;
}

const DumpLayer& Dump::layer(std::int64_t index) const {
  for (const DumpLayer& l : layers) {
    if (l.index == index) return l;
  }
  std::vector<std::int64_t> present;
  for (const DumpLayer& l : layers) present.push_back(l.index);
  detail::throw_argument_error("Dump::layer", "index", "one of " + detail::describe(present), std::to_string(index));
}

Dump dump_from_safetensors(SafetensorsFile file, std::string_view source) {
  return dump_from_file(std::move(file), source, "dump_from_safetensors");
}

Dump load_dump(const std::filesystem::path& path) {
  return dump_from_file(read_safetensors(path), path.string(), "load_dump");
}

void write_dump(const std::filesystem::path& path, const Dump& dump) {
  std::vector<LoadedTensor> tensors;
  std::string layer_list;
  for (const DumpLayer& layer : dump.layers) {
    const std::string prefix = "layer" + std::to_string(layer.index) + ".";
    const auto add = [&](const LoadedTensor& t, const char* name) {
      LoadedTensor copy = t;
      copy.name = prefix + name;
      tensors.push_back(std::move(copy));
    };
    add(layer.q, "q");
    add(layer.k, "k");
    add(layer.v, "v");
    add(layer.positions, "positions");
    if (layer.index_q) add(*layer.index_q, "index_q");
    if (layer.index_k) add(*layer.index_k, "index_k");
    if (layer.index_w) add(*layer.index_w, "index_w");
    if (layer.probabilities) add(*layer.probabilities, "probs");
    if (!layer_list.empty()) layer_list += ',';
    layer_list += std::to_string(layer.index);
  }
  std::map<std::string, std::string, std::less<>> metadata = dump.metadata;
  metadata["format"] = std::string(kDumpFormat);
  if (!dump.model.empty()) metadata["model"] = dump.model;
  {
    std::ostringstream scale;
    scale.imbue(std::locale::classic());
    scale.precision(17);
    scale << dump.scale;
    metadata["scale"] = scale.str();
  }
  metadata["layers"] = layer_list;
  // Validate before writing, so that a dump this function writes always loads.
  SafetensorsFile check;
  check.metadata = metadata;
  check.tensors = tensors;
  (void)dump_from_file(std::move(check), path.string(), "write_dump");
  write_safetensors(path, tensors, metadata);
}

}  // namespace keysel
