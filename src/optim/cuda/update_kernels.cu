// The CUDA update pass of every optimizer: one launch over the chunk table of all tensors. Each
// thread holds 8 consecutive elements in registers (two 128-bit loads of fp32, one of 16-bit
// values, 8 or 4 bytes of codes); the threads of one quantization block find its new absmax with
// warp shuffles (and shared memory for blocks above 256 elements) and requantize in registers.
// Also here: the dry runs that need the dequantized state (rank-1 scales, AdamP's projection dot
// products, Adafactor's update RMS) and SophiaG's Hessian EMA.
#include <type_traits>

#include "optim/cuda/common.cuh"

namespace nibble::cuda {
namespace {

using math::Codebook;
using math::StepConstants;

// ---------------------------------------------------------------------------------------------
// 8-element loads and stores: a 128-bit fast path when all 8 are in range and aligned, else scalar.

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

__device__ __forceinline__ void load8_f32(const float* src, int n, float* out) {
  if (n == kPerThread && aligned16(src)) {
    const float4 a = reinterpret_cast<const float4*>(src)[0];
    const float4 b = reinterpret_cast<const float4*>(src)[1];
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
    return;
  }
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) out[i] = i < n ? src[i] : 0.0f;
}

__device__ __forceinline__ void store8_f32(float* dst, int n, const float* v) {
  if (n == kPerThread && aligned16(dst)) {
    reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
    return;
  }
#pragma unroll
  for (int i = 0; i < kPerThread; ++i)
    if (i < n) dst[i] = v[i];
}

__device__ __forceinline__ void load8_u16(const std::uint16_t* src, int n, std::uint16_t* out) {
  if (n == kPerThread && aligned16(src)) {
    const uint4 a = *reinterpret_cast<const uint4*>(src);
    const unsigned w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = static_cast<std::uint16_t>(w[i] & 0xffffu);
      out[2 * i + 1] = static_cast<std::uint16_t>(w[i] >> 16);
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) out[i] = i < n ? src[i] : std::uint16_t{0};
}

__device__ __forceinline__ void store8_u16(std::uint16_t* dst, int n, const std::uint16_t* v) {
  if (n == kPerThread && aligned16(dst)) {
    uint4 a;
    a.x = v[0] | (static_cast<unsigned>(v[1]) << 16);
    a.y = v[2] | (static_cast<unsigned>(v[3]) << 16);
    a.z = v[4] | (static_cast<unsigned>(v[5]) << 16);
    a.w = v[6] | (static_cast<unsigned>(v[7]) << 16);
    *reinterpret_cast<uint4*>(dst) = a;
    return;
  }
#pragma unroll
  for (int i = 0; i < kPerThread; ++i)
    if (i < n) dst[i] = v[i];
}

__device__ __forceinline__ void load8_param(const DTensor& t, std::int64_t e0, int n, float* out) {
  if (t.master != nullptr) return load8_f32(t.master + e0, n, out);
  if (t.param_type == kF32) return load8_f32(static_cast<const float*>(t.param) + e0, n, out);
  std::uint16_t h[kPerThread];
  load8_u16(static_cast<const std::uint16_t*>(t.param) + e0, n, h);
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) out[i] = to_float(h[i], t.param_type);
}

__device__ __forceinline__ void load8_grad(const DTensor& t, std::int64_t e0, int n, float* out) {
  if (t.grad_type == kF32) return load8_f32(static_cast<const float*>(t.grad) + e0, n, out);
  std::uint16_t h[kPerThread];
  load8_u16(static_cast<const std::uint16_t*>(t.grad) + e0, n, h);
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) out[i] = to_float(h[i], t.grad_type);
}

// The stepped parameter: into the master copy and/or the parameter itself, rounded to its dtype.
__device__ __forceinline__ void store8_param(const DTensor& t, const StepConfig& cfg, const StepConstants& k,
                                             std::int64_t e0, int n, const float* p) {
  if (t.master != nullptr) store8_f32(t.master + e0, n, p);
  if (t.param_type == kF32) return store8_f32(static_cast<float*>(t.param) + e0, n, p);
  std::uint16_t h[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    if (t.param_type == kF16) {
      h[i] = __half_as_ushort(__float2half_rn(p[i]));
    } else if (cfg.stochastic_param) {
      // A stream of random bits apart from the state's (which use slot indices 0..2).
      const std::uint64_t counter = static_cast<std::uint64_t>(t.offset + e0 + i) * kMaxSlots;
      h[i] = math::bf16_round_stochastic(p[i], math::hash_u32(~k.rounding_seed, counter));
    } else {
      h[i] = math::bf16_round_nearest(p[i]);
    }
  }
  store8_u16(static_cast<std::uint16_t*>(t.param) + e0, n, h);
}

