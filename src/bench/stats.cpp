// Summary statistics, relative change and Welch's t-test for benchmark repetitions. Student's t
// comes from the regularized incomplete beta function (continued fraction, modified Lentz),
// inverted by safeguarded Newton; above 1000 degrees of freedom the Cornish-Fisher expansion
// around the normal quantile takes over.
#include "bench/stats.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <numbers>
#include <vector>

#include "nibble/error.hpp"

namespace nibble::bench {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// t(0.975, df) for df = 1..30, computed with 30-digit arithmetic (mpmath), 12 significant digits.
constexpr std::array<double, 30> kT975 = {
    12.7062047362, 4.30265272975, 3.18244630528, 2.7764451052,  2.57058183564, 2.44691185114,
    2.36462425159, 2.3060041352,  2.2621571628,  2.22813885199, 2.20098516009, 2.17881282967,
    2.16036865646, 2.14478668792, 2.13144954556, 2.11990529922, 2.10981557783, 2.10092204024,
    2.09302405441, 2.08596344727, 2.07961384473, 2.0738730679,  2.06865761042, 2.06389856163,
    2.05953855275, 2.05552943864, 2.05183051648, 2.0484071418,  2.04522964213, 2.0422724563,
};

// Beyond these the expansions below are accurate to better than 1e-12 and the continued fraction,
// whose length grows like sqrt(df), would only cost time.
constexpr double kCornishFisherMinDf = 1000.0;
constexpr double kNormalCdfMinDf = 1e7;

double normal_cdf(double x) { return 0.5 * std::erfc(-x / std::numbers::sqrt2); }

double normal_pdf(double x) { return std::exp(-0.5 * x * x) / std::sqrt(2.0 * std::numbers::pi); }

// Bisection on the CDF: slow by the standards of a numerics library, but exact to the last bit
// and called a handful of times per report.
double normal_quantile(double p) {
  if (p > 0.5) return -normal_quantile(1.0 - p);
  double lo = -40.0;
  double hi = 0.0;
  for (int i = 0; i < 200; ++i) {
    const double mid = 0.5 * (lo + hi);
    if (mid <= lo || mid >= hi) break;
    (normal_cdf(mid) < p ? lo : hi) = mid;
  }
  return 0.5 * (lo + hi);
}

// log(Gamma(a + 1/2) / Gamma(a)) without the cancellation of two huge lgamma values.
double log_gamma_ratio_half(double a) {
  if (a < 1000.0) return std::lgamma(a + 0.5) - std::lgamma(a);
  return 0.5 * std::log(a) - 1.0 / (8.0 * a) + 1.0 / (192.0 * a * a * a);
}

// Continued fraction of the regularized incomplete beta function; converges fast for
// x < (a + 1) / (a + b + 2).
double beta_continued_fraction(double x, double a, double b) {
  constexpr double kTiny = 1e-300;
  constexpr double kEps = 1e-16;
  const double qab = a + b;
  const double qap = a + 1.0;
  const double qam = a - 1.0;
  double c = 1.0;
  double d = 1.0 - qab * x / qap;
  if (std::fabs(d) < kTiny) d = kTiny;
  d = 1.0 / d;
  double h = d;
  for (int m = 1; m <= 100000; ++m) {
    const double m2 = 2.0 * m;
    double aa = m * (b - m) * x / ((qam + m2) * (a + m2));
    d = 1.0 + aa * d;
    if (std::fabs(d) < kTiny) d = kTiny;
    c = 1.0 + aa / c;
    if (std::fabs(c) < kTiny) c = kTiny;
    d = 1.0 / d;
    h *= d * c;
    aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
    d = 1.0 + aa * d;
    if (std::fabs(d) < kTiny) d = kTiny;
    c = 1.0 + aa / c;
    if (std::fabs(c) < kTiny) c = kTiny;
    d = 1.0 / d;
    const double step = d * c;
    h *= step;
    if (std::fabs(step - 1.0) < kEps) break;
  }
  return h;
}

// I_x(a, b) with y = 1 - x passed separately so that neither loses digits near 0 or 1.
double regularized_beta(double x, double y, double a, double b, double log_beta_ab) {
  if (x <= 0.0) return 0.0;
  if (y <= 0.0) return 1.0;
  const double front = std::exp(a * std::log(x) + b * std::log(y) - log_beta_ab);
  if (x < (a + 1.0) / (a + b + 2.0)) return front * beta_continued_fraction(x, a, b) / a;
  return 1.0 - front * beta_continued_fraction(y, b, a) / b;
}

// P(T > t) for t >= 0 and finite df below kNormalCdfMinDf.
double student_t_upper_tail(double t, double df) {
  if (std::isinf(t)) return 0.0;
  const double a = 0.5 * df;
  const double b = 0.5;
  const double log_beta_ab = 0.5 * std::log(std::numbers::pi) - log_gamma_ratio_half(a);
  const double t2 = t * t;
  const double x = df / (df + t2);
  const double y = t2 / (df + t2);
  return 0.5 * regularized_beta(x, y, a, b, log_beta_ab);
}

double student_t_pdf(double t, double df) {
  const double log_norm = log_gamma_ratio_half(0.5 * df) - 0.5 * std::log(0.5 * df) -
                          0.5 * std::log(2.0 * std::numbers::pi);
  return std::exp(log_norm - 0.5 * (df + 1.0) * std::log1p(t * t / df));
}

// Cornish-Fisher expansion of t(p, df) in powers of 1/df around the normal quantile z.
double cornish_fisher_quantile(double z, double df) {
  const double z2 = z * z;
  const double g1 = (z2 + 1.0) * z / 4.0;
  const double g2 = ((5.0 * z2 + 16.0) * z2 + 3.0) * z / 96.0;
  const double g3 = (((3.0 * z2 + 19.0) * z2 + 17.0) * z2 - 15.0) * z / 384.0;
  const double g4 =
      ((((79.0 * z2 + 776.0) * z2 + 1482.0) * z2 - 1920.0) * z2 - 945.0) * z / 92160.0;
  return z + (g1 + (g2 + (g3 + g4 / df) / df) / df) / df;
}

// The t > 0 with P(T > t) = q, q in (0, 0.5).
double student_t_upper_quantile(double q, double df) {
  double lo = 0.0;
  double hi = 1.0;
  while (student_t_upper_tail(hi, df) > q && std::isfinite(hi)) {
    lo = hi;
    hi *= 2.0;
  }
  if (!std::isfinite(hi)) return hi;
  double t = cornish_fisher_quantile(-normal_quantile(q), df);
  if (!(t > lo && t < hi)) t = 0.5 * (lo + hi);
  for (int i = 0; i < 200; ++i) {
    const double excess = student_t_upper_tail(t, df) - q;
    if (excess == 0.0) return t;
    (excess > 0.0 ? lo : hi) = t;
    double next = t + excess / student_t_pdf(t, df);
    if (!(next > lo && next < hi)) next = 0.5 * (lo + hi);
    if (std::fabs(next - t) <= 1e-15 * t) return next;
    t = next;
  }
  return t;
}

void check_finite(std::span<const double> values, const char* what) {
  if (values.empty()) {
    throw InvalidArgument(fmt::format("{}: no values (statistics need at least one)", what));
  }
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (!std::isfinite(values[i])) {
      throw InvalidArgument(
          fmt::format("{}: value {} at index {} is not finite (statistics need finite values)",
                      what, values[i], i));
    }
  }
}

