// sparse_mla_cuda against keysel::sparse_mla_reference (double precision): the
// fp8 V3.2 paged cache and a bf16 latent cache with a padded row stride, h_q
// that is not a multiple of the kernel's head block, topk that is not a
// multiple of its slot tile, -1 and out-of-range slots, topk_length, attn_sink,
// empty rows, rows split across thread blocks (few rows, many slots), bf16 and
// fp32 outputs, and a caller's workspace; the same for the sm_90a warpgroup-MMA kernel (KEYSEL_MLA_KERNEL=wgmma).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "gpu_test_support.h"
#include "keysel/attention/sparse_mla.h"
#include "keysel/core/build_config.h"
#include "keysel/core/dtype.h"
#include "keysel/core/error.h"
#include "keysel/core/random.h"

#if KEYSEL_CUDA
#include <cuda_runtime.h>

#include "cuda_sparse_mla_launch.h"
#endif

namespace keysel {
namespace {

using keysel::testing::poisoned;
using keysel::testing::to_device;
using keysel::testing::to_host;

struct MlaCase {
  std::int64_t T, H, N, topk;
  bool v32;
  bool lengths, sink, out_bf16, workspace;
};

void check_case(const MlaCase& c, std::uint64_t seed) {
  SCOPED_TRACE("T=" + std::to_string(c.T) + " H=" + std::to_string(c.H) + " N=" + std::to_string(c.N) +
               " topk=" + std::to_string(c.topk) + " v32=" + std::to_string(c.v32) +
               " lengths=" + std::to_string(c.lengths) + " sink=" + std::to_string(c.sink) +
               " bf16_out=" + std::to_string(c.out_bf16) + " workspace=" + std::to_string(c.workspace));
  const Device gpu = Device::cuda(0);
  RandomStream rng(seed);
  std::vector<std::uint16_t> q(static_cast<std::size_t>(c.T * c.H * kMlaQkDim));
  for (auto& x : q) x = fp32_to_bf16_bits(static_cast<float>(rng.normal(0.0, 1.0)));
  // Latents with a few large channels, as real ones have.
  constexpr std::int64_t kRowStride = kMlaQkDim + 64;  // the bf16 cache's padded rows
  std::vector<std::uint16_t> latents(static_cast<std::size_t>(c.N * kRowStride), fp32_to_bf16_bits(1e4f));
  for (std::int64_t s = 0; s < c.N; ++s) {
    for (std::int64_t d = 0; d < kMlaQkDim; ++d) {
      const double spread = d % 97 == 5 ? 6.0 : 1.0;
      latents[static_cast<std::size_t>(s * kRowStride + d)] =
          fp32_to_bf16_bits(static_cast<float>(rng.normal(0.0, spread)));
    }
  }
  const std::int64_t latent_stride[] = {kRowStride, 1};
  const std::int64_t latent_shape[] = {c.N, kMlaQkDim};
  const TensorView host_latents(latents.data(), DType::bf16, latent_shape, latent_stride);
  // The V3.2 pages: 64 tokens a page, pages in a shuffled order with one unused
  // page between.
  constexpr std::int64_t kPage = 64;
  const std::int64_t pages = (c.N + kPage - 1) / kPage * 2;
  std::vector<std::uint8_t> cache(static_cast<std::size_t>(pages * kPage * kMlaV32TokenBytes), 0x7F);  // NaN
  std::vector<std::int32_t> slot_of(static_cast<std::size_t>(c.N));  // the cache slot of latent s
  for (std::int64_t s = 0; s < c.N; ++s) {
    slot_of[static_cast<std::size_t>(s)] = static_cast<std::int32_t>(((s / kPage) * 2 + 1) * kPage + s % kPage);
  }
  if (c.v32) {
    // Rows the writer reads: the latents, contiguous.
    std::vector<std::uint16_t> dense(static_cast<std::size_t>(c.N * kMlaQkDim));
    for (std::int64_t s = 0; s < c.N; ++s) {
      std::copy_n(latents.begin() + s * kRowStride, kMlaQkDim, dense.begin() + s * kMlaQkDim);
    }
    mla_v32_quantize(TensorView(dense.data(), DType::bf16, {c.N, kMlaQkDim}),
                     TensorView(cache.data(), DType::fp8_e4m3, {pages, kPage, kMlaV32TokenBytes}),
                     TensorView(slot_of.data(), DType::int32, {c.N}));
  }
  const std::int64_t slots = c.v32 ? pages * kPage : c.N;
  // Indices: distinct slots, then -1 and out-of-range entries scattered; row 0
  // has none valid.
  std::vector<std::int32_t> indices(static_cast<std::size_t>(c.T * c.topk), -1);
  std::vector<std::int32_t> order(static_cast<std::size_t>(c.N));
  std::iota(order.begin(), order.end(), 0);
  for (std::int64_t t = 1; t < c.T; ++t) {
    rng.shuffle(std::span<std::int32_t>(order));
    for (std::int64_t i = 0; i < std::min(c.topk, c.N); ++i) {
      const std::int32_t s = order[static_cast<std::size_t>(i)];
      std::int32_t& entry = indices[static_cast<std::size_t>(t * c.topk + i)];
      entry = c.v32 ? slot_of[static_cast<std::size_t>(s)] : s;
      if (i % 13 == 7) entry = -1;
    }
  }
  // Out-of-range entries count as invalid on the GPU; the reference (which
  // rejects them) sees -1 there.
  std::vector<std::int32_t> device_indices = indices;
  for (std::int64_t t = 1; t < c.T; t += 2) {
    if (c.topk > 3) device_indices[static_cast<std::size_t>(t * c.topk + 3)] = static_cast<std::int32_t>(slots + t);
    indices[static_cast<std::size_t>(t * c.topk + 3)] =
        c.topk > 3 ? -1 : indices[static_cast<std::size_t>(t * c.topk + 3)];
  }
  std::vector<std::int32_t> lengths(static_cast<std::size_t>(c.T));
  for (std::int64_t t = 0; t < c.T; ++t) {
    lengths[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(t % 3 == 2 ? c.topk + 5 : (t * 37) % (c.topk + 1));
  }
  std::vector<float> sink(static_cast<std::size_t>(c.H));
  for (auto& x : sink) x = static_cast<float>(rng.normal(2.0, 2.0));
  if (c.sink && c.H > 2) {
    sink[0] = std::numeric_limits<float>::infinity();
    sink[1] = -std::numeric_limits<float>::infinity();
  }

  SparseMlaOptions host_options;
  host_options.scale = 0.0;
  if (c.lengths) host_options.topk_length = TensorView(lengths.data(), DType::int32, {c.T});
  if (c.sink) host_options.attn_sink = TensorView(sink.data(), DType::fp32, {c.H});
  const TensorView host_kv =
      c.v32 ? TensorView(cache.data(), DType::fp8_e4m3, {pages, kPage, kMlaV32TokenBytes}) : host_latents;
  std::vector<double> ref_out(static_cast<std::size_t>(c.T * c.H * kMlaLatentDim));
  std::vector<double> ref_lse(static_cast<std::size_t>(c.T * c.H)), ref_max(ref_lse.size());
  sparse_mla_reference(TensorView(q.data(), DType::bf16, {c.T, c.H, kMlaQkDim}), host_kv,
                       TensorView(indices.data(), DType::int32, {c.T, c.topk}),
                       TensorView(ref_out.data(), DType::fp64, {c.T, c.H, kMlaLatentDim}),
                       TensorView(ref_lse.data(), DType::fp64, {c.T, c.H}), host_options,
                       TensorView(ref_max.data(), DType::fp64, {c.T, c.H}));

  const CudaBuffer d_q = to_device(q), d_idx = to_device(device_indices), d_len = to_device(lengths),
                   d_sink = to_device(sink);
  const CudaBuffer d_kv = c.v32 ? to_device(cache) : to_device(latents);
  const DType out_type = c.out_bf16 ? DType::bf16 : DType::fp32;
  const std::int64_t out_count = c.T * c.H * kMlaLatentDim;
  CudaBuffer d_out = c.out_bf16 ? poisoned<std::uint16_t>(out_count, 0xFF) : poisoned<float>(out_count, 0xFF);
  CudaBuffer d_lse = poisoned<float>(c.T * c.H, 0xFF), d_max = poisoned<float>(c.T * c.H, 0xFF);
  SparseMlaOptions options;
  if (c.lengths) options.topk_length = TensorView(d_len.data(), DType::int32, {c.T}, gpu);
  if (c.sink) options.attn_sink = TensorView(d_sink.data(), DType::fp32, {c.H}, gpu);
  const TensorView kv = c.v32 ? TensorView(d_kv.data(), DType::fp8_e4m3, {pages, kPage, kMlaV32TokenBytes}, gpu)
                              : TensorView(d_kv.data(), DType::bf16, latent_shape, latent_stride, gpu);
  const std::int64_t workspace_bytes = sparse_mla_cuda_workspace_bytes(c.T, c.H, c.topk);
  CudaBuffer workspace = poisoned<std::uint8_t>(std::max<std::int64_t>(workspace_bytes, 16), 0xFF);
  sparse_mla_cuda(TensorView(d_q.data(), DType::bf16, {c.T, c.H, kMlaQkDim}, gpu), kv,
                  TensorView(d_idx.data(), DType::int32, {c.T, c.topk}, gpu),
                  TensorView(d_out.data(), out_type, {c.T, c.H, kMlaLatentDim}, gpu),
                  TensorView(d_lse.data(), DType::fp32, {c.T, c.H}, gpu), options,
                  TensorView(d_max.data(), DType::fp32, {c.T, c.H}, gpu), nullptr,
                  c.workspace ? TensorView(workspace.data(), DType::int8, {workspace.bytes()}, gpu) : TensorView());
  std::vector<float> out(static_cast<std::size_t>(out_count));
  if (c.out_bf16) {
    const std::vector<std::uint16_t> bits = to_host<std::uint16_t>(d_out);
    for (std::size_t i = 0; i < bits.size(); ++i) out[i] = bf16_bits_to_fp32(bits[i]);
  } else {
    out = to_host<float>(d_out);
  }
  const std::vector<float> lse = to_host<float>(d_lse), max_logits = to_host<float>(d_max);
  // bf16 products with fp32 accumulation; P rounded to bf16 before P V: about
  // 2^-9 of the output's scale.
  for (std::int64_t r = 0; r < c.T * c.H; ++r) {
    double norm = 0.0, error = 0.0;
    for (std::int64_t d = 0; d < kMlaLatentDim; ++d) {
      const auto i = static_cast<std::size_t>(r * kMlaLatentDim + d);
      ASSERT_TRUE(std::isfinite(out[i])) << "row " << r << " channel " << d;
      norm += ref_out[i] * ref_out[i];
      error += (out[i] - ref_out[i]) * (out[i] - ref_out[i]);
    }
    ASSERT_LE(std::sqrt(error), 8e-3 * std::sqrt(norm) + 1e-6) << "row " << r << " (token " << r / c.H << ")";
    const double want_lse = ref_lse[static_cast<std::size_t>(r)], want_max = ref_max[static_cast<std::size_t>(r)];
    if (std::isinf(want_lse)) {
      EXPECT_EQ(lse[static_cast<std::size_t>(r)], -std::numeric_limits<float>::infinity()) << "row " << r;
      EXPECT_EQ(max_logits[static_cast<std::size_t>(r)], -std::numeric_limits<float>::infinity()) << "row " << r;
    } else {
      EXPECT_NEAR(lse[static_cast<std::size_t>(r)], want_lse, 1e-4 * (1.0 + std::abs(want_lse))) << "row " << r;
      EXPECT_NEAR(max_logits[static_cast<std::size_t>(r)], want_max, 1e-4 * (1.0 + std::abs(want_max))) << "row " << r;
    }
  }
}

TEST(CudaSparseMla, MatchesReference) {
  KEYSEL_REQUIRE_GPU();
  std::uint64_t seed = 100;
  for (const bool v32 : {true, false}) {
    check_case({.T = 5,
                .H = 128,
                .N = 3000,
                .topk = 2048,
                .v32 = v32,
                .lengths = false,
                .sink = false,
                .out_bf16 = true,
                .workspace = false},
               seed++);  // few rows: split across blocks
    check_case({.T = 9,
                .H = 20,
                .N = 700,
                .topk = 100,
                .v32 = v32,
                .lengths = true,
                .sink = true,
                .out_bf16 = false,
                .workspace = true},
               seed++);  // h_q below a head block, topk off the tile
    check_case({.T = 70,
                .H = 64,
                .N = 500,
                .topk = 256,
                .v32 = v32,
                .lengths = true,
                .sink = false,
                .out_bf16 = true,
                .workspace = true},
               seed++);
    check_case({.T = 3,
                .H = 16,
                .N = 64,
                .topk = 96,
                .v32 = v32,
                .lengths = false,
                .sink = true,
                .out_bf16 = false,
                .workspace = false},
               seed++);  // topk above N: a -1 tail
    check_case({.T = 2,
                .H = 96,
                .N = 40,
                .topk = 0,
                .v32 = v32,
                .lengths = false,
                .sink = true,
                .out_bf16 = false,
                .workspace = false},
               seed++);  // no slots at all
  }
}

/// Sets KEYSEL_MLA_KERNEL for a scope and restores what was there.
class ScopedMlaKernel {
 public:
  explicit ScopedMlaKernel(const char* value) {
    if (const char* old = std::getenv("KEYSEL_MLA_KERNEL")) previous_ = old, had_ = true;
    ::setenv("KEYSEL_MLA_KERNEL", value, 1);
  }
  ~ScopedMlaKernel() {
    if (had_) {
      ::setenv("KEYSEL_MLA_KERNEL", previous_.c_str(), 1);
    } else {
      ::unsetenv("KEYSEL_MLA_KERNEL");
    }
  }
  ScopedMlaKernel(const ScopedMlaKernel&) = delete;
  ScopedMlaKernel& operator=(const ScopedMlaKernel&) = delete;

 private:
  std::string previous_;
  bool had_ = false;
};

// The warpgroup-MMA kernel where it runs (an sm_90a build on an sm_90 GPU; elsewhere these calls take the portable
// kernel and the test says so), on the fp8 V3.2 cache and the bf16 latent cache (padded rows): h_q 64 and 128,
// topk a multiple of its 64-slot tile and not, rows from 2 to 136 (B x s_q, or prefill rows), invalid and
// out-of-range slots, topk_length, attn_sink, split and unsplit rows (unsplit rows of up to 8 tiles: the bf16
// cache's two K buffers alternate), empty rows.
TEST(CudaSparseMla, WgmmaKernelMatchesReference) {
  KEYSEL_REQUIRE_GPU();
  ScopedMlaKernel kernel("wgmma");
#if KEYSEL_CUDA
  cudaDeviceProp properties{};
  ASSERT_EQ(cudaGetDeviceProperties(&properties, 0), cudaSuccess);
  for (const bool v32 : {true, false}) {
    const bool available = cuda_kernels::sparse_mla_wgmma_kernel_available(0, v32);
    std::cout << "[ sparse MLA ] " << properties.name << " (sm_" << properties.major << properties.minor << "), "
              << (v32 ? "fp8 V3.2 cache: " : "bf16 cache: ")
              << (available ? "the wgmma kernel runs" : "no wgmma kernel here: the portable kernel runs") << "\n";
    if (properties.major == 9) {
      EXPECT_TRUE(available) << "an sm_90 GPU: build with CMAKE_CUDA_ARCHITECTURES including 90a";
    }
  }
#endif
  std::uint64_t seed = 900;
  const MlaCase cases[] = {
      // T, H, N, topk, v32, lengths, sink, out_bf16, workspace
      {2, 128, 3000, 2048, true, false, true, true, false},   // B = 1, s_q = 2 (row 0 has no valid slot): splits
      {3, 128, 2500, 2048, true, true, false, false, true},   // B = 3
      {4, 64, 300, 64, true, true, true, false, false},      // B = 1, s_q = 4: one tile
      {12, 128, 500, 128, true, false, true, true, true},     // B = 3, s_q = 4
      {5, 64, 700, 100, true, true, true, false, true},       // topk off the tile
      {64, 64, 900, 192, true, true, false, true, false},     // B = 64
      {64, 128, 400, 130, true, false, true, false, false},   // B = 64, topk off the tile
      {3, 64, 64, 96, true, false, true, false, false},       // topk above N: a -1 tail
      {2, 128, 40, 0, true, false, true, false, false},       // no slots at all
      // The bf16 latent cache (prefill's).
      {3, 128, 3000, 2048, false, true, true, true, false},   // splits
      {5, 64, 700, 100, false, true, true, false, true},      // topk off the tile
      {64, 128, 400, 130, false, false, true, false, false},  // topk off the tile
      {136, 64, 2000, 450, false, true, true, true, true},    // more rows than SMs: unsplit, 8 tiles a row
      {136, 128, 600, 320, false, false, false, false, false},
      {3, 64, 64, 96, false, false, true, false, false},      // topk above N: a -1 tail
      {2, 128, 40, 0, false, false, true, false, false},      // no slots at all
  };
  for (const MlaCase& c : cases) check_case(c, seed++);
}

TEST(CudaSparseMla, RejectsAnUnknownKernelName) {
  KEYSEL_REQUIRE_GPU();
  ScopedMlaKernel kernel("fastest");
  const Device gpu = Device::cuda(0);
  CudaBuffer q(2 * 64 * kMlaQkDim * 2), kv(64 * kMlaV32TokenBytes), idx(2 * 8 * 4), out(2 * 64 * kMlaLatentDim * 4);
  EXPECT_THROW(sparse_mla_cuda(TensorView(q.data(), DType::bf16, {2, 64, kMlaQkDim}, gpu),
                               TensorView(kv.data(), DType::fp8_e4m3, {1, 64, kMlaV32TokenBytes}, gpu),
                               TensorView(idx.data(), DType::int32, {2, 8}, gpu),
                               TensorView(out.data(), DType::fp32, {2, 64, kMlaLatentDim}, gpu)),
               Error);
}

TEST(CudaSparseMla, RejectsBadArguments) {
  KEYSEL_REQUIRE_GPU();
  const Device gpu = Device::cuda(0);
  CudaBuffer q(2 * 4 * kMlaQkDim * 2), kv(64 * kMlaV32TokenBytes), idx(2 * 8 * 4), out(2 * 4 * kMlaLatentDim * 4);
  const TensorView q_view(q.data(), DType::bf16, {2, 4, kMlaQkDim}, gpu);
  const TensorView kv_view(kv.data(), DType::fp8_e4m3, {1, 64, kMlaV32TokenBytes}, gpu);
  const TensorView idx_view(idx.data(), DType::int32, {2, 8}, gpu);
  const TensorView out_view(out.data(), DType::fp32, {2, 4, kMlaLatentDim}, gpu);
  EXPECT_THROW(sparse_mla_cuda(TensorView(q.data(), DType::fp16, {2, 4, kMlaQkDim}, gpu), kv_view, idx_view, out_view),
               Error);
  EXPECT_THROW(sparse_mla_cuda(q_view, TensorView(kv.data(), DType::fp8_e4m3, {1, 64, 600}, gpu), idx_view, out_view),
               Error);
  EXPECT_THROW(sparse_mla_cuda(q_view, kv_view, TensorView(idx.data(), DType::int32, {3, 5}, gpu), out_view), Error);
  std::vector<float> host_out(2 * 4 * kMlaLatentDim);
  EXPECT_THROW(sparse_mla_cuda(q_view, kv_view, idx_view, TensorView(host_out.data(), DType::fp32, {2, 4, 512})),
               Error);
  SparseMlaOptions options;
  options.scale = std::numeric_limits<double>::quiet_NaN();
  EXPECT_THROW(sparse_mla_cuda(q_view, kv_view, idx_view, out_view, {}, options), Error);
  CudaBuffer tiny(16), wide(4096 * 4);  // one row of 4096 slots splits across
                                        // blocks: it needs a workspace
  const std::int64_t need = sparse_mla_cuda_workspace_bytes(1, 4, 4096);
  EXPECT_GT(need, 16);
  EXPECT_THROW(sparse_mla_cuda(TensorView(q.data(), DType::bf16, {1, 4, kMlaQkDim}, gpu), kv_view,
                               TensorView(wide.data(), DType::int32, {1, 4096}, gpu),
                               TensorView(out.data(), DType::fp32, {1, 4, kMlaLatentDim}, gpu), {}, {}, {}, nullptr,
                               TensorView(tiny.data(), DType::int8, {16}, gpu)),
               Error);
}

}  // namespace
}  // namespace keysel
