// Shared helpers of the GPU tests: the skip rule, device copies of host vectors, poisoning, values as a kernel
// reads them.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "keysel/attention/cuda_memory.h"
#include "keysel/core/device.h"
#include "keysel/core/dtype.h"
#include "keysel/core/random.h"

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

/// Values as a kernel reads them: `f` for the CPU side (rounded to bf16 where the kernel reads bf16) and `bits`,
/// the bf16 bits (empty for fp32).
struct DeviceValues {
  std::vector<float> f;
  std::vector<std::uint16_t> bits;
};

/// `x` as the kernel reads it: rounded to bf16 (with its bits) or unchanged.
inline DeviceValues device_values(const std::vector<float>& x, bool bf16) {
  DeviceValues v;
  v.f = x;
  if (bf16) {
    v.bits.resize(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
      v.bits[i] = fp32_to_bf16_bits(x[i]);
      v.f[i] = bf16_bits_to_fp32(v.bits[i]);
    }
  }
  return v;
}

/// `count` normal values of standard deviation `stddev` from `rng`, as the kernel reads them.
inline DeviceValues random_device_values(RandomStream& rng, std::int64_t count, double stddev, bool bf16) {
  std::vector<float> x(static_cast<std::size_t>(count));
  for (float& value : x) value = static_cast<float>(rng.normal(0.0, stddev));
  return device_values(x, bf16);
}

/// A device copy of what the kernel reads: the bf16 bits or the fp32 values.
inline CudaBuffer upload(const DeviceValues& v, bool bf16) { return bf16 ? to_device(v.bits) : to_device(v.f); }

}  // namespace keysel::testing
