// The small kernels of context parallelism on GPUs (keysel/indexer/cuda_context_parallel.h): masking a rank's
// scores to its free keys, packing candidates, merging every rank's candidates in position order, writing the
// selection, and the log-sum-exp merge of partial attention outputs. The top-k and the attention themselves are
// keysel's select_topk_cuda and sparse_attention_decode_cuda; the transport is NCCL (cuda_context_parallel.cpp).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "../../attention/src/cuda_glue.h"
#include "cuda_context_parallel_launch.h"

namespace keysel::cuda_kernels {
namespace {

using Plan = BasicRowPlan<std::int64_t>;

__device__ Plan plan_of(const ContextSelectLaunch& p, std::int64_t row) {
  const std::int64_t t = row / p.groups;
  return Plan::make(p.k, p.n_sink, p.n_keep_local, p.kept_on_top, p.width, p.positions[t], p.n_keys);
}

int blocks_for(std::int64_t count, int threads) {
  const std::int64_t blocks = (count + threads - 1) / threads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 65535 * 16 ? 65535 * 16 : blocks));
}

__global__ void mask_kernel(ContextSelectLaunch p) {
  const std::int64_t total = p.tokens * p.groups * p.n_local;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const std::int64_t row = i / p.n_local;
    const Plan plan = plan_of(p, row);
    const std::int64_t s = p.map.global(i % p.n_local);
    const bool free_key = s >= plan.sink_end && s < plan.local_begin;
    p.masked[i] = free_key ? p.local_scores[i] : __int_as_float(0x7fc00000);
  }
  for (std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < p.tokens; t += stride) {
    p.local_last[t] = static_cast<std::int32_t>(p.n_local - 1);
    p.merged_last[t] = static_cast<std::int32_t>((p.map.ranks + 1) * p.k - 1);
  }
}

__global__ void pack_kernel(ContextSelectLaunch p) {
  const std::int64_t total = p.tokens * p.groups * p.k;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const std::int64_t row = i / p.k;
    const std::int32_t column = p.n_local > 0 ? p.local_selection[i] : -1;
    CandidateEntry c{0.0f, -1};
    if (column >= 0) {
      c.score = p.masked[row * p.n_local + column];
      c.position = static_cast<std::int32_t>(p.map.global(column));
    }
    p.send[i] = c;
  }
}

/// One block per row: k - fill leading +inf (always selected first: they win every tie by their lower column),
/// then every rank's candidates at their rank in position order (each rank's list is ascending and the ranks'
/// positions are disjoint), NaN padding.
__global__ void merge_kernel(ContextSelectLaunch p) {
  const std::int64_t row = blockIdx.x;
  const std::int64_t ranks = p.map.ranks, rows = p.tokens * p.groups;
  const std::int64_t columns = (ranks + 1) * p.k;
  const Plan plan = plan_of(p, row);
  float* scores = p.merged_scores + row * columns;
  std::int32_t* positions = p.merged_positions + row * ranks * p.k;
  const std::int64_t leading = p.k - plan.fill;
  for (std::int64_t j = threadIdx.x; j < columns; j += blockDim.x) {
    scores[j] = j < leading ? INFINITY : __int_as_float(0x7fc00000);
    if (j < ranks * p.k) positions[j] = -1;
  }
  __syncthreads();
  for (std::int64_t e = threadIdx.x; e < ranks * p.k; e += blockDim.x) {
    const std::int64_t r = e / p.k, i = e % p.k;
    const CandidateEntry c = p.received[(r * rows + row) * p.k + i];
    if (c.position < 0) continue;
    const std::int64_t slot = merged_slot(p.received, ranks, rows, row, p.k, r, i, c.position);
    scores[p.k + slot] = c.score;
    positions[slot] = c.position;
  }
}

