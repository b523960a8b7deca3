// The backward of attention over a selection on a GPU (see sparse_attention_backward_cuda in
// keysel/attention/cuda_sparse_attention.h; SPEC §9), and of sparse MLA through the same kernels (SPEC §9.2,
// cuda_sparse_mla_backward.cu). Portable (sm_80+), fp32 accumulation, deterministic.
//
// One warp per work item; each lane holds channels lane, lane + 32, ... (8 per lane up to 256 channels, 18 for
// the 576-channel latent of sparse MLA), and dot products are butterfly shuffle reductions (a fixed order, so
// results do not depend on scheduling). With P' = exp(scale q.k - lse), c the optional output factor (1 without
// it) and dLse the optional lse gradient (0 without it): P = c P', dS = P (dP - Delta) + P' dLse.
//   1. query kernel, one warp per query row: Delta = rowsum(dO * O), stored as c Delta - dLse, then over its
//      selection row P, dP = dO.v, dS, dQ += scale dS k; the warp of a unit's first head (a unit: a query token
//      and the heads that share a key head and a selection row) also writes one 64-bit sort key per selection
//      entry, (key head * N + key) * units + unit (all ones for a skipped entry);
//   2. a radix sort of those keys (CUB): each (key head, key) then lists the units that select it, ascending;
//   3. a bounds kernel marks where each (key head, key) list starts and ends;
//   4. key kernel, one warp per (key head, key): recomputes P, dP, dS for each unit of its list in order (heads
//      ascending) and sums dK += scale dS q, dV += P dO; a key no unit selects gets zeros. When V is the first Dv
//      channels of K (one latent per key), dK + dV is written into K's gradient.
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
constexpr std::uint64_t kSkipped = ~std::uint64_t{0};

template <typename T>
struct BackwardParams {
  const T* q;
  const T* k;
  const T* v;
  const void* out;
  const void* grad_out;
  bool out_bf16, grad_out_bf16;
  const float* lse;
  const std::int32_t* selection;
  float* grad_q;
  float* grad_k;
  float* grad_v;
  const float* grad_lse;     // [T, Hq] or null
  const float* out_factor;   // [T, Hq] or null
  float* delta_out;          // [T, Hq] or null
  bool values_in_keys;
  float* delta;              // [T, Hq] scratch: c Delta - dLse (Delta without the extra terms)
  std::uint64_t* sort_keys;  // [units, W] scratch
  const std::uint64_t* sorted;
  long long* list_begin;  // [Hkv * N]
  long long* list_end;    // [Hkv * N]
  long long tokens, keys, units, entries, rows;
  int query_heads, kv_heads, head_dim, value_dim, groups, width;
  int units_per_token, heads_per_unit, group_size;
  int granularity;  // 0 per_head, 1 per_kv_head, 2 per_token
  float scale;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <int kPerLane, typename T>
__device__ __forceinline__ void load_channels(const T* row, int dim, int lane, float (&r)[kPerLane]) {
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    r[i] = d < dim ? to_float(row[d]) : 0.0f;
  }
}

/// Row `row` of out or grad_out [rows, dim]: of q's type T, or (kGeneral) bf16 or fp32 as `bf16` says (a
/// warp-uniform choice).
template <int kPerLane, bool kGeneral, typename T>
__device__ __forceinline__ void load_row(const void* base, bool bf16, long long row, int dim, int lane,
                                         float (&r)[kPerLane]) {
  if constexpr (!kGeneral) {
    load_channels<kPerLane>(static_cast<const T*>(base) + row * dim, dim, lane, r);
  } else if (bf16) {
    load_channels<kPerLane>(static_cast<const __nv_bfloat16*>(base) + row * dim, dim, lane, r);
  } else {
    load_channels<kPerLane>(static_cast<const float*>(base) + row * dim, dim, lane, r);
  }
}

template <int kPerLane>
__device__ __forceinline__ float warp_dot(const float (&a)[kPerLane], const float (&b)[kPerLane]) {
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) sum = fmaf(a[i], b[i], sum);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  return sum;
}

