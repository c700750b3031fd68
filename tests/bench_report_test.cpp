// nibble bench reports against hand-written expected text: CSV quoting, empty cells and special
// reals, CSV and JSON round trips for every cell type, the readers' refusals, atomic report files,
// and the plain-text helpers (tables, grouped digits, byte sizes read and written).
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "bench/report.hpp"
#include "nibble/error.hpp"

#include "test_util.hpp"

namespace nibble::bench {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using test::read_text;
using test::TempDir;
using test::thrown_message;
using test::write_file;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr std::int64_t kInt64Max = std::numeric_limits<std::int64_t>::max();
constexpr std::int64_t kInt64Min = std::numeric_limits<std::int64_t>::min();

// Cells compare by type and exact bits, so NaN equals NaN and -0.0 differs from 0.0.
bool same_cell(const Cell& a, const Cell& b) {
  if (a.index() != b.index()) return false;
  if (const auto* x = std::get_if<double>(&a)) {
    const double y = std::get<double>(b);
    if (std::isnan(*x)) return std::isnan(y);
    return std::bit_cast<std::uint64_t>(*x) == std::bit_cast<std::uint64_t>(y);
  }
  return a == b;
}

void expect_same_table(const Table& actual, const Table& expected) {
  EXPECT_EQ(actual.name, expected.name);
  ASSERT_EQ(actual.columns.size(), expected.columns.size());
  for (std::size_t c = 0; c < expected.columns.size(); ++c) {
    EXPECT_EQ(actual.columns[c].name, expected.columns[c].name);
    EXPECT_EQ(actual.columns[c].type, expected.columns[c].type);
    EXPECT_EQ(actual.columns[c].unit, expected.columns[c].unit);
  }
  ASSERT_EQ(actual.rows.size(), expected.rows.size());
  for (std::size_t r = 0; r < expected.rows.size(); ++r) {
    ASSERT_EQ(actual.rows[r].size(), expected.rows[r].size()) << "row " << r;
    for (std::size_t c = 0; c < expected.rows[r].size(); ++c) {
      EXPECT_TRUE(same_cell(actual.rows[r][c], expected.rows[r][c]))
          << "row " << r << ", column " << c;
    }
  }
}

std::vector<Column> text_columns(std::initializer_list<const char*> names) {
  std::vector<Column> columns;
  for (const char* name : names) columns.push_back({name, ColumnType::kText, ""});
  return columns;
}

// One column of every type, and rows that hit every corner of each.
Table every_type_table() {
  Table table{"runs",
              {{"batch", ColumnType::kInt, ""},
               {"tokens_per_s", ColumnType::kReal, "tokens/s"},
               {"optimizer", ColumnType::kText, ""},
               {"oom", ColumnType::kBool, ""}},
              {}};
  table.add_row({std::int64_t{8}, 12345.678, std::string("adamw"), false});
  table.add_row({std::int64_t{16}, std::monostate{}, std::string(""), true});
  table.add_row({std::monostate{}, kNaN, std::monostate{}, std::monostate{}});
  table.add_row({kInt64Max, kInf, std::string("a,b \"q\"\nnext\r\nline"), false});
  table.add_row({kInt64Min, -kInf, std::string(" spaced "), true});
  table.add_row({std::int64_t{0}, -0.0, std::string("nan"), false});
  table.add_row(
      {std::int64_t{-1}, std::numeric_limits<double>::denorm_min(), std::string("\""), true});
  table.add_row({std::int64_t{3}, std::numeric_limits<double>::max(), std::string("true"), false});
  table.add_row({std::int64_t{4}, 0.1 + 0.2, std::string("ünïcödé"), true});
  table.add_row({std::int64_t{5}, std::int64_t{7}, std::string(","), false});
  return table;
}

Report every_type_report() {
  Report report;
  report.suite = "batch-sweep";
  report.environment = {{"device", "NVIDIA H100 80GB HBM3"},
                        {"driver", "550.54.15"},
                        {"threads", 16},
                        {"flags", {"-O3", "-march=native"}}};
  report.options = {
      {"seed", 1234}, {"batches", {1, 2, 4}}, {"lr", 3e-4}, {"warmup", {{"steps", 3}}}};
  report.tables.push_back(every_type_table());
  Table steps{"steps", {{"step", ColumnType::kInt, ""}, {"ms", ColumnType::kReal, "ms"}}, {}};
  steps.add_row({std::int64_t{1}, 2.5});
  steps.add_row({std::int64_t{2}, std::monostate{}});
  report.tables.push_back(steps);
  return report;
}

std::vector<std::string> names_in(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir))
    names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

