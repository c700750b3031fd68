// AVX2 and AVX-512 versions of the block codecs of src/math/state_codec.hpp: eight (AVX2) or sixteen
// (AVX-512) values per instruction with the same float formulas in the same order, so codes and
// decoded values are bit-identical to the scalar runs they end in (tests compare them). No gathers:
// the per-decade constants come from registers, the 8-bit value tables from byte permutes.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "math/bf16.hpp"
#include "math/codebook.hpp"
#include "math/state_codec.hpp"

#if defined(__AVX2__)
// GCC 12 reports the AVX-512 intrinsics' undefined pass-through operands as (maybe) used
// uninitialized wherever they are inlined (a false positive, GCC bug 105593); the diagnostic
// state at the intrinsics' own lines decides, so it is off for this include only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#define NIBBLE_CODEC_AVX2 1
#endif
// AVX-512 (F, BW, DQ, VL: every x86 CPU with AVX-512 since Skylake-SP): the codecs and the block
// ranges take 16 lanes per instruction; the tails keep the AVX2 forms. With VBMI as well (Ice Lake,
// Zen 4 and later) the 8-bit tree maps decode by byte table lookups.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define NIBBLE_CODEC_AVX512 1
#if defined(__AVX512VBMI__)
#define NIBBLE_CODEC_VBMI 1
#endif
#endif

namespace nibble {
const math::Codebook& codebook(math::CodebookId id);  // the library's maps (src/optim/optimizer.cpp)
}

namespace nibble::cpu {
// NOTE: the codecs are inline functions compiled to the instruction set of each translation unit.
// One inline namespace per instruction set gives each form its own symbols, so a test built
// without AVX-512 beside a library built with it (codec_simd_avx2_test) runs its own AVX2 code,
// not whichever copy the linker kept.
#if defined(NIBBLE_CODEC_VBMI)
inline namespace codec_avx512_vbmi {
#elif defined(NIBBLE_CODEC_AVX512)
inline namespace codec_avx512 {
#elif defined(NIBBLE_CODEC_AVX2)
inline namespace codec_avx2 {
#else
inline namespace codec_scalar {
#endif

// NOTE: absmax as the maximum of the magnitude bits. For non-negative floats the integer order is
// the float order, and an integer max reduction vectorises without -ffast-math. NaN when an
// element is NaN, inf when one is inf. The AVX2 form keeps four independent maxima (one chain ran
// at one vector a cycle) and reduces them once; a maximum does not depend on order, so it equals
// the scalar loop.
inline float block_absmax(const float* __restrict x, std::int64_t n) {
  std::uint32_t m = 0;
  std::int64_t i = 0;
#if defined(NIBBLE_CODEC_AVX512)
  if (n >= 64) {
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
    const auto bits = [&](std::int64_t at) {
      return _mm512_and_si512(_mm512_castps_si512(_mm512_loadu_ps(x + at)), magnitude);
    };
    __m512i a0 = bits(0), a1 = bits(16), a2 = bits(32), a3 = bits(48);
    for (i = 64; i + 64 <= n; i += 64) {
      a0 = _mm512_max_epu32(a0, bits(i));
      a1 = _mm512_max_epu32(a1, bits(i + 16));
      a2 = _mm512_max_epu32(a2, bits(i + 32));
      a3 = _mm512_max_epu32(a3, bits(i + 48));
    }
    m = _mm512_reduce_max_epu32(_mm512_max_epu32(_mm512_max_epu32(a0, a1), _mm512_max_epu32(a2, a3)));
  }
#elif defined(NIBBLE_CODEC_AVX2)
  if (n >= 32) {
    const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
    const auto bits = [&](std::int64_t at) {
      return _mm256_and_si256(_mm256_castps_si256(_mm256_loadu_ps(x + at)), magnitude);
    };
    __m256i a0 = bits(0), a1 = bits(8), a2 = bits(16), a3 = bits(24);
    for (i = 32; i + 32 <= n; i += 32) {
      a0 = _mm256_max_epu32(a0, bits(i));
      a1 = _mm256_max_epu32(a1, bits(i + 8));
      a2 = _mm256_max_epu32(a2, bits(i + 16));
      a3 = _mm256_max_epu32(a3, bits(i + 24));
    }
    const __m256i a = _mm256_max_epu32(_mm256_max_epu32(a0, a1), _mm256_max_epu32(a2, a3));
    __m128i h = _mm_max_epu32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    h = _mm_max_epu32(h, _mm_shuffle_epi32(h, 0x4e));
    h = _mm_max_epu32(h, _mm_shuffle_epi32(h, 0xb1));
    m = static_cast<std::uint32_t>(_mm_cvtsi128_si32(h));
  }
#endif
  for (; i < n; ++i) {
    const std::uint32_t u = math::float_bits(x[i]) & 0x7fffffffu;
    m = u > m ? u : m;
  }
  return math::bits_float(m);
}

// The smallest and the largest magnitude bits of x[0, n) (n >= 1), as block_absmax's maximum, in
// one pass: the fp8 encode takes its normal-only path when the smallest scaled magnitude is normal.
struct MagnitudeRange {
  std::uint32_t min, max;
};
inline MagnitudeRange block_magnitude_range(const float* __restrict x, std::int64_t n) {
  std::uint32_t lo = 0xffffffffu, hi = 0;
  std::int64_t i = 0;
#if defined(NIBBLE_CODEC_AVX512)
  if (n >= 32) {
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
    const auto bits = [&](std::int64_t at) {
      return _mm512_and_si512(_mm512_castps_si512(_mm512_loadu_ps(x + at)), magnitude);
    };
    __m512i b0 = bits(0), b1 = bits(16);
    __m512i min0 = b0, min1 = b1, max0 = b0, max1 = b1;
    for (i = 32; i + 32 <= n; i += 32) {
      b0 = bits(i);
      b1 = bits(i + 16);
      min0 = _mm512_min_epu32(min0, b0);
      min1 = _mm512_min_epu32(min1, b1);
      max0 = _mm512_max_epu32(max0, b0);
      max1 = _mm512_max_epu32(max1, b1);
    }
    lo = _mm512_reduce_min_epu32(_mm512_min_epu32(min0, min1));
    hi = _mm512_reduce_max_epu32(_mm512_max_epu32(max0, max1));
  }
#elif defined(NIBBLE_CODEC_AVX2)
  if (n >= 16) {
    const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
    const auto bits = [&](std::int64_t at) {
      return _mm256_and_si256(_mm256_castps_si256(_mm256_loadu_ps(x + at)), magnitude);
    };
    __m256i b0 = bits(0), b1 = bits(8);
    __m256i min0 = b0, min1 = b1, max0 = b0, max1 = b1;
    for (i = 16; i + 16 <= n; i += 16) {
      b0 = bits(i);
      b1 = bits(i + 8);
      min0 = _mm256_min_epu32(min0, b0);
      min1 = _mm256_min_epu32(min1, b1);
      max0 = _mm256_max_epu32(max0, b0);
      max1 = _mm256_max_epu32(max1, b1);
    }
    const auto reduce = [](__m256i a, auto op) {
      __m128i h = op(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
      h = op(h, _mm_shuffle_epi32(h, 0x4e));
      h = op(h, _mm_shuffle_epi32(h, 0xb1));
      return static_cast<std::uint32_t>(_mm_cvtsi128_si32(h));
    };
    lo = reduce(_mm256_min_epu32(min0, min1), [](__m128i a, __m128i b) { return _mm_min_epu32(a, b); });
    hi = reduce(_mm256_max_epu32(max0, max1), [](__m128i a, __m128i b) { return _mm_max_epu32(a, b); });
  }
#endif
  for (; i < n; ++i) {
    const std::uint32_t u = math::float_bits(x[i]) & 0x7fffffffu;
    lo = u < lo ? u : lo;
    hi = u > hi ? u : hi;
  }
  return {lo, hi};
}

// bf16 state: math::bf16_round_nearest and math::bf16_to_float over n values, sixteen lanes at a
// time with AVX2 (the compiler's own vectorisation of the scalar loop took half again as many
// instructions, and the store cost 0.8x the AdamW rule it follows).
inline void encode_bf16(const float* __restrict x, std::uint16_t* __restrict h, std::int64_t n) {
  std::int64_t i = 0;
#if defined(NIBBLE_CODEC_AVX512)
  {
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff), infinity = _mm512_set1_epi32(0x7f800000);
    const __m512i half_ulp = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1), quiet = _mm512_set1_epi32(0x40);
    const auto round = [&](const float* at) {
      const __m512i u = _mm512_castps_si512(_mm512_loadu_ps(at));
      const __m512i high = _mm512_srli_epi32(u, 16);
      const __m512i rounded =
          _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, half_ulp), _mm512_and_si512(high, one)), 16);
      const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, magnitude), infinity);
      return _mm512_mask_blend_epi32(nan, rounded, _mm512_or_si512(high, quiet));
    };
    // The pack works within 128-bit lanes (lane k: four halves of each vector); the permute of
    // 64-bit groups puts the 32 halves back in order.
    const __m512i order = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);
    for (; i + 32 <= n; i += 32) {
      const __m512i packed = _mm512_packus_epi32(round(x + i), round(x + i + 16));
      _mm512_storeu_si512(h + i, _mm512_permutexvar_epi64(order, packed));
    }
  }
