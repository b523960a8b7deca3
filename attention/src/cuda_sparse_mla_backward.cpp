// Argument checks of sparse_mla_backward_cuda; the kernels are in cuda_sparse_mla_backward.cu and
// cuda_sparse_attention_backward.cu.
#include <cstdint>
#include <string>

#include "keysel/attention/sparse_mla.h"
#include "keysel/core/build_config.h"
#include "keysel/core/error.h"

#if KEYSEL_CUDA
#include "cuda_glue.h"
#include "cuda_sparse_mla_backward_launch.h"
#include "cuda_sparse_mla_checks.h"
#endif

namespace keysel {

#if KEYSEL_CUDA

using cuda_glue::check_tensor;

void sparse_mla_backward_cuda(const TensorView& q, const TensorView& kv, const TensorView& indices,
                              const TensorView& out, const TensorView& lse, const TensorView& grad_out,
                              const TensorView& grad_lse, const SparseMlaGradients& gradients,
                              const SparseMlaOptions& options, void* stream) {
  constexpr std::string_view function = "sparse_mla_backward_cuda";
  expect_shape(function, q, "q", {kAnyExtent, kAnyExtent, kMlaQkDim});
  expect_dtype(function, q, "q", {DType::bf16, DType::fp32});
  const Device device = q.device();
  KEYSEL_CHECK_ARG(device.kind == DeviceKind::cuda, "q", "a tensor on a CUDA device", q.str());
  expect_contiguous(function, q, "q");
  const DType dtype = q.dtype();
  const std::int64_t tokens = q.size(0), heads = q.size(1);
  KEYSEL_CHECK_ARG(heads >= 1, "q", "at least one head", q.str());
  KEYSEL_CHECK_ARG(kv.rank() != 3, "kv", "a latent cache [N, 576] (the fp8 V3.2 pages are not differentiated)",
                   kv.str());
  check_tensor(function, kv, "kv", {kAnyExtent, kMlaQkDim}, {dtype}, device, false);
  const std::int64_t slots = kv.size(0);
  const std::int64_t topk = detail::check_cuda_mla_indices(function, indices, tokens, device);
  KEYSEL_CHECK_ARG(tokens <= 1 || indices.stride(0) >= 0, "indices", "a row stride >= 0", indices.str());
  check_tensor(function, out, "out", {tokens, heads, kMlaLatentDim}, {DType::bf16, DType::fp32}, device, false);
  check_tensor(function, lse, "lse", {tokens, heads}, {DType::fp32}, device, false);
  check_tensor(function, grad_out, "grad_out", {tokens, heads, kMlaLatentDim}, {DType::bf16, DType::fp32}, device,
               false);
  if (!grad_lse.empty()) check_tensor(function, grad_lse, "grad_lse", {tokens, heads}, {DType::fp32}, device, false);
  const float scale = detail::check_cuda_mla_options(function, options, tokens, heads, device);
  check_tensor(function, gradients.q, "gradients.q", {tokens, heads, kMlaQkDim}, {DType::fp32}, device, true);
  check_tensor(function, gradients.kv, "gradients.kv", {slots, kMlaQkDim}, {DType::fp32}, device, true);
  if (!gradients.attn_sink.empty()) {
    KEYSEL_CHECK_ARG(!options.attn_sink.empty(), "gradients.attn_sink", "empty without options.attn_sink",
                     gradients.attn_sink.str());
    check_tensor(function, gradients.attn_sink, "gradients.attn_sink", {heads}, {DType::fp32}, device, true);
  }
  // Sizes: grid dimensions below 2^31 and the attention backward's 64-bit sort keys (s * T + t) without overflow.
  constexpr std::int64_t kIntMax = 0x7fffffff;
  const bool fits = tokens <= kIntMax && heads <= kIntMax && slots <= kIntMax && topk <= kIntMax &&
                    tokens * heads / 4 < kIntMax && (topk == 0 || tokens <= kIntMax * 64 / topk);
  KEYSEL_CHECK_ARG(fits, "indices", "T * topk entries below 2^37, T * h_q rows below 2^33 and N below 2^31",
                   "q " + q.str() + ", kv " + kv.str() + ", indices " + indices.str());
  cuda_glue::use_device(function, device.index);
  cuda_glue::expect_device_pointers(function,
                                    {{q.raw_data(), "q"},
                                     {kv.raw_data(), "kv"},
                                     {indices.raw_data(), "indices"},
                                     {out.raw_data(), "out"},
                                     {lse.raw_data(), "lse"},
                                     {grad_out.raw_data(), "grad_out"},
                                     {grad_lse.raw_data(), "grad_lse"},
                                     {options.attn_sink.raw_data(), "attn_sink"},
                                     {options.topk_length.raw_data(), "topk_length"},
                                     {gradients.q.raw_data(), "gradients.q"},
                                     {gradients.kv.raw_data(), "gradients.kv"},
                                     {gradients.attn_sink.raw_data(), "gradients.attn_sink"}},
                                    device.index);

  cuda_kernels::SparseMlaBackwardLaunch launch{};
  launch.q = q.raw_data();
  launch.kv = kv.raw_data();
  launch.bf16 = dtype == DType::bf16;
  launch.out = out.raw_data();
  launch.grad_out = grad_out.raw_data();
  launch.out_bf16 = out.dtype() == DType::bf16;
  launch.grad_out_bf16 = grad_out.dtype() == DType::bf16;
  launch.lse = lse.data<float>();
  launch.grad_lse = grad_lse.empty() ? nullptr : grad_lse.data<float>();
  launch.indices = indices.data<std::int32_t>();
  launch.index_stride = indices.stride(0);
  launch.topk = static_cast<int>(topk);
  launch.topk_length = options.topk_length.empty() ? nullptr : options.topk_length.data<std::int32_t>();
  launch.attn_sink = options.attn_sink.empty() ? nullptr : options.attn_sink.data<float>();
  launch.grad_q = gradients.q.mutable_data<float>();
  launch.grad_kv = gradients.kv.mutable_data<float>();
  launch.grad_attn_sink = gradients.attn_sink.empty() ? nullptr : gradients.attn_sink.mutable_data<float>();
  launch.tokens = tokens;
  launch.slots = slots;
  launch.heads = static_cast<int>(heads);
  launch.scale = scale;
  launch.device = device.index;
  cuda_kernels::launch_sparse_mla_backward(function, launch, stream);
}

#else  // !KEYSEL_CUDA

void sparse_mla_backward_cuda(const TensorView&, const TensorView&, const TensorView&, const TensorView&,
                              const TensorView&, const TensorView&, const TensorView&, const SparseMlaGradients&,
                              const SparseMlaOptions&, void*) {
  detail::throw_error("sparse_mla_backward_cuda", "keysel was built without CUDA");
}

#endif  // KEYSEL_CUDA

}  // namespace keysel
