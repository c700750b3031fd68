// What the GPU tests share: the skip on a machine without a CUDA device, per-process scratch
// folders, CUDA error checks, bf16 bits on the host, and device memory freed at scope exit: raw
// bytes, a typed array, and fp32/bf16 elements read and written as floats. Compiled only in the
// CUDA build (tests/gpu/*.cpp).
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

#include <unistd.h>

#include "nibble/device.hpp"

// Skips the calling test, saying why, when no CUDA device is visible.
#define NIBBLE_REQUIRE_GPU()                                                                            \
  do {                                                                                                  \
    if (::nibble::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device visible: GPU test skipped"; \
  } while (0)

namespace nibble::test {

// A scratch folder under the system's temporary one, named for `name` and this process, so that
// two runs of a test binary (two build trees under ctest -j) do not share it.
inline std::filesystem::path scratch_dir(const std::string& name) {
  return std::filesystem::temp_directory_path() / (name + "_" + std::to_string(::getpid()));
}

// Throws naming `what` and CUDA's message when a CUDA call failed.
inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// The bf16 nearest to f (ties to even); a NaN stays a quiet NaN.
inline std::uint16_t bf16_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);
  return static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline float bf16_value(std::uint16_t h) {
  const std::uint32_t u = static_cast<std::uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float round_to_bf16(float f) { return bf16_value(bf16_bits(f)); }

// Device bytes, freed on scope exit; no allocation (a null pointer) for zero bytes.
class DeviceBytes {
 public:
  explicit DeviceBytes(std::size_t bytes) {
    if (bytes > 0) check(cudaMalloc(&p_, bytes), "cudaMalloc");
  }
  ~DeviceBytes() { cudaFree(p_); }
  DeviceBytes(const DeviceBytes&) = delete;
  DeviceBytes& operator=(const DeviceBytes&) = delete;
  void* data() const { return p_; }

 private:
  void* p_ = nullptr;
};

// n elements of T on the device, copied to and from host vectors of T.
template <class T>
class DeviceArray {
 public:
  explicit DeviceArray(std::size_t n) : n_(n) {
    if (n_ > 0) check(cudaMalloc(&p_, n_ * sizeof(T)), "cudaMalloc");
  }
  ~DeviceArray() { cudaFree(p_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  T* data() { return p_; }
  // Every element; landed when this returns: a pageable cudaMemcpy may return before its data
  // arrives, and work on a non-blocking stream is not ordered after the legacy stream.
  void upload(const std::vector<T>& v) {
    if (v.size() != n_) throw std::runtime_error("upload: " + std::to_string(v.size()) + " values for " + std::to_string(n_) + " elements");
    if (n_ > 0) check(cudaMemcpy(p_, v.data(), n_ * sizeof(T), cudaMemcpyHostToDevice), "upload");
    check(cudaDeviceSynchronize(), "upload");
  }
  // `count` elements from `first` on (to the end by default).
  std::vector<T> download(std::size_t first = 0, std::size_t count = SIZE_MAX) const {
    count = std::min(count, n_ - first);
    std::vector<T> v(count);
    if (count > 0) check(cudaMemcpy(v.data(), p_ + first, count * sizeof(T), cudaMemcpyDeviceToHost), "download");
    return v;
  }

 private:
  T* p_ = nullptr;
  std::size_t n_;
};

// How the engine stores activations: fp32 or bf16.
enum class Storage { kF32, kBF16 };
inline std::size_t storage_bytes(Storage s) { return s == Storage::kF32 ? 4 : 2; }

// n elements of one storage type on the device, written and read as floats (bf16 rounded to
// nearest even), `offset` elements past a cudaMalloc'd (256-byte aligned) base: an offset of 1
// hands the kernels a pointer that is not aligned for 128-bit accesses.
class DeviceTensor {
 public:
  DeviceTensor(Storage s, std::size_t n, std::size_t offset = 0)
      : s_(s), n_(n), offset_(offset), buffer_((n + offset) * storage_bytes(s)) {}

  std::size_t element_bytes() const { return storage_bytes(s_); }
  void* data() const {
    return buffer_.data() == nullptr ? nullptr : static_cast<char*>(buffer_.data()) + offset_ * element_bytes();
  }
  template <class T>
  T* as() const {
    return static_cast<T*>(data());
  }

  // Every element; throws unless `v` has n of them.
  void upload(const std::vector<float>& v) {
    if (v.size() != n_) throw std::runtime_error("upload: " + std::to_string(v.size()) + " values for " + std::to_string(n_) + " elements");
    upload_at(0, v);
  }
  // The elements from `first` on; throws when they run past the end.
  void upload_at(std::size_t first, const std::vector<float>& v) {
    if (first > n_ || v.size() > n_ - first) throw std::runtime_error("upload: past the end");
    if (v.empty()) return;
    char* dst = static_cast<char*>(data()) + first * element_bytes();
    if (s_ == Storage::kF32) {
      check(cudaMemcpy(dst, v.data(), v.size() * 4, cudaMemcpyHostToDevice), "upload");
    } else {
      std::vector<std::uint16_t> bits(v.size());
      for (std::size_t i = 0; i < v.size(); ++i) bits[i] = bf16_bits(v[i]);
      check(cudaMemcpy(dst, bits.data(), bits.size() * 2, cudaMemcpyHostToDevice), "upload");
    }
  }
  // `count` elements from `first` on (to the end by default).
  std::vector<float> download(std::size_t first = 0, std::size_t count = SIZE_MAX) const {
    count = std::min(count, n_ - first);
    std::vector<float> v(count);
    if (count == 0) return v;
    const char* src = static_cast<const char*>(data()) + first * element_bytes();
    if (s_ == Storage::kF32) {
      check(cudaMemcpy(v.data(), src, count * 4, cudaMemcpyDeviceToHost), "download");
    } else {
      std::vector<std::uint16_t> bits(count);
      check(cudaMemcpy(bits.data(), src, count * 2, cudaMemcpyDeviceToHost), "download");
      for (std::size_t i = 0; i < count; ++i) v[i] = bf16_value(bits[i]);
    }
    return v;
  }
  void fill_bytes(int byte) {
    if (n_ > 0) check(cudaMemset(data(), byte, n_ * element_bytes()), "cudaMemset");
  }

 private:
  Storage s_;
  std::size_t n_, offset_;
  DeviceBytes buffer_;
};

}  // namespace nibble::test
