// Shape arithmetic, aligned host buffers and owning tensors.
// Sizes are checked for overflow here so that no caller multiplies extents by hand.
#include "nibble/tensor.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#include <omp.h>
#endif

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

namespace {

std::atomic<std::int64_t> g_live_bytes{0};
std::atomic<std::int64_t> g_peak_bytes{0};
std::atomic<std::int64_t> g_limit_bytes{0};

std::string byte_count(std::int64_t bytes) {
  return fmt::format("{} bytes ({:.3f} GiB)", bytes, static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0));
}

// Charges `bytes` to the counters, or throws OutOfMemory when the limit would be exceeded.
void charge(std::int64_t bytes) {
  std::int64_t live = g_live_bytes.load(std::memory_order_relaxed);
  for (;;) {
    const std::int64_t limit = g_limit_bytes.load(std::memory_order_relaxed);
    if (limit > 0 && bytes > limit - live) {
      const std::int64_t free_bytes = std::max<std::int64_t>(limit - live, 0);
      throw OutOfMemory(fmt::format("out of memory: {} needed, {} free of the {} limit", byte_count(bytes),
                                    byte_count(free_bytes), byte_count(limit)),
                        bytes, free_bytes);
    }
    if (g_live_bytes.compare_exchange_weak(live, live + bytes, std::memory_order_relaxed)) break;
  }
  const std::int64_t now = live + bytes;
  std::int64_t peak = g_peak_bytes.load(std::memory_order_relaxed);
  while (now > peak && !g_peak_bytes.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}

// NOTE: buffers of a huge page or more start on a huge-page boundary and ask the kernel for
// transparent huge pages (MADV_HUGEPAGE), before the first touch: where THP is in its common
// "madvise" mode, optimizer state and activations would otherwise sit on 4 KiB pages, and a step
// that streams gigabytes spends a tenth of its time on TLB misses. PyTorch's CPU allocator does
// the same for its tensors. The advice is only a hint: where it fails the buffer works as before.
constexpr std::size_t kHugePage = std::size_t{2} << 20;

std::byte* allocate_host(std::size_t capacity) {
  if (capacity < kHugePage) return static_cast<std::byte*>(std::aligned_alloc(Buffer::kAlignment, capacity));
  void* memory = nullptr;
  if (posix_memalign(&memory, kHugePage, capacity) != 0) return nullptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(memory, capacity, MADV_HUGEPAGE);
#endif
  return static_cast<std::byte*>(memory);
}

// NOTE: zeroing is a buffer's first touch, where the kernel faults its pages in (and, for huge
// pages, may first compact memory to find them): a large buffer is zeroed by every OpenMP thread,
// one huge page at a time, so the faults of a gigabyte of optimizer state run on all cores.
void zero_fill(std::byte* memory, std::size_t capacity) {
  constexpr std::size_t kParallelBytes = std::size_t{64} << 20;
  if (capacity < kParallelBytes || omp_in_parallel()) {
    std::memset(memory, 0, capacity);
    return;
  }
  const auto pages = static_cast<std::int64_t>((capacity + kHugePage - 1) / kHugePage);
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < pages; ++i) {
    const std::size_t begin = static_cast<std::size_t>(i) * kHugePage;
    std::memset(memory + begin, 0, std::min(kHugePage, capacity - begin));
  }
}

}  // namespace

HostMemoryStats host_memory_stats() {
  return {g_live_bytes.load(), g_peak_bytes.load(), g_limit_bytes.load()};
}

void reset_host_memory_peak() { g_peak_bytes.store(g_live_bytes.load()); }

void set_host_memory_limit(std::int64_t bytes) {
  if (bytes < 0) throw InvalidArgument(fmt::format("memory limit must be >= 0 bytes, got {}", bytes));
  g_limit_bytes.store(bytes);
}

Buffer::Buffer(std::size_t bytes) {
  // std::aligned_alloc wants a size that is a multiple of the alignment; an empty buffer still
  // gets one block so that data() is a valid pointer for memcpy and friends.
  if (bytes > static_cast<std::size_t>(std::numeric_limits<std::int64_t>::max()) - kAlignment) {
    throw OutOfMemory(fmt::format("out of memory: a buffer of {} bytes cannot be addressed", bytes), -1, -1);
  }
  const std::size_t capacity =
      bytes == 0 ? kAlignment : (bytes + kAlignment - 1) / kAlignment * kAlignment;
  charge(static_cast<std::int64_t>(capacity));
  std::byte* memory = allocate_host(capacity);
  if (memory == nullptr) {
    g_live_bytes.fetch_sub(static_cast<std::int64_t>(capacity));
    throw OutOfMemory(fmt::format("out of memory: the system refused {}", byte_count(static_cast<std::int64_t>(capacity))),
                      static_cast<std::int64_t>(capacity), -1);
  }
  zero_fill(memory, capacity);
  data_ = std::unique_ptr<std::byte[], Free>(memory, Free{capacity});
  size_ = bytes;
}

void Buffer::Free::operator()(std::byte* p) const {
  std::free(p);
  g_live_bytes.fetch_sub(static_cast<std::int64_t>(bytes));
}

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
