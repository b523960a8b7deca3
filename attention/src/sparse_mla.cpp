// Sparse MLA on the CPU (keysel/attention/sparse_mla.h): the V3.2 cache writer and decoder, the double-precision
// reference, and the fp32 path through sparse_attention.
#include "keysel/attention/sparse_mla.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "keysel/core/attention_inputs.h"
#include "keysel/core/checked.h"
#include "keysel/core/dtype.h"
#include "keysel/core/error.h"
#include "keysel/core/selection.h"
#include "keysel/core/threads.h"
#include "sparse_attention_backward.h"

namespace keysel {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

struct MlaShape {
  std::int64_t tokens = 0, heads = 0, topk = 0, slots = 0, page_size = 0;
  bool v32 = false;
};

/// Checks the cache and returns its slot count (and whether it is the V3.2 layout).
MlaShape check_cache(std::string_view function, const TensorView& kv) {
  MlaShape shape;
  expect_device(function, kv, "kv", Device::cpu());
  if (kv.rank() == 3) {
    expect_shape(function, kv, "kv", {kAnyExtent, kAnyExtent, kMlaV32TokenBytes});
    expect_dtype(function, kv, "kv", {DType::fp8_e4m3});
    expect_contiguous(function, kv, "kv");
    shape.v32 = true;
    shape.page_size = kv.size(1);
    KEYSEL_CHECK_ARG_IN(function, shape.page_size >= 1, "kv", "pages of at least one token", kv.str());
    shape.slots = checked_mul(kv.size(0), shape.page_size, function, "kv");
  } else {
    expect_shape(function, kv, "kv", {kAnyExtent, kMlaQkDim});
    expect_dtype(function, kv, "kv", {DType::fp32, DType::bf16, DType::fp16});
    shape.slots = kv.size(0);
  }
  KEYSEL_CHECK_ARG_IN(function, shape.slots <= kMaxKeyPositions, "kv", "at most 2^31 - 1 slots", kv.str());
  return shape;
}

/// Checks q, the cache, the indices (their values included) and the options.
MlaShape check_operands(std::string_view function, const TensorView& q, const TensorView& kv,
                        const TensorView& indices, const SparseMlaOptions& options) {
  expect_shape(function, q, "q", {kAnyExtent, kAnyExtent, kMlaQkDim});
  expect_dtype(function, q, "q", {DType::fp32, DType::bf16, DType::fp16});
  expect_device(function, q, "q", Device::cpu());
  MlaShape shape = check_cache(function, kv);
  shape.tokens = q.size(0);
  shape.heads = q.size(1);
  KEYSEL_CHECK_ARG_IN(function, shape.heads >= 1, "q", "at least one head", q.str());
  expect_shape(function, indices, "indices", {shape.tokens, kAnyExtent});
  expect_dtype(function, indices, "indices", {DType::int32});
  expect_device(function, indices, "indices", Device::cpu());
  shape.topk = indices.size(1);
  KEYSEL_CHECK_ARG_IN(function, options.scale == 0.0 || (std::isfinite(options.scale) && options.scale > 0.0), "scale",
                   "a finite scale > 0 (0: 1/sqrt(576))", options.scale);
  if (!options.attn_sink.empty()) {
    expect_shape(function, options.attn_sink, "attn_sink", {shape.heads});
    expect_dtype(function, options.attn_sink, "attn_sink", {DType::fp32});
    expect_device(function, options.attn_sink, "attn_sink", Device::cpu());
  }
  if (!options.topk_length.empty()) {
    expect_shape(function, options.topk_length, "topk_length", {shape.tokens});
    expect_dtype(function, options.topk_length, "topk_length", {DType::int32});
    expect_device(function, options.topk_length, "topk_length", Device::cpu());
  }
  // Index values: -1 or a slot of the cache, distinct among the valid entries of a row.
  std::vector<std::int64_t> last_seen(static_cast<std::size_t>(shape.slots), -1);
  for (std::int64_t t = 0; t < shape.tokens; ++t) {
    const std::int64_t count = options.topk_length.empty()
                                   ? shape.topk
                                   : std::clamp<std::int64_t>(
                                         static_cast<std::int64_t>(options.topk_length.load({t})), 0, shape.topk);
    for (std::int64_t i = 0; i < count; ++i) {
      const std::int64_t s = static_cast<std::int64_t>(indices.load({t, i}));
      if (s == -1) continue;
      const auto where = "indices[" + std::to_string(t) + ", " + std::to_string(i) + "] = " + std::to_string(s);
      if (s < 0 || s >= shape.slots) {
        detail::throw_argument_error(function, "indices",
                                     "slots in [0, " + std::to_string(shape.slots) + ") or -1", where);
      }
      if (last_seen[static_cast<std::size_t>(s)] == t) {
        detail::throw_argument_error(function, "indices", "distinct slots in each row", where + " repeated");
      }
      last_seen[static_cast<std::size_t>(s)] = t;
    }
  }
  return shape;
}

void expect_tensor(std::string_view function, const TensorView& view, std::string_view argument,
                   std::initializer_list<std::int64_t> dims, std::initializer_list<DType> dtypes, bool writable) {
  expect_shape(function, view, argument, dims);
  expect_dtype(function, view, argument, dtypes);
  expect_device(function, view, argument, Device::cpu());
  if (writable) expect_writable(function, view, argument);
}

/// Checks every argument of the forward (index values included) before anything is written.
MlaShape check(std::string_view function, const TensorView& q, const TensorView& kv, const TensorView& indices,
               const TensorView& out, const TensorView& lse, const TensorView& max_logits,
               const SparseMlaOptions& options, std::initializer_list<DType> out_types) {
  const MlaShape shape = check_operands(function, q, kv, indices, options);
  expect_tensor(function, out, "out", {shape.tokens, shape.heads, kMlaLatentDim}, out_types, true);
  if (!lse.empty()) expect_tensor(function, lse, "lse", {shape.tokens, shape.heads}, out_types, true);
  if (!max_logits.empty()) {
    expect_tensor(function, max_logits, "max_logits", {shape.tokens, shape.heads}, out_types, true);
  }
  return shape;
}

/// Checks every argument of a backward (index values included) before anything is written.
MlaShape check_backward(std::string_view function, const TensorView& q, const TensorView& kv,
                        const TensorView& indices, const TensorView& grad_out, const TensorView& grad_lse,
                        const SparseMlaGradients& gradients, const SparseMlaOptions& options,
                        std::initializer_list<DType> input_types, std::initializer_list<DType> lse_types,
                        std::initializer_list<DType> gradient_types) {
  KEYSEL_CHECK_ARG_IN(function, kv.rank() != 3, "kv", "a latent cache [N, 576] (the fp8 V3.2 pages are not differentiated)",
                      kv.str());
  const MlaShape shape = check_operands(function, q, kv, indices, options);
  expect_tensor(function, grad_out, "grad_out", {shape.tokens, shape.heads, kMlaLatentDim}, input_types, false);
  if (!grad_lse.empty()) expect_tensor(function, grad_lse, "grad_lse", {shape.tokens, shape.heads}, lse_types, false);
  expect_tensor(function, gradients.q, "gradients.q", {shape.tokens, shape.heads, kMlaQkDim}, gradient_types, true);
  expect_tensor(function, gradients.kv, "gradients.kv", {shape.slots, kMlaQkDim}, gradient_types, true);
  if (!gradients.attn_sink.empty()) {
    KEYSEL_CHECK_ARG_IN(function, !options.attn_sink.empty(), "gradients.attn_sink",
                        "empty without options.attn_sink", gradients.attn_sink.str());
    expect_tensor(function, gradients.attn_sink, "gradients.attn_sink", {shape.heads}, gradient_types, true);
  }
  return shape;
}

/// The weights of a row with the sink: c = exp(lse) / (exp(lse) + exp(sink)) scales the keys' probabilities,
/// 1 - c = exp(sink) / (exp(lse) + exp(sink)) is the sink's; both stay finite for an infinite sink.
double keys_share(double lse, double sink) { return 1.0 / (1.0 + std::exp(sink - lse)); }
double sink_share(double lse, double sink) { return 1.0 / (1.0 + std::exp(lse - sink)); }

double effective_scale(const SparseMlaOptions& options) {
  return options.scale > 0.0 ? options.scale : 1.0 / std::sqrt(static_cast<double>(kMlaQkDim));
}

/// Slot s of the cache as 576 doubles (the V3.2 layout decoded exactly).
void load_latent(const TensorView& kv, const MlaShape& shape, std::int64_t s, double* dst) {
  if (!shape.v32) {
    for (std::int64_t d = 0; d < kMlaQkDim; ++d) dst[d] = kv.load({s, d});
    return;
  }
  const auto* token = static_cast<const std::uint8_t*>(kv.raw_data()) + s * kMlaV32TokenBytes;
  float scales[kMlaLatentDim / kMlaV32ScaleGroup];
  std::memcpy(scales, token + kMlaLatentDim, sizeof(scales));
  for (std::int64_t d = 0; d < kMlaLatentDim; ++d) {
    dst[d] = static_cast<double>(fp8_e4m3_to_fp32(token[d])) * scales[d / kMlaV32ScaleGroup];
  }
  const std::uint8_t* rope = token + kMlaLatentDim + sizeof(scales);
  for (std::int64_t d = 0; d < kMlaRopeDim; ++d) {
    std::uint16_t bits = 0;
    std::memcpy(&bits, rope + 2 * d, 2);
    dst[kMlaLatentDim + d] = bf16_bits_to_fp32(bits);
  }
}

/// The valid slots of row t, in row order.
std::vector<std::int32_t> row_slots(const TensorView& indices, const SparseMlaOptions& options, std::int64_t t,
                                    std::int64_t topk) {
  const std::int64_t count =
      options.topk_length.empty()
          ? topk
          : std::clamp<std::int64_t>(static_cast<std::int64_t>(options.topk_length.load({t})), 0, topk);
  std::vector<std::int32_t> slots;
  slots.reserve(static_cast<std::size_t>(count));
  for (std::int64_t i = 0; i < count; ++i) {
    const auto s = static_cast<std::int32_t>(indices.load({t, i}));
    if (s >= 0) slots.push_back(s);
  }
  return slots;
}

void store(const TensorView& view, std::initializer_list<std::int64_t> index, double value) {
  const std::int64_t offset = view.offset(std::span<const std::int64_t>(index.begin(), index.size()));
  if (view.dtype() == DType::fp64) {
    view.mutable_data<double>()[offset] = value;
  } else {
    view.mutable_data<float>()[offset] = static_cast<float>(value);
  }
}

}  // namespace

