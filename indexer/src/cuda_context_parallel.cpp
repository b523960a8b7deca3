// Context parallelism on GPUs over a caller's NCCL communicator (keysel/indexer/cuda_context_parallel.h): the
// argument checks, the workspace, and the sequence of keysel CUDA calls and NCCL collectives of one rank.
#include "keysel/indexer/cuda_context_parallel.h"

#include <algorithm>
#include <cstdint>
#include <string>

#include "../../attention/src/cuda_workspace.h"
#include "keysel/core/build_config.h"
#include "keysel/core/checked.h"
#include "keysel/core/error.h"
#include "keysel/indexer/cuda_topk.h"

#if KEYSEL_NCCL
#include <nccl.h>

#include "../../attention/src/cuda_glue.h"
#include "cuda_context_parallel_launch.h"
#endif

namespace keysel {
namespace {

constexpr std::int64_t kAlign = 256;

std::int64_t aligned(std::int64_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

/// The byte sizes of a workspace's parts, in order.
struct Parts {
  std::int64_t sizes[12] = {};
  int count = 0;
  std::int64_t add(std::int64_t bytes) {
    sizes[count++] = aligned(bytes);
    return bytes;
  }
  std::int64_t total() const {
    std::int64_t sum = 0;
    for (int i = 0; i < count; ++i) sum += sizes[i];
    return sum;
  }
};

Parts select_parts(std::int64_t tokens, std::int64_t groups, std::int64_t n_local, std::int64_t k,
                   std::int64_t ranks, std::string_view function) {
  const std::int64_t rows = checked_mul(tokens, groups, function, "local_scores");
  const std::int64_t merged = checked_mul(ranks + 1, k, function, "policy");
  Parts parts;
  parts.add(checked_product({rows, n_local, 4}, function, "local_scores"));   // masked scores
  parts.add(tokens * 4);                                                      // local_last
  parts.add(tokens * 4);                                                      // merged_last
  parts.add(checked_product({rows, k, 4}, function, "policy"));               // local selection
  parts.add(checked_product({rows, k, 8}, function, "policy"));               // candidates sent
  parts.add(checked_product({ranks, rows, k, 8}, function, "policy"));        // candidates received
  parts.add(checked_product({rows, merged, 4}, function, "policy"));          // merged scores
  parts.add(checked_product({rows, ranks, k, 4}, function, "policy"));        // merged positions
  parts.add(checked_product({rows, k, 4}, function, "policy"));               // merged selection
  parts.add(std::max(select_topk_cuda_workspace_bytes(tokens, groups, n_local),
                     select_topk_cuda_workspace_bytes(tokens, groups, merged)));  // the two top-k calls
  return parts;
}

Parts attention_parts(std::int64_t batch, std::int64_t query_heads, std::int64_t value_dim, std::int64_t groups,
                      std::int64_t width, std::int64_t ranks, std::string_view function) {
  const std::int64_t heads = checked_mul(batch, query_heads, function, "q");
  Parts parts;
  parts.add(checked_product({batch, groups, width, 4}, function, "selection"));  // local selection
  parts.add(checked_product({heads, value_dim, 4}, function, "out"));            // this rank's o
  parts.add(checked_mul(heads, 4, function, "q"));                               // this rank's lse
  parts.add(checked_product({ranks, heads, value_dim, 4}, function, "out"));     // every rank's o
  parts.add(checked_product({ranks, heads, 4}, function, "q"));                  // every rank's lse
  return parts;
}

}  // namespace

std::int64_t context_shard_size(const ContextShards& shards, std::int64_t rank, std::int64_t n) {
  constexpr std::string_view function = "context_shard_size";
  shards.validate(function);
  KEYSEL_CHECK_ARG(rank >= 0 && rank < shards.ranks, "rank", "a rank below " + std::to_string(shards.ranks), rank);
  KEYSEL_CHECK_ARG(n >= 0, "n", ">= 0", n);
  if (shards.layout == ContextShards::Layout::contiguous) {
    const std::int64_t span = std::max<std::int64_t>(1, (n + shards.ranks - 1) / shards.ranks);
    return std::clamp<std::int64_t>(n - rank * span, 0, span);
  }
  const std::int64_t full = n / shards.page, rest = n % shards.page;
  const std::int64_t pages = full / shards.ranks + (rank < full % shards.ranks ? 1 : 0);
  return pages * shards.page + (rest > 0 && full % shards.ranks == rank ? rest : 0);
}

std::int64_t select_topk_context_parallel_cuda_workspace_bytes(std::int64_t tokens, std::int64_t groups,
                                                               std::int64_t n_local, const SelectionPolicy& policy,
                                                               std::int64_t ranks) {
  constexpr std::string_view function = "select_topk_context_parallel_cuda_workspace_bytes";
  policy.validate(function);
  KEYSEL_CHECK_ARG(tokens >= 0 && groups >= 0 && n_local >= 0, "tokens, groups, n_local", ">= 0",
                   std::to_string(tokens) + ", " + std::to_string(groups) + ", " + std::to_string(n_local));
  KEYSEL_CHECK_ARG(ranks >= 1, "ranks", ">= 1", ranks);
  return select_parts(tokens, groups, n_local, policy.k, ranks, function).total();
}

std::int64_t sparse_attention_context_parallel_cuda_workspace_bytes(std::int64_t batch, std::int64_t query_heads,
                                                                    std::int64_t value_dim, std::int64_t groups,
                                                                    std::int64_t width, std::int64_t ranks) {
  constexpr std::string_view function = "sparse_attention_context_parallel_cuda_workspace_bytes";
  KEYSEL_CHECK_ARG(batch >= 0 && query_heads >= 0 && value_dim >= 0 && groups >= 0 && width >= 0,
                   "batch, query_heads, value_dim, groups, width", ">= 0",
                   std::to_string(batch) + ", " + std::to_string(query_heads) + ", " + std::to_string(value_dim) +
                       ", " + std::to_string(groups) + ", " + std::to_string(width));
  KEYSEL_CHECK_ARG(ranks >= 1, "ranks", ">= 1", ranks);
  return attention_parts(batch, query_heads, value_dim, groups, width, ranks, function).total();
}

#if KEYSEL_NCCL

namespace {

void check_nccl(ncclResult_t status, std::string_view function, std::string_view where) {
  if (status != ncclSuccess) {
    detail::throw_error(function, std::string("NCCL error ") + ncclGetErrorString(status) + " in " +
                                      std::string(where));
  }
}

/// This rank of `comm` and the shard map of `shards` over n_keys; checks that the communicator has shards.ranks
/// ranks and that this GPU is its device.
cuda_kernels::ShardMap shard_map(std::string_view function, ncclComm_t comm, const ContextShards& shards,
                                 std::int64_t n_keys, Device device, const char* argument) {
  KEYSEL_CHECK_ARG_IN(function, comm != nullptr, "comm", "a NCCL communicator", "nullptr");
  shards.validate(function);
  int count = 0, rank = 0, comm_device = 0;
  check_nccl(ncclCommCount(comm, &count), function, "ncclCommCount");
  check_nccl(ncclCommUserRank(comm, &rank), function, "ncclCommUserRank");
  check_nccl(ncclCommCuDevice(comm, &comm_device), function, "ncclCommCuDevice");
  KEYSEL_CHECK_ARG_IN(function, shards.ranks == count, "shards.ranks", "the communicator's " + std::to_string(count) + " ranks",
                   shards.ranks);
  KEYSEL_CHECK_ARG_IN(function, device.index == comm_device, argument,
                   "a tensor on the communicator's GPU cuda:" + std::to_string(comm_device), device.str());
  KEYSEL_CHECK_ARG_IN(function, n_keys >= 0 && n_keys <= kMaxKeyPositions, "n_keys", "0 to 2^31 - 1 keys", n_keys);
  return {shards.layout == ContextShards::Layout::round_robin, count, rank, shards.page,
          std::max<std::int64_t>(1, (n_keys + count - 1) / count)};
}

/// Carves `parts` out of scratch memory, in order.
struct Carver {
  char* at;
  template <typename T>
  T* next(const Parts& parts, int& index) {
    T* p = reinterpret_cast<T*>(at);
    at += parts.sizes[index++];
    return p;
  }
};

}  // namespace

void select_topk_context_parallel_cuda(ncclComm_t comm, const ContextShards& shards, const TensorView& local_scores,
                                       const TensorView& positions, std::int64_t n_keys,
                                       const SelectionPolicy& policy, const TensorView& selection, void* stream,
                                       const TensorView& workspace) {
  constexpr std::string_view function = "select_topk_context_parallel_cuda";
  policy.validate(function);
  expect_shape(function, local_scores, "local_scores", {kAnyExtent, kAnyExtent, kAnyExtent});
  expect_dtype(function, local_scores, "local_scores", {DType::fp32});
  const Device device = local_scores.device();
  KEYSEL_CHECK_ARG(device.kind == DeviceKind::cuda, "local_scores", "a tensor on a CUDA device", local_scores.str());
  expect_contiguous(function, local_scores, "local_scores");
  const cuda_kernels::ShardMap map = shard_map(function, comm, shards, n_keys, device, "local_scores");
  const std::int64_t tokens = local_scores.size(0), groups = local_scores.size(1), n_local = local_scores.size(2);
  const std::int64_t expected = context_shard_size(shards, map.rank, n_keys);
  KEYSEL_CHECK_ARG(n_local == expected, "local_scores",
                   "rank " + std::to_string(map.rank) + "'s " + std::to_string(expected) + " positions of " +
                       std::to_string(n_keys) + " in its last extent",
                   local_scores.str());
  expect_shape(function, positions, "positions", {tokens});
  expect_dtype(function, positions, "positions", {DType::int32});
  expect_device(function, positions, "positions", device);
  expect_contiguous(function, positions, "positions");
  const std::int64_t width = policy.width(), k = policy.k;
  check_selection_output(function, selection, tokens, groups, width, device);
  expect_contiguous(function, selection, "selection");
  KEYSEL_CHECK_ARG(checked_product({map.ranks + 1, k}, function, "policy") <= 0x7fffffff, "policy",
                   "(ranks + 1) k below 2^31", k);
  KEYSEL_CHECK_ARG(tokens * groups <= 0x7fffffff, "local_scores", "at most 2^31 - 1 rows (T * G)", tokens * groups);
  const Parts parts = select_parts(tokens, groups, n_local, k, map.ranks, function);
  void* external = detail::workspace_pointer(function, workspace, parts.total(), device);
  cuda_glue::use_device(function, device.index);
  cuda_glue::expect_device_pointers(function,
                                    {{local_scores.raw_data(), "local_scores"},
                                     {positions.raw_data(), "positions"},
                                     {selection.raw_data(), "selection"}},
                                    device.index);
  if (tokens * groups == 0) return;
  cuda_glue::Scratch scratch(function, static_cast<std::size_t>(parts.total()), device.index, stream, external);
  Carver carve{scratch.as<char>()};
  int index = 0;
  cuda_kernels::ContextSelectLaunch p{};
  p.local_scores = local_scores.data<float>();
  p.positions = positions.data<std::int32_t>();
  p.masked = carve.next<float>(parts, index);
  p.local_last = carve.next<std::int32_t>(parts, index);
  p.merged_last = carve.next<std::int32_t>(parts, index);
  auto* local_selection = carve.next<std::int32_t>(parts, index);
  p.local_selection = local_selection;
  p.send = carve.next<cuda_kernels::CandidateEntry>(parts, index);
  auto* received = carve.next<cuda_kernels::CandidateEntry>(parts, index);
  p.received = received;
  p.merged_scores = carve.next<float>(parts, index);
  p.merged_positions = carve.next<std::int32_t>(parts, index);
  auto* merged_selection = carve.next<std::int32_t>(parts, index);
  p.merged_selection = merged_selection;
  void* topk_workspace = carve.next<char>(parts, index);
  p.selection = selection.mutable_data<std::int32_t>();
  p.tokens = tokens;
  p.groups = groups;
  p.n_local = n_local;
  p.n_keys = n_keys;
  p.k = k;
  p.n_sink = policy.n_sink;
  p.n_keep_local = policy.n_local;
  p.width = width;
  p.kept_on_top = policy.kept_on_top;
  p.map = map;
  const Device cuda = device;
  const TensorView topk_scratch(topk_workspace, DType::int8, {parts.sizes[index - 1]}, cuda);
  SelectionPolicy candidates;  // each rank's best k free keys, then the best k of the merged row
  candidates.k = k;

  cuda_kernels::launch_context_mask(function, p, stream);
  if (n_local > 0) {
    select_topk_cuda(TensorView(p.masked, DType::fp32, {tokens, groups, n_local}, cuda),
                     TensorView(p.local_last, DType::int32, {tokens}, cuda), candidates,
                     TensorView(local_selection, DType::int32, {tokens, groups, k}, cuda), stream, topk_scratch);
  }
  cuda_kernels::launch_context_pack(function, p, stream);
  check_nccl(ncclAllGather(p.send, received, static_cast<std::size_t>(tokens * groups * k * 8), ncclUint8, comm,
                           static_cast<cudaStream_t>(stream)),
             function, "ncclAllGather of the candidates");
  cuda_kernels::launch_context_merge(function, p, stream);
  select_topk_cuda(TensorView(p.merged_scores, DType::fp32, {tokens, groups, (map.ranks + 1) * k}, cuda),
                   TensorView(p.merged_last, DType::int32, {tokens}, cuda), candidates,
                   TensorView(merged_selection, DType::int32, {tokens, groups, k}, cuda), stream, topk_scratch);
  cuda_kernels::launch_context_assemble(function, p, stream);
  scratch.release();
}

void sparse_attention_context_parallel_cuda(ncclComm_t comm, const ContextShards& shards, std::int64_t n_keys,
                                            const TensorView& q, const CudaKvCache& local_cache,
                                            const TensorView& selection, Granularity granularity, double scale,
                                            const TensorView& out, const TensorView& lse, void* stream,
                                            const TensorView& workspace) {
  constexpr std::string_view function = "sparse_attention_context_parallel_cuda";
  expect_shape(function, q, "q", {kAnyExtent, kAnyExtent, kAnyExtent});
  const Device device = q.device();
  KEYSEL_CHECK_ARG(device.kind == DeviceKind::cuda, "q", "a tensor on a CUDA device", q.str());
  expect_dtype(function, q, "q", {DType::bf16});
  const cuda_kernels::ShardMap map = shard_map(function, comm, shards, n_keys, device, "q");
  const std::int64_t batch = q.size(0), query_heads = q.size(1);
  // The rest of q and the cache is sparse_attention_decode_cuda's to check; what this call relies on first:
  expect_shape(function, local_cache.k, "local_cache.k", {kAnyExtent, kAnyExtent, kAnyExtent, q.size(2)});
  expect_shape(function, local_cache.v, "local_cache.v", {kAnyExtent, kAnyExtent, kAnyExtent, kAnyExtent});
  expect_device(function, local_cache.k, "local_cache.k", device);
  expect_device(function, local_cache.v, "local_cache.v", device);
  const std::int64_t kv_heads = local_cache.k.size(2), value_dim = local_cache.v.size(3);
  KEYSEL_CHECK_ARG(kv_heads >= 1 && query_heads % kv_heads == 0, "local_cache.k",
                   "Hkv dividing the " + std::to_string(query_heads) + " query heads", local_cache.k.str());
  if (local_cache.block_table.empty()) {
    const std::int64_t n_local = context_shard_size(shards, map.rank, n_keys);
    KEYSEL_CHECK_ARG(local_cache.k.size(0) == batch && local_cache.k.size(1) >= n_local, "local_cache.k",
                     "[B = " + std::to_string(batch) + ", at least rank " + std::to_string(map.rank) + "'s " +
                         std::to_string(n_local) + " rows, Hkv, D]",
                     local_cache.k.str());
  }
  expect_shape(function, selection, "selection",
               {batch, group_count(granularity, query_heads, kv_heads), kAnyExtent});
  expect_dtype(function, selection, "selection", {DType::int32});
  expect_device(function, selection, "selection", device);
  expect_contiguous(function, selection, "selection");
  const std::int64_t groups = selection.size(1), width = selection.size(2);
  expect_shape(function, out, "out", {batch, query_heads, value_dim});
  expect_dtype(function, out, "out", {DType::fp32});
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
  const Parts parts = attention_parts(batch, query_heads, value_dim, groups, width, map.ranks, function);
  void* external = detail::workspace_pointer(function, workspace, parts.total(), device);
  cuda_glue::use_device(function, device.index);
  if (batch * query_heads == 0) return;
  cuda_glue::Scratch scratch(function, static_cast<std::size_t>(parts.total()), device.index, stream, external);
  Carver carve{scratch.as<char>()};
  int index = 0;
  auto* local_selection = carve.next<std::int32_t>(parts, index);
  auto* o_mine = carve.next<float>(parts, index);
  auto* lse_mine = carve.next<float>(parts, index);
  auto* o_all = carve.next<float>(parts, index);
  auto* lse_all = carve.next<float>(parts, index);
  const std::int64_t heads = batch * query_heads;
  // sparse_attention_decode_cuda checks q, the cache and the selection's groups before anything is launched.
  cuda_kernels::launch_context_localize(function, selection.data<std::int32_t>(), local_selection,
                                        batch * groups * width, n_keys, map, stream);
  sparse_attention_decode_cuda(q, local_cache, TensorView(local_selection, DType::int32, {batch, groups, width}, device),
                               granularity, scale, TensorView(o_mine, DType::fp32, {batch, query_heads, value_dim}, device),
                               TensorView(lse_mine, DType::fp32, {batch, query_heads}, device), stream);
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  check_nccl(ncclGroupStart(), function, "ncclGroupStart");
  check_nccl(ncclAllGather(o_mine, o_all, static_cast<std::size_t>(heads * value_dim), ncclFloat32, comm, cuda_stream),
             function, "ncclAllGather of the partial outputs");
  check_nccl(ncclAllGather(lse_mine, lse_all, static_cast<std::size_t>(heads), ncclFloat32, comm, cuda_stream),
             function, "ncclAllGather of the partial log-sum-exps");
  check_nccl(ncclGroupEnd(), function, "ncclGroupEnd");
  cuda_kernels::launch_context_merge_attention(function, o_all, lse_all, map.ranks, heads, value_dim,
                                               out.mutable_data<float>(),
                                               lse.empty() ? nullptr : lse.mutable_data<float>(), stream);
  scratch.release();
}

#else  // !KEYSEL_NCCL

void select_topk_context_parallel_cuda(ncclComm_t, const ContextShards&, const TensorView&, const TensorView&,
                                       std::int64_t, const SelectionPolicy&, const TensorView&, void*,
                                       const TensorView&) {
  detail::throw_error("select_topk_context_parallel_cuda", "keysel was built without NCCL");
}

void sparse_attention_context_parallel_cuda(ncclComm_t, const ContextShards&, std::int64_t, const TensorView&,
                                            const CudaKvCache&, const TensorView&, Granularity, double,
                                            const TensorView&, const TensorView&, void*, const TensorView&) {
  detail::throw_error("sparse_attention_context_parallel_cuda", "keysel was built without NCCL");
}

#endif  // KEYSEL_NCCL

}  // namespace keysel
