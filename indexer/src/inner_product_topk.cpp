// Exact maximum-inner-product top-k (the flat-index search FAISS calls IndexFlatIP::search), fused: keys are
// scored a block at a time for a chunk of queries by a register-blocked SIMD kernel, and every block is pushed
// into one StreamingTopK per query. The [nq, N] score matrix never exists.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "fast_topk_kernels.h"
#include "keysel/indexer/fast_topk.h"

namespace keysel {
namespace {

constexpr std::int64_t kMaxIndex = std::numeric_limits<std::int32_t>::max();
constexpr std::int64_t kQueryChunk = 64;  // queries scored together (their rows stay in L1/L2)
constexpr std::int64_t kKeyBlock = 1008;  // keys per block (21 key tiles): kQueryChunk x kKeyBlock scores ~ 256 KiB

std::int64_t round_up(std::int64_t value, std::int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

/// One thread's buffers: a padded chunk of queries, the scores of one key block for it, a packed key panel and
/// (when keys are not split across threads) the accumulators of the chunk's queries.
struct Workspace {
  std::vector<float> query_tile;
  std::vector<float> block;
  std::vector<float> panel;
  std::vector<StreamingTopK> local;

  void prepare(std::int64_t dim, std::int64_t accumulators, std::int64_t k) {
    const std::int64_t rows = round_up(kQueryChunk, topk_kernels::kQueryTile);
    if (query_tile.size() < static_cast<std::size_t>(rows * dim)) query_tile.resize(static_cast<std::size_t>(rows * dim));
    if (block.size() < static_cast<std::size_t>(rows * kKeyBlock)) block.resize(static_cast<std::size_t>(rows * kKeyBlock));
    if (panel.size() < static_cast<std::size_t>(topk_kernels::kKeyTile * dim)) {
      panel.resize(static_cast<std::size_t>(topk_kernels::kKeyTile * dim));
    }
    if (local.size() < static_cast<std::size_t>(accumulators)) local.resize(static_cast<std::size_t>(accumulators));
    for (std::int64_t i = 0; i < accumulators; ++i) local[static_cast<std::size_t>(i)].reset(k);
  }
};

}  // namespace

void inner_product_topk(std::int64_t nq, const float* queries, std::int64_t n_keys, const float* keys,
                        std::int64_t dim, std::int64_t k, float* scores, std::int64_t* ids) {
  KEYSEL_CHECK_ARG(nq >= 0, "nq", ">= 0", nq);
  KEYSEL_CHECK_ARG(n_keys >= 0 && n_keys < kMaxIndex, "n_keys", "0 <= n_keys < 2^31 - 1", n_keys);
  KEYSEL_CHECK_ARG(dim >= 1, "dim", ">= 1", dim);
  KEYSEL_CHECK_ARG(k >= 1 && k < kMaxIndex, "k", "1 <= k < 2^31 - 1", k);
  KEYSEL_CHECK_ARG(queries != nullptr || nq == 0, "queries", "a non-null pointer (nq > 0)", "null");
  KEYSEL_CHECK_ARG(keys != nullptr || n_keys == 0, "keys", "a non-null pointer (n_keys > 0)", "null");
  if (nq == 0) return;

  const topk_kernels::BlockScoresFn block_scores = topk_kernels::block_scores_for(simd_level());
  const std::int64_t chunks = (nq + kQueryChunk - 1) / kQueryChunk;
  const std::int64_t blocks = std::max<std::int64_t>((n_keys + kKeyBlock - 1) / kKeyBlock, 1);
  // Few query chunks: split the keys too, one accumulator per (part, query), merged at the end.
  const std::int64_t threads = omp_get_max_threads();
  const std::int64_t parts = std::clamp<std::int64_t>(threads / chunks, 1, blocks);
  const std::int64_t tasks = chunks * parts;
  // Buffers are kept per thread between calls (OpenMP reuses its threads): fresh pages for the accumulators
  // would cost more page faults than a whole selection pass.
  thread_local std::vector<StreamingTopK> partial;
  if (parts > 1) {
    if (partial.size() < static_cast<std::size_t>(parts * nq)) partial.resize(static_cast<std::size_t>(parts * nq));
    for (std::int64_t i = 0; i < parts * nq; ++i) partial[static_cast<std::size_t>(i)].reset(k);
  }
  StreamingTopK* const partial_data = partial.data();

#pragma omp parallel if (tasks > 1)
  {
    thread_local Workspace work;
    work.prepare(dim, parts > 1 ? 0 : kQueryChunk, k);
    std::vector<float>& query_tile = work.query_tile;
    std::vector<float>& block = work.block;
    std::vector<float>& workspace = work.panel;
    std::vector<StreamingTopK>& local = work.local;
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t task = 0; task < tasks; ++task) {
      const std::int64_t chunk = task / parts;
      const std::int64_t part = task % parts;
      const std::int64_t q0 = chunk * kQueryChunk;
      const std::int64_t count = std::min(kQueryChunk, nq - q0);
      const std::int64_t padded = round_up(count, topk_kernels::kQueryTile);
      std::copy(queries + q0 * dim, queries + (q0 + count) * dim, query_tile.begin());
      std::fill(query_tile.begin() + count * dim, query_tile.begin() + padded * dim, 0.0f);
      StreamingTopK* tops = parts > 1 ? partial_data + part * nq + q0 : local.data();
      const std::int64_t first_block = blocks * part / parts;
      const std::int64_t end_block = blocks * (part + 1) / parts;
      for (std::int64_t b = first_block; b < end_block; ++b) {
        const std::int64_t first_key = b * kKeyBlock;
        const std::int64_t n = std::min(kKeyBlock, n_keys - first_key);
        if (n <= 0) continue;
        block_scores(query_tile.data(), padded, keys + first_key * dim, n, dim, block.data(), kKeyBlock,
                     workspace.data());
        for (std::int64_t q = 0; q < count; ++q) tops[q].push(block.data() + q * kKeyBlock, first_key, n);
      }
      if (parts == 1) {
        for (std::int64_t q = 0; q < count; ++q) {
          const std::int64_t row = (q0 + q) * k;
          tops[q].finish_by_score(ids != nullptr ? ids + row : nullptr, scores != nullptr ? scores + row : nullptr);
        }
      }
    }
    if (parts > 1) {
#pragma omp for schedule(dynamic, 1)
      for (std::int64_t q = 0; q < nq; ++q) {
        StreamingTopK& top = partial_data[q];
        for (std::int64_t p = 1; p < parts; ++p) top.merge(partial_data[p * nq + q]);
        top.finish_by_score(ids != nullptr ? ids + q * k : nullptr, scores != nullptr ? scores + q * k : nullptr);
      }
    }
  }
}

void inner_product_topk(const TensorView& queries, const TensorView& keys, std::int64_t k, const TensorView& scores,
                        const TensorView& ids) {
  constexpr std::string_view function = "inner_product_topk";
  expect_shape(function, queries, "queries", {kAnyExtent, kAnyExtent});
  expect_dtype(function, queries, "queries", {DType::fp32});
  expect_device(function, queries, "queries", Device::cpu());
  expect_contiguous(function, queries, "queries");
  const std::int64_t nq = queries.size(0);
  const std::int64_t dim = queries.size(1);
  expect_shape(function, keys, "keys", {kAnyExtent, dim});
  expect_dtype(function, keys, "keys", {DType::fp32});
  expect_device(function, keys, "keys", Device::cpu());
  expect_contiguous(function, keys, "keys");
  KEYSEL_CHECK_ARG(k >= 1 && k < kMaxIndex, "k", "1 <= k < 2^31 - 1", k);
  if (!scores.empty()) {
    expect_shape(function, scores, "scores", {nq, k});
    expect_dtype(function, scores, "scores", {DType::fp32});
    expect_device(function, scores, "scores", Device::cpu());
    expect_contiguous(function, scores, "scores");
    expect_writable(function, scores, "scores");
  }
  if (!ids.empty()) {
    expect_shape(function, ids, "ids", {nq, k});
    expect_dtype(function, ids, "ids", {DType::int32});
    expect_device(function, ids, "ids", Device::cpu());
    expect_contiguous(function, ids, "ids");
    expect_writable(function, ids, "ids");
  }
  std::vector<std::int64_t> wide_ids(ids.empty() ? 0 : static_cast<std::size_t>(nq * k));
  inner_product_topk(nq, queries.data<float>(), keys.size(0), keys.data<float>(), dim, k,
                     scores.empty() ? nullptr : scores.mutable_data<float>(), ids.empty() ? nullptr : wide_ids.data());
  if (!ids.empty()) {
    std::int32_t* out = ids.mutable_data<std::int32_t>();
    for (std::size_t i = 0; i < wide_ids.size(); ++i) out[i] = static_cast<std::int32_t>(wide_ids[i]);
  }
}

}  // namespace keysel
