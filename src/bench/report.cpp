// Benchmark reports: typed tables written as RFC 4180 CSV and one JSON document, the readers that
// take both back, atomic file writes, and the plain-text tables and byte sizes people read.
#include "bench/report.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <limits>
#include <optional>
#include <set>
#include <system_error>
#include <utility>

#include "nibble/error.hpp"

namespace nibble::bench {
namespace {

using nlohmann::json;

constexpr int kSchemaVersion = 1;
constexpr std::string_view kFormatName = "nibble-bench";

std::string_view type_name(ColumnType type) {
  switch (type) {
    case ColumnType::kInt:
      return "int";
    case ColumnType::kReal:
      return "real";
    case ColumnType::kText:
      return "text";
    case ColumnType::kBool:
      return "bool";
  }
  return "unknown";
}

std::optional<ColumnType> type_from_name(std::string_view name) {
  for (ColumnType type :
       {ColumnType::kInt, ColumnType::kReal, ColumnType::kText, ColumnType::kBool}) {
    if (type_name(type) == name) return type;
  }
  return std::nullopt;
}

std::string_view cell_kind(const Cell& cell) {
  constexpr std::array<std::string_view, 5> kKinds = {"empty", "int", "real", "text", "bool"};
  return kKinds[cell.index()];
}

// An integer in a real column is allowed (add_row converts it; writers print it as a number).
bool cell_fits(const Cell& cell, ColumnType type) {
  if (std::holds_alternative<std::monostate>(cell)) return true;
  switch (type) {
    case ColumnType::kInt:
      return std::holds_alternative<std::int64_t>(cell);
    case ColumnType::kReal:
      return std::holds_alternative<double>(cell) || std::holds_alternative<std::int64_t>(cell);
    case ColumnType::kText:
      return std::holds_alternative<std::string>(cell);
    case ColumnType::kBool:
      return std::holds_alternative<bool>(cell);
  }
  return false;
}

void check_row_shape(const Table& table, const std::vector<Cell>& row, std::size_t index) {
  if (row.size() != table.columns.size()) {
    throw InvalidArgument(fmt::format("table '{}': row {} has {} cells, the table has {} columns",
                                      table.name, index, row.size(), table.columns.size()));
  }
  for (std::size_t c = 0; c < row.size(); ++c) {
    if (!cell_fits(row[c], table.columns[c].type)) {
      throw InvalidArgument(fmt::format(
          "table '{}': row {}, column '{}' holds a {} cell, the column is {}", table.name, index,
          table.columns[c].name, cell_kind(row[c]), type_name(table.columns[c].type)));
    }
  }
}

void check_column_names(const std::vector<Column>& columns, std::string_view table_name) {
  std::set<std::string_view> seen;
  for (const Column& column : columns) {
    if (column.name.empty()) {
      throw InvalidArgument(fmt::format("table '{}': a column has an empty name", table_name));
    }
    if (!seen.insert(column.name).second) {
      throw InvalidArgument(
          fmt::format("table '{}': column '{}' appears twice", table_name, column.name));
    }
  }
}

// Writers check what add_row would have refused, since rows is a public member.
void check_table(const Table& table) {
  check_column_names(table.columns, table.name);
  for (std::size_t r = 0; r < table.rows.size(); ++r) check_row_shape(table, table.rows[r], r);
}

std::string format_real(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  // fmt's default for a double is the shortest text that reads back as the same value.
  return fmt::format("{}", value);
}

std::optional<std::int64_t> parse_int(std::string_view text) {
  std::int64_t value = 0;
  const char* end = text.data() + text.size();
  const auto [stop, error] = std::from_chars(text.data(), end, value);
  if (text.empty() || error != std::errc() || stop != end) return std::nullopt;
  return value;
}

std::optional<double> parse_real(std::string_view text) {
  if (text == "nan") return std::numeric_limits<double>::quiet_NaN();
  if (text == "inf") return std::numeric_limits<double>::infinity();
  if (text == "-inf") return -std::numeric_limits<double>::infinity();
  double value = 0.0;
  const char* end = text.data() + text.size();
  const auto [stop, error] = std::from_chars(text.data(), end, value);
  if (text.empty() || error != std::errc() || stop != end) return std::nullopt;
  return value;
}

// --- CSV -----------------------------------------------------------------------------------------

bool needs_quotes(std::string_view text) {
  return text.find_first_of(",\"\r\n") != std::string_view::npos;
}

void append_field(std::string& line, std::string_view text, bool force_quotes) {
  if (!force_quotes && !needs_quotes(text)) {
    line += text;
    return;
  }
  line += '"';
  for (char c : text) {
    if (c == '"') line += '"';
    line += c;
  }
  line += '"';
}

void append_cell(std::string& line, const Cell& cell) {
  if (const auto* value = std::get_if<std::int64_t>(&cell)) {
    line += fmt::format("{}", *value);
  } else if (const auto* real = std::get_if<double>(&cell)) {
    line += format_real(*real);
  } else if (const auto* text = std::get_if<std::string>(&cell)) {
    // An empty text is quoted so that it reads back apart from an empty cell.
    append_field(line, *text, text->empty());
  } else if (const auto* flag = std::get_if<bool>(&cell)) {
    line += *flag ? "true" : "false";
  }
}

struct CsvField {
  std::string text;
  bool quoted = false;
};

struct CsvRecord {
  std::vector<CsvField> fields;
  std::size_t line = 0;  // where the record starts; quoted newlines make records span lines
};

std::vector<CsvRecord> split_csv(std::string_view text, std::string_view table_name) {
  auto error = [&](std::size_t line, std::string_view what) {
    return FormatError(fmt::format("CSV table '{}' line {}: {}", table_name, line, what));
  };
  auto at_line_end = [&](std::size_t i) {
    return text[i] == '\n' || (text[i] == '\r' && i + 1 < text.size() && text[i + 1] == '\n');
  };

  std::vector<CsvRecord> records;
  std::size_t i = 0;
  std::size_t line = 1;
  while (i < text.size()) {
    CsvRecord record;
    record.line = line;
    while (true) {
      CsvField field;
      if (i < text.size() && text[i] == '"') {
        field.quoted = true;
        const std::size_t open_line = line;
        ++i;
        while (true) {
          if (i >= text.size()) throw error(open_line, "quoted field is not terminated");
          const char c = text[i++];
          if (c == '"') {
            if (i < text.size() && text[i] == '"') {
              field.text += '"';
              ++i;
              continue;
            }
            break;
          }
          if (c == '\n') ++line;
          field.text += c;
        }
        if (i < text.size() && text[i] != ',' && !at_line_end(i)) {
          throw error(line, fmt::format("unexpected '{}' after a quoted field", text[i]));
        }
      } else {
        while (i < text.size() && text[i] != ',' && text[i] != '\n' && text[i] != '\r') {
          if (text[i] == '"') throw error(line, "quote inside an unquoted field");
          field.text += text[i++];
        }
        if (i < text.size() && text[i] == '\r' && !at_line_end(i)) {
          throw error(line, "carriage return inside an unquoted field");
        }
      }
      record.fields.push_back(std::move(field));
      if (i >= text.size()) break;
      if (text[i] == ',') {
        ++i;
        continue;
      }
      i += text[i] == '\r' ? 2 : 1;
      ++line;
      break;
    }
    records.push_back(std::move(record));
  }
  return records;
}

std::string join_names(const std::vector<std::string>& names) {
  std::string text;
  for (std::size_t c = 0; c < names.size(); ++c) {
    if (c > 0) text += ',';
    text += names[c];
  }
  return text;
}

// --- JSON ----------------------------------------------------------------------------------------

json cell_to_json(const Cell& cell) {
  if (const auto* value = std::get_if<std::int64_t>(&cell)) return *value;
  if (const auto* real = std::get_if<double>(&cell)) {
    if (std::isfinite(*real)) return *real;
    return format_real(*real);
  }
  if (const auto* text = std::get_if<std::string>(&cell)) return *text;
  if (const auto* flag = std::get_if<bool>(&cell)) return *flag;
  return nullptr;
}

json object_or_empty(const json& value, std::string_view what, std::string_view suite) {
  if (value.is_null()) return json::object();
  if (!value.is_object()) {
    throw InvalidArgument(fmt::format("report '{}': {} must be a JSON object, not {}", suite, what,
                                      value.type_name()));
  }
  return value;
}

FormatError json_error(std::string_view where, std::string_view what) {
  return FormatError(fmt::format("nibble-bench JSON: {}: {}", where, what));
}

const json& member(const json& object, const char* key, std::string_view where) {
  const auto found = object.find(key);
  if (found == object.end()) throw json_error(where, fmt::format("missing key '{}'", key));
  return *found;
}

const json& member_of_type(const json& object, const char* key, json::value_t type,
                           std::string_view expected, std::string_view where) {
  const json& value = member(object, key, where);
  if (value.type() != type) {
    throw json_error(where,
                     fmt::format("'{}' must be {}, not {}", key, expected, value.type_name()));
  }
  return value;
}

Cell cell_from_json(const json& value, const Column& column, std::string_view where) {
  if (value.is_null()) return std::monostate{};
  auto wrong = [&]() {
    return json_error(where, fmt::format("column '{}' is {}, the cell is {} {}", column.name,
                                         type_name(column.type), value.type_name(), value.dump()));
  };
  switch (column.type) {
    case ColumnType::kInt:
      if (value.is_number_integer()) {
        if (value.is_number_unsigned() &&
            value.get<std::uint64_t>() >
                static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
          throw json_error(
              where, fmt::format("column '{}': {} is beyond int64", column.name, value.dump()));
        }
        return value.get<std::int64_t>();
      }
      throw wrong();
    case ColumnType::kReal:
      if (value.is_number()) return value.get<double>();
      if (value.is_string()) {
        const auto& text = value.get_ref<const std::string&>();
        if (text == "nan" || text == "inf" || text == "-inf") return *parse_real(text);
      }
      throw wrong();
    case ColumnType::kText:
      if (value.is_string()) return value.get<std::string>();
      throw wrong();
    case ColumnType::kBool:
      if (value.is_boolean()) return value.get<bool>();
      throw wrong();
  }
  throw wrong();
}

Table table_from_json(const json& value, std::string_view where) {
  if (!value.is_object())
    throw json_error(where, fmt::format("must be an object, not {}", value.type_name()));
  Table table;
  table.name =
      member_of_type(value, "name", json::value_t::string, "a string", where).get<std::string>();
  const std::string table_where = fmt::format("{} ('{}')", where, table.name);

  const json& columns =
      member_of_type(value, "columns", json::value_t::array, "an array", table_where);
  std::set<std::string> seen;
  for (std::size_t c = 0; c < columns.size(); ++c) {
    const std::string column_where = fmt::format("{} columns[{}]", table_where, c);
    const json& column = columns[c];
    if (!column.is_object()) {
      throw json_error(column_where, fmt::format("must be an object, not {}", column.type_name()));
    }
    Column parsed;
    parsed.name = member_of_type(column, "name", json::value_t::string, "a string", column_where)
                      .get<std::string>();
    if (parsed.name.empty()) throw json_error(column_where, "empty column name");
    if (!seen.insert(parsed.name).second) {
      throw json_error(column_where, fmt::format("column '{}' appears twice", parsed.name));
    }
    const auto& type =
        member_of_type(column, "type", json::value_t::string, "a string", column_where)
            .get_ref<const std::string&>();
    const std::optional<ColumnType> column_type = type_from_name(type);
    if (!column_type) {
      throw json_error(column_where,
                       fmt::format("unknown column type '{}' (int, real, text or bool)", type));
    }
    parsed.type = *column_type;
    parsed.unit = member_of_type(column, "unit", json::value_t::string, "a string", column_where)
                      .get<std::string>();
    table.columns.push_back(std::move(parsed));
  }

  const json& rows = member_of_type(value, "rows", json::value_t::array, "an array", table_where);
  table.rows.reserve(rows.size());
  for (std::size_t r = 0; r < rows.size(); ++r) {
    const std::string row_where = fmt::format("{} rows[{}]", table_where, r);
    const json& row = rows[r];
    if (!row.is_array())
      throw json_error(row_where, fmt::format("must be an array, not {}", row.type_name()));
    if (row.size() != table.columns.size()) {
      throw json_error(row_where, fmt::format("{} cells, the table has {} columns", row.size(),
                                              table.columns.size()));
    }
    std::vector<Cell> cells;
    cells.reserve(row.size());
    for (std::size_t c = 0; c < row.size(); ++c) {
      cells.push_back(
          cell_from_json(row[c], table.columns[c], fmt::format("{}[{}]", row_where, c)));
    }
    table.rows.push_back(std::move(cells));
  }
  return table;
}

// --- Files ---------------------------------------------------------------------------------------

// A stem or table name becomes part of a file name: no separators, nothing hidden or relative.
bool is_file_name_part(std::string_view text) {
  if (text.empty() || text.front() == '.') return false;
  return std::all_of(text.begin(), text.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.';
  });
}

std::string_view trim(std::string_view text) {
  const auto space = [](char c) { return c == ' ' || c == '\t'; };
  while (!text.empty() && space(text.front())) text.remove_prefix(1);
  while (!text.empty() && space(text.back())) text.remove_suffix(1);
  return text;
}

}  // namespace