void mla_v32_quantize(const TensorView& kv, const TensorView& cache, const TensorView& slot_mapping) {
  constexpr std::string_view function = "mla_v32_quantize";
  expect_shape(function, kv, "kv", {kAnyExtent, kMlaQkDim});
  expect_dtype(function, kv, "kv", {DType::fp32, DType::bf16, DType::fp16});
  expect_device(function, kv, "kv", Device::cpu());
  const MlaShape shape = check_cache(function, cache);
  KEYSEL_CHECK_ARG(shape.v32, "cache", "V3.2 pages [P, page_size, 656]", cache.str());
  expect_writable(function, cache, "cache");
  const std::int64_t tokens = kv.size(0);
  expect_shape(function, slot_mapping, "slot_mapping", {tokens});
  expect_dtype(function, slot_mapping, "slot_mapping", {DType::int32});
  expect_device(function, slot_mapping, "slot_mapping", Device::cpu());
  for (std::int64_t t = 0; t < tokens; ++t) {
    const std::int64_t slot = static_cast<std::int64_t>(slot_mapping.load({t}));
    KEYSEL_CHECK_ARG(slot < shape.slots, "slot_mapping",
                     "slots below " + std::to_string(shape.slots) + " (negative: skipped)",
                     "slot " + std::to_string(slot) + " at token " + std::to_string(t));
  }
  auto* bytes = static_cast<std::uint8_t*>(cache.mutable_raw_data());
  for (std::int64_t t = 0; t < tokens; ++t) {
    const std::int64_t slot = static_cast<std::int64_t>(slot_mapping.load({t}));
    if (slot < 0) continue;
    std::uint8_t* token = bytes + slot * kMlaV32TokenBytes;
    float scales[kMlaLatentDim / kMlaV32ScaleGroup];
    for (std::int64_t g = 0; g < kMlaLatentDim / kMlaV32ScaleGroup; ++g) {
      float amax = 0.0f;
      for (std::int64_t d = g * kMlaV32ScaleGroup; d < (g + 1) * kMlaV32ScaleGroup; ++d) {
        amax = std::max(amax, std::abs(static_cast<float>(kv.load({t, d}))));
      }
      float scale = std::max(amax, 1e-4f) / kFp8E4m3Max;
      int exponent = 0;
      const float mantissa = std::frexp(scale, &exponent);  // the power of two at or above scale, exactly
      scale = std::ldexp(1.0f, mantissa == 0.5f ? exponent - 1 : exponent);
      scales[g] = scale;
      for (std::int64_t d = g * kMlaV32ScaleGroup; d < (g + 1) * kMlaV32ScaleGroup; ++d) {
        token[d] = fp32_to_fp8_e4m3(static_cast<float>(kv.load({t, d})) / scale);
      }
    }
    std::memcpy(token + kMlaLatentDim, scales, sizeof(scales));
    for (std::int64_t d = 0; d < kMlaRopeDim; ++d) {
      const std::uint16_t bits = fp32_to_bf16_bits(static_cast<float>(kv.load({t, kMlaLatentDim + d})));
      std::memcpy(token + kMlaLatentDim + sizeof(scales) + 2 * d, &bits, 2);
    }
  }
}

