// Causal multi-head self-attention on CUDA, FlashAttention-2 style (Dao, 2023, "FlashAttention-2:
// Faster Attention with Better Parallelism and Work Partitioning"): q, k, v tiles in shared memory,
// online softmax, no T x T matrix in device memory. fp32 runs on CUDA cores in fp32; bf16 runs on
// tensor cores (mma.sync, fp32 accumulation). The backward recomputes the probabilities from lse and
// is deterministic: dK/dV and dQ are two passes in which one block owns each output tile.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "core/cuda/check.cuh"
#include "model/cuda/convert.cuh"
#include "model/cuda/ops.cuh"
#include "nibble/error.hpp"

namespace nibble::model::cuda {
namespace {

// The head dimensions the kernels are compiled for; attention_supports_head_dim and the launchers'
// dispatch both read this list.
template <int... Ds>
struct HeadDimList {};
using SupportedHeadDims = HeadDimList<32, 64, 128>;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------
// CUDA-core kernels: fp32 (and bf16 when kBf16OnTensorCores below is false), fp32 arithmetic.
//
// NOTE: one thread mapping serves every tile product below. A block owns kRows rows (queries in the
// forward and the dQ pass, keys in the dK/dV pass) and streams tiles of kCols rows of the other
// side. Thread (ty, tx) = (tid / 16, tid % 16) owns rows 4 ty .. 4 ty + 3: of a kRows x kCols score
// tile it holds columns tx + 16 j, and of a kRows x HD accumulator it holds channels
// g * 16 kVec + tx kVec + v. The 16 lanes that share rows are one half-warp, so row maxima and
// sums are butterfly shuffles over lane bits 0..3, and the softmax statistics of a row live in the
// registers of the threads that own its accumulator. Shared rows are padded by 4 floats: rows stay
// 16-byte aligned for float4 access, and 8 consecutive rows start in 8 different 4-bank groups.
constexpr int kRowsPerThread = 4;
constexpr int kLanesPerRow = 16;
constexpr int kPad = 4;
constexpr int kBlockRows = 64;  // rows a block owns, in every kernel

template <int HD>
struct Tiles {
  static_assert(HD % 32 == 0, "head dims are multiples of 32 (padding and vector widths assume it)");
  static constexpr int kRows = kBlockRows;
  static constexpr int kCols = HD <= 64 ? 64 : 32;  // keeps two blocks of every kernel per SM at HD 128
  static constexpr int kThreads = kRows / kRowsPerThread * kLanesPerRow;
  static constexpr int kStride = HD + kPad;          // floats per shared row of a q/k/v/dout tile
  static constexpr int kScoreStride = kCols + kPad;  // floats per shared row of a score tile
  static constexpr int kColsPerThread = kCols / kLanesPerRow;
  static constexpr int kChans = HD / kLanesPerRow;  // accumulator channels per thread and row
  static constexpr int kVec = kChans % 4 == 0 ? 4 : 2;
  static constexpr int kGroups = kChans / kVec;

  // Dynamic shared memory of each kernel, in floats (the kernels carve it in this order).
  static constexpr int kForwardFloats = kRows * kStride + 2 * kCols * kStride + kRows * kScoreStride;
  static constexpr int kDqFloats = 2 * kRows * kStride + 2 * kCols * kStride + kRows * kScoreStride;
  static constexpr int kDkvFloats = 2 * kRows * kStride + 2 * kCols * kStride + kRows * kScoreStride + 2 * kCols;
};

// Tile counts go in gridDim.y (at most 65535); (batch, head) pairs go in gridDim.x.
constexpr std::int64_t kMaxGridY = 65535;

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// 16 bytes of T as floats.
template <class T>
__device__ __forceinline__ void unpack16(const uint4& raw, float* out) {
  if constexpr (std::is_same_v<T, float>) {
    out[0] = __uint_as_float(raw.x);
    out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z);
    out[3] = __uint_as_float(raw.w);
  } else {
    const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {  // the lower half of each word is the element at the lower address
      out[2 * k] = __uint_as_float(words[k] << 16);
      out[2 * k + 1] = __uint_as_float(words[k] & 0xffff0000u);
    }
  }
}

// dst[r][0, HD) = src row r as floats for r < valid, zeros for valid <= r < ROWS (so that padded
// rows contribute exact zeros, never stale shared memory). Source rows are row_stride elements
// apart. Row starts are 16-byte aligned whenever src is (HD and the strides are multiples of 32
// elements), so one test of src picks the 128-bit path for the whole tile.
template <class T, int HD, int ROWS, int THREADS>
__device__ __forceinline__ void load_rows(float* dst, const T* src, std::int64_t row_stride, int valid) {
  constexpr int kStride = HD + kPad;
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load
  constexpr int kChunks = HD / kPer;
  const bool vector = aligned16(src);
  for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += THREADS) {
    const int r = idx / kChunks, c = (idx % kChunks) * kPer;
    float v[kPer];
    if (r < valid) {
      const T* p = src + r * row_stride + c;
      if (vector) {
        unpack16<T>(*reinterpret_cast<const uint4*>(p), v);
      } else {
#pragma unroll
        for (int e = 0; e < kPer; ++e) v[e] = to_float(p[e]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < kPer; ++e) v[e] = 0.0f;
    }
    float* d = dst + r * kStride + c;
#pragma unroll
    for (int e = 0; e < kPer; e += 4)
      *reinterpret_cast<float4*>(d + e) = make_float4(v[e], v[e + 1], v[e + 2], v[e + 3]);
  }
}

// acc[i][j] = a[i] . b[16 j] over HD, for the 4 rows of `a` (rows of a shared tile, starting at the
// thread's first row) and the columns tx + 16 j of `b` (rows of the other tile, starting at row tx).
template <int HD, int NJ>
__device__ __forceinline__ void dot_rows(float (&acc)[kRowsPerThread][NJ], const float* a, const float* b) {
  constexpr int kStride = HD + kPad;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
    for (int j = 0; j < NJ; ++j) acc[i][j] = 0.0f;
#pragma unroll 1
  for (int d = 0; d < HD; d += 4) {
    float4 av[kRowsPerThread], bv[NJ];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) av[i] = *reinterpret_cast<const float4*>(a + i * kStride + d);
#pragma unroll
    for (int j = 0; j < NJ; ++j) bv[j] = *reinterpret_cast<const float4*>(b + j * kLanesPerRow * kStride + d);
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        acc[i][j] = fmaf(av[i].x, bv[j].x, acc[i][j]);
        acc[i][j] = fmaf(av[i].y, bv[j].y, acc[i][j]);
        acc[i][j] = fmaf(av[i].z, bv[j].z, acc[i][j]);
        acc[i][j] = fmaf(av[i].w, bv[j].w, acc[i][j]);
      }
  }
}