__device__ __forceinline__ void load8_state(const DTensor& t, const DSlot& s, const Codebook& cb, std::int64_t e0, int n,
                                            float* out) {
  switch (s.storage) {
    case math::StateStorage::kF32:
      return load8_f32(static_cast<const float*>(s.data) + e0, n, out);
    case math::StateStorage::kBf16: {
      std::uint16_t h[kPerThread];
      load8_u16(static_cast<const std::uint16_t*>(s.data) + e0, n, h);
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) out[i] = math::bf16_to_float(h[i]);
      return;
    }
    case math::StateStorage::kCodes8: {
      const auto* codes = static_cast<const std::uint8_t*>(s.data) + e0;
      std::uint8_t c[kPerThread];
      if (n == kPerThread) {
        const uint2 w = *reinterpret_cast<const uint2*>(codes);  // e0 % 8 == 0 and the arena is 64-byte aligned
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          c[i] = static_cast<std::uint8_t>(w.x >> (8 * i));
          c[4 + i] = static_cast<std::uint8_t>(w.y >> (8 * i));
        }
      } else {
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) c[i] = i < n ? codes[i] : std::uint8_t{0};
      }
      // Threads past the tensor's end read no scale: their block index is beyond the array.
      const float scale = n > 0 ? s.absmax[e0 / t.block] : 0.0f;
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) out[i] = i < n ? cb.values[c[i]] * scale : 0.0f;
      return;
    }
    case math::StateStorage::kCodes4: {
      if (s.rank1) {
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) out[i] = i < n ? load_state(t, s, cb, e0 + i) : 0.0f;
        return;
      }
      const auto* codes = static_cast<const std::uint8_t*>(s.data) + e0 / 2;
      unsigned w = 0;
      if (n == kPerThread) {
        w = *reinterpret_cast<const unsigned*>(codes);
      } else {
        for (int i = 0; i < (n + 1) / 2; ++i) w |= static_cast<unsigned>(codes[i]) << (8 * i);
      }
      const float scale = n > 0 ? s.absmax[e0 / t.block] : 0.0f;
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) out[i] = i < n ? cb.values[(w >> (4 * i)) & 0xfu] * scale : 0.0f;
      return;
    }
  }
}

