// DeepSeek-V3.2's selection in the engines' formats (keysel/indexer/dsa.h): the top-k over ranged rows (CPU, and
// the checks of its CUDA launch), the paged indexer-cache writer and the double-precision paged logits.
#include "keysel/indexer/dsa.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cuda_topk_sizes.h"
#include "keysel/core/build_config.h"
#include "keysel/core/checked.h"
#include "keysel/core/dtype.h"
#include "keysel/core/error.h"
#include "keysel/core/selection.h"
#include "keysel/indexer/cuda_indexer.h"
#include "keysel/indexer/topk.h"

#include "mtp_rows.h"

#if KEYSEL_CUDA
#include "cuda_indexer_launch.h"
#endif

namespace keysel {
namespace {

/// Checks logits [R, L] (unit stride along L), the bounds and selection int32 [R, k] on `device`; k in [1, 2^31).
void check_topk_rows(std::string_view function, const TensorView& logits, const TopkRowBounds& bounds,
                     std::int64_t k, const TensorView& selection, Device device) {
  expect_shape(function, logits, "logits", {kAnyExtent, kAnyExtent});
  expect_dtype(function, logits, "logits", {DType::fp32});
  expect_device(function, logits, "logits", device);
  const std::int64_t rows = logits.size(0), n = logits.size(1);
  KEYSEL_CHECK_ARG(logits.stride(1) == 1 || n <= 1, "logits", "unit stride along the keys (stride(1) == 1)",
                   logits.stride(1));
  KEYSEL_CHECK_ARG(rows <= 1 || logits.stride(0) >= n, "logits", "a row stride of at least L = " + std::to_string(n),
                   logits.stride(0));
  KEYSEL_CHECK_ARG(n <= 0x7fffffff && rows <= 0x7fffffff, "logits", "fewer than 2^31 rows and keys per row",
                   logits.str());
  KEYSEL_CHECK_ARG(k >= 1 && k <= 0x7fffffff, "k", "an integer in [1, 2147483647]", k);
  KEYSEL_CHECK_ARG(bounds.ends.empty() != bounds.lengths.empty(), "bounds",
                   "exactly one of ends and lengths", bounds.ends.empty() ? "neither" : "both");
  const auto check_index = [&](const TensorView& view, const char* name, std::int64_t count) {
    expect_shape(function, view, name, {count});
    expect_dtype(function, view, name, {DType::int32});
    expect_device(function, view, name, device);
    expect_contiguous(function, view, name);
  };
  if (!bounds.starts.empty()) check_index(bounds.starts, "starts", rows);
  if (!bounds.ends.empty()) check_index(bounds.ends, "ends", rows);
  if (!bounds.lengths.empty()) {
    KEYSEL_CHECK_ARG(bounds.next_n >= 1 && bounds.next_n <= 0x7fffffff && rows % bounds.next_n == 0, "next_n",
                     "a divisor of the rows R = " + std::to_string(rows), bounds.next_n);
    check_index(bounds.lengths, "lengths", rows / bounds.next_n);
  }
  expect_shape(function, selection, "selection", {rows, k});
  expect_dtype(function, selection, "selection", {DType::int32});
  expect_device(function, selection, "selection", device);
  expect_writable(function, selection, "selection");
  expect_contiguous(function, selection, "selection");
}

/// The row's key range [start, end) in its logits, clamped to [0, n] (the CPU's reading of TopkRowBounds).
std::pair<std::int64_t, std::int64_t> row_range(const TopkRowBounds& b, std::int64_t row, std::int64_t n) {
  std::int64_t start = b.starts.empty() ? 0 : b.starts.data<std::int32_t>()[row];
  start = start < 0 ? 0 : (start > n ? n : start);
  std::int64_t end = 0;
  if (!b.ends.empty()) {
    end = b.ends.data<std::int32_t>()[row];
  } else {
    end = start + detail::mtp_row_keys(b.lengths.data<std::int32_t>()[row / b.next_n], b.next_n, row % b.next_n);
  }
  end = end < start ? start : (end > n ? n : end);
  return {start, end};
}

/// Page layout of the engines' indexer cache (CudaIndexerKeyCache): num_blocks pages of 64 * (DI + 4) bytes.
std::int64_t check_pages(std::string_view function, const TensorView& cache, std::int64_t dim) {
  const std::int64_t page_bytes = kIndexerCacheBlock * (dim + 4);
  const int rank = cache.rank();
  KEYSEL_CHECK_ARG((rank == 2 && cache.size(1) == page_bytes) ||
                       (rank == 3 && cache.size(1) == kIndexerCacheBlock && cache.size(2) == dim + 4) ||
                       (rank == 4 && cache.size(1) == kIndexerCacheBlock && cache.size(2) == 1 &&
                        cache.size(3) == dim + 4),
                   "cache", "pages of 64 * (DI + 4) = " + std::to_string(page_bytes) + " bytes", cache.str());
  expect_dtype(function, cache, "cache", {DType::fp8_e4m3});
  expect_contiguous(function, cache, "cache");
  return cache.size(0);
}

/// max(amax, 1e-4) / 448 in fp32, rounded up to a power of two when asked (exactly, through frexp).
float token_scale(float amax, bool power_of_two) {
  float scale = std::max(amax, 1e-4f) / kFp8E4m3Max;
  if (power_of_two) {
    int exponent = 0;
    const float mantissa = std::frexp(scale, &exponent);  // scale = mantissa * 2^exponent, mantissa in [0.5, 1)
    scale = std::ldexp(1.0f, mantissa == 0.5f ? exponent - 1 : exponent);
  }
  return scale;
}

/// The references' double logits into `logits` (contiguous, fp64 as they are or fp32 rounded), out.size() values.
void store_logits(const std::vector<double>& out, const TensorView& logits) {
  if (logits.dtype() == DType::fp64) {
    std::memcpy(logits.mutable_raw_data(), out.data(), out.size() * sizeof(double));
  } else {
    auto* dst = logits.mutable_data<float>();
    for (std::size_t i = 0; i < out.size(); ++i) dst[i] = static_cast<float>(out[i]);
  }
}

}  // namespace

void topk_rows(const TensorView& logits, const TopkRowBounds& bounds, std::int64_t k, const TensorView& selection) {
  constexpr std::string_view function = "topk_rows";
  check_topk_rows(function, logits, bounds, k, selection, Device::cpu());
  const std::int64_t rows = logits.size(0), n = logits.size(1);
  if (rows == 0) return;
  // Each row's range, moved to the front of a dense row, is select_topk's row with positions[r] = length - 1.
  const std::int64_t width = n > 0 ? n : 1;
  std::vector<float> dense(static_cast<std::size_t>(checked_mul(rows, width, function, "logits")), 0.0f);
  std::vector<std::int32_t> last(static_cast<std::size_t>(rows));
  const float* base = logits.data<float>();
  for (std::int64_t r = 0; r < rows; ++r) {
    const auto [start, end] = row_range(bounds, r, n);
    if (end > start) {
      std::memcpy(dense.data() + r * width, base + r * logits.stride(0) + start,
                  static_cast<std::size_t>(end - start) * sizeof(float));
    }
    // An empty range: one NaN key, which select_topk never selects (it refuses negative positions).
    if (end == start) dense[static_cast<std::size_t>(r * width)] = std::numeric_limits<float>::quiet_NaN();
    last[static_cast<std::size_t>(r)] = static_cast<std::int32_t>(end > start ? end - start - 1 : 0);
  }
  SelectionPolicy policy;
  policy.k = k;
  select_topk(TensorView(dense.data(), DType::fp32, {rows, 1, width}),
              TensorView(last.data(), DType::int32, {rows}), policy,
              TensorView(selection.mutable_raw_data(), DType::int32, {rows, 1, k}, Device::cpu()));
}

std::int64_t topk_rows_cuda_workspace_bytes(std::int64_t rows, std::int64_t n) {
  constexpr std::string_view function = "topk_rows_cuda_workspace_bytes";
  KEYSEL_CHECK_ARG(rows >= 0, "rows", ">= 0", rows);
  KEYSEL_CHECK_ARG(n >= 0, "n", ">= 0", n);
  return cuda_kernels::topk_scratch_bytes(rows, n, cuda_kernels::kTopkMaxSegments, function);
}

#if KEYSEL_CUDA

void topk_rows_cuda(const TensorView& logits, const TopkRowBounds& bounds, std::int64_t k,
                    const TensorView& selection, void* stream, const TensorView& workspace) {
  constexpr std::string_view function = "topk_rows_cuda";
  expect_shape(function, logits, "logits", {kAnyExtent, kAnyExtent});
  const Device device = logits.device();
  KEYSEL_CHECK_ARG(device.kind == DeviceKind::cuda, "logits", "a tensor on a CUDA device", logits.str());
  check_topk_rows(function, logits, bounds, k, selection, device);
  const std::int64_t rows = logits.size(0), n = logits.size(1);
  cuda_kernels::TopkLaunch launch{};
  launch.workspace =
      detail::workspace_pointer(function, workspace, topk_rows_cuda_workspace_bytes(rows, n), device);
  launch.facts = cuda_glue::use_device(function, device.index);
  cuda_glue::expect_device_pointers(function,
                                    {{logits.raw_data(), "logits"},
                                     {bounds.starts.raw_data(), "starts"},
                                     {bounds.ends.raw_data(), "ends"},
                                     {bounds.lengths.raw_data(), "lengths"},
                                     {selection.raw_data(), "selection"}},
                                    device.index);
  if (launch.workspace != nullptr) {
    cuda_glue::expect_device_pointers(function, {{workspace.raw_data(), "workspace"}}, device.index);
  }
  launch.scores = logits.data<float>();
  launch.stride = rows > 1 ? logits.stride(0) : n;
  launch.starts = bounds.starts.empty() ? nullptr : bounds.starts.data<std::int32_t>();
  launch.ends = bounds.ends.empty() ? nullptr : bounds.ends.data<std::int32_t>();
  launch.lengths = bounds.lengths.empty() ? nullptr : bounds.lengths.data<std::int32_t>();
  launch.next_n = static_cast<int>(bounds.next_n);
  launch.selection = selection.mutable_data<std::int32_t>();
  launch.rows = rows;
  launch.groups = 1;
  launch.n = n;
  launch.policy.k = k;
  launch.device = device.index;
  cuda_kernels::launch_topk(function, launch, stream);
}

#else  // !KEYSEL_CUDA

void topk_rows_cuda(const TensorView&, const TopkRowBounds&, std::int64_t, const TensorView&, void*,
                    const TensorView&) {
  detail::throw_error("topk_rows_cuda", "keysel was built without CUDA");
}

#endif  // KEYSEL_CUDA

void indexer_k_quant_and_cache(const TensorView& k, const TensorView& cache, const TensorView& slot_mapping,
                               bool power_of_two_scale) {
  constexpr std::string_view function = "indexer_k_quant_and_cache";
  expect_shape(function, k, "k", {kAnyExtent, kAnyExtent});
  expect_dtype(function, k, "k", {DType::fp32, DType::bf16, DType::fp16});
  expect_device(function, k, "k", Device::cpu());
  const std::int64_t tokens = k.size(0), dim = k.size(1);
  KEYSEL_CHECK_ARG(dim == 64 || dim == 128, "k", "DI of 64 or 128", k.str());
  expect_device(function, cache, "cache", Device::cpu());
  expect_writable(function, cache, "cache");
  const std::int64_t pages = check_pages(function, cache, dim);
  expect_shape(function, slot_mapping, "slot_mapping", {tokens});
  expect_dtype(function, slot_mapping, "slot_mapping", {DType::int32});
  expect_device(function, slot_mapping, "slot_mapping", Device::cpu());
  const std::int64_t slots = checked_mul(pages, kIndexerCacheBlock, function, "cache");
  for (std::int64_t t = 0; t < tokens; ++t) {
    const std::int64_t slot = static_cast<std::int64_t>(slot_mapping.load({t}));
    KEYSEL_CHECK_ARG(slot < slots, "slot_mapping",
                     "slots below num_blocks * 64 = " + std::to_string(slots) + " (negative: skipped)",
                     "slot " + std::to_string(slot) + " at token " + std::to_string(t));
  }
  auto* pages_bytes = static_cast<std::uint8_t*>(cache.mutable_raw_data());
  const std::int64_t page_bytes = kIndexerCacheBlock * (dim + 4);
  std::vector<float> row(static_cast<std::size_t>(dim));
  for (std::int64_t t = 0; t < tokens; ++t) {
    const std::int64_t slot = static_cast<std::int64_t>(slot_mapping.load({t}));
    if (slot < 0) continue;
    float amax = 0.0f;
    for (std::int64_t d = 0; d < dim; ++d) {
      row[static_cast<std::size_t>(d)] = static_cast<float>(k.load({t, d}));
      amax = std::max(amax, std::abs(row[static_cast<std::size_t>(d)]));
    }
    const float scale = token_scale(amax, power_of_two_scale);
    std::uint8_t* page = pages_bytes + (slot / kIndexerCacheBlock) * page_bytes;
    const std::int64_t i = slot % kIndexerCacheBlock;
    for (std::int64_t d = 0; d < dim; ++d) {
      page[i * dim + d] = fp32_to_fp8_e4m3(row[static_cast<std::size_t>(d)] / scale);
    }
    std::memcpy(page + kIndexerCacheBlock * dim + 4 * i, &scale, 4);
  }
}

void paged_mqa_logits_reference(const TensorView& q, const TensorView& weights, const TensorView& cache,
                                const TensorView& block_table, const TensorView& context_lens,
                                const TensorView& logits) {
  constexpr std::string_view function = "paged_mqa_logits_reference";
  expect_shape(function, q, "q", {kAnyExtent, kAnyExtent, kAnyExtent, kAnyExtent});
  expect_dtype(function, q, "q", {DType::fp8_e4m3});
  expect_device(function, q, "q", Device::cpu());
  const std::int64_t batch = q.size(0), next_n = q.size(1), heads = q.size(2), dim = q.size(3);
  const std::int64_t rows = checked_mul(batch, next_n, function, "q");
  KEYSEL_CHECK_ARG(dim == 64 || dim == 128, "q", "DI of 64 or 128", q.str());
  expect_shape(function, weights, "weights", {rows, heads});
  expect_dtype(function, weights, "weights", {DType::fp32});
  expect_device(function, cache, "cache", Device::cpu());
  const std::int64_t pages = check_pages(function, cache, dim);
  expect_shape(function, block_table, "block_table", {batch, kAnyExtent});
  expect_dtype(function, block_table, "block_table", {DType::int32});
  KEYSEL_CHECK_ARG((context_lens.rank() == 1 && context_lens.size(0) == batch) ||
                       (context_lens.rank() == 2 && context_lens.size(0) == batch && context_lens.size(1) == next_n),
                   "context_lens", "int32 [B] or [B, next_n]", context_lens.str());
  expect_dtype(function, context_lens, "context_lens", {DType::int32});
  expect_shape(function, logits, "logits", {rows, kAnyExtent});
  expect_dtype(function, logits, "logits", {DType::fp32, DType::fp64});
  expect_writable(function, logits, "logits");
  expect_contiguous(function, logits, "logits");
  const std::int64_t n = logits.size(1), max_blocks = block_table.size(1);
  const auto* page_bytes_base = static_cast<const std::uint8_t*>(cache.raw_data());
  const std::int64_t page_bytes = kIndexerCacheBlock * (dim + 4);
  std::vector<double> out(static_cast<std::size_t>(checked_mul(rows, n, function, "logits")),
                          -std::numeric_limits<double>::infinity());
  std::vector<double> qd(static_cast<std::size_t>(heads * dim));
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t i = 0; i < next_n; ++i) {
      const std::int64_t r = b * next_n + i;
      const std::int64_t keys =
          context_lens.rank() == 2 ? static_cast<std::int64_t>(context_lens.load({b, i}))
                                   : detail::mtp_row_keys(static_cast<std::int64_t>(context_lens.load({b})), next_n, i);
      for (std::int64_t h = 0; h < heads; ++h) {
        for (std::int64_t d = 0; d < dim; ++d) qd[static_cast<std::size_t>(h * dim + d)] = q.load({b, i, h, d});
      }
      for (std::int64_t s = 0; s < std::min(keys, n); ++s) {
        const std::int64_t j = s / kIndexerCacheBlock;
        const std::int64_t page = j < max_blocks ? static_cast<std::int64_t>(block_table.load({b, j})) : -1;
        KEYSEL_CHECK_ARG(page >= 0 && page < pages, "block_table",
                         "pages in [0, " + std::to_string(pages) + ") for every key read",
                         "page " + std::to_string(page) + " for key " + std::to_string(s) + " of sequence " +
                             std::to_string(b));
        const std::uint8_t* base = page_bytes_base + page * page_bytes;
        const std::int64_t t = s % kIndexerCacheBlock;
        float scale = 0.0f;
        std::memcpy(&scale, base + kIndexerCacheBlock * dim + 4 * t, 4);
        double total = 0.0;
        for (std::int64_t h = 0; h < heads; ++h) {
          double dot = 0.0;
          for (std::int64_t d = 0; d < dim; ++d) {
            dot += qd[static_cast<std::size_t>(h * dim + d)] * fp8_e4m3_to_fp32(base[t * dim + d]);
          }
          total += weights.load({r, h}) * std::max(dot, 0.0);
        }
        out[static_cast<std::size_t>(r * n + s)] = total * scale;
      }
    }
  }
  store_logits(out, logits);
}

