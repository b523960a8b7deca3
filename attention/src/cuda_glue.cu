// CUDA runtime calls behind keysel/attention/cuda_glue.h (C++17, no keysel core headers).
#include <cuda_runtime.h>

#include "keysel/attention/cuda_glue.h"

namespace keysel::cuda_glue {
namespace {
std::string text(cudaError_t status) {
  if (status == cudaSuccess) return {};
  cudaGetLastError();  // clear a non-sticky error so that later calls start clean
  return std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status);
}
}  // namespace

std::string device_count(int& count) {
  count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) count = 0;
  return text(status);
}
std::string set_device(int device) { return text(cudaSetDevice(device)); }
std::string pointer_device(const void* pointer, bool& on_device, int& device) {
  cudaPointerAttributes attributes{};
  const cudaError_t status = cudaPointerGetAttributes(&attributes, pointer);
  on_device = attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged;
  device = attributes.device;
  return text(status);
}
std::string multiprocessor_count(int device, int& count) {
  return text(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
}
std::string compute_capability(int device, int& capability) {
  int major = 0, minor = 0;
  cudaError_t status = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  capability = 10 * major + minor;
  return text(status);
}
std::string malloc_device(void** pointer, std::size_t bytes) { return text(cudaMalloc(pointer, bytes)); }
std::string free_device(void* pointer) { return text(cudaFree(pointer)); }
std::string malloc_async(void** pointer, std::size_t bytes, void* stream) {
  return text(cudaMallocAsync(pointer, bytes, static_cast<cudaStream_t>(stream)));
}
std::string free_async(void* pointer, void* stream) {
  return text(cudaFreeAsync(pointer, static_cast<cudaStream_t>(stream)));
}
std::string copy_to_device(void* device_pointer, const void* host, std::size_t bytes) {
  return text(cudaMemcpy(device_pointer, host, bytes, cudaMemcpyHostToDevice));
}
std::string copy_to_host(void* host, const void* device_pointer, std::size_t bytes) {
  return text(cudaMemcpy(host, device_pointer, bytes, cudaMemcpyDeviceToHost));
}
std::string memset_device(void* device_pointer, int value, std::size_t bytes) {
  return text(cudaMemset(device_pointer, value, bytes));
}
std::string synchronize_device() { return text(cudaDeviceSynchronize()); }

}  // namespace keysel::cuda_glue
