// CPU forward and backward of the GPT ops, after llm.c's train_gpt2.c (Karpathy 2024): OpenMP over
// rows or (batch, head) pairs, matrix products through OpenBLAS. Every sum has a fixed order (sums
// over rows run per column block, never per thread), so results do not depend on the thread count.
#include "model/cpu/ops.hpp"

#include <cblas.h>
#include <omp.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "model/cpu/vector_math.hpp"
#include "nibble/error.hpp"

namespace nibble::model::cpu {
namespace {

// Sums over rows (bias and weight gradients) are taken a block of columns at a time: each block
// belongs to one thread and walks all rows in order, with double accumulators on the stack.
constexpr std::int64_t kColumnBlock = 64;
constexpr float kLayerNormEps = 1e-5f;
constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluCubic = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;    // exact GELU: Phi(x) = (1 + erf(x / sqrt 2)) / 2
constexpr float kInvSqrt2Pi = 0.3989422804014327f;  // phi(0) = 1 / sqrt(2 pi)

// NOTE: without -ffast-math the compiler may not reorder a float reduction, so a single
// accumulator runs one add per cycle latency. kLanes independent partial sums in a fixed order
// vectorise and stay deterministic.
constexpr int kLanes = 8;

float dot(const float* __restrict a, const float* __restrict b, std::int64_t n) {
  float lane[kLanes] = {};
  std::int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lane[j] += a[i + j] * b[i + j];
  float s = 0.0f;
  for (int j = 0; j < kLanes; ++j) s += lane[j];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

float sum(const float* __restrict a, std::int64_t n) {
  float lane[kLanes] = {};
  std::int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lane[j] += a[i + j];
  float s = 0.0f;
  for (int j = 0; j < kLanes; ++j) s += lane[j];
  for (; i < n; ++i) s += a[i];
  return s;
}

// OpenBLAS takes 32-bit dimensions; a larger one would silently wrap.
int blas_dim(std::int64_t n, const char* what) {
  if (n > std::numeric_limits<int>::max())
    throw InvalidArgument(fmt::format("matmul {} of {} exceeds the BLAS limit of 2^31 - 1", what, n));
  return static_cast<int>(n);
}

void check_targets(const std::int32_t* targets, std::int64_t BT, std::int64_t V) {
  for (std::int64_t i = 0; i < BT; ++i)
    if (targets[i] < 0 || targets[i] >= V)
      throw InvalidArgument(
          fmt::format("target {} at position {} is outside the vocabulary of {}", targets[i], i, V));
}

}  // namespace

void embedding_forward(float* out, const std::int32_t* tokens, const float* wte, const float* wpe,
                       std::int64_t B, std::int64_t T, std::int64_t C) {
#pragma omp parallel for collapse(2) schedule(static)
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < T; ++t) {
      float* o = out + (b * T + t) * C;
      const float* e = wte + static_cast<std::int64_t>(tokens[b * T + t]) * C;
      const float* p = wpe + t * C;
      for (std::int64_t c = 0; c < C; ++c) o[c] = e[c] + p[c];
    }
}

void embedding_backward(float* dwte, float* dwpe, const float* dout, const std::int32_t* tokens,
                        std::int64_t B, std::int64_t T, std::int64_t C) {
  // NOTE: a token repeated in the batch adds into the same dwte row from several positions, so
  // rows cannot be split among threads; columns can, and each column then sums rows in order.
  const std::int64_t blocks = (C + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for schedule(static)
  for (std::int64_t blk = 0; blk < blocks; ++blk) {
    const std::int64_t c0 = blk * kColumnBlock;
    const std::int64_t n = std::min(kColumnBlock, C - c0);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t < T; ++t) {
        const float* d = dout + (b * T + t) * C + c0;
        float* e = dwte + static_cast<std::int64_t>(tokens[b * T + t]) * C + c0;
        float* p = dwpe + t * C + c0;
        for (std::int64_t c = 0; c < n; ++c) {
          e[c] += d[c];
          p[c] += d[c];
        }
      }
  }
}

void layernorm_forward(float* out, float* mean, float* rstd, const float* in, const float* weight,
                       const float* bias, std::int64_t N, std::int64_t C) {
  const float inv_c = 1.0f / static_cast<float>(C);
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < N; ++i) {
    const float* x = in + i * C;
    float* o = out + i * C;
    const float m = sum(x, C) * inv_c;
    // Two passes (mean, then squared deviations): E[x^2] - m^2 cancels badly when |m| >> std.
    float lane[kLanes] = {};
    std::int64_t c = 0;
    for (; c + kLanes <= C; c += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const float dx = x[c + j] - m;
        lane[j] += dx * dx;
      }
    float var = 0.0f;
    for (int j = 0; j < kLanes; ++j) var += lane[j];
    for (; c < C; ++c) var += (x[c] - m) * (x[c] - m);
    const float s = 1.0f / std::sqrt(var * inv_c + kLayerNormEps);
    if (bias != nullptr) {
      for (c = 0; c < C; ++c) o[c] = (x[c] - m) * s * weight[c] + bias[c];
    } else {
      for (c = 0; c < C; ++c) o[c] = (x[c] - m) * s * weight[c];
    }
    mean[i] = m;
    rstd[i] = s;
  }
}

