// The backward of attention over a selection on a GPU (see sparse_attention_backward_cuda in
// keysel/attention/cuda_sparse_attention.h; SPEC §9). Portable (sm_80+), fp32 accumulation, deterministic.
//
// One warp per work item; each lane holds channels lane, lane + 32, ... (up to 256 channels: 8 per lane), and
// dot products are butterfly shuffle reductions (a fixed order, so results do not depend on scheduling).
//   1. query kernel, one warp per unit (a query token and the heads that share a key head and a selection row):
//      Delta = rowsum(dO * O) per head, then over the row's keys P = exp(scale q.k - lse), dP = dO.v,
//      dS = P (dP - Delta), dQ += scale dS k; it also writes one 64-bit sort key per selection entry,
//      (key head * N + key) * units + unit (all ones for a skipped entry);
//   2. a radix sort of those keys (CUB): each (key head, key) then lists the units that select it, ascending;
//   3. a bounds kernel marks where each (key head, key) list starts and ends;
//   4. key kernel, one warp per (key head, key): recomputes P, dP, dS for each unit of its list in order and
//      sums dK += scale dS q, dV += P dO; a key no unit selects gets zeros.
// No atomics anywhere: the same bits on every run.
#include <cuda_bf16.h>

#include <cstdint>
#include <cub/device/device_radix_sort.cuh>

#include "cuda_glue.h"
#include "cuda_sparse_attention_backward_launch.h"

namespace keysel::cuda_kernels {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kPerLane = 8;  // channels per lane: D, Dv <= 256
constexpr std::uint64_t kSkipped = ~std::uint64_t{0};

template <typename T>
struct BackwardParams {
  const T* q;
  const T* k;
  const T* v;
  const T* out;
  const T* grad_out;
  const float* lse;
  const std::int32_t* selection;
  float* grad_q;
  float* grad_k;
  float* grad_v;
  float* delta;              // [T, Hq] scratch
  std::uint64_t* sort_keys;  // [units, W] scratch
  const std::uint64_t* sorted;
  long long* list_begin;  // [Hkv * N]
  long long* list_end;    // [Hkv * N]
  long long tokens, keys, units, entries;
  int query_heads, kv_heads, head_dim, value_dim, groups, width;
  int units_per_token, heads_per_unit, group_size;
  int granularity;  // 0 per_head, 1 per_kv_head, 2 per_token
  float scale;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ void load_channels(const T* row, int dim, int lane, float (&r)[kPerLane]) {
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    r[i] = d < dim ? to_float(row[d]) : 0.0f;
  }
}

__device__ __forceinline__ float warp_dot(const float (&a)[kPerLane], const float (&b)[kPerLane]) {
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) sum = fmaf(a[i], b[i], sum);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  return sum;
}

template <typename T>
struct Unit {
  long long t;
  int first_head, kv, group;
};

template <typename T>
__device__ __forceinline__ Unit<T> unit_of(const BackwardParams<T>& p, long long unit) {
  Unit<T> u;
  u.t = unit / p.units_per_token;
  const int local = static_cast<int>(unit % p.units_per_token);
  u.first_head = p.granularity == 0 ? local : local * p.group_size;
  u.kv = u.first_head / p.group_size;
  u.group = p.granularity == 2 ? 0 : local;
  return u;
}

