// Benchmark results as data: tables of typed cells with the run's environment and options, written
// as CSV (one file per table), one JSON document, and plain-text tables for the terminal. Readers
// for both formats exist so that results can be checked and compared by other tools and by tests.
#pragma once

#include <nlohmann/json.hpp>

#include "nibble/io.hpp"

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace nibble::bench {

// A cell: empty (a measurement that does not exist, e.g. tokens/s of an out-of-memory run),
// integer, real, text or flag. Reals may be NaN or infinite: both formats write them as "nan",
// "inf" and "-inf", since JSON's null is the empty cell.
using Cell = std::variant<std::monostate, std::int64_t, double, std::string, bool>;

enum class ColumnType { kInt, kReal, kText, kBool };

struct Column {
  std::string name;  // snake_case, unique in its table; the CSV header and the JSON key
  ColumnType type = ColumnType::kReal;
  std::string unit;  // "ms", "tokens/s", "bytes", "%" or empty; kept in JSON, not in CSV
};

struct Table {
  std::string name;  // "runs", "steps", "summary": also the CSV file's suffix
  std::vector<Column> columns;
  std::vector<std::vector<Cell>> rows;

  // Appends a row; throws InvalidArgument when its length differs from the columns' or a cell's
  // type does not match its column (an empty cell fits any column; an integer fits a real column
  // and is stored as a real).
  void add_row(std::vector<Cell> row);
  // Index of the column called `name`; throws InvalidArgument naming it when there is none.
  std::size_t column(std::string_view name) const;
};

struct Report {
  std::string suite;           // "batch-sweep", "profile", ...
  nlohmann::json environment;  // device, driver, CUDA, CPU, threads, commit, flags (an object)
  nlohmann::json options;      // every option of the run, seeds included (an object)
  std::vector<Table> tables;
};

// CSV per RFC 4180: a header row of column names, then one line per row; fields holding a comma,
// quote, CR or LF are quoted with quotes doubled; empty cells are empty fields and empty text is
// "" so that the two read back apart; reals print with the fewest digits that read back the same
// double; bools as true/false; lines end in LF (CRLF is read too).
std::string to_csv(const Table& table);
// Reads CSV written by to_csv back into `columns`' types (names must match the header, in order).
// Throws FormatError naming the line for a malformed field, a wrong field count or a value that
// does not parse as its column's type.
Table table_from_csv(std::string_view text, std::string name, std::vector<Column> columns);

// {"format": "nibble-bench", "schema_version": 1, "suite", "environment", "options",
//  "tables": [{"name", "columns": [{"name", "type": "int|real|text|bool", "unit"}], "rows": [[...]]}]}
nlohmann::json to_json(const Report& report);
// The inverse of to_json; throws FormatError naming what is missing or of the wrong type.
Report report_from_json(const nlohmann::json& json);

// Writes <dir>/<stem>.json and <dir>/<stem>-<table>.csv for every table, each atomically (a
// temporary beside it, flushed, renamed); creates `dir`. Returns the paths written. Throws
// IoError naming the path that failed.
std::vector<std::filesystem::path> write_report(const Report& report, const std::filesystem::path& dir,
                                                std::string_view stem);

// Atomic writes come from the core library (a temporary beside the file, fsync, rename).
using nibble::write_file_atomic;

enum class Align { kLeft, kRight };

// A plain-text table: a header row, a rule of dashes, the rows; columns two spaces apart; trailing
// spaces trimmed.
std::string format_table(const std::vector<std::string>& header, const std::vector<Align>& align,
                         const std::vector<std::vector<std::string>>& rows);

// 124475904 -> "124,475,904".
std::string group_digits(std::int64_t value);
// 1536 -> "1.50 KiB", 8.45e9 -> "7.87 GiB": binary units, three significant digits; below 1024
// whole bytes, "512 B".
std::string human_bytes(double bytes);
// Parses "16GB", "16 GiB", "512MiB", "1.5e9", "800M" (decimal SI units for kB/MB/GB/TB and the
// bare K/M/G/T; binary for KiB/MiB/GiB/TiB; case-insensitive). Throws InvalidArgument naming the
// text for anything else, a negative or non-finite size or one beyond int64. Spaces may separate
// number and unit and a bare "B" is allowed; fractions round to the nearest byte.
std::int64_t parse_bytes(std::string_view text);

}  // namespace nibble::bench