void layernorm_backward(float* din, float* dweight, float* dbias, const float* dout, const float* in,
                        const float* weight, const float* mean, const float* rstd, std::int64_t N,
                        std::int64_t C) {
  const float inv_c = 1.0f / static_cast<float>(C);
  // din = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dout * weight, xhat the normalised input.
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < N; ++i) {
    const float* x = in + i * C;
    const float* d = dout + i * C;
    float* dx = din + i * C;
    const float m = mean[i], s = rstd[i];
    float lane_g[kLanes] = {}, lane_gx[kLanes] = {};
    std::int64_t c = 0;
    for (; c + kLanes <= C; c += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const float g = d[c + j] * weight[c + j];
        lane_g[j] += g;
        lane_gx[j] += g * ((x[c + j] - m) * s);
      }
    float g_mean = 0.0f, gx_mean = 0.0f;
    for (int j = 0; j < kLanes; ++j) {
      g_mean += lane_g[j];
      gx_mean += lane_gx[j];
    }
    for (; c < C; ++c) {
      const float g = d[c] * weight[c];
      g_mean += g;
      gx_mean += g * ((x[c] - m) * s);
    }
    g_mean *= inv_c;
    gx_mean *= inv_c;
    for (c = 0; c < C; ++c) {
      const float xhat = (x[c] - m) * s;
      dx[c] += s * (d[c] * weight[c] - g_mean - xhat * gx_mean);
    }
  }
  const std::int64_t blocks = (C + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for schedule(static)
  for (std::int64_t blk = 0; blk < blocks; ++blk) {
    const std::int64_t c0 = blk * kColumnBlock;
    const std::int64_t n = std::min(kColumnBlock, C - c0);
    double acc_w[kColumnBlock] = {}, acc_b[kColumnBlock] = {};
    for (std::int64_t i = 0; i < N; ++i) {
      const float* x = in + i * C + c0;
      const float* d = dout + i * C + c0;
      const float m = mean[i], s = rstd[i];
      for (std::int64_t c = 0; c < n; ++c) {
        acc_w[c] += static_cast<double>(d[c] * ((x[c] - m) * s));
        acc_b[c] += static_cast<double>(d[c]);
      }
    }
    for (std::int64_t c = 0; c < n; ++c) {
      dweight[c0 + c] += static_cast<float>(acc_w[c]);
      if (dbias != nullptr) dbias[c0 + c] += static_cast<float>(acc_b[c]);
    }
  }
}

namespace {

// NOTE: matrix products run OpenBLAS single-threaded inside nibble's own OpenMP threads, each on
// a contiguous slice of output rows. OpenBLAS's own thread pool beside OpenMP's spinning threads
// oversubscribed the cores (a 2-core machine ran several times slower under any other load), and
// one pool keeps the results a function of the OpenMP thread count alone.
void single_threaded_blas() {
  static const bool single = [] {
    openblas_set_num_threads(1);
    return true;
  }();
  (void)single;
}

template <class Fn>
void parallel_slices(std::int64_t rows, Fn&& fn) {
  single_threaded_blas();
#pragma omp parallel
  {
    const std::int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
    const std::int64_t r0 = rows * me / threads, r1 = rows * (me + 1) / threads;
    if (r0 < r1) fn(r0, r1);
  }
}

}  // namespace