#endif
#if defined(NIBBLE_CODEC_AVX2)
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff), infinity = _mm256_set1_epi32(0x7f800000);
  const __m256i half_ulp = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1), quiet = _mm256_set1_epi32(0x40);
  const auto round = [&](const float* at) {
    const __m256i u = _mm256_castps_si256(_mm256_loadu_ps(at));
    const __m256i high = _mm256_srli_epi32(u, 16);
    const __m256i rounded =
        _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, half_ulp), _mm256_and_si256(high, one)), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, magnitude), infinity);
    return _mm256_blendv_epi8(rounded, _mm256_or_si256(high, quiet), nan);
  };
  for (; i + 16 <= n; i += 16) {
    // The pack works within 128-bit lanes; the permute puts the 16 halves back in order.
    const __m256i packed = _mm256_packus_epi32(round(x + i), round(x + i + 8));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(h + i), _mm256_permute4x64_epi64(packed, 0xd8));
  }
#endif
  for (; i < n; ++i) h[i] = math::bf16_round_nearest(x[i]);
}

inline void decode_bf16(const std::uint16_t* __restrict h, float* __restrict x, std::int64_t n) {
  std::int64_t i = 0;
#if defined(NIBBLE_CODEC_AVX512)
  for (; i + 16 <= n; i += 16) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i)));
    _mm512_storeu_ps(x + i, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
  }
#endif
#if defined(NIBBLE_CODEC_AVX2)
  for (; i + 8 <= n; i += 8) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i)));
    _mm256_storeu_ps(x + i, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
  }
#endif
  for (; i < n; ++i) x[i] = math::bf16_to_float(h[i]);
}

#if defined(NIBBLE_CODEC_AVX2)

#if defined(NIBBLE_CODEC_VBMI)
// NOTE: an 8-bit map's 256 values as four byte planes (plane k: byte k of every value), so that
// 64 codes look up 64 bytes of one plane with two two-register byte permutes (codes 0..127 and
// 128..255) and a blend on the code's top bit, and four such planes interleaved by unpacks are 64
// floats: about 31 operations per 64 codes against 96 for the tree's decode by arithmetic. The
// planes are built once per map from the library's own Codebook (nibble::codebook): SimdCodebook<kId>
// is the form of that map, as its shape constants above already say.
struct BytePlanes {
  alignas(64) std::uint8_t bytes[4][256];
};
template <math::CodebookId kId>
const BytePlanes& byte_planes() {
  static const BytePlanes planes = [] {
    const math::Codebook& cb = nibble::codebook(kId);
    BytePlanes p{};
    for (int i = 0; i < 256; ++i)
      for (int k = 0; k < 4; ++k) p.bytes[k][i] = static_cast<std::uint8_t>(math::float_bits(cb.values[i]) >> (8 * k));
    return p;
  }();
  return planes;
}
#endif

#if defined(NIBBLE_CODEC_AVX512)
// NOTE: a tree map's decade p of a magnitude a from a's binary exponent e: the decade boundaries
// are at least 10x apart, so an octave [2^e, 2^(e+1)) holds at most one of them, and
// p = first[e] - (a <= inside[e]), with first[e] the decade just below 2^(e+1) and inside[e] the
// boundary within the octave (-1 where none): kPMax minus the boundaries at or above a, as the
// compares give it. Exponents 96..127 index 32-entry tables by their low 5 bits (two-register
// permutes); larger ones (a >= 2, inf, NaN) are clamped to 127, whose decade is the top one, as
// the compares say; smaller ones (a below 2^-31) take any entry, and such a codes as 0 by the zero
// threshold whatever its decade. 6 operations per 16 values instead of the compares' 12. Built
// once per map from the library's own Codebook; `exact` is false if an octave held two boundaries,
// and the compares are used.
struct DecadeTables {
  alignas(64) std::int32_t first[32];
  alignas(64) float inside[32];
  bool exact;
};
template <math::CodebookId kId, int kPMin, int kPMax>
const DecadeTables& decade_tables() {
  static const DecadeTables tables = [] {
    const math::Codebook& cb = nibble::codebook(kId);
    DecadeTables t{};
    t.exact = true;
    for (int k = 0; k < 32; ++k) {
      const float low = math::bits_float(static_cast<std::uint32_t>(96 + k) << 23);
      const float top = 2.0f * low;
      int above = 0, inside = 0;
      t.inside[k] = -1.0f;
      for (int q = kPMin + 1; q <= kPMax; ++q) {
        if (cb.boundary[q] >= top) ++above;
        else if (cb.boundary[q] >= low) {
          t.inside[k] = cb.boundary[q];
          ++inside;
        }
      }
      t.first[k] = kPMax - above;
      if (inside > 1) t.exact = false;
    }
    return t;
  }();
  return tables;
}
#endif

// The codebook's constants in registers, built once per block. The shape of the map (signed,
// zero, one, positions) is a template parameter so the decade search unrolls; the constants are
// taken from the Codebook, the single source of the numbers.
template <math::CodebookId kId_>
struct SimdCodebook {
  static constexpr math::CodebookId kId = kId_;
  static constexpr bool kMinifloat = false;
  static constexpr bool kSigned = kId == math::CodebookId::kDynamicSigned8 || kId == math::CodebookId::kDynamicSigned4;
  static constexpr bool kZeroAndOne = kId != math::CodebookId::kLinearUnsigned4;
  static constexpr int kPMin = kId == math::CodebookId::kDynamicUnsigned8 ? 1 : (kId == math::CodebookId::kLinearUnsigned4 ? 4 : 0);
  static constexpr int kPMax = kId == math::CodebookId::kDynamicSigned8 ? 6
                               : kId == math::CodebookId::kDynamicUnsigned8 ? 7
                               : kId == math::CodebookId::kDynamicSigned4 ? 2 : 4;
  static constexpr int kSize = kId == math::CodebookId::kDynamicSigned8 || kId == math::CodebookId::kDynamicUnsigned8 ? 256 : 16;
  static constexpr int kZeroIndex = kSigned ? kSize / 2 - 1 : 0;

  __m256 lo, width, inv_width, first_center, zero_threshold, one_threshold;
  __m256i top_bin, first_rank;  // per decade p: its last bin 2^p - 1, the rank of its first bin
  __m256 boundary[8];
  __m256 values_lo, values_hi;  // 4-bit maps: values[0..7], values[8..15]

