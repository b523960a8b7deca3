#include <cuda_runtime.h>

#include <cstdio>
#include <string>

#include "keysel/core/device.h"

namespace keysel {

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error so later calls start clean
    return 0;
  }
  return count;
}

std::string cuda_device_description(int index) {
  const int count = cuda_device_count();
  if (count == 0) return "no CUDA device is present";
  if (index < 0 || index >= count) {
    return "no CUDA device " + std::to_string(index) + " (" + std::to_string(count) + " present)";
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, index) != cudaSuccess) {
    cudaGetLastError();
    return "CUDA device " + std::to_string(index) + " could not be queried";
  }
  char line[256];
  std::snprintf(line, sizeof line, "%s, sm_%d%d, %.1f GiB", prop.name, prop.major, prop.minor,
                static_cast<double>(prop.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0));
  return line;
}

}  // namespace keysel