void matmul_forward(float* out, const float* in, const float* weight, const float* bias, std::int64_t N,
                    std::int64_t IC, std::int64_t OC) {
  if (N <= 0 || OC <= 0) return;
  if (bias != nullptr) {
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < N; ++i)
      for (std::int64_t o = 0; o < OC; ++o) out[i * OC + o] = bias[o];
  } else if (IC <= 0) {
    for (std::int64_t i = 0; i < N * OC; ++i) out[i] = 0.0f;
  }
  if (IC <= 0) return;
  const int ic = blas_dim(IC, "input channels"), oc = blas_dim(OC, "output channels");
  blas_dim(N, "rows");
  const float beta = bias != nullptr ? 1.0f : 0.0f;
  parallel_slices(N, [&](std::int64_t r0, std::int64_t r1) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(r1 - r0), oc, ic, 1.0f, in + r0 * IC, ic,
                weight, ic, beta, out + r0 * OC, oc);
  });
}

void matmul_backward(float* din, float* dweight, float* dbias, const float* dout, const float* in,
                     const float* weight, std::int64_t N, std::int64_t IC, std::int64_t OC) {
  if (N <= 0 || OC <= 0) return;
  const int n = blas_dim(N, "rows"), ic = blas_dim(IC, "input channels"), oc = blas_dim(OC, "output channels");
  if (IC > 0) {
    // din[N, IC] += dout[N, OC] * weight[OC, IC], by slices of rows of din.
    parallel_slices(N, [&](std::int64_t r0, std::int64_t r1) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(r1 - r0), ic, oc, 1.0f, dout + r0 * OC,
                  oc, weight, ic, 1.0f, din + r0 * IC, ic);
    });
    // dweight[OC, IC] += dout[N, OC]^T * in[N, IC], by slices of rows of dweight: every element is
    // summed over all N rows by one call.
    parallel_slices(OC, [&](std::int64_t o0, std::int64_t o1) {
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, static_cast<int>(o1 - o0), ic, n, 1.0f, dout + o0, oc, in,
                  ic, 1.0f, dweight + o0 * IC, ic);
    });
  }
  if (dbias == nullptr) return;
  const std::int64_t blocks = (OC + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for schedule(static)
  for (std::int64_t blk = 0; blk < blocks; ++blk) {
    const std::int64_t o0 = blk * kColumnBlock;
    const std::int64_t m = std::min(kColumnBlock, OC - o0);
    double acc[kColumnBlock] = {};
    for (std::int64_t i = 0; i < N; ++i) {
      const float* d = dout + i * OC + o0;
      for (std::int64_t o = 0; o < m; ++o) acc[o] += static_cast<double>(d[o]);
    }
    for (std::int64_t o = 0; o < m; ++o) dbias[o0 + o] += static_cast<float>(acc[o]);
  }
}

// NOTE: attention runs per (batch, head) pair on one thread, as matrix products over blocks of
// kAttentionRows query rows: block [r0, r1) needs keys and values [0, r1) only (causal), so
// about half of the T x T products are skipped for long contexts. Dot products of head-size
// length, one (query, key) pair at a time, ran at a fraction of what the GEMM kernels reach.
// Each pair's products have fixed shapes and order, so results do not depend on the thread count.
constexpr std::int64_t kAttentionRows = 64;

