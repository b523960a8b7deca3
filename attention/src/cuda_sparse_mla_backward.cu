// The backward of sparse MLA on a GPU (see sparse_mla_backward_cuda in keysel/attention/sparse_mla.h; SPEC §9.2):
// the attention backward's kernels (cuda_sparse_attention_backward.cu) over the latent cache, one key head, K the
// 576-channel latents and V their first 512 channels, with three extra steps around them:
//   1. a prepare kernel, one warp per token: the row's valid slots (inside [0, N), among the first topk_length
//      entries) copied in row order into a selection [T, 1, topk] (-1 elsewhere), whether the row has any, and
//      with a sink the keys' share c = 1 / (1 + exp(sink - lse)) of each (token, head) (in double, as the CPU);
//   2. the attention backward with P = c P', dS = P (dP - Delta) + P' dLse, dK + dV written into one latent row
//      and Delta written out;
//   3. with a sink gradient, one thread per head sums -(1 - c) Delta over the tokens with a valid slot in
//      ascending order, in double.
// No atomics anywhere: the same bits on every run.
#include <cstdint>

#include "cuda_glue.h"
#include "cuda_sparse_attention_backward_launch.h"
#include "cuda_sparse_mla_backward_launch.h"

namespace keysel::cuda_kernels {
namespace {

constexpr int kLatentDim = 576;
constexpr int kValueDim = 512;
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

struct PrepareParams {
  const std::int32_t* indices;
  long long index_stride;
  int topk;
  const std::int32_t* topk_length;
  const float* attn_sink;
  const float* lse;
  long long tokens, slots;
  int heads;
  std::int32_t* selection;  // [T, topk]
  std::uint8_t* has_slots;  // [T]
  float* factor;            // [T, H] or null (no sink)
};

__global__ void __launch_bounds__(kThreads) mla_prepare_kernel(PrepareParams p) {
  const long long t = static_cast<long long>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (t >= p.tokens) return;
  int length = p.topk;
  if (p.topk_length != nullptr) length = min(max(p.topk_length[t], 0), p.topk);
  bool any = false;
  for (int i = lane; i < p.topk; i += 32) {
    const std::int32_t s = p.indices[t * p.index_stride + i];
    const bool valid = i < length && s >= 0 && s < p.slots;
    p.selection[t * p.topk + i] = valid ? s : -1;
    any = any || valid;
  }
  any = __any_sync(0xffffffffu, any);
  if (lane == 0) p.has_slots[t] = any ? 1 : 0;
  if (p.factor == nullptr) return;
  for (int h = lane; h < p.heads; h += 32) {
    const double lse = p.lse[t * p.heads + h];
    p.factor[t * p.heads + h] = static_cast<float>(1.0 / (1.0 + exp(static_cast<double>(p.attn_sink[h]) - lse)));
  }
}

struct SinkParams {
  const float* attn_sink;
  const float* lse;
  const float* delta;  // [T, H]: Delta = dO . out
  const std::uint8_t* has_slots;
  long long tokens;
  int heads;
  float* grad_attn_sink;
};

/// d sink[h] = -sum_t (1 - c[t, h]) Delta[t, h] over the tokens with a valid slot, ascending, in double.
__global__ void mla_sink_gradient_kernel(SinkParams p) {
  const int h = blockIdx.x * blockDim.x + threadIdx.x;
  if (h >= p.heads) return;
  const double sink = p.attn_sink[h];
  double sum = 0.0;
  for (long long t = 0; t < p.tokens; ++t) {
    if (p.has_slots[t] == 0) continue;
    const double lse = p.lse[t * p.heads + h];
    sum += 1.0 / (1.0 + exp(lse - sink)) * static_cast<double>(p.delta[t * p.heads + h]);
  }
  p.grad_attn_sink[h] = static_cast<float>(-sum);
}

std::size_t aligned(std::size_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace

void launch_sparse_mla_backward(std::string_view function, const SparseMlaBackwardLaunch& in, void* stream) {
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  const long long rows = in.tokens * in.heads;
  const bool sink = in.attn_sink != nullptr;
  const bool sink_gradient = in.grad_attn_sink != nullptr;
  // Scratch: the selection, the rows' flags, c (with a sink) and Delta (for the sink gradient).
  const std::size_t selection_bytes = aligned(static_cast<std::size_t>(in.tokens * in.topk) * sizeof(std::int32_t));
  const std::size_t flag_bytes = aligned(static_cast<std::size_t>(in.tokens));
  const std::size_t row_bytes = aligned(static_cast<std::size_t>(rows) * sizeof(float));
  const std::size_t factor_bytes = sink ? row_bytes : 0;
  const std::size_t delta_bytes = sink_gradient ? row_bytes : 0;
  cuda_glue::Scratch scratch(function, selection_bytes + flag_bytes + factor_bytes + delta_bytes, in.device, stream);
  char* base = scratch.as<char>();
  PrepareParams prepare{};
  prepare.indices = in.indices;
  prepare.index_stride = in.index_stride;
  prepare.topk = in.topk;
  prepare.topk_length = in.topk_length;
  prepare.attn_sink = in.attn_sink;
  prepare.lse = in.lse;
  prepare.tokens = in.tokens;
  prepare.slots = in.slots;
  prepare.heads = in.heads;
  prepare.selection = reinterpret_cast<std::int32_t*>(base);
  prepare.has_slots = reinterpret_cast<std::uint8_t*>(base + selection_bytes);
  prepare.factor = sink ? reinterpret_cast<float*>(base + selection_bytes + flag_bytes) : nullptr;
  float* delta = sink_gradient ? reinterpret_cast<float*>(base + selection_bytes + flag_bytes + factor_bytes) : nullptr;
  if (in.tokens > 0) {
    mla_prepare_kernel<<<static_cast<unsigned>((in.tokens + kWarps - 1) / kWarps), kThreads, 0, cuda_stream>>>(
        prepare);
    cuda_glue::check(cudaGetLastError(), function, "mla_prepare_kernel launch");
  }

  SparseBackwardLaunch attention{};
  attention.q = in.q;
  attention.k = in.kv;
  attention.v = in.kv;
  attention.out = in.out;
  attention.grad_out = in.grad_out;
  attention.lse = in.lse;
  attention.selection = prepare.selection;
  attention.grad_q = in.grad_q;
  attention.grad_k = in.grad_kv;
  attention.grad_v = nullptr;
  attention.tokens = in.tokens;
  attention.keys = in.slots;
  attention.query_heads = in.heads;
  attention.kv_heads = 1;
  attention.head_dim = kLatentDim;
  attention.value_dim = kValueDim;
  attention.groups = 1;
  attention.width = in.topk;
  attention.granularity = Granularity::per_kv_head;
  attention.bf16 = in.bf16;
  attention.out_bf16 = in.out_bf16;
  attention.grad_out_bf16 = in.grad_out_bf16;
  attention.scale = in.scale;
  attention.device = in.device;
  attention.grad_lse = in.grad_lse;
  attention.out_factor = prepare.factor;
  attention.values_in_keys = true;
  attention.delta_out = delta;
  launch_sparse_attention_backward(function, attention, stream);

  if (sink_gradient) {
    SinkParams sums{in.attn_sink, in.lse, delta, prepare.has_slots, in.tokens, in.heads, in.grad_attn_sink};
    mla_sink_gradient_kernel<<<static_cast<unsigned>((in.heads + kThreads - 1) / kThreads), kThreads, 0,
                               cuda_stream>>>(sums);
    cuda_glue::check(cudaGetLastError(), function, "mla_sink_gradient_kernel launch");
  }
  scratch.release();
}

}  // namespace keysel::cuda_kernels
