// The boundary between keysel's C++20 host code and its .cu files (compiled as C++17, without keysel's core
// headers). Internal to keysel: users include cuda_memory.h, cuda_sparse_attention.h, indexer/cuda_*.h.
//
// Each function returns an empty string on success, else the CUDA error ("cudaErrorInvalidValue: invalid
// argument"). KEYSEL_CUDA_CHECK(call) turns a non-empty result into keysel::Error naming the call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace keysel::cuda_glue {

std::string device_count(int& count);
/// Per-GPU facts, read once per process and device (thread-safe) and then served from a cache.
struct DeviceFacts {
  int multiprocessors = 0;
  int capability = 0;  // 10 * major + minor
  /// sm_90+ and not switched off by the environment variable KEYSEL_CUDA_NO_PDL (read once): kernels that
  /// depend on the stream's previous kernel are launched as programmatic dependents (overlapping its end).
  bool programmatic = false;
};
std::string set_device(int device);
/// `on_device`: the pointer is device (or managed) memory, `device`: its GPU.
std::string pointer_device(const void* pointer, bool& on_device, int& device);
std::string multiprocessor_count(int device, int& count);
/// 10 * major + minor.
std::string compute_capability(int device, int& capability);
/// The cached DeviceFacts of GPU `device` (queried on first use); `device` must be a valid index.
std::string device_facts(int device, DeviceFacts& facts);
/// Makes `device` current unless it already is.
std::string ensure_current_device(int device);
std::string malloc_device(void** pointer, std::size_t bytes);
std::string free_device(void* pointer);
std::string malloc_async(void** pointer, std::size_t bytes, void* stream);
/// Stream-ordered scratch memory from keysel's own pool on GPU `device` (created on first use, thread-safe). The
/// pool keeps what it has reserved across synchronizations (release threshold: unlimited), so a call after a
/// synchronization does not map memory again (about 50 us on an H100 host with the default pool, which returns
/// its memory at each synchronization). Captured in a graph, it becomes an allocation node. Free with free_async.
std::string scratch_alloc(void** pointer, std::size_t bytes, int device, void* stream);
std::string free_async(void* pointer, void* stream);
std::string copy_to_device(void* device_pointer, const void* host, std::size_t bytes);
std::string copy_to_host(void* host, const void* device_pointer, std::size_t bytes);
std::string memset_device(void* device_pointer, int value, std::size_t bytes);
std::string synchronize_device();

/// Throws keysel::Error("keysel::<function>: CUDA error ... in <call>") when `status` is not empty.
void throw_if_error(const std::string& status, const char* function, const char* call);
/// Throws unless `pointer` is null or device memory on GPU `device` (argument named in the message).
void expect_device_pointer(const char* function, const void* pointer, const char* argument, int device);
/// Throws unless every non-null pointer of `pointers` (pointer, argument name) is device memory on GPU `device`;
/// a pointer that appears more than once is queried once.
struct NamedPointer {
  const void* pointer;
  const char* argument;
};
void expect_device_pointers(const char* function, const NamedPointer* pointers, int count, int device);
/// Checks that GPU `device` exists, makes it current (cudaSetDevice only when another GPU is current) and
/// returns its cached facts.
DeviceFacts use_device(const char* function, int device);

/// Streams and graphs (cuda_memory.h's CudaStream and CudaGraph). Handles travel as void*.
std::string stream_create(void** stream);
std::string stream_destroy(void* stream);
std::string stream_synchronize(void* stream);
std::string begin_capture(void* stream);
/// Ends the capture on `stream` and instantiates the graph; `graph` / `exec` receive the handles.
std::string end_capture(void* stream, void** graph, void** exec);
std::string graph_launch(void* exec, void* stream);
void graph_destroy(void* graph, void* exec);

}  // namespace keysel::cuda_glue

#define KEYSEL_CUDA_CHECK(call) ::keysel::cuda_glue::throw_if_error((call), __func__, #call)
