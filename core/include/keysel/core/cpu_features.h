// What this CPU can run, and the one SIMD dispatch every kernel family goes through.
//
// keysel is built without -march; its kernels are compiled once per instruction set (files named *_avx2.cpp,
// *_avx512.cpp, each with its own -m flags) and chosen at run time here:
//
//   - cpu_features(): CPUID and XGETBV, read once: vendor, model name, family/model and the feature bits, each
//     bit set only when the OS also saves the registers it needs.
//   - SimdLevel: scalar; avx2 (AVX2 + FMA + F16C); avx512 (AVX-512 F + BW + VL + DQ on top of avx2). Extensions
//     beyond a level (AVX-512 VNNI, BF16) are asked for separately, so the plain AVX-512 kernels run on every
//     AVX-512 CPU.
//   - simd_level(): the level in use, the best the CPU supports unless lowered by the environment variable
//     KEYSEL_SIMD=scalar|avx2|avx512 (read once, here only; an unknown or unsupported value makes the first
//     simd_level() call throw keysel::Error naming the variable, the value and the supported levels) or by
//     set_simd_level() / ScopedSimdLevel. Attention (AttentionKernel::automatic), the top-k kernels and the
//     indexer all follow it.
//   - choose_kernel(): a kernel family lists its implementations (level, extra features, the multiply-add
//     instruction of its inner loop) and gets the one with the highest multiply-accumulate rate on this CPU, not
//     merely the newest instruction the CPU has: AVX-512 BF16 `vdpbf16ps` runs at half the fp32 FMA rate on
//     Intel Xeon (Sapphire Rapids and later) but at twice it on AMD Zen 4, so fp8 and bf16 keys go through bf16
//     dot products on one and through fp32 FMA on the other.
//   - mac_rates(): the rates choose_kernel compares, in MACs per cycle per core. Known cores (AMD Zen 4; Intel
//     Sapphire/Emerald/Granite Rapids) use a fixed table, so that the choice is the same on every run and every
//     machine of that kind (the paths round differently in the last bits). Any other CPU is measured once, at
//     the first call: a register-only loop per instruction on the calling thread, best of 5 interleaved rounds,
//     about 2 ms in all; only the ratios between instructions matter.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

namespace keysel {

// ---- features -----------------------------------------------------------------------------------------

/// CPU features the kernels care about. Each counts as present only when CPUID reports it and the OS saves the
/// registers it uses (XCR0: YMM for AVX, opmask/ZMM for AVX-512, tile data for AMX).
enum class CpuFeature : std::uint8_t {
  sse4_2,
  avx,
  avx2,
  fma,
  f16c,
  bmi2,
  avx512f,
  avx512bw,
  avx512vl,
  avx512dq,
  avx512cd,
  avx512_vnni,
  avx512_bf16,
  avx512_fp16,
  avx_vnni,
  amx_tile,
  amx_int8,
  amx_bf16,
};
inline constexpr std::size_t kCpuFeatureCount = static_cast<std::size_t>(CpuFeature::amx_bf16) + 1;

/// "avx512_bf16", ... (the names /proc/cpuinfo uses, with an underscore after "avx512" where it has one).
std::string_view cpu_feature_name(CpuFeature feature);

/// Instruction-set level of a kernel. Ordered: a CPU that runs a level runs every lower one.
///   scalar  portable C++
///   avx2    AVX2 + FMA + F16C
///   avx512  avx2 + AVX-512 F, BW, VL, DQ
enum class SimdLevel : std::uint8_t { scalar, avx2, avx512 };
inline constexpr std::array<SimdLevel, 3> kSimdLevels = {SimdLevel::scalar, SimdLevel::avx2, SimdLevel::avx512};

struct CpuFeatures {
  std::string vendor;      ///< CPUID vendor string ("GenuineIntel", "AuthenticAMD"); empty off x86
  std::string model_name;  ///< brand string ("AMD EPYC 9654 96-Core Processor"); empty if the CPU has none
  int family = 0;          ///< display family (base + extended)
  int model = 0;           ///< display model (base + extended << 4)
  int stepping = 0;
  std::uint64_t bits = 0;  ///< bit i: CpuFeature i