  explicit SimdCodebook(const math::Codebook& cb)
      : lo(_mm256_loadu_ps(cb.lo)),
        width(_mm256_loadu_ps(cb.width)),
        inv_width(_mm256_loadu_ps(cb.inv_width)),
        zero_threshold(_mm256_set1_ps(cb.zero_threshold)),
        one_threshold(_mm256_set1_ps(cb.one_threshold)),
        values_lo(_mm256_loadu_ps(cb.values)),
        values_hi(_mm256_loadu_ps(cb.values + 8)) {
    for (int q = 0; q < 8; ++q) boundary[q] = _mm256_set1_ps(cb.boundary[q]);
    float center[8];
    for (int q = 0; q < 8; ++q) center[q] = math::codebook_bin_value(cb, q, 0);
    first_center = _mm256_loadu_ps(center);
    top_bin = _mm256_setr_epi32(0, 1, 3, 7, 15, 31, 63, 127);
    first_rank = _mm256_sub_epi32(_mm256_add_epi32(top_bin, _mm256_set1_epi32(1)),
                                  _mm256_set1_epi32((1 << kPMin) - (kZeroAndOne ? 1 : 0)));
#if defined(NIBBLE_CODEC_AVX512)
    lo16 = _mm512_broadcast_f32x8(lo);
    width16 = _mm512_broadcast_f32x8(width);
    inv_width16 = _mm512_broadcast_f32x8(inv_width);
    first_center16 = _mm512_broadcast_f32x8(first_center);
    top_bin16 = _mm512_broadcast_i32x8(top_bin);
    first_rank16 = _mm512_broadcast_i32x8(first_rank);
    values16 = _mm512_loadu_ps(cb.values);  // 4-bit maps: all 16 values in one register
    for (int q = 0; q < 8; ++q) boundary16[q] = _mm512_set1_ps(cb.boundary[q]);
    zero_threshold16 = _mm512_set1_ps(cb.zero_threshold);
    one_threshold16 = _mm512_set1_ps(cb.one_threshold);
    if constexpr (kDecadeLookup) {
      const DecadeTables& decades = decade_tables<kId, kPMin, kPMax>();
      first_lo = _mm512_load_si512(decades.first);
      first_hi = _mm512_load_si512(decades.first + 16);
      inside_lo = _mm512_load_ps(decades.inside);
      inside_hi = _mm512_load_ps(decades.inside + 16);
      decades_exact = decades.exact;
    }
#endif
  }

  // Codes of eight values y as int32 lanes; mirrors math::codebook_encode step by step.
  //
  // NOTE: one edge check. The bin j of a within decade p is the one whose float edges
  // lo + w j < a <= lo + w (j + 1) hold. The estimate is taken from the first bin's center,
  // (a - lo - w/2) / w: it is within 1e-4 bins of P - 1/2, where P = (a - lo) / w is within 1e-4
  // bins of the edges' own position (all roundings are relative 2^-24 of at most 2^8 bins). So
  // its floor is j - 1 or j, never j + 1 or j - 2, and the upper edge's check alone gives j.
  // Estimating from lo needed a check of each edge: 6 more operations per 8 values, 11-13% of the
  // 8-bit AdamW step (tests check the codes against the brute-force nearest code on and next to
  // every threshold, and over a sweep of bit patterns).
  __m256i encode(__m256 y) const {
    // Signed maps code |y| with a sign; unsigned maps clamp y < 0 and NaN to 0 (max_ps returns
    // its second operand for NaN and for -0 vs +0), as the scalar encoder.
    const __m256 a = kSigned ? _mm256_and_ps(y, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)))
                             : _mm256_max_ps(y, _mm256_setzero_ps());
    __m256i p = _mm256_set1_epi32(kPMax);
    for (int q = kPMin + 1; q <= kPMax; ++q)
      p = _mm256_add_epi32(p, _mm256_castps_si256(_mm256_cmp_ps(a, boundary[q], _CMP_LE_OQ)));
    const __m256 lo_b = _mm256_permutevar8x32_ps(lo, p);
    const __m256 width_b = _mm256_permutevar8x32_ps(width, p);
    const __m256 inv_width_b = _mm256_permutevar8x32_ps(inv_width, p);
    const __m256i one = _mm256_set1_epi32(1);
    const __m256i top = _mm256_permutevar8x32_epi32(top_bin, p);
    const __m256 center_b = _mm256_permutevar8x32_ps(first_center, p);
    __m256 estimate = _mm256_mul_ps(_mm256_sub_ps(a, center_b), inv_width_b);
    estimate = _mm256_max_ps(estimate, _mm256_setzero_ps());  // NaN -> 0, as the scalar code
    // At most top, clamped as an integer: an estimate past 2^31 (a = inf) converts to 0x80000000,
    // which the unsigned minimum also takes to top.
    __m256i j = _mm256_min_epu32(_mm256_cvttps_epi32(estimate), top);
    const __m256 edge_up = _mm256_add_ps(lo_b, _mm256_mul_ps(width_b, _mm256_cvtepi32_ps(_mm256_add_epi32(j, one))));
    const __m256i up = _mm256_and_si256(_mm256_cmpgt_epi32(top, j),
                                        _mm256_castps_si256(_mm256_cmp_ps(a, edge_up, _CMP_GT_OQ)));
    j = _mm256_sub_epi32(j, up);
    const __m256i rank = _mm256_add_epi32(_mm256_permutevar8x32_epi32(first_rank, p), j);
    __m256i code = rank;
    // Signed maps: the rank negated where y's sign bit is set (y's bits as an int32 are negative
    // exactly then; +0, whose rank sign_epi32 zeroes, codes as 0 below anyway).
    if constexpr (kSigned)
      code = _mm256_add_epi32(_mm256_set1_epi32(kZeroIndex), _mm256_sign_epi32(rank, _mm256_castps_si256(y)));
    if constexpr (kZeroAndOne) {
      code = _mm256_blendv_epi8(code, _mm256_set1_epi32(kZeroIndex),
                                _mm256_castps_si256(_mm256_cmp_ps(a, zero_threshold, _CMP_LE_OQ)));
      // +1 above the threshold: y itself, so negative values (and NaN) never take it.
      code = _mm256_blendv_epi8(code, _mm256_set1_epi32(kSize - 1),
                                _mm256_castps_si256(_mm256_cmp_ps(y, one_threshold, _CMP_GT_OQ)));
    }
    return code;
  }

  // The tree maps' encoder has no lanes to drop for bounded inputs.
  __m256i encode_bounded(__m256 y) const { return encode(y); }

  // Values of eight codes (int32 lanes), equal to the value table. 4-bit maps: two in-register
  // permutes of the 16 values; 8-bit maps: codebook_bin_value computed from the code (cheaper on
  // the CPU than a gather).
  __m256 decode(__m256i code) const {
    if constexpr (kSize == 16) {
      const __m256 low = _mm256_permutevar8x32_ps(values_lo, code);
      const __m256 high = _mm256_permutevar8x32_ps(values_hi, code);
      return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)));
    }
    __m256i rank = code;
    __m256i negative = _mm256_setzero_si256();
    if constexpr (kSigned) {
      const __m256i d = _mm256_sub_epi32(code, _mm256_set1_epi32(kZeroIndex));
      negative = _mm256_cmpgt_epi32(_mm256_setzero_si256(), d);
      rank = _mm256_abs_epi32(d);
    }
    const __m256i m = _mm256_add_epi32(rank, _mm256_set1_epi32((1 << kPMin) - (kZeroAndOne ? 1 : 0)));
    const __m256i p = _mm256_sub_epi32(_mm256_srli_epi32(_mm256_castps_si256(_mm256_cvtepi32_ps(m)), 23),
                                       _mm256_set1_epi32(127));
    const __m256i j = _mm256_sub_epi32(m, _mm256_sllv_epi32(_mm256_set1_epi32(1), p));
    const __m256 lo_p = _mm256_permutevar8x32_ps(lo, p);
    const __m256 width_p = _mm256_permutevar8x32_ps(width, p);
    __m256 value = _mm256_add_ps(lo_p, _mm256_mul_ps(width_p, _mm256_add_ps(_mm256_cvtepi32_ps(j), _mm256_set1_ps(0.5f))));
    if constexpr (kZeroAndOne) {
      value = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(rank, _mm256_setzero_si256())), value);
      value = _mm256_blendv_ps(value, _mm256_set1_ps(1.0f),
                               _mm256_castsi256_ps(_mm256_cmpeq_epi32(code, _mm256_set1_epi32(kSize - 1))));
    }
    return _mm256_xor_ps(value, _mm256_castsi256_ps(_mm256_slli_epi32(negative, 31)));
  }

