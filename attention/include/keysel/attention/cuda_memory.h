// Device memory and streams for callers of keysel's CUDA kernels, without including cuda_runtime.h.
//
// Declared in every build; without CUDA every function throws keysel::Error("... built without CUDA").
// Streams travel as `void*` holding a cudaStream_t (nullptr: the legacy default stream), so that keysel's public
// headers need no CUDA header.
#pragma once

#include <cstdint>

namespace keysel {

/// An owning, move-only block of device memory on one GPU (cudaMalloc / cudaFree).
class CudaBuffer {
 public:
  CudaBuffer() = default;
  /// Allocates `bytes` on GPU `device`. Throws keysel::Error with the CUDA error text on failure.
  explicit CudaBuffer(std::int64_t bytes, int device = 0);
  ~CudaBuffer();
  CudaBuffer(CudaBuffer&& other) noexcept;
  CudaBuffer& operator=(CudaBuffer&& other) noexcept;
  CudaBuffer(const CudaBuffer&) = delete;
  CudaBuffer& operator=(const CudaBuffer&) = delete;

  void* data() const { return data_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  std::int64_t bytes() const { return bytes_; }
  int device() const { return device_; }

  /// Synchronous copies of the first `bytes` bytes (default: all) from / to host memory.
  void copy_from_host(const void* host, std::int64_t bytes = -1);
  void copy_to_host(void* host, std::int64_t bytes = -1) const;
  /// Sets every byte to `value` (0xFF poisons: fp32 NaN, int32 -1), then synchronizes.
  void fill_bytes(std::uint8_t value);

 private:
  void* data_ = nullptr;
  std::int64_t bytes_ = 0;
  int device_ = 0;
};

/// Waits for all work on GPU `device` and throws keysel::Error if any of it failed.
void cuda_synchronize(int device = 0);

}  // namespace keysel
