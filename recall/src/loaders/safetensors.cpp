// safetensors reader and writer, and the owning LoadedTensor they share with the .npy loader.
//
// File layout (https://github.com/huggingface/safetensors): an unsigned 64-bit little-endian header length n,
// n bytes of UTF-8 JSON {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
// "__metadata__": {"key": "value"}}, then the data block; offsets are relative to the start of the data block.
// Every number read from the file is checked against the bytes present before it is used, so a lying or
// truncated file gives a keysel::Error and never an out-of-bounds read or a huge allocation.
#include <algorithm>
#include <bit>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "keysel/recall/loaders.h"
#include "keysel/core/files.h"
#include "loaders/loader_support.h"

namespace keysel {

static_assert(std::endian::native == std::endian::little, "keysel's loaders assume a little-endian host");

namespace {

using detail::throw_file_error;

constexpr std::string_view kReadFunction = "read_safetensors";

struct SafetensorsDType {
  std::string_view name;
  DType dtype;
  int bytes;          // bytes per element on disk
  bool narrow_int64;  // I64 on disk, int32 in memory
};

constexpr SafetensorsDType kDTypes[] = {
    {"F32", DType::fp32, 4, false},         {"F16", DType::fp16, 2, false},         {"BF16", DType::bf16, 2, false},
    {"F8_E4M3", DType::fp8_e4m3, 1, false}, {"F8_E5M2", DType::fp8_e5m2, 1, false}, {"F64", DType::fp64, 8, false},
    {"I32", DType::int32, 4, false},        {"I8", DType::int8, 1, false},          {"I64", DType::int32, 8, true},
};

std::string supported_dtype_names() {
  std::string out;
  for (const auto& d : kDTypes) {
    if (!out.empty()) out += ", ";
    out += d.name;
  }
  return out;
}

}  // namespace

namespace detail {

/// numel of `shape` and numel * element_bytes, or false on overflow past 2^62.
bool checked_size(std::span<const std::int64_t> shape, std::uint64_t element_bytes, std::uint64_t& numel,
                  std::uint64_t& bytes) {
  constexpr std::uint64_t kLimit = std::uint64_t{1} << 62;
  numel = 1;
  for (const std::int64_t extent : shape) {
    if (extent < 0) return false;
    const auto e = static_cast<std::uint64_t>(extent);
    if (e != 0 && numel > kLimit / e) return false;
    numel *= e;
  }
  if (element_bytes != 0 && numel > kLimit / element_bytes) return false;
  bytes = numel * element_bytes;
  return true;
}

/// Narrows little-endian int64 values to int32, failing on a value out of range.
std::vector<std::byte> narrow_int64_to_int32(std::string_view function, std::string_view source,
                                             std::string_view tensor, std::span<const std::byte> data) {
  const std::size_t count = data.size() / 8;
  std::vector<std::byte> out(count * 4);
  for (std::size_t i = 0; i < count; ++i) {
    std::int64_t value = 0;
    std::memcpy(&value, data.data() + i * 8, 8);
    if (value < std::numeric_limits<std::int32_t>::min() || value > std::numeric_limits<std::int32_t>::max()) {
      throw_file_error(function, source, tensor,
                       "expected int64 values in the int32 range (they are narrowed to int32), found " +
                           std::to_string(value) + " at element " + std::to_string(i));
    }
    const auto narrow = static_cast<std::int32_t>(value);
    std::memcpy(out.data() + i * 4, &narrow, 4);
  }
  return out;
}

std::vector<std::byte> read_file_bytes(std::string_view function, const std::filesystem::path& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    throw_file_error(function, path.string(), "",
                     "expected a readable regular file, found none (or not a regular file)");
  }
  const std::uintmax_t size = std::filesystem::file_size(path, ec);
  if (ec) throw_file_error(function, path.string(), "", "cannot determine the file size: " + ec.message());
  if (size > static_cast<std::uintmax_t>(std::numeric_limits<std::ptrdiff_t>::max())) {
    throw_file_error(function, path.string(), "", "file too large to read into memory");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw_file_error(function, path.string(), "", "cannot open the file for reading");
  std::vector<std::byte> bytes(static_cast<std::size_t>(size));
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(size));
  if (static_cast<std::uintmax_t>(in.gcount()) != size) {
    throw_file_error(function, path.string(), "",
                     "expected " + std::to_string(size) + " bytes, read " + std::to_string(in.gcount()));
  }
  return bytes;
}

void write_file_bytes(std::string_view function, const std::filesystem::path& path, std::span<const std::byte> bytes) {
  // Whole or absent: a temporary file beside `path`, renamed over it once every byte is on disk.
  write_file_atomically(path, std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()), function,
                        "path");
}

}  // namespace detail

