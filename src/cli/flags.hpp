// Range checks for numeric flags, run by CLI11 while it parses: a value that is not a finite
// number inside the flag's range stops the command before it starts, naming the flag and value
// ("--lr: nan is not a finite number"). Every numeric flag of every subcommand carries one.
#pragma once

#include <CLI/CLI.hpp>
#include <limits>
#include <string>

namespace nibble::cli {

// The name every range check carries, so that tests can find the flags that have one.
inline constexpr const char* kNumberCheck = "number";

// A finite number in [low, high] (or (low, ...) / (..., high) where the ends are open); an
// infinite end is no bound. Its description is ">= low", "> low", or "in [low, high)" style.
CLI::Validator number_in(double low, bool low_open, double high, bool high_open);

inline CLI::Validator at_least(double low) {
  return number_in(low, false, std::numeric_limits<double>::infinity(), false);
}
inline CLI::Validator positive() { return number_in(0.0, true, std::numeric_limits<double>::infinity(), false); }
inline CLI::Validator non_negative() { return at_least(0.0); }
// [0, 1): dropout, a beta.
inline CLI::Validator fraction_below_one() { return number_in(0.0, false, 1.0, true); }
// [0, 1]
inline CLI::Validator unit_interval() { return number_in(0.0, false, 1.0, false); }

}  // namespace nibble::cli
