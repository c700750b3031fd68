// Dependency-free SVG 1.1 charts for benchmark reports: line plots with shaded bands (mean and
// its confidence interval against batch size, loss against time) and stacked bar charts (memory
// breakdown). Text is rendered to a string; save_svg writes it atomically (write_file_atomic).
#pragma once

#include <cstddef>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace nibble::bench {

struct Point {
  double x = 0.0;
  double y = 0.0;
};

struct Interval {
  double lo = 0.0;
  double hi = 0.0;
};

struct Series {
  std::string name;
  std::vector<Point> points;
  // Optional shaded band, e.g. mean +- 95% CI: empty, or one interval per point (at its x).
  std::vector<Interval> band;
};

// Points (and band intervals) with a non-finite coordinate, or x <= 0 on a log axis, are left
// out and break the line there. Series i is drawn in palette_colour(i).
struct LinePlot {
  std::string title;
  std::string x_label;
  std::string y_label;
  bool log_x = false;
  bool y_includes_zero = false;
  std::vector<Series> series;
  int width = 800;
  int height = 480;
};

// One stacked bar per category; segment j of every bar has the name segment_names[j] and the
// colour palette_colour(j), stacked bottom up.
struct BarChart {
  std::string title;
  std::string category_label;
  std::string value_label;
  std::vector<std::string> categories;
  std::vector<std::string> segment_names;
  std::vector<std::vector<double>> values;  // values[category][segment], finite and >= 0
  int width = 800;
  int height = 480;
};

// Both throw InvalidArgument for a size below 200 x 150, a band whose length differs from its
// series' points, or (bars) a values table of the wrong shape or with a negative or non-finite
// entry. Degenerate data (no series, empty series, one point, all values equal) renders.
std::string render_svg(const LinePlot& plot);
std::string render_svg(const BarChart& chart);

// Writes to a temporary beside `path`, flushes, then renames over it. Throws IoError naming the
// path when any step fails; a failed save leaves no temporary behind.
void save_svg(const std::filesystem::path& path, std::string_view svg);

// The Okabe-Ito colour-blind-safe palette, cycling; the 8 colours in an order that reads well on
// white. Series beyond the eighth are also dashed, so no two of the first 24 look alike.
inline constexpr std::size_t kPaletteSize = 8;
std::string_view palette_colour(std::size_t index);

// Text for XML character data or a quoted attribute value: & < > " ' escaped, characters XML 1.0
// forbids and invalid UTF-8 replaced by U+FFFD.
std::string xml_escape(std::string_view text);

// Axis ticks: [lo, hi] widened to whole steps of 1, 2 or 5 times a power of ten (about `target`
// intervals), or for a log axis to 1-2-5 marks (up to 3 decades) or whole decades. A degenerate
// or non-finite range is widened to a usable one; the result always has lo < hi and at least two
// ticks.
struct AxisTicks {
  double lo = 0.0;
  double hi = 1.0;
  double step = 0.0;  // linear axes; 0 for log axes
  std::vector<double> values;
};
AxisTicks nice_ticks(double lo, double hi, int target = 5);
AxisTicks log_ticks(double lo, double hi);

// A tick label with as many decimals as the step needs; very large or small values in
// exponent form ("2.5e+06").
std::string format_tick(double value, double step);

}  // namespace nibble::bench