// ---- LoadedTensor -------------------------------------------------------------------------------------------

std::int64_t LoadedTensor::numel() const {
  std::int64_t n = 1;
  for (const std::int64_t e : shape) n *= e;
  return n;
}

TensorView LoadedTensor::view() const {
  const std::int64_t expected = dtype_bytes(dtype, numel());
  KEYSEL_CHECK_ARG(static_cast<std::int64_t>(data.size()) == expected, "tensor '" + name + "' data",
                   std::to_string(expected) + " bytes (from shape and dtype)", data.size());
  return TensorView(static_cast<const void*>(data.data()), dtype, std::span<const std::int64_t>(shape));
}

std::vector<float> LoadedTensor::to_float() const {
  const std::int64_t n = numel();
  KEYSEL_CHECK_ARG(dtype != DType::int4, "tensor '" + name + "' dtype", "not int4", dtype_name(dtype));
  KEYSEL_CHECK_ARG(static_cast<std::int64_t>(data.size()) == dtype_bytes(dtype, n), "tensor '" + name + "' data",
                   std::to_string(dtype_bytes(dtype, n)) + " bytes (from shape and dtype)", data.size());
  std::vector<float> out(static_cast<std::size_t>(n));
  const std::byte* p = data.data();
  for (std::size_t i = 0; i < out.size(); ++i) {
    switch (dtype) {
      case DType::fp32:
        std::memcpy(&out[i], p + i * 4, 4);
        break;
      case DType::fp64: {
        double x;
        std::memcpy(&x, p + i * 8, 8);
        out[i] = static_cast<float>(x);
        break;
      }
      case DType::fp16:
      case DType::bf16: {
        std::uint16_t bits;
        std::memcpy(&bits, p + i * 2, 2);
        out[i] = dtype == DType::fp16 ? fp16_bits_to_fp32(bits) : bf16_bits_to_fp32(bits);
        break;
      }
      case DType::fp8_e4m3:
        out[i] = fp8_e4m3_to_fp32(static_cast<std::uint8_t>(p[i]));
        break;
      case DType::fp8_e5m2:
        out[i] = fp8_e5m2_to_fp32(static_cast<std::uint8_t>(p[i]));
        break;
      case DType::int8:
        out[i] = static_cast<float>(static_cast<std::int8_t>(p[i]));
        break;
      case DType::int32: {
        std::int32_t x;
        std::memcpy(&x, p + i * 4, 4);
        out[i] = static_cast<float>(x);
        break;
      }
      case DType::int4:
        break;  // rejected above
    }
  }
  return out;
}

LoadedTensor LoadedTensor::from_float(std::string name, std::span<const float> values, std::vector<std::int64_t> shape,
                                      DType dtype) {
  LoadedTensor t;
  t.name = std::move(name);
  t.dtype = dtype;
  t.shape = std::move(shape);
  KEYSEL_CHECK_ARG(t.numel() == static_cast<std::int64_t>(values.size()), "values",
                   std::to_string(t.numel()) + " elements (from shape)", values.size());
  KEYSEL_CHECK_ARG(is_floating(dtype), "dtype", "a floating dtype (fp32, fp64, fp16, bf16, fp8_e4m3, fp8_e5m2)",
                   dtype_name(dtype));
  t.data.resize(static_cast<std::size_t>(dtype_bytes(dtype, t.numel())));
  std::byte* p = t.data.data();
  for (std::size_t i = 0; i < values.size(); ++i) {
    const float x = values[i];
    switch (dtype) {
      case DType::fp32:
        std::memcpy(p + i * 4, &x, 4);
        break;
      case DType::fp64: {
        const double d = x;
        std::memcpy(p + i * 8, &d, 8);
        break;
      }
      case DType::fp16: {
        const std::uint16_t bits = fp32_to_fp16_bits(x);
        std::memcpy(p + i * 2, &bits, 2);
        break;
      }
      case DType::bf16: {
        const std::uint16_t bits = fp32_to_bf16_bits(x);
        std::memcpy(p + i * 2, &bits, 2);
        break;
      }
      case DType::fp8_e4m3:
        p[i] = static_cast<std::byte>(fp32_to_fp8_e4m3(x));
        break;
      case DType::fp8_e5m2:
        p[i] = static_cast<std::byte>(fp32_to_fp8_e5m2(x));
        break;
      default:
        break;
    }
  }
  return t;
}

