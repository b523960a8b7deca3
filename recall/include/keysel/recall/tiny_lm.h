// A real model in the loop: keysel's tiny byte-level decoder, run on the CPU with attention restricted to the
// keys a selector picks, so a study measures accuracy (bits per byte) beside recall (docs/tiny-lm.md).
//
// The model (trained by tools/train_tiny_lm.py, shipped in models/tiny_lm/model.safetensors, fp16):
//   byte tokens 0..255 -> embed -> L x [ h += Wo . attn(RoPE(Wq x), RoPE(Wk x), Wv x),  x = rmsnorm(h) * attn_norm
//                                        h += Wdown (silu(Wgate x) * (Wup x)),           x = rmsnorm(h) * mlp_norm ]
//          -> rmsnorm(h) * final_norm -> lm_head -> logits [T, 256]
// GQA (query head h reads key head h / (Hq / Hkv)), causal, softmax scale 1/sqrt(D), rotate-half RoPE on q and k
// (pairs (i, i + D/2), angle pos * theta^(-2i/D)), RMSNorm x / sqrt(mean(x^2) + eps) * weight.
// Each layer also carries a Lightning Indexer (SPEC §3) over the same normed input x of the attention:
//   qI[t] = RoPE(index_wq x[t]) as [HI, DI],  kI[s] = RoPE(index_wk x[s]) [DI],  w[t] = index_ww x[t] [HI],
// trained with the model frozen to match the mean attention distribution of all heads of its layer.
//
// Weight file (safetensors, F16, F32 or BF16; names; W[out, in] as torch.nn.Linear stores them):
//   embed [V, d]   final_norm [d]   lm_head [V, d]
//   layers.{l}.attn_norm [d]  .wq [Hq*D, d]  .wk [Hkv*D, d]  .wv [Hkv*D, d]  .wo [d, Hq*D]
//   layers.{l}.mlp_norm [d]   .w_gate [F, d] .w_up [F, d]    .w_down [d, F]
//   layers.{l}.index_wq [HI*DI, d]  .index_wk [DI, d]  .index_ww [HI, d]      (all three or none)
// __metadata__: "format" = "keysel-tiny-lm/1", "config" = JSON object with the TinyLmConfig fields by name.
//
// Computation (TinyLm::logits): fp32 throughout, weight matrices multiplied with BLAS sgemm (the q, k, v and
// indexer projections of a layer in one call, gate and up in one call), RoPE angles in double rounded to fp32,
// RMSNorm sums in double, attention through keysel::full_attention_fast or, with a TinyLmSparse,
// keysel::sparse_attention over the caller's selection. tiny_lm_reference_logits is the plain double-precision
// reference of the same model (straight loops), against which the tests check the fast forward.
// Threads: the element-wise steps and attention follow keysel::num_threads(); the BLAS library runs its own
// threads (OPENBLAS_NUM_THREADS for OpenBLAS).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "keysel/core/attention_inputs.h"
#include "keysel/core/selection.h"
#include "keysel/core/tensor.h"
#include "keysel/indexer/selector.h"
#include "keysel/recall/loaders.h"

namespace keysel {

/// The format string a weight file's metadata carries under "format".
inline constexpr std::string_view kTinyLmFormat = "keysel-tiny-lm/1";

/// The model's shape. Every field is required in a weight file's "config" JSON (numbers, by these names).
struct TinyLmConfig {
  std::int64_t vocab = 256;      // V; tokens are bytes and each must be < V (256 for the shipped model)
  std::int64_t d_model = 384;    // d
  std::int64_t layers = 6;       // L
  std::int64_t heads = 6;        // Hq
  std::int64_t kv_heads = 2;     // Hkv, dividing Hq
  std::int64_t head_dim = 64;    // D (= Dv), even (rotate-half RoPE)
  std::int64_t ffn_dim = 1024;   // F
  std::int64_t context = 4096;   // longest sequence the model was trained on, and the longest logits() takes
  double rope_theta = 10000.0;   // RoPE base, > 0
  double norm_eps = 1e-5;        // RMSNorm epsilon, >= 0
  std::int64_t index_heads = 4;  // HI (0: no indexer)
  std::int64_t index_dim = 32;   // DI, even when HI > 0 (ignored when HI = 0)

