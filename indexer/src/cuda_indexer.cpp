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

/// The rows of a call: positions (+ sequence_of_row), or context_lens with next_n rows per sequence.
struct RowsSpec {
  TensorView positions, sequence_of_row, context_lens;
  std::int64_t next_n = 1;
};

/// q [R, HI, DI]: fp8_e4m3 on a CUDA device, contiguous and 16-byte aligned, HI and DI sizes the kernels have;
/// weights fp32 [R, HI] on the same device, contiguous. Returns q's device.
Device expect_indexer_queries(std::string_view function, const TensorView& q, const TensorView& weights) {
  expect_shape(function, q, "q", {kAnyExtent, kAnyExtent, kAnyExtent});
  expect_dtype(function, q, "q", {DType::fp8_e4m3});
  const Device device = q.device();
  KEYSEL_CHECK_ARG(device.kind == DeviceKind::cuda, "q", "a tensor on a CUDA device", q.str());
  expect_contiguous(function, q, "q");
  KEYSEL_CHECK_ARG(reinterpret_cast<std::uintptr_t>(q.raw_data()) % 16 == 0, "q", "a 16-byte aligned buffer",
                   "a misaligned pointer");
  const std::int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  KEYSEL_CHECK_ARG(heads == 16 || heads == 32 || heads == 64 || heads == 128, "q", "HI of 16, 32, 64 or 128", heads);
  KEYSEL_CHECK_ARG(dim == 64 || dim == 128, "q", "DI of 64 or 128", dim);
  expect_shape(function, weights, "weights", {rows, heads});
  expect_dtype(function, weights, "weights", {DType::fp32});
  expect_device(function, weights, "weights", device);
  expect_contiguous(function, weights, "weights");
  return device;
}

/// One int32 value per query row (positions, sequence_of_row, starts, ends): [rows] on `device`, contiguous.
void expect_row_values(std::string_view function, const TensorView& view, std::string_view name, std::int64_t rows,
                       const Device& device) {
  expect_shape(function, view, name, {rows});
  expect_dtype(function, view, name, {DType::int32});
  expect_device(function, view, name, device);
  expect_contiguous(function, view, name);
}

/// The facts of `device` after making it current, which must run fp8 MMA (compute capability 8.9 or newer).
cuda_glue::DeviceFacts fp8_mma_device(std::string_view function, const Device& device) {
  const cuda_glue::DeviceFacts facts = cuda_glue::use_device(function, device.index);
  if (facts.capability < 89) {
    detail::throw_error(function, "fp8 MMA needs a GPU of compute capability 8.9 or newer; cuda:" +
                                      std::to_string(device.index) + " is " + std::to_string(facts.capability / 10) +
                                      "." + std::to_string(facts.capability % 10));
  }
  return facts;
}