LoadedTensor LoadedTensor::from_int32(std::string name, std::span<const std::int32_t> values,
                                      std::vector<std::int64_t> shape) {
  LoadedTensor t;
  t.name = std::move(name);
  t.dtype = DType::int32;
  t.shape = std::move(shape);
  KEYSEL_CHECK_ARG(t.numel() == static_cast<std::int64_t>(values.size()), "values",
                   std::to_string(t.numel()) + " elements (from shape)", values.size());
  t.data.resize(values.size() * 4);
  if (!values.empty()) std::memcpy(t.data.data(), values.data(), values.size() * 4);
  return t;
}

const LoadedTensor* SafetensorsFile::find(std::string_view name) const {
  for (const LoadedTensor& t : tensors) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

const LoadedTensor& SafetensorsFile::at(std::string_view name) const {
  if (const LoadedTensor* t = find(name)) return *t;
  std::string names;
  for (const LoadedTensor& t : tensors) {
    if (!names.empty()) names += ", ";
    names += t.name;
  }
  detail::throw_argument_error("SafetensorsFile::at", "name", "one of [" + names + "]", detail::describe(name));
}

// ---- reader ---------------------------------------------------------------------------------------------------

namespace {

SafetensorsFile parse_safetensors_impl(std::span<const std::byte> bytes, std::string_view source,
                                       std::string_view function) {
  const auto file_size = static_cast<std::uint64_t>(bytes.size());
  if (file_size < 8) {
    throw_file_error(function, source, "",
                     "expected at least 8 bytes (the header length), found " + std::to_string(file_size) +
                         " (truncated or not a safetensors file)");
  }
  std::uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);
  if (header_len > kMaxSafetensorsHeaderBytes) {
    throw_file_error(function, source, "",
                     "expected a header length <= " + std::to_string(kMaxSafetensorsHeaderBytes) + " bytes, found " +
                         std::to_string(header_len) + " (corrupt or not a safetensors file)");
  }
  if (header_len > file_size - 8) {
    throw_file_error(function, source, "",
                     "header length " + std::to_string(header_len) + " runs past the end of the file (" +
                         std::to_string(file_size) + " bytes): truncated or corrupt");
  }
  const auto* header_begin = reinterpret_cast<const char*>(bytes.data() + 8);
  const std::uint64_t data_begin = 8 + header_len;
  const std::uint64_t data_size = file_size - data_begin;

  // A header is an object of objects; anything far deeper is hostile and is refused before the parser sees it.
  if (detail::json_nesting_depth(std::string_view(header_begin, header_len)) > detail::kMaxJsonDepth) {
    throw_file_error(function, source, "",
                     "expected a header nested at most " + std::to_string(detail::kMaxJsonDepth) +
                         " levels deep, found deeper nesting (corrupt)");
  }
  // Duplicate top-level keys would silently shadow one another: reject them while parsing.
  std::set<std::string> seen;
  std::string duplicate;
  const nlohmann::json::parser_callback_t callback = [&](int depth, nlohmann::json::parse_event_t event,
                                                         nlohmann::json& parsed) {
    if (depth == 1 && event == nlohmann::json::parse_event_t::key && parsed.is_string()) {
      if (!seen.insert(parsed.get<std::string>()).second && duplicate.empty()) duplicate = parsed.get<std::string>();
    }
    return true;
  };
  nlohmann::json header =
      nlohmann::json::parse(header_begin, header_begin + header_len, callback, /*allow_exceptions=*/false);
  if (header.is_discarded())
    throw_file_error(function, source, "", "the header is not valid JSON (corrupt or truncated)");
  if (!header.is_object()) {
    throw_file_error(function, source, "",
                     std::string("expected the header to be a JSON object, found a ") + header.type_name());
  }
  if (!duplicate.empty()) throw_file_error(function, source, duplicate, "appears more than once in the header");

  SafetensorsFile file;
  struct Entry {
    std::string name;
    const SafetensorsDType* dtype;
    std::vector<std::int64_t> shape;
    std::uint64_t begin, end;
  };
  std::vector<Entry> entries;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& value = it.value();
    if (name == "__metadata__") {
      if (!value.is_object()) {
        throw_file_error(function, source, "",
                         std::string("expected __metadata__ to be an object, found a ") + value.type_name());
      }
      for (auto m = value.begin(); m != value.end(); ++m) {
        if (!m.value().is_string()) {
          throw_file_error(
              function, source, "",
              "expected __metadata__ value of '" + m.key() + "' to be a string, found a " + m.value().type_name());
        }
        file.metadata.emplace(m.key(), m.value().get<std::string>());
      }
      continue;
    }
    if (name.empty()) throw_file_error(function, source, "", "found a tensor with an empty name");
    if (!value.is_object()) {
      throw_file_error(function, source, name,
                       std::string("expected an object {dtype, shape, data_offsets}, found a ") + value.type_name());
    }
    const auto dtype_it = value.find("dtype");
    const auto shape_it = value.find("shape");
    const auto offsets_it = value.find("data_offsets");
    if (dtype_it == value.end() || shape_it == value.end() || offsets_it == value.end()) {
      throw_file_error(function, source, name,
                       "expected the keys dtype, shape and data_offsets, found " + value.dump());
    }
    if (!dtype_it->is_string())
      throw_file_error(function, source, name, "expected dtype to be a string, found " + dtype_it->dump());
    const std::string dtype_text = dtype_it->get<std::string>();
    const SafetensorsDType* dtype = nullptr;
    for (const auto& d : kDTypes) {
      if (d.name == dtype_text) dtype = &d;
    }
    if (dtype == nullptr) {
      throw_file_error(function, source, name,
                       "expected a dtype in [" + supported_dtype_names() + "], found \"" + dtype_text + "\"");
    }
    if (!shape_it->is_array())
      throw_file_error(function, source, name, "expected shape to be an array, found " + shape_it->dump());
    if (shape_it->size() > static_cast<std::size_t>(TensorView::kMaxRank)) {
      throw_file_error(
          function, source, name,
          "expected rank <= " + std::to_string(TensorView::kMaxRank) + ", found " + std::to_string(shape_it->size()));
    }
    std::vector<std::int64_t> shape;
    for (const auto& e : *shape_it) {
      if (!e.is_number_unsigned() || e.get<std::uint64_t>() > (std::uint64_t{1} << 62)) {
        throw_file_error(function, source, name,
                         "expected shape entries to be integers in [0, 2^62], found " + shape_it->dump());
      }
      shape.push_back(static_cast<std::int64_t>(e.get<std::uint64_t>()));
    }
    if (!offsets_it->is_array() || offsets_it->size() != 2 || !(*offsets_it)[0].is_number_unsigned() ||
        !(*offsets_it)[1].is_number_unsigned()) {
      throw_file_error(
          function, source, name,
          "expected data_offsets to be [begin, end] with non-negative integers, found " + offsets_it->dump());
    }
    const auto begin = (*offsets_it)[0].get<std::uint64_t>();
    const auto end = (*offsets_it)[1].get<std::uint64_t>();
    if (begin > end || end > data_size) {
      throw_file_error(function, source, name,
                       "expected data_offsets with begin <= end <= " + std::to_string(data_size) +
                           " (the data block's size), found [" + std::to_string(begin) + ", " + std::to_string(end) +
                           "] (truncated or corrupt file)");
    }
    std::uint64_t numel = 0, nbytes = 0;
    if (!detail::checked_size(shape, static_cast<std::uint64_t>(dtype->bytes), numel, nbytes)) {
      throw_file_error(function, source, name, "shape " + shape_it->dump() + " overflows");
    }
    if (end - begin != nbytes) {
      throw_file_error(function, source, name,
                       "expected " + std::to_string(nbytes) + " bytes for shape " + shape_it->dump() + " and dtype " +
                           dtype_text + ", found a byte range of " + std::to_string(end - begin));
    }
    entries.push_back({name, dtype, std::move(shape), begin, end});
  }

  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return a.begin != b.begin ? a.begin < b.begin : a.end < b.end; });
  // As the reference implementation requires: the tensors tile the data block, without gaps, overlaps or
  // trailing bytes (a header length or offset that is off by a few bytes is caught here).
  std::uint64_t covered = 0;
  for (std::size_t i = 0; i < entries.size(); ++i) {
    if (entries[i].begin < covered) {
      throw_file_error(function, source, entries[i].name,
                       "its data_offsets overlap those of tensor '" + entries[i - 1].name + "'");
    }
    if (entries[i].begin > covered) {
      throw_file_error(function, source, entries[i].name,
                       "expected its data to start at byte " + std::to_string(covered) +
                           " of the data block (tensors are "
                           "stored back to back), found " +
                           std::to_string(entries[i].begin));
    }
    covered = entries[i].end;
  }
  if (covered != data_size) {
    throw_file_error(function, source, "",
                     "expected the tensors to cover the " + std::to_string(data_size) + "-byte data block, found " +
                         std::to_string(covered) + " bytes covered (corrupt header length or offsets)");
  }
  file.tensors.reserve(entries.size());
  for (Entry& e : entries) {
    LoadedTensor t;
    t.name = std::move(e.name);
    t.dtype = e.dtype->dtype;
    t.shape = std::move(e.shape);
    const std::span<const std::byte> raw =
        bytes.subspan(static_cast<std::size_t>(data_begin + e.begin), static_cast<std::size_t>(e.end - e.begin));
    if (e.dtype->narrow_int64) {
      t.data = detail::narrow_int64_to_int32(function, source, t.name, raw);
    } else {
      t.data.assign(raw.begin(), raw.end());
    }
    file.tensors.push_back(std::move(t));
  }
  return file;
}

}  // namespace

