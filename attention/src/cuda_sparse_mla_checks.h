// The argument checks that sparse_mla_cuda and sparse_mla_backward_cuda share (defined in cuda_sparse_mla.cpp).
// Private to keysel; plain C++, used only where keysel is built with CUDA.
#pragma once

#include <cstdint>
#include <string_view>

#include "keysel/attention/sparse_mla.h"
#include "keysel/core/tensor.h"

namespace keysel::detail {

/// Checks `indices`: int32 [rows, topk] on `device`, the slots of a row contiguous (any row stride); returns topk.
/// keysel::Error of `function` naming "indices".
std::int64_t check_cuda_mla_indices(std::string_view function, const TensorView& indices, std::int64_t rows,
                                    Device device);

/// Checks the options (attn_sink fp32 [heads] and topk_length int32 [rows], where given, contiguous on `device`;
/// the scale finite and > 0, or 0) and returns the softmax scale the kernels use (options.scale, or 1/sqrt(576)
/// for 0). keysel::Error of `function` naming the option.
float check_cuda_mla_options(std::string_view function, const SparseMlaOptions& options, std::int64_t rows,
                             std::int64_t heads, Device device);

}  // namespace keysel::detail
