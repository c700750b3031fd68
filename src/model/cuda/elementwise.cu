// CUDA embeddings, LayerNorm, GELU, residual adds and fused softmax cross-entropy: the GPU twins of
// src/model/cpu/ops.cpp, fp32 arithmetic on T = float or bf16 storage, 128-bit accesses where the
// pointers allow, no float atomics. Embedding gradients are gathered per token after a stable radix
// sort of the positions by token (llm.c's deterministic encoder backward, Karpathy 2024, does the
// sort on the host; here it stays on the device so a step can be captured in a CUDA graph).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <type_traits>

#include "core/cuda/check.cuh"
#include "model/cuda/convert.cuh"
#include "model/cuda/gelu.cuh"
#include "model/cuda/ops.cuh"
#include "nibble/error.hpp"

namespace nibble::model::cuda {
namespace {

using i64 = std::int64_t;

// The CPU op's constants (src/model/cpu/ops.cpp), bit for bit.
constexpr float kLayerNormEps = 1e-5f;

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Grid-stride kernels (elementwise ops, embedding forward, dwpe).
constexpr int kMapThreads = 256;
constexpr i64 kMaxBlocks = i64{1} << 16;

// Row kernels (LayerNorm): one warp per row, kRowsPerBlock rows per block.
constexpr int kRowThreads = 256;
constexpr int kRowsPerBlock = kRowThreads / kWarp;

// LayerNorm dweight/dbias: a thread sums one column unit over a chunk of rows into scratch; the
// chunking depends on N only (at least kMinChunkRows rows, at most kMaxChunks chunks), so every
// run of a shape adds in the same order.
constexpr int kColumnThreads = 128;
constexpr i64 kMinChunkRows = 32;
constexpr i64 kMaxChunks = 256;

// Cross-entropy: a warp per row up to kWarpRowVocab, else a block of kCrossEntropyThreads per row.
constexpr int kCrossEntropyThreads = 256;
constexpr i64 kWarpRowVocab = 1024;

// Embedding backward. Radix sort: 8-bit digits, one key per thread, so a block's tile of
// kSortThreads keys has one thread per digit value for the tile histogram.
constexpr int kDigitBits = 8;
constexpr int kDigits = 1 << kDigitBits;
constexpr int kSortThreads = kDigits;
constexpr int kSortWarps = kSortThreads / kWarp;
constexpr int kScanThreads = 1024;
// dwte: a block owns the runs (equal tokens in sorted order) that start in its tile of
// kDwteThreads sorted entries, for one 32-column tile. A run of up to kShortRun entries is summed
// by one warp in position order; a longer one by all kDwteWarps warps as row lanes.
constexpr int kDwteThreads = 1024;
constexpr int kDwteWarps = kDwteThreads / kWarp;
constexpr i64 kShortRun = 64;
constexpr std::size_t kScratchAlign = 256;

template <class T>
inline constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 128-bit access

template <class T>
constexpr bool kSupported = std::is_same_v<T, float> || std::is_same_v<T, bf16>;

constexpr i64 ceil_div(i64 a, i64 b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Device helpers.

// NOTE: the CPU ops are compiled with -ffp-contract=off and nibble keeps one rounding behaviour
// on both sides. nvcc gets -fmad=false (CMakeLists.txt), and a product that feeds an add is also
// written mul(a, b) (__fmul_rn, which nvcc never fuses), so the kernels round like the CPU code
// whatever the flags, and differ from it only in the order of long sums and in expf/tanhf.
__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }

__device__ __forceinline__ unsigned bf16_bits(float v) {
  return static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16_rn(v)));
}

// W consecutive elements at p as floats: W == 1 is a scalar access; otherwise W is a multiple of
// kVec<T> and p is 16-byte aligned, and each 16 bytes are one 128-bit access.
template <int W, class T>
__device__ __forceinline__ void load(const T* p, float (&out)[W]) {
  if constexpr (W == 1) {
    out[0] = to_float(p[0]);
  } else {
    static_assert(W % kVec<T> == 0, "a vector width is a whole number of 128-bit accesses");
#pragma unroll
    for (int j = 0; j < W; j += kVec<T>) {
      const uint4 raw = *reinterpret_cast<const uint4*>(p + j);
      const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if constexpr (std::is_same_v<T, float>) {
          out[j + k] = __uint_as_float(words[k]);
        } else {  // two bf16 per word, the lower address in the low half
          out[j + 2 * k] = __uint_as_float(words[k] << 16);
          out[j + 2 * k + 1] = __uint_as_float(words[k] & 0xffff0000u);
        }
      }
    }
  }
}

template <int W, class T>
__device__ __forceinline__ void store(T* p, const float (&in)[W]) {
  if constexpr (W == 1) {
    p[0] = from_float<T>(in[0]);
  } else {
    static_assert(W % kVec<T> == 0, "a vector width is a whole number of 128-bit accesses");
#pragma unroll
    for (int j = 0; j < W; j += kVec<T>) {
      unsigned words[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if constexpr (std::is_same_v<T, float>)
          words[k] = __float_as_uint(in[j + k]);
        else
          words[k] = bf16_bits(in[j + 2 * k]) | (bf16_bits(in[j + 2 * k + 1]) << 16);
      }
      *reinterpret_cast<uint4*>(p + j) = make_uint4(words[0], words[1], words[2], words[3]);
    }
  }
}

