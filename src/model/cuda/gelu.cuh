// GELU, tanh approximation, for the model's kernels (the elementwise op and the GELU that follows a
// matmul), with the CPU engine's constants; every product and sum is explicitly rounded, so no
// multiply-add is contracted. The CPU computes the same function as x sigmoid(2u) (one exp, no
// cancellation); this form, 0.5 x (1 + tanh u), differs from it by rounding, and below x = -5 it
// loses (to 0, or to a few float steps of 1 + tanh u) the tiny negative values, under 1e-6 in
// magnitude, that the CPU keeps.
#pragma once

namespace nibble::model::cuda {

inline constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2 / pi)
inline constexpr float kGeluCubic = 0.044715f;

__device__ __forceinline__ float gelu_tanh(float x) {
  const float cubic = __fmul_rn(__fmul_rn(__fmul_rn(kGeluCubic, x), x), x);
  const float t = tanhf(__fmul_rn(kGeluScale, __fadd_rn(x, cubic)));
  return __fmul_rn(__fmul_rn(0.5f, x), __fadd_rn(1.0f, t));
}

}  // namespace nibble::model::cuda
