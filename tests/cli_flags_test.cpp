// Every numeric flag of every subcommand refuses NaN, infinities and values outside its range
// while the command line is parsed, with the flag and the value in the message. The flags are
// found by walking the app that main() builds, so a new numeric flag without a check fails here.
#include <gtest/gtest.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <regex>
#include <string>
#include <vector>

#include "cli/commands.hpp"
#include "cli/flags.hpp"

namespace nibble::cli {
namespace {

struct Flag {
  std::string command, name, type, range;
};

std::unique_ptr<CLI::App> make_app() {
  auto app = std::make_unique<CLI::App>("nibble", "nibble");
  app->require_subcommand(1);
  add_commands(*app);
  // Parse only: a flag that wrongly passes must not start a training run.
  for (CLI::App* sub : app->get_subcommands({})) sub->callback(std::function<void()>());
  return app;
}

std::vector<Flag> numeric_flags() {
  std::vector<Flag> out;
  const auto app = make_app();
  for (CLI::App* sub : app->get_subcommands({})) {
    for (const CLI::Option* o : sub->get_options()) {
      const std::string full = o->get_type_name();
      const std::string type = full.substr(0, full.find(':'));
      if (type != "INT" && type != "UINT" && type != "FLOAT" && type != "NUMBER") continue;
      std::string range;
      try {
        range = const_cast<CLI::Option*>(o)->get_validator(kNumberCheck)->get_description();
      } catch (const CLI::OptionNotFound&) {
      }
      out.push_back({sub->get_name(), o->get_name(), type, range});
    }
  }
  return out;
}

// What parsing `nibble <command> <flag> <value>` says about that flag: empty when it accepts.
std::string parse_error(const Flag& f, const std::string& value) {
  auto app = make_app();
  std::vector<std::string> args = {value, f.name, f.command};  // CLI11 takes them reversed
  try {
    app->parse(args);
  } catch (const CLI::ValidationError& e) {
    return e.what();
  } catch (const CLI::ConversionError& e) {
    return e.what();
  } catch (const CLI::ParseError&) {
    // Another flag's requirement (a required --checkpoint-dir): this flag's value was accepted.
  }
  return "";
}

// Probes from the check's description: values just outside its range, and one inside.
struct Probes {
  std::vector<double> outside;
  std::optional<double> inside;
};

Probes probes_for(const std::string& range) {
  static const std::regex kAtLeast(R"(^(>=|>) (-?[0-9.e+]+)$)");
  static const std::regex kInterval(R"(^in ([\[(])(-?[0-9.e+]+), (-?[0-9.e+]+)([\])])$)");
  std::smatch m;
  Probes p;
  if (std::regex_match(range, m, kAtLeast)) {
    const double low = std::stod(m[2]);
    p.outside = {low - 1.0};
    if (m[1] == ">") p.outside.push_back(low);
    p.inside = m[1] == ">" ? low + 1.0 : low;
  } else if (std::regex_match(range, m, kInterval)) {
    const double low = std::stod(m[2]), high = std::stod(m[3]);
    p.outside = {low - 1.0, high + 1.0};
    if (m[1] == "(") p.outside.push_back(low);
    if (m[4] == ")") p.outside.push_back(high);
    p.inside = m[1] == "(" ? (low + high) / 2.0 : low;
  }
  return p;
}

std::string text(double v) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "%.17g", v);
  return buffer;
}

TEST(CliFlags, TheWalkFindsTheFlagsItShould) {
  std::vector<std::string> seen;
  for (const Flag& f : numeric_flags()) seen.push_back(f.command + " " + f.name);
  for (const char* expected : {"train --lr", "train --threads", "train --steps", "train --beta2", "sample --temperature",
                               "step-bench --threads", "step-bench --max-grad-norm", "bench --lr", "bench --threads",
                               "optimizers --block-size"})
    EXPECT_NE(std::find(seen.begin(), seen.end(), expected), seen.end()) << expected;
  EXPECT_GE(seen.size(), 45u);
}

TEST(CliFlags, EveryNumericFlagHasARangeCheck) {
  for (const Flag& f : numeric_flags())
    EXPECT_FALSE(f.range.empty()) << "nibble " << f.command << " " << f.name << " (" << f.type
                                  << ") has no range check from cli/flags.hpp";
}

TEST(CliFlags, EveryNumericFlagRefusesNonFiniteValuesNamingFlagAndValue) {
  for (const Flag& f : numeric_flags()) {
    for (const char* bad : {"nan", "inf", "-inf", "1e999", "1e39", "twelve", ""}) {
      const std::string error = parse_error(f, bad);
      EXPECT_NE(error.find(f.name), std::string::npos)
          << "nibble " << f.command << " " << f.name << " '" << bad << "': " << (error.empty() ? "accepted" : error);
      if (*bad != '\0') {
        EXPECT_NE(error.find(bad), std::string::npos) << error;
      }
    }
  }
}

TEST(CliFlags, EveryNumericFlagRefusesValuesOutsideItsRangeAndTakesOneInside) {
  for (const Flag& f : numeric_flags()) {
    const Probes p = probes_for(f.range);
    ASSERT_FALSE(p.outside.empty()) << f.command << " " << f.name << ": unreadable range '" << f.range << "'";
    for (double v : p.outside) {
      const std::string error = parse_error(f, text(v));
      EXPECT_NE(error.find(f.name), std::string::npos)
          << "nibble " << f.command << " " << f.name << " " << text(v) << " (range " << f.range << ") was accepted";
    }
    if (f.type != "FLOAT" && p.inside && *p.inside != std::floor(*p.inside)) continue;
    EXPECT_EQ(parse_error(f, text(*p.inside)), "") << "nibble " << f.command << " " << f.name << " " << text(*p.inside);
  }
}

TEST(CliFlags, TheIssuesExamples) {
  EXPECT_NE(parse_error({"train", "--lr", "FLOAT", ""}, "nan").find("--lr: nan is not a finite number"),
            std::string::npos);
  EXPECT_NE(parse_error({"train", "--threads", "INT", ""}, "-3").find("--threads: -3 is not in [0, 4096]"),
            std::string::npos);
}

TEST(CliFlags, NumberChecksReadTheWholeText) {
  const CLI::Validator v = positive();
  EXPECT_EQ(v("2.5"), "");
  EXPECT_EQ(v("1e-3"), "");
  EXPECT_NE(v("2.5x"), "");
  EXPECT_NE(v("0x"), "");
  EXPECT_NE(v("0"), "");
  EXPECT_NE(v("-0.5"), "");
  EXPECT_NE(number_in(0, false, 1, true)("1"), "");
  EXPECT_EQ(number_in(0, false, 1, true)("0.999"), "");
}

}  // namespace
}  // namespace nibble::cli
