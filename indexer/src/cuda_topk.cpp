// Argument checks of select_topk_cuda; the kernel is in cuda_topk.cu.
#include "keysel/indexer/cuda_topk.h"

#include <cstdint>
#include <string>

#include "cuda_topk_sizes.h"
#include "keysel/core/build_config.h"
#include "keysel/core/checked.h"
#include "keysel/core/error.h"

#if KEYSEL_CUDA
#include "cuda_indexer_launch.h"
#endif

namespace keysel {

std::int64_t select_topk_cuda_workspace_bytes(std::int64_t tokens, std::int64_t groups, std::int64_t n) {
  constexpr std::string_view function = "select_topk_cuda_workspace_bytes";
  KEYSEL_CHECK_ARG(tokens >= 0, "tokens", ">= 0", tokens);
  KEYSEL_CHECK_ARG(groups >= 0, "groups", ">= 0", groups);
  KEYSEL_CHECK_ARG(n >= 0, "n", ">= 0", n);
  return cuda_kernels::topk_scratch_bytes(checked_mul(tokens, groups, function, "groups"), n,
                                          cuda_kernels::kTopkMaxSegments, function);
}

#if KEYSEL_CUDA

void select_topk_cuda(const TensorView& scores, const TensorView& positions, const SelectionPolicy& policy,
                      const TensorView& selection, void* stream, const TensorView& workspace) {
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
  check_selection_output(function, selection, tokens, groups, width, device);
  expect_contiguous(function, selection, "selection");
  KEYSEL_CHECK_ARG(keys <= 0x7fffffff, "scores", "at most 2^31 - 1 keys per row", keys);
  KEYSEL_CHECK_ARG(width <= 0x7fffffff, "policy", "a selection width below 2^31", width);
  KEYSEL_CHECK_ARG(tokens * groups <= 0x7fffffff, "scores", "at most 2^31 - 1 rows (T * G)", tokens * groups);
  cuda_kernels::TopkLaunch launch{};
  launch.workspace = detail::workspace_pointer(function, workspace,
                                               select_topk_cuda_workspace_bytes(tokens, groups, keys), device);
  launch.facts = cuda_glue::use_device(function, device.index);
  cuda_glue::expect_device_pointers(function,
                                    {{scores.raw_data(), "scores"},
                                     {positions.raw_data(), "positions"},
                                     {selection.raw_data(), "selection"}},
                                    device.index);
  if (launch.workspace != nullptr) {
    cuda_glue::expect_device_pointers(function, {{workspace.raw_data(), "workspace"}}, device.index);
  }
  launch.scores = scores.data<float>();
  launch.positions = positions.data<std::int32_t>();
  launch.selection = selection.mutable_data<std::int32_t>();
  launch.rows = tokens * groups;
  launch.groups = groups;
  launch.n = keys;
  launch.policy = policy;
  launch.device = device.index;
  cuda_kernels::launch_topk(function, launch, stream);
}

#else  // !KEYSEL_CUDA

void select_topk_cuda(const TensorView&, const TensorView&, const SelectionPolicy&, const TensorView&, void*,
                      const TensorView&) {
  detail::throw_error("select_topk_cuda", "keysel was built without CUDA");
}

#endif  // KEYSEL_CUDA

}  // namespace keysel