double mean_of(std::span<const double> values) {
  double sum = 0.0;
  for (double v : values) sum += v;
  return sum / static_cast<double>(values.size());
}

// Two-pass sample variance with the rounding-error correction term; NaN for a single value.
double sample_variance(std::span<const double> values, double mean) {
  const std::size_t n = values.size();
  if (n < 2) return kNaN;
  double sum_sq = 0.0;
  double sum = 0.0;
  for (double v : values) {
    const double d = v - mean;
    sum_sq += d * d;
    sum += d;
  }
  const double nd = static_cast<double>(n);
  return std::max(0.0, (sum_sq - sum * sum / nd) / (nd - 1.0));
}

}  // namespace

double student_t_cdf(double t, double df) {
  if (!(df > 0.0)) throw InvalidArgument(fmt::format("student_t_cdf: df {} is not > 0", df));
  if (std::isnan(t)) throw InvalidArgument("student_t_cdf: t is NaN");
  if (df >= kNormalCdfMinDf) {
    if (std::isinf(df) || std::isinf(t)) return normal_cdf(t);
    // First-order Edgeworth correction; the next term is O(1 / df^2).
    return normal_cdf(t) - normal_pdf(t) * (t * t * t + t) / (4.0 * df);
  }
  return t >= 0.0 ? 1.0 - student_t_upper_tail(t, df) : student_t_upper_tail(-t, df);
}