// Maximum over the `group` threads of one quantization block (a power of two, 2..kThreads).
// Every thread of the block calls it, in step; absmax is taken on the magnitude bits, as the CPU
// backend does (for non-negative floats the integer order is the float order).
__device__ __forceinline__ unsigned group_max(unsigned v, int group, unsigned* warp_buffer) {
  const int width = group < 32 ? group : 32;
  for (int offset = width / 2; offset > 0; offset >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  if (group <= 32) return v;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_buffer[warp] = v;
  __syncthreads();
  const int warps = group / 32, first = (warp / warps) * warps;
  unsigned m = 0;
  for (int w = first; w < first + warps; ++w) m = max(m, warp_buffer[w]);
  __syncthreads();
  return m;
}

__device__ __forceinline__ void store8_state(const DTensor& t, const DSlot& s, const Codebook& cb, const StepConfig& cfg,
                                             std::uint64_t seed, int slot, std::int64_t e0, int n, const float* x,
                                             unsigned* warp_buffer) {
  switch (s.storage) {
    case math::StateStorage::kF32:
      return store8_f32(static_cast<float*>(s.data) + e0, n, x);
    case math::StateStorage::kBf16: {
      std::uint16_t h[kPerThread];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        if (cfg.stochastic_state) {
          const std::uint64_t counter = static_cast<std::uint64_t>(t.offset + e0 + i) * kMaxSlots + slot;
          h[i] = math::bf16_round_stochastic(x[i], math::hash_u32(seed, counter));
        } else {
          h[i] = math::bf16_round_nearest(x[i]);
        }
      }
      return store8_u16(static_cast<std::uint16_t*>(s.data) + e0, n, h);
    }
    case math::StateStorage::kCodes8:
    case math::StateStorage::kCodes4: {
      const bool four = s.storage == math::StateStorage::kCodes4;
      std::uint8_t c[kPerThread];
      if (four && s.rank1) {
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
          const std::int64_t e = e0 + i;
          const QuotRem rc = quot_rem(i < n ? e : 0, t.cols);
          const float scale = i < n ? math::min_f(s.next_row_max[rc.q], s.next_col_max[rc.r]) : 0.0f;
          c[i] = i < n ? math::codebook_encode(cb, scale > 0.0f ? x[i] / scale : 0.0f) : std::uint8_t{0};
        }
      } else {
        unsigned bits = 0;
#pragma unroll
        for (int i = 0; i < kPerThread; ++i)
          if (i < n) bits = max(bits, math::float_bits(x[i]) & 0x7fffffffu);
        const float absmax = math::bits_float(group_max(bits, t.block / kPerThread, warp_buffer));
        const float inv = math::block_inverse(absmax);
        if (e0 % t.block == 0 && n > 0) s.absmax[e0 / t.block] = absmax;
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) c[i] = i < n ? math::codebook_encode(cb, x[i] * inv) : std::uint8_t{0};
      }
      auto* codes = static_cast<std::uint8_t*>(s.data);
      if (!four) {
        if (n == kPerThread) {
          uint2 w;
          w.x = c[0] | (c[1] << 8) | (c[2] << 16) | (static_cast<unsigned>(c[3]) << 24);
          w.y = c[4] | (c[5] << 8) | (c[6] << 16) | (static_cast<unsigned>(c[7]) << 24);
          *reinterpret_cast<uint2*>(codes + e0) = w;
        } else {
          for (int i = 0; i < n; ++i) codes[e0 + i] = c[i];
        }
      } else {
        unsigned w = 0;
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) w |= static_cast<unsigned>(c[i]) << (4 * i);
        if (n == kPerThread) {
          *reinterpret_cast<unsigned*>(codes + e0 / 2) = w;
        } else {
          for (int i = 0; i < (n + 1) / 2; ++i) codes[e0 / 2 + i] = static_cast<std::uint8_t>(w >> (8 * i));
        }
      }
      return;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// One element of one algorithm: the same calls, in the same order, as the CPU driver's BlockRule.

template <class R>
inline constexpr bool kNoRuleFor = false;

template <class R, bool kVariant>
__device__ __forceinline__ void apply_rule(float& p, float g, float& s0, float& s1, float& s2, const StepConstants& k,
                                           const DTensor& t, std::int64_t e) {
  if constexpr (R::kElementwise) {
    R::template update<kVariant>(p, g, s0, s1, s2, R::constants(k));
  } else if constexpr (std::is_same_v<R, math::AdamPRule>) {
    const float perturb = math::adamp_perturb(g, s0, s1, k.adamp);
    if (k.adamp_view == 0) {
      math::adamp_apply(p, perturb, 0.0f, 0.0f, k.adamp_decay, k.adamp.step_size);
    } else {
      const std::int64_t rows0 = t.view_rows;
      const std::int64_t r = k.adamp_view == 1 ? quot(e, quot(t.numel, rows0)) : 0;
      const math::AdamPScratch at{rows0};
      const double* inv_norm = t.scratch + at.inv_norm();
      const double* dot = t.scratch + at.dot();
      math::adamp_apply(p, perturb, static_cast<float>(inv_norm[r]), static_cast<float>(dot[r]), k.adamp_decay,
                        k.adamp.step_size);
    }
  } else if constexpr (std::is_same_v<R, math::AdafactorRule>) {
    if (t.factored) {
      const std::int64_t rows = t.rows, cols = t.cols, batches = quot(rows, t.batch_rows);
      const math::AdafactorScratch at{rows, cols, batches};
      const double* r_factor = t.scratch + at.r_factor();
      const double* c_factor = t.scratch + at.c_factor();
      const QuotRem rc = quot_rem(e, cols);
      const std::int64_t r = rc.q, c = rc.r;
      const float u = math::adafactor_factored(g, static_cast<float>(r_factor[r]),
                                               static_cast<float>(c_factor[quot(r, t.batch_rows) * cols + c]), k.adafactor);
      math::adafactor_apply<kVariant>(p, u, s0, k.adafactor);
    } else {
      const float u = math::adafactor_unfactored(g, s0, k.adafactor);
      math::adafactor_apply<kVariant>(p, u, s1, k.adafactor);
    }
  } else if constexpr (std::is_same_v<R, math::MuonRule>) {
    // Orthogonalised matrices keep their update for Newton-Schulz; the rest is AdamW's.
    if (t.muon_update != nullptr) t.muon_update[e] = math::muon_momentum(g, s0, k.muon);
    else math::adam_update<false>(p, g, s0, s1, s2, k.adam);
  } else {
    static_assert(kNoRuleFor<R>, "apply_rule: a rule that is neither element-wise nor AdamP, Adafactor or Muon");
  }
}

