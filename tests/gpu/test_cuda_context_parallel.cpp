// Context parallelism over NCCL (SPEC §10) on every GPU of this machine, one rank per GPU and one thread per rank:
// select_topk_context_parallel_cuda equals the CPU select_topk on the whole score rows bit for bit (ties, NaN,
// -inf, kept keys, short rows, both layouts, 2 ranks and all GPUs), also when replayed from a CUDA graph, and
// sparse_attention_context_parallel_cuda equals sparse_attention_decode_cuda on the whole cache of one GPU.
// Needs two GPUs: with fewer it skips, saying so; a build without NCCL is checked to refuse the calls.
#include <gtest/gtest.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "gpu_test_support.h"
#include "keysel/attention/cuda_memory.h"
#include "keysel/attention/cuda_sparse_attention.h"
#include "keysel/core/build_config.h"
#include "keysel/core/error.h"
#include "keysel/core/random.h"
#include "keysel/indexer/cuda_context_parallel.h"
#include "keysel/indexer/topk.h"

#if KEYSEL_NCCL
#include <nccl.h>
#endif

namespace keysel {
namespace {

#if KEYSEL_NCCL

/// R communicators over GPUs 0..R-1 (ncclCommInitAll), destroyed with the object.
struct Communicators {
  std::vector<ncclComm_t> comms;
  explicit Communicators(int ranks) : comms(static_cast<std::size_t>(ranks)) {
    std::vector<int> devices(static_cast<std::size_t>(ranks));
    for (int r = 0; r < ranks; ++r) devices[static_cast<std::size_t>(r)] = r;
    const ncclResult_t status = ncclCommInitAll(comms.data(), ranks, devices.data());
    if (status != ncclSuccess) throw Error(std::string("ncclCommInitAll: ") + ncclGetErrorString(status));
  }
  ~Communicators() {
    for (ncclComm_t c : comms) ncclCommDestroy(c);
  }
};

/// body(rank) on one thread per rank; the first exception is rethrown after every thread ends.
template <typename Body>
void on_every_rank(int ranks, Body&& body) {
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(ranks));
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r) {
    threads.emplace_back([&, r] {
      try {
        body(r);
      } catch (...) {
        errors[static_cast<std::size_t>(r)] = std::current_exception();
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (const std::exception_ptr& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

CudaBuffer on_device(const void* host, std::int64_t bytes, int device) {
  CudaBuffer buffer(std::max<std::int64_t>(bytes, 16), device);
  if (bytes > 0) buffer.copy_from_host(host, bytes);
  return buffer;
}

int gpus_or_skip_reason(std::string& reason) {
  const int count = cuda_device_count();
  if (count < 2) reason = "context parallelism needs 2 GPUs; this machine has " + std::to_string(count) + " (" +
                          cuda_device_description(0) + ")";
  return std::min(count, 8);
}

struct SelectCase {
  std::int64_t T, G, N;
  SelectionPolicy policy;
  ContextShards::Layout layout;
  std::int64_t page;
};

/// Scores on a coarse grid (ties everywhere), NaN and -inf sprinkled in; positions: 0, the whole row, random.
void check_selection(int ranks, const SelectCase& c, std::uint64_t seed, bool in_graph) {
  SCOPED_TRACE("R=" + std::to_string(ranks) + " T=" + std::to_string(c.T) + " G=" + std::to_string(c.G) +
               " N=" + std::to_string(c.N) + " k=" + std::to_string(c.policy.k) + " sink=" +
               std::to_string(c.policy.n_sink) + " local=" + std::to_string(c.policy.n_local) + " on_top=" +
               std::to_string(c.policy.kept_on_top) + " round_robin=" +
               std::to_string(c.layout == ContextShards::Layout::round_robin) + " graph=" + std::to_string(in_graph));
  RandomStream rng(seed);
  std::vector<float> scores(static_cast<std::size_t>(c.T * c.G * c.N));
  for (float& x : scores) {
    const double u = rng.uniform();
    x = u < 0.03   ? std::numeric_limits<float>::quiet_NaN()
        : u < 0.05 ? -std::numeric_limits<float>::infinity()
        : u < 0.07 ? -0.0f
                   : static_cast<float>(std::round(rng.normal(0.0, 3.0)) / 2.0);
  }
  std::vector<std::int32_t> positions(static_cast<std::size_t>(c.T));
  for (std::int64_t t = 0; t < c.T; ++t) {
    positions[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(
        t == 0 ? 0 : t == 1 ? c.N - 1 : static_cast<std::int64_t>(rng.uniform_int(static_cast<std::uint64_t>(c.N))));
  }
  const std::int64_t W = c.policy.width();
  std::vector<std::int32_t> want(static_cast<std::size_t>(c.T * c.G * W));
  select_topk(TensorView(scores.data(), DType::fp32, {c.T, c.G, c.N}),
              TensorView(positions.data(), DType::int32, {c.T}), c.policy,
              TensorView(want.data(), DType::int32, {c.T, c.G, W}));

  const ContextShards shards{ranks, c.layout, c.page};
  Communicators comms(ranks);
  std::vector<std::vector<std::int32_t>> got(static_cast<std::size_t>(ranks));
  std::barrier sync(ranks);
  std::mutex capture_lock;
  on_every_rank(ranks, [&](int r) {
    const std::vector<std::int32_t> mine = shards.positions(r, c.N);
    const auto n_local = static_cast<std::int64_t>(mine.size());
    EXPECT_EQ(n_local, context_shard_size(shards, r, c.N));
    std::vector<float> local(static_cast<std::size_t>(c.T * c.G * n_local));
    for (std::int64_t row = 0; row < c.T * c.G; ++row) {
      for (std::int64_t j = 0; j < n_local; ++j) {
        local[static_cast<std::size_t>(row * n_local + j)] =
            scores[static_cast<std::size_t>(row * c.N + mine[static_cast<std::size_t>(j)])];
      }
    }
    const Device device = Device::cuda(r);
    CudaBuffer d_scores = on_device(local.data(), static_cast<std::int64_t>(local.size() * 4), r);
    CudaBuffer d_positions = on_device(positions.data(), c.T * 4, r);
    CudaBuffer d_selection(c.T * c.G * W * 4, r);
    d_selection.fill_bytes(0xA5);
    const std::int64_t bytes = select_topk_context_parallel_cuda_workspace_bytes(c.T, c.G, n_local, c.policy, ranks);
    CudaBuffer d_workspace(bytes, r);
    const CudaStream stream(r);
    const auto call = [&] {
      select_topk_context_parallel_cuda(comms.comms[static_cast<std::size_t>(r)], shards,
                                        TensorView(d_scores.data(), DType::fp32, {c.T, c.G, n_local}, device),
                                        TensorView(d_positions.data(), DType::int32, {c.T}, device), c.N, c.policy,
                                        TensorView(d_selection.data(), DType::int32, {c.T, c.G, W}, device),
                                        stream.handle(),
                                        TensorView(d_workspace.data(), DType::int8, {bytes}, device));
    };
    if (in_graph) {
      call();  // NCCL's first collective on a communicator sets up its connections outside the capture
      stream.synchronize();
      d_selection.fill_bytes(0xA5);
      // A capture in global mode forbids other threads' synchronous CUDA calls: every rank is done with them
      // before the first capture, and the ranks capture one at a time (recording needs no peer).
      sync.arrive_and_wait();
      CudaGraph graph;
      {
        const std::lock_guard<std::mutex> lock(capture_lock);
        graph = CudaGraph::capture(stream, call);
      }
      sync.arrive_and_wait();
      graph.launch(stream);
    } else {
      call();
    }
    stream.synchronize();
    got[static_cast<std::size_t>(r)].resize(static_cast<std::size_t>(c.T * c.G * W));
    d_selection.copy_to_host(got[static_cast<std::size_t>(r)].data());
  });
  for (int r = 0; r < ranks; ++r) EXPECT_EQ(got[static_cast<std::size_t>(r)], want) << "rank " << r;
}

std::vector<SelectCase> selection_cases() {
  using L = ContextShards::Layout;
  return {
      {5, 2, 1000, {.k = 64}, L::contiguous, 64},
      {5, 2, 1000, {.k = 64}, L::round_robin, 16},
      {4, 3, 777, {.k = 50, .n_sink = 3, .n_local = 9}, L::round_robin, 7},
      {4, 1, 301, {.k = 20, .n_sink = 2, .n_local = 5, .kept_on_top = true}, L::contiguous, 64},
      {3, 1, 5, {.k = 16}, L::contiguous, 64},     // k above N, empty shards on most ranks
      {3, 2, 70, {.k = 100}, L::round_robin, 64},  // one page: every other rank's shard is empty
      {2, 1, 40000, {.k = 2048, .n_sink = 4, .n_local = 64}, L::round_robin, 64},
  };
}

TEST(CudaContextParallel, SelectionEqualsSelectTopkBitForBit) {
  std::string reason;
  const int gpus = gpus_or_skip_reason(reason);
  if (!reason.empty()) GTEST_SKIP() << reason;
  const std::vector<SelectCase> cases = selection_cases();
  std::uint64_t seed = 11;
  for (const int ranks : {2, gpus}) {
    for (const SelectCase& c : cases) check_selection(ranks, c, seed++, false);
    if (gpus == 2) break;
  }
  check_selection(gpus, cases[2], seed++, true);
}

/// Context-parallel decode attention over `gpus` ranks (devices 0..gpus-1) against sparse_attention_decode_cuda on
/// the whole cache on device 0.
void check_attention(int gpus) {
  const std::int64_t B = 3, Hq = 8, Hkv = 2, D = 128, N = 1500, W = 96;
  const Granularity granularity = Granularity::per_kv_head;
  const std::int64_t G = group_count(granularity, Hq, Hkv);
  RandomStream rng(5);
  std::vector<std::uint16_t> q(static_cast<std::size_t>(B * Hq * D)), k(static_cast<std::size_t>(B * N * Hkv * D)),
      v(k.size());
  for (auto& x : q) x = fp32_to_bf16_bits(static_cast<float>(rng.normal(0.0, 1.5)));
  for (auto& x : k) x = fp32_to_bf16_bits(static_cast<float>(rng.normal(0.0, 1.0)));
  for (auto& x : v) x = fp32_to_bf16_bits(static_cast<float>(rng.normal(0.0, 1.0)));
  // A selection of global positions per (sequence, group): distinct, ascending, -1 padding; one row empty.
  std::vector<std::int32_t> selection(static_cast<std::size_t>(B * G * W), -1);
  for (std::int64_t row = 1; row < B * G; ++row) {
    std::vector<std::int32_t> keys;
    for (std::int64_t s = 0; s < N; ++s) {
      if (rng.uniform() < 0.05) keys.push_back(static_cast<std::int32_t>(s));
    }
    keys.resize(std::min<std::size_t>(keys.size(), static_cast<std::size_t>(W - row % 3)));
    std::copy(keys.begin(), keys.end(), selection.begin() + row * W);
  }
  // One GPU, the whole cache.
  std::vector<float> want(static_cast<std::size_t>(B * Hq * D)), want_lse(static_cast<std::size_t>(B * Hq));
  {
    CudaBuffer d_q = on_device(q.data(), static_cast<std::int64_t>(q.size() * 2), 0);
    CudaBuffer d_k = on_device(k.data(), static_cast<std::int64_t>(k.size() * 2), 0);
    CudaBuffer d_v = on_device(v.data(), static_cast<std::int64_t>(v.size() * 2), 0);
    CudaBuffer d_sel = on_device(selection.data(), static_cast<std::int64_t>(selection.size() * 4), 0);
    CudaBuffer d_out(B * Hq * D * 4, 0), d_lse(B * Hq * 4, 0);
    const Device device = Device::cuda(0);
    sparse_attention_decode_cuda(TensorView(d_q.data(), DType::bf16, {B, Hq, D}, device),
                                 {TensorView(d_k.data(), DType::bf16, {B, N, Hkv, D}, device),
                                  TensorView(d_v.data(), DType::bf16, {B, N, Hkv, D}, device), {}},
                                 TensorView(d_sel.data(), DType::int32, {B, G, W}, device), granularity, 0.0,
                                 TensorView(d_out.data(), DType::fp32, {B, Hq, D}, device),
                                 TensorView(d_lse.data(), DType::fp32, {B, Hq}, device));
    d_out.copy_to_host(want.data());
    d_lse.copy_to_host(want_lse.data());
  }
  for (const auto layout : {ContextShards::Layout::contiguous, ContextShards::Layout::round_robin}) {
    const ContextShards shards{gpus, layout, 32};
    SCOPED_TRACE("R=" + std::to_string(gpus) + " round_robin=" + std::to_string(layout == ContextShards::Layout::round_robin));
    Communicators comms(gpus);
    std::vector<std::vector<float>> outs(static_cast<std::size_t>(gpus)), lses(static_cast<std::size_t>(gpus));
    on_every_rank(gpus, [&](int r) {
      const std::vector<std::int32_t> mine = shards.positions(r, N);
      const auto n_local = static_cast<std::int64_t>(mine.size());
      const std::int64_t row = Hkv * D;
      std::vector<std::uint16_t> lk(static_cast<std::size_t>(B * std::max<std::int64_t>(n_local, 1) * row)), lv(lk.size());
      for (std::int64_t b = 0; b < B; ++b) {
        for (std::int64_t j = 0; j < n_local; ++j) {
          const std::int64_t s = mine[static_cast<std::size_t>(j)];
          std::copy_n(k.begin() + (b * N + s) * row, row, lk.begin() + (b * n_local + j) * row);
          std::copy_n(v.begin() + (b * N + s) * row, row, lv.begin() + (b * n_local + j) * row);
        }
      }
      const Device device = Device::cuda(r);
      CudaBuffer d_q = on_device(q.data(), static_cast<std::int64_t>(q.size() * 2), r);
      CudaBuffer d_k = on_device(lk.data(), static_cast<std::int64_t>(lk.size() * 2), r);
      CudaBuffer d_v = on_device(lv.data(), static_cast<std::int64_t>(lv.size() * 2), r);
      CudaBuffer d_sel = on_device(selection.data(), static_cast<std::int64_t>(selection.size() * 4), r);
      CudaBuffer d_out(B * Hq * D * 4, r), d_lse(B * Hq * 4, r);
      const CudaStream stream(r);
      const std::int64_t local_n = std::max<std::int64_t>(n_local, 1);  // an empty shard: one row never selected
      sparse_attention_context_parallel_cuda(
          comms.comms[static_cast<std::size_t>(r)], shards, N, TensorView(d_q.data(), DType::bf16, {B, Hq, D}, device),
          {TensorView(d_k.data(), DType::bf16, {B, local_n, Hkv, D}, device),
           TensorView(d_v.data(), DType::bf16, {B, local_n, Hkv, D}, device), {}},
          TensorView(d_sel.data(), DType::int32, {B, G, W}, device), granularity, 0.0,
          TensorView(d_out.data(), DType::fp32, {B, Hq, D}, device),
          TensorView(d_lse.data(), DType::fp32, {B, Hq}, device), stream.handle());
      stream.synchronize();
      outs[static_cast<std::size_t>(r)].resize(want.size());
      lses[static_cast<std::size_t>(r)].resize(want_lse.size());
      d_out.copy_to_host(outs[static_cast<std::size_t>(r)].data());
      d_lse.copy_to_host(lses[static_cast<std::size_t>(r)].data());
    });
    for (int r = 0; r < gpus; ++r) {
      EXPECT_EQ(outs[static_cast<std::size_t>(r)], outs[0]) << "rank " << r << " differs from rank 0";
      for (std::size_t i = 0; i < want.size(); ++i) {
        ASSERT_NEAR(outs[static_cast<std::size_t>(r)][i], want[i], 2e-5 + 2e-5 * std::fabs(want[i])) << "out " << i;
      }
      for (std::size_t i = 0; i < want_lse.size(); ++i) {
        if (std::isinf(want_lse[i])) {
          ASSERT_EQ(lses[static_cast<std::size_t>(r)][i], want_lse[i]) << "lse " << i;
        } else {
          ASSERT_NEAR(lses[static_cast<std::size_t>(r)][i], want_lse[i], 2e-5 + 2e-6 * std::fabs(want_lse[i]))
              << "lse " << i;
        }
      }
    }
  }
}

TEST(CudaContextParallel, AttentionEqualsOneGpu) {
  std::string reason;
  const int gpus = gpus_or_skip_reason(reason);
  if (!reason.empty()) GTEST_SKIP() << reason;
  check_attention(gpus);
}

// One rank on one GPU: the whole NCCL path (masked local top-k, a one-rank all-gather, the merged row's top-k; the
// shard's attention and the (o, lse) merge), also from a CUDA graph, on any machine with a GPU. The multi-rank
// tests above need 2 GPUs.
TEST(CudaContextParallel, OneRankEqualsSelectTopkAndOneGpu) {
  if (cuda_device_count() < 1) GTEST_SKIP() << "no CUDA GPU on this machine";
  const std::vector<SelectCase> cases = selection_cases();
  std::uint64_t seed = 101;
  for (const SelectCase& c : cases) check_selection(1, c, seed++, false);
  check_selection(1, cases[2], seed++, true);
  check_attention(1);
}

#else  // !KEYSEL_NCCL

TEST(CudaContextParallel, RefusesWithoutNccl) {
  const ContextShards shards{2, ContextShards::Layout::contiguous, 64};
  try {
    select_topk_context_parallel_cuda(nullptr, shards, {}, {}, 0, SelectionPolicy{}, {});
    FAIL() << "expected keysel::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("without NCCL"), std::string::npos) << e.what();
  }
  EXPECT_THROW(sparse_attention_context_parallel_cuda(nullptr, shards, 0, {}, {}, {}, Granularity::per_token, 0.0, {}),
               Error);
}

#endif  // KEYSEL_NCCL

TEST(CudaContextParallel, ShardSizesMatchThePositions) {
  for (const auto layout : {ContextShards::Layout::contiguous, ContextShards::Layout::round_robin}) {
    for (const std::int64_t R : {1, 2, 3, 8}) {
      for (const std::int64_t n : {0, 1, 5, 63, 64, 65, 1000}) {
        const ContextShards shards{R, layout, 16};
        std::int64_t total = 0;
        for (std::int64_t r = 0; r < R; ++r) {
          const auto size = static_cast<std::int64_t>(shards.positions(r, n).size());
          EXPECT_EQ(context_shard_size(shards, r, n), size) << "rank " << r << " of " << R << ", n " << n;
          total += size;
        }
        EXPECT_EQ(total, n);
      }
    }
  }
  EXPECT_THROW(context_shard_size(ContextShards{2, ContextShards::Layout::contiguous, 64}, 2, 10), Error);
}

}  // namespace
}  // namespace keysel