// ---- CSV ---------------------------------------------------------------------------------------

TEST(BenchReport, CsvQuotesCommaQuoteAndLineBreaks) {
  Table table{"notes", text_columns({"key", "note"}), {}};
  table.add_row({std::string("comma"), std::string("a,b")});
  table.add_row({std::string("quote"), std::string("say \"hi\"")});
  table.add_row({std::string("newline"), std::string("two\nlines")});
  table.add_row({std::string("cr"), std::string("x\ry")});
  table.add_row({std::string("plain"), std::string("no quotes needed")});
  EXPECT_EQ(to_csv(table),
            "key,note\n"
            "comma,\"a,b\"\n"
            "quote,\"say \"\"hi\"\"\"\n"
            "newline,\"two\nlines\"\n"
            "cr,\"x\ry\"\n"
            "plain,no quotes needed\n");
}

TEST(BenchReport, CsvWritesEmptyCellsSpecialRealsAndBools) {
  Table table{"t",
              {{"id", ColumnType::kInt, ""},
               {"loss", ColumnType::kReal, ""},
               {"ok", ColumnType::kBool, ""},
               {"label", ColumnType::kText, ""}},
              {}};
  table.add_row({std::int64_t{1}, 0.1, true, std::string("x")});
  table.add_row({std::monostate{}, kNaN, false, std::string("")});
  table.add_row({std::int64_t{-3}, kInf, std::monostate{}, std::monostate{}});
  table.add_row({std::int64_t{4}, -kInf, std::monostate{}, std::string("y")});
  EXPECT_EQ(to_csv(table),
            "id,loss,ok,label\n"
            "1,0.1,true,x\n"
            ",nan,false,\"\"\n"
            "-3,inf,,\n"
            "4,-inf,,y\n");
}

