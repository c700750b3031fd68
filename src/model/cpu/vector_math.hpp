// exp and erf in float as straight-line arithmetic (no calls, no branches), so that the
// element-wise loops of the CPU ops vectorise: libm's scalar tanhf (GELU forward and backward,
// now written with exp) took 40% of a small GPT's training step, more than its matrix products.
//
// Accuracy, checked against double precision in tests/model_ops_test.cpp:
//   exp_f   relative error within 3e-7 on [-87, 88]; below -87 it returns exp(-87) (~1.6e-38), above
//           88 exp(88) (the GELU backward meets that only for x < -10, where its result, ~1e-37,
//           moves by less than itself);
//   erf_f   absolute error within 4e-7, relative within 3e-7 below 1/2 (the rational approximation
//           7.1.26 of Abramowitz & Stegun's Handbook of Mathematical Functions above 1/2, whose
//           bound is 1.5e-7).
// NaN in gives NaN out. The functions are host-only: the CUDA kernels use the device's tanhf/erff.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

namespace nibble::model::cpu {

// e^x = 2^n e^r with n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 split into a
// part exact in float and a remainder, Cody & Waite), e^r by its Taylor series to r^7, whose
// truncation error at |r| = ln2/2 is 5e-9 relative.
inline float exp_f(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;  // 12 significant bits: n * kLn2Hi is exact
  constexpr float kLn2Lo = 1.42860682030941723e-6f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  // Comparisons written so that NaN passes through both.
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = (x * kLog2e + kRound) - kRound;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // NaN converts to some integer; p is NaN then, and so is the product.
  const std::int32_t biased = static_cast<std::int32_t>(n) + 127;
  return p * std::bit_cast<float>(static_cast<std::uint32_t>(biased) << 23);
}

// erf|x| = 1 - (a1 t + a2 t^2 + a3 t^3 + a4 t^4 + a5 t^5) e^(-x^2), t = 1 / (1 + p|x|); below
// 1/2, where that difference cancels in float, the Maclaurin series 2/sqrt(pi) sum (-1)^k
// x^(2k+1) / (k! (2k+1)) to x^13 (truncation 2e-9).
inline float erf_f(float x) {
  const float a = std::fabs(x);
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  float q = 1.061405429f;
  q = q * t - 1.453152027f;
  q = q * t + 1.421413741f;
  q = q * t - 0.284496736f;
  q = q * t + 0.254829592f;
  q = q * t;
  const float large = 1.0f - q * exp_f(-a * a);
  const float a2 = a * a;
  float s = 1.0f / 9360.0f;
  s = s * a2 - 1.0f / 1320.0f;
  s = s * a2 + 1.0f / 216.0f;
  s = s * a2 - 1.0f / 42.0f;
  s = s * a2 + 1.0f / 10.0f;
  s = s * a2 - 1.0f / 3.0f;
  const float small = 1.12837916709551257f * (a + a * (a2 * s));
  return std::copysign(a < 0.5f ? small : large, x);
}

}  // namespace nibble::model::cpu
