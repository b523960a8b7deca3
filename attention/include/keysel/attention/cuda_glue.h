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
std::string set_device(int device);
/// `on_device`: the pointer is device (or managed) memory, `device`: its GPU.
std::string pointer_device(const void* pointer, bool& on_device, int& device);
std::string multiprocessor_count(int device, int& count);
/// 10 * major + minor.
std::string compute_capability(int device, int& capability);
std::string malloc_device(void** pointer, std::size_t bytes);
std::string free_device(void* pointer);
std::string malloc_async(void** pointer, std::size_t bytes, void* stream);
std::string free_async(void* pointer, void* stream);
std::string copy_to_device(void* device_pointer, const void* host, std::size_t bytes);
std::string copy_to_host(void* host, const void* device_pointer, std::size_t bytes);
std::string memset_device(void* device_pointer, int value, std::size_t bytes);
std::string synchronize_device();

/// Throws keysel::Error("keysel::<function>: CUDA error ... in <call>") when `status` is not empty.
void throw_if_error(const std::string& status, const char* function, const char* call);
/// Throws unless `pointer` is null or device memory on GPU `device` (argument named in the message).
void expect_device_pointer(const char* function, const void* pointer, const char* argument, int device);
/// Checks that GPU `device` exists and makes it current.
void use_device(const char* function, int device);

}  // namespace keysel::cuda_glue

#define KEYSEL_CUDA_CHECK(call) ::keysel::cuda_glue::throw_if_error((call), __func__, #call)