TEST(BenchReport, CsvIntAndRealColumns) {
  Table table{"t", {{"count", ColumnType::kInt, ""}, {"value", ColumnType::kReal, ""}}, {}};
  table.add_row({std::int64_t{10'000'000'000}, std::int64_t{2}});
  table.add_row({std::int64_t{-7}, 1e20});
  table.add_row({std::int64_t{0}, 0.1 + 0.2});
  table.add_row({std::int64_t{1}, 1.5e-7});
  // An integer in a real column is stored as a real.
  ASSERT_TRUE(std::holds_alternative<double>(table.rows[0][1]));
  EXPECT_EQ(std::get<double>(table.rows[0][1]), 2.0);
  EXPECT_TRUE(std::holds_alternative<std::int64_t>(table.rows[0][0]));
  EXPECT_EQ(to_csv(table),
            "count,value\n"
            "10000000000,2\n"
            "-7,1e+20\n"
            "0,0.30000000000000004\n"
            "1,1.5e-07\n");
}

TEST(BenchReport, CsvRoundTripKeepsEveryType) {
  const Table table = every_type_table();
  const std::string csv = to_csv(table);
  expect_same_table(table_from_csv(csv, table.name, table.columns), table);
}

TEST(BenchReport, CsvReadsCrLfAndNoFinalLineBreak) {
  const std::vector<Column> columns = {{"n", ColumnType::kInt, ""}, {"s", ColumnType::kText, ""}};
  const Table table = table_from_csv("n,s\r\n1,\"a\r\nb\"\r\n2,c", "t", columns);
  ASSERT_EQ(table.rows.size(), 2u);
  EXPECT_TRUE(same_cell(table.rows[0][0], Cell{std::int64_t{1}}));
  EXPECT_TRUE(same_cell(table.rows[0][1], Cell{std::string("a\r\nb")}));
  EXPECT_TRUE(same_cell(table.rows[1][0], Cell{std::int64_t{2}}));
  EXPECT_TRUE(same_cell(table.rows[1][1], Cell{std::string("c")}));
}

TEST(BenchReport, CsvSingleColumnOfEmptyCellsRoundTrips) {
  Table table{"t", {{"x", ColumnType::kReal, ""}}, {}};
  table.add_row({std::monostate{}});
  table.add_row({1.0});
  table.add_row({std::monostate{}});
  EXPECT_EQ(to_csv(table), "x\n\n1\n\n");
  expect_same_table(table_from_csv(to_csv(table), "t", table.columns), table);
}

TEST(BenchReport, CsvMalformedThrowsFormatErrorNamingTheLine) {
  const std::vector<Column> int_text = {{"n", ColumnType::kInt, ""}, {"s", ColumnType::kText, ""}};
  auto error = [&](std::string_view csv, const std::vector<Column>& columns) {
    return thrown_message<FormatError>([&] { table_from_csv(csv, "runs", columns); });
  };

  std::string message = error("n,s\n1,a\n2,\"unterminated\n3,b\n", int_text);
  EXPECT_NE(message.find("line 3"), std::string::npos) << message;
  EXPECT_NE(message.find("not terminated"), std::string::npos) << message;
  EXPECT_NE(message.find("'runs'"), std::string::npos) << message;

  message = error("n,s\n1,a\n2\n", int_text);
  EXPECT_NE(message.find("line 3"), std::string::npos) << message;
  EXPECT_NE(message.find("CSV table 'runs' line 3: 1 fields, the header has 2"), std::string::npos)
      << message;
  EXPECT_NE(message.find("1 fields"), std::string::npos) << message;

  message = error("n,s\n1,a,extra\n", int_text);
  EXPECT_NE(message.find("line 2"), std::string::npos) << message;

  message = error("n,s\n1,a\nx1,b\n", int_text);
  EXPECT_NE(message.find("line 3"), std::string::npos) << message;
  EXPECT_NE(message.find("'x1'"), std::string::npos) << message;
  EXPECT_NE(message.find("'n'"), std::string::npos) << message;

  message = error("n,s\n1.5,a\n", int_text);
  EXPECT_NE(message.find("line 2"), std::string::npos) << message;
  EXPECT_NE(message.find("'1.5'"), std::string::npos) << message;

  message = error("n,t\n1,a\n", int_text);
  EXPECT_NE(message.find("line 1"), std::string::npos) << message;
  EXPECT_NE(message.find("'n,t'"), std::string::npos) << message;

  message = error("s,n\n", int_text);
  EXPECT_NE(message.find("line 1"), std::string::npos) << message;

  message = error("", int_text);
  EXPECT_NE(message.find("line 1"), std::string::npos) << message;

  // A quoted line break moves the line count on: the bad record starts on line 4.
  message = error("n,s\n1,\"a\nb\"\nnope,c\n", int_text);
  EXPECT_NE(message.find("line 4"), std::string::npos) << message;

  message = error("n,s\n1,ab\"c\n", int_text);
  EXPECT_NE(message.find("line 2"), std::string::npos) << message;

  message = error("n,s\n1,\"ab\"c\n", int_text);
  EXPECT_NE(message.find("line 2"), std::string::npos) << message;

  const std::vector<Column> real_bool = {{"x", ColumnType::kReal, ""},
                                         {"b", ColumnType::kBool, ""}};
  message = error("x,b\n1e999,true\n", real_bool);
  EXPECT_NE(message.find("line 2"), std::string::npos) << message;
  message = error("x,b\n1,yes\n", real_bool);
  EXPECT_NE(message.find("'yes'"), std::string::npos) << message;
  message = error("x,b\n 1,true\n", real_bool);
  EXPECT_NE(message.find("line 2"), std::string::npos) << message;
}

// ---- JSON --------------------------------------------------------------------------------------

TEST(BenchReport, JsonWritesTheDocumentedShape) {
  Report report;
  report.suite = "profile";
  report.environment = {{"device", "cpu"}};
  report.options = {{"seed", 7}};
  Table table{"summary",
              {{"n", ColumnType::kInt, ""},
               {"ms", ColumnType::kReal, "ms"},
               {"name", ColumnType::kText, ""},
               {"ok", ColumnType::kBool, ""}},
              {}};
  table.add_row({std::int64_t{3}, 1.25, std::string("a"), true});
  table.add_row({std::monostate{}, kNaN, std::monostate{}, std::monostate{}});
  table.add_row({std::int64_t{-1}, kInf, std::string(""), false});
  table.add_row({std::int64_t{0}, -kInf, std::string("b"), false});
  report.tables.push_back(table);
  const json expected = json::parse(R"({
    "format": "nibble-bench", "schema_version": 1, "suite": "profile",
    "environment": {"device": "cpu"}, "options": {"seed": 7},
    "tables": [{"name": "summary",
                "columns": [{"name": "n", "type": "int", "unit": ""},
                            {"name": "ms", "type": "real", "unit": "ms"},
                            {"name": "name", "type": "text", "unit": ""},
                            {"name": "ok", "type": "bool", "unit": ""}],
                "rows": [[3, 1.25, "a", true], [null, "nan", null, null], [-1, "inf", "", false],
                         [0, "-inf", "b", false]]}]})");
  EXPECT_EQ(to_json(report), expected);
}

TEST(BenchReport, JsonRoundTripKeepsEveryCellEnvironmentOptionsAndUnits) {
  const Report report = every_type_report();
  // Through text, as another tool would read it.
  const Report back = report_from_json(json::parse(to_json(report).dump(2)));
  EXPECT_EQ(back.suite, "batch-sweep");
  EXPECT_EQ(back.environment, report.environment);
  EXPECT_EQ(back.options, report.options);
  EXPECT_EQ(back.options["warmup"]["steps"], 3);
  ASSERT_EQ(back.tables.size(), 2u);
  expect_same_table(back.tables[0], report.tables[0]);
  expect_same_table(back.tables[1], report.tables[1]);
  EXPECT_EQ(back.tables[0].columns[1].unit, "tokens/s");
  EXPECT_EQ(back.tables[1].columns[1].unit, "ms");
}

TEST(BenchReport, JsonWritesAnEmptyEnvironmentAsAnObject) {
  Report report;
  report.suite = "empty";
  const json document = to_json(report);
  EXPECT_TRUE(document["environment"].is_object());
  EXPECT_TRUE(document["options"].is_object());
  EXPECT_TRUE(report_from_json(document).tables.empty());
  report.options = json::array({1, 2});
  const std::string message = thrown_message<InvalidArgument>([&] { to_json(report); });
  EXPECT_NE(message.find("options"), std::string::npos) << message;
}

TEST(BenchReport, JsonReaderRejectsWrongFormatVersionKeysAndTypes) {
  const json good = to_json(every_type_report());
  ASSERT_NO_THROW(report_from_json(good));
  // Each edit of a good document, and a word its error must contain.
  struct Case {
    const char* name;
    void (*edit)(json&);
    const char* expected;
  };
  const std::vector<Case> cases = {
      {"not an object", [](json& j) { j = json::array(); }, "object"},
      {"wrong format", [](json& j) { j["format"] = "other-bench"; }, "other-bench"},
      {"format not a string", [](json& j) { j["format"] = 1; }, "format"},
      {"newer schema", [](json& j) { j["schema_version"] = 2; }, "schema_version 2"},
      {"schema as text", [](json& j) { j["schema_version"] = "1"; }, "schema_version"},
      {"schema as real", [](json& j) { j["schema_version"] = 1.5; }, "schema_version"},
      {"missing format", [](json& j) { j.erase("format"); }, "'format'"},
      {"missing schema", [](json& j) { j.erase("schema_version"); }, "'schema_version'"},
      {"missing suite", [](json& j) { j.erase("suite"); }, "'suite'"},
      {"missing environment", [](json& j) { j.erase("environment"); }, "'environment'"},
      {"missing options", [](json& j) { j.erase("options"); }, "'options'"},
      {"missing tables", [](json& j) { j.erase("tables"); }, "'tables'"},
      {"suite a number", [](json& j) { j["suite"] = 3; }, "'suite'"},
      {"environment an array", [](json& j) { j["environment"] = json::array(); }, "'environment'"},
      {"options null", [](json& j) { j["options"] = nullptr; }, "'options'"},
      {"tables an object", [](json& j) { j["tables"] = json::object(); }, "'tables'"},
      {"table not an object", [](json& j) { j["tables"][1] = 5; }, "tables[1]"},
      {"missing table name", [](json& j) { j["tables"][0].erase("name"); }, "'name'"},
      {"missing columns", [](json& j) { j["tables"][0].erase("columns"); }, "'columns'"},
      {"missing rows", [](json& j) { j["tables"][1].erase("rows"); }, "'rows'"},
      {"missing unit", [](json& j) { j["tables"][0]["columns"][1].erase("unit"); }, "'unit'"},
      {"missing type", [](json& j) { j["tables"][0]["columns"][1].erase("type"); }, "'type'"},
      {"unknown type", [](json& j) { j["tables"][0]["columns"][1]["type"] = "float"; }, "'float'"},
      {"duplicate column", [](json& j) { j["tables"][0]["columns"][1]["name"] = "batch"; },
       "twice"},
      {"short row", [](json& j) { j["tables"][1]["rows"][0].erase(1); }, "rows[0]"},
      {"row not an array", [](json& j) { j["tables"][1]["rows"][1] = 3; }, "rows[1]"},
      {"text in int", [](json& j) { j["tables"][0]["rows"][0][0] = "8"; }, "'batch'"},
      {"real in int", [](json& j) { j["tables"][0]["rows"][0][0] = 8.5; }, "'batch'"},
      {"beyond int64", [](json& j) { j["tables"][0]["rows"][0][0] = std::uint64_t{1} << 63; },
       "int64"},
      {"word in real", [](json& j) { j["tables"][0]["rows"][0][1] = "fast"; }, "fast"},
      {"bool in real", [](json& j) { j["tables"][0]["rows"][0][1] = true; }, "'tokens_per_s'"},
      {"number in text", [](json& j) { j["tables"][0]["rows"][0][2] = 1; }, "'optimizer'"},
      {"text in bool", [](json& j) { j["tables"][0]["rows"][0][3] = "false"; }, "'oom'"},
  };
  for (const Case& c : cases) {
    json document = good;
    c.edit(document);
    const std::string message = thrown_message<FormatError>([&] { report_from_json(document); });
    EXPECT_NE(message.find(c.expected), std::string::npos) << c.name << ": " << message;
  }
}

// ---- Tables ------------------------------------------------------------------------------------

TEST(BenchReport, AddRowRejectsWrongLengthAndType) {
  Table table{"runs", {{"batch", ColumnType::kInt, ""}, {"ms", ColumnType::kReal, "ms"}}, {}};
  std::string message = thrown_message<InvalidArgument>([&] { table.add_row({std::int64_t{1}}); });
  EXPECT_NE(message.find("1 cells"), std::string::npos) << message;
  EXPECT_NE(message.find("2 columns"), std::string::npos) << message;
  message = thrown_message<InvalidArgument>([&] { table.add_row({std::int64_t{1}, 2.0, 3.0}); });
  EXPECT_NE(message.find("3 cells"), std::string::npos) << message;
  message = thrown_message<InvalidArgument>([&] { table.add_row({2.0, 2.0}); });
  EXPECT_NE(message.find("'batch'"), std::string::npos) << message;
  message = thrown_message<InvalidArgument>([&] {
    table.add_row({std::int64_t{1}, std::string("2")});
  });
  EXPECT_NE(message.find("'ms'"), std::string::npos) << message;
  message = thrown_message<InvalidArgument>([&] { table.add_row({true, 1.0}); });
  EXPECT_NE(message.find("'batch'"), std::string::npos) << message;
  EXPECT_TRUE(table.rows.empty());
  table.add_row({std::monostate{}, std::monostate{}});
  EXPECT_EQ(table.rows.size(), 1u);
}

TEST(BenchReport, ColumnFindsByNameOrThrows) {
  const Table table = every_type_table();
  EXPECT_EQ(table.column("batch"), 0u);
  EXPECT_EQ(table.column("oom"), 3u);
  const std::string message = thrown_message<InvalidArgument>([&] { table.column("loss"); });
  EXPECT_NE(message.find("'loss'"), std::string::npos) << message;
}

TEST(BenchReport, WritersRejectRowsThatBypassedAddRow) {
  Table table{"runs", {{"batch", ColumnType::kInt, ""}}, {}};
  table.rows.push_back({std::string("eight")});
  EXPECT_THROW(to_csv(table), InvalidArgument);
  Report report;
  report.tables.push_back(table);
  EXPECT_THROW(to_json(report), InvalidArgument);
}

// ---- Files -------------------------------------------------------------------------------------

TEST(BenchReport, WriteReportWritesJsonAndOneCsvPerTable) {
  const TempDir temp;
  const fs::path dir = temp.path() / "results" / "nested";
  const Report report = every_type_report();
  const std::vector<fs::path> paths = write_report(report, dir, "sweep");
  ASSERT_EQ(paths.size(), 3u);
  EXPECT_EQ(paths[0], dir / "sweep.json");
  EXPECT_EQ(paths[1], dir / "sweep-runs.csv");
  EXPECT_EQ(paths[2], dir / "sweep-steps.csv");
  EXPECT_EQ(names_in(dir),
            (std::vector<std::string>{"sweep-runs.csv", "sweep-steps.csv", "sweep.json"}));

  EXPECT_EQ(read_text(dir / "sweep-steps.csv"), "step,ms\n1,2.5\n2,\n");
  EXPECT_EQ(read_text(dir / "sweep-runs.csv"), to_csv(report.tables[0]));
  const Report back = report_from_json(json::parse(read_text(dir / "sweep.json")));
  EXPECT_EQ(back.suite, report.suite);
  EXPECT_EQ(back.environment, report.environment);
  EXPECT_EQ(back.options, report.options);
  ASSERT_EQ(back.tables.size(), 2u);
  expect_same_table(back.tables[0], report.tables[0]);
  expect_same_table(back.tables[1], report.tables[1]);
  expect_same_table(table_from_csv(read_text(paths[1]), "runs", report.tables[0].columns),
                    report.tables[0]);

  // Writing again replaces the files in place and still leaves no temporaries.
  Report smaller = report;
  smaller.tables.pop_back();
  smaller.tables[0].rows.resize(1);
  write_report(smaller, dir, "sweep");
  EXPECT_EQ(names_in(dir),
            (std::vector<std::string>{"sweep-runs.csv", "sweep-steps.csv", "sweep.json"}));
  EXPECT_EQ(read_text(dir / "sweep-runs.csv"),
            "batch,tokens_per_s,optimizer,oom\n8,12345.678,adamw,false\n");
}

TEST(BenchReport, WriteFileAtomicReplacesContent) {
  const TempDir temp;
  const fs::path path = temp.path() / "a.txt";
  write_file_atomic(path, "first\n");
  EXPECT_EQ(read_text(path), "first\n");
  write_file_atomic(path, "");
  EXPECT_EQ(read_text(path), "");
  write_file_atomic(path, "second");
  EXPECT_EQ(read_text(path), "second");
  EXPECT_EQ(names_in(temp.path()), std::vector<std::string>{"a.txt"});
}

TEST(BenchReport, WriteUnderARegularFileThrowsIoError) {
  const TempDir temp;
  const fs::path file = temp.path() / "plain";
  write_file(file, "keep me");
  const fs::path dir = file / "results";
  std::string message = thrown_message<IoError>([&] { write_report(every_type_report(), dir, "r"); });
  EXPECT_NE(message.find(dir.string()), std::string::npos) << message;
  message = thrown_message<IoError>([&] { write_file_atomic(file / "x.json", "{}"); });
  EXPECT_NE(message.find((file / "x.json").string()), std::string::npos) << message;
  EXPECT_EQ(read_text(file), "keep me");
  EXPECT_EQ(names_in(temp.path()), std::vector<std::string>{"plain"});
}

TEST(BenchReport, FailedWriteLeavesTheExistingFileUnchanged) {
  const TempDir temp;
  const fs::path path = temp.path() / "r.json";
  write_file(path, "old report");
  // A file-size limit makes the write fail part-way, as a full disk would (root included).
  // SIGXFSZ is ignored so that the write returns EFBIG instead of killing the process.
  rlimit saved_limit{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &saved_limit), 0);
  rlimit small_limit = saved_limit;
  small_limit.rlim_cur = 16;
  const auto saved_handler = ::signal(SIGXFSZ, SIG_IGN);
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small_limit), 0);
  std::string message;
  try {
    write_report(every_type_report(), temp.path(), "r");
  } catch (const IoError& e) {
    message = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &saved_limit);
  ::signal(SIGXFSZ, saved_handler);
  ASSERT_FALSE(message.empty()) << "the write did not fail";
  EXPECT_NE(message.find(path.string()), std::string::npos) << message;
  EXPECT_EQ(read_text(path), "old report");
  EXPECT_EQ(names_in(temp.path()), std::vector<std::string>{"r.json"});  // no temporary left behind
}

