// NumPy .npy reader and writer (format versions 1.0, 2.0 and 3.0).
//
// Layout (numpy.lib.format): the magic "\x93NUMPY", major and minor version bytes, the header length (u16
// little-endian for version 1, u32 for versions 2 and 3), then a Python dict literal
//   {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }
// padded with spaces and a newline, then the raw array data. The reader parses the dict itself (only the three
// keys numpy writes, with string, bool and tuple-of-integer values) and requires the data to hold exactly the
// bytes the shape and dtype imply.
#include <bit>
#include <cstring>
#include <limits>
#include <string>

#include "keysel/recall/loaders.h"
#include "loaders/loader_support.h"

namespace keysel {

namespace {

[[noreturn]] void fail(std::string_view function, std::string_view source, const std::string& what) {
  detail::throw_file_error(function, source, {}, what);
}

struct NpyDType {
  std::string_view descr;
  DType dtype;
  int bytes;
  bool narrow_int64;
};

constexpr NpyDType kDTypes[] = {
    {"<f4", DType::fp32, 4, false},  {"<f2", DType::fp16, 2, false}, {"<f8", DType::fp64, 8, false},
    {"<i4", DType::int32, 4, false}, {"|i1", DType::int8, 1, false}, {"<i8", DType::int32, 8, true},
};

/// The header dict: the three keys numpy writes.
struct NpyHeader {
  std::string descr;
  bool fortran_order = false;
  std::vector<std::int64_t> shape;
};

/// A recursive-descent parser of the restricted Python literal numpy writes; every read is bounds-checked.
class HeaderParser {
 public:
  HeaderParser(std::string_view text, std::string_view function, std::string_view source)
      : text_(text), function_(function), source_(source) {}

  NpyHeader parse() {
    NpyHeader header;
    bool has_descr = false, has_order = false, has_shape = false;
    expect('{');
    while (true) {
      skip_space();
      if (peek() == '}') {
        ++at_;
        break;
      }
      const std::string key = parse_string();
      expect(':');
      if (key == "descr") {
        skip_space();
        if (peek() != '\'' && peek() != '"') {
          error("expected descr to be a simple dtype string such as '<f4' (structured dtypes are not supported)");
        }
        header.descr = parse_string();
        has_descr = true;
      } else if (key == "fortran_order") {
        header.fortran_order = parse_bool();
        has_order = true;
      } else if (key == "shape") {
        header.shape = parse_shape();
        has_shape = true;
      } else {
        error("expected only the keys 'descr', 'fortran_order' and 'shape', found '" + key + "'");
      }
      skip_space();
      if (peek() == ',') {
        ++at_;
      } else if (peek() != '}') {
        error("expected ',' or '}' after the value of '" + key + "'");
      }
    }
    skip_space();
    if (at_ != text_.size()) error("unexpected text after the header dict");
    if (!has_descr || !has_order || !has_shape) {
      error("expected the keys 'descr', 'fortran_order' and 'shape' in the header, some are missing");
    }
    return header;
  }