void mla_v32_dequantize(const TensorView& cache, const TensorView& out) {
  constexpr std::string_view function = "mla_v32_dequantize";
  const MlaShape shape = check_cache(function, cache);
  KEYSEL_CHECK_ARG(shape.v32, "cache", "V3.2 pages [P, page_size, 656]", cache.str());
  expect_shape(function, out, "out", {shape.slots, kMlaQkDim});
  expect_dtype(function, out, "out", {DType::fp32});
  expect_device(function, out, "out", Device::cpu());
  expect_writable(function, out, "out");
  expect_contiguous(function, out, "out");
  std::vector<double> row(static_cast<std::size_t>(kMlaQkDim));
  float* dst = out.mutable_data<float>();
  for (std::int64_t s = 0; s < shape.slots; ++s) {
    load_latent(cache, shape, s, row.data());
    for (std::int64_t d = 0; d < kMlaQkDim; ++d) dst[s * kMlaQkDim + d] = static_cast<float>(row[static_cast<std::size_t>(d)]);
  }
}

void sparse_mla_reference(const TensorView& q, const TensorView& kv, const TensorView& indices,
                          const TensorView& out, const TensorView& lse, const SparseMlaOptions& options,
                          const TensorView& max_logits) {
  constexpr std::string_view function = "sparse_mla_reference";
  const MlaShape shape =
      check(function, q, kv, indices, out, lse, max_logits, options, {DType::fp32, DType::fp64});
  const double scale = effective_scale(options);
#pragma omp parallel for schedule(dynamic)
  for (std::int64_t t = 0; t < shape.tokens; ++t) {
    const std::vector<std::int32_t> slots = row_slots(indices, options, t, shape.topk);
    std::vector<double> latents(slots.size() * static_cast<std::size_t>(kMlaQkDim));
    for (std::size_t i = 0; i < slots.size(); ++i) load_latent(kv, shape, slots[i], latents.data() + i * kMlaQkDim);
    std::vector<double> qd(static_cast<std::size_t>(kMlaQkDim)), logits(slots.size());
    std::vector<double> o(static_cast<std::size_t>(kMlaLatentDim));
    for (std::int64_t h = 0; h < shape.heads; ++h) {
      for (std::int64_t d = 0; d < kMlaQkDim; ++d) qd[static_cast<std::size_t>(d)] = q.load({t, h, d});
      double top = kNegInf;
      for (std::size_t i = 0; i < slots.size(); ++i) {
        double dot = 0.0;
        for (std::int64_t d = 0; d < kMlaQkDim; ++d) dot += qd[static_cast<std::size_t>(d)] * latents[i * kMlaQkDim + d];
        logits[i] = scale * dot;
        top = std::max(top, logits[i]);
      }
      double sum = 0.0;  // sum of exp(l - top) over the slots
      std::fill(o.begin(), o.end(), 0.0);
      for (std::size_t i = 0; i < slots.size(); ++i) {
        const double p = std::exp(logits[i] - top);
        sum += p;
        for (std::int64_t d = 0; d < kMlaLatentDim; ++d) o[static_cast<std::size_t>(d)] += p * latents[i * kMlaQkDim + d];
      }
      // The sink enters the denominator only: exp(lse) + exp(sink), both relative to top.
      const double sink = options.attn_sink.empty() ? kNegInf : static_cast<double>(options.attn_sink.load({h}));
      const double denominator = slots.empty() ? 0.0 : sum + std::exp(sink - top);
      for (std::int64_t d = 0; d < kMlaLatentDim; ++d) {
        store(out, {t, h, d}, denominator > 0.0 ? o[static_cast<std::size_t>(d)] / denominator : 0.0);
      }
      if (!lse.empty()) store(lse, {t, h}, slots.empty() ? kNegInf : top + std::log(sum));
      if (!max_logits.empty()) store(max_logits, {t, h}, top);
    }
  }
}