struct BlockShared {
  Codebook codebooks[kMaxSlots];
  DTensor tensor;
  StepConstants constants;
  unsigned warp_buffer[kThreads / 32];
};

__device__ __forceinline__ bool load_chunk_tensor(const Tables& tb, int index, BlockShared& sh) {
  if (threadIdx.x == 0) {
    sh.tensor = tb.tensors[index];
    sh.constants = tb.constants[index];
  }
  __syncthreads();
  if (sh.tensor.grad == nullptr) return false;
  stage_codebooks(tb, sh.tensor, sh.codebooks);
  return true;
}

// ---------------------------------------------------------------------------------------------
// The update pass.

template <class R, bool kVariant>
__global__ void __launch_bounds__(kThreads) update_kernel(Tables tb, StepConfig cfg) {
  NIBBLE_SHARED(BlockShared, sh);
  if (tb.scalars->skip) return;
  const DChunk ch = tb.chunks[blockIdx.x];
  if (!load_chunk_tensor(tb, ch.tensor, sh)) return;
  const DTensor& t = sh.tensor;
  const StepConstants& k = sh.constants;
  const int stored_slots = R::kWrittenSlots < t.slot_count ? R::kWrittenSlots : t.slot_count;
  for (std::int64_t base = ch.begin; base < ch.end; base += kPass) {
    const std::int64_t e0 = base + static_cast<std::int64_t>(threadIdx.x) * kPerThread;
    const std::int64_t left = ch.end - e0;
    const int n = left <= 0 ? 0 : (left >= kPerThread ? kPerThread : static_cast<int>(left));
    float p[kPerThread], g[kPerThread], s[kMaxSlots][kPerThread];
    // Muon's orthogonalised matrices do not read p here (muon_apply_kernel steps it).
    if (t.muon_update == nullptr) {
      load8_param(t, e0, n, p);
    } else {
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) p[i] = 0.0f;
    }
    load8_grad(t, e0, n, g);
#pragma unroll
    for (int j = 0; j < kMaxSlots; ++j) {
      if (j < t.slot_count) {
        load8_state(t, t.slots[j], sh.codebooks[j], e0, n, s[j]);
      } else {
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) s[j][i] = 0.0f;
      }
    }
#pragma unroll
    for (int i = 0; i < kPerThread; ++i)
      if (i < n) apply_rule<R, kVariant>(p[i], g[i], s[0][i], s[1][i], s[2][i], k, t, e0 + i);
    if (n > 0 && t.muon_update == nullptr) store8_param(t, cfg, k, e0, n, p);
    // Unrolled with a uniform condition, so that s stays in registers.
#pragma unroll
    for (int j = 0; j < kMaxSlots; ++j)
      if (j < stored_slots)
        store8_state(t, t.slots[j], sh.codebooks[j], cfg, k.rounding_seed, j, e0, n, s[j], sh.warp_buffer);
  }
}