#if defined(NIBBLE_CODEC_AVX512)
  // Sixteen lanes (AVX-512): encode and decode with the same float operations in the same order,
  // so the same codes and values; the per-decade tables take the low half of a 512-bit register
  // (p <= 7), comparisons give masks, and the sign goes in by a masked subtraction.
  __m512 lo16, width16, inv_width16, first_center16, values16, zero_threshold16, one_threshold16;
  __m512 boundary16[8];
  // The decade by exponent (decade_tables) where it saves operations: the 8-bit maps' six
  // compares; the 4-bit maps' two (or none) stay cheaper.
  static constexpr bool kDecadeLookup = kPMax - kPMin > 3;
  __m512i first_lo, first_hi;  // decade_tables': exponents 96..111 and 112..127
  __m512 inside_lo, inside_hi;
  bool decades_exact = false;
  __m512i top_bin16, first_rank16;

  __m512i encode(__m512 y) const {
    const __m512 a = kSigned ? _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32(0x7fffffff)))
                             : _mm512_max_ps(y, _mm512_setzero_ps());
    const __m512i one = _mm512_set1_epi32(1);
    __m512i p;
    if (kDecadeLookup && decades_exact) {
      const __m512i e = _mm512_min_epi32(_mm512_srli_epi32(_mm512_castps_si512(a), 23), _mm512_set1_epi32(127));
      p = _mm512_permutex2var_epi32(first_lo, e, first_hi);
      p = _mm512_mask_sub_epi32(p, _mm512_cmp_ps_mask(a, _mm512_permutex2var_ps(inside_lo, e, inside_hi), _CMP_LE_OQ), p, one);
    } else {
      p = _mm512_set1_epi32(kPMax);
      for (int q = kPMin + 1; q <= kPMax; ++q)
        p = _mm512_mask_sub_epi32(p, _mm512_cmp_ps_mask(a, boundary16[q], _CMP_LE_OQ), p, one);
    }
    const __m512 lo_b = _mm512_permutexvar_ps(p, lo16);
    const __m512 width_b = _mm512_permutexvar_ps(p, width16);
    const __m512 inv_width_b = _mm512_permutexvar_ps(p, inv_width16);
    const __m512i top = _mm512_permutexvar_epi32(p, top_bin16);
    const __m512 center_b = _mm512_permutexvar_ps(p, first_center16);
    __m512 estimate = _mm512_mul_ps(_mm512_sub_ps(a, center_b), inv_width_b);
    estimate = _mm512_max_ps(estimate, _mm512_setzero_ps());  // NaN -> 0
    __m512i j = _mm512_min_epu32(_mm512_cvttps_epi32(estimate), top);
    const __m512 edge_up = _mm512_add_ps(lo_b, _mm512_mul_ps(width_b, _mm512_cvtepi32_ps(_mm512_add_epi32(j, one))));
    const __mmask16 up = _mm512_mask_cmp_ps_mask(_mm512_cmpgt_epi32_mask(top, j), a, edge_up, _CMP_GT_OQ);
    j = _mm512_mask_add_epi32(j, up, j, one);
    const __m512i rank = _mm512_add_epi32(_mm512_permutexvar_epi32(p, first_rank16), j);
    __m512i code = rank;
    if constexpr (kSigned) {
      // The rank negated where y's sign bit is set: encode's sign_epi32, except that +0's rank is
      // kept, and +0 codes as 0 below anyway.
      const __m512i zero_index = _mm512_set1_epi32(kZeroIndex);
      code = _mm512_mask_sub_epi32(_mm512_add_epi32(zero_index, rank), _mm512_movepi32_mask(_mm512_castps_si512(y)),
                                   zero_index, rank);
    }
    if constexpr (kZeroAndOne) {
      code = _mm512_mask_mov_epi32(code, _mm512_cmp_ps_mask(a, zero_threshold16, _CMP_LE_OQ),
                                   _mm512_set1_epi32(kZeroIndex));
      code = _mm512_mask_mov_epi32(code, _mm512_cmp_ps_mask(y, one_threshold16, _CMP_GT_OQ),
                                   _mm512_set1_epi32(kSize - 1));
    }
    return code;
  }
  __m512i encode_bounded(__m512 y) const { return encode(y); }

  __m512 decode(__m512i code) const {
    if constexpr (kSize == 16) return _mm512_permutexvar_ps(code, values16);
    __m512i rank = code;
    __mmask16 negative = 0;
    if constexpr (kSigned) {
      const __m512i d = _mm512_sub_epi32(code, _mm512_set1_epi32(kZeroIndex));
      negative = _mm512_movepi32_mask(d);
      rank = _mm512_abs_epi32(d);
    }
    const __m512i m = _mm512_add_epi32(rank, _mm512_set1_epi32((1 << kPMin) - (kZeroAndOne ? 1 : 0)));
    const __m512i p = _mm512_sub_epi32(_mm512_srli_epi32(_mm512_castps_si512(_mm512_cvtepi32_ps(m)), 23),
                                       _mm512_set1_epi32(127));
    const __m512i j = _mm512_sub_epi32(m, _mm512_sllv_epi32(_mm512_set1_epi32(1), p));
    const __m512 lo_p = _mm512_permutexvar_ps(p, lo16);
    const __m512 width_p = _mm512_permutexvar_ps(p, width16);
    __m512 value = _mm512_add_ps(lo_p, _mm512_mul_ps(width_p, _mm512_add_ps(_mm512_cvtepi32_ps(j), _mm512_set1_ps(0.5f))));
    if constexpr (kZeroAndOne) {
      value = _mm512_mask_mov_ps(value, _mm512_cmpeq_epi32_mask(rank, _mm512_setzero_si512()), _mm512_setzero_ps());
      value = _mm512_mask_mov_ps(value, _mm512_cmpeq_epi32_mask(code, _mm512_set1_epi32(kSize - 1)), _mm512_set1_ps(1.0f));
    }
    return _mm512_mask_xor_ps(value, negative, value, _mm512_set1_ps(-0.0f));
  }
#endif
};

// The fp8 maps (minifloats): math::minifloat_encode with the same integer and float operations,
// eight lanes at a time; decode by bit operations too (a code's exponent and mantissa moved into
// a float's, subnormal codes converted as integers times their step), equal to the value table.
template <math::CodebookId kId>
struct SimdMinifloat {
  static constexpr bool kMinifloat = true;
  static constexpr bool kSigned = kId == math::CodebookId::kFp8Signed;

  // The format's constants (math::minifloat_magnitude's), taken from the Codebook.
  __m256i rebias, min_normal, max_magnitude, round_rebias;
  __m256 magic, subnormal_step;
  float smallest_normal;  // 2^(1 - bias): magnitudes of y from here up code by the normal formula

  explicit SimdMinifloat(const math::Codebook& cb)
      : rebias(_mm256_set1_epi32((127 - cb.exponent_bias) << 3)),
        min_normal(_mm256_set1_epi32((128 - cb.exponent_bias) << 23)),
        max_magnitude(_mm256_set1_epi32(static_cast<int>(cb.max_magnitude))),
        magic(_mm256_castsi256_ps(_mm256_set1_epi32((148 - cb.exponent_bias) << 23))),
        subnormal_step(_mm256_castsi256_ps(_mm256_set1_epi32((125 - cb.exponent_bias) << 23))),
        smallest_normal(math::bits_float(static_cast<std::uint32_t>(128 - cb.exponent_bias) << 23)) {
    round_rebias = _mm256_set1_epi32(static_cast<int>(0x7ffffu - (static_cast<std::uint32_t>(127 - cb.exponent_bias) << 23)));
#if defined(NIBBLE_CODEC_AVX512)
    round_rebias16 = _mm512_broadcast_i32x8(round_rebias);
    min_normal16 = _mm512_broadcast_i32x8(min_normal);
    magic16 = _mm512_castsi512_ps(_mm512_broadcast_i32x8(_mm256_castps_si256(magic)));
#endif
  }

