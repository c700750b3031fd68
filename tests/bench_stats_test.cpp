// nibble bench statistics against values computed by hand or with 30-digit arithmetic (mpmath):
// summaries, Student's t quantiles and CDF, relative change, Welch's t-test, and the errors for
// empty, non-finite and degenerate input.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "bench/stats.hpp"
#include "nibble/error.hpp"

#include "test_util.hpp"

namespace nibble::bench {
namespace {
using test::thrown_message;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

TEST(BenchStats, SummaryOfHandComputedSample) {
  const std::vector<double> x = {2, 4, 4, 4, 5, 5, 7, 9};
  const Summary s = summarize(x);
  EXPECT_EQ(s.n, 8u);
  EXPECT_DOUBLE_EQ(s.mean, 5.0);
  // Sum of squared deviations 32, divided by n - 1 = 7.
  EXPECT_NEAR(s.std_dev, std::sqrt(32.0 / 7.0), 1e-14);
  EXPECT_NEAR(s.std_dev, 2.1380899352994, 1e-12);
  EXPECT_NEAR(s.cv_percent, 42.7617987059879, 1e-10);
  EXPECT_DOUBLE_EQ(s.min, 2.0);
  EXPECT_DOUBLE_EQ(s.max, 9.0);
  EXPECT_DOUBLE_EQ(s.median, 4.5);
  // t(0.975, 7) * s / sqrt(8).
  EXPECT_NEAR(s.ci95_half_width, 1.78748791823621, 1e-9);
}

TEST(BenchStats, MedianOfOddCountAndUnsortedInput) {
  const std::vector<double> x = {9, 1, 5, 3, 7};
  const Summary s = summarize(x);
  EXPECT_DOUBLE_EQ(s.median, 5.0);
  EXPECT_DOUBLE_EQ(s.min, 1.0);
  EXPECT_DOUBLE_EQ(s.max, 9.0);
  const std::vector<double> two = {10.0, 3.0};
  EXPECT_DOUBLE_EQ(summarize(two).median, 6.5);
}

TEST(BenchStats, SingleValueHasNoSpread) {
  const std::vector<double> x = {3.5};
  const Summary s = summarize(x);
  EXPECT_EQ(s.n, 1u);
  EXPECT_DOUBLE_EQ(s.mean, 3.5);
  EXPECT_DOUBLE_EQ(s.median, 3.5);
  EXPECT_DOUBLE_EQ(s.min, 3.5);
  EXPECT_DOUBLE_EQ(s.max, 3.5);
  EXPECT_TRUE(std::isnan(s.std_dev));
  EXPECT_TRUE(std::isnan(s.cv_percent));
  EXPECT_TRUE(std::isnan(s.ci95_half_width));
}

TEST(BenchStats, ConstantSampleHasZeroSpread) {
  const std::vector<double> x = {0.1, 0.1, 0.1, 0.1};
  const Summary s = summarize(x);
  EXPECT_EQ(s.std_dev, 0.0);
  EXPECT_EQ(s.cv_percent, 0.0);
  EXPECT_EQ(s.ci95_half_width, 0.0);
}

TEST(BenchStats, CoefficientOfVariationIsNaNForZeroMean) {
  const std::vector<double> x = {-1.0, 1.0, -2.0, 2.0};
  const Summary s = summarize(x);
  EXPECT_EQ(s.mean, 0.0);
  EXPECT_GT(s.std_dev, 0.0);
  EXPECT_TRUE(std::isnan(s.cv_percent));
}

TEST(BenchStats, CoefficientOfVariationUsesMagnitudeOfMean) {
  const std::vector<double> x = {-2, -4, -4, -4, -5, -5, -7, -9};
  EXPECT_NEAR(summarize(x).cv_percent, 42.7617987059879, 1e-10);
}

TEST(BenchStats, VarianceIsAccurateForLargeOffset) {
  // The naive sum-of-squares formula loses every digit here.
  const std::vector<double> x = {1e9 + 4, 1e9 + 7, 1e9 + 13, 1e9 + 16};
  EXPECT_NEAR(summarize(x).std_dev, std::sqrt(90.0 / 3.0), 1e-9);
}

TEST(BenchStats, SummarizeRejectsEmptyAndNonFinite) {
  EXPECT_NE(thrown_message<InvalidArgument>([] { summarize({}); }).find("no values"), std::string::npos);
  const std::vector<double> with_nan = {1.0, 2.0, kNaN};
  const std::string message = thrown_message<InvalidArgument>([&] { summarize(with_nan); });
  EXPECT_NE(message.find("index 2"), std::string::npos) << message;
  EXPECT_NE(message.find("nan"), std::string::npos) << message;
  const std::vector<double> with_inf = {kInf};
  EXPECT_NE(thrown_message<InvalidArgument>([&] { summarize(with_inf); }).find("inf"), std::string::npos);
}

TEST(BenchStats, TQuantileTable) {
  EXPECT_NEAR(t_quantile_975(1), 12.7062, 1e-4);
  EXPECT_NEAR(t_quantile_975(2), 4.3027, 1e-4);
  EXPECT_NEAR(t_quantile_975(5), 2.5706, 1e-4);
  EXPECT_NEAR(t_quantile_975(10), 2.2281, 1e-4);
  EXPECT_NEAR(t_quantile_975(30), 2.0423, 1e-4);
  EXPECT_NEAR(t_quantile_975(120), 1.9799, 1e-4);
  EXPECT_NEAR(t_quantile_975(kInf), 1.95996, 1e-5);
  EXPECT_NEAR(t_quantile_975(kInf), 1.959963984540054, 1e-12);
}

TEST(BenchStats, TQuantileFractionalAndLargeDf) {
  // mpmath references; fractional df arise from Welch-Satterthwaite.
  EXPECT_NEAR(t_quantile_975(0.5), 164.557673480488, 1e-7);
  EXPECT_NEAR(t_quantile_975(1.5), 6.01666310442793, 1e-9);
  EXPECT_NEAR(t_quantile_975(2.5), 3.57465484200368, 1e-9);
  EXPECT_NEAR(t_quantile_975(7.3), 2.3450667365477, 1e-9);
  EXPECT_NEAR(t_quantile_975(31), 2.03951344639641, 1e-9);
  EXPECT_NEAR(t_quantile_975(120), 1.97993040508, 1e-9);
  // Either side of the switch from CDF inversion to the Cornish-Fisher expansion.
  EXPECT_NEAR(t_quantile_975(999), 1.96234146113345, 1e-10);
  EXPECT_NEAR(t_quantile_975(1000), 1.96233908082641, 1e-10);
  EXPECT_NEAR(t_quantile_975(1e5), 1.95998770753, 1e-10);
}

TEST(BenchStats, TQuantileTableAgreesWithCdfInversion) {
  // The table path (whole df) and the numeric path (df nudged off the integer) must agree.
  for (int df = 1; df <= 30; ++df) {
    const double nudged = std::nextafter(static_cast<double>(df), 100.0);
    EXPECT_NEAR(t_quantile_975(df), student_t_quantile(0.975, nudged), 1e-9) << "df " << df;
  }
}

TEST(BenchStats, TQuantileOtherProbabilities) {
  EXPECT_NEAR(student_t_quantile(0.995, 4), 4.60409487134999, 1e-9);
  EXPECT_NEAR(student_t_quantile(0.9, 3), 1.63774435369621, 1e-9);
  EXPECT_NEAR(student_t_quantile(0.6, 10), 0.26018482949208, 1e-10);
  EXPECT_NEAR(student_t_quantile(0.4, 10), -0.26018482949208, 1e-10);
  EXPECT_NEAR(student_t_quantile(0.999, 1), 318.30883898555, 1e-6);
  EXPECT_NEAR(student_t_quantile(0.99, 2000), 2.32821384193977, 1e-10);
  EXPECT_EQ(student_t_quantile(0.5, 3), 0.0);
  // df = 1 is the Cauchy distribution: quantile tan(pi (p - 1/2)).
  EXPECT_NEAR(student_t_quantile(0.8, 1), std::tan(M_PI * 0.3), 1e-10);
}

TEST(BenchStats, TCdf) {
  EXPECT_NEAR(student_t_cdf(1.0, 1), 0.75, 1e-13);
  EXPECT_NEAR(student_t_cdf(2.0, 5), 0.949030260585071, 1e-12);
  EXPECT_NEAR(student_t_cdf(-1.5, 3.5), 0.108909093507673, 1e-12);
  EXPECT_NEAR(student_t_cdf(0.3, 20), 0.61636349837812, 1e-12);
  EXPECT_NEAR(student_t_cdf(4.0, 2), 0.971404520791032, 1e-12);
  EXPECT_EQ(student_t_cdf(0.0, 7), 0.5);
  EXPECT_NEAR(student_t_cdf(1.959963984540054, kInf), 0.975, 1e-14);
  EXPECT_NEAR(student_t_cdf(1.96, 1e8), student_t_cdf(1.96, kInf), 1e-8);
  for (double df : {1.0, 2.5, 9.0, 500.0}) {
    for (double p : {0.01, 0.3, 0.975}) {
      EXPECT_NEAR(student_t_cdf(student_t_quantile(p, df), df), p, 1e-12) << df << " " << p;
    }
  }
}

TEST(BenchStats, TQuantileRejectsBadArguments) {
  EXPECT_THROW(student_t_quantile(0.0, 3), InvalidArgument);
  EXPECT_THROW(student_t_quantile(1.0, 3), InvalidArgument);
  EXPECT_THROW(student_t_quantile(kNaN, 3), InvalidArgument);
  EXPECT_THROW(student_t_quantile(0.9, 0.0), InvalidArgument);
  EXPECT_THROW(student_t_quantile(0.9, -1.0), InvalidArgument);
  EXPECT_THROW(student_t_quantile(0.9, kNaN), InvalidArgument);
  EXPECT_THROW(t_quantile_975(0.0), InvalidArgument);
  EXPECT_THROW(student_t_cdf(1.0, 0.0), InvalidArgument);
}

TEST(BenchStats, DeltaPercent) {
  EXPECT_DOUBLE_EQ(delta_percent(110.0, 100.0), 10.0);
  EXPECT_DOUBLE_EQ(delta_percent(75.0, 100.0), -25.0);
  EXPECT_DOUBLE_EQ(delta_percent(5.0, 5.0), 0.0);
  // A negative baseline keeps the sign of value - baseline relative to it.
  EXPECT_DOUBLE_EQ(delta_percent(-3.0, -2.0), 50.0);
  EXPECT_NE(thrown_message<InvalidArgument>([] { delta_percent(1.0, 0.0); }).find("baseline is 0"),
            std::string::npos);
  EXPECT_NE(thrown_message<InvalidArgument>([] { delta_percent(1.0, kNaN); }).find("baseline nan"),
            std::string::npos);
  EXPECT_THROW(delta_percent(1.0, kInf), InvalidArgument);
  EXPECT_THROW(delta_percent(kNaN, 1.0), InvalidArgument);
}

TEST(BenchStats, WelchDetectsClearDifference) {
  const std::vector<double> a = {10.1, 10.3, 9.9, 10.2, 10.0};
  const std::vector<double> b = {11.0, 11.4, 10.9, 11.1, 11.3, 11.2};
  const Comparison c = compare(a, b);
  EXPECT_EQ(c.n_a, 5u);
  EXPECT_EQ(c.n_b, 6u);
  EXPECT_NEAR(c.difference, -1.05, 1e-12);
  EXPECT_NEAR(c.std_error, 0.104083299973307, 1e-12);
  EXPECT_NEAR(c.df, 8.98936170212766, 1e-10);
  EXPECT_NEAR(c.ci95_low, -1.28549526439644, 1e-9);
  EXPECT_NEAR(c.ci95_high, -0.814504735603558, 1e-9);
  EXPECT_NEAR(c.relative_percent, -1.05 / 11.15 * 100.0, 1e-10);
  EXPECT_TRUE(c.exceeds_noise);
  EXPECT_TRUE(c.reason.empty()) << c.reason;
  // Swapping the samples negates the difference and its interval.
  const Comparison swapped = compare(b, a);
  EXPECT_NEAR(swapped.ci95_low, 0.814504735603558, 1e-9);
  EXPECT_TRUE(swapped.exceeds_noise);
}

TEST(BenchStats, WelchOverlappingSamplesAreNoise) {
  const std::vector<double> a = {10, 11, 12, 13, 14};
  const std::vector<double> b = {10.5, 11.5, 12.5, 13.5, 14.5, 9};
  const Comparison c = compare(a, b);
  EXPECT_NEAR(c.difference, 0.0833333333333333, 1e-12);
  EXPECT_NEAR(c.df, 8.98766442192712, 1e-10);
  EXPECT_NEAR(c.ci95_low, -2.36784974625531, 1e-9);
  EXPECT_NEAR(c.ci95_high, 2.53451641292198, 1e-9);
  EXPECT_FALSE(c.exceeds_noise);
  EXPECT_TRUE(c.reason.empty()) << c.reason;
}

TEST(BenchStats, WelchWithSingleValueReportsReason) {
  const std::vector<double> one = {5.0};
  const std::vector<double> many = {1.0, 1.1, 0.9};
  for (const Comparison& c : {compare(one, many), compare(many, one)}) {
    EXPECT_FALSE(c.exceeds_noise);
    EXPECT_NE(c.reason.find("at least 2"), std::string::npos) << c.reason;
    EXPECT_TRUE(std::isnan(c.ci95_low));
    EXPECT_TRUE(std::isnan(c.ci95_high));
  }
  const Comparison c = compare(one, many);
  EXPECT_NE(c.reason.find("sample a"), std::string::npos) << c.reason;
  EXPECT_DOUBLE_EQ(c.difference, 4.0);
  EXPECT_NE(compare(many, one).reason.find("sample b"), std::string::npos);
}

TEST(BenchStats, WelchWithoutSpreadIsExact) {
  const std::vector<double> a = {4096, 4096, 4096};
  const std::vector<double> b = {2048, 2048};
  const Comparison c = compare(a, b);
  EXPECT_DOUBLE_EQ(c.difference, 2048.0);
  EXPECT_DOUBLE_EQ(c.ci95_low, 2048.0);
  EXPECT_DOUBLE_EQ(c.ci95_high, 2048.0);
  EXPECT_TRUE(c.exceeds_noise);
  EXPECT_FALSE(c.reason.empty());
  const Comparison same = compare(a, a);
  EXPECT_FALSE(same.exceeds_noise);
  EXPECT_DOUBLE_EQ(same.difference, 0.0);
}

TEST(BenchStats, WelchWithOneConstantSide) {
  // Only b varies: df = n_b - 1 exactly and the interval is t(0.975, 3) * se.
  const std::vector<double> a = {1.0, 1.0, 1.0};
  const std::vector<double> b = {2.0, 3.0, 4.0, 5.0};
  const Comparison c = compare(a, b);
  EXPECT_NEAR(c.df, 3.0, 1e-12);
  const double se = std::sqrt((5.0 / 3.0) / 4.0);
  EXPECT_NEAR(c.ci95_high - c.difference, t_quantile_975(3) * se, 1e-9);
  EXPECT_TRUE(c.exceeds_noise);
}

TEST(BenchStats, CompareRejectsEmptyAndNonFinite) {
  const std::vector<double> good = {1.0, 2.0};
  const std::vector<double> bad = {1.0, kInf};
  EXPECT_NE(thrown_message<InvalidArgument>([&] { compare({}, good); }).find("sample a"),
            std::string::npos);
  EXPECT_NE(thrown_message<InvalidArgument>([&] { compare(good, {}); }).find("sample b"),
            std::string::npos);
  const std::string message = thrown_message<InvalidArgument>([&] { compare(good, bad); });
  EXPECT_NE(message.find("sample b"), std::string::npos) << message;
  EXPECT_NE(message.find("index 1"), std::string::npos) << message;
}

}  // namespace
}  // namespace nibble::bench
