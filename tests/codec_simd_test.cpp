// The CPU block codecs (AVX-512 or AVX2 where the build has them, scalar otherwise) against the scalar
// reference of src/math/codebook.hpp: identical codes and identical decoded values, every block
// length, every codebook, values on and next to every threshold.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "optim/cpu/codec_simd.hpp"
#include "optim/impl.hpp"

namespace nibble {
namespace {

using math::CodebookId;

std::vector<float> probe_values(const math::Codebook& cb, unsigned seed) {
  std::vector<float> x;
  for (int i = 0; i < cb.size; ++i) {
    for (float v : {cb.values[i], cb.thresholds[i]}) {
      if (!std::isfinite(v)) continue;
      for (float w : {v, std::nextafter(v, 2.0f), std::nextafter(v, -2.0f)}) {
        x.push_back(w);
        x.push_back(-w);
      }
    }
  }
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uniform(-1.25f, 1.25f);
  for (int k = 0; k < 300000; ++k) {
    float v = uniform(rng);
    if (k % 3 == 0) v = std::pow(std::fabs(v), 9.0f) * (v < 0 ? -1.0f : 1.0f);
    x.push_back(v);
  }
  // Every magnitude scale evenly: a sweep of bit patterns from 0 to 1.25 (the random values above
  // are mostly large), signs alternating.
  const std::uint32_t top_bits = math::float_bits(1.25f);
  for (std::uint32_t bits = seed; bits < top_bits; bits += 4099) x.push_back(math::bits_float(bits | ((bits & 1u) << 31)));
  for (float v : {0.0f, -0.0f, 1e-40f, -1e-40f, INFINITY, -INFINITY, 1.0f, -1.0f, 3.0f}) x.push_back(v);
  if (!cb.is_signed)
    for (float& v : x) v = std::fabs(v);
  return x;
}

int code_at(const std::vector<std::uint8_t>& codes, bool four_bit, std::size_t i) {
  return four_bit ? (codes[i >> 1] >> ((i & 1) * 4)) & 0xf : codes[i];
}

class CodecSimd : public ::testing::TestWithParam<CodebookId> {};

TEST_P(CodecSimd, EncodeEqualsScalarAndBruteForce) {
  const math::Codebook& cb = codebook(GetParam());
  const bool four_bit = cb.size == 16;
  const std::vector<float> x = probe_values(cb, 7);
  for (std::int64_t n : {std::int64_t{1}, std::int64_t{7}, std::int64_t{8}, std::int64_t{9}, std::int64_t{255},
                         static_cast<std::int64_t>(x.size())}) {
    std::vector<std::uint8_t> codes(static_cast<std::size_t>(n), 0);
    if (four_bit) cpu::encode4_block(cb, x.data(), 1.0f, codes.data(), n);
    else cpu::encode8_block(cb, x.data(), 1.0f, codes.data(), n);
    std::int64_t mismatches = 0;
    for (std::int64_t i = 0; i < n; ++i) {
      const int want = math::codebook_encode(cb, x[i]);
      ASSERT_EQ(want, math::codebook_encode_brute_force(cb, x[i])) << "y = " << x[i];
      mismatches += code_at(codes, four_bit, static_cast<std::size_t>(i)) != want;
    }
    EXPECT_EQ(mismatches, 0) << "block length " << n;
  }
}

TEST_P(CodecSimd, NanEncodesAsTheScalarEncoderDoes) {
  // NaN has no nearest code; whatever code the scalar encoder gives it, the SIMD one must too, so
  // a CPU and a GPU run of a diverged model still agree. Nine lanes: one full vector and a tail.
  const math::Codebook& cb = codebook(GetParam());
  const bool four_bit = cb.size == 16;
  for (std::uint32_t bits : {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xffffffffu}) {
    float nan;
    std::memcpy(&nan, &bits, 4);
    const std::vector<float> x(9, nan);
    std::vector<std::uint8_t> codes(9, 0);
    if (four_bit) cpu::encode4_block(cb, x.data(), 1.0f, codes.data(), 9);
    else cpu::encode8_block(cb, x.data(), 1.0f, codes.data(), 9);
    for (std::size_t i = 0; i < 9; ++i)
      EXPECT_EQ(code_at(codes, four_bit, i), math::codebook_encode(cb, nan)) << std::hex << bits << " lane " << i;
  }
}

TEST_P(CodecSimd, EncodeScalesByInverseAbsmax) {
  const math::Codebook& cb = codebook(GetParam());
  const bool four_bit = cb.size == 16;
  std::vector<float> x = probe_values(cb, 11);
  x.resize(4096);
  const float inv = 1.0f / 3.7f;
  std::vector<std::uint8_t> codes(x.size());
  if (four_bit) cpu::encode4_block(cb, x.data(), inv, codes.data(), static_cast<std::int64_t>(x.size()));
  else cpu::encode8_block(cb, x.data(), inv, codes.data(), static_cast<std::int64_t>(x.size()));
  for (std::size_t i = 0; i < x.size(); ++i)
    ASSERT_EQ(code_at(codes, four_bit, i), math::codebook_encode(cb, x[i] * inv)) << "i = " << i;
}

TEST_P(CodecSimd, DecodeEqualsValueTableTimesScale) {
  const math::Codebook& cb = codebook(GetParam());
  const bool four_bit = cb.size == 16;
  std::mt19937 rng(3);
  const std::int64_t n = 1001;  // odd: exercises the scalar tail and a half-used last byte
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(n));
  for (auto& c : codes) c = static_cast<std::uint8_t>(rng());
  for (int c = 0; c < cb.size; ++c) codes[static_cast<std::size_t>(c)] = static_cast<std::uint8_t>(four_bit ? c | (c << 4) : c);
  std::vector<float> out(static_cast<std::size_t>(n));
  const float scale = 0.37f;
  if (four_bit) cpu::decode4_block(cb, codes.data(), scale, out.data(), n);
  else cpu::decode8_block(cb, codes.data(), scale, out.data(), n);
  for (std::int64_t i = 0; i < n; ++i) {
    const float want = cb.values[code_at(codes, four_bit, static_cast<std::size_t>(i))] * scale;
    ASSERT_EQ(out[i], want) << "i = " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(AllCodebooks, CodecSimd,
                         ::testing::Values(CodebookId::kDynamicSigned8, CodebookId::kDynamicUnsigned8,
                                           CodebookId::kDynamicSigned4, CodebookId::kLinearUnsigned4));

// The span codec calls (one codebook dispatch for several blocks) against block-by-block calls:
// the same codes, absmax and values, bit for bit, with a short last block, an all-zero block, a
// block of subnormals (absmax below FLT_MIN: block_inverse 0) and a block holding a NaN.
class Codec8Blocks : public ::testing::TestWithParam<CodebookId> {};

std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

TEST_P(Codec8Blocks, ManyBlocksEqualOneByOne) {
  const math::Codebook& cb = codebook(GetParam());
  constexpr std::int64_t kBlock = 256, kN = 5 * kBlock - 23;
  std::vector<float> x = probe_values(cb, 5);
  x.resize(static_cast<std::size_t>(kN));
  for (std::int64_t i = 0; i < kBlock; ++i) x[static_cast<std::size_t>(kBlock + i)] = 0.0f;
  for (std::int64_t i = 0; i < kBlock; ++i)
    x[static_cast<std::size_t>(2 * kBlock + i)] = (i % 2 ? 1e-39f : 3e-40f) * (cb.is_signed && i % 3 == 0 ? -1.0f : 1.0f);
  x[static_cast<std::size_t>(3 * kBlock + 17)] = NAN;
  const std::int64_t blocks = (kN + kBlock - 1) / kBlock;

  std::vector<std::uint8_t> want_codes(static_cast<std::size_t>(kN)), codes(static_cast<std::size_t>(kN));
  std::vector<float> want_absmax(static_cast<std::size_t>(blocks)), absmax(static_cast<std::size_t>(blocks));
  for (std::int64_t k = 0; k < blocks; ++k) {
    const std::int64_t len = std::min(kBlock, kN - k * kBlock);
    const float a = cpu::block_absmax(x.data() + k * kBlock, len);
    const float inv = math::block_inverse(a);
    want_absmax[static_cast<std::size_t>(k)] = a;
    cpu::encode8_block(cb, x.data() + k * kBlock, inv, want_codes.data() + k * kBlock, len, inv > 0.0f);
  }
  cpu::encode8_blocks(cb, x.data(), kBlock, codes.data(), absmax.data(), kN);
  EXPECT_EQ(codes, want_codes);
  for (std::int64_t k = 0; k < blocks; ++k)
    EXPECT_EQ(bits_of(absmax[static_cast<std::size_t>(k)]), bits_of(want_absmax[static_cast<std::size_t>(k)])) << "block " << k;
  EXPECT_TRUE(std::isnan(absmax[3]));
  EXPECT_EQ(absmax[1], 0.0f);

  std::vector<float> want_values(static_cast<std::size_t>(kN)), values(static_cast<std::size_t>(kN));
  const std::vector<float> scales = {0.37f, 2.5f, 1e-3f, 7.0f, 0.125f};
  for (std::int64_t k = 0; k < blocks; ++k)
    cpu::decode8_block(cb, codes.data() + k * kBlock, scales[static_cast<std::size_t>(k)],
                       want_values.data() + k * kBlock, std::min(kBlock, kN - k * kBlock));
  cpu::decode8_blocks(cb, codes.data(), scales.data(), kBlock, values.data(), kN);
  for (std::int64_t i = 0; i < kN; ++i)
    ASSERT_EQ(bits_of(values[static_cast<std::size_t>(i)]), bits_of(want_values[static_cast<std::size_t>(i)])) << "i = " << i;
}

// The 4-bit span calls against block-by-block calls, as above: blocks of 128 (codes packed two per
// byte, each block starting at an even element), a short odd last block, an all-zero block, a
// block of subnormals and a block holding a NaN.
TEST(Codec4Blocks, ManyBlocksEqualOneByOne) {
  for (CodebookId id : {CodebookId::kDynamicSigned4, CodebookId::kLinearUnsigned4}) {
    const math::Codebook& cb = codebook(id);
    SCOPED_TRACE(static_cast<int>(id));
    constexpr std::int64_t kBlock = 128, kN = 5 * kBlock - 23;
    std::vector<float> x = probe_values(cb, 11);
    x.resize(static_cast<std::size_t>(kN));
    for (std::int64_t i = 0; i < kBlock; ++i) x[static_cast<std::size_t>(kBlock + i)] = 0.0f;
    for (std::int64_t i = 0; i < kBlock; ++i)
      x[static_cast<std::size_t>(2 * kBlock + i)] = (i % 2 ? 1e-39f : 3e-40f) * (cb.is_signed && i % 3 == 0 ? -1.0f : 1.0f);
    x[static_cast<std::size_t>(3 * kBlock + 17)] = NAN;
    const std::int64_t blocks = (kN + kBlock - 1) / kBlock;
    const std::size_t bytes = static_cast<std::size_t>((kN + 1) / 2);

    std::vector<std::uint8_t> want_codes(bytes), codes(bytes);
    std::vector<float> want_absmax(static_cast<std::size_t>(blocks)), absmax(static_cast<std::size_t>(blocks));
    for (std::int64_t k = 0; k < blocks; ++k) {
      const std::int64_t len = std::min(kBlock, kN - k * kBlock);
      const float a = cpu::block_absmax(x.data() + k * kBlock, len);
      want_absmax[static_cast<std::size_t>(k)] = a;
      cpu::encode4_block(cb, x.data() + k * kBlock, math::block_inverse(a), want_codes.data() + k * kBlock / 2, len);
    }
    cpu::encode4_blocks(cb, x.data(), kBlock, codes.data(), absmax.data(), kN);
    EXPECT_EQ(codes, want_codes);
    for (std::int64_t k = 0; k < blocks; ++k)
      EXPECT_EQ(bits_of(absmax[static_cast<std::size_t>(k)]), bits_of(want_absmax[static_cast<std::size_t>(k)])) << "block " << k;
    EXPECT_TRUE(std::isnan(absmax[3]));
    EXPECT_EQ(absmax[1], 0.0f);

    std::vector<float> want_values(static_cast<std::size_t>(kN)), values(static_cast<std::size_t>(kN));
    const std::vector<float> scales = {0.37f, 2.5f, 1e-3f, 7.0f, 0.125f};
    for (std::int64_t k = 0; k < blocks; ++k)
      cpu::decode4_block(cb, codes.data() + k * kBlock / 2, scales[static_cast<std::size_t>(k)],
                         want_values.data() + k * kBlock, std::min(kBlock, kN - k * kBlock));
    cpu::decode4_blocks(cb, codes.data(), scales.data(), kBlock, values.data(), kN);
    for (std::int64_t i = 0; i < kN; ++i)
      ASSERT_EQ(bits_of(values[static_cast<std::size_t>(i)]), bits_of(want_values[static_cast<std::size_t>(i)])) << "i = " << i;
  }
}

// block_absmax against the plain maximum of the magnitudes: every length up to a few vectors past
// a block, the extreme at each position, and NaN (propagated) and inf (the result) anywhere.
TEST(BlockAbsmax, EqualsTheMaximumMagnitudeAtEveryLengthAndPosition) {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(300);
  for (float& v : x) v = normal(rng);
  for (std::int64_t n : {0, 1, 7, 8, 9, 31, 32, 33, 63, 64, 65, 100, 255, 256, 257, 300}) {
    float want = 0.0f;
    for (std::int64_t i = 0; i < n; ++i) want = std::max(want, std::fabs(x[static_cast<std::size_t>(i)]));
    EXPECT_EQ(cpu::block_absmax(x.data(), n), want) << "n = " << n;
    for (std::int64_t at = 0; at < n; at += (n > 40 ? 7 : 1)) {
      std::vector<float> y(x.begin(), x.begin() + n);
      y[static_cast<std::size_t>(at)] = -1e30f;
      EXPECT_EQ(cpu::block_absmax(y.data(), n), 1e30f) << "n = " << n << ", at " << at;
      y[static_cast<std::size_t>(at)] = -INFINITY;
      EXPECT_EQ(cpu::block_absmax(y.data(), n), INFINITY) << "n = " << n << ", at " << at;
      y[static_cast<std::size_t>(at)] = NAN;
      EXPECT_TRUE(std::isnan(cpu::block_absmax(y.data(), n))) << "n = " << n << ", at " << at;
    }
  }
}

// The bf16 codecs against math::bf16_round_nearest and bf16_to_float, bit for bit: every upper
// half of a float (every sign, exponent and kept mantissa) with lower halves at and around the
// rounding tie, so ties to even, carries into the exponent, overflow to inf, subnormals, and NaN
// payloads in the low bits (which the rounding alone would turn into inf).
TEST(Bf16Codec, EqualsTheScalarRoundingAndWidening) {
  std::vector<float> x;
  for (std::uint32_t high = 0; high < 0x10000u; ++high)
    for (std::uint32_t low : {0x0000u, 0x0001u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu}) {
      const std::uint32_t u = high << 16 | low;
      float f;
      std::memcpy(&f, &u, 4);
      x.push_back(f);
    }
  for (std::int64_t n : {static_cast<std::int64_t>(x.size()), std::int64_t{0}, std::int64_t{5}, std::int64_t{16},
                         std::int64_t{29}, std::int64_t{61}}) {
    std::vector<std::uint16_t> codes(static_cast<std::size_t>(n) + 1, 0xabcd);
    cpu::encode_bf16(x.data(), codes.data(), n);
    for (std::int64_t i = 0; i < n; ++i)
      ASSERT_EQ(codes[static_cast<std::size_t>(i)], math::bf16_round_nearest(x[static_cast<std::size_t>(i)]))
          << "bits " << std::hex << bits_of(x[static_cast<std::size_t>(i)]);
    EXPECT_EQ(codes[static_cast<std::size_t>(n)], 0xabcd) << "wrote past n = " << n;
    std::vector<float> back(static_cast<std::size_t>(n) + 1, 42.0f);
    cpu::decode_bf16(codes.data(), back.data(), n);
    for (std::int64_t i = 0; i < n; ++i) {
      const std::uint16_t code = codes[static_cast<std::size_t>(i)];
      ASSERT_EQ(bits_of(back[static_cast<std::size_t>(i)]), bits_of(math::bf16_to_float(code)))
          << "code " << std::hex << code;
    }
    EXPECT_EQ(back[static_cast<std::size_t>(n)], 42.0f) << "wrote past n = " << n;
  }
}

// Blocks whose scaled magnitudes are all normal take the fp8 encoder's normal-only path; the codes
// must be those of the scalar encoder. Block 0: absmax a power of two, every exponent from the
// smallest normal up with every 4-bit mantissa (the odd ones are ties between two codes), the
// smallest normal itself included. Block 1: log-uniform magnitudes, absmax 3.7. Blocks 2 and 3:
// block 0 with one element in the subnormal range or zero, which must leave that path. Block 4:
// block 0's first 45 values, so that the path's 8-value loop and scalar tail run. Every third value
// is negative (unsigned maps: every fifth, which must code as 0 on that path too).
TEST_P(Codec8Blocks, BlocksOfNormalMagnitudesEqualTheScalarEncoder) {
  const math::Codebook& cb = codebook(GetParam());
  constexpr std::int64_t kBlock = 256, kN = 4 * kBlock + 45;
  const int bias = cb.minifloat ? cb.exponent_bias : 15;
  const float smallest_normal = std::ldexp(1.0f, 1 - bias);
  std::vector<float> x(static_cast<std::size_t>(kN));
  std::mt19937 rng(19);
  std::uniform_real_distribution<float> exponent(static_cast<float>(1 - bias), 0.0f);
  for (std::int64_t i = 0; i < kBlock; ++i) {
    const int e = 1 - bias + static_cast<int>(i / 16) % bias;
    const float y = i == 0 ? 1.0f : i == 1 ? smallest_normal : std::ldexp(1.0f + static_cast<float>(i % 16) / 16.0f, e);
    x[static_cast<std::size_t>(i)] = std::min(y, 1.0f) * 4.0f;
    x[static_cast<std::size_t>(kBlock + i)] = (i == 0 ? 1.0f : std::exp2(exponent(rng))) * 3.7f;
  }
  for (std::int64_t i = 0; i < kBlock; ++i) {
    x[static_cast<std::size_t>(2 * kBlock + i)] = x[static_cast<std::size_t>(i)];
    x[static_cast<std::size_t>(3 * kBlock + i)] = x[static_cast<std::size_t>(i)];
  }
  std::copy_n(x.begin(), kN - 4 * kBlock, x.begin() + 4 * kBlock);
  x[static_cast<std::size_t>(2 * kBlock + 77)] = 0.3f * smallest_normal * 4.0f;
  x[static_cast<std::size_t>(3 * kBlock + 77)] = 0.0f;
  for (std::int64_t i = 0; i < kN; i += cb.is_signed ? 3 : 5)
    x[static_cast<std::size_t>(i)] = -x[static_cast<std::size_t>(i)];

  std::vector<std::uint8_t> codes(static_cast<std::size_t>(kN));
  std::vector<float> absmax(5);
  cpu::encode8_blocks(cb, x.data(), kBlock, codes.data(), absmax.data(), kN);
  for (std::int64_t k = 0; k < 5; ++k) {
    EXPECT_EQ(absmax[static_cast<std::size_t>(k)], k == 1 ? 3.7f : 4.0f) << "block " << k;
    const float inv = math::block_inverse(absmax[static_cast<std::size_t>(k)]);
    for (std::int64_t i = k * kBlock; i < std::min(kN, (k + 1) * kBlock); ++i)
      ASSERT_EQ(codes[static_cast<std::size_t>(i)], math::codebook_encode(cb, x[static_cast<std::size_t>(i)] * inv))
          << "block " << k << ", x = " << x[static_cast<std::size_t>(i)];
  }
}

// block_magnitude_range against the plain minimum and maximum of the magnitudes, every length from
// 1 to past a few vectors, the extremes at each position (NaN's magnitude bits are above inf's:
// it is the maximum, never the minimum).
TEST(BlockMagnitudeRange, EqualsTheSmallestAndLargestMagnitudeAtEveryLengthAndPosition) {
  std::mt19937 rng(13);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(300);
  for (float& v : x) v = normal(rng) + 5.0f;
  for (std::int64_t n : {1, 7, 8, 15, 16, 17, 31, 32, 33, 100, 255, 256, 257, 300}) {
    float lo = INFINITY, hi = 0.0f;
    for (std::int64_t i = 0; i < n; ++i) {
      lo = std::min(lo, std::fabs(x[static_cast<std::size_t>(i)]));
      hi = std::max(hi, std::fabs(x[static_cast<std::size_t>(i)]));
    }
    const cpu::MagnitudeRange r = cpu::block_magnitude_range(x.data(), n);
    EXPECT_EQ(r.min, bits_of(lo)) << "n = " << n;
    EXPECT_EQ(r.max, bits_of(hi)) << "n = " << n;
    for (std::int64_t at = 0; at < n; at += (n > 40 ? 7 : 1)) {
      std::vector<float> y(x.begin(), x.begin() + n);
      y[static_cast<std::size_t>(at)] = -1e-30f;
      EXPECT_EQ(cpu::block_magnitude_range(y.data(), n).min, bits_of(1e-30f)) << "n = " << n << ", at " << at;
      y[static_cast<std::size_t>(at)] = -0.0f;
      EXPECT_EQ(cpu::block_magnitude_range(y.data(), n).min, 0u) << "n = " << n << ", at " << at;
      y[static_cast<std::size_t>(at)] = -1e30f;
      EXPECT_EQ(cpu::block_magnitude_range(y.data(), n).max, bits_of(1e30f)) << "n = " << n << ", at " << at;
      y[static_cast<std::size_t>(at)] = NAN;
      const cpu::MagnitudeRange with_nan = cpu::block_magnitude_range(y.data(), n);
      EXPECT_TRUE(std::isnan(math::bits_float(with_nan.max))) << "n = " << n << ", at " << at;
      if (n > 1) {
        EXPECT_FALSE(std::isnan(math::bits_float(with_nan.min))) << "n = " << n << ", at " << at;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(EightBitCodebooks, Codec8Blocks,
                         ::testing::Values(CodebookId::kDynamicSigned8, CodebookId::kDynamicUnsigned8,
                                           CodebookId::kFp8Signed, CodebookId::kFp8Unsigned));

}  // namespace
}  // namespace nibble
