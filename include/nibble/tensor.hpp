// Host tensors: an owning, 64-byte aligned Tensor and a non-owning TensorView.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "nibble/dtype.hpp"

namespace nibble {

// Number of elements of a shape; throws InvalidArgument on a negative extent or on overflow.
std::int64_t shape_numel(std::span<const std::int64_t> shape);
std::string shape_string(std::span<const std::int64_t> shape);

// Every Buffer is counted: the bytes live now, the peak since the last reset, and an optional
// limit beyond which a Buffer is refused with OutOfMemory before any memory is touched. The
// training engine and the optimizer keep all their large arrays in Buffers, so these counters are
// the measured side of their memory accounting.
struct HostMemoryStats {
  std::int64_t live_bytes = 0;
  std::int64_t peak_bytes = 0;
  std::int64_t limit_bytes = 0;  // 0: no limit
};
HostMemoryStats host_memory_stats();
void reset_host_memory_peak();  // peak := live
// 0 removes the limit; a negative limit throws InvalidArgument.
void set_host_memory_limit(std::int64_t bytes);

// Sets a limit for the lifetime of the object and restores the previous one after.
class ScopedHostMemoryLimit {
 public:
  explicit ScopedHostMemoryLimit(std::int64_t bytes) : previous_(host_memory_stats().limit_bytes) {
    set_host_memory_limit(bytes);
  }
  ~ScopedHostMemoryLimit() { set_host_memory_limit(previous_); }
  ScopedHostMemoryLimit(const ScopedHostMemoryLimit&) = delete;
  ScopedHostMemoryLimit& operator=(const ScopedHostMemoryLimit&) = delete;

 private:
  std::int64_t previous_;
};

// Aligned, zero-initialised host memory that frees itself. Throws OutOfMemory when the limit
// above or the system refuses it.
class Buffer {
 public:
  static constexpr std::size_t kAlignment = 64;
  Buffer() = default;
  explicit Buffer(std::size_t bytes);
  Buffer(Buffer&& other) noexcept : data_(std::move(other.data_)), size_(std::exchange(other.size_, 0)) {}
  Buffer& operator=(Buffer&& other) noexcept {
    data_ = std::move(other.data_);
    size_ = std::exchange(other.size_, 0);
    return *this;
  }
  std::byte* data() { return data_.get(); }
  const std::byte* data() const { return data_.get(); }
  std::size_t size() const { return size_; }

 private:
  // NOTE: a default member initializer would make Free not default-constructible inside the
  // still-incomplete Buffer, and unique_ptr needs that; unique_ptr value-initializes it to 0.
  struct Free {
    std::size_t bytes;  // what the counters were charged
    void operator()(std::byte* p) const;
  };
  std::unique_ptr<std::byte[], Free> data_;
  std::size_t size_ = 0;
};

class Tensor {
 public:
  Tensor() = default;
  Tensor(DType dtype, std::vector<std::int64_t> shape);  // zero-filled

  DType dtype() const { return dtype_; }
  const std::vector<std::int64_t>& shape() const { return shape_; }
  std::int64_t numel() const { return numel_; }
  std::size_t nbytes() const { return buffer_.size(); }
  void* data() { return buffer_.data(); }
  const void* data() const { return buffer_.data(); }
  template <class T>
  T* data_as() { return reinterpret_cast<T*>(buffer_.data()); }
  template <class T>
  const T* data_as() const { return reinterpret_cast<const T*>(buffer_.data()); }

 private:
  DType dtype_ = DType::F32;
  std::vector<std::int64_t> shape_;
  std::int64_t numel_ = 0;
  Buffer buffer_;
};

// A named view of bytes owned elsewhere, as the safetensors writer takes them.
struct TensorView {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  const void* data = nullptr;
};

}  // namespace nibble
