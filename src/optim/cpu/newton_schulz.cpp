// Muon's Newton-Schulz iteration on the CPU (see newton_schulz.hpp).
#include "optim/cpu/newton_schulz.hpp"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace nibble::cpu {
namespace {

// NOTE: OpenBLAS runs single-threaded inside nibble's OpenMP threads, as the GPT engine's products
// (src/model/cpu/ops.cpp): its own pool beside OpenMP's oversubscribes the cores. Each product is
// split into fixed blocks of kRowBlock output rows, one sgemm each, shared among the threads: an
// element's value depends on the block it falls in (OpenBLAS's kernels round a row differently
// with the rows around it, measured), so the blocks, not the threads, decide the split.
constexpr std::int64_t kRowBlock = 64;

template <class Fn>
void parallel_rows(std::int64_t rows, Fn&& fn) {
  static const bool single = [] {
    openblas_set_num_threads(1);
    return true;
  }();
  (void)single;
  const std::int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
#pragma omp parallel for schedule(static)
  for (std::int64_t blk = 0; blk < blocks; ++blk) fn(blk * kRowBlock, std::min(rows, (blk + 1) * kRowBlock));
}

int blas_int(std::int64_t n) { return static_cast<int>(n); }

// NOTE: the symmetric products. A = X X^T and A A (A symmetric) are symmetric, so each block of
// rows [r0, r1) computes only the columns from r0 on (one sgemm of (r1 - r0) x (s - r0)), and the
// part below the diagonal is then copied from above it: half the flops of a full product, and the
// result exactly symmetric. The blocks are dealt out one by one (the first ones are the widest) and
// are fixed by the size, so the values still do not depend on the thread count. For a 768 x 3072
// update the iteration's flops fall from 4 s^2 l + 2 s^3 to 3 s^2 l + s^3 (28%).
template <class Fn>
void parallel_upper_blocks(std::int64_t s, Fn&& fn) {
  const std::int64_t blocks = (s + kRowBlock - 1) / kRowBlock;
#pragma omp parallel for schedule(static, 1)
  for (std::int64_t blk = 0; blk < blocks; ++blk) fn(blk * kRowBlock, std::min(s, (blk + 1) * kRowBlock));
}

// m[i][j] = m[j][i] below the diagonal of the s x s matrix m, in tiles.
void mirror_upper(float* m, std::int64_t s) {
  constexpr std::int64_t kTile = 32;
  const std::int64_t tiles = (s + kTile - 1) / kTile;
#pragma omp parallel for schedule(static, 1)
  for (std::int64_t ti = 0; ti < tiles; ++ti)
    for (std::int64_t tj = 0; tj <= ti; ++tj)
      for (std::int64_t i = ti * kTile; i < std::min(s, (ti + 1) * kTile); ++i)
        for (std::int64_t j = tj * kTile; j < std::min(i, (tj + 1) * kTile); ++j) m[i * s + j] = m[j * s + i];
}

}  // namespace

std::int64_t newton_schulz_workspace(std::int64_t rows, std::int64_t cols) {
  const std::int64_t s = std::min(rows, cols);
  return 2 * rows * cols + 2 * s * s;
}

void newton_schulz(const float* in, std::int64_t rows, std::int64_t cols, const NewtonSchulz& k, float* work,
                   float* out) {
  const std::int64_t numel = rows * cols;
  if (numel == 0) return;
  const bool transposed = rows > cols;
  const std::int64_t s = transposed ? cols : rows;  // X is s x l, s <= l
  const std::int64_t l = transposed ? rows : cols;
  float* x = work;
  float* y = x + numel;
  float* a = y + numel;
  float* b = a + s * s;

  // The Frobenius norm in double, in element order.
  double sum = 0.0;
  for (std::int64_t i = 0; i < numel; ++i) sum += static_cast<double>(in[i]) * in[i];
  const float norm = std::max(static_cast<float>(std::sqrt(sum)), k.eps);
  parallel_rows(s, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r)
      for (std::int64_t c = 0; c < l; ++c) x[r * l + c] = (transposed ? in[c * cols + r] : in[r * l + c]) / norm;
  });

  for (int step = 0; step < k.steps; ++step) {
    // A = X X^T, its upper part
    parallel_upper_blocks(s, [&](std::int64_t r0, std::int64_t r1) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, blas_int(r1 - r0), blas_int(s - r0), blas_int(l), 1.0f,
                  x + r0 * l, blas_int(l), x + r0 * l, blas_int(l), 0.0f, a + r0 * s + r0, blas_int(s));
    });
    mirror_upper(a, s);
    // B = b A + c A A^T (A A = A A^T), its upper part
    parallel_upper_blocks(s, [&](std::int64_t r0, std::int64_t r1) {
      for (std::int64_t r = r0; r < r1; ++r)
        std::memcpy(b + r * s + r0, a + r * s + r0, static_cast<std::size_t>(s - r0) * sizeof(float));
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, blas_int(r1 - r0), blas_int(s - r0), blas_int(s), k.c,
                  a + r0 * s, blas_int(s), a + r0 * s, blas_int(s), k.b, b + r0 * s + r0, blas_int(s));
    });
    mirror_upper(b, s);
    // X <- a X + B X
    parallel_rows(s, [&](std::int64_t r0, std::int64_t r1) {
      std::memcpy(y + r0 * l, x + r0 * l, static_cast<std::size_t>((r1 - r0) * l) * sizeof(float));
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, blas_int(r1 - r0), blas_int(l), blas_int(s), 1.0f,
                  b + r0 * s, blas_int(s), x, blas_int(l), k.a, y + r0 * l, blas_int(l));
    });
    std::swap(x, y);
  }

  if (transposed) {
    parallel_rows(rows, [&](std::int64_t r0, std::int64_t r1) {
      for (std::int64_t r = r0; r < r1; ++r)
        for (std::int64_t c = 0; c < cols; ++c) out[r * cols + c] = x[c * l + r];
    });
  } else {
    std::memcpy(out, x, static_cast<std::size_t>(numel) * sizeof(float));
  }
}

}  // namespace nibble::cpu
