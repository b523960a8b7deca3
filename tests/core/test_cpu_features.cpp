// The one CPU-feature module (keysel/core/cpu_features.h): detection, the KEYSEL_SIMD override (one parser, one
// error, in every kernel family), the throughput-based kernel choice on this CPU and on described ones (AMD Zen
// 4, Intel Sapphire Rapids, AVX-512 without BF16, AVX2 only), and every indexer implementation this CPU runs
// against the scalar one on awkward sizes.
#include "keysel/core/cpu_features.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <iostream>
#include <string>
#include <vector>

#include "keysel/attention/sparse_attention.h"
#include "keysel/core/error.h"
#include "keysel/core/random.h"
#include "keysel/core/threads.h"
#include "keysel/indexer/fast_topk.h"
#include "keysel/indexer/lightning_indexer.h"
#include "keysel/indexer/simd.h"

namespace keysel {
namespace {

std::uint64_t bits_of(std::initializer_list<CpuFeature> features) {
  std::uint64_t bits = 0;
  for (const CpuFeature f : features) bits |= std::uint64_t{1} << static_cast<unsigned>(f);
  return bits;
}

CpuFeatures avx2_cpu() {
  CpuFeatures cpu;
  cpu.vendor = "GenuineIntel";
  cpu.model_name = "an AVX2 CPU";
  cpu.family = 6;
  cpu.model = 0x9E;
  cpu.bits = bits_of({CpuFeature::sse4_2, CpuFeature::avx, CpuFeature::avx2, CpuFeature::fma, CpuFeature::f16c});
  return cpu;
}

CpuFeatures avx512_cpu_without_bf16() {  // Skylake-SP: AVX-512 F/BW/VL/DQ/CD, no VNNI, no BF16
  CpuFeatures cpu = avx2_cpu();
  cpu.model_name = "an AVX-512 CPU without VNNI and BF16";
  cpu.model = 0x55;
  cpu.bits |= bits_of({CpuFeature::avx512f, CpuFeature::avx512bw, CpuFeature::avx512vl, CpuFeature::avx512dq,
                       CpuFeature::avx512cd});
  return cpu;
}

CpuFeatures zen4_cpu() {
  CpuFeatures cpu = avx512_cpu_without_bf16();
  cpu.vendor = "AuthenticAMD";
  cpu.model_name = "AMD EPYC 9654";
  cpu.family = 0x19;
  cpu.model = 0x11;
  cpu.set(CpuFeature::avx512_vnni).set(CpuFeature::avx512_bf16);
  return cpu;
}

CpuFeatures sapphire_rapids_cpu() {
  CpuFeatures cpu = zen4_cpu();
  cpu.vendor = "GenuineIntel";
  cpu.model_name = "Intel Xeon Platinum 8480+";
  cpu.family = 6;
  cpu.model = 0x8F;
  cpu.set(CpuFeature::avx512_fp16).set(CpuFeature::amx_tile).set(CpuFeature::amx_bf16).set(CpuFeature::amx_int8);
  return cpu;
}

MacRates rates_of(std::initializer_list<std::pair<MacOp, double>> entries) {
  MacRates rates;
  rates.source = "test";
  for (const auto& [op, rate] : entries) rates.rate[static_cast<std::size_t>(op)] = rate;
  return rates;
}

// The implementations of one indexer format family, as simd.cpp lists them.
const KernelOption kBf16Options[] = {{"avx512_bf16", SimdLevel::avx512, MacOp::dpbf16_zmm},
                                     {"avx512_fma", SimdLevel::avx512, MacOp::fma_zmm},
                                     {"avx2_fma", SimdLevel::avx2, MacOp::fma_ymm},
                                     {"scalar", SimdLevel::scalar, MacOp::scalar}};
const KernelOption kIntegerOptions[] = {{"avx512_vnni", SimdLevel::avx512, MacOp::dpbusd_zmm},
                                        {"avx512_fma", SimdLevel::avx512, MacOp::fma_zmm},
                                        {"avx2_madd16", SimdLevel::avx2, MacOp::madd16_ymm},
                                        {"scalar", SimdLevel::scalar, MacOp::scalar}};

std::string_view chosen(std::span<const KernelOption> options, const CpuFeatures& cpu, const MacRates& rates,
                        SimdLevel level) {
  return options[choose_kernel(options, cpu, rates, level)].name;
}

// ---- detection and level ----------------------------------------------------------------------------------

TEST(CpuFeatures, ThisCpuIsDescribedAndItsLevelIsSupported) {
  const CpuFeatures& cpu = cpu_features();
  std::cout << "[ cpu      ] " << cpu.str() << "\n[ level    ] best " << simd_level_name(best_simd_level())
            << ", in use " << simd_level_name(simd_level()) << "\n[ rates    ] " << mac_rates().source << ":";
  for (std::size_t i = 0; i < kMacOpCount; ++i) {
    std::cout << ' ' << mac_op_name(static_cast<MacOp>(i)) << '=' << mac_rates().rate[i];
  }
  std::cout << "\n[ indexer  ] fp32 " << indexer_kernel_name(DType::fp32) << ", bf16 "
            << indexer_kernel_name(DType::bf16) << ", fp8_e4m3 " << indexer_kernel_name(DType::fp8_e4m3) << ", int8 "
            << indexer_kernel_name(DType::int8) << "\n";
  EXPECT_EQ(cpu.max_level(), best_simd_level());
  EXPECT_TRUE(simd_level_supported(best_simd_level()));
  EXPECT_TRUE(simd_level_supported(simd_level()));
  EXPECT_TRUE(simd_level_supported(SimdLevel::scalar));
  EXPECT_FALSE(mac_rates().source.empty());
#if defined(__x86_64__)
  EXPECT_FALSE(cpu.vendor.empty());
  EXPECT_TRUE(cpu.has(CpuFeature::sse4_2));  // every x86-64 CPU keysel is meant for
#endif
  // A level's features imply the lower levels'.
  if (cpu.supports(SimdLevel::avx512)) {
    EXPECT_TRUE(cpu.supports(SimdLevel::avx2));
  }
  for (const SimdLevel level : kSimdLevels) {
    EXPECT_EQ(simd_level_supported(level), cpu.missing_for(level).empty()) << simd_level_name(level);
  }
}

TEST(CpuFeatures, LevelsNeedTheirFeaturesOnly) {
  EXPECT_EQ(avx2_cpu().max_level(), SimdLevel::avx2);
  EXPECT_EQ(avx2_cpu().missing_for(SimdLevel::avx512), "avx512f, avx512bw, avx512vl, avx512dq");
  // AVX-512 without VNNI and BF16 is still the avx512 level: the plain AVX-512 top-k and attention kernels run
  // there (they need F/BW/VL/DQ only).
  EXPECT_EQ(avx512_cpu_without_bf16().max_level(), SimdLevel::avx512);
  CpuFeatures no_dq = avx512_cpu_without_bf16();
  no_dq.set(CpuFeature::avx512dq, false);
  EXPECT_EQ(no_dq.max_level(), SimdLevel::avx2);
  EXPECT_EQ(no_dq.missing_for(SimdLevel::avx512), "avx512dq");
  CpuFeatures no_f16c = avx2_cpu();
  no_f16c.set(CpuFeature::f16c, false);
  EXPECT_EQ(no_f16c.max_level(), SimdLevel::scalar);
  EXPECT_NE(zen4_cpu().str().find("avx512_bf16"), std::string::npos);
}

TEST(KeyselSimd, OneParserOneError) {
  const CpuFeatures avx2 = avx2_cpu();
  EXPECT_EQ(detail::simd_level_from_environment(nullptr, avx2), SimdLevel::avx2);
  EXPECT_EQ(detail::simd_level_from_environment("", avx2), SimdLevel::avx2);
  EXPECT_EQ(detail::simd_level_from_environment("scalar", avx2), SimdLevel::scalar);
  EXPECT_EQ(detail::simd_level_from_environment("avx2", avx2), SimdLevel::avx2);
  EXPECT_EQ(detail::simd_level_from_environment("avx512", zen4_cpu()), SimdLevel::avx512);
  const auto message = [](const char* value, const CpuFeatures& cpu) {
    try {
      detail::simd_level_from_environment(value, cpu);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  // Unknown: the variable, the value and the levels.
  for (const char* value : {"avx9", "AVX2", "avx2 ", "sse4"}) {
    const std::string m = message(value, avx2);
    EXPECT_NE(m.find("KEYSEL_SIMD"), std::string::npos) << m;
    EXPECT_NE(m.find(std::string("\"") + value + "\""), std::string::npos) << m;
    EXPECT_NE(m.find("scalar, avx2"), std::string::npos) << m;
  }
  // Unsupported: the variable, the value, what is missing and the supported levels.
  const std::string m = message("avx512", avx2);
  EXPECT_NE(m.find("KEYSEL_SIMD=\"avx512\""), std::string::npos) << m;
  EXPECT_NE(m.find("avx512f"), std::string::npos) << m;
  EXPECT_NE(m.find("supported levels: scalar, avx2"), std::string::npos) << m;
  EXPECT_NE(message("avx2", CpuFeatures{}).find("supported levels: scalar"), std::string::npos);
}

/// In a fresh process with KEYSEL_SIMD=`value`: every family throws the same keysel::Error naming the variable and
/// the value. Exits 0 when so.
[[noreturn]] void check_environment_error(const std::string& value) {
  std::string first;
  int failures = 0;
  const auto expect_error = [&](auto&& call) {
    try {
      call();
      ++failures;
    } catch (const Error& e) {
      const std::string m = e.what();
      if (first.empty()) first = m;
      if (m != first || m.find("KEYSEL_SIMD") == std::string::npos || m.find(value) == std::string::npos) ++failures;
    }
  };
  expect_error([] { (void)simd_level(); });                               // core
  expect_error([] { (void)default_attention_kernel(); });                 // attention
  expect_error([] { (void)indexer_kernel_name(DType::fp8_e4m3); });       // indexer
  expect_error([] {                                                       // top-k
    const float q[4] = {1, 2, 3, 4}, k[8] = {1, 0, 0, 0, 0, 1, 0, 0};
    float scores[1];
    std::int64_t ids[1];
    inner_product_topk(1, q, 2, k, 4, 1, scores, ids);
  });
  std::exit(failures == 0 ? 0 : 1);
}

TEST(KeyselSimd, EnvironmentErrorIsTheSameInEveryFamily) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");  // a fresh process reads the variable anew
  std::vector<std::string> values = {"avx9"};
  if (!simd_level_supported(SimdLevel::avx512)) values.push_back("avx512");
  for (const std::string& value : values) {
    ::setenv("KEYSEL_SIMD", value.c_str(), 1);
    EXPECT_EXIT(check_environment_error(value), ::testing::ExitedWithCode(0), "") << "KEYSEL_SIMD=" << value;
    ::unsetenv("KEYSEL_SIMD");
  }
}

TEST(KeyselSimd, EveryFamilyFollowsTheOneLevel) {
  for (const SimdLevel level : kSimdLevels) {
    if (!simd_level_supported(level)) {
      EXPECT_THROW(set_simd_level(level), Error);
      continue;
    }
    const ScopedSimdLevel scoped(level);
    EXPECT_EQ(simd_level(), level);
#if defined(__x86_64__)
    EXPECT_EQ(attention_kernel_name(default_attention_kernel()), simd_level_name(level));
#endif
    for (const DType format : {DType::fp32, DType::bf16, DType::fp8_e4m3, DType::int8, DType::int4}) {
      const std::string name(indexer_kernel_name(format));
      EXPECT_EQ(name.substr(0, simd_level_name(level).size()), simd_level_name(level)) << name;
    }
  }
}

// ---- the choice by throughput -----------------------------------------------------------------------------

TEST(ChooseKernel, KnownCoresComeFromTheTable) {
  EXPECT_EQ(table_mac_rates(zen4_cpu()).source, "table: AMD Zen 4");
  EXPECT_EQ(table_mac_rates(sapphire_rapids_cpu()).source, "table: Intel Sapphire/Emerald Rapids");
  EXPECT_TRUE(table_mac_rates(avx2_cpu()).source.empty());  // measured at first use instead
  // Only instructions the CPU runs get a rate.
  CpuFeatures zen4_no_bf16 = zen4_cpu();
  zen4_no_bf16.set(CpuFeature::avx512_bf16, false);
  EXPECT_EQ(table_mac_rates(zen4_no_bf16).of(MacOp::dpbf16_zmm), 0.0);
}

TEST(ChooseKernel, Bf16DotOnlyWhereItOutrunsFma) {
  // AMD Zen 4: vdpbf16ps at twice the FMA rate; Intel Sapphire Rapids: at half of it.
  EXPECT_EQ(chosen(kBf16Options, zen4_cpu(), table_mac_rates(zen4_cpu()), SimdLevel::avx512), "avx512_bf16");
  EXPECT_EQ(chosen(kBf16Options, sapphire_rapids_cpu(), table_mac_rates(sapphire_rapids_cpu()), SimdLevel::avx512),
            "avx512_fma");
  // Integer formats: VNNI on both.
  EXPECT_EQ(chosen(kIntegerOptions, zen4_cpu(), table_mac_rates(zen4_cpu()), SimdLevel::avx512), "avx512_vnni");
  EXPECT_EQ(chosen(kIntegerOptions, sapphire_rapids_cpu(), table_mac_rates(sapphire_rapids_cpu()), SimdLevel::avx512),
            "avx512_vnni");
  // A lowered level never picks above it.
  EXPECT_EQ(chosen(kBf16Options, zen4_cpu(), table_mac_rates(zen4_cpu()), SimdLevel::avx2), "avx2_fma");
  EXPECT_EQ(chosen(kIntegerOptions, zen4_cpu(), table_mac_rates(zen4_cpu()), SimdLevel::avx2), "avx2_madd16");
  EXPECT_EQ(chosen(kBf16Options, zen4_cpu(), table_mac_rates(zen4_cpu()), SimdLevel::scalar), "scalar");
}

TEST(ChooseKernel, AvailabilityBeforeRate) {
  // Rates claim BF16 and VNNI are fastest, but this CPU lacks them: the plain AVX-512 kernels run.
  const MacRates eager = rates_of({{MacOp::scalar, 1}, {MacOp::fma_ymm, 16}, {MacOp::fma_zmm, 32},
                                   {MacOp::madd16_ymm, 16}, {MacOp::dpbusd_zmm, 64}, {MacOp::dpbf16_zmm, 64}});
  EXPECT_EQ(chosen(kBf16Options, avx512_cpu_without_bf16(), eager, SimdLevel::avx512), "avx512_fma");
  EXPECT_EQ(chosen(kIntegerOptions, avx512_cpu_without_bf16(), eager, SimdLevel::avx512), "avx512_fma");
  // An AVX2 CPU never gets an AVX-512 kernel, whatever the rates say.
  EXPECT_EQ(chosen(kBf16Options, avx2_cpu(), eager, SimdLevel::avx2), "avx2_fma");
  EXPECT_EQ(chosen(kIntegerOptions, avx2_cpu(), eager, SimdLevel::avx2), "avx2_madd16");
  EXPECT_EQ(chosen(kBf16Options, avx2_cpu(), eager, SimdLevel::avx512), "avx2_fma");
  // Equal instruction rates: the higher level wins (fewer instructions for the same work).
  const MacRates even = rates_of({{MacOp::scalar, 16}, {MacOp::fma_ymm, 16}, {MacOp::fma_zmm, 16}});
  EXPECT_EQ(chosen(kBf16Options, avx512_cpu_without_bf16(), even, SimdLevel::avx512), "avx512_fma");
  // Nothing runs: an error naming the CPU.
  const KernelOption only_avx512[] = {{"avx512_bf16", SimdLevel::avx512, MacOp::dpbf16_zmm}};
  EXPECT_THROW(choose_kernel(only_avx512, avx2_cpu(), eager, SimdLevel::avx2), Error);
  const KernelOption needs_amx[] = {{"amx", SimdLevel::avx512, MacOp::dpbf16_zmm, bits_of({CpuFeature::amx_bf16})},
                                    {"scalar", SimdLevel::scalar, MacOp::scalar}};
  EXPECT_EQ(chosen(needs_amx, zen4_cpu(), eager, SimdLevel::avx512), "scalar");
  EXPECT_EQ(chosen(needs_amx, sapphire_rapids_cpu(), eager, SimdLevel::avx512), "amx");
}

TEST(MacRates, MeasuredRatesCoverWhatThisCpuRuns) {
  const MacRates measured = measure_mac_rates(2e-5, 2);
  for (std::size_t i = 0; i < kMacOpCount; ++i) {
    const auto op = static_cast<MacOp>(i);
    if (op != MacOp::scalar && cpu_runs(cpu_features(), op)) {
      EXPECT_GT(measured.of(op), 0.0) << mac_op_name(op);
    } else if (op != MacOp::scalar) {
      EXPECT_EQ(measured.of(op), 0.0) << mac_op_name(op);
    }
  }
  // A register-only loop cannot beat the instruction width times a few issue ports times 6 GHz.
  for (std::size_t i = 0; i < kMacOpCount; ++i) {
    const auto op = static_cast<MacOp>(i);
    EXPECT_LT(measured.of(op), mac_op_width(op) * 4 * 6.0 + 1) << mac_op_name(op);
  }
}

// ---- every indexer implementation against scalar ----------------------------------------------------------

/// Rates under which `op` is the fastest instruction, so that choose_kernel takes it when the CPU has it.
MacRates favouring(MacOp op) {
  MacRates rates = rates_of({{MacOp::scalar, 1}, {MacOp::fma_ymm, 2}, {MacOp::fma_zmm, 2}, {MacOp::madd16_ymm, 2},
                             {MacOp::dpbusd_zmm, 2}, {MacOp::dpbf16_zmm, 2}});
  rates.rate[static_cast<std::size_t>(op)] = 100;
  return rates;
}

std::vector<float> indexer_scores(std::int64_t heads, std::int64_t dim, std::int64_t n, const QuantizationConfig& config,
                                  const std::vector<float>& q, const std::vector<float>& w, const std::vector<float>& k) {
  LightningIndexer indexer(heads, dim, config);
  indexer.append_keys(n, k.data());
  std::vector<float> scores(static_cast<std::size_t>(n));
  const std::vector<std::int32_t> position{static_cast<std::int32_t>(n - 1)};
  indexer.score(TensorView(q.data(), DType::fp32, {1, heads, dim}), TensorView(w.data(), DType::fp32, {1, heads}),
                TensorView(position.data(), DType::int32, {1}), TensorView(scores.data(), DType::fp32, {1, n}));
  return scores;
}

TEST(IndexerDispatch, EveryImplementationAgreesWithScalarOnAwkwardSizes) {
  struct Case {
    SimdLevel level;
    MacOp favoured;
  };
  std::vector<Case> cases;
  for (const MacOp op : {MacOp::dpbf16_zmm, MacOp::dpbusd_zmm, MacOp::fma_zmm}) {
    if (cpu_runs(cpu_features(), op)) cases.push_back({SimdLevel::avx512, op});
  }
  for (const MacOp op : {MacOp::fma_ymm, MacOp::madd16_ymm}) {
    if (cpu_runs(cpu_features(), op)) cases.push_back({SimdLevel::avx2, op});
  }
  if (cases.empty()) GTEST_SKIP() << "only the scalar indexer runs on this CPU";
  struct Shape {
    std::int64_t heads, dim, n;
  };
  // Heads not a multiple of 16 (or of 64), dims not a multiple of 32 (or of the scale group), key counts not a
  // multiple of the kernels' key tiles (6 and 3).
  const Shape shapes[] = {{1, 1, 1}, {17, 33, 7}, {64, 128, 13}, {69, 100, 50}, {35, 130, 2053}};
  const DType formats[] = {DType::fp32, DType::bf16, DType::fp16, DType::fp8_e4m3, DType::fp8_e5m2, DType::int8,
                           DType::int4};
  for (const Shape& s : shapes) {
    RandomStream rng(static_cast<std::uint64_t>(s.heads * 1000 + s.dim));
    std::vector<float> q(static_cast<std::size_t>(s.heads * s.dim)), w(static_cast<std::size_t>(s.heads)),
        k(static_cast<std::size_t>(s.n * s.dim));
    rng.fill_normal(q);
    rng.fill_normal(w);
    rng.fill_normal(k);
    // Per key: sum_h |w_h| sum_d |q_hd k_sd|, the scale of fp32 rounding differences (quantised values stay
    // within a factor of about 1.5 of the originals).
    std::vector<double> magnitude(static_cast<std::size_t>(s.n), 0.0);
    for (std::int64_t key = 0; key < s.n; ++key) {
      for (std::int64_t h = 0; h < s.heads; ++h) {
        double dot = 0;
        for (std::int64_t d = 0; d < s.dim; ++d) {
          dot += std::fabs(q[static_cast<std::size_t>(h * s.dim + d)] * k[static_cast<std::size_t>(key * s.dim + d)]);
        }
        magnitude[static_cast<std::size_t>(key)] += 2.0 * std::fabs(w[static_cast<std::size_t>(h)]) * dot;
      }
    }
    for (const DType format : formats) {
      for (const bool grouped : {false, true}) {
        QuantizationConfig config;
        config.format = format;
        if (grouped) {
          config.granularity = ScaleGranularity::per_group;
          config.group_size = 32;
        }
        std::vector<float> reference;
        {
          const ScopedSimdLevel scalar(SimdLevel::scalar);
          reference = indexer_scores(s.heads, s.dim, s.n, config, q, w, k);
        }
        for (const Case& c : cases) {
          const ScopedSimdLevel level(c.level);
          const ScopedMacRates rates(favouring(c.favoured));
          const std::string path(indexer_kernel_name(format));
          SCOPED_TRACE(config.str() + " via " + path + " heads " + std::to_string(s.heads) + " dim " +
                       std::to_string(s.dim) + " n " + std::to_string(s.n));
          const std::vector<float> got = indexer_scores(s.heads, s.dim, s.n, config, q, w, k);
          for (std::size_t i = 0; i < got.size(); ++i) {
            ASSERT_NEAR(got[i], reference[i], 1e-5 * magnitude[i] + 1e-6) << "key " << i;
          }
        }
      }
    }
  }
}

TEST(IndexerDispatch, IntelXeonRatesSendFp8ThroughFma) {
  if (!cpu_runs(cpu_features(), MacOp::dpbf16_zmm)) GTEST_SKIP() << "this CPU has no AVX-512 BF16";
  const ScopedSimdLevel level(SimdLevel::avx512);
  {
    const ScopedMacRates rates(table_mac_rates(sapphire_rapids_cpu()));
    EXPECT_EQ(indexer_kernel_name(DType::fp8_e4m3), "avx512_fma");
    EXPECT_EQ(indexer_kernel_name(DType::bf16), "avx512_fma");
    EXPECT_EQ(indexer_kernel_name(DType::int8), "avx512_vnni");
  }
  {
    const ScopedMacRates rates(table_mac_rates(zen4_cpu()));
    EXPECT_EQ(indexer_kernel_name(DType::fp8_e4m3), "avx512_bf16");
    EXPECT_EQ(indexer_kernel_name(DType::fp32), "avx512_fma");
  }
}


// ---- inner-product top-k: every level against an exact reference ------------------------------------------

/// The exact result every SIMD level must give: scores as one fp32 FMA chain over d = 0 .. dim-1 (the kernels'
/// order), the k best by score then lower index, NaN never, -1 / -inf past the valid keys.
void reference_topk(const std::vector<float>& q, std::int64_t nq, const std::vector<float>& keys, std::int64_t n,
                    std::int64_t dim, std::int64_t k, std::vector<float>& scores, std::vector<std::int64_t>& ids) {
  scores.assign(static_cast<std::size_t>(nq * k), -std::numeric_limits<float>::infinity());
  ids.assign(static_cast<std::size_t>(nq * k), -1);
  std::vector<std::pair<float, std::int64_t>> row;
  for (std::int64_t i = 0; i < nq; ++i) {
    row.clear();
    for (std::int64_t j = 0; j < n; ++j) {
      float acc = 0.0f;
      for (std::int64_t d = 0; d < dim; ++d) {
        acc = std::fma(q[static_cast<std::size_t>(i * dim + d)], keys[static_cast<std::size_t>(j * dim + d)], acc);
      }
      if (acc == acc) row.emplace_back(acc, j);
    }
    std::sort(row.begin(), row.end(), [](const auto& a, const auto& b) {
      return a.first != b.first ? a.first > b.first : a.second < b.second;
    });
    for (std::size_t r = 0; r < row.size() && static_cast<std::int64_t>(r) < k; ++r) {
      scores[static_cast<std::size_t>(i * k) + r] = row[r].first;
      ids[static_cast<std::size_t>(i * k) + r] = row[r].second;
    }
  }
}

void expect_exact_topk(const std::vector<float>& q, std::int64_t nq, const std::vector<float>& keys, std::int64_t n,
                       std::int64_t dim, std::int64_t k, const std::string& what) {
  std::vector<float> want_scores, got_scores(static_cast<std::size_t>(nq * k));
  std::vector<std::int64_t> want_ids, got_ids(static_cast<std::size_t>(nq * k));
  reference_topk(q, nq, keys, n, dim, k, want_scores, want_ids);
  // Each level; at avx512 both scans (rates that favour FMA, as on Intel Xeon, and rates that favour bf16 dot
  // products, as on AMD Zen 4: the bf16 prefilter where the CPU has AVX-512 BF16).
  struct Path {
    SimdLevel level;
    MacOp favoured;
  };
  for (const Path path : {Path{SimdLevel::avx2, MacOp::fma_ymm}, Path{SimdLevel::avx512, MacOp::fma_zmm},
                          Path{SimdLevel::avx512, MacOp::dpbf16_zmm}}) {
    if (!simd_level_supported(path.level)) continue;
    const ScopedSimdLevel scoped(path.level);
    const ScopedMacRates rates(favouring(path.favoured));
    const std::string name(inner_product_kernel_name());
    for (const int threads : {1, 2, 3}) {
      const ScopedThreads team(threads);
      inner_product_topk(nq, q.data(), n, keys.data(), dim, k, got_scores.data(), got_ids.data());
      ASSERT_EQ(got_ids, want_ids) << what << " via " << name << " threads " << threads;
      for (std::size_t i = 0; i < got_scores.size(); ++i) {
        ASSERT_EQ(std::memcmp(&got_scores[i], &want_scores[i], 4), 0)
            << what << " via " << name << " threads " << threads << " entry " << i << ": " << got_scores[i]
            << " vs " << want_scores[i];
      }
    }
  }
}

TEST(InnerProductDispatch, EverySimdLevelIsExactOnAwkwardSizes) {
  struct Case {
    std::int64_t nq, n, dim, k;
  };
  // Query counts around the 16-lane registers and 64-query chunks, key counts around the register tiles (6, 8,
  // 12, 24 keys) and the sampled threshold (from 16384 keys: on a CPU where the bf16 prefilter is chosen, these run
  // through it), odd dims and one over 256 (the prefilter converts keys in pieces), k above the key count.
  const Case cases[] = {{1, 1, 1, 1},      {1, 5, 3, 10},      {17, 23, 17, 5},   {33, 49, 2, 48},
                        {65, 300, 129, 64}, {3, 20000, 64, 100}, {130, 17000, 16, 7}, {5, 40000, 33, 2000},
                        {64, 16384, 128, 2048}, {20, 16500, 300, 50}};
  for (const Case& c : cases) {
    RandomStream rng(static_cast<std::uint64_t>(c.nq * 7919 + c.n));
    std::vector<float> q(static_cast<std::size_t>(c.nq * c.dim)), keys(static_cast<std::size_t>(c.n * c.dim));
    rng.fill_normal(q);
    rng.fill_normal(keys);
    expect_exact_topk(q, c.nq, keys, c.n, c.dim, c.k,
                      "nq " + std::to_string(c.nq) + " n " + std::to_string(c.n) + " dim " + std::to_string(c.dim) +
                          " k " + std::to_string(c.k));
  }
}

TEST(InnerProductDispatch, TheChoiceFollowsTheRates) {
  if (!cpu_runs(cpu_features(), MacOp::dpbf16_zmm)) GTEST_SKIP() << "this CPU has no AVX-512 BF16";
  const ScopedSimdLevel level(SimdLevel::avx512);
  {
    const ScopedMacRates rates(table_mac_rates(zen4_cpu()));
    EXPECT_EQ(inner_product_kernel_name(), "avx512_bf16_prefilter");
  }
  {
    const ScopedMacRates rates(table_mac_rates(sapphire_rapids_cpu()));
    EXPECT_EQ(inner_product_kernel_name(), "avx512_fma");
  }
}

TEST(InnerProductDispatch, TiesNanAndAMisleadingSample) {
  // Repeated keys (equal scores: the lower index first), NaN keys (never selected), zero keys.
  {
    const std::int64_t nq = 20, n = 20000, dim = 8, k = 300;
    RandomStream rng(5);
    std::vector<float> q(static_cast<std::size_t>(nq * dim)), keys(static_cast<std::size_t>(n * dim));
    rng.fill_normal(q);
    rng.fill_normal(keys);
    for (std::int64_t j = 0; j < n; ++j) {
      if (j % 7 == 3) std::copy(keys.begin() + (j % 50) * dim, keys.begin() + (j % 50 + 1) * dim, keys.begin() + j * dim);
      if (j % 101 == 0) keys[static_cast<std::size_t>(j * dim)] = std::numeric_limits<float>::quiet_NaN();
      if (j % 103 == 0) std::fill(keys.begin() + j * dim, keys.begin() + (j + 1) * dim, 0.0f);
    }
    expect_exact_topk(q, nq, keys, n, dim, k, "ties and NaN");
  }
  // The keys the sample picks are the only large ones: the sampled threshold lets too few keys through and the
  // query is redone without it; the result stays exact.
  {
    const std::int64_t nq = 2, n = 20000, dim = 4, k = 100;
    std::vector<float> q = {1, 0, 0, 0, 0.5f, 0.5f, 0, 0};
    std::vector<float> keys(static_cast<std::size_t>(n * dim), 0.0f);
    for (std::int64_t i = 0; i < 50; ++i) {
      const std::int64_t j = (2 * i + 1) * n / (2 * 2048);
      keys[static_cast<std::size_t>(j * dim)] = 100.0f;
      keys[static_cast<std::size_t>(j * dim + 1)] = 100.0f;
    }
    expect_exact_topk(q, nq, keys, n, dim, k, "misleading sample");
  }
}

}  // namespace
}  // namespace keysel
