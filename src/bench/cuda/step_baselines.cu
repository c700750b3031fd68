// The GPU side of the step benchmark (`nibble step-bench --device cuda`): device buffers, a seeded
// random fill, timed device copies and per-step CUDA-event timing, plus the AdamW fp32 baselines that
// `--levels` sets beside nibble's fused step (AdamW: Loshchilov & Hutter, "Decoupled Weight Decay
// Regularization"). It reuses the optimizer's CUDA helpers and per-element rule (optim/cuda/common.cuh).
#include <algorithm>
#include <string>
#include <utility>

#include "bench/cuda/step_baselines.hpp"
#include "core/cuda/check.cuh"
#include "nibble/error.hpp"
#include "optim/cuda/common.cuh"

namespace nibble::bench::cuda {
namespace {

constexpr int kFillThreads = 256;
constexpr int kLoopThreads = 256;              // the loop level: 4 elements per thread
constexpr int kForeachThreads = 512;
constexpr std::int64_t kForeachChunk = 1 << 16;  // elements per block of a foreach pass

struct Event {
  cudaEvent_t event = nullptr;
  Event() { NIBBLE_CUDA_CHECK(cudaEventCreate(&event)); }
  ~Event() {
    if (event != nullptr) cudaEventDestroy(event);
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
};

cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

unsigned blocks_for(std::int64_t items, std::int64_t per_block) {
  return static_cast<unsigned>(std::max<std::int64_t>((items + per_block - 1) / per_block, 1));
}

__global__ void fill_normal_kernel(float* values, std::int64_t count, float scale, std::uint64_t seed) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    // Box-Muller from two 24-bit uniforms: u1 in (0, 1] so that log stays finite.
    const auto counter = static_cast<std::uint64_t>(i);
    const float u1 = static_cast<float>((math::hash_u32(seed, 2 * counter) >> 8) + 1u) * 0x1p-24f;
    const float u2 = static_cast<float>(math::hash_u32(seed, 2 * counter + 1) >> 8) * 0x1p-24f;
    values[i] = scale * (sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2));
  }
}

// ---------------------------------------------------------------------------------------------
// Four consecutive fp32 elements: one 128-bit access when all four are in range, else scalars.
// Every tensor starts 16-byte aligned and every index below is a multiple of 4.

struct Vec4 {
  float v[4];
};

__device__ __forceinline__ Vec4 load4(const float* src, int n) {
  Vec4 out;
  if (n == 4) {
    const float4 a = *reinterpret_cast<const float4*>(src);
    out.v[0] = a.x; out.v[1] = a.y; out.v[2] = a.z; out.v[3] = a.w;
    return out;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) out.v[i] = i < n ? src[i] : 0.0f;
  return out;
}

__device__ __forceinline__ void store4(float* dst, const Vec4& x, int n) {
  if (n == 4) {
    *reinterpret_cast<float4*>(dst) = make_float4(x.v[0], x.v[1], x.v[2], x.v[3]);
    return;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
    if (i < n) dst[i] = x.v[i];
}

// ---------------------------------------------------------------------------------------------
// Loop level: one launch per tensor, every element stepped by the shared AdamW rule.

__global__ void __launch_bounds__(kLoopThreads)
    adamw_tensor_kernel(float* param, const float* grad, float* m, float* v, std::int64_t numel, math::AdamStep k) {
  const std::int64_t e = (static_cast<std::int64_t>(blockIdx.x) * kLoopThreads + threadIdx.x) * 4;
  if (e >= numel) return;
  const int n = numel - e < 4 ? static_cast<int>(numel - e) : 4;
  Vec4 p = load4(param + e, n), g = load4(grad + e, n), mm = load4(m + e, n), vv = load4(v + e, n);
  float unused = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) math::adam_update<false>(p.v[i], g.v[i], mm.v[i], vv.v[i], unused, k);
  store4(param + e, p, n);
  store4(m + e, mm, n);
  store4(v + e, vv, n);
}

