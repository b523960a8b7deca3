// Argument checks of sparse_attention_prefill_cuda (and sparse_attention_prefill_cuda_supported); the kernels are
// in cuda_sparse_attention_tiled.cu.
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "keysel/attention/cuda_sparse_attention.h"
#include "keysel/core/build_config.h"
#include "keysel/core/error.h"

#if KEYSEL_CUDA
#include "cuda_glue.h"
#include "cuda_sparse_attention_tiled_launch.h"
#endif

namespace keysel {

#if KEYSEL_CUDA

using cuda_glue::aligned16;
using cuda_glue::check_tensor;

namespace {

constexpr std::string_view kFunction = "sparse_attention_prefill_cuda";

/// Every check of sparse_attention_prefill_cuda (throwing keysel::Error on the first that fails), those of out
/// left out where `out` is null; the launch's parameters.
cuda_kernels::TiledForwardLaunch checked_launch(const TensorView& q, const TensorView& k, const TensorView& v,
                                                const TensorView& selection, Granularity granularity, double scale,
                                                const TensorView* out, const TensorView& lse) {
  expect_shape(kFunction, q, "q", {kAnyExtent, kAnyExtent, kAnyExtent});
  expect_dtype(kFunction, q, "q", {DType::bf16});
  const Device device = q.device();
  KEYSEL_CHECK_ARG_IN(kFunction, device.kind == DeviceKind::cuda, "q", "a tensor on a CUDA device", q.str());
  expect_contiguous(kFunction, q, "q");
  const std::int64_t tokens = q.size(0), query_heads = q.size(1), head_dim = q.size(2);
  check_tensor(kFunction, k, "k", {kAnyExtent, kAnyExtent, head_dim}, {DType::bf16}, device, false);
  const std::int64_t keys = k.size(0), kv_heads = k.size(1);
  check_tensor(kFunction, v, "v", {keys, kv_heads, kAnyExtent}, {DType::bf16}, device, false);
  const std::int64_t value_dim = v.size(2);
  KEYSEL_CHECK_ARG_IN(kFunction, kv_heads >= 1 && query_heads % kv_heads == 0, "k",
                      "Hkv >= 1 dividing Hq = " + std::to_string(query_heads), kv_heads);
  KEYSEL_CHECK_ARG_IN(kFunction, keys >= 1, "k", "N >= 1 keys", k.str());
  const std::int64_t groups = group_count(granularity, query_heads, kv_heads);
  check_tensor(kFunction, selection, "selection", {tokens, groups, kAnyExtent}, {DType::int32}, device, false);
  if (out != nullptr) {
    check_tensor(kFunction, *out, "out", {tokens, query_heads, value_dim}, {DType::bf16, DType::fp32}, device, true);
  }
  if (!lse.empty()) check_tensor(kFunction, lse, "lse", {tokens, query_heads}, {DType::fp32}, device, true);
  const double effective_scale = scale == 0.0 ? 1.0 / std::sqrt(static_cast<double>(head_dim)) : scale;
  KEYSEL_CHECK_ARG_IN(kFunction, std::isfinite(effective_scale) && effective_scale > 0.0, "scale",
                      "finite and > 0 (or 0)", scale);
  const cuda_glue::DeviceFacts facts = cuda_glue::use_device(kFunction, device.index);
  const cuda_kernels::TiledShape shape = cuda_kernels::tiled_shape(q, k, v, selection);
  if (const std::optional<cuda_kernels::TiledRefusal> refusal =
          cuda_kernels::tiled_refusal(shape, facts.shared_memory_optin, false)) {
    detail::throw_argument_error(kFunction, refusal->argument, refusal->expected, refusal->got);
  }
  for (const auto& [view, name] : {std::pair<const TensorView*, const char*>{&q, "q"}, {&k, "k"}, {&v, "v"}}) {
    KEYSEL_CHECK_ARG_IN(kFunction, aligned16(view->raw_data()), name,
                        "data aligned to 16 bytes (the tiled kernels' vector loads)", view->str());
  }
  cuda_glue::expect_device_pointers(kFunction,
                                    {{q.raw_data(), "q"},
                                     {k.raw_data(), "k"},
                                     {v.raw_data(), "v"},
                                     {selection.raw_data(), "selection"},
                                     {out != nullptr ? out->raw_data() : nullptr, "out"},
                                     {lse.raw_data(), "lse"}},
                                    device.index);
  cuda_kernels::TiledForwardLaunch launch{};
  launch.shape = shape;
  launch.q = q.raw_data();
  launch.k = k.raw_data();
  launch.v = v.raw_data();
  launch.selection = selection.data<std::int32_t>();
  launch.out = out != nullptr ? out->mutable_raw_data() : nullptr;
  launch.out_bf16 = out == nullptr || out->dtype() == DType::bf16;
  launch.lse = lse.empty() ? nullptr : lse.mutable_data<float>();
  launch.scale = static_cast<float>(effective_scale);
  launch.device = device.index;
  return launch;
}

}  // namespace

void sparse_attention_prefill_cuda(const TensorView& q, const TensorView& k, const TensorView& v,
                                   const TensorView& selection, Granularity granularity, double scale,
                                   const TensorView& out, const TensorView& lse, void* stream) {
  const cuda_kernels::TiledForwardLaunch launch = checked_launch(q, k, v, selection, granularity, scale, &out, lse);
  cuda_kernels::launch_sparse_attention_tiled_forward(kFunction, launch, stream);
}

bool sparse_attention_prefill_cuda_supported(const TensorView& q, const TensorView& k, const TensorView& v,
                                             const TensorView& selection, Granularity granularity) {
  try {
    checked_launch(q, k, v, selection, granularity, 0.0, nullptr, {});
    return true;
  } catch (const Error&) {
    return false;
  }
}

#else  // !KEYSEL_CUDA

void sparse_attention_prefill_cuda(const TensorView&, const TensorView&, const TensorView&, const TensorView&,
                                   Granularity, double, const TensorView&, const TensorView&, void*) {
  detail::throw_error("sparse_attention_prefill_cuda", "keysel was built without CUDA");
}

bool sparse_attention_prefill_cuda_supported(const TensorView&, const TensorView&, const TensorView&,
                                             const TensorView&, Granularity) {
  return false;
}

#endif  // KEYSEL_CUDA

}  // namespace keysel
