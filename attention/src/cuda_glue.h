// keysel's host-side use of the CUDA runtime that more than one file shares: device checks, per-GPU facts, the
// scratch-memory pool and CUDA errors as keysel::Error. Private to keysel (never installed; the indexer's CUDA
// files include it by path): users include cuda_memory.h, cuda_sparse_attention.h and keysel/indexer/cuda_*.h.
//
// The header needs no CUDA header, so that the argument checks in .cpp files can use it; .cu files also get
// check() on a cudaError_t. Every function throws keysel::Error naming `function` (the public entry point).
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string_view>

#include "keysel/core/tensor.h"

#if defined(__CUDACC__)
#include <cuda_runtime_api.h>
#endif

namespace keysel::cuda_glue {

/// Per-GPU facts, read once per process and device (thread-safe) and then served from a cache.
struct DeviceFacts {
  int multiprocessors = 0;
  int capability = 0;  // 10 * major + minor
  int shared_memory_optin = 0;  // bytes of shared memory a block may ask for (cudaDevAttrMaxSharedMemoryPerBlockOptin)
  /// sm_90+ and not switched off by the environment variable KEYSEL_CUDA_NO_PDL (read once): kernels that
  /// depend on the stream's previous kernel are launched as programmatic dependents (overlapping its end).
  bool programmatic = false;
  /// The environment variable KEYSEL_CUDA_PORTABLE is set (read once): kernels that have an sm_90a version run
  /// their portable (sm_80+) version instead, so that both can be tested on one Hopper GPU.
  bool portable_only = false;
};

/// Checks that GPU `device` exists, makes it current (cudaSetDevice only when another GPU is current) and
/// returns its cached facts.
DeviceFacts use_device(std::string_view function, int device);
/// Makes `device` (a valid index) current unless it already is.
void make_current(std::string_view function, int device);

/// The checks a CUDA entry point makes of each tensor argument: its shape (kAnyExtent matches any extent), dtype
/// and device, contiguous, and writable when it is an `output`.
void check_tensor(std::string_view function, const TensorView& view, std::string_view argument,
                  std::initializer_list<std::int64_t> shape, std::initializer_list<DType> dtypes, Device device,
                  bool output);

/// Whether `pointer` is aligned to 16 bytes (what the kernels' vector loads and stores need).
inline bool aligned16(const void* pointer) { return reinterpret_cast<std::uintptr_t>(pointer) % 16 == 0; }

/// A pointer argument and its name, for the messages.
struct NamedPointer {
  const void* pointer;
  const char* argument;
};
/// Throws unless every non-null pointer is device (or managed) memory on GPU `device`; a pointer that appears
/// more than once is queried once.
void expect_device_pointers(std::string_view function, std::initializer_list<NamedPointer> pointers, int device);

/// Stream-ordered scratch memory from keysel's own pool on GPU `device` (created on first use, thread-safe;
/// cudaMallocAsync where the GPU has no pools). The pool keeps what it has reserved across synchronizations
/// (release threshold: unlimited), so a call after a synchronization does not map memory again (about 50 us on an
/// H100 host with the default pool, which returns its memory at each synchronization). Captured in a graph, it
/// becomes an allocation node. Zero bytes allocate nothing.
class Scratch {
 public:
  /// `external` (nullptr: allocate): caller-owned device memory of at least `bytes`, used as is and never freed
  /// (a caller's workspace; nothing is allocated, so the call can be captured without memory nodes).
  Scratch(std::string_view function, std::size_t bytes, int device, void* stream, void* external = nullptr);
  /// Frees (stream-ordered) what release() did not; an error is dropped (the caller is already failing).
  ~Scratch();
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  /// Frees the memory after the work enqueued so far on the stream (cudaFreeAsync); throws on failure.
  void release();

 private:
  std::string_view function_;
  void* data_ = nullptr;
  void* stream_ = nullptr;  // a cudaStream_t
  bool owned_ = false;      // data_ came from the stream-ordered pool
};

#if defined(__CUDACC__)
/// Throws keysel::Error("keysel::<function>: CUDA error <name>: <description> in <where>") unless `status` is
/// cudaSuccess, after clearing a non-sticky error so that later calls start clean.
void check(cudaError_t status, std::string_view function, std::string_view where);
#endif

}  // namespace keysel::cuda_glue