__device__ __forceinline__ i64 global_thread() {
  return static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ i64 grid_threads() { return static_cast<i64>(gridDim.x) * blockDim.x; }

// Butterfly sum: lane i adds x_i + x_j where lane j adds x_j + x_i, equal by commutativity, so
// every lane ends with the same bits.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// ---------------------------------------------------------------------------------------------
// Elementwise: GELU, residual.

struct GeluForward {
  __device__ float operator()(float x) const { return gelu_tanh(x); }
};

struct GeluBackward {
  __device__ float operator()(float x, float dout) const {
    const float cube = mul(mul(mul(kGeluCubic, x), x), x);
    const float th = tanhf(kGeluScale * (x + cube));
    const float dth = (1.0f - mul(th, th)) * kGeluScale * (1.0f + mul(mul(3.0f * kGeluCubic, x), x));
    return (mul(0.5f, 1.0f + th) + mul(mul(0.5f, x), dth)) * dout;
  }
};

struct Add {
  __device__ float operator()(float a, float b) const { return a + b; }
};

// out[i] = fn(in[i]). Each element is read and written by one thread, so out may alias in.
// W-wide units cover the first n / W * W elements, a scalar loop the rest.
template <class T, int W, class Fn>
__global__ void __launch_bounds__(kMapThreads) unary_kernel(T* out, const T* in, i64 n, Fn fn) {
  const i64 units = n / W;
  for (i64 u = global_thread(); u < units; u += grid_threads()) {
    float x[W], y[W];
    load<W>(in + u * W, x);
#pragma unroll
    for (int k = 0; k < W; ++k) y[k] = fn(x[k]);
    store<W>(out + u * W, y);
  }
  for (i64 i = units * W + global_thread(); i < n; i += grid_threads()) out[i] = from_float<T>(fn(to_float(in[i])));
}

// out[i] = fn(a[i], b[i]); out may alias a or b.
template <class T, int W, class Fn>
__global__ void __launch_bounds__(kMapThreads) binary_kernel(T* out, const T* a, const T* b, i64 n, Fn fn) {
  const i64 units = n / W;
  for (i64 u = global_thread(); u < units; u += grid_threads()) {
    float x[W], y[W], z[W];
    load<W>(a + u * W, x);
    load<W>(b + u * W, y);
#pragma unroll
    for (int k = 0; k < W; ++k) z[k] = fn(x[k], y[k]);
    store<W>(out + u * W, z);
  }
  for (i64 i = units * W + global_thread(); i < n; i += grid_threads())
    out[i] = from_float<T>(fn(to_float(a[i]), to_float(b[i])));
}

// ---------------------------------------------------------------------------------------------
// Embedding forward and the positional gradient. W divides C; rows are then W-aligned too.

template <class T, int W>
__global__ void __launch_bounds__(kMapThreads)
    embedding_forward_kernel(T* out, const std::int32_t* tokens, const T* wte, const T* wpe, i64 N, i64 Tn, i64 C) {
  const i64 per_row = C / W;
  for (i64 u = global_thread(); u < N * per_row; u += grid_threads()) {
    const i64 row = u / per_row;
    const i64 c = (u - row * per_row) * W;
    const i64 token = tokens[row];  // the caller validated it against the vocabulary
    float e[W], p[W], o[W];
    load<W>(wte + token * C + c, e);
    load<W>(wpe + (row % Tn) * C + c, p);
#pragma unroll
    for (int k = 0; k < W; ++k) o[k] = e[k] + p[k];
    store<W>(out + row * C + c, o);
  }
}

// dwpe[t, c] += dout[0, t, c] + dout[1, t, c] + ..., added in b order onto dwpe's value, as the
// CPU op does.
template <class T, int W>
__global__ void __launch_bounds__(kMapThreads) embedding_dwpe_kernel(float* dwpe, const T* dout, i64 B, i64 Tn, i64 C) {
  const i64 per_row = C / W;
  for (i64 u = global_thread(); u < Tn * per_row; u += grid_threads()) {
    const i64 t = u / per_row;
    const i64 c = (u - t * per_row) * W;
    float acc[W];
    load<W>(dwpe + t * C + c, acc);
#pragma unroll 4
    for (i64 b = 0; b < B; ++b) {
      float d[W];
      load<W>(dout + (b * Tn + t) * C + c, d);
#pragma unroll
      for (int k = 0; k < W; ++k) acc[k] += d[k];
    }
    store<W>(dwpe + t * C + c, acc);
  }
}

// ---------------------------------------------------------------------------------------------
// Embedding backward, token gradient: a stable LSD radix sort of (token, position) pairs by token
// in scratch, then each run of equal tokens summed by one owner in a fixed order. No atomics at
// all: a tile's digit counts and ranks come from warp match masks and per-warp counts in shared
// memory.

// keys[i] = tokens[i], or V for a token outside [0, V) (such positions are then skipped, never
// read out of bounds); vals[i] = i.
__global__ void __launch_bounds__(kMapThreads)
    embedding_keys_kernel(int* keys, int* vals, const std::int32_t* tokens, i64 N, int V) {
  for (i64 i = global_thread(); i < N; i += grid_threads()) {
    const std::int32_t token = tokens[i];
    keys[i] = (token >= 0 && token < V) ? token : V;
    vals[i] = static_cast<int>(i);
  }
}

// For the calling thread's digit (kDigits: none), its rank among equal digits of lower threads of
// the block; and for digit d = threadIdx.x, the block's count of d. Must be called by the whole
// block.
__device__ void tile_digit_rank(int digit, int (&warp_counts)[kSortWarps][kDigits], int& rank, int& count) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int w = 0; w < kSortWarps; ++w) warp_counts[w][threadIdx.x] = 0;
  __syncthreads();
  const unsigned peers = __match_any_sync(kFullMask, digit);
  if (digit < kDigits && lane == __ffs(peers) - 1) warp_counts[warp][digit] = __popc(peers);
  __syncthreads();
  rank = __popc(peers & ((1u << lane) - 1u));
  if (digit < kDigits)
    for (int w = 0; w < warp; ++w) rank += warp_counts[w][digit];
  count = 0;
  for (int w = 0; w < kSortWarps; ++w) count += warp_counts[w][threadIdx.x];
}

__device__ __forceinline__ int digit_of(int key, int shift) {
  return static_cast<int>((static_cast<unsigned>(key) >> shift) & (kDigits - 1));
}

// table[d * tiles + tile] = count of digit d in the tile (digit-major, so its exclusive scan is the
// first output slot of each (digit, tile)).
__global__ void __launch_bounds__(kSortThreads) radix_count_kernel(const int* keys, i64 N, int shift, int* table, i64 tiles) {
  __shared__ int warp_counts[kSortWarps][kDigits];
  const i64 i = static_cast<i64>(blockIdx.x) * kSortThreads + threadIdx.x;
  const int digit = i < N ? digit_of(keys[i], shift) : kDigits;
  int rank, count;
  tile_digit_rank(digit, warp_counts, rank, count);
  table[static_cast<i64>(threadIdx.x) * tiles + blockIdx.x] = count;
}

