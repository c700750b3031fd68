// Summary statistics for repeated measurements: mean, spread, median and the 95% confidence
// interval of the mean (Student's t), relative change against a baseline, and Welch's t-test to
// tell a real difference between two sets of runs from noise.
#pragma once

#include <cstddef>
#include <span>
#include <string>

namespace nibble::bench {

struct Summary {
  std::size_t n = 0;
  double mean = 0.0;
  // Sample standard deviation (divisor n - 1). NaN when n == 1: one run says nothing of spread.
  double std_dev = 0.0;
  // Coefficient of variation, std_dev / |mean| * 100. NaN when mean == 0 or n == 1.
  double cv_percent = 0.0;
  double min = 0.0;
  double max = 0.0;
  double median = 0.0;
  // Half-width of the 95% confidence interval of the mean: t(0.975, n-1) * std_dev / sqrt(n).
  // NaN when n == 1.
  double ci95_half_width = 0.0;
};

// Throws InvalidArgument for an empty sample or a non-finite value (naming its index).
Summary summarize(std::span<const double> values);

// (value - baseline) / baseline * 100. Throws InvalidArgument when baseline is 0 or either
// argument is not finite.
double delta_percent(double value, double baseline);

// Welch's unequal-variance t-test of mean(a) - mean(b) at 95% confidence.
struct Comparison {
  std::size_t n_a = 0;
  std::size_t n_b = 0;
  double mean_a = 0.0;
  double mean_b = 0.0;
  double difference = 0.0;        // mean_a - mean_b
  double relative_percent = 0.0;  // difference / mean_b * 100; NaN when mean_b == 0
  double std_error = 0.0;         // sqrt(var_a / n_a + var_b / n_b); NaN when a side has n < 2
  double df = 0.0;                // Welch-Satterthwaite degrees of freedom; may be fractional
  double ci95_low = 0.0;          // 95% interval of the difference; NaN when a side has n < 2
  double ci95_high = 0.0;
  // True when the interval excludes 0. Never true when a side has fewer than two values.
  bool exceeds_noise = false;
  // Empty for an ordinary test; otherwise says why the result is degenerate (too few values,
  // or no spread on either side so the difference is exact).
  std::string reason;
};

// Throws InvalidArgument for an empty sample or a non-finite value (naming the sample and index).
Comparison compare(std::span<const double> a, std::span<const double> b);

// P(T <= t) for Student's t with df > 0 degrees of freedom (df may be +infinity: the normal).
double student_t_cdf(double t, double df);

// The p-quantile of Student's t, p in (0, 1), df > 0 or +infinity; accurate to about 1e-10.
// Throws InvalidArgument outside that domain.
double student_t_quantile(double p, double df);

// student_t_quantile(0.975, df), the two-sided 95% critical value, from a table for whole df up
// to 30.
double t_quantile_975(double df);

}  // namespace nibble::bench