  bool has(CpuFeature feature) const { return (bits >> static_cast<unsigned>(feature)) & 1u; }
  CpuFeatures& set(CpuFeature feature, bool present = true);
  bool is_intel() const { return vendor == "GenuineIntel"; }
  bool is_amd() const { return vendor == "AuthenticAMD" || vendor == "HygonGenuine"; }

  /// True when every feature `level` needs is present.
  bool supports(SimdLevel level) const;
  /// The best level supported.
  SimdLevel max_level() const;
  /// The features `level` needs that are absent, as "avx512bw, avx512dq" ("" when supported).
  std::string missing_for(SimdLevel level) const;
  /// One line: "AMD EPYC (AuthenticAMD family 25 model 17): avx2 fma f16c avx512f ...".
  std::string str() const;
};

/// This machine's features (read once; thread-safe).
const CpuFeatures& cpu_features();

// ---- the SIMD level -----------------------------------------------------------------------------------

/// "scalar", "avx2", "avx512".
std::string_view simd_level_name(SimdLevel level);
/// Parses a name above; throws keysel::Error naming the accepted names otherwise.
SimdLevel parse_simd_level(std::string_view name);
/// The best level this CPU supports.
SimdLevel best_simd_level();
/// True when this CPU can run `level`.
bool simd_level_supported(SimdLevel level);
/// The levels this CPU runs, scalar first.
std::string supported_simd_levels();
/// The level in use: best_simd_level(), lowered by KEYSEL_SIMD or set_simd_level(). Throws keysel::Error
/// when KEYSEL_SIMD names an unknown level or one this CPU lacks (on every call; the variable is read once).
SimdLevel simd_level();
/// Forces a level for the whole process; throws keysel::Error if the CPU cannot run it.
void set_simd_level(SimdLevel level);

/// Sets the level for its lifetime (tests, benchmarks), then restores the previous one.
class ScopedSimdLevel {
 public:
  explicit ScopedSimdLevel(SimdLevel level);
  ~ScopedSimdLevel();
  ScopedSimdLevel(const ScopedSimdLevel&) = delete;
  ScopedSimdLevel& operator=(const ScopedSimdLevel&) = delete;

