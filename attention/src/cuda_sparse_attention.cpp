// Argument checks of sparse_attention_decode_cuda; the kernels are in cuda_sparse_attention.cu.
#include "keysel/attention/cuda_sparse_attention.h"

#include <cmath>
#include <cstdint>
#include <string>

#include "keysel/core/build_config.h"
#include "keysel/core/error.h"

#if KEYSEL_CUDA
#include "cuda_glue.h"
#include "cuda_sparse_attention_launch.h"
#endif

namespace keysel {

#if KEYSEL_CUDA

void sparse_attention_decode_cuda(const TensorView& q, const CudaKvCache& cache, const TensorView& selection,
                                  Granularity granularity, double scale, const TensorView& out,
                                  const TensorView& lse, void* stream) {
  constexpr std::string_view function = "sparse_attention_decode_cuda";
  expect_shape(function, q, "q", {kAnyExtent, kAnyExtent, kAnyExtent});
  expect_dtype(function, q, "q", {DType::bf16});
  const Device device = q.device();
  KEYSEL_CHECK_ARG(device.kind == DeviceKind::cuda, "q", "a tensor on a CUDA device", q.str());
  expect_contiguous(function, q, "q");
  const std::int64_t batch = q.size(0), query_heads = q.size(1), head_dim = q.size(2);
  expect_shape(function, cache.k, "cache.k", {kAnyExtent, kAnyExtent, kAnyExtent, head_dim});
  expect_dtype(function, cache.k, "cache.k", {DType::bf16});
  expect_device(function, cache.k, "cache.k", device);
  expect_contiguous(function, cache.k, "cache.k");
  const std::int64_t num_blocks = cache.k.size(0), block_size = cache.k.size(1), kv_heads = cache.k.size(2);
  expect_shape(function, cache.v, "cache.v", {num_blocks, block_size, kv_heads, head_dim});
  expect_dtype(function, cache.v, "cache.v", {DType::bf16});
  expect_device(function, cache.v, "cache.v", device);
  expect_contiguous(function, cache.v, "cache.v");
  KEYSEL_CHECK_ARG(head_dim == 64 || head_dim == 128 || head_dim == 256, "q", "head dim D = Dv of 64, 128 or 256",
                   head_dim);
  KEYSEL_CHECK_ARG(kv_heads >= 1 && query_heads % kv_heads == 0, "cache.k",
                   "Hkv >= 1 dividing Hq = " + std::to_string(query_heads), kv_heads);
  std::int64_t max_blocks = 1;
  if (cache.block_table.empty()) {
    KEYSEL_CHECK_ARG(num_blocks == batch, "cache.k",
                     "a contiguous cache [B = " + std::to_string(batch) + ", N, Hkv, D] (no block_table)",
                     cache.k.str());
  } else {
    expect_shape(function, cache.block_table, "cache.block_table", {batch, kAnyExtent});
    expect_dtype(function, cache.block_table, "cache.block_table", {DType::int32});
    expect_device(function, cache.block_table, "cache.block_table", device);
    expect_contiguous(function, cache.block_table, "cache.block_table");
    max_blocks = cache.block_table.size(1);
  }
  const std::int64_t groups = group_count(granularity, query_heads, kv_heads);
  expect_shape(function, selection, "selection", {batch, groups, kAnyExtent});
  expect_dtype(function, selection, "selection", {DType::int32});
  expect_device(function, selection, "selection", device);
  expect_contiguous(function, selection, "selection");
  const std::int64_t width = selection.size(2);
  expect_shape(function, out, "out", {batch, query_heads, head_dim});
  expect_dtype(function, out, "out", {DType::fp32, DType::bf16});
  expect_device(function, out, "out", device);
  expect_writable(function, out, "out");
  expect_contiguous(function, out, "out");
  if (!lse.empty()) {
    expect_shape(function, lse, "lse", {batch, query_heads});
    expect_dtype(function, lse, "lse", {DType::fp32});
    expect_device(function, lse, "lse", device);
    expect_writable(function, lse, "lse");
    expect_contiguous(function, lse, "lse");
  }
  const double effective_scale = scale == 0.0 ? 1.0 / std::sqrt(static_cast<double>(head_dim)) : scale;
  KEYSEL_CHECK_ARG(std::isfinite(effective_scale) && effective_scale > 0.0, "scale", "finite and > 0 (or 0)", scale);
  constexpr std::int64_t kIntMax = 0x7fffffff;
  KEYSEL_CHECK_ARG(width <= kIntMax && block_size * max_blocks <= kIntMax && num_blocks <= kIntMax &&
                       batch <= kIntMax && query_heads <= 65535,
                   "selection", "sizes below 2^31 (Hq below 65536)", selection.str());
  const cuda_glue::DeviceFacts facts = cuda_glue::use_device(function, device.index);
  cuda_glue::expect_device_pointers(function,
                                    {{q.raw_data(), "q"},
                                     {cache.k.raw_data(), "cache.k"},
                                     {cache.v.raw_data(), "cache.v"},
                                     {cache.block_table.raw_data(), "cache.block_table"},
                                     {selection.raw_data(), "selection"},
                                     {out.raw_data(), "out"},
                                     {lse.raw_data(), "lse"}},
                                    device.index);

  cuda_kernels::SparseDecodeLaunch launch{};
  launch.q = q.raw_data();
  launch.k = cache.k.raw_data();
  launch.v = cache.v.raw_data();
  launch.block_table = cache.block_table.empty() ? nullptr : cache.block_table.data<std::int32_t>();
  launch.selection = selection.data<std::int32_t>();
  launch.out = out.mutable_raw_data();
  launch.lse = lse.empty() ? nullptr : lse.mutable_data<float>();
  launch.batch = static_cast<int>(batch);
  launch.query_heads = static_cast<int>(query_heads);
  launch.kv_heads = static_cast<int>(kv_heads);
  launch.head_dim = static_cast<int>(head_dim);
  launch.groups = static_cast<int>(groups);
  launch.width = static_cast<int>(width);
  launch.block_size = static_cast<int>(block_size);
  launch.max_blocks = static_cast<int>(max_blocks);
  launch.num_blocks = static_cast<int>(num_blocks);
  launch.granularity = granularity;
  launch.out_bf16 = out.dtype() == DType::bf16;
  launch.scale = static_cast<float>(effective_scale);
  launch.multiprocessors = facts.multiprocessors;
  launch.device = device.index;
  cuda_kernels::launch_sparse_attention_decode(function, launch, stream);
}

#else  // !KEYSEL_CUDA

void sparse_attention_decode_cuda(const TensorView&, const CudaKvCache&, const TensorView&, Granularity, double,
                                  const TensorView&, const TensorView&, void*) {
  detail::throw_error("sparse_attention_decode_cuda", "keysel was built without CUDA");
}

#endif  // KEYSEL_CUDA

}  // namespace keysel