void ragged_mqa_logits_reference(const TensorView& q, const TensorView& weights, const TensorView& key_values,
                                 const TensorView& key_scales, const TensorView& starts, const TensorView& ends,
                                 const TensorView& logits) {
  constexpr std::string_view function = "ragged_mqa_logits_reference";
  expect_shape(function, q, "q", {kAnyExtent, kAnyExtent, kAnyExtent});
  expect_dtype(function, q, "q", {DType::fp8_e4m3});
  expect_device(function, q, "q", Device::cpu());
  const std::int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  expect_shape(function, weights, "weights", {rows, heads});
  expect_dtype(function, weights, "weights", {DType::fp32});
  expect_device(function, weights, "weights", Device::cpu());
  expect_shape(function, key_values, "key_values", {kAnyExtent, dim});
  expect_dtype(function, key_values, "key_values", {DType::fp8_e4m3});
  expect_device(function, key_values, "key_values", Device::cpu());
  const std::int64_t n = key_values.size(0);
  expect_shape(function, key_scales, "key_scales", {n});
  expect_dtype(function, key_scales, "key_scales", {DType::fp32});
  expect_device(function, key_scales, "key_scales", Device::cpu());
  expect_shape(function, starts, "starts", {rows});
  expect_dtype(function, starts, "starts", {DType::int32});
  expect_device(function, starts, "starts", Device::cpu());
  expect_shape(function, ends, "ends", {rows});
  expect_dtype(function, ends, "ends", {DType::int32});
  expect_device(function, ends, "ends", Device::cpu());
  expect_shape(function, logits, "logits", {rows, n});
  expect_dtype(function, logits, "logits", {DType::fp32, DType::fp64});
  expect_device(function, logits, "logits", Device::cpu());
  expect_writable(function, logits, "logits");
  expect_contiguous(function, logits, "logits");
  std::vector<double> out(static_cast<std::size_t>(checked_mul(rows, n, function, "logits")),
                          -std::numeric_limits<double>::infinity());
  // Keys decoded once (exactly: fp8 e4m3 fits a double).
  std::vector<double> kd(static_cast<std::size_t>(checked_mul(n, dim, function, "key_values")));
  for (std::int64_t s = 0; s < n; ++s) {
    for (std::int64_t d = 0; d < dim; ++d) kd[static_cast<std::size_t>(s * dim + d)] = key_values.load({s, d});
  }
  std::vector<double> qd(static_cast<std::size_t>(checked_mul(heads, dim, function, "q")));
  std::vector<double> wd(static_cast<std::size_t>(heads));
  for (std::int64_t t = 0; t < rows; ++t) {
    const std::int64_t begin = std::max<std::int64_t>(starts.load({t}), 0);
    const std::int64_t end = std::min<std::int64_t>(ends.load({t}), n);
    if (end <= begin) continue;
    for (std::int64_t h = 0; h < heads; ++h) {
      wd[static_cast<std::size_t>(h)] = weights.load({t, h});
      for (std::int64_t d = 0; d < dim; ++d) qd[static_cast<std::size_t>(h * dim + d)] = q.load({t, h, d});
    }
    for (std::int64_t s = begin; s < end; ++s) {
      const double* key = kd.data() + s * dim;
      double total = 0.0;
      for (std::int64_t h = 0; h < heads; ++h) {
        const double* qh = qd.data() + h * dim;
        double dot = 0.0;
        for (std::int64_t d = 0; d < dim; ++d) dot += qh[d] * key[d];
        total += wd[static_cast<std::size_t>(h)] * std::max(dot, 0.0);
      }
      out[static_cast<std::size_t>(t * n + s)] = total * key_scales.load({s});
    }
  }
  store_logits(out, logits);
}

