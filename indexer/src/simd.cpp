#include "keysel/indexer/simd.h"

#include <atomic>
#include <cstdlib>
#include <string>

#include "indexer_kernels.h"
#include "keysel/core/error.h"

namespace keysel {
namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

SimdLevel initial_level() {
  SimdLevel level = best_simd_level();
  if (const char* forced = std::getenv("KEYSEL_SIMD"); forced != nullptr && *forced != '\0') {
    const SimdLevel wanted = parse_simd_level(forced);
    KEYSEL_CHECK(simd_level_supported(wanted), "KEYSEL_SIMD=" << forced << " asks for a level this CPU lacks; best is "
                                                            << simd_level_name(level));
    level = wanted;
  }
  return level;
}

std::atomic<int>& level_state() {
  static std::atomic<int> state{static_cast<int>(initial_level())};
  return state;
}

}  // namespace

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
  if (name == "scalar") return SimdLevel::scalar;
  if (name == "avx2") return SimdLevel::avx2;
  if (name == "avx512") return SimdLevel::avx512;
  KEYSEL_CHECK_ARG(false, "name", "scalar, avx2 or avx512", name);
  return SimdLevel::scalar;
}

SimdLevel best_simd_level() {
  static const SimdLevel best = cpu_has_avx512() ? SimdLevel::avx512
                                : cpu_has_avx2() ? SimdLevel::avx2
                                                 : SimdLevel::scalar;
  return best;
}

bool simd_level_supported(SimdLevel level) {
  return static_cast<int>(level) <= static_cast<int>(best_simd_level());
}

SimdLevel simd_level() { return static_cast<SimdLevel>(level_state().load(std::memory_order_relaxed)); }

void set_simd_level(SimdLevel level) {
  KEYSEL_CHECK_ARG(simd_level_supported(level), "level",
                   "a level this CPU supports (up to " + std::string(simd_level_name(best_simd_level())) + ")",
                   simd_level_name(level));
  level_state().store(static_cast<int>(level), std::memory_order_relaxed);
}

ScopedSimdLevel::ScopedSimdLevel(SimdLevel level) : previous_(simd_level()) { set_simd_level(level); }
ScopedSimdLevel::~ScopedSimdLevel() { level_state().store(static_cast<int>(previous_), std::memory_order_relaxed); }

namespace indexer_detail {

void score_keys(const IndexerProblem& problem, std::int64_t begin, std::int64_t end, float* out) {
  switch (simd_level()) {
    case SimdLevel::avx512: score_keys_avx512(problem, begin, end, out); return;
    case SimdLevel::avx2: score_keys_avx2(problem, begin, end, out); return;
    case SimdLevel::scalar: score_keys_scalar(problem, begin, end, out); return;
  }
}

}  // namespace indexer_detail
}  // namespace keysel
