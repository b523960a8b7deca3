// The CUDA runtime behind cuda_glue.h.
#include "cuda_glue.h"

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>

#include "keysel/core/device.h"
#include "keysel/core/error.h"

namespace keysel::cuda_glue {

void check(cudaError_t status, std::string_view function, std::string_view where) {
  if (status == cudaSuccess) return;
  cudaGetLastError();  // clear a non-sticky error so that later calls start clean
  std::string message = "CUDA error ";
  message += cudaGetErrorName(status);
  message += ": ";
  message += cudaGetErrorString(status);
  message += " in ";
  message += where;
  detail::throw_error(function, message);
}

namespace {

// Facts of the first kMaxCachedDevices GPUs, 0 until read (every real value is positive). Two threads that read
// the same device at once store the same values.
constexpr int kMaxCachedDevices = 64;
std::atomic<int> g_multiprocessors[kMaxCachedDevices];
std::atomic<int> g_capability[kMaxCachedDevices];
std::atomic<int> g_shared_memory_optin[kMaxCachedDevices];

/// An environment switch: set, non-empty and not "0".
bool environment_flag(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] != '\0' && value[0] != '0';
}

DeviceFacts device_facts(std::string_view function, int device) {
  static const bool no_pdl = environment_flag("KEYSEL_CUDA_NO_PDL");
  static const bool portable = environment_flag("KEYSEL_CUDA_PORTABLE");
  DeviceFacts facts;
  const bool cached = device >= 0 && device < kMaxCachedDevices;
  if (cached) {
    facts.multiprocessors = g_multiprocessors[device].load(std::memory_order_relaxed);
    facts.capability = g_capability[device].load(std::memory_order_relaxed);
    facts.shared_memory_optin = g_shared_memory_optin[device].load(std::memory_order_relaxed);
  }
  if (facts.multiprocessors <= 0 || facts.capability <= 0 || facts.shared_memory_optin <= 0) {
    int major = 0, minor = 0;
    check(cudaDeviceGetAttribute(&facts.multiprocessors, cudaDevAttrMultiProcessorCount, device), function,
          "cudaDeviceGetAttribute");
    check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), function,
          "cudaDeviceGetAttribute");
    check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), function,
          "cudaDeviceGetAttribute");
    check(cudaDeviceGetAttribute(&facts.shared_memory_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
          function, "cudaDeviceGetAttribute");
    facts.capability = 10 * major + minor;
    if (cached) {
      g_multiprocessors[device].store(facts.multiprocessors, std::memory_order_relaxed);
      g_capability[device].store(facts.capability, std::memory_order_relaxed);
      g_shared_memory_optin[device].store(facts.shared_memory_optin, std::memory_order_relaxed);
    }
  }
  facts.programmatic = facts.capability >= 90 && !no_pdl;
  facts.portable_only = portable;
  return facts;
}

void expect_device_pointer(std::string_view function, const void* pointer, const char* argument, int device) {
  if (pointer == nullptr) return;
  cudaPointerAttributes attributes{};
  const cudaError_t status = cudaPointerGetAttributes(&attributes, pointer);
  const std::string expected = "a device pointer on cuda:" + std::to_string(device);
  if (status != cudaSuccess) {
    cudaGetLastError();
    detail::throw_argument_error(function, argument, expected,
                                 std::string("a pointer CUDA rejects: ") + cudaGetErrorName(status) + ": " +
                                     cudaGetErrorString(status));
  }
  if (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged) {
    detail::throw_argument_error(function, argument, expected, "a host pointer");
  }
  if (attributes.device != device) {
    detail::throw_argument_error(function, argument, expected,
                                 "a pointer on cuda:" + std::to_string(attributes.device));
  }
}

/// keysel's pool on GPU `device`, null where the GPU has none (or `device` is beyond the cache).
cudaMemPool_t scratch_pool(int device) {
  constexpr int kMaxPools = 64;
  static std::mutex mutex;
  static cudaMemPool_t pools[kMaxPools];
  static bool tried[kMaxPools];
  if (device < 0 || device >= kMaxPools) return nullptr;
  const std::lock_guard<std::mutex> lock(mutex);
  if (!tried[device]) {
    tried[device] = true;
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    cudaMemPool_t created = nullptr;
    if (cudaMemPoolCreate(&created, &props) == cudaSuccess) {
      std::uint64_t threshold = UINT64_MAX;
      if (cudaMemPoolSetAttribute(created, cudaMemPoolAttrReleaseThreshold, &threshold) == cudaSuccess) {
        pools[device] = created;
      } else {
        cudaMemPoolDestroy(created);
      }
    }
    cudaGetLastError();  // a GPU without pools falls back to cudaMallocAsync
  }
  return pools[device];
}

}  // namespace

DeviceFacts use_device(std::string_view function, int device) {
  static const int count = cuda_device_count();
  if (device < 0 || device >= count) {
    detail::throw_argument_error(function, "device", "a CUDA device index below " + std::to_string(count),
                                 std::to_string(device));
  }
  make_current(function, device);
  return device_facts(function, device);
}

void check_tensor(std::string_view function, const TensorView& view, std::string_view argument,
                  std::initializer_list<std::int64_t> shape, std::initializer_list<DType> dtypes, Device device,
                  bool output) {
  expect_shape(function, view, argument, shape);
  expect_dtype(function, view, argument, dtypes);
  expect_device(function, view, argument, device);
  expect_contiguous(function, view, argument);
  if (output) expect_writable(function, view, argument);
}

void make_current(std::string_view function, int device) {
  int current = -1;
  if (cudaGetDevice(&current) != cudaSuccess || current != device) {
    check(cudaSetDevice(device), function, "cudaSetDevice");
  }
}

void expect_device_pointers(std::string_view function, std::initializer_list<NamedPointer> pointers, int device) {
  for (auto it = pointers.begin(); it != pointers.end(); ++it) {
    bool seen = false;  // the same pointer under an earlier argument was checked already
    for (auto earlier = pointers.begin(); earlier != it && !seen; ++earlier) seen = earlier->pointer == it->pointer;
    if (!seen) expect_device_pointer(function, it->pointer, it->argument, device);
  }
}

Scratch::Scratch(std::string_view function, std::size_t bytes, int device, void* stream, void* external)
    : function_(function), stream_(stream) {
  if (external != nullptr) {
    data_ = external;
    return;
  }
  if (bytes == 0) return;
  owned_ = true;
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  const cudaMemPool_t pool = scratch_pool(device);
  if (pool == nullptr) {
    check(cudaMallocAsync(&data_, bytes, cuda_stream), function, "cudaMallocAsync");
  } else {
    check(cudaMallocFromPoolAsync(&data_, bytes, pool, cuda_stream), function, "cudaMallocFromPoolAsync");
  }
}

Scratch::~Scratch() {
  if (owned_ && data_ != nullptr && cudaFreeAsync(data_, static_cast<cudaStream_t>(stream_)) != cudaSuccess) cudaGetLastError();
}

void Scratch::release() {
  if (!owned_ || data_ == nullptr) return;
  void* data = data_;
  data_ = nullptr;
  check(cudaFreeAsync(data, static_cast<cudaStream_t>(stream_)), function_, "cudaFreeAsync");
}

}  // namespace keysel::cuda_glue
