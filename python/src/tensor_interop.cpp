#include "tensor_interop.h"

#include <nanobind/stl/string.h>

#include <string>

#include "keysel/core/error.h"

namespace keysel::python {
namespace {

// "numpy.ndarray of dtype >f4", "list", ...: what came, for error messages.
std::string python_type_name(nb::handle object) {
  const nb::object type = nb::borrow(reinterpret_cast<PyObject*>(Py_TYPE(object.ptr())));
  std::string name = nb::str(type.attr("__name__")).c_str();
  if (!object.is_none() && nb::hasattr(object, "dtype")) {
    const nb::object dtype = object.attr("dtype");
    name += std::string(" of dtype ") + nb::str(dtype).c_str();
  }
  return name;
}

// nanobind's import of `object` as an ndarray without conversion; false when it is none (some producers, such
// as NumPy arrays in non-native byte order, make the import throw rather than fail).
template <typename Array>
bool import_array(nb::handle object, Array& array) {
  if (object.is_none()) return false;
  try {
    return nb::try_cast(object, array, /*convert=*/false);
  } catch (const std::exception&) {
    if (PyErr_Occurred()) PyErr_Clear();
    return false;
  }
}

std::string dlpack_dtype_name(nb::dlpack::dtype dtype) {
  using Code = nb::dlpack::dtype_code;
  std::string kind;
  switch (static_cast<Code>(dtype.code)) {
    case Code::Int: kind = "int"; break;
    case Code::UInt: kind = "uint"; break;
    case Code::Float: kind = "float"; break;
    case Code::Bfloat: kind = "bfloat"; break;
    case Code::Complex: kind = "complex"; break;
    case Code::Bool: kind = "bool"; break;
    default: kind = "dlpack-code-" + std::to_string(dtype.code) + "-"; break;
  }
  std::string name = kind + std::to_string(dtype.bits);
  if (dtype.lanes != 1) name += "x" + std::to_string(dtype.lanes);
  return name;
}

// The keysel dtype of a DLPack dtype, or false when keysel has none.
bool keysel_dtype(nb::dlpack::dtype dtype, DType& out) {
  using Code = nb::dlpack::dtype_code;
  if (dtype.lanes != 1) return false;
  const auto code = static_cast<Code>(dtype.code);
  if (code == Code::Float && dtype.bits == 32) { out = DType::fp32; return true; }
  if (code == Code::Float && dtype.bits == 64) { out = DType::fp64; return true; }
  if (code == Code::Float && dtype.bits == 16) { out = DType::fp16; return true; }
  if (code == Code::Bfloat && dtype.bits == 16) { out = DType::bf16; return true; }
  if (code == Code::Float8_E4M3FN && dtype.bits == 8) { out = DType::fp8_e4m3; return true; }
  if (code == Code::Float8_E5M2 && dtype.bits == 8) { out = DType::fp8_e5m2; return true; }
  if (code == Code::Int && dtype.bits == 32) { out = DType::int32; return true; }
  if (code == Code::Int && dtype.bits == 8) { out = DType::int8; return true; }
  return false;
}

template <typename Array>
TensorView view_of(std::string_view function_, const Array& array, std::string_view argument, std::string_view dtype,
                   bool writable) {
  const nb::dlpack::dtype source = array.dtype();
  DType keysel_type{};
  if (!dtype.empty()) {
    const DType wanted = parse_dtype(dtype);
    const bool byte_tensor = source.lanes == 1 && source.bits == 8 &&
                             (source.code == static_cast<std::uint8_t>(nb::dlpack::dtype_code::UInt) ||
                              source.code == static_cast<std::uint8_t>(nb::dlpack::dtype_code::Int));
    if (wanted != DType::fp8_e4m3 && wanted != DType::fp8_e5m2) {
      detail::throw_argument_error(function_, "dtype", "\"fp8_e4m3\" or \"fp8_e5m2\" (formats without a NumPy type)",
                                   detail::describe(dtype));
    }
    DType own{};
    const bool same = keysel_dtype(source, own) && own == wanted;
    if (!byte_tensor && !same) {
      detail::throw_argument_error(function_, argument,
                                   "a uint8 or int8 tensor holding " + std::string(dtype) + " bytes (dtype=)",
                                   dlpack_dtype_name(source));
    }
    keysel_type = wanted;
  } else if (!keysel_dtype(source, keysel_type)) {
    detail::throw_argument_error(function_, argument,
                                 "float32, float16, bfloat16, float64, int32, int8 or float8 (uint8 with dtype=)",
                                 dlpack_dtype_name(source));
  }

  Device device;
  const int device_type = array.device_type();
  if (device_type == nb::device::cpu::value || device_type == nb::device::cuda_host::value) {
    device = Device::cpu();
  } else if (device_type == nb::device::cuda::value || device_type == nb::device::cuda_managed::value) {
    device = Device::cuda(array.device_id());
  } else {
    detail::throw_argument_error(function_, argument, "a tensor on the CPU or a CUDA device",
                                 "DLPack device type " + std::to_string(device_type));
  }

  const std::size_t rank = array.ndim();
  if (rank > static_cast<std::size_t>(TensorView::kMaxRank)) {
    detail::throw_argument_error(function_, argument, "rank <= " + std::to_string(TensorView::kMaxRank),
                                 std::to_string(rank));
  }
  std::vector<std::int64_t> shape(rank), strides(rank);
  for (std::size_t i = 0; i < rank; ++i) {
    shape[i] = static_cast<std::int64_t>(array.shape(i));
    strides[i] = array.stride(i);
  }
  for (std::int64_t stride : strides) {
    if (stride < 0) {
      detail::throw_argument_error(function_, argument,
                                   "non-negative strides (no reversed axis; np.ascontiguousarray copies such a view)",
                                   detail::describe(strides));
    }
  }
  return TensorView(static_cast<const void*>(array.data()), keysel_type, shape, strides, device, /*read_only=*/!writable);
}

}  // namespace

TensorView TensorArguments::input(nb::handle object, std::string_view argument, std::string_view dtype) {
  nb::ndarray<nb::ro> array;
  if (!import_array(object, array)) {
    detail::throw_argument_error(function_, argument,
                                 "a NumPy array (native byte order) or a DLPack tensor (torch, CuPy, JAX)",
                                 python_type_name(object));
  }
  inputs_.push_back(array);
  return view_of(function_, inputs_.back(), argument, dtype, /*writable=*/false);
}

TensorView TensorArguments::optional_input(nb::handle object, std::string_view argument, std::string_view dtype) {
  if (object.is_none()) return {};
  return input(object, argument, dtype);
}

TensorView TensorArguments::optional_output(nb::handle object, std::string_view argument) {
  if (object.is_none()) return {};
  return output(object, argument);
}

TensorView TensorArguments::output(nb::handle object, std::string_view argument, std::string_view dtype) {
  nb::ndarray<> array;
  if (!import_array(object, array)) {
    nb::ndarray<nb::ro> read_only;
    const bool is_array = import_array(object, read_only);
    detail::throw_argument_error(function_, argument, "a writable NumPy array or DLPack tensor",
                                 is_array ? "a read-only array" : python_type_name(object));
  }
  outputs_.push_back(array);
  return view_of(function_, outputs_.back(), argument, dtype, /*writable=*/true);
}

}  // namespace keysel::python
