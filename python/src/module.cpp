// keysel._C: the C++ API as it is, over tensors the Python layer (python/keysel/__init__.py) hands in.
//
// Every function here takes its outputs as arguments (the Python layer allocates them in the caller's library
// or passes the caller's out=), reads its inputs without copies through TensorArguments, releases the GIL while
// keysel computes, and lets keysel::Error through as keysel.Error (a ValueError). CUDA tensors go to the CUDA
// entry points on the stream handle given; nothing here synchronises the device.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/string_view.h>
#include <nanobind/stl/vector.h>

#include <cstring>

#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "keysel/keysel.h"
#include "tensor_interop.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace keysel::python {
namespace {

SelectionPolicy make_policy(std::int64_t k, std::string_view granularity, std::int64_t n_sink, std::int64_t n_local,
                            bool kept_on_top) {
  SelectionPolicy policy;
  policy.k = k;
  policy.granularity = parse_granularity(granularity);
  policy.n_sink = n_sink;
  policy.n_local = n_local;
  policy.kept_on_top = kept_on_top;
  return policy;
}

bool on_cuda(const TensorView& view) { return view.device().kind == DeviceKind::cuda; }

nb::dict cost_dict(const SelectionCost& cost) {
  nb::dict d;
  d["key_bytes_read"] = cost.key_bytes_read;
  d["macs"] = cost.macs;
  d["keys_scored"] = cost.keys_scored;
  d["seconds"] = cost.seconds;
  d["rows"] = cost.rows;
  return d;
}

nb::dict aggregate_dict(const Aggregate& a) {
  nb::dict d;
  d["mean"] = a.mean;
  d["min"] = a.min;
  d["p5"] = a.p5;
  d["p50"] = a.p50;
  d["p95"] = a.p95;
  d["count"] = a.count;
  return d;
}

// An owned NumPy array of `values` with `shape`.
template <typename T>
nb::object numpy_array(std::vector<T> values, std::vector<std::size_t> shape) {
  auto* owned = new std::vector<T>(std::move(values));
  nb::capsule owner(owned, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::cast(nb::ndarray<nb::numpy, T>(owned->data(), shape.size(), shape.data(), owner));
}

nb::object loaded_tensor_array(const LoadedTensor& tensor) {
  std::vector<std::size_t> shape(tensor.shape.begin(), tensor.shape.end());
  if (tensor.dtype == DType::int32) {
    std::vector<std::int32_t> values(static_cast<std::size_t>(tensor.numel()));
    if (!values.empty()) std::memcpy(values.data(), tensor.data.data(), values.size() * sizeof(std::int32_t));
    return numpy_array(std::move(values), std::move(shape));
  }
  return numpy_array(tensor.to_float(), std::move(shape));
}

// fp8 tensors on the CPU are decoded exactly into `storage` (fp32), for entry points that take fp32/fp16/bf16.
TensorView decoded_if_fp8(const TensorView& view, std::vector<float>& storage) {
  if (view.dtype() != DType::fp8_e4m3 && view.dtype() != DType::fp8_e5m2) return view;
  if (view.device().kind != DeviceKind::cpu) return view;
  const std::vector<double> values = to_double_vector(view);
  storage.assign(values.begin(), values.end());
  return TensorView(static_cast<const void*>(storage.data()), DType::fp32, view.shape());
}

// ---- selection -------------------------------------------------------------------------------------------
std::int64_t selection_width(std::int64_t k, std::int64_t n_sink, std::int64_t n_local, bool kept_on_top,
                             std::string_view function) {
  SelectionPolicy policy = make_policy(k, "per_kv_head", n_sink, n_local, kept_on_top);
  policy.validate(function);
  return policy.width();
}

void select_topk_binding(nb::handle scores, nb::handle positions, std::int64_t k, std::int64_t n_sink,
                         std::int64_t n_local, bool kept_on_top, nb::handle out, std::uintptr_t stream,
                         nb::handle workspace) {
  TensorArguments args("select_topk");
  const TensorView scores_view = args.input(scores, "scores");
  const TensorView positions_view = args.input(positions, "positions");
  const TensorView out_view = args.output(out, "selection");
  const TensorView workspace_view = args.optional_output(workspace, "workspace");
  const SelectionPolicy policy = make_policy(k, "per_kv_head", n_sink, n_local, kept_on_top);
  nb::gil_scoped_release release;
  if (on_cuda(scores_view)) {
    select_topk_cuda(scores_view, positions_view, policy, out_view, stream_pointer(stream), workspace_view);
  } else {
    select_topk(scores_view, positions_view, policy, out_view);
  }
}

void exact_topk_binding(nb::handle q, nb::handle k_cache, nb::handle positions, std::int64_t k,
                        std::string_view granularity, double scale, std::int64_t n_sink, std::int64_t n_local,
                        bool kept_on_top, nb::handle out) {
  TensorArguments args("exact_topk");
  AttentionInputs inputs;
  inputs.q = args.input(q, "q");
  inputs.k = args.input(k_cache, "k");
  inputs.positions = args.input(positions, "positions");
  inputs.scale = scale;
  const TensorView out_view = args.output(out, "selection");
  const SelectionPolicy policy = make_policy(k, granularity, n_sink, n_local, kept_on_top);
  nb::gil_scoped_release release;
  exact_topk(inputs, policy, out_view);
}

// ---- the Lightning Indexer -------------------------------------------------------------------------------
// Runs a name parser whose errors say argument 'name', saying `argument` instead.
template <typename Parse>
auto parse_named(std::string_view argument, Parse&& parse) {
  try {
    return parse();
  } catch (const Error& error) {
    std::string message = error.what();
    const std::string generic = "argument 'name'";
    if (const auto at = message.find(generic); at != std::string::npos) {
      message.replace(at, generic.size(), "argument '" + std::string(argument) + "'");
    }
    throw Error(message);
  }
}

QuantizationConfig make_config(std::string_view format, std::string_view scale, std::int64_t group_size,
                               bool power_of_two_scales, bool hadamard) {
  QuantizationConfig config;
  config.format = parse_named("format", [&] { return parse_dtype(format); });
  config.granularity = parse_named("scale", [&] { return parse_scale_granularity(scale); });
  config.group_size = group_size;
  config.power_of_two_scales = power_of_two_scales;
  config.hadamard = hadamard;
  config.validate("IndexerKeyCache");
  return config;
}

void cache_append(IndexerKeyCache& cache, nb::handle keys, std::string_view keys_dtype) {
  TensorArguments args("IndexerKeyCache.append");
  std::vector<float> decoded;
  const TensorView keys_view = decoded_if_fp8(args.input(keys, "keys", keys_dtype), decoded);
  nb::gil_scoped_release release;
  cache.append(keys_view);
}

void cache_scores(const IndexerKeyCache& cache, nb::handle q_index, std::string_view q_dtype, nb::handle weights,
                  nb::handle positions, nb::handle out) {
  TensorArguments args("IndexerKeyCache.scores");
  std::vector<float> decoded;
  const TensorView queries = decoded_if_fp8(args.input(q_index, "q_index", q_dtype), decoded);
  const TensorView weights_view = args.input(weights, "weights");
  const TensorView positions_view = args.input(positions, "positions");
  const TensorView out_view = args.output(out, "scores");
  expect_device("IndexerKeyCache.scores", queries, "q_index", Device::cpu());
  nb::gil_scoped_release release;
  const IndexerQueries quantized(queries, cache.config());
  lightning_indexer_scores(quantized, weights_view, positions_view, cache, out_view);
}

nb::dict cache_select(const IndexerKeyCache& cache, nb::handle q_index, std::string_view q_dtype, nb::handle weights,
                      nb::handle positions,
                      std::int64_t k, std::int64_t n_sink, std::int64_t n_local, bool kept_on_top, nb::handle out) {
  TensorArguments args("IndexerKeyCache.select");
  std::vector<float> decoded;
  const TensorView queries = decoded_if_fp8(args.input(q_index, "q_index", q_dtype), decoded);
  const TensorView weights_view = args.input(weights, "weights");
  const TensorView positions_view = args.input(positions, "positions");
  const TensorView out_view = args.output(out, "selection");
  expect_device("IndexerKeyCache.select", queries, "q_index", Device::cpu());
  const SelectionPolicy policy = make_policy(k, "per_token", n_sink, n_local, kept_on_top);
  SelectionCost cost;
  {
    nb::gil_scoped_release release;
    const IndexerQueries quantized(queries, cache.config());
    cost = lightning_indexer_select(quantized, weights_view, positions_view, cache, policy, out_view);
  }
  return cost_dict(cost);
}

// I[t, s] over fp32 copies of the keys (SPEC §3 without quantisation).
void indexer_scores_binding(nb::handle q_index, std::string_view q_dtype, nb::handle weights, nb::handle k_index,
                            std::string_view k_dtype, nb::handle positions, nb::handle out) {
  TensorArguments args("indexer_scores");
  std::vector<float> decoded_queries, decoded_keys;
  const TensorView queries = decoded_if_fp8(args.input(q_index, "q_index", q_dtype), decoded_queries);
  const TensorView weights_view = args.input(weights, "weights");
  const TensorView keys = decoded_if_fp8(args.input(k_index, "k_index", k_dtype), decoded_keys);
  const TensorView positions_view = args.input(positions, "positions");
  const TensorView out_view = args.output(out, "scores");
  expect_shape("indexer_scores", keys, "k_index", {kAnyExtent, kAnyExtent});
  expect_shape("indexer_scores", queries, "q_index", {kAnyExtent, kAnyExtent, keys.size(1)});
  nb::gil_scoped_release release;
  IndexerKeyCache cache(keys.size(1), QuantizationConfig{});
  cache.append(keys);
  const IndexerQueries quantized(queries, cache.config());
  lightning_indexer_scores(quantized, weights_view, positions_view, cache, out_view);
}

// The CUDA Lightning Indexer over a serving engine's paged fp8 key cache (cuda_indexer.h), as it is.
void indexer_logits_cuda_binding(nb::handle q, std::string_view q_dtype, nb::handle weights, nb::handle blocks,
                                 std::string_view blocks_dtype, nb::handle block_table, nb::handle positions,
                                 nb::handle sequence_of_row, nb::handle out, std::uintptr_t stream) {
  TensorArguments args("indexer_logits_cuda");
  const TensorView q_view = args.input(q, "q_index", q_dtype);
  const TensorView weights_view = args.input(weights, "weights");
  const CudaIndexerKeyCache cache{args.input(blocks, "blocks", blocks_dtype),
                                  args.optional_input(block_table, "block_table")};
  const TensorView positions_view = args.input(positions, "positions");
  const TensorView rows = args.optional_input(sequence_of_row, "sequence_of_row");
  const TensorView out_view = args.output(out, "logits");
  nb::gil_scoped_release release;
  lightning_indexer_logits_cuda(q_view, weights_view, cache, positions_view, out_view, rows, stream_pointer(stream));
}

void indexer_topk_cuda_binding(nb::handle q, std::string_view q_dtype, nb::handle weights, nb::handle blocks,
                               std::string_view blocks_dtype, nb::handle block_table, nb::handle positions,
                               std::int64_t n_keys, std::int64_t k, std::int64_t n_sink, std::int64_t n_local,
                               bool kept_on_top, nb::handle sequence_of_row, nb::handle out, std::uintptr_t stream,
                               nb::handle workspace) {
  TensorArguments args("indexer_topk_cuda");
  const TensorView q_view = args.input(q, "q_index", q_dtype);
  const TensorView weights_view = args.input(weights, "weights");
  const CudaIndexerKeyCache cache{args.input(blocks, "blocks", blocks_dtype),
                                  args.optional_input(block_table, "block_table")};
  const TensorView positions_view = args.input(positions, "positions");
  const TensorView rows = args.optional_input(sequence_of_row, "sequence_of_row");
  const TensorView out_view = args.output(out, "selection");
  const TensorView workspace_view = args.optional_output(workspace, "workspace");
  const SelectionPolicy policy = make_policy(k, "per_token", n_sink, n_local, kept_on_top);
  nb::gil_scoped_release release;
  lightning_indexer_topk_cuda(q_view, weights_view, cache, positions_view, n_keys, policy, out_view, rows,
                              stream_pointer(stream), workspace_view);
}

// ---- DeepSeek-V3.2 in the engines' formats (dsa.h) ----------------------------------------------------------
void topk_rows_binding(nb::handle logits, nb::handle starts, nb::handle ends, nb::handle lengths,
                       std::int64_t next_n, std::int64_t k, nb::handle out, std::uintptr_t stream,
                       nb::handle workspace) {
  TensorArguments args("topk_rows");
  const TensorView logits_view = args.input(logits, "logits");
  TopkRowBounds bounds;
  bounds.starts = args.optional_input(starts, "starts");
  bounds.ends = args.optional_input(ends, "ends");
  bounds.lengths = args.optional_input(lengths, "lengths");
  bounds.next_n = next_n;
  const TensorView out_view = args.output(out, "selection");
  const TensorView workspace_view = args.optional_output(workspace, "workspace");
  nb::gil_scoped_release release;
  if (on_cuda(logits_view)) {
    topk_rows_cuda(logits_view, bounds, k, out_view, stream_pointer(stream), workspace_view);
  } else {
    topk_rows(logits_view, bounds, k, out_view);
  }
}

void paged_mqa_logits_binding(nb::handle q, std::string_view q_dtype, nb::handle weights, nb::handle blocks,
                              std::string_view blocks_dtype, nb::handle block_table, nb::handle context_lens,
                              nb::handle out, std::uintptr_t stream) {
  TensorArguments args("paged_mqa_logits");
  const TensorView q_view = args.input(q, "q", q_dtype);
  const TensorView weights_view = args.input(weights, "weights");
  const TensorView blocks_view = args.input(blocks, "kv_cache", blocks_dtype);
  const TensorView table_view = args.input(block_table, "block_table");
  const TensorView lens_view = args.input(context_lens, "context_lens");
  const TensorView out_view = args.output(out, "logits");
  nb::gil_scoped_release release;
  if (on_cuda(q_view)) {
    paged_mqa_logits_cuda(q_view, weights_view, CudaIndexerKeyCache{blocks_view, table_view}, lens_view, out_view,
                          stream_pointer(stream));
  } else {
    paged_mqa_logits_reference(q_view, weights_view, blocks_view, table_view, lens_view, out_view);
  }
}

void ragged_mqa_logits_binding(nb::handle q, std::string_view q_dtype, nb::handle weights, nb::handle k_values,
                               std::string_view k_dtype, nb::handle k_scales, nb::handle starts, nb::handle ends,
                               nb::handle out, std::uintptr_t stream) {
  TensorArguments args("ragged_mqa_logits");
  const TensorView q_view = args.input(q, "q", q_dtype);
  const TensorView weights_view = args.input(weights, "weights");
  const TensorView values_view = args.input(k_values, "k_fp8", k_dtype);
  const TensorView scales_view = args.input(k_scales, "k_scale");
  const TensorView starts_view = args.input(starts, "starts");
  const TensorView ends_view = args.input(ends, "ends");
  const TensorView out_view = args.output(out, "logits");
  nb::gil_scoped_release release;
  if (on_cuda(q_view)) {
    ragged_mqa_logits_cuda(q_view, weights_view, values_view, scales_view, starts_view, ends_view, out_view,
                           stream_pointer(stream));
  } else {
    ragged_mqa_logits_reference(q_view, weights_view, values_view, scales_view, starts_view, ends_view, out_view);
  }
}

void paged_mqa_topk_binding(nb::handle q, std::string_view q_dtype, nb::handle weights, nb::handle blocks,
                            std::string_view blocks_dtype, nb::handle block_table, nb::handle context_lens,
                            std::int64_t n_keys, std::int64_t k, nb::handle out, std::uintptr_t stream,
                            nb::handle workspace) {
  TensorArguments args("paged_mqa_topk");
  const TensorView q_view = args.input(q, "q", q_dtype);
  const TensorView weights_view = args.input(weights, "weights");
  const TensorView blocks_view = args.input(blocks, "kv_cache", blocks_dtype);
  const TensorView table_view = args.input(block_table, "block_table");
  const TensorView lens_view = args.input(context_lens, "context_lens");
  const TensorView out_view = args.output(out, "selection");
  const TensorView workspace_view = args.optional_output(workspace, "workspace");
  nb::gil_scoped_release release;
  if (on_cuda(q_view)) {
    paged_mqa_topk_cuda(q_view, weights_view, CudaIndexerKeyCache{blocks_view, table_view}, lens_view, n_keys, k,
                        out_view, stream_pointer(stream), workspace_view);
  } else {
    paged_mqa_topk_reference(q_view, weights_view, blocks_view, table_view, lens_view, n_keys, k, out_view);
  }
}

void indexer_k_quant_and_cache_binding(nb::handle k, nb::handle cache, std::string_view cache_dtype,
                                       nb::handle slot_mapping, bool power_of_two_scale) {
  TensorArguments args("indexer_k_quant_and_cache");
  const TensorView k_view = args.input(k, "k");
  const TensorView cache_view = args.output(cache, "kv_cache", cache_dtype);
  const TensorView slots_view = args.input(slot_mapping, "slot_mapping");
  nb::gil_scoped_release release;
  indexer_k_quant_and_cache(k_view, cache_view, slots_view, power_of_two_scale);
}

// ---- attention -------------------------------------------------------------------------------------------
void sparse_attention_binding(nb::handle q, nb::handle k_cache, nb::handle v_cache, nb::handle selection,
                              std::string_view granularity, double scale, nb::handle block_table, nb::handle out,
                              nb::handle lse, std::uintptr_t stream) {
  TensorArguments args("sparse_attention");
  const Granularity parsed = parse_granularity(granularity);
  const TensorView q_view = args.input(q, "q");
  const TensorView k_view = args.input(k_cache, "k");
  const TensorView v_view = args.input(v_cache, "v");
  const TensorView selection_view = args.input(selection, "selection");
  const TensorView table = args.optional_input(block_table, "block_table");
  const TensorView out_view = args.output(out, "out");
  const TensorView lse_view = lse.is_none() ? TensorView() : args.output(lse, "lse");
  if (on_cuda(q_view)) {
    CudaKvCache cache{k_view, v_view, table};
    nb::gil_scoped_release release;
    sparse_attention_decode_cuda(q_view, cache, selection_view, parsed, scale, out_view, lse_view,
                                 stream_pointer(stream));
    return;
  }
  KEYSEL_CHECK_ARG_IN("sparse_attention", table.empty(), "block_table", "None for CPU tensors", table.str());
  // Positions only bound the causal rule, which the selection already obeys: every query may read every key.
  const std::int64_t tokens = q_view.rank() >= 1 ? q_view.size(0) : 0;
  const std::int64_t keys = k_view.rank() >= 1 ? k_view.size(0) : 0;
  std::vector<std::int32_t> positions(static_cast<std::size_t>(tokens),
                                      static_cast<std::int32_t>(keys > 0 ? keys - 1 : 0));
  AttentionInputs inputs{q_view, k_view, v_view,
                         TensorView(positions.data(), DType::int32, {tokens}), scale};
  nb::gil_scoped_release release;
  sparse_attention(inputs, selection_view, parsed, out_view, lse_view);
}

// The tiled prefill forward of one sequence on its GPU (CUDA tensors only).
void sparse_attention_prefill_binding(nb::handle q, nb::handle k_cache, nb::handle v_cache, nb::handle selection,
                                      std::string_view granularity, double scale, nb::handle out, nb::handle lse,
                                      std::uintptr_t stream) {
  TensorArguments args("sparse_attention_prefill");
  const Granularity parsed = parse_granularity(granularity);
  const TensorView q_view = args.input(q, "q");
  const TensorView k_view = args.input(k_cache, "k");
  const TensorView v_view = args.input(v_cache, "v");
  const TensorView selection_view = args.input(selection, "selection");
  const TensorView out_view = args.output(out, "out");
  const TensorView lse_view = lse.is_none() ? TensorView() : args.output(lse, "lse");
  nb::gil_scoped_release release;
  sparse_attention_prefill_cuda(q_view, k_view, v_view, selection_view, parsed, scale, out_view, lse_view,
                                stream_pointer(stream));
}

bool sparse_attention_prefill_supported_binding(nb::handle q, nb::handle k_cache, nb::handle v_cache,
                                                nb::handle selection, std::string_view granularity) {
  TensorArguments args("sparse_attention_prefill_supported");
  const Granularity parsed = parse_granularity(granularity);
  const TensorView q_view = args.input(q, "q");
  const TensorView k_view = args.input(k_cache, "k");
  const TensorView v_view = args.input(v_cache, "v");
  const TensorView selection_view = args.input(selection, "selection");
  nb::gil_scoped_release release;
  return sparse_attention_prefill_cuda_supported(q_view, k_view, v_view, selection_view, parsed);
}

// The backward of sparse_attention (SPEC §9): dQ, dK, dV into the caller's fp32 tensors, on the CPU or, for CUDA
// tensors, on their GPU (one sequence per call, as on the CPU); `deterministic` = false lets CUDA tensors take the
// tiled kernel (the CPU kernel is deterministic either way).
void sparse_attention_backward_binding(nb::handle q, nb::handle k_cache, nb::handle v_cache, nb::handle selection,
                                       std::string_view granularity, double scale, nb::handle out, nb::handle lse,
                                       nb::handle grad_out, nb::handle grad_q, nb::handle grad_k, nb::handle grad_v,
                                       std::uintptr_t stream, nb::handle grad_lse, bool deterministic) {
  constexpr std::string_view function = "sparse_attention_backward";
  TensorArguments args(function);
  const Granularity parsed = parse_granularity(granularity);
  const TensorView q_view = args.input(q, "q");
  const TensorView k_view = args.input(k_cache, "k");
  const TensorView v_view = args.input(v_cache, "v");
  const TensorView selection_view = args.input(selection, "selection");
  const TensorView out_view = args.input(out, "out");
  const TensorView lse_view = args.input(lse, "lse");
  const TensorView grad_out_view = args.input(grad_out, "grad_out");
  const TensorView grad_q_view = args.output(grad_q, "grad_q");
  const TensorView grad_k_view = args.output(grad_k, "grad_k");
  const TensorView grad_v_view = args.output(grad_v, "grad_v");
  const TensorView grad_lse_view = args.optional_input(grad_lse, "grad_lse");
  if (on_cuda(q_view)) {
    nb::gil_scoped_release release;
    sparse_attention_backward_cuda(q_view, k_view, v_view, selection_view, parsed, scale, out_view, lse_view,
                                   grad_out_view, grad_q_view, grad_k_view, grad_v_view, stream_pointer(stream),
                                   grad_lse_view, CudaBackwardOptions{deterministic});
    return;
  }
  // As sparse_attention: the selection already obeys the causal rule, so every query may read every key.
  const std::int64_t tokens = q_view.rank() >= 1 ? q_view.size(0) : 0;
  const std::int64_t keys = k_view.rank() >= 1 ? k_view.size(0) : 0;
  std::vector<std::int32_t> positions(static_cast<std::size_t>(tokens),
                                      static_cast<std::int32_t>(keys > 0 ? keys - 1 : 0));
  AttentionInputs inputs{q_view, k_view, v_view, TensorView(positions.data(), DType::int32, {tokens}), scale};
  nb::gil_scoped_release release;
  sparse_attention_backward(inputs, selection_view, parsed, out_view, lse_view, grad_out_view, grad_q_view,
                            grad_k_view, grad_v_view, {}, grad_lse_view);
}

// The Lightning Indexer's KL objectives (SPEC §9.1) in double precision; gradients into the caller's fp64 arrays.
double indexer_kl_loss_reference_binding(nb::handle target, nb::handle queries, nb::handle weights, nb::handle keys,
                                         nb::handle positions, nb::handle selection, std::string_view reduction,
                                         nb::handle grad_queries, nb::handle grad_weights, nb::handle grad_keys) {
  constexpr std::string_view function = "indexer_kl_loss_reference";
  KEYSEL_CHECK_ARG_IN(function, reduction == "mean" || reduction == "sum", "reduction", "\"mean\" or \"sum\"",
                      reduction);
  TensorArguments args(function);
  const TensorView target_view = args.input(target, "target");
  const TensorView queries_view = args.input(queries, "queries");
  const TensorView weights_view = args.input(weights, "weights");
  const TensorView keys_view = args.input(keys, "keys");
  const TensorView positions_view = args.input(positions, "positions");
  const TensorView selection_view = args.optional_input(selection, "selection");
  const IndexerLossGradients gradients{args.output(grad_queries, "gradients.queries"),
                                       args.output(grad_weights, "gradients.weights"),
                                       args.output(grad_keys, "gradients.keys")};
  nb::gil_scoped_release release;
  return indexer_kl_loss_reference(target_view, queries_view, weights_view, keys_view, positions_view,
                                   selection_view, reduction == "mean" ? LossReduction::mean : LossReduction::sum,
                                   gradients);
}

// The options sparse MLA's forward and backward share: scale (0: 576^-1/2), the optional sink and lengths.
SparseMlaOptions mla_options(TensorArguments& args, double scale, nb::handle attn_sink, nb::handle topk_length) {
  SparseMlaOptions options;
  options.scale = scale;
  options.attn_sink = args.optional_input(attn_sink, "attn_sink");
  options.topk_length = args.optional_input(topk_length, "topk_length");
  return options;
}

// Sparse MLA (SPEC §8): the CUDA kernel on GPU tensors, the fp32 CPU path otherwise.
void sparse_mla_binding(nb::handle q, nb::handle kv, std::string_view kv_dtype, nb::handle indices, nb::handle out,
                        nb::handle lse, nb::handle max_logits, double scale, nb::handle attn_sink,
                        nb::handle topk_length, std::uintptr_t stream, nb::handle workspace) {
  TensorArguments args("sparse_mla");
  const TensorView q_view = args.input(q, "q");
  const TensorView kv_view = args.input(kv, "kv", kv_dtype);
  const TensorView indices_view = args.input(indices, "indices");
  const TensorView out_view = args.output(out, "out");
  const TensorView lse_view = args.optional_output(lse, "lse");
  const TensorView max_view = args.optional_output(max_logits, "max_logits");
  const SparseMlaOptions options = mla_options(args, scale, attn_sink, topk_length);
  const TensorView workspace_view = args.optional_output(workspace, "workspace");
  nb::gil_scoped_release release;
  if (on_cuda(q_view)) {
    sparse_mla_cuda(q_view, kv_view, indices_view, out_view, lse_view, options, max_view, stream_pointer(stream),
                    workspace_view);
  } else {
    KEYSEL_CHECK_ARG_IN("sparse_mla", workspace_view.empty(), "workspace", "None for CPU tensors",
                        workspace_view.str());
    sparse_mla(q_view, kv_view, indices_view, out_view, lse_view, options, {}, max_view);
  }
}

// The backward of sparse MLA (SPEC §9.2): gradients into the caller's fp32 tensors, on the CPU or, for CUDA
// tensors, on their GPU.
void sparse_mla_backward_binding(nb::handle q, nb::handle kv, nb::handle indices, nb::handle out, nb::handle lse,
                                 nb::handle grad_out, nb::handle grad_lse, double scale, nb::handle attn_sink,
                                 nb::handle topk_length, nb::handle grad_q, nb::handle grad_kv,
                                 nb::handle grad_attn_sink, std::uintptr_t stream) {
  constexpr std::string_view function = "sparse_mla_backward";
  TensorArguments args(function);
  const TensorView q_view = args.input(q, "q");
  const TensorView kv_view = args.input(kv, "kv");
  const TensorView indices_view = args.input(indices, "indices");
  const TensorView out_view = args.input(out, "out");
  const TensorView lse_view = args.input(lse, "lse");
  const TensorView grad_out_view = args.input(grad_out, "grad_out");
  const TensorView grad_lse_view = args.optional_input(grad_lse, "grad_lse");
  const SparseMlaOptions options = mla_options(args, scale, attn_sink, topk_length);
  const SparseMlaGradients gradients{args.output(grad_q, "gradients.q"), args.output(grad_kv, "gradients.kv"),
                                     args.optional_output(grad_attn_sink, "gradients.attn_sink")};
  nb::gil_scoped_release release;
  if (on_cuda(q_view)) {
    sparse_mla_backward_cuda(q_view, kv_view, indices_view, out_view, lse_view, grad_out_view, grad_lse_view,
                             gradients, options, stream_pointer(stream));
  } else {
    sparse_mla_backward(q_view, kv_view, indices_view, out_view, lse_view, grad_out_view, grad_lse_view, gradients,
                        options);
  }
}

void mla_v32_quantize_binding(nb::handle kv, nb::handle cache, std::string_view cache_dtype,
                              nb::handle slot_mapping) {
  TensorArguments args("mla_v32_quantize");
  const TensorView kv_view = args.input(kv, "kv");
  const TensorView cache_view = args.output(cache, "cache", cache_dtype);
  const TensorView slots_view = args.input(slot_mapping, "slot_mapping");
  nb::gil_scoped_release release;
  mla_v32_quantize(kv_view, cache_view, slots_view);
}

// Context parallelism (SPEC §10) from Python: the collective is a Python callable, all_gather(bytes) -> bytes of
// every rank's contribution in rank order (keysel.distributed builds it over torch.distributed).
class PythonRankGroup final : public RankGroup {
 public:
  PythonRankGroup(int size, nb::callable all_gather) : size_(size), all_gather_(std::move(all_gather)) {}
  int size() const override { return size_; }
  void all_gather(int, const void* send, std::int64_t bytes, void* receive) override {
    nb::gil_scoped_acquire gil;
    nb::bytes result = nb::cast<nb::bytes>(all_gather_(nb::bytes(static_cast<const char*>(send),
                                                                 static_cast<std::size_t>(bytes))));
    KEYSEL_CHECK_ARG_IN("all_gather", static_cast<std::int64_t>(result.size()) == bytes * size_, "all_gather",
                        std::to_string(bytes * size_) + " bytes (every rank's " + std::to_string(bytes) + ")",
                        std::to_string(result.size()) + " bytes");
    if (bytes > 0) std::memcpy(receive, result.c_str(), static_cast<std::size_t>(bytes * size_));
  }

 private:
  int size_;
  nb::callable all_gather_;
};

nb::dict select_topk_context_parallel_binding(int size, int rank, nb::callable all_gather, nb::handle local_scores,
                                              nb::handle local_positions, nb::handle positions, std::int64_t n_keys,
                                              std::int64_t k, std::int64_t n_sink, std::int64_t n_local,
                                              bool kept_on_top, std::string_view exchange, nb::handle out) {
  TensorArguments args("select_topk_context_parallel");
  const TensorView scores_view = args.input(local_scores, "local_scores");
  const TensorView mine = args.input(local_positions, "local_positions");
  const TensorView positions_view = args.input(positions, "positions");
  const TensorView out_view = args.output(out, "out");
  const SelectionPolicy policy = make_policy(k, "per_kv_head", n_sink, n_local, kept_on_top);
  const TopkExchange parsed = parse_topk_exchange(exchange);
  KEYSEL_CHECK_ARG_IN("select_topk_context_parallel", size >= 1, "group", "a group of at least one rank", size);
  PythonRankGroup group(size, std::move(all_gather));
  ExchangeCost cost;
  {
    nb::gil_scoped_release release;
    select_topk_context_parallel(group, rank, scores_view, mine, positions_view, n_keys, policy, parsed, out_view,
                                 &cost);
  }
  nb::dict d;
  d["collectives"] = cost.collectives;
  d["bytes_sent"] = cost.bytes_sent;
  d["bytes_received"] = cost.bytes_received;
  return d;
}

// This rank's part of context-parallel attention: its partial (o, lse) over the selected keys it holds, merged
// with every rank's by log-sum-exp through the Python all_gather.
nb::dict sparse_attention_context_parallel_binding(int size, int rank, nb::callable all_gather, nb::handle q,
                                                   nb::handle k_cache, nb::handle v_cache, nb::handle local_positions,
                                                   nb::handle positions, std::int64_t n_keys, nb::handle selection,
                                                   std::string_view granularity, double scale, nb::handle out,
                                                   nb::handle lse) {
  TensorArguments args("sparse_attention_context_parallel");
  const Granularity parsed = parse_granularity(granularity);
  AttentionInputs inputs{args.input(q, "q"), args.input(k_cache, "k"), args.input(v_cache, "v"),
                         args.input(positions, "positions"), scale};
  const TensorView mine = args.input(local_positions, "local_positions");
  const TensorView selection_view = args.input(selection, "selection");
  const TensorView out_view = args.output(out, "out");
  const TensorView lse_view = lse.is_none() ? TensorView() : args.output(lse, "lse");
  KEYSEL_CHECK_ARG_IN("sparse_attention_context_parallel", size >= 1, "group", "a group of at least one rank", size);
  PythonRankGroup group(size, std::move(all_gather));
  ExchangeCost cost;
  {
    nb::gil_scoped_release release;
    sparse_attention_context_parallel(group, rank, inputs, mine, n_keys, selection_view, parsed, out_view, lse_view,
                                      &cost);
  }
  nb::dict d;
  d["collectives"] = cost.collectives;
  d["bytes_sent"] = cost.bytes_sent;
  d["bytes_received"] = cost.bytes_received;
  return d;
}

// Per-row SPEC §4 metrics: {name: [T * G values]}.
std::map<std::string, std::vector<double>> metrics_binding(nb::handle q, nb::handle k_cache, nb::handle v_cache,
                                                           nb::handle positions, nb::handle selection, std::int64_t k,
                                                           std::string_view granularity, double scale) {
  TensorArguments args("metrics");
  AttentionInputs inputs;
  inputs.q = args.input(q, "q");
  inputs.k = args.input(k_cache, "k");
  inputs.v = args.optional_input(v_cache, "v");
  inputs.positions = args.input(positions, "positions");
  inputs.scale = scale;
  const TensorView selection_view = args.input(selection, "selection");
  const Granularity parsed = parse_granularity(granularity);
  KEYSEL_CHECK_ARG_IN("metrics", k >= 1, "k", ">= 1", k);
  std::vector<SelectionMetrics> rows;
  {
    nb::gil_scoped_release release;
    const AttentionShape shape = inputs.validate("metrics", false);
    validate_selection("metrics", selection_view, "selection", inputs.positions, shape.keys,
                       group_count(parsed, shape.query_heads, shape.kv_heads));
    const ExactReference reference(inputs, parsed);
    rows = reference.evaluate(selection_view, k);
  }
  std::map<std::string, std::vector<double>> result;
  for (std::string_view name : metric_names()) {
    std::vector<double>& values = result[std::string(name)];
    values.reserve(rows.size());
    for (const SelectionMetrics& row : rows) values.push_back(metric_value(row, name));
  }
  return result;
}

// ---- selectors -------------------------------------------------------------------------------------------
struct PySelector {
  std::unique_ptr<Selector> selector;
};

PySelector make_selector_binding(std::string_view spec_json, nb::handle q_index, nb::handle k_index,
                                 nb::handle weights) {
  if (q_index.is_none() && k_index.is_none() && weights.is_none()) {
    return {make_selector_from_spec(spec_json)};
  }
  TensorArguments args("make_selector");
  IndexerTensors tensors{args.input(q_index, "indexer.q_index"), args.input(k_index, "indexer.k_index"),
                         args.input(weights, "indexer.weights")};
  return {make_selector_from_spec(spec_json, &tensors)};
}

CacheReuse parse_cache_reuse(std::string_view name) {
  if (name == "unknown") return CacheReuse::unknown;
  if (name == "appended") return CacheReuse::appended;
  if (name == "fresh") return CacheReuse::fresh;
  detail::throw_argument_error("Selector.select", "cache", "\"unknown\", \"appended\" or \"fresh\"",
                               detail::describe(name));
}

nb::dict selector_select(PySelector& self, nb::handle q, nb::handle k_cache, nb::handle positions, std::int64_t k,
                         std::string_view granularity, double scale, std::int64_t n_sink, std::int64_t n_local,
                         bool kept_on_top, nb::handle q_index, nb::handle weights, std::string_view cache,
                         std::int64_t unchanged_keys, nb::handle out) {
  TensorArguments args("Selector.select");
  SelectionRequest request;
  request.attention.q = args.input(q, "q");
  request.attention.k = args.input(k_cache, "k");
  request.attention.positions = args.input(positions, "positions");
  request.attention.scale = scale;
  request.indexer_queries = args.optional_input(q_index, "q_index");
  request.indexer_weights = args.optional_input(weights, "weights");
  request.cache = parse_cache_reuse(cache);
  request.unchanged_keys = unchanged_keys;
  const TensorView out_view = args.output(out, "selection");
  const SelectionPolicy policy = make_policy(k, granularity, n_sink, n_local, kept_on_top);
  SelectionCost cost;
  {
    nb::gil_scoped_release release;
    cost = self.selector->select(request, policy, out_view);
  }
  return cost_dict(cost);
}

// ---- files and studies -----------------------------------------------------------------------------------
nb::dict load_dump_binding(const std::string& path) {
  Dump dump;
  {
    nb::gil_scoped_release release;
    dump = load_dump(path);
  }
  nb::dict result;
  result["source"] = dump.source;
  result["model"] = dump.model;
  result["scale"] = dump.scale;
  nb::dict metadata;
  for (const auto& [key, value] : dump.metadata) metadata[nb::str(key.c_str())] = value;
  result["metadata"] = metadata;
  nb::list layers;
  for (const DumpLayer& layer : dump.layers) {
    nb::dict d;
    nb::dict dtypes;
    d["index"] = layer.index;
    const auto put = [&](const char* name, const LoadedTensor& tensor) {
      d[name] = loaded_tensor_array(tensor);
      dtypes[name] = std::string(dtype_name(tensor.dtype));
    };
    put("q", layer.q);
    put("k", layer.k);
    put("v", layer.v);
    put("positions", layer.positions);
    if (layer.index_q) put("index_q", *layer.index_q);
    if (layer.index_k) put("index_k", *layer.index_k);
    if (layer.index_w) put("index_w", *layer.index_w);
    if (layer.probabilities) put("probs", *layer.probabilities);
    d["dtypes"] = dtypes;
    layers.append(d);
  }
  result["layers"] = layers;
  return result;
}

std::string run_study_binding(const std::string& config_text, const std::string& config_path,
                              const std::string& out_directory) {
  nb::gil_scoped_release release;
  const StudyConfig config = config_path.empty() ? parse_study_config(config_text) : load_study_config(config_path);
  const StudySuiteResult result = run_study_config(config);
  if (!out_directory.empty()) write_study_outputs(result, out_directory);
  return study_suite_json(result);
}

}  // namespace
}  // namespace keysel::python

