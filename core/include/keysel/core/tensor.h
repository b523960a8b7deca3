// A non-owning view of a strided tensor: pointer, dtype, device, shape and strides (in elements).
//
// Public functions take their inputs and outputs as TensorViews and check them with the expect_* helpers,
// so that a wrong shape, dtype or device is reported as a keysel::Error naming the argument.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>
#include <vector>

#include "keysel/core/dtype.h"
#include "keysel/core/device.h"
#include "keysel/core/error.h"

namespace keysel {

class TensorView {
 public:
  static constexpr int kMaxRank = 6;

  /// An empty view (rank 0, no data). Optional arguments are passed as empty views.
  TensorView() = default;
  /// A contiguous row-major view over `data`. Throws keysel::Error on a negative extent, a null pointer
  /// with a non-zero element count, or a rank above kMaxRank.
  TensorView(void* data, DType dtype, std::span<const std::int64_t> shape, Device device = Device::cpu());
  TensorView(void* data, DType dtype, std::initializer_list<std::int64_t> shape, Device device = Device::cpu());
  /// A read-only contiguous view: mutable_data() on it throws.
  TensorView(const void* data, DType dtype, std::span<const std::int64_t> shape, Device device = Device::cpu());
  TensorView(const void* data, DType dtype, std::initializer_list<std::int64_t> shape,
             Device device = Device::cpu());
  /// A strided view. Strides count elements (nibbles for int4, whose last dimension must be contiguous).
  TensorView(const void* data, DType dtype, std::span<const std::int64_t> shape,
             std::span<const std::int64_t> strides, Device device = Device::cpu(), bool read_only = true);

  bool empty() const { return data_ == nullptr && rank_ == 0; }
  int rank() const { return rank_; }
  std::int64_t size(int dim) const;
  std::int64_t stride(int dim) const;
  std::span<const std::int64_t> shape() const { return {shape_.data(), static_cast<std::size_t>(rank_)}; }
  std::span<const std::int64_t> strides() const { return {strides_.data(), static_cast<std::size_t>(rank_)}; }
  std::int64_t numel() const;
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  bool read_only() const { return read_only_; }
  bool is_contiguous() const;
  /// Bytes spanned by a contiguous view.
  std::int64_t bytes() const { return dtype_bytes(dtype_, numel()); }

  const void* raw_data() const { return data_; }
  /// Writable pointer; throws keysel::Error for a read-only view.
  void* mutable_raw_data() const;

  template <typename T>
  const T* data() const {
    return static_cast<const T*>(data_);
  }
  template <typename T>
  T* mutable_data() const {
    return static_cast<T*>(mutable_raw_data());
  }

  /// Element offset (in elements) of a multi-index.
  std::int64_t offset(std::span<const std::int64_t> index) const;
  /// Reads one element as double (fp8/fp16/bf16 decoded; integer codes as their value). CPU only.
  double load(std::span<const std::int64_t> index) const;
  double load(std::initializer_list<std::int64_t> index) const {
    return load(std::span<const std::int64_t>(index.begin(), index.size()));
  }
  /// Shape as text: "[16, 32, 128] fp32 cpu".
  std::string str() const;

 private:
  void init(const void* data, DType dtype, std::span<const std::int64_t> shape,
            std::span<const std::int64_t> strides, Device device, bool read_only, bool contiguous);

  void* data_ = nullptr;
  DType dtype_ = DType::fp32;
  Device device_{};
  int rank_ = 0;
  bool read_only_ = true;
  std::array<std::int64_t, kMaxRank> shape_{};
  std::array<std::int64_t, kMaxRank> strides_{};
};

/// Copies a CPU view of any dtype into a row-major vector of doubles (the reference implementations' input).
std::vector<double> to_double_vector(const TensorView& view);

// ---- argument checks -------------------------------------------------------------------------------------
/// Shape pattern entries: a non-negative extent must match; kAnyExtent matches anything.
inline constexpr std::int64_t kAnyExtent = -1;

// Each check throws keysel::Error "keysel::<function>: argument '<argument>': expected ..., got ...".

/// Throws unless `view` is non-empty with the given rank and extents (kAnyExtent matches any extent).
void expect_shape(std::string_view function, const TensorView& view, std::string_view argument,
                  std::initializer_list<std::int64_t> shape);
/// Throws unless `view` has one of the given dtypes.
void expect_dtype(std::string_view function, const TensorView& view, std::string_view argument,
                  std::initializer_list<DType> dtypes);
/// Throws unless `view` lives on `device`.
void expect_device(std::string_view function, const TensorView& view, std::string_view argument, Device device);
/// Throws unless `view` is writable (output arguments).
void expect_writable(std::string_view function, const TensorView& view, std::string_view argument);
/// Throws unless `view` is contiguous.
void expect_contiguous(std::string_view function, const TensorView& view, std::string_view argument);

}  // namespace keysel