 private:
  [[noreturn]] void error(const std::string& what) const {
    fail(function_, source_, "malformed .npy header at character " + std::to_string(at_) + ": " + what);
  }
  char peek() const { return at_ < text_.size() ? text_[at_] : '\0'; }
  void skip_space() {
    while (at_ < text_.size() &&
           (text_[at_] == ' ' || text_[at_] == '\n' || text_[at_] == '\t' || text_[at_] == '\r')) {
      ++at_;
    }
  }
  void expect(char c) {
    skip_space();
    if (peek() != c) error(std::string("expected '") + c + "'");
    ++at_;
  }
  std::string parse_string() {
    skip_space();
    const char quote = peek();
    if (quote != '\'' && quote != '"') error("expected a quoted string");
    ++at_;
    std::string out;
    while (at_ < text_.size() && text_[at_] != quote) out += text_[at_++];
    if (at_ >= text_.size()) error("unterminated string");
    ++at_;
    return out;
  }
  bool parse_bool() {
    skip_space();
    if (text_.substr(at_, 4) == "True") {
      at_ += 4;
      return true;
    }
    if (text_.substr(at_, 5) == "False") {
      at_ += 5;
      return false;
    }
    error("expected True or False");
  }
  std::vector<std::int64_t> parse_shape() {
    expect('(');
    std::vector<std::int64_t> shape;
    while (true) {
      skip_space();
      if (peek() == ')') {
        ++at_;
        return shape;
      }
      if (peek() < '0' || peek() > '9') error("expected a non-negative integer in the shape");
      std::int64_t value = 0;
      while (peek() >= '0' && peek() <= '9') {
        const int digit = peek() - '0';
        if (value > ((std::int64_t{1} << 62) - digit) / 10) error("shape entry larger than 2^62");
        value = value * 10 + digit;
        ++at_;
      }
      if (peek() == 'L') ++at_;  // Python 2 longs
      shape.push_back(value);
      if (shape.size() > static_cast<std::size_t>(TensorView::kMaxRank)) {
        error("expected rank <= " + std::to_string(TensorView::kMaxRank));
      }
      skip_space();
      if (peek() == ',') {
        ++at_;
      } else if (peek() != ')') {
        error("expected ',' or ')' in the shape");
      }
    }
  }

