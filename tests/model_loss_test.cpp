// The step loss has one definition for every engine and path (model/loss.hpp): the CUDA graph
// step, which sees all per-token losses at once, must report what the eager path reports from its
// micro-batch means.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "model/loss.hpp"
#include "nibble/rng.hpp"

namespace nibble::model {
namespace {

// Per-token cross-entropy values of the size and spread a real step has.
std::vector<float> token_losses(std::uint64_t seed, std::size_t n) {
  Rng rng(seed);
  std::vector<float> v(n);
  for (float& x : v) x = 4.0f + 1.5f * rng.normal();
  return v;
}

float one_sum_over_all_tokens(const std::vector<float>& v) {
  double sum = 0.0;
  for (float x : v) sum += x;
  return static_cast<float>(sum / static_cast<double>(v.size()));
}

TEST(StepLoss, AllTokensAtOnceEqualsTheMeanOfMicroBatchMeans) {
  constexpr std::int64_t kTokens = 12 * 64, kAccum = 2;
  int differ_from_one_sum = 0;
  for (std::uint64_t seed = 1; seed <= 64; ++seed) {
    const std::vector<float> all = token_losses(seed, kTokens * kAccum);
    const std::span<const float> view(all);
    std::vector<float> micro;
    for (std::int64_t m = 0; m < kAccum; ++m) micro.push_back(mean_token_loss(view.subspan(m * kTokens, kTokens)));
    const float eager = step_loss(micro);
    EXPECT_EQ(step_loss(view, kTokens), eager) << "seed " << seed;
    if (one_sum_over_all_tokens(all) != eager) ++differ_from_one_sum;
  }
  // The values are ones where the single sum the graph path used before rounds differently:
  // without one definition, equality above would fail on these.
  EXPECT_GT(differ_from_one_sum, 0);
}

TEST(StepLoss, OneMicroBatchIsItsMean) {
  const std::vector<float> v = token_losses(7, 1000);
  EXPECT_EQ(step_loss(std::span<const float>(v), 1000), mean_token_loss(v));
  EXPECT_EQ(step_loss(std::span<const float>(v), 1000), one_sum_over_all_tokens(v));
}

TEST(StepLoss, EmptyIsZero) {
  EXPECT_EQ(mean_token_loss({}), 0.0f);
  EXPECT_EQ(step_loss(std::span<const float>{}), 0.0f);
}

}  // namespace
}  // namespace nibble::model