void Table::add_row(std::vector<Cell> row) {
  check_row_shape(*this, row, rows.size());
  for (std::size_t c = 0; c < row.size(); ++c) {
    if (columns[c].type == ColumnType::kReal) {
      if (const auto* value = std::get_if<std::int64_t>(&row[c]))
        row[c] = static_cast<double>(*value);
    }
  }
  rows.push_back(std::move(row));
}

std::size_t Table::column(std::string_view name) const {
  for (std::size_t c = 0; c < columns.size(); ++c) {
    if (columns[c].name == name) return c;
  }
  throw InvalidArgument(fmt::format("table '{}' has no column '{}'", this->name, name));
}

std::string to_csv(const Table& table) {
  check_table(table);
  std::string text;
  for (std::size_t c = 0; c < table.columns.size(); ++c) {
    if (c > 0) text += ',';
    append_field(text, table.columns[c].name, false);
  }
  text += '\n';
  for (const auto& row : table.rows) {
    for (std::size_t c = 0; c < row.size(); ++c) {
      if (c > 0) text += ',';
      append_cell(text, row[c]);
    }
    text += '\n';
  }
  return text;
}

Table table_from_csv(std::string_view text, std::string name, std::vector<Column> columns) {
  check_column_names(columns, name);
  Table table{std::move(name), std::move(columns), {}};
  const std::vector<CsvRecord> records = split_csv(text, table.name);
  auto error = [&](std::size_t line, std::string_view what) {
    return FormatError(fmt::format("CSV table '{}' line {}: {}", table.name, line, what));
  };
  if (records.empty()) throw error(1, "no header line");

  std::vector<std::string> expected;
  std::vector<std::string> found;
  for (const Column& column : table.columns) expected.push_back(column.name);
  for (const CsvField& field : records.front().fields) found.push_back(field.text);
  if (found != expected) {
    throw error(
        1, fmt::format("header is '{}', expected '{}'", join_names(found), join_names(expected)));
  }

  table.rows.reserve(records.size() - 1);
  for (std::size_t r = 1; r < records.size(); ++r) {
    const CsvRecord& record = records[r];
    if (record.fields.size() != table.columns.size()) {
      throw error(record.line, fmt::format("{} fields, the header has {}", record.fields.size(),
                                           table.columns.size()));
    }
    std::vector<Cell> row;
    row.reserve(record.fields.size());
    for (std::size_t c = 0; c < record.fields.size(); ++c) {
      const CsvField& field = record.fields[c];
      const Column& column = table.columns[c];
      if (field.text.empty() && !field.quoted) {
        row.emplace_back(std::monostate{});
        continue;
      }
      auto bad_value = [&]() {
        return error(record.line, fmt::format("column '{}': '{}' is not a valid {}", column.name,
                                              field.text, type_name(column.type)));
      };
      switch (column.type) {
        case ColumnType::kInt: {
          const auto value = parse_int(field.text);
          if (!value) throw bad_value();
          row.emplace_back(*value);
          break;
        }
        case ColumnType::kReal: {
          const auto value = parse_real(field.text);
          if (!value) throw bad_value();
          row.emplace_back(*value);
          break;
        }
        case ColumnType::kText:
          row.emplace_back(field.text);
          break;
        case ColumnType::kBool:
          if (field.text == "true") {
            row.emplace_back(true);
          } else if (field.text == "false") {
            row.emplace_back(false);
          } else {
            throw bad_value();
          }
          break;
      }
    }
    table.rows.push_back(std::move(row));
  }
  return table;
}

