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

// The build or the machine lacks what was asked for (a CUDA optimizer in a CPU-only build, no
// GPU), or a CUDA call failed; the message names the call and the driver's error.
class DeviceError : public Error {
 public:
  using Error::Error;
};

// An allocation did not fit: more bytes were needed than the memory limit (or the system) had
// free. Callers such as the benchmark lab turn it into an "out of memory" result and carry on.
class OutOfMemory : public Error {
 public:
  OutOfMemory(const std::string& message, long long requested_bytes, long long available_bytes)
      : Error(message), requested_bytes_(requested_bytes), available_bytes_(available_bytes) {}
  long long requested_bytes() const { return requested_bytes_; }
  long long available_bytes() const { return available_bytes_; }  // -1 when unknown

 private:
  long long requested_bytes_;
  long long available_bytes_;
};

}  // namespace nibble
