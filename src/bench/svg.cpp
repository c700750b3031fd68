// The SVG writer: layout is computed in pixels from estimated text widths (no font metrics are
// available), every user string is escaped, and every number that reaches the output has passed
// through one formatter that cannot print NaN or infinity.
#include "bench/svg.hpp"

#include "bench/report.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <iterator>
#include <limits>
#include <numbers>
#include <system_error>
#include <utility>

#include "nibble/error.hpp"

namespace nibble::bench {
namespace {

constexpr std::array<std::string_view, kPaletteSize> kPalette = {
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442",
};
constexpr std::array<std::string_view, 3> kDashes = {"", "6 3", "2 3"};

constexpr double kTitleFont = 16.0;
constexpr double kLabelFont = 12.0;
constexpr double kTickFont = 11.0;
constexpr double kLegendRow = 20.0;
constexpr double kLegendSwatch = 24.0;
// Series with at most this many points get a marker on every point; longer ones only on points
// that have no neighbour to draw a line to.
constexpr std::size_t kMaxMarkedPoints = 30;

// A coordinate or length for an attribute: two decimals, trailing zeros dropped, never NaN,
// infinity or "-0".
std::string num(double v) {
  if (!std::isfinite(v)) v = 0.0;
  std::string s = fmt::format("{:.2f}", v);
  while (s.back() == '0') s.pop_back();
  if (s.back() == '.') s.pop_back();
  if (s == "-0") s = "0";
  return s;
}

// A data value for a label or tooltip: four significant digits.
std::string format_value(double v) {
  if (!std::isfinite(v)) return "?";
  if (v == 0.0) return "0";
  return fmt::format("{:.4g}", v);
}

// Text width estimate: sans-serif glyphs average a little over half the font size.
double text_width(std::string_view text, double font_size) {
  std::size_t code_points = 0;
  for (unsigned char c : text) code_points += (c & 0xC0) != 0x80;
  return static_cast<double>(code_points) * font_size * 0.6;
}

std::string_view dash_pattern(std::size_t index) {
  return kDashes[(index / kPaletteSize) % kDashes.size()];
}

void check_size(int width, int height, const char* what) {
  if (width < 200 || height < 150 || width > 20000 || height > 20000) {
    throw InvalidArgument(
        fmt::format("{}: size {} x {} is outside 200 x 150 .. 20000 x 20000", what, width, height));
  }
}

using Out = std::back_insert_iterator<std::string>;

void begin_document(std::string& out, int width, int height, std::string_view title) {
  fmt::format_to(Out(out),
                 "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
                 "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" width=\"{0}\" "
                 "height=\"{1}\" viewBox=\"0 0 {0} {1}\" font-family=\"sans-serif\">\n",
                 width, height);
  if (!title.empty()) fmt::format_to(Out(out), "<title>{}</title>\n", xml_escape(title));
  fmt::format_to(Out(out), "<rect width=\"{}\" height=\"{}\" fill=\"white\"/>\n", width, height);
  if (!title.empty()) {
    fmt::format_to(Out(out),
                   "<text class=\"title\" x=\"{}\" y=\"24\" font-size=\"{}\" font-weight=\"bold\" "
                   "text-anchor=\"middle\">{}</text>\n",
                   num(width / 2.0), num(kTitleFont), xml_escape(title));
  }
}

// The plot area in pixels and the mapping of data onto it.
struct Frame {
  double left = 0.0;
  double top = 0.0;
  double width = 0.0;
  double height = 0.0;
  double right() const { return left + width; }
  double bottom() const { return top + height; }
};

struct Axis {
  double lo = 0.0;
  double hi = 1.0;
  bool log = false;
  double to_unit(double v) const {
    if (log) return (std::log10(v) - std::log10(lo)) / (std::log10(hi) - std::log10(lo));
    return (v - lo) / (hi - lo);
  }
};

double legend_width(const std::vector<std::string_view>& names, double plot_width) {
  if (names.empty()) return 0.0;
  double widest = 0.0;
  for (std::string_view name : names) widest = std::max(widest, text_width(name, kLabelFont));
  return std::min(plot_width * 0.35, kLegendSwatch + 14.0 + widest);
}

void draw_axis_labels(std::string& out, const Frame& f, int svg_height, std::string_view x_label,
                      std::string_view y_label) {
  if (!x_label.empty()) {
    fmt::format_to(Out(out),
                   "<text class=\"axis-label\" x=\"{}\" y=\"{}\" font-size=\"{}\" "
                   "text-anchor=\"middle\">{}</text>\n",
                   num(f.left + f.width / 2.0), num(svg_height - 10.0), num(kLabelFont),
                   xml_escape(x_label));
  }
  if (!y_label.empty()) {
    const double x = 16.0;
    const double y = f.top + f.height / 2.0;
    fmt::format_to(Out(out),
                   "<text class=\"axis-label\" x=\"{0}\" y=\"{1}\" font-size=\"{2}\" "
                   "text-anchor=\"middle\" transform=\"rotate(-90 {0} {1})\">{3}</text>\n",
                   num(x), num(y), num(kLabelFont), xml_escape(y_label));
  }
}

void draw_no_data(std::string& out, const Frame& f) {
  fmt::format_to(Out(out),
                 "<text class=\"no-data\" x=\"{}\" y=\"{}\" font-size=\"{}\" fill=\"#888888\" "
                 "text-anchor=\"middle\">no data</text>\n",
                 num(f.left + f.width / 2.0), num(f.top + f.height / 2.0), num(kLabelFont));
}

void draw_frame(std::string& out, const Frame& f) {
  fmt::format_to(Out(out),
                 "<rect class=\"frame\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" "
                 "stroke=\"#333333\" stroke-width=\"1\"/>\n",
                 num(f.left), num(f.top), num(f.width), num(f.height));
}

std::vector<std::string> tick_labels(const AxisTicks& ticks) {
  std::vector<std::string> labels;
  for (double v : ticks.values) labels.push_back(format_tick(v, ticks.step > 0.0 ? ticks.step : v));
  return labels;
}

double widest(const std::vector<std::string>& labels, double font_size) {
  double w = 0.0;
  for (const std::string& s : labels) w = std::max(w, text_width(s, font_size));
  return w;
}

// Index runs [begin, end) of consecutive usable entries.
template <typename Usable>
std::vector<std::pair<std::size_t, std::size_t>> runs(std::size_t n, Usable usable) {
  std::vector<std::pair<std::size_t, std::size_t>> result;
  std::size_t i = 0;
  while (i < n) {
    if (!usable(i)) {
      ++i;
      continue;
    }
    const std::size_t begin = i;
    while (i < n && usable(i)) ++i;
    result.emplace_back(begin, i);
  }
  return result;
}

bool is_valid_utf8_tail(std::string_view s, std::size_t i, std::size_t count) {
  if (i + count > s.size()) return false;
  for (std::size_t k = 1; k < count; ++k) {
    if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
  }
  return true;
}

}  // namespace

std::string_view palette_colour(std::size_t index) { return kPalette[index % kPaletteSize]; }

std::string xml_escape(std::string_view text) {
  constexpr std::string_view kReplacement = "\xEF\xBF\xBD";
  std::string out;
  out.reserve(text.size());
  std::size_t i = 0;
  while (i < text.size()) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c < 0x80) {
      switch (c) {
        case '&':
          out += "&amp;";
          break;
        case '<':
          out += "&lt;";
          break;
        case '>':
          out += "&gt;";
          break;
        case '"':
          out += "&quot;";
          break;
        case '\'':
          out += "&apos;";
          break;
        default:
          if (c < 0x20 && c != '\t' && c != '\n' && c != '\r') {
            out += kReplacement;
          } else {
            out += static_cast<char>(c);
          }
      }
      ++i;
      continue;
    }
    // Decode one multi-byte sequence; anything malformed, overlong, a surrogate, beyond
    // U+10FFFF, or a non-character U+FFFE/U+FFFF becomes one replacement character per byte.
    std::size_t count = 0;
    char32_t cp = 0;
    if ((c & 0xE0) == 0xC0) {
      count = 2;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      count = 3;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      count = 4;
      cp = c & 0x07;
    }
    bool ok = count != 0 && is_valid_utf8_tail(text, i, count);
    if (ok) {
      for (std::size_t k = 1; k < count; ++k)
        cp = (cp << 6) | (static_cast<unsigned char>(text[i + k]) & 0x3F);
      constexpr std::array<char32_t, 5> kMinForLength = {0, 0, 0x80, 0x800, 0x10000};
      ok = cp >= kMinForLength[count] && cp <= 0x10FFFF && !(cp >= 0xD800 && cp <= 0xDFFF) &&
           cp != 0xFFFE && cp != 0xFFFF;
    }
    if (ok) {
      out.append(text.substr(i, count));
      i += count;
    } else {
      out += kReplacement;
      ++i;
    }
  }
  return out;
}