TEST(BenchReport, FailedRenameRemovesTheTemporary) {
  const TempDir temp;
  const fs::path target = temp.path() / "occupied";
  fs::create_directory(target);
  write_file(target / "inside", "x");
  const std::string message = thrown_message<IoError>([&] { write_file_atomic(target, "text"); });
  EXPECT_NE(message.find(target.string()), std::string::npos) << message;
  EXPECT_EQ(names_in(temp.path()), std::vector<std::string>{"occupied"});
  EXPECT_EQ(read_text(target / "inside"), "x");
}

TEST(BenchReport, InvalidReportWritesNothing) {
  const TempDir temp;
  write_file(temp.path() / "r.json", "old report");
  Report report = every_type_report();
  report.tables[1].rows.push_back({std::string("one"), 2.0});
  EXPECT_THROW(write_report(report, temp.path(), "r"), InvalidArgument);
  EXPECT_EQ(read_text(temp.path() / "r.json"), "old report");
  EXPECT_EQ(names_in(temp.path()), std::vector<std::string>{"r.json"});

  report = every_type_report();
  report.tables[1].name = "runs";
  EXPECT_THROW(write_report(report, temp.path(), "r"), InvalidArgument);
  report.tables[1].name = "../escape";
  EXPECT_THROW(write_report(report, temp.path(), "r"), InvalidArgument);
  EXPECT_THROW(write_report(every_type_report(), temp.path(), "a/b"), InvalidArgument);
  EXPECT_THROW(write_report(every_type_report(), temp.path(), ""), InvalidArgument);
  EXPECT_EQ(names_in(temp.path()), std::vector<std::string>{"r.json"});
}

