// Causal multi-head self-attention on CUDA, FlashAttention-2 style (Dao, 2023, "FlashAttention-2:
// Faster Attention with Better Parallelism and Work Partitioning"): q, k, v tiles in shared memory,
// online softmax, no T x T matrix in device memory. fp32 runs on CUDA cores in fp32; bf16 runs on
// tensor cores (mma.sync, fp32 accumulation). The backward recomputes the probabilities from lse and
// is deterministic: dK/dV and dQ are two passes in which one block owns each output tile.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
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

// The thread's place in the mapping above: lane tx of its half-warp, first row r0.
struct RowLanes {
  int tx, r0;
};
__device__ __forceinline__ RowLanes row_lanes() {
  const int tx = threadIdx.x % kLanesPerRow, r0 = threadIdx.x / kLanesPerRow * kRowsPerThread;
  return {tx, r0};
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

// The thread's fragment coordinates g and t (above), and w0, the first of its warp's 16 rows.
struct FragmentLanes {
  int g, t, w0;
};
__device__ __forceinline__ FragmentLanes fragment_lanes() {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, w0 = threadIdx.x / 32 * 16;
  return {g, t, w0};
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


// All zeros: the start of an mma accumulator strip.
template <int N>
__device__ __forceinline__ void zero_fragments(float (&acc)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.0f;
}

// The two score strips of the backward, over the head dim: s = A1 B1^T and dp = A2 B2^T for the
// warp's 16 rows (from w0) of the shared tiles A1 and A2 and the NB * 8 rows of B1 and B2 (which
// hold their matrices transposed, as K does for Q K^T).
template <int HD, int NB>
__device__ __forceinline__ void score_strips(float (&s)[NB][4], float (&dp)[NB][4], const bf16* A1, const bf16* B1,
                                             const bf16* A2, const bf16* B2, int w0, int g, int t) {
  using Cfg = TcTiles<HD>;
  constexpr int kStride = Cfg::kStride;
  zero_fragments(s);
  zero_fragments(dp);
#pragma unroll
  for (int kc = 0; kc < Cfg::kSteps; ++kc) {
    unsigned a1[4], a2[4];
    load_a(a1, A1, kStride, w0, kc * 16, g, t);
    load_a(a2, A2, kStride, w0, kc * 16, g, t);
#pragma unroll
    for (int n = 0; n < NB; ++n) {
      unsigned b1[2], b2[2];
      load_b_nk(b1, B1, kStride, kc * 16, n * 8, g, t);
      load_b_nk(b2, B2, kStride, kc * 16, n * 8, g, t);
      mma_bf16(s[n], a1, b1);
      mma_bf16(dp[n], a2, b2);
    }
  }
}

// acc += p M: a 16 x (NB * 8) strip of probabilities or score gradients, still in accumulator
// layout (rounded to bf16 here), times the (NB * 8) x HD shared tile M.
template <int HD, int NB>
__device__ __forceinline__ void accumulate_strip(float (&acc)[HD / 8][4], const float (&p)[NB][4], const bf16* M,
                                                 int g, int t) {
  using Cfg = TcTiles<HD>;
#pragma unroll
  for (int kc = 0; kc < NB / 2; ++kc) {
    unsigned pa[4];
    accumulators_to_a(pa, p[2 * kc], p[2 * kc + 1]);
#pragma unroll
    for (int n = 0; n < Cfg::kDBlocks; ++n) {
      unsigned mb[2];
      load_b_kn(mb, M, Cfg::kStride, kc * 16, n * 8, g, t);
      mma_bf16(acc[n], pa, mb);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// What both kernel families share: where a block's rows lie, the softmax arithmetic, and the
// streaming of the other side's tiles through shared memory.

// The block's (batch, head) pair, blockIdx.x = b * NH + h. Row t of the head in a [B, T, width]
// tensor starts at (b T + t) width + h HD: qkv has width 3C (the head's keys C and its values 2C
// after its queries), out and dout width C. Its rows of lse and dsum [B, NH, T] start at bh T.
template <class T, int HD>
struct HeadView {
  std::int64_t bh, b, h, C, C3;
  int Tn;
  const T* q;  // row t at q + t * C3
  const T* k;
  const T* v;

  __device__ __forceinline__ HeadView(const T* qkv, int Tn_, std::int64_t C_, int NH)
      : bh(blockIdx.x), b(bh / NH), h(bh % NH), C(C_), C3(3 * C_), Tn(Tn_), q(qkv + b * Tn_ * C3 + h * HD),
        k(q + C_), v(q + 2 * C_) {}

  // Row 0 of the head in a [B, T, C] tensor (dout).
  __device__ __forceinline__ const T* rows_of(const T* x) const { return x + b * Tn * C + h * HD; }
  // Offset of row t of the head in a tensor of `width` columns.
  __device__ __forceinline__ std::int64_t offset(int t, std::int64_t width) const {
    return (b * Tn + t) * width + h * HD;
  }
};

// Scores live in the log2 domain (scaled by scale * log2 e) so that exp2f is the only exponential.
// A key past a row's limit (the causal mask, or T - 1) scores -inf.
__device__ __forceinline__ float masked_score(float s, float scale_log2, int key, int limit) {
  return key <= limit ? s * scale_log2 : -INFINITY;
}

// Online softmax: raises the running row max m to cover a tile whose max is tile_max; returns the
// factor that rescales what was summed under the old max.
__device__ __forceinline__ float raise_max(float& m, float tile_max) {
  const float m_new = fmaxf(m, tile_max);
  const float alpha = exp2f(m - m_new);
  m = m_new;
  return alpha;
}

// The natural log-sum-exp of a row from its log2-domain max and its sum of exp2f(s - max).
__device__ __forceinline__ float row_lse(float m, float total) { return m * kLn2 + logf(total); }

// What the backward needs of query q from the forward: its lse in the log2 domain and its dsum;
// zeros for a query past T.
__device__ __forceinline__ void query_statistics(float& lse2, float& dsum_q, const float* lse_row,
                                                 const float* dsum_row, int q, int Tn) {
  const bool valid = q < Tn;
  lse2 = valid ? lse_row[q] * kLog2e : 0.0f;
  dsum_q = valid ? dsum_row[q] : 0.0f;
}

// P of query q and key, recomputed from the query's lse2; 0 where the causal mask hides the key or
// the query is past T.
__device__ __forceinline__ float probability(float s, float scale_log2, float lse2, int key, int q, int Tn) {
  return key <= q && q < Tn ? exp2f(s * scale_log2 - lse2) : 0.0f;
}

// The first row of the block's own tile of T: query tiles (forward, dQ) are issued last-first,
// because under the causal mask the last tiles have the most key tiles to visit; key tiles (dK/dV)
// in order. Both families own kBlockRows rows (checked at the launchers).
__device__ __forceinline__ int owned_query_tile() { return (gridDim.y - 1 - blockIdx.y) * kBlockRows; }
__device__ __forceinline__ int owned_key_tile() { return blockIdx.y * kBlockRows; }

// A kernel's dynamic shared memory as consecutive tiles of E: pointers to the first tile (at the
// start) and to each following one, given the element counts of every tile but the last.
template <class E, class... Counts>
__device__ __forceinline__ std::array<E*, sizeof...(Counts) + 1> shared_tiles(Counts... counts) {
  extern __shared__ float4 smem_f4[];
  std::array<E*, sizeof...(Counts) + 1> tiles{reinterpret_cast<E*>(smem_f4)};
  int i = 0;
  ((tiles[i + 1] = tiles[i] + counts, ++i), ...);
  return tiles;
}

// Each family's tiles with what the streaming below needs of them: the rows a block owns, the rows
// of a streamed key tile (forward, dQ) and query tile (dK/dV), and how a tile of rows comes into
// shared memory.
template <class T, int HD>
struct CoreFamily : Tiles<HD> {
  using Shared = float;
  static constexpr int kKeys = Tiles<HD>::kCols;
  static constexpr int kQueries = Tiles<HD>::kCols;
  template <int ROWS>
  static __device__ __forceinline__ void load(float* dst, const T* src, std::int64_t row_stride, int valid) {
    load_rows<T, HD, ROWS, Tiles<HD>::kThreads>(dst, src, row_stride, valid);
  }
};

template <int HD>
struct TcFamily : TcTiles<HD> {
  using Shared = bf16;
  static constexpr int kRows = kTcRows;
  static constexpr int kThreads = kTcThreads;
  template <int ROWS>
  static __device__ __forceinline__ void load(bf16* dst, const bf16* src, std::int64_t row_stride, int valid) {
    copy_rows<HD, ROWS>(dst, src, row_stride, valid);
  }
};

// The block's own kRows rows from `first` on: rows first .. of the head's q (k, v) in qkv, or of
// dout (stride C).
template <class Family, class T>
__device__ __forceinline__ void load_own_rows(typename Family::Shared* dst, const T* rows, std::int64_t row_stride,
                                              int first, int Tn) {
  Family::template load<Family::kRows>(dst, rows + first * row_stride, row_stride, min(Family::kRows, Tn - first));
}

// Streams the key tiles that queries q0 .. q0 + kRows - 1 can see through sK and sV, in order,
// calling body(k0) once tile k0 .. k0 + kKeys - 1 is in place.
template <class Family, class T, int HD, class Body>
__device__ __forceinline__ void for_each_visible_key_tile(typename Family::Shared* sK, typename Family::Shared* sV,
                                                          const HeadView<T, HD>& head, int q0, Body&& body) {
  constexpr int kKeys = Family::kKeys;
  const int last_key = min(q0 + Family::kRows - 1, head.Tn - 1);
  const int key_tiles = last_key / kKeys + 1;
  for (int kt = 0; kt < key_tiles; ++kt) {
    const int k0 = kt * kKeys;
    __syncthreads();  // the previous tile's shared memory is consumed
    Family::template load<kKeys>(sK, head.k + k0 * head.C3, head.C3, min(kKeys, head.Tn - k0));
    Family::template load<kKeys>(sV, head.v + k0 * head.C3, head.C3, min(kKeys, head.Tn - k0));
    __syncthreads();
    body(k0);
  }
}

// Streams the query tiles that can see keys from k0 on (queries before k0 see none of them)
// through sQ and sdO, with each query's statistics in sLse and sDsum, in order, calling body(q0)
// once tile q0 .. q0 + kQueries - 1 is in place.
template <class Family, class T, int HD, class Body>
__device__ __forceinline__ void for_each_seeing_query_tile(typename Family::Shared* sQ, typename Family::Shared* sdO,
                                                           float* sLse, float* sDsum, const HeadView<T, HD>& head,
                                                           const T* dout, const float* lse, const float* dsum, int k0,
                                                           Body&& body) {
  constexpr int kQueries = Family::kQueries;
  const T* do_rows = head.rows_of(dout);
  const float* lse_row = lse + head.bh * head.Tn;
  const float* dsum_row = dsum + head.bh * head.Tn;
  const int query_tiles = (head.Tn + kQueries - 1) / kQueries;
  for (int qt = k0 / kQueries; qt < query_tiles; ++qt) {
    const int q0 = qt * kQueries;
    __syncthreads();  // the previous tile's shared memory is consumed
    Family::template load<kQueries>(sQ, head.q + q0 * head.C3, head.C3, min(kQueries, head.Tn - q0));
    Family::template load<kQueries>(sdO, do_rows + q0 * head.C, head.C, min(kQueries, head.Tn - q0));
    for (int c = threadIdx.x; c < kQueries; c += Family::kThreads)
      query_statistics(sLse[c], sDsum[c], lse_row, dsum_row, q0 + c, head.Tn);
    __syncthreads();
    body(q0);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward. Block (b*NH + h, query tile).

template <class T, int HD>
__global__ void __launch_bounds__(Tiles<HD>::kThreads, 2)
    attention_forward_kernel(T* out, float* lse, const T* qkv, int Tn, std::int64_t C, int NH, float scale_log2) {
  using Cfg = CoreFamily<T, HD>;
  constexpr int NJ = Cfg::kColsPerThread;
  const auto [sQ, sK, sV, sP] =
      shared_tiles<float>(Cfg::kRows * Cfg::kStride, Cfg::kCols * Cfg::kStride, Cfg::kCols * Cfg::kStride);

  const HeadView<T, HD> head(qkv, Tn, C, NH);
  const int q0 = owned_query_tile();
  const auto [tx, r0] = row_lanes();

  load_own_rows<Cfg>(sQ, head.q, head.C3, q0, Tn);

  float m[kRowsPerThread], l[kRowsPerThread], o[kRowsPerThread][Cfg::kChans];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;  // this thread's share of the row sum; the 16 shares are added at the end
#pragma unroll
    for (int c = 0; c < Cfg::kChans; ++c) o[i][c] = 0.0f;
  }

  // Tile 0 holds key 0, which every row may see (rows past T clamp their limit to T - 1), so every
  // row max is finite from the first tile on and exp2f(m_old - m_new) never meets -inf - -inf.
  for_each_visible_key_tile<Cfg>(sK, sV, head, q0, [&](int k0) {
    float s[kRowsPerThread][NJ];
    dot_rows<HD, NJ>(s, sQ + r0 * Cfg::kStride, sK + tx * Cfg::kStride);
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int limit = min(q0 + r0 + i, Tn - 1);
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        s[i][j] = masked_score(s[i][j], scale_log2, k0 + tx + kLanesPerRow * j, limit);
        tile_max = fmaxf(tile_max, s[i][j]);
      }
      const float alpha = raise_max(m[i], row_max(tile_max));
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        const float p = exp2f(s[i][j] - m[i]);
        sP[(r0 + i) * Cfg::kScoreStride + tx + kLanesPerRow * j] = p;
        sum += p;
      }
      l[i] = l[i] * alpha + sum;
#pragma unroll
      for (int c = 0; c < Cfg::kChans; ++c) o[i][c] *= alpha;
    }
    __syncthreads();  // sP complete
    accumulate_rows<HD, Cfg::kCols>(o, sP + r0 * Cfg::kScoreStride, sV, tx);
  });

#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const float total = row_sum(l[i]);
    const int q = q0 + r0 + i;
    if (q < Tn) {
      store_row<T, HD>(out + head.offset(q, C), o[i], 1.0f / total, tx);
      if (tx == 0) lse[head.bh * Tn + q] = row_lse(m[i], total);
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
  using Cfg = CoreFamily<T, HD>;
  constexpr int NJ = Cfg::kColsPerThread;
  // sS holds P^T, then dS^T, of the current query tile.
  const auto [sK, sV, sQ, sdO, sS, sLse, sDsum] =
      shared_tiles<float>(Cfg::kRows * Cfg::kStride, Cfg::kRows * Cfg::kStride, Cfg::kCols * Cfg::kStride,
                          Cfg::kCols * Cfg::kStride, Cfg::kRows * Cfg::kScoreStride, Cfg::kCols);

  const HeadView<T, HD> head(qkv, Tn, C, NH);
  const int k0 = owned_key_tile();
  const auto [tx, r0] = row_lanes();

  load_own_rows<Cfg>(sK, head.k, head.C3, k0, Tn);
  load_own_rows<Cfg>(sV, head.v, head.C3, k0, Tn);

  float dk[kRowsPerThread][Cfg::kChans], dv[kRowsPerThread][Cfg::kChans];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
    for (int c = 0; c < Cfg::kChans; ++c) dk[i][c] = dv[i][c] = 0.0f;

  for_each_seeing_query_tile<Cfg>(sQ, sdO, sLse, sDsum, head, dout, lse, dsum, k0, [&](int q0) {
    // Transposed scores: rows are this block's keys, columns the tile's queries.
    float s[kRowsPerThread][NJ], ds[kRowsPerThread][NJ];
    dot_rows<HD, NJ>(s, sK + r0 * Cfg::kStride, sQ + tx * Cfg::kStride);    // S^T = K Q^T
    dot_rows<HD, NJ>(ds, sV + r0 * Cfg::kStride, sdO + tx * Cfg::kStride);  // dP^T = V dO^T
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        const int c = tx + kLanesPerRow * j;
        const float p = probability(s[i][j], scale_log2, sLse[c], k0 + r0 + i, q0 + c, Tn);
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
  });

#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int key = k0 + r0 + i;
    if (key < Tn) {
      T* row = dqkv + head.offset(key, head.C3);
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
  using Cfg = CoreFamily<T, HD>;
  constexpr int NJ = Cfg::kColsPerThread;
  // sS holds dS of the current key tile.
  const auto [sQ, sdO, sK, sV, sS] = shared_tiles<float>(Cfg::kRows * Cfg::kStride, Cfg::kRows * Cfg::kStride,
                                                         Cfg::kCols * Cfg::kStride, Cfg::kCols * Cfg::kStride);

  const HeadView<T, HD> head(qkv, Tn, C, NH);
  const int q0 = owned_query_tile();
  const auto [tx, r0] = row_lanes();

  load_own_rows<Cfg>(sQ, head.q, head.C3, q0, Tn);
  load_own_rows<Cfg>(sdO, head.rows_of(dout), C, q0, Tn);

  float lse2[kRowsPerThread], dsum_i[kRowsPerThread], dq[kRowsPerThread][Cfg::kChans];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    query_statistics(lse2[i], dsum_i[i], lse + head.bh * Tn, dsum + head.bh * Tn, q0 + r0 + i, Tn);
#pragma unroll
    for (int c = 0; c < Cfg::kChans; ++c) dq[i][c] = 0.0f;
  }

  for_each_visible_key_tile<Cfg>(sK, sV, head, q0, [&](int k0) {
    float s[kRowsPerThread][NJ], dp[kRowsPerThread][NJ];
    dot_rows<HD, NJ>(s, sQ + r0 * Cfg::kStride, sK + tx * Cfg::kStride);    // S = Q K^T
    dot_rows<HD, NJ>(dp, sdO + r0 * Cfg::kStride, sV + tx * Cfg::kStride);  // dP = dO V^T
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        const int c = tx + kLanesPerRow * j;
        const float p = probability(s[i][j], scale_log2, lse2[i], k0 + c, q0 + r0 + i, Tn);
        sS[(r0 + i) * Cfg::kScoreStride + c] = p * (dp[i][j] - dsum_i[i]);
      }
    __syncthreads();  // sS = dS complete
    accumulate_rows<HD, Cfg::kCols>(dq, sS + r0 * Cfg::kScoreStride, sK, tx);
  });

#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int q = q0 + r0 + i;
    if (q < Tn) store_row<T, HD>(dqkv + head.offset(q, head.C3), dq[i], scale, tx);
  }
}

template <int HD>
__global__ void __launch_bounds__(kTcThreads)
    attention_forward_tc_kernel(bf16* out, float* lse, const bf16* qkv, int Tn, std::int64_t C, int NH,
                                float scale_log2) {
  using Cfg = TcFamily<HD>;
  constexpr int kStride = Cfg::kStride, kKeyBlocks = Cfg::kKeys / 8;
  const auto [sQ, sK, sV] = shared_tiles<bf16>(kTcRows * kStride, Cfg::kKeys * kStride);

  const HeadView<bf16, HD> head(qkv, Tn, C, NH);
  const int q0 = owned_query_tile();
  const auto [g, t, w0] = fragment_lanes();

  load_own_rows<Cfg>(sQ, head.q, head.C3, q0, Tn);
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
  zero_fragments(o);

  for_each_visible_key_tile<Cfg>(sK, sV, head, q0, [&](int k0) {
    float s[kKeyBlocks][4];  // S = Q K^T, 16 rows x 64 keys of this warp
    zero_fragments(s);
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
        s[n][e] = masked_score(s[n][e], scale_log2, k0 + n * 8 + 2 * t + e % 2, limit[e / 2]);
        tile_max[e / 2] = fmaxf(tile_max[e / 2], s[n][e]);
      }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      alpha[r] = raise_max(m[r], quad_max(tile_max[r]));
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
    accumulate_strip<HD>(o, s, sV, g, t);  // O += P V
  });

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float total = quad_sum(l[r]);
    if (row[r] < Tn) {
      store_fragment_row<HD>(out + head.offset(row[r], C), o, r, 1.0f / total, t);
      if (t == 0) lse[head.bh * Tn + row[r]] = row_lse(m[r], total);
    }
  }
}

