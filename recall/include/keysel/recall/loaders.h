// Real tensors in and out: safetensors and NumPy .npy files, read into owning tensors.
//
// Readers check every length, offset, dtype and shape against the bytes actually present, with overflow-safe
// arithmetic, and throw keysel::Error naming the file, the tensor and what was expected versus found; they never
// read past the end of a file or buffer. Data is little-endian on disk (both formats as written by PyTorch,
// safetensors and NumPy on every common machine).
//
//   safetensors dtype -> keysel dtype          .npy descr -> keysel dtype
//   F32 fp32, F16 fp16, BF16 bf16,             '<f4' fp32, '<f2' fp16, '<f8' fp64,
//   F8_E4M3 fp8_e4m3, F8_E5M2 fp8_e5m2,        '<i4' int32, '|i1' int8,
//   F64 fp64, I32 int32, I8 int8,              '<i8' int32 (values range-checked)
//   I64 int32 (values range-checked)
// I64 / '<i8' arrays (positions as PyTorch writes them) are narrowed to int32 on load; a value outside the int32
// range is an error. .npy files must be C order (fortran_order False) and little-endian; '>' descrs and Fortran
// order are rejected with a message saying so.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "keysel/core/tensor.h"

namespace keysel {

/// An owned, contiguous, row-major CPU tensor.
struct LoadedTensor {
  std::string name;                  // tensor name in a safetensors file; the file name for .npy
  DType dtype = DType::fp32;
  std::vector<std::int64_t> shape;
  std::vector<std::byte> data;       // dtype_bytes(dtype, numel()) bytes, little-endian

  std::int64_t numel() const;
  /// A read-only view of the data (valid while this tensor lives and is not modified).
  TensorView view() const;
  /// The values as fp32 (floating dtypes decoded exactly; int8/int32 converted). Throws for int4.
  std::vector<float> to_float() const;

  /// Builds a tensor by copying `values` (fp32) into `dtype` (fp32, fp16, bf16, fp8_e4m3, fp8_e5m2, fp64),
  /// rounding to nearest even.
  static LoadedTensor from_float(std::string name, std::span<const float> values, std::vector<std::int64_t> shape,
                                 DType dtype = DType::fp32);
  static LoadedTensor from_int32(std::string name, std::span<const std::int32_t> values,
                                 std::vector<std::int64_t> shape);
};

/// The contents of one safetensors file: tensors in the order of their data, plus the string metadata.
struct SafetensorsFile {
  std::map<std::string, std::string, std::less<>> metadata;  // "__metadata__"
  std::vector<LoadedTensor> tensors;

  /// The tensor called `name`, or nullptr.
  const LoadedTensor* find(std::string_view name) const;
  /// The tensor called `name`; throws keysel::Error naming the file's tensors when there is none.
  const LoadedTensor& at(std::string_view name) const;
};

/// Limits a reader enforces before allocating (a lying header must not make it allocate terabytes).
inline constexpr std::uint64_t kMaxSafetensorsHeaderBytes = 100u << 20;  // 100 MiB of JSON
inline constexpr std::uint64_t kMaxNpyHeaderBytes = 1u << 20;

/// Reads a whole safetensors file. Throws keysel::Error on a missing, unreadable, malformed, truncated or
/// inconsistent file (header length beyond the file, invalid JSON, unknown dtype, shape that disagrees with the
/// byte range, overlapping or out-of-range data offsets, ...).
SafetensorsFile read_safetensors(const std::filesystem::path& path);
/// Parses safetensors bytes held in memory; `source` names them in error messages.
SafetensorsFile parse_safetensors(std::span<const std::byte> bytes, std::string_view source = "<memory>");
/// Serialises tensors (names must be distinct and non-empty; int4 is not representable) with `metadata`.
std::vector<std::byte> serialize_safetensors(const std::vector<LoadedTensor>& tensors,
                                             const std::map<std::string, std::string, std::less<>>& metadata = {});
/// Writes serialize_safetensors(...) to `path`; throws keysel::Error when the file cannot be written.
void write_safetensors(const std::filesystem::path& path, const std::vector<LoadedTensor>& tensors,
                       const std::map<std::string, std::string, std::less<>>& metadata = {});

/// Reads a NumPy .npy file (format versions 1, 2 and 3). The tensor's name is the file's stem.
LoadedTensor read_npy(const std::filesystem::path& path);
/// Parses .npy bytes held in memory; `source` names them in error messages and becomes the tensor's name.
LoadedTensor parse_npy(std::span<const std::byte> bytes, std::string_view source = "<memory>");
/// Serialises one tensor as .npy version 1.0 (fp32, fp16, fp64, int32, int8; bf16 and fp8 have no NumPy dtype).
std::vector<std::byte> serialize_npy(const LoadedTensor& tensor);
void write_npy(const std::filesystem::path& path, const LoadedTensor& tensor);

namespace detail {
/// Reads a whole file into memory; throws keysel::Error naming `function` and the path on failure.
std::vector<std::byte> read_file_bytes(std::string_view function, const std::filesystem::path& path);
void write_file_bytes(std::string_view function, const std::filesystem::path& path, std::span<const std::byte> bytes);
}  // namespace detail

}  // namespace keysel