/// Checks everything but the output and fills the launch parameters (logits left null). q is [R, HI, DI].
cuda_kernels::IndexerLaunch prepare(std::string_view function, const TensorView& q, const TensorView& weights,
                                    const CudaIndexerKeyCache& cache, const RowsSpec& spec, std::int64_t n_keys,
                                    const TensorView& output, const char* output_name) {
  const TensorView& positions = spec.positions;
  const TensorView& sequence_of_row = spec.sequence_of_row;
  const TensorView& context_lens = spec.context_lens;
  const Device device = expect_indexer_queries(function, q, weights);
  const std::int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  // The engines' page, viewed as [num_blocks, 64 * (DI + 4)], [num_blocks, 64, DI + 4] or [num_blocks, 64, 1, DI + 4].
  const std::int64_t page_bytes = kIndexerCacheBlock * (dim + 4);
  const int cache_rank = cache.blocks.rank();
  KEYSEL_CHECK_ARG((cache_rank == 2 && cache.blocks.size(1) == page_bytes) ||
                       (cache_rank == 3 && cache.blocks.size(1) == kIndexerCacheBlock &&
                        cache.blocks.size(2) == dim + 4) ||
                       (cache_rank == 4 && cache.blocks.size(1) == kIndexerCacheBlock && cache.blocks.size(2) == 1 &&
                        cache.blocks.size(3) == dim + 4),
                   "cache.blocks",
                   "pages of 64 * (DI + 4) = " + std::to_string(page_bytes) + " bytes: [num_blocks, " +
                       std::to_string(page_bytes) + "], [num_blocks, 64, " + std::to_string(dim + 4) +
                       "] or [num_blocks, 64, 1, " + std::to_string(dim + 4) + "]",
                   cache.blocks.str());
  expect_dtype(function, cache.blocks, "cache.blocks", {DType::fp8_e4m3});
  expect_device(function, cache.blocks, "cache.blocks", device);
  expect_contiguous(function, cache.blocks, "cache.blocks");
  KEYSEL_CHECK_ARG(reinterpret_cast<std::uintptr_t>(cache.blocks.raw_data()) % 16 == 0, "cache.blocks",
                   "a 16-byte aligned buffer", "a misaligned pointer");
  if (context_lens.empty()) {
    expect_row_values(function, positions, "positions", rows, device);
  } else {
    KEYSEL_CHECK_ARG(spec.next_n >= 1 && spec.next_n <= 4, "next_n", "1 to 4 query tokens per sequence", spec.next_n);
    KEYSEL_CHECK_ARG(!cache.block_table.empty(), "cache.block_table", "a block table [B, max_blocks]", "none");
    KEYSEL_CHECK_ARG(rows == cache.block_table.size(0) * spec.next_n, "q",
                     "B * next_n = " + std::to_string(cache.block_table.size(0) * spec.next_n) +
                         " rows (B: the block table's rows)",
                     rows);
    KEYSEL_CHECK_ARG((context_lens.rank() == 1 && context_lens.size(0) == cache.block_table.size(0)) ||
                         (context_lens.rank() == 2 && context_lens.size(0) == cache.block_table.size(0) &&
                          context_lens.size(1) == spec.next_n),
                     "context_lens",
                     "int32 [B] or [B, next_n] with B = " + std::to_string(cache.block_table.size(0)),
                     context_lens.str());
    expect_dtype(function, context_lens, "context_lens", {DType::int32});
    expect_device(function, context_lens, "context_lens", device);
    expect_contiguous(function, context_lens, "context_lens");
  }
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
    expect_row_values(function, sequence_of_row, "sequence_of_row", rows, device);
  }
  const cuda_glue::DeviceFacts facts = fp8_mma_device(function, device);
  // One pointer query per distinct buffer, the output's included.
  cuda_glue::expect_device_pointers(function,
                                    {{q.raw_data(), "q"},
                                     {weights.raw_data(), "weights"},
                                     {cache.blocks.raw_data(), "cache.blocks"},
                                     {cache.block_table.raw_data(), "cache.block_table"},
                                     {positions.raw_data(), "positions"},
                                     {sequence_of_row.raw_data(), "sequence_of_row"},
                                     {context_lens.raw_data(), "context_lens"},
                                     {output.raw_data(), output_name}},
                                    device.index);
  cuda_kernels::IndexerLaunch launch{};
  launch.q = q.data<std::uint8_t>();
  launch.weights = weights.data<float>();
  launch.cache = cache.blocks.data<std::uint8_t>();
  launch.block_table = cache.block_table.empty() ? nullptr : cache.block_table.data<std::int32_t>();
  launch.positions = context_lens.empty() ? positions.data<std::int32_t>() : nullptr;
  launch.context_lens = context_lens.empty() ? nullptr : context_lens.data<std::int32_t>();
  launch.next_n = static_cast<int>(spec.next_n);
  launch.lens_per_row = context_lens.rank() == 2;
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