AxisTicks nice_ticks(double lo, double hi, int target) {
  if (target < 1) target = 5;
  if (!std::isfinite(lo) || !std::isfinite(hi)) {
    lo = 0.0;
    hi = 1.0;
  }
  if (lo > hi) std::swap(lo, hi);
  const double scale = std::max(std::fabs(lo), std::fabs(hi));
  if (hi - lo <= 1e-9 * scale) {
    if (scale == 0.0) {
      lo = 0.0;
      hi = 1.0;
    } else {
      const double centre = 0.5 * (lo + hi);
      lo = centre - 0.1 * std::fabs(centre);
      hi = centre + 0.1 * std::fabs(centre);
    }
  }
  // Keep the span finite for ranges near the limits of double.
  if (!std::isfinite(hi - lo)) {
    lo *= 0.25;
    hi *= 0.25;
  }
  const double raw = (hi - lo) / target;
  const double magnitude = std::pow(10.0, std::floor(std::log10(raw)));
  const double ratio = raw / magnitude;
  // Round to the nearest of 1, 2, 5, 10 (geometrically), so the count lands near `target`.
  const double multiple = ratio < 1.5 ? 1.0 : ratio < 3.0 ? 2.0 : ratio < 7.0 ? 5.0 : 10.0;
  AxisTicks t;
  t.step = multiple * magnitude;
  // The small tolerance keeps a bound that is already a whole step (within rounding) from
  // growing by one more step.
  const double first = std::floor(lo / t.step + 1e-9);
  const double last = std::ceil(hi / t.step - 1e-9);
  t.lo = first * t.step;
  t.hi = last * t.step;
  for (double k = first; k <= last; k += 1.0) {
    double v = k * t.step;
    if (std::fabs(v) < 1e-9 * t.step) v = 0.0;
    t.values.push_back(v);
  }
  if (t.lo == 0.0) t.lo = 0.0;  // no -0
  if (t.hi == 0.0) t.hi = 0.0;
  return t;
}