  // Codes of y that is finite with |y| at most 1 plus rounding (y = x / absmax of x's block, absmax
  // finite and positive): the same codes as encode() without its NaN and saturation lanes, which
  // such y never reach. The re-bias is folded into the rounding constant (exact for the normal
  // range; the other lanes are replaced by the blend), and the sign goes in by a blend on y's.
  __m256i encode_bounded(__m256 y) const {
    const __m256i u = _mm256_castps_si256(y);
    const __m256i a = kSigned ? _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)) : u;
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(a, 20), _mm256_set1_epi32(1));
    __m256i m = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(a, round_rebias), odd), 20);
    const __m256i subnormal = _mm256_sub_epi32(_mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(a), magic)),
                                               _mm256_castps_si256(magic));
    m = _mm256_blendv_epi8(m, subnormal, _mm256_cmpgt_epi32(min_normal, a));
    if constexpr (kSigned)
      return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(m),
                                                  _mm256_castsi256_ps(_mm256_or_si256(m, _mm256_set1_epi32(0x80))), y));
    return _mm256_andnot_si256(_mm256_srai_epi32(u, 31), m);  // negatives and -0: 0
  }

  // NOTE: codes of bounded y whose magnitudes are all at least smallest_normal, in two steps: a
  // word per value, then normal_halves packs two vectors of words into 16-bit codes. The normal
  // formula alone is encode_bounded's without its subnormal lanes, and the sign is left to the
  // packing: for such y the rounding add on y's own bits, sign included, carries nothing into bit
  // 31 (a normal magnitude is above the re-bias, and the sum stays below 2^31). Signed maps: the
  // shift leaves sign << 11 | code, and normal_halves' multiply-add of each 16-bit word's two bytes
  // by 1 and 16 moves the sign to bit 7. Unsigned maps: an arithmetic shift leaves a negative y's
  // word negative, and the saturating packs take it to 0. 5 operations per 8 values and a quarter
  // of one in the packing, against 8 (unsigned) and 9 (signed) with the sign lanes and the
  // subnormal lanes dropped: AdamW fp8 in cache, one thread, 1.03-1.05 -> 0.975-0.982 ms per 1M.
  __m256i encode_normal_word(__m256 y) const {
    const __m256i u = _mm256_castps_si256(y);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 20), _mm256_set1_epi32(1));
    const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(u, round_rebias), odd);
    return kSigned ? _mm256_srli_epi32(sum, 20) : _mm256_srai_epi32(sum, 20);
  }
  // Two vectors of encode_normal_word's words as sixteen 16-bit codes, in the order of
  // _mm256_packus_epi32 (within 128-bit lanes).
  __m256i normal_halves(__m256i w0, __m256i w1) const {
    if constexpr (kSigned) return _mm256_maddubs_epi16(_mm256_packus_epi32(w0, w1), _mm256_set1_epi16(0x1001));
    return _mm256_packs_epi32(w0, w1);
  }
  // Eight words as eight 16-bit codes, in element order.
  __m128i normal_halves(__m256i w) const {
    const __m128i lo = _mm256_castsi256_si128(w), hi = _mm256_extracti128_si256(w, 1);
    if constexpr (kSigned) return _mm_maddubs_epi16(_mm_packus_epi32(lo, hi), _mm_set1_epi16(0x1001));
    return _mm_packs_epi32(lo, hi);
  }

#if defined(NIBBLE_CODEC_AVX512)
  // Sixteen lanes (AVX-512): encode_normal_word, normal_halves and encode_bounded with the same
  // operations, so the same codes.
  __m512i round_rebias16, min_normal16;
  __m512 magic16;
  __m512i encode_normal_word(__m512 y) const {
    const __m512i u = _mm512_castps_si512(y);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 20), _mm512_set1_epi32(1));
    const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(u, round_rebias16), odd);
    return kSigned ? _mm512_srli_epi32(sum, 20) : _mm512_srai_epi32(sum, 20);
  }
  __m512i normal_halves(__m512i w0, __m512i w1) const {
    if constexpr (kSigned) return _mm512_maddubs_epi16(_mm512_packus_epi32(w0, w1), _mm512_set1_epi16(0x1001));
    return _mm512_packs_epi32(w0, w1);
  }
  // Codes in 32-bit lanes, for the packs that follow: the sign goes in by one three-input logic
  // operation (code | (u >> 24) & 0x80). The unsigned map needs no mask for negative y (and -0):
  // such y (a negative as int32) take the subnormal lane, where magic - |y| is below magic, so its
  // bits minus magic's are negative (or 0 for -0 and |y| below half magic's ulp; never below
  // -2^31 for |y| <= 1 plus rounding), and the unsigned saturating pack makes them 0.
  __m512i encode_bounded(__m512 y) const {
    const __m512i u = _mm512_castps_si512(y);
    const __m512i a = kSigned ? _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)) : u;
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(a, 20), _mm512_set1_epi32(1));
    __m512i m = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(a, round_rebias16), odd), 20);
    const __m512i subnormal = _mm512_sub_epi32(_mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(a), magic16)),
                                               _mm512_castps_si512(magic16));
    m = _mm512_mask_blend_epi32(_mm512_cmpgt_epi32_mask(min_normal16, a), m, subnormal);
    if constexpr (kSigned) return _mm512_ternarylogic_epi32(m, _mm512_srli_epi32(u, 24), _mm512_set1_epi32(0x80), 0xf8);
    return m;
  }
#endif

  __m256i encode(__m256 y) const {
    const __m256i u = _mm256_castps_si256(y);
    const __m256i a = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(a, 20), _mm256_set1_epi32(1));
    const __m256i normal = _mm256_sub_epi32(
        _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(a, _mm256_set1_epi32(0x7ffff)), odd), 20),
        rebias);
    const __m256i subnormal = _mm256_sub_epi32(_mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(a), magic)),
                                               _mm256_castps_si256(magic));
    const __m256i is_subnormal = _mm256_cmpgt_epi32(min_normal, a);  // a is non-negative as int32
    __m256i m = _mm256_blendv_epi8(normal, subnormal, is_subnormal);
    m = _mm256_min_epu32(m, max_magnitude);
    const __m256i nan = _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x7f800000));
    if constexpr (kSigned) {
      const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(u, 24), _mm256_set1_epi32(0x80));
      return _mm256_andnot_si256(nan, _mm256_or_si256(m, sign));  // NaN: +0
    }
    return _mm256_andnot_si256(_mm256_or_si256(nan, _mm256_srai_epi32(u, 31)), m);  // NaN, negatives, -0: 0
  }

  __m256 decode(__m256i code) const {
    const __m256i mag = kSigned ? _mm256_and_si256(code, _mm256_set1_epi32(0x7f)) : code;
    // Normal codes: exponent and mantissa shifted into a float's, re-biased; subnormal codes:
    // m * 2^(-2 - bias) (= m/8 * 2^(1 - bias)), an exact product.
    const __m256 normal = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(mag, 20), _mm256_slli_epi32(rebias, 20)));
    const __m256 subnormal = _mm256_mul_ps(_mm256_cvtepi32_ps(mag), subnormal_step);
    __m256 value = _mm256_blendv_ps(subnormal, normal, _mm256_castsi256_ps(_mm256_cmpgt_epi32(mag, _mm256_set1_epi32(7))));
    if constexpr (kSigned) {
      value = _mm256_or_ps(value, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(code, _mm256_set1_epi32(0x80)), 24)));
      value = _mm256_blendv_ps(value, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)),  // 0x7f, 0xff: NaN
                               _mm256_castsi256_ps(_mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7f))));
    }
    return value;
  }
};

template <class Fn>
void with_simd_codebook(const math::Codebook& cb, Fn&& fn) {
  switch (cb.id) {
    case math::CodebookId::kDynamicSigned8: return fn(SimdCodebook<math::CodebookId::kDynamicSigned8>(cb));
    case math::CodebookId::kDynamicUnsigned8: return fn(SimdCodebook<math::CodebookId::kDynamicUnsigned8>(cb));
    case math::CodebookId::kDynamicSigned4: return fn(SimdCodebook<math::CodebookId::kDynamicSigned4>(cb));
    case math::CodebookId::kLinearUnsigned4: return fn(SimdCodebook<math::CodebookId::kLinearUnsigned4>(cb));
    case math::CodebookId::kFp8Signed: return fn(SimdMinifloat<math::CodebookId::kFp8Signed>(cb));
    case math::CodebookId::kFp8Unsigned: return fn(SimdMinifloat<math::CodebookId::kFp8Unsigned>(cb));
  }
}

// What the caller of encode8_vector knows of y = x * inv. kBounded: every y is finite with
// magnitude at most 1 plus rounding (inv is 1 / the block's absmax, finite and positive), so the
// encoder may skip the lanes for NaN and saturation. kNormal: bounded, and every |y| is at least
// the map's smallest normal (fp8), so it may skip the subnormal lanes too. The codes are the same
// whatever the caller says.
enum class Lanes { kAny, kBounded, kNormal };

