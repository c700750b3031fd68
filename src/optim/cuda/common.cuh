// The CUDA backend's device-side view of an optimizer: plain tables of tensors, state slots and
// chunks in device memory, the scalars a step reads and writes, and the element loads and stores
// every kernel shares (fp32/bf16/fp16 parameters, fp32/bf16 gradients, fp32/bf16/8-bit/4-bit
// state). The arithmetic itself comes from src/math/, as on the CPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "core/cuda/check.cuh"
#include "math/bf16.hpp"
#include "math/codebook.hpp"
#include "math/rules.hpp"
#include "math/scratch_layout.hpp"
#include "math/state_codec.hpp"
#include "math/step_policy.hpp"
#include "math/step_constants.hpp"
#include "nibble/error.hpp"
#include "nibble/hyper.hpp"

namespace nibble::cuda {

inline constexpr int kThreads = 512;             // threads of an update block
inline constexpr int kTileSide = 32;             // Muon's transposes: 32 x 32 tiles,
inline constexpr int kTileRows = 8;              // moved by 32 x 8 threads
inline constexpr int kPerThread = 8;             // elements per thread per pass (two 128-bit fp32 loads)
inline constexpr int kPass = kThreads * kPerThread;
inline constexpr std::int64_t kChunk = 4 * kPass;  // elements per update block; a multiple of every quant block
inline constexpr std::int64_t kSegment = 1 << 14;  // elements per reduction block
inline constexpr int kMaxSlots = 3;

enum ElementType : std::uint8_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct DSlot {
  void* data = nullptr;  // float, bf16 bits or codes
  float* absmax = nullptr;
  float* row_max = nullptr;
  float* col_max = nullptr;
  float* next_row_max = nullptr;
  float* next_col_max = nullptr;
  math::StateStorage storage = math::StateStorage::kF32;
  std::uint8_t codebook = 0;   // math::CodebookId
  std::uint8_t rank1 = 0;
};

struct DTensor {
  void* param = nullptr;
  void* grad = nullptr;  // null: no gradient, the tensor does not step
  float* master = nullptr;
  float* af_row = nullptr;
  float* af_col = nullptr;
  double* scratch = nullptr;  // AdamP / Adafactor per-row statistics
  std::int64_t numel = 0, rows = 1, cols = 1, batch_rows = 1, offset = 0;
  std::int64_t seg0 = 0;          // first reduction segment of this tensor (AdamP, Adafactor)
  std::int64_t segs_per_row = 0;  // segments per row of its reduction view
  std::int64_t view_rows = 0;     // rows of that view
  std::int64_t colpart0 = 0;      // Adafactor: first column partial sum of this tensor
  std::int64_t col_row_blocks = 0;  // Adafactor: row blocks per batch in the column sums
  float lr = 0.0f, weight_decay = 0.0f;
  int block = 256;
  int slot_count = 0;
  std::uint8_t param_type = kF32, grad_type = kF32, factored = 0;
  DSlot slots[kMaxSlots];
  // Muon, orthogonalised matrices: the momentum update in fp32 (null for the other tensors), the
  // columns of its (shape[0], rest) view, and its lr factor (muon_lr_factor of that view).
  float* muon_update = nullptr;
  std::int64_t muon_cols = 0;
  float muon_factor = 0.0f;
};

// Muon: the orthogonalised matrices of one shape, Newton-Schulz'd together by strided-batched
// GEMMs in bf16 with fp32 accumulation, as torch.optim.Muon runs it. X is the wide orientation of
// each matrix (s x l, s <= l: transposed when tall), scaled by its Frobenius norm.
struct NsBatch {
  std::int64_t rows = 0, cols = 0, s = 0, l = 0;
  int tall = 0;
  int count = 0;
  int* tensors = nullptr;      // [count] tensor indices
  int norm_blocks = 1;         // muon_norm_blocks(rows * cols)
  double* partials = nullptr;  // [count][norm_blocks] the norm's partial sums of squares
  double* norms = nullptr;     // [count] Frobenius norms of the updates
  __nv_bfloat16* x = nullptr;  // [count][s][l]
  __nv_bfloat16* y = nullptr;  // [count][s][l]
  __nv_bfloat16* a = nullptr;  // [count][s][s]
  __nv_bfloat16* b = nullptr;  // [count][s][s]
};

struct DChunk {
  int tensor;
  std::int64_t begin, end;
};

// Adafactor column sums: rows [row_begin, row_end) of one batch, columns col_begin + [0, 256).
struct DColItem {
  int tensor;
  int row_block;  // index of this row block within the tensor
  std::int64_t row_begin, row_end, col_begin;
};
inline constexpr std::int64_t kColumnRows = 256;

// Device-resident scalars of a step (DeviceScalars points into one of these).
struct DScalars {
  float lr_scale;
  float grad_scale;
  int found_inf;
  int skip;  // this step is skipped (found_inf, or gradients not finite)
  double grad_norm;
  long long steps;
  long long skipped;
  float grad_mul;  // 1 / grad_scale times the clip coefficient
};

// Everything a step needs that does not change between steps.
struct StepConfig {
  Algorithm algorithm;
  Hyper hyper;
  float max_grad_norm;
  int check_finite;
  int stochastic_state;  // bf16 state rounded stochastically
  int stochastic_param;  // bf16 parameters rounded stochastically
  std::uint64_t seed;
};

// The device tables of one optimizer, as kernels receive them (by value).
struct Tables {
  DTensor* tensors;
  DChunk* chunks;
  long long chunk_count;
  int tensor_count;
  math::StepConstants* constants;  // one per tensor
  long long* tensor_steps;         // one per tensor
  double* tensor_running;          // two per tensor (TensorState::running)
  DScalars* scalars;
  const math::Codebook* codebooks;  // kCodebookCount
  double* partials;                 // one per chunk or segment
  DChunk* segments;                 // reduction segments (AdamP rows, Adafactor rows)
  long long segment_count;
  double* segment_sums;             // 3 per segment
  DColItem* col_items;
  long long col_item_count;
  double* col_partials;
  int* bad_flag;                    // update_hessian's finiteness check
};

// Shared memory of a class type with default member initializers cannot be declared directly.
#define NIBBLE_SHARED(Type, name)                                \
  __shared__ alignas(16) unsigned char name##_raw[sizeof(Type)]; \
  Type& name = *reinterpret_cast<Type*>(name##_raw)

struct SlotBooks {
  math::Codebook books[kMaxSlots];
};

// ---------------------------------------------------------------------------------------------
// Element access. Element e of a tensor; every index is int64.

__device__ __forceinline__ float to_float(std::uint16_t bits, std::uint8_t type) {
  if (type == kBF16) return math::bf16_to_float(bits);
  return __half2float(__ushort_as_half(bits));
}

__device__ __forceinline__ float load_param(const DTensor& t, std::int64_t e) {
  if (t.master != nullptr) return t.master[e];
  if (t.param_type == kF32) return static_cast<const float*>(t.param)[e];
  return to_float(static_cast<const std::uint16_t*>(t.param)[e], t.param_type);
}

__device__ __forceinline__ float load_grad(const DTensor& t, std::int64_t e) {
  if (t.grad_type == kF32) return static_cast<const float*>(t.grad)[e];
  return to_float(static_cast<const std::uint16_t*>(t.grad)[e], t.grad_type);
}

// Quotient and remainder of a non-negative index by a positive divisor: by 32-bit unsigned
// division where both fit (a few instructions; the 64-bit one is a long emulated sequence, paid per
// element in the loops that call this), else by 64-bit; the same values either way.
struct QuotRem {
  std::int64_t q, r;
};
__device__ __forceinline__ QuotRem quot_rem(std::int64_t e, std::int64_t d) {
  if (((static_cast<std::uint64_t>(e) | static_cast<std::uint64_t>(d)) >> 32) == 0) {
    const std::uint32_t q = static_cast<std::uint32_t>(e) / static_cast<std::uint32_t>(d);
    return {static_cast<std::int64_t>(q), e - static_cast<std::int64_t>(q) * d};
  }
  const std::int64_t q = e / d;
  return {q, e - q * d};
}
__device__ __forceinline__ std::int64_t quot(std::int64_t e, std::int64_t d) { return quot_rem(e, d).q; }

__device__ __forceinline__ std::uint8_t nibble_at(const std::uint8_t* codes, std::int64_t e) {
  return static_cast<std::uint8_t>((codes[e >> 1] >> ((e & 1) * 4)) & 0xfu);
}

// A state value as the CPU backend dequantizes it: code value times the block's (or the
// row/column) scale.
__device__ __forceinline__ float load_state(const DTensor& t, const DSlot& s, const math::Codebook& cb, std::int64_t e) {
  switch (s.storage) {
    case math::StateStorage::kF32: return static_cast<const float*>(s.data)[e];
    case math::StateStorage::kBf16: return math::bf16_to_float(static_cast<const std::uint16_t*>(s.data)[e]);
    case math::StateStorage::kCodes8: return cb.values[static_cast<const std::uint8_t*>(s.data)[e]] * s.absmax[quot(e, t.block)];
    case math::StateStorage::kCodes4: {
      const float v = cb.values[nibble_at(static_cast<const std::uint8_t*>(s.data), e)];
      if (s.rank1) {
        const QuotRem rc = quot_rem(e, t.cols);
        return v * math::min_f(s.row_max[rc.q], s.col_max[rc.r]);
      }
      return v * s.absmax[quot(e, t.block)];
    }
  }
  return 0.0f;
}

// The reduction segment this block sums, with its tensor and the tensor's step constants; t is
// null when there is nothing to sum (the step is skipped, or the tensor has no gradient).
struct SegmentWork {
  DChunk seg;
  const DTensor* t;
  const math::StepConstants* k;
};
__device__ __forceinline__ SegmentWork segment_work(const Tables& tb) {
  if (tb.scalars->skip) return {DChunk{}, nullptr, nullptr};
  const DChunk seg = tb.segments[blockIdx.x];
  const DTensor& t = tb.tensors[seg.tensor];
  return {seg, t.grad == nullptr ? nullptr : &t, &tb.constants[seg.tensor]};
}

// Copies the codebooks a tensor's slots use into shared memory (decode indexes them per thread).
__device__ __forceinline__ void stage_codebooks(const Tables& tb, const DTensor& t, math::Codebook* shared) {
  for (int j = 0; j < t.slot_count; ++j) {
    const math::StateStorage st = t.slots[j].storage;
    if (st != math::StateStorage::kCodes8 && st != math::StateStorage::kCodes4) continue;
    const auto* src = reinterpret_cast<const std::uint32_t*>(&tb.codebooks[t.slots[j].codebook]);
    auto* dst = reinterpret_cast<std::uint32_t*>(&shared[j]);
    for (unsigned w = threadIdx.x; w < sizeof(math::Codebook) / 4; w += blockDim.x) dst[w] = src[w];
  }
  __syncthreads();
}

// Deterministic sum of one double per thread over the block (fixed tree).
template <int kBlock>
__device__ __forceinline__ double block_sum(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kBlock / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  const double total = shared[0];
  __syncthreads();
  return total;
}

// ---------------------------------------------------------------------------------------------
// Launchers (each on the optimizer's stream).

void launch_set_scalars(const Tables& tb, float grad_scale, float lr_scale, int found_inf, cudaStream_t stream);
// The norm pre-pass (when `norm`), then the step's begin: skip decision, counters, constants. A
// non-null `external_total` (device memory) replaces the pre-pass: the step's square sum is its value.
void launch_begin_step(const Tables& tb, const StepConfig& config, bool norm, const double* external_total,
                       cudaStream_t stream);
// The norm pre-pass, then the square sum of the tensors whose `counted` flag (device, one per
// tensor; null: all) is set into the device double *out.
void launch_grad_square_sum(const Tables& tb, const std::uint8_t* counted, double* out, cudaStream_t stream);
void launch_update(const Tables& tb, const StepConfig& config, cudaStream_t stream);
void launch_adamp_prepare(const Tables& tb, const StepConfig& config, cudaStream_t stream);
void launch_adamp_dot(const Tables& tb, cudaStream_t stream);
void launch_adafactor_prepare(const Tables& tb, const StepConfig& config, cudaStream_t stream);
void launch_adafactor_uu(const Tables& tb, const StepConfig& config, cudaStream_t stream);
void launch_rank1_reset(const Tables& tb, const int2* slots, int count, cudaStream_t stream);
void launch_rank1_max(const Tables& tb, const StepConfig& config, cudaStream_t stream);
void launch_rank1_commit(const Tables& tb, const int2* slots, int count, cudaStream_t stream);
void launch_hessian(const Tables& tb, const StepConfig& config, const float* const* estimates, cudaStream_t stream);
void launch_hessian_check(const Tables& tb, const float* const* estimates, cudaStream_t stream);
void launch_master_init(const Tables& tb, cudaStream_t stream);
// p = lerp(p, slot 0, weight) for the tensors that have stepped (schedule-free train and eval).
void launch_interpolate_params(const Tables& tb, float weight, cudaStream_t stream);
// Muon: each matrix's update norm and X = its wide orientation / max(norm, eps) in bf16
// (reduce_kernels.cu); after Newton-Schulz, the step p = p (1 - lr wd) - lr factor X
// (update_kernels.cu). Both do nothing when the step is skipped or a tensor has no gradient.
void launch_muon_load(const Tables& tb, const NsBatch& batch, float eps, cudaStream_t stream);
// `result`: where Newton-Schulz left the orthogonalised X (batch.x or batch.y); a tall batch's is
// transposed back into the other buffer first, so that the apply pass reads it in the parameter's
// layout.
void launch_muon_apply(const Tables& tb, const StepConfig& config, const NsBatch& batch, __nv_bfloat16* result,
                       cudaStream_t stream);

}  // namespace nibble::cuda
