// GPU benchmarks of keysel's CUDA kernels, timed with CUDA events, with the device-to-device copy bandwidth
// measured in the same run (the PyTorch peers run beside this from torch_peers.py; bench/gpu/run.sh runs both).
//
//   bench_gpu [--quick]     prints one line per case: name, median microseconds, bytes, achieved GB/s
//   bench_gpu --profile     runs each kernel a few times only (for Nsight Compute)
//
// Three timings per decode case, each labelled:
//   (per call)  CUDA events around back-to-back calls of the public function on the legacy default stream: kernel
//               time plus whatever the host side of each call adds when it is slower than the kernels;
//   (graph)     the calls captured once in a CUDA graph (several calls per graph, inputs rotating where the
//               per-call timing rotates them), the graph replayed back to back on a stream, time per call: the
//               kernel-side time a serving engine that replays captured decode steps sees;
//   host        wall-clock time of the host side of one call (checks and launches, no synchronization), median.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#include "keysel/attention/cuda_memory.h"
#include "keysel/attention/cuda_sparse_attention.h"
#include "keysel/core/device.h"
#include "keysel/indexer/cuda_indexer.h"
#include "keysel/indexer/cuda_topk.h"

namespace {

using namespace keysel;

#define CHECK_CUDA(call)                                                                            \
  do {                                                                                              \
    const cudaError_t status_ = (call);                                                             \
    if (status_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "CUDA error %s in %s at line %d\n", cudaGetErrorString(status_), #call, __LINE__); \
      std::exit(1);                                                                                 \
    }                                                                                               \
  } while (0)

bool g_profile = false;

std::uint64_t g_state = 0x9E3779B97F4A7C15ull;
std::uint64_t next_random() {
  g_state ^= g_state << 13;
  g_state ^= g_state >> 7;
  g_state ^= g_state << 17;
  return g_state;
}

/// Fills `bytes` of device memory with random bytes: a host block uploaded once, then replicated on the device.
void fill_random(void* device, std::size_t bytes, const std::function<void(std::uint8_t*, std::size_t)>& fix = {}) {
  const std::size_t chunk = std::min<std::size_t>(bytes, 64u << 20);
  std::vector<std::uint8_t> host(chunk);
  for (std::size_t i = 0; i + 8 <= chunk; i += 8) {
    const std::uint64_t r = next_random();
    std::memcpy(host.data() + i, &r, 8);
  }
  if (fix) fix(host.data(), chunk);
  CHECK_CUDA(cudaMemcpy(device, host.data(), chunk, cudaMemcpyHostToDevice));
  for (std::size_t offset = chunk; offset < bytes; offset += chunk) {
    CHECK_CUDA(cudaMemcpy(static_cast<std::uint8_t*>(device) + offset, device, std::min(chunk, bytes - offset),
                          cudaMemcpyDeviceToDevice));
  }
}

/// Median over 7 repetitions of the mean time of `iterations` back-to-back calls, in microseconds.
double time_us(const std::function<void(int)>& body, int iterations = 50) {
  if (g_profile) {
    body(0);
    CHECK_CUDA(cudaDeviceSynchronize());
    return 0.0;
  }
  for (int i = 0; i < 5; ++i) body(i);
  CHECK_CUDA(cudaDeviceSynchronize());
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  std::vector<double> samples;
  for (int rep = 0; rep < 7; ++rep) {
    CHECK_CUDA(cudaEventRecord(start));
    for (int i = 0; i < iterations; ++i) body(rep * iterations + i);
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0.0f;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    samples.push_back(1000.0 * ms / iterations);
  }
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  std::sort(samples.begin(), samples.end());
  return samples[samples.size() / 2];
}

/// Time per call of `body` (i, stream) replayed from a CUDA graph: `calls` calls captured in one graph, the graph
/// replayed `replays` times back to back between two events; median of 7.
double graph_us(const std::function<void(int, void*)>& body, int calls, int replays = 20) {
  if (g_profile) return 0.0;
  CudaStream stream;
  for (int i = 0; i < calls; ++i) body(i, stream.handle());  // warm-up, loads every kernel before the capture
  stream.synchronize();
  const CudaGraph graph = CudaGraph::capture(stream, [&] {
    for (int i = 0; i < calls; ++i) body(i, stream.handle());
  });
  for (int i = 0; i < 3; ++i) graph.launch(stream);
  stream.synchronize();
  const cudaStream_t s = static_cast<cudaStream_t>(stream.handle());
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  std::vector<double> samples;
  for (int rep = 0; rep < 7; ++rep) {
    CHECK_CUDA(cudaEventRecord(start, s));
    for (int i = 0; i < replays; ++i) graph.launch(stream);
    CHECK_CUDA(cudaEventRecord(stop, s));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0.0f;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    samples.push_back(1000.0 * ms / (replays * calls));
  }
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  std::sort(samples.begin(), samples.end());
  return samples[samples.size() / 2];
}

/// Host wall-clock microseconds per call of `body` (no synchronization inside the timed calls): median over 15
/// repetitions of 20 calls, each repetition followed by a device synchronization outside the timing.
double host_us(const std::function<void(int)>& body, int calls = 20) {
  if (g_profile) return 0.0;
  for (int i = 0; i < 5; ++i) body(i);
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<double> samples;
  for (int rep = 0; rep < 15; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < calls; ++i) body(rep * calls + i);
    const auto t1 = std::chrono::steady_clock::now();
    CHECK_CUDA(cudaDeviceSynchronize());
    samples.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count() / calls);
  }
  std::sort(samples.begin(), samples.end());
  return samples[samples.size() / 2];
}