AxisTicks log_ticks(double lo, double hi) {
  if (!(lo > 0.0) || !(hi > 0.0) || !std::isfinite(lo) || !std::isfinite(hi)) {
    lo = 1.0;
    hi = 10.0;
  }
  if (lo > hi) std::swap(lo, hi);
  if (hi / lo < 1.0 + 1e-12) {
    lo /= std::sqrt(10.0);
    hi *= std::sqrt(10.0);
  }
  auto decade = [](int k) { return k >= 0 ? std::pow(10.0, k) : 1.0 / std::pow(10.0, -k); };
  const int kmin = static_cast<int>(std::floor(std::log10(lo) + 1e-9));
  int kmax = static_cast<int>(std::ceil(std::log10(hi) - 1e-9));
  if (kmax <= kmin) kmax = kmin + 1;
  AxisTicks t;
  t.step = 0.0;
  if (kmax - kmin <= 3) {
    std::vector<double> marks;
    for (int k = kmin; k <= kmax; ++k) {
      for (double m : {1.0, 2.0, 5.0}) marks.push_back(k >= 0 ? m * decade(k) : m / decade(-k));
    }
    const double tol = 1e-9;
    std::size_t first = 0;
    for (std::size_t i = 0; i < marks.size(); ++i) {
      if (marks[i] <= lo * (1.0 + tol)) first = i;
    }
    std::size_t last = marks.size() - 1;
    for (std::size_t i = marks.size(); i-- > 0;) {
      if (marks[i] >= hi * (1.0 - tol)) last = i;
    }
    t.values.assign(marks.begin() + static_cast<std::ptrdiff_t>(first),
                    marks.begin() + static_cast<std::ptrdiff_t>(last) + 1);
  } else {
    const int stride = (kmax - kmin + 7) / 8;
    kmax = kmin + (kmax - kmin + stride - 1) / stride * stride;
    for (int k = kmin; k <= kmax; k += stride) t.values.push_back(decade(k));
  }
  t.lo = t.values.front();
  t.hi = t.values.back();
  return t;
}