/// The key and value rows of key s, key head kv: V read from v, or (kGeneral and values_in_keys) the first Dv
/// channels of K.
template <int kPerLane, bool kGeneral, typename T>
__device__ __forceinline__ void load_key(const BackwardParams<T>& p, long long s, int kv, int lane,
                                         float (&kr)[kPerLane], float (&vr)[kPerLane]) {
  load_channels<kPerLane>(p.k + (s * p.kv_heads + kv) * p.head_dim, p.head_dim, lane, kr);
  if (kGeneral && p.values_in_keys) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) vr[i] = lane + 32 * i < p.value_dim ? kr[i] : 0.0f;
  } else {
    load_channels<kPerLane>(p.v + (s * p.kv_heads + kv) * p.value_dim, p.value_dim, lane, vr);
  }
}

/// The unit (a query token and the heads that share a key head and a selection row) of head h of token t.
struct Unit {
  long long index;
  int first_head, kv, group;
};

template <typename T>
__device__ __forceinline__ Unit unit_of_head(const BackwardParams<T>& p, long long t, int h) {
  Unit u;
  const int local = p.granularity == 0 ? h : h / p.group_size;
  u.index = t * p.units_per_token + local;
  u.first_head = p.granularity == 0 ? h : local * p.group_size;
  u.kv = h / p.group_size;
  u.group = p.granularity == 2 ? 0 : local;
  return u;
}

/// P (the output's weight c P') and dS of a query row against the key whose channels are kr, vr; `shifted` is
/// the row's c Delta - dLse, so dS = P' (c dP - shifted) = P (dP - Delta) + P' dLse. With c = 1 and dLse = 0 this
/// is P (dP - Delta), bit for bit.
template <int kPerLane, typename T>
__device__ __forceinline__ void probability(const BackwardParams<T>& p, const float (&q)[kPerLane],
                                            const float (&go)[kPerLane], const float (&kr)[kPerLane],
                                            const float (&vr)[kPerLane], float lse, float factor, float shifted,
                                            float& prob, float& ds) {
  const float logit = warp_dot<kPerLane>(q, kr) * p.scale;
  const float keys = isinf(lse) ? 0.0f : __expf(logit - lse);
  prob = factor * keys;
  ds = keys * (factor * warp_dot<kPerLane>(go, vr) - shifted);
}

/// The output factor c of row r: 1 unless kGeneral and out_factor is given.
template <bool kGeneral, typename T>
__device__ __forceinline__ float factor_of(const BackwardParams<T>& p, long long r) {
  if constexpr (kGeneral) {
    if (p.out_factor != nullptr) return p.out_factor[r];
  }
  return 1.0f;
}

