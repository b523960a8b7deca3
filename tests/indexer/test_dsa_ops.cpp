// keysel/indexer/dsa.h on the CPU: topk_rows against select_topk row by row (SPEC §7 is §2's top-k of each
// window), the engines' cache writer against the SPEC formula, and paged_mqa_logits_reference against a direct
// double-precision evaluation from the keys before they were paged; fresh random inputs of awkward sizes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "keysel/core/dtype.h"
#include "keysel/core/error.h"
#include "keysel/core/random.h"
#include "keysel/core/selection.h"
#include "keysel/indexer/cuda_indexer.h"
#include "keysel/indexer/dsa.h"
#include "keysel/indexer/topk.h"

namespace keysel {
namespace {

constexpr std::int64_t kPage = kIndexerCacheBlock;

/// select_topk of one window: its scores copied to a row of their own, positions relative to the window.
std::vector<std::int32_t> window_topk(const std::vector<float>& row, std::int64_t start, std::int64_t end,
                                      std::int64_t k) {
  std::vector<std::int32_t> out(static_cast<std::size_t>(k), -1);
  if (end <= start) return out;
  std::vector<float> window(row.begin() + start, row.begin() + end);
  const std::int32_t last = static_cast<std::int32_t>(end - start - 1);
  SelectionPolicy policy;
  policy.k = k;
  select_topk(TensorView(window.data(), DType::fp32, {1, 1, end - start}), TensorView(&last, DType::int32, {1}),
              policy, TensorView(out.data(), DType::int32, {1, 1, k}));
  return out;
}

TEST(TopkRows, EqualsSelectTopkOfEachWindow) {
  RandomStream rng(0x5eed);
  for (const std::int64_t L : {1, 37, 2500}) {
    const std::int64_t R = 9, stride = L + 5;
    std::vector<float> logits(static_cast<std::size_t>(R * stride));
    rng.fill_normal(logits, 0.0, 1.0);
    for (std::size_t i = 0; i < logits.size(); i += 3) logits[i] = std::round(logits[i]);  // ties
    logits[4] = std::numeric_limits<float>::quiet_NaN();
    logits[6] = -std::numeric_limits<float>::infinity();
    std::vector<std::int32_t> starts(static_cast<std::size_t>(R)), ends(static_cast<std::size_t>(R));
    for (std::int64_t r = 0; r < R; ++r) {
      starts[static_cast<std::size_t>(r)] = static_cast<std::int32_t>(rng.uniform_int(static_cast<std::uint64_t>(L)));
      ends[static_cast<std::size_t>(r)] = static_cast<std::int32_t>(rng.uniform_int(static_cast<std::uint64_t>(L + 10)));
    }
    ends[0] = -3;  // empty and reversed windows give -1 rows
    const std::int64_t shape[] = {R, L};
    const std::int64_t strides[] = {stride, 1};
    for (const std::int64_t k : {1LL, 5LL, 3000LL}) {
      SCOPED_TRACE("L=" + std::to_string(L) + " k=" + std::to_string(k));
      TopkRowBounds bounds;
      bounds.starts = TensorView(starts.data(), DType::int32, {R});
      bounds.ends = TensorView(ends.data(), DType::int32, {R});
      std::vector<std::int32_t> got(static_cast<std::size_t>(R * k), 77);
      topk_rows(TensorView(logits.data(), DType::fp32, shape, strides), bounds, k,
                TensorView(got.data(), DType::int32, {R, k}));
      for (std::int64_t r = 0; r < R; ++r) {
        const std::vector<float> row(logits.begin() + r * stride, logits.begin() + r * stride + L);
        const std::int64_t start = starts[static_cast<std::size_t>(r)];
        const std::int64_t end = std::min<std::int64_t>(L, std::max<std::int64_t>(start, ends[static_cast<std::size_t>(r)]));
        const std::vector<std::int32_t> want = window_topk(row, start, end, k);
        ASSERT_EQ(std::vector<std::int32_t>(got.begin() + r * k, got.begin() + (r + 1) * k), want) << "row " << r;
      }
      // lengths with next_n = 3 (R = 9): row r reads lengths[r / 3] - 3 + r % 3 + 1 keys from its start.
      std::vector<std::int32_t> lengths = {5, static_cast<std::int32_t>(L), 2};
      TopkRowBounds by_length;
      by_length.starts = bounds.starts;
      by_length.lengths = TensorView(lengths.data(), DType::int32, {3});
      by_length.next_n = 3;
      topk_rows(TensorView(logits.data(), DType::fp32, shape, strides), by_length, k,
                TensorView(got.data(), DType::int32, {R, k}));
      for (std::int64_t r = 0; r < R; ++r) {
        const std::vector<float> row(logits.begin() + r * stride, logits.begin() + r * stride + L);
        const std::int64_t start = starts[static_cast<std::size_t>(r)];
        const std::int64_t count = lengths[static_cast<std::size_t>(r / 3)] - 3 + r % 3 + 1;
        const std::int64_t end = std::min<std::int64_t>(L, start + std::max<std::int64_t>(count, 0));
        ASSERT_EQ(std::vector<std::int32_t>(got.begin() + r * k, got.begin() + (r + 1) * k),
                  window_topk(row, start, end, k))
            << "row " << r;
      }
    }
  }
}

TEST(TopkRows, RejectsBadArguments) {
  std::vector<float> logits(20);
  std::vector<std::int32_t> ends = {3, 4}, out(8, 9);
  TopkRowBounds bounds;
  bounds.ends = TensorView(ends.data(), DType::int32, {2});
  const TensorView l(logits.data(), DType::fp32, {2, 10});
  const TensorView o(out.data(), DType::int32, {2, 4});
  EXPECT_THROW(topk_rows(l, TopkRowBounds{}, 4, o), Error);                  // neither ends nor lengths
  EXPECT_THROW(topk_rows(l, bounds, 0, o), Error);                           // k < 1
  EXPECT_THROW(topk_rows(l, bounds, 3, o), Error);                           // out is [2, 4]
  const std::int64_t shape[] = {2, 5};
  const std::int64_t strides[] = {10, 2};
  EXPECT_THROW(topk_rows(TensorView(logits.data(), DType::fp32, shape, strides), bounds, 4, o), Error);
  TopkRowBounds odd;
  odd.lengths = TensorView(ends.data(), DType::int32, {1});
  odd.next_n = 3;                                                            // 2 rows: 3 does not divide
  EXPECT_THROW(topk_rows(l, odd, 4, o), Error);
  for (std::int32_t v : out) EXPECT_EQ(v, 9);
  EXPECT_THROW(topk_rows_cuda_workspace_bytes(-1, 4), Error);
}

TEST(IndexerCacheWriter, WritesTheSpecFormula) {
  RandomStream rng(91);
  for (const std::int64_t D : {64, 128}) {
    for (const bool ue8m0 : {true, false}) {
      const std::int64_t T = 100, pages = 3;
      std::vector<float> k(static_cast<std::size_t>(T * D));
      rng.fill_normal(k, 0.0, 3.0);
      for (std::int64_t d = 0; d < D; ++d) k[static_cast<std::size_t>(7 * D + d)] = 0.0f;  // amax 0: the floor
      std::vector<std::int32_t> slots(static_cast<std::size_t>(T));
      std::vector<std::int32_t> order(static_cast<std::size_t>(pages * kPage));
      std::iota(order.begin(), order.end(), 0);
      rng.shuffle(std::span<std::int32_t>(order));
      for (std::int64_t t = 0; t < T; ++t) slots[static_cast<std::size_t>(t)] = t % 11 == 5 ? -1 : order[static_cast<std::size_t>(t)];
      std::vector<std::uint8_t> cache(static_cast<std::size_t>(pages * kPage * (D + 4)), 0xA5);
      const std::vector<std::uint8_t> before = cache;
      indexer_k_quant_and_cache(TensorView(k.data(), DType::fp32, {T, D}),
                                TensorView(cache.data(), DType::fp8_e4m3, {pages, kPage, 1, D + 4}),
                                TensorView(slots.data(), DType::int32, {T}), ue8m0);
      std::vector<bool> written(static_cast<std::size_t>(pages * kPage), false);
      for (std::int64_t t = 0; t < T; ++t) {
        const std::int32_t slot = slots[static_cast<std::size_t>(t)];
        if (slot < 0) continue;
        written[static_cast<std::size_t>(slot)] = true;
        float amax = 0.0f;
        for (std::int64_t d = 0; d < D; ++d) amax = std::max(amax, std::abs(k[static_cast<std::size_t>(t * D + d)]));
        float scale = std::max(amax, 1e-4f) / 448.0f;
        if (ue8m0) scale = std::exp2(std::ceil(std::log2(static_cast<double>(scale))));  // exact in double here
        const std::uint8_t* page = cache.data() + (slot / kPage) * kPage * (D + 4);
        float stored = 0.0f;
        std::memcpy(&stored, page + kPage * D + 4 * (slot % kPage), 4);
        ASSERT_EQ(stored, scale) << "token " << t;
        for (std::int64_t d = 0; d < D; ++d) {
          ASSERT_EQ(page[(slot % kPage) * D + d], fp32_to_fp8_e4m3(k[static_cast<std::size_t>(t * D + d)] / scale))
              << "token " << t << " channel " << d;
        }
      }
      for (std::int64_t slot = 0; slot < pages * kPage; ++slot) {  // other slots untouched
        if (written[static_cast<std::size_t>(slot)]) continue;
        const std::int64_t base = (slot / kPage) * kPage * (D + 4);
        for (std::int64_t d = 0; d < D; ++d) {
          ASSERT_EQ(cache[static_cast<std::size_t>(base + (slot % kPage) * D + d)], 0xA5);
        }
      }
      slots[3] = static_cast<std::int32_t>(pages * kPage);  // out of range: refused before anything is written
      const std::vector<std::uint8_t> snapshot = cache;
      EXPECT_THROW(indexer_k_quant_and_cache(TensorView(k.data(), DType::fp32, {T, D}),
                                             TensorView(cache.data(), DType::fp8_e4m3, {pages, kPage * (D + 4)}),
                                             TensorView(slots.data(), DType::int32, {T}), ue8m0),
                   Error);
      EXPECT_EQ(cache, snapshot);
      (void)before;
    }
  }
}

TEST(PagedMqaLogitsReference, MatchesTheKeysBeforePaging) {
  RandomStream rng(17);
  const std::int64_t B = 2, next_n = 2, H = 16, D = 64, max_len = 150, N = 170;
  const std::int64_t max_pages = 3, pages = B * max_pages + 1;
  std::vector<std::int32_t> table = {4, 0, 6, 2, 5, 1};
  std::vector<std::int32_t> lens = {150, 70};
  std::vector<std::uint8_t> cache(static_cast<std::size_t>(pages * kPage * (D + 4)), 0);
  std::vector<std::vector<float>> keys(B), scales(B);
  for (std::int64_t b = 0; b < B; ++b) {
    keys[b].resize(static_cast<std::size_t>(max_len * D));
    scales[b].resize(static_cast<std::size_t>(max_len));
    for (std::int64_t s = 0; s < max_len; ++s) {
      const std::int64_t page = table[static_cast<std::size_t>(b * max_pages + s / kPage)];
      std::uint8_t* base = cache.data() + page * kPage * (D + 4);
      for (std::int64_t d = 0; d < D; ++d) {
        const std::uint8_t code = fp32_to_fp8_e4m3(static_cast<float>(rng.normal(0.0, 2.0)));
        base[(s % kPage) * D + d] = code;
        keys[b][static_cast<std::size_t>(s * D + d)] = fp8_e4m3_to_fp32(code);
      }
      const float scale = static_cast<float>(rng.uniform(0.01, 0.1));
      std::memcpy(base + kPage * D + 4 * (s % kPage), &scale, 4);
      scales[b][static_cast<std::size_t>(s)] = scale;
    }
  }
  std::vector<std::uint8_t> q(static_cast<std::size_t>(B * next_n * H * D));
  for (auto& x : q) x = fp32_to_fp8_e4m3(static_cast<float>(rng.normal(0.0, 1.0)));
  std::vector<float> w(static_cast<std::size_t>(B * next_n * H));
  rng.fill_normal(w, 0.0, 0.3);
  std::vector<double> logits(static_cast<std::size_t>(B * next_n * N));
  paged_mqa_logits_reference(TensorView(q.data(), DType::fp8_e4m3, {B, next_n, H, D}),
                             TensorView(w.data(), DType::fp32, {B * next_n, H}),
                             TensorView(cache.data(), DType::fp8_e4m3, {pages, kPage * (D + 4)}),
                             TensorView(table.data(), DType::int32, {B, max_pages}),
                             TensorView(lens.data(), DType::int32, {B}),
                             TensorView(logits.data(), DType::fp64, {B * next_n, N}));
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t i = 0; i < next_n; ++i) {
      const std::int64_t r = b * next_n + i, limit = lens[static_cast<std::size_t>(b)] - next_n + i + 1;
      for (std::int64_t s = 0; s < N; ++s) {
        const double got = logits[static_cast<std::size_t>(r * N + s)];
        if (s >= limit) {
          ASSERT_TRUE(std::isinf(got) && got < 0) << "row " << r << " key " << s;
          continue;
        }
        double want = 0.0;
        for (std::int64_t h = 0; h < H; ++h) {
          double dot = 0.0;
          for (std::int64_t d = 0; d < D; ++d) {
            dot += static_cast<double>(fp8_e4m3_to_fp32(q[static_cast<std::size_t>((r * H + h) * D + d)])) *
                   keys[b][static_cast<std::size_t>(s * D + d)];
          }
          want += w[static_cast<std::size_t>(r * H + h)] * std::max(dot, 0.0);
        }
        want *= scales[b][static_cast<std::size_t>(s)];
        ASSERT_NEAR(got, want, 1e-12 * (std::abs(want) + 1.0)) << "row " << r << " key " << s;
      }
    }
  }
  table[1] = 99;  // a page outside the cache on a key that is read
  EXPECT_THROW(paged_mqa_logits_reference(TensorView(q.data(), DType::fp8_e4m3, {B, next_n, H, D}),
                                          TensorView(w.data(), DType::fp32, {B * next_n, H}),
                                          TensorView(cache.data(), DType::fp8_e4m3, {pages, kPage * (D + 4)}),
                                          TensorView(table.data(), DType::int32, {B, max_pages}),
                                          TensorView(lens.data(), DType::int32, {B}),
                                          TensorView(logits.data(), DType::fp64, {B * next_n, N})),
               Error);
}

