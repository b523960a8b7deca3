#include "keysel/core/error.h"

namespace keysel::detail {

void throw_argument_error(std::string_view function, std::string_view argument, std::string_view expected,
                          std::string_view received) {
  std::string message = "keysel::";
  message += function;
  message += ": argument '";
  message += argument;
  message += "': expected ";
  message += expected;
  message += ", got ";
  message += received;
  throw Error(message);
}

void throw_error(std::string_view function, std::string_view text) {
  std::string message = "keysel::";
  message += function;
  message += ": ";
  message += text;
  throw Error(message);
}

}  // namespace keysel::detail