std::string format_tick(double value, double step) {
  if (!std::isfinite(value)) return "0";
  step = std::fabs(step);
  if (!std::isfinite(step) || step == 0.0) step = std::fabs(value) > 0.0 ? std::fabs(value) : 1.0;
  if (std::fabs(value) < 1e-9 * step) return "0";
  const double magnitude = std::fabs(value);
  const int step_exponent = static_cast<int>(std::floor(std::log10(step) + 1e-9));
  if (magnitude >= 1e6 || magnitude < 1e-4) {
    const int value_exponent = static_cast<int>(std::floor(std::log10(magnitude) + 1e-9));
    const int precision = std::clamp(value_exponent - step_exponent, 0, 10);
    std::string s = fmt::format("{:.{}e}", value, precision);
    // Drop trailing zeros of the mantissa: "2.50e+06" -> "2.5e+06", "2.0e+06" -> "2e+06".
    const std::size_t e = s.find('e');
    std::size_t end = e;
    if (s.find('.') < e) {
      while (s[end - 1] == '0') --end;
      if (s[end - 1] == '.') --end;
    }
    return s.substr(0, end) + s.substr(e);
  }
  const int decimals = std::clamp(-step_exponent, 0, 10);
  std::string s = fmt::format("{:.{}f}", value, decimals);
  if (s.find_first_not_of("-0.") == std::string::npos) return "0";
  return s;
}

