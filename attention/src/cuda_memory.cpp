// The moves of CudaBuffer, CudaStream and CudaGraph (every build) and, without CUDA, the rest: every entry point
// throws "built without CUDA". With CUDA the rest is in cuda_memory.cu.
#include "keysel/attention/cuda_memory.h"

#include <string_view>
#include <utility>

#include "keysel/core/build_config.h"
#include "keysel/core/error.h"

namespace keysel {

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

#if !KEYSEL_CUDA

namespace {
[[noreturn]] void no_cuda(std::string_view function) { detail::throw_error(function, "keysel was built without CUDA"); }
}  // namespace

CudaBuffer::CudaBuffer(std::int64_t, int) { no_cuda("CudaBuffer"); }
CudaBuffer::~CudaBuffer() = default;
void CudaBuffer::copy_from_host(const void*, std::int64_t) { no_cuda("CudaBuffer::copy_from_host"); }
void CudaBuffer::copy_to_host(void*, std::int64_t) const { no_cuda("CudaBuffer::copy_to_host"); }
void CudaBuffer::fill_bytes(std::uint8_t) { no_cuda("CudaBuffer::fill_bytes"); }
void cuda_synchronize(int) { no_cuda("cuda_synchronize"); }
CudaStream::CudaStream(int) { no_cuda("CudaStream"); }
CudaStream::~CudaStream() = default;
void CudaStream::synchronize() const { no_cuda("CudaStream::synchronize"); }
CudaGraph CudaGraph::capture(const CudaStream&, const std::function<void()>&) { no_cuda("CudaGraph::capture"); }
CudaGraph::~CudaGraph() = default;
void CudaGraph::launch(const CudaStream&) const { no_cuda("CudaGraph::launch"); }

#endif  // !KEYSEL_CUDA

}  // namespace keysel
