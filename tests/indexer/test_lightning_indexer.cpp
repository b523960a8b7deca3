// The Lightning Indexer's fast scorer against the one double-precision reference: on the stored values (tight
// fp32 tolerance), on the original values (tolerance derived from each format's rounding), every SIMD level
// against scalar, rotation invariance, selection equality, the selector, and bad input (SPEC §3, §5, §6).
#include "keysel/indexer/lightning_indexer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "keysel/core/random.h"
#include "keysel/indexer/hadamard.h"
#include "keysel/indexer/simd.h"
#include "keysel/indexer/topk.h"

namespace keysel {
namespace {

constexpr DType kFormats[] = {DType::fp32, DType::bf16, DType::fp16, DType::fp8_e4m3,
                              DType::fp8_e5m2, DType::int8, DType::int4};
constexpr double kInf = std::numeric_limits<double>::infinity();

double element_error_bound(double value, DType format, double scale) {
  const double v = std::fabs(value) / scale;
  switch (format) {
    case DType::fp32: return 0.0;
    case DType::bf16: return scale * std::max(v * 0x1p-8, 0x1p-134);
    case DType::fp16: return scale * std::max(v * 0x1p-11, 0x1p-25);
    case DType::fp8_e4m3: return scale * std::max(v * 0x1p-4, 0x1p-10);
    case DType::fp8_e5m2: return scale * std::max(v * 0x1p-3, 0x1p-17);
    default: return scale * 0.5;
  }
}

std::vector<QuantizationConfig> configs_of(DType format) {
  return {{format, ScaleGranularity::per_token, 128, false, false},
          {format, ScaleGranularity::per_group, 32, false, false},
          {format, ScaleGranularity::per_group, 64, true, false},
          {format, ScaleGranularity::per_token, 128, true, true}};
}

/// One seeded indexer problem: queries [T, HI, DI], weights [T, HI], keys [N, DI], causal positions.
struct Problem {
  std::int64_t T, HI, DI, N;
  std::vector<float> queries, weights, keys;
  std::vector<std::int32_t> positions;