// Stable scatter: the slot of an entry is the scanned table's slot for its (digit, tile) plus its
// rank among equal digits earlier in the tile.
__global__ void __launch_bounds__(kSortThreads)
    radix_scatter_kernel(const int* keys_in, const int* vals_in, int* keys_out, int* vals_out, i64 N, int shift,
                         const int* table, i64 tiles) {
  __shared__ int warp_counts[kSortWarps][kDigits];
  const i64 i = static_cast<i64>(blockIdx.x) * kSortThreads + threadIdx.x;
  const int key = i < N ? keys_in[i] : 0;
  const int digit = i < N ? digit_of(key, shift) : kDigits;
  int rank, count;
  tile_digit_rank(digit, warp_counts, rank, count);
  if (i < N) {
    const i64 slot = table[static_cast<i64>(digit) * tiles + blockIdx.x] + rank;
    keys_out[slot] = key;
    vals_out[slot] = vals_in[i];
  }
}

__device__ __forceinline__ int warp_inclusive_scan(int v) {
  const int lane = threadIdx.x % kWarp;
#pragma unroll
  for (int offset = 1; offset < kWarp; offset <<= 1) {
    const int other = __shfl_up_sync(kFullMask, v, offset);
    if (lane >= offset) v += other;
  }
  return v;
}

