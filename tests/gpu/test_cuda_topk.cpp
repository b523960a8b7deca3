// select_topk_cuda against the CPU select_topk (SPEC §2): identical selections on fresh random scores of awkward
// sizes, with heavy ties, NaN, infinities and signed zeros, and every policy form.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "gpu_test_support.h"
#include "keysel/core/random.h"
#include "keysel/indexer/cuda_topk.h"
#include "keysel/indexer/topk.h"

namespace keysel {
namespace {

using keysel::testing::poisoned;
using keysel::testing::to_device;
using keysel::testing::to_host;

enum class Values { normal, few_distinct, specials };

struct Case {
  std::int64_t T, G, N;
  SelectionPolicy policy;
  Values values;
};

std::vector<float> make_scores(RandomStream& rng, std::int64_t count, Values values) {
  std::vector<float> scores(static_cast<std::size_t>(count));
  rng.fill_normal(scores, 0.5, 2.0);
  for (float& s : scores) {
    if (values == Values::few_distinct) s = std::round(s);  // ~10 distinct values: huge ties at the threshold
    if (values == Values::specials) {
      const double u = rng.uniform();
      if (u < 0.05) s = std::numeric_limits<float>::quiet_NaN();
      else if (u < 0.07) s = -std::numeric_limits<float>::infinity();
      else if (u < 0.08) s = std::numeric_limits<float>::infinity();
      else if (u < 0.12) s = 0.0f;
      else if (u < 0.16) s = -0.0f;
      else if (u < 0.20) s = 1e30f;  // beyond fp16: one coarse bucket
    }
  }
  return scores;
}

void check_case(const Case& c, std::uint64_t seed) {
  SCOPED_TRACE("T=" + std::to_string(c.T) + " G=" + std::to_string(c.G) + " N=" + std::to_string(c.N) +
               " k=" + std::to_string(c.policy.k) + " sink=" + std::to_string(c.policy.n_sink) +
               " local=" + std::to_string(c.policy.n_local) + " on_top=" + std::to_string(c.policy.kept_on_top) +
               " values=" + std::to_string(static_cast<int>(c.values)));
  RandomStream rng(seed);
  const std::vector<float> scores = make_scores(rng, c.T * c.G * c.N, c.values);
  std::vector<std::int32_t> positions(static_cast<std::size_t>(c.T));
  for (auto& p : positions) {
    // Mostly the whole row, sometimes shorter, sometimes past the end.
    const double u = rng.uniform();
    if (c.N == 0) {
      p = static_cast<std::int32_t>(u < 0.5 ? 0 : 7);
    } else {
      p = static_cast<std::int32_t>(u < 0.5 ? c.N - 1 : (u < 0.9 ? rng.uniform_int(static_cast<std::uint64_t>(c.N)) : c.N + 3));
    }
  }
  const std::int64_t width = c.policy.width();
  std::vector<std::int32_t> expected(static_cast<std::size_t>(c.T * c.G * width));
  select_topk(TensorView(scores.data(), DType::fp32, {c.T, c.G, c.N}),
              TensorView(positions.data(), DType::int32, {c.T}), c.policy,
              TensorView(expected.data(), DType::int32, {c.T, c.G, width}));

  const CudaBuffer d_scores = to_device(scores);
  const CudaBuffer d_positions = to_device(positions);
  // The second run takes its scratch from a caller's workspace (poisoned: its contents must not matter).
  const std::int64_t workspace_bytes = select_topk_cuda_workspace_bytes(c.T, c.G, c.N);
  CudaBuffer d_workspace = poisoned<std::int8_t>(workspace_bytes, 0x7F);
  for (int run = 0; run < 2; ++run) {  // twice: the result must not depend on what the buffer held
    CudaBuffer d_selection = poisoned<std::int32_t>(c.T * c.G * width, run == 0 ? 0xA5 : 0x5A);
    const TensorView workspace =
        run == 0 ? TensorView{} : TensorView(d_workspace.data(), DType::int8, {workspace_bytes}, Device::cuda());
    select_topk_cuda(TensorView(d_scores.data(), DType::fp32, {c.T, c.G, c.N}, Device::cuda()),
                     TensorView(d_positions.data(), DType::int32, {c.T}, Device::cuda()), c.policy,
                     TensorView(d_selection.data(), DType::int32, {c.T, c.G, width}, Device::cuda()), nullptr,
                     workspace);
    cuda_synchronize();
    const std::vector<std::int32_t> got = to_host<std::int32_t>(d_selection);
    ASSERT_EQ(got.size(), expected.size());
    std::int64_t mismatches = 0, first = -1;
    for (std::size_t i = 0; i < got.size(); ++i) {
      if (got[i] != expected[i]) {
        if (first < 0) first = static_cast<std::int64_t>(i);
        ++mismatches;
      }
    }
    ASSERT_EQ(mismatches, 0) << "first mismatch at flat index " << first << ": got " << got[first] << ", expected "
                             << expected[first];
  }
}

SelectionPolicy policy(std::int64_t k, std::int64_t sink = 0, std::int64_t local = 0, bool on_top = false) {
  SelectionPolicy p;
  p.k = k;
  p.n_sink = sink;
  p.n_local = local;
  p.kept_on_top = on_top;
  return p;
}

TEST(CudaTopk, MatchesCpuOnAwkwardShapes) {
  KEYSEL_REQUIRE_GPU();
  const std::vector<Case> cases = {
      {3, 2, 1000, policy(7), Values::normal},
      {2, 3, 997, policy(1), Values::normal},
      {4, 1, 5003, policy(2048), Values::normal},
      {3, 1, 100, policy(2048), Values::normal},  // k > N: padding
      {5, 2, 4099, policy(300, 4, 64), Values::normal},
      {3, 2, 4099, policy(300, 4, 64, true), Values::normal},
      {2, 1, 20000, policy(3000, 0, 0), Values::specials},
      {2, 2, 9001, policy(517, 2, 5), Values::specials},
      {1, 1, 0, policy(5), Values::normal},  // no keys at all
      {1, 2, 8192, policy(8192), Values::normal},
      {1, 1, 33, policy(40, 30, 10), Values::normal},  // kept keys fill the row
  };
  std::uint64_t seed = 1;
  for (const Case& c : cases) check_case(c, seed++);
}

TEST(CudaTopk, HeavyTiesPreferLowerPositions) {
  KEYSEL_REQUIRE_GPU();
  // ~10 distinct values over 70k keys: the threshold bucket overflows shared memory and the radix rounds re-read
  // the row; which of the tied keys are taken is decided by position alone.
  check_case({2, 1, 70001, policy(2048), Values::few_distinct}, 101);
  check_case({1, 3, 30000, policy(9000, 1, 1), Values::few_distinct}, 102);
  check_case({2, 1, 50000, policy(100), Values::few_distinct}, 103);
}

TEST(CudaTopk, LargeRowsAndLargeK) {
  KEYSEL_REQUIRE_GPU();
  check_case({1, 1, 131072, policy(2048), Values::normal}, 201);
  check_case({64, 1, 4096 + 17, policy(2048), Values::normal}, 202);
  check_case({1, 1, 1 << 20, policy(2048), Values::normal}, 203);
  check_case({2, 1, 300000, policy(65536), Values::normal}, 204);
  check_case({2, 1, 300000, policy(2048), Values::few_distinct}, 205);  // bucket beyond shared memory
}

TEST(CudaTopk, SeveralBlocksPerRowAndOnePerRow) {
  KEYSEL_REQUIRE_GPU();
  // Few long rows take the segmented path (several thread blocks per row), many rows one block per row: both
  // with every policy form.
  check_case({3, 2, 40000, policy(3000, 4, 64), Values::normal}, 301);
  check_case({2, 1, 50000, policy(700, 3, 100, true), Values::specials}, 302);
  check_case({1, 1, 20000, policy(30000), Values::normal}, 303);  // k > N
  check_case({3, 1, 65536, policy(1), Values::few_distinct}, 304);
  check_case({200, 1, 20000, policy(2048, 2, 16), Values::specials}, 305);
  check_case({140, 1, 17000, policy(500), Values::few_distinct}, 306);
}

TEST(CudaTopk, RejectsBadArguments) {
  KEYSEL_REQUIRE_GPU();
  const std::int64_t T = 2, G = 1, N = 64;
  CudaBuffer scores = poisoned<float>(T * G * N, 0);
  CudaBuffer positions = poisoned<std::int32_t>(T, 0);
  CudaBuffer selection = poisoned<std::int32_t>(T * G * 8, 0xA5);
  const TensorView s(scores.data(), DType::fp32, {T, G, N}, Device::cuda());
  const TensorView p(positions.data(), DType::int32, {T}, Device::cuda());
  const TensorView out(selection.data(), DType::int32, {T, G, 8}, Device::cuda());
  EXPECT_THROW(select_topk_cuda(s, p, policy(0), out), Error);          // k out of range
  EXPECT_THROW(select_topk_cuda(s, p, policy(4), out), Error);          // width mismatch
  std::vector<float> host_scores(static_cast<std::size_t>(T * G * N));
  const TensorView host_view(host_scores.data(), DType::fp32, {T, G, N}, Device::cuda());  // a host pointer
  EXPECT_THROW(select_topk_cuda(host_view, p, policy(8), out), Error);
  const TensorView cpu_view(host_scores.data(), DType::fp32, {T, G, N});
  EXPECT_THROW(select_topk_cuda(cpu_view, p, policy(8), out), Error);
  const std::int64_t need = select_topk_cuda_workspace_bytes(T, G, N);
  CudaBuffer workspace = poisoned<std::int8_t>(need + 16, 0);
  const TensorView small(workspace.data(), DType::int8, {need - 1}, Device::cuda());
  EXPECT_THROW(select_topk_cuda(s, p, policy(8), out, nullptr, small), Error);  // too small
  const TensorView unaligned(static_cast<std::int8_t*>(workspace.data()) + 4, DType::int8, {need}, Device::cuda());
  EXPECT_THROW(select_topk_cuda(s, p, policy(8), out, nullptr, unaligned), Error);
  std::vector<std::int8_t> host_workspace(static_cast<std::size_t>(need));
  const TensorView on_host(host_workspace.data(), DType::int8, {need});
  EXPECT_THROW(select_topk_cuda(s, p, policy(8), out, nullptr, on_host), Error);  // not on the GPU
  EXPECT_THROW(select_topk_cuda_workspace_bytes(-1, 1, 1), Error);
  EXPECT_THROW(select_topk_cuda_workspace_bytes(1LL << 40, 1LL << 40, 1), Error);  // overflow
  const std::vector<std::int32_t> untouched = to_host<std::int32_t>(selection);
  for (std::int32_t v : untouched) EXPECT_EQ(static_cast<std::uint32_t>(v), 0xA5A5A5A5u);
}

}  // namespace
}  // namespace keysel
