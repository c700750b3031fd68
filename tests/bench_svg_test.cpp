// nibble bench SVG output, read back with a small XML tokenizer (no XML library is a dependency):
// well-formed documents, one line per series run, bands, legends, escaped text, finite numbers
// for degenerate data, 1-2-5 ticks, stacked bars, and atomic saving.
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "bench/svg.hpp"
#include "nibble/error.hpp"

#include "test_util.hpp"

namespace nibble::bench {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// ---- A minimal XML 1.0 well-formedness checker --------------------------------------------
// Accepts an optional XML declaration, comments, elements with quoted attributes, character data
// and the five predefined and numeric character references; rejects everything else.

struct Element {
  std::string name;
  std::map<std::string, std::string> attributes;
  std::string text;  // character data directly inside, references resolved
  int parent = -1;
  std::string attr(const std::string& key) const {
    auto it = attributes.find(key);
    return it == attributes.end() ? std::string() : it->second;
  }
};

class XmlReader {
 public:
  explicit XmlReader(std::string_view s) : s_(s) {}

  std::vector<Element> parse() {
    if (s_.substr(0, 5) == "<?xml") {
      const std::size_t end = s_.find("?>");
      if (end == std::string_view::npos) fail("unterminated XML declaration");
      pos_ = end + 2;
    }
    skip_misc();
    if (pos_ >= s_.size() || s_[pos_] != '<') fail("no root element");
    element(-1);
    skip_misc();
    if (pos_ != s_.size()) fail("content after the root element");
    return std::move(elements_);
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("not well-formed at offset " + std::to_string(pos_) + ": " + what);
  }
  static bool name_start(char c) {
    return std::isalpha(static_cast<unsigned char>(c)) || c == '_' || c == ':';
  }
  static bool name_char(char c) {
    return name_start(c) || std::isdigit(static_cast<unsigned char>(c)) || c == '-' || c == '.';
  }
  bool starts_with(std::string_view prefix) const {
    return s_.substr(pos_, prefix.size()) == prefix;
  }
  void skip_space() {
    while (pos_ < s_.size() && std::string_view(" \t\r\n").find(s_[pos_]) != std::string_view::npos)
      ++pos_;
  }
  void comment() {
    const std::size_t end = s_.find("-->", pos_ + 4);
    if (end == std::string_view::npos) fail("unterminated comment");
    if (s_.substr(pos_ + 4, end - pos_ - 4).find("--") != std::string_view::npos)
      fail("-- in comment");
    pos_ = end + 3;
  }
  void skip_misc() {
    for (;;) {
      skip_space();
      if (starts_with("<!--")) {
        comment();
      } else {
        return;
      }
    }
  }
  std::string name() {
    if (pos_ >= s_.size() || !name_start(s_[pos_])) fail("expected a name");
    const std::size_t begin = pos_;
    while (pos_ < s_.size() && name_char(s_[pos_])) ++pos_;
    return std::string(s_.substr(begin, pos_ - begin));
  }
  // Character data up to `stop` with references resolved; '<' is never allowed in it.
  std::string chars(char stop) {
    std::string out;
    while (pos_ < s_.size() && s_[pos_] != stop) {
      const char c = s_[pos_];
      if (c == '<') fail("raw '<' in text or attribute");
      if (static_cast<unsigned char>(c) < 0x20 && c != '\t' && c != '\n' && c != '\r') {
        fail("control character");
      }
      if (c == '>' && out.size() >= 2 && out.substr(out.size() - 2) == "]]") fail("]]> in text");
      if (c != '&') {
        out += c;
        ++pos_;
        continue;
      }
      const std::size_t semi = s_.find(';', pos_);
      if (semi == std::string_view::npos) fail("unterminated reference");
      const std::string_view ref = s_.substr(pos_ + 1, semi - pos_ - 1);
      static const std::map<std::string_view, char> kNamed = {
          {"amp", '&'}, {"lt", '<'}, {"gt", '>'}, {"quot", '"'}, {"apos", '\''}};
      if (auto it = kNamed.find(ref); it != kNamed.end()) {
        out += it->second;
      } else if (ref.size() >= 2 && ref[0] == '#') {
        const bool hex = ref[1] == 'x';
        const std::string digits(ref.substr(hex ? 2 : 1));
        if (digits.empty() || digits.find_first_not_of(hex ? "0123456789abcdefABCDEF"
                                                           : "0123456789") != std::string::npos) {
          fail("bad character reference");
        }
        out += '?';
      } else {
        fail("unknown entity &" + std::string(ref) + ";");
      }
      pos_ = semi + 1;
    }
    return out;
  }
  void element(int parent) {
    ++pos_;  // '<'
    const int index = static_cast<int>(elements_.size());
    elements_.push_back(Element{name(), {}, {}, parent});
    for (;;) {
      const std::size_t before = pos_;
      skip_space();
      if (pos_ >= s_.size()) fail("unterminated start tag");
      if (starts_with("/>")) {
        pos_ += 2;
        return;
      }
      if (s_[pos_] == '>') {
        ++pos_;
        break;
      }
      if (pos_ == before) fail("attributes must be separated by white space");
      const std::string key = name();
      skip_space();
      if (pos_ >= s_.size() || s_[pos_] != '=') fail("attribute " + key + " without '='");
      ++pos_;
      skip_space();
      if (pos_ >= s_.size() || (s_[pos_] != '"' && s_[pos_] != '\''))
        fail("unquoted attribute " + key);
      const char quote = s_[pos_++];
      std::string value = chars(quote);
      if (pos_ >= s_.size()) fail("unterminated attribute " + key);
      ++pos_;
      if (!elements_[index].attributes.emplace(key, std::move(value)).second) {
        fail("duplicate attribute " + key);
      }
    }
    for (;;) {
      if (pos_ >= s_.size()) fail("unclosed element " + elements_[index].name);
      if (starts_with("</")) {
        pos_ += 2;
        const std::string end_name = name();
        skip_space();
        if (end_name != elements_[index].name) {
          fail("end tag " + end_name + " closes " + elements_[index].name);
        }
        if (pos_ >= s_.size() || s_[pos_] != '>') fail("unterminated end tag");
        ++pos_;
        return;
      }
      if (starts_with("<!--")) {
        comment();
      } else if (s_[pos_] == '<') {
        element(index);
      } else {
        elements_[index].text += chars('<');
      }
    }
  }

