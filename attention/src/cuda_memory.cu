// CudaBuffer, CudaStream, CudaGraph and cuda_synchronize on the CUDA runtime (keysel/attention/cuda_memory.h).
// The moves and the build without CUDA are in cuda_memory.cpp.
#include "keysel/attention/cuda_memory.h"

#include <cuda_runtime.h>

#include <string>

#include "cuda_glue.h"
#include "keysel/core/error.h"

namespace keysel {
namespace {

/// For destructors and clean-up paths, which must not throw: a failed call leaves nothing to recover, and its
/// error is cleared so that later calls start clean.
void ignore(cudaError_t status) {
  if (status != cudaSuccess) cudaGetLastError();
}

cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

}  // namespace

CudaBuffer::CudaBuffer(std::int64_t bytes, int device) : bytes_(bytes), device_(device) {
  KEYSEL_CHECK_ARG(bytes >= 0, "bytes", ">= 0", bytes);
  cuda_glue::use_device("CudaBuffer", device);
  if (bytes > 0) cuda_glue::check(cudaMalloc(&data_, static_cast<std::size_t>(bytes)), "CudaBuffer", "cudaMalloc");
}

CudaBuffer::~CudaBuffer() {
  if (data_ != nullptr) {
    ignore(cudaSetDevice(device_));
    ignore(cudaFree(data_));
  }
}

void CudaBuffer::copy_from_host(const void* host, std::int64_t bytes) {
  if (bytes < 0) bytes = bytes_;
  KEYSEL_CHECK_ARG(bytes <= bytes_, "bytes", "<= buffer size " + std::to_string(bytes_), bytes);
  if (bytes == 0) return;
  constexpr std::string_view function = "CudaBuffer::copy_from_host";
  cuda_glue::check(cudaSetDevice(device_), function, "cudaSetDevice");
  cuda_glue::check(cudaMemcpy(data_, host, static_cast<std::size_t>(bytes), cudaMemcpyHostToDevice), function,
                   "cudaMemcpy");
}

void CudaBuffer::copy_to_host(void* host, std::int64_t bytes) const {
  if (bytes < 0) bytes = bytes_;
  KEYSEL_CHECK_ARG(bytes <= bytes_, "bytes", "<= buffer size " + std::to_string(bytes_), bytes);
  if (bytes == 0) return;
  constexpr std::string_view function = "CudaBuffer::copy_to_host";
  cuda_glue::check(cudaSetDevice(device_), function, "cudaSetDevice");
  cuda_glue::check(cudaMemcpy(host, data_, static_cast<std::size_t>(bytes), cudaMemcpyDeviceToHost), function,
                   "cudaMemcpy");
}

void CudaBuffer::fill_bytes(std::uint8_t value) {
  if (bytes_ == 0) return;
  constexpr std::string_view function = "CudaBuffer::fill_bytes";
  cuda_glue::check(cudaSetDevice(device_), function, "cudaSetDevice");
  cuda_glue::check(cudaMemset(data_, value, static_cast<std::size_t>(bytes_)), function, "cudaMemset");
  cuda_glue::check(cudaDeviceSynchronize(), function, "cudaDeviceSynchronize");
}

void cuda_synchronize(int device) {
  cuda_glue::use_device("cuda_synchronize", device);
  cuda_glue::check(cudaDeviceSynchronize(), "cuda_synchronize", "cudaDeviceSynchronize");
}

CudaStream::CudaStream(int device) : device_(device) {
  cuda_glue::use_device("CudaStream", device);
  cudaStream_t created = nullptr;
  const cudaError_t status = cudaStreamCreateWithFlags(&created, cudaStreamNonBlocking);
  stream_ = created;
  cuda_glue::check(status, "CudaStream", "cudaStreamCreateWithFlags");
}

CudaStream::~CudaStream() {
  if (stream_ != nullptr) {
    ignore(cudaSetDevice(device_));
    ignore(cudaStreamDestroy(as_stream(stream_)));
  }
}

void CudaStream::synchronize() const {
  KEYSEL_CHECK_ARG(stream_ != nullptr, "stream", "a live stream", "a moved-from stream");
  cuda_glue::make_current("CudaStream::synchronize", device_);
  cuda_glue::check(cudaStreamSynchronize(as_stream(stream_)), "CudaStream::synchronize", "cudaStreamSynchronize");
}

CudaGraph CudaGraph::capture(const CudaStream& stream, const std::function<void()>& record) {
  KEYSEL_CHECK_ARG(stream.handle() != nullptr, "stream", "a live stream", "a moved-from stream");
  constexpr std::string_view function = "CudaGraph::capture";
  cuda_glue::make_current(function, stream.device());
  const cudaStream_t cuda_stream = as_stream(stream.handle());
  cuda_glue::check(cudaStreamBeginCapture(cuda_stream, cudaStreamCaptureModeGlobal), function,
                   "cudaStreamBeginCapture");
  CudaGraph graph;
  cudaGraph_t captured = nullptr;
  try {
    record();
  } catch (...) {
    ignore(cudaStreamEndCapture(cuda_stream, &captured));  // ends the capture; the graph is dropped
    graph.graph_ = captured;
    throw;
  }
  cudaError_t status = cudaStreamEndCapture(cuda_stream, &captured);
  graph.graph_ = captured;
  cuda_glue::check(status, function, "cudaStreamEndCapture");
  cudaGraphExec_t instance = nullptr;
  status = cudaGraphInstantiate(&instance, captured, 0);
  graph.exec_ = instance;
  cuda_glue::check(status, function, "cudaGraphInstantiate");
  return graph;
}

CudaGraph::~CudaGraph() {
  if (exec_ != nullptr) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec_));
  if (graph_ != nullptr) cudaGraphDestroy(static_cast<cudaGraph_t>(graph_));
}

void CudaGraph::launch(const CudaStream& stream) const {
  KEYSEL_CHECK_ARG(exec_ != nullptr, "graph", "a captured graph", "an empty graph");
  KEYSEL_CHECK_ARG(stream.handle() != nullptr, "stream", "a live stream", "a moved-from stream");
  cuda_glue::check(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec_), as_stream(stream.handle())),
                   "CudaGraph::launch", "cudaGraphLaunch");
}

}  // namespace keysel