// In-place exclusive prefix sum of n ints (totals stay below 2^31: they count positions), by one
// block: each thread owns a contiguous strip, the strip sums are scanned across the block, then
// each thread rewrites its strip.
__global__ void __launch_bounds__(kScanThreads) exclusive_scan_kernel(int* data, i64 n) {
  __shared__ int warp_totals[kScanThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const i64 per = ceil_div(n, kScanThreads);
  const i64 begin = std::min(n, static_cast<i64>(threadIdx.x) * per);
  const i64 end = std::min(n, begin + per);
  int local = 0;
  for (i64 i = begin; i < end; ++i) local += data[i];
  const int inclusive = warp_inclusive_scan(local);
  if (lane == kWarp - 1) warp_totals[warp] = inclusive;
  __syncthreads();
  if (warp == 0) warp_totals[lane] = warp_inclusive_scan(warp_totals[lane]);
  __syncthreads();
  int offset = inclusive - local + (warp > 0 ? warp_totals[warp - 1] : 0);
  for (i64 i = begin; i < end; ++i) {
    const int v = data[i];
    data[i] = offset;
    offset += v;
  }
}

// bucket_end[k] = one past the last sorted entry of key k (written for the keys present only).
__global__ void __launch_bounds__(kMapThreads) run_ends_kernel(const int* keys, i64 N, int* bucket_end) {
  for (i64 i = global_thread(); i < N; i += grid_threads()) {
    const int key = keys[i];
    if (i + 1 == N || keys[i + 1] != key) bucket_end[key] = static_cast<int>(i + 1);
  }
}

// dwte[v, c] += sum of dout[p, c] over the positions p of token v. keys/pos are sorted by token,
// positions ascending within a token. Each run is owned by the block whose tile holds its first
// entry, so each dwte element has exactly one writer. A short run is summed by one warp (lane =
// column) onto dwte's value in position order, the CPU op's order; a long run by every warp of the
// block, warp w taking entries w, w + 32, ..., and the 32 partial sums then added in warp order.
template <class T>
__global__ void __launch_bounds__(kDwteThreads)
    embedding_dwte_kernel(float* dwte, const T* dout, const int* keys, const int* pos, const int* bucket_end, i64 N,
                          i64 C, int V) {
  __shared__ int run_key[kDwteThreads];
  __shared__ int run_end[kDwteThreads];
  __shared__ unsigned long_starts[kDwteWarps];  // per warp: lanes whose entry starts a long run
  __shared__ float partial[kDwteWarps][kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const i64 tile0 = static_cast<i64>(blockIdx.x) * kDwteThreads;
  const i64 i = tile0 + threadIdx.x;
  int key = 0, end = 0;
  bool starts_run = false;
  if (i < N) {
    key = keys[i];
    starts_run = key < V && (i == 0 || keys[i - 1] != key);  // key V: a skipped token
    if (starts_run) end = bucket_end[key];
  }
  const bool is_long = starts_run && end - i > kShortRun;
  const unsigned short_starts = __ballot_sync(kFullMask, starts_run && !is_long);
  const unsigned long_mask = __ballot_sync(kFullMask, is_long);
  run_key[threadIdx.x] = key;
  run_end[threadIdx.x] = end;
  if (lane == 0) long_starts[warp] = long_mask;
  __syncthreads();

  const auto row_value = [&](i64 j, i64 c) { return to_float(dout[static_cast<i64>(pos[j]) * C + c]); };
  for (i64 c0 = static_cast<i64>(blockIdx.y) * kWarp; c0 < C; c0 += static_cast<i64>(gridDim.y) * kWarp) {
    const i64 c = c0 + lane;
    const bool in_row = c < C;
    // Short runs starting in this warp's 32 entries, one after another.
    for (unsigned m = short_starts; m != 0; m &= m - 1) {
      const int t = warp * kWarp + __ffs(m) - 1;
      if (!in_row) continue;
      float* dst = dwte + static_cast<i64>(run_key[t]) * C + c;
      float acc = *dst;
      i64 j = tile0 + t;
      const i64 e = run_end[t];
      for (; j + 4 <= e; j += 4) {  // four loads in flight, added in order
        const float a0 = row_value(j, c), a1 = row_value(j + 1, c), a2 = row_value(j + 2, c),
                    a3 = row_value(j + 3, c);
        acc += a0;
        acc += a1;
        acc += a2;
        acc += a3;
      }
      for (; j < e; ++j) acc += row_value(j, c);
      *dst = acc;
    }
    // Long runs, each by the whole block (the masks are in shared memory: the loop is uniform).
    for (int w = 0; w < kDwteWarps; ++w) {
      for (unsigned m = long_starts[w]; m != 0; m &= m - 1) {
        const int t = w * kWarp + __ffs(m) - 1;
        const i64 e = run_end[t];
        float acc = 0.0f;
        if (in_row) {
          i64 j = tile0 + t + warp;
          for (; j + 3 * kWarp < e; j += 4 * kWarp) {
            const float a0 = row_value(j, c), a1 = row_value(j + kWarp, c), a2 = row_value(j + 2 * kWarp, c),
                        a3 = row_value(j + 3 * kWarp, c);
            acc += a0;
            acc += a1;
            acc += a2;
            acc += a3;
          }
          for (; j < e; j += kWarp) acc += row_value(j, c);
        }
        partial[warp][lane] = acc;
        __syncthreads();
        if (warp == 0 && in_row) {
          float* dst = dwte + static_cast<i64>(run_key[t]) * C + c;
          float total = 0.0f;
          for (int k = 0; k < kDwteWarps; ++k) total += partial[k][lane];
          *dst += total;
        }
        __syncthreads();  // partial is reused by the next run
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm. One warp per row; a row is read once per pass (three passes, the later ones mostly
// from L1/L2) so that any C works without holding the row in registers.

template <class T, int W>
__global__ void __launch_bounds__(kRowThreads)
    layernorm_forward_kernel(T* out, float* mean, float* rstd, const T* in, const T* weight, const T* bias, i64 N,
                             i64 C) {
  const i64 row = static_cast<i64>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= N) return;  // the whole warp: row is the same for its 32 lanes
  const int lane = threadIdx.x % kWarp;
  const T* x = in + row * C;
  T* o = out + row * C;
  const i64 units = C / W;
  const float inv_c = 1.0f / static_cast<float>(C);

  float sum = 0.0f;
  for (i64 u = lane; u < units; u += kWarp) {
    float v[W];
    load<W>(x + u * W, v);
#pragma unroll
    for (int k = 0; k < W; ++k) sum += v[k];
  }
  const float m = warp_sum(sum) * inv_c;
  // Two passes (mean, then squared deviations), as the CPU op: E[x^2] - m^2 cancels badly.
  float var = 0.0f;
  for (i64 u = lane; u < units; u += kWarp) {
    float v[W];
    load<W>(x + u * W, v);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float dx = v[k] - m;
      var += mul(dx, dx);
    }
  }
  const float s = 1.0f / sqrtf(mul(warp_sum(var), inv_c) + kLayerNormEps);
  for (i64 u = lane; u < units; u += kWarp) {
    float v[W], w[W], b[W], y[W];
    load<W>(x + u * W, v);
    load<W>(weight + u * W, w);
    load<W>(bias + u * W, b);
#pragma unroll
    for (int k = 0; k < W; ++k) y[k] = mul(mul(v[k] - m, s), w[k]) + b[k];
    store<W>(o + u * W, y);
  }
  if (lane == 0) {
    mean[row] = m;
    rstd[row] = s;
  }
}

// din += rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dout * weight, per row.
template <class T, int W>
__global__ void __launch_bounds__(kRowThreads)
    layernorm_din_kernel(T* din, const T* dout, const T* in, const T* weight, const float* mean, const float* rstd,
                         i64 N, i64 C) {
  const i64 row = static_cast<i64>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= N) return;
  const int lane = threadIdx.x % kWarp;
  const T* x = in + row * C;
  const T* d = dout + row * C;
  T* dx = din + row * C;
  const i64 units = C / W;
  const float inv_c = 1.0f / static_cast<float>(C);
  const float m = mean[row], s = rstd[row];

  float sum_g = 0.0f, sum_gx = 0.0f;
  for (i64 u = lane; u < units; u += kWarp) {
    float dv[W], xv[W], wv[W];
    load<W>(d + u * W, dv);
    load<W>(x + u * W, xv);
    load<W>(weight + u * W, wv);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float g = mul(dv[k], wv[k]);
      sum_g += g;
      sum_gx += mul(g, mul(xv[k] - m, s));
    }
  }
  const float g_mean = warp_sum(sum_g) * inv_c;
  const float gx_mean = warp_sum(sum_gx) * inv_c;
  for (i64 u = lane; u < units; u += kWarp) {
    float dv[W], xv[W], wv[W], out[W];
    load<W>(d + u * W, dv);
    load<W>(x + u * W, xv);
    load<W>(weight + u * W, wv);
    load<W>(dx + u * W, out);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float xhat = mul(xv[k] - m, s);
      out[k] += mul(s, mul(dv[k], wv[k]) - g_mean - mul(xhat, gx_mean));
    }
    store<W>(dx + u * W, out);
  }
}

// partial_w[chunk, c] = sum over the chunk's rows, in order, of dout * xhat; partial_b the same of
// dout. One thread per W-column unit; blockIdx.y is the chunk.
template <class T, int W>
__global__ void __launch_bounds__(kColumnThreads)
    layernorm_column_partials_kernel(float* partial_w, float* partial_b, const T* dout, const T* in, const float* mean,
                                     const float* rstd, i64 N, i64 C, i64 chunk_rows) {
  const i64 unit = global_thread();
  if (unit >= C / W) return;
  const i64 c = unit * W;
  const i64 chunk = blockIdx.y;
  const i64 r0 = chunk * chunk_rows, r1 = std::min(N, r0 + chunk_rows);
  float acc_w[W], acc_b[W];
#pragma unroll
  for (int k = 0; k < W; ++k) acc_w[k] = acc_b[k] = 0.0f;
#pragma unroll 4
  for (i64 r = r0; r < r1; ++r) {
    const float m = mean[r], s = rstd[r];
    float dv[W], xv[W];
    load<W>(dout + r * C + c, dv);
    load<W>(in + r * C + c, xv);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      acc_w[k] += mul(dv[k], mul(xv[k] - m, s));
      acc_b[k] += dv[k];
    }
  }
  store<W>(partial_w + chunk * C + c, acc_w);
  store<W>(partial_b + chunk * C + c, acc_b);
}

// dweight[c] += sum over chunks, in chunk order, of partial_w[chunk, c]; dbias likewise.
__global__ void __launch_bounds__(kMapThreads)
    layernorm_column_finalize_kernel(float* dweight, float* dbias, const float* partial_w, const float* partial_b,
                                     i64 C, i64 chunks) {
  const i64 c = global_thread();
  if (c >= C) return;
  float w = 0.0f, b = 0.0f;
#pragma unroll 8
  for (i64 k = 0; k < chunks; ++k) {
    w += partial_w[k * C + c];
    b += partial_b[k * C + c];
  }
  dweight[c] += w;
  dbias[c] += b;
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy.

struct MaxSum {
  float max;  // running maximum
  float sum;  // sum of exp(x - max)
};

// Adds one logit. A -inf logit adds exp(-inf) = 0 and is skipped (exp(-inf - -inf) would be NaN);
// a NaN logit makes the sum NaN.
__device__ __forceinline__ void online_add(MaxSum& a, float x) {
  if (x > a.max) {
    a.sum = mul(a.sum, expf(a.max - x)) + 1.0f;
    a.max = x;
  } else if (x != -INFINITY) {
    a.sum += expf(x - a.max);
  }
}

// Symmetric in its arguments bit for bit (fmaxf and a sum of two unfused products), so every lane
// of a butterfly ends with the same value.
__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return {m, a.sum + b.sum};  // nothing but -inf on either side
  return {m, mul(a.sum, expf(a.max - m)) + mul(b.sum, expf(b.max - m))};
}

// The (max, sum) of a row over its kRowThreads threads, the same bits in each of them. Ends with a
// barrier over the row's threads, which orders every read of the row before any write after it.
template <int kThreadsPerRow>
__device__ __forceinline__ MaxSum row_reduce(MaxSum v, MaxSum* warp_results) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    const MaxSum other{__shfl_xor_sync(kFullMask, v.max, offset), __shfl_xor_sync(kFullMask, v.sum, offset)};
    v = combine(v, other);
  }
  if constexpr (kThreadsPerRow == kWarp) {
    __syncwarp();
    return v;
  } else {
    static_assert(kThreadsPerRow == kCrossEntropyThreads, "a row is one warp or the whole block");
    if (threadIdx.x % kWarp == 0) warp_results[threadIdx.x / kWarp] = v;
    __syncthreads();
    MaxSum total = warp_results[0];
    for (int w = 1; w < kThreadsPerRow / kWarp; ++w) total = combine(total, warp_results[w]);
    return total;
  }
}