/// The row of select_topk: sinks, the chosen keys in position order, the kept window, -1 padding.
__global__ void assemble_kernel(ContextSelectLaunch p) {
  const std::int64_t rows = p.tokens * p.groups, total = rows * p.width;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const std::int64_t row = i / p.width, e = i % p.width;
    p.selection[i] = assembled_entry(plan_of(p, row), e, p.merged_selection + row * p.k, p.k,
                                     p.merged_positions + row * p.map.ranks * p.k);
  }
}

__global__ void localize_kernel(const std::int32_t* selection, std::int32_t* local, std::int64_t count,
                                ShardMap map) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    local[i] = static_cast<std::int32_t>(map.local(selection[i]));
  }
}

__global__ void merge_attention_kernel(const float* o_all, const float* lse_all, std::int64_t ranks,
                                       std::int64_t heads, std::int64_t dv, float* out, float* lse) {
  const std::int64_t total = heads * dv;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const std::int64_t h = i / dv;
    float top = -INFINITY;
    for (std::int64_t r = 0; r < ranks; ++r) top = fmaxf(top, lse_all[r * heads + h]);
    double sum = 0.0;
    if (top != -INFINITY) {
      for (std::int64_t r = 0; r < ranks; ++r) sum += exp(static_cast<double>(lse_all[r * heads + h]) - top);
    }
    const double merged = sum > 0.0 ? top + log(sum) : -static_cast<double>(INFINITY);
    double value = 0.0;
    for (std::int64_t r = 0; r < ranks; ++r) {
      const float l = lse_all[r * heads + h];
      if (l != -INFINITY) value += exp(static_cast<double>(l) - merged) * o_all[r * total + i];
    }
    out[i] = static_cast<float>(value);
    if (lse != nullptr && i % dv == 0) lse[h] = static_cast<float>(merged);
  }
}

constexpr int kThreads = 256;

}  // namespace

void launch_context_mask(std::string_view function, const ContextSelectLaunch& p, void* stream) {
  const std::int64_t work = p.tokens * p.groups * p.n_local > p.tokens ? p.tokens * p.groups * p.n_local : p.tokens;
  mask_kernel<<<blocks_for(work, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  cuda_glue::check(cudaGetLastError(), function, "context mask kernel launch");
}

void launch_context_pack(std::string_view function, const ContextSelectLaunch& p, void* stream) {
  pack_kernel<<<blocks_for(p.tokens * p.groups * p.k, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  cuda_glue::check(cudaGetLastError(), function, "context pack kernel launch");
}

void launch_context_merge(std::string_view function, const ContextSelectLaunch& p, void* stream) {
  merge_kernel<<<static_cast<unsigned>(p.tokens * p.groups), 512, 0, static_cast<cudaStream_t>(stream)>>>(p);
  cuda_glue::check(cudaGetLastError(), function, "context merge kernel launch");
}

void launch_context_assemble(std::string_view function, const ContextSelectLaunch& p, void* stream) {
  assemble_kernel<<<blocks_for(p.tokens * p.groups * p.width, kThreads), kThreads, 0,
                    static_cast<cudaStream_t>(stream)>>>(p);
  cuda_glue::check(cudaGetLastError(), function, "context assemble kernel launch");
}

void launch_context_localize(std::string_view function, const std::int32_t* selection, std::int32_t* local,
                             std::int64_t count, std::int64_t, const ShardMap& map, void* stream) {
  localize_kernel<<<blocks_for(count, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(selection, local,
                                                                                                   count, map);
  cuda_glue::check(cudaGetLastError(), function, "context localize kernel launch");
}

void launch_context_merge_attention(std::string_view function, const float* o_all, const float* lse_all,
                                    std::int64_t ranks, std::int64_t heads, std::int64_t dv, float* out, float* lse,
                                    void* stream) {
  merge_attention_kernel<<<blocks_for(heads * dv, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      o_all, lse_all, ranks, heads, dv, out, lse);
  cuda_glue::check(cudaGetLastError(), function, "context attention merge kernel launch");
}

}  // namespace keysel::cuda_kernels
