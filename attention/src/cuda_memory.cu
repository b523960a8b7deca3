#include <utility>

#include "keysel/attention/cuda_check.h"
#include "keysel/attention/cuda_memory.h"

namespace keysel {

CudaBuffer::CudaBuffer(std::int64_t bytes, int device) : bytes_(bytes), device_(device) {
  KEYSEL_CHECK_ARG(bytes >= 0, "bytes", ">= 0", bytes);
  detail::use_cuda_device("CudaBuffer", device);
  if (bytes > 0) KEYSEL_CUDA_CHECK(cudaMalloc(&data_, static_cast<std::size_t>(bytes)));
}

CudaBuffer::~CudaBuffer() {
  if (data_ != nullptr) {
    cudaSetDevice(device_);
    cudaFree(data_);  // a destructor must not throw; a failed free leaves nothing to recover
  }
}

CudaBuffer::CudaBuffer(CudaBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)), device_(other.device_) {}

CudaBuffer& CudaBuffer::operator=(CudaBuffer&& other) noexcept {
  if (this != &other) {
    CudaBuffer old(std::move(*this));
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
    device_ = other.device_;
  }
  return *this;
}

void CudaBuffer::copy_from_host(const void* host, std::int64_t bytes) {
  if (bytes < 0) bytes = bytes_;
  KEYSEL_CHECK_ARG(bytes <= bytes_, "bytes", "<= buffer size " + std::to_string(bytes_), bytes);
  if (bytes == 0) return;
  KEYSEL_CUDA_CHECK(cudaSetDevice(device_));
  KEYSEL_CUDA_CHECK(cudaMemcpy(data_, host, static_cast<std::size_t>(bytes), cudaMemcpyHostToDevice));
}

void CudaBuffer::copy_to_host(void* host, std::int64_t bytes) const {
  if (bytes < 0) bytes = bytes_;
  KEYSEL_CHECK_ARG(bytes <= bytes_, "bytes", "<= buffer size " + std::to_string(bytes_), bytes);
  if (bytes == 0) return;
  KEYSEL_CUDA_CHECK(cudaSetDevice(device_));
  KEYSEL_CUDA_CHECK(cudaMemcpy(host, data_, static_cast<std::size_t>(bytes), cudaMemcpyDeviceToHost));
}

void CudaBuffer::fill_bytes(std::uint8_t value) {
  if (bytes_ == 0) return;
  KEYSEL_CUDA_CHECK(cudaSetDevice(device_));
  KEYSEL_CUDA_CHECK(cudaMemset(data_, value, static_cast<std::size_t>(bytes_)));
  KEYSEL_CUDA_CHECK(cudaDeviceSynchronize());
}

void cuda_synchronize(int device) {
  detail::use_cuda_device("cuda_synchronize", device);
  KEYSEL_CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace keysel