void sparse_mla(const TensorView& q, const TensorView& kv, const TensorView& indices, const TensorView& out,
                const TensorView& lse, const SparseMlaOptions& options, const SparseAttentionOptions& attention,
                const TensorView& max_logits) {
  constexpr std::string_view function = "sparse_mla";
  const MlaShape shape = check(function, q, kv, indices, out, lse, max_logits, options, {DType::fp32});
  // The rows of K and V sparse_attention reads: the cache itself, or the V3.2 slots the rows name, decoded
  // (compact, in first-use order) with the rows' slots renumbered.
  std::vector<float> decoded;
  std::unordered_map<std::int32_t, std::int32_t> compact;
  std::int64_t width = 1;
  std::vector<std::vector<std::int32_t>> rows(static_cast<std::size_t>(shape.tokens));
  for (std::int64_t t = 0; t < shape.tokens; ++t) {
    rows[static_cast<std::size_t>(t)] = row_slots(indices, options, t, shape.topk);
    width = std::max<std::int64_t>(width, static_cast<std::int64_t>(rows[static_cast<std::size_t>(t)].size()));
  }
  TensorView k_view, v_view;
  if (shape.v32) {
    std::vector<double> latent(static_cast<std::size_t>(kMlaQkDim));
    for (auto& row : rows) {
      for (std::int32_t& s : row) {
        const auto [it, fresh] = compact.try_emplace(s, static_cast<std::int32_t>(compact.size()));
        if (fresh) {
          load_latent(kv, shape, s, latent.data());
          for (double x : latent) decoded.push_back(static_cast<float>(x));
        }
        s = it->second;
      }
    }
    const std::int64_t n = std::max<std::int64_t>(1, static_cast<std::int64_t>(compact.size()));
    decoded.resize(static_cast<std::size_t>(n * kMlaQkDim), 0.0f);
    const std::int64_t k_shape[] = {n, 1, kMlaQkDim}, v_shape[] = {n, 1, kMlaLatentDim};
    const std::int64_t strides[] = {kMlaQkDim, kMlaQkDim, 1};
    k_view = TensorView(decoded.data(), DType::fp32, k_shape, strides);
    v_view = TensorView(decoded.data(), DType::fp32, v_shape, strides);
  } else {
    const std::int64_t n = shape.slots;
    const std::int64_t k_shape[] = {n, 1, kMlaQkDim}, v_shape[] = {n, 1, kMlaLatentDim};
    const std::int64_t strides[] = {kv.stride(0), kMlaQkDim, kv.stride(1)};
    k_view = TensorView(kv.raw_data(), kv.dtype(), k_shape, strides);
    v_view = TensorView(kv.raw_data(), kv.dtype(), v_shape, strides);
  }
  const std::int64_t n = k_view.size(0);
  std::vector<std::int32_t> selection(static_cast<std::size_t>(checked_mul(shape.tokens, width, function, "indices")),
                                      -1);
  for (std::int64_t t = 0; t < shape.tokens; ++t) {
    std::copy(rows[static_cast<std::size_t>(t)].begin(), rows[static_cast<std::size_t>(t)].end(),
              selection.begin() + t * width);
  }
  std::vector<std::int32_t> positions(static_cast<std::size_t>(shape.tokens), static_cast<std::int32_t>(n - 1));
  std::vector<float> own_lse;
  TensorView lse_view = lse;
  if (lse.empty() && !options.attn_sink.empty()) {  // the sink needs the lse
    own_lse.resize(static_cast<std::size_t>(shape.tokens * shape.heads));
    lse_view = TensorView(own_lse.data(), DType::fp32, {shape.tokens, shape.heads});
  }
  AttentionInputs inputs;
  inputs.q = q;
  inputs.k = k_view;
  inputs.v = v_view;
  inputs.positions = TensorView(positions.data(), DType::int32, {shape.tokens});
  inputs.scale = effective_scale(options);
  sparse_attention(inputs, TensorView(selection.data(), DType::int32, {shape.tokens, 1, width}),
                   Granularity::per_kv_head, out, lse_view, attention);
  if (!max_logits.empty()) {  // the largest selected logit, from q . kv of the (decoded) rows in fp32
    const float scale = static_cast<float>(inputs.scale);
    float* const top_out = max_logits.mutable_data<float>();
    const int threads = attention.threads > 0 ? attention.threads : num_threads();
    // Each (token, head) is one sequential fp32 sum per slot, so the bits do not depend on the thread count.
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> keys, query(static_cast<std::size_t>(kMlaQkDim));
#pragma omp for schedule(dynamic)
      for (std::int64_t t = 0; t < shape.tokens; ++t) {
        const auto& row = rows[static_cast<std::size_t>(t)];
        keys.resize(row.size() * static_cast<std::size_t>(kMlaQkDim));  // the row's rows of K, once per token
        for (std::size_t i = 0; i < row.size(); ++i) {
          for (std::int64_t d = 0; d < kMlaQkDim; ++d) {
            keys[i * kMlaQkDim + static_cast<std::size_t>(d)] = static_cast<float>(k_view.load({row[i], 0, d}));
          }
        }
        for (std::int64_t h = 0; h < shape.heads; ++h) {
          for (std::int64_t d = 0; d < kMlaQkDim; ++d) {
            query[static_cast<std::size_t>(d)] = static_cast<float>(q.load({t, h, d}));
          }
          float top = -std::numeric_limits<float>::infinity();
          for (std::size_t i = 0; i < row.size(); ++i) {
            const float* key = keys.data() + i * kMlaQkDim;
            float dot = 0.0f;
            for (std::int64_t d = 0; d < kMlaQkDim; ++d) dot += query[static_cast<std::size_t>(d)] * key[d];
            top = std::max(top, scale * dot);
          }
          const std::int64_t index[] = {t, h};
          top_out[max_logits.offset(index)] = top;
        }
      }
    }
  }
  if (options.attn_sink.empty()) return;
  // The sink joins the denominator only: out *= exp(lse) / (exp(lse) + exp(sink)); lse stays.
  for (std::int64_t t = 0; t < shape.tokens; ++t) {
    for (std::int64_t h = 0; h < shape.heads; ++h) {
      const double sink = options.attn_sink.load({h});
      const double keys = lse_view.load({t, h});
      if (keys == -std::numeric_limits<double>::infinity()) continue;  // an empty row keeps o = 0
      const double factor = 1.0 / (1.0 + std::exp(sink - keys));  // sink = +inf: 0; -inf: 1
      for (std::int64_t d = 0; d < kMlaLatentDim; ++d) {
        const std::int64_t index[] = {t, h, d};
        float& value = out.mutable_data<float>()[out.offset(index)];
        value = static_cast<float>(value * factor);
      }
    }
  }
}

