// The CPU block codecs (AVX2 where the build has it, scalar otherwise) against the scalar
// reference of src/math/codebook.hpp: identical codes and identical decoded values, every block
// length, every codebook, values on and next to every threshold.
#include <gtest/gtest.h>

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

}  // namespace
}  // namespace nibble