namespace {

void logits_with(std::string_view function, const TensorView& q, const TensorView& weights,
                 const CudaIndexerKeyCache& cache, const RowsSpec& spec, const TensorView& logits, void* stream) {
  expect_shape(function, logits, "logits", {kAnyExtent, kAnyExtent});
  expect_shape(function, q, "q", {kAnyExtent, kAnyExtent, kAnyExtent});
  expect_shape(function, logits, "logits", {q.size(0), kAnyExtent});
  expect_dtype(function, logits, "logits", {DType::fp32});
  expect_device(function, logits, "logits", q.device());
  expect_writable(function, logits, "logits");
  expect_contiguous(function, logits, "logits");
  cuda_kernels::IndexerLaunch launch = prepare(function, q, weights, cache, spec, logits.size(1), logits, "logits");
  launch.logits = logits.mutable_data<float>();
  if (launch.rows == 0) return;
  cuda_kernels::launch_indexer_logits(function, launch, stream);
}

/// The logits into the caller's workspace or stream-ordered scratch memory, then their selection as
/// select_topk_cuda makes it (one group per row), without repeating the checks made by prepare().
void topk_with(std::string_view function, const TensorView& q, const TensorView& weights,
               const CudaIndexerKeyCache& cache, const RowsSpec& spec, std::int64_t n_keys,
               const SelectionPolicy& policy, const TensorView& selection, void* stream,
               const TensorView& workspace) {
  policy.validate(function);
  expect_shape(function, q, "q", {kAnyExtent, kAnyExtent, kAnyExtent});
  const std::int64_t rows = q.size(0);
  if (selection.rank() == 2) {
    expect_shape(function, selection, "selection", {rows, policy.width()});
    expect_dtype(function, selection, "selection", {DType::int32});
    expect_device(function, selection, "selection", q.device());
    expect_writable(function, selection, "selection");
  } else {
    check_selection_output(function, selection, rows, 1, policy.width(), q.device());
  }
  expect_contiguous(function, selection, "selection");
  KEYSEL_CHECK_ARG(policy.width() <= 0x7fffffff, "policy", "a selection width below 2^31", policy.width());
  cuda_kernels::IndexerLaunch launch = prepare(function, q, weights, cache, spec, n_keys, selection, "selection");
  auto* const external = static_cast<std::uint8_t*>(detail::workspace_pointer(
      function, workspace, lightning_indexer_topk_cuda_workspace_bytes(rows, n_keys), q.device()));
  if (rows == 0) return;
  const std::int64_t logits_bytes = indexer_logits_bytes(rows, n_keys, function);
  cuda_glue::Scratch logits(function, static_cast<std::size_t>(logits_bytes), launch.device, stream, external);
  launch.logits = logits.as<float>();
  cuda_kernels::launch_indexer_logits(function, launch, stream);
  cuda_kernels::TopkLaunch topk{};
  topk.scores = launch.logits;
  topk.positions = launch.positions;
  topk.lengths = launch.context_lens;
  topk.next_n = launch.next_n;
  topk.lengths_per_row = launch.lens_per_row;
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

/// q [B, next_n, HI, DI] as the kernels' [B * next_n, HI, DI] (a contiguous view), and the rows' spec: next_n
/// rows per sequence, bounded by context_lens.
std::pair<TensorView, RowsSpec> mqa_rows(std::string_view function, const TensorView& q,
                                         const TensorView& context_lens) {
  expect_shape(function, q, "q", {kAnyExtent, kAnyExtent, kAnyExtent, kAnyExtent});
  expect_contiguous(function, q, "q");
  KEYSEL_CHECK_ARG(!context_lens.empty(), "context_lens", "int32 [B] or [B, next_n]", "none");
  RowsSpec spec;
  spec.context_lens = context_lens;
  spec.next_n = q.size(1);
  KEYSEL_CHECK_ARG(spec.next_n >= 1 && spec.next_n <= 4, "q", "[B, next_n, HI, DI] with next_n of 1 to 4", q.str());
  const std::int64_t rows = checked_mul(q.size(0), spec.next_n, function, "q");
  return {TensorView(q.raw_data(), q.dtype(), {rows, q.size(2), q.size(3)}, q.device()), spec};
}

}  // namespace

void lightning_indexer_logits_cuda(const TensorView& q, const TensorView& weights, const CudaIndexerKeyCache& cache,
                                   const TensorView& positions, const TensorView& logits,
                                   const TensorView& sequence_of_row, void* stream) {
  RowsSpec spec;
  spec.positions = positions;
  spec.sequence_of_row = sequence_of_row;
  logits_with("lightning_indexer_logits_cuda", q, weights, cache, spec, logits, stream);
}

void lightning_indexer_topk_cuda(const TensorView& q, const TensorView& weights, const CudaIndexerKeyCache& cache,
                                 const TensorView& positions, std::int64_t n_keys, const SelectionPolicy& policy,
                                 const TensorView& selection, const TensorView& sequence_of_row, void* stream,
                                 const TensorView& workspace) {
  RowsSpec spec;
  spec.positions = positions;
  spec.sequence_of_row = sequence_of_row;
  topk_with("lightning_indexer_topk_cuda", q, weights, cache, spec, n_keys, policy, selection, stream, workspace);
}

void paged_mqa_logits_cuda(const TensorView& q, const TensorView& weights, const CudaIndexerKeyCache& cache,
                           const TensorView& context_lens, const TensorView& logits, void* stream) {
  constexpr std::string_view function = "paged_mqa_logits_cuda";
  const auto [rows, spec] = mqa_rows(function, q, context_lens);
  logits_with(function, rows, weights, cache, spec, logits, stream);
}

void paged_mqa_topk_cuda(const TensorView& q, const TensorView& weights, const CudaIndexerKeyCache& cache,
                         const TensorView& context_lens, std::int64_t n_keys, std::int64_t k,
                         const TensorView& selection, void* stream, const TensorView& workspace) {
  constexpr std::string_view function = "paged_mqa_topk_cuda";
  const auto [rows, spec] = mqa_rows(function, q, context_lens);
  SelectionPolicy policy;
  policy.k = k;
  topk_with(function, rows, weights, cache, spec, n_keys, policy, selection, stream, workspace);
}

void ragged_mqa_logits_cuda(const TensorView& q, const TensorView& weights, const TensorView& key_values,
                            const TensorView& key_scales, const TensorView& starts, const TensorView& ends,
                            const TensorView& logits, void* stream) {
  constexpr std::string_view function = "ragged_mqa_logits_cuda";
  const Device device = expect_indexer_queries(function, q, weights);
  const std::int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  KEYSEL_CHECK_ARG(rows <= 65535, "q", "at most 65535 rows per call", rows);
  expect_shape(function, key_values, "key_values", {kAnyExtent, dim});
  expect_dtype(function, key_values, "key_values", {DType::fp8_e4m3});
  expect_device(function, key_values, "key_values", device);
  expect_contiguous(function, key_values, "key_values");
  KEYSEL_CHECK_ARG(reinterpret_cast<std::uintptr_t>(key_values.raw_data()) % 16 == 0, "key_values",
                   "a 16-byte aligned buffer", "a misaligned pointer");
  const std::int64_t n = key_values.size(0);
  KEYSEL_CHECK_ARG(n <= 0x7fffffff, "key_values", "N below 2^31 keys", n);
  expect_shape(function, key_scales, "key_scales", {n});
  expect_dtype(function, key_scales, "key_scales", {DType::fp32});
  expect_device(function, key_scales, "key_scales", device);
  expect_contiguous(function, key_scales, "key_scales");
  expect_row_values(function, starts, "starts", rows, device);
  expect_row_values(function, ends, "ends", rows, device);
  expect_shape(function, logits, "logits", {rows, n});
  expect_dtype(function, logits, "logits", {DType::fp32});
  expect_device(function, logits, "logits", device);
  expect_writable(function, logits, "logits");
  expect_contiguous(function, logits, "logits");
  const cuda_glue::DeviceFacts facts = fp8_mma_device(function, device);
  cuda_glue::expect_device_pointers(function,
                                    {{q.raw_data(), "q"},
                                     {weights.raw_data(), "weights"},
                                     {key_values.raw_data(), "key_values"},
                                     {key_scales.raw_data(), "key_scales"},
                                     {starts.raw_data(), "starts"},
                                     {ends.raw_data(), "ends"},
                                     {logits.raw_data(), "logits"}},
                                    device.index);
  if (rows == 0 || n == 0) return;
  const std::int64_t blocks = (n + kIndexerCacheBlock - 1) / kIndexerCacheBlock;
  cuda_kernels::IndexerLaunch launch{};
  launch.q = q.data<std::uint8_t>();
  launch.weights = weights.data<float>();
  launch.cache = key_values.data<std::uint8_t>();
  launch.key_scales = key_scales.data<float>();
  launch.starts = starts.data<std::int32_t>();
  launch.ends = ends.data<std::int32_t>();
  launch.next_n = 1;
  launch.logits = logits.mutable_data<float>();
  launch.rows = rows;
  launch.n = n;
  launch.num_blocks = blocks;
  launch.heads = static_cast<int>(heads);
  launch.dim = static_cast<int>(dim);
  launch.sequences = 1;
  launch.max_blocks = 0;
  launch.blocks_per_sequence = static_cast<int>(blocks);
  launch.device = device.index;
  launch.facts = facts;
  cuda_kernels::launch_indexer_logits(function, launch, stream);
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

void paged_mqa_logits_cuda(const TensorView&, const TensorView&, const CudaIndexerKeyCache&, const TensorView&,
                           const TensorView&, void*) {
  detail::throw_error("paged_mqa_logits_cuda", "keysel was built without CUDA");
}

void paged_mqa_topk_cuda(const TensorView&, const TensorView&, const CudaIndexerKeyCache&, const TensorView&,
                         std::int64_t, std::int64_t, const TensorView&, void*, const TensorView&) {
  detail::throw_error("paged_mqa_topk_cuda", "keysel was built without CUDA");
}

void ragged_mqa_logits_cuda(const TensorView&, const TensorView&, const TensorView&, const TensorView&,
                            const TensorView&, const TensorView&, const TensorView&, void*) {
  detail::throw_error("ragged_mqa_logits_cuda", "keysel was built without CUDA");
}

#endif  // KEYSEL_CUDA

}  // namespace keysel
