// Where tensors live (Device), and what the build and the machine offer: CUDA compiled in, GPUs present.
#pragma once

#include <cstdint>
#include <string>

namespace keysel {

enum class DeviceKind : std::uint8_t { cpu, cuda };

/// A tensor's memory: the host, or CUDA device `index`.
struct Device {
  DeviceKind kind = DeviceKind::cpu;
  int index = 0;

  static Device cpu() { return {}; }
  static Device cuda(int index = 0) { return {DeviceKind::cuda, index}; }
  bool operator==(const Device&) const = default;
  /// "cpu" or "cuda:<index>".
  std::string str() const;
};

/// True when keysel was built with its CUDA kernels.
bool built_with_cuda();
/// True when keysel was built with the FAISS candidate searches.
bool built_with_faiss();
/// Number of CUDA devices visible (0 without CUDA support or without a GPU; never throws).
int cuda_device_count();
/// One line describing the GPU `index` ("NVIDIA H100 80GB HBM3, sm_90, 79.1 GiB") or why there is none.
std::string cuda_device_description(int index = 0);

}  // namespace keysel
