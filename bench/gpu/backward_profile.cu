// Times the CUDA sparse attention backward's kernels on one causal prefill with scattered selections, for Nsight
// Systems / Nsight Compute (bench/gpu/backward_profile.sh builds it with nvcc alone, without CMake or any
// package, so a bare GPU machine can run it in seconds).
//
//   backward_profile T HQ HKV D K [REPEATS [SHARED]]
//                               SHARED (0 to 1): the share of each row's keys common to its 16-token block (0: the
//                               scattered selections above); times the library's deterministic kernels and its
//                               tiled ones (cuda_sparse_attention_tiled.cu: unions, forward, backward apart)
//   backward_profile check      the kernels against a double-precision transcription of SPEC §9 on small awkward
//                               shapes, every granularity (exit status 1 on a mismatch)
//
// bf16 q, K, V, O, dO filled with values in [-1, 1); lse = 0 (only the time is measured, not the values);
// per_kv_head selections: row (t, g) lists min(K, t + 1) distinct keys of [0, t], key j = (a j + b) mod (t + 1)
// with a prime a > T (so distinct) and b drawn per row, then -1 padding: scattered over the allowed keys like the
// random selections of bench/gpu/attention_backward_gpu.py. Prints the median time of REPEATS calls (CUDA events).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda_sparse_attention_backward_launch.h"
#include "cuda_sparse_attention_launch.h"
#include "cuda_sparse_attention_tiled_launch.h"

namespace {

namespace kernels = keysel::cuda_kernels;

/// One problem of the driver: bf16 q, K, V, O, dO; fp32 lse and gradients.
struct Problem {
  const __nv_bfloat16 *q, *k, *v, *out, *grad_out;
  const float* lse;
  const std::int32_t* selection;  // [T, groups, width]
  float *grad_q, *grad_k, *grad_v;
  long long tokens, keys;
  int query_heads, kv_heads, head_dim, value_dim, groups, width;
  float scale;
};

kernels::TiledShape tiled_shape(const Problem& p) {
  kernels::TiledShape s;
  s.tokens = p.tokens;
  s.keys = p.keys;
  s.query_heads = p.query_heads;
  s.kv_heads = p.kv_heads;
  s.head_dim = p.head_dim;
  s.value_dim = p.value_dim;
  s.groups = p.groups;
  s.width = p.width;
  return s;
}

int shared_memory_optin() {
  int bytes = 0;
  cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0);
  return bytes;
}

/// Whether the library's tiled kernels (forward and backward) take `p` on GPU 0.
bool tiled_takes(const Problem& p) {
  return !kernels::tiled_refusal(tiled_shape(p), shared_memory_optin(), true) &&
         !kernels::tiled_refusal(tiled_shape(p), shared_memory_optin(), false);
}

kernels::TiledForwardLaunch tiled_forward_launch(const Problem& p, __nv_bfloat16* out, float* lse) {
  kernels::TiledForwardLaunch launch{};
  launch.shape = tiled_shape(p);
  launch.q = p.q;
  launch.k = p.k;
  launch.v = p.v;
  launch.selection = p.selection;
  launch.out = out;
  launch.out_bf16 = true;
  launch.lse = lse;
  launch.scale = p.scale;
  launch.device = 0;
  return launch;
}

kernels::TiledBackwardLaunch tiled_backward_launch(const Problem& p) {
  kernels::TiledBackwardLaunch launch{};
  launch.shape = tiled_shape(p);
  launch.q = p.q;
  launch.k = p.k;
  launch.v = p.v;
  launch.out = p.out;
  launch.grad_out = p.grad_out;
  launch.lse = p.lse;
  launch.grad_lse = nullptr;
  launch.selection = p.selection;
  launch.grad_q = p.grad_q;
  launch.grad_k = p.grad_k;
  launch.grad_v = p.grad_v;
  launch.scale = p.scale;
  launch.device = 0;
  return launch;
}

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