// loss = log(sum exp(x - max)) - (x[target] - max); with backward, logits[0, V) become
// (softmax - onehot(target)) * dloss. Each element is read and written by the same thread; the
// target logit is read by the row's first thread before row_reduce's barrier. A target outside
// [0, V) is never read: its loss is NaN and its gradient has no onehot term.
template <class T, int W, int kThreadsPerRow>
__global__ void __launch_bounds__(kCrossEntropyThreads)
    crossentropy_kernel(float* losses, T* logits, const std::int32_t* targets, float dloss, bool backward, i64 BT,
                        i64 V, i64 stride) {
  constexpr int kRowsPer = kCrossEntropyThreads / kThreadsPerRow;
  __shared__ MaxSum warp_results[kCrossEntropyThreads / kWarp];
  const int r = threadIdx.x % kThreadsPerRow;
  const i64 row = static_cast<i64>(blockIdx.x) * kRowsPer + threadIdx.x / kThreadsPerRow;
  if (row >= BT) return;  // only whole warps in the warp-per-row layout (the block layout has BT blocks)
  T* x = logits + row * stride;
  const i64 target = targets[row];
  const bool target_ok = target >= 0 && target < V;
  const float target_logit = (r == 0 && target_ok) ? to_float(x[target]) : 0.0f;

  const i64 units = V / W;
  MaxSum acc{-INFINITY, 0.0f};
  for (i64 u = r; u < units; u += kThreadsPerRow) {
    float v[W];
    load<W>(x + u * W, v);
#pragma unroll
    for (int k = 0; k < W; ++k) online_add(acc, v[k]);
  }
  for (i64 i = units * W + r; i < V; i += kThreadsPerRow) online_add(acc, to_float(x[i]));
  const MaxSum total = row_reduce<kThreadsPerRow>(acc, warp_results);
  if (r == 0)
    losses[row] = target_ok ? logf(total.sum) - (target_logit - total.max) : std::numeric_limits<float>::quiet_NaN();
  if (!backward) return;

  const float inv = 1.0f / total.sum;
  for (i64 u = r; u < units; u += kThreadsPerRow) {
    float v[W];
    load<W>(x + u * W, v);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float p = mul(expf(v[k] - total.max), inv);
      v[k] = (p - (u * W + k == target ? 1.0f : 0.0f)) * dloss;
    }
    store<W>(x + u * W, v);
  }
  for (i64 i = units * W + r; i < V; i += kThreadsPerRow) {
    const float p = mul(expf(to_float(x[i]) - total.max), inv);
    x[i] = from_float<T>((p - (i == target ? 1.0f : 0.0f)) * dloss);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

using nibble::cuda::check_launch;

// A launcher's argument with its parameter name, for the messages of the checks below.
template <class V>
struct Named {
  const char* name;
  V value;
};

// The checks each launcher makes of its arguments, in the order given; the first that fails
// throws InvalidArgument naming the launcher and the argument.
void require_sizes(const char* where, std::initializer_list<Named<i64>> sizes) {
  for (const auto& [name, value] : sizes)
    if (value < 0)
      throw InvalidArgument(std::string(where) + ": negative size " + name + " = " + std::to_string(value));
}

void require_pointers(const char* where, std::initializer_list<Named<const void*>> pointers) {
  for (const auto& [name, p] : pointers)
    if (p == nullptr) throw InvalidArgument(std::string(where) + ": " + name + " is null");
}

// Scratch holds 4-byte ints and floats.
void require_scratch(const char* where, const void* scratch) {
  require_pointers(where, {{"scratch", scratch}});
  if (reinterpret_cast<std::uintptr_t>(scratch) % alignof(float) != 0)
    throw InvalidArgument(std::string(where) + ": scratch is not 4-byte aligned");
}

i64 product(const char* where, i64 a, i64 b) {
  if (a != 0 && b > std::numeric_limits<i64>::max() / a)
    throw InvalidArgument(std::string(where) + ": size " + std::to_string(a) + " x " + std::to_string(b) +
                          " overflows 64 bits");
  return a * b;
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

template <class... P>
bool all_aligned(const P*... p) {
  return (aligned16(p) && ...);
}

unsigned grid_for(i64 work, int threads) {
  return static_cast<unsigned>(std::clamp<i64>(ceil_div(work, threads), 1, kMaxBlocks));
}

// Calls launch(std::integral_constant<int, W>) with W = kVec<T> (128-bit accesses) or 1.
template <class T, class Launch>
void with_width(bool vectorised, Launch&& launch) {
  if (vectorised)
    launch(std::integral_constant<int, kVec<T>>{});
  else
    launch(std::integral_constant<int, 1>{});
}

// Blocks for one warp per row of N rows.
unsigned row_blocks(const char* where, i64 N) {
  const i64 blocks = ceil_div(N, kRowsPerBlock);
  if (blocks > std::numeric_limits<int>::max())
    throw InvalidArgument(std::string(where) + ": " + std::to_string(N) + " rows exceed the grid");
  return static_cast<unsigned>(blocks);
}

// An element-wise op of n elements, out = fn(inputs...) with one or two inputs: checks the
// arguments, then launches unary_kernel or binary_kernel.
template <class T, class Fn, class... Inputs>
void launch_map(const char* where, const char* kernel, Named<T*> out, i64 n, Fn fn, cudaStream_t stream,
                Inputs... inputs) {
  static_assert(kSupported<T>);
  require_sizes(where, {{"n", n}});
  if (n == 0) return;
  require_pointers(where, {{out.name, out.value}, {inputs.name, inputs.value}...});
  with_width<T>(all_aligned(out.value, inputs.value...), [&](auto width) {
    constexpr int W = decltype(width)::value;
    const unsigned blocks = grid_for(std::max(n / W, n % W), kMapThreads);
    if constexpr (sizeof...(Inputs) == 1)
      unary_kernel<T, W><<<blocks, kMapThreads, 0, stream>>>(out.value, inputs.value..., n, fn);
    else
      binary_kernel<T, W><<<blocks, kMapThreads, 0, stream>>>(out.value, inputs.value..., n, fn);
  });
  check_launch(kernel);
}

// Embedding backward scratch: keys and positions twice (radix ping-pong), the digit table, and
// the end of each key's run (V + 1 keys: V stands for any token outside the vocabulary).
struct EmbeddingScratch {
  i64 tiles = 0;
  std::size_t keys[2] = {0, 0}, vals[2] = {0, 0}, table = 0, bucket_end = 0, bytes = 0;
};

EmbeddingScratch embedding_scratch(i64 N, i64 V) {
  EmbeddingScratch s;
  s.tiles = ceil_div(N, kSortThreads);
  std::size_t at = 0;
  const auto take = [&](i64 ints) {
    const std::size_t offset = at;
    at += (static_cast<std::size_t>(ints) * sizeof(int) + kScratchAlign - 1) / kScratchAlign * kScratchAlign;
    return offset;
  };
  s.keys[0] = take(N);
  s.keys[1] = take(N);
  s.vals[0] = take(N);
  s.vals[1] = take(N);
  s.table = take(kDigits * s.tiles);
  s.bucket_end = take(V + 1);
  s.bytes = at;
  return s;
}

// Positions and tokens are sorted as int32: B * T and V + 1 must fit.
void check_embedding_backward_sizes(const char* where, i64 B, i64 Tn, i64 V) {
  require_sizes(where, {{"B", B}, {"T", Tn}, {"V", V}});
  const i64 N = product(where, B, Tn);
  if (N > std::numeric_limits<int>::max())
    throw InvalidArgument(std::string(where) + ": B * T = " + std::to_string(N) + " positions exceed 2^31 - 1");
  if (V >= std::numeric_limits<int>::max())
    throw InvalidArgument(std::string(where) + ": vocabulary " + std::to_string(V) + " exceeds 2^31 - 2");
}

// LayerNorm's checks of N rows of C: true when there is nothing to do.
bool no_rows(const char* where, i64 N, i64 C) {
  require_sizes(where, {{"N", N}, {"C", C}});
  product(where, N, C);
  return N == 0 || C == 0;
}

// LayerNorm backward: rows per chunk and chunks of the column partial sums.
i64 layernorm_chunk_rows(i64 N) { return std::max(kMinChunkRows, ceil_div(N, kMaxChunks)); }
i64 layernorm_chunks(i64 N) { return ceil_div(N, layernorm_chunk_rows(N)); }

}  // namespace

template <class T>
void embedding_forward(T* out, const std::int32_t* tokens, const T* wte, const T* wpe, std::int64_t B,
                       std::int64_t Tn, std::int64_t C, cudaStream_t stream) {
  static_assert(kSupported<T>);
  constexpr const char* where = "embedding_forward";
  require_sizes(where, {{"B", B}, {"T", Tn}, {"C", C}});
  const i64 N = product(where, B, Tn);
  const i64 total = product(where, N, C);
  if (total == 0) return;
  require_pointers(where, {{"out", out}, {"tokens", tokens}, {"wte", wte}, {"wpe", wpe}});
  with_width<T>(C % kVec<T> == 0 && all_aligned(out, wte, wpe), [&](auto width) {
    constexpr int W = decltype(width)::value;
    embedding_forward_kernel<T, W>
        <<<grid_for(total / W, kMapThreads), kMapThreads, 0, stream>>>(out, tokens, wte, wpe, N, Tn, C);
  });
  check_launch("embedding_forward_kernel");
}

std::size_t embedding_backward_scratch_bytes(std::int64_t B, std::int64_t Tn, std::int64_t V) {
  check_embedding_backward_sizes("embedding_backward_scratch_bytes", B, Tn, V);
  const i64 N = B * Tn;
  return N == 0 ? 0 : embedding_scratch(N, V).bytes;
}

template <class T>
void embedding_backward(float* dwte, float* dwpe, const T* dout, const std::int32_t* tokens, std::int64_t B,
                        std::int64_t Tn, std::int64_t C, std::int64_t V, void* scratch, cudaStream_t stream) {
  static_assert(kSupported<T>);
  constexpr const char* where = "embedding_backward";
  check_embedding_backward_sizes(where, B, Tn, V);
  require_sizes(where, {{"C", C}});
  const i64 N = B * Tn;
  const i64 total = product(where, N, C);
  product(where, V, C);
  if (total == 0) return;
  if (V == 0) throw InvalidArgument(std::string(where) + ": empty vocabulary (V = 0) for " + std::to_string(N) + " tokens");
  require_pointers(where, {{"dwte", dwte}, {"dwpe", dwpe}, {"dout", dout}, {"tokens", tokens}});
  require_scratch(where, scratch);

  // dwpe: independent of the sort.
  with_width<T>(C % kVec<T> == 0 && all_aligned(dout, dwpe), [&](auto width) {
    constexpr int W = decltype(width)::value;
    embedding_dwpe_kernel<T, W><<<grid_for(Tn * C / W, kMapThreads), kMapThreads, 0, stream>>>(dwpe, dout, B, Tn, C);
  });
  check_launch("embedding_dwpe_kernel");

  // Sort (key, position) by key, 8 bits a pass over the bits of the largest key, V.
  const EmbeddingScratch layout = embedding_scratch(N, V);
  char* base = static_cast<char*>(scratch);
  int* keys[2] = {reinterpret_cast<int*>(base + layout.keys[0]), reinterpret_cast<int*>(base + layout.keys[1])};
  int* vals[2] = {reinterpret_cast<int*>(base + layout.vals[0]), reinterpret_cast<int*>(base + layout.vals[1])};
  int* table = reinterpret_cast<int*>(base + layout.table);
  int* bucket_end = reinterpret_cast<int*>(base + layout.bucket_end);
  const int vocab = static_cast<int>(V);

  embedding_keys_kernel<<<grid_for(N, kMapThreads), kMapThreads, 0, stream>>>(keys[0], vals[0], tokens, N, vocab);
  check_launch("embedding_keys_kernel");
  int key_bits = 0;
  while ((V >> key_bits) != 0) ++key_bits;
  const int passes = std::max(1, (key_bits + kDigitBits - 1) / kDigitBits);
  const unsigned tiles = static_cast<unsigned>(layout.tiles);
  int cur = 0;
  for (int pass = 0; pass < passes; ++pass) {
    const int shift = pass * kDigitBits;
    radix_count_kernel<<<tiles, kSortThreads, 0, stream>>>(keys[cur], N, shift, table, layout.tiles);
    check_launch("radix_count_kernel");
    exclusive_scan_kernel<<<1, kScanThreads, 0, stream>>>(table, kDigits * layout.tiles);
    check_launch("exclusive_scan_kernel");
    radix_scatter_kernel<<<tiles, kSortThreads, 0, stream>>>(keys[cur], vals[cur], keys[1 - cur], vals[1 - cur], N,
                                                              shift, table, layout.tiles);
    check_launch("radix_scatter_kernel");
    cur = 1 - cur;
  }
  run_ends_kernel<<<grid_for(N, kMapThreads), kMapThreads, 0, stream>>>(keys[cur], N, bucket_end);
  check_launch("run_ends_kernel");

  const dim3 grid(static_cast<unsigned>(ceil_div(N, kDwteThreads)),
                  static_cast<unsigned>(std::min<i64>(ceil_div(C, kWarp), 65535)));
  embedding_dwte_kernel<T><<<grid, kDwteThreads, 0, stream>>>(dwte, dout, keys[cur], vals[cur], bucket_end, N, C, vocab);
  check_launch("embedding_dwte_kernel");
}

template <class T>
void layernorm_forward(T* out, float* mean, float* rstd, const T* in, const T* weight, const T* bias, std::int64_t N,
                       std::int64_t C, cudaStream_t stream) {
  static_assert(kSupported<T>);
  constexpr const char* where = "layernorm_forward";
  if (no_rows(where, N, C)) return;
  require_pointers(where,
                   {{"out", out}, {"mean", mean}, {"rstd", rstd}, {"in", in}, {"weight", weight}, {"bias", bias}});
  const unsigned blocks = row_blocks(where, N);
  with_width<T>(C % kVec<T> == 0 && all_aligned(out, in, weight, bias), [&](auto width) {
    constexpr int W = decltype(width)::value;
    layernorm_forward_kernel<T, W><<<blocks, kRowThreads, 0, stream>>>(out, mean, rstd, in, weight, bias, N, C);
  });
  check_launch("layernorm_forward_kernel");
}

std::size_t layernorm_backward_scratch_bytes(std::int64_t N, std::int64_t C) {
  constexpr const char* where = "layernorm_backward_scratch_bytes";
  require_sizes(where, {{"N", N}, {"C", C}});
  if (N == 0 || C == 0) return 0;
  const i64 floats = product(where, 2 * layernorm_chunks(N), C);
  return static_cast<std::size_t>(product(where, floats, static_cast<i64>(sizeof(float))));
}

template <class T>
void layernorm_backward(T* din, float* dweight, float* dbias, const T* dout, const T* in, const T* weight,
                        const float* mean, const float* rstd, std::int64_t N, std::int64_t C, void* scratch,
                        cudaStream_t stream) {
  static_assert(kSupported<T>);
  constexpr const char* where = "layernorm_backward";
  if (no_rows(where, N, C)) return;
  require_pointers(where, {{"din", din},
                           {"dweight", dweight},
                           {"dbias", dbias},
                           {"dout", dout},
                           {"in", in},
                           {"weight", weight},
                           {"mean", mean},
                           {"rstd", rstd}});
  require_scratch(where, scratch);
  const unsigned blocks = row_blocks(where, N);
  const i64 chunk_rows = layernorm_chunk_rows(N), chunks = layernorm_chunks(N);
  float* partial_w = static_cast<float*>(scratch);
  float* partial_b = partial_w + chunks * C;

  // Column sums first: they read dout before din is written.
  with_width<T>(C % kVec<T> == 0 && all_aligned(dout, in, partial_w, partial_b), [&](auto width) {
    constexpr int W = decltype(width)::value;
    const dim3 grid(static_cast<unsigned>(ceil_div(C / W, kColumnThreads)), static_cast<unsigned>(chunks));
    layernorm_column_partials_kernel<T, W>
        <<<grid, kColumnThreads, 0, stream>>>(partial_w, partial_b, dout, in, mean, rstd, N, C, chunk_rows);
  });
  check_launch("layernorm_column_partials_kernel");
  layernorm_column_finalize_kernel<<<static_cast<unsigned>(ceil_div(C, kMapThreads)), kMapThreads, 0, stream>>>(
      dweight, dbias, partial_w, partial_b, C, chunks);
  check_launch("layernorm_column_finalize_kernel");
  with_width<T>(C % kVec<T> == 0 && all_aligned(din, dout, in, weight), [&](auto width) {
    constexpr int W = decltype(width)::value;
    layernorm_din_kernel<T, W><<<blocks, kRowThreads, 0, stream>>>(din, dout, in, weight, mean, rstd, N, C);
  });
  check_launch("layernorm_din_kernel");
}

template <class T>
void gelu_forward(T* out, const T* in, std::int64_t n, cudaStream_t stream) {
  launch_map<T>("gelu_forward", "gelu_forward_kernel", {"out", out}, n, GeluForward{}, stream,
                Named<const T*>{"in", in});
}

template <class T>
void gelu_backward(T* din, const T* in, const T* dout, std::int64_t n, cudaStream_t stream) {
  launch_map<T>("gelu_backward", "gelu_backward_kernel", {"din", din}, n, GeluBackward{}, stream,
                Named<const T*>{"in", in}, Named<const T*>{"dout", dout});
}

template <class T>
void residual_forward(T* out, const T* a, const T* b, std::int64_t n, cudaStream_t stream) {
  launch_map<T>("residual_forward", "residual_forward_kernel", {"out", out}, n, Add{}, stream,
                Named<const T*>{"a", a}, Named<const T*>{"b", b});
}

template <class T>
void crossentropy_forward_backward(float* losses, T* logits, const std::int32_t* targets, float dloss, bool backward,
                                   std::int64_t BT, std::int64_t V, std::int64_t stride, cudaStream_t stream) {
  static_assert(kSupported<T>);
  constexpr const char* where = "crossentropy_forward_backward";
  require_sizes(where, {{"BT", BT}, {"V", V}, {"stride", stride}});
  if (stride < V)
    throw InvalidArgument(std::string(where) + ": row stride " + std::to_string(stride) + " is below V = " +
                          std::to_string(V));
  product(where, BT, stride);
  if (BT == 0) return;
  if (V == 0) throw InvalidArgument(std::string(where) + ": empty vocabulary (V = 0)");
  if (BT > std::numeric_limits<int>::max())
    throw InvalidArgument(std::string(where) + ": " + std::to_string(BT) + " rows exceed the grid");
  require_pointers(where, {{"losses", losses}, {"logits", logits}, {"targets", targets}});
  with_width<T>(stride % kVec<T> == 0 && aligned16(logits), [&](auto width) {
    constexpr int W = decltype(width)::value;
    if (V <= kWarpRowVocab) {
      const unsigned blocks = static_cast<unsigned>(ceil_div(BT, kCrossEntropyThreads / kWarp));
      crossentropy_kernel<T, W, kWarp>
          <<<blocks, kCrossEntropyThreads, 0, stream>>>(losses, logits, targets, dloss, backward, BT, V, stride);
    } else {
      crossentropy_kernel<T, W, kCrossEntropyThreads><<<static_cast<unsigned>(BT), kCrossEntropyThreads, 0, stream>>>(
          losses, logits, targets, dloss, backward, BT, V, stride);
    }
  });
  check_launch("crossentropy_kernel");
}

// Explicit instantiations, T = float and T = bf16.
#define NIBBLE_ELEMENTWISE_OPS(T)                                                                                     \
  template void embedding_forward<T>(T*, const std::int32_t*, const T*, const T*, std::int64_t, std::int64_t,          \
                                     std::int64_t, cudaStream_t);                                                     \
  template void embedding_backward<T>(float*, float*, const T*, const std::int32_t*, std::int64_t, std::int64_t,      \
                                      std::int64_t, std::int64_t, void*, cudaStream_t);                               \
  template void layernorm_forward<T>(T*, float*, float*, const T*, const T*, const T*, std::int64_t, std::int64_t,    \
                                     cudaStream_t);                                                                   \
  template void layernorm_backward<T>(T*, float*, float*, const T*, const T*, const T*, const float*, const float*,   \
                                      std::int64_t, std::int64_t, void*, cudaStream_t);                               \
  template void gelu_forward<T>(T*, const T*, std::int64_t, cudaStream_t);                                            \
  template void gelu_backward<T>(T*, const T*, const T*, std::int64_t, cudaStream_t);                                 \
  template void residual_forward<T>(T*, const T*, const T*, std::int64_t, cudaStream_t);                              \
  template void crossentropy_forward_backward<T>(float*, T*, const std::int32_t*, float, bool, std::int64_t,          \
                                                 std::int64_t, std::int64_t, cudaStream_t);

NIBBLE_ELEMENTWISE_OPS(float)
NIBBLE_ELEMENTWISE_OPS(bf16)

#undef NIBBLE_ELEMENTWISE_OPS

}  // namespace nibble::model::cuda