void paged_mqa_topk_reference(const TensorView& q, const TensorView& weights, const TensorView& cache,
                              const TensorView& block_table, const TensorView& context_lens, std::int64_t n_keys,
                              std::int64_t k, const TensorView& selection) {
  constexpr std::string_view function = "paged_mqa_topk_reference";
  expect_shape(function, q, "q", {kAnyExtent, kAnyExtent, kAnyExtent, kAnyExtent});
  KEYSEL_CHECK_ARG(n_keys >= 0 && n_keys <= 0x7fffffff, "n_keys", "N in [0, 2^31)", n_keys);
  const std::int64_t next_n = q.size(1);
  const std::int64_t rows = checked_mul(q.size(0), next_n, function, "q");
  std::vector<float> logits(static_cast<std::size_t>(checked_mul(rows, n_keys, function, "n_keys")));
  const TensorView logits_view(logits.data(), DType::fp32, {rows, n_keys});
  paged_mqa_logits_reference(q, weights, cache, block_table, context_lens, logits_view);
  // Each row's own keys (the reference above checked context_lens): topk_rows' lengths, one per row.
  std::vector<std::int32_t> per_row(static_cast<std::size_t>(rows));
  for (std::int64_t r = 0; r < rows; ++r) {
    per_row[static_cast<std::size_t>(r)] = static_cast<std::int32_t>(
        context_lens.rank() == 2 ? context_lens.load({r / next_n, r % next_n})
                                 : detail::mtp_row_keys(static_cast<std::int64_t>(context_lens.load({r / next_n})),
                                                        next_n, r % next_n));
  }
  TopkRowBounds bounds;
  bounds.lengths = TensorView(per_row.data(), DType::int32, {rows});
  topk_rows(logits_view, bounds, k, selection);
}

}  // namespace keysel