 private:
  SimdLevel previous_;
};

namespace detail {
/// The level KEYSEL_SIMD asks for, given the variable's value (nullptr: unset) and the CPU: `best` when unset
/// or empty; throws keysel::Error naming KEYSEL_SIMD, the value and the supported levels when the value is
/// unknown or the CPU lacks that level. The one parser of the variable (exposed for tests).
SimdLevel simd_level_from_environment(const char* value, const CpuFeatures& cpu);
}  // namespace detail

// ---- multiply-accumulate rates and kernel choice ------------------------------------------------------

/// The multiply-accumulate instruction a kernel's inner loop is built on. MACs per instruction in brackets.
enum class MacOp : std::uint8_t {
  scalar,      ///< scalar fp32 multiply-add [1] (any CPU)
  fma_ymm,     ///< vfmadd231ps ymm [8] (avx2 level)
  fma_zmm,     ///< vfmadd231ps zmm [16] (avx512 level)
  madd16_ymm,  ///< vpmaddwd + vpaddd ymm, int16 pairs [16] (avx2 level)
  dpbusd_zmm,  ///< vpdpbusd zmm, u8 x s8 quads [64] (avx512 level + avx512_vnni)
  dpbf16_zmm,  ///< vdpbf16ps zmm, bf16 pairs [32] (avx512 level + avx512_bf16)
};
inline constexpr std::size_t kMacOpCount = static_cast<std::size_t>(MacOp::dpbf16_zmm) + 1;

/// "scalar", "fma_ymm", ...
std::string_view mac_op_name(MacOp op);
/// MACs one instruction (one pair for madd16_ymm) performs.
int mac_op_width(MacOp op);
/// The level and the extra feature (or none) an instruction needs.
SimdLevel mac_op_level(MacOp op);
bool cpu_runs(const CpuFeatures& cpu, MacOp op);

/// Multiply-accumulate throughput per core, one entry per MacOp (0 where the CPU lacks the instruction).
/// Table entries are in MACs per cycle; measured ones in GMAC/s of the calling thread. Only ratios within one
/// MacRates are meaningful.
struct MacRates {
  std::array<double, kMacOpCount> rate{};
  std::string source;  ///< "table: AMD Zen 4", "measured (unknown core)"
  double of(MacOp op) const { return rate[static_cast<std::size_t>(op)]; }
};

/// The rates of a known core (AMD Zen 4; Intel Sapphire/Emerald/Granite Rapids), or rates with an empty source
/// when `cpu` is not in the table.
MacRates table_mac_rates(const CpuFeatures& cpu);
/// This CPU's rates: the table's for a known core, else measured once (about 2 ms, at the first call).
const MacRates& mac_rates();

/// Replaces mac_rates() for its lifetime, then restores them: tests run the path another CPU would choose
/// (e.g. fp8 keys through fp32 FMA, as on Intel Xeon). Not thread-safe against concurrent kernel calls.
class ScopedMacRates {
 public:
  explicit ScopedMacRates(MacRates rates);
  ~ScopedMacRates();
  ScopedMacRates(const ScopedMacRates&) = delete;
  ScopedMacRates& operator=(const ScopedMacRates&) = delete;

 private:
  MacRates rates_;
  const MacRates* previous_;
};
/// Measures each instruction this CPU runs on the calling thread: a loop of 12 independent accumulators in
/// registers, `seconds` per round, best of `rounds` interleaved rounds. GMAC/s.
MacRates measure_mac_rates(double seconds = 1e-4, int rounds = 5);
/// A peak multiply-accumulate rate (the ceilings the benchmarks print beside keysel's kernels).
struct PeakRate {
  int threads = 0;
  double gmacs = 0;           ///< GMAC/s over wall time, all threads together
  double gmacs_per_core = 0;  ///< GMAC per CPU-second of the threads (robust when other work shares the cores)
};
/// The peak rate of `op` over `threads` threads (0: keysel::num_threads()): a register-only loop of 12 independent
/// accumulators, about `seconds` per thread. Zeros when the CPU lacks the instruction.
PeakRate measure_peak(MacOp op, int threads = 0, double seconds = 0.2);

/// One implementation a kernel family offers.
struct KernelOption {
  std::string_view name;          ///< e.g. "avx512_bf16"
  SimdLevel level;                ///< the level it is compiled for: the active simd_level() must be at least this
  MacOp mac;                      ///< the instruction of its inner loop (it needs what that instruction needs)
  std::uint64_t extra_needs = 0;  ///< further features (bit i: CpuFeature i)
  /// Share of the instruction's rate the kernel turns into useful work, relative to the family's other options
  /// (e.g. below 1 for a prefilter that rescores what it keeps); the rate choose_kernel compares is rate * this.
  double efficiency = 1.0;
};

/// Index of the option to run: among those whose level is at most `level` and whose instruction and extra
/// features `cpu` has, the one with the highest rate x efficiency, where a higher level counts 10% more per step
/// (its kernels do the same work in fewer instructions); ties go to the earlier option.
/// Throws keysel::Error when none qualifies (list a scalar option).
std::size_t choose_kernel(std::span<const KernelOption> options, const CpuFeatures& cpu, const MacRates& rates,
                          SimdLevel level);
/// choose_kernel for this CPU, its mac_rates() and the active simd_level().
std::size_t choose_kernel(std::span<const KernelOption> options);

}  // namespace keysel
