// The block-wise state codecs as plain loops over a run of elements [from, n) of one block: codes
// of 8-bit state one per byte, of 4-bit state two per byte (element 2k in the low nibble, runs
// start at an even element). Host+device; the CPU's AVX2/AVX-512 codecs (src/optim/cpu/codec_simd.hpp) are
// specialisations that end in these for their tails, so both give the same codes and values.
#pragma once

#include <cstdint>

#include "math/codebook.hpp"
#include "math/common.hpp"

namespace nibble::math {

// How a slot's values are stored. Backends switch on this, not on the precision, so a precision
// that stores like another (8-bit codes of another codebook, say) adds no case to them.
enum class StateStorage : std::uint8_t {
  kF32,     // fp32 values
  kBf16,    // bf16 bits
  kCodes8,  // one code per byte, scaled per block (or rank-1)
  kCodes4,  // two codes per byte, element 2k in the low nibble
};

// NOTE: the multiplier that maps a block onto [-1, 1] for its encode: 1 / absmax, and 0 (every
// code that of 0) for a block whose absmax is 0, not finite, or subnormal. State that decays for
// hundreds of steps without a gradient (m of an embedding row never seen) reaches subnormals; below
// 2^-128, 1 / absmax overflows and would saturate every code to the map's largest value, and
// values below 2^-126 are invisible to any update anyway (sqrt(v) + eps, m / ...).
NIBBLE_HD float block_inverse(float absmax) {
  return absmax >= 1.17549435e-38f && absmax <= 3.40282347e+38f ? 1.0f / absmax : 0.0f;  // FLT_MIN, FLT_MAX
}

NIBBLE_HD void encode8_run(const Codebook& cb, const float* __restrict x, float inv, std::uint8_t* __restrict codes,
                           std::int64_t from, std::int64_t n) {
  for (std::int64_t i = from; i < n; ++i) codes[i] = codebook_encode(cb, x[i] * inv);
}

NIBBLE_HD void decode8_run(const Codebook& cb, const std::uint8_t* __restrict codes, float scale,
                           float* __restrict out, std::int64_t from, std::int64_t n) {
  for (std::int64_t i = from; i < n; ++i) out[i] = cb.values[codes[i]] * scale;
}

NIBBLE_HD void encode4_run(const Codebook& cb, const float* __restrict x, float inv, std::uint8_t* __restrict codes,
                           std::int64_t from, std::int64_t n) {
  std::int64_t i = from;
  for (; i + 1 < n; i += 2)
    codes[i / 2] = static_cast<std::uint8_t>(codebook_encode(cb, x[i] * inv) | (codebook_encode(cb, x[i + 1] * inv) << 4));
  if (i < n) codes[i / 2] = codebook_encode(cb, x[i] * inv);
}

NIBBLE_HD void decode4_run(const Codebook& cb, const std::uint8_t* __restrict codes, float scale,
                           float* __restrict out, std::int64_t from, std::int64_t n) {
  for (std::int64_t i = from; i < n; ++i) out[i] = cb.values[(codes[i >> 1] >> ((i & 1) * 4)) & 0xfu] * scale;
}

}  // namespace nibble::math
