// Argument checks of sparse_mla_cuda; the kernels are in cuda_sparse_mla.cu.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "keysel/attention/sparse_mla.h"
#include "keysel/core/build_config.h"
#include "keysel/core/checked.h"
#include "keysel/core/error.h"

#if KEYSEL_CUDA
#include "cuda_glue.h"
#include "cuda_sparse_mla_checks.h"
#include "cuda_sparse_mla_launch.h"
#include "cuda_workspace.h"
#endif

namespace keysel {

#if KEYSEL_CUDA

namespace {

constexpr std::int64_t kIntMax = 0x7fffffff;

void check_sizes(std::string_view function, std::int64_t rows, std::int64_t heads, std::int64_t topk) {
  KEYSEL_CHECK_ARG_IN(function, rows >= 0 && rows <= kIntMax, "q", "at most 2^31 - 1 rows", rows);
  KEYSEL_CHECK_ARG_IN(function, heads >= 1 && heads <= 65535, "q", "1 to 65535 heads", heads);
  KEYSEL_CHECK_ARG_IN(function, topk >= 0 && topk <= kIntMax, "indices", "at most 2^31 - 1 slots a row", topk);
}

}  // namespace

namespace detail {

std::int64_t check_cuda_mla_indices(std::string_view function, const TensorView& indices, std::int64_t rows,
                                    Device device) {
  expect_shape(function, indices, "indices", {rows, kAnyExtent});
  expect_dtype(function, indices, "indices", {DType::int32});
  expect_device(function, indices, "indices", device);
  KEYSEL_CHECK_ARG_IN(function, indices.size(1) <= 1 || indices.stride(1) == 1, "indices",
                      "contiguous slots in each row", indices.str());
  return indices.size(1);
}

float check_cuda_mla_options(std::string_view function, const SparseMlaOptions& options, std::int64_t rows,
                             std::int64_t heads, Device device) {
  if (!options.attn_sink.empty()) {
    cuda_glue::check_tensor(function, options.attn_sink, "attn_sink", {heads}, {DType::fp32}, device, false);
  }
  if (!options.topk_length.empty()) {
    cuda_glue::check_tensor(function, options.topk_length, "topk_length", {rows}, {DType::int32}, device, false);
  }
  KEYSEL_CHECK_ARG_IN(function, options.scale == 0.0 || (std::isfinite(options.scale) && options.scale > 0.0),
                      "scale", "a finite scale > 0 (0: 1/sqrt(576))", options.scale);
  return static_cast<float>(options.scale > 0.0 ? options.scale : 1.0 / std::sqrt(double(kMlaQkDim)));
}

}  // namespace detail

std::int64_t sparse_mla_cuda_workspace_bytes(std::int64_t rows, std::int64_t heads, std::int64_t topk, int device) {
  constexpr std::string_view function = "sparse_mla_cuda_workspace_bytes";
  check_sizes(function, rows, heads, topk);
  const cuda_glue::DeviceFacts facts = cuda_glue::use_device(function, device);
  return static_cast<std::int64_t>(cuda_kernels::sparse_mla_workspace_bytes(
      static_cast<int>(rows), static_cast<int>(heads), static_cast<int>(topk), facts.multiprocessors, device));
}

void sparse_mla_cuda(const TensorView& q, const TensorView& kv, const TensorView& indices, const TensorView& out,
                     const TensorView& lse, const SparseMlaOptions& options, const TensorView& max_logits, void* stream,
                     const TensorView& workspace) {
  constexpr std::string_view function = "sparse_mla_cuda";
  expect_shape(function, q, "q", {kAnyExtent, kAnyExtent, kMlaQkDim});
  expect_dtype(function, q, "q", {DType::bf16});
  const Device device = q.device();
  KEYSEL_CHECK_ARG(device.kind == DeviceKind::cuda, "q", "a tensor on a CUDA device", q.str());
  expect_contiguous(function, q, "q");
  const std::int64_t rows = q.size(0), heads = q.size(1);

  cuda_kernels::SparseMlaLaunch launch{};
  expect_device(function, kv, "kv", device);
  if (kv.rank() == 3) {
    expect_shape(function, kv, "kv", {kAnyExtent, kAnyExtent, kMlaV32TokenBytes});
    expect_dtype(function, kv, "kv", {DType::fp8_e4m3, DType::int8});
    KEYSEL_CHECK_ARG(kv.size(1) >= 1 && kv.stride(2) == 1 && kv.stride(1) == kMlaV32TokenBytes && kv.stride(0) > 0 &&
                         kv.stride(0) % 16 == 0,
                     "kv",
                     "V3.2 pages with contiguous tokens and a page stride that "
                     "is a multiple of 16 bytes",
                     kv.str());
    launch.v32 = true;
    launch.page_size = static_cast<int>(std::min<std::int64_t>(kv.size(1), kIntMax));
    KEYSEL_CHECK_ARG(kv.size(1) <= kIntMax, "kv", "pages of fewer than 2^31 tokens", kv.str());
    launch.kv_stride = kv.stride(0);
    launch.slots = checked_mul(kv.size(0), kv.size(1), function, "kv");
  } else {
    expect_shape(function, kv, "kv", {kAnyExtent, kMlaQkDim});
    expect_dtype(function, kv, "kv", {DType::bf16});
    KEYSEL_CHECK_ARG(kv.stride(1) == 1 && kv.stride(0) > 0 && kv.stride(0) % 8 == 0, "kv",
                     "a bf16 latent cache with contiguous channels and a row stride that is "
                     "a multiple of 8",
                     kv.str());
    launch.kv_stride = checked_mul(kv.stride(0), 2, function, "kv");
    launch.slots = kv.size(0);
  }
  const std::int64_t topk = detail::check_cuda_mla_indices(function, indices, rows, device);
  check_sizes(function, rows, heads, topk);
  expect_shape(function, out, "out", {rows, heads, kMlaLatentDim});
  expect_dtype(function, out, "out", {DType::bf16, DType::fp32});
  expect_device(function, out, "out", device);
  expect_writable(function, out, "out");
  expect_contiguous(function, out, "out");
  for (const auto& [view, name] : {std::pair{lse, "lse"}, std::pair{max_logits, "max_logits"}}) {
    if (view.empty()) continue;
    expect_shape(function, view, name, {rows, heads});
    expect_dtype(function, view, name, {DType::fp32});
    expect_device(function, view, name, device);
    expect_writable(function, view, name);
    expect_contiguous(function, view, name);
  }
  const float scale = detail::check_cuda_mla_options(function, options, rows, heads, device);
  const cuda_glue::DeviceFacts facts = cuda_glue::use_device(function, device.index);
  launch.workspace = detail::workspace_pointer(function, workspace,
                                               static_cast<std::int64_t>(cuda_kernels::sparse_mla_workspace_bytes(
                                                   static_cast<int>(rows), static_cast<int>(heads),
                                                   static_cast<int>(topk), facts.multiprocessors, device.index)),
                                               device);
  cuda_glue::expect_device_pointers(function,
                                    {{q.raw_data(), "q"},
                                     {kv.raw_data(), "kv"},
                                     {indices.raw_data(), "indices"},
                                     {out.raw_data(), "out"},
                                     {lse.raw_data(), "lse"},
                                     {max_logits.raw_data(), "max_logits"},
                                     {options.attn_sink.raw_data(), "attn_sink"},
                                     {options.topk_length.raw_data(), "topk_length"},
                                     {launch.workspace, "workspace"}},
                                    device.index);
  KEYSEL_CHECK_ARG(cuda_glue::aligned16(q.raw_data()) && cuda_glue::aligned16(kv.raw_data()), "q",
                   "16-byte aligned q and kv", "unaligned addresses");
  launch.q = q.raw_data();
  launch.kv = static_cast<const std::uint8_t*>(kv.raw_data());
  launch.indices = indices.data<std::int32_t>();
  launch.index_stride = indices.stride(0);
  launch.topk = static_cast<int>(topk);
  launch.topk_length = options.topk_length.empty() ? nullptr : options.topk_length.data<std::int32_t>();
  launch.attn_sink = options.attn_sink.empty() ? nullptr : options.attn_sink.data<float>();
  launch.out = out.mutable_raw_data();
  launch.out_bf16 = out.dtype() == DType::bf16;
  launch.lse = lse.empty() ? nullptr : lse.mutable_data<float>();
  launch.max_logits = max_logits.empty() ? nullptr : max_logits.mutable_data<float>();
  launch.rows = static_cast<int>(rows);
  launch.heads = static_cast<int>(heads);
  launch.scale = scale;
  launch.multiprocessors = facts.multiprocessors;
  launch.device = device.index;
  cuda_kernels::launch_sparse_mla(function, launch, stream);
}

#else  // !KEYSEL_CUDA

std::int64_t sparse_mla_cuda_workspace_bytes(std::int64_t, std::int64_t, std::int64_t, int) {
  detail::throw_error("sparse_mla_cuda_workspace_bytes", "keysel was built without CUDA");
}

void sparse_mla_cuda(const TensorView&, const TensorView&, const TensorView&, const TensorView&, const TensorView&,
                     const SparseMlaOptions&, const TensorView&, void*, const TensorView&) {
  detail::throw_error("sparse_mla_cuda", "keysel was built without CUDA");
}

#endif  // KEYSEL_CUDA

}  // namespace keysel