// Muon, tall batches: X (s x l, s = cols) of every matrix transposed back into `out` (l x s, the
// parameter's layout), tile by tile through shared memory (see muon_load_tall_kernel).
// blockIdx.x: the tile of X, blockIdx.y: the matrix; 32 x 8 threads.
__global__ void __launch_bounds__(kTileSide * kTileRows) muon_untranspose_kernel(Tables tb, NsBatch batch,
                                                                                const __nv_bfloat16* x,
                                                                                __nv_bfloat16* out) {
  __shared__ __nv_bfloat16 tile[kTileSide][kTileSide + 1];
  if (tb.scalars->skip) return;
  const std::int64_t s = batch.s, l = batch.l, per = s * l;
  const std::int64_t col_tiles = (l + kTileSide - 1) / kTileSide;
  const std::int64_t row0 = static_cast<std::int64_t>(blockIdx.x) / col_tiles * kTileSide;
  const std::int64_t col0 = static_cast<std::int64_t>(blockIdx.x) % col_tiles * kTileSide;
  const __nv_bfloat16* in = x + static_cast<std::int64_t>(blockIdx.y) * per;
  __nv_bfloat16* o = out + static_cast<std::int64_t>(blockIdx.y) * per;
  for (int k = threadIdx.y; k < kTileSide; k += kTileRows) {
    const std::int64_t r = row0 + k, c = col0 + threadIdx.x;
    if (r < s && c < l) tile[k][threadIdx.x] = in[r * l + c];
  }
  __syncthreads();
  for (int k = threadIdx.y; k < kTileSide; k += kTileRows) {
    const std::int64_t r = col0 + k, c = row0 + threadIdx.x;  // out's row is X's column
    if (r < l && c < s) o[r * s + c] = tile[threadIdx.x][k];
  }
}

// Muon: the orthogonalised update O of each matrix of a batch steps its parameter,
// p = p decay - lr factor O, O in the parameter's layout (`o`: count matrices of rows x cols).
// blockIdx.y: the matrix.
__global__ void __launch_bounds__(kThreads) muon_apply_kernel(Tables tb, StepConfig cfg, NsBatch batch,
                                                              const __nv_bfloat16* o_all) {
  if (tb.scalars->skip) return;
  const int index = batch.tensors[blockIdx.y];
  const DTensor& t = tb.tensors[index];
  if (t.grad == nullptr) return;
  const StepConstants& k = tb.constants[index];
  const float decay = k.muon.decay, step = k.muon.lr * t.muon_factor;
  const __nv_bfloat16* o = o_all + static_cast<std::int64_t>(blockIdx.y) * batch.s * batch.l;
  for (std::int64_t base = static_cast<std::int64_t>(blockIdx.x) * kPass; base < t.numel;
       base += static_cast<std::int64_t>(gridDim.x) * kPass) {
    const std::int64_t e0 = base + static_cast<std::int64_t>(threadIdx.x) * kPerThread;
    const std::int64_t left = t.numel - e0;
    const int n = left <= 0 ? 0 : (left >= kPerThread ? kPerThread : static_cast<int>(left));
    if (n == 0) continue;
    float p[kPerThread];
    load8_param(t, e0, n, p);
#pragma unroll
    for (int i = 0; i < kPerThread; ++i)
      if (i < n) math::muon_apply(p[i], __bfloat162float(o[e0 + i]), decay, step);
    store8_param(t, cfg, k, e0, n, p);
  }
}