json to_json(const Report& report) {
  json tables = json::array();
  for (const Table& table : report.tables) {
    check_table(table);
    json columns = json::array();
    for (const Column& column : table.columns) {
      columns.push_back(
          {{"name", column.name}, {"type", type_name(column.type)}, {"unit", column.unit}});
    }
    json rows = json::array();
    for (const auto& row : table.rows) {
      json cells = json::array();
      for (const Cell& cell : row) cells.push_back(cell_to_json(cell));
      rows.push_back(std::move(cells));
    }
    tables.push_back(
        {{"name", table.name}, {"columns", std::move(columns)}, {"rows", std::move(rows)}});
  }
  return {{"format", kFormatName},
          {"schema_version", kSchemaVersion},
          {"suite", report.suite},
          {"environment", object_or_empty(report.environment, "environment", report.suite)},
          {"options", object_or_empty(report.options, "options", report.suite)},
          {"tables", std::move(tables)}};
}

Report report_from_json(const json& value) {
  if (!value.is_object())
    throw json_error("document", fmt::format("must be an object, not {}", value.type_name()));
  const auto& format =
      member_of_type(value, "format", json::value_t::string, "a string", "document")
          .get_ref<const std::string&>();
  if (format != kFormatName) {
    throw json_error("document", fmt::format("format is '{}', expected '{}'", format, kFormatName));
  }
  const json& version = member(value, "schema_version", "document");
  if (!version.is_number_integer() || version.get<std::int64_t>() != kSchemaVersion) {
    throw json_error("document", fmt::format("unsupported schema_version {} (this build reads {})",
                                             version.dump(), kSchemaVersion));
  }
  Report report;
  report.suite = member_of_type(value, "suite", json::value_t::string, "a string", "document")
                     .get<std::string>();
  report.environment =
      member_of_type(value, "environment", json::value_t::object, "an object", "document");
  report.options = member_of_type(value, "options", json::value_t::object, "an object", "document");
  const json& tables =
      member_of_type(value, "tables", json::value_t::array, "an array", "document");
  for (std::size_t t = 0; t < tables.size(); ++t) {
    report.tables.push_back(table_from_json(tables[t], fmt::format("tables[{}]", t)));
  }
  return report;
}