double student_t_quantile(double p, double df) {
  if (!(p > 0.0 && p < 1.0)) {
    throw InvalidArgument(fmt::format("student_t_quantile: p {} is not in (0, 1)", p));
  }
  if (!(df > 0.0)) throw InvalidArgument(fmt::format("student_t_quantile: df {} is not > 0", df));
  if (p == 0.5) return 0.0;
  if (p < 0.5) return -student_t_quantile(1.0 - p, df);
  const double z = normal_quantile(p);
  if (std::isinf(df)) return z;
  if (df >= kCornishFisherMinDf) return cornish_fisher_quantile(z, df);
  return student_t_upper_quantile(1.0 - p, df);
}

double t_quantile_975(double df) {
  if (df >= 1.0 && df <= static_cast<double>(kT975.size()) && df == std::floor(df)) {
    return kT975[static_cast<std::size_t>(df) - 1];
  }
  return student_t_quantile(0.975, df);
}

Summary summarize(std::span<const double> values) {
  check_finite(values, "summarize");
  Summary s;
  s.n = values.size();
  s.mean = mean_of(values);
  const auto [min_it, max_it] = std::minmax_element(values.begin(), values.end());
  s.min = *min_it;
  s.max = *max_it;

  std::vector<double> sorted(values.begin(), values.end());
  const std::size_t mid = sorted.size() / 2;
  std::nth_element(sorted.begin(), sorted.begin() + mid, sorted.end());
  s.median = sorted[mid];
  if (sorted.size() % 2 == 0) {
    const double lower = *std::max_element(sorted.begin(), sorted.begin() + mid);
    s.median = lower + 0.5 * (s.median - lower);
  }

  if (s.n < 2) {
    s.std_dev = s.cv_percent = s.ci95_half_width = kNaN;
    return s;
  }
  const double nd = static_cast<double>(s.n);
  s.std_dev = std::sqrt(sample_variance(values, s.mean));
  s.cv_percent = s.mean == 0.0 ? kNaN : s.std_dev / std::fabs(s.mean) * 100.0;
  s.ci95_half_width = t_quantile_975(nd - 1.0) * s.std_dev / std::sqrt(nd);
  return s;
}

double delta_percent(double value, double baseline) {
  if (!std::isfinite(value)) {
    throw InvalidArgument(fmt::format("delta_percent: value {} is not finite", value));
  }
  if (!std::isfinite(baseline)) {
    throw InvalidArgument(fmt::format("delta_percent: baseline {} is not finite", baseline));
  }
  if (baseline == 0.0) {
    throw InvalidArgument(
        "delta_percent: baseline is 0; a relative change needs a non-zero baseline");
  }
  return (value - baseline) / baseline * 100.0;
}

Comparison compare(std::span<const double> a, std::span<const double> b) {
  check_finite(a, "compare (sample a)");
  check_finite(b, "compare (sample b)");
  Comparison c;
  c.n_a = a.size();
  c.n_b = b.size();
  c.mean_a = mean_of(a);
  c.mean_b = mean_of(b);
  c.difference = c.mean_a - c.mean_b;
  c.relative_percent = c.mean_b == 0.0 ? kNaN : c.difference / c.mean_b * 100.0;

  if (c.n_a < 2 || c.n_b < 2) {
    c.std_error = c.df = c.ci95_low = c.ci95_high = kNaN;
    c.exceeds_noise = false;
    c.reason = fmt::format(
        "sample {} has {} value; a confidence interval needs at least 2 values per sample",
        c.n_a < 2 ? "a" : "b", c.n_a < 2 ? c.n_a : c.n_b);
    return c;
  }
  const double va = sample_variance(a, c.mean_a) / static_cast<double>(c.n_a);
  const double vb = sample_variance(b, c.mean_b) / static_cast<double>(c.n_b);
  c.std_error = std::sqrt(va + vb);
  if (c.std_error == 0.0) {
    // Deterministic measurements (byte counts, step counts): the difference is exact.
    c.df = kInf;
    c.ci95_low = c.ci95_high = c.difference;
    c.exceeds_noise = c.difference != 0.0;
    c.reason = "neither sample varies; the difference is exact";
    return c;
  }
  const double da = static_cast<double>(c.n_a - 1);
  const double db = static_cast<double>(c.n_b - 1);
  c.df = (va + vb) * (va + vb) / (va * va / da + vb * vb / db);
  const double half_width = t_quantile_975(c.df) * c.std_error;
  c.ci95_low = c.difference - half_width;
  c.ci95_high = c.difference + half_width;
  c.exceeds_noise = c.ci95_low > 0.0 || c.ci95_high < 0.0;
  return c;
}

}  // namespace nibble::bench