SafetensorsFile parse_safetensors(std::span<const std::byte> bytes, std::string_view source) {
  return parse_safetensors_impl(bytes, source, "parse_safetensors");
}

SafetensorsFile read_safetensors(const std::filesystem::path& path) {
  const std::vector<std::byte> bytes = detail::read_file_bytes(kReadFunction, path);
  return parse_safetensors_impl(bytes, path.string(), kReadFunction);
}

// ---- writer ---------------------------------------------------------------------------------------------------

std::vector<std::byte> serialize_safetensors(const std::vector<LoadedTensor>& tensors,
                                             const std::map<std::string, std::string, std::less<>>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [key, value] : metadata) meta[key] = value;
    header["__metadata__"] = std::move(meta);
  }
  std::set<std::string, std::less<>> names;
  std::uint64_t offset = 0;
  for (const LoadedTensor& t : tensors) {
    KEYSEL_CHECK_ARG(!t.name.empty() && t.name != "__metadata__", "tensors[].name",
                     "a non-empty name other than __metadata__", t.name);
    KEYSEL_CHECK_ARG(names.insert(t.name).second, "tensors[].name", "distinct names", t.name);
    KEYSEL_CHECK_ARG(t.dtype != DType::int4, "tensor '" + t.name + "' dtype",
                     "a dtype safetensors can store (not int4)", dtype_name(t.dtype));
    KEYSEL_CHECK_ARG(static_cast<std::int64_t>(t.data.size()) == dtype_bytes(t.dtype, t.numel()),
                     "tensor '" + t.name + "' data", std::to_string(dtype_bytes(t.dtype, t.numel())) + " bytes",
                     t.data.size());
    std::string_view dtype;
    for (const auto& d : kDTypes) {
      if (d.dtype == t.dtype && !d.narrow_int64) dtype = d.name;
    }
    const std::uint64_t end = offset + static_cast<std::uint64_t>(t.data.size());
    header[t.name] = {{"dtype", std::string(dtype)}, {"shape", t.shape}, {"data_offsets", {offset, end}}};
    offset += t.data.size();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // data starts 8-byte aligned, as the reference writer does
  std::vector<std::byte> out(8 + text.size() + offset);
  const std::uint64_t header_len = text.size();
  std::memcpy(out.data(), &header_len, 8);
  std::memcpy(out.data() + 8, text.data(), text.size());
  std::size_t at = 8 + text.size();
  for (const LoadedTensor& t : tensors) {
    if (!t.data.empty()) std::memcpy(out.data() + at, t.data.data(), t.data.size());
    at += t.data.size();
  }
  return out;
}

void write_safetensors(const std::filesystem::path& path, const std::vector<LoadedTensor>& tensors,
                       const std::map<std::string, std::string, std::less<>>& metadata) {
  const std::vector<std::byte> bytes = serialize_safetensors(tensors, metadata);
  detail::write_file_bytes("write_safetensors", path, bytes);
}

}  // namespace keysel
