// Attention dumps of real models (docs/dumps.md): per layer q, k, v and positions, optionally the indexer's
// qI, kI, w and the model's own attention probabilities, in one safetensors file.
//
//   keysel::Dump dump = keysel::load_dump("llama.safetensors");  // written by tools/capture_dump.py
//   keysel::Workload w = dump.workload(0);                        // fp32 inputs of layer dump.layers[0]
//   keysel::ExactReference reference(w.inputs(), keysel::Granularity::per_kv_head);
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "keysel/recall/loaders.h"
#include "keysel/recall/synthetic.h"

namespace keysel {

/// The format string a dump's metadata carries under "format".
inline constexpr std::string_view kDumpFormat = "keysel-dump/1";

/// One layer of a dump. Tensor names in the file are "layer{index}.<name>".
struct DumpLayer {
  std::int64_t index = 0;   // the model's layer number
  LoadedTensor q;           // "q"          [T, Hq, D]    after RoPE; fp32, fp16, bf16, fp8
  LoadedTensor k;           // "k"          [N, Hkv, D]   after RoPE
  LoadedTensor v;           // "v"          [N, Hkv, Dv]
  LoadedTensor positions;   // "positions"  [T] int32 (I64 in the file is narrowed), >= 0
  std::optional<LoadedTensor> index_q;        // "index_q"  [T, HI, DI]  Lightning-Indexer queries
  std::optional<LoadedTensor> index_k;        // "index_k"  [N, DI]      indexer keys
  std::optional<LoadedTensor> index_w;        // "index_w"  [T, HI]      indexer head weights
  std::optional<LoadedTensor> probabilities;  // "probs"    [T, Hq, N]   the model's attention probabilities

  AttentionShape shape() const;
};

struct Dump {
  std::string source;                                        // the file it came from
  std::map<std::string, std::string, std::less<>> metadata;  // the safetensors __metadata__
  std::string model;                                         // metadata "model" (may be empty)
  double scale = 0.0;                                        // metadata "scale"; 0 means 1/sqrt(D)
  std::vector<DumpLayer> layers;                             // ascending layer index

  /// The fp32 workload of layers[i] (q, k, v converted to fp32, Workload::scale = the dump's scale, and the
  /// indexer tensors index_q/index_k/index_w when the layer has them), named "dump(<model>, layer <index>)".
  Workload workload(std::size_t i) const;
  /// layers[i] of the model's layer `index`; throws keysel::Error when the dump has no such layer.
  const DumpLayer& layer(std::int64_t index) const;
};

/// Loads and validates a dump: every layer must have q, k, v and positions with consistent shapes
/// (Hq % Hkv == 0, one position per query, positions >= 0), the optional tensors must match them, and the
/// metadata "format" (when present) must be kDumpFormat. Throws keysel::Error naming the file, the tensor and what
/// was expected versus found.
Dump load_dump(const std::filesystem::path& path);
/// Validates the layers of a parsed safetensors file as load_dump does (for dumps held in memory).
Dump dump_from_safetensors(SafetensorsFile file, std::string_view source = "<memory>");
/// Writes `dump` in the documented layout (metadata: format, model, scale, layers, plus dump.metadata).
void write_dump(const std::filesystem::path& path, const Dump& dump);

}  // namespace keysel
