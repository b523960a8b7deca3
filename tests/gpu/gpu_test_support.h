// Shared helpers of the GPU tests: the skip rule, device copies of host vectors, poisoning.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "keysel/attention/cuda_memory.h"
#include "keysel/core/device.h"

/// Every GPU test starts with this: without a device (or without CUDA) it skips with a message saying so.
#define KEYSEL_REQUIRE_GPU()                                                                    \
  do {                                                                                          \
    if (::keysel::cuda_device_count() == 0) {                                                   \
      GTEST_SKIP() << "no CUDA device: " << ::keysel::cuda_device_description(0);               \
    }                                                                                           \
  } while (0)

namespace keysel::testing {

/// A device copy of a host vector.
template <typename T>
CudaBuffer to_device(const std::vector<T>& host) {
  CudaBuffer buffer(static_cast<std::int64_t>(host.size() * sizeof(T)));
  buffer.copy_from_host(host.data());
  return buffer;
}

/// A device buffer of `count` elements with every byte set to `poison` (0xFF: fp32 NaN; 0xA5: an int32 that is
/// neither -1 nor a position), so that an element the kernel fails to write is caught.
template <typename T>
CudaBuffer poisoned(std::int64_t count, std::uint8_t poison) {
  CudaBuffer buffer(count * static_cast<std::int64_t>(sizeof(T)));
  buffer.fill_bytes(poison);
  return buffer;
}

template <typename T>
std::vector<T> to_host(const CudaBuffer& buffer) {
  std::vector<T> host(static_cast<std::size_t>(buffer.bytes()) / sizeof(T));
  buffer.copy_to_host(host.data());
  return host;
}

}  // namespace keysel::testing