void attention_forward(float* out, float* att, const float* qkv, std::int64_t B, std::int64_t T,
                       std::int64_t C, std::int64_t NH) {
  if (NH <= 0 || C % NH != 0)
    throw InvalidArgument(fmt::format("attention width {} is not divisible by heads {}", C, NH));
  const std::int64_t hs = C / NH, C3 = 3 * C;
  const int ld_t = blas_dim(T, "context"), hs_dim = blas_dim(hs, "head size"), c3 = blas_dim(C3, "qkv width");
  const int c_dim = blas_dim(C, "width");
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  single_threaded_blas();
#pragma omp parallel for collapse(2) schedule(static)
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < NH; ++h) {
      const float* q = qkv + b * T * C3 + h * hs;
      const float* k = q + C;
      const float* v = q + 2 * C;
      float* p = att + (b * NH + h) * T * T;
      float* o = out + b * T * C + h * hs;
      for (std::int64_t r0 = 0; r0 < T; r0 += kAttentionRows) {
        const std::int64_t r1 = std::min(T, r0 + kAttentionRows);
        const int rows = static_cast<int>(r1 - r0), keys = static_cast<int>(r1);
        // Scores of the block's queries against keys [0, r1).
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, keys, hs_dim, scale, q + r0 * C3, c3, k, c3, 0.0f,
                    p + r0 * T, ld_t);
        for (std::int64_t t = r0; t < r1; ++t) {
          float* a = p + t * T;
          float maxv = -std::numeric_limits<float>::infinity();
          for (std::int64_t t2 = 0; t2 <= t; ++t2) maxv = std::max(maxv, a[t2]);
          for (std::int64_t t2 = 0; t2 <= t; ++t2) a[t2] = exp_f(a[t2] - maxv);
          const float inv = 1.0f / sum(a, t + 1);
          for (std::int64_t t2 = 0; t2 <= t; ++t2) a[t2] *= inv;
          for (std::int64_t t2 = t + 1; t2 < T; ++t2) a[t2] = 0.0f;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, hs_dim, keys, 1.0f, p + r0 * T, ld_t, v, c3,
                    0.0f, o + r0 * C, c_dim);
      }
    }
}

void attention_backward(float* dqkv, float* datt, const float* dout, const float* qkv, const float* att,
                        std::int64_t B, std::int64_t T, std::int64_t C, std::int64_t NH) {
  if (NH <= 0 || C % NH != 0)
    throw InvalidArgument(fmt::format("attention width {} is not divisible by heads {}", C, NH));
  const std::int64_t hs = C / NH, C3 = 3 * C;
  const int ld_t = blas_dim(T, "context"), hs_dim = blas_dim(hs, "head size"), c3 = blas_dim(C3, "qkv width");
  const int c_dim = blas_dim(C, "width");
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  single_threaded_blas();
  // NOTE: dk and dv of position t2 collect from every later query block, so a (batch, head) pair
  // is one thread's work: it owns its slice of dqkv and adds the blocks in order.
#pragma omp parallel for collapse(2) schedule(static)
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < NH; ++h) {
      const std::int64_t base = b * T * C3 + h * hs;
      const float* q = qkv + base;
      const float* k = q + C;
      const float* v = q + 2 * C;
      float* dq = dqkv + base;
      float* dk = dq + C;
      float* dv = dq + 2 * C;
      const float* p = att + (b * NH + h) * T * T;
      float* ds = datt + (b * NH + h) * T * T;
      const float* d = dout + b * T * C + h * hs;
      for (std::int64_t r0 = 0; r0 < T; r0 += kAttentionRows) {
        const std::int64_t r1 = std::min(T, r0 + kAttentionRows);
        const int rows = static_cast<int>(r1 - r0), keys = static_cast<int>(r1);
        // dv[0, r1) += P[r0:r1, 0:r1]^T dout[r0:r1]; d(probabilities) = dout[r0:r1] v[0:r1]^T.
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, keys, hs_dim, rows, 1.0f, p + r0 * T, ld_t, d + r0 * C,
                    c_dim, 1.0f, dv, c3);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, keys, hs_dim, 1.0f, d + r0 * C, c_dim, v, c3, 0.0f,
                    ds + r0 * T, ld_t);
        // Softmax backward: d(score) = P (dP - sum(P dP)) * scale, in place.
        for (std::int64_t t = r0; t < r1; ++t) {
          const float* a = p + t * T;
          float* da = ds + t * T;
          const float weighted = dot(a, da, t + 1);
          for (std::int64_t t2 = 0; t2 <= t; ++t2) da[t2] = a[t2] * (da[t2] - weighted) * scale;
          for (std::int64_t t2 = t + 1; t2 < T; ++t2) da[t2] = 0.0f;
        }
        // dq[r0:r1] += dS k[0:r1]; dk[0:r1] += dS^T q[r0:r1].
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, hs_dim, keys, 1.0f, ds + r0 * T, ld_t, k, c3,
                    1.0f, dq + r0 * C3, c3);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, keys, hs_dim, rows, 1.0f, ds + r0 * T, ld_t, q + r0 * C3,
                    c3, 1.0f, dk, c3);
      }
    }
}