// The vector part of one block's encode: codes of x[0, i) for the largest multiple of 8, i
// returned. Always inlined, so that a span's blocks run in one function with the map's constants
// set up once.
template <Lanes kLanes, class Simd>
[[gnu::always_inline]] inline std::int64_t encode8_vector(const Simd& simd, const float* __restrict in, float inv,
                                                          std::uint8_t* __restrict out, std::int64_t count) {
  const __m256 vinv = _mm256_set1_ps(inv);
  std::int64_t i = 0;
  // 32 codes per store: two 32 -> 16 and one 16 -> 8 bit saturating packs work within 128-bit
  // lanes, so one cross-lane permute puts the 32 bytes back in element order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
#if defined(NIBBLE_CODEC_AVX512)
  // 64 codes per store with AVX-512 (the tree maps, and the fp8 maps' bounded and normal-only
  // lanes): the packs work within 128-bit lanes, so lane k holds codes 16j + 4k .. 16j + 4k + 3 of
  // each vector j, and one permute of 32-bit groups puts them back in element order. The AVX2
  // loops below take what is left (fewer than 64).
  if constexpr (!Simd::kMinifloat || kLanes != Lanes::kAny) {
    const __m512 vinv16 = _mm512_set1_ps(inv);
    const __m512i order16 = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const auto y = [&](const float* at) { return _mm512_mul_ps(_mm512_loadu_ps(at), vinv16); };
    for (; i + 64 <= count; i += 64) {
      __m512i h0, h1;
      if constexpr (kLanes == Lanes::kNormal) {
        h0 = simd.normal_halves(simd.encode_normal_word(y(in + i)), simd.encode_normal_word(y(in + i + 16)));
        h1 = simd.normal_halves(simd.encode_normal_word(y(in + i + 32)), simd.encode_normal_word(y(in + i + 48)));
      } else {
        const auto code = [&](const float* at) {
          if constexpr (kLanes == Lanes::kBounded) return simd.encode_bounded(y(at));
          else return simd.encode(y(at));  // the tree maps only
        };
        h0 = _mm512_packus_epi32(code(in + i), code(in + i + 16));
        h1 = _mm512_packus_epi32(code(in + i + 32), code(in + i + 48));
      }
      _mm512_storeu_si512(out + i, _mm512_permutexvar_epi32(order16, _mm512_packus_epi16(h0, h1)));
    }
  }
#endif
  if constexpr (kLanes == Lanes::kNormal) {
    static_assert(Simd::kMinifloat, "only the fp8 maps have a normal-only encode");
    const auto word = [&](const float* at) {
      return simd.encode_normal_word(_mm256_mul_ps(_mm256_loadu_ps(at), vinv));
    };
    for (; i + 32 <= count; i += 32) {
      const __m256i h0 = simd.normal_halves(word(in + i), word(in + i + 8));
      const __m256i h1 = simd.normal_halves(word(in + i + 16), word(in + i + 24));
      const __m256i bytes = _mm256_packus_epi16(h0, h1);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_permutevar8x32_epi32(bytes, order));
    }
    for (; i + 8 <= count; i += 8) {
      const __m128i h = simd.normal_halves(word(in + i));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm_packus_epi16(h, h));
    }
    return i;
  }
  const auto code = [&](const float* at) {
    const __m256 y = _mm256_mul_ps(_mm256_loadu_ps(at), vinv);
    if constexpr (kLanes == Lanes::kBounded) return simd.encode_bounded(y);
    else return simd.encode(y);
  };
  for (; i + 32 <= count; i += 32) {
    const __m256i c0 = code(in + i), c1 = code(in + i + 8), c2 = code(in + i + 16), c3 = code(in + i + 24);
    const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(c0, c1), _mm256_packus_epi32(c2, c3));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_permutevar8x32_epi32(bytes, order));
  }
  for (; i + 8 <= count; i += 8) {
    const __m256i c = code(in + i);
    const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm_packus_epi16(words, words));
  }
  return i;
}

// One block's codes; `bounded` as encode8_vector's kBounded.
template <class Simd>
void encode8_simd(const Simd& simd, const math::Codebook& cb, const float* __restrict x, float inv,
                  std::uint8_t* __restrict codes, std::int64_t n, bool bounded) {
  const std::int64_t i = bounded ? encode8_vector<Lanes::kBounded>(simd, x, inv, codes, n)
                                 : encode8_vector<Lanes::kAny>(simd, x, inv, codes, n);
  math::encode8_run(cb, x, inv, codes, i, n);
}

inline void encode8_block(const math::Codebook& cb, const float* __restrict x, float inv,
                          std::uint8_t* __restrict codes, std::int64_t n, bool bounded = false) {
  with_simd_codebook(cb, [&](const auto& simd) { encode8_simd(simd, cb, x, inv, codes, n, bounded); });
}

// One block's codes given the magnitude range of its values (block_magnitude_range's; the tree
// maps read only the maximum, which is the absmax returned). A positive inverse bounds every
// x * inv by 1 plus rounding (the absmax is then finite and normal); rounding is monotonic, so the
// smallest |x| times inv is the smallest |y|, and when that is normal the fp8 maps skip the
// subnormal lanes.
template <class Simd>
[[gnu::always_inline]] inline float encode8_ranged(const Simd& simd, const math::Codebook& cb,
                                                   const float* __restrict x, MagnitudeRange range,
                                                   std::uint8_t* __restrict codes, std::int64_t n) {
  const float absmax = math::bits_float(range.max);
  const float inv = math::block_inverse(absmax);
  std::int64_t i = -1;
  if constexpr (Simd::kMinifloat) {
    if (inv > 0.0f && math::bits_float(range.min) * inv >= simd.smallest_normal)
      i = encode8_vector<Lanes::kNormal>(simd, x, inv, codes, n);
  }
  if (i < 0)
    i = inv > 0.0f ? encode8_vector<Lanes::kBounded>(simd, x, inv, codes, n)
                   : encode8_vector<Lanes::kAny>(simd, x, inv, codes, n);
  math::encode8_run(cb, x, inv, codes, i, n);
  return absmax;
}

// Consecutive blocks of `block` elements (the last may be shorter), each with its own absmax
// written to absmax[k]: encode8_block's codes, with one codebook dispatch for all of them.
inline void encode8_blocks(const math::Codebook& cb, const float* __restrict x, std::int64_t block,
                           std::uint8_t* __restrict codes, float* __restrict absmax, std::int64_t n) {
  with_simd_codebook(cb, [&](const auto& simd) {
    using Simd = std::decay_t<decltype(simd)>;
    for (std::int64_t o = 0, k = 0; o < n; o += block, ++k) {
      const std::int64_t len = n - o < block ? n - o : block;
      const MagnitudeRange range = Simd::kMinifloat ? block_magnitude_range(x + o, len)
                                                    : MagnitudeRange{0, math::float_bits(block_absmax(x + o, len))};
      absmax[k] = encode8_ranged(simd, cb, x + o, range, codes + o, len);
    }
  });
}

#if defined(NIBBLE_CODEC_VBMI)
// Values of codes[0, i) for the largest multiple of 64 by the byte planes, times scale (one
// rounding, as the scalar decode: the planes give the value table's floats exactly); i returned.
inline std::int64_t decode8_planes(const BytePlanes& planes, const std::uint8_t* __restrict in, float scale,
                                   float* __restrict out, std::int64_t count) {
  // The unpacks work within 128-bit lanes: output vector m, lane k, element r is the code at input
  // byte 16k + 4m + r, so the codes are first permuted to put code 16m + 4k + r there.
  alignas(64) static constexpr std::uint8_t kOrder[64] = {
      0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51, 4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39, 52, 53, 54, 55,
      8, 9, 10, 11, 24, 25, 26, 27, 40, 41, 42, 43, 56, 57, 58, 59, 12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63};
  const __m512i order = _mm512_load_si512(kOrder);
  const __m512 vscale = _mm512_set1_ps(scale);
  const auto table = [&](int k, int quarter) { return _mm512_load_si512(planes.bytes[k] + 64 * quarter); };
  std::int64_t i = 0;
  for (; i + 64 <= count; i += 64) {
    const __m512i c = _mm512_permutexvar_epi8(order, _mm512_loadu_si512(in + i));
    const __mmask64 high = _mm512_movepi8_mask(c);
    __m512i plane[4];
    for (int k = 0; k < 4; ++k)
      plane[k] = _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(table(k, 0), c, table(k, 1)),
                                        _mm512_permutex2var_epi8(table(k, 2), c, table(k, 3)));
    const __m512i lo01 = _mm512_unpacklo_epi8(plane[0], plane[1]), hi01 = _mm512_unpackhi_epi8(plane[0], plane[1]);
    const __m512i lo23 = _mm512_unpacklo_epi8(plane[2], plane[3]), hi23 = _mm512_unpackhi_epi8(plane[2], plane[3]);
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(lo01, lo23)), vscale));
    _mm512_storeu_ps(out + i + 16, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(lo01, lo23)), vscale));
    _mm512_storeu_ps(out + i + 32, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(hi01, hi23)), vscale));
    _mm512_storeu_ps(out + i + 48, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(hi01, hi23)), vscale));
  }
  return i;
}
#endif

