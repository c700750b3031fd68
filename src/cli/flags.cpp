// Numeric flag checks (flags.hpp): parse the text as a number, refuse NaN and infinities, then the
// range.
#include "cli/flags.hpp"

#include <fmt/format.h>

#include <cctype>
#include <cmath>
#include <cstdlib>

namespace nibble::cli {

CLI::Validator number_in(double low, bool low_open, double high, bool high_open) {
  std::string description;
  if (std::isinf(high)) {
    description = fmt::format("{} {}", low_open ? ">" : ">=", low);
  } else {
    description = fmt::format("in {}{}, {}{}", low_open ? "(" : "[", low, high, high_open ? ")" : "]");
  }
  auto check = [=](const std::string& text) -> std::string {
    const char* begin = text.c_str();
    char* end = nullptr;
    const double value = std::strtod(begin, &end);
    while (end != nullptr && *end != '\0' && std::isspace(static_cast<unsigned char>(*end))) ++end;
    if (text.empty() || end == begin || *end != '\0') return fmt::format("'{}' is not a number", text);
    // Flags are read into float as often as double: a value beyond float's range is refused too.
    if (!std::isfinite(static_cast<float>(value))) return fmt::format("{} is not a finite number", text);
    const bool above_low = low_open ? value > low : value >= low;
    const bool below_high = std::isinf(high) || (high_open ? value < high : value <= high);
    if (!above_low || !below_high) return fmt::format("{} is not {}", text, description);
    return std::string();
  };
  return CLI::Validator(check, description, kNumberCheck);
}

}  // namespace nibble::cli