void sparse_mla_backward_reference(const TensorView& q, const TensorView& kv, const TensorView& indices,
                                   const TensorView& grad_out, const TensorView& grad_lse,
                                   const SparseMlaGradients& gradients, const SparseMlaOptions& options) {
  constexpr std::string_view function = "sparse_mla_backward_reference";
  const MlaShape shape = check_backward(function, q, kv, indices, grad_out, grad_lse, gradients, options,
                                        {DType::fp32, DType::bf16, DType::fp16, DType::fp64},
                                        {DType::fp32, DType::fp64}, {DType::fp32, DType::fp64});
  const double scale = effective_scale(options);
  const auto size = [](std::int64_t n) { return static_cast<std::size_t>(n); };
  std::vector<double> dq(size(shape.tokens * shape.heads * kMlaQkDim), 0.0);
  std::vector<double> dkv(size(shape.slots * kMlaQkDim), 0.0);
  std::vector<double> dsink(size(shape.heads), 0.0);
  // Plain sequential loops (dkv gathers from every row): the obvious transcription of SPEC §9.2.
  std::vector<double> latents, qd(size(kMlaQkDim)), go(size(kMlaLatentDim)), o(size(kMlaLatentDim));
  std::vector<double> logits, p_keys;
  for (std::int64_t t = 0; t < shape.tokens; ++t) {
    const std::vector<std::int32_t> slots = row_slots(indices, options, t, shape.topk);
    if (slots.empty()) continue;  // no valid slot: out = 0 and lse = -inf whatever the inputs
    latents.resize(slots.size() * size(kMlaQkDim));
    for (std::size_t i = 0; i < slots.size(); ++i) load_latent(kv, shape, slots[i], latents.data() + i * kMlaQkDim);
    logits.resize(slots.size());
    p_keys.resize(slots.size());
    for (std::int64_t h = 0; h < shape.heads; ++h) {
      for (std::int64_t d = 0; d < kMlaQkDim; ++d) qd[size(d)] = q.load({t, h, d});
      for (std::int64_t d = 0; d < kMlaLatentDim; ++d) go[size(d)] = grad_out.load({t, h, d});
      double top = kNegInf;
      for (std::size_t i = 0; i < slots.size(); ++i) {
        double dot = 0.0;
        for (std::int64_t d = 0; d < kMlaQkDim; ++d) dot += qd[size(d)] * latents[i * kMlaQkDim + d];
        logits[i] = scale * dot;
        top = std::max(top, logits[i]);
      }
      double sum = 0.0;
      for (std::size_t i = 0; i < slots.size(); ++i) sum += std::exp(logits[i] - top);
      const double lse = top + std::log(sum);
      const double sink = options.attn_sink.empty() ? kNegInf : static_cast<double>(options.attn_sink.load({h}));
      const double c = keys_share(lse, sink);
      std::fill(o.begin(), o.end(), 0.0);
      for (std::size_t i = 0; i < slots.size(); ++i) {
        p_keys[i] = std::exp(logits[i] - lse);  // P' (the lse's softmax); the output's weights are c P'
        for (std::int64_t d = 0; d < kMlaLatentDim; ++d) o[size(d)] += c * p_keys[i] * latents[i * kMlaQkDim + d];
      }
      double delta = 0.0;
      for (std::int64_t d = 0; d < kMlaLatentDim; ++d) delta += go[size(d)] * o[size(d)];
      const double d_lse = grad_lse.empty() ? 0.0 : grad_lse.load({t, h});
      double* dq_row = dq.data() + (t * shape.heads + h) * kMlaQkDim;
      for (std::size_t i = 0; i < slots.size(); ++i) {
        const double* x = latents.data() + i * kMlaQkDim;
        double dp = 0.0;
        for (std::int64_t d = 0; d < kMlaLatentDim; ++d) dp += go[size(d)] * x[d];
        const double p = c * p_keys[i];
        const double ds = p * (dp - delta) + p_keys[i] * d_lse;
        double* dkv_row = dkv.data() + static_cast<std::int64_t>(slots[i]) * kMlaQkDim;
        for (std::int64_t d = 0; d < kMlaQkDim; ++d) {
          dq_row[d] += scale * ds * x[d];
          dkv_row[d] += scale * ds * qd[size(d)];
        }
        for (std::int64_t d = 0; d < kMlaLatentDim; ++d) dkv_row[d] += p * go[size(d)];
      }
      dsink[size(h)] -= sink_share(lse, sink) * delta;
    }
  }
  for (std::int64_t t = 0; t < shape.tokens; ++t) {
    for (std::int64_t h = 0; h < shape.heads; ++h) {
      for (std::int64_t d = 0; d < kMlaQkDim; ++d) store(gradients.q, {t, h, d}, dq[size((t * shape.heads + h) * kMlaQkDim + d)]);
    }
  }
  for (std::int64_t s = 0; s < shape.slots; ++s) {
    for (std::int64_t d = 0; d < kMlaQkDim; ++d) store(gradients.kv, {s, d}, dkv[size(s * kMlaQkDim + d)]);
  }
  if (!gradients.attn_sink.empty()) {
    for (std::int64_t h = 0; h < shape.heads; ++h) store(gradients.attn_sink, {h}, dsink[size(h)]);
  }
}

