// CUDA runtime calls behind keysel/attention/cuda_glue.h (C++17, no keysel core headers).
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>

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

namespace {
// Facts of the first kMaxCachedDevices GPUs, 0 until read (every real value is positive). Two threads that read
// the same device at once store the same values.
constexpr int kMaxCachedDevices = 64;
std::atomic<int> g_multiprocessors[kMaxCachedDevices];
std::atomic<int> g_capability[kMaxCachedDevices];

std::string cached_facts(int device, DeviceFacts& facts) {
  const bool cached = device >= 0 && device < kMaxCachedDevices;
  if (cached) {
    facts.multiprocessors = g_multiprocessors[device].load(std::memory_order_relaxed);
    facts.capability = g_capability[device].load(std::memory_order_relaxed);
    if (facts.multiprocessors > 0 && facts.capability > 0) return {};
  }
  std::string status = multiprocessor_count(device, facts.multiprocessors);
  if (status.empty()) status = compute_capability(device, facts.capability);
  if (!status.empty()) return status;
  if (cached) {
    g_multiprocessors[device].store(facts.multiprocessors, std::memory_order_relaxed);
    g_capability[device].store(facts.capability, std::memory_order_relaxed);
  }
  return {};
}
}  // namespace

std::string device_facts(int device, DeviceFacts& facts) {
  static const bool no_pdl = [] {
    const char* value = std::getenv("KEYSEL_CUDA_NO_PDL");
    return value != nullptr && value[0] != '\0' && value[0] != '0';
  }();
  const std::string status = cached_facts(device, facts);
  facts.programmatic = status.empty() && facts.capability >= 90 && !no_pdl;
  return status;
}

std::string ensure_current_device(int device) {
  int current = -1;
  const cudaError_t status = cudaGetDevice(&current);
  if (status == cudaSuccess && current == device) return {};
  return text(cudaSetDevice(device));
}

std::string stream_create(void** stream) {
  cudaStream_t created = nullptr;
  const cudaError_t status = cudaStreamCreateWithFlags(&created, cudaStreamNonBlocking);
  *stream = created;
  return text(status);
}
std::string stream_destroy(void* stream) { return text(cudaStreamDestroy(static_cast<cudaStream_t>(stream))); }
std::string stream_synchronize(void* stream) {
  return text(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
}
std::string begin_capture(void* stream) {
  return text(cudaStreamBeginCapture(static_cast<cudaStream_t>(stream), cudaStreamCaptureModeGlobal));
}
std::string end_capture(void* stream, void** graph, void** exec) {
  cudaGraph_t captured = nullptr;
  cudaError_t status = cudaStreamEndCapture(static_cast<cudaStream_t>(stream), &captured);
  *graph = captured;
  *exec = nullptr;
  if (status != cudaSuccess) return text(status);
  cudaGraphExec_t instance = nullptr;
  status = cudaGraphInstantiate(&instance, captured, 0);
  *exec = instance;
  return text(status);
}
std::string graph_launch(void* exec, void* stream) {
  return text(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec), static_cast<cudaStream_t>(stream)));
}
void graph_destroy(void* graph, void* exec) {
  if (exec != nullptr) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec));
  if (graph != nullptr) cudaGraphDestroy(static_cast<cudaGraph_t>(graph));
}
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
std::string scratch_alloc(void** pointer, std::size_t bytes, int device, void* stream) {
  constexpr int kMaxPools = 64;
  static std::mutex mutex;
  static cudaMemPool_t pools[kMaxPools];
  static bool tried[kMaxPools];
  cudaMemPool_t pool = nullptr;
  if (device >= 0 && device < kMaxPools) {
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
    pool = pools[device];
  }
  if (pool == nullptr) return malloc_async(pointer, bytes, stream);
  return text(cudaMallocFromPoolAsync(pointer, bytes, pool, static_cast<cudaStream_t>(stream)));
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
