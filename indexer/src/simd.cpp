// The Lightning Indexer's kernel choice: per key format, the implementations it has, handed to
// keysel::choose_kernel (keysel/core/cpu_features.h), which picks by level, features and multiply-accumulate
// rate. The level itself (KEYSEL_SIMD, set_simd_level) is core's.
#include "keysel/indexer/simd.h"

#include <array>
#include <span>

#include "indexer_kernels.h"
#include "keysel/core/error.h"

namespace keysel {
namespace indexer_detail {
namespace {

struct Option {
  IndexerKernel kernel;
  KernelOption option;
};

// Listed best-first where rates tie (choose_kernel keeps the earlier option on equal scores).
constexpr std::array<Option, 3> kFloatOptions = {{
    {IndexerKernel::avx512_fma, {"avx512_fma", SimdLevel::avx512, MacOp::fma_zmm}},
    {IndexerKernel::avx2_fma, {"avx2_fma", SimdLevel::avx2, MacOp::fma_ymm}},
    {IndexerKernel::scalar, {"scalar", SimdLevel::scalar, MacOp::scalar}},
}};
constexpr std::array<Option, 4> kBf16Options = {{
    {IndexerKernel::avx512_bf16, {"avx512_bf16", SimdLevel::avx512, MacOp::dpbf16_zmm}},
    {IndexerKernel::avx512_fma, {"avx512_fma", SimdLevel::avx512, MacOp::fma_zmm}},
    {IndexerKernel::avx2_fma, {"avx2_fma", SimdLevel::avx2, MacOp::fma_ymm}},
    {IndexerKernel::scalar, {"scalar", SimdLevel::scalar, MacOp::scalar}},
}};
constexpr std::array<Option, 4> kIntegerOptions = {{
    {IndexerKernel::avx512_vnni, {"avx512_vnni", SimdLevel::avx512, MacOp::dpbusd_zmm}},
    {IndexerKernel::avx512_fma, {"avx512_fma", SimdLevel::avx512, MacOp::fma_zmm}},
    {IndexerKernel::avx2_madd16, {"avx2_madd16", SimdLevel::avx2, MacOp::madd16_ymm}},
    {IndexerKernel::scalar, {"scalar", SimdLevel::scalar, MacOp::scalar}},
}};

std::span<const Option> options_for(DType format) {
  switch (format) {
    case DType::bf16:
    case DType::fp8_e4m3:
    case DType::fp8_e5m2: return kBf16Options;
    case DType::int8:
    case DType::int4: return kIntegerOptions;
    default: return kFloatOptions;
  }
}

}  // namespace

std::string_view indexer_kernel_name(IndexerKernel kernel) {
  switch (kernel) {
    case IndexerKernel::scalar: return "scalar";
    case IndexerKernel::avx2_fma: return "avx2_fma";
    case IndexerKernel::avx2_madd16: return "avx2_madd16";
    case IndexerKernel::avx512_fma: return "avx512_fma";
    case IndexerKernel::avx512_bf16: return "avx512_bf16";
    case IndexerKernel::avx512_vnni: return "avx512_vnni";
  }
  return "unknown";
}

IndexerKernel choose_indexer_kernel(DType format) {
  const std::span<const Option> options = options_for(format);
  std::array<KernelOption, 4> list{};
  for (std::size_t i = 0; i < options.size(); ++i) list[i] = options[i].option;
  return options[choose_kernel(std::span<const KernelOption>(list.data(), options.size()))].kernel;
}

void score_keys_with(IndexerKernel kernel, const IndexerProblem& problem, std::int64_t begin, std::int64_t end,
                     float* out) {
  switch (kernel) {
#if defined(__x86_64__)
    case IndexerKernel::avx512_bf16: score_keys_avx512_bf16(problem, begin, end, out); return;
    case IndexerKernel::avx512_vnni: score_keys_avx512_vnni(problem, begin, end, out); return;
    case IndexerKernel::avx512_fma: score_keys_avx512_fma(problem, begin, end, out); return;
    case IndexerKernel::avx2_fma:
    case IndexerKernel::avx2_madd16: score_keys_avx2(problem, begin, end, out); return;
#endif
    default: score_keys_scalar(problem, begin, end, out); return;
  }
}

void score_keys(const IndexerProblem& problem, std::int64_t begin, std::int64_t end, float* out) {
  score_keys_with(choose_indexer_kernel(problem.format), problem, begin, end, out);
}

}  // namespace indexer_detail

std::string_view indexer_kernel_name(DType format) {
  return indexer_detail::indexer_kernel_name(indexer_detail::choose_indexer_kernel(format));
}

}  // namespace keysel
