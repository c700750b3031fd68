// Codebooks of block-wise quantized optimizer state, and their encoder and decoder.
// A state value x in a block with absolute maximum `absmax` is stored as the index (code) of the
// codebook value nearest to y = x / absmax; codes are indices into the ascending value table.
// The 8-bit maps are dynamic ("tree") maps after Dettmers et al., arXiv 2110.02861: decades
// 10^-6..10^0, each split into 2^p linear bins whose midpoints are the values, finer near 1, plus
// 0 and 1. The 4-bit second-moment map is linear without zero (Li et al., arXiv 2309.01507).
// The fp8 maps are minifloats (see minifloat_encode): their codes are the float bits themselves,
// not indices into an ascending table, and they are encoded by bit operations.
#pragma once

#include <cmath>
#include <cstdint>

#include "math/common.hpp"

namespace nibble::math {

enum class CodebookId : std::uint8_t {
  kDynamicSigned8 = 0,    // first moments, 8-bit
  kDynamicUnsigned8 = 1,  // second moments, 8-bit
  kDynamicSigned4 = 2,    // first moments, 4-bit
  kLinearUnsigned4 = 3,   // second moments, 4-bit: (i + 1) / 16, no zero
  kFp8Signed = 4,         // first moments, fp8: OCP e4m3fn codes of y * 2^8
  kFp8Unsigned = 5,       // second moments, fp8: unsigned e5m3 codes of y (bias 31)
};
inline constexpr int kCodebookCount = 6;

// NOTE: nearest-code search by arithmetic, not by search. Non-zero magnitudes sit in "positions"
// p (one per decade) of 2^p linear bins: value(p, j) = lo[p] + width[p] * (j + 0.5). The encoder
// finds p with a few comparisons against the decade boundaries, estimates j = (a - lo) / width,
// and settles it against the two neighbouring bin edges lo + width * j and lo + width * (j + 1).
// Every value and threshold is defined by these float formulas (no fma, fixed order), so the
// scalar, SIMD and CUDA encoders agree bit for bit with the brute-force search over `thresholds`.
struct Codebook {
  CodebookId id = CodebookId::kDynamicSigned8;
  int size = 0;  // 256 or 16 codes
  bool is_signed = false;
  bool has_zero = false;   // a code for 0
  bool has_one = false;    // a code for exactly +1 above the top bin
  int p_min = 0, p_max = 0;
  int zero_index = 0;      // code of 0 (signed maps: first positive code is zero_index + 1)
  float lo[8] = {};        // per position p: lower edge of bin 0
  float width[8] = {};     // bin width
  float inv_width[8] = {};
  float boundary[8] = {};  // boundary[p]: threshold between the top of p - 1 and the bottom of p
  float zero_threshold = 0.0f;  // magnitudes at or below it encode as 0
  float one_threshold = 0.0f;   // magnitudes above it encode as +1 (has_one, y > 0)
  float values[256] = {};       // ascending (minifloat maps: values[code], the code's float value)
  float thresholds[256] = {};   // thresholds[i] between values[i] and values[i + 1] (tree maps only)
  // Minifloat maps (fp8): codes are sign | exponent | 3 mantissa bits, value 2^(E - bias) * (1 + m/8)
  // for an exponent field E >= 1, 2^(1 - bias) * m/8 for E = 0 (subnormals).
  bool minifloat = false;
  int exponent_bias = 0;           // in units of y (the block's scaled value)
  std::uint32_t max_magnitude = 0; // the largest finite magnitude code (saturation)
};

// NOTE: fp8 encode, exact by construction. y = x / absmax lies in [-1, 1]. Signed maps hold the
// OCP e4m3fn codes of y * 2^8 (y = 1 is 256 = 0x78), i.e. e4m3 with its bias 7 moved to 15 for y;
// unsigned maps an e5m3 of our own (the sign bit becomes a fifth exponent bit) with bias 31 for y
// (y = 1 is 0xf8; smallest normal 2^-30, smallest subnormal 2^-33 of the block's absmax). Scaling
// by a power of two is exact, so rounding y to the code set once, to nearest with ties to even,
// is the whole encode: no double rounding (a non-power-of-two multiplier such as 448 would round
// twice). The price is the codes above 1 (e4m3: 288..448, 6 per sign; e5m3: 1.125..1.875, 7): a
// block never produces them (|y| <= 1), but they decode, and inputs above 1 round to them as
// nearest-even says, saturating at the largest finite code.
// Normal range (|y| >= 2^(1 - bias)): the float's exponent and top 3 mantissa bits, rounded to
// nearest-even on the 20 bits below by an integer add (a carry moves into the exponent, as it
// should), re-biased. Subnormal range: adding 2^(21 - bias), whose ulp is the minifloat's subnormal
// step, makes the FPU round to nearest-even; the low bits of the sum are the code (8 = the
// smallest normal). Float subnormal inputs give code 0 with or without flush-to-zero.
// NaN encodes as +0 (NaN state would poison its whole block at the next absmax); +-inf and finite
// values beyond the largest code saturate to it; unsigned maps encode negatives (and -0) as 0.
NIBBLE_HD std::uint32_t minifloat_magnitude(std::uint32_t a, int bias, std::uint32_t max_magnitude) {
  const std::uint32_t normal = ((a + 0x7ffffu + ((a >> 20) & 1u)) >> 20) - (static_cast<std::uint32_t>(127 - bias) << 3);
  const float magic = bits_float(static_cast<std::uint32_t>(148 - bias) << 23);  // 2^(21 - bias)
  const std::uint32_t subnormal = float_bits(bits_float(a) + magic) - float_bits(magic);
  std::uint32_t m = a < (static_cast<std::uint32_t>(128 - bias) << 23) ? subnormal : normal;
  m = m < max_magnitude ? m : max_magnitude;
  return a > 0x7f800000u ? 0u : m;
}

NIBBLE_HD std::uint8_t minifloat_encode(const Codebook& cb, float y) {
  const std::uint32_t u = float_bits(y);
  const std::uint32_t a = u & 0x7fffffffu;
  const std::uint32_t m = minifloat_magnitude(a, cb.exponent_bias, cb.max_magnitude);
  if (!cb.is_signed) return static_cast<std::uint8_t>(u >> 31 ? 0u : m);
  return static_cast<std::uint8_t>((a > 0x7f800000u ? 0u : (u >> 24) & 0x80u) | m);
}

// The value of a minifloat code (NaN for e4m3's 0x7f and 0xff).
inline float minifloat_value(const Codebook& cb, int code) {
  const int mantissa_bits = 3;
  const int magnitude = cb.is_signed ? code & 0x7f : code;
  const double sign = cb.is_signed && (code & 0x80) ? -1.0 : 1.0;
  if (cb.is_signed && magnitude == 0x7f) return bits_float(0x7fc00000u);
  const int e = magnitude >> mantissa_bits, m = magnitude & ((1 << mantissa_bits) - 1);
  const double v = e == 0 ? std::ldexp(m / 8.0, 1 - cb.exponent_bias) : std::ldexp(1.0 + m / 8.0, e - cb.exponent_bias);
  return static_cast<float>(sign * v);
}

NIBBLE_HD float codebook_bin_value(const Codebook& cb, int p, int j) {
  return cb.lo[p] + cb.width[p] * (static_cast<float>(j) + 0.5f);
}
NIBBLE_HD float codebook_bin_edge(const Codebook& cb, int p, int j) {
  return cb.lo[p] + cb.width[p] * static_cast<float>(j);
}

// Ties go toward zero: a magnitude exactly on a threshold takes the smaller-magnitude code.
// Unsigned maps clamp negative inputs (and NaN) to their smallest code.
NIBBLE_HD std::uint8_t codebook_encode(const Codebook& cb, float y) {
  if (cb.minifloat) return minifloat_encode(cb, y);
  const float a = cb.is_signed ? abs_f(y) : (y > 0.0f ? y : 0.0f);
  const bool negative = (float_bits(y) >> 31) != 0 && cb.is_signed;
  int p = cb.p_max;
  for (int q = cb.p_min + 1; q <= cb.p_max; ++q) p -= a <= cb.boundary[q] ? 1 : 0;
  const int top = (1 << p) - 1;
  const float top_f = static_cast<float>(top);
  // The bin j with edge(j) < a <= edge(j + 1). Estimated from the first bin's center, the floor
  // is j or j - 1 (the roundings move it by less than 1e-4 bins), so only the upper edge decides.
  float estimate = (a - codebook_bin_value(cb, p, 0)) * cb.inv_width[p];
  estimate = estimate > 0.0f ? estimate : 0.0f;  // NaN becomes 0 here
  estimate = estimate < top_f ? estimate : top_f;
  int j = static_cast<int>(estimate);
  j += (j < top && a > codebook_bin_edge(cb, p, j + 1)) ? 1 : 0;
  const int rank = (1 << p) - (1 << cb.p_min) + j + (cb.has_zero ? 1 : 0);  // among magnitudes, 0 first
  int code = cb.is_signed ? (negative ? cb.zero_index - rank : cb.zero_index + rank) : rank;
  if (cb.has_zero && a <= cb.zero_threshold) code = cb.zero_index;
  if (cb.has_one && !negative && a > cb.one_threshold) code = cb.size - 1;
  return static_cast<std::uint8_t>(code);
}

NIBBLE_HD float codebook_decode(const Codebook& cb, std::uint8_t code) { return cb.values[code]; }

// The reference the fast encoder must equal: nearest value by a scan of the thresholds, ties
// toward zero.
inline std::uint8_t codebook_encode_brute_force(const Codebook& cb, float y) {
  int c = 0;
  if (y >= 0.0f || !cb.is_signed) {
    while (c < cb.size - 1 && y > cb.thresholds[c]) ++c;
  } else {
    while (c < cb.size - 1 && y >= cb.thresholds[c]) ++c;
  }
  return static_cast<std::uint8_t>(c);
}

namespace detail {

// Positions p_min..p_max; position p is the decade 10^-(p_max - p) split into 2^p bins.
inline void set_dynamic(Codebook& cb, int p_min, int p_max) {
  cb.p_min = p_min;
  cb.p_max = p_max;
  for (int p = p_min; p <= p_max; ++p) {
    const double scale = std::pow(10.0, -(p_max - p));
    const double width = 0.9 * scale / static_cast<double>(1 << p);
    cb.lo[p] = static_cast<float>(0.1 * scale);
    cb.width[p] = static_cast<float>(width);
    cb.inv_width[p] = static_cast<float>(1.0 / width);
  }
}

inline void finish(Codebook& cb) {
  const int p_min = cb.p_min, p_max = cb.p_max;
  for (int p = p_min + 1; p <= p_max; ++p)
    cb.boundary[p] = (codebook_bin_value(cb, p - 1, (1 << (p - 1)) - 1) + codebook_bin_value(cb, p, 0)) * 0.5f;
  cb.zero_threshold = codebook_bin_value(cb, p_min, 0) * 0.5f;
  cb.one_threshold = (codebook_bin_value(cb, p_max, (1 << p_max) - 1) + 1.0f) * 0.5f;
  // Magnitudes ascending with the thresholds above each one.
  float mags[256], above[256];
  int n = 0;
  for (int p = p_min; p <= p_max; ++p)
    for (int j = 0; j < (1 << p); ++j) {
      mags[n] = codebook_bin_value(cb, p, j);
      above[n] = j + 1 < (1 << p) ? codebook_bin_edge(cb, p, j + 1) : (p < p_max ? cb.boundary[p + 1] : cb.one_threshold);
      ++n;
    }
  int c = 0;
  if (cb.is_signed) {
    for (int i = n - 1; i >= 0; --i) {
      cb.values[c] = -mags[i];
      cb.thresholds[c++] = i > 0 ? -above[i - 1] : -cb.zero_threshold;
    }
  }
  if (cb.has_zero) {
    cb.zero_index = c;
    cb.values[c] = 0.0f;
    cb.thresholds[c++] = cb.zero_threshold;
  }
  for (int i = 0; i < n; ++i) {
    cb.values[c] = mags[i];
    cb.thresholds[c++] = above[i];
  }
  if (cb.has_one) {
    cb.values[c] = 1.0f;
    cb.thresholds[c++] = INFINITY;
  }
  cb.thresholds[c - 1] = INFINITY;
  cb.size = c;
}

}  // namespace detail

// Builds one of nibble's codebooks; returns false for an unknown id.
inline bool build_codebook(Codebook& cb, CodebookId id) {
  cb = Codebook{};
  cb.id = id;
  switch (id) {
    case CodebookId::kDynamicSigned8:  // 127 magnitudes in 7 decades, 0, +-, and +1: 256 codes
      cb.is_signed = cb.has_zero = cb.has_one = true;
      detail::set_dynamic(cb, 0, 6);
      break;
    case CodebookId::kDynamicUnsigned8:  // 254 magnitudes in 7 decades, 0 and 1: 256 codes
      cb.has_zero = cb.has_one = true;
      detail::set_dynamic(cb, 1, 7);
      break;
    case CodebookId::kDynamicSigned4:  // 7 magnitudes in 3 decades, 0, +-, and +1: 16 codes
      cb.is_signed = cb.has_zero = cb.has_one = true;
      detail::set_dynamic(cb, 0, 2);
      break;
    case CodebookId::kLinearUnsigned4:  // (i + 1) / 16: one position of 16 bins of width 1/16
      cb.p_min = cb.p_max = 4;
      cb.lo[4] = 1.0f / 32.0f;
      cb.width[4] = 1.0f / 16.0f;
      cb.inv_width[4] = 16.0f;
      break;
    case CodebookId::kFp8Signed:    // e4m3fn of y * 2^8: bias 15 for y, largest 448 / 256 (0x7e)
    case CodebookId::kFp8Unsigned:  // unsigned e5m3 of y: bias 31, largest 1.875 (0xff)
      cb.minifloat = cb.has_zero = true;
      cb.is_signed = id == CodebookId::kFp8Signed;
      cb.size = 256;
      cb.exponent_bias = cb.is_signed ? 7 + 8 : 31;
      cb.max_magnitude = cb.is_signed ? 0x7eu : 0xffu;
      for (int c = 0; c < 256; ++c) cb.values[c] = minifloat_value(cb, c);
      return true;
    default:
      return false;
  }
  detail::finish(cb);
  return true;
}

}  // namespace nibble::math
