// Error checks for keysel's own .cu files (this header includes cuda_runtime.h; public headers never do).
//
//   KEYSEL_CUDA_CHECK(cudaMemsetAsync(p, 0, n, stream));   // throws keysel::Error naming the call and the error
//   KEYSEL_CUDA_CHECK_LAUNCH();                              // after a kernel launch
#pragma once

#include <cuda_runtime.h>

#include <string>
#include <string_view>

#include "keysel/core/error.h"
#include "keysel/core/tensor.h"

namespace keysel::detail {

[[noreturn]] inline void throw_cuda_error(cudaError_t status, const char* call, const char* file, int line) {
  std::string message = "CUDA error ";
  message += cudaGetErrorName(status);
  message += " (";
  message += cudaGetErrorString(status);
  message += ") in ";
  message += call;
  message += " at ";
  message += file;
  message += ":";
  message += std::to_string(line);
  throw Error(message);
}

/// Throws unless `view` is empty or its data lives on GPU `device` (checked with cudaPointerGetAttributes, so a
/// host pointer labelled Device::cuda() is caught before a kernel reads it).
inline void expect_cuda_pointer(std::string_view function, const TensorView& view, std::string_view argument,
                                int device) {
  if (view.raw_data() == nullptr) return;
  cudaPointerAttributes attributes{};
  const cudaError_t status = cudaPointerGetAttributes(&attributes, view.raw_data());
  if (status != cudaSuccess) {
    cudaGetLastError();
    throw_argument_error(function, argument, "a device pointer on cuda:" + std::to_string(device),
                         "a pointer CUDA does not know");
  }
  const bool on_device =
      attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged;
  if (!on_device || attributes.device != device) {
    throw_argument_error(function, argument, "a device pointer on cuda:" + std::to_string(device),
                         on_device ? "a pointer on cuda:" + std::to_string(attributes.device)
                                   : std::string("a host pointer"));
  }
}

/// Makes `device` current for the launches that follow; throws with the device count when it does not exist.
inline void use_cuda_device(std::string_view function, int device) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    count = 0;
  }
  if (device < 0 || device >= count) {
    throw_argument_error(function, "device", "a CUDA device index below " + std::to_string(count),
                         std::to_string(device));
  }
  const cudaError_t status = cudaSetDevice(device);
  if (status != cudaSuccess) throw_cuda_error(status, "cudaSetDevice", __FILE__, __LINE__);
}

}  // namespace keysel::detail

#define KEYSEL_CUDA_CHECK(call)                                                       \
  do {                                                                                \
    const cudaError_t keysel_cuda_status_ = (call);                                   \
    if (keysel_cuda_status_ != cudaSuccess) {                                         \
      cudaGetLastError();                                                             \
      ::keysel::detail::throw_cuda_error(keysel_cuda_status_, #call, __FILE__, __LINE__); \
    }                                                                                 \
  } while (0)

/// After a kernel launch: reports a bad launch configuration (not asynchronous faults, which surface at the
/// next synchronizing call).
#define KEYSEL_CUDA_CHECK_LAUNCH() KEYSEL_CUDA_CHECK(cudaGetLastError())