// Rank-1 4-bit second moments: a dry run of the update finds each row's and column's maximum of
// the new state; the update pass then quantizes with them.
template <class R, bool kVariant>
__global__ void __launch_bounds__(kThreads) rank1_max_kernel(Tables tb) {
  NIBBLE_SHARED(BlockShared, sh);
  if (tb.scalars->skip) return;
  const DChunk ch = tb.chunks[blockIdx.x];
  if (!load_chunk_tensor(tb, ch.tensor, sh)) return;
  const DTensor& t = sh.tensor;
  bool any = false;
  for (int j = 0; j < t.slot_count; ++j) any = any || t.slots[j].rank1;
  if (!any) return;
  // Every thread of the block takes the same number of rounds, so that whole warps reach the
  // shuffles below; a lane past the chunk's end adds 0, which changes no maximum.
  const unsigned lane = threadIdx.x % 32;
  for (std::int64_t base = ch.begin; base < ch.end; base += kThreads) {
    const std::int64_t e = base + threadIdx.x;
    const bool valid = e < ch.end;
    float s[kMaxSlots] = {0.0f, 0.0f, 0.0f};
    if (valid) {
      float p = load_param(t, e);
      for (int j = 0; j < t.slot_count; ++j) s[j] = load_state(t, t.slots[j], sh.codebooks[j], e);
      apply_rule<R, kVariant>(p, load_grad(t, e), s[0], s[1], s[2], sh.constants, t, e);
    }
    const QuotRem rc = quot_rem(valid ? e : 0, t.cols);
    const std::int64_t row = valid ? rc.q : -1;
    const std::int64_t col = rc.r;
    for (int j = 0; j < t.slot_count; ++j) {
      const DSlot& slot = t.slots[j];
      if (!slot.rank1) continue;
      unsigned bits = valid ? math::float_bits(s[j]) & 0x7fffffffu : 0u;
      if (valid) atomicMax(reinterpret_cast<unsigned*>(slot.next_col_max) + col, bits);
      // The row maximum: a warp's consecutive elements share one or two rows, and one atomic per
      // run of a row replaces one per element (all 32 on one address, served one after another).
      // A segmented reduction towards each run's first lane: lanes of a row are contiguous, so
      // after offsets 1..16 that lane holds its run's maximum (max is exact in any order).
      for (unsigned offset = 1; offset < 32; offset *= 2) {
        const unsigned other = __shfl_down_sync(0xffffffffu, bits, offset);
        const std::int64_t other_row = __shfl_down_sync(0xffffffffu, row, offset);
        if (lane + offset < 32 && other_row == row) bits = max(bits, other);
      }
      const std::int64_t previous_row = __shfl_up_sync(0xffffffffu, row, 1);
      if (valid && (lane == 0 || previous_row != row))
        atomicMax(reinterpret_cast<unsigned*>(slot.next_row_max) + row, bits);
    }
  }
}

// One reduction segment per block: the element range of a row of a tensor's reduction view.
template <class Fn>
__device__ __forceinline__ double segment_sum(const DChunk& seg, Fn&& fn, double* shared) {
  double acc = 0.0;
  for (std::int64_t e = seg.begin + threadIdx.x; e < seg.end; e += 256) acc += fn(e);
  return block_sum<256>(acc, shared);
}

// AdamP: per segment, sum of (p * inv_norm) * perturbation, the perturbation computed from the
// state without writing it.
template <bool kUnused>
__global__ void __launch_bounds__(256) adamp_dot_kernel(Tables tb) {
  __shared__ double red[256];
  NIBBLE_SHARED(SlotBooks, slot_books);
  Codebook* books = slot_books.books;
  const SegmentWork work = segment_work(tb);
  if (work.t == nullptr || work.k->adamp_view == 0) return;
  const DChunk seg = work.seg;
  const DTensor& t = *work.t;
  const StepConstants& k = *work.k;
  stage_codebooks(tb, t, books);
  const std::int64_t row = (blockIdx.x - t.seg0) / t.segs_per_row;
  const double* inv_norm = t.scratch + math::AdamPScratch{t.view_rows}.inv_norm();
  const float inv = static_cast<float>(inv_norm[k.adamp_view == 1 ? row : 0]);
  const double sum = segment_sum(
      seg,
      [&](std::int64_t e) {
        float m = load_state(t, t.slots[0], books[0], e), v = load_state(t, t.slots[1], books[1], e);
        const float perturb = math::adamp_perturb(load_grad(t, e), m, v, k.adamp);
        return static_cast<double>(load_param(t, e) * inv) * perturb;
      },
      red);
  if (threadIdx.x == 0) tb.segment_sums[3 * blockIdx.x] = sum;
}