// ---- Text for people ---------------------------------------------------------------------------

TEST(BenchReport, FormatTableAlignsColumns) {
  const std::string text =
      format_table({"name", "params", "note"}, {Align::kLeft, Align::kRight, Align::kLeft},
                   {{"adamw", "1,024", "fp32"}, {"lion8bit", "7", ""}, {"sgd"}});
  EXPECT_EQ(text,
            "name      params  note\n"
            "--------  ------  ----\n"
            "adamw      1,024  fp32\n"
            "lion8bit       7\n"
            "sgd\n");
  // Columns without an alignment are left-aligned.
  EXPECT_EQ(format_table({"a", "b"}, {}, {{"xyz", "1"}}),
            "a    b\n"
            "---  -\n"
            "xyz  1\n");
}

TEST(BenchReport, GroupDigits) {
  EXPECT_EQ(group_digits(0), "0");
  EXPECT_EQ(group_digits(999), "999");
  EXPECT_EQ(group_digits(1000), "1,000");
  EXPECT_EQ(group_digits(124475904), "124,475,904");
  EXPECT_EQ(group_digits(-999), "-999");
  EXPECT_EQ(group_digits(-1000), "-1,000");
  EXPECT_EQ(group_digits(-1234567), "-1,234,567");
  EXPECT_EQ(group_digits(kInt64Max), "9,223,372,036,854,775,807");
  EXPECT_EQ(group_digits(kInt64Min), "-9,223,372,036,854,775,808");
}