  /// Checks every field (positive sizes, Hkv dividing Hq, even D and DI, finite theta > 0 and eps >= 0);
  /// throws keysel::Error of `function` naming the field otherwise.
  void validate(std::string_view function) const;
};

/// The "config" JSON of a weight file for `config` (every field, by name).
std::string tiny_lm_config_json(const TinyLmConfig& config);
/// Parses a "config" JSON object: every field of TinyLmConfig must be present, a number of the right kind
/// (integers for the sizes), and no other key may appear; then validate(). Throws keysel::Error naming the key.
TinyLmConfig parse_tiny_lm_config(std::string_view json);

/// What one layer's attention sees in a forward pass, handed to the selection callback. Views over fp32
/// buffers owned by the forward pass, valid during the call.
struct TinyLmLayer {
  std::int64_t layer = 0;
  AttentionInputs attention;  // q [T, Hq, D] after RoPE, k [T, Hkv, D] after RoPE, v [T, Hkv, D],
                              // positions int32 [T] = 0..T-1, scale 1/sqrt(D)
  TensorView index_q;         // [T, HI, DI] after RoPE (empty when the model has no indexer)
  TensorView index_k;         // [T, DI] after RoPE
  TensorView index_w;         // [T, HI]

  /// The layer's selection request: its attention, its indexer queries and weights (when the model has an
  /// indexer), and a fresh cache (each forward pass is a new sequence).
  SelectionRequest request() const;
};

/// Picks the keys of one layer: writes `selection` int32 [T, G, W] (G = group_count(granularity, Hq, Hkv),
/// any W >= 1; ascending positions then -1 padding, as every keysel selector writes them). The selection
/// arrives filled with -1, so a callback may leave a row's tail untouched. The forward pass validates it
/// (validate_selection: a position beyond the query's own, a repeat or a gap is a keysel::Error naming the layer)
/// and runs sparse_attention over it.
using TinyLmSelect = std::function<void(const TinyLmLayer& layer, const TensorView& selection)>;

/// A sparse forward pass: how the selection groups heads, its width, and the callback that fills it per layer.
struct TinyLmSparse {
  Granularity granularity = Granularity::per_kv_head;
  std::int64_t width = 0;  // W of the selection tensor, >= 1
  TinyLmSelect select;     // called once per layer, in layer order
};

/// One layer's attention inputs of a forward pass, as owned fp32 copies (TinyLm::trace).
struct TinyLmLayerRecord {
  std::int64_t layer = 0;
  std::int64_t tokens = 0;              // T
  std::vector<float> q;                 // [T, Hq, D] after RoPE
  std::vector<float> k;                 // [T, Hkv, D] after RoPE
  std::vector<float> v;                 // [T, Hkv, D]
  std::vector<float> index_q;           // [T, HI, DI] after RoPE; empty without an indexer
  std::vector<float> index_k;           // [T, DI] after RoPE
  std::vector<float> index_w;           // [T, HI]
  std::vector<std::int32_t> positions;  // [T] = 0..T-1

  /// Views over the vectors above, shaped by `config` (the model's), as the selection callback receives them;
  /// valid while this record lives unchanged. Throws keysel::Error when the sizes disagree with `config`.
  TinyLmLayer view(const TinyLmConfig& config) const;
};

/// A full-attention forward pass with every layer's attention inputs kept.
struct TinyLmTrace {
  std::vector<float> logits;              // [T, vocab]
  std::vector<TinyLmLayerRecord> layers;  // one per layer, in layer order
};

/// The K/V cache of one full-attention forward pass (TinyLm::prefill), which decode passes read: every layer's
/// keys after RoPE, values and indexer keys over all T tokens, and the logits of the pass.
struct TinyLmPrefill {
  std::int64_t tokens = 0;                    // T
  std::vector<std::vector<float>> k;          // per layer [T, Hkv, D] after RoPE
  std::vector<std::vector<float>> v;          // per layer [T, Hkv, D]
  std::vector<std::vector<float>> index_k;    // per layer [T, DI] after RoPE; empty without an indexer
  std::vector<float> logits;                  // [T, vocab] of the full-attention pass
};

/// The loaded model. Copies share the (immutable) weights; forward passes are const and allocate their own buffers.
class TinyLm {
 public:
  /// An empty model: config() is the default config and every forward pass throws keysel::Error.
  TinyLm() = default;

  /// Loads a weight file (layout above). Throws keysel::Error naming the file and the tensor on a missing,
  /// misshapen, extra or non-finite tensor, a missing or wrong "format", a bad or disagreeing config, or a
  /// corrupt file.
  static TinyLm load(const std::string& path);
  /// The same for a safetensors file already read or built in memory; `source` names it in error messages.
  static TinyLm from_safetensors(const SafetensorsFile& file, std::string_view source = "<memory>");

  /// The model's shape, as its weight file's "config" gives it.
  const TinyLmConfig& config() const { return config_; }
  /// Whether weights are loaded (false for a default-constructed model).
  bool loaded() const { return weights_ != nullptr; }