// acc[i][chan] += sum over k < NK of p[i][k] * m[k][chan], for the thread's 4 rows of the score tile
// `p` (starting at its first row) and its channels of the HD-wide tile `m` (all NK rows).
template <int HD, int NK>
__device__ __forceinline__ void accumulate_rows(float (&acc)[kRowsPerThread][HD / kLanesPerRow], const float* p,
                                                const float* m, int tx) {
  using Cfg = Tiles<HD>;
  constexpr int kStride = HD + kPad, kScoreStride = NK + kPad;
#pragma unroll 1
  for (int k = 0; k < NK; k += 4) {
    float pv[kRowsPerThread][4];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const float4 t = *reinterpret_cast<const float4*>(p + i * kScoreStride + k);
      pv[i][0] = t.x;
      pv[i][1] = t.y;
      pv[i][2] = t.z;
      pv[i][3] = t.w;
    }
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const float* row = m + (k + kk) * kStride + tx * Cfg::kVec;
      float mv[Cfg::kChans];
#pragma unroll
      for (int g = 0; g < Cfg::kGroups; ++g) {
        const float* src = row + g * kLanesPerRow * Cfg::kVec;
        if constexpr (Cfg::kVec == 4) {
          const float4 t = *reinterpret_cast<const float4*>(src);
          mv[4 * g] = t.x;
          mv[4 * g + 1] = t.y;
          mv[4 * g + 2] = t.z;
          mv[4 * g + 3] = t.w;
        } else {
          const float2 t = *reinterpret_cast<const float2*>(src);
          mv[2 * g] = t.x;
          mv[2 * g + 1] = t.y;
        }
      }
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
        for (int c = 0; c < Cfg::kChans; ++c) acc[i][c] = fmaf(pv[i][kk], mv[c], acc[i][c]);
    }
  }
}

// Reductions over the 16 lanes that share a row (lane bits 0..3); every lane gets the result.
__device__ __forceinline__ float row_max(float v) {
#pragma unroll
  for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}
__device__ __forceinline__ float row_sum(float v) {
#pragma unroll
  for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// dst[chan] = scale * acc[chan] for the thread's channels of one HD-wide row in device memory.
template <class T, int HD>
__device__ __forceinline__ void store_row(T* dst, const float (&acc)[HD / kLanesPerRow], float scale, int tx) {
  using Cfg = Tiles<HD>;
#pragma unroll
  for (int g = 0; g < Cfg::kGroups; ++g)
#pragma unroll
    for (int v = 0; v < Cfg::kVec; ++v)
      dst[g * kLanesPerRow * Cfg::kVec + tx * Cfg::kVec + v] = from_float<T>(acc[g * Cfg::kVec + v] * scale);
}

// ---------------------------------------------------------------------------------------------
// Forward. Block (b*NH + h, query tile); query tiles are issued last-first, because under the
// causal mask the last tiles have the most key tiles to visit.

template <class T, int HD>
__global__ void __launch_bounds__(Tiles<HD>::kThreads, 2)
    attention_forward_kernel(T* out, float* lse, const T* qkv, int Tn, std::int64_t C, int NH, float scale_log2) {
  using Cfg = Tiles<HD>;
  constexpr int NJ = Cfg::kColsPerThread;
  extern __shared__ float4 smem_f4[];
  float* sQ = reinterpret_cast<float*>(smem_f4);
  float* sK = sQ + Cfg::kRows * Cfg::kStride;
  float* sV = sK + Cfg::kCols * Cfg::kStride;
  float* sP = sV + Cfg::kCols * Cfg::kStride;

  const std::int64_t bh = blockIdx.x;
  const std::int64_t b = bh / NH, h = bh % NH, C3 = 3 * C;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * Cfg::kRows;
  const int tx = threadIdx.x % kLanesPerRow, r0 = threadIdx.x / kLanesPerRow * kRowsPerThread;
  const T* q_base = qkv + b * Tn * C3 + h * HD;  // row t of this head's q at q_base + t * C3
  const T* k_base = q_base + C;
  const T* v_base = q_base + 2 * C;

  load_rows<T, HD, Cfg::kRows, Cfg::kThreads>(sQ, q_base + q0 * C3, C3, min(Cfg::kRows, Tn - q0));

  // Scores live in the log2 domain (scaled by scale * log2 e) so that exp2f is the only exponential.
  float m[kRowsPerThread], l[kRowsPerThread], o[kRowsPerThread][Cfg::kChans];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;  // this thread's share of the row sum; the 16 shares are added at the end
#pragma unroll
    for (int c = 0; c < Cfg::kChans; ++c) o[i][c] = 0.0f;
  }

  // Key tiles up to the block's last visible key. Tile 0 holds key 0, which every row may see (rows
  // past T clamp their limit to T - 1), so every row max is finite from the first tile on and
  // exp2f(m_old - m_new) never meets -inf - -inf.
  const int last_key = min(q0 + Cfg::kRows - 1, Tn - 1);
  const int key_tiles = last_key / Cfg::kCols + 1;
  for (int kt = 0; kt < key_tiles; ++kt) {
    const int k0 = kt * Cfg::kCols;
    __syncthreads();  // the previous tile's sK, sV, sP are consumed
    load_rows<T, HD, Cfg::kCols, Cfg::kThreads>(sK, k_base + k0 * C3, C3, min(Cfg::kCols, Tn - k0));
    load_rows<T, HD, Cfg::kCols, Cfg::kThreads>(sV, v_base + k0 * C3, C3, min(Cfg::kCols, Tn - k0));
    __syncthreads();

    float s[kRowsPerThread][NJ];
    dot_rows<HD, NJ>(s, sQ + r0 * Cfg::kStride, sK + tx * Cfg::kStride);
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int limit = min(q0 + r0 + i, Tn - 1);
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        s[i][j] = k0 + tx + kLanesPerRow * j <= limit ? s[i][j] * scale_log2 : -INFINITY;
        tile_max = fmaxf(tile_max, s[i][j]);
      }
      const float m_new = fmaxf(m[i], row_max(tile_max));
      const float alpha = exp2f(m[i] - m_new);
      m[i] = m_new;
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        const float p = exp2f(s[i][j] - m_new);
        sP[(r0 + i) * Cfg::kScoreStride + tx + kLanesPerRow * j] = p;
        sum += p;
      }
      l[i] = l[i] * alpha + sum;
#pragma unroll
      for (int c = 0; c < Cfg::kChans; ++c) o[i][c] *= alpha;
    }
    __syncthreads();  // sP complete
    accumulate_rows<HD, Cfg::kCols>(o, sP + r0 * Cfg::kScoreStride, sV, tx);
  }