/// P and dS of head row r (= t * Hq + h) against the key whose channels are kr, vr.
template <typename T>
__device__ __forceinline__ void probability(const BackwardParams<T>& p, const float (&q)[kPerLane],
                                            const float (&go)[kPerLane], const float (&kr)[kPerLane],
                                            const float (&vr)[kPerLane], float lse, float delta, float& prob,
                                            float& ds) {
  const float logit = warp_dot(q, kr) * p.scale;
  prob = isinf(lse) ? 0.0f : __expf(logit - lse);
  ds = prob * (warp_dot(go, vr) - delta);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) backward_query_kernel(BackwardParams<T> p) {
  const long long unit = static_cast<long long>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (unit >= p.units) return;
  const Unit<T> u = unit_of(p, unit);
  const std::int32_t* row = p.selection + (u.t * p.groups + u.group) * p.width;
  for (int j = 0; j < p.heads_per_unit; ++j) {
    const long long r = u.t * p.query_heads + u.first_head + j;
    float q[kPerLane], go[kPerLane], o[kPerLane], dq[kPerLane];
    load_channels(p.q + r * p.head_dim, p.head_dim, lane, q);
    load_channels(p.grad_out + r * p.value_dim, p.value_dim, lane, go);
    load_channels(p.out + r * p.value_dim, p.value_dim, lane, o);
    const float delta = warp_dot(go, o);
    if (lane == 0) p.delta[r] = delta;
    const float lse = p.lse[r];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) dq[i] = 0.0f;
    for (int i = 0; i < p.width; ++i) {
      const std::int32_t s = row[i];
      if (s < 0 || s >= p.keys) continue;
      float kr[kPerLane], vr[kPerLane];
      load_channels(p.k + (static_cast<long long>(s) * p.kv_heads + u.kv) * p.head_dim, p.head_dim, lane, kr);
      load_channels(p.v + (static_cast<long long>(s) * p.kv_heads + u.kv) * p.value_dim, p.value_dim, lane, vr);
      float prob, ds;
      probability(p, q, go, kr, vr, lse, delta, prob, ds);
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) dq[c] = fmaf(p.scale * ds, kr[c], dq[c]);
    }
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < p.head_dim) p.grad_q[r * p.head_dim + d] = dq[i];
    }
  }
  for (int i = lane; i < p.width; i += 32) {
    const std::int32_t s = row[i];
    const bool valid = s >= 0 && s < p.keys;
    p.sort_keys[unit * p.width + i] =
        valid
            ? (static_cast<std::uint64_t>(u.kv) * static_cast<std::uint64_t>(p.keys) + static_cast<std::uint64_t>(s)) *
                      static_cast<std::uint64_t>(p.units) +
                  static_cast<std::uint64_t>(unit)
            : kSkipped;
  }
}

template <typename T>
__global__ void backward_bounds_kernel(BackwardParams<T> p) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.entries) return;
  const std::uint64_t key = p.sorted[i];
  if (key == kSkipped) return;
  const std::uint64_t units = static_cast<std::uint64_t>(p.units);
  const std::uint64_t list = key / units;
  if (i == 0 || p.sorted[i - 1] / units != list) p.list_begin[list] = i;
  if (i + 1 == p.entries || p.sorted[i + 1] == kSkipped || p.sorted[i + 1] / units != list) p.list_end[list] = i + 1;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) backward_key_kernel(BackwardParams<T> p) {
  const long long list = static_cast<long long>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (list >= p.kv_heads * p.keys) return;
  const int kv = static_cast<int>(list / p.keys);
  const long long s = list % p.keys;
  float kr[kPerLane], vr[kPerLane], dk[kPerLane], dv[kPerLane];
  load_channels(p.k + (s * p.kv_heads + kv) * p.head_dim, p.head_dim, lane, kr);
  load_channels(p.v + (s * p.kv_heads + kv) * p.value_dim, p.value_dim, lane, vr);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) dk[i] = dv[i] = 0.0f;
  const long long end = p.list_end[list];
  for (long long e = p.list_begin[list]; e < end; ++e) {
    const long long unit = static_cast<long long>(p.sorted[e] % static_cast<std::uint64_t>(p.units));
    const Unit<T> u = unit_of(p, unit);
    for (int j = 0; j < p.heads_per_unit; ++j) {
      const long long r = u.t * p.query_heads + u.first_head + j;
      float q[kPerLane], go[kPerLane];
      load_channels(p.q + r * p.head_dim, p.head_dim, lane, q);
      load_channels(p.grad_out + r * p.value_dim, p.value_dim, lane, go);
      float prob, ds;
      probability(p, q, go, kr, vr, p.lse[r], p.delta[r], prob, ds);
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) {
        dk[c] = fmaf(p.scale * ds, q[c], dk[c]);
        dv[c] = fmaf(prob, go[c], dv[c]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < p.head_dim) p.grad_k[(s * p.kv_heads + kv) * p.head_dim + d] = dk[i];
    if (d < p.value_dim) p.grad_v[(s * p.kv_heads + kv) * p.value_dim + d] = dv[i];
  }
}

std::size_t aligned(std::size_t bytes) { return (bytes + 255) / 256 * 256; }

