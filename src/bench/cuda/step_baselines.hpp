// What the step benchmark (bench/step_bench.hpp) needs on the GPU: device buffers, a seeded random
// fill, timed device copies, per-call timing with CUDA events, and the two AdamW fp32 baselines
// ("loop", "foreach") that nibble's fused step is compared with. Backend-free: no CUDA header.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "nibble/hyper.hpp"

namespace nibble::bench::cuda {

// Device memory from cudaMalloc, freed when destroyed. Allocation throws OutOfMemory (with the
// requested and free bytes) when the GPU lacks the memory, DeviceError on any other failure.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(std::size_t bytes, const char* what);  // `what` names the buffer in errors
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() const { return data_; }
  float* floats() const { return static_cast<float*>(data_); }
  std::size_t bytes() const { return bytes_; }

 private:
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
};

// Every `stream` below is a cudaStream_t; null is the default stream.

// values[i] = scale * N(0, 1) from a counter-based hash of (seed, i): the same numbers for a seed
// on every GPU, though not the CPU path's numbers.
void fill_normal(float* values, std::int64_t count, float scale, std::uint64_t seed, void* stream);

void synchronize_stream(void* stream);

// Runs `call` `count` times, with a CUDA event recorded on `stream` before the first call and after
// each one, and returns each call's milliseconds. Consecutive events share an edge, so time the GPU
// spends waiting for the host to launch the next kernel counts against the call that caused it.
std::vector<double> time_calls(int count, const std::function<void()>& call, void* stream);

struct CopyTimes {
  std::size_t bytes = 0;   // bytes of one copy (read once, written once)
  std::vector<double> ms;  // milliseconds of each timed copy
};

// Device-to-device cudaMemcpyAsync of `bytes` (less when two such buffers would not fit in free
// memory): one warm-up copy, then kTimedCopies copies, each timed with CUDA events.
inline constexpr int kTimedCopies = 10;
CopyTimes time_device_copies(std::size_t bytes, void* stream);

// ---------------------------------------------------------------------------------------------
// AdamW fp32 baselines: the implementation levels that fused multi-tensor kernels replace.

enum class AdamWLevel : unsigned char {
  kLoop,     // one launch per tensor of a fused elementwise AdamW kernel
  kForeach,  // op-by-op passes, each one launch over a chunk table of all tensors
};
const char* adamw_level_name(AdamWLevel level);  // "loop", "foreach"

// Bytes an AdamW fp32 step must move per parameter: grad read (4), param read + write (8), m and v
// read + written (16). The loop level and nibble's fused update move exactly this.
inline constexpr double kAdamWFp32BytesPerParam = 28.0;

struct AdamWTensor {
  float* param = nullptr;  // device, 16-byte aligned
  float* grad = nullptr;   // device, 16-byte aligned
  std::int64_t numel = 0;
};

class AdamWBaseline {
 public:
  // Allocates zeroed m and v for every tensor (and the foreach tables) once. `hyper` is AdamW's:
  // lr, weight_decay, betas, eps, bias correction, maximize; amsgrad and coupled (L2) decay are
  // refused, as neither baseline implements them.
  AdamWBaseline(AdamWLevel level, std::vector<AdamWTensor> tensors, const Hyper& hyper, void* stream);

  // Queues one step on the stream; the step constants are computed on the host and passed by value.
  void enqueue_step();

  AdamWLevel level() const { return level_; }
  std::int64_t params() const { return params_; }
  std::int64_t state_bytes() const { return 8 * params_; }  // m and v, fp32
  // Bytes read + written per parameter by one step: each pass counted as it runs.
  double bytes_moved_per_param() const;

 private:
  AdamWLevel level_;
  Hyper hyper_;
  void* stream_;
  std::vector<AdamWTensor> tensors_;
  std::vector<float*> m_, v_;  // per tensor, inside state_
  std::int64_t params_ = 0;
  std::int64_t step_ = 0;
  DeviceBuffer state_;
  DeviceBuffer tensor_table_;  // foreach: device copy of every tensor's four pointers
  DeviceBuffer chunk_table_;   // foreach: chunks of all tensors
  std::int64_t chunk_count_ = 0;
};

}  // namespace nibble::bench::cuda