TEST(RaggedMqaLogitsReference, IsThePagedReferenceInsideEachRange) {
  // One key array, also laid out as pages in order; row t of the ragged logits reads [starts[t], ends[t]), which is
  // the paged reference of a sequence of ends[t] keys (same table for every row) with the keys below starts[t] cut.
  RandomStream rng(23);
  const std::int64_t M = 6, H = 32, D = 128, N = 150, pages = (N + kPage - 1) / kPage;
  std::vector<std::uint8_t> values(static_cast<std::size_t>(N * D));
  for (auto& x : values) x = fp32_to_fp8_e4m3(static_cast<float>(rng.normal(0.0, 2.0)));
  std::vector<float> scales(static_cast<std::size_t>(N));
  for (auto& x : scales) x = static_cast<float>(rng.uniform(0.01, 0.1));
  std::vector<std::uint8_t> cache(static_cast<std::size_t>(pages * kPage * (D + 4)), 0);
  for (std::int64_t s = 0; s < N; ++s) {
    std::uint8_t* base = cache.data() + (s / kPage) * kPage * (D + 4);
    std::memcpy(base + (s % kPage) * D, values.data() + s * D, static_cast<std::size_t>(D));
    std::memcpy(base + kPage * D + 4 * (s % kPage), &scales[static_cast<std::size_t>(s)], 4);
  }
  std::vector<std::uint8_t> q(static_cast<std::size_t>(M * H * D));
  for (auto& x : q) x = fp32_to_fp8_e4m3(static_cast<float>(rng.normal(0.0, 1.0)));
  std::vector<float> w(static_cast<std::size_t>(M * H));
  rng.fill_normal(w, 0.0, 0.3);
  const std::vector<std::int32_t> starts = {0, 70, -5, 64, 100, 3};
  const std::vector<std::int32_t> ends = {150, 149, 10, 64, 200, 2};  // row 3 and row 5 empty, row 4 past N
  std::vector<double> ragged(static_cast<std::size_t>(M * N));
  ragged_mqa_logits_reference(TensorView(q.data(), DType::fp8_e4m3, {M, H, D}), TensorView(w.data(), DType::fp32, {M, H}),
                              TensorView(values.data(), DType::fp8_e4m3, {N, D}),
                              TensorView(scales.data(), DType::fp32, {N}), TensorView(starts.data(), DType::int32, {M}),
                              TensorView(ends.data(), DType::int32, {M}), TensorView(ragged.data(), DType::fp64, {M, N}));
  std::vector<std::int32_t> table(static_cast<std::size_t>(M * pages));
  for (std::int64_t t = 0; t < M; ++t) {
    for (std::int64_t j = 0; j < pages; ++j) table[static_cast<std::size_t>(t * pages + j)] = static_cast<std::int32_t>(j);
  }
  std::vector<std::int32_t> lens(ends.begin(), ends.end());
  for (auto& x : lens) x = std::max<std::int32_t>(0, std::min<std::int32_t>(x, static_cast<std::int32_t>(N)));
  std::vector<double> paged(static_cast<std::size_t>(M * N));
  paged_mqa_logits_reference(TensorView(q.data(), DType::fp8_e4m3, {M, 1, H, D}), TensorView(w.data(), DType::fp32, {M, H}),
                             TensorView(cache.data(), DType::fp8_e4m3, {pages, kPage * (D + 4)}),
                             TensorView(table.data(), DType::int32, {M, pages}), TensorView(lens.data(), DType::int32, {M}),
                             TensorView(paged.data(), DType::fp64, {M, N}));
  std::int64_t finite = 0;
  for (std::int64_t t = 0; t < M; ++t) {
    for (std::int64_t s = 0; s < N; ++s) {
      const double got = ragged[static_cast<std::size_t>(t * N + s)];
      if (s < starts[static_cast<std::size_t>(t)] || s >= ends[static_cast<std::size_t>(t)]) {
        ASSERT_TRUE(std::isinf(got) && got < 0) << "row " << t << " key " << s;
      } else {
        ++finite;
        ASSERT_EQ(got, paged[static_cast<std::size_t>(t * N + s)]) << "row " << t << " key " << s;
      }
    }
  }
  EXPECT_EQ(finite, 150 + 79 + 10 + 50);
  std::vector<float> narrow(static_cast<std::size_t>(M * (N - 1)));
  EXPECT_THROW(ragged_mqa_logits_reference(TensorView(q.data(), DType::fp8_e4m3, {M, H, D}),
                                           TensorView(w.data(), DType::fp32, {M, H}),
                                           TensorView(values.data(), DType::fp8_e4m3, {N, D}),
                                           TensorView(scales.data(), DType::fp32, {N}),
                                           TensorView(starts.data(), DType::int32, {M}),
                                           TensorView(ends.data(), DType::int32, {M}),
                                           TensorView(narrow.data(), DType::fp32, {M, N - 1})),
               Error);
}

}  // namespace
}  // namespace keysel
