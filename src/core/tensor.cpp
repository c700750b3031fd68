// Shape arithmetic, aligned host buffers and owning tensors.
// Sizes are checked for overflow here so that no caller multiplies extents by hand.
#include "nibble/tensor.hpp"

#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

#include "nibble/error.hpp"

namespace nibble {

std::string shape_string(std::span<const std::int64_t> shape) {
  std::string text = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) text += ", ";
    text += std::to_string(shape[i]);
  }
  return text + "]";
}

std::int64_t shape_numel(std::span<const std::int64_t> shape) {
  bool has_zero_extent = false;
  for (std::int64_t extent : shape) {
    if (extent < 0) {
      throw InvalidArgument("shape " + shape_string(shape) + " has a negative extent");
    }
    has_zero_extent = has_zero_extent || extent == 0;
  }
  // A zero extent makes the product 0 whatever the other extents are; checking it first keeps the
  // result independent of the order of the extents.
  if (has_zero_extent) return 0;
  std::int64_t numel = 1;
  for (std::int64_t extent : shape) {
    if (__builtin_mul_overflow(numel, extent, &numel)) {
      throw InvalidArgument("shape " + shape_string(shape) + " has more elements than int64 holds");
    }
  }
  return numel;
}

Buffer::Buffer(std::size_t bytes) {
  // std::aligned_alloc wants a size that is a multiple of the alignment; an empty buffer still
  // gets one block so that data() is a valid pointer for memcpy and friends.
  if (bytes > std::numeric_limits<std::size_t>::max() - kAlignment) throw std::bad_alloc();
  const std::size_t capacity =
      bytes == 0 ? kAlignment : (bytes + kAlignment - 1) / kAlignment * kAlignment;
  auto* memory = static_cast<std::byte*>(std::aligned_alloc(kAlignment, capacity));
  if (memory == nullptr) throw std::bad_alloc();
  std::memset(memory, 0, capacity);
  data_.reset(memory);
  size_ = bytes;
}

void Buffer::Free::operator()(std::byte* p) const { std::free(p); }

Tensor::Tensor(DType dtype, std::vector<std::int64_t> shape)
    : dtype_(dtype), shape_(std::move(shape)), numel_(shape_numel(shape_)) {
  std::int64_t bytes = 0;
  if (__builtin_mul_overflow(numel_, static_cast<std::int64_t>(dtype_size(dtype_)), &bytes)) {
    throw InvalidArgument("tensor of shape " + shape_string(shape_) + " and dtype " +
                          std::string(dtype_name(dtype_)) + " has more bytes than int64 holds");
  }
  buffer_ = Buffer(static_cast<std::size_t>(bytes));
}

}  // namespace nibble
