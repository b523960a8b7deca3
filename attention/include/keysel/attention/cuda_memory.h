// Device memory and streams for callers of keysel's CUDA kernels, without including cuda_runtime.h.
//
// Declared in every build; without CUDA every function throws keysel::Error("... built without CUDA").
// Streams travel as `void*` holding a cudaStream_t (nullptr: the legacy default stream), so that keysel's public
// headers need no CUDA header.
#pragma once

#include <cstdint>
#include <functional>

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

/// An owning CUDA stream on one GPU, created non-blocking (no implicit order with the legacy default stream).
/// Pass handle() as the `stream` argument of keysel's CUDA calls; a captured graph needs such a stream.
class CudaStream {
 public:
  explicit CudaStream(int device = 0);
  ~CudaStream();
  CudaStream(CudaStream&& other) noexcept;
  CudaStream& operator=(CudaStream&& other) noexcept;
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;

  void* handle() const { return stream_; }  // a cudaStream_t
  int device() const { return device_; }
  /// Waits for the stream's work; throws keysel::Error if any of it failed.
  void synchronize() const;

 private:
  void* stream_ = nullptr;
  int device_ = 0;
};

/// A CUDA graph recorded by stream capture: `record` enqueues work on `stream` (keysel's CUDA calls with
/// stream.handle()); nothing runs while it is recorded. launch() replays the recorded kernels on the same
/// buffers with the same arguments, without the host-side work of the calls (checks, launch set-up): how a
/// serving engine runs a decode step. Every keysel CUDA call can be captured (no synchronous allocation, copy or
/// synchronization inside; scratch memory becomes graph allocation nodes).
class CudaGraph {
 public:
  CudaGraph() = default;
  /// Throws keysel::Error when `record` throws (the capture is ended and discarded first) or CUDA refuses.
  static CudaGraph capture(const CudaStream& stream, const std::function<void()>& record);
  ~CudaGraph();
  CudaGraph(CudaGraph&& other) noexcept;
  CudaGraph& operator=(CudaGraph&& other) noexcept;
  CudaGraph(const CudaGraph&) = delete;
  CudaGraph& operator=(const CudaGraph&) = delete;

  /// Enqueues one replay on `stream` (asynchronous).
  void launch(const CudaStream& stream) const;
  bool empty() const { return exec_ == nullptr; }

 private:
  void* graph_ = nullptr;  // cudaGraph_t
  void* exec_ = nullptr;   // cudaGraphExec_t
};

/// Waits for all work on GPU `device` and throws keysel::Error if any of it failed.
void cuda_synchronize(int device = 0);

}  // namespace keysel
