// Argument checks of select_topk_cuda; the kernel is in cuda_topk.cu.
#include "keysel/indexer/cuda_topk.h"

#include <cstdint>
#include <string>

#include "keysel/core/build_config.h"
#include "keysel/core/error.h"

#if KEYSEL_CUDA
#include "cuda_indexer_launch.h"
#include "keysel/attention/cuda_glue.h"
#endif

namespace keysel {

#if KEYSEL_CUDA

void select_topk_cuda(const TensorView& scores, const TensorView& positions, const SelectionPolicy& policy,
                      const TensorView& selection, void* stream) {
  constexpr std::string_view function = "select_topk_cuda";
  policy.validate(function);
  expect_shape(function, scores, "scores", {kAnyExtent, kAnyExtent, kAnyExtent});
  expect_dtype(function, scores, "scores", {DType::fp32});
  const Device device = scores.device();
  KEYSEL_CHECK_ARG(device.kind == DeviceKind::cuda, "scores", "a tensor on a CUDA device", scores.str());
  expect_contiguous(function, scores, "scores");
  const std::int64_t tokens = scores.size(0);
  const std::int64_t groups = scores.size(1);
  const std::int64_t keys = scores.size(2);
  expect_shape(function, positions, "positions", {tokens});
  expect_dtype(function, positions, "positions", {DType::int32});
  expect_device(function, positions, "positions", device);
  expect_contiguous(function, positions, "positions");
  const std::int64_t width = policy.width();
  expect_shape(function, selection, "selection", {tokens, groups, width});
  expect_dtype(function, selection, "selection", {DType::int32});
  expect_device(function, selection, "selection", device);
  expect_writable(function, selection, "selection");
  expect_contiguous(function, selection, "selection");
  KEYSEL_CHECK_ARG(keys <= 0x7fffffff, "scores", "at most 2^31 - 1 keys per row", keys);
  KEYSEL_CHECK_ARG(width <= 0x7fffffff, "policy", "a selection width below 2^31", width);
  KEYSEL_CHECK_ARG(tokens * groups <= 0x7fffffff, "scores", "at most 2^31 - 1 rows (T * G)", tokens * groups);
  const cuda_glue::DeviceFacts facts = cuda_glue::use_device(function.data(), device.index);
  const cuda_glue::NamedPointer pointers[] = {
      {scores.raw_data(), "scores"}, {positions.raw_data(), "positions"}, {selection.raw_data(), "selection"}};
  cuda_glue::expect_device_pointers(function.data(), pointers, 3, device.index);
  cuda_kernels::TopkLaunch launch{};
  launch.scores = scores.data<float>();
  launch.positions = positions.data<std::int32_t>();
  launch.selection = selection.mutable_data<std::int32_t>();
  launch.rows = tokens * groups;
  launch.groups = groups;
  launch.n = keys;
  launch.k = policy.k;
  launch.n_sink = policy.n_sink;
  launch.n_local = policy.n_local;
  launch.width = width;
  launch.kept_on_top = policy.kept_on_top;
  launch.multiprocessors = facts.multiprocessors;
  launch.device = device.index;
  launch.programmatic = facts.programmatic;
  KEYSEL_CUDA_CHECK(cuda_kernels::launch_topk(launch, stream));
}

#else  // !KEYSEL_CUDA

void select_topk_cuda(const TensorView&, const TensorView&, const SelectionPolicy&, const TensorView&, void*) {
  detail::throw_error("select_topk_cuda", "keysel was built without CUDA");
}

#endif  // KEYSEL_CUDA

}  // namespace keysel
