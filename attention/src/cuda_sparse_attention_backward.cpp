// Argument checks of sparse_attention_backward_cuda; the kernels are in cuda_sparse_attention_backward.cu (the
// deterministic ones) and cuda_sparse_attention_tiled.cu (the tiled ones, deterministic = false).
#include <cmath>
#include <cstdint>
#include <string>

#include "keysel/attention/cuda_sparse_attention.h"
#include "keysel/core/build_config.h"
#include "keysel/core/error.h"

#if KEYSEL_CUDA
#include "cuda_glue.h"
#include "cuda_sparse_attention_backward_launch.h"
#include "cuda_sparse_attention_tiled_launch.h"
#endif

namespace keysel {

#if KEYSEL_CUDA

using cuda_glue::aligned16;
using cuda_glue::check_tensor;

void sparse_attention_backward_cuda(const TensorView& q, const TensorView& k, const TensorView& v,
                                    const TensorView& selection, Granularity granularity, double scale,
                                    const TensorView& out, const TensorView& lse, const TensorView& grad_out,
                                    const TensorView& grad_q, const TensorView& grad_k, const TensorView& grad_v,
                                    void* stream, const TensorView& grad_lse, const CudaBackwardOptions& options) {
  constexpr std::string_view function = "sparse_attention_backward_cuda";
  expect_shape(function, q, "q", {kAnyExtent, kAnyExtent, kAnyExtent});
  expect_dtype(function, q, "q", {DType::bf16, DType::fp32});
  const Device device = q.device();
  KEYSEL_CHECK_ARG(device.kind == DeviceKind::cuda, "q", "a tensor on a CUDA device", q.str());
  expect_contiguous(function, q, "q");
  const DType dtype = q.dtype();
  const std::int64_t tokens = q.size(0), query_heads = q.size(1), head_dim = q.size(2);
  check_tensor(function, k, "k", {kAnyExtent, kAnyExtent, head_dim}, {dtype}, device, false);
  const std::int64_t keys = k.size(0), kv_heads = k.size(1);
  check_tensor(function, v, "v", {keys, kv_heads, kAnyExtent}, {dtype}, device, false);
  const std::int64_t value_dim = v.size(2);
  KEYSEL_CHECK_ARG(head_dim >= 1 && head_dim <= 256 && value_dim >= 1 && value_dim <= 256, "q",
                   "head dims 1 <= D, Dv <= 256",
                   "D = " + std::to_string(head_dim) + ", Dv = " + std::to_string(value_dim));
  KEYSEL_CHECK_ARG(kv_heads >= 1 && query_heads % kv_heads == 0, "k",
                   "Hkv >= 1 dividing Hq = " + std::to_string(query_heads), kv_heads);
  KEYSEL_CHECK_ARG(keys >= 1, "k", "N >= 1 keys", k.str());
  const std::int64_t groups = group_count(granularity, query_heads, kv_heads);
  check_tensor(function, selection, "selection", {tokens, groups, kAnyExtent}, {DType::int32}, device, false);
  const std::int64_t width = selection.size(2);
  check_tensor(function, out, "out", {tokens, query_heads, value_dim}, {dtype}, device, false);
  check_tensor(function, lse, "lse", {tokens, query_heads}, {DType::fp32}, device, false);
  check_tensor(function, grad_out, "grad_out", {tokens, query_heads, value_dim}, {dtype}, device, false);
  if (!grad_lse.empty()) {
    check_tensor(function, grad_lse, "grad_lse", {tokens, query_heads}, {DType::fp32}, device, false);
  }
  check_tensor(function, grad_q, "grad_q", {tokens, query_heads, head_dim}, {DType::fp32}, device, true);
  check_tensor(function, grad_k, "grad_k", {keys, kv_heads, head_dim}, {DType::fp32}, device, true);
  check_tensor(function, grad_v, "grad_v", {keys, kv_heads, value_dim}, {DType::fp32}, device, true);
  const double effective_scale = scale == 0.0 ? 1.0 / std::sqrt(static_cast<double>(head_dim)) : scale;
  KEYSEL_CHECK_ARG(std::isfinite(effective_scale) && effective_scale > 0.0, "scale", "finite and > 0 (or 0)", scale);
  // Sizes: grid dimensions below 2^31 and the 64-bit sort keys ((kv * N + s) * units + unit) without overflow.
  constexpr std::int64_t kIntMax = 0x7fffffff;
  const std::int64_t units = tokens * (granularity == Granularity::per_head ? query_heads : kv_heads);
  const bool fits = width <= kIntMax && query_heads <= kIntMax && tokens <= kIntMax && keys <= kIntMax &&
                    units / 4 < kIntMax && tokens * query_heads / 4 < kIntMax && kv_heads * keys / 4 < kIntMax &&
                    (width == 0 || units <= kIntMax * 64 / width) &&
                    static_cast<double>(kv_heads) * static_cast<double>(keys) * static_cast<double>(units) < 1.8e19;
  KEYSEL_CHECK_ARG(fits, "selection", "T * G * W entries below 2^37 and Hkv * N * units below 2^64", selection.str());
  const cuda_glue::DeviceFacts facts = cuda_glue::use_device(function, device.index);
  cuda_glue::expect_device_pointers(function,
                                    {{q.raw_data(), "q"},
                                     {k.raw_data(), "k"},
                                     {v.raw_data(), "v"},
                                     {selection.raw_data(), "selection"},
                                     {out.raw_data(), "out"},
                                     {lse.raw_data(), "lse"},
                                     {grad_out.raw_data(), "grad_out"},
                                     {grad_lse.raw_data(), "grad_lse"},
                                     {grad_q.raw_data(), "grad_q"},
                                     {grad_k.raw_data(), "grad_k"},
                                     {grad_v.raw_data(), "grad_v"}},
                                    device.index);

  if (!options.deterministic && dtype == DType::bf16 && aligned16(q.raw_data()) && aligned16(k.raw_data()) &&
      aligned16(v.raw_data()) && aligned16(grad_out.raw_data()) && aligned16(grad_k.raw_data()) &&
      aligned16(grad_v.raw_data())) {
    const cuda_kernels::TiledShape shape = cuda_kernels::tiled_shape(q, k, v, selection);
    if (!cuda_kernels::tiled_refusal(shape, facts.shared_memory_optin, true)) {
      cuda_kernels::TiledBackwardLaunch tiled{};
      tiled.shape = shape;
      tiled.q = q.raw_data();
      tiled.k = k.raw_data();
      tiled.v = v.raw_data();
      tiled.out = out.raw_data();
      tiled.grad_out = grad_out.raw_data();
      tiled.lse = lse.data<float>();
      tiled.grad_lse = grad_lse.empty() ? nullptr : grad_lse.data<float>();
      tiled.selection = selection.data<std::int32_t>();
      tiled.grad_q = grad_q.mutable_data<float>();
      tiled.grad_k = grad_k.mutable_data<float>();
      tiled.grad_v = grad_v.mutable_data<float>();
      tiled.scale = static_cast<float>(effective_scale);
      tiled.device = device.index;
      cuda_kernels::launch_sparse_attention_tiled_backward(function, tiled, stream);
      return;
    }
  }

  cuda_kernels::SparseBackwardLaunch launch{};
  launch.q = q.raw_data();
  launch.k = k.raw_data();
  launch.v = v.raw_data();
  launch.out = out.raw_data();
  launch.grad_out = grad_out.raw_data();
  launch.lse = lse.data<float>();
  launch.selection = selection.data<std::int32_t>();
  launch.grad_q = grad_q.mutable_data<float>();
  launch.grad_k = grad_k.mutable_data<float>();
  launch.grad_v = grad_v.mutable_data<float>();
  launch.tokens = tokens;
  launch.keys = keys;
  launch.query_heads = static_cast<int>(query_heads);
  launch.kv_heads = static_cast<int>(kv_heads);
  launch.head_dim = static_cast<int>(head_dim);
  launch.value_dim = static_cast<int>(value_dim);
  launch.groups = static_cast<int>(groups);
  launch.width = static_cast<int>(width);
  launch.granularity = granularity;
  launch.bf16 = dtype == DType::bf16;
  launch.out_bf16 = launch.bf16;
  launch.grad_out_bf16 = launch.bf16;
  launch.grad_lse = grad_lse.empty() ? nullptr : grad_lse.data<float>();
  launch.scale = static_cast<float>(effective_scale);
  launch.device = device.index;
  cuda_kernels::launch_sparse_attention_backward(function, launch, stream);
}

#else  // !KEYSEL_CUDA

void sparse_attention_backward_cuda(const TensorView&, const TensorView&, const TensorView&, const TensorView&,
                                    Granularity, double, const TensorView&, const TensorView&, const TensorView&,
                                    const TensorView&, const TensorView&, const TensorView&, void*,
                                    const TensorView&, const CudaBackwardOptions&) {
  detail::throw_error("sparse_attention_backward_cuda", "keysel was built without CUDA");
}

#endif  // KEYSEL_CUDA

}  // namespace keysel