void report_host(const std::string& name, double us) {
  if (g_profile) return;
  std::printf("%-58s %10.2f us host per call (no sync)\n", name.c_str(), us);
  std::fflush(stdout);
}

/// Host cost of the CUDA runtime calls a keysel call may make (mean over 2000 calls each).
void bench_runtime_calls() {
  void* buffer = nullptr;
  CHECK_CUDA(cudaMalloc(&buffer, 1 << 20));
  const auto mean_us = [](const std::function<void()>& f) {
    for (int i = 0; i < 100; ++i) f();
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 2000; ++i) f();
    const auto t1 = std::chrono::steady_clock::now();
    return std::chrono::duration<double, std::micro>(t1 - t0).count() / 2000;
  };
  cudaPointerAttributes attributes{};
  int value = 0;
  const double pointer = mean_us([&] { CHECK_CUDA(cudaPointerGetAttributes(&attributes, buffer)); });
  const double get_device = mean_us([&] { CHECK_CUDA(cudaGetDevice(&value)); });
  const double set_device = mean_us([&] { CHECK_CUDA(cudaSetDevice(0)); });
  const double count = mean_us([&] { CHECK_CUDA(cudaGetDeviceCount(&value)); });
  const double attribute =
      mean_us([&] { CHECK_CUDA(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, 0)); });
  const double memset = mean_us([&] { CHECK_CUDA(cudaMemsetAsync(buffer, 0, 4)); });
  CHECK_CUDA(cudaDeviceSynchronize());
  const double alloc = mean_us([&] {
    void* p = nullptr;
    CHECK_CUDA(cudaMallocAsync(&p, 1 << 20, nullptr));
    CHECK_CUDA(cudaFreeAsync(p, nullptr));
  });
  CHECK_CUDA(cudaDeviceSynchronize());
  // cudaMallocAsync right after a synchronization (the default pool returns its memory at each one).
  std::vector<double> after_sync;
  for (int i = 0; i < 50; ++i) {
    void* p = nullptr;
    const auto t0 = std::chrono::steady_clock::now();
    CHECK_CUDA(cudaMallocAsync(&p, 1 << 20, nullptr));
    const auto t1 = std::chrono::steady_clock::now();
    CHECK_CUDA(cudaFreeAsync(p, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    after_sync.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
  }
  std::sort(after_sync.begin(), after_sync.end());
  std::printf("# host cost of runtime calls (us): cudaPointerGetAttributes %.3f, cudaGetDevice %.3f, "
              "cudaSetDevice(same) %.3f, cudaGetDeviceCount %.3f, cudaDeviceGetAttribute %.3f, "
              "cudaMemsetAsync %.3f, cudaMallocAsync+cudaFreeAsync %.3f, cudaMallocAsync after a sync (median) %.3f\n",
              pointer, get_device, set_device, count, attribute, memset, alloc, after_sync[after_sync.size() / 2]);
  std::fflush(stdout);
  CHECK_CUDA(cudaFree(buffer));
}

void report(const std::string& name, double us, double bytes) {
  if (g_profile) return;
  std::printf("%-58s %10.2f us %12.0f bytes %9.1f GB/s\n", name.c_str(), us, bytes, bytes / (us * 1e3));
  std::fflush(stdout);
}

double copy_bandwidth() {
  const std::size_t bytes = 1ull << 30;
  void *a = nullptr, *b = nullptr;
  CHECK_CUDA(cudaMalloc(&a, bytes));
  CHECK_CUDA(cudaMalloc(&b, bytes));
  fill_random(a, bytes);
  const double us = time_us([&](int) { CHECK_CUDA(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); }, 10);
  report("hbm_copy 1 GiB (read + write)", us, 2.0 * bytes);
  CHECK_CUDA(cudaFree(a));
  CHECK_CUDA(cudaFree(b));
  return 2.0 * bytes / (us * 1e3);
}

void bench_indexer(std::int64_t batch, std::int64_t n, std::int64_t heads, std::int64_t dim) {
  const std::int64_t blocks_per_sequence = (n + 63) / 64;
  const std::int64_t cache_bytes_one = batch * blocks_per_sequence * 64 * (dim + 4);
  // Rotate over enough copies of the cache that the set exceeds L2 (50 MB on an H100).
  const int copies = static_cast<int>(std::max<std::int64_t>(1, (256ll << 20) / cache_bytes_one));
  CudaBuffer cache(cache_bytes_one * copies);
  // The engines' pages: 64 x DI fp8 values, then 64 fp32 scales.
  const std::size_t page_bytes = static_cast<std::size_t>(64 * (dim + 4));
  fill_random(cache.data(), static_cast<std::size_t>(cache.bytes()), [&](std::uint8_t* p, std::size_t size) {
    for (std::size_t page = 0; page + page_bytes <= size; page += page_bytes) {
      for (std::int64_t i = 0; i < 64 * dim; ++i) p[page + i] &= 0xBF;  // finite fp8 codes of magnitude <= 2^1
      const float scale = 0.01f;
      for (std::int64_t t = 0; t < 64; ++t) std::memcpy(p + page + 64 * dim + 4 * t, &scale, 4);
    }
  });
  CudaBuffer q(batch * heads * dim), weights(batch * heads * 4), positions(batch * 4), logits(batch * n * 4);
  fill_random(q.data(), static_cast<std::size_t>(q.bytes()), [](std::uint8_t* p, std::size_t s) {
    for (std::size_t i = 0; i < s; ++i) p[i] &= 0xBF;
  });
  std::vector<float> w(static_cast<std::size_t>(batch * heads), 0.05f);
  weights.copy_from_host(w.data());
  std::vector<std::int32_t> pos(static_cast<std::size_t>(batch), static_cast<std::int32_t>(n - 1));
  positions.copy_from_host(pos.data());
  const TensorView qv(q.data(), DType::fp8_e4m3, {batch, heads, dim}, Device::cuda());
  const TensorView wv(weights.data(), DType::fp32, {batch, heads}, Device::cuda());
  const TensorView pv(positions.data(), DType::int32, {batch}, Device::cuda());
  const TensorView lv(logits.data(), DType::fp32, {batch, n}, Device::cuda());
  auto cache_view = [&](int i) {
    CudaIndexerKeyCache c;
    c.blocks = TensorView(static_cast<std::uint8_t*>(cache.data()) + (i % copies) * cache_bytes_one, DType::fp8_e4m3,
                          {batch * blocks_per_sequence, 64 * (dim + 4)}, Device::cuda());
    return c;
  };
  const auto logits_call = [&](int i, void* stream) {
    lightning_indexer_logits_cuda(qv, wv, cache_view(i), pv, lv, {}, stream);
  };
  const double us = time_us([&](int i) { logits_call(i, nullptr); });
  const std::string shape = "B=" + std::to_string(batch) + " N=" + std::to_string(n) + " HI=" +
                            std::to_string(heads) + " DI=" + std::to_string(dim);
  const double key_bytes = static_cast<double>(batch * n * (dim + 4));
  // A graph of `calls` calls rotating over the cache copies (at least 4 calls).
  const int calls = std::max(copies, 4);
  report("indexer_logits_fp8 " + shape + " (key bytes, N*(DI+4)) (per call)", us, key_bytes);
  if (!g_profile) {
    report("indexer_logits_fp8 " + shape + " (key bytes, N*(DI+4)) (graph)", graph_us(logits_call, calls), key_bytes);
    report_host("indexer_logits_fp8 " + shape, host_us([&](int i) { logits_call(i, nullptr); }));
  }
  if (!g_profile && (batch == 1 || batch == 64)) {
    SelectionPolicy policy;
    policy.k = 2048;
    CudaBuffer selection(batch * policy.k * 4);
    const TensorView sv(selection.data(), DType::int32, {batch, 1, policy.k}, Device::cuda());
    const auto fused_call = [&](int i, void* stream) {
      lightning_indexer_topk_cuda(qv, wv, cache_view(i), pv, n, policy, sv, {}, stream);
    };
    const double fused = time_us([&](int i) { fused_call(i, nullptr); });
    report("indexer_logits+topk2048 " + shape + " (key bytes, N*(DI+4)) (per call)", fused, key_bytes);
    report("indexer_logits+topk2048 " + shape + " (key bytes, N*(DI+4)) (graph)", graph_us(fused_call, calls),
           key_bytes);
    report_host("indexer_logits+topk2048 " + shape, host_us([&](int i) { fused_call(i, nullptr); }));
  }
}

/// Prefill: R query tokens (the last R positions of one sequence of N keys, causal), compute-bound; reports the
/// MMA work, sum over rows of (pos + 1) * HI * DI * 2 flops, as TFLOP/s.
void bench_indexer_prefill(std::int64_t rows, std::int64_t n, std::int64_t heads, std::int64_t dim) {
  const std::int64_t blocks = (n + 63) / 64;
  CudaBuffer cache(blocks * 64 * (dim + 4));
  fill_random(cache.data(), static_cast<std::size_t>(cache.bytes()), [&](std::uint8_t* p, std::size_t size) {
    for (std::size_t t = 0; t + (dim + 4) <= size; t += static_cast<std::size_t>(dim + 4)) {
      for (std::int64_t d = 0; d < dim; ++d) p[t + d] &= 0xBF;
      const float scale = 0.01f;
      std::memcpy(p + t + dim, &scale, 4);
    }
  });
  CudaBuffer q(rows * heads * dim), weights(rows * heads * 4), positions(rows * 4), sequence(rows * 4),
      logits(rows * n * 4);
  fill_random(q.data(), static_cast<std::size_t>(q.bytes()), [](std::uint8_t* p, std::size_t s) {
    for (std::size_t i = 0; i < s; ++i) p[i] &= 0xBF;
  });
  std::vector<float> w(static_cast<std::size_t>(rows * heads), 0.05f);
  weights.copy_from_host(w.data());
  std::vector<std::int32_t> pos(static_cast<std::size_t>(rows)), seq(static_cast<std::size_t>(rows), 0);
  double flops = 0.0;
  for (std::int64_t r = 0; r < rows; ++r) {
    pos[static_cast<std::size_t>(r)] = static_cast<std::int32_t>(n - rows + r);
    flops += static_cast<double>(n - rows + r + 1) * static_cast<double>(heads * dim * 2);
  }
  positions.copy_from_host(pos.data());
  sequence.copy_from_host(seq.data());
  CudaIndexerKeyCache c;
  c.blocks = TensorView(cache.data(), DType::fp8_e4m3, {blocks, 64, dim + 4}, Device::cuda());
  const TensorView qv(q.data(), DType::fp8_e4m3, {rows, heads, dim}, Device::cuda());
  const TensorView wv(weights.data(), DType::fp32, {rows, heads}, Device::cuda());
  const TensorView pv(positions.data(), DType::int32, {rows}, Device::cuda());
  const TensorView sv(sequence.data(), DType::int32, {rows}, Device::cuda());
  const TensorView lv(logits.data(), DType::fp32, {rows, n}, Device::cuda());
  const double us = time_us([&](int) { lightning_indexer_logits_cuda(qv, wv, c, pv, lv, sv); }, 10);
  if (g_profile) return;
  std::printf("%-58s %10.2f us %12.3g flops %9.1f TFLOP/s\n",
              ("indexer_prefill_fp8 R=" + std::to_string(rows) + " N=" + std::to_string(n) + " HI=" +
               std::to_string(heads) + " DI=" + std::to_string(dim) + " (causal MMA flops)")
                  .c_str(),
              us, flops, flops / (us * 1e6));
  std::fflush(stdout);
}

void bench_topk(std::int64_t batch, std::int64_t n, std::int64_t k, bool graphs = true) {
  CudaBuffer scores(batch * n * 4), positions(batch * 4), selection(batch * k * 4);
  fill_random(scores.data(), static_cast<std::size_t>(scores.bytes()), [](std::uint8_t* p, std::size_t s) {
    // Scores like an indexer's: positive floats of a few magnitudes.
    for (std::size_t i = 0; i + 4 <= s; i += 4) {
      std::uint32_t bits;
      std::memcpy(&bits, p + i, 4);
      const float value = static_cast<float>(bits >> 8) * (1.0f / 16777216.0f) * 10.0f;
      std::memcpy(p + i, &value, 4);
    }
  });
  std::vector<std::int32_t> pos(static_cast<std::size_t>(batch));
  for (std::int64_t b = 0; b < batch; ++b) pos[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(n - 1 - (b * 977) % (n / 4 + 1));
  if (batch == 1) pos[0] = static_cast<std::int32_t>(n - 1);
  positions.copy_from_host(pos.data());
  SelectionPolicy policy;
  policy.k = k;
  const TensorView sc(scores.data(), DType::fp32, {batch, 1, n}, Device::cuda());
  const TensorView pv(positions.data(), DType::int32, {batch}, Device::cuda());
  const TensorView sv(selection.data(), DType::int32, {batch, 1, k}, Device::cuda());
  const auto call = [&](int, void* stream) { select_topk_cuda(sc, pv, policy, sv, stream); };
  const std::string name = "topk k=" + std::to_string(k) + " B=" + std::to_string(batch) + " N=" +
                           std::to_string(n) + (batch > 1 ? " (lengths N..3N/4)" : "") + " (score bytes)";
  const double us = time_us([&](int i) { call(i, nullptr); });
  report(name + " (per call)", us, static_cast<double>(batch * n * 4));
  if (graphs && !g_profile) {
    report(name + " (graph)", graph_us(call, 10), static_cast<double>(batch * n * 4));
    report_host(name, host_us([&](int i) { call(i, nullptr); }));
  }
}

void bench_sparse_attention(std::int64_t batch, std::int64_t query_heads, std::int64_t kv_heads, std::int64_t dim,
                            std::int64_t k, std::int64_t n, bool bf16_out) {
  const std::int64_t block_size = 64;
  const std::int64_t blocks_per_sequence = n / block_size;
  const std::int64_t num_blocks = batch * blocks_per_sequence;
  const std::int64_t cache_bytes = num_blocks * block_size * kv_heads * dim * 2;
  CudaBuffer kc(cache_bytes), vc(cache_bytes);
  const auto finite_bf16 = [](std::uint8_t* p, std::size_t s) {
    for (std::size_t i = 1; i < s; i += 2) p[i] = static_cast<std::uint8_t>((p[i] & 0x80) | 0x3F);  // |x| in [0.5, 2)
  };
  fill_random(kc.data(), static_cast<std::size_t>(cache_bytes), finite_bf16);
  fill_random(vc.data(), static_cast<std::size_t>(cache_bytes), finite_bf16);
  CudaBuffer q(batch * query_heads * dim * 2);
  fill_random(q.data(), static_cast<std::size_t>(q.bytes()), finite_bf16);
  std::vector<std::int32_t> table(static_cast<std::size_t>(num_blocks));
  std::iota(table.begin(), table.end(), 0);
  for (std::size_t i = table.size(); i > 1; --i) std::swap(table[i - 1], table[next_random() % i]);
  CudaBuffer d_table(num_blocks * 4);
  d_table.copy_from_host(table.data());
  // Selections: k distinct random positions per (sequence, key head), ascending.
  std::vector<std::int32_t> selection(static_cast<std::size_t>(batch * kv_heads * k));
  std::vector<std::int32_t> all(static_cast<std::size_t>(n));
  std::iota(all.begin(), all.end(), 0);
  for (std::int64_t r = 0; r < batch * kv_heads; ++r) {
    for (std::int64_t i = 0; i < k; ++i) std::swap(all[static_cast<std::size_t>(i)], all[static_cast<std::size_t>(i + static_cast<std::int64_t>(next_random() % static_cast<std::uint64_t>(n - i)))]);
    std::copy_n(all.begin(), k, selection.begin() + r * k);
    std::sort(selection.begin() + r * k, selection.begin() + (r + 1) * k);
  }
  CudaBuffer d_selection(static_cast<std::int64_t>(selection.size()) * 4);
  d_selection.copy_from_host(selection.data());
  CudaBuffer out(batch * query_heads * dim * 4), lse(batch * query_heads * 4);
  CudaKvCache cache;
  cache.k = TensorView(kc.data(), DType::bf16, {num_blocks, block_size, kv_heads, dim}, Device::cuda());
  cache.v = TensorView(vc.data(), DType::bf16, {num_blocks, block_size, kv_heads, dim}, Device::cuda());
  cache.block_table = TensorView(d_table.data(), DType::int32, {batch, blocks_per_sequence}, Device::cuda());
  const TensorView qv(q.data(), DType::bf16, {batch, query_heads, dim}, Device::cuda());
  const TensorView sv(d_selection.data(), DType::int32, {batch, kv_heads, k}, Device::cuda());
  const TensorView ov(out.data(), bf16_out ? DType::bf16 : DType::fp32, {batch, query_heads, dim}, Device::cuda());
  const TensorView lv(lse.data(), DType::fp32, {batch, query_heads}, Device::cuda());
  const auto call = [&](int, void* stream) {
    sparse_attention_decode_cuda(qv, cache, sv, Granularity::per_kv_head, 0.0, ov, lv, stream);
  };
  const std::string name = "sparse_attention_decode B=" + std::to_string(batch) + " Hq=" +
                           std::to_string(query_heads) + " Hkv=" + std::to_string(kv_heads) + " D=" +
                           std::to_string(dim) + " k=" + std::to_string(k) +
                           (bf16_out ? " paged bf16 out (K+V bytes)" : " paged fp32 out (K+V bytes)");
  const double bytes = static_cast<double>(batch * kv_heads * k * 2 * dim * 2);
  const double us = time_us([&](int i) { call(i, nullptr); }, 20);
  report(name + " (per call)", us, bytes);
  if (!g_profile && !bf16_out) {
    report(name + " (graph)", graph_us(call, 4), bytes);
    report_host(name, host_us([&](int i) { call(i, nullptr); }));
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--profile") == 0) g_profile = true;
    if (std::strcmp(argv[i], "--quick") == 0) quick = true;
  }
  if (cuda_device_count() == 0) {
    std::printf("no CUDA device: %s\n", cuda_device_description(0).c_str());
    return 0;
  }
  std::printf("# %s\n", cuda_device_description(0).c_str());
  if (!g_profile) {
    copy_bandwidth();
    bench_runtime_calls();
  }
  bench_indexer(1, 131072, 64, 128);
  if (!quick && !g_profile) bench_indexer(64, 131072, 64, 128);
  bench_indexer_prefill(1024, 8192, 64, 128);
  bench_topk(1, 131072, 2048);
  if (!g_profile) {  // the goal case again: its spread within the run
    bench_topk(1, 131072, 2048, false);
    bench_topk(1, 131072, 2048, false);
  }
  bench_topk(64, 131072, 2048);
  if (!quick && !g_profile) {
    bench_topk(1, 1 << 20, 2048, false);
    bench_topk(1, 131072, 8192, false);
  }
  bench_sparse_attention(64, 32, 8, 128, 2048, 16384, false);
  if (!quick && !g_profile) bench_sparse_attention(64, 32, 8, 128, 2048, 16384, true);
  return 0;
}