std::vector<std::filesystem::path> write_report(const Report& report,
                                                const std::filesystem::path& dir,
                                                std::string_view stem) {
  if (!is_file_name_part(stem)) {
    throw InvalidArgument(fmt::format("report file stem '{}' is not a plain file name", stem));
  }
  std::set<std::string_view> table_names;
  for (const Table& table : report.tables) {
    if (!is_file_name_part(table.name)) {
      throw InvalidArgument(fmt::format(
          "report '{}': table name '{}' cannot be part of a file name", report.suite, table.name));
    }
    if (!table_names.insert(table.name).second) {
      throw InvalidArgument(
          fmt::format("report '{}': table '{}' appears twice", report.suite, table.name));
    }
  }

  // Everything is serialised before the first write, so that an invalid report writes nothing.
  std::vector<std::pair<std::filesystem::path, std::string>> files;
  std::string json_text;
  try {
    json_text = to_json(report).dump(2) + "\n";
  } catch (const json::exception& e) {
    throw InvalidArgument(
        fmt::format("report '{}' cannot be written as JSON: {}", report.suite, e.what()));
  }
  files.emplace_back(dir / fmt::format("{}.json", stem), std::move(json_text));
  for (const Table& table : report.tables) {
    files.emplace_back(dir / fmt::format("{}-{}.csv", stem, table.name), to_csv(table));
  }

  if (!dir.empty()) {
    std::error_code error;
    std::filesystem::create_directories(dir, error);
    if (error) {
      throw IoError(fmt::format("cannot create directory '{}': {}", dir.string(), error.message()));
    }
  }
  std::vector<std::filesystem::path> written;
  for (const auto& [path, text] : files) {
    write_file_atomic(path, text);
    written.push_back(path);
  }
  return written;
}

