// Tests of the seeded generator: reproducibility, state save/restore and rough distributions.
// Statistical bounds are many standard errors wide, so a correct generator never fails them.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <set>
#include <vector>

#include "nibble/error.hpp"
#include "nibble/rng.hpp"

namespace nibble {
namespace {

std::vector<std::uint64_t> draw(Rng& rng, int count) {
  std::vector<std::uint64_t> values;
  for (int i = 0; i < count; ++i) values.push_back(rng.next_u64());
  return values;
}

TEST(Rng, SameSeedSameSequence) {
  Rng a(1234);
  Rng b(1234);
  EXPECT_EQ(draw(a, 1000), draw(b, 1000));
}

TEST(Rng, DifferentSeedsDiffer) {
  std::set<std::uint64_t> first_values;
  for (std::uint64_t seed = 0; seed < 100; ++seed) {
    Rng rng(seed);
    first_values.insert(rng.next_u64());
  }
  EXPECT_EQ(first_values.size(), 100u);

  Rng a(1);
  Rng b(2);
  const std::vector<std::uint64_t> from_a = draw(a, 100);
  const std::vector<std::uint64_t> from_b = draw(b, 100);
  int equal = 0;
  for (int i = 0; i < 100; ++i) equal += from_a[i] == from_b[i];
  EXPECT_EQ(equal, 0);
}

TEST(Rng, SeedZeroIsUsable) {
  Rng rng(0);
  const std::vector<std::uint64_t> values = draw(rng, 64);
  EXPECT_EQ(std::set<std::uint64_t>(values.begin(), values.end()).size(), values.size());
}

TEST(Rng, RestoredStateContinuesIdentically) {
  Rng original(99);
  draw(original, 37);
  original.normal();
  const std::array<std::uint64_t, 4> saved = original.state();

  Rng resumed(7);
  resumed.set_state(saved);
  for (int i = 0; i < 500; ++i) {
    ASSERT_EQ(original.next_u64(), resumed.next_u64());
    ASSERT_EQ(original.uniform(), resumed.uniform());
    ASSERT_EQ(original.normal(), resumed.normal());
    ASSERT_EQ(original.below(1000), resumed.below(1000));
  }
}

TEST(Rng, UniformInUnitIntervalWithMeanHalf) {
  Rng rng(42);
  constexpr int kDraws = 100000;
  double sum = 0;
  float smallest = 1;
  float largest = 0;
  for (int i = 0; i < kDraws; ++i) {
    const float u = rng.uniform();
    ASSERT_GE(u, 0.0f);
    ASSERT_LT(u, 1.0f);
    sum += u;
    smallest = std::min(smallest, u);
    largest = std::max(largest, u);
  }
  // Standard error of the mean is sqrt(1/12 / 1e5) ~ 0.0009.
  EXPECT_NEAR(sum / kDraws, 0.5, 0.005);
  EXPECT_LT(smallest, 0.001f);
  EXPECT_GT(largest, 0.999f);
}

TEST(Rng, UniformUsesTwentyFourBits) {
  Rng rng(5);
  for (int i = 0; i < 10000; ++i) {
    const float scaled = rng.uniform() * 16777216.0f;
    ASSERT_EQ(scaled, std::floor(scaled));
  }
}

TEST(Rng, BelowStaysInRangeAndIsRoughlyUniform) {
  Rng rng(3);
  constexpr std::uint64_t kBuckets = 10;
  constexpr int kDraws = 100000;
  std::vector<int> counts(kBuckets, 0);
  for (int i = 0; i < kDraws; ++i) {
    const std::uint64_t value = rng.below(kBuckets);
    ASSERT_LT(value, kBuckets);
    ++counts[value];
  }
  // Each count is ~10000 with a standard deviation of ~95.
  for (std::uint64_t b = 0; b < kBuckets; ++b) EXPECT_NEAR(counts[b], 10000, 600) << "bucket " << b;
}

TEST(Rng, BelowEdgeCases) {
  Rng rng(8);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(rng.below(1), 0u);
  // A bound just above 2^63 rejects almost half of all raw values; results must still be in range.
  const std::uint64_t bound = (std::uint64_t{1} << 63) + 12345;
  for (int i = 0; i < 1000; ++i) EXPECT_LT(rng.below(bound), bound);
  EXPECT_THROW(rng.below(0), InvalidArgument);
}

TEST(Rng, NormalHasMeanZeroAndUnitSpread) {
  Rng rng(2024);
  constexpr int kDraws = 100000;
  double sum = 0;
  double sum_squares = 0;
  int beyond_three_sigma = 0;
  for (int i = 0; i < kDraws; ++i) {
    const double z = rng.normal();
    ASSERT_TRUE(std::isfinite(z));
    sum += z;
    sum_squares += z * z;
    beyond_three_sigma += std::abs(z) > 3.0;
  }
  const double mean = sum / kDraws;
  const double stddev = std::sqrt(sum_squares / kDraws - mean * mean);
  EXPECT_NEAR(mean, 0.0, 0.02);
  EXPECT_NEAR(stddev, 1.0, 0.02);
  // P(|z| > 3) = 0.0027, so ~270 of 1e5.
  EXPECT_GT(beyond_three_sigma, 150);
  EXPECT_LT(beyond_three_sigma, 400);
}

}  // namespace
}  // namespace nibble