  std::string_view text_;
  std::string_view function_;
  std::string_view source_;
  std::size_t at_ = 0;
};

LoadedTensor parse_npy_impl(std::span<const std::byte> bytes, std::string_view source, std::string_view name,
                            std::string_view function) {
  static constexpr unsigned char kMagic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
  if (bytes.size() < 10 || std::memcmp(bytes.data(), kMagic, 6) != 0) {
    fail(function, source,
         "expected the .npy magic \"\\x93NUMPY\" and a version (10 bytes at least), found " +
             (bytes.size() < 10 ? std::to_string(bytes.size()) + " bytes" : std::string("other bytes")));
  }
  const auto major = static_cast<unsigned>(bytes[6]);
  const auto minor = static_cast<unsigned>(bytes[7]);
  if (major < 1 || major > 3 || minor != 0) {
    fail(function, source,
         "expected .npy format version 1.0, 2.0 or 3.0, found " + std::to_string(major) + "." + std::to_string(minor));
  }
  std::uint64_t header_len = 0, header_start = 0;
  if (major == 1) {
    std::uint16_t len = 0;
    std::memcpy(&len, bytes.data() + 8, 2);
    header_len = len;
    header_start = 10;
  } else {
    if (bytes.size() < 12) fail(function, source, "truncated: expected a 4-byte header length");
    std::uint32_t len = 0;
    std::memcpy(&len, bytes.data() + 8, 4);
    header_len = len;
    header_start = 12;
  }
  if (header_len > kMaxNpyHeaderBytes || header_len > bytes.size() - header_start) {
    fail(function, source,
         "header length " + std::to_string(header_len) + " runs past the end of the file (" +
             std::to_string(bytes.size()) + " bytes) or over the limit: truncated or corrupt");
  }
  const std::string_view text(reinterpret_cast<const char*>(bytes.data() + header_start),
                              static_cast<std::size_t>(header_len));
  const NpyHeader header = HeaderParser(text, function, source).parse();

  if (!header.descr.empty() && header.descr[0] == '>') {
    fail(function, source,
         "big-endian data ('" + header.descr + "') is not supported; save it little-endian, e.g. a.astype('<" +
             header.descr.substr(1) + "')");
  }
  std::string descr = header.descr;
  if (!descr.empty() && descr[0] == '=') descr[0] = '<';  // native order on a little-endian host
  if (descr == "<i1" || descr == "i1") descr = "|i1";
  const NpyDType* dtype = nullptr;
  for (const auto& d : kDTypes) {
    if (d.descr == descr) dtype = &d;
  }
  if (dtype == nullptr) {
    fail(function, source, "expected descr '<f4', '<f2', '<f8', '<i4', '<i8' or '|i1', found '" + header.descr + "'");
  }
  if (header.fortran_order && header.shape.size() > 1) {
    fail(function, source,
         "Fortran-order arrays are not supported (fortran_order: True); save np.ascontiguousarray(a) instead");
  }
  std::uint64_t numel = 0, nbytes = 0;
  if (!detail::checked_size(header.shape, static_cast<std::uint64_t>(dtype->bytes), numel, nbytes)) {
    fail(function, source, "the shape's byte size overflows");
  }
  const std::uint64_t data_start = header_start + header_len;
  const std::uint64_t available = bytes.size() - data_start;
  if (available != nbytes) {
    fail(function, source,
         "expected " + std::to_string(nbytes) + " data bytes for descr '" + header.descr + "' and shape of " +
             std::to_string(numel) + " elements, found " + std::to_string(available) +
             (available < nbytes ? " (truncated)" : " (trailing bytes)"));
  }
  LoadedTensor t;
  t.name = std::string(name);
  t.dtype = dtype->dtype;
  t.shape = header.shape;
  const auto raw = bytes.subspan(static_cast<std::size_t>(data_start), static_cast<std::size_t>(nbytes));
  if (dtype->narrow_int64) {
    t.data = detail::narrow_int64_to_int32(function, source, t.name, raw);
  } else {
    t.data.assign(raw.begin(), raw.end());
  }
  return t;
}

}  // namespace

LoadedTensor parse_npy(std::span<const std::byte> bytes, std::string_view source) {
  return parse_npy_impl(bytes, source, source, "parse_npy");
}

LoadedTensor read_npy(const std::filesystem::path& path) {
  const std::vector<std::byte> bytes = detail::read_file_bytes("read_npy", path);
  return parse_npy_impl(bytes, path.string(), path.stem().string(), "read_npy");
}

std::vector<std::byte> serialize_npy(const LoadedTensor& tensor) {
  std::string_view descr;
  for (const auto& d : kDTypes) {
    if (d.dtype == tensor.dtype && !d.narrow_int64) descr = d.descr;
  }
  KEYSEL_CHECK_ARG(!descr.empty(), "tensor.dtype", "fp32, fp16, fp64, int32 or int8 (types NumPy can store)",
                   dtype_name(tensor.dtype));
  KEYSEL_CHECK_ARG(static_cast<std::int64_t>(tensor.data.size()) == dtype_bytes(tensor.dtype, tensor.numel()),
                   "tensor.data", std::to_string(dtype_bytes(tensor.dtype, tensor.numel())) + " bytes",
                   tensor.data.size());
  std::string header = "{'descr': '" + std::string(descr) + "', 'fortran_order': False, 'shape': (";
  for (std::size_t i = 0; i < tensor.shape.size(); ++i) {
    header += std::to_string(tensor.shape[i]);
    if (tensor.shape.size() == 1 || i + 1 < tensor.shape.size()) header += ",";
    if (i + 1 < tensor.shape.size()) header += " ";
  }
  header += "), }";
  // Pad with spaces and a final newline so that the data starts 64-byte aligned (as numpy does).
  const bool v2 = header.size() + 11 > 65535;
  const std::size_t prefix = v2 ? 12 : 10;
  header.append((64 - (prefix + header.size() + 1) % 64) % 64, ' ');
  header += '\n';
  std::vector<std::byte> out(prefix + header.size() + tensor.data.size());
  static constexpr unsigned char kMagic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
  std::memcpy(out.data(), kMagic, 6);
  out[6] = static_cast<std::byte>(v2 ? 2 : 1);
  out[7] = std::byte{0};
  if (v2) {
    const auto len = static_cast<std::uint32_t>(header.size());
    std::memcpy(out.data() + 8, &len, 4);
  } else {
    const auto len = static_cast<std::uint16_t>(header.size());
    std::memcpy(out.data() + 8, &len, 2);
  }
  std::memcpy(out.data() + prefix, header.data(), header.size());
  if (!tensor.data.empty()) std::memcpy(out.data() + prefix + header.size(), tensor.data.data(), tensor.data.size());
  return out;
}

void write_npy(const std::filesystem::path& path, const LoadedTensor& tensor) {
  const std::vector<std::byte> bytes = serialize_npy(tensor);
  detail::write_file_bytes("write_npy", path, bytes);
}

}  // namespace keysel
