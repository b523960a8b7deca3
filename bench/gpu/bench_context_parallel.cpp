// The decode step of context parallelism on R GPUs of one host (docs/context-parallel.md): each rank scores its
// shard with the CUDA Lightning Indexer, select_topk_context_parallel_cuda picks the exact global top-k over NCCL,
// sparse_attention_context_parallel_cuda attends and merges. Timed beside one GPU running the same three steps
// on N / R tokens (the goal: R GPUs at N within 1.3x of one GPU at N / R), and the largest context that fits.
//
//   bench_context_parallel [--ranks R] [--n N|max] [--batch B] [--k K] [--iters I] [--layout contiguous|round_robin]
//                          [--heads Hq] [--kv-heads Hkv] [--head-dim D] [--index-heads HI] [--index-dim DI]
//
// One process, one thread per GPU, communicators from ncclCommInitAll. Each step is timed with CUDA events on
// every rank; the step's time is the median over iterations of the slowest rank. Caches hold random data (a
// 4096-token random block repeated), fp8 indexer keys with scale 1, bf16 K/V.
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "keysel/core/dtype.h"
#include "keysel/indexer/cuda_context_parallel.h"
#include "keysel/indexer/cuda_indexer.h"
#include "keysel/indexer/cuda_topk.h"

namespace {

using namespace keysel;

#define CHECK_CUDA(call)                                                                                      \
  do {                                                                                                        \
    const cudaError_t status_ = (call);                                                                       \
    if (status_ != cudaSuccess) {                                                                             \
      std::fprintf(stderr, "CUDA error %s in %s at line %d\n", cudaGetErrorString(status_), #call, __LINE__); \
      std::exit(1);                                                                                           \
    }                                                                                                         \
  } while (0)

struct Options {
  int ranks = 0;  // 0: every GPU
  std::int64_t n = 1 << 20;
  bool n_max = false;
  std::int64_t batch = 1, k = 2048, heads = 16, kv_heads = 1, head_dim = 128, index_heads = 64, index_dim = 128;
  int iters = 50;
  ContextShards::Layout layout = ContextShards::Layout::contiguous;
};

/// Device bytes per token of one GPU's shard: indexer cache, K and V, the logits, their masked copy and the top-k's
/// 32-bit key per score, per batch row.
std::int64_t bytes_per_token(const Options& o) {
  return o.batch * ((o.index_dim + 4) + 2 * o.kv_heads * o.head_dim * 2 + 12);
}

void* device_alloc(std::int64_t bytes) {
  void* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, static_cast<std::size_t>(std::max<std::int64_t>(bytes, 256))));
  return p;
}

/// `bytes` of device memory: a random host block of `block` bytes (made valid by `fix`), repeated on the device.
template <typename Fix>
void fill(void* device, std::int64_t bytes, std::int64_t block, std::uint64_t seed, Fix&& fix) {
  block = std::min(block, bytes);
  std::vector<std::uint8_t> host(static_cast<std::size_t>(block));
  std::uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& b : host) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    b = static_cast<std::uint8_t>(state >> 24);
  }
  fix(host.data(), block);
  CHECK_CUDA(cudaMemcpy(device, host.data(), static_cast<std::size_t>(block), cudaMemcpyHostToDevice));
  for (std::int64_t done = block; done < bytes;) {  // doubling copies
    const std::int64_t chunk = std::min(done, bytes - done);
    CHECK_CUDA(cudaMemcpy(static_cast<char*>(device) + done, device, static_cast<std::size_t>(chunk),
                          cudaMemcpyDeviceToDevice));
    done += chunk;
  }
}

/// fp8 e4m3 bytes of N(0, 1) values; bf16 of N(0, 1).
void fix_fp8(std::uint8_t* p, std::int64_t bytes) {
  for (std::int64_t i = 0; i < bytes; ++i) p[i] = fp32_to_fp8_e4m3(static_cast<float>(p[i]) / 64.0f - 2.0f);
}
void fix_bf16(std::uint8_t* p, std::int64_t bytes) {
  for (std::int64_t i = 0; i + 1 < bytes; i += 2) {
    const std::uint16_t b = fp32_to_bf16_bits(static_cast<float>(p[i]) / 64.0f - 2.0f);
    std::memcpy(p + i, &b, 2);
  }
}

/// One GPU's buffers for a decode step over n_local tokens of its shard (B sequences).
struct Rank {
  int device;
  std::int64_t n_local;
  void *index_cache, *index_q, *weights, *k, *v, *q, *local_positions, *positions, *logits, *selection, *out, *lse,
      *select_workspace, *attention_workspace;
  cudaStream_t stream;
};

