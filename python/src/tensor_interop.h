// Python tensors to keysel::TensorView, without copies.
//
// Any object nanobind's ndarray accepts (NumPy arrays through the buffer protocol, torch / CuPy / JAX through
// DLPack) becomes a TensorView over the same memory: dtype, shape, strides in elements and device as the
// producer states them. Unsupported objects, dtypes and devices throw keysel::Error naming the argument.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <string_view>
#include <vector>

#include "keysel/core/tensor.h"

namespace keysel::python {

namespace nb = nanobind;

/// Keeps the Python tensors of one call alive while their views are used (the GIL may be released).
class TensorArguments {
 public:
  explicit TensorArguments(std::string_view function) : function_(function) {}

  /// A read-only view of `object`. `dtype` ("" or a keysel dtype name such as "fp8_e4m3") reinterprets an
  /// 8-bit integer tensor's bytes as that format (fp8 from producers without a float8 type).
  TensorView input(nb::handle object, std::string_view argument, std::string_view dtype = {});
  /// As input(), or an empty view when `object` is None.
  TensorView optional_input(nb::handle object, std::string_view argument, std::string_view dtype = {});
  /// A writable view of `object` (an output); a read-only array is refused. `dtype` as for input().
  TensorView output(nb::handle object, std::string_view argument, std::string_view dtype = {});
  /// As output(), or an empty view when `object` is None (a caller's optional scratch memory).
  TensorView optional_output(nb::handle object, std::string_view argument);

 private:
  std::string_view function_;
  std::vector<nb::ndarray<nb::ro>> inputs_;
  std::vector<nb::ndarray<>> outputs_;
};

/// A cudaStream_t from the integer handle Python passes (0: the legacy default stream).
inline void* stream_pointer(std::uintptr_t handle) { return reinterpret_cast<void*>(handle); }

}  // namespace keysel::python