#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const float total = row_sum(l[i]);
    const int q = q0 + r0 + i;
    if (q < Tn) {
      store_row<T, HD>(out + (b * Tn + q) * C + h * HD, o[i], 1.0f / total, tx);
      if (tx == 0) lse[bh * Tn + q] = m[i] * kLn2 + logf(total);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, step 1: dsum[b, h, t] = dout[b, t, head h] . out[b, t, head h] (= sum over keys of
// P * dP, the softmax backward's row term). One warp per row; in [B, T, C] the rows of HD are
// contiguous, row r = (b T + t) NH + h.

constexpr int kDsumWarps = 8;

template <class T, int HD>
__global__ void __launch_bounds__(32 * kDsumWarps)
    attention_backward_dsum_kernel(float* dsum, const T* dout, const T* out, std::int64_t rows, int Tn, int NH) {
  const int lane = threadIdx.x % 32;
  for (std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * kDsumWarps + threadIdx.x / 32; r < rows;
       r += static_cast<std::int64_t>(gridDim.x) * kDsumWarps) {
    const T* a = dout + r * HD;
    const T* o = out + r * HD;
    float acc = 0.0f;
#pragma unroll
    for (int c = lane; c < HD; c += 32) acc = fmaf(to_float(a[c]), to_float(o[c]), acc);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    if (lane == 0) {
      const std::int64_t h = r % NH, bt = r / NH, t = bt % Tn, b = bt / Tn;
      dsum[(b * NH + h) * Tn + t] = acc;
    }
  }
}

// Backward, step 2: dK and dV. Block (b*NH + h, key tile) owns kRows keys and visits every query
// tile that can see them, in order, accumulating dV += P^T dO and dK += dS^T Q in registers; the
// block writes its rows of dk and dv once, so no other block touches them.

template <class T, int HD>
__global__ void __launch_bounds__(Tiles<HD>::kThreads, 2)
    attention_backward_dkv_kernel(T* dqkv, const T* dout, const T* qkv, const float* lse, const float* dsum, int Tn,
                                  std::int64_t C, int NH, float scale, float scale_log2) {
  using Cfg = Tiles<HD>;
  constexpr int NJ = Cfg::kColsPerThread;
  extern __shared__ float4 smem_f4[];
  float* sK = reinterpret_cast<float*>(smem_f4);
  float* sV = sK + Cfg::kRows * Cfg::kStride;
  float* sQ = sV + Cfg::kRows * Cfg::kStride;
  float* sdO = sQ + Cfg::kCols * Cfg::kStride;
  float* sS = sdO + Cfg::kCols * Cfg::kStride;  // P^T, then dS^T, of the current query tile
  float* sLse = sS + Cfg::kRows * Cfg::kScoreStride;
  float* sDsum = sLse + Cfg::kCols;

  const std::int64_t bh = blockIdx.x;
  const std::int64_t b = bh / NH, h = bh % NH, C3 = 3 * C;
  const int k0 = blockIdx.y * Cfg::kRows;
  const int tx = threadIdx.x % kLanesPerRow, r0 = threadIdx.x / kLanesPerRow * kRowsPerThread;
  const T* q_base = qkv + b * Tn * C3 + h * HD;
  const T* k_base = q_base + C;
  const T* v_base = q_base + 2 * C;
  const T* do_base = dout + b * Tn * C + h * HD;
  const float* lse_row = lse + bh * Tn;
  const float* dsum_row = dsum + bh * Tn;

  load_rows<T, HD, Cfg::kRows, Cfg::kThreads>(sK, k_base + k0 * C3, C3, min(Cfg::kRows, Tn - k0));
  load_rows<T, HD, Cfg::kRows, Cfg::kThreads>(sV, v_base + k0 * C3, C3, min(Cfg::kRows, Tn - k0));

  float dk[kRowsPerThread][Cfg::kChans], dv[kRowsPerThread][Cfg::kChans];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
    for (int c = 0; c < Cfg::kChans; ++c) dk[i][c] = dv[i][c] = 0.0f;

  // Queries before k0 see none of these keys.
  const int query_tiles = (Tn + Cfg::kCols - 1) / Cfg::kCols;
  for (int qt = k0 / Cfg::kCols; qt < query_tiles; ++qt) {
    const int q0 = qt * Cfg::kCols;
    __syncthreads();  // the previous tile's sQ, sdO, sS, sLse, sDsum are consumed
    load_rows<T, HD, Cfg::kCols, Cfg::kThreads>(sQ, q_base + q0 * C3, C3, min(Cfg::kCols, Tn - q0));
    load_rows<T, HD, Cfg::kCols, Cfg::kThreads>(sdO, do_base + q0 * C, C, min(Cfg::kCols, Tn - q0));
    for (int c = threadIdx.x; c < Cfg::kCols; c += Cfg::kThreads) {
      const bool valid = q0 + c < Tn;
      sLse[c] = valid ? lse_row[q0 + c] * kLog2e : 0.0f;
      sDsum[c] = valid ? dsum_row[q0 + c] : 0.0f;
    }
    __syncthreads();

    // Transposed scores: rows are this block's keys, columns the tile's queries.
    float s[kRowsPerThread][NJ], ds[kRowsPerThread][NJ];
    dot_rows<HD, NJ>(s, sK + r0 * Cfg::kStride, sQ + tx * Cfg::kStride);    // S^T = K Q^T
    dot_rows<HD, NJ>(ds, sV + r0 * Cfg::kStride, sdO + tx * Cfg::kStride);  // dP^T = V dO^T
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        const int c = tx + kLanesPerRow * j, key = k0 + r0 + i, q = q0 + c;
        const float p = key <= q && q < Tn ? exp2f(s[i][j] * scale_log2 - sLse[c]) : 0.0f;
        ds[i][j] = p * (ds[i][j] - sDsum[c]);
        sS[(r0 + i) * Cfg::kScoreStride + c] = p;
      }
    __syncthreads();  // sS = P^T complete
    accumulate_rows<HD, Cfg::kCols>(dv, sS + r0 * Cfg::kScoreStride, sdO, tx);
    __syncthreads();  // P^T consumed
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < NJ; ++j) sS[(r0 + i) * Cfg::kScoreStride + tx + kLanesPerRow * j] = ds[i][j];
    __syncthreads();  // sS = dS^T complete
    accumulate_rows<HD, Cfg::kCols>(dk, sS + r0 * Cfg::kScoreStride, sQ, tx);
  }

#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int key = k0 + r0 + i;
    if (key < Tn) {
      T* row = dqkv + (b * Tn + key) * C3 + h * HD;
      store_row<T, HD>(row + C, dk[i], scale, tx);
      store_row<T, HD>(row + 2 * C, dv[i], 1.0f, tx);
    }
  }
}

// Backward, step 3: dQ. Block (b*NH + h, query tile) owns kRows queries and visits the key tiles
// they can see, in order, recomputing P and dP and accumulating dQ += dS K in registers: dQ is
// written once by its owner, with no atomics (at the price of computing S and dP a second time).

