// Muon's Newton-Schulz iteration on the CPU, in fp32 on OpenBLAS (sgemm): the quintic
// X <- a X + (b A + c A^2) X, A = X X^T, from X = G / max(||G||_F, eps), on the wide orientation
// of G (transposed when it has more rows than columns), as torch.optim.Muon's
// _zeropower_via_newtonschulz (which runs it in bf16).
#pragma once

#include <cstdint>

namespace nibble::cpu {

struct NewtonSchulz {
  float a, b, c;
  int steps;
  float eps;
};

// Floats of workspace newton_schulz needs for a rows x cols matrix.
std::int64_t newton_schulz_workspace(std::int64_t rows, std::int64_t cols);

// out = NS(in) for a row-major rows x cols matrix; `out` may be `in`. Called outside a parallel
// region: each product splits its output rows into fixed blocks, each one single-threaded sgemm,
// shared among the OpenMP threads, so the result does not depend on the thread count
// (tests/optim_reference_test.cpp's thread test checks it).
void newton_schulz(const float* in, std::int64_t rows, std::int64_t cols, const NewtonSchulz& k, float* work,
                   float* out);

}  // namespace nibble::cpu
