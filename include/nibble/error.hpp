// nibble's one error hierarchy. The library throws these and never exits; only the CLI turns an
// error into a message and an exit code. Every message names the value that was wrong.
#pragma once

#include <stdexcept>
#include <string>

namespace nibble {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A caller passed a value the library cannot use (a negative learning rate, an empty list).
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

// A file's bytes are not what its format promises (truncated, corrupt, inconsistent).
class FormatError : public Error {
 public:
  using Error::Error;
};

// Reading or writing a file failed at the operating-system level.
class IoError : public Error {
 public:
  using Error::Error;
};

// Saved state does not fit the object it is loaded into (other algorithm, shapes, block size).
class StateMismatch : public Error {
 public:
  using Error::Error;
};

}  // namespace nibble