std::string render_svg(const LinePlot& plot) {
  check_size(plot.width, plot.height, "line plot");
  for (const Series& s : plot.series) {
    if (!s.band.empty() && s.band.size() != s.points.size()) {
      throw InvalidArgument(
          fmt::format("line plot series '{}': band has {} intervals for {} points", s.name,
                      s.band.size(), s.points.size()));
    }
  }
  auto x_usable = [&](double x) { return std::isfinite(x) && (!plot.log_x || x > 0.0); };
  auto point_usable = [&](const Series& s, std::size_t i) {
    return x_usable(s.points[i].x) && std::isfinite(s.points[i].y);
  };
  auto band_usable = [&](const Series& s, std::size_t i) {
    return x_usable(s.points[i].x) && std::isfinite(s.band[i].lo) && std::isfinite(s.band[i].hi);
  };

  constexpr double kInf = std::numeric_limits<double>::infinity();
  double x_min = kInf, x_max = -kInf, y_min = kInf, y_max = -kInf;
  bool any_data = false;
  for (const Series& s : plot.series) {
    for (std::size_t i = 0; i < s.points.size(); ++i) {
      if (point_usable(s, i)) {
        any_data = true;
        x_min = std::min(x_min, s.points[i].x);
        x_max = std::max(x_max, s.points[i].x);
        y_min = std::min(y_min, s.points[i].y);
        y_max = std::max(y_max, s.points[i].y);
      }
      if (!s.band.empty() && band_usable(s, i)) {
        any_data = true;
        x_min = std::min(x_min, s.points[i].x);
        x_max = std::max(x_max, s.points[i].x);
        y_min = std::min({y_min, s.band[i].lo, s.band[i].hi});
        y_max = std::max({y_max, s.band[i].lo, s.band[i].hi});
      }
    }
  }
  if (!any_data) {
    x_min = plot.log_x ? 1.0 : 0.0;
    x_max = plot.log_x ? 10.0 : 1.0;
    y_min = 0.0;
    y_max = 1.0;
  }
  if (plot.y_includes_zero) {
    y_min = std::min(y_min, 0.0);
    y_max = std::max(y_max, 0.0);
  }
  const AxisTicks x_ticks = plot.log_x ? log_ticks(x_min, x_max) : nice_ticks(x_min, x_max);
  const AxisTicks y_ticks = nice_ticks(y_min, y_max);
  const std::vector<std::string> x_labels = tick_labels(x_ticks);
  const std::vector<std::string> y_labels = tick_labels(y_ticks);

  std::vector<std::string_view> names;
  for (const Series& s : plot.series) names.push_back(s.name);
  const double legend_w = legend_width(names, plot.width);

  Frame f;
  f.left = 12.0 + (plot.y_label.empty() ? 0.0 : 20.0) + widest(y_labels, kTickFont) + 8.0;
  f.top = plot.title.empty() ? 16.0 : 40.0;
  const double right_margin = 16.0 + (legend_w > 0.0 ? legend_w + 12.0 : 0.0);
  const double bottom_margin = 28.0 + (plot.x_label.empty() ? 0.0 : 20.0);
  f.width = std::max(20.0, plot.width - f.left - right_margin);
  f.height = std::max(20.0, plot.height - f.top - bottom_margin);
  const Axis x_axis{x_ticks.lo, x_ticks.hi, plot.log_x};
  const Axis y_axis{y_ticks.lo, y_ticks.hi, false};
  auto px = [&](double x) { return f.left + x_axis.to_unit(x) * f.width; };
  auto py = [&](double y) { return f.bottom() - y_axis.to_unit(y) * f.height; };

  std::string out;
  begin_document(out, plot.width, plot.height, plot.title);

  out += "<g class=\"grid\" stroke=\"#e5e5e5\" stroke-width=\"1\">\n";
  for (double v : x_ticks.values) {
    fmt::format_to(Out(out), "<line x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\"/>\n", num(px(v)),
                   num(f.top), num(f.bottom()));
  }
  for (double v : y_ticks.values) {
    fmt::format_to(Out(out), "<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\"/>\n", num(f.left),
                   num(py(v)), num(f.right()));
  }
  out += "</g>\n";
  draw_frame(out, f);
  fmt::format_to(Out(out), "<g class=\"ticks\" font-size=\"{}\" fill=\"#333333\">\n",
                 num(kTickFont));
  for (std::size_t i = 0; i < x_ticks.values.size(); ++i) {
    fmt::format_to(Out(out), "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
                   num(px(x_ticks.values[i])), num(f.bottom() + 16.0), xml_escape(x_labels[i]));
  }
  for (std::size_t i = 0; i < y_ticks.values.size(); ++i) {
    fmt::format_to(Out(out), "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n",
                   num(f.left - 6.0), num(py(y_ticks.values[i]) + 4.0), xml_escape(y_labels[i]));
  }
  out += "</g>\n";
  draw_axis_labels(out, f, plot.height, plot.x_label, plot.y_label);

  // Every band first, so that no series' band covers another series' line.
  out += "<g class=\"bands\">\n";
  for (std::size_t si = 0; si < plot.series.size(); ++si) {
    const Series& s = plot.series[si];
    if (s.band.empty()) continue;
    const std::string_view colour = palette_colour(si);
    for (auto [begin, end] :
         runs(s.points.size(), [&](std::size_t i) { return band_usable(s, i); })) {
      if (end - begin == 1) {
        const double x = px(s.points[begin].x);
        fmt::format_to(Out(out),
                       "<line class=\"band\" x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\" "
                       "stroke=\"{3}\" stroke-opacity=\"0.35\" stroke-width=\"6\"/>\n",
                       num(x), num(py(s.band[begin].lo)), num(py(s.band[begin].hi)), colour);
        continue;
      }
      std::string points;
      for (std::size_t i = begin; i < end; ++i) {
        fmt::format_to(Out(points), "{},{} ", num(px(s.points[i].x)), num(py(s.band[i].hi)));
      }
      for (std::size_t i = end; i-- > begin;) {
        fmt::format_to(Out(points), "{},{} ", num(px(s.points[i].x)), num(py(s.band[i].lo)));
      }
      points.pop_back();
      fmt::format_to(Out(out),
                     "<polygon class=\"band\" points=\"{}\" fill=\"{}\" fill-opacity=\"0.2\" "
                     "stroke=\"none\"/>\n",
                     points, colour);
    }
  }
  out += "</g>\n";

  out += "<g class=\"lines\">\n";
  for (std::size_t si = 0; si < plot.series.size(); ++si) {
    const Series& s = plot.series[si];
    const std::string_view colour = palette_colour(si);
    const std::string_view dash = dash_pattern(si);
    const std::string dash_attr = dash.empty() ? "" : fmt::format(" stroke-dasharray=\"{}\"", dash);
    const auto line_runs = runs(s.points.size(), [&](std::size_t i) { return point_usable(s, i); });
    std::size_t usable = 0;
    for (auto [begin, end] : line_runs) usable += end - begin;
    for (auto [begin, end] : line_runs) {
      if (end - begin >= 2) {
        std::string points;
        for (std::size_t i = begin; i < end; ++i) {
          fmt::format_to(Out(points), "{},{} ", num(px(s.points[i].x)), num(py(s.points[i].y)));
        }
        points.pop_back();
        fmt::format_to(Out(out),
                       "<polyline class=\"line\" points=\"{}\" fill=\"none\" stroke=\"{}\" "
                       "stroke-width=\"2\" stroke-linejoin=\"round\"{}/>\n",
                       points, colour, dash_attr);
      }
      if (usable <= kMaxMarkedPoints || end - begin == 1) {
        for (std::size_t i = begin; i < end; ++i) {
          fmt::format_to(Out(out),
                         "<circle class=\"marker\" cx=\"{}\" cy=\"{}\" r=\"3\" fill=\"{}\"/>\n",
                         num(px(s.points[i].x)), num(py(s.points[i].y)), colour);
        }
      }
    }
  }
  out += "</g>\n";
  if (!any_data) draw_no_data(out, f);

  if (!plot.series.empty()) {
    const double lx = f.right() + 12.0;
    fmt::format_to(Out(out), "<g class=\"legend\" font-size=\"{}\">\n", num(kLabelFont));
    for (std::size_t si = 0; si < plot.series.size(); ++si) {
      const Series& s = plot.series[si];
      const double y = f.top + 10.0 + static_cast<double>(si) * kLegendRow;
      const std::string_view colour = palette_colour(si);
      const std::string_view dash = dash_pattern(si);
      out += "<g class=\"legend-entry\">";
      if (!s.band.empty()) {
        fmt::format_to(Out(out),
                       "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"12\" fill=\"{}\" "
                       "fill-opacity=\"0.2\"/>",
                       num(lx), num(y - 6.0), num(kLegendSwatch), colour);
      }
      fmt::format_to(
          Out(out),
          "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"{}\" stroke-width=\"2\"{}/>",
          num(lx), num(y), num(lx + kLegendSwatch), num(y), colour,
          dash.empty() ? "" : fmt::format(" stroke-dasharray=\"{}\"", dash));
      fmt::format_to(Out(out), "<text x=\"{}\" y=\"{}\">{}</text></g>\n",
                     num(lx + kLegendSwatch + 6.0), num(y + 4.0), xml_escape(s.name));
    }
    out += "</g>\n";
  }
  out += "</svg>\n";
  return out;
}