template <class T, int HD>
__global__ void __launch_bounds__(Tiles<HD>::kThreads, 2)
    attention_backward_dq_kernel(T* dqkv, const T* dout, const T* qkv, const float* lse, const float* dsum, int Tn,
                                 std::int64_t C, int NH, float scale, float scale_log2) {
  using Cfg = Tiles<HD>;
  constexpr int NJ = Cfg::kColsPerThread;
  extern __shared__ float4 smem_f4[];
  float* sQ = reinterpret_cast<float*>(smem_f4);
  float* sdO = sQ + Cfg::kRows * Cfg::kStride;
  float* sK = sdO + Cfg::kRows * Cfg::kStride;
  float* sV = sK + Cfg::kCols * Cfg::kStride;
  float* sS = sV + Cfg::kCols * Cfg::kStride;  // dS of the current key tile

  const std::int64_t bh = blockIdx.x;
  const std::int64_t b = bh / NH, h = bh % NH, C3 = 3 * C;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * Cfg::kRows;
  const int tx = threadIdx.x % kLanesPerRow, r0 = threadIdx.x / kLanesPerRow * kRowsPerThread;
  const T* q_base = qkv + b * Tn * C3 + h * HD;
  const T* k_base = q_base + C;
  const T* v_base = q_base + 2 * C;
  const T* do_base = dout + b * Tn * C + h * HD;

  load_rows<T, HD, Cfg::kRows, Cfg::kThreads>(sQ, q_base + q0 * C3, C3, min(Cfg::kRows, Tn - q0));
  load_rows<T, HD, Cfg::kRows, Cfg::kThreads>(sdO, do_base + q0 * C, C, min(Cfg::kRows, Tn - q0));

  float lse2[kRowsPerThread], dsum_i[kRowsPerThread], dq[kRowsPerThread][Cfg::kChans];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int q = q0 + r0 + i;
    lse2[i] = q < Tn ? lse[bh * Tn + q] * kLog2e : 0.0f;
    dsum_i[i] = q < Tn ? dsum[bh * Tn + q] : 0.0f;
#pragma unroll
    for (int c = 0; c < Cfg::kChans; ++c) dq[i][c] = 0.0f;
  }

  const int last_key = min(q0 + Cfg::kRows - 1, Tn - 1);
  const int key_tiles = last_key / Cfg::kCols + 1;
  for (int kt = 0; kt < key_tiles; ++kt) {
    const int k0 = kt * Cfg::kCols;
    __syncthreads();  // the previous tile's sK, sV, sS are consumed
    load_rows<T, HD, Cfg::kCols, Cfg::kThreads>(sK, k_base + k0 * C3, C3, min(Cfg::kCols, Tn - k0));
    load_rows<T, HD, Cfg::kCols, Cfg::kThreads>(sV, v_base + k0 * C3, C3, min(Cfg::kCols, Tn - k0));
    __syncthreads();

    float s[kRowsPerThread][NJ], dp[kRowsPerThread][NJ];
    dot_rows<HD, NJ>(s, sQ + r0 * Cfg::kStride, sK + tx * Cfg::kStride);    // S = Q K^T
    dot_rows<HD, NJ>(dp, sdO + r0 * Cfg::kStride, sV + tx * Cfg::kStride);  // dP = dO V^T
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        const int c = tx + kLanesPerRow * j, q = q0 + r0 + i, key = k0 + c;
        const float p = key <= q && q < Tn ? exp2f(s[i][j] * scale_log2 - lse2[i]) : 0.0f;
        sS[(r0 + i) * Cfg::kScoreStride + c] = p * (dp[i][j] - dsum_i[i]);
      }
    __syncthreads();  // sS = dS complete
    accumulate_rows<HD, Cfg::kCols>(dq, sS + r0 * Cfg::kScoreStride, sK, tx);
  }

#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int q = q0 + r0 + i;
    if (q < Tn) store_row<T, HD>(dqkv + (b * Tn + q) * C3 + h * HD, dq[i], scale, tx);
  }
}

// ---------------------------------------------------------------------------------------------
// bf16 on tensor cores: mma.sync m16n8k16, bf16 operands, fp32 accumulators. A block of 4 warps
// owns 64 rows, 16 per warp, and every warp computes whole 16-row strips of each product, so the
// softmax statistics of a row stay inside one quad of lanes and a score strip turns from an
// accumulator into the A operand of the next product in registers (no score tile in shared
// memory). As in FlashAttention-2, P and dS are rounded to bf16 where they become mma operands;
// every sum, the softmax and the statistics are fp32. Tiles are bf16 in shared memory, rows padded
// by 8 elements (16 bytes), which makes every fragment load below free of bank conflicts.
//
// Fragments of mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with g = lane / 4 and
// t = lane % 4, two bf16 per 32-bit register, the lower column (A) or row (B) in the low half:
//   A (16 x 16, row-major): a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9],
//                           a3 = A[g+8][2t+8, 2t+9]
//   B (16 x 8):             b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]
//   C (16 x 8, fp32):       c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
// So C element e of a thread is row g + 8 (e / 2), column 2t + e % 2, and two C blocks that are
// adjacent along n (columns 0..7 and 8..15 of a 16-wide k step) are exactly an A fragment.

constexpr int kTcWarps = 4;
constexpr int kTcThreads = 32 * kTcWarps;
constexpr int kTcRows = 16 * kTcWarps;

template <int HD>
struct TcTiles {
  static constexpr int kStride = HD + 8;               // bf16 elements per shared row
  static constexpr int kKeys = 64;                     // keys per streamed tile (forward, dQ)
  static constexpr int kQueries = HD <= 64 ? 64 : 32;  // queries per streamed tile (dK/dV): bounds registers at HD 128
  static constexpr int kSteps = HD / 16;               // k steps over the head dim
  static constexpr int kDBlocks = HD / 8;              // n blocks over the head dim

  static constexpr std::size_t kForwardBytes = std::size_t{2} * (kTcRows + 2 * kKeys) * kStride;
  static constexpr std::size_t kDqBytes = std::size_t{2} * (2 * kTcRows + 2 * kKeys) * kStride;
  static constexpr std::size_t kDkvBytes =
      std::size_t{2} * (2 * kTcRows + 2 * kQueries) * kStride + 2 * kQueries * sizeof(float);
};

__device__ __forceinline__ unsigned pack_bf16(bf16 lo, bf16 hi) {
  return static_cast<unsigned>(__bfloat16_as_ushort(lo)) | (static_cast<unsigned>(__bfloat16_as_ushort(hi)) << 16);
}
__device__ __forceinline__ unsigned pack_floats(float lo, float hi) {
  return pack_bf16(__float2bfloat16(lo), __float2bfloat16(hi));
}
__device__ __forceinline__ unsigned load_pair(const bf16* p) { return *reinterpret_cast<const unsigned*>(p); }