  Problem(std::int64_t t, std::int64_t hi, std::int64_t di, std::int64_t n, std::uint64_t seed)
      : T(t), HI(hi), DI(di), N(n) {
    RandomStream rng(seed);
    queries.resize(static_cast<std::size_t>(T * HI * DI));
    weights.resize(static_cast<std::size_t>(T * HI));
    keys.resize(static_cast<std::size_t>(N * DI));
    rng.fill_normal(queries);
    rng.fill_normal(weights, 0.0, 1.0 / std::sqrt(static_cast<double>(HI)));
    rng.fill_normal(keys);
    for (std::int64_t s = 0; s < N; ++s) keys[static_cast<std::size_t>(s * DI + 1 % DI)] *= 8.0f;  // an outlier channel
    for (std::int64_t i = 0; i < T; ++i) positions.push_back(static_cast<std::int32_t>(std::max<std::int64_t>(0, N - 1 - 7 * (T - 1 - i))));
  }
  TensorView q() const { return TensorView(queries.data(), DType::fp32, {T, HI, DI}); }
  TensorView w() const { return TensorView(weights.data(), DType::fp32, {T, HI}); }
  TensorView pos() const { return TensorView(positions.data(), DType::int32, {T}); }
};

std::vector<float> fast_scores(const Problem& p, const QuantizationConfig& config) {
  LightningIndexer indexer(p.HI, p.DI, config);
  indexer.append_keys(p.keys.data(), p.N);
  std::vector<float> scores(static_cast<std::size_t>(p.T * p.N));
  indexer.score(p.q(), p.w(), p.pos(), TensorView(scores.data(), DType::fp32, {p.T, p.N}));
  return scores;
}

std::vector<double> reference_scores(const Problem& p, const std::vector<float>& q, const std::vector<float>& k) {
  std::vector<double> scores(static_cast<std::size_t>(p.T * p.N));
  lightning_indexer_reference(TensorView(q.data(), DType::fp32, {p.T, p.HI, p.DI}), p.w(), p.pos(),
                              TensorView(k.data(), DType::fp32, {p.N, p.DI}),
                              TensorView(scores.data(), DType::fp64, {p.T, p.N}));
  return scores;
}

/// Stored (dequantised, rotated) values of the problem under a config, and the scales of each element.
struct Stored {
  std::vector<float> q, k, q_scale, k_scale, q_exact, k_exact;  // q_exact/k_exact: rotated originals
};

Stored stored_values(const Problem& p, const QuantizationConfig& config) {
  Stored out;
  IndexerKeyCache cache(p.DI, config);
  cache.append(p.keys.data(), p.N);
  const IndexerQueries queries(p.q(), config);
  const std::int64_t group = group_channels(p.DI, config), groups = cache.groups();
  out.k.resize(p.keys.size());
  out.q.resize(p.queries.size());
  out.k_exact = p.keys;
  out.q_exact = p.queries;
  for (std::int64_t s = 0; s < p.N; ++s) {
    cache.dequantize(s, out.k.data() + s * p.DI);
    if (config.hadamard) hadamard_rotate(out.k_exact.data() + s * p.DI, p.DI);
    for (std::int64_t d = 0; d < p.DI; ++d) out.k_scale.push_back(cache.scales()[s * groups + d / group]);
  }
  for (std::int64_t r = 0; r < p.T * p.HI; ++r) {
    queries.dequantize(r / p.HI, r % p.HI, out.q.data() + r * p.DI);
    if (config.hadamard) hadamard_rotate(out.q_exact.data() + r * p.DI, p.DI);
    for (std::int64_t d = 0; d < p.DI; ++d) out.q_scale.push_back(queries.scales()[r * groups + d / group]);
  }
  return out;
}

/// M[t,s] = sum_j |w_j| sum_d |q_jd k_d|: the size of the terms a score adds up, for fp32 accumulation tolerances.
std::vector<double> magnitudes(const Problem& p, const std::vector<float>& q, const std::vector<float>& k) {
  std::vector<double> m(static_cast<std::size_t>(p.T * p.N), 0.0);
  for (std::int64_t t = 0; t < p.T; ++t)
    for (std::int64_t s = 0; s < p.N; ++s)
      for (std::int64_t j = 0; j < p.HI; ++j) {
        double dot = 0;
        for (std::int64_t d = 0; d < p.DI; ++d)
          dot += std::fabs(q[static_cast<std::size_t>((t * p.HI + j) * p.DI + d)] * k[static_cast<std::size_t>(s * p.DI + d)]);
        m[static_cast<std::size_t>(t * p.N + s)] += std::fabs(p.weights[static_cast<std::size_t>(t * p.HI + j)]) * dot;
      }
  return m;
}

const Problem& small_problem(int which) {
  static const Problem problems[] = {Problem(2, 64, 128, 70, 1), Problem(3, 5, 100, 41, 2), Problem(2, 19, 37, 33, 3),
                                     Problem(1, 16, 64, 13, 4)};
  return problems[which];
}

TEST(LightningIndexer, MatchesReferenceOnStoredValuesForEveryFormat) {
  for (int which = 0; which < 4; ++which) {
    const Problem& p = small_problem(which);
    for (DType format : kFormats) {
      for (const QuantizationConfig& config : configs_of(format)) {
        SCOPED_TRACE(config.str() + " HI " + std::to_string(p.HI) + " DI " + std::to_string(p.DI));
        const std::vector<float> fast = fast_scores(p, config);
        const Stored stored = stored_values(p, config);
        const std::vector<double> ref = reference_scores(p, stored.q, stored.k);
        const std::vector<double> m = magnitudes(p, stored.q, stored.k);
        for (std::int64_t t = 0; t < p.T; ++t) {
          for (std::int64_t s = 0; s < p.N; ++s) {
            const double r = ref[static_cast<std::size_t>(t * p.N + s)];
            const float f = fast[static_cast<std::size_t>(t * p.N + s)];
            if (s > p.positions[static_cast<std::size_t>(t)]) {
              ASSERT_EQ(f, -std::numeric_limits<float>::infinity());
              continue;
            }
            ASSERT_NEAR(f, r, 2e-5 * m[static_cast<std::size_t>(t * p.N + s)] + 1e-30) << "t " << t << " s " << s;
          }
        }
      }
    }
  }
}

TEST(LightningIndexer, WithinFormatBoundOfTheExactScores) {
  for (int which = 0; which < 3; ++which) {
    const Problem& p = small_problem(which);
    const std::vector<double> exact = reference_scores(p, p.queries, p.keys);
    for (DType format : kFormats) {
      for (const QuantizationConfig& config : configs_of(format)) {
        SCOPED_TRACE(config.str() + " HI " + std::to_string(p.HI) + " DI " + std::to_string(p.DI));
        const std::vector<float> fast = fast_scores(p, config);
        const Stored st = stored_values(p, config);
        const std::vector<double> m = magnitudes(p, st.q_exact, st.k_exact);
        for (std::int64_t t = 0; t < p.T; ++t) {
          for (std::int64_t s = 0; s <= std::min<std::int64_t>(p.positions[static_cast<std::size_t>(t)], p.N - 1); ++s) {
            // |d I| <= sum_j |w_j| sum_d (|q| e_k + |k| e_q + e_q e_k) (ReLU is 1-Lipschitz), plus fp32 accumulation.
            double bound = 0;
            for (std::int64_t j = 0; j < p.HI; ++j) {
              double dot_bound = 0;
              for (std::int64_t d = 0; d < p.DI; ++d) {
                const auto qi = static_cast<std::size_t>((t * p.HI + j) * p.DI + d), ki = static_cast<std::size_t>(s * p.DI + d);
                const double eq = element_error_bound(st.q_exact[qi], format, st.q_scale[qi]);
                const double ek = element_error_bound(st.k_exact[ki], format, st.k_scale[ki]);
                dot_bound += std::fabs(st.q_exact[qi]) * ek + std::fabs(st.k_exact[ki]) * eq + eq * ek;
              }
              bound += std::fabs(p.weights[static_cast<std::size_t>(t * p.HI + j)]) * dot_bound;
            }
            bound = bound * (1 + 1e-4) + 3e-5 * m[static_cast<std::size_t>(t * p.N + s)];
            ASSERT_NEAR(fast[static_cast<std::size_t>(t * p.N + s)], exact[static_cast<std::size_t>(t * p.N + s)], bound)
                << "t " << t << " s " << s;
          }
        }
      }
    }
  }
}

TEST(LightningIndexer, EverySimdLevelMatchesScalar) {
  std::vector<SimdLevel> levels;
  for (SimdLevel level : {SimdLevel::avx2, SimdLevel::avx512}) {
    if (simd_level_supported(level)) levels.push_back(level);
  }
  if (levels.empty()) GTEST_SKIP() << "this CPU has only the scalar path";
  for (int which = 0; which < 4; ++which) {
    const Problem& p = small_problem(which);
    for (DType format : kFormats) {
      for (const QuantizationConfig& config : configs_of(format)) {
        std::vector<float> scalar;
        {
          const ScopedSimdLevel forced(SimdLevel::scalar);
          scalar = fast_scores(p, config);
        }
        const Stored st = stored_values(p, config);
        const std::vector<double> m = magnitudes(p, st.q, st.k);
        for (SimdLevel level : levels) {
          SCOPED_TRACE(config.str() + " " + std::string(simd_level_name(level)) + " HI " + std::to_string(p.HI) +
                       " DI " + std::to_string(p.DI));
          const ScopedSimdLevel forced(level);
          const std::vector<float> simd = fast_scores(p, config);
          for (std::int64_t t = 0; t < p.T; ++t)
            for (std::int64_t s = 0; s < p.N; ++s) {
              const auto i = static_cast<std::size_t>(t * p.N + s);
              if (std::isinf(scalar[i])) {
                ASSERT_EQ(simd[i], scalar[i]);
              } else {
                ASSERT_NEAR(simd[i], scalar[i], 2e-5 * m[i] + 1e-30) << "t " << t << " s " << s;
              }
            }
        }
      }
    }
  }
}

TEST(LightningIndexer, SimdLevelCanBeForcedAndNamed) {
  EXPECT_EQ(parse_simd_level("avx2"), SimdLevel::avx2);
  EXPECT_THROW(parse_simd_level("sse9"), Error);
  EXPECT_TRUE(simd_level_supported(SimdLevel::scalar));
  {
    const ScopedSimdLevel forced(SimdLevel::scalar);
    EXPECT_EQ(simd_level(), SimdLevel::scalar);
  }
  if (!simd_level_supported(SimdLevel::avx512)) { EXPECT_THROW(set_simd_level(SimdLevel::avx512), Error); }
}

TEST(LightningIndexer, RotationLeavesFp32ScoresUnchanged) {
  for (int which = 0; which < 4; ++which) {
    const Problem& p = small_problem(which);
    const std::vector<float> plain = fast_scores(p, {DType::fp32});
    const std::vector<float> rotated = fast_scores(p, {DType::fp32, ScaleGranularity::per_token, 128, false, true});
    const std::vector<double> m = magnitudes(p, p.queries, p.keys);
    for (std::int64_t t = 0; t < p.T; ++t)
      for (std::int64_t s = 0; s <= std::min<std::int64_t>(p.positions[static_cast<std::size_t>(t)], p.N - 1); ++s) {
        const auto i = static_cast<std::size_t>(t * p.N + s);
        EXPECT_NEAR(rotated[i], plain[i], 1e-5 * m[i]) << "t " << t << " s " << s;
      }
  }
}

TEST(LightningIndexer, SelectionEqualsReferenceOnTieFreeInputs) {
  const Problem p(3, 8, 64, 400, 21);
  SelectionPolicy policy;
  policy.k = 40;
  policy.granularity = Granularity::per_token;
  for (DType format : {DType::fp32, DType::int8, DType::fp8_e4m3}) {
    const QuantizationConfig config{format};
    LightningIndexer indexer(p.HI, p.DI, config);
    indexer.append_keys(p.keys.data(), p.N);
    const Stored st = stored_values(p, config);
    std::vector<double> ref = reference_scores(p, st.q, st.k);
    // Tie-free: the k-th and (k+1)-th reference scores of every row are far apart compared to fp32 rounding.
    for (std::int64_t t = 0; t < p.T; ++t) {
      std::vector<double> row(ref.begin() + t * p.N, ref.begin() + (t + 1) * p.N);
      std::sort(row.begin(), row.end(), std::greater<>());
      ASSERT_GT(row[static_cast<std::size_t>(policy.k - 1)] - row[static_cast<std::size_t>(policy.k)],
                1e-4 * std::fabs(row[0]));
    }
    std::vector<std::int32_t> expected(static_cast<std::size_t>(p.T * policy.k)), got(expected.size(), 99);
    select_topk(TensorView(ref.data(), DType::fp64, {p.T, 1, p.N}), p.pos(), policy,
                TensorView(expected.data(), DType::int32, {p.T, 1, policy.k}));
    const SelectionCost cost = indexer.select(p.q(), p.w(), p.pos(), policy, TensorView(got.data(), DType::int32, {p.T, 1, policy.k}));
    EXPECT_EQ(got, expected) << config.str();
    double allowed = 0;
    for (std::int32_t pos : p.positions) allowed += std::min<double>(pos + 1, static_cast<double>(p.N));
    EXPECT_EQ(cost.keys_scored, allowed);
    EXPECT_EQ(cost.macs, allowed * p.HI * p.DI);
    EXPECT_EQ(cost.key_bytes_read, allowed * static_cast<double>(indexer.cache().bytes_per_token()));
  }
}

TEST(LightningIndexer, FusedSelectEqualsSelectTopkOverTheScores) {
  // Several 2048-key blocks, so that per-thread streaming top-ks are merged; kept keys in every form.
  const Problem p(3, 4, 32, 5000, 31);
  for (DType format : {DType::int8, DType::fp8_e4m3, DType::fp32}) {
    LightningIndexer indexer(p.HI, p.DI, {format});
    indexer.append_keys(p.keys.data(), p.N);
    std::vector<float> scores(static_cast<std::size_t>(p.T * p.N));
    indexer.score(p.q(), p.w(), p.pos(), TensorView(scores.data(), DType::fp32, {p.T, p.N}));
    for (const auto& [k, sink, local, on_top] : std::vector<std::tuple<int, int, int, bool>>{
             {1, 0, 0, false}, {300, 0, 0, false}, {300, 4, 64, false}, {100, 2, 16, true}, {6000, 1, 1, false}}) {
      SelectionPolicy policy;
      policy.k = k;
      policy.n_sink = sink;
      policy.n_local = local;
      policy.kept_on_top = on_top;
      std::vector<std::int32_t> expected(static_cast<std::size_t>(p.T * policy.width())), got(expected.size(), 5);
      select_topk(TensorView(scores.data(), DType::fp32, {p.T, 1, p.N}), p.pos(), policy,
                  TensorView(expected.data(), DType::int32, {p.T, 1, policy.width()}));
      indexer.select(p.q(), p.w(), p.pos(), policy, TensorView(got.data(), DType::int32, {p.T, 1, policy.width()}));
      EXPECT_EQ(got, expected) << dtype_name(format) << " k " << k << " sinks " << sink << " local " << local;
    }
  }
}

TEST(LightningIndexer, SelectorSharesOneSelectionAcrossGroups) {
  const Problem p(2, 4, 32, 50, 5);
  auto indexer = std::make_shared<LightningIndexer>(p.HI, p.DI, QuantizationConfig{DType::int8});
  indexer->append_keys(p.keys.data(), p.N);
  auto selector = make_indexer_selector(indexer, p.queries, p.weights);
  EXPECT_EQ(selector->name(), "lightning-indexer");
  // Attention inputs only carry positions and N here: q and k of any head layout.
  const std::int64_t hq = 4, hkv = 2, d = 8;
  std::vector<float> q(static_cast<std::size_t>(p.T * hq * d), 0.5f), k(static_cast<std::size_t>(p.N * hkv * d), 0.25f);
  AttentionInputs inputs;
  inputs.q = TensorView(q.data(), DType::fp32, {p.T, hq, d});
  inputs.k = TensorView(k.data(), DType::fp32, {p.N, hkv, d});
  inputs.positions = p.pos();
  SelectionPolicy policy;
  policy.k = 10;
  std::vector<std::int32_t> selection(static_cast<std::size_t>(p.T * hkv * policy.k));
  selector->select(inputs, policy, TensorView(selection.data(), DType::int32, {p.T, hkv, policy.k}));
  std::vector<std::int32_t> single(static_cast<std::size_t>(p.T * policy.k));
  indexer->select(p.q(), p.w(), p.pos(), policy, TensorView(single.data(), DType::int32, {p.T, 1, policy.k}));
  for (std::int64_t t = 0; t < p.T; ++t)
    for (std::int64_t g = 0; g < hkv; ++g)
      for (std::int64_t i = 0; i < policy.k; ++i)
        EXPECT_EQ(selection[static_cast<std::size_t>((t * hkv + g) * policy.k + i)], single[static_cast<std::size_t>(t * policy.k + i)]);
}

TEST(LightningIndexer, RejectsBadInputWritingNothing) {
  const Problem p(2, 4, 32, 20, 6);
  LightningIndexer indexer(p.HI, p.DI, {DType::fp8_e4m3});
  std::vector<float> scores(static_cast<std::size_t>(p.T * p.N), 42.0f);
  const TensorView out(scores.data(), DType::fp32, {p.T, p.N});
  const auto expect_error = [&](auto&& call, const std::string& word) {
    try {
      call();
      ADD_FAILURE() << "no throw; expected an error naming " << word;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(word), std::string::npos) << e.what();
    }
    for (float v : scores) ASSERT_EQ(v, 42.0f);
  };
  // Empty cache.
  expect_error([&] { indexer.score(p.q(), p.w(), p.pos(), out); }, "cache");
  indexer.append_keys(p.keys.data(), p.N);
  // Wrong dims, dtypes, shapes.
  std::vector<float> q_wrong(static_cast<std::size_t>(p.T * p.HI * 31));
  expect_error([&] { indexer.score(TensorView(q_wrong.data(), DType::fp32, {p.T, p.HI, 31}), p.w(), p.pos(), out); }, "queries");
  expect_error([&] { indexer.score(p.q(), TensorView(p.weights.data(), DType::fp32, {p.T, p.HI - 1}), p.pos(), out); }, "weights");
  expect_error([&] { indexer.score(p.q(), p.w(), TensorView(p.positions.data(), DType::fp32, {p.T}), out); }, "positions");
  std::vector<double> scores64(scores.size());
  expect_error([&] { indexer.score(p.q(), p.w(), p.pos(), TensorView(scores64.data(), DType::fp64, {p.T, p.N})); }, "scores");
  expect_error([&] { indexer.score(p.q(), p.w(), p.pos(), TensorView(scores.data(), DType::fp32, {p.T, p.N - 1})); }, "scores");
  // Non-finite queries and weights (they would make a NaN or infinite scale or score).
  for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    std::vector<float> q = p.queries, w = p.weights;
    q[17] = bad;
    w[3] = bad;
    expect_error([&] { indexer.score(TensorView(q.data(), DType::fp32, {p.T, p.HI, p.DI}), p.w(), p.pos(), out); }, "queries");
    expect_error([&] { indexer.score(p.q(), TensorView(w.data(), DType::fp32, {p.T, p.HI}), p.pos(), out); }, "weights");
  }
  std::vector<std::int32_t> negative = p.positions;
  negative[1] = -1;
  expect_error([&] { indexer.score(p.q(), p.w(), TensorView(negative.data(), DType::int32, {p.T}), out); }, "positions");
  // Queries quantised differently from the cache.
  const IndexerQueries other(p.q(), {DType::int8});
  expect_error([&] { lightning_indexer_scores(other, p.w(), p.pos(), indexer.cache(), out); }, "queries");
  // k out of range, wrong selection shape.
  std::vector<std::int32_t> selection(static_cast<std::size_t>(p.T * 4), 7);
  SelectionPolicy policy;
  policy.k = 0;
  EXPECT_THROW(indexer.select(p.q(), p.w(), p.pos(), policy, TensorView(selection.data(), DType::int32, {p.T, 1, 4})), Error);
  policy.k = 5;
  EXPECT_THROW(indexer.select(p.q(), p.w(), p.pos(), policy, TensorView(selection.data(), DType::int32, {p.T, 1, 4})), Error);
  for (std::int32_t v : selection) EXPECT_EQ(v, 7);
  // Bad configurations and heads.
  EXPECT_THROW(LightningIndexer(0, 32, {DType::int8}), Error);
  EXPECT_THROW(LightningIndexer(4, 32, {DType::int32}), Error);
  EXPECT_THROW(LightningIndexer(4, 32, {DType::int8, ScaleGranularity::per_group, 100}), Error);
}

}  // namespace
}  // namespace keysel