// Adafactor: per segment, the sum of squares of the unscaled update (its RMS clips the step).
template <bool kFirstMoment>
__global__ void __launch_bounds__(256) adafactor_uu_kernel(Tables tb) {
  __shared__ double red[256];
  NIBBLE_SHARED(SlotBooks, slot_books);
  Codebook* books = slot_books.books;
  const SegmentWork work = segment_work(tb);
  if (work.t == nullptr) return;
  const DChunk seg = work.seg;
  const DTensor& t = *work.t;
  const StepConstants& k = *work.k;
  stage_codebooks(tb, t, books);
  double sum;
  if (t.factored) {
    const std::int64_t rows = t.rows, cols = t.cols, batches = rows / t.batch_rows;
    const math::AdafactorScratch at{rows, cols, batches};
    const double* r_factor = t.scratch + at.r_factor();
    const double* c_factor = t.scratch + at.c_factor();
    sum = segment_sum(
        seg,
        [&](std::int64_t e) {
          const QuotRem rc = quot_rem(e, cols);
          const std::int64_t r = rc.q, c = rc.r;
          const float u = math::adafactor_factored(load_grad(t, e), static_cast<float>(r_factor[r]),
                                                   static_cast<float>(c_factor[quot(r, t.batch_rows) * cols + c]),
                                                   k.adafactor);
          return static_cast<double>(u) * u;
        },
        red);
  } else {
    sum = segment_sum(
        seg,
        [&](std::int64_t e) {
          float v = load_state(t, t.slots[0], books[0], e);
          const float u = math::adafactor_unfactored(load_grad(t, e), v, k.adafactor);
          return static_cast<double>(u) * u;
        },
        red);
  }
  if (threadIdx.x == 0) tb.segment_sums[3 * blockIdx.x + 2] = sum;
}

// SophiaG: h = beta2 h + (1 - beta2) estimate, requantized like the update pass does.
__global__ void __launch_bounds__(kThreads) hessian_kernel(Tables tb, StepConfig cfg, const float* const* estimates) {
  NIBBLE_SHARED(BlockShared, sh);
  const DChunk ch = tb.chunks[blockIdx.x];
  const float* est = estimates[ch.tensor];
  if (est == nullptr) return;
  if (threadIdx.x == 0) sh.tensor = tb.tensors[ch.tensor];
  __syncthreads();
  const DTensor& t = sh.tensor;
  stage_codebooks(tb, t, sh.codebooks);
  const math::SophiaHessianStep k{cfg.hyper.beta2, 1.0f - cfg.hyper.beta2};
  const std::uint64_t seed = math::rounding_seed(cfg.seed, tb.tensor_steps[ch.tensor]) ^ 0x5f3759dfull;
  for (std::int64_t base = ch.begin; base < ch.end; base += kPass) {
    const std::int64_t e0 = base + static_cast<std::int64_t>(threadIdx.x) * kPerThread;
    const std::int64_t left = ch.end - e0;
    const int n = left <= 0 ? 0 : (left >= kPerThread ? kPerThread : static_cast<int>(left));
    float h[kPerThread], x[kPerThread];
    load8_state(t, t.slots[1], sh.codebooks[1], e0, n, h);
    load8_f32(est + (n > 0 ? e0 : 0), n, x);
#pragma unroll
    for (int i = 0; i < kPerThread; ++i)
      if (i < n) math::sophia_hessian_update(h[i], x[i], k);
    store8_state(t, t.slots[1], sh.codebooks[1], cfg, seed, 1, e0, n, h, sh.warp_buffer);
  }
}

__global__ void hessian_check_kernel(Tables tb, const float* const* estimates) {
  const DChunk ch = tb.chunks[blockIdx.x];
  const float* est = estimates[ch.tensor];
  if (est == nullptr) return;
  for (std::int64_t e = ch.begin + threadIdx.x; e < ch.end; e += blockDim.x)
    if (!math::is_finite_bits(math::float_bits(est[e]))) atomicMin(tb.bad_flag, ch.tensor);
}

// Schedule-free AdamW's train() and eval(): p = lerp(p, z, weight), z being slot 0 (always fp32),
// into the master copy and the parameter, rounded to its dtype to nearest: the mode switch is no
// step, so a bf16 parameter takes no stochastic rounding even when steps use it (with a master
// copy, which keeps the exact value, the next step rounds from there).
__global__ void __launch_bounds__(kThreads) interpolate_params_kernel(Tables tb, float weight) {
  const DChunk ch = tb.chunks[blockIdx.x];
  if (tb.tensor_steps[ch.tensor] == 0) return;
  const DTensor& t = tb.tensors[ch.tensor];
  const float* z = static_cast<const float*>(t.slots[0].data);
  for (std::int64_t e = ch.begin + threadIdx.x; e < ch.end; e += kThreads) {
    const float p = math::lerp_f(load_param(t, e), z[e], weight);
    if (t.master != nullptr) t.master[e] = p;
    if (t.param_type == kF32) static_cast<float*>(t.param)[e] = p;
    else if (t.param_type == kF16) static_cast<std::uint16_t*>(t.param)[e] = __half_as_ushort(__float2half_rn(p));
    else static_cast<std::uint16_t*>(t.param)[e] = math::bf16_round_nearest(p);
  }
}

