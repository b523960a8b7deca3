// CudaBuffer, cuda_synchronize and the host side of the CUDA error checks. Without CUDA every entry point
// throws "built without CUDA".
#include "keysel/attention/cuda_memory.h"

#include <string>
#include <utility>

#include "keysel/core/build_config.h"
#include "keysel/core/error.h"

#if KEYSEL_CUDA
#include "keysel/attention/cuda_glue.h"

namespace keysel {

namespace cuda_glue {

void throw_if_error(const std::string& status, const char* function, const char* call) {
  if (status.empty()) return;
  detail::throw_error(function, "CUDA error " + status + " in " + call);
}

void expect_device_pointer(const char* function, const void* pointer, const char* argument, int device) {
  if (pointer == nullptr) return;
  bool on_device = false;
  int pointer_device_index = -1;
  const std::string status = cuda_glue::pointer_device(pointer, on_device, pointer_device_index);
  const std::string expected = "a device pointer on cuda:" + std::to_string(device);
  if (!status.empty()) detail::throw_argument_error(function, argument, expected, "a pointer CUDA rejects: " + status);
  if (!on_device) detail::throw_argument_error(function, argument, expected, "a host pointer");
  if (pointer_device_index != device) {
    detail::throw_argument_error(function, argument, expected,
                                 "a pointer on cuda:" + std::to_string(pointer_device_index));
  }
}

void expect_device_pointers(const char* function, const NamedPointer* pointers, int count, int device) {
  for (int i = 0; i < count; ++i) {
    bool seen = false;  // the same pointer under an earlier argument was checked already
    for (int j = 0; j < i && !seen; ++j) seen = pointers[j].pointer == pointers[i].pointer;
    if (!seen) expect_device_pointer(function, pointers[i].pointer, pointers[i].argument, device);
  }
}

DeviceFacts use_device(const char* function, int device) {
  static const int count = [] {
    int n = 0;
    device_count(n);
    return n;
  }();
  if (device < 0 || device >= count) {
    detail::throw_argument_error(function, "device", "a CUDA device index below " + std::to_string(count),
                                 std::to_string(device));
  }
  throw_if_error(ensure_current_device(device), function, "cudaSetDevice");
  DeviceFacts facts;
  throw_if_error(device_facts(device, facts), function, "cudaDeviceGetAttribute");
  return facts;
}

}  // namespace cuda_glue

CudaBuffer::CudaBuffer(std::int64_t bytes, int device) : bytes_(bytes), device_(device) {
  KEYSEL_CHECK_ARG(bytes >= 0, "bytes", ">= 0", bytes);
  cuda_glue::use_device("CudaBuffer", device);
  if (bytes > 0) KEYSEL_CUDA_CHECK(cuda_glue::malloc_device(&data_, static_cast<std::size_t>(bytes)));
}

CudaBuffer::~CudaBuffer() {
  if (data_ != nullptr) {
    cuda_glue::set_device(device_);
    cuda_glue::free_device(data_);  // a destructor must not throw; a failed free leaves nothing to recover
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
  KEYSEL_CUDA_CHECK(cuda_glue::set_device(device_));
  KEYSEL_CUDA_CHECK(cuda_glue::copy_to_device(data_, host, static_cast<std::size_t>(bytes)));
}

void CudaBuffer::copy_to_host(void* host, std::int64_t bytes) const {
  if (bytes < 0) bytes = bytes_;
  KEYSEL_CHECK_ARG(bytes <= bytes_, "bytes", "<= buffer size " + std::to_string(bytes_), bytes);
  if (bytes == 0) return;
  KEYSEL_CUDA_CHECK(cuda_glue::set_device(device_));
  KEYSEL_CUDA_CHECK(cuda_glue::copy_to_host(host, data_, static_cast<std::size_t>(bytes)));
}

void CudaBuffer::fill_bytes(std::uint8_t value) {
  if (bytes_ == 0) return;
  KEYSEL_CUDA_CHECK(cuda_glue::set_device(device_));
  KEYSEL_CUDA_CHECK(cuda_glue::memset_device(data_, value, static_cast<std::size_t>(bytes_)));
  KEYSEL_CUDA_CHECK(cuda_glue::synchronize_device());
}

void cuda_synchronize(int device) {
  cuda_glue::use_device("cuda_synchronize", device);
  KEYSEL_CUDA_CHECK(cuda_glue::synchronize_device());
}

CudaStream::CudaStream(int device) : device_(device) {
  cuda_glue::use_device("CudaStream", device);
  KEYSEL_CUDA_CHECK(cuda_glue::stream_create(&stream_));
}

CudaStream::~CudaStream() {
  if (stream_ != nullptr) {
    cuda_glue::set_device(device_);
    cuda_glue::stream_destroy(stream_);  // a destructor must not throw
  }
}

CudaStream::CudaStream(CudaStream&& other) noexcept
    : stream_(std::exchange(other.stream_, nullptr)), device_(other.device_) {}

CudaStream& CudaStream::operator=(CudaStream&& other) noexcept {
  if (this != &other) {
    CudaStream old(std::move(*this));
    stream_ = std::exchange(other.stream_, nullptr);
    device_ = other.device_;
  }
  return *this;
}

void CudaStream::synchronize() const {
  KEYSEL_CHECK_ARG(stream_ != nullptr, "stream", "a live stream", "a moved-from stream");
  KEYSEL_CUDA_CHECK(cuda_glue::ensure_current_device(device_));
  KEYSEL_CUDA_CHECK(cuda_glue::stream_synchronize(stream_));
}

CudaGraph CudaGraph::capture(const CudaStream& stream, const std::function<void()>& record) {
  KEYSEL_CHECK_ARG(stream.handle() != nullptr, "stream", "a live stream", "a moved-from stream");
  KEYSEL_CUDA_CHECK(cuda_glue::ensure_current_device(stream.device()));
  KEYSEL_CUDA_CHECK(cuda_glue::begin_capture(stream.handle()));
  CudaGraph graph;
  try {
    record();
  } catch (...) {
    cuda_glue::end_capture(stream.handle(), &graph.graph_, &graph.exec_);  // ends the capture; the graph is dropped
    throw;
  }
  KEYSEL_CUDA_CHECK(cuda_glue::end_capture(stream.handle(), &graph.graph_, &graph.exec_));
  return graph;
}

CudaGraph::~CudaGraph() { cuda_glue::graph_destroy(graph_, exec_); }

CudaGraph::CudaGraph(CudaGraph&& other) noexcept
    : graph_(std::exchange(other.graph_, nullptr)), exec_(std::exchange(other.exec_, nullptr)) {}

CudaGraph& CudaGraph::operator=(CudaGraph&& other) noexcept {
  if (this != &other) {
    CudaGraph old(std::move(*this));
    graph_ = std::exchange(other.graph_, nullptr);
    exec_ = std::exchange(other.exec_, nullptr);
  }
  return *this;
}

void CudaGraph::launch(const CudaStream& stream) const {
  KEYSEL_CHECK_ARG(exec_ != nullptr, "graph", "a captured graph", "an empty graph");
  KEYSEL_CHECK_ARG(stream.handle() != nullptr, "stream", "a live stream", "a moved-from stream");
  KEYSEL_CUDA_CHECK(cuda_glue::graph_launch(exec_, stream.handle()));
}

}  // namespace keysel

#else  // !KEYSEL_CUDA

namespace keysel {
namespace {
[[noreturn]] void no_cuda(std::string_view function) { detail::throw_error(function, "keysel was built without CUDA"); }
}  // namespace

CudaBuffer::CudaBuffer(std::int64_t, int) { no_cuda("CudaBuffer"); }
CudaBuffer::~CudaBuffer() = default;
CudaBuffer::CudaBuffer(CudaBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)), device_(other.device_) {}
CudaBuffer& CudaBuffer::operator=(CudaBuffer&& other) noexcept {
  data_ = std::exchange(other.data_, nullptr);
  bytes_ = std::exchange(other.bytes_, 0);
  device_ = other.device_;
  return *this;
}
void CudaBuffer::copy_from_host(const void*, std::int64_t) { no_cuda("CudaBuffer::copy_from_host"); }
void CudaBuffer::copy_to_host(void*, std::int64_t) const { no_cuda("CudaBuffer::copy_to_host"); }
void CudaBuffer::fill_bytes(std::uint8_t) { no_cuda("CudaBuffer::fill_bytes"); }
void cuda_synchronize(int) { no_cuda("cuda_synchronize"); }
CudaStream::CudaStream(int) { no_cuda("CudaStream"); }
CudaStream::~CudaStream() = default;
CudaStream::CudaStream(CudaStream&& other) noexcept
    : stream_(std::exchange(other.stream_, nullptr)), device_(other.device_) {}
CudaStream& CudaStream::operator=(CudaStream&& other) noexcept {
  stream_ = std::exchange(other.stream_, nullptr);
  device_ = other.device_;
  return *this;
}
void CudaStream::synchronize() const { no_cuda("CudaStream::synchronize"); }
CudaGraph CudaGraph::capture(const CudaStream&, const std::function<void()>&) { no_cuda("CudaGraph::capture"); }
CudaGraph::~CudaGraph() = default;
CudaGraph::CudaGraph(CudaGraph&& other) noexcept
    : graph_(std::exchange(other.graph_, nullptr)), exec_(std::exchange(other.exec_, nullptr)) {}
CudaGraph& CudaGraph::operator=(CudaGraph&& other) noexcept {
  graph_ = std::exchange(other.graph_, nullptr);
  exec_ = std::exchange(other.exec_, nullptr);
  return *this;
}
void CudaGraph::launch(const CudaStream&) const { no_cuda("CudaGraph::launch"); }

}  // namespace keysel

#endif  // KEYSEL_CUDA