template <class Simd>
void decode8_simd(const Simd& simd, const math::Codebook& cb, const std::uint8_t* __restrict codes, float scale,
                  float* __restrict out, std::int64_t n) {
  const std::uint8_t* __restrict in = codes;
  float* __restrict values = out;
  const std::int64_t count = n;
  const __m256 vscale = _mm256_set1_ps(scale);
  std::int64_t i = 0;
#if defined(NIBBLE_CODEC_AVX512)
  if constexpr (!Simd::kMinifloat) {  // the fp8 maps have no 16-lane decode of single codes
#if defined(NIBBLE_CODEC_VBMI)
    if constexpr (Simd::kSize == 256) i = decode8_planes(byte_planes<Simd::kId>(), in, scale, values, count);
#endif
    const __m512 vscale16 = _mm512_set1_ps(scale);
    for (; i + 16 <= count; i += 16) {
      const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i)));
      _mm512_storeu_ps(values + i, _mm512_mul_ps(simd.decode(c), vscale16));
    }
  }
#endif
  for (; i + 8 <= count; i += 8) {
    const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(in + i)));
    _mm256_storeu_ps(values + i, _mm256_mul_ps(simd.decode(c), vscale));
  }
  math::decode8_run(cb, in, scale, values, i, count);
}

// NOTE: an fp8 code's bits moved into a float's (exponent and mantissa shifted by 20, the sign to
// bit 31) make a float equal to the code's value times 2^(bias - 127): the exponent field carries
// over, read with the float's bias 127 instead of the map's, and the map's subnormal codes land on
// the float's subnormals (m/8 * 2^(1 - bias) is m * 2^20 * 2^-149 * 2^(127 - bias)). Times
// scale * 2^(127 - bias), exact while it is finite, that float is the value table's entry times
// scale, rounded once as the scalar decode rounds it: 4 operations per 8 codes instead of 9. A
// scale whose factor overflows (2^16 for e4m3, 2^32 for e5m3) takes decode8_simd. e4m3's codes
// 0x7f and 0xff (NaN; the encoder never writes them) send their 32 codes, and a tail shorter than
// 32 sends its own, through simd.decode.
template <class Simd>
void decode8_shifted(const Simd& simd, const math::Codebook& cb, const std::uint8_t* __restrict in, float scale,
                     float* __restrict out, std::int64_t n) {
  const float factor = scale * math::bits_float(static_cast<std::uint32_t>(254 - cb.exponent_bias) << 23);
  if (factor > std::numeric_limits<float>::max() && scale <= std::numeric_limits<float>::max())
    return decode8_simd(simd, cb, in, scale, out, n);
  const __m256 vfactor = _mm256_set1_ps(factor), vscale = _mm256_set1_ps(scale);
  const __m256i sign_and_magnitude = _mm256_set1_epi32(static_cast<int>(0x87f00000u));
  const auto value = [&](std::int64_t at) {
    const __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(in + at));
    if constexpr (Simd::kSigned) {
      // Sign-extended: bits 27..30 hold copies of the sign after the shift, and are cleared.
      const __m256i bits = _mm256_and_si256(_mm256_slli_epi32(_mm256_cvtepi8_epi32(eight), 20), sign_and_magnitude);
      return _mm256_mul_ps(_mm256_castsi256_ps(bits), vfactor);
    } else {
      return _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu8_epi32(eight), 20)), vfactor);
    }
  };
  std::int64_t i = 0;
#if defined(NIBBLE_CODEC_AVX512)
  // 64 codes per round with AVX-512; a round with a NaN code leaves the rest to the loops below.
  {
    const __m512 vfactor16 = _mm512_set1_ps(factor);
    const __m512i sign_and_magnitude16 = _mm512_set1_epi32(static_cast<int>(0x87f00000u));
    const auto value16 = [&](std::int64_t at) {
      const __m128i sixteen = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + at));
      if constexpr (Simd::kSigned) {
        const __m512i bits = _mm512_and_si512(_mm512_slli_epi32(_mm512_cvtepi8_epi32(sixteen), 20), sign_and_magnitude16);
        return _mm512_mul_ps(_mm512_castsi512_ps(bits), vfactor16);
      } else {
        return _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu8_epi32(sixteen), 20)), vfactor16);
      }
    };
    for (; i + 64 <= n; i += 64) {
      if constexpr (Simd::kSigned) {
        const __m512i magnitudes = _mm512_and_si512(_mm512_loadu_si512(in + i), _mm512_set1_epi8(0x7f));
        if (_mm512_cmpeq_epi8_mask(magnitudes, _mm512_set1_epi8(0x7f)) != 0) break;
      }
      _mm512_storeu_ps(out + i, value16(i));
      _mm512_storeu_ps(out + i + 16, value16(i + 16));
      _mm512_storeu_ps(out + i + 32, value16(i + 32));
      _mm512_storeu_ps(out + i + 48, value16(i + 48));
    }
  }
#endif
  for (; i + 32 <= n; i += 32) {
    if constexpr (Simd::kSigned) {
      const __m256i magnitudes = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i)),
                                                  _mm256_set1_epi8(0x7f));
      if (_mm256_movemask_epi8(_mm256_cmpeq_epi8(magnitudes, _mm256_set1_epi8(0x7f))) != 0) {
        for (std::int64_t k = i; k < i + 32; k += 8) {
          const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(in + k)));
          _mm256_storeu_ps(out + k, _mm256_mul_ps(simd.decode(c), vscale));
        }
        continue;
      }
    }
    _mm256_storeu_ps(out + i, value(i));
    _mm256_storeu_ps(out + i + 8, value(i + 8));
    _mm256_storeu_ps(out + i + 16, value(i + 16));
    _mm256_storeu_ps(out + i + 24, value(i + 24));
  }
  for (; i + 8 <= n; i += 8) {
    const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(in + i)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(simd.decode(c), vscale));
  }
  math::decode8_run(cb, in, scale, out, i, n);
}

// One block's values: the fp8 maps by decode8_shifted, the others by decode8_simd.
template <class Simd>
[[gnu::always_inline]] inline void decode8_any(const Simd& simd, const math::Codebook& cb,
                                               const std::uint8_t* __restrict codes, float scale,
                                               float* __restrict out, std::int64_t n) {
  if constexpr (Simd::kMinifloat) decode8_shifted(simd, cb, codes, scale, out, n);
  else decode8_simd(simd, cb, codes, scale, out, n);
}

inline void decode8_block(const math::Codebook& cb, const std::uint8_t* __restrict codes, float scale,
                          float* __restrict out, std::int64_t n) {
  with_simd_codebook(cb, [&](const auto& simd) { decode8_any(simd, cb, codes, scale, out, n); });
}

// Consecutive blocks of `block` elements (the last may be shorter), block k scaled by scales[k]:
// decode8_block's values, with one codebook dispatch for all of them.
inline void decode8_blocks(const math::Codebook& cb, const std::uint8_t* __restrict codes,
                           const float* __restrict scales, std::int64_t block, float* __restrict out, std::int64_t n) {
  with_simd_codebook(cb, [&](const auto& simd) {
    for (std::int64_t o = 0, k = 0; o < n; o += block, ++k)
      decode8_any(simd, cb, codes + o, scales[k], out + o, n - o < block ? n - o : block);
  });
}