  /// Logits fp32 [T, vocab] of a byte sequence (1 <= T <= context) with full causal attention.
  std::vector<float> logits(std::span<const std::uint8_t> tokens) const;
  /// The same with each layer's attention restricted to the keys `sparse.select` picks for it.
  std::vector<float> logits(std::span<const std::uint8_t> tokens, const TinyLmSparse& sparse) const;
  /// logits(tokens) plus a copy of every layer's attention inputs (q, k, v, indexer), for studies that compare
  /// selections with the model's own attention and for checks against a dump of the trained model.
  TinyLmTrace trace(std::span<const std::uint8_t> tokens) const;

  /// A full-attention forward pass that keeps every layer's K/V cache (and indexer keys) for decode().
  TinyLmPrefill prefill(std::span<const std::uint8_t> tokens) const;
  /// Top-k decoding over a full-attention prefill, teacher-forced: logits fp32 [R, vocab] of the scored rows
  /// `rows` (strictly ascending positions in [0, T)), each row's residual stream taken through every layer
  /// with its attention restricted to the keys `sparse->select` picks (full causal attention over the cache
  /// when `sparse` is nullptr). Every layer's keys and values are the prefill's, except at the scored
  /// positions, which hold the scored rows' own K/V of this pass (as a decoder writes each decoded token's K/V;
  /// a row never reads a later position). So with every row scored this equals logits(tokens, *sparse), and
  /// with one scored row it equals the sparse forward pass in which every earlier row reads all its keys.
  /// The callback receives a TinyLmLayer whose attention has q [R, Hq, D], k and v [T, Hkv, D] (the cache of
  /// this layer), positions [R] = rows, and whose indexer has index_q [R, HI, DI], index_k [T, DI] and
  /// index_w [R, HI]; it fills selection int32 [R, G, W]. `prefill` must come from prefill(tokens) of this
  /// model. Throws keysel::Error naming the argument otherwise.
  std::vector<float> decode(std::span<const std::uint8_t> tokens, const TinyLmPrefill& prefill,
                            std::span<const std::int64_t> rows, const TinyLmSparse* sparse = nullptr) const;

 private:
  struct Weights;  // the weights in fp32, laid out for the forward pass (recall/src/tiny_lm_weights.h)

  friend std::vector<double> tiny_lm_reference_logits(const TinyLm& model, std::span<const std::uint8_t> tokens,
                                                      const TinyLmSparse* sparse);
  TinyLm(TinyLmConfig config, std::shared_ptr<const Weights> weights);
  std::vector<float> forward(std::span<const std::uint8_t> tokens, const TinyLmSparse* sparse, TinyLmTrace* trace,
                             TinyLmPrefill* prefill = nullptr) const;

  TinyLmConfig config_;
  std::shared_ptr<const Weights> weights_;  // shared by copies of a model; never modified after loading
};

/// The plain reference forward pass: the same model in double precision with straight loops (no BLAS, no
/// threads), full causal attention, or with `sparse` the keys its callback picks (the callback receives fp32
/// copies of the reference's double q, k, v and indexer tensors). Slow; the tests check TinyLm::logits against it.
/// Returns logits [T, vocab]. Throws keysel::Error as TinyLm::logits does.
std::vector<double> tiny_lm_reference_logits(const TinyLm& model, std::span<const std::uint8_t> tokens,
                                             const TinyLmSparse* sparse = nullptr);

/// Bits per byte of predicting tokens[i + 1] from logits[i] (i < T - 1): mean of -log2 softmax(logits[i])[next].
/// logits is [T, vocab] with T = tokens.size() >= 2; every token must be < vocab. Softmax in double.
double bits_per_byte(std::span<const float> logits, std::span<const std::uint8_t> tokens, std::int64_t vocab);

/// Bits per byte of a long text read in consecutive, non-overlapping windows of `window` tokens
/// (1 <= window <= context; the last window holds what is left): each window is its own forward pass, with
/// positions 0.. and nothing cached from the window before, and predicts every token of it but its first. The
/// result is the mean over all predicted bytes (text.size() minus the number of windows), in double. The text
/// must leave at least one byte to predict.
double windowed_bits_per_byte(const TinyLm& model, std::span<const std::uint8_t> text, std::int64_t window);
/// The same with each layer's attention restricted to the keys `sparse.select` picks (called per window and
/// layer).
double windowed_bits_per_byte(const TinyLm& model, std::span<const std::uint8_t> text, std::int64_t window,
                              const TinyLmSparse& sparse);

/// Where the shipped model lives (the directory holding model.safetensors, eval.txt, logits.safetensors and
/// dump.safetensors): $KEYSEL_TINY_LM_DIR when it is set and not empty (then the only place looked at), else the
/// source tree's models/tiny_lm, else the installed share/keysel/tiny_lm. Throws keysel::Error listing the places
/// tried when none holds model.safetensors.
std::string tiny_lm_directory();

}  // namespace keysel
