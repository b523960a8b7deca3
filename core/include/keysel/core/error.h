// keysel::Error and the argument checks every public entry point uses.
//
// A failed check throws keysel::Error with a message of the form
//   keysel::<function>: argument '<name>': expected <what was expected>, got <what came>
// Checks run before any output is written, so a throwing call leaves its outputs untouched.
#pragma once

#include <concepts>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace keysel {

/// The one exception type keysel throws for caller errors (bad arguments, corrupt files, unsupported
/// requests). Internal invariant violations are also reported as Error, with "internal error" in the text.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

/// Renders a received value for an error message: numbers as numbers, strings quoted, ranges as [a, b, c].
template <typename T>
std::string describe(const T& value) {
  std::ostringstream os;
  if constexpr (std::is_same_v<T, bool>) {
    os << (value ? "true" : "false");
  } else if constexpr (std::is_convertible_v<const T&, std::string_view>) {
    os << '"' << std::string_view(value) << '"';
  } else if constexpr (std::is_same_v<T, std::int8_t> || std::is_same_v<T, std::uint8_t>) {
    os << static_cast<int>(value);
  } else if constexpr (requires { value.begin(); value.end(); }) {
    os << '[';
    bool first = true;
    for (const auto& item : value) {
      if (!first) os << ", ";
      os << item;
      first = false;
    }
    os << ']';
  } else {
    os << value;
  }
  return os.str();
}

[[noreturn]] void throw_argument_error(std::string_view function, std::string_view argument,
                                       std::string_view expected, std::string_view received);
[[noreturn]] void throw_error(std::string_view function, std::string_view message);

}  // namespace detail
}  // namespace keysel

/// Throws keysel::Error naming the argument, what was expected and what came, when `cond` is false.
///   KEYSEL_CHECK_ARG(k >= 1, "k", ">= 1", k);
#define KEYSEL_CHECK_ARG(cond, argument, expected, received)                                     \
  do {                                                                                           \
    if (!(cond)) {                                                                               \
      ::keysel::detail::throw_argument_error(__func__, (argument), (expected),                   \
                                             ::keysel::detail::describe(received));             \
    }                                                                                            \
  } while (0)

/// As KEYSEL_CHECK_ARG, naming `function` instead of the enclosing function (for shared validation helpers).
#define KEYSEL_CHECK_ARG_IN(function, cond, argument, expected, received)                        \
  do {                                                                                           \
    if (!(cond)) {                                                                               \
      ::keysel::detail::throw_argument_error((function), (argument), (expected),                 \
                                             ::keysel::detail::describe(received));             \
    }                                                                                            \
  } while (0)

/// Throws keysel::Error with a free-form message (streamed) when `cond` is false.
///   KEYSEL_CHECK(file.good(), "cannot read " << path);
#define KEYSEL_CHECK(cond, message)                                                              \
  do {                                                                                           \
    if (!(cond)) {                                                                               \
      std::ostringstream keysel_check_stream_;                                                   \
      keysel_check_stream_ << message;                                                           \
      ::keysel::detail::throw_error(__func__, keysel_check_stream_.str());                       \
    }                                                                                            \
  } while (0)

/// Internal invariant: a failure is a keysel bug, not a caller error.
#define KEYSEL_ASSERT(cond)                                                                      \
  do {                                                                                           \
    if (!(cond)) {                                                                               \
      ::keysel::detail::throw_error(__func__, "internal error: " #cond " failed at " __FILE__);  \
    }                                                                                            \
  } while (0)