std::string format_table(const std::vector<std::string>& header, const std::vector<Align>& align,
                         const std::vector<std::vector<std::string>>& rows) {
  std::vector<std::size_t> width(header.size(), 0);
  auto widen = [&](const std::vector<std::string>& row) {
    for (std::size_t c = 0; c < row.size() && c < width.size(); ++c) {
      width[c] = std::max(width[c], row[c].size());
    }
  };
  widen(header);
  for (const auto& row : rows) widen(row);

  std::string text;
  auto append_row = [&](const std::vector<std::string>& row) {
    std::string line;
    for (std::size_t c = 0; c < width.size(); ++c) {
      const std::string& cell = c < row.size() ? row[c] : std::string();
      if (c > 0) line += "  ";
      const std::string pad(width[c] - cell.size(), ' ');
      const bool right = c < align.size() && align[c] == Align::kRight;
      line += right ? pad + cell : cell + pad;
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    text += line + "\n";
  };
  append_row(header);
  std::vector<std::string> rule;
  for (std::size_t w : width) rule.emplace_back(w, '-');
  append_row(rule);
  for (const auto& row : rows) append_row(row);
  return text;
}

std::string group_digits(std::int64_t value) {
  const std::string digits = std::to_string(value);
  const std::size_t sign = digits.front() == '-' ? 1 : 0;
  std::string text = digits.substr(0, sign);
  for (std::size_t i = sign; i < digits.size(); ++i) {
    if (i > sign && (digits.size() - i) % 3 == 0) text += ',';
    text += digits[i];
  }
  return text;
}

std::string human_bytes(double bytes) {
  if (!std::isfinite(bytes)) return fmt::format("{} B", format_real(bytes));
  const std::string_view sign = bytes < 0 ? "-" : "";
  const double size = std::abs(bytes);
  // Thresholds sit where rounding would add a digit: 1023.5 B prints as "1.00 KiB", not "1024 B".
  if (size < 1023.5) return fmt::format("{}{:.0f} B", sign, size);
  constexpr std::array<std::string_view, 4> kUnits = {"KiB", "MiB", "GiB", "TiB"};
  double value = size / 1024.0;
  std::size_t unit = 0;
  while (value >= 1023.5 && unit + 1 < kUnits.size()) {
    value /= 1024.0;
    ++unit;
  }
  const int decimals = value < 9.995 ? 2 : value < 99.95 ? 1 : 0;
  return fmt::format("{}{:.{}f} {}", sign, value, decimals, kUnits[unit]);
}

std::int64_t parse_bytes(std::string_view text) {
  auto invalid = [&](std::string_view why) {
    return InvalidArgument(fmt::format("invalid byte size '{}': {}", text, why));
  };
  constexpr std::string_view kExpected =
      "expected a number with an optional unit (B, kB, MB, GB, TB, KiB, MiB, GiB, TiB or K, M, G, "
      "T)";
  const std::string_view rest = trim(text);
  if (rest.empty()) throw invalid(kExpected);
  if (rest.front() == '-') throw invalid("a size cannot be negative");
  // from_chars would also take "nan" and "inf"; a size starts with a digit or a point.
  if (!std::isdigit(static_cast<unsigned char>(rest.front())) && rest.front() != '.')
    throw invalid(kExpected);

  double value = 0.0;
  const char* end = rest.data() + rest.size();
  const auto [stop, error] = std::from_chars(rest.data(), end, value);
  if (error == std::errc::result_out_of_range) throw invalid("beyond the range of int64");
  if (error != std::errc()) throw invalid(kExpected);
  const std::string_view number(rest.data(), static_cast<std::size_t>(stop - rest.data()));

  std::string unit(trim(rest.substr(number.size())));
  std::transform(unit.begin(), unit.end(), unit.begin(), [](char c) {
    return static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  });
  constexpr std::int64_t kKi = 1024;
  constexpr std::array<std::pair<std::string_view, std::int64_t>, 14> kUnits = {{
      {"", 1},
      {"b", 1},
      {"k", 1'000},
      {"kb", 1'000},
      {"m", 1'000'000},
      {"mb", 1'000'000},
      {"g", 1'000'000'000},
      {"gb", 1'000'000'000},
      {"t", 1'000'000'000'000},
      {"tb", 1'000'000'000'000},
      {"kib", kKi},
      {"mib", kKi * kKi},
      {"gib", kKi * kKi * kKi},
      {"tib", kKi * kKi * kKi * kKi},
  }};
  const auto found =
      std::find_if(kUnits.begin(), kUnits.end(), [&](const auto& u) { return u.first == unit; });
  if (found == kUnits.end()) throw invalid(fmt::format("unknown unit '{}'; {}", unit, kExpected));
  const std::int64_t multiplier = found->second;
  constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();

  // Whole numbers are exact in integers; a double would round sizes near 2^63.
  if (std::all_of(number.begin(), number.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    const std::optional<std::int64_t> whole = parse_int(number);
    if (!whole || *whole > kMax / multiplier) throw invalid("beyond the range of int64");
    return *whole * multiplier;
  }
  const double size = std::round(value * static_cast<double>(multiplier));
  // 2^63 is the first double beyond int64.
  if (!(size < 9223372036854775808.0)) throw invalid("beyond the range of int64");
  return static_cast<std::int64_t>(size);
}

}  // namespace nibble::bench