void sparse_mla_backward(const TensorView& q, const TensorView& kv, const TensorView& indices, const TensorView& out,
                         const TensorView& lse, const TensorView& grad_out, const TensorView& grad_lse,
                         const SparseMlaGradients& gradients, const SparseMlaOptions& options,
                         const SparseAttentionOptions& attention) {
  constexpr std::string_view function = "sparse_mla_backward";
  const MlaShape shape = check_backward(function, q, kv, indices, grad_out, grad_lse, gradients, options,
                                        {DType::fp32, DType::bf16, DType::fp16}, {DType::fp32}, {DType::fp32});
  expect_tensor(function, out, "out", {shape.tokens, shape.heads, kMlaLatentDim},
                {DType::fp32, DType::bf16, DType::fp16}, false);
  expect_tensor(function, lse, "lse", {shape.tokens, shape.heads}, {DType::fp32}, false);
  // The valid slots of each row, compacted into a selection [T, 1, width] of one key head that every query may
  // read (as sparse_mla hands them to sparse_attention).
  std::int64_t width = 1;
  std::vector<std::vector<std::int32_t>> rows(static_cast<std::size_t>(shape.tokens));
  for (std::int64_t t = 0; t < shape.tokens; ++t) {
    rows[static_cast<std::size_t>(t)] = row_slots(indices, options, t, shape.topk);
    width = std::max<std::int64_t>(width, static_cast<std::int64_t>(rows[static_cast<std::size_t>(t)].size()));
  }
  std::vector<std::int32_t> selection(static_cast<std::size_t>(checked_mul(shape.tokens, width, function, "indices")),
                                      -1);
  for (std::int64_t t = 0; t < shape.tokens; ++t) {
    std::copy(rows[static_cast<std::size_t>(t)].begin(), rows[static_cast<std::size_t>(t)].end(),
              selection.begin() + t * width);
  }
  const std::int64_t n = shape.slots;
  std::vector<std::int32_t> positions(static_cast<std::size_t>(shape.tokens), static_cast<std::int32_t>(n - 1));
  const std::int64_t k_shape[] = {n, 1, kMlaQkDim}, v_shape[] = {n, 1, kMlaLatentDim};
  const std::int64_t strides[] = {kv.stride(0), kMlaQkDim, kv.stride(1)};
  AttentionInputs inputs;
  inputs.q = q;
  inputs.k = TensorView(kv.raw_data(), kv.dtype(), k_shape, strides);
  inputs.v = TensorView(kv.raw_data(), kv.dtype(), v_shape, strides);
  inputs.positions = TensorView(positions.data(), DType::int32, {shape.tokens});
  inputs.scale = effective_scale(options);
  const std::int64_t grad_strides[] = {gradients.kv.stride(0), kMlaQkDim, gradients.kv.stride(1)};
  const TensorView grad_k(gradients.kv.mutable_raw_data(), DType::fp32, k_shape, grad_strides, Device::cpu(),
                          false);

  // The sink scales the output's weights by c = exp(lse) / (exp(lse) + exp(sink)) per row.
  const std::size_t row_count = static_cast<std::size_t>(shape.tokens * shape.heads);
  std::vector<float> factor, delta(row_count);
  if (!options.attn_sink.empty()) {
    factor.resize(row_count);
    for (std::int64_t t = 0; t < shape.tokens; ++t) {
      for (std::int64_t h = 0; h < shape.heads; ++h) {
        factor[static_cast<std::size_t>(t * shape.heads + h)] = static_cast<float>(
            keys_share(lse.load({t, h}), static_cast<double>(options.attn_sink.load({h}))));
      }
    }
  }
  detail::BackwardTerms terms;
  terms.grad_lse = grad_lse;
  terms.out_factor = factor.empty() ? nullptr : factor.data();
  terms.values_in_keys = true;
  terms.delta = delta.data();
  detail::sparse_attention_backward_with_terms(
      function, inputs, TensorView(selection.data(), DType::int32, {shape.tokens, 1, width}),
      Granularity::per_kv_head, out, lse, grad_out, gradients.q, grad_k, TensorView(), attention, terms);

  if (gradients.attn_sink.empty()) return;
  // d sink[h] = -sum_t (1 - c[t,h]) Delta[t,h], tokens ascending; rows with no valid slot add nothing.
  for (std::int64_t h = 0; h < shape.heads; ++h) {
    const double sink = options.attn_sink.load({h});
    double sum = 0.0;
    for (std::int64_t t = 0; t < shape.tokens; ++t) {
      if (rows[static_cast<std::size_t>(t)].empty()) continue;
      sum += sink_share(lse.load({t, h}), sink) * static_cast<double>(delta[static_cast<std::size_t>(t * shape.heads + h)]);
    }
    const std::int64_t index[] = {h};
    gradients.attn_sink.mutable_data<float>()[gradients.attn_sink.offset(index)] = static_cast<float>(-sum);
  }
}

}  // namespace keysel
