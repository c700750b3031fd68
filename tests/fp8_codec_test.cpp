// Tests of the fp8 state codecs (src/math/codebook.hpp, minifloat_encode): the value tables against
// the formats written out from their definitions (OCP e4m3fn; unsigned e5m3), the bit-operation
// encoder against a brute-force nearest-value search with ties to even, every code's round trip,
// NaN and infinity, the relative error the formats promise, the AVX2/AVX-512 block codecs against the
// scalar ones, and the measurement that chose unsigned e5m3 over e4m3 for second moments.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "math/codebook.hpp"
#include "nibble/optim.hpp"
#include "nibble/rng.hpp"
#include "optim/cpu/codec_simd.hpp"
#include "optim/impl.hpp"

namespace nibble {
namespace {

using math::CodebookId;

constexpr CodebookId kFp8Books[] = {CodebookId::kFp8Signed, CodebookId::kFp8Unsigned};

float from_bits(std::uint32_t u) { return std::bit_cast<float>(u); }
std::uint32_t to_bits(float f) { return std::bit_cast<std::uint32_t>(f); }
std::string book_name(CodebookId id) { return id == CodebookId::kFp8Signed ? "fp8 e4m3" : "fp8 unsigned e5m3"; }

// The formats from their definitions, in double. OCP 8-bit floating point (e4m3fn): sign, 4
// exponent bits with bias 7, 3 mantissa bits, subnormals at exponent 0, no infinities, S.1111.111
// NaN; the state's signed codes are those of y * 2^8. The unsigned e5m3: 5 exponent bits with bias
// 31 of y itself, 3 mantissa bits, subnormals, every code finite.
double e4m3fn_value(int code) {
  const int e = (code >> 3) & 0xf, m = code & 7;
  if (e == 15 && m == 7) return std::numeric_limits<double>::quiet_NaN();
  const double magnitude = e == 0 ? std::ldexp(m, -9) : std::ldexp(8 + m, e - 10);
  return (code & 0x80) ? -magnitude : magnitude;
}
double reference_value(CodebookId id, int code) {
  if (id == CodebookId::kFp8Signed) return e4m3fn_value(code) / 256.0;
  const int e = code >> 3, m = code & 7;
  return e == 0 ? std::ldexp(m, -33) : std::ldexp(8 + m, e - 34);
}

// Nearest value by a scan of every finite code, ties to the even code (the mantissa's last bit);
// the sign of y is kept (signed) or negatives give 0 (unsigned). Finite y only.
int brute_force_encode(CodebookId id, float y) {
  const bool is_signed = id == CodebookId::kFp8Signed;
  if (!is_signed && std::signbit(y)) return 0;
  const double a = std::fabs(static_cast<double>(y));
  const int largest = is_signed ? 0x7e : 0xff;  // beyond it, it is the nearest (saturation)
  if (a >= reference_value(id, largest)) return largest | (is_signed && std::signbit(y) ? 0x80 : 0);
  int best = 0;
  double best_d = INFINITY;
  for (int c = 0; c < (is_signed ? 0x7f : 0x100); ++c) {
    const double d = std::fabs(a - reference_value(id, c));
    if (d < best_d || (d == best_d && (c & 1) == 0)) {
      best = c;
      best_d = d;
    }
  }
  return best | (is_signed && std::signbit(y) ? 0x80 : 0);
}

// Every code's value, the midpoints between neighbouring magnitudes (exact in float: one more
// mantissa bit), the floats next to each, zeros, float subnormals, the largest code and beyond, and
// a sweep of every float exponent with its top mantissa bits.
std::vector<float> edge_inputs(const math::Codebook& cb) {
  std::vector<float> v;
  auto around = [&](float x) {
    for (float s : {1.0f, -1.0f}) {
      const float w = s * x;
      v.push_back(w);
      v.push_back(std::nextafter(w, INFINITY));
      v.push_back(std::nextafter(w, -INFINITY));
    }
  };
  const int magnitudes = cb.is_signed ? 0x7f : 0x100;
  for (int c = 0; c < magnitudes; ++c) {
    around(cb.values[c]);
    if (c + 1 < magnitudes) around(0.5f * (cb.values[c] + cb.values[c + 1]));
  }
  around(2.0f * cb.values[magnitudes - 1]);
  for (float x : {0.0f, 1.0f, 1.5f, 2.0f, 1e10f, std::numeric_limits<float>::max()}) around(x);
  for (std::uint32_t u : {0x00000001u, 0x00400000u, 0x007fffffu, 0x00800000u, 0x00800001u}) around(from_bits(u));
  for (std::uint32_t e = 0; e < 255; ++e)
    for (std::uint32_t k = 0; k < 16; ++k) {
      around(from_bits((e << 23) | (k << 19)));
      around(from_bits((e << 23) | (k << 19) | 0x7ffffu));
    }
  return v;
}

// Half uniform in [-1.25, 1.25], half sign * u^12 (down through the subnormal codes).
std::vector<float> random_inputs(std::uint64_t seed, int count) {
  Rng rng(seed);
  std::vector<float> v;
  v.reserve(static_cast<std::size_t>(count));
  for (int i = 0; i < count / 2; ++i) v.push_back(2.5f * rng.uniform() - 1.25f);
  for (int i = 0; i < count / 2; ++i) {
    const float u = rng.uniform();
    const float m = std::pow(u, 12.0f);
    v.push_back(rng.uniform() < 0.5f ? -m : m);
  }
  return v;
}

TEST(Fp8Codebook, ValuesAreTheFormatsDefinitions) {
  for (CodebookId id : kFp8Books) {
    SCOPED_TRACE(book_name(id));
    const math::Codebook& cb = codebook(id);
    EXPECT_EQ(cb.size, 256);
    EXPECT_TRUE(cb.minifloat);
    for (int c = 0; c < 256; ++c) {
      const double want = reference_value(id, c);
      if (std::isnan(want)) {
        EXPECT_TRUE(std::isnan(cb.values[c])) << "code " << c;
        continue;
      }
      EXPECT_EQ(static_cast<double>(cb.values[c]), want) << "code " << c;
      EXPECT_EQ(std::signbit(cb.values[c]), std::signbit(want)) << "code " << c;
    }
    // The block's absmax (y = 1) has an exact code: the largest element decodes to itself.
    EXPECT_EQ(cb.values[cb.is_signed ? 0x78 : 0xf8], 1.0f);
    if (cb.is_signed) {
      EXPECT_EQ(cb.values[0xf8], -1.0f);
    }
    // The table handed out by the optimizer is the one a fresh build produces.
    math::Codebook fresh;
    ASSERT_TRUE(math::build_codebook(fresh, id));
    EXPECT_EQ(std::memcmp(fresh.values, cb.values, sizeof cb.values), 0);
  }
  // e4m3fn's largest finite value is 448; the unsigned map reaches 2^-33 below 1.
  EXPECT_EQ(codebook(CodebookId::kFp8Signed).values[0x7e] * 256.0f, 448.0f);
  EXPECT_EQ(codebook(CodebookId::kFp8Unsigned).values[1], std::ldexp(1.0f, -33));
}

TEST(Fp8Encode, EqualsBruteForceNearestWithTiesToEven) {
  for (CodebookId id : kFp8Books) {
    SCOPED_TRACE(book_name(id));
    const math::Codebook& cb = codebook(id);
    std::vector<float> inputs = edge_inputs(cb);
    const std::vector<float> random = random_inputs(5 + static_cast<int>(id), 400'000);
    inputs.insert(inputs.end(), random.begin(), random.end());
    std::int64_t mismatches = 0, ties = 0;
    for (float y : inputs) {
      if (!std::isfinite(y)) continue;
      const int fast = math::codebook_encode(cb, y);
      const int brute = brute_force_encode(id, y);
      if (fast != brute && ++mismatches <= 10)
        ADD_FAILURE() << "y = " << y << " (bits 0x" << std::hex << to_bits(y) << std::dec << "): encode " << fast
                      << ", brute force " << brute;
      // Count the exact midpoints, so that a change of the inputs cannot drop the tie cases.
      const int lower = fast & (cb.is_signed ? 0x7f : 0xff);
      if (lower > 0 && std::fabs(static_cast<double>(y)) != reference_value(id, lower) &&
          (std::fabs(static_cast<double>(y)) - reference_value(id, lower - 1)) ==
              (reference_value(id, lower) - std::fabs(static_cast<double>(y))))
        ++ties;
    }
    EXPECT_EQ(mismatches, 0) << "of " << inputs.size() << " inputs";
    EXPECT_GT(ties, 100) << "the edge inputs must hold exactly halfway values";
  }
}

TEST(Fp8Encode, EveryCodeRoundTrips) {
  for (CodebookId id : kFp8Books) {
    SCOPED_TRACE(book_name(id));
    const math::Codebook& cb = codebook(id);
    int checked = 0;
    for (int c = 0; c < 256; ++c) {
      if (std::isnan(cb.values[c])) continue;
      EXPECT_EQ(math::codebook_encode(cb, cb.values[c]), c) << "code " << c << " value " << cb.values[c];
      ++checked;
    }
    EXPECT_EQ(checked, cb.is_signed ? 254 : 256);  // e4m3fn's two NaN codes are the only ones left out
  }
}

TEST(Fp8Encode, SpecialValues) {
  const math::Codebook& s = codebook(CodebookId::kFp8Signed);
  const math::Codebook& u = codebook(CodebookId::kFp8Unsigned);
  const float inf = std::numeric_limits<float>::infinity();
  // NaN, whatever its sign and payload, encodes as +0: never one of e4m3fn's NaN codes.
  for (std::uint32_t bits : {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xffffffffu, 0x7fffffffu}) {
    EXPECT_EQ(math::codebook_encode(s, from_bits(bits)), 0) << std::hex << bits;
    EXPECT_EQ(math::codebook_encode(u, from_bits(bits)), 0) << std::hex << bits;
  }
  // Infinities and values beyond the largest code saturate to it (448 / 256; 1.875).
  EXPECT_EQ(math::codebook_encode(s, inf), 0x7e);
  EXPECT_EQ(math::codebook_encode(s, -inf), 0xfe);
  EXPECT_EQ(math::codebook_encode(s, 1e30f), 0x7e);
  EXPECT_EQ(math::codebook_encode(s, -3.0f), 0xfe);
  EXPECT_EQ(math::codebook_encode(u, inf), 0xff);
  EXPECT_EQ(math::codebook_encode(u, 5.0f), 0xff);
  // Zeros keep their sign in the signed map; the unsigned map gives 0 for anything not positive.
  EXPECT_EQ(math::codebook_encode(s, 0.0f), 0x00);
  EXPECT_EQ(math::codebook_encode(s, -0.0f), 0x80);
  EXPECT_EQ(math::codebook_encode(u, -0.0f), 0x00);
  EXPECT_EQ(math::codebook_encode(u, -inf), 0x00);
  EXPECT_EQ(math::codebook_encode(u, -1.0f), 0x00);
  // Half the smallest subnormal is a tie with zero (even); anything above it rounds up.
  EXPECT_EQ(math::codebook_encode(s, std::ldexp(1.0f, -18)), 0x00);
  EXPECT_EQ(math::codebook_encode(s, std::nextafter(std::ldexp(1.0f, -18), 1.0f)), 0x01);
  EXPECT_EQ(math::codebook_encode(u, std::ldexp(1.0f, -34)), 0x00);
  EXPECT_EQ(math::codebook_encode(u, std::nextafter(std::ldexp(1.0f, -34), 1.0f)), 0x01);
}

// Round to nearest in a format with 3 mantissa bits moves a normal value by at most half an ulp:
// |q - y| <= 2^-4 * 2^e <= 2^-4 * |y| for y in [2^e, 2^(e+1)); below the smallest normal the
// error is at most half the subnormal step, 2^(-3 - bias) (absolute).
TEST(Fp8Encode, RoundTripErrorWithinHalfAnUlp) {
  for (CodebookId id : kFp8Books) {
    SCOPED_TRACE(book_name(id));
    const math::Codebook& cb = codebook(id);
    const double min_normal = std::ldexp(1.0, 1 - cb.exponent_bias);
    const double half_step = std::ldexp(1.0, -3 - cb.exponent_bias);
    std::vector<float> inputs = random_inputs(77 + static_cast<int>(id), 400'000);
    double worst_relative = 0.0;
    for (float y : inputs) {
      if (!cb.is_signed) y = std::fabs(y);
      if (std::fabs(y) > 1.0f) continue;
      const double q = cb.values[math::codebook_encode(cb, y)];
      const double err = std::fabs(q - y);
      if (std::fabs(y) >= min_normal) {
        ASSERT_LE(err, std::ldexp(std::fabs(static_cast<double>(y)), -4)) << "y = " << y;
        worst_relative = std::max(worst_relative, err / std::fabs(static_cast<double>(y)));
      } else {
        ASSERT_LE(err, half_step) << "y = " << y;
      }
    }
    // The bound is reached (a rounding that never moves half an ulp would be suspicious too).
    EXPECT_GT(worst_relative, 0.055);
  }
}

// ---------------------------------------------------------------------------------------------
// The CPU block codecs (AVX-512 or AVX2 where the build has them) against the scalar encoder and the table.

TEST(Fp8CodecSimd, EncodeEqualsScalarAtEveryLength) {
  for (CodebookId id : kFp8Books) {
    SCOPED_TRACE(book_name(id));
    const math::Codebook& cb = codebook(id);
    std::vector<float> x = edge_inputs(cb);
    for (float v : {INFINITY, -INFINITY, from_bits(0x7fc00000u), from_bits(0xffc00000u), from_bits(0x7f800001u)})
      x.push_back(v);
    const std::vector<float> random = random_inputs(31, 200'000);
    x.insert(x.end(), random.begin(), random.end());
    for (float inv : {1.0f, 1.0f / 3.7f}) {
      for (std::int64_t n : {std::int64_t{1}, std::int64_t{7}, std::int64_t{8}, std::int64_t{9}, std::int64_t{255},
                             static_cast<std::int64_t>(x.size())}) {
        std::vector<std::uint8_t> codes(static_cast<std::size_t>(n), 0xaa);
        cpu::encode8_block(cb, x.data(), inv, codes.data(), n);
        std::int64_t mismatches = 0;
        for (std::int64_t i = 0; i < n; ++i) {
          const int want = math::codebook_encode(cb, x[i] * inv);
          if (codes[i] != want && ++mismatches <= 5)
            ADD_FAILURE() << "y = " << x[i] * inv << ": block " << int{codes[i]} << ", scalar " << want;
        }
        EXPECT_EQ(mismatches, 0) << "block length " << n << " inv " << inv;
      }
    }
  }
}

// The step's encode: x / absmax of x's block, every value finite, so the encoder may drop its NaN
// and saturation lanes (encode8_block's `bounded`). Blocks of the edge and random inputs within
// [-1, 1], scaled by factors whose reciprocals round (so x * inv can exceed 1 by an ulp), at block
// lengths with and without scalar tails: the codes equal the scalar encoder's.
TEST(Fp8CodecSimd, BoundedEncodeOfABlockEqualsScalar) {
  for (CodebookId id : kFp8Books) {
    SCOPED_TRACE(book_name(id));
    const math::Codebook& cb = codebook(id);
    std::vector<float> x;
    for (float v : edge_inputs(cb))
      if (std::fabs(v) <= 1.0f) x.push_back(v);
    for (float v : random_inputs(41, 100'000))
      if (std::fabs(v) <= 1.0f) x.push_back(v);
    std::mt19937 rng(7);
    std::shuffle(x.begin(), x.end(), rng);
    std::int64_t mismatches = 0, blocks = 0;
    for (std::int64_t n : {std::int64_t{1}, std::int64_t{9}, std::int64_t{33}, std::int64_t{256}, std::int64_t{4096}}) {
      for (float factor : {1.0f, 3.7f, 1e-20f, 7e20f, -0.3f}) {
        for (std::size_t begin = 0; begin + static_cast<std::size_t>(n) <= x.size(); begin += 5 * static_cast<std::size_t>(n)) {
          std::vector<float> block(x.begin() + static_cast<std::ptrdiff_t>(begin),
                                   x.begin() + static_cast<std::ptrdiff_t>(begin) + n);
          float absmax = 0.0f;
          for (float& v : block) {
            v *= factor;
            absmax = std::max(absmax, std::fabs(v));
          }
          if (!(absmax > 0.0f)) continue;
          const float inv = 1.0f / absmax;
          std::vector<std::uint8_t> codes(static_cast<std::size_t>(n), 0xaa);
          cpu::encode8_block(cb, block.data(), inv, codes.data(), n, /*bounded=*/true);
          ++blocks;
          for (std::int64_t i = 0; i < n; ++i) {
            const int want = math::codebook_encode(cb, block[i] * inv);
            if (codes[i] != want && ++mismatches <= 5)
              ADD_FAILURE() << "x = " << block[i] << " absmax " << absmax << ": block " << int{codes[i]}
                            << ", scalar " << want;
          }
        }
      }
    }
    EXPECT_EQ(mismatches, 0);
    EXPECT_GT(blocks, 1000);
  }
}

// A block whose absmax is subnormal (first moments that decayed for many steps without a
// gradient; below 2^-128, 1 / absmax overflows): block_inverse gives 0, every code is that of 0,
// for the tree map and fp8 alike, through the optimizer's own store (set_state_values); a block
// just above 2^-126 still keeps its values.
TEST(Fp8CodecSimd, ABlockOfSubnormalsStoresZeros) {
  std::vector<float> data(256, 0.1f), grad(256, 0.0f), m(256);
  for (std::size_t i = 0; i < m.size(); ++i) m[i] = static_cast<float>(static_cast<int>(i % 7) - 3) * 1e-40f;
  EXPECT_EQ(math::block_inverse(1e-40f), 0.0f);
  EXPECT_EQ(math::block_inverse(2.0f), 0.5f);
  for (Precision precision : {Precision::kFp8, Precision::kInt8, Precision::kInt4}) {
    SCOPED_TRACE(std::string(precision_name(precision)));
    ParamGroup group;
    group.params.push_back({"w", {256}, data.data(), grad.data()});
    OptimizerOptions o;
    o.algorithm = Algorithm::kAdamW;
    o.precision = precision;
    o.min_quant_size = 0;
    Optimizer opt({group}, o);
    opt.set_state_values(0, "exp_avg", m);
    for (float v : opt.state_values(0, "exp_avg")) ASSERT_EQ(v, 0.0f);
    // Just above the smallest normal: values keep their sign and size (within the codec's error).
    std::vector<float> normal(m.size());
    for (std::size_t i = 0; i < m.size(); ++i) normal[i] = m[i] * 1e5f;
    opt.set_state_values(0, "exp_avg", normal);
    const std::vector<float> back = opt.state_values(0, "exp_avg");
    const float largest = *std::max_element(normal.begin(), normal.end());
    for (std::size_t i = 0; i < m.size(); ++i)
      ASSERT_NEAR(back[i], normal[i], 0.2f * largest) << "element " << i;
  }
}

TEST(Fp8CodecSimd, DecodeEqualsValueTableTimesScale) {
  for (CodebookId id : kFp8Books) {
    SCOPED_TRACE(book_name(id));
    const math::Codebook& cb = codebook(id);
    std::mt19937 rng(3);
    const std::int64_t n = 1001;  // odd: a scalar tail
    std::vector<std::uint8_t> codes(static_cast<std::size_t>(n));
    for (auto& c : codes) c = static_cast<std::uint8_t>(rng());
    for (int c = 0; c < 256; ++c) codes[static_cast<std::size_t>(c) + 3] = static_cast<std::uint8_t>(c);
    // Scales whose products are subnormal, huge, zero, inf and NaN as well.
    for (float scale : {0.37f, 1.0f, 3e-30f, 0x1p-110f, 0x1.8p-111f, 0x1.234p-120f, 0x1.fffffep15f, 0x1p16f,
                        0x1.fffffep31f, 0x1p32f, 3e38f, 0.0f, INFINITY, NAN}) {
      std::vector<float> out(static_cast<std::size_t>(n));
      cpu::decode8_block(cb, codes.data(), scale, out.data(), n);
      for (std::int64_t i = 0; i < n; ++i) {
        const float want = cb.values[codes[i]] * scale;
        ASSERT_EQ(to_bits(out[i]), to_bits(want)) << "code " << int{codes[i]} << " scale " << scale;  // NaN too
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Why unsigned e5m3 for second moments: Adam's v is an EMA of g^2, so it spans twice the decades
// of the gradients, and a block mixes elements whose gradient scales differ. Plain e4m3 (the signed
// map's codes, used on v >= 0) reaches only 2^-17 below the block's absmax; e5m3 reaches 2^-33 at
// the same 3-bit precision. Data: g = s * t3 (Student t, 3 degrees of freedom: a heavy tail) with
// a per-element scale s = 10^(0.5 N(0, 1)), v = the EMA (beta2 0.999) of 50 steps of g^2.
// Measured (block 256), zero fraction / mean relative error of v / of sqrt(v) + 1e-8:
//   e5m3 0 / 0.022 / 0.011,  e4m3 0.015 / 0.048 / 0.031,  8bit (tree) 0.0004 / 0.043 / 0.022.
// With scales 10^N(0, 1) the gap widens: e5m3 0.022 / 0.049 / 0.035, e4m3 0.56 / 0.60 / 0.58.
// e5m3's error is the half-ulp rounding alone (mean ~2^-4 / 3 for uniform mantissas); e4m3 adds
// the elements it flushes to 0, whose Adam update m / (sqrt(v) + eps) then explodes.
struct SecondMomentError {
  double zero_fraction = 0;     // v > 0 that decode to 0
  double mean_rel = 0;          // mean |q - v| / v
  double mean_rel_denom = 0;    // mean relative error of sqrt(v) + eps
};

SecondMomentError second_moment_error(const std::vector<float>& v, const math::Codebook& cb, int block) {
  SecondMomentError e;
  for (std::size_t b = 0; b < v.size(); b += block) {
    const std::size_t n = std::min<std::size_t>(block, v.size() - b);
    float absmax = 0.0f;
    for (std::size_t i = 0; i < n; ++i) absmax = std::max(absmax, v[b + i]);
    const float inv = 1.0f / absmax;
    for (std::size_t i = 0; i < n; ++i) {
      const double x = v[b + i];
      const double q = static_cast<double>(cb.values[math::codebook_encode(cb, v[b + i] * inv)]) * absmax;
      e.zero_fraction += q == 0.0;
      e.mean_rel += std::fabs(q - x) / x;
      const double d = std::sqrt(x) + 1e-8, dq = std::sqrt(q) + 1e-8;
      e.mean_rel_denom += std::fabs(dq - d) / d;
    }
  }
  const double n = static_cast<double>(v.size());
  return {e.zero_fraction / n, e.mean_rel / n, e.mean_rel_denom / n};
}

TEST(Fp8SecondMoments, UnsignedE5m3KeepsSmallSquaresThatE4m3Loses) {
  Rng rng(2024);
  const int count = 1 << 18;
  std::vector<float> scale(count), v(count, 0.0f);
  for (float& s : scale) s = std::pow(10.0f, 0.5f * rng.normal());
  const float beta2 = 0.999f;
  for (int step = 0; step < 50; ++step)
    for (int i = 0; i < count; ++i) {
      const float z = rng.normal();
      float chi2 = 0.0f;
      for (int k = 0; k < 3; ++k) {
        const float n = rng.normal();
        chi2 += n * n;
      }
      const float g = scale[i] * z / std::sqrt(chi2 / 3.0f);
      v[i] = beta2 * v[i] + (1.0f - beta2) * g * g;
    }
  std::erase_if(v, [](float x) { return !(x > 0.0f) || !std::isfinite(x); });
  const int block = 256;
  const SecondMomentError e5m3 = second_moment_error(v, codebook(CodebookId::kFp8Unsigned), block);
  const SecondMomentError e4m3 = second_moment_error(v, codebook(CodebookId::kFp8Signed), block);
  const SecondMomentError tree = second_moment_error(v, codebook(CodebookId::kDynamicUnsigned8), block);
  std::printf("second moments, block %d: zero fraction / mean relative error of v / of sqrt(v) + eps\n", block);
  std::printf("  e5m3 %.3g / %.4f / %.4f\n", e5m3.zero_fraction, e5m3.mean_rel, e5m3.mean_rel_denom);
  std::printf("  e4m3 %.3g / %.4f / %.4f\n", e4m3.zero_fraction, e4m3.mean_rel, e4m3.mean_rel_denom);
  std::printf("  8bit %.3g / %.4f / %.4f\n", tree.zero_fraction, tree.mean_rel, tree.mean_rel_denom);
  // e5m3 is bounded by its half ulp (2^-4 relative) except elements below 2^-30 of their block's
  // absmax (none here); e4m3 must lose clearly more -- measured 2.1x and 2.8x the relative errors,
  // asserted 1.5x so that another seed passes -- or the choice has no reason.
  EXPECT_LT(e5m3.mean_rel, 0.0625);
  EXPECT_LT(e5m3.zero_fraction, 1e-4);
  EXPECT_GT(e4m3.zero_fraction, 1e-3);
  EXPECT_GT(e4m3.mean_rel, 1.5 * e5m3.mean_rel);
  EXPECT_GT(e4m3.mean_rel_denom, 1.5 * e5m3.mean_rel_denom);
}

}  // namespace
}  // namespace nibble