/// One warp per query row r = t * Hq + h: Delta, then over its unit's selection row dQ; the warp of a unit's
/// first head also writes the unit's sort keys. kGeneral: the extras of sparse MLA (out_factor, values_in_keys,
/// out and grad_out of their own dtypes); without it, plain attention's code (grad_lse is taken either way).
template <typename T, int kPerLane, bool kGeneral>
__global__ void __launch_bounds__(kThreads) backward_query_kernel(BackwardParams<T> p) {
  const long long r = static_cast<long long>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= p.rows) return;
  const long long t = r / p.query_heads;
  const int h = static_cast<int>(r % p.query_heads);
  const Unit u = unit_of_head(p, t, h);
  const std::int32_t* row = p.selection + (t * p.groups + u.group) * p.width;
  float q[kPerLane], go[kPerLane], dq[kPerLane];
  load_channels<kPerLane>(p.q + r * p.head_dim, p.head_dim, lane, q);
  load_row<kPerLane, kGeneral, T>(p.grad_out, p.grad_out_bf16, r, p.value_dim, lane, go);
  float delta;
  {
    float o[kPerLane];
    load_row<kPerLane, kGeneral, T>(p.out, p.out_bf16, r, p.value_dim, lane, o);
    delta = warp_dot<kPerLane>(go, o);
  }
  const float factor = factor_of<kGeneral>(p, r);
  const float shifted = factor * delta - (p.grad_lse != nullptr ? p.grad_lse[r] : 0.0f);
  if (lane == 0) {
    p.delta[r] = shifted;
    if (p.delta_out != nullptr) p.delta_out[r] = delta;
  }
  const float lse = p.lse[r];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) dq[i] = 0.0f;
  for (int i = 0; i < p.width; ++i) {
    const std::int32_t s = row[i];
    if (s < 0 || s >= p.keys) continue;
    float kr[kPerLane], vr[kPerLane];
    load_key<kPerLane, kGeneral>(p, s, u.kv, lane, kr, vr);
    float prob, ds;
    probability<kPerLane>(p, q, go, kr, vr, lse, factor, shifted, prob, ds);
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) dq[c] = fmaf(p.scale * ds, kr[c], dq[c]);
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < p.head_dim) p.grad_q[r * p.head_dim + d] = dq[i];
  }
  if (h != u.first_head) return;
  for (int i = lane; i < p.width; i += 32) {
    const std::int32_t s = row[i];
    const bool valid = s >= 0 && s < p.keys;
    p.sort_keys[u.index * p.width + i] =
        valid ? (static_cast<std::uint64_t>(u.kv) * static_cast<std::uint64_t>(p.keys) +
                 static_cast<std::uint64_t>(s)) *
                        static_cast<std::uint64_t>(p.units) +
                    static_cast<std::uint64_t>(u.index)
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

/// One warp per (key head, key): dK and dV summed over the units that select it, in ascending order.
template <typename T, int kPerLane, bool kGeneral>
__global__ void __launch_bounds__(kThreads) backward_key_kernel(BackwardParams<T> p) {
  const long long list = static_cast<long long>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (list >= p.kv_heads * p.keys) return;
  const int kv = static_cast<int>(list / p.keys);
  const long long s = list % p.keys;
  float kr[kPerLane], vr[kPerLane], dk[kPerLane], dv[kPerLane];
  load_key<kPerLane, kGeneral>(p, s, kv, lane, kr, vr);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) dk[i] = dv[i] = 0.0f;
  const long long end = p.list_end[list];
  for (long long e = p.list_begin[list]; e < end; ++e) {
    const long long unit = static_cast<long long>(p.sorted[e] % static_cast<std::uint64_t>(p.units));
    const long long t = unit / p.units_per_token;
    const int local = static_cast<int>(unit % p.units_per_token);
    const int first_head = p.granularity == 0 ? local : local * p.group_size;
    for (int j = 0; j < p.heads_per_unit; ++j) {
      const long long r = t * p.query_heads + first_head + j;
      float q[kPerLane], go[kPerLane];
      load_channels<kPerLane>(p.q + r * p.head_dim, p.head_dim, lane, q);
      load_row<kPerLane, kGeneral, T>(p.grad_out, p.grad_out_bf16, r, p.value_dim, lane, go);
      const float factor = factor_of<kGeneral>(p, r);
      float prob, ds;
      probability<kPerLane>(p, q, go, kr, vr, p.lse[r], factor, p.delta[r], prob, ds);
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
    if (kGeneral && p.values_in_keys) {  // one latent: dK + dV on the value channels
      if (d < p.head_dim) p.grad_k[(s * p.kv_heads + kv) * p.head_dim + d] = d < p.value_dim ? dk[i] + dv[i] : dk[i];
      continue;
    }
    if (d < p.head_dim) p.grad_k[(s * p.kv_heads + kv) * p.head_dim + d] = dk[i];
    if (d < p.value_dim) p.grad_v[(s * p.kv_heads + kv) * p.value_dim + d] = dv[i];
  }
}

std::size_t aligned(std::size_t bytes) { return (bytes + 255) / 256 * 256; }

template <typename T, int kPerLane, bool kGeneral>
void run(std::string_view function, const SparseBackwardLaunch& in, void* stream) {
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  BackwardParams<T> p{};
  p.q = static_cast<const T*>(in.q);
  p.k = static_cast<const T*>(in.k);
  p.v = static_cast<const T*>(in.v);
  p.out = in.out;
  p.grad_out = in.grad_out;
  p.out_bf16 = in.out_bf16;
  p.grad_out_bf16 = in.grad_out_bf16;
  p.lse = in.lse;
  p.selection = in.selection;
  p.grad_q = in.grad_q;
  p.grad_k = in.grad_k;
  p.grad_v = in.grad_v;
  p.grad_lse = in.grad_lse;
  p.out_factor = in.out_factor;
  p.delta_out = in.delta_out;
  p.values_in_keys = in.values_in_keys;
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
  p.rows = in.tokens * in.query_heads;
  p.entries = p.units * in.width;
  p.scale = in.scale;
  const long long lists = static_cast<long long>(in.kv_heads) * in.keys;

  // Scratch: Delta, the sort keys twice, the list bounds, CUB's temporary storage.
  std::size_t sort_bytes = 0;
  cuda_glue::check(cub::DeviceRadixSort::SortKeys(nullptr, sort_bytes, static_cast<const std::uint64_t*>(nullptr),
                                                  static_cast<std::uint64_t*>(nullptr), p.entries, 0, 64, cuda_stream),
                   function, "cub::DeviceRadixSort::SortKeys (size)");
  const std::size_t delta_bytes = aligned(static_cast<std::size_t>(p.rows) * sizeof(float));
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
  if (bounds_bytes > 0) {
    cuda_glue::check(cudaMemsetAsync(p.list_begin, 0, 2 * bounds_bytes, cuda_stream), function, "cudaMemsetAsync");
  }

  if (p.rows > 0) {
    backward_query_kernel<T, kPerLane, kGeneral>
        <<<static_cast<unsigned>((p.rows + kWarps - 1) / kWarps), kThreads, 0, cuda_stream>>>(p);
    cuda_glue::check(cudaGetLastError(), function, "backward_query_kernel launch");
  }
  if (p.entries > 0) {
    cuda_glue::check(
        cub::DeviceRadixSort::SortKeys(sort_storage, sort_bytes, p.sort_keys, sorted, p.entries, 0, 64, cuda_stream),
        function, "cub::DeviceRadixSort::SortKeys");
    backward_bounds_kernel<T><<<static_cast<unsigned>((p.entries + 255) / 256), 256, 0, cuda_stream>>>(p);
    cuda_glue::check(cudaGetLastError(), function, "backward_bounds_kernel launch");
  }
  if (lists > 0) {
    backward_key_kernel<T, kPerLane, kGeneral>
        <<<static_cast<unsigned>((lists + kWarps - 1) / kWarps), kThreads, 0, cuda_stream>>>(p);
    cuda_glue::check(cudaGetLastError(), function, "backward_key_kernel launch");
  }
  scratch.release();
}

template <int kPerLane, bool kGeneral>
void run_with(std::string_view function, const SparseBackwardLaunch& in, void* stream) {
  if (in.bf16) {
    run<__nv_bfloat16, kPerLane, kGeneral>(function, in, stream);
  } else {
    run<float, kPerLane, kGeneral>(function, in, stream);
  }
}

}  // namespace

void launch_sparse_attention_backward(std::string_view function, const SparseBackwardLaunch& in, void* stream) {
  // Plain attention (D, Dv <= 256, out and grad_out of q's dtype, no output factor, separate V): 8 channels per
  // lane and none of the extras, so its kernels keep their registers; anything else (sparse MLA's 576-channel
  // latent) the general kernels with 18 channels per lane.
  const bool plain = in.head_dim <= 256 && in.value_dim <= 256 && in.out_factor == nullptr && !in.values_in_keys &&
                     in.out_bf16 == in.bf16 && in.grad_out_bf16 == in.bf16;
  if (plain) {
    run_with<8, false>(function, in, stream);
  } else {
    run_with<18, true>(function, in, stream);
  }
}

}  // namespace keysel::cuda_kernels