__global__ void fill_selection(std::int32_t* sel, long long tokens, int groups, int width, float shared) {
  const long long row = blockIdx.x;  // t * groups + g
  const long long t = row / groups;
  const long long allowed = t + 1;
  const unsigned long long a = 1000003ULL;  // prime > any T used here: coprime with every modulus below
  const unsigned long long b = (static_cast<unsigned long long>(row) * 0x9E3779B97F4A7C15ULL) >> 20;
  if (shared <= 0.0f) {
    for (int j = threadIdx.x; j < width; j += blockDim.x) {
      sel[row * width + j] =
          j < allowed ? static_cast<std::int32_t>((a * static_cast<unsigned long long>(j) + b) % allowed) : -1;
    }
    return;
  }
  // A share of each row from its 16-token block's common set (even keys <= the block's first token), the rest
  // its own (odd keys <= t): distinct within a row, largely common to neighbouring rows.
  const long long t0 = t / 16 * 16;
  const long long evens = t0 / 2 + 1, odds = (t + 1) / 2;
  const unsigned long long b_block =
      (static_cast<unsigned long long>(t0 * groups + row % groups + 1) * 0xD1B54A32D192ED03ULL) >> 20;
  const long long n_shared = min(static_cast<long long>(shared * width + 0.5f), evens);
  const long long n_own = min(static_cast<long long>(width) - n_shared, odds);
  for (int j = threadIdx.x; j < width; j += blockDim.x) {
    std::int32_t s = -1;
    if (j < n_shared) {
      s = static_cast<std::int32_t>(2 * ((a * j + b_block) % evens));
    } else if (j < n_shared + n_own) {
      s = static_cast<std::int32_t>(2 * ((a * (j - n_shared) + b) % odds) + 1);
    }
    sel[row * width + j] = s;
  }
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

float bf16_round(float x) { return __bfloat162float(__float2bfloat16(x)); }

template <typename X>
X* to_device(const std::vector<X>& host) {
  X* d = nullptr;
  check(cudaMalloc(&d, host.size() * sizeof(X) + 1), "cudaMalloc");
  check(cudaMemcpy(d, host.data(), host.size() * sizeof(X), cudaMemcpyHostToDevice), "cudaMemcpy");
  return d;
}

struct CheckResult {
  double library;  // worst error over the bound 2e-4 (1 + max |ref|)
  double tiled;    // the tiled backward's worst error over 1e-2 max |ref| + 1e-5 (bf16 P and dS); < 0: not taken
  double forward;  // the tiled forward's: out over 1e-2 max |ref| + 1e-3, lse over 1e-4 (1 + |lse|)
};

/// The library's deterministic backward's launch for `p` (bf16, GPU 0).
keysel::cuda_kernels::SparseBackwardLaunch library_launch(const Problem& p, keysel::Granularity granularity) {
  keysel::cuda_kernels::SparseBackwardLaunch launch{};
  launch.q = p.q;
  launch.k = p.k;
  launch.v = p.v;
  launch.out = p.out;
  launch.grad_out = p.grad_out;
  launch.lse = p.lse;
  launch.selection = p.selection;
  launch.grad_q = p.grad_q;
  launch.grad_k = p.grad_k;
  launch.grad_v = p.grad_v;
  launch.tokens = p.tokens;
  launch.keys = p.keys;
  launch.query_heads = p.query_heads;
  launch.kv_heads = p.kv_heads;
  launch.head_dim = p.head_dim;
  launch.value_dim = p.value_dim;
  launch.groups = p.groups;
  launch.width = p.width;
  launch.granularity = granularity;
  launch.bf16 = true;
  launch.out_bf16 = true;
  launch.grad_out_bf16 = true;
  launch.scale = p.scale;
  launch.device = 0;
  return launch;
}

/// One small case: bf16 inputs, O and lse from a double forward (O rounded to bf16 as a forward would store it),
/// the kernels' fp32 gradients against the double backward.
CheckResult check_case(keysel::Granularity granularity, long long tokens, int hq, int hkv, int dim, int vdim, int width,
                  unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  const int groups = granularity == keysel::Granularity::per_head ? hq
                     : granularity == keysel::Granularity::per_kv_head ? hkv : 1;
  const int gsize = hq / hkv;
  const long long keys = tokens;
  std::vector<float> q(tokens * hq * dim), k(keys * hkv * dim), v(keys * hkv * vdim), dout(tokens * hq * vdim);
  for (auto* x : {&q, &k, &v, &dout})
    for (float& e : *x) e = bf16_round(uni(rng));
  for (float& e : q) e = bf16_round(e * 3.0f);  // sharper softmaxes
  // selection: distinct allowed keys (s <= t) in shuffled order, then -1 padding; some rows empty
  std::vector<std::int32_t> sel(tokens * groups * width, -1);
  for (long long t = 0; t < tokens; ++t) {
    for (int g = 0; g < groups; ++g) {
      std::vector<std::int32_t> all(t + 1);
      for (long long s = 0; s <= t; ++s) all[s] = static_cast<std::int32_t>(s);
      std::shuffle(all.begin(), all.end(), rng);
      const int n = (t % 11 == 5) ? 0 : std::min<int>(width - static_cast<int>(t % 3), static_cast<int>(all.size()));
      for (int j = 0; j < n; ++j) sel[(t * groups + g) * width + j] = all[j];
    }
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(dim));
  auto group_of = [&](int h) { return groups == hq ? h : (groups == hkv ? h / gsize : 0); };
  std::vector<float> out(tokens * hq * vdim, 0.0f), lse(tokens * hq);
  std::vector<double> out_ref(out.size(), 0.0), lse_ref(lse.size(), 0.0);
  std::vector<double> dq(q.size(), 0.0), dk(k.size(), 0.0), dv(v.size(), 0.0);
  for (long long t = 0; t < tokens; ++t) {
    for (int h = 0; h < hq; ++h) {
      const int kv = h / gsize;
      const std::int32_t* row = &sel[(t * groups + group_of(h)) * width];
      const float* qr = &q[(t * hq + h) * dim];
      std::vector<double> logit(width, 0.0);
      double mx = -INFINITY;
      for (int j = 0; j < width; ++j) {
        if (row[j] < 0) continue;
        double acc = 0;
        for (int d = 0; d < dim; ++d) acc += static_cast<double>(qr[d]) * k[(row[j] * hkv + kv) * dim + d];
        logit[j] = acc * scale;
        mx = std::max(mx, logit[j]);
      }
      double sum = 0;
      for (int j = 0; j < width; ++j)
        if (row[j] >= 0) sum += std::exp(logit[j] - mx);
      const double l = sum > 0 ? mx + std::log(sum) : -INFINITY;
      lse[t * hq + h] = static_cast<float>(l);
      lse_ref[t * hq + h] = l;
      std::vector<double> o(vdim, 0.0);
      for (int j = 0; j < width; ++j) {
        if (row[j] < 0) continue;
        const double pj = std::exp(logit[j] - l);
        for (int d = 0; d < vdim; ++d) o[d] += pj * v[(row[j] * hkv + kv) * vdim + d];
      }
      for (int d = 0; d < vdim; ++d) {
        out[(t * hq + h) * vdim + d] = bf16_round(static_cast<float>(o[d]));
        out_ref[(t * hq + h) * vdim + d] = o[d];
      }
      // backward from the stored (rounded) O and float lse
      const float* go = &dout[(t * hq + h) * vdim];
      double delta = 0;
      for (int d = 0; d < vdim; ++d) delta += static_cast<double>(go[d]) * out[(t * hq + h) * vdim + d];
      for (int j = 0; j < width; ++j) {
        const std::int32_t s = row[j];
        if (s < 0 || std::isinf(lse[t * hq + h])) continue;
        const double pj = std::exp(logit[j] - static_cast<double>(lse[t * hq + h]));
        double dp = 0;
        for (int d = 0; d < vdim; ++d) dp += static_cast<double>(go[d]) * v[(s * hkv + kv) * vdim + d];
        const double ds = pj * (dp - delta);
        for (int d = 0; d < dim; ++d) {
          dq[(t * hq + h) * dim + d] += scale * ds * k[(s * hkv + kv) * dim + d];
          dk[(s * hkv + kv) * dim + d] += scale * ds * qr[d];
        }
        for (int d = 0; d < vdim; ++d) dv[(s * hkv + kv) * vdim + d] += pj * go[d];
      }
    }
  }
  auto bf16_vec = [](const std::vector<float>& x) {
    std::vector<__nv_bfloat16> y(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) y[i] = __float2bfloat16(x[i]);
    return y;
  };
  auto* dq_dev = to_device(std::vector<float>(dq.size(), NAN));
  auto* dk_dev = to_device(std::vector<float>(dk.size(), NAN));
  auto* dv_dev = to_device(std::vector<float>(dv.size(), NAN));
  const Problem tp{to_device(bf16_vec(q)), to_device(bf16_vec(k)), to_device(bf16_vec(v)),
                                   to_device(bf16_vec(out)), to_device(bf16_vec(dout)), to_device(lse), to_device(sel),
                                   dq_dev, dk_dev, dv_dev, tokens, keys, hq, hkv, dim, vdim, groups, width,
                                   static_cast<float>(scale)};
  const keysel::cuda_kernels::SparseBackwardLaunch launch = library_launch(tp, granularity);
  keysel::cuda_kernels::launch_sparse_attention_backward("backward_profile", launch, nullptr);
  check(cudaDeviceSynchronize(), "backward");
  auto compare = [&](const std::vector<double>& ref, float* dev, double relative, double absolute, double& worst,
                     const char* what) {
    std::vector<float> got(ref.size());
    check(cudaMemcpy(got.data(), dev, got.size() * 4, cudaMemcpyDeviceToHost), "cudaMemcpy");
    double amax = 0;
    for (double r : ref) amax = std::max(amax, std::fabs(r));
    const double bound = relative * amax + absolute;
    std::size_t at = 0;
    double mine = 0;
    for (std::size_t i = 0; i < ref.size(); ++i) {
      const double err = std::isnan(got[i]) ? INFINITY : std::fabs(got[i] - ref[i]) / bound;
      if (err > mine) {
        mine = err;
        at = i;
      }
    }
    if (mine > 1.0)
      std::printf("  %s: worst at element %zu: got %.6g, reference %.6g (max |ref| %.3g)\n", what, at, got[at], ref[at],
                  amax);
    worst = std::max(worst, mine);
  };
  CheckResult result{0.0, -1.0, -1.0};
  compare(dq, dq_dev, 2e-4, 2e-4, result.library, "library dq");
  compare(dk, dk_dev, 2e-4, 2e-4, result.library, "library dk");
  compare(dv, dv_dev, 2e-4, 2e-4, result.library, "library dv");
  if (tiled_takes(tp)) {
    check(cudaMemset(dq_dev, 0xff, dq.size() * 4), "cudaMemset");  // NaN: every element must be written
    check(cudaMemset(dk_dev, 0xff, dk.size() * 4), "cudaMemset");
    check(cudaMemset(dv_dev, 0xff, dv.size() * 4), "cudaMemset");
    kernels::launch_sparse_attention_tiled_backward("backward_profile", tiled_backward_launch(tp), nullptr);
    check(cudaDeviceSynchronize(), "tiled backward");
    result.tiled = 0.0;
    compare(dq, dq_dev, 1e-2, 1e-5, result.tiled, "tiled dq");
    compare(dk, dk_dev, 1e-2, 1e-5, result.tiled, "tiled dk");
    compare(dv, dv_dev, 1e-2, 1e-5, result.tiled, "tiled dv");
    // the tiled forward
    __nv_bfloat16* out_dev = nullptr;
    float* lse_dev = nullptr;
    check(cudaMalloc(&out_dev, out.size() * 2), "cudaMalloc");
    check(cudaMalloc(&lse_dev, lse.size() * 4), "cudaMalloc");
    check(cudaMemset(out_dev, 0xff, out.size() * 2), "cudaMemset");
    kernels::launch_sparse_attention_tiled_forward("backward_profile", tiled_forward_launch(tp, out_dev, lse_dev),
                                                   nullptr);
    check(cudaDeviceSynchronize(), "tiled forward");
    std::vector<__nv_bfloat16> out_got(out.size());
    std::vector<float> lse_got(lse.size());
    check(cudaMemcpy(out_got.data(), out_dev, out.size() * 2, cudaMemcpyDeviceToHost), "cudaMemcpy");
    check(cudaMemcpy(lse_got.data(), lse_dev, lse.size() * 4, cudaMemcpyDeviceToHost), "cudaMemcpy");
    double amax = 0;
    for (double r : out_ref) amax = std::max(amax, std::fabs(r));
    result.forward = 0.0;
    for (std::size_t i = 0; i < out.size(); ++i) {
      const double got = __bfloat162float(out_got[i]);
      const double err = std::isnan(got) ? INFINITY : std::fabs(got - out_ref[i]) / (1e-2 * amax + 1e-3);
      if (err > 1.0 && result.forward <= 1.0)
        std::printf("  tiled out: element %zu: got %.6g, reference %.6g\n", i, got, out_ref[i]);
      result.forward = std::max(result.forward, err);
    }
    for (std::size_t i = 0; i < lse.size(); ++i) {
      const double ref = lse_ref[i], got = lse_got[i];
      const double err = std::isinf(ref) ? (got == ref ? 0.0 : INFINITY) : std::fabs(got - ref) / (1e-4 * (1 + std::fabs(ref)));
      if (err > 1.0 && result.forward <= 1.0) std::printf("  tiled lse: row %zu: got %.8g, reference %.8g\n", i, got, ref);
      result.forward = std::max(result.forward, err);
    }
    check(cudaFree(out_dev), "cudaFree");
    check(cudaFree(lse_dev), "cudaFree");
  }
  return result;
}

int run_checks() {
  int failures = 0;
  const struct {
    keysel::Granularity granularity;
    const char* name;
  } cases[] = {{keysel::Granularity::per_head, "per_head"},
               {keysel::Granularity::per_kv_head, "per_kv_head"},
               {keysel::Granularity::per_token, "per_token"}};
  const struct {
    long long tokens;
    int hq, hkv, dim, vdim, width;
  } shapes[] = {{70, 6, 2, 72, 40, 19},     // 3 heads per key head (library only)
                {70, 10, 2, 72, 40, 19},    // 5: a pass of 4 and one of 1
                {70, 8, 2, 64, 64, 19},     // tiles of 16 tokens, the last one partial
                {45, 16, 1, 128, 64, 70},   // tiles of 4 tokens, more than one chunk of union keys
                {150, 2, 2, 128, 128, 33}};  // one head per key head: tiles of 64 tokens
  for (const auto& c : cases) {
    for (const auto& sh : shapes) {
      const CheckResult r = check_case(c.granularity, sh.tokens, sh.hq, sh.hkv, sh.dim, sh.vdim, sh.width,
                                       7u + static_cast<unsigned>(sh.hq * 31 + sh.dim));
      const bool ok = r.library <= 1.0 && r.tiled <= 1.0 && r.forward <= 1.0;
      failures += ok ? 0 : 1;
      std::printf("check %-11s T=N=%-3lld Hq=%-2d Hkv=%d D=%-3d Dv=%-3d k=%-2d: worst error / bound: library %.3g, "
                  "tiled backward %s%.3g, tiled forward %s%.3g %s\n",
                  c.name, sh.tokens, sh.hq, sh.hkv, sh.dim, sh.vdim, sh.width, r.library, r.tiled < 0 ? "n/a " : "",
                  r.tiled < 0 ? 0.0 : r.tiled, r.forward < 0 ? "n/a " : "", r.forward < 0 ? 0.0 : r.forward,
                  ok ? "ok" : "FAILED");
    }
  }
  return failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "check") return run_checks();
  if (argc < 6) {
    std::fprintf(stderr, "usage: %s T HQ HKV D K [REPEATS]\n", argv[0]);
    return 2;
  }
  const long long tokens = std::atoll(argv[1]);
  const int hq = std::atoi(argv[2]), hkv = std::atoi(argv[3]), dim = std::atoi(argv[4]), width = std::atoi(argv[5]);
  const int repeats = argc > 6 ? std::atoi(argv[6]) : 3;
  const float shared = argc > 7 ? static_cast<float>(std::atof(argv[7])) : 0.0f;
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
  fill_selection<<<static_cast<unsigned>(tokens * hkv), 256>>>(sel, tokens, hkv, width, shared);
  check(cudaDeviceSynchronize(), "fill");

  const Problem tp{q, k, v, o, dout, lse, sel, dq, dk, dv, tokens, tokens, hq, hkv, dim, dim, hkv, width, 1.0f / 16.0f};
  const keysel::cuda_kernels::SparseBackwardLaunch launch = library_launch(tp, keysel::Granularity::per_kv_head);
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "cudaEventCreate");
  check(cudaEventCreate(&stop), "cudaEventCreate");
  auto median_ms = [&](auto&& call) {
    std::vector<float> ms;
    for (int r = 0; r < repeats + 1; ++r) {
      check(cudaEventRecord(start), "cudaEventRecord");
      call();
      check(cudaEventRecord(stop), "cudaEventRecord");
      check(cudaEventSynchronize(stop), "cudaEventSynchronize");
      float t = 0;
      check(cudaEventElapsedTime(&t, start, stop), "cudaEventElapsedTime");
      if (r > 0) ms.push_back(t);  // the first call warms the scratch pool
    }
    std::sort(ms.begin(), ms.end());
    return ms.empty() ? 0.0 : static_cast<double>(ms[ms.size() / 2]);
  };
  const double entries = static_cast<double>(tokens) * hkv * width;
  const double library = median_ms([&] {
    keysel::cuda_kernels::launch_sparse_attention_backward("backward_profile", launch, nullptr);
  });
  std::printf("backward T=%lld Hq=%d Hkv=%d D=Dv=%d k=%d shared=%.2f: library median %.2f ms of %d (%.3g selection "
              "entries)\n", tokens, hq, hkv, dim, width, shared, library, repeats, entries);
  // the library's forward: the decode kernel, one query row per token over one block holding every key
  std::int32_t* block_table = nullptr;
  check(cudaMalloc(&block_table, tokens * 4), "cudaMalloc");
  check(cudaMemset(block_table, 0, tokens * 4), "cudaMemset");
  float* lse_fwd = nullptr;
  check(cudaMalloc(&lse_fwd, tokens * hq * 4), "cudaMalloc");
  keysel::cuda_kernels::SparseDecodeLaunch fwd{};
  fwd.q = q;
  fwd.k = k;
  fwd.v = v;
  fwd.block_table = block_table;
  fwd.selection = sel;
  fwd.out = o;  // overwrites O with the forward's output (the backward timings above are done)
  fwd.lse = lse_fwd;
  fwd.batch = static_cast<int>(tokens);
  fwd.query_heads = hq;
  fwd.kv_heads = hkv;
  fwd.head_dim = dim;
  fwd.groups = hkv;
  fwd.width = width;
  fwd.block_size = static_cast<int>(tokens);
  fwd.max_blocks = 1;
  fwd.num_blocks = 1;
  fwd.granularity = keysel::Granularity::per_kv_head;
  fwd.out_bf16 = true;
  fwd.scale = launch.scale;
  check(cudaDeviceGetAttribute(&fwd.multiprocessors, cudaDevAttrMultiProcessorCount, 0), "cudaDeviceGetAttribute");
  fwd.device = 0;
  const double library_fwd =
      median_ms([&] { keysel::cuda_kernels::launch_sparse_attention_decode("backward_profile", fwd, nullptr); });
  std::printf("  library forward (decode kernel per token) median %.2f ms; forward + backward %.2f ms\n", library_fwd,
              library_fwd + library);
  if (tiled_takes(tp) && std::getenv("KEYSEL_PROFILE_NO_TILED") == nullptr) {
    // The unions built once into memory of the driver's, then the forward and the backward over them; the
    // library's entry points build them per call (in scratch memory of keysel's pool).
    const kernels::TiledShape shape = tiled_shape(tp);
    void* scratch = nullptr;
    check(cudaMalloc(&scratch, kernels::tiled_union_bytes("backward_profile", shape)), "cudaMalloc (tiled scratch)");
    kernels::TiledUnions unions{};
    const double build = median_ms([&] {
      unions = kernels::build_tiled_unions("backward_profile", shape, sel, scratch, nullptr);
    });
    long long union_entries = 0;
    {
      std::vector<long long> ends(static_cast<std::size_t>(kernels::tiled_segments(shape)));
      check(cudaMemcpy(ends.data(), unions.segment_end, ends.size() * 8, cudaMemcpyDeviceToHost), "cudaMemcpy");
      for (long long e : ends) union_entries = std::max(union_entries, e);
    }
    const kernels::TiledForwardLaunch fwd_tiled = tiled_forward_launch(tp, o, lse_fwd);
    const kernels::TiledBackwardLaunch bwd_tiled = tiled_backward_launch(tp);
    const double forward = median_ms(
        [&] { kernels::launch_sparse_attention_tiled_forward("backward_profile", fwd_tiled, nullptr, &unions); });
    const double backward = median_ms(
        [&] { kernels::launch_sparse_attention_tiled_backward("backward_profile", bwd_tiled, nullptr, &unions); });
    std::printf("  tiled kernels: unions %.2f ms (union keys / (T Hkv k / R) = %.2f), forward %.2f ms, backward "
                "%.2f ms; forward + backward with the unions %.2f ms\n",
                build, static_cast<double>(union_entries) / (entries / kernels::tiled_tile_tokens(shape)), forward,
                backward, build + forward + backward);
    check(cudaFree(scratch), "cudaFree");
  }
  return 0;
}