template <class R, bool kVariant>
void launch_update_for(const Tables& tb, const StepConfig& cfg, cudaStream_t stream) {
  update_kernel<R, kVariant><<<static_cast<unsigned>(tb.chunk_count), kThreads, 0, stream>>>(tb, cfg);
}

template <class R, bool kVariant>
void launch_rank1_for(const Tables& tb, cudaStream_t stream) {
  rank1_max_kernel<R, kVariant><<<static_cast<unsigned>(tb.chunk_count), kThreads, 0, stream>>>(tb);
}

}  // namespace

void launch_update(const Tables& tb, const StepConfig& config, cudaStream_t stream) {
  if (tb.chunk_count == 0) return;
  math::visit_rule(math::Rules{}, config.algorithm, config.hyper,
                   [&]<class R, bool kVariant>() { launch_update_for<R, kVariant>(tb, config, stream); });
  NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void launch_rank1_max(const Tables& tb, const StepConfig& config, cudaStream_t stream) {
  if (tb.chunk_count == 0) return;
  math::visit_rule(math::Rules{}, config.algorithm, config.hyper,
                   [&]<class R, bool kVariant>() { launch_rank1_for<R, kVariant>(tb, stream); });
  NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void launch_muon_apply(const Tables& tb, const StepConfig& config, const NsBatch& batch, __nv_bfloat16* result,
                       cudaStream_t stream) {
  if (batch.count == 0) return;
  const auto count = static_cast<unsigned>(batch.count);
  const __nv_bfloat16* o = result;
  if (batch.tall) {
    __nv_bfloat16* other = result == batch.x ? batch.y : batch.x;  // free once Newton-Schulz is done
    const std::int64_t tiles = ((batch.s + kTileSide - 1) / kTileSide) * ((batch.l + kTileSide - 1) / kTileSide);
    muon_untranspose_kernel<<<dim3(static_cast<unsigned>(tiles), count), dim3(kTileSide, kTileRows), 0, stream>>>(
        tb, batch, result, other);
    NIBBLE_CUDA_CHECK(cudaGetLastError());
    o = other;
  }
  const std::int64_t numel = batch.rows * batch.cols;
  const auto blocks = static_cast<unsigned>(std::min<std::int64_t>((numel + kPass - 1) / kPass, 1024));
  muon_apply_kernel<<<dim3(blocks, count), kThreads, 0, stream>>>(tb, config, batch, o);
  NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void launch_adamp_dot(const Tables& tb, cudaStream_t stream) {
  if (tb.segment_count == 0) return;
  adamp_dot_kernel<false><<<static_cast<unsigned>(tb.segment_count), 256, 0, stream>>>(tb);
  NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void launch_adafactor_uu(const Tables& tb, const StepConfig& config, cudaStream_t stream) {
  if (tb.segment_count == 0) return;
  if (config.hyper.first_moment)
    adafactor_uu_kernel<true><<<static_cast<unsigned>(tb.segment_count), 256, 0, stream>>>(tb);
  else
    adafactor_uu_kernel<false><<<static_cast<unsigned>(tb.segment_count), 256, 0, stream>>>(tb);
  NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void launch_hessian(const Tables& tb, const StepConfig& config, const float* const* estimates, cudaStream_t stream) {
  if (tb.chunk_count == 0) return;
  hessian_kernel<<<static_cast<unsigned>(tb.chunk_count), kThreads, 0, stream>>>(tb, config, estimates);
  NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void launch_interpolate_params(const Tables& tb, float weight, cudaStream_t stream) {
  if (tb.chunk_count == 0) return;
  interpolate_params_kernel<<<static_cast<unsigned>(tb.chunk_count), kThreads, 0, stream>>>(tb, weight);
  NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void launch_hessian_check(const Tables& tb, const float* const* estimates, cudaStream_t stream) {
  if (tb.chunk_count == 0) return;
  hessian_check_kernel<<<static_cast<unsigned>(tb.chunk_count), 256, 0, stream>>>(tb, estimates);
  NIBBLE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace nibble::cuda