Rank make_rank(const Options& o, int device, std::int64_t n_local, std::int64_t n_keys, int ranks) {
  CHECK_CUDA(cudaSetDevice(device));
  Rank r{};
  r.device = device;
  r.n_local = n_local;
  const std::int64_t pages = (n_local + kIndexerCacheBlock - 1) / kIndexerCacheBlock;
  const std::int64_t page_bytes = kIndexerCacheBlock * (o.index_dim + 4);
  r.index_cache = device_alloc(o.batch * pages * page_bytes);
  fill(r.index_cache, o.batch * pages * page_bytes, 64 * page_bytes, 1 + device, [&](std::uint8_t* p, std::int64_t bytes) {
    for (std::int64_t page = 0; page * page_bytes < bytes; ++page) {
      fix_fp8(p + page * page_bytes, kIndexerCacheBlock * o.index_dim);
      for (int i = 0; i < kIndexerCacheBlock; ++i) {
        const float one = 1.0f;
        std::memcpy(p + page * page_bytes + kIndexerCacheBlock * o.index_dim + 4 * i, &one, 4);
      }
    }
  });
  r.index_q = device_alloc(o.batch * o.index_heads * o.index_dim);
  fill(r.index_q, o.batch * o.index_heads * o.index_dim, 1 << 20, 7, fix_fp8);  // the same queries on every rank
  r.weights = device_alloc(o.batch * o.index_heads * 4);
  fill(r.weights, o.batch * o.index_heads * 4, 1 << 20, 8, [](std::uint8_t* p, std::int64_t bytes) {
    for (std::int64_t i = 0; i + 3 < bytes; i += 4) {
      const float w = static_cast<float>(p[i]) / 256.0f;
      std::memcpy(p + i, &w, 4);
    }
  });
  const std::int64_t kv_bytes = o.batch * std::max<std::int64_t>(n_local, 1) * o.kv_heads * o.head_dim * 2;
  r.k = device_alloc(kv_bytes);
  r.v = device_alloc(kv_bytes);
  fill(r.k, kv_bytes, 4096 * o.kv_heads * o.head_dim * 2, 11 + device, fix_bf16);
  fill(r.v, kv_bytes, 4096 * o.kv_heads * o.head_dim * 2, 21 + device, fix_bf16);
  r.q = device_alloc(o.batch * o.heads * o.head_dim * 2);
  fill(r.q, o.batch * o.heads * o.head_dim * 2, 1 << 20, 9, fix_bf16);
  std::vector<std::int32_t> local(static_cast<std::size_t>(o.batch), static_cast<std::int32_t>(n_local - 1));
  std::vector<std::int32_t> global(static_cast<std::size_t>(o.batch), static_cast<std::int32_t>(n_keys - 1));
  r.local_positions = device_alloc(o.batch * 4);
  r.positions = device_alloc(o.batch * 4);
  CHECK_CUDA(cudaMemcpy(r.local_positions, local.data(), static_cast<std::size_t>(o.batch * 4), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(r.positions, global.data(), static_cast<std::size_t>(o.batch * 4), cudaMemcpyHostToDevice));
  r.logits = device_alloc(o.batch * n_local * 4);
  r.selection = device_alloc(o.batch * o.k * 4);
  r.out = device_alloc(o.batch * o.heads * o.head_dim * 4);
  r.lse = device_alloc(o.batch * o.heads * 4);
  SelectionPolicy policy;
  policy.k = o.k;
  const std::int64_t select_bytes =
      ranks > 1 ? select_topk_context_parallel_cuda_workspace_bytes(o.batch, 1, n_local, policy, ranks)
                : select_topk_cuda_workspace_bytes(o.batch, 1, n_local);
  r.select_workspace = device_alloc(select_bytes);
  r.attention_workspace =
      device_alloc(sparse_attention_context_parallel_cuda_workspace_bytes(o.batch, o.heads, o.head_dim, 1, o.k, ranks));
  CHECK_CUDA(cudaStreamCreateWithFlags(&r.stream, cudaStreamNonBlocking));
  return r;
}

/// One decode step on this rank: indexer over the shard, top-k (over NCCL when comm is set), attention.
void step(const Options& o, const Rank& r, ncclComm_t comm, const ContextShards& shards, std::int64_t n_keys) {
  const Device d = Device::cuda(r.device);
  const std::int64_t pages = (r.n_local + kIndexerCacheBlock - 1) / kIndexerCacheBlock;
  CudaIndexerKeyCache cache{TensorView(r.index_cache, DType::fp8_e4m3, {o.batch * pages, kIndexerCacheBlock * (o.index_dim + 4)}, d), {}};
  const TensorView logits(r.logits, DType::fp32, {o.batch, r.n_local}, d);
  lightning_indexer_logits_cuda(TensorView(r.index_q, DType::fp8_e4m3, {o.batch, o.index_heads, o.index_dim}, d),
                                TensorView(r.weights, DType::fp32, {o.batch, o.index_heads}, d), cache,
                                TensorView(r.local_positions, DType::int32, {o.batch}, d), logits, {}, r.stream);
  SelectionPolicy policy;
  policy.k = o.k;
  policy.granularity = Granularity::per_token;
  const TensorView scores(r.logits, DType::fp32, {o.batch, 1, r.n_local}, d);
  const TensorView selection(r.selection, DType::int32, {o.batch, 1, o.k}, d);
  const std::int64_t rows = std::max<std::int64_t>(r.n_local, 1);
  const CudaKvCache kv{TensorView(r.k, DType::bf16, {o.batch, rows, o.kv_heads, o.head_dim}, d),
                       TensorView(r.v, DType::bf16, {o.batch, rows, o.kv_heads, o.head_dim}, d), {}};
  const TensorView q(r.q, DType::bf16, {o.batch, o.heads, o.head_dim}, d);
  const TensorView out(r.out, DType::fp32, {o.batch, o.heads, o.head_dim}, d);
  const TensorView lse(r.lse, DType::fp32, {o.batch, o.heads}, d);
  if (comm == nullptr) {
    select_topk_cuda(scores, TensorView(r.local_positions, DType::int32, {o.batch}, d), policy, selection, r.stream,
                     TensorView(r.select_workspace, DType::int8, {select_topk_cuda_workspace_bytes(o.batch, 1, r.n_local)}, d));
    sparse_attention_decode_cuda(q, kv, selection, Granularity::per_token, 0.0, out, lse, r.stream);
    return;
  }
  select_topk_context_parallel_cuda(
      comm, shards, scores, TensorView(r.positions, DType::int32, {o.batch}, d), n_keys, policy, selection, r.stream,
      TensorView(r.select_workspace, DType::int8,
                 {select_topk_context_parallel_cuda_workspace_bytes(o.batch, 1, r.n_local, policy, shards.ranks)}, d));
  sparse_attention_context_parallel_cuda(
      comm, shards, n_keys, q, kv, selection, Granularity::per_token, 0.0, out, lse, r.stream,
      TensorView(r.attention_workspace, DType::int8,
                 {sparse_attention_context_parallel_cuda_workspace_bytes(o.batch, o.heads, o.head_dim, 1, o.k,
                                                                         shards.ranks)},
                 d));
}

/// Per-iteration step times (us) of every rank; the slowest rank's per iteration, median.
double run(const Options& o, int ranks, std::int64_t n_keys, bool parallel) {
  const ContextShards shards{ranks, o.layout, 64};
  std::vector<ncclComm_t> comms(static_cast<std::size_t>(ranks), nullptr);
  std::vector<int> devices(static_cast<std::size_t>(ranks));
  for (int r = 0; r < ranks; ++r) devices[static_cast<std::size_t>(r)] = r;
  if (parallel && ranks > 1) {
    const ncclResult_t status = ncclCommInitAll(comms.data(), ranks, devices.data());
    if (status != ncclSuccess) {
      std::fprintf(stderr, "ncclCommInitAll: %s\n", ncclGetErrorString(status));
      std::exit(1);
    }
  }
  std::vector<std::vector<float>> times(static_cast<std::size_t>(ranks), std::vector<float>(static_cast<std::size_t>(o.iters)));
  std::barrier sync(ranks);
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r) {
    threads.emplace_back([&, r] {
      const std::int64_t n_local = ranks > 1 ? context_shard_size(shards, r, n_keys) : n_keys;
      Rank rank = make_rank(o, r, n_local, n_keys, parallel ? ranks : 1);
      ncclComm_t comm = comms[static_cast<std::size_t>(r)];
      for (int w = 0; w < 5; ++w) step(o, rank, comm, shards, n_keys);
      CHECK_CUDA(cudaStreamSynchronize(rank.stream));
      cudaEvent_t start, stop;
      CHECK_CUDA(cudaEventCreate(&start));
      CHECK_CUDA(cudaEventCreate(&stop));
      for (int i = 0; i < o.iters; ++i) {
        sync.arrive_and_wait();
        CHECK_CUDA(cudaEventRecord(start, rank.stream));
        step(o, rank, comm, shards, n_keys);
        CHECK_CUDA(cudaEventRecord(stop, rank.stream));
        CHECK_CUDA(cudaEventSynchronize(stop));
        CHECK_CUDA(cudaEventElapsedTime(&times[static_cast<std::size_t>(r)][static_cast<std::size_t>(i)], start, stop));
      }
      CHECK_CUDA(cudaDeviceSynchronize());
      for (void* p : {rank.index_cache, rank.index_q, rank.weights, rank.k, rank.v, rank.q, rank.local_positions,
                      rank.positions, rank.logits, rank.selection, rank.out, rank.lse, rank.select_workspace,
                      rank.attention_workspace}) {
        CHECK_CUDA(cudaFree(p));
      }
      CHECK_CUDA(cudaStreamDestroy(rank.stream));
    });
  }
  for (std::thread& t : threads) t.join();
  for (ncclComm_t c : comms) {
    if (c != nullptr) ncclCommDestroy(c);
  }
  std::vector<float> slowest(static_cast<std::size_t>(o.iters), 0.0f);
  for (int i = 0; i < o.iters; ++i) {
    for (int r = 0; r < ranks; ++r) {
      slowest[static_cast<std::size_t>(i)] = std::max(slowest[static_cast<std::size_t>(i)], times[static_cast<std::size_t>(r)][static_cast<std::size_t>(i)]);
    }
  }
  std::sort(slowest.begin(), slowest.end());
  return 1000.0 * slowest[slowest.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--ranks") o.ranks = std::stoi(v);
    else if (a == "--n" && v == "max") o.n_max = true;
    else if (a == "--n") o.n = std::stoll(v);
    else if (a == "--batch") o.batch = std::stoll(v);
    else if (a == "--k") o.k = std::stoll(v);
    else if (a == "--iters") o.iters = std::stoi(v);
    else if (a == "--layout") o.layout = v == "round_robin" ? ContextShards::Layout::round_robin : ContextShards::Layout::contiguous;
    else if (a == "--heads") o.heads = std::stoll(v);
    else if (a == "--kv-heads") o.kv_heads = std::stoll(v);
    else if (a == "--head-dim") o.head_dim = std::stoll(v);
    else if (a == "--index-heads") o.index_heads = std::stoll(v);
    else if (a == "--index-dim") o.index_dim = std::stoll(v);
    else {
      std::fprintf(stderr, "unknown option %s (see the comment at the top of bench_context_parallel.cpp)\n", a.c_str());
      return 2;
    }
  }
  int gpus = 0;
  CHECK_CUDA(cudaGetDeviceCount(&gpus));
  const int ranks = o.ranks > 0 ? o.ranks : gpus;
  if (ranks < 1 || ranks > gpus) {
    std::fprintf(stderr, "--ranks %d: this machine has %d GPUs\n", ranks, gpus);
    return 2;
  }
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  if (o.n_max) {
    std::size_t free_bytes = 0, total_bytes = 0;
    CHECK_CUDA(cudaSetDevice(0));
    CHECK_CUDA(cudaMemGetInfo(&free_bytes, &total_bytes));
    const double usable = 0.85 * static_cast<double>(free_bytes);  // room for NCCL buffers, scratch and the workspaces
    const auto per_gpu = static_cast<std::int64_t>(usable / static_cast<double>(bytes_per_token(o)));
    const std::int64_t cap = 0x7fffffffLL;  // positions are int32
    o.n = std::min<std::int64_t>(per_gpu * ranks, cap) / (64 * ranks) * (64 * ranks);
    std::printf("largest context on %d x %s: N = %lld tokens per sequence, batch %lld (%.1f GiB free per GPU, %lld "
                "bytes per token and sequence%s)\n",
                ranks, prop.name, static_cast<long long>(o.n), static_cast<long long>(o.batch),
                static_cast<double>(free_bytes) / (1 << 30), static_cast<long long>(bytes_per_token(o) / o.batch),
                per_gpu * ranks > cap ? "; capped by int32 positions" : "");
  }
  std::printf("decode step (indexer HI=%lld DI=%lld, top-k k=%lld, sparse attention Hq=%lld Hkv=%lld D=%lld), batch "
              "%lld, %s, on %s\n",
              static_cast<long long>(o.index_heads), static_cast<long long>(o.index_dim), static_cast<long long>(o.k),
              static_cast<long long>(o.heads), static_cast<long long>(o.kv_heads), static_cast<long long>(o.head_dim),
              static_cast<long long>(o.batch), o.layout == ContextShards::Layout::round_robin ? "round-robin pages" : "contiguous shards",
              prop.name);
  const double parallel = run(o, ranks, o.n, true);
  std::printf("  %d GPUs, N = %lld: %.1f us per step (median over %d steps of the slowest rank)\n", ranks,
              static_cast<long long>(o.n), parallel, o.iters);
  if (ranks > 1) {
    const std::int64_t shard = o.n / ranks;
    const double one = run(o, 1, shard, false);
    std::printf("  1 GPU,  N = %lld (N / %d): %.1f us per step\n", static_cast<long long>(shard), ranks, one);
    std::printf("  ratio %.2f (goal: <= 1.3)\n", parallel / one);
  }
  return 0;
}