// d += a * b.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// A = the 16 x 16 block of shared tile M (row-major, `stride` elements) at rows m0, columns k0.
__device__ __forceinline__ void load_a(unsigned (&a)[4], const bf16* M, int stride, int m0, int k0, int g, int t) {
  const bf16* p = M + (m0 + g) * stride + k0 + 2 * t;
  a[0] = load_pair(p);
  a[1] = load_pair(p + 8 * stride);
  a[2] = load_pair(p + 8);
  a[3] = load_pair(p + 8 * stride + 8);
}
// B[k][n] = M[n0 + n][k0 + k]: M holds B transposed (K for Q K^T), so k pairs are adjacent.
__device__ __forceinline__ void load_b_nk(unsigned (&b)[2], const bf16* M, int stride, int k0, int n0, int g, int t) {
  const bf16* p = M + (n0 + g) * stride + k0 + 2 * t;
  b[0] = load_pair(p);
  b[1] = load_pair(p + 8);
}
// B[k][n] = M[k0 + k][n0 + n]: M holds B as is (V for P V), so a k pair spans two rows.
__device__ __forceinline__ void load_b_kn(unsigned (&b)[2], const bf16* M, int stride, int k0, int n0, int g, int t) {
  const bf16* p = M + (k0 + 2 * t) * stride + n0 + g;
  b[0] = pack_bf16(p[0], p[stride]);
  b[1] = pack_bf16(p[8 * stride], p[9 * stride]);
}
// The A fragment of a 16-wide k step whose columns 0..7 are accumulator block c0, 8..15 block c1.
__device__ __forceinline__ void accumulators_to_a(unsigned (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack_floats(c0[0], c0[1]);
  a[1] = pack_floats(c0[2], c0[3]);
  a[2] = pack_floats(c1[0], c1[1]);
  a[3] = pack_floats(c1[2], c1[3]);
}

// Reductions over the quad of lanes that holds a fragment row (lane bits 0..1).
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// dst[r][0, HD) = src row r for r < valid, zeros for valid <= r < ROWS, bf16 as is.
template <int HD, int ROWS>
__device__ __forceinline__ void copy_rows(bf16* dst, const bf16* src, std::int64_t row_stride, int valid) {
  constexpr int kStride = TcTiles<HD>::kStride, kChunks = HD / 8;  // 8 elements = 16 bytes
  const bool vector = aligned16(src);
  for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += kTcThreads) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (r < valid) {
      const bf16* p = src + r * row_stride + c;
      if (vector) {
        v = *reinterpret_cast<const uint4*>(p);
      } else {
        v.x = pack_bf16(p[0], p[1]);
        v.y = pack_bf16(p[2], p[3]);
        v.z = pack_bf16(p[4], p[5]);
        v.w = pack_bf16(p[6], p[7]);
      }
    }
    *reinterpret_cast<uint4*>(dst + r * kStride + c) = v;
  }
}

// dst[n * 8 + 2t + {0, 1}] = scale * acc[n][2 r + {0, 1}]: fragment row r (0: g, 1: g + 8) of a
// 16 x HD accumulator strip, written to one HD-wide row in device memory.
template <int HD>
__device__ __forceinline__ void store_fragment_row(bf16* dst, const float (&acc)[HD / 8][4], int r, float scale,
                                                   int t) {
#pragma unroll
  for (int n = 0; n < HD / 8; ++n) {
    dst[n * 8 + 2 * t] = __float2bfloat16(acc[n][2 * r] * scale);
    dst[n * 8 + 2 * t + 1] = __float2bfloat16(acc[n][2 * r + 1] * scale);
  }
}

template <int HD>
__global__ void __launch_bounds__(kTcThreads)
    attention_forward_tc_kernel(bf16* out, float* lse, const bf16* qkv, int Tn, std::int64_t C, int NH,
                                float scale_log2) {
  using Cfg = TcTiles<HD>;
  constexpr int kStride = Cfg::kStride, kKeyBlocks = Cfg::kKeys / 8;
  extern __shared__ float4 smem_f4[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_f4);
  bf16* sK = sQ + kTcRows * kStride;
  bf16* sV = sK + Cfg::kKeys * kStride;

  const std::int64_t bh = blockIdx.x;
  const std::int64_t b = bh / NH, h = bh % NH, C3 = 3 * C;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * kTcRows;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, w0 = threadIdx.x / 32 * 16;
  const bf16* q_base = qkv + b * Tn * C3 + h * HD;
  const bf16* k_base = q_base + C;
  const bf16* v_base = q_base + 2 * C;

  copy_rows<HD, kTcRows>(sQ, q_base + q0 * C3, C3, min(kTcRows, Tn - q0));
  __syncthreads();
  unsigned qa[Cfg::kSteps][4];
#pragma unroll
  for (int kc = 0; kc < Cfg::kSteps; ++kc) load_a(qa[kc], sQ, kStride, w0, kc * 16, g, t);

  // Fragment rows r = 0, 1 are query rows q0 + w0 + g + 8 r. Rows past T see keys up to T - 1,
  // so key 0 (in tile 0) is visible to every row and the running max is finite after tile 0.
  int row[2], limit[2];
  float m[2], l[2], o[Cfg::kDBlocks][4];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row[r] = q0 + w0 + g + 8 * r;
    limit[r] = min(row[r], Tn - 1);
    m[r] = -INFINITY;
    l[r] = 0.0f;  // this lane's share of the row sum; the quad's four shares are added at the end
  }
#pragma unroll
  for (int n = 0; n < Cfg::kDBlocks; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[n][e] = 0.0f;

  const int last_key = min(q0 + kTcRows - 1, Tn - 1);
  const int key_tiles = last_key / Cfg::kKeys + 1;
  for (int kt = 0; kt < key_tiles; ++kt) {
    const int k0 = kt * Cfg::kKeys;
    __syncthreads();  // the previous tile's sK, sV are consumed
    copy_rows<HD, Cfg::kKeys>(sK, k_base + k0 * C3, C3, min(Cfg::kKeys, Tn - k0));
    copy_rows<HD, Cfg::kKeys>(sV, v_base + k0 * C3, C3, min(Cfg::kKeys, Tn - k0));
    __syncthreads();

    float s[kKeyBlocks][4];  // S = Q K^T, 16 rows x 64 keys of this warp
#pragma unroll
    for (int n = 0; n < kKeyBlocks; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = 0.0f;
#pragma unroll
    for (int kc = 0; kc < Cfg::kSteps; ++kc)
#pragma unroll
      for (int n = 0; n < kKeyBlocks; ++n) {
        unsigned kb[2];
        load_b_nk(kb, sK, kStride, kc * 16, n * 8, g, t);
        mma_bf16(s[n], qa[kc], kb);
      }

    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < kKeyBlocks; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + n * 8 + 2 * t + e % 2;
        s[n][e] = key <= limit[e / 2] ? s[n][e] * scale_log2 : -INFINITY;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], s[n][e]);
      }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m_new = fmaxf(m[r], quad_max(tile_max[r]));
      alpha[r] = exp2f(m[r] - m_new);
      m[r] = m_new;
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int n = 0; n < kKeyBlocks; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[n][e] = exp2f(s[n][e] - m[e / 2]);  // P, unnormalised
        l[e / 2] += s[n][e];
      }