// Two codes per byte, element 2k in the low nibble; codes start at an even element.
template <class Simd>
[[gnu::always_inline]] inline void encode4_simd(const Simd& simd, const math::Codebook& cb, const float* __restrict x,
                                                float inv, std::uint8_t* __restrict codes, std::int64_t n) {
  {
    const __m256 vinv = _mm256_set1_ps(inv);
    const __m256i shifts = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
    std::int64_t i = 0;
#if defined(NIBBLE_CODEC_AVX512)
    if constexpr (!Simd::kMinifloat) {
      // Sixteen codes to eight bytes: each 64-bit group holds codes 2k and 2k + 1 as its two
      // halves; the group or'ed with itself shifted down by 28 has byte 0 = code 2k | code 2k+1 << 4,
      // and a truncating 64 -> 8 bit conversion keeps that byte.
      const __m512 vinv16 = _mm512_set1_ps(inv);
      for (; i + 16 <= n; i += 16) {
        const __m512i c = simd.encode(_mm512_mul_ps(_mm512_loadu_ps(x + i), vinv16));
        const __m128i bytes = _mm512_cvtepi64_epi8(_mm512_or_si512(c, _mm512_srli_epi64(c, 28)));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i / 2), bytes);
      }
    }
#endif
    for (; i + 8 <= n; i += 8) {
      const __m256i c = _mm256_sllv_epi32(simd.encode(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv)), shifts);
      const __m256i pairs = _mm256_hadd_epi32(c, c);  // [0+1, 2+3, ., . | 4+5, 6+7, ., .]
      const __m128i four = _mm_unpacklo_epi64(_mm256_castsi256_si128(pairs), _mm256_extracti128_si256(pairs, 1));
      const __m128i words = _mm_packus_epi32(four, four);
      const int bytes = _mm_cvtsi128_si32(_mm_packus_epi16(words, words));
      std::memcpy(codes + i / 2, &bytes, 4);
    }
    math::encode4_run(cb, x, inv, codes, i, n);
  }
}

inline void encode4_block(const math::Codebook& cb, const float* __restrict x, float inv,
                          std::uint8_t* __restrict codes, std::int64_t n) {
  with_simd_codebook(cb, [&](const auto& simd) { encode4_simd(simd, cb, x, inv, codes, n); });
}

// Consecutive blocks of `block` elements (even; the last may be shorter), each with its own
// absmax written to absmax[k]: encode4_block's codes, with one codebook dispatch for all of them
// (one per block: AdamW 4-bit in cache, one thread, 1.05 against 0.85 ms per million).
inline void encode4_blocks(const math::Codebook& cb, const float* __restrict x, std::int64_t block,
                           std::uint8_t* __restrict codes, float* __restrict absmax, std::int64_t n) {
  with_simd_codebook(cb, [&](const auto& simd) {
    for (std::int64_t o = 0, k = 0; o < n; o += block, ++k) {
      const std::int64_t len = n - o < block ? n - o : block;
      absmax[k] = block_absmax(x + o, len);
      encode4_simd(simd, cb, x + o, math::block_inverse(absmax[k]), codes + o / 2, len);
    }
  });
}

template <class Simd>
[[gnu::always_inline]] inline void decode4_simd(const Simd& simd, const math::Codebook& cb,
                                                const std::uint8_t* __restrict codes, float scale,
                                                float* __restrict out, std::int64_t n) {
  {
    const __m256 vscale = _mm256_set1_ps(scale);
    const __m128i spread = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i shifts = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
    std::int64_t i = 0;
#if defined(NIBBLE_CODEC_AVX512)
    if constexpr (!Simd::kMinifloat) {
      // Eight bytes to sixteen codes: byte k zero-extended to 64 bits, or'ed with itself shifted
      // up by 28, holds code 2k in its low half and code 2k + 1 (byte k >> 4) in its high half.
      const __m512 vscale16 = _mm512_set1_ps(scale);
      for (; i + 16 <= n; i += 16) {
        const __m512i b = _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i / 2)));
        const __m512i c = _mm512_and_si512(_mm512_or_si512(b, _mm512_slli_epi64(b, 28)), _mm512_set1_epi32(0xf));
        _mm512_storeu_ps(out + i, _mm512_mul_ps(simd.decode(c), vscale16));
      }
    }
#endif
    for (; i + 8 <= n; i += 8) {
      int bytes;
      std::memcpy(&bytes, codes + i / 2, 4);
      const __m256i lanes = _mm256_cvtepu8_epi32(_mm_shuffle_epi8(_mm_cvtsi32_si128(bytes), spread));
      const __m256i c = _mm256_and_si256(_mm256_srlv_epi32(lanes, shifts), _mm256_set1_epi32(0xf));
      _mm256_storeu_ps(out + i, _mm256_mul_ps(simd.decode(c), vscale));
    }
    math::decode4_run(cb, codes, scale, out, i, n);
  }
}

inline void decode4_block(const math::Codebook& cb, const std::uint8_t* __restrict codes, float scale,
                          float* __restrict out, std::int64_t n) {
  with_simd_codebook(cb, [&](const auto& simd) { decode4_simd(simd, cb, codes, scale, out, n); });
}

// Consecutive blocks of `block` elements (even; the last may be shorter), block k scaled by
// scales[k]: decode4_block's values, with one codebook dispatch for all of them.
inline void decode4_blocks(const math::Codebook& cb, const std::uint8_t* __restrict codes,
                           const float* __restrict scales, std::int64_t block, float* __restrict out, std::int64_t n) {
  with_simd_codebook(cb, [&](const auto& simd) {
    for (std::int64_t o = 0, k = 0; o < n; o += block, ++k)
      decode4_simd(simd, cb, codes + o / 2, scales[k], out + o, n - o < block ? n - o : block);
  });
}

#else

inline void encode8_block(const math::Codebook& cb, const float* __restrict x, float inv,
                          std::uint8_t* __restrict codes, std::int64_t n, bool = false) {
  math::encode8_run(cb, x, inv, codes, 0, n);
}
inline void decode8_block(const math::Codebook& cb, const std::uint8_t* __restrict codes, float scale,
                          float* __restrict out, std::int64_t n) {
  math::decode8_run(cb, codes, scale, out, 0, n);
}
inline void encode8_blocks(const math::Codebook& cb, const float* __restrict x, std::int64_t block,
                           std::uint8_t* __restrict codes, float* __restrict absmax, std::int64_t n) {
  for (std::int64_t o = 0, k = 0; o < n; o += block, ++k) {
    const std::int64_t len = n - o < block ? n - o : block;
    absmax[k] = block_absmax(x + o, len);
    math::encode8_run(cb, x + o, math::block_inverse(absmax[k]), codes + o, 0, len);
  }
}
inline void decode8_blocks(const math::Codebook& cb, const std::uint8_t* __restrict codes,
                           const float* __restrict scales, std::int64_t block, float* __restrict out, std::int64_t n) {
  for (std::int64_t o = 0, k = 0; o < n; o += block, ++k)
    math::decode8_run(cb, codes + o, scales[k], out + o, 0, n - o < block ? n - o : block);
}

inline void encode4_block(const math::Codebook& cb, const float* __restrict x, float inv,
                          std::uint8_t* __restrict codes, std::int64_t n) {
  math::encode4_run(cb, x, inv, codes, 0, n);
}
inline void decode4_block(const math::Codebook& cb, const std::uint8_t* __restrict codes, float scale,
                          float* __restrict out, std::int64_t n) {
  math::decode4_run(cb, codes, scale, out, 0, n);
}
inline void encode4_blocks(const math::Codebook& cb, const float* __restrict x, std::int64_t block,
                           std::uint8_t* __restrict codes, float* __restrict absmax, std::int64_t n) {
  for (std::int64_t o = 0, k = 0; o < n; o += block, ++k) {
    const std::int64_t len = n - o < block ? n - o : block;
    absmax[k] = block_absmax(x + o, len);
    math::encode4_run(cb, x + o, math::block_inverse(absmax[k]), codes + o / 2, 0, len);
  }
}
inline void decode4_blocks(const math::Codebook& cb, const std::uint8_t* __restrict codes,
                           const float* __restrict scales, std::int64_t block, float* __restrict out, std::int64_t n) {
  for (std::int64_t o = 0, k = 0; o < n; o += block, ++k)
    math::decode4_run(cb, codes + o / 2, scales[k], out + o, 0, n - o < block ? n - o : block);
}

#endif

}  // inline namespace
}  // namespace nibble::cpu
