// Private to the loaders (safetensors.cpp, npy.cpp, dump.cpp): the pieces they share.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "keysel/core/error.h"

namespace keysel::detail {

/// Throws keysel::Error of `function`: "file '<source>'[, tensor '<tensor>']: <what>".
[[noreturn]] inline void throw_file_error(std::string_view function, std::string_view source,
                                          std::string_view tensor, const std::string& what) {
  std::string message = "file '";
  message += source;
  message += "'";
  if (!tensor.empty()) {
    message += ", tensor '";
    message += tensor;
    message += "'";
  }
  message += ": ";
  message += what;
  throw_error(function, message);
}

/// JSON documents keysel reads (safetensors headers, study files, selector specs) nest a few levels; deeper text
/// is refused before parsing, so that no parser or error message recurses through it.
inline constexpr int kMaxJsonDepth = 64;

/// The deepest nesting of arrays and objects in JSON `text` (brackets inside strings do not count), stopping
/// as soon as it passes `limit`.
inline int json_nesting_depth(std::string_view text, int limit = kMaxJsonDepth) {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (const char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
      if (deepest > limit) break;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return deepest;
}

/// numel of `shape` and numel * element_bytes, or false on overflow past 2^62 (defined in safetensors.cpp).
bool checked_size(std::span<const std::int64_t> shape, std::uint64_t element_bytes, std::uint64_t& numel,
                  std::uint64_t& bytes);
/// Little-endian int64 values narrowed to int32, with a range check naming the file and tensor.
std::vector<std::byte> narrow_int64_to_int32(std::string_view function, std::string_view source,
                                             std::string_view tensor, std::span<const std::byte> data);

}  // namespace keysel::detail