#pragma unroll
    for (int n = 0; n < Cfg::kDBlocks; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[n][e] *= alpha[e / 2];

#pragma unroll
    for (int kc = 0; kc < Cfg::kKeys / 16; ++kc) {  // O += P V
      unsigned pa[4];
      accumulators_to_a(pa, s[2 * kc], s[2 * kc + 1]);
#pragma unroll
      for (int n = 0; n < Cfg::kDBlocks; ++n) {
        unsigned vb[2];
        load_b_kn(vb, sV, kStride, kc * 16, n * 8, g, t);
        mma_bf16(o[n], pa, vb);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float total = quad_sum(l[r]);
    if (row[r] < Tn) {
      store_fragment_row<HD>(out + (b * Tn + row[r]) * C + h * HD, o, r, 1.0f / total, t);
      if (t == 0) lse[bh * Tn + row[r]] = m[r] * kLn2 + logf(total);
    }
  }
}

// dK and dV on tensor cores: block (b*NH + h, key tile of 64), warp w owns keys k0 + 16 w .. + 15
// and computes S^T = K Q^T and dP^T = V dO^T strips, then dV += P^T dO and dK += dS^T Q.
template <int HD>
__global__ void __launch_bounds__(kTcThreads)
    attention_backward_dkv_tc_kernel(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* dsum,
                                     int Tn, std::int64_t C, int NH, float scale, float scale_log2) {
  using Cfg = TcTiles<HD>;
  constexpr int kStride = Cfg::kStride, kQueryBlocks = Cfg::kQueries / 8;
  extern __shared__ float4 smem_f4[];
  bf16* sK = reinterpret_cast<bf16*>(smem_f4);
  bf16* sV = sK + kTcRows * kStride;
  bf16* sQ = sV + kTcRows * kStride;
  bf16* sdO = sQ + Cfg::kQueries * kStride;
  float* sLse = reinterpret_cast<float*>(sdO + Cfg::kQueries * kStride);
  float* sDsum = sLse + Cfg::kQueries;

  const std::int64_t bh = blockIdx.x;
  const std::int64_t b = bh / NH, h = bh % NH, C3 = 3 * C;
  const int k0 = blockIdx.y * kTcRows;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, w0 = threadIdx.x / 32 * 16;
  const bf16* q_base = qkv + b * Tn * C3 + h * HD;
  const bf16* k_base = q_base + C;
  const bf16* v_base = q_base + 2 * C;
  const bf16* do_base = dout + b * Tn * C + h * HD;
  const float* lse_row = lse + bh * Tn;
  const float* dsum_row = dsum + bh * Tn;

  copy_rows<HD, kTcRows>(sK, k_base + k0 * C3, C3, min(kTcRows, Tn - k0));
  copy_rows<HD, kTcRows>(sV, v_base + k0 * C3, C3, min(kTcRows, Tn - k0));

  const int key[2] = {k0 + w0 + g, k0 + w0 + g + 8};  // keys of fragment rows 0 and 1
  float dk[Cfg::kDBlocks][4], dv[Cfg::kDBlocks][4];
#pragma unroll
  for (int n = 0; n < Cfg::kDBlocks; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.0f;

  const int query_tiles = (Tn + Cfg::kQueries - 1) / Cfg::kQueries;
  for (int qt = k0 / Cfg::kQueries; qt < query_tiles; ++qt) {  // queries before k0 see none of these keys
    const int q0 = qt * Cfg::kQueries;
    __syncthreads();  // the previous tile's sQ, sdO, sLse, sDsum are consumed
    copy_rows<HD, Cfg::kQueries>(sQ, q_base + q0 * C3, C3, min(Cfg::kQueries, Tn - q0));
    copy_rows<HD, Cfg::kQueries>(sdO, do_base + q0 * C, C, min(Cfg::kQueries, Tn - q0));
    for (int c = threadIdx.x; c < Cfg::kQueries; c += kTcThreads) {
      const bool valid = q0 + c < Tn;
      sLse[c] = valid ? lse_row[q0 + c] * kLog2e : 0.0f;
      sDsum[c] = valid ? dsum_row[q0 + c] : 0.0f;
    }
    __syncthreads();

    float s[kQueryBlocks][4], dp[kQueryBlocks][4];  // S^T and dP^T: 16 keys x kQueries queries
#pragma unroll
    for (int n = 0; n < kQueryBlocks; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.0f;
#pragma unroll
    for (int kc = 0; kc < Cfg::kSteps; ++kc) {
      unsigned ka[4], va[4];
      load_a(ka, sK, kStride, w0, kc * 16, g, t);
      load_a(va, sV, kStride, w0, kc * 16, g, t);
#pragma unroll
      for (int n = 0; n < kQueryBlocks; ++n) {
        unsigned qb[2], ob[2];
        load_b_nk(qb, sQ, kStride, kc * 16, n * 8, g, t);
        load_b_nk(ob, sdO, kStride, kc * 16, n * 8, g, t);
        mma_bf16(s[n], ka, qb);
        mma_bf16(dp[n], va, ob);
      }
    }
#pragma unroll
    for (int n = 0; n < kQueryBlocks; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = n * 8 + 2 * t + e % 2, q = q0 + c;
        const float p = key[e / 2] <= q && q < Tn ? exp2f(s[n][e] * scale_log2 - sLse[c]) : 0.0f;
        s[n][e] = p;                           // P^T
        dp[n][e] = p * (dp[n][e] - sDsum[c]);  // dS^T
      }

#pragma unroll
    for (int kc = 0; kc < Cfg::kQueries / 16; ++kc) {  // dV += P^T dO, dK += dS^T Q
      unsigned pa[4], da[4];
      accumulators_to_a(pa, s[2 * kc], s[2 * kc + 1]);
      accumulators_to_a(da, dp[2 * kc], dp[2 * kc + 1]);
#pragma unroll
      for (int n = 0; n < Cfg::kDBlocks; ++n) {
        unsigned ob[2], qb[2];
        load_b_kn(ob, sdO, kStride, kc * 16, n * 8, g, t);
        load_b_kn(qb, sQ, kStride, kc * 16, n * 8, g, t);
        mma_bf16(dv[n], pa, ob);
        mma_bf16(dk[n], da, qb);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r)
    if (key[r] < Tn) {
      bf16* row = dqkv + (b * Tn + key[r]) * C3 + h * HD;
      store_fragment_row<HD>(row + C, dk, r, scale, t);
      store_fragment_row<HD>(row + 2 * C, dv, r, 1.0f, t);
    }
}

// dQ on tensor cores: block (b*NH + h, query tile of 64), warp w owns queries q0 + 16 w .. + 15,
// recomputes S and dP strips per key tile and accumulates dQ += dS K; written once by its owner.
template <int HD>
__global__ void __launch_bounds__(kTcThreads)
    attention_backward_dq_tc_kernel(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* dsum,
                                    int Tn, std::int64_t C, int NH, float scale, float scale_log2) {
  using Cfg = TcTiles<HD>;
  constexpr int kStride = Cfg::kStride, kKeyBlocks = Cfg::kKeys / 8;
  extern __shared__ float4 smem_f4[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_f4);
  bf16* sdO = sQ + kTcRows * kStride;
  bf16* sK = sdO + kTcRows * kStride;
  bf16* sV = sK + Cfg::kKeys * kStride;

  const std::int64_t bh = blockIdx.x;
  const std::int64_t b = bh / NH, h = bh % NH, C3 = 3 * C;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * kTcRows;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, w0 = threadIdx.x / 32 * 16;
  const bf16* q_base = qkv + b * Tn * C3 + h * HD;
  const bf16* k_base = q_base + C;
  const bf16* v_base = q_base + 2 * C;
  const bf16* do_base = dout + b * Tn * C + h * HD;

  copy_rows<HD, kTcRows>(sQ, q_base + q0 * C3, C3, min(kTcRows, Tn - q0));
  copy_rows<HD, kTcRows>(sdO, do_base + q0 * C, C, min(kTcRows, Tn - q0));

  int row[2];
  float lse2[2], dsum_r[2], dq[Cfg::kDBlocks][4];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row[r] = q0 + w0 + g + 8 * r;
    lse2[r] = row[r] < Tn ? lse[bh * Tn + row[r]] * kLog2e : 0.0f;
    dsum_r[r] = row[r] < Tn ? dsum[bh * Tn + row[r]] : 0.0f;
  }
#pragma unroll
  for (int n = 0; n < Cfg::kDBlocks; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[n][e] = 0.0f;

  const int last_key = min(q0 + kTcRows - 1, Tn - 1);
  const int key_tiles = last_key / Cfg::kKeys + 1;
  for (int kt = 0; kt < key_tiles; ++kt) {
    const int k0 = kt * Cfg::kKeys;
    __syncthreads();  // the previous tile's sK, sV are consumed
    copy_rows<HD, Cfg::kKeys>(sK, k_base + k0 * C3, C3, min(Cfg::kKeys, Tn - k0));
    copy_rows<HD, Cfg::kKeys>(sV, v_base + k0 * C3, C3, min(Cfg::kKeys, Tn - k0));
    __syncthreads();

    float s[kKeyBlocks][4], dp[kKeyBlocks][4];  // S = Q K^T and dP = dO V^T: 16 queries x 64 keys
#pragma unroll
    for (int n = 0; n < kKeyBlocks; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.0f;
#pragma unroll
    for (int kc = 0; kc < Cfg::kSteps; ++kc) {
      unsigned qa[4], oa[4];
      load_a(qa, sQ, kStride, w0, kc * 16, g, t);
      load_a(oa, sdO, kStride, w0, kc * 16, g, t);
#pragma unroll
      for (int n = 0; n < kKeyBlocks; ++n) {
        unsigned kb[2], vb[2];
        load_b_nk(kb, sK, kStride, kc * 16, n * 8, g, t);
        load_b_nk(vb, sV, kStride, kc * 16, n * 8, g, t);
        mma_bf16(s[n], qa, kb);
        mma_bf16(dp[n], oa, vb);
      }
    }
#pragma unroll
    for (int n = 0; n < kKeyBlocks; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int k = k0 + n * 8 + 2 * t + e % 2, q = row[e / 2];
        const float p = k <= q && q < Tn ? exp2f(s[n][e] * scale_log2 - lse2[e / 2]) : 0.0f;
        s[n][e] = p * (dp[n][e] - dsum_r[e / 2]);  // dS
      }
#pragma unroll
    for (int kc = 0; kc < Cfg::kKeys / 16; ++kc) {  // dQ += dS K
      unsigned da[4];
      accumulators_to_a(da, s[2 * kc], s[2 * kc + 1]);
#pragma unroll
      for (int n = 0; n < Cfg::kDBlocks; ++n) {
        unsigned kb[2];
        load_b_kn(kb, sK, kStride, kc * 16, n * 8, g, t);
        mma_bf16(dq[n], da, kb);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r)
    if (row[r] < Tn) store_fragment_row<HD>(dqkv + (b * Tn + row[r]) * C3 + h * HD, dq, r, scale, t);
}

// ---------------------------------------------------------------------------------------------
// Launchers.

using nibble::cuda::check_launch;

// Raises a kernel's dynamic shared-memory limit above the default 48 KB.
template <class Kernel>
void allow_shared_memory(Kernel kernel, std::size_t bytes, const char* name) {
  const cudaError_t error =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (error != cudaSuccess)
    throw DeviceError(std::string("cudaFuncSetAttribute(") + name + ", " + std::to_string(bytes) +
                      " bytes of shared memory) failed: " + cudaGetErrorString(error));
}

template <int... Ds>
bool head_dim_in(std::int64_t head_dim, HeadDimList<Ds...>) {
  return ((head_dim == Ds) || ...);
}

template <int... Ds>
std::string head_dim_names(HeadDimList<Ds...>) {
  std::string names;
  ((names += (names.empty() ? "" : ", ") + std::to_string(Ds)), ...);
  return names;
}

// Calls fn(std::integral_constant<int, HD>{}) for the supported head_dim (checked before).
template <class Fn, int... Ds>
void dispatch_head_dim(std::int64_t head_dim, Fn&& fn, HeadDimList<Ds...>) {
  (void)((head_dim == Ds ? (fn(std::integral_constant<int, Ds>{}), true) : false) || ...);
}

// NOTE: bf16 runs on the tensor-core kernels. Setting this false sends bf16 through the CUDA-core
// kernels instead (fp32 arithmetic, bf16 only at loads and stores): slower, but a reference that
// differs from fp32 only by the rounding of inputs and outputs.
constexpr bool kBf16OnTensorCores = true;
template <class T>
constexpr bool on_tensor_cores = std::is_same_v<T, bf16>&& kBf16OnTensorCores;
static_assert(kTcRows == kBlockRows, "both kernel families tile T by kBlockRows rows (the launchers' grid)");

// Validates a launcher's sizes; returns the head dim. Throws InvalidArgument naming the bad value.
std::int64_t check_sizes(const char* op, std::int64_t B, std::int64_t Tn, std::int64_t C, std::int64_t NH) {
  const std::string where = std::string(op) + ": ";
  if (B < 0 || Tn < 0 || C < 0)
    throw InvalidArgument(where + "negative size (B " + std::to_string(B) + ", T " + std::to_string(Tn) + ", C " +
                          std::to_string(C) + ")");
  if (NH <= 0 || C % NH != 0)
    throw InvalidArgument(where + "attention width C " + std::to_string(C) + " is not divisible by heads NH " +
                          std::to_string(NH));
  const std::int64_t head_dim = C / NH;
  if (!attention_supports_head_dim(head_dim))
    throw InvalidArgument(where + "head dim " + std::to_string(head_dim) + " (C " + std::to_string(C) + " / NH " +
                          std::to_string(NH) +
                          ") is not supported; supported head dims: " + head_dim_names(SupportedHeadDims{}));
  if (B > 0 && NH > INT_MAX / B)
    throw InvalidArgument(where + "B * NH = " + std::to_string(B) + " * " + std::to_string(NH) +
                          " (batch x heads) exceeds the grid's 2^31 - 1 blocks");
  if ((Tn + kBlockRows - 1) / kBlockRows > kMaxGridY)
    throw InvalidArgument(where + "sequence length T " + std::to_string(Tn) + " exceeds " +
                          std::to_string(kMaxGridY * kBlockRows));
  return head_dim;
}

}  // namespace

bool attention_supports_head_dim(std::int64_t head_dim) { return head_dim_in(head_dim, SupportedHeadDims{}); }

std::size_t attention_backward_scratch_bytes(std::int64_t B, std::int64_t Tn, std::int64_t C, std::int64_t NH) {
  (void)C;
  if (B <= 0 || Tn <= 0 || NH <= 0) return 0;
  return static_cast<std::size_t>(B * NH * Tn) * sizeof(float);  // dsum[B, NH, T]
}

template <class T>
void attention_forward(T* out, float* lse, const T* qkv, std::int64_t B, std::int64_t Tn, std::int64_t C,
                       std::int64_t NH, cudaStream_t stream) {
  const std::int64_t head_dim = check_sizes("attention_forward", B, Tn, C, NH);
  if (B == 0 || Tn == 0) return;
  const float scale_log2 = kLog2e / std::sqrt(static_cast<float>(head_dim));
  const int tn = static_cast<int>(Tn), nh = static_cast<int>(NH);
  const dim3 grid(static_cast<unsigned>(B * NH), static_cast<unsigned>((Tn + kBlockRows - 1) / kBlockRows));
  dispatch_head_dim(
      head_dim,
      [&](auto hd) {
        constexpr int HD = decltype(hd)::value;
        if constexpr (on_tensor_cores<T>) {
          const std::size_t smem = TcTiles<HD>::kForwardBytes;
          auto kernel = attention_forward_tc_kernel<HD>;
          allow_shared_memory(kernel, smem, "attention_forward_tc_kernel");
          kernel<<<grid, kTcThreads, smem, stream>>>(out, lse, qkv, tn, C, nh, scale_log2);
          check_launch("attention_forward_tc_kernel");
        } else {
          const std::size_t smem = Tiles<HD>::kForwardFloats * sizeof(float);
          auto kernel = attention_forward_kernel<T, HD>;
          allow_shared_memory(kernel, smem, "attention_forward_kernel");
          kernel<<<grid, Tiles<HD>::kThreads, smem, stream>>>(out, lse, qkv, tn, C, nh, scale_log2);
          check_launch("attention_forward_kernel");
        }
      },
      SupportedHeadDims{});
}

template <class T>
void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* out, const float* lse, std::int64_t B,
                        std::int64_t Tn, std::int64_t C, std::int64_t NH, void* scratch, cudaStream_t stream) {
  const std::int64_t head_dim = check_sizes("attention_backward", B, Tn, C, NH);
  if (B == 0 || Tn == 0) return;
  if (scratch == nullptr)
    throw InvalidArgument("attention_backward: scratch is null; it needs attention_backward_scratch_bytes = " +
                          std::to_string(attention_backward_scratch_bytes(B, Tn, C, NH)) + " bytes");
  float* dsum = static_cast<float*>(scratch);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const float scale_log2 = kLog2e / std::sqrt(static_cast<float>(head_dim));
  const int tn = static_cast<int>(Tn), nh = static_cast<int>(NH);
  const dim3 grid(static_cast<unsigned>(B * NH), static_cast<unsigned>((Tn + kBlockRows - 1) / kBlockRows));
  dispatch_head_dim(
      head_dim,
      [&](auto hd) {
        constexpr int HD = decltype(hd)::value;
        const std::int64_t rows = B * Tn * NH;
        const std::int64_t blocks = std::min<std::int64_t>((rows + kDsumWarps - 1) / kDsumWarps, std::int64_t{1} << 20);
        attention_backward_dsum_kernel<T, HD>
            <<<static_cast<unsigned>(blocks), 32 * kDsumWarps, 0, stream>>>(dsum, dout, out, rows, tn, nh);
        check_launch("attention_backward_dsum_kernel");

        if constexpr (on_tensor_cores<T>) {
          const std::size_t dkv_smem = TcTiles<HD>::kDkvBytes, dq_smem = TcTiles<HD>::kDqBytes;
          auto dkv = attention_backward_dkv_tc_kernel<HD>;
          auto dq = attention_backward_dq_tc_kernel<HD>;
          allow_shared_memory(dkv, dkv_smem, "attention_backward_dkv_tc_kernel");
          allow_shared_memory(dq, dq_smem, "attention_backward_dq_tc_kernel");
          dkv<<<grid, kTcThreads, dkv_smem, stream>>>(dqkv, dout, qkv, lse, dsum, tn, C, nh, scale, scale_log2);
          check_launch("attention_backward_dkv_tc_kernel");
          dq<<<grid, kTcThreads, dq_smem, stream>>>(dqkv, dout, qkv, lse, dsum, tn, C, nh, scale, scale_log2);
          check_launch("attention_backward_dq_tc_kernel");
        } else {
          const std::size_t dkv_smem = Tiles<HD>::kDkvFloats * sizeof(float);
          const std::size_t dq_smem = Tiles<HD>::kDqFloats * sizeof(float);
          auto dkv = attention_backward_dkv_kernel<T, HD>;
          auto dq = attention_backward_dq_kernel<T, HD>;
          allow_shared_memory(dkv, dkv_smem, "attention_backward_dkv_kernel");
          allow_shared_memory(dq, dq_smem, "attention_backward_dq_kernel");
          dkv<<<grid, Tiles<HD>::kThreads, dkv_smem, stream>>>(dqkv, dout, qkv, lse, dsum, tn, C, nh, scale,
                                                               scale_log2);
          check_launch("attention_backward_dkv_kernel");
          dq<<<grid, Tiles<HD>::kThreads, dq_smem, stream>>>(dqkv, dout, qkv, lse, dsum, tn, C, nh, scale, scale_log2);
          check_launch("attention_backward_dq_kernel");
        }
      },
      SupportedHeadDims{});
}

#define NIBBLE_ATTENTION_INSTANTIATE(T)                                                                            \
  template void attention_forward<T>(T*, float*, const T*, std::int64_t, std::int64_t, std::int64_t, std::int64_t, \
                                     cudaStream_t);                                                                \
  template void attention_backward<T>(T*, const T*, const T*, const T*, const float*, std::int64_t, std::int64_t,  \
                                      std::int64_t, std::int64_t, void*, cudaStream_t);
NIBBLE_ATTENTION_INSTANTIATE(float)
NIBBLE_ATTENTION_INSTANTIATE(bf16)
#undef NIBBLE_ATTENTION_INSTANTIATE

}  // namespace nibble::model::cuda
