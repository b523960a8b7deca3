// Times the CUDA sparse attention backward's kernels on one causal prefill with scattered selections, for Nsight
// Systems / Nsight Compute (bench/gpu/backward_profile.sh builds it with nvcc alone, without CMake or any
// package, so a bare GPU machine can run it in seconds).
//
//   backward_profile T HQ HKV D K [REPEATS]
//
// bf16 q, K, V, O, dO filled with values in [-1, 1); lse = 0 (only the time is measured, not the values);
// per_kv_head selections: row (t, g) lists min(K, t + 1) distinct keys of [0, t], key j = (a j + b) mod (t + 1)
// with a prime a > T (so distinct) and b drawn per row, then -1 padding: scattered over the allowed keys like the
// random selections of bench/gpu/attention_backward_gpu.py. Prints the median time of REPEATS calls (CUDA events).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda_sparse_attention_backward_launch.h"

namespace {

__global__ void fill_bf16(__nv_bfloat16* x, long long n, unsigned seed) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    unsigned h = static_cast<unsigned>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    x[i] = __float2bfloat16(static_cast<float>(h & 0xffff) / 32768.0f - 1.0f);
  }
}

__global__ void fill_selection(std::int32_t* sel, long long tokens, int groups, int width) {
  const long long row = blockIdx.x;  // t * groups + g
  const long long t = row / groups;
  const long long allowed = t + 1;
  const unsigned long long a = 1000003ULL;  // prime > any T used here: coprime with every t + 1
  const unsigned long long b = (static_cast<unsigned long long>(row) * 0x9E3779B97F4A7C15ULL) >> 20;
  for (int j = threadIdx.x; j < width; j += blockDim.x) {
    sel[row * width + j] =
        j < allowed ? static_cast<std::int32_t>((a * static_cast<unsigned long long>(j) + b) % allowed) : -1;
  }
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: %s T HQ HKV D K [REPEATS]\n", argv[0]);
    return 2;
  }
  const long long tokens = std::atoll(argv[1]);
  const int hq = std::atoi(argv[2]), hkv = std::atoi(argv[3]), dim = std::atoi(argv[4]), width = std::atoi(argv[5]);
  const int repeats = argc > 6 ? std::atoi(argv[6]) : 3;
  const long long q_elems = tokens * hq * dim, kv_elems = tokens * hkv * dim;
  __nv_bfloat16 *q, *k, *v, *o, *dout;
  float *lse, *dq, *dk, *dv;
  std::int32_t* sel;
  check(cudaMalloc(&q, q_elems * 2), "cudaMalloc");
  check(cudaMalloc(&o, q_elems * 2), "cudaMalloc");
  check(cudaMalloc(&dout, q_elems * 2), "cudaMalloc");
  check(cudaMalloc(&k, kv_elems * 2), "cudaMalloc");
  check(cudaMalloc(&v, kv_elems * 2), "cudaMalloc");
  check(cudaMalloc(&lse, tokens * hq * 4), "cudaMalloc");
  check(cudaMalloc(&dq, q_elems * 4), "cudaMalloc");
  check(cudaMalloc(&dk, kv_elems * 4), "cudaMalloc");
  check(cudaMalloc(&dv, kv_elems * 4), "cudaMalloc");
  check(cudaMalloc(&sel, tokens * hkv * static_cast<long long>(width) * 4), "cudaMalloc");
  fill_bf16<<<1024, 256>>>(q, q_elems, 1u);
  fill_bf16<<<1024, 256>>>(o, q_elems, 2u);
  fill_bf16<<<1024, 256>>>(dout, q_elems, 3u);
  fill_bf16<<<1024, 256>>>(k, kv_elems, 4u);
  fill_bf16<<<1024, 256>>>(v, kv_elems, 5u);
  check(cudaMemset(lse, 0, tokens * hq * 4), "cudaMemset");
  fill_selection<<<static_cast<unsigned>(tokens * hkv), 256>>>(sel, tokens, hkv, width);
  check(cudaDeviceSynchronize(), "fill");

  keysel::cuda_kernels::SparseBackwardLaunch launch{};
  launch.q = q;
  launch.k = k;
  launch.v = v;
  launch.out = o;
  launch.grad_out = dout;
  launch.lse = lse;
  launch.selection = sel;
  launch.grad_q = dq;
  launch.grad_k = dk;
  launch.grad_v = dv;
  launch.tokens = tokens;
  launch.keys = tokens;
  launch.query_heads = hq;
  launch.kv_heads = hkv;
  launch.head_dim = dim;
  launch.value_dim = dim;
  launch.groups = hkv;
  launch.width = width;
  launch.granularity = keysel::Granularity::per_kv_head;
  launch.bf16 = true;
  launch.scale = 1.0f / 16.0f;
  launch.device = 0;
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "cudaEventCreate");
  check(cudaEventCreate(&stop), "cudaEventCreate");
  std::vector<float> ms;
  for (int r = 0; r < repeats + 1; ++r) {
    check(cudaEventRecord(start), "cudaEventRecord");
    keysel::cuda_kernels::launch_sparse_attention_backward("backward_profile", launch, nullptr);
    check(cudaEventRecord(stop), "cudaEventRecord");
    check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float t = 0;
    check(cudaEventElapsedTime(&t, start, stop), "cudaEventElapsedTime");
    if (r > 0) ms.push_back(t);  // the first call warms the scratch pool
  }
  std::sort(ms.begin(), ms.end());
  const double entries = static_cast<double>(tokens) * hkv * width;
  std::printf("backward T=%lld Hq=%d Hkv=%d D=Dv=%d k=%d: median %.2f ms of %d (%.3g selection entries)\n", tokens, hq,
              hkv, dim, width, ms.empty() ? 0.0 : ms[ms.size() / 2], repeats, entries);
  return 0;
}