// ---------------------------------------------------------------------------------------------
// Foreach level: what an op-by-op multi-tensor implementation runs. Each pass is one launch over a
// chunk table of all tensors and reads its inputs from, and writes its output to, device memory.
//
// NOTE: a foreach implementation is a sequence of separate elementwise ops, so it cannot call the
// fused per-element rule; writing the ops out here is inherent to this level. They are the same
// arithmetic in the same order as math::adam_update with l2 = 0 (AdamW's decoupled decay), which
// the constructor checks, so under -fmad=false the result equals the fused rule's:
//   pass 1  m = beta1 * m + (1 - beta1) * g                         reads m, g     writes m
//   pass 2  v = beta2 * v + (1 - beta2) * g * g                     reads v, g     writes v
//   pass 3  p = p * decay - step_size * m / (sqrt(v) * inv_bc2_sqrt + eps)
//                                                                   reads p, m, v  writes p
// (g stands for g * grad_mul, the sign of maximize.) Three passes is the leanest split into
// separate ops; a real foreach step issues more, so this baseline flatters the level.

enum class ForeachPass : unsigned char { kFirstMoment, kSecondMoment, kParam };
constexpr double kForeachBytesPerParam = 12.0 + 12.0 + 16.0;

struct ForeachTensor {
  float* param;
  const float* grad;
  float* m;
  float* v;
};

struct ForeachChunk {
  int tensor;
  std::int64_t begin, end;
};

template <ForeachPass kPass>
__global__ void __launch_bounds__(kForeachThreads)
    adamw_foreach_kernel(const ForeachTensor* tensors, const ForeachChunk* chunks, math::AdamStep k) {
  const ForeachChunk c = chunks[blockIdx.x];
  const ForeachTensor t = tensors[c.tensor];
  for (std::int64_t e = c.begin + 4 * static_cast<std::int64_t>(threadIdx.x); e < c.end; e += 4 * kForeachThreads) {
    const int n = c.end - e < 4 ? static_cast<int>(c.end - e) : 4;
    if constexpr (kPass == ForeachPass::kFirstMoment) {
      const Vec4 g = load4(t.grad + e, n);
      Vec4 m = load4(t.m + e, n);
#pragma unroll
      for (int i = 0; i < 4; ++i) m.v[i] = k.beta1 * m.v[i] + k.one_minus_beta1 * (g.v[i] * k.grad_mul);
      store4(t.m + e, m, n);
    } else if constexpr (kPass == ForeachPass::kSecondMoment) {
      const Vec4 g = load4(t.grad + e, n);
      Vec4 v = load4(t.v + e, n);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float gs = g.v[i] * k.grad_mul;
        v.v[i] = k.beta2 * v.v[i] + k.one_minus_beta2 * (gs * gs);
      }
      store4(t.v + e, v, n);
    } else {
      Vec4 p = load4(t.param + e, n);
      const Vec4 m = load4(t.m + e, n), v = load4(t.v + e, n);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        p.v[i] = p.v[i] * k.decay;
        p.v[i] = p.v[i] - k.step_size * (m.v[i] / (sqrtf(v.v[i]) * k.inv_bc2_sqrt + k.eps));
      }
      store4(t.param + e, p, n);
    }
  }
}

template <ForeachPass kPass>
void launch_foreach_pass(const ForeachTensor* tensors, const ForeachChunk* chunks, std::int64_t chunk_count,
                         const math::AdamStep& k, cudaStream_t stream) {
  adamw_foreach_kernel<kPass><<<static_cast<unsigned>(chunk_count), kForeachThreads, 0, stream>>>(tensors, chunks, k);
}

bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

}  // namespace

// ---------------------------------------------------------------------------------------------

DeviceBuffer::DeviceBuffer(std::size_t bytes, const char* what) : bytes_(bytes) {
  if (bytes == 0) return;
  if (const cudaError_t error = cudaMalloc(&data_, bytes); error != cudaSuccess) {
    cudaGetLastError();
    data_ = nullptr;
    std::size_t free = 0, total = 0;
    if (cudaMemGetInfo(&free, &total) != cudaSuccess) cudaGetLastError();
    if (error == cudaErrorMemoryAllocation)
      throw OutOfMemory("out of GPU memory: step-bench's " + std::string(what) + " needs " + std::to_string(bytes) +
                            " bytes, " + std::to_string(free) + " are free",
                        static_cast<long long>(bytes), static_cast<long long>(free));
    ::nibble::cuda::throw_cuda("cudaMalloc", error, __FILE__, __LINE__);
  }
}

