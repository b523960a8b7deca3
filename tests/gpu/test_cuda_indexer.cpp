// lightning_indexer_logits_cuda against keysel::lightning_indexer_reference (double precision) fed with the
// decoded fp8 values (keysel::fp8_e4m3_to_fp32) times the per-token scales: decode over paged and contiguous
// caches, prefill (many query tokens of one or two sequences), HI of 32/64/128, DI of 64/128; and the decode selection
// against select_topk on the same logits; the ragged prefill (DeepGEMM's fp8_mqa_logits) against
// ragged_mqa_logits_reference.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "gpu_test_support.h"
#include "keysel/core/dtype.h"
#include "keysel/core/random.h"
#include "keysel/indexer/cuda_indexer.h"
#include "keysel/indexer/dsa.h"
#include "keysel/indexer/lightning_indexer.h"
#include "keysel/indexer/topk.h"

namespace keysel {
namespace {

using keysel::testing::poisoned;
using keysel::testing::to_device;
using keysel::testing::to_host;

constexpr std::int64_t kB = kIndexerCacheBlock;

struct Case {
  std::int64_t rows, HI, DI, N;
  bool paged;
  bool prefill;  // rows are query tokens of a sequence (runs of 3 rows per sequence, round robin)
  std::int64_t prefill_sequences = 1;
};

struct Problem {
  std::vector<std::uint8_t> q;        // [R, HI, DI] fp8
  std::vector<float> weights;         // [R, HI]
  std::vector<std::uint8_t> cache;    // [num_blocks, 64 * (DI + 4)]: per page 64 x DI fp8, then 64 fp32 scales
  std::vector<std::int32_t> table;    // [S, max_blocks] (paged)
  std::vector<std::int32_t> positions, sequence_of_row;
  std::vector<std::uint8_t> keys;     // [S, N, DI] fp8 (logical order)
  std::vector<float> key_scales;      // [S, N]
  std::int64_t sequences = 0, num_blocks = 0, max_blocks = 0;
};

Problem make_problem(const Case& c, std::uint64_t seed) {
  RandomStream rng(seed);
  Problem p;
  p.sequences = c.prefill ? c.prefill_sequences : c.rows;
  const std::int64_t S = p.sequences;
  p.q.resize(static_cast<std::size_t>(c.rows * c.HI * c.DI));
  for (auto& x : p.q) x = fp32_to_fp8_e4m3(static_cast<float>(rng.normal(0.0, 2.0)));
  p.weights.resize(static_cast<std::size_t>(c.rows * c.HI));
  for (auto& w : p.weights) w = static_cast<float>(rng.normal(0.0, 0.2));
  p.keys.resize(static_cast<std::size_t>(S * c.N * c.DI));
  for (auto& x : p.keys) x = fp32_to_fp8_e4m3(static_cast<float>(rng.normal(0.0, 1.0)));
  p.key_scales.resize(static_cast<std::size_t>(S * c.N));
  for (auto& s : p.key_scales) s = static_cast<float>(rng.uniform(0.005, 0.05));
  const std::int64_t blocks_per_sequence = (c.N + kB - 1) / kB;
  p.max_blocks = blocks_per_sequence + (c.paged ? 2 : 0);
  p.num_blocks = c.paged ? S * p.max_blocks + 5 : S * blocks_per_sequence;
  std::vector<std::int32_t> block_of(static_cast<std::size_t>(S * blocks_per_sequence));
  if (c.paged) {
    std::vector<std::int32_t> order(static_cast<std::size_t>(p.num_blocks));
    std::iota(order.begin(), order.end(), 0);
    rng.shuffle(std::span<std::int32_t>(order));
    p.table.assign(static_cast<std::size_t>(S * p.max_blocks), 0);
    std::size_t next = 0;
    for (std::int64_t s = 0; s < S; ++s) {
      for (std::int64_t j = 0; j < p.max_blocks; ++j) {
        const std::int32_t block = order[next++];
        p.table[static_cast<std::size_t>(s * p.max_blocks + j)] = block;
        if (j < blocks_per_sequence) block_of[static_cast<std::size_t>(s * blocks_per_sequence + j)] = block;
      }
    }
  } else {
    std::iota(block_of.begin(), block_of.end(), 0);
  }
  const std::int64_t page_bytes = kB * (c.DI + 4);
  p.cache.assign(static_cast<std::size_t>(p.num_blocks * page_bytes), 0x7E);  // unowned: large values
  for (std::int64_t s = 0; s < S; ++s) {
    for (std::int64_t t = 0; t < c.N; ++t) {
      const std::int64_t block = block_of[static_cast<std::size_t>(s * blocks_per_sequence + t / kB)];
      std::uint8_t* page = p.cache.data() + block * page_bytes;
      std::memcpy(page + (t % kB) * c.DI, p.keys.data() + (s * c.N + t) * c.DI, static_cast<std::size_t>(c.DI));
      std::memcpy(page + kB * c.DI + (t % kB) * 4, &p.key_scales[static_cast<std::size_t>(s * c.N + t)], 4);
    }
  }
  p.positions.resize(static_cast<std::size_t>(c.rows));
  p.sequence_of_row.assign(static_cast<std::size_t>(c.rows), 0);
  for (std::int64_t r = 0; r < c.rows; ++r) {
    if (c.prefill) {
      p.positions[static_cast<std::size_t>(r)] = static_cast<std::int32_t>(c.N - c.rows + r);
      p.sequence_of_row[static_cast<std::size_t>(r)] = static_cast<std::int32_t>((r / 3) % S);
    } else {
      const double u = rng.uniform();
      p.positions[static_cast<std::size_t>(r)] = static_cast<std::int32_t>(
          u < 0.4 ? c.N - 1 : (u < 0.9 ? rng.uniform_int(static_cast<std::uint64_t>(c.N)) : c.N + 10));
      p.sequence_of_row[static_cast<std::size_t>(r)] = static_cast<std::int32_t>(r);
    }
  }
  return p;
}

struct Views {
  CudaBuffer q, weights, cache, table, positions, sequence_of_row;
  CudaIndexerKeyCache key_cache;
  TensorView qv, wv, pv, sv;
};

Views upload(const Case& c, const Problem& p) {
  Views v;
  v.q = to_device(p.q);
  v.weights = to_device(p.weights);
  v.cache = to_device(p.cache);
  v.positions = to_device(p.positions);
  v.sequence_of_row = to_device(p.sequence_of_row);
  v.qv = TensorView(v.q.data(), DType::fp8_e4m3, {c.rows, c.HI, c.DI}, Device::cuda());
  v.wv = TensorView(v.weights.data(), DType::fp32, {c.rows, c.HI}, Device::cuda());
  v.pv = TensorView(v.positions.data(), DType::int32, {c.rows}, Device::cuda());
  if (c.prefill) v.sv = TensorView(v.sequence_of_row.data(), DType::int32, {c.rows}, Device::cuda());
  v.key_cache.blocks = TensorView(v.cache.data(), DType::fp8_e4m3, {p.num_blocks, kB * (c.DI + 4)}, Device::cuda());
  if (c.paged) {
    v.table = to_device(p.table);
    v.key_cache.block_table =
        TensorView(v.table.data(), DType::int32, {p.sequences, p.max_blocks}, Device::cuda());
  }
  return v;
}

std::int64_t sequences_of(const Case& c) { return c.prefill ? c.prefill_sequences : c.rows; }

void check_case(const Case& c, std::uint64_t seed) {
  SCOPED_TRACE("R=" + std::to_string(c.rows) + " HI=" + std::to_string(c.HI) + " DI=" + std::to_string(c.DI) +
               " N=" + std::to_string(c.N) + " paged=" + std::to_string(c.paged) +
               " prefill=" + std::to_string(c.prefill) + " sequences=" + std::to_string(sequences_of(c)));
  const Problem p = make_problem(c, seed);
  Views v = upload(c, p);
  CudaBuffer d_logits = poisoned<float>(c.rows * c.N, 0xFF);
  lightning_indexer_logits_cuda(v.qv, v.wv, v.key_cache, v.pv,
                                TensorView(d_logits.data(), DType::fp32, {c.rows, c.N}, Device::cuda()), v.sv);
  cuda_synchronize();
  const std::vector<float> got = to_host<float>(d_logits);

  std::vector<double> qd(static_cast<std::size_t>(c.HI * c.DI)), wd(static_cast<std::size_t>(c.HI));
  std::vector<double> kd(static_cast<std::size_t>(c.N * c.DI)), ref(static_cast<std::size_t>(c.N));
  std::int64_t checked = 0;
  for (std::int64_t r = 0; r < c.rows; ++r) {
    const std::int64_t seq = p.sequence_of_row[static_cast<std::size_t>(r)];
    for (std::int64_t i = 0; i < c.HI * c.DI; ++i) {
      qd[static_cast<std::size_t>(i)] = fp8_e4m3_to_fp32(p.q[static_cast<std::size_t>(r * c.HI * c.DI + i)]);
    }
    for (std::int64_t j = 0; j < c.HI; ++j) wd[static_cast<std::size_t>(j)] = p.weights[static_cast<std::size_t>(r * c.HI + j)];
    for (std::int64_t s = 0; s < c.N; ++s) {
      const double scale = p.key_scales[static_cast<std::size_t>(seq * c.N + s)];
      for (std::int64_t d = 0; d < c.DI; ++d) {
        kd[static_cast<std::size_t>(s * c.DI + d)] =
            scale * fp8_e4m3_to_fp32(p.keys[static_cast<std::size_t>((seq * c.N + s) * c.DI + d)]);
      }
    }
    const std::int32_t position = p.positions[static_cast<std::size_t>(r)];
    lightning_indexer_reference(TensorView(qd.data(), DType::fp64, {1, c.HI, c.DI}),
                                TensorView(wd.data(), DType::fp64, {1, c.HI}),
                                TensorView(&position, DType::int32, {1}),
                                TensorView(kd.data(), DType::fp64, {c.N, c.DI}),
                                TensorView(ref.data(), DType::fp64, {1, c.N}));
    for (std::int64_t s = 0; s < c.N; ++s) {
      const double g = got[static_cast<std::size_t>(r * c.N + s)];
      const double want = ref[static_cast<std::size_t>(s)];
      if (s > position) {
        ASSERT_TRUE(std::isinf(g) && g < 0) << "row " << r << " key " << s << " beyond pos " << position << ": " << g;
        continue;
      }
      // Error bound: fp32 accumulation of exact fp8 products, relative to the sum of magnitudes.
      double magnitude = 0.0;
      for (std::int64_t j = 0; j < c.HI; ++j) {
        double dot_abs = 0.0;
        for (std::int64_t d = 0; d < c.DI; ++d) {
          dot_abs += std::abs(qd[static_cast<std::size_t>(j * c.DI + d)] * kd[static_cast<std::size_t>(s * c.DI + d)]);
        }
        magnitude += std::abs(wd[static_cast<std::size_t>(j)]) * dot_abs;
      }
      ASSERT_TRUE(std::isfinite(g)) << "row " << r << " key " << s << " not written";
      ASSERT_NEAR(g, want, 1e-3 * magnitude + 1e-6) << "row " << r << " key " << s;
      ++checked;
    }
  }
  EXPECT_GT(checked, 0);
}

TEST(CudaLightningIndexer, DecodeMatchesReference) {
  KEYSEL_REQUIRE_GPU();
  std::uint64_t seed = 51;
  check_case({5, 64, 128, 1000, true, false}, seed++);
  check_case({3, 32, 64, 777, false, false}, seed++);
  check_case({2, 128, 128, 3000, true, false}, seed++);
  check_case({4, 64, 64, 130, true, false}, seed++);
  check_case({1, 64, 128, 64 * 70 + 1, false, false}, seed++);
  check_case({3, 16, 128, 2100, true, false}, seed++);
  check_case({2, 16, 64, 999, false, false}, seed++);
}

TEST(CudaLightningIndexer, PrefillMatchesReference) {
  KEYSEL_REQUIRE_GPU();
  check_case({37, 64, 128, 1500, true, true}, 71);
  check_case({20, 32, 128, 700, false, true}, 72);
  check_case({45, 128, 64, 900, true, true}, 73);
  check_case({9, 32, 64, 2000, false, true}, 74);
  // Query rows of two sequences interleaved in runs of 3: row groups that span both are served row by row.
  check_case({30, 64, 128, 1300, true, true, 2}, 75);
  check_case({14, 128, 128, 1100, false, true, 2}, 76);
  check_case({33, 16, 128, 1200, true, true}, 77);
  check_case({17, 16, 64, 600, false, true, 2}, 78);
}

TEST(CudaLightningIndexer, DecodeTopkMatchesSelectTopkOnTheLogits) {
  KEYSEL_REQUIRE_GPU();
  const Case c{6, 64, 128, 20000, true, false};
  const Problem p = make_problem(c, 81);
  Views v = upload(c, p);
  CudaBuffer d_logits = poisoned<float>(c.rows * c.N, 0xFF);
  lightning_indexer_logits_cuda(v.qv, v.wv, v.key_cache, v.pv,
                                TensorView(d_logits.data(), DType::fp32, {c.rows, c.N}, Device::cuda()));
  SelectionPolicy policy;
  policy.k = 2048;
  policy.n_sink = 4;
  policy.n_local = 128;
  CudaBuffer d_selection = poisoned<std::int32_t>(c.rows * policy.width(), 0xA5);
  lightning_indexer_topk_cuda(v.qv, v.wv, v.key_cache, v.pv, c.N, policy,
                              TensorView(d_selection.data(), DType::int32, {c.rows, 1, policy.width()}, Device::cuda()));
  cuda_synchronize();
  const std::vector<float> logits = to_host<float>(d_logits);
  std::vector<std::int32_t> expected(static_cast<std::size_t>(c.rows * policy.width()));
  select_topk(TensorView(logits.data(), DType::fp32, {c.rows, 1, c.N}),
              TensorView(p.positions.data(), DType::int32, {c.rows}), policy,
              TensorView(expected.data(), DType::int32, {c.rows, 1, policy.width()}));
  EXPECT_EQ(to_host<std::int32_t>(d_selection), expected);
}

TEST(CudaLightningIndexer, RejectsBadArguments) {
  KEYSEL_REQUIRE_GPU();
  const Case c{2, 64, 128, 200, false, false};
  const Problem p = make_problem(c, 91);
  Views v = upload(c, p);
  CudaBuffer d_logits = poisoned<float>(c.rows * c.N, 0xFF);
  const TensorView logits(d_logits.data(), DType::fp32, {c.rows, c.N}, Device::cuda());
  const TensorView q48(v.q.data(), DType::fp8_e4m3, {c.rows, 48, c.DI}, Device::cuda());
  EXPECT_THROW(lightning_indexer_logits_cuda(q48, v.wv, v.key_cache, v.pv, logits), Error);
  const TensorView q_misaligned(static_cast<std::uint8_t*>(v.q.data()) + 4, DType::fp8_e4m3, {c.rows, c.HI, c.DI},
                                Device::cuda());
  EXPECT_THROW(lightning_indexer_logits_cuda(q_misaligned, v.wv, v.key_cache, v.pv, logits), Error);
  const TensorView w_cpu(p.weights.data(), DType::fp32, {c.rows, c.HI});
  EXPECT_THROW(lightning_indexer_logits_cuda(v.qv, w_cpu, v.key_cache, v.pv, logits), Error);
  const TensorView logits_short(d_logits.data(), DType::fp32, {c.rows, c.N + 64}, Device::cuda());
  EXPECT_THROW(lightning_indexer_logits_cuda(v.qv, v.wv, v.key_cache, v.pv, logits_short), Error);
  for (float x : to_host<float>(d_logits)) EXPECT_TRUE(std::isnan(x));
}

// ---- the engines' entry points: paged MQA logits with next_n, the fused top-k, top-k over ranged rows ----------

struct MqaCase {
  std::int64_t B, next_n, HI, DI, max_len;
  bool lens_per_row;
};

void check_paged_mqa(const MqaCase& c, std::uint64_t seed) {
  SCOPED_TRACE("B=" + std::to_string(c.B) + " next_n=" + std::to_string(c.next_n) + " HI=" + std::to_string(c.HI) +
               " DI=" + std::to_string(c.DI) + " max_len=" + std::to_string(c.max_len) +
               " lens_per_row=" + std::to_string(c.lens_per_row));
  RandomStream rng(seed);
  const std::int64_t R = c.B * c.next_n;
  const std::int64_t max_blocks = (c.max_len + kB - 1) / kB + 1;
  const std::int64_t num_blocks = c.B * max_blocks + 3;
  // Keys written by the engines' writer (bf16-like values as fp32), slots through a shuffled block table.
  std::vector<std::uint8_t> cache(static_cast<std::size_t>(num_blocks * kB * (c.DI + 4)), 0);
  std::vector<std::int32_t> order(static_cast<std::size_t>(num_blocks));
  std::iota(order.begin(), order.end(), 0);
  rng.shuffle(std::span<std::int32_t>(order));
  std::vector<std::int32_t> table(static_cast<std::size_t>(c.B * max_blocks));
  for (std::size_t i = 0; i < table.size(); ++i) table[i] = order[i];
  std::vector<std::int32_t> lens(static_cast<std::size_t>(c.lens_per_row ? R : c.B));
  std::vector<std::int32_t> seq_len(static_cast<std::size_t>(c.B));
  for (std::int64_t b = 0; b < c.B; ++b) {
    seq_len[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(
        c.next_n + rng.uniform_int(static_cast<std::uint64_t>(c.max_len - c.next_n + 1)));
  }
  for (std::int64_t b = 0; b < c.B; ++b) {
    const std::int64_t len = seq_len[static_cast<std::size_t>(b)];
    std::vector<float> keys(static_cast<std::size_t>(len * c.DI));
    rng.fill_normal(keys, 0.0, 1.0);
    std::vector<std::int32_t> slots(static_cast<std::size_t>(len));
    for (std::int64_t s = 0; s < len; ++s) {
      slots[static_cast<std::size_t>(s)] = table[static_cast<std::size_t>(b * max_blocks + s / kB)] * kB + s % kB;
    }
    indexer_k_quant_and_cache(TensorView(keys.data(), DType::fp32, {len, c.DI}),
                              TensorView(cache.data(), DType::fp8_e4m3, {num_blocks, kB * (c.DI + 4)}),
                              TensorView(slots.data(), DType::int32, {len}));
    if (c.lens_per_row) {
      for (std::int64_t i = 0; i < c.next_n; ++i) {
        lens[static_cast<std::size_t>(b * c.next_n + i)] = static_cast<std::int32_t>(len - c.next_n + i + 1 -
                                                                                      (i == 0 ? 1 : 0));
      }
    } else {
      lens[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(len);
    }
  }
  std::vector<std::uint8_t> q(static_cast<std::size_t>(R * c.HI * c.DI));
  for (auto& x : q) x = fp32_to_fp8_e4m3(static_cast<float>(rng.normal(0.0, 2.0)));
  std::vector<float> weights(static_cast<std::size_t>(R * c.HI));
  for (auto& w : weights) w = static_cast<float>(rng.normal(0.0, 0.2));
  const std::int64_t N = c.max_len + 37;  // logits wider than any context

  std::vector<double> expected(static_cast<std::size_t>(R * N));
  const TensorView lens_view = c.lens_per_row ? TensorView(lens.data(), DType::int32, {c.B, c.next_n})
                                              : TensorView(lens.data(), DType::int32, {c.B});
  paged_mqa_logits_reference(TensorView(q.data(), DType::fp8_e4m3, {c.B, c.next_n, c.HI, c.DI}),
                             TensorView(weights.data(), DType::fp32, {R, c.HI}),
                             TensorView(cache.data(), DType::fp8_e4m3, {num_blocks, kB * (c.DI + 4)}),
                             TensorView(table.data(), DType::int32, {c.B, max_blocks}), lens_view,
                             TensorView(expected.data(), DType::fp64, {R, N}, Device::cpu()));
  // The sum of |terms| of each logit: the same reference over |q|, |w| and |k| (fp8 sign bits cleared).
  std::vector<std::uint8_t> q_abs = q, cache_abs = cache;
  for (auto& x : q_abs) x &= 0x7F;
  for (std::int64_t page = 0; page < num_blocks; ++page) {
    for (std::int64_t i = 0; i < kB * c.DI; ++i) cache_abs[static_cast<std::size_t>(page * kB * (c.DI + 4) + i)] &= 0x7F;
  }
  std::vector<float> weights_abs = weights;
  for (auto& w : weights_abs) w = std::abs(w);
  std::vector<double> magnitude(static_cast<std::size_t>(R * N));
  paged_mqa_logits_reference(TensorView(q_abs.data(), DType::fp8_e4m3, {c.B, c.next_n, c.HI, c.DI}),
                             TensorView(weights_abs.data(), DType::fp32, {R, c.HI}),
                             TensorView(cache_abs.data(), DType::fp8_e4m3, {num_blocks, kB * (c.DI + 4)}),
                             TensorView(table.data(), DType::int32, {c.B, max_blocks}), lens_view,
                             TensorView(magnitude.data(), DType::fp64, {R, N}, Device::cpu()));

  const CudaBuffer d_q = to_device(q), d_w = to_device(weights), d_cache = to_device(cache),
                   d_table = to_device(table), d_lens = to_device(lens);
  CudaIndexerKeyCache kc;
  kc.blocks = TensorView(d_cache.data(), DType::fp8_e4m3, {num_blocks, kB, 1, c.DI + 4}, Device::cuda());
  kc.block_table = TensorView(d_table.data(), DType::int32, {c.B, max_blocks}, Device::cuda());
  const TensorView qv(d_q.data(), DType::fp8_e4m3, {c.B, c.next_n, c.HI, c.DI}, Device::cuda());
  const TensorView wv(d_w.data(), DType::fp32, {R, c.HI}, Device::cuda());
  const TensorView lv = c.lens_per_row ? TensorView(d_lens.data(), DType::int32, {c.B, c.next_n}, Device::cuda())
                                       : TensorView(d_lens.data(), DType::int32, {c.B}, Device::cuda());
  CudaBuffer d_logits = poisoned<float>(R * N, 0xFF);
  paged_mqa_logits_cuda(qv, wv, kc, lv, TensorView(d_logits.data(), DType::fp32, {R, N}, Device::cuda()));
  constexpr std::int64_t k = 300;
  CudaBuffer d_selection = poisoned<std::int32_t>(R * k, 0xA5);
  paged_mqa_topk_cuda(qv, wv, kc, lv, N, k, TensorView(d_selection.data(), DType::int32, {R, k}, Device::cuda()));
  cuda_synchronize();
  const std::vector<float> got = to_host<float>(d_logits);
  for (std::int64_t i = 0; i < R * N; ++i) {
    const double want = expected[static_cast<std::size_t>(i)];
    const double g = got[static_cast<std::size_t>(i)];
    if (std::isinf(want)) {
      ASSERT_TRUE(std::isinf(g) && g < 0) << "row " << i / N << " key " << i % N << ": " << g;
    } else {
      // fp8 tensor-core products are exact, their accumulation keeps about 14 bits per MMA step on Hopper (as the
      // DeepSeek-V3 report measured): 1e-3 of the sum of |terms| bounds it with room (as check_case above).
      ASSERT_NEAR(g, want, 1e-3 * magnitude[static_cast<std::size_t>(i)] + 1e-6)
          << "row " << i / N << " key " << i % N;
    }
  }
  // The fused selection is topk_rows over the same logits (row r reads its context's keys).
  std::vector<std::int32_t> expected_selection(static_cast<std::size_t>(R * k));
  TopkRowBounds bounds;
  std::vector<std::int32_t> row_lens(static_cast<std::size_t>(R));
  for (std::int64_t r = 0; r < R; ++r) {
    row_lens[static_cast<std::size_t>(r)] =
        c.lens_per_row ? lens[static_cast<std::size_t>(r)]
                       : lens[static_cast<std::size_t>(r / c.next_n)] - static_cast<std::int32_t>(c.next_n - 1 - r % c.next_n);
  }
  bounds.lengths = TensorView(row_lens.data(), DType::int32, {R});
  topk_rows(TensorView(got.data(), DType::fp32, {R, N}), bounds, k,
            TensorView(expected_selection.data(), DType::int32, {R, k}, Device::cpu()));
  EXPECT_EQ(to_host<std::int32_t>(d_selection), expected_selection);
}

TEST(CudaPagedMqa, LogitsAndTopkMatchReference) {
  KEYSEL_REQUIRE_GPU();
  std::uint64_t seed = 1001;
  check_paged_mqa({3, 1, 64, 128, 3000, false}, seed++);
  check_paged_mqa({2, 2, 32, 128, 1500, false}, seed++);
  check_paged_mqa({4, 3, 16, 64, 700, false}, seed++);
  check_paged_mqa({2, 4, 128, 128, 900, true}, seed++);
  check_paged_mqa({5, 1, 16, 128, 5000, false}, seed++);
  check_paged_mqa({1, 2, 64, 64, 130, true}, seed++);
}

struct RaggedCase {
  std::int64_t M, HI, DI, N;
  int ranges;  // 0: ragged causal prefill of two sequences laid end to end; 1: random ranges (mid-block starts,
               // empty rows, starts < 0, ends > N), different within every row group
};

/// ragged_mqa_logits_cuda against ragged_mqa_logits_reference (double): keys inside each row's range within 1e-3 of
/// the sum of |terms|, -inf everywhere else (the output starts as NaN bytes, so an unwritten entry fails).
void check_ragged_mqa(const RaggedCase& c, std::uint64_t seed) {
  SCOPED_TRACE("M=" + std::to_string(c.M) + " HI=" + std::to_string(c.HI) + " DI=" + std::to_string(c.DI) +
               " N=" + std::to_string(c.N) + " ranges=" + std::to_string(c.ranges));
  RandomStream rng(seed);
  const std::int64_t M = c.M, N = c.N;
  std::vector<std::uint8_t> q(static_cast<std::size_t>(M * c.HI * c.DI)), keys(static_cast<std::size_t>(N * c.DI));
  for (auto& x : q) x = fp32_to_fp8_e4m3(static_cast<float>(rng.normal(0.0, 2.0)));
  for (auto& x : keys) x = fp32_to_fp8_e4m3(static_cast<float>(rng.normal(0.0, 2.0)));
  std::vector<float> weights(static_cast<std::size_t>(M * c.HI)), scales(static_cast<std::size_t>(N));
  for (auto& w : weights) w = static_cast<float>(rng.normal(0.0, 0.2));
  for (auto& x : scales) x = static_cast<float>(0.01 + 0.05 * rng.uniform());
  std::vector<std::int32_t> starts(static_cast<std::size_t>(M)), ends(static_cast<std::size_t>(M));
  for (std::int64_t t = 0; t < M; ++t) {
    const auto i = static_cast<std::size_t>(t);
    if (c.ranges == 0) {
      // Sequence 0 has keys [0, N0) and queries [0, M0); sequence 1 keys [N0, N), queries [M0, M); query t of a
      // sequence with Q queries and K keys reads its keys up to K - Q + t (causal, the last query reads all).
      const std::int64_t M0 = M / 3, N0 = N / 3 + 5;
      const bool first = t < M0;
      const std::int64_t q_here = first ? M0 : M - M0, k_here = first ? N0 : N - N0, base = first ? 0 : N0;
      const std::int64_t index = first ? t : t - M0;
      starts[i] = static_cast<std::int32_t>(base);
      ends[i] = static_cast<std::int32_t>(base + std::max<std::int64_t>(k_here - q_here + index + 1, 0));
    } else {
      const std::int64_t a = static_cast<std::int64_t>(rng.uniform_int(static_cast<std::uint64_t>(N + 20))) - 10;
      const std::int64_t len = static_cast<std::int64_t>(rng.uniform_int(static_cast<std::uint64_t>(N / 2 + 80)));
      starts[i] = static_cast<std::int32_t>(a);
      ends[i] = static_cast<std::int32_t>(t % 7 == 3 ? a - 1 : a + len);  // some rows empty
    }
  }
  const auto reference = [&](const std::vector<std::uint8_t>& qq, const std::vector<float>& ww,
                             const std::vector<std::uint8_t>& kk, std::vector<double>& out) {
    out.assign(static_cast<std::size_t>(M * N), 0.0);
    ragged_mqa_logits_reference(TensorView(qq.data(), DType::fp8_e4m3, {M, c.HI, c.DI}),
                                TensorView(ww.data(), DType::fp32, {M, c.HI}),
                                TensorView(kk.data(), DType::fp8_e4m3, {N, c.DI}),
                                TensorView(scales.data(), DType::fp32, {N}), TensorView(starts.data(), DType::int32, {M}),
                                TensorView(ends.data(), DType::int32, {M}),
                                TensorView(out.data(), DType::fp64, {M, N}, Device::cpu()));
  };
  std::vector<double> expected, magnitude;
  reference(q, weights, keys, expected);
  std::vector<std::uint8_t> q_abs = q, keys_abs = keys;
  for (auto& x : q_abs) x &= 0x7F;
  for (auto& x : keys_abs) x &= 0x7F;
  std::vector<float> weights_abs = weights;
  for (auto& w : weights_abs) w = std::abs(w);
  reference(q_abs, weights_abs, keys_abs, magnitude);

  const CudaBuffer d_q = to_device(q), d_w = to_device(weights), d_k = to_device(keys), d_s = to_device(scales),
                   d_starts = to_device(starts), d_ends = to_device(ends);
  CudaBuffer d_logits = poisoned<float>(M * N, 0xFF);
  ragged_mqa_logits_cuda(TensorView(d_q.data(), DType::fp8_e4m3, {M, c.HI, c.DI}, Device::cuda()),
                         TensorView(d_w.data(), DType::fp32, {M, c.HI}, Device::cuda()),
                         TensorView(d_k.data(), DType::fp8_e4m3, {N, c.DI}, Device::cuda()),
                         TensorView(d_s.data(), DType::fp32, {N}, Device::cuda()),
                         TensorView(d_starts.data(), DType::int32, {M}, Device::cuda()),
                         TensorView(d_ends.data(), DType::int32, {M}, Device::cuda()),
                         TensorView(d_logits.data(), DType::fp32, {M, N}, Device::cuda()));
  cuda_synchronize();
  const std::vector<float> got = to_host<float>(d_logits);
  std::int64_t inside = 0;
  for (std::int64_t i = 0; i < M * N; ++i) {
    const std::int64_t t = i / N, s = i % N;
    const bool in_range = s >= starts[static_cast<std::size_t>(t)] && s < ends[static_cast<std::size_t>(t)];
    const double g = got[static_cast<std::size_t>(i)];
    if (!in_range) {
      ASSERT_TRUE(std::isinf(g) && g < 0) << "row " << t << " key " << s << ": " << g;
    } else {
      ++inside;
      ASSERT_NEAR(g, expected[static_cast<std::size_t>(i)], 1e-3 * magnitude[static_cast<std::size_t>(i)] + 1e-6)
          << "row " << t << " key " << s;
    }
  }
  EXPECT_GT(inside, 0);
}

TEST(CudaRaggedMqa, LogitsMatchReference) {
  KEYSEL_REQUIRE_GPU();
  std::uint64_t seed = 3001;
  check_ragged_mqa({37, 64, 128, 1000, 0}, seed++);   // causal, N not a multiple of 64
  check_ragged_mqa({37, 64, 128, 1000, 1}, seed++);   // random ranges, empty rows
  check_ragged_mqa({50, 32, 64, 130, 1}, seed++);
  check_ragged_mqa({9, 128, 128, 77, 1}, seed++);     // one group, two blocks, tail of 13 keys
  check_ragged_mqa({70, 16, 128, 4100, 0}, seed++);
  check_ragged_mqa({19, 16, 64, 333, 1}, seed++);
  check_ragged_mqa({200, 64, 128, 150, 0}, seed++);   // more queries than keys in sequence 0: empty causal rows
}

TEST(CudaRaggedMqa, RejectsBadArguments) {
  KEYSEL_REQUIRE_GPU();
  const std::int64_t M = 4, HI = 16, DI = 64, N = 100;
  const CudaBuffer d_q = poisoned<std::uint8_t>(M * HI * DI, 0), d_w = poisoned<float>(M * HI, 0),
                   d_k = poisoned<std::uint8_t>(N * DI, 0), d_s = poisoned<float>(N, 0),
                   d_b = poisoned<std::int32_t>(M, 0), d_l = poisoned<float>(M * N, 0);
  const TensorView q(d_q.data(), DType::fp8_e4m3, {M, HI, DI}, Device::cuda());
  const TensorView w(d_w.data(), DType::fp32, {M, HI}, Device::cuda());
  const TensorView k(d_k.data(), DType::fp8_e4m3, {N, DI}, Device::cuda());
  const TensorView s(d_s.data(), DType::fp32, {N}, Device::cuda());
  const TensorView b(d_b.data(), DType::int32, {M}, Device::cuda());
  const TensorView l(d_l.data(), DType::fp32, {M, N}, Device::cuda());
  const TensorView wrong_k(d_k.data(), DType::fp8_e4m3, {N / 2, 2 * DI}, Device::cuda());
  const TensorView short_scales(d_s.data(), DType::fp32, {N - 1}, Device::cuda());
  const TensorView narrow_logits(d_l.data(), DType::fp32, {M, N - 1}, Device::cuda());
  EXPECT_THROW(ragged_mqa_logits_cuda(q, w, wrong_k, s, b, b, l), Error);
  EXPECT_THROW(ragged_mqa_logits_cuda(q, w, k, short_scales, b, b, l), Error);
  EXPECT_THROW(ragged_mqa_logits_cuda(q, w, k, s, b, b, narrow_logits), Error);
  EXPECT_THROW(ragged_mqa_logits_cuda(q, w, k, s, TensorView(d_b.data(), DType::int32, {M - 1}, Device::cuda()), b, l),
               Error);
}

TEST(CudaTopkRows, RangedRowsMatchCpu) {
  KEYSEL_REQUIRE_GPU();
  RandomStream rng(2024);
  for (const std::int64_t R : {1, 5, 70}) {
    for (const std::int64_t L : {100, 5000, 40000}) {
      for (int mode = 0; mode < 3; ++mode) {  // ends, lengths, lengths with next_n = 2
        SCOPED_TRACE("R=" + std::to_string(R) + " L=" + std::to_string(L) + " mode=" + std::to_string(mode));
        const std::int64_t next_n = mode == 2 && R % 2 == 0 ? 2 : 1;
        const std::int64_t stride = L + 3;  // rows not 16-byte aligned
        std::vector<float> logits(static_cast<std::size_t>(R * stride));
        rng.fill_normal(logits, 0.0, 1.0);
        for (std::size_t i = 0; i < logits.size(); i += 7) logits[i] = std::round(logits[i]);  // ties
        std::vector<std::int32_t> starts(static_cast<std::size_t>(R)), ends(static_cast<std::size_t>(R));
        for (std::int64_t r = 0; r < R; ++r) {
          starts[static_cast<std::size_t>(r)] = static_cast<std::int32_t>(rng.uniform_int(static_cast<std::uint64_t>(L / 3 + 1)));
          ends[static_cast<std::size_t>(r)] = static_cast<std::int32_t>(
              starts[static_cast<std::size_t>(r)] + rng.uniform_int(static_cast<std::uint64_t>(L - starts[static_cast<std::size_t>(r)] + 5)));
        }
        std::vector<std::int32_t> lengths(static_cast<std::size_t>(R / next_n));
        for (auto& x : lengths) x = static_cast<std::int32_t>(next_n + rng.uniform_int(static_cast<std::uint64_t>(L / 2)));
        TopkRowBounds host, device;
        const CudaBuffer d_logits = to_device(logits), d_starts = to_device(starts), d_ends = to_device(ends),
                         d_lengths = to_device(lengths);
        host.starts = TensorView(starts.data(), DType::int32, {R});
        device.starts = TensorView(d_starts.data(), DType::int32, {R}, Device::cuda());
        if (mode == 0) {
          host.ends = TensorView(ends.data(), DType::int32, {R});
          device.ends = TensorView(d_ends.data(), DType::int32, {R}, Device::cuda());
        } else {
          host.lengths = TensorView(lengths.data(), DType::int32, {R / next_n});
          device.lengths = TensorView(d_lengths.data(), DType::int32, {R / next_n}, Device::cuda());
          host.next_n = device.next_n = next_n;
        }
        for (const std::int64_t k : {1LL, 7LL, 2048LL}) {
          const std::int64_t shape[] = {R, L};
          const std::int64_t strides[] = {stride, 1};
          std::vector<std::int32_t> expected(static_cast<std::size_t>(R * k));
          topk_rows(TensorView(logits.data(), DType::fp32, shape, strides), host, k,
                    TensorView(expected.data(), DType::int32, {R, k}, Device::cpu()));
          CudaBuffer d_selection = poisoned<std::int32_t>(R * k, 0xA5);
          topk_rows_cuda(TensorView(d_logits.data(), DType::fp32, shape, strides, Device::cuda()), device, k,
                         TensorView(d_selection.data(), DType::int32, {R, k}, Device::cuda()));
          cuda_synchronize();
          EXPECT_EQ(to_host<std::int32_t>(d_selection), expected) << "k=" << k;
        }
      }
    }
  }
}

}  // namespace
}  // namespace keysel