std::string render_svg(const BarChart& chart) {
  check_size(chart.width, chart.height, "bar chart");
  if (chart.values.size() != chart.categories.size()) {
    throw InvalidArgument(fmt::format("bar chart: {} rows of values for {} categories",
                                      chart.values.size(), chart.categories.size()));
  }
  std::vector<double> totals;
  for (std::size_t c = 0; c < chart.categories.size(); ++c) {
    const std::vector<double>& row = chart.values[c];
    if (row.size() != chart.segment_names.size()) {
      throw InvalidArgument(fmt::format("bar chart: category '{}' has {} values for {} segments",
                                        chart.categories[c], row.size(),
                                        chart.segment_names.size()));
    }
    double total = 0.0;
    for (std::size_t j = 0; j < row.size(); ++j) {
      if (!std::isfinite(row[j]) || row[j] < 0.0) {
        throw InvalidArgument(fmt::format(
            "bar chart: value {} of segment '{}' in category '{}' is not a finite number >= 0",
            row[j], chart.segment_names[j], chart.categories[c]));
      }
      total += row[j];
    }
    totals.push_back(total);
  }
  const double max_total = totals.empty() ? 0.0 : *std::max_element(totals.begin(), totals.end());
  const AxisTicks y_ticks = nice_ticks(0.0, max_total);
  const std::vector<std::string> y_labels = tick_labels(y_ticks);

  std::vector<std::string_view> names(chart.segment_names.begin(), chart.segment_names.end());
  const double legend_w = legend_width(names, chart.width);

  Frame f;
  f.left = 12.0 + (chart.value_label.empty() ? 0.0 : 20.0) + widest(y_labels, kTickFont) + 8.0;
  f.top = chart.title.empty() ? 24.0 : 48.0;  // room for the total above the tallest bar
  const double right_margin = 16.0 + (legend_w > 0.0 ? legend_w + 12.0 : 0.0);
  f.width = std::max(20.0, chart.width - f.left - right_margin);

  // Category labels turn when they would collide; the bottom margin grows to fit them, up to a
  // third of the height.
  const std::size_t n = chart.categories.size();
  const double slot = n == 0 ? f.width : f.width / static_cast<double>(n);
  double label_w = 0.0;
  for (const std::string& c : chart.categories)
    label_w = std::max(label_w, text_width(c, kTickFont));
  const bool rotate = label_w > slot * 0.95;
  constexpr double kAngle = 35.0;
  const double label_h =
      rotate ? label_w * std::sin(kAngle * std::numbers::pi / 180.0) + kTickFont : kTickFont;
  const double bottom_margin =
      std::min(chart.height / 3.0, 14.0 + label_h) + (chart.category_label.empty() ? 0.0 : 20.0);
  f.height = std::max(20.0, chart.height - f.top - bottom_margin);
  const Axis y_axis{y_ticks.lo, y_ticks.hi, false};
  auto py = [&](double y) { return f.bottom() - y_axis.to_unit(y) * f.height; };

  std::string out;
  begin_document(out, chart.width, chart.height, chart.title);
  out += "<g class=\"grid\" stroke=\"#e5e5e5\" stroke-width=\"1\">\n";
  for (double v : y_ticks.values) {
    fmt::format_to(Out(out), "<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\"/>\n", num(f.left),
                   num(py(v)), num(f.right()));
  }
  out += "</g>\n";
  fmt::format_to(Out(out), "<g class=\"ticks\" font-size=\"{}\" fill=\"#333333\">\n",
                 num(kTickFont));
  for (std::size_t i = 0; i < y_ticks.values.size(); ++i) {
    fmt::format_to(Out(out), "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n",
                   num(f.left - 6.0), num(py(y_ticks.values[i]) + 4.0), xml_escape(y_labels[i]));
  }
  out += "</g>\n";

  const double bar_w = std::min(slot * 0.6, 120.0);
  out += "<g class=\"bars\">\n";
  for (std::size_t c = 0; c < n; ++c) {
    const double centre = f.left + slot * (static_cast<double>(c) + 0.5);
    out += "<g class=\"bar\">\n";
    double base = 0.0;
    for (std::size_t j = 0; j < chart.segment_names.size(); ++j) {
      const double v = chart.values[c][j];
      if (v == 0.0) continue;
      const double top = py(base + v);
      fmt::format_to(Out(out),
                     "<rect class=\"segment\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" "
                     "fill=\"{}\"><title>{}: {}</title></rect>\n",
                     num(centre - bar_w / 2.0), num(top), num(bar_w), num(py(base) - top),
                     palette_colour(j), xml_escape(chart.segment_names[j]), format_value(v));
      base += v;
    }
    fmt::format_to(Out(out),
                   "<text class=\"total\" x=\"{}\" y=\"{}\" font-size=\"{}\" "
                   "text-anchor=\"middle\">{}</text>\n",
                   num(centre), num(py(totals[c]) - 4.0), num(kTickFont), format_value(totals[c]));
    const double label_y = f.bottom() + 16.0;
    if (rotate) {
      fmt::format_to(Out(out),
                     "<text class=\"category\" x=\"{0}\" y=\"{1}\" font-size=\"{2}\" "
                     "text-anchor=\"end\" transform=\"rotate(-{3} {0} {1})\">{4}</text>\n",
                     num(centre), num(label_y), num(kTickFont), num(kAngle),
                     xml_escape(chart.categories[c]));
    } else {
      fmt::format_to(Out(out),
                     "<text class=\"category\" x=\"{}\" y=\"{}\" font-size=\"{}\" "
                     "text-anchor=\"middle\">{}</text>\n",
                     num(centre), num(label_y), num(kTickFont), xml_escape(chart.categories[c]));
    }
    out += "</g>\n";
  }
  out += "</g>\n";
  draw_frame(out, f);
  draw_axis_labels(out, f, chart.height, chart.category_label, chart.value_label);
  if (n == 0) draw_no_data(out, f);

  if (!chart.segment_names.empty()) {
    const double lx = f.right() + 12.0;
    fmt::format_to(Out(out), "<g class=\"legend\" font-size=\"{}\">\n", num(kLabelFont));
    // Listed top down in the order the segments appear on a bar, topmost first.
    for (std::size_t row = 0; row < chart.segment_names.size(); ++row) {
      const std::size_t j = chart.segment_names.size() - 1 - row;
      const double y = f.top + 10.0 + static_cast<double>(row) * kLegendRow;
      fmt::format_to(Out(out),
                     "<g class=\"legend-entry\"><rect x=\"{}\" y=\"{}\" width=\"14\" height=\"12\" "
                     "fill=\"{}\"/><text x=\"{}\" y=\"{}\">{}</text></g>\n",
                     num(lx), num(y - 6.0), palette_colour(j), num(lx + 20.0), num(y + 4.0),
                     xml_escape(chart.segment_names[j]));
    }
    out += "</g>\n";
  }
  out += "</svg>\n";
  return out;
}

void save_svg(const std::filesystem::path& path, std::string_view svg) { write_file_atomic(path, svg); }

}  // namespace nibble::bench
