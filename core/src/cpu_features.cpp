// CPU detection (CPUID, XGETBV), the SIMD level and its one environment override, multiply-accumulate rates
// (a table for known cores, a measurement otherwise) and the kernel choice. See cpu_features.h.
//
// This file is compiled without instruction-set flags: the rate loops are inline assembly, run only after the
// features they use were found.
#include "keysel/core/cpu_features.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>

#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define KEYSEL_X86 1
#else
#define KEYSEL_X86 0
#endif

#include "keysel/core/error.h"
#include "keysel/core/threads.h"

namespace keysel {
namespace {

constexpr std::string_view kFeatureNames[kCpuFeatureCount] = {
    "sse4_2",   "avx",      "avx2",        "fma",         "f16c",        "bmi2",     "avx512f",  "avx512bw", "avx512vl",
    "avx512dq", "avx512cd", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"};

constexpr std::uint64_t bit(CpuFeature f) { return std::uint64_t{1} << static_cast<unsigned>(f); }

constexpr std::uint64_t kAvx2Needs = bit(CpuFeature::avx) | bit(CpuFeature::avx2) | bit(CpuFeature::fma) |
                                     bit(CpuFeature::f16c);
constexpr std::uint64_t kAvx512Needs = kAvx2Needs | bit(CpuFeature::avx512f) | bit(CpuFeature::avx512bw) |
                                       bit(CpuFeature::avx512vl) | bit(CpuFeature::avx512dq);

std::uint64_t level_needs(SimdLevel level) {
  switch (level) {
    case SimdLevel::scalar: return 0;
    case SimdLevel::avx2: return kAvx2Needs;
    case SimdLevel::avx512: return kAvx512Needs;
  }
  return ~std::uint64_t{0};
}

/// Features an instruction needs beyond its level.
std::uint64_t mac_op_extra(MacOp op) {
  switch (op) {
    case MacOp::dpbusd_zmm: return bit(CpuFeature::avx512_vnni);
    case MacOp::dpbf16_zmm: return bit(CpuFeature::avx512_bf16);
    default: return 0;
  }
}

// ---- detection ----------------------------------------------------------------------------------------

#if KEYSEL_X86
struct Regs {
  unsigned a = 0, b = 0, c = 0, d = 0;
};

Regs cpuid(unsigned leaf, unsigned subleaf = 0) {
  Regs r;
  if (__get_cpuid_count(leaf, subleaf, &r.a, &r.b, &r.c, &r.d) == 0) return Regs{};
  return r;
}

/// XCR0: which register states the OS saves (only valid when CPUID.1:ECX.OSXSAVE is set).
std::uint64_t xgetbv0() {
  unsigned eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<std::uint64_t>(edx) << 32) | eax;
}

std::string trim(std::string s) {
  const std::size_t first = s.find_first_not_of(' ');
  if (first == std::string::npos) return {};
  const std::size_t last = s.find_last_not_of(' ');
  return s.substr(first, last - first + 1);
}

CpuFeatures detect() {
  CpuFeatures cpu;
  const auto max_leaf = static_cast<unsigned>(__get_cpuid_max(0, nullptr));
  if (max_leaf == 0) return cpu;
  const Regs v = cpuid(0);
  char vendor[13] = {};
  std::memcpy(vendor, &v.b, 4);
  std::memcpy(vendor + 4, &v.d, 4);
  std::memcpy(vendor + 8, &v.c, 4);
  cpu.vendor = vendor;

  const Regs l1 = cpuid(1);
  const unsigned base_family = (l1.a >> 8) & 0xF;
  cpu.family = static_cast<int>(base_family == 0xF ? base_family + ((l1.a >> 20) & 0xFF) : base_family);
  cpu.model = static_cast<int>(((l1.a >> 4) & 0xF) | (base_family == 0x6 || base_family == 0xF ? ((l1.a >> 16) & 0xF) << 4 : 0));
  cpu.stepping = static_cast<int>(l1.a & 0xF);

  const bool osxsave = (l1.c >> 27) & 1;
  const std::uint64_t xcr0 = osxsave ? xgetbv0() : 0;
  const bool os_ymm = (xcr0 & 0x6) == 0x6;             // SSE and AVX state
  const bool os_zmm = os_ymm && (xcr0 & 0xE0) == 0xE0;  // opmask, ZMM_Hi256, Hi16_ZMM
  const bool os_amx = (xcr0 & 0x60000) == 0x60000;      // XTILECFG, XTILEDATA

  const Regs l7 = max_leaf >= 7 ? cpuid(7, 0) : Regs{};
  const Regs l7s1 = max_leaf >= 7 && l7.a >= 1 ? cpuid(7, 1) : Regs{};

  cpu.set(CpuFeature::sse4_2, (l1.c >> 20) & 1);
  cpu.set(CpuFeature::avx, os_ymm && ((l1.c >> 28) & 1));
  cpu.set(CpuFeature::fma, os_ymm && ((l1.c >> 12) & 1));
  cpu.set(CpuFeature::f16c, os_ymm && ((l1.c >> 29) & 1));
  cpu.set(CpuFeature::avx2, os_ymm && ((l7.b >> 5) & 1));
  cpu.set(CpuFeature::bmi2, (l7.b >> 8) & 1);
  cpu.set(CpuFeature::avx512f, os_zmm && ((l7.b >> 16) & 1));
  cpu.set(CpuFeature::avx512dq, os_zmm && ((l7.b >> 17) & 1));
  cpu.set(CpuFeature::avx512cd, os_zmm && ((l7.b >> 28) & 1));
  cpu.set(CpuFeature::avx512bw, os_zmm && ((l7.b >> 30) & 1));
  cpu.set(CpuFeature::avx512vl, os_zmm && ((l7.b >> 31) & 1));
  cpu.set(CpuFeature::avx512_vnni, os_zmm && ((l7.c >> 11) & 1));
  cpu.set(CpuFeature::avx512_fp16, os_zmm && ((l7.d >> 23) & 1));
  cpu.set(CpuFeature::avx512_bf16, os_zmm && ((l7s1.a >> 5) & 1));
  cpu.set(CpuFeature::avx_vnni, os_ymm && ((l7s1.a >> 4) & 1));
  cpu.set(CpuFeature::amx_bf16, os_amx && ((l7.d >> 22) & 1));
  cpu.set(CpuFeature::amx_tile, os_amx && ((l7.d >> 24) & 1));
  cpu.set(CpuFeature::amx_int8, os_amx && ((l7.d >> 25) & 1));

  if (static_cast<unsigned>(__get_cpuid_max(0x80000000u, nullptr)) >= 0x80000004u) {
    char brand[49] = {};
    for (unsigned i = 0; i < 3; ++i) {
      const Regs r = cpuid(0x80000002u + i);
      std::memcpy(brand + 16 * i, &r.a, 4);
      std::memcpy(brand + 16 * i + 4, &r.b, 4);
      std::memcpy(brand + 16 * i + 8, &r.c, 4);
      std::memcpy(brand + 16 * i + 12, &r.d, 4);
    }
    cpu.model_name = trim(brand);
  }
  return cpu;
}
#else
CpuFeatures detect() { return CpuFeatures{}; }
#endif

// ---- the level and KEYSEL_SIMD ------------------------------------------------------------------------

/// The level in use, or -1 when KEYSEL_SIMD was invalid (then `error` holds the message simd_level() throws).
struct LevelState {
  std::atomic<int> level{0};
  std::string error;
};

LevelState& level_state() {
  static LevelState state;
  static const bool initialised = [] {
    try {
      state.level.store(static_cast<int>(detail::simd_level_from_environment(std::getenv("KEYSEL_SIMD"), cpu_features())));
    } catch (const Error& e) {
      state.error = e.what();
      state.level.store(-1);
    }
    return true;
  }();
  (void)initialised;
  return state;
}

// ---- rates --------------------------------------------------------------------------------------------

/// Runs `iterations` x 12 independent `op` instructions on registers (nothing in memory). x86 only, and only
/// for an instruction cpu_runs() approved.
void mac_loop(MacOp op, std::int64_t iterations) {
#if KEYSEL_X86 && defined(__x86_64__)
  if (iterations <= 0) return;
#define KEYSEL_ZERO                                                                                        \
  "vxorps %%ymm0,%%ymm0,%%ymm0\n vxorps %%ymm1,%%ymm1,%%ymm1\n vxorps %%ymm2,%%ymm2,%%ymm2\n"            \
  "vxorps %%ymm3,%%ymm3,%%ymm3\n vxorps %%ymm4,%%ymm4,%%ymm4\n vxorps %%ymm5,%%ymm5,%%ymm5\n"            \
  "vxorps %%ymm6,%%ymm6,%%ymm6\n vxorps %%ymm7,%%ymm7,%%ymm7\n vxorps %%ymm8,%%ymm8,%%ymm8\n"            \
  "vxorps %%ymm9,%%ymm9,%%ymm9\n vxorps %%ymm10,%%ymm10,%%ymm10\n vxorps %%ymm11,%%ymm11,%%ymm11\n"      \
  "vxorps %%ymm12,%%ymm12,%%ymm12\n vxorps %%ymm13,%%ymm13,%%ymm13\n"
#define KEYSEL_12(I, R)                                                                                    \
  I " %%" R "13, %%" R "12, %%" R "0\n " I " %%" R "13, %%" R "12, %%" R "1\n "                            \
  I " %%" R "13, %%" R "12, %%" R "2\n " I " %%" R "13, %%" R "12, %%" R "3\n "                            \
  I " %%" R "13, %%" R "12, %%" R "4\n " I " %%" R "13, %%" R "12, %%" R "5\n "                            \
  I " %%" R "13, %%" R "12, %%" R "6\n " I " %%" R "13, %%" R "12, %%" R "7\n "                            \
  I " %%" R "13, %%" R "12, %%" R "8\n " I " %%" R "13, %%" R "12, %%" R "9\n "                            \
  I " %%" R "13, %%" R "12, %%" R "10\n " I " %%" R "13, %%" R "12, %%" R "11\n"
#define KEYSEL_MAC_LOOP(BODY)                                                                              \
  __asm__ volatile(KEYSEL_ZERO "1:\n" BODY "sub $1, %[n]\n jnz 1b\n vzeroupper\n"                          \
                   : [n] "+r"(iterations)                                                                  \
                   :                                                                                       \
                   : "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",   \
                     "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15")
  switch (op) {
    case MacOp::scalar: KEYSEL_MAC_LOOP(KEYSEL_12("vfmadd231ss", "xmm")); break;
    case MacOp::fma_ymm: KEYSEL_MAC_LOOP(KEYSEL_12("vfmadd231ps", "ymm")); break;
    case MacOp::fma_zmm: KEYSEL_MAC_LOOP(KEYSEL_12("vfmadd231ps", "zmm")); break;
    case MacOp::dpbusd_zmm: KEYSEL_MAC_LOOP(KEYSEL_12("vpdpbusd", "zmm")); break;
    case MacOp::dpbf16_zmm: KEYSEL_MAC_LOOP(KEYSEL_12("vdpbf16ps", "zmm")); break;
    case MacOp::madd16_ymm:
      // 12 chains of (product pair sums, accumulate): the products go to two scratch registers in turn.
#define KEYSEL_MADD(A, T) "vpmaddwd %%ymm13, %%ymm12, %%ymm" T "\n vpaddd %%ymm" T ", %%ymm" A ", %%ymm" A "\n "
      KEYSEL_MAC_LOOP(KEYSEL_MADD("0", "14") KEYSEL_MADD("1", "15") KEYSEL_MADD("2", "14") KEYSEL_MADD("3", "15")
                          KEYSEL_MADD("4", "14") KEYSEL_MADD("5", "15") KEYSEL_MADD("6", "14") KEYSEL_MADD("7", "15")
                              KEYSEL_MADD("8", "14") KEYSEL_MADD("9", "15") KEYSEL_MADD("10", "14")
                                  KEYSEL_MADD("11", "15"));
#undef KEYSEL_MADD
      break;
  }
#undef KEYSEL_MAC_LOOP
#undef KEYSEL_12
#undef KEYSEL_ZERO
#else
  (void)op;
  (void)iterations;
#endif
}

using Clock = std::chrono::steady_clock;

double thread_cpu_seconds() {
  timespec t{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

double seconds_of(MacOp op, std::int64_t iterations) {
  const auto start = Clock::now();
  mac_loop(op, iterations);
  return std::chrono::duration<double>(Clock::now() - start).count();
}

/// Loop iterations that take about `seconds` (from a short timed run).
std::int64_t iterations_for(MacOp op, double seconds) {
  std::int64_t n = 256;
  double t = seconds_of(op, n);
  while (t < 2e-5 && n < (std::int64_t{1} << 30)) {
    n *= 4;
    t = seconds_of(op, n);
  }
  return std::max<std::int64_t>(1, static_cast<std::int64_t>(static_cast<double>(n) * seconds / std::max(t, 1e-9)));
}

bool runs_on_this_machine(MacOp op) {
#if KEYSEL_X86 && defined(__x86_64__)
  if (op == MacOp::scalar) return cpu_features().has(CpuFeature::fma);
  return cpu_runs(cpu_features(), op);
#else
  (void)op;
  return false;
#endif
}

MacRates initial_rates() {
  MacRates table = table_mac_rates(cpu_features());
  if (!table.source.empty()) return table;
  MacRates measured = measure_mac_rates();
  measured.source = "measured (core not in the table: " + cpu_features().vendor + " family " +
                    std::to_string(cpu_features().family) + " model " + std::to_string(cpu_features().model) + ")";
  return measured;
}

std::atomic<const MacRates*>& rates_override() {
  static std::atomic<const MacRates*> override{nullptr};
  return override;
}

}  // namespace

// ---- CpuFeatures --------------------------------------------------------------------------------------

std::string_view cpu_feature_name(CpuFeature feature) {
  const auto i = static_cast<std::size_t>(feature);
  return i < kCpuFeatureCount ? kFeatureNames[i] : std::string_view("unknown");
}

CpuFeatures& CpuFeatures::set(CpuFeature feature, bool present) {
  if (present) {
    bits |= bit(feature);
  } else {
    bits &= ~bit(feature);
  }
  return *this;
}

bool CpuFeatures::supports(SimdLevel level) const {
  const std::uint64_t needs = level_needs(level);
  return (bits & needs) == needs;
}

SimdLevel CpuFeatures::max_level() const {
  SimdLevel best = SimdLevel::scalar;
  for (const SimdLevel level : kSimdLevels) {
    if (supports(level)) best = level;
  }
  return best;
}

std::string CpuFeatures::missing_for(SimdLevel level) const {
  std::string missing;
  const std::uint64_t absent = level_needs(level) & ~bits;
  for (std::size_t i = 0; i < kCpuFeatureCount; ++i) {
    if ((absent >> i) & 1u) missing += (missing.empty() ? "" : ", ") + std::string(kFeatureNames[i]);
  }
  return missing;
}

std::string CpuFeatures::str() const {
  std::ostringstream os;
  os << (model_name.empty() ? std::string("unknown CPU") : model_name);
  if (!vendor.empty()) os << " (" << vendor << " family " << family << " model " << model << ")";
  os << ":";
  bool any = false;
  for (std::size_t i = 0; i < kCpuFeatureCount; ++i) {
    if ((bits >> i) & 1u) {
      os << ' ' << kFeatureNames[i];
      any = true;
    }
  }
  if (!any) os << " (no SIMD features)";
  return os.str();
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

// ---- the level ----------------------------------------------------------------------------------------

std::string_view simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::scalar: return "scalar";
    case SimdLevel::avx2: return "avx2";
    case SimdLevel::avx512: return "avx512";
  }
  KEYSEL_CHECK_ARG(false, "level", "scalar, avx2 or avx512", static_cast<int>(level));
  return {};
}

SimdLevel parse_simd_level(std::string_view name) {
  for (const SimdLevel level : kSimdLevels) {
    if (name == simd_level_name(level)) return level;
  }
  KEYSEL_CHECK_ARG(false, "name", "scalar, avx2 or avx512", name);
  return SimdLevel::scalar;
}

SimdLevel best_simd_level() { return cpu_features().max_level(); }

bool simd_level_supported(SimdLevel level) { return cpu_features().supports(level); }

std::string supported_simd_levels() {
  std::string names;
  for (const SimdLevel level : kSimdLevels) {
    if (simd_level_supported(level)) names += (names.empty() ? "" : ", ") + std::string(simd_level_name(level));
  }
  return names;
}

namespace detail {

SimdLevel simd_level_from_environment(const char* value, const CpuFeatures& cpu) {
  if (value == nullptr || *value == '\0') return cpu.max_level();
  const std::string_view name(value);
  std::string supported;
  for (const SimdLevel level : kSimdLevels) {
    if (cpu.supports(level)) supported += (supported.empty() ? "" : ", ") + std::string(simd_level_name(level));
  }
  for (const SimdLevel level : kSimdLevels) {
    if (name != simd_level_name(level)) continue;
    if (!cpu.supports(level)) {
      throw_error("simd_level", "environment variable KEYSEL_SIMD=\"" + std::string(name) + "\" asks for a level this CPU (" +
                                    (cpu.model_name.empty() ? std::string("unknown model") : cpu.model_name) +
                                    ") cannot run: it lacks " + cpu.missing_for(level) + "; supported levels: " + supported);
    }
    return level;
  }
  throw_error("simd_level", "environment variable KEYSEL_SIMD=\"" + std::string(name) +
                                "\" is not a SIMD level: expected scalar, avx2 or avx512 (this CPU supports " + supported + ")");
}

}  // namespace detail

SimdLevel simd_level() {
  LevelState& state = level_state();
  const int level = state.level.load(std::memory_order_relaxed);
  if (level < 0) throw Error(state.error);
  return static_cast<SimdLevel>(level);
}

void set_simd_level(SimdLevel level) {
  KEYSEL_CHECK_ARG(simd_level_supported(level), "level",
                   "a level this CPU supports (" + supported_simd_levels() + ")", simd_level_name(level));
  level_state().level.store(static_cast<int>(level), std::memory_order_relaxed);
}

ScopedSimdLevel::ScopedSimdLevel(SimdLevel level) : previous_(simd_level()) { set_simd_level(level); }
ScopedSimdLevel::~ScopedSimdLevel() {
  level_state().level.store(static_cast<int>(previous_), std::memory_order_relaxed);
}

// ---- rates and choice ---------------------------------------------------------------------------------

std::string_view mac_op_name(MacOp op) {
  switch (op) {
    case MacOp::scalar: return "scalar";
    case MacOp::fma_ymm: return "fma_ymm";
    case MacOp::fma_zmm: return "fma_zmm";
    case MacOp::madd16_ymm: return "madd16_ymm";
    case MacOp::dpbusd_zmm: return "dpbusd_zmm";
    case MacOp::dpbf16_zmm: return "dpbf16_zmm";
  }
  return "unknown";
}

int mac_op_width(MacOp op) {
  switch (op) {
    case MacOp::scalar: return 1;
    case MacOp::fma_ymm: return 8;
    case MacOp::fma_zmm: return 16;
    case MacOp::madd16_ymm: return 16;
    case MacOp::dpbusd_zmm: return 64;
    case MacOp::dpbf16_zmm: return 32;
  }
  return 0;
}

SimdLevel mac_op_level(MacOp op) {
  switch (op) {
    case MacOp::scalar: return SimdLevel::scalar;
    case MacOp::fma_ymm:
    case MacOp::madd16_ymm: return SimdLevel::avx2;
    default: return SimdLevel::avx512;
  }
}

bool cpu_runs(const CpuFeatures& cpu, MacOp op) {
  const std::uint64_t extra = mac_op_extra(op);
  return cpu.supports(mac_op_level(op)) && (cpu.bits & extra) == extra;
}

MacRates table_mac_rates(const CpuFeatures& cpu) {
  // MACs per cycle per core. Zen 4 (measured on an EPYC 9xx4 VM: one 512-bit instruction per cycle for each of
  // vfmadd, vpdpbusd and vdpbf16ps, two 256-bit FMAs, 1.6 vpmaddwd + vpaddd pairs per cycle). Sapphire and Emerald
  // Rapids: two 512-bit FMA ports, vdpbf16ps at half the FMA rate (measured on the project's Xeon: 116 vs 229
  // GMAC/s on 2 cores), one 512-bit vpdpbusd per cycle.
  MacRates r;
  auto set = [&](MacOp op, double value) {
    r.rate[static_cast<std::size_t>(op)] = cpu_runs(cpu, op) || op == MacOp::scalar ? value : 0.0;
  };
  if (cpu.is_amd() && cpu.family == 0x19 && cpu.has(CpuFeature::avx512f)) {
    r.source = "table: AMD Zen 4";
    set(MacOp::scalar, 2);
    set(MacOp::fma_ymm, 16);
    set(MacOp::fma_zmm, 16);
    set(MacOp::madd16_ymm, 26);
    set(MacOp::dpbusd_zmm, 64);
    set(MacOp::dpbf16_zmm, 32);
  } else if (cpu.is_intel() && cpu.family == 6 && (cpu.model == 0x8F || cpu.model == 0xCF)) {
    r.source = "table: Intel Sapphire/Emerald Rapids";
    set(MacOp::scalar, 2);
    set(MacOp::fma_ymm, 16);
    set(MacOp::fma_zmm, 32);
    set(MacOp::madd16_ymm, 32);
    set(MacOp::dpbusd_zmm, 64);
    set(MacOp::dpbf16_zmm, 16);
  }
  return r;
}

MacRates measure_mac_rates(double seconds, int rounds) {
  MacRates r;
  r.source = "measured";
  std::int64_t iterations[kMacOpCount] = {};
  for (std::size_t i = 0; i < kMacOpCount; ++i) {
    if (runs_on_this_machine(static_cast<MacOp>(i))) iterations[i] = iterations_for(static_cast<MacOp>(i), seconds);
  }
  // Interleaved rounds, best of each: a preemption or a clock change in one round does not decide.
  for (int round = 0; round < std::max(rounds, 1); ++round) {
    for (std::size_t i = 0; i < kMacOpCount; ++i) {
      if (iterations[i] == 0) continue;
      const auto op = static_cast<MacOp>(i);
      const double t = seconds_of(op, iterations[i]);
      const double gmacs = static_cast<double>(iterations[i]) * 12.0 * mac_op_width(op) / std::max(t, 1e-12) * 1e-9;
      r.rate[i] = std::max(r.rate[i], gmacs);
    }
  }
  if (r.rate[static_cast<std::size_t>(MacOp::scalar)] == 0) r.rate[static_cast<std::size_t>(MacOp::scalar)] = 1e-3;
  return r;
}

PeakRate measure_peak(MacOp op, int threads, double seconds) {
  PeakRate peak;
  if (!runs_on_this_machine(op)) return peak;
  peak.threads = threads > 0 ? threads : num_threads();
  const std::int64_t iterations = iterations_for(op, seconds);
  double elapsed = 0, cpu_seconds = 0;
#pragma omp parallel num_threads(peak.threads) reduction(+ : cpu_seconds)
  {
    mac_loop(op, iterations / 8);  // warm up (clocks, AVX-512 power state)
#pragma omp barrier
    const auto start = Clock::now();
    const double cpu_start = thread_cpu_seconds();
    mac_loop(op, iterations);
    cpu_seconds += thread_cpu_seconds() - cpu_start;
#pragma omp barrier
#pragma omp single
    elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  }
  const double macs = static_cast<double>(peak.threads) * static_cast<double>(iterations) * 12.0 * mac_op_width(op);
  peak.gmacs = macs / std::max(elapsed, 1e-12) * 1e-9;
  peak.gmacs_per_core = macs / std::max(cpu_seconds, 1e-12) * 1e-9;
  return peak;
}

const MacRates& mac_rates() {
  if (const MacRates* forced = rates_override().load(std::memory_order_acquire)) return *forced;
  static const MacRates rates = initial_rates();
  return rates;
}

ScopedMacRates::ScopedMacRates(MacRates rates)
    : rates_(std::move(rates)), previous_(rates_override().load(std::memory_order_acquire)) {
  rates_override().store(&rates_, std::memory_order_release);
}
ScopedMacRates::~ScopedMacRates() { rates_override().store(previous_, std::memory_order_release); }

std::size_t choose_kernel(std::span<const KernelOption> options, const CpuFeatures& cpu, const MacRates& rates,
                          SimdLevel level) {
  // A higher level counts 10% more per step at equal instruction rates: its kernels do the same work in fewer
  // instructions (wider registers, twice the registers, masks).
  constexpr double kLevelBonus = 1.1;
  std::size_t best = options.size();
  double best_score = -1.0;
  for (std::size_t i = 0; i < options.size(); ++i) {
    const KernelOption& option = options[i];
    if (static_cast<int>(option.level) > static_cast<int>(level)) continue;
    if (static_cast<int>(mac_op_level(option.mac)) > static_cast<int>(level)) continue;
    if (!cpu.supports(option.level) || !cpu_runs(cpu, option.mac)) continue;
    if ((cpu.bits & option.extra_needs) != option.extra_needs) continue;
    double score = std::max(rates.of(option.mac), 0.0) * option.efficiency;
    for (int l = 0; l < static_cast<int>(option.level); ++l) score *= kLevelBonus;
    if (score > best_score) {
      best = i;
      best_score = score;
    }
  }
  KEYSEL_CHECK(best < options.size(), "no kernel option runs at level " << simd_level_name(level) << " on "
                                                                          << cpu.str());
  return best;
}

std::size_t choose_kernel(std::span<const KernelOption> options) {
  return choose_kernel(options, cpu_features(), mac_rates(), simd_level());
}

}  // namespace keysel