TEST(BenchReport, HumanBytes) {
  EXPECT_EQ(human_bytes(0), "0 B");
  EXPECT_EQ(human_bytes(512), "512 B");
  EXPECT_EQ(human_bytes(1023), "1023 B");
  EXPECT_EQ(human_bytes(1024), "1.00 KiB");
  EXPECT_EQ(human_bytes(1536), "1.50 KiB");
  EXPECT_EQ(human_bytes(10 * 1024), "10.0 KiB");
  EXPECT_EQ(human_bytes(15.1 * 1024 * 1024), "15.1 MiB");
  EXPECT_EQ(human_bytes(326.0 * 1024 * 1024), "326 MiB");
  EXPECT_EQ(human_bytes(8.45e9), "7.87 GiB");
  EXPECT_EQ(human_bytes(std::ldexp(1.0, 40)), "1.00 TiB");
  EXPECT_EQ(human_bytes(std::ldexp(1.0, 50)), "1024 TiB");
  // Rounding that would add a digit moves on instead: never "10.00", "100.0" or "1024 KiB".
  EXPECT_EQ(human_bytes(9.999 * 1024), "10.0 KiB");
  EXPECT_EQ(human_bytes(99.97 * 1024), "100 KiB");
  EXPECT_EQ(human_bytes(1023.9 * 1024), "1.00 MiB");
  EXPECT_EQ(human_bytes(1023.7), "1.00 KiB");
  EXPECT_EQ(human_bytes(-1536), "-1.50 KiB");
}

