#include "keysel/core/tensor.h"

#include <cstring>
#include <sstream>

namespace keysel {

TensorView::TensorView(void* data, DType dtype, std::span<const std::int64_t> shape, Device device) {
  init(data, dtype, shape, {}, device, false, true);
}
TensorView::TensorView(void* data, DType dtype, std::initializer_list<std::int64_t> shape, Device device) {
  init(data, dtype, std::span<const std::int64_t>(shape.begin(), shape.size()), {}, device, false, true);
}
TensorView::TensorView(const void* data, DType dtype, std::span<const std::int64_t> shape, Device device) {
  init(data, dtype, shape, {}, device, true, true);
}
TensorView::TensorView(const void* data, DType dtype, std::initializer_list<std::int64_t> shape, Device device) {
  init(data, dtype, std::span<const std::int64_t>(shape.begin(), shape.size()), {}, device, true, true);
}
TensorView::TensorView(const void* data, DType dtype, std::span<const std::int64_t> shape,
                       std::span<const std::int64_t> strides, Device device, bool read_only) {
  init(data, dtype, shape, strides, device, read_only, false);
}

void TensorView::init(const void* data, DType dtype, std::span<const std::int64_t> shape,
                      std::span<const std::int64_t> strides, Device device, bool read_only, bool contiguous) {
  KEYSEL_CHECK_ARG(shape.size() <= static_cast<std::size_t>(kMaxRank), "shape", "rank <= 6", shape);
  std::int64_t count = 1;
  for (const std::int64_t extent : shape) {
    KEYSEL_CHECK_ARG(extent >= 0, "shape", "non-negative extents", shape);
    KEYSEL_CHECK_ARG(!__builtin_mul_overflow(count, extent, &count), "shape", "an element count that fits in int64",
                     shape);
  }
  if (data == nullptr && count != 0) {
    detail::throw_argument_error("TensorView", "data", "a non-null pointer for a tensor of " +
                                 std::to_string(count) + " elements", "nullptr");
  }
  if (!contiguous) {
    KEYSEL_CHECK_ARG(strides.size() == shape.size(), "strides", "one stride per dimension (" +
                     std::to_string(shape.size()) + ")", strides);
    for (const std::int64_t s : strides) KEYSEL_CHECK_ARG(s >= 0, "strides", "non-negative strides", strides);
    if (dtype == DType::int4 && !shape.empty() && shape.back() > 1) {
      KEYSEL_CHECK_ARG(strides.back() == 1, "strides", "a contiguous last dimension for int4", strides);
    }
  }
  data_ = const_cast<void*>(data);
  dtype_ = dtype;
  device_ = device;
  rank_ = static_cast<int>(shape.size());
  read_only_ = read_only;
  std::int64_t running = 1;
  for (int d = rank_ - 1; d >= 0; --d) {
    shape_[d] = shape[d];
    strides_[d] = contiguous ? running : strides[d];
    running *= shape[d];
  }
}

std::int64_t TensorView::size(int dim) const {
  KEYSEL_CHECK_ARG(dim >= 0 && dim < rank_, "dim", "0 <= dim < rank " + std::to_string(rank_), dim);
  return shape_[dim];
}

std::int64_t TensorView::stride(int dim) const {
  KEYSEL_CHECK_ARG(dim >= 0 && dim < rank_, "dim", "0 <= dim < rank " + std::to_string(rank_), dim);
  return strides_[dim];
}

std::int64_t TensorView::numel() const {
  if (empty()) return 0;
  std::int64_t count = 1;
  for (int d = 0; d < rank_; ++d) count *= shape_[d];
  return count;
}

bool TensorView::is_contiguous() const {
  std::int64_t running = 1;
  for (int d = rank_ - 1; d >= 0; --d) {
    if (shape_[d] != 1 && strides_[d] != running) return false;
    running *= shape_[d];
  }
  return true;
}

void* TensorView::mutable_raw_data() const {
  KEYSEL_CHECK_ARG(!read_only_, "tensor", "a writable view", "a read-only view " + str());
  return data_;
}

std::int64_t TensorView::offset(std::span<const std::int64_t> index) const {
  KEYSEL_CHECK_ARG(static_cast<int>(index.size()) == rank_, "index", std::to_string(rank_) + " coordinates",
                   index);
  std::int64_t off = 0;
  for (int d = 0; d < rank_; ++d) {
    KEYSEL_CHECK_ARG(index[d] >= 0 && index[d] < shape_[d], "index", "coordinates inside " + str(), index);
    off += index[d] * strides_[d];
  }
  return off;
}

namespace {
double load_element(const void* data, DType dtype, std::int64_t off) {
  switch (dtype) {
    case DType::fp32: return static_cast<const float*>(data)[off];
    case DType::fp64: return static_cast<const double*>(data)[off];
    case DType::fp16: return fp16_bits_to_fp32(static_cast<const std::uint16_t*>(data)[off]);
    case DType::bf16: return bf16_bits_to_fp32(static_cast<const std::uint16_t*>(data)[off]);
    case DType::fp8_e4m3: return fp8_e4m3_to_fp32(static_cast<const std::uint8_t*>(data)[off]);
    case DType::fp8_e5m2: return fp8_e5m2_to_fp32(static_cast<const std::uint8_t*>(data)[off]);
    case DType::int8: return static_cast<const std::int8_t*>(data)[off];
    case DType::int32: return static_cast<const std::int32_t*>(data)[off];
    case DType::int4: return unpack_int4(static_cast<const std::uint8_t*>(data)[off / 2], static_cast<int>(off % 2));
  }
  return 0.0;
}
}  // namespace

double TensorView::load(std::span<const std::int64_t> index) const {
  KEYSEL_CHECK_ARG(device_.kind == DeviceKind::cpu, "tensor", "a CPU tensor", device_.str());
  return load_element(data_, dtype_, offset(index));
}

std::string TensorView::str() const {
  std::ostringstream os;
  os << detail::describe(shape()) << ' ' << dtype_name(dtype_) << ' ' << device_.str();
  return os.str();
}

std::vector<double> to_double_vector(const TensorView& view) {
  KEYSEL_CHECK_ARG(view.device().kind == DeviceKind::cpu, "view", "a CPU tensor", view.device().str());
  const std::int64_t count = view.numel();
  std::vector<double> out(static_cast<std::size_t>(count));
  if (count == 0) return out;
  if (view.dtype() == DType::fp32 && view.is_contiguous()) {
    // The common case (studies convert whole K/V caches per call): no index arithmetic per element.
    const float* data = static_cast<const float*>(view.raw_data());
    for (std::int64_t i = 0; i < count; ++i) out[static_cast<std::size_t>(i)] = static_cast<double>(data[i]);
    return out;
  }
  const int rank = view.rank();
  std::array<std::int64_t, TensorView::kMaxRank> index{};
  for (std::int64_t i = 0; i < count; ++i) {
    std::int64_t off = 0;
    for (int d = 0; d < rank; ++d) off += index[d] * view.stride(d);
    out[static_cast<std::size_t>(i)] = load_element(view.raw_data(), view.dtype(), off);
    for (int d = rank - 1; d >= 0; --d) {
      if (++index[d] < view.size(d)) break;
      index[d] = 0;
    }
  }
  return out;
}

void expect_shape(std::string_view function, const TensorView& view, std::string_view argument,
                  std::initializer_list<std::int64_t> shape) {
  bool ok = !view.empty() && view.rank() == static_cast<int>(shape.size());
  if (ok) {
    int d = 0;
    for (const std::int64_t extent : shape) {
      if (extent != kAnyExtent && view.size(d) != extent) ok = false;
      ++d;
    }
  }
  if (ok) return;
  std::string expected = "shape [";
  bool first = true;
  for (const std::int64_t extent : shape) {
    if (!first) expected += ", ";
    expected += extent == kAnyExtent ? std::string("*") : std::to_string(extent);
    first = false;
  }
  expected += "]";
  detail::throw_argument_error(function, argument, expected, view.empty() ? "an empty tensor" : view.str());
}

void expect_dtype(std::string_view function, const TensorView& view, std::string_view argument,
                  std::initializer_list<DType> dtypes) {
  for (const DType d : dtypes) {
    if (view.dtype() == d) return;
  }
  std::string expected = "dtype ";
  bool first = true;
  for (const DType d : dtypes) {
    if (!first) expected += " or ";
    expected += dtype_name(d);
    first = false;
  }
  detail::throw_argument_error(function, argument, expected, std::string(dtype_name(view.dtype())));
}

void expect_device(std::string_view function, const TensorView& view, std::string_view argument, Device device) {
  if (view.device() == device) return;
  detail::throw_argument_error(function, argument, "a tensor on " + device.str(), view.device().str());
}

void expect_writable(std::string_view function, const TensorView& view, std::string_view argument) {
  if (!view.read_only()) return;
  detail::throw_argument_error(function, argument, "a writable tensor", "a read-only view " + view.str());
}

void expect_contiguous(std::string_view function, const TensorView& view, std::string_view argument) {
  if (view.is_contiguous()) return;
  detail::throw_argument_error(function, argument, "a contiguous tensor",
                               view.str() + " with strides " + detail::describe(view.strides()));
}

}  // namespace keysel
