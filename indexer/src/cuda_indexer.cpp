// Argument checks of the CUDA Lightning Indexer; the kernel is in cuda_indexer.cu.
#include "keysel/indexer/cuda_indexer.h"

#include <cstdint>
#include <string>
#include <utility>

#include "cuda_topk_sizes.h"
#include "keysel/core/build_config.h"
#include "keysel/core/checked.h"
#include "keysel/core/error.h"

#if KEYSEL_CUDA
#include "cuda_indexer_launch.h"
#endif

namespace keysel {
namespace {

/// lightning_indexer_topk_cuda's logits: rows x n_keys fp32, rounded up to 256 bytes (the top-k's part follows).
std::int64_t indexer_logits_bytes(std::int64_t rows, std::int64_t n_keys, std::string_view function) {
  const std::int64_t bytes = checked_mul(checked_mul(rows, n_keys > 0 ? n_keys : 1, function, "n_keys"), 4,
                                         function, "n_keys");
  return checked_add(bytes, 255, function, "n_keys") / 256 * 256;
}

}  // namespace

std::int64_t lightning_indexer_topk_cuda_workspace_bytes(std::int64_t rows, std::int64_t n_keys) {
  constexpr std::string_view function = "lightning_indexer_topk_cuda_workspace_bytes";
  KEYSEL_CHECK_ARG(rows >= 0, "rows", ">= 0", rows);
  KEYSEL_CHECK_ARG(n_keys >= 0, "n_keys", ">= 0", n_keys);
  return checked_add(indexer_logits_bytes(rows, n_keys, function),
                     cuda_kernels::topk_scratch_bytes(rows, n_keys, cuda_kernels::kTopkMaxSegments, function),
                     function, "n_keys");
}

#if KEYSEL_CUDA
namespace {

/// Checks everything but the output and fills the launch parameters (logits left null).
cuda_kernels::IndexerLaunch prepare(std::string_view function, const TensorView& q, const TensorView& weights,
                                    const CudaIndexerKeyCache& cache, const TensorView& positions,
                                    std::int64_t n_keys, const TensorView& sequence_of_row,
                                    const TensorView& output, const char* output_name) {
  expect_shape(function, q, "q", {kAnyExtent, kAnyExtent, kAnyExtent});
  expect_dtype(function, q, "q", {DType::fp8_e4m3});
  const Device device = q.device();
  KEYSEL_CHECK_ARG(device.kind == DeviceKind::cuda, "q", "a tensor on a CUDA device", q.str());
  expect_contiguous(function, q, "q");
  KEYSEL_CHECK_ARG(reinterpret_cast<std::uintptr_t>(q.raw_data()) % 16 == 0, "q", "a 16-byte aligned buffer",
                   "a misaligned pointer");
  const std::int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  KEYSEL_CHECK_ARG(heads == 32 || heads == 64 || heads == 128, "q", "HI of 32, 64 or 128", heads);
  KEYSEL_CHECK_ARG(dim == 64 || dim == 128, "q", "DI of 64 or 128", dim);
  expect_shape(function, weights, "weights", {rows, heads});
  expect_dtype(function, weights, "weights", {DType::fp32});
  expect_device(function, weights, "weights", device);
  expect_contiguous(function, weights, "weights");
  expect_shape(function, cache.blocks, "cache.blocks", {kAnyExtent, kIndexerCacheBlock, dim + 4});
  expect_dtype(function, cache.blocks, "cache.blocks", {DType::fp8_e4m3});
  expect_device(function, cache.blocks, "cache.blocks", device);
  expect_contiguous(function, cache.blocks, "cache.blocks");
  KEYSEL_CHECK_ARG(reinterpret_cast<std::uintptr_t>(cache.blocks.raw_data()) % 16 == 0, "cache.blocks",
                   "a 16-byte aligned buffer", "a misaligned pointer");
  expect_shape(function, positions, "positions", {rows});
  expect_dtype(function, positions, "positions", {DType::int32});
  expect_device(function, positions, "positions", device);
  expect_contiguous(function, positions, "positions");
  KEYSEL_CHECK_ARG(n_keys >= 0 && n_keys <= 0x7fffffff, "n_keys", "N in [0, 2^31)", n_keys);
  KEYSEL_CHECK_ARG(rows <= 65535, "q", "at most 65535 rows per call", rows);
  const std::int64_t blocks_per_sequence = (n_keys + kIndexerCacheBlock - 1) / kIndexerCacheBlock;
  std::int64_t sequences = rows;
  std::int64_t max_blocks = 0;
  if (!cache.block_table.empty()) {
    expect_shape(function, cache.block_table, "cache.block_table", {kAnyExtent, kAnyExtent});
    expect_dtype(function, cache.block_table, "cache.block_table", {DType::int32});
    expect_device(function, cache.block_table, "cache.block_table", device);
    expect_contiguous(function, cache.block_table, "cache.block_table");
    sequences = cache.block_table.size(0);
    max_blocks = cache.block_table.size(1);
    KEYSEL_CHECK_ARG(max_blocks >= blocks_per_sequence, "cache.block_table",
                     "at least ceil(N / 64) = " + std::to_string(blocks_per_sequence) + " blocks per sequence",
                     cache.block_table.str());
  } else {
    sequences = blocks_per_sequence > 0 ? cache.blocks.size(0) / blocks_per_sequence : rows;
    const std::int64_t needed = sequence_of_row.empty() ? rows : 1;
    KEYSEL_CHECK_ARG(sequences >= needed, "cache.blocks",
                     "a contiguous cache of at least " + std::to_string(needed) + " x ceil(N / 64) = " +
                         std::to_string(needed * blocks_per_sequence) + " blocks",
                     cache.blocks.str());
  }
  if (!sequence_of_row.empty()) {
    expect_shape(function, sequence_of_row, "sequence_of_row", {rows});
    expect_dtype(function, sequence_of_row, "sequence_of_row", {DType::int32});
    expect_device(function, sequence_of_row, "sequence_of_row", device);
    expect_contiguous(function, sequence_of_row, "sequence_of_row");
  }
  const cuda_glue::DeviceFacts facts = cuda_glue::use_device(function, device.index);
  if (facts.capability < 89) {
    detail::throw_error(function, "fp8 MMA needs a GPU of compute capability 8.9 or newer; cuda:" +
                                      std::to_string(device.index) + " is " + std::to_string(facts.capability / 10) +
                                      "." + std::to_string(facts.capability % 10));
  }
  // One pointer query per distinct buffer, the output's included.
  cuda_glue::expect_device_pointers(function,
                                    {{q.raw_data(), "q"},
                                     {weights.raw_data(), "weights"},
                                     {cache.blocks.raw_data(), "cache.blocks"},
                                     {cache.block_table.raw_data(), "cache.block_table"},
                                     {positions.raw_data(), "positions"},
                                     {sequence_of_row.raw_data(), "sequence_of_row"},
                                     {output.raw_data(), output_name}},
                                    device.index);
  cuda_kernels::IndexerLaunch launch{};
  launch.q = q.data<std::uint8_t>();
  launch.weights = weights.data<float>();
  launch.cache = cache.blocks.data<std::uint8_t>();
  launch.block_table = cache.block_table.empty() ? nullptr : cache.block_table.data<std::int32_t>();
  launch.positions = positions.data<std::int32_t>();
  launch.sequence_of_row = sequence_of_row.empty() ? nullptr : sequence_of_row.data<std::int32_t>();
  launch.rows = rows;
  launch.n = n_keys;
  launch.num_blocks = cache.blocks.size(0);
  launch.heads = static_cast<int>(heads);
  launch.dim = static_cast<int>(dim);
  launch.sequences = static_cast<int>(sequences);
  launch.max_blocks = static_cast<int>(max_blocks);
  launch.blocks_per_sequence = static_cast<int>(blocks_per_sequence);
  launch.device = device.index;
  launch.facts = facts;
  return launch;
}

}  // namespace

void lightning_indexer_logits_cuda(const TensorView& q, const TensorView& weights, const CudaIndexerKeyCache& cache,
                                   const TensorView& positions, const TensorView& logits,
                                   const TensorView& sequence_of_row, void* stream) {
  constexpr std::string_view function = "lightning_indexer_logits_cuda";
  expect_shape(function, logits, "logits", {kAnyExtent, kAnyExtent});
  expect_shape(function, q, "q", {kAnyExtent, kAnyExtent, kAnyExtent});
  expect_shape(function, logits, "logits", {q.size(0), kAnyExtent});
  expect_dtype(function, logits, "logits", {DType::fp32});
  expect_device(function, logits, "logits", q.device());
  expect_writable(function, logits, "logits");
  expect_contiguous(function, logits, "logits");
  cuda_kernels::IndexerLaunch launch =
      prepare(function, q, weights, cache, positions, logits.size(1), sequence_of_row, logits, "logits");
  launch.logits = logits.mutable_data<float>();
  if (launch.rows == 0) return;
  cuda_kernels::launch_indexer_logits(function, launch, stream);
}

void lightning_indexer_topk_cuda(const TensorView& q, const TensorView& weights, const CudaIndexerKeyCache& cache,
                                 const TensorView& positions, std::int64_t n_keys, const SelectionPolicy& policy,
                                 const TensorView& selection, const TensorView& sequence_of_row, void* stream,
                                 const TensorView& workspace) {
  constexpr std::string_view function = "lightning_indexer_topk_cuda";
  policy.validate(function);
  expect_shape(function, q, "q", {kAnyExtent, kAnyExtent, kAnyExtent});
  const std::int64_t rows = q.size(0);
  check_selection_output(function, selection, rows, 1, policy.width(), q.device());
  expect_contiguous(function, selection, "selection");
  KEYSEL_CHECK_ARG(policy.width() <= 0x7fffffff, "policy", "a selection width below 2^31", policy.width());
  cuda_kernels::IndexerLaunch launch =
      prepare(function, q, weights, cache, positions, n_keys, sequence_of_row, selection, "selection");
  auto* const external = static_cast<std::uint8_t*>(detail::workspace_pointer(
      function, workspace, lightning_indexer_topk_cuda_workspace_bytes(rows, n_keys), q.device()));
  if (rows == 0) return;
  // The logits into the caller's workspace or stream-ordered scratch memory, then their selection as
  // select_topk_cuda makes it, without repeating the checks made above.
  const std::int64_t logits_bytes = indexer_logits_bytes(rows, n_keys, function);
  cuda_glue::Scratch logits(function, static_cast<std::size_t>(logits_bytes), launch.device, stream, external);
  launch.logits = logits.as<float>();
  cuda_kernels::launch_indexer_logits(function, launch, stream);
  cuda_kernels::TopkLaunch topk{};
  topk.scores = launch.logits;
  topk.positions = launch.positions;
  topk.selection = selection.mutable_data<std::int32_t>();
  topk.rows = rows;
  topk.groups = 1;
  topk.n = n_keys;
  topk.policy = policy;
  topk.device = launch.device;
  topk.facts = launch.facts;
  topk.workspace = external != nullptr ? external + logits_bytes : nullptr;
  cuda_kernels::launch_topk(function, topk, stream);
  logits.release();
}

#else  // !KEYSEL_CUDA

void lightning_indexer_logits_cuda(const TensorView&, const TensorView&, const CudaIndexerKeyCache&,
                                   const TensorView&, const TensorView&, const TensorView&, void*) {
  detail::throw_error("lightning_indexer_logits_cuda", "keysel was built without CUDA");
}

void lightning_indexer_topk_cuda(const TensorView&, const TensorView&, const CudaIndexerKeyCache&,
                                 const TensorView&, std::int64_t, const SelectionPolicy&, const TensorView&,
                                 const TensorView&, void*, const TensorView&) {
  detail::throw_error("lightning_indexer_topk_cuda", "keysel was built without CUDA");
}

#endif  // KEYSEL_CUDA

}  // namespace keysel