  std::string_view s_;
  std::size_t pos_ = 0;
  std::vector<Element> elements_;
};

std::vector<Element> parse_xml(std::string_view text) { return XmlReader(text).parse(); }

// Elements named `name`, and with class `cls` when it is not empty.
std::vector<const Element*> find(const std::vector<Element>& doc, std::string_view name,
                                 std::string_view cls = "") {
  std::vector<const Element*> out;
  for (const Element& e : doc) {
    if (e.name == name && (cls.empty() || e.attr("class") == cls)) out.push_back(&e);
  }
  return out;
}

// Whether element `e` lies inside an element with class `cls`.
bool inside(const std::vector<Element>& doc, const Element& e, std::string_view cls) {
  for (int p = e.parent; p >= 0; p = doc[p].parent) {
    if (doc[p].attr("class") == cls) return true;
  }
  return false;
}

std::vector<double> numbers_in(const std::string& list) {
  std::vector<double> out;
  std::string item;
  std::string normalised = list;
  std::replace(normalised.begin(), normalised.end(), ',', ' ');
  std::istringstream words(normalised);
  while (words >> item) {
    char* end = nullptr;
    const double v = std::strtod(item.c_str(), &end);
    if (end == item.c_str() || *end != '\0') throw std::runtime_error("not a number: " + item);
    out.push_back(v);
  }
  return out;
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// Parses, and checks that every geometric attribute holds finite numbers and that no "nan" or
// "inf" appears anywhere (the tests use no names containing them).
std::vector<Element> check_document(const std::string& svg) {
  std::vector<Element> doc;
  try {
    doc = parse_xml(svg);
  } catch (const std::exception& e) {
    ADD_FAILURE() << e.what() << "\n" << svg;
    return doc;
  }
  EXPECT_EQ(doc.front().name, "svg");
  EXPECT_EQ(doc.front().attr("xmlns"), "http://www.w3.org/2000/svg");
  EXPECT_EQ(doc.front().attr("version"), "1.1");
  const std::string low = lower(svg);
  EXPECT_EQ(low.find("nan"), std::string::npos) << svg;
  EXPECT_EQ(low.find("inf"), std::string::npos) << svg;
  for (const Element& e : doc) {
    for (const char* key :
         {"x", "y", "x1", "y1", "x2", "y2", "cx", "cy", "r", "width", "height", "points"}) {
      if (!e.attributes.contains(key)) continue;
      for (double v : numbers_in(e.attr(key))) {
        EXPECT_TRUE(std::isfinite(v)) << e.name << " " << key << "=" << e.attr(key);
      }
    }
  }
  return doc;
}

std::vector<std::string> texts(const std::vector<const Element*>& elements) {
  std::vector<std::string> out;
  for (const Element* e : elements) out.push_back(e->text);
  return out;
}

// Texts of the <text> elements inside legend entries, in order.
std::vector<std::string> legend_names(const std::vector<Element>& doc) {
  std::vector<std::string> out;
  for (const Element& e : doc) {
    if (e.name == "text" && inside(doc, e, "legend-entry")) out.push_back(e.text);
  }
  return out;
}

LinePlot three_series_plot() {
  LinePlot plot;
  plot.title = "Throughput vs batch size";
  plot.x_label = "batch size";
  plot.y_label = "tokens / s";
  plot.log_x = true;
  const std::vector<double> batches = {1, 2, 4, 8, 16, 32, 64};
  const std::vector<std::pair<std::string, double>> optimizers = {
      {"AdamW fp32", 1.0}, {"AdamW 8-bit", 0.93}, {"Lion 4-bit", 0.88}};
  for (std::size_t k = 0; k < optimizers.size(); ++k) {
    Series s;
    s.name = optimizers[k].first;
    for (double b : batches) {
      const double y = optimizers[k].second * 40000.0 * b / (b + 6.0);
      s.points.push_back({b, y});
      if (k != 2) s.band.push_back({y * 0.95, y * 1.05});
    }
    plot.series.push_back(s);
  }
  return plot;
}

// ---- The checker itself ----------------------------------------------------------------------

TEST(BenchSvgXmlReader, AcceptsWellFormedAndRejectsMalformed) {
  const auto doc =
      parse_xml("<?xml version=\"1.0\"?>\n<a x=\"1\" y='&lt;2&gt;'><!-- c --><b/>t &amp; u</a>\n");
  ASSERT_EQ(doc.size(), 2u);
  EXPECT_EQ(doc[0].attr("y"), "<2>");
  EXPECT_EQ(doc[0].text, "t & u");
  for (const char* bad :
       {"<a><b></a></b>", "<a x=1/>", "<a>x < y</a>", "<a>AT&T</a>", "<a x=\"1\"x=\"2\"/>",
        "<a x=\"1\" x=\"2\"/>", "<a>", "<a/><b/>", "<a x=\"<\"/>", "<a>&bogus;</a>", "text"}) {
    EXPECT_THROW(parse_xml(bad), std::runtime_error) << bad;
  }
}

// ---- Line plots ------------------------------------------------------------------------------

TEST(BenchSvg, LinePlotHasOneLinePerSeriesBandsAndLegend) {
  const LinePlot plot = three_series_plot();
  const std::string svg = render_svg(plot);
  const auto doc = check_document(svg);
  ASSERT_FALSE(doc.empty());
  EXPECT_EQ(doc.front().attr("width"), "800");
  EXPECT_EQ(doc.front().attr("height"), "480");
  EXPECT_EQ(find(doc, "polyline", "line").size(), 3u);
  EXPECT_EQ(find(doc, "polyline").size(), 3u);
  EXPECT_EQ(find(doc, "polygon", "band").size(), 2u);
  EXPECT_EQ(find(doc, "circle", "marker").size(), 21u);
  EXPECT_EQ(legend_names(doc),
            (std::vector<std::string>{"AdamW fp32", "AdamW 8-bit", "Lion 4-bit"}));
  EXPECT_EQ(find(doc, "title").front()->text, plot.title);
  const auto labels = texts(find(doc, "text", "axis-label"));
  EXPECT_EQ(labels, (std::vector<std::string>{"batch size", "tokens / s"}));

  // Series take palette colours in order; each line has its series' points.
  const auto lines = find(doc, "polyline", "line");
  for (std::size_t i = 0; i < lines.size(); ++i) {
    EXPECT_EQ(lines[i]->attr("stroke"), palette_colour(i));
    EXPECT_EQ(numbers_in(lines[i]->attr("points")).size(), 14u);
  }
  // A band polygon runs along the upper edge and back along the lower one: 2 x 7 vertices.
  for (const Element* band : find(doc, "polygon", "band")) {
    EXPECT_EQ(numbers_in(band->attr("points")).size(), 28u);
    EXPECT_EQ(band->attr("fill-opacity"), "0.2");
  }
}

TEST(BenchSvg, LinePlotPointsLieInsideFrameAndLogAxisIsEvenlySpaced) {
  LinePlot plot;
  plot.log_x = true;
  plot.series.push_back({"s", {{1, 1}, {10, 2}, {100, 3}, {1000, 4}}, {}});
  const auto doc = check_document(render_svg(plot));
  const Element& frame = *find(doc, "rect", "frame").at(0);
  const double left = std::stod(frame.attr("x")), top = std::stod(frame.attr("y"));
  const double right = left + std::stod(frame.attr("width")),
               bottom = top + std::stod(frame.attr("height"));
  const std::vector<double> xy = numbers_in(find(doc, "polyline", "line").at(0)->attr("points"));
  ASSERT_EQ(xy.size(), 8u);
  for (std::size_t i = 0; i < xy.size(); i += 2) {
    EXPECT_GE(xy[i], left - 0.01);
    EXPECT_LE(xy[i], right + 0.01);
    EXPECT_GE(xy[i + 1], top - 0.01);
    EXPECT_LE(xy[i + 1], bottom + 0.01);
  }
  // Decades are equally far apart; y grows upwards.
  EXPECT_NEAR(xy[2] - xy[0], xy[4] - xy[2], 0.02);
  EXPECT_NEAR(xy[4] - xy[2], xy[6] - xy[4], 0.02);
  EXPECT_GT(xy[1], xy[3]);
  EXPECT_GT(xy[5], xy[7]);
}

TEST(BenchSvg, EscapesEveryText) {
  LinePlot plot;
  plot.title = "loss \"fp32\" vs '8-bit' <&>";
  plot.x_label = "x < 1 & y > 2";
  plot.series.push_back({"a<b & c", {{0, 1}, {1, 2}}, {}});
  plot.series.push_back({std::string("bad\x01utf8\xff"), {{0, 2}, {1, 3}}, {}});
  const std::string svg = render_svg(plot);
  EXPECT_NE(svg.find("a&lt;b &amp; c"), std::string::npos);
  EXPECT_EQ(svg.find("a<b"), std::string::npos);
  const auto doc = check_document(svg);
  ASSERT_FALSE(doc.empty());
  const auto names = legend_names(doc);
  ASSERT_EQ(names.size(), 2u);
  EXPECT_EQ(names[0], "a<b & c");
  EXPECT_EQ(names[1], "bad\xEF\xBF\xBDutf8\xEF\xBF\xBD");
  EXPECT_EQ(find(doc, "title").front()->text, plot.title);
  EXPECT_EQ(find(doc, "text", "title").front()->text, plot.title);

  EXPECT_EQ(xml_escape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&apos;&amp;&apos;&lt;/a&gt;");
  EXPECT_EQ(xml_escape("\xC3\xA9t\xC3\xA9 \xE2\x86\x92 \xF0\x9F\x98\x80"),
            "\xC3\xA9t\xC3\xA9 \xE2\x86\x92 \xF0\x9F\x98\x80");                   // kept as is
  EXPECT_EQ(xml_escape("\xC0\xAF"), "\xEF\xBF\xBD\xEF\xBF\xBD");                  // overlong '/'
  EXPECT_EQ(xml_escape("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate
  EXPECT_EQ(xml_escape("\xE2\x82"), "\xEF\xBF\xBD\xEF\xBF\xBD");                  // truncated
  EXPECT_EQ(xml_escape("tab\tnl\n"), "tab\tnl\n");
}

TEST(BenchSvg, GapsSplitLinesAndBands) {
  LinePlot plot;
  Series s;
  s.name = "with gap";
  s.points = {{1, 1}, {2, 2}, {3, kNaN}, {4, 3}, {5, 4}, {6, 5}};
  s.band = {{0, 2}, {1, 3}, {2, 4}, {kInf, 5}, {3, 5}, {4, 6}};
  plot.series.push_back(s);
  plot.series.push_back({"isolated", {{1, 3}, {2, kNaN}, {3, 3.5}}, {}});
  const auto doc = check_document(render_svg(plot));
  const auto lines = find(doc, "polyline", "line");
  ASSERT_EQ(lines.size(), 2u);  // both from the first series; the second has no two neighbours
  EXPECT_EQ(numbers_in(lines[0]->attr("points")).size(), 4u);
  EXPECT_EQ(numbers_in(lines[1]->attr("points")).size(), 6u);
  EXPECT_EQ(find(doc, "polygon", "band").size(), 2u);
  EXPECT_EQ(find(doc, "circle", "marker").size(), 7u);  // 5 + 2 isolated points
}

TEST(BenchSvg, LongSeriesMarkOnlyIsolatedPoints) {
  Series s;
  s.name = "long";
  for (int i = 0; i < 40; ++i) s.points.push_back({static_cast<double>(i), std::sin(i * 0.3)});
  s.points[37].y = kNaN;  // point 38 stands alone before 39
  s.points[39].y = kNaN;
  LinePlot plot;
  plot.series.push_back(s);
  const auto doc = check_document(render_svg(plot));
  EXPECT_EQ(find(doc, "polyline", "line").size(), 1u);
  const auto markers = find(doc, "circle", "marker");
  ASSERT_EQ(markers.size(), 1u);
  const auto line = numbers_in(find(doc, "polyline", "line").at(0)->attr("points"));
  EXPECT_GT(std::stod(markers[0]->attr("cx")), line[line.size() - 2]);
}

TEST(BenchSvg, LogAxisLeavesOutNonPositiveX) {
  LinePlot plot;
  plot.log_x = true;
  plot.series.push_back({"s", {{0, 1}, {-1, 1}, {2, 2}, {4, 3}}, {}});
  const auto doc = check_document(render_svg(plot));
  const auto lines = find(doc, "polyline", "line");
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(numbers_in(lines[0]->attr("points")).size(), 4u);
}

TEST(BenchSvg, DegenerateLinePlotsRenderFiniteNumbers) {
  std::vector<LinePlot> plots(7);
  plots[1].series.push_back({"empty", {}, {}});
  plots[2].series.push_back({"one point", {{3, 7}}, {{6, 8}}});
  plots[3].series.push_back({"flat", {{1, 5}, {2, 5}, {3, 5}}, {{5, 5}, {5, 5}, {5, 5}}});
  plots[4].series.push_back({"zeros", {{0, 0}, {0, 0}}, {}});
  plots[5].log_x = true;
  plots[5].series.push_back({"one point log", {{64, 1e-9}}, {}});
  plots[6].series.push_back({"all unusable", {{kNaN, kNaN}, {kInf, 1}}, {}});
  plots[6].y_includes_zero = true;
  for (std::size_t i = 0; i < plots.size(); ++i) {
    SCOPED_TRACE("plot " + std::to_string(i));
    const auto doc = check_document(render_svg(plots[i]));
    ASSERT_FALSE(doc.empty());
    const bool has_data = i != 0 && i != 1 && i != 6;
    EXPECT_EQ(find(doc, "text", "no-data").size(), has_data ? 0u : 1u);
    EXPECT_GE(find(doc, "text").size(), 4u);  // at least two ticks on each axis
  }
  EXPECT_EQ(find(check_document(render_svg(plots[2])), "circle", "marker").size(), 1u);
  EXPECT_EQ(find(check_document(render_svg(plots[2])), "polyline").size(), 0u);
  EXPECT_EQ(find(check_document(render_svg(plots[3])), "polyline").size(), 1u);
}

TEST(BenchSvg, ManySeriesCycleColoursAndDash) {
  LinePlot plot;
  for (int i = 0; i < 10; ++i) {
    plot.series.push_back(
        {std::string(1, static_cast<char>('a' + i)), {{0, 0.0 + i}, {1, 1.0 + i}}, {}});
  }
  const auto doc = check_document(render_svg(plot));
  const auto lines = find(doc, "polyline", "line");
  ASSERT_EQ(lines.size(), 10u);
  EXPECT_EQ(lines[8]->attr("stroke"), lines[0]->attr("stroke"));
  EXPECT_TRUE(lines[0]->attr("stroke-dasharray").empty());
  EXPECT_FALSE(lines[8]->attr("stroke-dasharray").empty());
  EXPECT_EQ(legend_names(doc).size(), 10u);
  std::vector<std::string_view> colours;
  for (std::size_t i = 0; i < kPaletteSize; ++i) colours.push_back(palette_colour(i));
  std::sort(colours.begin(), colours.end());
  EXPECT_EQ(std::unique(colours.begin(), colours.end()), colours.end());
}

TEST(BenchSvg, LinePlotRejectsBadInput) {
  LinePlot plot;
  plot.series.push_back({"mismatch", {{0, 0}, {1, 1}}, {{0, 1}}});
  try {
    render_svg(plot);
    ADD_FAILURE() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("mismatch"), std::string::npos) << e.what();
  }
  LinePlot small;
  small.width = 50;
  EXPECT_THROW(render_svg(small), InvalidArgument);
}

// ---- Ticks -----------------------------------------------------------------------------------

bool is_one_two_five(double step) {
  const double mantissa = step / std::pow(10.0, std::floor(std::log10(step) + 1e-9));
  return std::fabs(mantissa - 1) < 1e-9 || std::fabs(mantissa - 2) < 1e-9 ||
         std::fabs(mantissa - 5) < 1e-9;
}

TEST(BenchSvgTicks, NiceLinearTicks) {
  AxisTicks t = nice_ticks(0.0, 9.3);
  EXPECT_DOUBLE_EQ(t.step, 2.0);
  EXPECT_EQ(t.values, (std::vector<double>{0, 2, 4, 6, 8, 10}));
  t = nice_ticks(0.013, 0.047);
  EXPECT_DOUBLE_EQ(t.step, 0.005);
  EXPECT_NEAR(t.lo, 0.01, 1e-15);
  EXPECT_NEAR(t.hi, 0.05, 1e-15);
  EXPECT_EQ(t.values.size(), 9u);
  t = nice_ticks(0.0, 60000.0);
  EXPECT_DOUBLE_EQ(t.step, 10000.0);
  EXPECT_EQ(t.values.size(), 7u);
  t = nice_ticks(-3.0, 12.0);
  EXPECT_DOUBLE_EQ(t.step, 5.0);
  EXPECT_EQ(t.values, (std::vector<double>{-5, 0, 5, 10, 15}));
  EXPECT_FALSE(std::signbit(nice_ticks(-1.0, 0.0).hi));

  for (double lo : {-1234.5, -0.3, 0.0, 1e-7, 3.0, 98765.0}) {
    for (double span : {1e-6, 0.07, 1.0, 33.0, 4.5e6}) {
      const AxisTicks r = nice_ticks(lo, lo + span);
      EXPECT_TRUE(is_one_two_five(r.step)) << lo << " " << span << " step " << r.step;
      // Bounds may differ from the data by rounding of step multiples, never by more.
      EXPECT_LE(r.lo, lo + 1e-12 * std::fabs(lo));
      EXPECT_GE(r.hi, (lo + span) - 1e-12 * std::fabs(lo + span));
      EXPECT_GE(r.values.size(), 3u);
      EXPECT_LE(r.values.size(), 12u);
    }
  }
  for (auto [lo, hi] : {std::pair{5.0, 5.0}, {0.0, 0.0}, {-2.0, -2.0}, {kNaN, 1.0}, {1.0, kInf}}) {
    const AxisTicks r = nice_ticks(lo, hi);
    EXPECT_LT(r.lo, r.hi);
    EXPECT_GE(r.values.size(), 2u);
    if (std::isfinite(lo) && std::isfinite(hi)) {
      EXPECT_LE(r.lo, lo);
      EXPECT_GE(r.hi, hi);
    }
  }
}

TEST(BenchSvgTicks, LogTicks) {
  AxisTicks t = log_ticks(1.0, 512.0);
  EXPECT_EQ(t.values, (std::vector<double>{1, 2, 5, 10, 20, 50, 100, 200, 500, 1000}));
  t = log_ticks(3.0, 40.0);
  EXPECT_EQ(t.values, (std::vector<double>{2, 5, 10, 20, 50}));
  t = log_ticks(1e-3, 1e6);
  EXPECT_EQ(t.values, (std::vector<double>{1e-3, 1e-1, 1e1, 1e3, 1e5, 1e7}));
  t = log_ticks(100.0, 100.0);
  EXPECT_LT(t.lo, 100.0);
  EXPECT_GT(t.hi, 100.0);
  t = log_ticks(0.0, -1.0);
  EXPECT_GT(t.lo, 0.0);
  EXPECT_LT(t.lo, t.hi);
}

TEST(BenchSvgTicks, TickLabels) {
  EXPECT_EQ(format_tick(0.4, 0.2), "0.4");
  EXPECT_EQ(format_tick(0.05, 0.01), "0.05");
  EXPECT_EQ(format_tick(1500, 500), "1500");
  EXPECT_EQ(format_tick(-10, 5), "-10");
  EXPECT_EQ(format_tick(2.5e6, 5e5), "2.5e+06");
  EXPECT_EQ(format_tick(2e6, 5e5), "2e+06");
  EXPECT_EQ(format_tick(5e-5, 5e-5), "5e-05");
  EXPECT_EQ(format_tick(-0.0, 1), "0");
  EXPECT_EQ(format_tick(1e-17, 0.2), "0");
  EXPECT_EQ(format_tick(kNaN, 1), "0");
}

// ---- Bar charts ------------------------------------------------------------------------------

BarChart memory_chart() {
  BarChart chart;
  chart.title = "Peak memory";
  chart.value_label = "MiB";
  chart.categories = {"AdamW fp32", "AdamW 8-bit", "SGD"};
  chart.segment_names = {"params", "grads", "optimizer state", "activations"};
  chart.values = {{100, 100, 200, 300}, {100, 100, 50, 300}, {100, 100, 0, 300}};
  return chart;
}

TEST(BenchSvg, StackedBarsHaveSegmentsLegendAndProportionalHeights) {
  const BarChart chart = memory_chart();
  const auto doc = check_document(render_svg(chart));
  ASSERT_FALSE(doc.empty());
  EXPECT_EQ(find(doc, "g", "bar").size(), 3u);
  const auto segments = find(doc, "rect", "segment");
  ASSERT_EQ(segments.size(), 11u);  // the zero-sized optimizer state of SGD is not drawn
  EXPECT_EQ(legend_names(doc),
            (std::vector<std::string>{"activations", "optimizer state", "grads", "params"}));
  EXPECT_EQ(texts(find(doc, "text", "category")), chart.categories);
  EXPECT_EQ(texts(find(doc, "text", "total")), (std::vector<std::string>{"700", "550", "500"}));
  // Within the first bar: heights proportional to values, stacked without gaps from the bottom.
  double previous_top = -1.0;
  for (int j = 0; j < 4; ++j) {
    const Element& r = *segments[j];
    EXPECT_EQ(r.attr("fill"), palette_colour(j));
    EXPECT_NEAR(std::stod(r.attr("height")) / std::stod(segments[0]->attr("height")),
                chart.values[0][j] / chart.values[0][0], 1e-3);
    if (previous_top >= 0) {
      EXPECT_NEAR(std::stod(r.attr("y")) + std::stod(r.attr("height")), previous_top, 0.02);
    }
    previous_top = std::stod(r.attr("y"));
  }
  const Element& frame = *find(doc, "rect", "frame").at(0);
  EXPECT_NEAR(std::stod(segments[0]->attr("y")) + std::stod(segments[0]->attr("height")),
              std::stod(frame.attr("y")) + std::stod(frame.attr("height")), 0.02);
  // Every segment carries a tooltip naming it.
  EXPECT_EQ(find(doc, "title").size(), 1u + 11u);
}

TEST(BenchSvg, BarChartEscapesAndRotatesLongLabels) {
  BarChart chart = memory_chart();
  chart.categories = {"Adam <fp32> & friends with a very long name", "b", "c"};
  chart.segment_names[0] = "params \"weights\"";
  const std::string svg = render_svg(chart);
  const auto doc = check_document(svg);
  ASSERT_FALSE(doc.empty());
  EXPECT_EQ(find(doc, "text", "category").front()->text, chart.categories[0]);
  EXPECT_NE(find(doc, "text", "category").front()->attr("transform").find("rotate"),
            std::string::npos);
  EXPECT_NE(svg.find("params &quot;weights&quot;"), std::string::npos);
}

TEST(BenchSvg, DegenerateBarCharts) {
  BarChart empty;
  auto doc = check_document(render_svg(empty));
  EXPECT_EQ(find(doc, "g", "bar").size(), 0u);
  EXPECT_EQ(find(doc, "text", "no-data").size(), 1u);

  BarChart zeros = memory_chart();
  for (auto& row : zeros.values) std::fill(row.begin(), row.end(), 0.0);
  doc = check_document(render_svg(zeros));
  EXPECT_EQ(find(doc, "g", "bar").size(), 3u);
  EXPECT_EQ(find(doc, "rect", "segment").size(), 0u);

  BarChart one;
  one.categories = {"only"};
  one.segment_names = {"x"};
  one.values = {{42}};
  doc = check_document(render_svg(one));
  EXPECT_EQ(find(doc, "rect", "segment").size(), 1u);
}

TEST(BenchSvg, BarChartRejectsBadValues) {
  BarChart rows = memory_chart();
  rows.values.pop_back();
  EXPECT_THROW(render_svg(rows), InvalidArgument);
  BarChart columns = memory_chart();
  columns.values[1].push_back(1.0);
  EXPECT_THROW(render_svg(columns), InvalidArgument);
  for (double bad : {-1.0, kNaN, kInf}) {
    BarChart chart = memory_chart();
    chart.values[2][1] = bad;
    try {
      render_svg(chart);
      ADD_FAILURE() << "expected InvalidArgument for " << bad;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("'grads' in category 'SGD'"), std::string::npos)
          << e.what();
    }
  }
}

// ---- Saving ----------------------------------------------------------------------------------

class BenchSvgSave : public ::testing::Test {
 protected:
  std::size_t entries() const {
    return static_cast<std::size_t>(std::distance(std::filesystem::directory_iterator(dir_), {}));
  }
  const test::TempDir temp_;
  const std::filesystem::path dir_ = temp_.path();
};

TEST_F(BenchSvgSave, WritesAndReplacesAtomically) {
  const std::filesystem::path path = dir_ / "plot.svg";
  const std::string first = render_svg(three_series_plot());
  save_svg(path, first);
  EXPECT_EQ(test::read_text(path), first);
  const std::string second = render_svg(memory_chart());
  save_svg(path, second);
  EXPECT_EQ(test::read_text(path), second);
  EXPECT_EQ(entries(), 1u);  // no temporary left behind
}

TEST_F(BenchSvgSave, FailureNamesThePath) {
  const std::filesystem::path missing = dir_ / "no-such-dir" / "plot.svg";
  try {
    save_svg(missing, "<svg/>");
    ADD_FAILURE() << "expected IoError";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find(missing.string()), std::string::npos) << e.what();
  }
  // A directory in the way: the temporary is written, the rename fails, and it is cleaned up.
  const std::filesystem::path occupied = dir_ / "occupied.svg";
  std::filesystem::create_directories(occupied / "child");
  EXPECT_THROW(save_svg(occupied, "<svg/>"), IoError);
  EXPECT_EQ(entries(), 1u);
}

}  // namespace
}  // namespace nibble::bench