// dK and dV on tensor cores: block (b*NH + h, key tile of 64), warp w owns keys k0 + 16 w .. + 15
// and computes S^T = K Q^T and dP^T = V dO^T strips, then dV += P^T dO and dK += dS^T Q.
template <int HD>
__global__ void __launch_bounds__(kTcThreads)
    attention_backward_dkv_tc_kernel(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* dsum,
                                     int Tn, std::int64_t C, int NH, float scale, float scale_log2) {
  using Cfg = TcFamily<HD>;
  constexpr int kStride = Cfg::kStride, kQueryBlocks = Cfg::kQueries / 8;
  const auto [sK, sV, sQ, sdO, statistics] =
      shared_tiles<bf16>(kTcRows * kStride, kTcRows * kStride, Cfg::kQueries * kStride, Cfg::kQueries * kStride);
  float* sLse = reinterpret_cast<float*>(statistics);
  float* sDsum = sLse + Cfg::kQueries;

  const HeadView<bf16, HD> head(qkv, Tn, C, NH);
  const int k0 = owned_key_tile();
  const auto [g, t, w0] = fragment_lanes();

  load_own_rows<Cfg>(sK, head.k, head.C3, k0, Tn);
  load_own_rows<Cfg>(sV, head.v, head.C3, k0, Tn);

  const int key[2] = {k0 + w0 + g, k0 + w0 + g + 8};  // keys of fragment rows 0 and 1
  float dk[Cfg::kDBlocks][4], dv[Cfg::kDBlocks][4];
  zero_fragments(dk);
  zero_fragments(dv);

  for_each_seeing_query_tile<Cfg>(sQ, sdO, sLse, sDsum, head, dout, lse, dsum, k0, [&](int q0) {
    float s[kQueryBlocks][4], dp[kQueryBlocks][4];  // S^T and dP^T: 16 keys x kQueries queries
    score_strips<HD>(s, dp, sK, sQ, sV, sdO, w0, g, t);
#pragma unroll
    for (int n = 0; n < kQueryBlocks; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = n * 8 + 2 * t + e % 2;
        const float p = probability(s[n][e], scale_log2, sLse[c], key[e / 2], q0 + c, Tn);
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
  });

#pragma unroll
  for (int r = 0; r < 2; ++r)
    if (key[r] < Tn) {
      bf16* row = dqkv + head.offset(key[r], head.C3);
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
  using Cfg = TcFamily<HD>;
  constexpr int kStride = Cfg::kStride, kKeyBlocks = Cfg::kKeys / 8;
  const auto [sQ, sdO, sK, sV] = shared_tiles<bf16>(kTcRows * kStride, kTcRows * kStride, Cfg::kKeys * kStride);

  const HeadView<bf16, HD> head(qkv, Tn, C, NH);
  const int q0 = owned_query_tile();
  const auto [g, t, w0] = fragment_lanes();

  load_own_rows<Cfg>(sQ, head.q, head.C3, q0, Tn);
  load_own_rows<Cfg>(sdO, head.rows_of(dout), C, q0, Tn);

  int row[2];
  float lse2[2], dsum_r[2], dq[Cfg::kDBlocks][4];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row[r] = q0 + w0 + g + 8 * r;
    query_statistics(lse2[r], dsum_r[r], lse + head.bh * Tn, dsum + head.bh * Tn, row[r], Tn);
  }
  zero_fragments(dq);

  for_each_visible_key_tile<Cfg>(sK, sV, head, q0, [&](int k0) {
    float s[kKeyBlocks][4], dp[kKeyBlocks][4];  // S = Q K^T and dP = dO V^T: 16 queries x 64 keys
    score_strips<HD>(s, dp, sQ, sK, sdO, sV, w0, g, t);
#pragma unroll
    for (int n = 0; n < kKeyBlocks; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = probability(s[n][e], scale_log2, lse2[e / 2], k0 + n * 8 + 2 * t + e % 2, row[e / 2], Tn);
        s[n][e] = p * (dp[n][e] - dsum_r[e / 2]);  // dS
      }
    accumulate_strip<HD>(dq, s, sK, g, t);  // dQ += dS K
  });

#pragma unroll
  for (int r = 0; r < 2; ++r)
    if (row[r] < Tn) store_fragment_row<HD>(dqkv + head.offset(row[r], head.C3), dq, r, scale, t);
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

// Calls fn.template operator()<HD>() for the supported head_dim (checked before).
template <class Fn, int... Ds>
void dispatch_head_dim(std::int64_t head_dim, Fn&& fn, HeadDimList<Ds...>) {
  (void)((head_dim == Ds ? (fn.template operator()<Ds>(), true) : false) || ...);
}

// NOTE: bf16 runs on the tensor-core kernels. Setting this false sends bf16 through the CUDA-core
// kernels instead (fp32 arithmetic, bf16 only at loads and stores): slower, but a reference that
// differs from fp32 only by the rounding of inputs and outputs.
constexpr bool kBf16OnTensorCores = true;
template <class T>
constexpr bool on_tensor_cores = std::is_same_v<T, bf16>&& kBf16OnTensorCores;
static_assert(kTcRows == kBlockRows, "both kernel families tile T by kBlockRows rows (the launchers' grid)");

// Each family's kernels for one head dim, with their names, block size and shared memory; the
// launchers take them from Kernels<T, HD>.
template <class T, int HD>
struct CoreKernels {
  static constexpr int kThreads = Tiles<HD>::kThreads;
  static constexpr std::size_t kForwardBytes = Tiles<HD>::kForwardFloats * sizeof(float);
  static constexpr std::size_t kDkvBytes = Tiles<HD>::kDkvFloats * sizeof(float);
  static constexpr std::size_t kDqBytes = Tiles<HD>::kDqFloats * sizeof(float);
  static constexpr const char* kForwardName = "attention_forward_kernel";
  static constexpr const char* kDkvName = "attention_backward_dkv_kernel";
  static constexpr const char* kDqName = "attention_backward_dq_kernel";
  static auto forward() { return attention_forward_kernel<T, HD>; }
  static auto dkv() { return attention_backward_dkv_kernel<T, HD>; }
  static auto dq() { return attention_backward_dq_kernel<T, HD>; }
};

template <int HD>
struct TcKernels {
  static constexpr int kThreads = kTcThreads;
  static constexpr std::size_t kForwardBytes = TcTiles<HD>::kForwardBytes;
  static constexpr std::size_t kDkvBytes = TcTiles<HD>::kDkvBytes;
  static constexpr std::size_t kDqBytes = TcTiles<HD>::kDqBytes;
  static constexpr const char* kForwardName = "attention_forward_tc_kernel";
  static constexpr const char* kDkvName = "attention_backward_dkv_tc_kernel";
  static constexpr const char* kDqName = "attention_backward_dq_tc_kernel";
  static auto forward() { return attention_forward_tc_kernel<HD>; }
  static auto dkv() { return attention_backward_dkv_tc_kernel<HD>; }
  static auto dq() { return attention_backward_dq_tc_kernel<HD>; }
};

template <class T, int HD>
using Kernels = std::conditional_t<on_tensor_cores<T>, TcKernels<HD>, CoreKernels<T, HD>>;

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

// What the launchers pass every kernel: the scales, T and NH as ints, and the grid, block
// (b*NH + h, tile of kBlockRows rows of T).
struct LaunchPlan {
  float scale, scale_log2;
  int tn, nh;
  dim3 grid;
};

LaunchPlan plan_launch(std::int64_t head_dim, std::int64_t B, std::int64_t Tn, std::int64_t NH) {
  LaunchPlan plan;
  plan.scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  plan.scale_log2 = kLog2e / std::sqrt(static_cast<float>(head_dim));
  plan.tn = static_cast<int>(Tn);
  plan.nh = static_cast<int>(NH);
  plan.grid = dim3(static_cast<unsigned>(B * NH), static_cast<unsigned>((Tn + kBlockRows - 1) / kBlockRows));
  return plan;
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
  const LaunchPlan p = plan_launch(head_dim, B, Tn, NH);
  dispatch_head_dim(
      head_dim,
      [&]<int HD>() {
        using K = Kernels<T, HD>;
        auto kernel = K::forward();
        allow_shared_memory(kernel, K::kForwardBytes, K::kForwardName);
        kernel<<<p.grid, K::kThreads, K::kForwardBytes, stream>>>(out, lse, qkv, p.tn, C, p.nh, p.scale_log2);
        check_launch(K::kForwardName);
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
  const LaunchPlan p = plan_launch(head_dim, B, Tn, NH);
  dispatch_head_dim(
      head_dim,
      [&]<int HD>() {
        const std::int64_t rows = B * Tn * NH;
        const std::int64_t blocks = std::min<std::int64_t>((rows + kDsumWarps - 1) / kDsumWarps, std::int64_t{1} << 20);
        attention_backward_dsum_kernel<T, HD>
            <<<static_cast<unsigned>(blocks), 32 * kDsumWarps, 0, stream>>>(dsum, dout, out, rows, p.tn, p.nh);
        check_launch("attention_backward_dsum_kernel");

        using K = Kernels<T, HD>;
        auto dkv = K::dkv();
        auto dq = K::dq();
        allow_shared_memory(dkv, K::kDkvBytes, K::kDkvName);
        allow_shared_memory(dq, K::kDqBytes, K::kDqName);
        dkv<<<p.grid, K::kThreads, K::kDkvBytes, stream>>>(dqkv, dout, qkv, lse, dsum, p.tn, C, p.nh, p.scale,
                                                           p.scale_log2);
        check_launch(K::kDkvName);
        dq<<<p.grid, K::kThreads, K::kDqBytes, stream>>>(dqkv, dout, qkv, lse, dsum, p.tn, C, p.nh, p.scale,
                                                         p.scale_log2);
        check_launch(K::kDqName);
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