template <typename T>
void run(std::string_view function, const SparseBackwardLaunch& in, void* stream) {
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  BackwardParams<T> p{};
  p.q = static_cast<const T*>(in.q);
  p.k = static_cast<const T*>(in.k);
  p.v = static_cast<const T*>(in.v);
  p.out = static_cast<const T*>(in.out);
  p.grad_out = static_cast<const T*>(in.grad_out);
  p.lse = in.lse;
  p.selection = in.selection;
  p.grad_q = in.grad_q;
  p.grad_k = in.grad_k;
  p.grad_v = in.grad_v;
  p.tokens = in.tokens;
  p.keys = in.keys;
  p.query_heads = in.query_heads;
  p.kv_heads = in.kv_heads;
  p.head_dim = in.head_dim;
  p.value_dim = in.value_dim;
  p.groups = in.groups;
  p.width = in.width;
  p.group_size = in.query_heads / in.kv_heads;
  const bool per_head = in.granularity == Granularity::per_head;
  p.granularity = per_head ? 0 : (in.granularity == Granularity::per_kv_head ? 1 : 2);
  p.units_per_token = per_head ? in.query_heads : in.kv_heads;
  p.heads_per_unit = per_head ? 1 : p.group_size;
  p.units = in.tokens * p.units_per_token;
  p.entries = p.units * in.width;
  p.scale = in.scale;
  const long long lists = static_cast<long long>(in.kv_heads) * in.keys;

  // Scratch: Delta, the sort keys twice, the list bounds, CUB's temporary storage.
  std::size_t sort_bytes = 0;
  cuda_glue::check(cub::DeviceRadixSort::SortKeys(nullptr, sort_bytes, static_cast<const std::uint64_t*>(nullptr),
                                                  static_cast<std::uint64_t*>(nullptr), p.entries, 0, 64, cuda_stream),
                   function, "cub::DeviceRadixSort::SortKeys (size)");
  const std::size_t delta_bytes = aligned(static_cast<std::size_t>(in.tokens * in.query_heads) * sizeof(float));
  const std::size_t keys_bytes = aligned(static_cast<std::size_t>(p.entries) * sizeof(std::uint64_t));
  const std::size_t bounds_bytes = aligned(static_cast<std::size_t>(lists) * sizeof(long long));
  cuda_glue::Scratch scratch(function, delta_bytes + 2 * keys_bytes + 2 * bounds_bytes + aligned(sort_bytes), in.device,
                             stream);
  char* base = scratch.as<char>();
  p.delta = reinterpret_cast<float*>(base);
  p.sort_keys = reinterpret_cast<std::uint64_t*>(base + delta_bytes);
  std::uint64_t* sorted = reinterpret_cast<std::uint64_t*>(base + delta_bytes + keys_bytes);
  p.sorted = sorted;
  p.list_begin = reinterpret_cast<long long*>(base + delta_bytes + 2 * keys_bytes);
  p.list_end = reinterpret_cast<long long*>(base + delta_bytes + 2 * keys_bytes + bounds_bytes);
  void* sort_storage = base + delta_bytes + 2 * keys_bytes + 2 * bounds_bytes;
  cuda_glue::check(cudaMemsetAsync(p.list_begin, 0, 2 * bounds_bytes, cuda_stream), function, "cudaMemsetAsync");

  if (p.units > 0) {
    backward_query_kernel<T><<<static_cast<unsigned>((p.units + kWarps - 1) / kWarps), kThreads, 0, cuda_stream>>>(p);
    cuda_glue::check(cudaGetLastError(), function, "backward_query_kernel launch");
  }
  if (p.entries > 0) {
    cuda_glue::check(
        cub::DeviceRadixSort::SortKeys(sort_storage, sort_bytes, p.sort_keys, sorted, p.entries, 0, 64, cuda_stream),
        function, "cub::DeviceRadixSort::SortKeys");
    backward_bounds_kernel<T><<<static_cast<unsigned>((p.entries + 255) / 256), 256, 0, cuda_stream>>>(p);
    cuda_glue::check(cudaGetLastError(), function, "backward_bounds_kernel launch");
  }
  backward_key_kernel<T><<<static_cast<unsigned>((lists + kWarps - 1) / kWarps), kThreads, 0, cuda_stream>>>(p);
  cuda_glue::check(cudaGetLastError(), function, "backward_key_kernel launch");
  scratch.release();
}

}  // namespace

void launch_sparse_attention_backward(std::string_view function, const SparseBackwardLaunch& in, void* stream) {
  if (in.bf16) {
    run<__nv_bfloat16>(function, in, stream);
  } else {
    run<float>(function, in, stream);
  }
}

}  // namespace keysel::cuda_kernels