void gelu_forward(float* out, const float* in, std::int64_t n, bool exact) {
  if (exact) {
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < n; ++i) out[i] = in[i] * (0.5f + 0.5f * erf_f(in[i] * kInvSqrt2));
    return;
  }
  // 0.5 x (1 + tanh u) = x sigmoid(2u): one exp and one division, and no cancellation for x << 0
  // as 1 + tanh u has. With e = e^-2|u| (at most 1), sigmoid(2u) is 1 / (1 + e) for u >= 0 and
  // e / (1 + e) below (x / (1 + e^-2u) as written ran at half the speed here).
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < n; ++i) {
    const float x = in[i];
    const float u2 = 2.0f * kGeluScale * (x + kGeluCubic * x * x * x);
    const float e = exp_f(-std::fabs(u2));
    const float s = 1.0f / (1.0f + e);
    out[i] = x * (u2 >= 0.0f ? s : e * s);
  }
}

void gelu_backward(float* din, const float* in, const float* dout, std::int64_t n, bool exact) {
  if (exact) {
    // d/dx x Phi(x) = Phi(x) + x phi(x).
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < n; ++i) {
      const float x = in[i];
      const float cdf = 0.5f + 0.5f * erf_f(x * kInvSqrt2);
      const float pdf = kInvSqrt2Pi * exp_f(-0.5f * x * x);
      din[i] += (cdf + x * pdf) * dout[i];
    }
    return;
  }
  // d/dx x s = s + x s (1 - s) 2u', s = sigmoid(2u) = 1 / (1 + e), 1 - s = e s.
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < n; ++i) {
    const float x = in[i];
    const float e = exp_f(-2.0f * kGeluScale * (x + kGeluCubic * x * x * x));
    const float s = 1.0f / (1.0f + e);
    const float du = 2.0f * kGeluScale * (1.0f + 3.0f * kGeluCubic * x * x);
    din[i] += (s + x * (e * s) * s * du) * dout[i];
  }
}

void residual_forward(float* out, const float* a, const float* b, std::int64_t n) {
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

void crossentropy_forward(float* losses, float* probs, const float* logits, const std::int32_t* targets,
                          std::int64_t BT, std::int64_t V) {
  check_targets(targets, BT, V);
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < BT; ++i) {
    const float* x = logits + i * V;
    float* p = probs + i * V;
    float maxv = -std::numeric_limits<float>::infinity();
    for (std::int64_t v = 0; v < V; ++v) maxv = std::max(maxv, x[v]);
    // A vocabulary row is long (tens of thousands): the normaliser is summed in double.
    double total = 0.0;
    for (std::int64_t v = 0; v < V; ++v) {
      p[v] = std::exp(x[v] - maxv);
      total += static_cast<double>(p[v]);
    }
    const float inv = static_cast<float>(1.0 / total);
    for (std::int64_t v = 0; v < V; ++v) p[v] *= inv;
    // log-sum-exp rather than -log(p[target]): finite even when p[target] underflows to zero.
    losses[i] = static_cast<float>(std::log(total) - static_cast<double>(x[targets[i]] - maxv));
  }
}

void crossentropy_backward(float* dlogits, const float* probs, const std::int32_t* targets, float dloss,
                           std::int64_t BT, std::int64_t V) {
  check_targets(targets, BT, V);
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < BT; ++i) {
    const float* p = probs + i * V;
    float* d = dlogits + i * V;
    const std::int64_t target = targets[i];
    for (std::int64_t v = 0; v < V; ++v) d[v] += (p[v] - (v == target ? 1.0f : 0.0f)) * dloss;
  }
}

}  // namespace nibble::model::cpu