DeviceBuffer::~DeviceBuffer() {
  if (data_ != nullptr) cudaFree(data_);
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) cudaFree(data_);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

void fill_normal(float* values, std::int64_t count, float scale, std::uint64_t seed, void* stream) {
  if (count <= 0) return;
  const unsigned blocks = std::min<unsigned>(blocks_for(count, kFillThreads), 1u << 16);
  fill_normal_kernel<<<blocks, kFillThreads, 0, as_stream(stream)>>>(values, count, scale, seed);
  NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void synchronize_stream(void* stream) { NIBBLE_CUDA_CHECK(cudaStreamSynchronize(as_stream(stream))); }

std::vector<double> time_calls(int count, const std::function<void()>& call, void* stream) {
  if (count <= 0) return {};
  const cudaStream_t s = as_stream(stream);
  std::vector<Event> events(static_cast<std::size_t>(count) + 1);
  NIBBLE_CUDA_CHECK(cudaEventRecord(events[0].event, s));
  for (int i = 0; i < count; ++i) {
    call();
    NIBBLE_CUDA_CHECK(cudaEventRecord(events[static_cast<std::size_t>(i) + 1].event, s));
  }
  NIBBLE_CUDA_CHECK(cudaEventSynchronize(events.back().event));
  std::vector<double> ms(static_cast<std::size_t>(count));
  for (std::size_t i = 0; i < ms.size(); ++i) {
    float elapsed = 0.0f;
    NIBBLE_CUDA_CHECK(cudaEventElapsedTime(&elapsed, events[i].event, events[i + 1].event));
    ms[i] = elapsed;
  }
  return ms;
}

CopyTimes time_device_copies(std::size_t bytes, void* stream) {
  // Both buffers must fit beside what is already allocated, with room left for the driver.
  constexpr std::size_t kHeadroom = std::size_t{256} << 20;
  std::size_t free = 0, total = 0;
  NIBBLE_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  const std::size_t fits = free > kHeadroom ? (free - kHeadroom) / 2 : 0;
  CopyTimes result;
  result.bytes = std::min(bytes, fits) / 256 * 256;
  if (result.bytes < (std::size_t{1} << 20)) {
    throw OutOfMemory("out of GPU memory: step-bench's copy-bandwidth measurement needs two buffers of " +
                          std::to_string(bytes) + " bytes, " + std::to_string(free) + " are free",
                      static_cast<long long>(2 * bytes), static_cast<long long>(free));
  }
  DeviceBuffer source(result.bytes, "copy source");
  DeviceBuffer target(result.bytes, "copy target");
  const cudaStream_t s = as_stream(stream);
  NIBBLE_CUDA_CHECK(cudaMemsetAsync(source.data(), 0, result.bytes, s));
  auto copy = [&] {
    NIBBLE_CUDA_CHECK(cudaMemcpyAsync(target.data(), source.data(), result.bytes, cudaMemcpyDeviceToDevice, s));
  };
  copy();
  result.ms = time_calls(kTimedCopies, copy, stream);
  return result;
}

// ---------------------------------------------------------------------------------------------

const char* adamw_level_name(AdamWLevel level) { return level == AdamWLevel::kLoop ? "loop" : "foreach"; }

AdamWBaseline::AdamWBaseline(AdamWLevel level, std::vector<AdamWTensor> tensors, const Hyper& hyper, void* stream)
    : level_(level), hyper_(hyper), stream_(stream), tensors_(std::move(tensors)) {
  if (hyper_.amsgrad) throw InvalidArgument("the AdamW baselines do not implement amsgrad");
  if (!hyper_.decoupled_weight_decay && hyper_.weight_decay != 0.0f)
    throw InvalidArgument("the AdamW baselines implement decoupled weight decay only (coupled L2 decay asked for)");
  constexpr std::int64_t kAlignFloats = 256 / sizeof(float);
  std::vector<std::int64_t> offsets;
  std::int64_t floats = 0;
  for (std::size_t i = 0; i < tensors_.size(); ++i) {
    const AdamWTensor& t = tensors_[i];
    if (t.numel < 0) throw InvalidArgument("AdamW baseline: tensor " + std::to_string(i) + " has a negative size");
    if (!aligned16(t.param) || !aligned16(t.grad))
      throw InvalidArgument("AdamW baseline: tensor " + std::to_string(i) + " is not 16-byte aligned");
    offsets.push_back(floats);
    floats += (t.numel + kAlignFloats - 1) / kAlignFloats * kAlignFloats;
    params_ += t.numel;
  }
  // m for every tensor, then v for every tensor, each tensor's slice 256-byte aligned.
  const cudaStream_t s = as_stream(stream_);
  state_ = DeviceBuffer(2 * static_cast<std::size_t>(floats) * sizeof(float), "AdamW baseline state");
  if (state_.bytes() > 0) NIBBLE_CUDA_CHECK(cudaMemsetAsync(state_.data(), 0, state_.bytes(), s));
  for (std::size_t i = 0; i < tensors_.size(); ++i) {
    m_.push_back(state_.floats() + offsets[i]);
    v_.push_back(state_.floats() + floats + offsets[i]);
  }
  if (level_ == AdamWLevel::kForeach) {
    std::vector<ForeachTensor> table;
    std::vector<ForeachChunk> chunks;
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      const AdamWTensor& t = tensors_[i];
      table.push_back({t.param, t.grad, m_[i], v_[i]});
      for (std::int64_t b = 0; b < t.numel; b += kForeachChunk)
        chunks.push_back({static_cast<int>(i), b, std::min(b + kForeachChunk, t.numel)});
    }
    chunk_count_ = static_cast<std::int64_t>(chunks.size());
    tensor_table_ = DeviceBuffer(table.size() * sizeof(ForeachTensor), "foreach tensor table");
    chunk_table_ = DeviceBuffer(chunks.size() * sizeof(ForeachChunk), "foreach chunk table");
    // On the baseline's stream (the vectors live until the synchronisation below).
    if (!table.empty())
      NIBBLE_CUDA_CHECK(cudaMemcpyAsync(tensor_table_.data(), table.data(), tensor_table_.bytes(),
                                        cudaMemcpyHostToDevice, s));
    if (!chunks.empty())
      NIBBLE_CUDA_CHECK(cudaMemcpyAsync(chunk_table_.data(), chunks.data(), chunk_table_.bytes(),
                                        cudaMemcpyHostToDevice, s));
  }
  NIBBLE_CUDA_CHECK(cudaStreamSynchronize(s));
}