NB_MODULE(_C, m) {
  using namespace keysel;
  using namespace keysel::python;
  m.doc() = "keysel's compiled core: the C++ library bound as it is. Use the functions of the keysel package.";

  nb::exception<keysel::Error>(m, "Error", PyExc_ValueError);

  m.attr("__version__") = KEYSEL_VERSION;
  m.def("built_with_cuda", &built_with_cuda, "True when keysel was built with its CUDA kernels.");
  m.def("built_with_faiss", &built_with_faiss, "True when keysel was built with the FAISS candidate searches.");
  m.def("cuda_device_count", &cuda_device_count, "CUDA devices visible (0 without CUDA support or a GPU).");
  m.def("num_threads", &num_threads, "Threads keysel's CPU code uses.");
  m.def("set_num_threads", &set_num_threads, "threads"_a, "Sets the threads keysel's CPU code uses (0: default).");
  m.def("simd_level", [] { return std::string(simd_level_name(simd_level())); },
        "The instruction set keysel's CPU kernels use: \"scalar\", \"avx2\" or \"avx512\".");
  m.def("set_simd_level", [](std::string_view name) { set_simd_level(parse_simd_level(name)); }, "level"_a,
        "Forces a lower instruction set (\"scalar\", \"avx2\", \"avx512\") for the CPU kernels.");
  m.def("group_count",
        [](std::string_view granularity, std::int64_t query_heads, std::int64_t kv_heads) {
          return group_count(parse_granularity(granularity), query_heads, kv_heads);
        },
        "granularity"_a, "query_heads"_a, "kv_heads"_a);
  m.def("selection_width", &selection_width, "k"_a, "n_sink"_a, "n_local"_a, "kept_on_top"_a, "function"_a,
        "Checks a selection policy (keysel::Error naming the argument) and returns its width W.");
  m.def("metric_names", [] {
    std::vector<std::string> names;
    for (std::string_view name : metric_names()) names.emplace_back(name);
    return names;
  });
  m.def("aggregate", [](const std::vector<double>& values) { return aggregate_dict(aggregate(values)); }, "values"_a,
        "mean, min, p5, p50, p95 and count of values (NaN left out), as studies report them.");

  m.def("select_topk", &select_topk_binding, "scores"_a, "positions"_a, "k"_a, "n_sink"_a, "n_local"_a,
        "kept_on_top"_a, "out"_a, "stream"_a, "workspace"_a.none());
  m.def("select_topk_workspace_bytes", &select_topk_cuda_workspace_bytes, "tokens"_a, "groups"_a, "n"_a,
        "Device bytes select_topk may use on CUDA for scores [T, G, N] (an upper bound for every GPU).");
  m.def("indexer_topk_workspace_bytes", &lightning_indexer_topk_cuda_workspace_bytes, "rows"_a, "n_keys"_a,
        "Device bytes indexer_topk_cuda may use for R rows of n_keys keys.");
  m.def("exact_topk", &exact_topk_binding, "q"_a, "k_cache"_a, "positions"_a, "k"_a, "granularity"_a, "scale"_a,
        "n_sink"_a, "n_local"_a, "kept_on_top"_a, "out"_a);
  m.def("indexer_scores", &indexer_scores_binding, "q_index"_a, "q_dtype"_a, "weights"_a, "k_index"_a, "k_dtype"_a,
        "positions"_a, "out"_a);
  m.def("indexer_logits_cuda", &indexer_logits_cuda_binding, "q_index"_a, "q_dtype"_a, "weights"_a, "blocks"_a,
        "blocks_dtype"_a, "block_table"_a.none(), "positions"_a, "sequence_of_row"_a.none(), "out"_a, "stream"_a);
  m.def("indexer_topk_cuda", &indexer_topk_cuda_binding, "q_index"_a, "q_dtype"_a, "weights"_a, "blocks"_a,
        "blocks_dtype"_a, "block_table"_a.none(), "positions"_a, "n_keys"_a, "k"_a, "n_sink"_a, "n_local"_a,
        "kept_on_top"_a, "sequence_of_row"_a.none(), "out"_a, "stream"_a, "workspace"_a.none());
  m.def("topk_rows", &topk_rows_binding, "logits"_a, "starts"_a.none(), "ends"_a.none(), "lengths"_a.none(),
        "next_n"_a, "k"_a, "out"_a, "stream"_a, "workspace"_a.none());
  m.def("topk_rows_workspace_bytes", &topk_rows_cuda_workspace_bytes, "rows"_a, "n"_a,
        "Device bytes topk_rows may use on CUDA for R rows of L logits.");
  m.def("paged_mqa_logits", &paged_mqa_logits_binding, "q"_a, "q_dtype"_a, "weights"_a, "kv_cache"_a,
        "kv_cache_dtype"_a, "block_table"_a, "context_lens"_a, "out"_a, "stream"_a);
  m.def("ragged_mqa_logits", &ragged_mqa_logits_binding, "q"_a, "q_dtype"_a, "weights"_a, "k_fp8"_a,
        "k_fp8_dtype"_a, "k_scale"_a, "starts"_a, "ends"_a, "out"_a, "stream"_a);
  m.def("paged_mqa_topk", &paged_mqa_topk_binding, "q"_a, "q_dtype"_a, "weights"_a, "kv_cache"_a,
        "kv_cache_dtype"_a, "block_table"_a, "context_lens"_a, "n_keys"_a, "k"_a, "out"_a, "stream"_a,
        "workspace"_a.none());
  m.def("indexer_k_quant_and_cache", &indexer_k_quant_and_cache_binding, "k"_a, "kv_cache"_a,
        "kv_cache_dtype"_a, "slot_mapping"_a, "power_of_two_scale"_a);
  m.def("sparse_attention", &sparse_attention_binding, "q"_a, "k_cache"_a, "v_cache"_a, "selection"_a,
        "granularity"_a, "scale"_a, "block_table"_a.none(), "out"_a, "lse"_a.none(), "stream"_a);
  m.def("sparse_attention_backward", &sparse_attention_backward_binding, "q"_a, "k_cache"_a, "v_cache"_a,
        "selection"_a, "granularity"_a, "scale"_a, "out"_a, "lse"_a, "grad_out"_a, "grad_q"_a, "grad_k"_a,
        "grad_v"_a, "stream"_a = 0, "grad_lse"_a.none() = nb::none(), "deterministic"_a = true,
        "Gradients of sparse_attention (SPEC §9) into the float32 tensors grad_q [T, Hq, D], grad_k [N, Hkv, D] and "
        "grad_v [N, Hkv, Dv], given the forward's out and lse, grad_out and optionally grad_lse; CPU or CUDA, "
        "deterministic unless deterministic=False lets CUDA tensors take the tiled kernel.");
  m.def("sparse_attention_prefill", &sparse_attention_prefill_binding, "q"_a, "k_cache"_a, "v_cache"_a,
        "selection"_a, "granularity"_a, "scale"_a, "out"_a, "lse"_a.none(), "stream"_a,
        "The tiled tensor-core forward of attention over a selection for one sequence on a GPU (bf16 CUDA tensors).");
  m.def("sparse_attention_prefill_supported", &sparse_attention_prefill_supported_binding, "q"_a, "k_cache"_a,
        "v_cache"_a, "selection"_a, "granularity"_a,
        "Whether sparse_attention_prefill takes these tensors (False where it would raise keysel.Error).");
  m.def("indexer_kl_loss_reference", &indexer_kl_loss_reference_binding, "target"_a, "queries"_a, "weights"_a,
        "keys"_a, "positions"_a, "selection"_a.none(), "reduction"_a, "grad_queries"_a, "grad_weights"_a,
        "grad_keys"_a,
        "The Lightning Indexer's KL loss (SPEC §9.1) in double precision; writes its gradients with respect to "
        "queries, weights and keys into the given float64 arrays and returns the loss.");
  m.def("sparse_mla", &sparse_mla_binding, "q"_a, "kv"_a, "kv_dtype"_a, "indices"_a, "out"_a, "lse"_a.none(),
        "max_logits"_a.none(), "scale"_a, "attn_sink"_a.none(), "topk_length"_a.none(), "stream"_a,
        "workspace"_a.none());
  m.def("sparse_mla_backward", &sparse_mla_backward_binding, "q"_a, "kv"_a, "indices"_a, "out"_a, "lse"_a,
        "grad_out"_a, "grad_lse"_a.none(), "scale"_a, "attn_sink"_a.none(), "topk_length"_a.none(), "grad_q"_a,
        "grad_kv"_a, "grad_attn_sink"_a.none(), "stream"_a = 0,
        "Gradients of sparse_mla (SPEC §9.2) into the float32 tensors grad_q [T, h_q, 576], grad_kv [N, 576] and "
        "grad_attn_sink [h_q] (or None); CPU or CUDA, deterministic.");
  m.def("mla_v32_quantize", &mla_v32_quantize_binding, "kv"_a, "cache"_a, "cache_dtype"_a, "slot_mapping"_a);
  m.def("sparse_mla_workspace_bytes", &sparse_mla_cuda_workspace_bytes, "rows"_a, "heads"_a, "topk"_a,
        "device"_a = 0);
  m.def("select_topk_context_parallel", &select_topk_context_parallel_binding, "size"_a, "rank"_a, "all_gather"_a,
        "local_scores"_a, "local_positions"_a, "positions"_a, "n_keys"_a, "k"_a, "n_sink"_a, "n_local"_a,
        "kept_on_top"_a, "exchange"_a, "out"_a);
  m.def("sparse_attention_context_parallel", &sparse_attention_context_parallel_binding, "size"_a, "rank"_a,
        "all_gather"_a, "q"_a, "k_cache"_a, "v_cache"_a, "local_positions"_a, "positions"_a, "n_keys"_a,
        "selection"_a, "granularity"_a, "scale"_a, "out"_a, "lse"_a.none());
  m.def("metrics", &metrics_binding, "q"_a, "k_cache"_a, "v_cache"_a.none(), "positions"_a, "selection"_a, "k"_a,
        "granularity"_a, "scale"_a);

  nb::class_<IndexerKeyCache>(m, "IndexerKeyCache")
      .def("__init__",
           [](IndexerKeyCache* self, std::int64_t dim, std::string_view format, std::string_view scale,
              std::int64_t group_size, bool power_of_two_scales, bool hadamard) {
             new (self) IndexerKeyCache(dim, make_config(format, scale, group_size, power_of_two_scales, hadamard));
           },
           "dim"_a, "format"_a, "scale"_a, "group_size"_a, "power_of_two_scales"_a, "hadamard"_a)
      .def("append", &cache_append, "keys"_a, "keys_dtype"_a)
      .def("scores", &cache_scores, "q_index"_a, "q_dtype"_a, "weights"_a, "positions"_a, "out"_a)
      .def("select", &cache_select, "q_index"_a, "q_dtype"_a, "weights"_a, "positions"_a, "k"_a, "n_sink"_a, "n_local"_a,
           "kept_on_top"_a, "out"_a)
      .def("clear", &IndexerKeyCache::clear)
      .def_prop_ro("size", &IndexerKeyCache::size)
      .def_prop_ro("dim", &IndexerKeyCache::dim)
      .def_prop_ro("bytes_per_token", &IndexerKeyCache::bytes_per_token)
      .def_prop_ro("config", [](const IndexerKeyCache& cache) { return cache.config().str(); });

  nb::class_<PySelector>(m, "Selector")
      .def_prop_ro("name", [](const PySelector& self) { return self.selector->name(); })
      .def("select", &selector_select, "q"_a, "k_cache"_a, "positions"_a, "k"_a, "granularity"_a, "scale"_a,
           "n_sink"_a, "n_local"_a, "kept_on_top"_a, "q_index"_a.none(), "weights"_a.none(), "cache"_a,
           "unchanged_keys"_a, "out"_a);
  m.def("make_selector", &make_selector_binding, "spec_json"_a, "q_index"_a.none(), "k_index"_a.none(),
        "weights"_a.none());
  m.def("selector_spec_types", [] {
    std::vector<std::string> names;
    for (std::string_view name : selector_spec_types()) names.emplace_back(name);
    return names;
  });

  m.def("load_dump", &load_dump_binding, "path"_a);
  m.def("tensor_view_info",
        [](nb::handle tensor, std::string_view dtype) {
          TensorArguments args("tensor_view_info");
          const TensorView view = args.input(tensor, "tensor", dtype);
          nb::dict d;
          d["data_ptr"] = reinterpret_cast<std::uintptr_t>(view.raw_data());
          d["dtype"] = std::string(dtype_name(view.dtype()));
          d["shape"] = std::vector<std::int64_t>(view.shape().begin(), view.shape().end());
          d["strides"] = std::vector<std::int64_t>(view.strides().begin(), view.strides().end());
          d["device"] = view.device().str();
          return d;
        },
        "tensor"_a, "dtype"_a = "",
        "The keysel::TensorView a tensor becomes (data pointer, dtype, shape, strides in elements, device).");
  m.def("run_study", &run_study_binding, "config_text"_a, "config_path"_a, "out"_a);
}