TEST(BenchReport, ParseBytesAcceptsUnits) {
  EXPECT_EQ(parse_bytes("16GB"), 16'000'000'000);
  EXPECT_EQ(parse_bytes("16GiB"), std::int64_t{16} << 30);
  EXPECT_EQ(parse_bytes("16 GiB"), std::int64_t{16} << 30);
  EXPECT_EQ(parse_bytes("16gib"), std::int64_t{16} << 30);
  EXPECT_EQ(parse_bytes("16gb"), 16'000'000'000);
  EXPECT_EQ(parse_bytes("512MiB"), std::int64_t{512} << 20);
  EXPECT_EQ(parse_bytes("800M"), 800'000'000);
  EXPECT_EQ(parse_bytes("1.5e9"), 1'500'000'000);
  EXPECT_EQ(parse_bytes("512B"), 512);
  EXPECT_EQ(parse_bytes("512 b"), 512);
  EXPECT_EQ(parse_bytes("512"), 512);
  EXPECT_EQ(parse_bytes("0"), 0);
  EXPECT_EQ(parse_bytes("1kB"), 1000);
  EXPECT_EQ(parse_bytes("1.5 KiB"), 1536);
  EXPECT_EQ(parse_bytes("1.1GB"), 1'100'000'000);
  EXPECT_EQ(parse_bytes("2T"), 2'000'000'000'000);
  EXPECT_EQ(parse_bytes("3TiB"), std::int64_t{3} << 40);
  EXPECT_EQ(parse_bytes(" 8 GB "), 8'000'000'000);
  EXPECT_EQ(parse_bytes("9223372036854775807"), kInt64Max);
  EXPECT_EQ(parse_bytes("8388607TiB"), std::int64_t{8388607} << 40);
}

TEST(BenchReport, ParseBytesRejectsNamingTheText) {
  for (const char* text :
       {"",       "   ",        "-1GB", "-0",     "abc",   "1XB",   "nan",
        "NaN",    "inf",        "-inf", "+5",     "GB",    "1e400", "9223372036854775808",
        "9.3e18", "8388608TiB", "8EiB", "16 G B", "1.5.2", "0x10",  "1,000"}) {
    const std::string message = thrown_message<InvalidArgument>([&] { parse_bytes(text); });
    EXPECT_NE(message.find(fmt::format("'{}'", text)), std::string::npos)
        << text << ": " << message;
  }
  EXPECT_NE(thrown_message<InvalidArgument>([] { parse_bytes("-1GB"); }).find("negative"),
            std::string::npos);
  EXPECT_NE(thrown_message<InvalidArgument>([] { parse_bytes("1e30"); }).find("int64"),
            std::string::npos);
}

}  // namespace
}  // namespace nibble::bench