void AdamWBaseline::enqueue_step() {
  ++step_;
  math::StepConstants constants{};
  math::fill_step_constants(constants, Algorithm::kAdamW, hyper_, hyper_.lr, hyper_.weight_decay, step_, 1.0f, 1.0f, 0,
                            nullptr);
  const math::AdamStep& k = constants.adam;
  const cudaStream_t s = as_stream(stream_);
  if (level_ == AdamWLevel::kLoop) {
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      const AdamWTensor& t = tensors_[i];
      if (t.numel == 0) continue;
      adamw_tensor_kernel<<<blocks_for(t.numel, 4 * kLoopThreads), kLoopThreads, 0, s>>>(t.param, t.grad, m_[i], v_[i],
                                                                                         t.numel, k);
    }
  } else if (chunk_count_ > 0) {
    const auto* table = static_cast<const ForeachTensor*>(tensor_table_.data());
    const auto* chunks = static_cast<const ForeachChunk*>(chunk_table_.data());
    launch_foreach_pass<ForeachPass::kFirstMoment>(table, chunks, chunk_count_, k, s);
    launch_foreach_pass<ForeachPass::kSecondMoment>(table, chunks, chunk_count_, k, s);
    launch_foreach_pass<ForeachPass::kParam>(table, chunks, chunk_count_, k, s);
  }
  NIBBLE_CUDA_CHECK(cudaGetLastError());
}

double AdamWBaseline::bytes_moved_per_param() const {
  return level_ == AdamWLevel::kLoop ? kAdamWFp32BytesPerParam : kForeachBytesPerParam;
}

}  // namespace nibble::bench::cuda
