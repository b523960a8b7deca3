// A caller's device workspace, checked: shared by keysel's CUDA entry points that take `workspace=` (the
// indexer's top-k and logits, sparse MLA). Private to keysel; plain C++, compiled with and without CUDA.
#pragma once

#include <cstdint>
#include <string_view>

#include "keysel/core/tensor.h"

namespace keysel::detail {

/// The device pointer of a caller's workspace (any dtype, contiguous, writable, 16-byte aligned, on `device`) of
/// at least `bytes` bytes, or nullptr when `workspace` is empty (the kernels then take stream-ordered scratch);
/// keysel::Error of `function` naming "workspace".
void* workspace_pointer(std::string_view function, const TensorView& workspace, std::int64_t bytes, Device device);

}  // namespace keysel::detail
